"""What each endpoint answers: health, models, chat, the stream, the rate limit, auth, the schema, logs."""

from __future__ import annotations

import json
import re
import time
from typing import Any

import pytest
from litestar import get

from pwachat import __version__

MARKER = "zebra-quartz-4711"  # chat text: never in an error body, never in a log line
POLICY = '"minute";q=3;w=60, "hour";q=100;w=3600, "day";q=500;w=86400, "tokens";q=200000;w=86400'
RATE_HEADERS = (
    "x-ratelimit-limit",
    "x-ratelimit-remaining",
    "x-ratelimit-reset",
    "ratelimit-policy",
    "ratelimit",
)
NO_PROVIDER_NETWORK = (
    "http://127.0.0.1:9"  # discard port: a provider client made in a test never leaves the host
)


def chat(client, message: str = "hi", path: str = "/api/chat", **fields: Any):
    headers = fields.pop("headers", {})
    return client.post(path, json={"message": message, **fields}, headers=headers)


# --------------------------------------------------------------------------------------------
# Health
# --------------------------------------------------------------------------------------------


def test_health_with_only_echo_is_degraded(client) -> None:
    resp = client.get("/api/health")
    assert resp.status_code == 200
    body = resp.json()
    runtime = body.pop("runtime")  # this worker's gauges, an extension of the contract's body
    assert runtime["pid"] > 0 and runtime["tasks"] >= 1 and runtime["open_streams"] == 0
    assert body == {
        "status": "degraded",
        "version": __version__,
        "environment": "development",
        "providers": {
            "openai": {"configured": False, "models": 0, "status": "disabled"},
            "claude": {"configured": False, "models": 0, "status": "disabled"},
            "echo": {"configured": True, "models": 1, "status": "ok"},
        },
        "rate_limit": {"backend": "memory", "redis": "disabled"},
    }


def test_health_with_a_real_provider_is_ok(make_client) -> None:
    client = make_client(
        ANTHROPIC_API_KEY="sk-ant-test", ANTHROPIC_BASE_URL=NO_PROVIDER_NETWORK, ANTHROPIC_MODELS="c-1,c-2"
    )
    body = client.get("/api/health").json()
    assert body["status"] == "ok"
    assert body["providers"]["claude"] == {"configured": True, "models": 2, "status": "ok"}
    assert body["providers"]["openai"] == {"configured": False, "models": 0, "status": "disabled"}


def test_health_in_production_without_providers(make_client) -> None:
    client = make_client(APP_ENV="production", SECRET_KEY="s")
    resp = client.get("/api/health")
    assert resp.status_code == 200  # always 200 while the process serves
    body = resp.json()
    assert body["status"] == "degraded" and body["environment"] == "production"
    assert body["providers"]["echo"] == {"configured": False, "models": 0, "status": "disabled"}


def test_live(client) -> None:
    resp = client.get("/api/health/live")
    assert resp.status_code == 200
    assert resp.json() == {"status": "ok"}
    assert resp.headers["cache-control"] == "no-store"


def test_ready_with_echo(client) -> None:
    resp = client.get("/api/health/ready")
    assert resp.status_code == 200
    assert resp.json() == {"status": "ok"}


def test_ready_without_any_provider_is_503(make_client, check_error) -> None:
    client = make_client(APP_ENV="production", SECRET_KEY="s")  # echo is off in production
    check_error(client.get("/api/health/ready"), 503, "provider_not_configured")
    client = make_client(ECHO_PROVIDER="off")
    check_error(client.get("/api/health/ready"), 503, "provider_not_configured")


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def test_models_with_only_echo(client) -> None:
    body = client.get("/api/models").json()
    assert body["default_provider"] == "echo"
    assert len(body["models"]) == 1
    echo = body["models"][0]
    assert {k: echo[k] for k in ("id", "provider", "default")} == {
        "id": "echo",
        "provider": "echo",
        "default": True,
    }
    assert isinstance(echo.get("label"), str) and echo["label"].strip()


def test_models_with_nothing_serving(make_client) -> None:
    client = make_client(ECHO_PROVIDER="off")
    assert client.get("/api/models").json() == {"default_provider": None, "models": []}


