"""Headers every response carries: security headers, request id, HTTPS in production, CORS."""

from __future__ import annotations

import re

import pytest

JSON_CSP = "default-src 'none'; frame-ancestors 'none'"
HSTS = "max-age=63072000; includeSubDomains"
BANNERS = ("litestar", "granian", "uvicorn", "python", "starlette", "hypercorn", "pwachat")
RATE_HEADERS = (
    "x-ratelimit-limit",
    "x-ratelimit-remaining",
    "x-ratelimit-reset",
    "ratelimit",
    "ratelimit-policy",
)
ORIGIN = "https://app.example"


def assert_security_headers(resp, *, json_body: bool = True) -> None:
    h = resp.headers
    assert h.get("x-content-type-options") == "nosniff", h
    assert h.get("referrer-policy") == "no-referrer", h
    assert h.get("x-frame-options") == "DENY", h
    assert h.get("cross-origin-opener-policy") == "same-origin", h
    assert h.get("content-security-policy"), h
    if json_body:
        assert h["content-security-policy"] == JSON_CSP, h
        assert h.get("cache-control") == "no-store", h
    server = h.get("server", "").lower()
    assert not any(name in server for name in BANNERS), h
    assert re.fullmatch(r"[A-Za-z0-9._:-]{1,128}", h.get("x-request-id", "")), h
    # Each header once: a doubled security header is ambiguous to browsers.
    for name in ("x-content-type-options", "x-frame-options", "content-security-policy", "x-request-id"):
        assert len(h.get_list(name)) == 1, (name, h)


def _responses(make_client) -> dict:
    client = make_client(RATELIMIT_PER_MINUTE="2", MAX_BODY_BYTES="100")
    auth_client = make_client(API_TOKENS="alpha")
    out = {
        "200 json": client.get("/api/models"),
        "200 health": client.get("/api/health"),
        "200 chat": client.post("/api/chat", json={"message": "hi"}),
        "sse": client.post("/api/chat/stream", json={"message": "hi"}),
        "404": client.get("/api/nope"),
        "404 outside /api": client.get("/index.html"),
        "405": client.get("/api/chat"),
        "413": client.post(
            "/api/chat", content=b"{" + b" " * 200, headers={"Content-Type": "application/json"}
        ),
        "415": client.post("/api/chat", content=b"hi", headers={"Content-Type": "text/plain"}),
        "400": client.post("/api/chat", content=b"{", headers={"Content-Type": "application/json"}),
        "429": client.post("/api/chat", json={"message": "hi"}),
        "401": auth_client.get("/api/models"),
    }
    assert [r.status_code for r in out.values()] == [
        200,
        200,
        200,
        200,
        404,
        404,
        405,
        413,
        415,
        400,
        429,
        401,
    ]
    return out


KINDS = ["200 json", "200 health", "200 chat", "sse", "404", "404 outside /api", "405", "413", "415", "400"]
KINDS += ["429", "401"]


@pytest.mark.parametrize("kind", KINDS)
def test_security_headers_on_every_response(make_client, kind: str) -> None:
    resp = _responses(make_client)[kind]
    assert_security_headers(resp, json_body=kind != "sse")
    assert "strict-transport-security" not in resp.headers  # development: no HSTS


def test_sse_response_is_not_cached(client) -> None:
    resp = client.post("/api/chat/stream", json={"message": "hi"})
    assert resp.headers["content-type"].startswith("text/event-stream")
    assert resp.headers["cache-control"] == "no-cache"
    assert_security_headers(resp, json_body=False)


# --------------------------------------------------------------------------------------------
# Request id
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rid", ["abc-123._:X", "x" * 128, "0", "A:B.C-D_E"])
def test_valid_request_id_is_echoed(client, check_error, rid: str) -> None:
    for resp in (
        client.get("/api/health", headers={"X-Request-ID": rid}),
        client.post("/api/chat", json={"message": "hi"}, headers={"X-Request-ID": rid}),
    ):
        assert resp.headers["x-request-id"] == rid
    err = check_error(client.get("/api/nope", headers={"X-Request-ID": rid}), 404, "not_found")
    assert err["request_id"] == rid


