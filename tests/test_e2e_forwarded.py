"""End to end: the real `pwachat serve` behind a (pretend) TLS-terminating proxy on 127.0.0.1."""

from __future__ import annotations

from pathlib import Path

import pytest

from server import Server, start_server, stop_server

pytestmark = pytest.mark.e2e

PROD = {"APP_ENV": "production", "SECRET_KEY": "e2e-secret", "ECHO_PROVIDER": "on"}


@pytest.fixture
def proxied(tmp_path: Path):
    srv = start_server(tmp_path, TRUSTED_PROXIES="127.0.0.1", RATELIMIT_PER_MINUTE="2", **PROD)
    yield srv
    stop_server(srv)


def test_forwarded_proto_alone_is_believed_in_production(proxied: Server) -> None:
    https = {"X-Forwarded-Proto": "https"}
    status, headers, body = proxied.request("GET", "/api/models", headers=https)
    assert status == 200, body
    assert headers["strict-transport-security"].startswith("max-age=")
    status, _, body = proxied.post_json("/api/chat", {"message": "hi"}, **https)
    assert status == 200, body
    # Without the header (or with http) the request is plain http: redirected, not served.
    assert proxied.request("GET", "/api/models")[0] == 308
    assert proxied.request("GET", "/api/models", headers={"X-Forwarded-Proto": "http"})[0] == 308


def test_forwarded_for_garbage_does_not_make_new_callers(proxied: Server) -> None:
    https = {"X-Forwarded-Proto": "https"}
    statuses = [
        proxied.post_json("/api/chat", {"message": "hi"}, **https, **{"X-Forwarded-For": xff})[0]
        for xff in ("198.51.100.1", "198.51.100.1, not-an-ip", "198.51.100.1:4711, unknown")
    ]
    assert statuses == [200, 200, 429]