def test_models_list_each_serving_provider_with_one_default(make_client) -> None:
    client = make_client(
        ANTHROPIC_API_KEY="sk-ant-test",
        ANTHROPIC_BASE_URL=NO_PROVIDER_NETWORK,
        ANTHROPIC_MODELS="c-1, c-2,c-3",
    )
    body = client.get("/api/models").json()
    assert body["default_provider"] == "claude"
    pairs = [(m["provider"], m["id"], m["default"]) for m in body["models"]]
    assert pairs == [
        ("claude", "c-1", True),
        ("claude", "c-2", False),
        ("claude", "c-3", False),
        ("echo", "echo", True),
    ]
    assert "sk-ant-test" not in client.get("/api/models").text


# --------------------------------------------------------------------------------------------
# Chat
# --------------------------------------------------------------------------------------------


def test_chat_with_echo(client) -> None:
    resp = chat(client, "What is 2 + 2?")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert set(body) == {"id", "provider", "model", "response", "finish_reason", "usage"}
    assert re.fullmatch(r"chat_[A-Za-z0-9_-]+", body["id"])
    assert (body["provider"], body["model"]) == ("echo", "echo")
    assert body["response"] == "You said: What is 2 + 2?"
    assert body["finish_reason"] == "stop"
    usage = body["usage"]
    assert set(usage) == {"input_tokens", "output_tokens"}
    assert all(type(v) is int and v > 0 for v in usage.values()), usage
    assert chat(client, "What is 2 + 2?").json()["id"] != body["id"]


def test_chat_answers_the_sanitised_message(client) -> None:
    raw = "  Hi\r\nthere\rA\u202eB\u2066C\u2069 cafe\u0301\x00!\x07 a\tb \x85\n\t "
    resp = chat(client, raw)
    assert resp.status_code == 200, resp.text
    assert resp.json()["response"] == "You said: Hi\nthere\nABC caf\u00e9! a\tb"


def test_chat_with_history(client) -> None:
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    resp = chat(client, "And now?", history=history)
    assert resp.status_code == 200
    assert resp.json()["response"] == "You said: And now?"


def test_chat_max_tokens_cuts_the_answer_with_length(client) -> None:
    full = chat(client, "one two three four").json()
    cut = chat(client, "one two three four", max_tokens=2).json()
    assert cut["finish_reason"] == "length"
    assert full["response"].startswith(cut["response"]) and len(cut["response"]) < len(full["response"])
    assert cut["usage"]["output_tokens"] == 2


def test_unexpected_exception_is_500_without_details(make_client, check_error) -> None:
    @get("/api/boom", sync_to_thread=False)
    def boom() -> None:
        raise RuntimeError("secret-boom-detail at /srv/app/secret.py line 7")

    client = make_client(setup=lambda app: app.register(boom))
    resp = client.get("/api/boom")
    err = check_error(resp, 500, "internal_error", absent=("secret-boom-detail", "RuntimeError", "/srv/app"))
    assert err["message"]


# --------------------------------------------------------------------------------------------
# Stream
# --------------------------------------------------------------------------------------------


def stream(client, parse_sse, message: str = "hi", **fields: Any):
    resp = chat(client, message, path="/api/chat/stream", **fields)
    assert resp.status_code == 200, resp.text
    return resp, parse_sse(resp.content)