@pytest.mark.parametrize(
    "rid",
    ["", "x" * 129, "abc 123", "abc/123", "abc\u00e9", "\u65e5\u672c", "a,b", "a;b", "<script>"],
    ids=["empty", "129 chars", "space", "slash", "latin-1", "cjk", "comma", "semicolon", "markup"],
)
def test_invalid_request_id_is_replaced(client, check_error, rid: str) -> None:
    header = rid.encode("utf-8")
    resp = client.get("/api/health", headers={"X-Request-ID": header})
    new = resp.headers["x-request-id"]
    assert new and new != rid
    assert re.fullmatch(r"[A-Za-z0-9._:-]{1,128}", new)
    err = check_error(client.get("/api/nope", headers={"X-Request-ID": header}), 404, "not_found")
    assert err["request_id"] != rid


def test_fresh_request_ids_differ(client) -> None:
    ids = {client.get("/api/health/live").headers["x-request-id"] for _ in range(20)}
    assert len(ids) == 20


# --------------------------------------------------------------------------------------------
# Production: HTTPS only (but health), HSTS
# --------------------------------------------------------------------------------------------

PROD = {"APP_ENV": "production", "SECRET_KEY": "prod-secret", "ECHO_PROVIDER": "on"}


def test_production_get_over_http_is_redirected_to_https(make_client) -> None:
    client = make_client(**PROD)
    resp = client.get("/api/models?a=1&b=x%20y")
    assert resp.status_code == 308
    assert resp.headers["location"] == "https://testserver.local/api/models?a=1&b=x%20y"
    assert_security_headers(resp, json_body=False)
    assert resp.headers["strict-transport-security"] == HSTS


def test_production_redirect_without_query(make_client) -> None:
    client = make_client(**PROD)
    resp = client.get("/api/rate-limit")
    assert resp.status_code == 308
    # "https://<Host><path>?<query>"; with no query an empty "?" is harmless either way.
    assert resp.headers["location"] in (
        "https://testserver.local/api/rate-limit",
        "https://testserver.local/api/rate-limit?",
    )


def test_production_head_over_http_is_redirected(make_client) -> None:
    client = make_client(**PROD)
    resp = client.head("/api/models")
    assert resp.status_code == 308
    assert resp.headers["location"].startswith("https://testserver.local/api/models")


@pytest.mark.parametrize("path", ["/api/chat", "/api/chat/stream"])
def test_production_post_over_http_is_refused(make_client, check_error, path: str) -> None:
    client = make_client(**PROD)
    resp = client.post(path, json={"message": "zebra-quartz-4711"})
    check_error(resp, 403, "https_required", absent=("zebra-quartz-4711",))
    assert_security_headers(resp)
    assert resp.headers["strict-transport-security"] == HSTS
    # Nothing was counted against the caller (an absolute URL switches this client to https).
    quota = client.get("https://testserver.local/api/rate-limit")
    assert quota.status_code == 200
    assert quota.json()["remaining"]["per_minute"] == 10


@pytest.mark.parametrize("path", ["/api/health", "/api/health/live", "/api/health/ready"])
def test_production_health_stays_reachable_over_http(make_client, path: str) -> None:
    client = make_client(**PROD)
    resp = client.get(path)
    assert resp.status_code == 200, resp.text
    assert resp.headers["strict-transport-security"] == HSTS


def test_production_over_https_serves(make_client) -> None:
    client = make_client(base_url="https://testserver.local", **PROD)
    for resp in (
        client.get("/api/models"),
        client.post("/api/chat", json={"message": "hi"}),
        client.post("/api/chat/stream", json={"message": "hi"}),
    ):
        assert resp.status_code == 200, resp.text
        assert resp.headers["strict-transport-security"] == HSTS
    resp = client.get("/api/nope")
    assert resp.status_code == 404
    assert resp.headers["strict-transport-security"] == HSTS


