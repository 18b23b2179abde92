"""Token budgets end to end in one process (contract, "Token budgets"): the real server with
`memory://`, the fake upstream over real HTTP. Each request reserves its worst case before the
provider is called and is charged what it used when it ends, however it ends; a budget that cannot
cover a request refuses it before the provider sees anything. Across processes and instances with
Redis: tests/test_e2e_budgets_redis.py."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from fake_upstream import FakeUpstream
from pwachat._native import estimate_input_tokens
from server import Server, poll, start_server, stop_server
from sse_client import begin, events, open_stream

pytestmark = pytest.mark.e2e

OPENAI_KEY = "sk-test-budgets"
SYSTEM = "Answer briefly."
MAX_TOKENS = 300
DELTAS = [f"w{i} " for i in range(8)]


def cost(message: str, history: list[tuple[str, str]] = (), max_tokens: int = MAX_TOKENS) -> int:  # type: ignore[assignment]
    """What a request reserves: the documented upper-bound estimate of its input plus max_tokens."""
    return estimate_input_tokens(SYSTEM, list(history), message) + max_tokens


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeUpstream]:
    with FakeUpstream(OPENAI_KEY, "sk-ant-unused") as upstream:
        yield upstream


@pytest.fixture(autouse=True)
def _fresh_fake(fake: FakeUpstream) -> Iterator[None]:
    fake.reset()
    yield
    fake.reset()


def serve(tmp: Any, fake: FakeUpstream, **env: str) -> Server:
    settings = {
        "OPENAI_API_KEY": OPENAI_KEY,
        "OPENAI_BASE_URL": fake.openai_base_url,
        "UPSTREAM_MAX_RETRIES": "0",
        "SSE_HEARTBEAT_S": "0.5",
        "SYSTEM_PROMPT": SYSTEM,
        "MAX_TOKENS": str(MAX_TOKENS),
        "RATELIMIT_PER_MINUTE": "100000",
        "RATELIMIT_PER_HOUR": "100000",
        "RATELIMIT_PER_DAY": "100000",
        "METRICS_TOKEN": "m",
    }
    return start_server(tmp, **{**settings, **env})


@pytest.fixture
def make(tmp_path: Any, fake: FakeUpstream) -> Iterator[Any]:
    started: list[Server] = []

    def factory(**env: str) -> Server:
        srv = serve(tmp_path, fake, **env)
        started.append(srv)
        return srv

    yield factory
    for srv in started:
        stop_server(srv)


def post(srv: Server, message: str, token: str | None = None, **fields: Any) -> tuple[int, dict, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    status, got, body = srv.post_json(
        "/api/chat", {"message": message, "provider": "openai", **fields}, **headers
    )
    return status, got, json.loads(body) if body else None


def budget(srv: Server, token: str | None = None) -> dict:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    status, _, body = srv.request("GET", "/api/rate-limit", headers=headers)
    assert status == 200
    return json.loads(body)


def remaining(srv: Server, token: str | None = None) -> int:
    return budget(srv, token)["tokens"]["remaining"]


def used(usage: dict) -> int:
    return usage["input_tokens"] + usage["output_tokens"]


def budget_metric(srv: Server, kind: str) -> float:
    status, _, body = srv.request("GET", "/metrics", headers={"Authorization": "Bearer m"})
    assert status == 200
    line = f'pwachat_budget_tokens_total{{kind="{kind}"}}'
    return float(next(r for r in body.decode().splitlines() if r.startswith(line)).split()[-1])


# -- reserve, then settle --------------------------------------------------------------------------


def test_a_request_reserves_its_worst_case_and_is_charged_what_it_used(make: Any, fake: FakeUpstream) -> None:
    srv = make(TOKENS_PER_DAY="100000")
    fake.behave("openai", input_tokens=123, output_tokens=45, deltas=DELTAS)
    history = [("user", "an earlier question"), ("assistant", "its answer")]
    payload_history = [{"role": r, "content": c} for r, c in history]
    assert budget(srv)["tokens"] == {"limit": 100000, "remaining": 100000, "reset_s": 0}

    status, headers, body = post(srv, "hello there", history=payload_history)
    assert status == 200, body
    assert body["usage"] == {"input_tokens": 123, "output_tokens": 45}
    assert headers["x-tokenbudget-limit"] == "100000"
    # While it ran, its whole worst case was held; once answered, only what it used.
    assert int(headers["x-tokenbudget-remaining"]) == 100000 - cost("hello there", history)
    assert '"tokens";q=100000;w=86400' in headers["ratelimit-policy"]
    assert remaining(srv) == 100000 - 168

    # The stream: the same, its reservation settled once the answer has ended (just after `done`).
    reader = open_stream(srv, {"message": "and a stream", "provider": "openai", "max_tokens": 200})
    with reader.sock:
        status, headers = reader.read_head()
        assert status == 200
        assert int(headers["x-tokenbudget-remaining"]) == 100000 - 168 - cost("and a stream", max_tokens=200)
        done = events(reader.read_rest())[-1]
    assert done.name == "done" and json.loads(done.data)["usage"] == {
        "input_tokens": 123,
        "output_tokens": 45,
    }
    poll(lambda: remaining(srv) == 100000 - 2 * 168, 5, "the stream's settle")
    # Every reserved token is either used or given back.
    reserved = budget_metric(srv, "reserved")
    assert reserved == cost("hello there", history) + cost("and a stream", max_tokens=200)
    assert budget_metric(srv, "settled") == 2 * 168
    assert budget_metric(srv, "released") == reserved - 2 * 168


def test_a_provider_that_reports_no_usage_is_still_charged(make: Any, fake: FakeUpstream) -> None:
    srv = make(TOKENS_PER_DAY="100000")
    fake.behave("openai", omit_usage=True, deltas=DELTAS)
    status, _, body = post(srv, "count me")
    assert status == 200 and body["usage"]["estimated"] is True
    charged = used(body["usage"])
    assert charged >= len("".join(DELTAS)) + estimate_input_tokens(SYSTEM, [], "count me") > 0
    assert remaining(srv) == 100000 - charged


def test_a_failed_provider_request_costs_nothing(make: Any, fake: FakeUpstream) -> None:
    srv = make(TOKENS_PER_DAY="100000")
    fake.behave("openai", status=500)
    status, _, body = post(srv, "fail please")
    assert status == 502 and body["error"]["code"] == "upstream_error"
    # A stream that failed after it was committed, before any text: nothing either.
    fake.behave("openai", error_event_after=0, head_delay_s=0.8)
    reader = open_stream(srv, {"message": "fail later", "provider": "openai"})
    with reader.sock:
        assert reader.read_head()[0] == 200
        end = events(reader.read_rest())[-1]
    assert end.name == "error"
    poll(lambda: remaining(srv) == 100000, 5, "the failed stream's reservation given back")
    assert budget_metric(srv, "settled") == 0


# -- refusals ----------------------------------------------------------------------------------------


def test_a_budget_that_cannot_cover_a_request_refuses_it_before_the_provider_is_called(
    make: Any, fake: FakeUpstream
) -> None:
    one = cost("spend")
    srv = make(TOKENS_PER_DAY=str(one + one // 2))
    # The first answer uses its whole reservation: what is left cannot cover another.
    fake.behave("openai", input_tokens=one - MAX_TOKENS, output_tokens=MAX_TOKENS, deltas=DELTAS)
    assert post(srv, "spend")[0] == 200
    requests_left = budget(srv)["remaining"]
    for path in ("/api/chat", "/api/chat/stream"):
        status, headers, raw = srv.post_json(path, {"message": "spend", "provider": "openai"})
        body = json.loads(raw)
        assert status == 429 and body["error"]["code"] == "budget_exceeded", body
        assert "token budget" in body["error"]["message"] and "spend" not in body["error"]["message"]
        assert headers["content-type"].startswith("application/json")  # never a stream
        retry = int(headers["retry-after"])
        assert 1 <= retry <= 86400
        assert headers["x-tokenbudget-limit"] == str(one + one // 2)
        assert int(headers["x-tokenbudget-remaining"]) < one
        assert "x-ratelimit-remaining" in headers
    assert len(fake.requests()) == 1  # the provider saw only the admitted request
    # A refused request consumes neither tokens nor request quota.
    assert budget(srv)["remaining"] == requests_left
    assert remaining(srv) == one // 2
    assert budget_metric(srv, "reserved") == one


def test_a_request_larger_than_the_whole_budget_is_refused_for_what_it_is(
    make: Any, fake: FakeUpstream
) -> None:
    srv = make(TOKENS_PER_DAY="100")
    status, headers, body = post(srv, "this request may use up to 300 tokens of output")
    assert status == 429 and body["error"]["code"] == "budget_exceeded"
    assert "more than the whole token budget" in body["error"]["message"]
    assert headers["retry-after"] == "86400"
    assert fake.requests() == []
    # A smaller max_tokens fits.
    fake.behave("openai", input_tokens=5, output_tokens=5)
    assert post(srv, "hi", max_tokens=10)[0] == 200


def test_the_global_budget_is_shared_by_every_caller(make: Any, fake: FakeUpstream) -> None:
    one = cost("hello")
    tokens = [f"caller-{i}" for i in range(5)]
    srv = make(API_TOKENS=",".join(tokens), TOKENS_GLOBAL_PER_DAY=str(2 * one + one // 2))
    fake.behave("openai", input_tokens=one - MAX_TOKENS, output_tokens=MAX_TOKENS)
    statuses = [post(srv, "hello", token)[0] for token in tokens]
    assert statuses == [200, 200, 429, 429, 429]
    _, headers, body = post(srv, "hello", tokens[4])
    assert "deployment's token budget" in body["error"]["message"]
    # Each caller's own budget (the default 200000) is the policy; the headers and the rate-limit
    # route name the tighter budget: the deployment's.
    assert '"tokens";q=200000;w=86400' in headers["ratelimit-policy"]
    assert headers["x-tokenbudget-limit"] == str(2 * one + one // 2)
    assert budget(srv, tokens[4])["tokens"]["remaining"] == one // 2
    assert len(fake.requests()) == 2


def test_budgets_off_add_nothing(make: Any, fake: FakeUpstream) -> None:
    srv = make(TOKENS_PER_DAY="0")
    fake.behave("openai", input_tokens=5, output_tokens=5)
    status, headers, _ = post(srv, "hi")
    assert status == 200
    assert "x-tokenbudget-limit" not in headers and "tokens" not in headers["ratelimit-policy"]
    assert budget(srv)["tokens"] is None


# -- streams that end early ------------------------------------------------------------------------


def test_a_stopped_stream_is_charged_what_it_used(make: Any, fake: FakeUpstream) -> None:
    srv = make(TOKENS_PER_DAY="100000")
    fake.behave("openai", deltas=DELTAS * 10, chunk_interval_s=0.1)
    reader, chat_id = begin(srv)
    with reader.sock:
        events(reader.read_events(2))
        status, _, _ = srv.request("POST", f"/api/chat/stream/{chat_id}/stop")
        assert status == 200
        done = json.loads(events(reader.read_rest())[-1].data)
    assert done["finish_reason"] == "cancelled"
    charged = used(done["usage"])
    assert 0 < charged < cost("tell me")
    poll(lambda: remaining(srv) == 100000 - charged, 5, "the stopped stream's settle")


def test_an_abandoned_stream_is_charged_what_it_used_when_its_grace_is_over(
    make: Any, fake: FakeUpstream
) -> None:
    srv = make(TOKENS_PER_DAY="100000", STREAM_GRACE_S="0.5")
    fake.behave("openai", deltas=DELTAS * 20, chunk_interval_s=0.05)
    reader, _ = begin(srv)
    events(reader.read_events(2))
    reader.sock.close()  # the phone lost its network, and never came back
    fake.wait_for(lambda rs: rs and rs[0]["finished_at"] is not None, timeout=10)
    # What the provider generated until the grace was over is charged: no more, no less.
    line = poll(lambda: _access_line(srv, "/api/chat/stream"), 5, "the stream's access line")
    assert line["client_gone"] and line["output_tokens"] > 0
    charged = line["input_tokens"] + line["output_tokens"]
    poll(lambda: remaining(srv) == 100000 - charged, 5, "the abandoned stream's settle")
    assert charged < cost("tell me")


def _access_line(srv: Server, path: str) -> dict | None:
    for raw in srv.app_log.read_text().splitlines():
        line = json.loads(raw)
        if line.get("logger") == "pwachat.access" and line.get("path") == path and "input_tokens" in line:
            return line
    return None


def test_a_stream_whose_reader_left_before_it_was_committed_costs_nothing(
    make: Any, fake: FakeUpstream
) -> None:
    srv = make(TOKENS_PER_DAY="100000", SSE_HEARTBEAT_S="5")
    fake.behave("openai", head_delay_s=3, deltas=DELTAS)
    reader = open_stream(srv, {"message": "never mind", "provider": "openai"})
    poll(lambda: fake.requests(), 5, "the provider request")
    reader.sock.close()
    fake.wait_for(lambda rs: rs and rs[0]["finished_at"] is not None, timeout=10)
    poll(lambda: remaining(srv) == 100000, 5, "the reservation given back")
    assert budget_metric(srv, "settled") == 0


def test_with_redis_the_budget_is_settled_as_the_answer_ends(
    make: Any, fake: FakeUpstream, tmp_path: Any
) -> None:
    # Settles reach Redis in batches; the worker's own view counts those not sent yet, so a client
    # asking right on `done` (the PWA does) sees what the answer used, never the reservation.
    from redis_server import RedisServer

    redis = RedisServer(tmp_path).start()
    try:
        srv = make(TOKENS_PER_DAY="100000", REDIS_URL=redis.url)
        fake.behave("openai", input_tokens=20, output_tokens=10, deltas=DELTAS)
        for n in range(1, 6):
            reader = open_stream(srv, {"message": "settle me", "provider": "openai"})
            with reader.sock:
                assert reader.read_head()[0] == 200
                assert events(reader.read_rest())[-1].name == "done"
            assert remaining(srv) == 100000 - 30 * n
    finally:
        redis.stop()