def test_stream_headers_and_event_sequence(client, parse_sse) -> None:
    resp, events = stream(client, parse_sse, "tell me a story please")
    assert resp.headers["content-type"].startswith("text/event-stream")
    assert resp.headers["cache-control"] == "no-cache"
    assert resp.headers["x-accel-buffering"] == "no"
    assert [e.id for e in events] == [str(i) for i in range(len(events))]
    kinds = [e.event for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done" and len(kinds) >= 3
    assert set(kinds[1:-1]) == {"delta"}
    start = json.loads(events[0].data)
    assert set(start) == {"id", "provider", "model"}
    assert start["id"].startswith("chat_") and (start["provider"], start["model"]) == ("echo", "echo")
    deltas = [json.loads(e.data)["content"] for e in events[1:-1]]
    assert all(isinstance(d, str) and d for d in deltas)
    assert "".join(deltas) == "You said: tell me a story please"
    done = json.loads(events[-1].data)
    assert done["finish_reason"] == "stop"
    assert set(done["usage"]) == {"input_tokens", "output_tokens"}
    assert all(type(v) is int and v >= 0 for v in done["usage"].values())


def test_stream_framing(client, parse_sse) -> None:
    resp, events = stream(client, parse_sse, 'line one\nline two\n\nthree \u00e9\U0001f600 "quoted"')
    raw = resp.content
    assert b"\r" not in raw
    assert raw.endswith(b"\n\n")
    assert all(e.data_lines == 1 for e in events)  # newlines in text are JSON-escaped, never raw
    text = "".join(json.loads(e.data)["content"] for e in events if e.event == "delta")
    assert text == 'You said: line one\nline two\n\nthree \u00e9\U0001f600 "quoted"'


@pytest.mark.parametrize(
    "message",
    ["hi", "  Hi\r\nthere\u202e  e\u0301 ", "a  b\t\tc", "one two three four five six seven eight nine ten"],
    ids=["short", "sanitised", "inner white space", "ten words"],
)
def test_stream_deltas_equal_the_chat_response(make_client, parse_sse, message: str) -> None:
    client = make_client(RATELIMIT_PER_MINUTE="100")
    answer = chat(client, message).json()["response"]
    _, events = stream(client, parse_sse, message)
    assert "".join(json.loads(e.data)["content"] for e in events if e.event == "delta") == answer


def test_stream_max_tokens_gives_length(client, parse_sse) -> None:
    _, events = stream(client, parse_sse, "one two three four five", max_tokens=2)
    assert [e.event for e in events] == ["start", "delta", "delta", "done"]
    assert json.loads(events[-1].data)["finish_reason"] == "length"
    text = "".join(json.loads(e.data)["content"] for e in events[1:-1])
    assert text == chat(client, "one two three four five", max_tokens=2).json()["response"]


def test_stream_refusals_are_json_not_a_stream(make_client, check_error) -> None:
    client = make_client(API_TOKENS="alpha")
    resp = chat(client, MARKER, path="/api/chat/stream")
    check_error(resp, 401, "unauthorized", absent=(MARKER,))
    auth = {"Authorization": "Bearer alpha"}
    resp = chat(client, "", path="/api/chat/stream", headers=auth)
    check_error(resp, 400, "invalid_request")
    resp = chat(client, MARKER, path="/api/chat/stream", headers=auth, provider="openai")
    check_error(resp, 503, "provider_not_configured", absent=(MARKER,))


# --------------------------------------------------------------------------------------------
# Rate limit
# --------------------------------------------------------------------------------------------


def assert_rate_headers(
    resp, limit: int, remaining: int, window: str = "minute", policy: str = POLICY
) -> int:
    h = resp.headers
    assert all(name in h for name in RATE_HEADERS), h
    assert h["x-ratelimit-limit"] == str(limit)
    assert h["x-ratelimit-remaining"] == str(remaining)
    reset = int(h["x-ratelimit-reset"])
    assert reset >= 0
    if remaining > 0:
        assert reset == 0  # "0 when it has room"
    assert h["ratelimit-policy"] == policy
    assert h["ratelimit"] == f'"{window}";r={remaining};t={reset}'
    return reset


def test_chat_and_stream_share_the_quota(make_client, check_error) -> None:
    client = make_client(RATELIMIT_PER_MINUTE="3")
    admitted = [
        chat(client),
        chat(client, path="/api/chat/stream"),
        chat(client),
    ]
    for i, resp in enumerate(admitted):
        assert resp.status_code == 200
        assert_rate_headers(resp, 3, 2 - i)
    assert admitted[1].headers["content-type"].startswith("text/event-stream")
    for path in ("/api/chat", "/api/chat/stream"):
        resp = chat(client, MARKER, path=path)
        err = check_error(resp, 429, "rate_limited", absent=(MARKER,))
        assert err["message"] == "Rate limit exceeded: 3 per 1 minute"
        reset = assert_rate_headers(resp, 3, 0)
        assert re.fullmatch(r"[1-9][0-9]*", resp.headers["retry-after"]), resp.headers
        # The limiter is a sliding-window counter (rust/src/limiter.rs): a slot may take up to two
        # window lengths to free, never less than one second.
        assert 1 <= int(resp.headers["retry-after"]) <= 120
        assert 1 <= reset <= 120
        assert resp.headers["cache-control"] == "no-store"


def test_admitted_responses_carry_no_retry_after(make_client) -> None:
    client = make_client(RATELIMIT_PER_MINUTE="3")
    assert "retry-after" not in chat(client).headers


def test_refused_request_consumes_nothing(make_client) -> None:
    client = make_client(RATELIMIT_PER_MINUTE="2")
    statuses = [chat(client).status_code for _ in range(6)]
    assert statuses == [200, 200, 429, 429, 429, 429]
    body = client.get("/api/rate-limit").json()
    assert body["remaining"] == {"per_minute": 0, "per_hour": 98, "per_day": 498}


def test_rate_limit_endpoint_reports_the_callers_state(make_client) -> None:
    client = make_client(RATELIMIT_PER_MINUTE="3")
    fresh = client.get("/api/rate-limit")
    assert fresh.status_code == 200
    assert fresh.json() == {
        "backend": "memory",
        "limits": {"per_minute": 3, "per_hour": 100, "per_day": 500},
        "remaining": {"per_minute": 3, "per_hour": 100, "per_day": 500},
        "reset_s": {"per_minute": 0, "per_hour": 0, "per_day": 0},
        "tokens": {"limit": 200000, "remaining": 200000, "reset_s": 0},
    }
    used = 0
    for _ in range(3):
        usage = chat(client).json()["usage"]
        used += usage["input_tokens"] + usage["output_tokens"]
    body = client.get("/api/rate-limit").json()
    assert body["remaining"] == {"per_minute": 0, "per_hour": 97, "per_day": 497}
    # The budget: each answer's reservation replaced by its usage.
    assert body["tokens"] == {"limit": 200000, "remaining": 200000 - used, "reset_s": 0}
    assert 1 <= body["reset_s"]["per_minute"] <= 120
    assert body["reset_s"]["per_hour"] == 0 and body["reset_s"]["per_day"] == 0
    # Not itself limited: asking often changes nothing.
    for _ in range(10):
        resp = client.get("/api/rate-limit")
        assert resp.status_code == 200
    assert resp.json()["remaining"]["per_hour"] == 97


def test_tightest_window_is_the_one_with_fewest_remaining(make_client, check_error) -> None:
    client = make_client(RATELIMIT_PER_MINUTE="3", RATELIMIT_PER_HOUR="2")
    policy = '"minute";q=3;w=60, "hour";q=2;w=3600, "day";q=500;w=86400, "tokens";q=200000;w=86400'
    assert_rate_headers(chat(client), 2, 1, "hour", policy)
    assert_rate_headers(chat(client), 2, 0, "hour", policy)
    resp = chat(client)
    err = check_error(resp, 429, "rate_limited")
    assert err["message"] == "Rate limit exceeded: 2 per 1 hour"
    assert_rate_headers(resp, 2, 0, "hour", policy)
    assert 120 < int(resp.headers["retry-after"]) <= 7200


def test_tie_between_windows_names_the_shortest(make_client) -> None:
    client = make_client(RATELIMIT_PER_MINUTE="5", RATELIMIT_PER_HOUR="5", RATELIMIT_PER_DAY="5")
    policy = '"minute";q=5;w=60, "hour";q=5;w=3600, "day";q=5;w=86400, "tokens";q=200000;w=86400'
    assert_rate_headers(chat(client), 5, 4, "minute", policy)


def test_each_token_has_its_own_quota(make_client) -> None:
    client = make_client(RATELIMIT_PER_MINUTE="2", API_TOKENS="alpha,beta")
    alpha, beta = {"Authorization": "Bearer alpha"}, {"Authorization": "Bearer beta"}
    assert [chat(client, headers=alpha).status_code for _ in range(3)] == [200, 200, 429]
    resp = chat(client, headers=beta)
    assert resp.status_code == 200
    assert resp.headers["x-ratelimit-remaining"] == "1"
    assert client.get("/api/rate-limit", headers=beta).json()["remaining"]["per_minute"] == 1
    assert client.get("/api/rate-limit", headers=alpha).json()["remaining"]["per_minute"] == 0


def test_spoofed_forwarded_for_from_untrusted_peer_changes_nothing(make_client) -> None:
    client = make_client(RATELIMIT_PER_MINUTE="1", peer="203.0.113.7")
    assert chat(client, headers={"X-Forwarded-For": "198.51.100.1"}).status_code == 200
    assert chat(client, headers={"X-Forwarded-For": "198.51.100.2"}).status_code == 429
    assert chat(client).status_code == 429


def test_forwarded_for_from_trusted_proxy_names_the_caller(make_client) -> None:
    client = make_client(RATELIMIT_PER_MINUTE="1", TRUSTED_PROXIES="10.0.0.0/8", peer="10.0.0.5")
    assert chat(client, headers={"X-Forwarded-For": "198.51.100.1"}).status_code == 200
    assert chat(client, headers={"X-Forwarded-For": "198.51.100.1"}).status_code == 429
    # The right-most address that is not itself a trusted proxy is the caller.
    assert chat(client, headers={"X-Forwarded-For": "198.51.100.1, 10.0.0.9"}).status_code == 429
    assert chat(client, headers={"X-Forwarded-For": "198.51.100.1, 198.51.100.2"}).status_code == 200
    # A client-made left part cannot pick someone else's quota.
    assert chat(client, headers={"X-Forwarded-For": "198.51.100.3, 198.51.100.1"}).status_code == 429


# --------------------------------------------------------------------------------------------
# Auth
# --------------------------------------------------------------------------------------------

TOKENS = {"API_TOKENS": "alpha,beta"}


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Bearer",
        "Bearer ",
        "Bearer gamma",
        "Bearer alph",
        "Bearer alpha2",
        "Basic alpha",
        "alpha",
        "Token alpha",
    ],
)
@pytest.mark.parametrize("path", ["/api/chat", "/api/chat/stream"])
def test_missing_or_wrong_token_is_401(
    make_client, check_error, path: str, authorization: str | None
) -> None:
    client = make_client(**TOKENS)
    headers = {} if authorization is None else {"Authorization": authorization}
    resp = chat(client, MARKER, path=path, headers=headers)
    check_error(resp, 401, "unauthorized", absent=(MARKER, "gamma", "alpha2"))
    assert resp.headers["www-authenticate"].split()[0] == "Bearer"


