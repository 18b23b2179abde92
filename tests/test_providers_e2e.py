"""End to end through the real providers' code paths: `pwachat serve` talking to the fake upstream.

The OpenAI and Anthropic modules, the pooled HTTP path with its retries, the stream commit rule (JSON error
before commit, `error` event after), heartbeats, the gap timeout and client disconnects, all seen from a
socket client on one side and the fake upstream's records on the other. Times from the fake's records are
`time.monotonic()` values, which on Linux share one clock with this process.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from conftest import LEAKS
from fake_upstream import FakeUpstream
from pwachat.providers import http_provider
from server import Server, access_line, free_port, poll, start_server, stop_server
from sse_client import Item, events, open_stream, stream

pytestmark = pytest.mark.e2e

OPENAI_KEY = "sk-test-openai"
ANTHROPIC_KEY = "sk-ant-test"
SYSTEM_PROMPT = "You are the provider test oracle."
OPENAI_MODELS = ("gpt-4o-mini", "gpt-4o")
ANTHROPIC_MODELS = ("claude-haiku-4-5", "claude-sonnet-4-5")
UPSTREAM_SECRET = "upstream-detail-f00b4r"  # the provider's own error text: never in our answers
NEVER_SHOWN = (*LEAKS, OPENAI_KEY, ANTHROPIC_KEY, UPSTREAM_SECRET)
RATE_HEADERS = ("x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset", "ratelimit-policy")
UNLIMITED = {"RATELIMIT_PER_MINUTE": "100000", "RATELIMIT_PER_HOUR": "100000", "RATELIMIT_PER_DAY": "100000"}

DEFAULT_MODEL = {"openai": OPENAI_MODELS[0], "claude": ANTHROPIC_MODELS[0]}
# request `provider` -> (the fake's provider name, the provider our answers name)
PROVIDERS = {
    "openai": ("openai", "openai"),
    "claude": ("anthropic", "claude"),
    "anthropic": ("anthropic", "claude"),
}


# --------------------------------------------------------------------------------------------
# Fixtures: one fake upstream, a few servers (one per timing configuration)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeUpstream]:
    with FakeUpstream(OPENAI_KEY, ANTHROPIC_KEY) as upstream:
        yield upstream


@pytest.fixture(autouse=True)
def _fresh_fake(fake: FakeUpstream) -> Iterator[None]:
    fake.reset()
    yield
    fake.reset()


def provider_env(fake: FakeUpstream, **env: str) -> dict[str, str]:
    return {
        "OPENAI_API_KEY": OPENAI_KEY,
        "OPENAI_BASE_URL": fake.openai_base_url,
        "ANTHROPIC_API_KEY": ANTHROPIC_KEY,
        "ANTHROPIC_BASE_URL": fake.anthropic_base_url,
        "OPENAI_MODELS": ",".join(OPENAI_MODELS),
        "ANTHROPIC_MODELS": ",".join(ANTHROPIC_MODELS),
        "SYSTEM_PROMPT": SYSTEM_PROMPT,
        "TEMPERATURE": "0.3",
        "MAX_TOKENS": "800",
        "UPSTREAM_MAX_RETRIES": "0",
        # A reader leaving cancels the provider request at once, as these tests of the relay expect;
        # the grace period for resumes is tests/test_e2e_resume.py's.
        "STREAM_GRACE_S": "0",
        "WORKERS": "1",
        **UNLIMITED,
        **env,
    }


def _serve(tmp: pytest.TempPathFactory, name: str, env: dict[str, str]) -> Iterator[Server]:
    srv = start_server(tmp.mktemp(name), **env)
    yield srv
    stop_server(srv)


@pytest.fixture(scope="module")
def main(tmp_path_factory: pytest.TempPathFactory, fake: FakeUpstream) -> Iterator[Server]:
    """Both providers, no retries, the default (long) heartbeat and timeout."""
    yield from _serve(tmp_path_factory, "main", provider_env(fake))


@pytest.fixture(scope="module")
def beating(tmp_path_factory: pytest.TempPathFactory, fake: FakeUpstream) -> Iterator[Server]:
    """A short heartbeat (0.3 s), a long upstream timeout."""
    env = provider_env(fake, SSE_HEARTBEAT_S="0.3", UPSTREAM_TIMEOUT_S="20")
    yield from _serve(tmp_path_factory, "beating", env)


@pytest.fixture(scope="module")
def impatient(tmp_path_factory: pytest.TempPathFactory, fake: FakeUpstream) -> Iterator[Server]:
    """An upstream timeout (1 s) shorter than the heartbeat (5 s)."""
    env = provider_env(fake, SSE_HEARTBEAT_S="5", UPSTREAM_TIMEOUT_S="1")
    yield from _serve(tmp_path_factory, "impatient", env)


@pytest.fixture(scope="module")
def retrying(tmp_path_factory: pytest.TempPathFactory, fake: FakeUpstream) -> Iterator[Server]:
    """The SDKs' default retry count (2)."""
    yield from _serve(tmp_path_factory, "retrying", provider_env(fake, UPSTREAM_MAX_RETRIES="2"))


