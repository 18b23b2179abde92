"""Shared fixtures: in-process apps (Litestar's TestClient), the error-envelope check, an SSE parser."""

from __future__ import annotations

import ssl
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from litestar.testing import TestClient

import reference

# What must never show up in an error body: traces, file paths, class or library names.
LEAKS = ("Traceback", 'File "', ".py", "ValidationError", "DecodeError", "msgspec", "litestar", "Exception")


class PeerShim:
    """Sets the socket peer an app sees; TestClient always says ("testclient", 50000), which is no IP."""

    def __init__(self, app: Any, peer: str) -> None:
        self.app = app
        self.peer = peer

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            scope = {**scope, "client": (self.peer, 40000)}
        await self.app(scope, receive, send)


MakeClient = Callable[..., TestClient]


@pytest.fixture
def make_client() -> Iterator[MakeClient]:
    """`make_client(**env)`: a started TestClient over `create_app` with those settings (env-style strings).

    Keyword-only extras: `base_url`, `peer` (the socket peer's IP), `setup(app)` called on the built app.
    Redirects are not followed, so a 308 is seen as such.
    """
    # Imported here so that tests which never build an app (e2e, native) do not depend on it.
    from pwachat.app import create_app
    from pwachat.settings import Settings

    with ExitStack() as stack:

        def factory(
            *,
            base_url: str = "http://testserver.local",
            peer: str | None = None,
            setup: Callable[[Any], None] | None = None,
            **env: Any,
        ) -> TestClient:
            settings = Settings.from_mapping({"LOG_FILE": "", **{k: str(v) for k, v in env.items()}})
            app = create_app(settings)
            if setup is not None:
                setup(app)
            asgi = app if peer is None else PeerShim(app, peer)
            client = stack.enter_context(TestClient(asgi, base_url=base_url))
            client.follow_redirects = False
            return client

        yield factory


@pytest.fixture
def client(make_client: MakeClient) -> TestClient:
    """The app with its defaults: development, echo provider only, memory rate limit."""
    return make_client()


def _check_error(resp: httpx.Response, status: int, code: str, *, absent: tuple[str, ...] = ()) -> dict:
    """Assert the contract's error envelope; returns the `error` object."""
    assert resp.status_code == status, resp.text
    assert resp.headers.get("content-type", "").startswith("application/json"), resp.headers
    body = resp.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert err["code"] == code, err
    assert isinstance(err["message"], str) and err["message"].strip(), err
    assert err["request_id"] == resp.headers["x-request-id"], (err, resp.headers)
    assert set(err) <= {"code", "message", "request_id", "details"}, err
    if "details" in err:
        assert isinstance(err["details"], list)
        for d in err["details"]:
            assert set(d) == {"field", "message"} and all(isinstance(v, str) for v in d.values()), d
    for needle in (*LEAKS, *absent):
        assert needle not in resp.text, f"{needle!r} leaked into {resp.text}"
    return err


@pytest.fixture
def check_error() -> Callable[..., dict]:
    """`check_error(resp, status, code, absent=(...))`: status, envelope, request id, nothing leaked."""
    return _check_error


@dataclass(frozen=True)
class SseEvent:
    id: str | None
    event: str
    data: str
    data_lines: int


def _parse_sse(raw: bytes) -> list[SseEvent]:
    """The events of a stream, read by the spec-following parser in reference.py."""
    events, _comments = reference.parse_sse(raw)
    return [SseEvent(m.last_event_id or None, m.type, m.data, m.data.count("\n") + 1) for m in events]


@pytest.fixture
def parse_sse() -> Callable[[bytes], list[SseEvent]]:
    return _parse_sse


@pytest.fixture
def tls_server_context(tmp_path, monkeypatch) -> ssl.SSLContext:  # type: ignore[no-untyped-def]
    """A server certificate for `localhost` from a throwaway CA, which the process then trusts
    (SSL_CERT_FILE is where OpenSSL, and so `ssl.create_default_context`, looks for CAs)."""
    import trustme

    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(context)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))
    return context