@pytest.mark.parametrize("authorization", ["Bearer alpha", "Bearer beta", "bearer alpha", "BEARER beta"])
def test_valid_token_any_scheme_case_is_accepted(make_client, authorization: str) -> None:
    client = make_client(**TOKENS)
    resp = chat(client, headers={"Authorization": authorization})
    assert resp.status_code == 200, resp.text


@pytest.mark.parametrize("path", ["/api/health", "/api/health/live", "/api/health/ready"])
def test_health_needs_no_token(make_client, path: str) -> None:
    client = make_client(**TOKENS)
    assert client.get(path).status_code == 200


@pytest.mark.parametrize("path", ["/api/models", "/api/rate-limit", "/api/schema/openapi.json"])
def test_other_routes_need_the_token(make_client, check_error, path: str) -> None:
    client = make_client(**TOKENS)
    resp = client.get(path)
    check_error(resp, 401, "unauthorized")
    assert resp.headers["www-authenticate"].split()[0] == "Bearer"
    assert client.get(path, headers={"Authorization": "Bearer beta"}).status_code == 200


# --------------------------------------------------------------------------------------------
# OpenAPI
# --------------------------------------------------------------------------------------------


def _resolve(doc: dict, schema: dict) -> dict:
    """Follow $ref and the `X | None` / oneOf wrappers down to an object schema."""
    while True:
        if "$ref" in schema:
            name = schema["$ref"].rsplit("/", 1)[-1]
            schema = doc["components"]["schemas"][name]
            continue
        for key in ("oneOf", "anyOf"):
            if key in schema:
                objects = [s for s in schema[key] if s.get("type") != "null"]
                if len(objects) == 1:
                    schema = objects[0]
                    break
        else:
            return schema