@pytest.fixture(scope="module")
def partial(tmp_path_factory: pytest.TempPathFactory, fake: FakeUpstream) -> Iterator[Server]:
    """No OpenAI key; Anthropic pointed at a port where nothing listens (connection refused)."""
    env = provider_env(fake, ANTHROPIC_BASE_URL=f"http://127.0.0.1:{free_port()}")
    del env["OPENAI_API_KEY"], env["OPENAI_BASE_URL"]
    yield from _serve(tmp_path_factory, "partial", env)


# --------------------------------------------------------------------------------------------
# A socket client that sees each SSE event (and comment) when it arrives
# --------------------------------------------------------------------------------------------


def check_stream(items: list[Item], body: bytes) -> tuple[dict[str, Any], list[str], Item]:
    """The contract's sequence: one start, non-empty deltas, one terminal event last (nothing after it).

    Returns the start payload, the delta contents and the terminal event."""
    assert b"\r" not in body and body.endswith(b"\n\n"), body[-200:]
    evs = events(items)
    assert [int(e.id) for e in evs] == list(range(len(evs))), evs
    assert evs[0].name == "start", evs
    assert evs[-1].name in ("done", "error"), evs
    assert items[-1] == evs[-1], f"something came after the terminal event: {items}"
    middle = evs[1:-1]
    assert all(e.name == "delta" for e in middle), evs
    contents = [json.loads(e.data)["content"] for e in middle]
    assert all(isinstance(c, str) and c for c in contents), contents
    return json.loads(evs[0].data), contents, evs[-1]


def check_json_error(
    status: int,
    headers: dict[str, str],
    body: bytes,
    want: int,
    code: str,
    *,
    absent: tuple[str, ...] = (),
    rate_headers: bool = True,
) -> dict[str, Any]:
    """The contract's error envelope as plain JSON (not a stream), with the rate-limit headers."""
    assert status == want, (status, body)
    assert headers["content-type"].startswith("application/json"), headers
    doc = json.loads(body)
    assert set(doc) == {"error"}, doc
    err = doc["error"]
    assert err["code"] == code, err
    assert isinstance(err["message"], str) and err["message"].strip(), err
    assert err["request_id"] == headers["x-request-id"], (err, headers)
    for name in RATE_HEADERS if rate_headers else ():
        assert name in headers, (name, headers)
    text = body.decode()
    for needle in (*NEVER_SHOWN, *absent):
        assert needle not in text, f"{needle!r} leaked into {text}"
    return err


def both_endpoints(srv: Server, payload: dict[str, Any]) -> Iterator[tuple[str, int, dict[str, str], bytes]]:
    """The same request to /api/chat and to /api/chat/stream (read whole): (path, status, headers, body)."""
    yield ("/api/chat", *srv.post_json("/api/chat", payload))
    status, headers, _, body = stream(srv, payload)
    yield ("/api/chat/stream", status, headers, body)


def health_runtime(srv: Server) -> dict[str, int]:
    status, _, raw = srv.request("GET", "/api/health")
    assert status == 200
    return json.loads(raw)["runtime"]


def one_record(fake: FakeUpstream, provider: str) -> dict[str, Any]:
    records = fake.requests(provider)
    assert len(records) == 1, records
    return records[0]


# --------------------------------------------------------------------------------------------
# 1. Both providers end to end
# --------------------------------------------------------------------------------------------

HISTORY = [
    {"role": "user", "content": "First question"},
    {"role": "assistant", "content": "First answer"},
    {"role": "user", "content": "Second question"},
    {"role": "assistant", "content": "Second answer"},
]
ANSWER = ("Two ", "plus ", "two ", "is ", "four.")


def chat_payload(provider: str, **extra: Any) -> dict[str, Any]:
    # The message is sanitised (CRLF, outer white space) before it reaches the provider.
    return {
        "message": "  What is 2 + 2?\r\nExactly.  ",
        "provider": provider,
        "history": HISTORY,
        "temperature": 0.25,
        "max_tokens": 321,
        **extra,
    }


def check_upstream_request(rec: dict[str, Any], upstream: str, *, stream: bool) -> None:
    """What the provider received: auth + SDK identification headers, the server's system prompt, the
    history in order, the sanitised message, temperature, max_tokens and the stream flags."""
    headers, body = rec["headers"], rec["body"]
    turns = [*HISTORY, {"role": "user", "content": "What is 2 + 2?\nExactly."}]
    assert body["temperature"] == 0.25 and body["max_tokens"] == 321
    assert headers.get("x-stainless-lang") == "python", headers
    if upstream == "openai":
        assert rec["path"] == "/v1/chat/completions"
        assert headers["authorization"] == f"Bearer {OPENAI_KEY}"
        assert "openai" in headers["user-agent"].lower(), headers
        assert body["messages"] == [{"role": "system", "content": SYSTEM_PROMPT}, *turns]
        if stream:
            assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
        else:
            assert not body.get("stream") and "stream_options" not in body
    else:
        assert rec["path"] == "/v1/messages"
        # The real API takes `x-api-key`; anthropic>=2 sends the key as a bearer token instead.
        auth = headers.get("authorization", "")
        assert headers.get("x-api-key") == ANTHROPIC_KEY or auth == f"Bearer {ANTHROPIC_KEY}", headers
        assert headers["anthropic-version"], headers
        assert "anthropic" in headers["user-agent"].lower(), headers
        assert body["system"] == SYSTEM_PROMPT
        assert body["messages"] == turns
        assert body.get("stream", False) is stream


