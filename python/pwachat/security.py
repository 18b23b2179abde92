"""What wraps every request: its id, security headers, CORS, HTTPS in production, the access log
line; plus the caller's identity (client IP behind trusted proxies, bearer tokens).

CORS is here rather than Litestar's `CORSConfig` because the contract is stricter than it: a
disallowed origin gets no CORS header at all (Litestar still sends Allow-Methods/Headers and
Expose-Headers) and its preflight is not a text/plain 400; preflights never need a token.

`EdgeMiddleware` sits outside Litestar's router (see `app.py`), so 404s, 405s and CORS answers get
the same headers and log line as everything else. It is plain ASGI on purpose: one pass over the
headers, precomputed header lists, no per-request objects beyond what it must keep.
"""

from __future__ import annotations

import hmac
import logging
import os
import re
import time
from typing import Any

from pwachat.errors import ApiError, error_bytes
from pwachat.logging import log_access
from pwachat.settings import Settings

__all__ = ["EdgeMiddleware", "Unauthorized", "bearer_token", "check_token", "client_ip"]

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
JSON_CSP = b"default-src 'none'; frame-ancestors 'none'"
CORS_METHODS = b"GET, POST, OPTIONS"
CORS_REQUEST_HEADERS = b"Authorization, Content-Type, X-Request-ID"
CORS_EXPOSED = (
    b"X-Request-ID, Retry-After, X-RateLimit-Limit, X-RateLimit-Remaining, X-RateLimit-Reset, "
    b"RateLimit, RateLimit-Policy"
)
log = logging.getLogger("pwachat.security")


class Unauthorized(ApiError):
    status = 401
    code = "unauthorized"

    def __init__(self) -> None:
        super().__init__("A valid bearer token is required", headers={"WWW-Authenticate": "Bearer"})


def new_request_id() -> str:
    return os.urandom(12).hex()


