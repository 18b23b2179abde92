"""POST /api/chat input rules: JSON, fields, sanitising bounds, providers and models, and the order
in which the edge checks (route, method, media type, size, auth, JSON, validation, rate limit) apply."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

MARKER = "zebra-quartz-4711"  # chat text that must never come back in an error body
MSG = f"hello {MARKER}"


def post(client, body: Any, **kw):
    """POST /api/chat with a JSON value (or raw bytes) as body."""
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **kw.pop("headers", {})}
    return client.post(kw.pop("path", "/api/chat"), content=content, headers=headers, **kw)


def field_named(err: dict, field: str) -> bool:
    return any(d["field"] == field for d in err.get("details", []))


# --------------------------------------------------------------------------------------------
# Not JSON, or not the request object
# --------------------------------------------------------------------------------------------

INVALID_JSON = {
    "truncated": b'{"message": "' + MARKER.encode(),
    "trailing garbage": b'{"message": "' + MARKER.encode() + b'"} x',
    "two values": b'{"message": "' + MARKER.encode() + b'"}{"message": "again"}',
    "not utf-8": b'{"message": "caf\xc3\x28 ' + MARKER.encode() + b'"}',
    "latin-1 byte": b'{"message": "caf\xe9 ' + MARKER.encode() + b'"}',
    "empty body": b"",
    "only white space": b"  \n ",
    "single quotes": b"{'message': '" + MARKER.encode() + b"'}",
    "trailing comma": b'{"message": "' + MARKER.encode() + b'",}',
    "NaN literal": b'{"message": "' + MARKER.encode() + b'", "temperature": NaN}',
    "Infinity literal": b'{"message": "' + MARKER.encode() + b'", "temperature": -Infinity}',
}


@pytest.mark.parametrize("body", INVALID_JSON.values(), ids=INVALID_JSON.keys())
def test_body_that_is_not_json_is_invalid_json(client, check_error, body: bytes) -> None:
    check_error(post(client, body), 400, "invalid_json", absent=(MARKER,))


@pytest.mark.parametrize("body", [[], [{"message": MSG}], "hi", 42, None, True], ids=repr)
def test_body_that_is_not_an_object_is_invalid_request(client, check_error, body: Any) -> None:
    check_error(post(client, body), 400, "invalid_request", absent=(MARKER,))


def test_missing_message_is_invalid_request_naming_the_field(client, check_error) -> None:
    err = check_error(post(client, {"provider": "echo"}), 400, "invalid_request")
    if "details" in err:
        assert field_named(err, "message"), err


# (body, the field a `details` entry should name if details are given)
WRONG = {
    "message int": ({"message": 42}, "message"),
    "message list": ({"message": [MSG]}, "message"),
    "message null": ({"message": None}, "message"),
    "provider int": ({"message": MSG, "provider": 1}, "provider"),
    "model int": ({"message": MSG, "model": 1}, "model"),
    "history not a list": ({"message": MSG, "history": MARKER}, "history"),
    "history object": ({"message": MSG, "history": {"role": "user", "content": MARKER}}, "history"),
    "history item not an object": ({"message": MSG, "history": [MARKER]}, "history[0]"),
    "role system": ({"message": MSG, "history": [{"role": "system", "content": MARKER}]}, "history[0].role"),
    "role bogus": ({"message": MSG, "history": [{"role": "bogus", "content": MARKER}]}, "history[0].role"),
    "role missing": ({"message": MSG, "history": [{"content": MARKER}]}, "history[0].role"),
    "content int": ({"message": MSG, "history": [{"role": "user", "content": 7}]}, "history[0].content"),
    "content missing": ({"message": MSG, "history": [{"role": "user"}]}, "history[0].content"),
    "temperature string": ({"message": MSG, "temperature": "hot"}, "temperature"),
    "temperature bool": ({"message": MSG, "temperature": True}, "temperature"),
    "max_tokens float": ({"message": MSG, "max_tokens": 1.5}, "max_tokens"),
    "max_tokens bool": ({"message": MSG, "max_tokens": True}, "max_tokens"),
    "max_tokens string": ({"message": MSG, "max_tokens": "10"}, "max_tokens"),
    "unknown top-level field": ({"message": MSG, "stream": True}, "stream"),
    "unknown history field": (
        {"message": MSG, "history": [{"role": "user", "content": MARKER, "name": "bob"}]},
        "history[0].name",
    ),
    "temperature below 0": ({"message": MSG, "temperature": -0.1}, "temperature"),
    "temperature above 2": ({"message": MSG, "temperature": 2.1}, "temperature"),
    "max_tokens 0": ({"message": MSG, "max_tokens": 0}, "max_tokens"),
    "max_tokens negative": ({"message": MSG, "max_tokens": -1}, "max_tokens"),
    "max_tokens over MAX_TOKENS": ({"message": MSG, "max_tokens": 51}, "max_tokens"),
}


@pytest.mark.parametrize(("body", "field"), WRONG.values(), ids=WRONG.keys())
def test_wrong_or_out_of_range_field_is_invalid_request(make_client, check_error, body, field) -> None:
    client = make_client(MAX_TOKENS="50")
    err = check_error(post(client, body), 400, "invalid_request", absent=(MARKER,))
    if "details" in err:
        assert field_named(err, field), err


@pytest.mark.parametrize(
    "extra",
    [{"temperature": 0}, {"temperature": 2}, {"temperature": 1.25}, {"max_tokens": 1}, {"max_tokens": 50}],
    ids=repr,
)
def test_boundary_values_are_accepted(make_client, extra: dict) -> None:
    client = make_client(MAX_TOKENS="50")
    resp = post(client, {"message": "hi", **extra})
    assert resp.status_code == 200, resp.text


def test_null_for_optional_fields_means_absent(client) -> None:
    body = {"message": "hi", "provider": None, "model": None, "history": None, "temperature": None}
    resp = post(client, {**body, "max_tokens": None})
    assert resp.status_code == 200, resp.text
    assert resp.json()["provider"] == "echo"
    assert resp.json()["response"] == "You said: hi"


def test_all_fields_together_are_accepted(client) -> None:
    body = {
        "message": "Hello, AI!",
        "provider": "echo",
        "model": "echo",
        "history": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
        "temperature": 0.7,
        "max_tokens": 500,
    }
    resp = post(client, body)
    assert resp.status_code == 200, resp.text
    assert resp.json()["response"] == "You said: Hello, AI!"


# --------------------------------------------------------------------------------------------
# Sanitising and length bounds
# --------------------------------------------------------------------------------------------

EMPTY_AFTER_SANITISING = {
    "empty": "",
    "white space": " \t\n\r\n \u3000 ",
    "C0 and C1 controls": "\x00\x01\x07\x1b\x7f\x85\x9f",
    "bidi overrides and isolates": "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069",
    "controls, bidi and spaces": " \x00\u202e \r\n\u2066\x1f ",
}


@pytest.mark.parametrize("message", EMPTY_AFTER_SANITISING.values(), ids=EMPTY_AFTER_SANITISING.keys())
def test_message_empty_after_sanitising_is_invalid_request(client, check_error, message: str) -> None:
    err = check_error(post(client, {"message": message}), 400, "invalid_request")
    if "details" in err:
        assert field_named(err, "message"), err


@pytest.mark.parametrize(
    ("message", "accepted"),
    [
        ("abcde", True),
        ("abcdef", False),
        ("\U0001f600" * 5, True),  # 5 code points, 10 UTF-16 units, 20 UTF-8 bytes
        ("\U0001f600" * 6, False),
        ("e\u0301" * 5, True),  # 10 code points before NFC, 5 after
        ("e\u0301" * 6, False),
        ("  abcde \n\t", True),  # trimmed before counting
        ("ab\u202ec\x00de", True),  # removed characters do not count
        ("a\r\nb\r\nc", True),  # CRLF counts as one LF: "a\nb\nc"
    ],
    ids=[
        "5 ascii",
        "6 ascii",
        "5 emoji",
        "6 emoji",
        "5 decomposed",
        "6 decomposed",
        "trim",
        "removed",
        "crlf",
    ],
)
def test_message_length_is_counted_in_code_points_after_sanitising(
    make_client, check_error, message: str, accepted: bool
) -> None:
    client = make_client(MAX_MESSAGE_CHARS="5")
    resp = post(client, {"message": message})
    if accepted:
        assert resp.status_code == 200, resp.text
    else:
        err = check_error(resp, 400, "invalid_request", absent=(message,))
        if "details" in err:
            assert field_named(err, "message"), err


def test_history_of_max_items_is_accepted_and_one_more_refused(make_client, check_error) -> None:
    client = make_client(MAX_HISTORY_MESSAGES="3")
    items = [{"role": ("user", "assistant")[i % 2], "content": f"turn {i} {MARKER}"} for i in range(4)]
    assert post(client, {"message": "hi", "history": items[:3]}).status_code == 200
    err = check_error(
        post(client, {"message": "hi", "history": items}), 400, "invalid_request", absent=(MARKER,)
    )
    if "details" in err:
        assert field_named(err, "history"), err


def test_history_content_over_the_limit_names_its_index(make_client, check_error) -> None:
    client = make_client(MAX_MESSAGE_CHARS="20")
    history = [
        {"role": "user", "content": "short"},
        {"role": "assistant", "content": MARKER + "x" * 20},
        {"role": "user", "content": "short"},
    ]
    err = check_error(
        post(client, {"message": "hi", "history": history}), 400, "invalid_request", absent=(MARKER,)
    )
    assert field_named(err, "history[1].content"), err
    # At the limit it is fine (history content is bounded like message).
    history[1]["content"] = "x" * 20
    assert post(client, {"message": "hi", "history": history}).status_code == 200


def test_history_content_empty_after_sanitising_is_refused(client, check_error) -> None:
    history = [{"role": "user", "content": "fine"}, {"role": "assistant", "content": " \u202e\x00 "}]
    err = check_error(post(client, {"message": "hi", "history": history}), 400, "invalid_request")
    if "details" in err:
        assert field_named(err, "history[1].content"), err


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b'{"message": "\\ud800 ' + MARKER.encode() + b'"}', "message"),
        (b'{"message": "' + MARKER.encode() + b' \\udfff"}', "message"),
        (
            b'{"message": "hi", "history": [{"role": "user", "content": "\\udc00 '
            + MARKER.encode()
            + b'"}]}',
            "history[0].content",
        ),
    ],
    ids=["high surrogate in message", "low surrogate in message", "surrogate in history"],
)
def test_escaped_lone_surrogate_is_invalid_request_not_invalid_json(client, check_error, body, field) -> None:
    err = check_error(post(client, body), 400, "invalid_request", absent=(MARKER,))
    if "details" in err:
        assert field_named(err, field), err


def test_escaped_surrogate_pair_is_fine(client) -> None:
    resp = post(client, b'{"message": "smile \\ud83d\\ude00"}')
    assert resp.status_code == 200, resp.text
    assert resp.json()["response"] == "You said: smile \U0001f600"


# --------------------------------------------------------------------------------------------
# Providers and models
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("provider", ["nope", "gemini", "openai-compatible"])
def test_unknown_provider(client, check_error, provider: str) -> None:
    check_error(
        post(client, {"message": MSG, "provider": provider}), 400, "unknown_provider", absent=(MARKER,)
    )


@pytest.mark.parametrize(
    ("provider", "label"),
    [("openai", "OpenAI"), ("claude", "Anthropic"), ("anthropic", "Anthropic")],
)
def test_provider_without_key_is_503_not_configured(client, check_error, provider: str, label: str) -> None:
    err = check_error(post(client, {"message": MSG, "provider": provider}), 503, "provider_not_configured")
    assert f"{label} API key not configured" in err["message"]


def test_echo_switched_off_is_unknown_provider(make_client, check_error) -> None:
    client = make_client(ECHO_PROVIDER="off")
    check_error(post(client, {"message": MSG, "provider": "echo"}), 400, "unknown_provider", absent=(MARKER,))


def test_unknown_model_without_provider(client, check_error) -> None:
    check_error(
        post(client, {"message": MSG, "model": "no-such-model"}), 400, "unknown_model", absent=(MARKER,)
    )


@pytest.mark.parametrize("model", ["no-such-model", "gpt-4o-mini", "claude-sonnet-4-5"])
def test_unknown_model_for_the_given_provider(client, check_error, model: str) -> None:
    body = {"message": MSG, "provider": "echo", "model": model}
    check_error(post(client, body), 400, "unknown_model", absent=(MARKER,))


def test_model_without_provider_selects_the_provider_offering_it(client) -> None:
    resp = post(client, {"message": "hi", "model": "echo"})
    assert resp.status_code == 200, resp.text
    assert resp.json()["provider"] == "echo" and resp.json()["model"] == "echo"


class _FakeAnthropic(BaseHTTPRequestHandler):
    """Answers any POST like Anthropic's Messages API would, non-streaming."""

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        request = json.loads(self.rfile.read(length) or b"{}")
        self.server.requests.append((self.path, request))  # type: ignore[attr-defined]
        body = json.dumps(
            {
                "id": "msg_test",
                "type": "message",
                "role": "assistant",
                "model": request.get("model", "claude-test-1"),
                "content": [{"type": "text", "text": "Hello from the fake"}],
                "stop_reason": "end_turn",
                "stop_sequence": None,
                "usage": {"input_tokens": 5, "output_tokens": 4},
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("request-id", "req_test")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def fake_anthropic() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeAnthropic)
    server.requests = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def anthropic_env(server: ThreadingHTTPServer) -> dict[str, str]:
    return {
        "ANTHROPIC_API_KEY": "sk-ant-test",
        "ANTHROPIC_BASE_URL": f"http://127.0.0.1:{server.server_address[1]}",
        "ANTHROPIC_MODELS": "claude-test-1,claude-test-2",
    }


@pytest.mark.parametrize("provider", ["anthropic", "claude"])
def test_anthropic_alias_answers_as_claude(make_client, fake_anthropic, provider: str) -> None:
    client = make_client(**anthropic_env(fake_anthropic))
    resp = post(client, {"message": "hi", "provider": provider})
    assert resp.status_code == 200, resp.text
    assert resp.json()["provider"] == "claude"
    assert resp.json()["model"] == "claude-test-1"
    assert resp.json()["response"] == "Hello from the fake"
    assert [r["model"] for _, r in fake_anthropic.requests] == ["claude-test-1"]


def test_model_without_provider_picks_its_provider_over_the_default(make_client, fake_anthropic) -> None:
    client = make_client(**anthropic_env(fake_anthropic))  # default provider: claude
    resp = post(client, {"message": "hi", "model": "echo"})
    assert resp.status_code == 200, resp.text
    assert resp.json()["provider"] == "echo"
    resp = post(client, {"message": "hi", "model": "claude-test-2"})
    assert resp.status_code == 200, resp.text
    assert resp.json()["provider"] == "claude" and resp.json()["model"] == "claude-test-2"
    assert fake_anthropic.requests[-1][1]["model"] == "claude-test-2"  # the upstream was asked for it


# --------------------------------------------------------------------------------------------
# Routing, method, media type, body size
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "path"), [("GET", "/api/nope"), ("POST", "/api/nope"), ("GET", "/nope")])
def test_unknown_route_is_404(client, check_error, method: str, path: str) -> None:
    check_error(client.request(method, path), 404, "not_found")


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("GET", "/api/chat", "POST"),
        ("PUT", "/api/chat/stream", "POST"),
        ("DELETE", "/api/models", "GET"),
        ("POST", "/api/health", "GET"),
    ],
)
def test_wrong_method_is_405_with_allow(client, check_error, method: str, path: str, allowed: str) -> None:
    resp = client.request(method, path)
    check_error(resp, 405, "method_not_allowed")
    allow = {m.strip().upper() for m in resp.headers.get("allow", "").split(",")}
    assert allowed in allow and method not in allow, resp.headers