@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_chat_answers_through_the_provider(main: Server, fake: FakeUpstream, provider: str) -> None:
    upstream, name = PROVIDERS[provider]
    fake.behave(upstream, deltas=list(ANSWER), input_tokens=17, output_tokens=5)
    status, _, raw = main.post_json("/api/chat", chat_payload(provider))
    assert status == 200, raw
    answer = json.loads(raw)
    assert answer["id"].startswith("chat_")
    assert answer["provider"] == name and answer["model"] == DEFAULT_MODEL[name]
    assert answer["response"] == "".join(ANSWER)
    assert answer["finish_reason"] == "stop"
    assert answer["usage"] == {"input_tokens": 17, "output_tokens": 5}
    check_upstream_request(one_record(fake, upstream), upstream, stream=False)


@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_stream_answers_through_the_provider(main: Server, fake: FakeUpstream, provider: str) -> None:
    upstream, name = PROVIDERS[provider]
    fake.behave(upstream, deltas=list(ANSWER), input_tokens=17, output_tokens=5)
    status, headers, items, body = stream(main, chat_payload(provider))
    assert status == 200
    assert headers["content-type"].startswith("text/event-stream")
    assert headers["cache-control"] == "no-cache" and headers["x-accel-buffering"] == "no"
    start, contents, end = check_stream(items, body)
    assert start["provider"] == name and start["id"].startswith("chat_")
    assert start["model"] == DEFAULT_MODEL[name]
    assert contents == list(ANSWER)  # one delta event per upstream delta, even when they come in one read
    assert end.name == "done"
    # Usage arrives in `done`.
    assert json.loads(end.data) == {
        "finish_reason": "stop",
        "usage": {"input_tokens": 17, "output_tokens": 5},
    }
    check_upstream_request(one_record(fake, upstream), upstream, stream=True)


def test_models_lists_both_providers_with_the_first_configured_model_as_default(main: Server) -> None:
    status, _, raw = main.request("GET", "/api/models")
    assert status == 200
    models = json.loads(raw)["models"]
    for name, configured in (("openai", OPENAI_MODELS), ("claude", ANTHROPIC_MODELS)):
        mine = [m for m in models if m["provider"] == name]
        assert [m["id"] for m in mine] == list(configured)
        assert [m["id"] for m in mine if m["default"]] == [configured[0]]


@pytest.mark.parametrize(
    ("fields", "upstream", "name", "model"),
    [
        ({"provider": "openai"}, "openai", "openai", OPENAI_MODELS[0]),
        ({"provider": "openai", "model": "gpt-4o"}, "openai", "openai", "gpt-4o"),
        ({"provider": "claude"}, "anthropic", "claude", ANTHROPIC_MODELS[0]),
        ({"provider": "anthropic", "model": "claude-sonnet-4-5"}, "anthropic", "claude", "claude-sonnet-4-5"),
        ({"model": "claude-sonnet-4-5"}, "anthropic", "claude", "claude-sonnet-4-5"),
    ],
)
def test_model_defaults_and_choices_reach_the_provider(
    main: Server, fake: FakeUpstream, fields: dict[str, str], upstream: str, name: str, model: str
) -> None:
    """Default model = the first configured; a chosen one is passed through; temperature and max_tokens
    default to the server's TEMPERATURE and MAX_TOKENS."""
    status, _, raw = main.post_json("/api/chat", {"message": "hi", **fields})
    assert status == 200, raw
    answer = json.loads(raw)
    assert (answer["provider"], answer["model"]) == (name, model)
    _, _, items, body = stream(main, {"message": "hi", **fields})
    start, _, end = check_stream(items, body)
    assert (start["provider"], start["model"], end.name) == (name, model, "done")
    records = fake.requests(upstream)
    assert len(records) == 2
    for rec in records:
        assert rec["body"]["model"] == model
        assert rec["body"]["temperature"] == 0.3 and rec["body"]["max_tokens"] == 800