def _header(scope: dict[str, Any], name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return value
    return None


def client_ip(scope: dict[str, Any]) -> str:
    """The caller's address: the socket peer, or behind a trusted proxy what Granian's proxy-header
    support (installed in `app.py`) put in its place."""
    client = scope.get("client")
    return client[0] if client else "unknown"


def bearer_token(scope: dict[str, Any]) -> str | None:
    value = _header(scope, b"authorization")
    if not value:
        return None
    scheme, _, token = value.decode("latin-1").strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def check_token(token: str | None, accepted: tuple[bytes, ...]) -> bool:
    if token is None:
        return False
    candidate = token.encode("utf-8", "surrogateescape")
    # Compare against every accepted token so the time taken does not tell which one was close.
    found = False
    for good in accepted:
        found |= hmac.compare_digest(candidate, good)
    return found


class EdgeMiddleware:
    def __init__(self, app: Any, settings: Settings) -> None:
        self.app = app
        self.production = settings.production
        common = [
            # Granian writes `server: granian` unless the app sends its own; an empty value names nothing.
            (b"server", b""),
            (b"x-content-type-options", b"nosniff"),
            (b"referrer-policy", b"no-referrer"),
            (b"x-frame-options", b"DENY"),
            (b"cross-origin-opener-policy", b"same-origin"),
        ]
        if self.production:
            common.append((b"strict-transport-security", b"max-age=63072000; includeSubDomains"))
        self.common = common
        self.cors_any = "*" in settings.cors_origins
        self.cors_origins = {o.encode() for o in settings.cors_origins if o != "*"}
        self.cors = bool(settings.cors_origins)
        # The chat routes, served without Litestar's router (routes/chat.py: serve_hot); imported
        # here because the routes themselves use this module.
        from pwachat.routes.chat import HOT_ROUTES, serve_hot

        self.hot_routes = HOT_ROUTES
        self.serve_hot = serve_hot

    def _allowed_origin(self, scope: dict[str, Any]) -> bytes | None:
        origin = _header(scope, b"origin")
        if origin is None or not (self.cors_any or origin in self.cors_origins):
            return None
        return origin

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        rid_raw = _header(scope, b"x-request-id")
        rid = rid_raw.decode("latin-1") if rid_raw else ""
        if not _REQUEST_ID.fullmatch(rid):
            rid = new_request_id()
        state = scope.setdefault("state", {})
        state["request_id"] = rid
        fields: dict[str, Any] = {}
        state["log"] = fields
        preflight = False
        status = 0
        extra_headers = [*self.common, (b"x-request-id", rid.encode())]
        if self.cors:
            extra_headers.append((b"vary", b"Origin"))
            origin = self._allowed_origin(scope)
            if origin is not None:
                extra_headers.append((b"access-control-allow-origin", origin))
                if scope["method"] == "OPTIONS" and _header(scope, b"access-control-request-method"):
                    extra_headers += [
                        (b"access-control-allow-methods", CORS_METHODS),
                        (b"access-control-allow-headers", CORS_REQUEST_HEADERS),
                        (b"access-control-max-age", b"600"),
                    ]
                    preflight = True
                else:
                    extra_headers.append((b"access-control-expose-headers", CORS_EXPOSED))

        async def send_wrapper(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                # One pass over the app's headers (ASGI header names are lower-case bytes).
                headers = []
                csp = cache = json = False
                for name, value in message.get("headers", ()):
                    if name == b"server":
                        continue
                    if name == b"content-security-policy":
                        csp = True
                    elif name == b"cache-control":
                        cache = True
                    elif name == b"content-type":
                        json = b"json" in value
                    headers.append((name, value))
                headers += extra_headers
                if not csp:
                    headers.append((b"content-security-policy", JSON_CSP))
                if json and not cache:
                    headers.append((b"cache-control", b"no-store"))
                message["headers"] = headers
            await send(message)

        try:
            if preflight:
                await send_wrapper({"type": "http.response.start", "status": 204, "headers": []})
                await send_wrapper({"type": "http.response.body", "body": b""})
                return
            if (
                self.production
                and not scope["path"].startswith("/api/health")
                and scope.get("scheme", "http") != "https"
            ):
                await self._refuse_http(scope, rid, send_wrapper)
                return
            if scope["method"] == "POST" and (answer_for := self.hot_routes.get(scope["path"])):
                await self.serve_hot(answer_for, scope, receive, send_wrapper)
            else:
                await self.app(scope, receive, send_wrapper)
        finally:
            fields.update(
                request_id=rid,
                method=scope["method"],
                path=scope["path"],
                status=status,
                duration_ms=round((time.perf_counter() - started) * 1000, 3),
            )
            log_access(fields)

    async def _refuse_http(self, scope: dict[str, Any], rid: str, send: Any) -> None:
        if scope["method"] in ("GET", "HEAD"):
            host = (_header(scope, b"host") or b"").decode("latin-1")
            if not _valid_host(host):
                host = ""
            qs = scope.get("query_string", b"").decode("latin-1")
            target = f"https://{host}{scope.get('raw_path', b'').decode('latin-1') or scope['path']}"
            if qs and "?" not in target:
                target += f"?{qs}"
            if host:
                await send(
                    {
                        "type": "http.response.start",
                        "status": 308,
                        "headers": [(b"location", target.encode("latin-1")), (b"content-length", b"0")],
                    }
                )
                await send({"type": "http.response.body", "body": b""})
                return
        body = error_bytes("https_required", "HTTPS is required", rid)
        await send(
            {
                "type": "http.response.start",
                "status": 403,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


_HOST = re.compile(r"[A-Za-z0-9.-]+(:\d{1,5})?|\[[0-9A-Fa-f:.]+\](:\d{1,5})?")


def _valid_host(host: str) -> bool:
    # A Host header is echoed into Location, so only plain host[:port] forms are used.
    return bool(_HOST.fullmatch(host))