@pytest.mark.parametrize("path", ["/api/chat", "/api/chat/stream"])
def test_body_over_max_body_bytes_is_413_by_content_length(make_client, check_error, path: str) -> None:
    client = make_client(MAX_BODY_BYTES="200")
    body = json.dumps({"message": MARKER + "x" * 300}).encode()
    check_error(post(client, body, path=path), 413, "payload_too_large", absent=(MARKER,))


def test_body_of_exactly_max_body_bytes_is_accepted(make_client) -> None:
    client = make_client(MAX_BODY_BYTES="200")
    body = json.dumps({"message": "hi"}).encode()
    body = body + b" " * (200 - len(body))
    assert post(client, body).status_code == 200


def _chunks(data: bytes, size: int = 64) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def test_chunked_body_over_max_body_bytes_is_413(make_client, check_error) -> None:
    client = make_client(MAX_BODY_BYTES="200")
    data = json.dumps({"message": MARKER + "x" * 300}).encode()
    resp = client.post("/api/chat", content=_chunks(data), headers={"Content-Type": "application/json"})
    assert "content-length" not in resp.request.headers  # really sent without a length
    check_error(resp, 413, "payload_too_large", absent=(MARKER,))


def test_chunked_body_under_the_limit_is_accepted(make_client) -> None:
    client = make_client(MAX_BODY_BYTES="200")
    data = json.dumps({"message": "hi"}).encode()
    resp = client.post("/api/chat", content=_chunks(data, 5), headers={"Content-Type": "application/json"})
    assert resp.status_code == 200, resp.text
    assert resp.json()["response"] == "You said: hi"