def test_development_serves_plain_http(client) -> None:
    resp = client.post("/api/chat", json={"message": "hi"})
    assert resp.status_code == 200
    assert "strict-transport-security" not in resp.headers


# TestClient's peer is ("testclient", 50000), which is no IP; PeerShim (conftest) sets a real one.
# `forwarded.ForwardedHeaders` reads X-Forwarded-Proto and X-Forwarded-For each on its own.
def test_forwarded_proto_from_trusted_proxy_is_believed(make_client) -> None:
    client = make_client(peer="10.1.2.3", TRUSTED_PROXIES="10.0.0.0/8", **PROD)
    https = {"X-Forwarded-Proto": "https", "X-Forwarded-For": "198.51.100.7"}
    resp = client.post("/api/chat", json={"message": "hi"}, headers=https)
    assert resp.status_code == 200, resp.text
    resp = client.get("/api/models", headers=https)
    assert resp.status_code == 200, resp.text
    # The proxy says the client used http: still redirected.
    resp = client.get("/api/models", headers={**https, "X-Forwarded-Proto": "http"})
    assert resp.status_code == 308


def test_forwarded_proto_alone_from_trusted_proxy_is_believed(make_client) -> None:
    # Many nginx set-ups send X-Forwarded-Proto and no X-Forwarded-For: no redirect loop.
    client = make_client(peer="10.1.2.3", TRUSTED_PROXIES="10.0.0.0/8", **PROD)
    https = {"X-Forwarded-Proto": "https"}
    for resp in (
        client.get("/api/models", headers=https),
        client.get("/api/rate-limit", headers=https),
        client.post("/api/chat", json={"message": "hi"}, headers=https),
        client.post("/api/chat/stream", json={"message": "hi"}, headers=https),
    ):
        assert resp.status_code == 200, resp.text
        assert resp.headers["strict-transport-security"] == HSTS
    assert client.get("/api/models", headers={"X-Forwarded-Proto": "HTTPS"}).status_code == 200
    assert client.get("/api/models", headers={"X-Forwarded-Proto": "http"}).status_code == 308
    assert client.get("/api/models").status_code == 308


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ([("X-Forwarded-Proto", "http, https")], 200),
        ([("X-Forwarded-Proto", "https, http")], 308),
        ([("X-Forwarded-Proto", "http"), ("X-Forwarded-Proto", "https")], 200),
        ([("X-Forwarded-Proto", "https"), ("X-Forwarded-Proto", "http")], 308),
        ([("X-Forwarded-Proto", "https, ftp")], 308),
    ],
    ids=["list https last", "list http last", "lines https last", "lines http last", "not a scheme"],
)
def test_right_most_forwarded_proto_counts(make_client, headers, status: int) -> None:
    client = make_client(peer="10.1.2.3", TRUSTED_PROXIES="10.0.0.0/8", **PROD)
    assert client.get("/api/models", headers=headers).status_code == status


@pytest.mark.parametrize("peer", ["203.0.113.9", None], ids=["untrusted ip", "testclient"])
@pytest.mark.parametrize(
    "headers",
    [{"X-Forwarded-Proto": "https", "X-Forwarded-For": "198.51.100.7"}, {"X-Forwarded-Proto": "https"}],
    ids=["with xff", "proto alone"],
)
def test_forwarded_proto_from_untrusted_peer_is_ignored(make_client, check_error, peer, headers) -> None:
    client = make_client(peer=peer, TRUSTED_PROXIES="10.0.0.0/8", **PROD)
    check_error(client.post("/api/chat", json={"message": "hi"}, headers=headers), 403, "https_required")
    assert client.get("/api/models", headers=headers).status_code == 308


# --------------------------------------------------------------------------------------------
# CORS
# --------------------------------------------------------------------------------------------


def preflight(client, origin: str = ORIGIN, path: str = "/api/chat"):
    headers = {
        "Origin": origin,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type, authorization, x-request-id",
    }
    return client.options(path, headers=headers)


def vary(resp) -> set[str]:
    return {v.strip().lower() for line in resp.headers.get_list("vary") for v in line.split(",")}