@pytest.mark.parametrize(
    ("provider", "upstream_reason", "expected"),
    [
        ("openai", None, "stop"),
        ("openai", "length", "length"),
        ("openai", "content_filter", "content_filter"),
        ("claude", None, "stop"),  # the fake's default: end_turn
        ("claude", "end_turn", "stop"),
        ("claude", "max_tokens", "length"),
        ("claude", "stop_sequence", "stop"),
    ],
)
def test_finish_reason_is_normalised_in_the_answer_and_in_done(
    main: Server, fake: FakeUpstream, provider: str, upstream_reason: str | None, expected: str
) -> None:
    upstream, _ = PROVIDERS[provider]
    fake.behave(upstream, deltas=["a", "b"], finish_reason=upstream_reason, input_tokens=3, output_tokens=2)
    status, _, raw = main.post_json("/api/chat", {"message": "hi", "provider": provider})
    assert status == 200
    answer = json.loads(raw)
    assert answer["finish_reason"] == expected and answer["usage"] == {"input_tokens": 3, "output_tokens": 2}
    _, _, items, body = stream(main, {"message": "hi", "provider": provider})
    _, _, end = check_stream(items, body)
    assert json.loads(end.data) == {
        "finish_reason": expected,
        "usage": {"input_tokens": 3, "output_tokens": 2},
    }


@pytest.mark.parametrize("provider", ["openai", "claude"])
def test_max_tokens_cut_is_length(main: Server, fake: FakeUpstream, provider: str) -> None:
    """The provider stops at the client's max_tokens with its own spelling (length / max_tokens)."""
    upstream, _ = PROVIDERS[provider]
    fake.behave(upstream, deltas=["one ", "two ", "three ", "four"])
    payload = {"message": "count", "provider": provider, "max_tokens": 2}
    status, _, raw = main.post_json("/api/chat", payload)
    assert status == 200
    answer = json.loads(raw)
    assert (answer["response"], answer["finish_reason"]) == ("one two ", "length")
    assert answer["usage"]["output_tokens"] == 2
    _, _, items, body = stream(main, payload)
    _, contents, end = check_stream(items, body)
    assert contents == ["one ", "two "]
    assert json.loads(end.data)["finish_reason"] == "length"


TRICKY = ["Line one\n", '  "quoted" \\ back', "ünïcødé 🎉 ", "\ttab\r\nCRLF", '{"json": [1]}', " </script>"]


@pytest.mark.parametrize("provider", ["openai", "claude"])
def test_stream_deltas_concatenate_to_the_chat_response(
    main: Server, fake: FakeUpstream, provider: str
) -> None:
    upstream, _ = PROVIDERS[provider]
    fake.behave(upstream, deltas=TRICKY)
    status, _, raw = main.post_json("/api/chat", {"message": "hi", "provider": provider})
    assert status == 200
    response = json.loads(raw)["response"]
    assert response == "".join(TRICKY)
    _, _, items, body = stream(main, {"message": "hi", "provider": provider})
    _, contents, end = check_stream(items, body)
    assert end.name == "done"
    assert contents == TRICKY  # one event per upstream delta, newlines inside data JSON-escaped
    assert "".join(contents) == response


def test_a_provider_without_a_key_is_not_offered_and_answers_503(partial: Server) -> None:
    status, _, raw = partial.request("GET", "/api/models")
    assert status == 200
    assert {m["provider"] for m in json.loads(raw)["models"]} == {"claude", "echo"}
    for path, status, headers, body in both_endpoints(partial, {"message": "hi", "provider": "openai"}):
        err = check_json_error(status, headers, body, 503, "provider_not_configured", rate_headers=False)
        assert err["message"] == "OpenAI API key not configured", path


def test_provider_not_configured_comes_after_the_rate_limit(partial: Server) -> None:
    """The contract's order: validation, then the rate limit, then the provider; only 400/401/413/415 are
    refused before the limit. So the 503 carries the rate-limit headers and uses up one request."""
    remaining = []
    for _ in range(2):
        status, headers, body = partial.post_json("/api/chat", {"message": "hi", "provider": "openai"})
        check_json_error(status, headers, body, 503, "provider_not_configured", rate_headers=False)
        assert "x-ratelimit-remaining" in headers, headers
        remaining.append(int(headers["x-ratelimit-remaining"]))
    assert remaining[1] == remaining[0] - 1


# --------------------------------------------------------------------------------------------
# 2. Each upstream delta is relayed as soon as it arrives
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("provider", ["openai", "claude"])
def test_each_delta_is_relayed_before_the_provider_sends_the_next(
    main: Server, fake: FakeUpstream, provider: str
) -> None:
    upstream, _ = PROVIDERS[provider]
    interval = 0.5
    deltas = ["Once", " upon", " a time"]
    fake.behave(upstream, deltas=deltas, chunk_interval_s=interval)
    reader = open_stream(main, {"message": "story", "provider": provider})
    with reader.sock:
        assert reader.read_head()[0] == 200
        first = reader.read_events(2)
        rec = one_record(fake, upstream)
        assert not rec["completed"] and rec["deltas_sent"] < len(deltas), rec  # the first came on its own
        items = first + reader.read_rest()
    _, contents, end = check_stream(items, reader.body)
    assert contents == deltas and end.name == "done"
    # The fake sends delta i (1-based) no earlier than head + i * interval: delta i must be here before
    # delta i + 1 has even left the fake.
    head_sent = fake.requests(upstream)[0]["head_sent_at"]
    arrived = [e.at for e in events(items) if e.name == "delta"]
    for i, at in enumerate(arrived[:-1], start=1):
        assert at < head_sent + (i + 1) * interval, (i, at - head_sent)


