"""What wraps every request: its id, security headers, CORS, HTTPS in production, the access log
line. It knows nothing of the routes behind it.

CORS is here rather than Litestar's `CORSConfig` because the contract is stricter than it: a
disallowed origin gets no CORS header at all (Litestar still sends Allow-Methods/Headers and
Expose-Headers) and its preflight is not a text/plain 400; preflights never need a token.

`EdgeMiddleware` sits outside the routes (see `app.py`), so 404s, 405s and CORS answers get
the same headers and log line as everything else. While the process drains (SIGTERM, see
`drain.py`), every request that still reaches it is answered `503 shutting_down`, the health
routes too: a load balancer that still reaches this process learns that it is leaving.

It is plain ASGI on purpose: one pass over the headers, precomputed header lists, no per-request
objects beyond what it must keep.
"""

from __future__ import annotations

import os
import re
import time
from typing import Any

from pwachat.drain import DRAIN, RETRY_AFTER_S
from pwachat.errors import HttpsRequired, PanicException, ShuttingDown, as_api_error, send_error
from pwachat.logging import log_access
from pwachat.metrics import METRICS
from pwachat.settings import Settings

__all__ = ["EdgeMiddleware"]

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
JSON_CSP = b"default-src 'none'; frame-ancestors 'none'"
CORS_METHODS = b"GET, POST, OPTIONS"
CORS_REQUEST_HEADERS = b"Authorization, Content-Type, X-Request-ID"
CORS_EXPOSED = (
    b"X-Request-ID, Retry-After, X-RateLimit-Limit, X-RateLimit-Remaining, X-RateLimit-Reset, "
    b"RateLimit, RateLimit-Policy, X-Fallback-From"
)


def new_request_id() -> str:
    return os.urandom(12).hex()


def _header(scope: dict[str, Any], name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return value
    return None


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
            if DRAIN.draining:
                await send_error(send_wrapper, _shutting_down(), scope)
                return
            if preflight:
                await send_wrapper({"type": "http.response.start", "status": 204, "headers": []})
                await send_wrapper({"type": "http.response.body", "body": b""})
                return
            if (
                self.production
                and not scope["path"].startswith("/api/health")
                and scope.get("scheme", "http") != "https"
            ):
                await self._refuse_http(scope, send_wrapper)
                return
            await self.app(scope, receive, send_wrapper)
        except PanicException as exc:
            # A bug in the native extension raises a BaseException, which every `except Exception`
            # on the way (Litestar's handlers among them) lets pass: this is the last place to
            # answer it (logged once by `as_api_error`; past the head there is nothing to add).
            err = as_api_error(exc, scope)
            if status == 0:
                await send_error(send_wrapper, err, scope)
        finally:
            elapsed = time.perf_counter() - started
            fields.update(
                request_id=rid,
                method=scope["method"],
                path=scope["path"],
                status=status,
                duration_ms=round(elapsed * 1000, 3),
            )
            log_access(fields)
            METRICS.request(scope["path"], scope["method"], status, elapsed)

    async def _refuse_http(self, scope: dict[str, Any], send: Any) -> None:
        if scope["method"] in ("GET", "HEAD"):
            host = (_header(scope, b"host") or b"").decode("latin-1")
            if _valid_host(host):
                qs = scope.get("query_string", b"").decode("latin-1")
                path = scope.get("raw_path", b"").decode("latin-1") or scope["path"]
                target = f"https://{host}{path}"
                if qs and "?" not in target:
                    target += f"?{qs}"
                headers = [(b"location", target.encode("latin-1")), (b"content-length", b"0")]
                await send({"type": "http.response.start", "status": 308, "headers": headers})
                await send({"type": "http.response.body", "body": b""})
                return
        await send_error(send, HttpsRequired(), scope)


def _shutting_down() -> ShuttingDown:
    # `Connection: close` as well: the client should take its next request elsewhere (Granian adds
    # it too once its own shutdown has reached the connection).
    return ShuttingDown(headers={"Retry-After": str(RETRY_AFTER_S), "Connection": "close"})


_HOST = re.compile(r"[A-Za-z0-9.-]+(:\d{1,5})?|\[[0-9A-Fa-f:.]+\](:\d{1,5})?")


def _valid_host(host: str) -> bool:
    # A Host header is echoed into Location, so only plain host[:port] forms are used.
    return bool(_HOST.fullmatch(host))