def cors_headers(resp) -> dict[str, str]:
    return {k: v for k, v in resp.headers.items() if k.lower().startswith("access-control-")}


@pytest.mark.parametrize("path", ["/api/chat", "/api/chat/stream", "/api/models"])
def test_preflight_from_allowed_origin(make_client, path: str) -> None:
    client = make_client(CORS_ORIGINS=ORIGIN)
    resp = preflight(client, path=path)
    assert resp.status_code == 204, resp.text
    assert resp.headers["access-control-allow-origin"] == ORIGIN
    assert resp.headers.get("access-control-allow-credentials", "").lower() != "true"
    assert "origin" in vary(resp)
    methods = {m.strip().upper() for m in resp.headers["access-control-allow-methods"].split(",")}
    assert "POST" in methods
    allowed = {m.strip().lower() for m in resp.headers["access-control-allow-headers"].split(",")}
    assert {"content-type", "authorization"} <= allowed
    assert_security_headers(resp, json_body=False)


def test_preflight_needs_no_token(make_client) -> None:
    client = make_client(CORS_ORIGINS=ORIGIN, API_TOKENS="alpha,beta")
    resp = preflight(client)
    assert resp.status_code == 204, resp.text
    assert resp.headers["access-control-allow-origin"] == ORIGIN


def test_actual_request_from_allowed_origin_exposes_headers(make_client) -> None:
    client = make_client(CORS_ORIGINS=ORIGIN, RATELIMIT_PER_MINUTE="1")
    ok = client.post("/api/chat", json={"message": "hi"}, headers={"Origin": ORIGIN})
    refused = client.post("/api/chat", json={"message": "hi"}, headers={"Origin": ORIGIN})
    assert (ok.status_code, refused.status_code) == (200, 429)
    for resp in (ok, refused):  # a browser client must be able to read a 429 and its Retry-After
        assert resp.headers["access-control-allow-origin"] == ORIGIN
        assert "*" not in resp.headers["access-control-allow-origin"]
        assert resp.headers.get("access-control-allow-credentials", "").lower() != "true"
        assert "origin" in vary(resp)
        exposed = {h.strip().lower() for h in resp.headers["access-control-expose-headers"].split(",")}
        assert {"x-request-id", "retry-after", *RATE_HEADERS} <= exposed, exposed


def test_error_response_from_allowed_origin_is_readable(make_client) -> None:
    client = make_client(CORS_ORIGINS=ORIGIN, API_TOKENS="alpha")
    resp = client.post("/api/chat", json={"message": "hi"}, headers={"Origin": ORIGIN})
    assert resp.status_code == 401
    assert resp.headers["access-control-allow-origin"] == ORIGIN


@pytest.mark.parametrize(
    "origin", ["https://evil.example", "http://app.example", "https://app.example.evil", "null"]
)
def test_disallowed_origin_gets_no_cors_headers(make_client, origin: str) -> None:
    client = make_client(CORS_ORIGINS=ORIGIN)
    actual = client.post("/api/chat", json={"message": "hi"}, headers={"Origin": origin})
    assert actual.status_code == 200
    assert cors_headers(actual) == {}, actual.headers


@pytest.mark.parametrize("origin", ["https://evil.example", "null"])
def test_preflight_from_disallowed_origin_gets_no_cors_headers(make_client, origin: str) -> None:
    client = make_client(CORS_ORIGINS=ORIGIN)
    pre = preflight(client, origin=origin)
    assert cors_headers(pre) == {}, pre.headers
    if pre.status_code >= 400:  # an error like any other: the envelope
        assert pre.headers.get("content-type", "").startswith("application/json"), (pre.headers, pre.text)
        err = pre.json()["error"]
        assert err["request_id"] == pre.headers["x-request-id"] and err["code"], err
    assert_security_headers(pre, json_body=pre.status_code != 204)


def test_no_cors_headers_without_cors_origins(client) -> None:
    resp = client.post("/api/chat", json={"message": "hi"}, headers={"Origin": ORIGIN})
    assert resp.status_code == 200
    assert cors_headers(resp) == {}