@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/jsonx",
    ],
)
@pytest.mark.parametrize("path", ["/api/chat", "/api/chat/stream"])
def test_post_without_application_json_is_415(
    client, check_error, path: str, content_type: str | None
) -> None:
    headers = {} if content_type is None else {"Content-Type": content_type}
    resp = client.post(path, content=json.dumps({"message": MSG}).encode(), headers=headers)
    check_error(resp, 415, "unsupported_media_type", absent=(MARKER,))


def test_form_post_is_415(client, check_error) -> None:
    check_error(
        client.post("/api/chat", data={"message": MSG}), 415, "unsupported_media_type", absent=(MARKER,)
    )


@pytest.mark.parametrize(
    "content_type", ["application/json; charset=utf-8", "Application/JSON", "application/json"]
)
def test_json_content_type_variants_are_accepted(client, content_type: str) -> None:
    resp = client.post("/api/chat", content=b'{"message": "hi"}', headers={"Content-Type": content_type})
    assert resp.status_code == 200, resp.text


# --------------------------------------------------------------------------------------------
# Order of checks, and what a refusal costs
# --------------------------------------------------------------------------------------------


def test_wrong_media_type_wins_over_oversized_body(make_client, check_error) -> None:
    client = make_client(MAX_BODY_BYTES="100", API_TOKENS="alpha")
    resp = client.post("/api/chat", content=b"x" * 1000, headers={"Content-Type": "text/plain"})
    check_error(resp, 415, "unsupported_media_type")