# --------------------------------------------------------------------------------------------
# 3. The commit rule: quick failures are JSON with their real status; later ones are one `error` event
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("provider", "behaviour", "want", "code", "retry_after"),
    [
        ("openai", {"status": 401}, 502, "upstream_error", None),
        ("claude", {"status": 401}, 502, "upstream_error", None),
        ("openai", {"status": 403}, 502, "upstream_error", None),
        ("openai", {"status": 400}, 502, "upstream_error", None),  # the provider's own 400
        ("claude", {"status": 400}, 502, "upstream_error", None),
        ("openai", {"status": 429, "retry_after": 7}, 503, "upstream_rate_limited", "7"),
        ("claude", {"status": 429, "retry_after": 7}, 503, "upstream_rate_limited", "7"),
        ("openai", {"status": 429, "retry_after_ms": 2500}, 503, "upstream_rate_limited", "3"),
        ("claude", {"status": 429, "retry_after_ms": 2500}, 503, "upstream_rate_limited", "3"),
        ("openai", {"status": 500}, 502, "upstream_error", None),
        ("openai", {"status": 503}, 502, "upstream_error", None),
        ("claude", {"status": 500}, 502, "upstream_error", None),
        ("claude", {"status": 529}, 502, "upstream_error", None),
    ],
)
def test_quick_upstream_failure_is_json_with_its_real_status(
    main: Server,
    fake: FakeUpstream,
    provider: str,
    behaviour: dict[str, Any],
    want: int,
    code: str,
    retry_after: str | None,
) -> None:
    upstream, _ = PROVIDERS[provider]
    fake.behave(upstream, error_message=UPSTREAM_SECRET, **behaviour)
    for path, status, headers, body in both_endpoints(main, {"message": "hi", "provider": provider}):
        check_json_error(status, headers, body, want, code)
        if retry_after is not None:
            assert headers.get("retry-after") == retry_after, (path, headers)
    assert len(fake.requests(upstream)) == 2  # no retries here (UPSTREAM_MAX_RETRIES=0)


UNUSABLE_RETRY_AFTER = ["inf", "nan", "1e999", "-5", "99999999999", "soon", "Fri, 31 Dec 9999 23:59:59 GMT"]


@pytest.mark.parametrize("value", UNUSABLE_RETRY_AFTER)
@pytest.mark.parametrize("provider", ["openai", "claude"])
def test_an_unusable_provider_retry_after_is_replaced_by_a_default(
    main: Server, fake: FakeUpstream, provider: str, value: str
) -> None:
    """Edge rules: a provider's Retry-After is passed on only when it is a finite number of seconds
    (or an HTTP date) within 0..3600; anything else is replaced by a default (never a 500)."""
    upstream, _ = PROVIDERS[provider]
    fake.behave(upstream, status=429, retry_after=value)
    for path, status, headers, body in both_endpoints(main, {"message": "hi", "provider": provider}):
        check_json_error(status, headers, body, 503, "upstream_rate_limited")
        assert headers.get("retry-after") == str(http_provider.DEFAULT_RETRY_AFTER_S), (path, headers)


@pytest.mark.parametrize("path", ["/api/chat", "/api/chat/stream"])
def test_retries_after_an_unusable_retry_after_end_in_a_503_with_the_default(
    retrying: Server, fake: FakeUpstream, path: str
) -> None:
    fake.behave("openai", status=429, retry_after="inf", retry_after_ms="nan")
    status, headers, body = _any_endpoint(retrying, path, {"message": "hi", "provider": "openai"})
    check_json_error(status, headers, body, 503, "upstream_rate_limited")
    assert headers.get("retry-after") == str(http_provider.DEFAULT_RETRY_AFTER_S), headers
    assert len(fake.requests("openai")) == 3  # backed off on its own and retried


def test_connection_refused_is_a_json_502(partial: Server) -> None:
    for _, status, headers, body in both_endpoints(partial, {"message": "hi", "provider": "claude"}):
        check_json_error(status, headers, body, 502, "upstream_error")


@pytest.mark.parametrize("provider", ["openai", "claude"])
def test_malformed_answer_is_502(main: Server, fake: FakeUpstream, provider: str) -> None:
    """A 200 whose body is not the provider's JSON, and a connection cut before any answer."""
    upstream, _ = PROVIDERS[provider]
    fake.behave(upstream, malformed=True)
    check_json_error(
        *main.post_json("/api/chat", {"message": "hi", "provider": provider}), 502, "upstream_error"
    )
    fake.reset()
    fake.behave(upstream, drop_after=0)
    check_json_error(
        *main.post_json("/api/chat", {"message": "hi", "provider": provider}), 502, "upstream_error"
    )