def test_openapi_describes_chat(client) -> None:
    resp = client.get("/api/schema/openapi.json")
    assert resp.status_code == 200
    doc = resp.json()
    for path in ("/api/chat", "/api/chat/stream"):
        op = doc["paths"][path]["post"]
        request = _resolve(doc, op["requestBody"]["content"]["application/json"]["schema"])
        fields = {"message", "provider", "model", "history", "temperature", "max_tokens"}
        assert set(request["properties"]) == fields, request
        assert request.get("required") == ["message"]
    op = doc["paths"]["/api/chat"]["post"]
    ok = _resolve(doc, op["responses"]["200"]["content"]["application/json"]["schema"])
    assert set(ok["properties"]) == {"id", "provider", "model", "response", "finish_reason", "usage"}
    assert {"/api/health", "/api/models", "/api/rate-limit"} <= set(doc["paths"])


# --------------------------------------------------------------------------------------------
# Logs
# --------------------------------------------------------------------------------------------


def test_log_lines_are_json_with_request_fields_and_no_chat_text(make_client, tmp_path) -> None:
    log_file = tmp_path / "logs" / "app.log"

    @get("/api/boom", sync_to_thread=False)
    def boom() -> None:
        raise RuntimeError("boom for the log")

    client = make_client(LOG_FILE=log_file, setup=lambda app: app.register(boom))
    history = [{"role": "user", "content": f"earlier {MARKER}"}]
    sent = {
        "log-chat-1": chat(client, f"now {MARKER}", history=history, headers={"X-Request-ID": "log-chat-1"}),
        "log-stream-1": chat(
            client, MARKER, path="/api/chat/stream", headers={"X-Request-ID": "log-stream-1"}
        ),
        "log-bad-1": chat(client, MARKER, max_tokens=0, headers={"X-Request-ID": "log-bad-1"}),
        "log-boom-1": client.get("/api/boom", headers={"X-Request-ID": "log-boom-1"}),
    }
    assert [r.status_code for r in sent.values()] == [200, 200, 400, 500]

    # The lines are written by the log's writer thread: wait for the last request's access line.
    deadline = time.monotonic() + 5
    while True:
        text = log_file.read_text(encoding="utf-8") if log_file.exists() else ""
        if ('"log-boom-1"' in text and text.count("pwachat.access") >= 4) or time.monotonic() > deadline:
            break
        time.sleep(0.01)  # polling with a deadline
    assert MARKER not in text
    lines = [json.loads(line) for line in text.splitlines()]
    assert all(isinstance(line, dict) for line in lines)
    expected = {
        "log-chat-1": ("POST", "/api/chat", 200),
        "log-stream-1": ("POST", "/api/chat/stream", 200),
        "log-bad-1": ("POST", "/api/chat", 400),
        "log-boom-1": ("GET", "/api/boom", 500),
    }
    for rid, (method, path, status) in expected.items():
        mine = [line for line in lines if line.get("request_id") == rid]
        access = [line for line in mine if "status" in line and "duration_ms" in line]
        assert len(access) == 1, mine
        line = access[0]
        assert (line["method"], line["path"], line["status"]) == (method, path, status)
        assert isinstance(line["duration_ms"], int | float) and line["duration_ms"] >= 0
    # The 500's trace is logged, under the same request id.
    boom_lines = [line for line in lines if line.get("request_id") == "log-boom-1"]
    assert any("RuntimeError" in json.dumps(line) for line in boom_lines), boom_lines