def test_oversized_body_wins_over_missing_token(make_client, check_error) -> None:
    client = make_client(MAX_BODY_BYTES="100", API_TOKENS="alpha")
    check_error(post(client, b"{" + b" " * 1000), 413, "payload_too_large")


def test_missing_token_wins_over_invalid_json(make_client, check_error) -> None:
    client = make_client(API_TOKENS="alpha")
    check_error(post(client, b'{"message": '), 401, "unauthorized")
    check_error(post(client, {"message": 42}), 401, "unauthorized")


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b'{"message": ', "invalid_json"),
        (b'{"message": 42}', "invalid_request"),
        (b'{"message": "hi", "provider": "nope"}', "unknown_provider"),
        (b'{"message": "hi", "model": "nope"}', "unknown_model"),
    ],
)
def test_bad_request_wins_over_exhausted_rate_limit(make_client, check_error, body: bytes, code: str) -> None:
    client = make_client(RATELIMIT_PER_MINUTE="1")
    assert post(client, {"message": "hi"}).status_code == 200
    assert post(client, {"message": "hi"}).status_code == 429
    check_error(post(client, body), 400, code)


def test_requests_refused_before_the_rate_limit_consume_no_quota(make_client) -> None:
    client = make_client(RATELIMIT_PER_MINUTE="3", MAX_BODY_BYTES="200", API_TOKENS="alpha")
    auth = {"Authorization": "Bearer alpha"}
    refused = [
        post(client, {"message": "hi"}),  # 401
        post(client, {"message": "hi"}, headers={"Authorization": "Bearer wrong"}),  # 401
        client.post(
            "/api/chat", content=b'{"message": "hi"}', headers={"Content-Type": "text/plain", **auth}
        ),
        post(client, b"{" + b" " * 300, headers=auth),  # 413
        post(client, b'{"message": ', headers=auth),  # invalid_json
        post(client, {"message": ""}, headers=auth),  # invalid_request
        post(client, {"message": "hi", "provider": "nope"}, headers=auth),
        post(client, {"message": "hi", "model": "nope"}, headers=auth),
        post(client, {"message": "hi"}, headers=auth, path="/api/chat/nope"),  # 404
    ]
    for _ in range(3):  # more refusals than the quota holds
        refused.append(post(client, {"message": ""}, headers=auth, path="/api/chat/stream"))
    assert [r.status_code for r in refused] == [401, 401, 415, 413, 400, 400, 400, 400, 404, 400, 400, 400]
    quota = client.get("/api/rate-limit", headers=auth).json()
    assert quota["remaining"] == {"per_minute": 3, "per_hour": 100, "per_day": 500}
    ok = post(client, {"message": "hi"}, headers=auth)
    assert ok.status_code == 200
    assert ok.headers["x-ratelimit-remaining"] == "2"