@pytest.mark.parametrize("provider", ["openai", "claude"])
def test_timeout_shorter_than_the_heartbeat_is_a_json_504(
    impatient: Server, fake: FakeUpstream, provider: str
) -> None:
    upstream, _ = PROVIDERS[provider]
    fake.behave(upstream, head_delay_s=4)
    for _, status, headers, body in both_endpoints(impatient, {"message": "hi", "provider": provider}):
        check_json_error(status, headers, body, 504, "upstream_timeout")
    # Giving up also hangs up on the provider.
    fake.wait_for(lambda rs: len(rs) == 2 and all(r["client_gone"] for r in rs), timeout=5)


@pytest.mark.parametrize("provider", ["openai", "claude"])
def test_chat_whose_body_is_too_slow_is_504(impatient: Server, fake: FakeUpstream, provider: str) -> None:
    upstream, _ = PROVIDERS[provider]
    fake.behave(upstream, deltas=["a", "b"], chunk_interval_s=2)  # non-streamed: the whole body after 4 s
    status, headers, body = impatient.post_json("/api/chat", {"message": "hi", "provider": provider})
    check_json_error(status, headers, body, 504, "upstream_timeout")


@pytest.mark.parametrize("provider", ["openai", "claude"])
def test_chat_that_times_out_mid_body_hangs_up_on_the_provider(
    impatient: Server, fake: FakeUpstream, provider: str
) -> None:
    """The head and half the body at once, the rest never in time: after the 504 the provider sees
    the request go (it would otherwise be read to its end, and billed, for nobody)."""
    upstream, _ = PROVIDERS[provider]
    fake.behave(upstream, body_pause_s=6)
    status, headers, body = impatient.post_json("/api/chat", {"message": "hi", "provider": provider})
    answered = time.monotonic()
    check_json_error(status, headers, body, 504, "upstream_timeout")
    rec = fake.wait_for(lambda rs: rs and rs[0]["finished_at"] is not None and rs[0], timeout=5)
    assert rec["head_sent_at"] is not None  # the head had come: the body read was cut short
    assert rec["client_gone"] and not rec["completed"], rec
    assert rec["gone_at"] - answered < 1.0, rec["gone_at"] - answered


@pytest.mark.parametrize("provider", ["openai", "claude"])
def test_a_reader_leaving_before_the_head_hangs_up_on_the_provider_within_one_second(
    beating: Server, fake: FakeUpstream, provider: str
) -> None:
    upstream, _ = PROVIDERS[provider]
    fake.behave(upstream, head_delay_s=10)
    reader = open_stream(beating, {"message": "hi", "provider": provider})
    with reader.sock:
        assert reader.read_head()[0] == 200  # committed on the heartbeat, the provider still silent
        assert [i.name for i in events(reader.read_events(1))] == ["start"]
        closed_at = time.monotonic()
    rec = fake.wait_for(lambda rs: rs and rs[0]["finished_at"] is not None and rs[0], timeout=5)
    assert rec["client_gone"] and rec["head_sent_at"] is None, rec
    assert rec["gone_at"] - closed_at <= 1.0, rec["gone_at"] - closed_at


@pytest.mark.parametrize("provider", ["openai", "claude"])
def test_a_slow_provider_gets_heartbeats_before_its_answer(
    beating: Server, fake: FakeUpstream, provider: str
) -> None:
    upstream, _ = PROVIDERS[provider]
    fake.behave(upstream, deltas=["slow ", "answer"], head_delay_s=1.2)
    status, headers, items, body = stream(beating, {"message": "hi", "provider": provider})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    _, contents, end = check_stream(items, body)
    assert contents == ["slow ", "answer"] and end.name == "done"
    kinds = [(i.kind, i.name) for i in items]
    assert kinds[0] == ("event", "start")
    first_delta = kinds.index(("event", "delta"))
    assert ("comment", "ping") in kinds[1:first_delta], kinds
    # Committed on the heartbeat, before the provider had answered its head.
    head_sent = one_record(fake, upstream)["head_sent_at"]
    assert items[0].at < head_sent, (items[0].at, head_sent)


@pytest.mark.parametrize("provider", ["openai", "claude"])
def test_pings_while_the_provider_is_silent_mid_stream(
    beating: Server, fake: FakeUpstream, provider: str
) -> None:
    upstream, _ = PROVIDERS[provider]
    fake.behave(upstream, deltas=["tick ", "tock"], chunk_interval_s=0.8)
    status, _, items, body = stream(beating, {"message": "hi", "provider": provider})
    assert status == 200
    _, contents, end = check_stream(items, body)
    assert contents == ["tick ", "tock"] and end.name == "done"
    kinds = [(i.kind, i.name) for i in items]
    first, second = (n for n, k in enumerate(kinds) if k == ("event", "delta"))
    assert ("comment", "ping") in kinds[first + 1 : second], kinds
    assert all(i.name == "ping" for i in items if i.kind == "comment")


PACED = {"chunk_interval_s": 0.05}  # each upstream event in a network read of its own


