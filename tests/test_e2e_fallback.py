"""Fallback and the circuit breaker (`N_FALLBACK`, contract "Providers") against the real
`pwachat serve` and the fake upstream: a provider whose base URL refuses connections and one whose
upstream answers 503 are retried once on their fallback, for `/api/chat` and the stream; the
answer names who served it and carries `X-Fallback-From`; a request the provider refused (400,
401, ...) is not retried; five failures in a row skip a provider for `PROVIDER_BREAKER_S` (health
says `degraded`), after which one success closes the breaker and one failure opens it again."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

import reference
from fake_upstream import DEFAULT_ANTHROPIC_KEY, DEFAULT_OPENAI_KEY, FakeUpstream
from server import Server, access_line, free_port, poll, start_server, stop_server

pytestmark = pytest.mark.e2e

UNLIMITED = {"RATELIMIT_PER_MINUTE": "100000", "RATELIMIT_PER_HOUR": "100000", "RATELIMIT_PER_DAY": "100000"}
HEARTBEAT_S = 2.0  # SSE_HEARTBEAT_S of the main server: how long a stream waits before committing
BREAKER_S = 3.0  # PROVIDER_BREAKER_S of the breaker's server


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeUpstream]:
    with FakeUpstream(DEFAULT_OPENAI_KEY, DEFAULT_ANTHROPIC_KEY) as upstream:
        yield upstream


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, fake: FakeUpstream) -> Iterator[Server]:
    """openai -> claude (its default model), claude -> openai:gpt-4o (through ANTHROPIC_FALLBACK,
    the prefix of claude's other variables), and `down`, a base URL where nothing listens
    (connection refused) -> openai:gpt-4.1-mini. No retries: one request per provider tried."""
    srv = start_server(
        tmp_path_factory.mktemp("fallback"),
        OPENAI_API_KEY=DEFAULT_OPENAI_KEY,
        OPENAI_BASE_URL=fake.openai_base_url,
        OPENAI_FALLBACK="claude",
        ANTHROPIC_API_KEY=DEFAULT_ANTHROPIC_KEY,
        ANTHROPIC_BASE_URL=fake.anthropic_base_url,
        ANTHROPIC_FALLBACK="openai:gpt-4o",
        PROVIDERS="down",
        DOWN_BASE_URL=f"http://127.0.0.1:{free_port()}/v1",
        DOWN_MODELS="down-1",
        DOWN_FALLBACK="openai:gpt-4.1-mini",
        UPSTREAM_MAX_RETRIES="0",
        SSE_HEARTBEAT_S=str(HEARTBEAT_S),
        WORKERS="1",
        **UNLIMITED,
    )
    try:
        yield srv
    finally:
        stop_server(srv)


@pytest.fixture(autouse=True)
def _fresh(request: pytest.FixtureRequest, fake: FakeUpstream) -> Iterator[None]:
    fake.reset()
    yield
    fake.reset()
    if "served" in request.fixturenames:
        # One answer from each of openai and claude ends any run of failures this test left, so
        # that no test opens a breaker for the next (`down` never answers: its tests fail it 3 times).
        srv: Server = request.getfixturevalue("served")
        for provider in ("openai", "claude"):
            status, headers, body = srv.post_json("/api/chat", {"message": "reset", "provider": provider})
            assert status == 200 and "x-fallback-from" not in headers, body
        fake.reset()


def completions(fake: FakeUpstream, upstream: str) -> list[dict[str, Any]]:
    return [r for r in fake.requests(upstream) if r["method"] == "POST"]


def chat(srv: Server, provider: str, message: str = "Hello there", **headers: str) -> tuple[int, dict, Any]:
    status, head, body = srv.post_json("/api/chat", {"message": message, "provider": provider}, **headers)
    return status, head, json.loads(body)


def stream(srv: Server, provider: str, message: str = "Hello there") -> tuple[int, dict, Any]:
    """Status, headers and either the events [(type, data)] (200) or the JSON error body."""
    status, head, body = srv.post_json("/api/chat/stream", {"message": message, "provider": provider})
    if status != 200:
        return status, head, json.loads(body)
    assert head["content-type"].startswith("text/event-stream"), head
    events, _ = reference.parse_sse(body)
    return status, head, [(e.type, json.loads(e.data)) for e in events]


def text_of(events: list[tuple[str, Any]]) -> str:
    return "".join(data["content"] for kind, data in events if kind == "delta")


def fallbacks_counted(srv: Server) -> dict[tuple[str, str], float]:
    status, _, body = srv.request("GET", "/metrics")
    assert status == 200
    out = {}
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            if s.name == "pwachat_provider_fallbacks_total":
                out[(s.labels["from"], s.labels["to"])] = s.value
    return out


def health(srv: Server) -> dict[str, Any]:
    status, _, body = srv.request("GET", "/api/health")
    assert status == 200
    return json.loads(body)


# --------------------------------------------------------------------------------------------
# A refused connection
# --------------------------------------------------------------------------------------------


def test_a_refused_connection_falls_back_for_chat(served: Server, fake: FakeUpstream) -> None:
    status, headers, body = chat(served, "down", "Where are you", **{"X-Request-ID": "fb-refused-1"})
    assert status == 200, body
    assert headers["x-fallback-from"] == "down"
    assert (body["provider"], body["model"]) == ("openai", "gpt-4.1-mini")  # the model DOWN_FALLBACK names
    assert body["response"] == "Echo from openai: Where are you"
    sent = completions(fake, "openai")
    assert len(sent) == 1 and sent[0]["body"]["model"] == "gpt-4.1-mini" and not sent[0]["stream"]
    assert completions(fake, "anthropic") == []
    line = access_line(served, "fb-refused-1")
    assert (line["provider"], line["model"], line["fallback_from"]) == ("openai", "gpt-4.1-mini", "down")
    assert line["fallback_reason"] == "upstream_error" and "error" not in line and line["status"] == 200


def test_a_refused_connection_falls_back_for_the_stream(served: Server, fake: FakeUpstream) -> None:
    status, headers, events = stream(served, "down", "Tell me")
    assert status == 200, events
    assert headers["x-fallback-from"] == "down"
    assert events[0][0] == "start"
    assert (events[0][1]["provider"], events[0][1]["model"]) == ("openai", "gpt-4.1-mini")
    assert events[-1][0] == "done" and text_of(events) == "Echo from openai: Tell me"
    sent = completions(fake, "openai")
    assert len(sent) == 1 and sent[0]["stream"] and sent[0]["body"]["model"] == "gpt-4.1-mini"


# --------------------------------------------------------------------------------------------
# An upstream answering 503 (and the other failures worth another provider)
# --------------------------------------------------------------------------------------------


def test_a_503_falls_back_for_chat(served: Server, fake: FakeUpstream) -> None:
    fake.behave("openai", count=1, status=503)
    status, headers, body = chat(served, "openai", "Hi", **{"X-Request-ID": "fb-503-1"})
    assert status == 200, body
    assert headers["x-fallback-from"] == "openai"
    assert (body["provider"], body["model"]) == ("claude", "claude-sonnet-4-5")  # claude's default
    assert body["response"] == "Echo from anthropic: Hi"
    assert [r["status"] for r in completions(fake, "openai")] == [503]
    sent = completions(fake, "anthropic")
    assert len(sent) == 1 and sent[0]["status"] == 200 and sent[0]["body"]["model"] == "claude-sonnet-4-5"
    line = access_line(served, "fb-503-1")
    assert (line["provider"], line["fallback_from"], line["fallback_reason"]) == (
        "claude",
        "openai",
        "upstream_error",
    )


def test_a_503_falls_back_for_the_stream(served: Server, fake: FakeUpstream) -> None:
    fake.behave("openai", count=1, status=503)
    status, headers, events = stream(served, "openai", "Once upon")
    assert status == 200, events
    assert headers["x-fallback-from"] == "openai"
    assert events[0][0] == "start" and events[-1][0] == "done"
    assert (events[0][1]["provider"], events[0][1]["model"]) == ("claude", "claude-sonnet-4-5")
    assert text_of(events) == "Echo from anthropic: Once upon"
    assert [r["status"] for r in completions(fake, "openai")] == [503]
    sent = completions(fake, "anthropic")
    assert len(sent) == 1 and sent[0]["stream"]


@pytest.mark.parametrize("status", [429, 500, 502, 504])
def test_429_5xx_and_timeouts_fall_back(served: Server, fake: FakeUpstream, status: int) -> None:
    fake.behave("openai", count=1, status=status)
    got, headers, body = chat(served, "openai")
    assert got == 200, body
    assert headers["x-fallback-from"] == "openai" and body["provider"] == "claude"
    assert len(completions(fake, "openai")) == 1 and len(completions(fake, "anthropic")) == 1


def test_anthropic_overloaded_falls_back_to_the_model_named(served: Server, fake: FakeUpstream) -> None:
    fake.behave("anthropic", count=1, status=529, error_type="overloaded_error")
    status, headers, body = chat(served, "claude")
    assert status == 200, body
    assert headers["x-fallback-from"] == "claude"
    assert (body["provider"], body["model"]) == ("openai", "gpt-4o")  # ANTHROPIC_FALLBACK=openai:gpt-4o
    assert [r["body"]["model"] for r in completions(fake, "openai")] == ["gpt-4o"]


def test_a_slow_fallback_is_waited_for_under_the_same_commit_rule(served: Server, fake: FakeUpstream) -> None:
    # openai fails at once; claude's head comes after the heartbeat: the stream is committed on
    # time, naming claude, and the answer follows.
    fake.behave("openai", count=1, status=503)
    fake.behave("anthropic", count=1, head_delay_s=HEARTBEAT_S + 0.5)
    status, headers, events = stream(served, "openai", "slowly")
    assert status == 200, events
    assert headers["x-fallback-from"] == "openai"
    assert events[0][1]["provider"] == "claude" and events[-1][0] == "done"
    assert text_of(events) == "Echo from anthropic: slowly"


# --------------------------------------------------------------------------------------------
# What does not fall back
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
def test_a_request_the_provider_refused_does_not_fall_back(
    served: Server, fake: FakeUpstream, status: int
) -> None:
    fake.behave("openai", count=2, status=status)
    got, headers, body = chat(served, "openai")
    assert got == 502 and body["error"]["code"] == "upstream_error", body
    assert "x-fallback-from" not in headers
    got, headers, body = stream(served, "openai")
    assert got == 502 and body["error"]["code"] == "upstream_error", body  # still JSON: not committed
    assert "x-fallback-from" not in headers
    assert len(completions(fake, "openai")) == 2
    assert completions(fake, "anthropic") == []


def test_the_fallback_is_tried_once_never_chained(served: Server, fake: FakeUpstream) -> None:
    # openai -> claude and claude -> openai: a request tried on both answers claude's failure.
    fake.behave("openai", count=1, status=503)
    fake.behave("anthropic", count=1, status=503)
    status, headers, body = chat(served, "openai")
    assert status == 502 and body["error"]["code"] == "upstream_error", body
    assert headers["x-fallback-from"] == "openai"  # the failure is the fallback's
    assert len(completions(fake, "openai")) == 1 and len(completions(fake, "anthropic")) == 1


def test_a_failure_after_the_stream_is_committed_does_not_fall_back(
    served: Server, fake: FakeUpstream
) -> None:
    fake.behave("openai", count=1, error_event_after=1)
    status, headers, events = stream(served, "openai")
    assert status == 200 and "x-fallback-from" not in headers
    assert events[0][1]["provider"] == "openai" and events[-1][0] == "error"
    # A failing head that comes after the heartbeat: committed already, naming openai.
    fake.behave("openai", count=1, status=503, head_delay_s=HEARTBEAT_S + 0.5)
    status, headers, events = stream(served, "openai")
    assert status == 200 and "x-fallback-from" not in headers
    assert events[0][1]["provider"] == "openai" and events[-1][0] == "error"
    assert completions(fake, "anthropic") == []


# --------------------------------------------------------------------------------------------
# Counted and shown
# --------------------------------------------------------------------------------------------


def test_the_counter_moves_by_the_fallbacks_taken(served: Server, fake: FakeUpstream) -> None:
    before = fallbacks_counted(served)
    # Only the configured pairs are series (from, to).
    assert set(before) == {("openai", "claude"), ("claude", "openai"), ("down", "openai")}
    fake.behave("openai", count=2, status=503)
    assert chat(served, "openai")[0] == 200
    assert stream(served, "openai")[0] == 200
    assert chat(served, "down")[0] == 200
    fake.behave("openai", count=1, status=400)  # no fallback: not counted
    assert chat(served, "openai")[0] == 502
    assert chat(served, "openai")[0] == 200  # no failure: not counted
    after = fallbacks_counted(served)
    moved = {pair: after[pair] - before[pair] for pair in after}
    assert moved == {("openai", "claude"): 2, ("claude", "openai"): 0, ("down", "openai"): 1}


def test_health_shows_every_provider_ok_while_the_breakers_are_closed(served: Server) -> None:
    body = health(served)
    assert body["status"] == "ok"
    assert {name: p["status"] for name, p in body["providers"].items()} == {
        "openai": "ok",
        "claude": "ok",
        "down": "ok",  # failing, but not 5 times in a row
        "echo": "ok",
    }


# --------------------------------------------------------------------------------------------
# The circuit breaker
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def breaker_server(tmp_path_factory: pytest.TempPathFactory, fake: FakeUpstream) -> Iterator[Server]:
    """openai -> claude with a breaker period of BREAKER_S, and `solo` (OpenAI's format, the
    fake's openai side too) without a fallback."""
    srv = start_server(
        tmp_path_factory.mktemp("breaker"),
        OPENAI_API_KEY=DEFAULT_OPENAI_KEY,
        OPENAI_BASE_URL=fake.openai_base_url,
        OPENAI_FALLBACK="claude",
        CLAUDE_FALLBACK="",  # CLAUDE_FALLBACK is the contract's spelling; empty: none
        ANTHROPIC_API_KEY=DEFAULT_ANTHROPIC_KEY,
        ANTHROPIC_BASE_URL=fake.anthropic_base_url,
        PROVIDERS="solo",
        SOLO_BASE_URL=fake.openai_base_url,
        SOLO_API_KEY=DEFAULT_OPENAI_KEY,
        SOLO_MODELS="solo-1",
        PROVIDER_BREAKER_S=str(BREAKER_S),
        UPSTREAM_MAX_RETRIES="0",
        WORKERS="1",  # the breaker is per worker process
        **UNLIMITED,
    )
    try:
        yield srv
    finally:
        stop_server(srv)


def served_by(srv: Server, provider: str, stream_it: bool = False) -> tuple[str, str | None]:
    """Who answered a request for `provider`, and its X-Fallback-From."""
    if stream_it:
        status, headers, events = stream(srv, provider)
        assert status == 200, events
        return events[0][1]["provider"], headers.get("x-fallback-from")
    status, headers, body = chat(srv, provider)
    assert status == 200, body
    return body["provider"], headers.get("x-fallback-from")


def fail_five_times(srv: Server, fake: FakeUpstream) -> float:
    """openai answers 503 from now on; five requests fall back, the fifth opens the breaker.
    Returns the time before the fifth was sent: the breaker opened after it."""
    fake.behave("openai", status=503)
    sent_at = 0.0
    for n in range(1, 6):
        assert health(srv)["providers"]["openai"]["status"] == "ok"  # not yet 5 in a row
        sent_at = time.monotonic()
        assert served_by(srv, "openai") == ("claude", "openai")
        assert len(completions(fake, "openai")) == n
    return sent_at


def test_five_failures_in_a_row_open_the_breaker_and_one_success_closes_it(
    breaker_server: Server, fake: FakeUpstream
) -> None:
    srv = breaker_server
    opened_after = fail_five_times(srv, fake)
    body = health(srv)
    assert body["providers"]["openai"]["status"] == "degraded"
    assert body["providers"]["claude"]["status"] == "ok"
    assert body["status"] == "degraded"
    # Open: straight to the fallback, for /api/chat and the stream; openai sees nothing.
    status, headers, answer = chat(srv, "openai", **{"X-Request-ID": "fb-open-1"})
    assert status == 200 and headers["x-fallback-from"] == "openai" and answer["provider"] == "claude"
    assert served_by(srv, "openai", stream_it=True) == ("claude", "openai")
    assert time.monotonic() < opened_after + BREAKER_S, "too slow to see the breaker open: rerun"
    assert len(completions(fake, "openai")) == 5
    assert access_line(srv, "fb-open-1")["fallback_reason"] == "circuit_open"

    # openai is back; once the period is over, one request tries it and closes the breaker.
    fake.reset()
    poll(lambda: served_by(srv, "openai") == ("openai", None), BREAKER_S + 10, "openai served again", 0.1)
    first = completions(fake, "openai")
    assert len(first) == 1 and first[0]["received_at"] >= opened_after + BREAKER_S
    assert health(srv)["providers"]["openai"]["status"] == "ok"
    assert health(srv)["status"] == "ok"
    assert served_by(srv, "openai", stream_it=True) == ("openai", None)


def test_a_failed_try_after_the_period_opens_the_breaker_again(
    breaker_server: Server, fake: FakeUpstream
) -> None:
    srv = breaker_server
    fake.reset()
    assert served_by(srv, "openai") == ("openai", None)  # closed, whatever came before
    fake.reset()
    opened_after = fail_five_times(srv, fake)
    # The period over, one request tries openai (still 503): it falls back, and opens the breaker again.
    poll(
        lambda: served_by(srv, "openai") and len(completions(fake, "openai")) == 6,
        BREAKER_S + 10,
        "a try of openai",
        0.1,
    )
    tried_at = completions(fake, "openai")[-1]["received_at"]
    assert tried_at >= opened_after + BREAKER_S
    assert health(srv)["providers"]["openai"]["status"] == "degraded"
    assert served_by(srv, "openai") == ("claude", "openai")
    assert time.monotonic() < tried_at + BREAKER_S, "too slow to see the breaker open: rerun"
    assert len(completions(fake, "openai")) == 6
    fake.reset()  # openai back: the next try closes it (for the tests after this one)
    poll(lambda: served_by(srv, "openai") == ("openai", None), BREAKER_S + 10, "openai served again", 0.1)


def test_a_provider_without_a_fallback_has_no_breaker(breaker_server: Server, fake: FakeUpstream) -> None:
    fake.behave("openai", status=503)  # solo speaks to the fake's openai side
    for _ in range(6):
        status, headers, body = chat(breaker_server, "solo")
        assert status == 502 and body["error"]["code"] == "upstream_error"
        assert "x-fallback-from" not in headers
    assert len(completions(fake, "openai")) == 6  # each one tried: nothing to skip to
    assert health(breaker_server)["providers"]["solo"]["status"] == "ok"