# --------------------------------------------------------------------------------------------
# The chat routes served by the edge middleware and by Litestar's router answer alike
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/api/chat", "/api/chat/stream"])
def test_router_path_answers_like_the_direct_path(make_client, path: str) -> None:
    # `/api/chat` itself is served without the router (app.py: ChatFastPath); a trailing
    # slash goes through Litestar to the same functions. Success, each error kind, and a refusal
    # must look the same both ways (save the request id).
    client = make_client(RATELIMIT_PER_MINUTE="2")

    def shape(resp) -> tuple[int, str, dict[str, str], Any]:
        headers = {k: v for k, v in resp.headers.items() if k not in ("x-request-id", "date")}
        if resp.headers["content-type"].startswith("application/json"):
            body = resp.json()
            body.get("error", {}).pop("request_id", None)
            body.pop("id", None)
        else:
            body = re.sub(r'"id":\s*"chat_[0-9a-f]+"', "", resp.text)
        return resp.status_code, resp.headers["content-type"], headers, body

    def both(**kwargs: Any) -> list[tuple[int, str, dict[str, str], Any]]:
        return [shape(client.post(p, **kwargs)) for p in (path, path + "/")]

    cases = [
        {"json": {"message": "hi"}},  # 200 (the answer; rate-limit headers count down in step)
        {"content": b"{nope", "headers": {"Content-Type": "application/json"}},  # invalid_json
        {"json": {"message": ""}},  # invalid_request
        {"content": b"{}", "headers": {"Content-Type": "text/plain"}},  # unsupported_media_type
        {"json": {"message": "hi", "provider": "nope"}},  # unknown_provider
    ]
    for kwargs in cases:
        direct, routed = both(**kwargs)
        if direct[0] == 200:
            # One quota (and one token reservation) used by each: the remaining counts (and so the reset)
            # differ, nothing else.
            for h in ("x-ratelimit-remaining", "x-ratelimit-reset", "ratelimit", "x-tokenbudget-remaining"):
                direct[2].pop(h), routed[2].pop(h)
        assert direct == routed, kwargs
    # Quota now spent (two admitted): both refuse with the same 429.
    direct, routed = both(json={"message": "hi"})
    assert direct[0] == routed[0] == 429
    assert direct[1:] == routed[1:]