@pytest.mark.parametrize(
    ("provider", "behaviour", "sent", "code"),
    [
        pytest.param("openai", {"drop_after": 2}, 2, "upstream_error", id="openai-drop"),
        pytest.param("claude", {"drop_after": 2}, 2, "upstream_error", id="claude-drop"),
        pytest.param("openai", {"error_event_after": 3}, 3, "upstream_error", id="openai-error-event"),
        pytest.param("claude", {"error_event_after": 3}, 3, "upstream_error", id="claude-overloaded-event"),
        pytest.param(
            "claude",
            {"error_event_after": 1, "error_type": "rate_limit_error"},
            1,
            "upstream_rate_limited",
            id="claude-rate-limit-event",
        ),
        pytest.param(
            "openai",
            {"malformed": True, "malformed_after": 2, **PACED},
            2,
            "upstream_error",
            id="openai-malformed-paced",
        ),
        pytest.param(
            "claude",
            {"malformed": True, "malformed_after": 2, **PACED},
            2,
            "upstream_error",
            id="claude-malformed-paced",
        ),
    ],
)
def test_mid_stream_failure_ends_with_one_error_event(
    main: Server, fake: FakeUpstream, provider: str, behaviour: dict[str, Any], sent: int, code: str
) -> None:
    upstream, _ = PROVIDERS[provider]
    deltas = ["d0 ", "d1 ", "d2 ", "d3 ", "d4"]
    fake.behave(upstream, deltas=deltas, error_message=UPSTREAM_SECRET, **behaviour)
    status, headers, items, body = stream(main, {"message": "hi", "provider": provider})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    _, contents, end = check_stream(items, body)  # also: nothing after the terminal event, stream closed
    assert contents == deltas[:sent]
    assert end.name == "error"
    err = json.loads(end.data)["error"]
    assert err["code"] == code and err["message"], err
    assert sum(e.name in ("done", "error") for e in events(items)) == 1
    for needle in NEVER_SHOWN:
        assert needle not in body.decode(), needle


@pytest.mark.parametrize("provider", ["openai", "claude"])
def test_deltas_read_together_with_a_malformed_event_are_still_relayed(
    main: Server, fake: FakeUpstream, provider: str
) -> None:
    """Unpaced, the good deltas usually reach the server in the same network read as the bad event after
    them; they arrived before the failure, so they are relayed before the `error` event all the same. (How
    the bytes are split into reads is up to the kernel, so a few streams are tried.)"""
    upstream, _ = PROVIDERS[provider]
    deltas = ["d0 ", "d1 ", "d2 ", "d3 "]
    fake.behave(upstream, deltas=deltas, malformed=True, malformed_after=2)
    for attempt in range(5):
        status, _, items, body = stream(main, {"message": "hi", "provider": provider})
        assert status == 200
        _, contents, end = check_stream(items, body)
        assert end.name == "error" and json.loads(end.data)["error"]["code"] == "upstream_error"
        assert contents == deltas[:2], f"stream {attempt}: the deltas before the malformed event were lost"


@pytest.mark.parametrize("provider", ["openai", "claude"])
def test_a_gap_between_chunks_longer_than_the_timeout_is_an_error_event(
    impatient: Server, fake: FakeUpstream, provider: str
) -> None:
    upstream, _ = PROVIDERS[provider]
    fake.behave(upstream, deltas=["never ", "sent"], chunk_interval_s=3)  # head at once, then 3 s of silence
    status, _, items, body = stream(impatient, {"message": "hi", "provider": provider})
    assert status == 200
    _, contents, end = check_stream(items, body)
    assert contents == [] and end.name == "error"
    assert json.loads(end.data)["error"]["code"] == "upstream_timeout"
    rec = fake.wait_for(lambda rs: rs and rs[0]["finished_at"] is not None and rs[0], timeout=5)
    assert rec["client_gone"] and rec["deltas_sent"] == 0


@pytest.mark.parametrize("provider", ["openai", "claude"])
def test_the_log_line_records_the_output_relayed_before_the_upstream_died(
    main: Server, fake: FakeUpstream, provider: str
) -> None:
    upstream, _ = PROVIDERS[provider]
    fake.behave(upstream, deltas=["alpha ", "beta ", "gamma ", "delta"], drop_after=3)
    request_id = f"drop-{uuid.uuid4().hex}"
    status, _, items, body = stream(main, {"message": "hi", "provider": provider}, request_id)
    assert status == 200
    _, contents, end = check_stream(items, body)
    assert end.name == "error" and contents == ["alpha ", "beta ", "gamma "]
    line = access_line(main, request_id)
    assert line["status"] == 200 and line["stream"] is True
    assert line["output_chars"] == len("".join(contents))
    assert line["error"] == "upstream_error"


# --------------------------------------------------------------------------------------------
# 4. Client disconnects cancel the upstream request
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("provider", ["openai", "claude"])
def test_client_disconnect_closes_the_upstream_within_one_second(
    main: Server, fake: FakeUpstream, provider: str
) -> None:
    upstream, _ = PROVIDERS[provider]
    # Long silences: neither the provider nor a heartbeat gives the server a write that would fail.
    fake.behave(upstream, deltas=["a", "b", "c"], chunk_interval_s=2.0)
    reader = open_stream(main, {"message": "hi", "provider": provider})
    with reader.sock:
        assert reader.read_head()[0] == 200
        got = reader.read_events(2)
        assert [i.name for i in events(got)] == ["start", "delta"]
        closed_at = time.monotonic()
    rec = fake.wait_for(lambda rs: rs and rs[0]["finished_at"] is not None and rs[0], timeout=10)
    assert rec["client_gone"], rec
    assert rec["gone_at"] - closed_at <= 1.0, rec["gone_at"] - closed_at
    assert rec["deltas_sent"] == 1  # nothing more generated (and paid for) after the reader left


def _read_two_and_leave(srv: Server, provider: str) -> None:
    reader = open_stream(srv, {"message": "hi", "provider": provider})
    with reader.sock:
        assert reader.read_head()[0] == 200
        reader.read_events(2)


def test_200_disconnects_leave_tasks_and_upstream_connections_where_they_started(
    main: Server, fake: FakeUpstream
) -> None:
    fake.behave("openai", deltas=["x"], chunks=400, chunk_interval_s=0.05)
    fake.behave("anthropic", deltas=["y"], chunks=400, chunk_interval_s=0.05)
    fake.wait_for(lambda _: fake.stats()["in_flight"] == 0, timeout=10)
    before = health_runtime(main)
    connections_before = fake.open_connections()
    assert before["open_streams"] == 0

    with ThreadPoolExecutor(max_workers=16) as pool:
        jobs = [pool.submit(_read_two_and_leave, main, ("openai", "claude")[n % 2]) for n in range(200)]
        for job in jobs:
            job.result()

    records = fake.wait_for(
        lambda rs: len(rs) == 200 and all(r["finished_at"] is not None for r in rs) and rs, timeout=30
    )
    assert all(r["client_gone"] for r in records), [r for r in records if not r["client_gone"]][:3]
    assert max(r["deltas_sent"] for r in records) < 400

    def settled() -> dict[str, int] | None:
        now = health_runtime(main)
        return now if now["open_streams"] == 0 and now["tasks"] <= before["tasks"] else None

    try:
        after = poll(settled, 10.0, "tasks and streams back to where they started")
    except AssertionError:
        raise AssertionError(f"before {before}, now {health_runtime(main)}") from None
    assert after["pid"] == before["pid"]
    poll(lambda: fake.open_connections() <= connections_before, 10.0, "upstream connections closed")


# --------------------------------------------------------------------------------------------
# 5. Retries: only before a stream starts
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("provider", "status"), [("openai", 500), ("openai", 429), ("claude", 529), ("claude", 503)]
)
@pytest.mark.parametrize("path", ["/api/chat", "/api/chat/stream"])
def test_failures_before_the_answer_are_retried(
    retrying: Server, fake: FakeUpstream, provider: str, status: int, path: str
) -> None:
    upstream, _ = PROVIDERS[provider]
    fake.behave(upstream, deltas=["third ", "time"])
    fake.behave(upstream, count=2, status=status, retry_after_ms=1)
    payload = {"message": "hi", "provider": provider}
    if path == "/api/chat":
        got, _, raw = retrying.post_json(path, payload)
        assert got == 200, raw
        assert json.loads(raw)["response"] == "third time"
    else:
        got, _, items, body = stream(retrying, payload)
        assert got == 200
        _, contents, end = check_stream(items, body)
        assert "".join(contents) == "third time" and end.name == "done"
    assert [r["status"] for r in fake.requests(upstream)] == [status, status, 200]


@pytest.mark.parametrize("path", ["/api/chat", "/api/chat/stream"])
def test_retries_stop_after_max_retries(retrying: Server, fake: FakeUpstream, path: str) -> None:
    fake.behave("openai", status=500, retry_after_ms=1)
    status, headers, body = _any_endpoint(retrying, path, {"message": "hi", "provider": "openai"})
    check_json_error(status, headers, body, 502, "upstream_error")
    assert len(fake.requests("openai")) == 3  # the first try and UPSTREAM_MAX_RETRIES=2 retries


def _any_endpoint(srv: Server, path: str, payload: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
    if path == "/api/chat":
        return srv.post_json(path, payload)
    status, headers, _, body = stream(srv, payload)
    return status, headers, body


@pytest.mark.parametrize("provider", ["openai", "claude"])
def test_a_stream_that_started_is_never_retried(retrying: Server, fake: FakeUpstream, provider: str) -> None:
    upstream, _ = PROVIDERS[provider]
    fake.behave(upstream, deltas=["once ", "only ", "this"], drop_after=1)
    status, _, items, body = stream(retrying, {"message": "hi", "provider": provider})
    assert status == 200
    _, contents, end = check_stream(items, body)
    assert contents == ["once "] and end.name == "error"
    assert len(fake.requests(upstream)) == 1
