"""Resumable streams end to end (contract, "Resumable streams"): the real server process with
`memory://`, the fake upstream over real HTTP. A reader leaves and comes back for exactly the
rest; stops and the grace period cancel the provider request (and nothing else does); abandoned
streams leave nothing behind. Across instances with Redis: tests/test_e2e_resume_redis.py."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from fake_upstream import FakeUpstream
from server import Server, poll, start_server, stop_server
from sse_client import Item, begin, delta_text, events, resume_stream

OPENAI_KEY = "sk-test-resume"
TOKENS = ("tok-alice", "tok-bob")
DELTAS = [f"w{i} " for i in range(12)]


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
        "RATELIMIT_PER_MINUTE": "100000",
        "RATELIMIT_PER_HOUR": "100000",
        "RATELIMIT_PER_DAY": "100000",
        "TOKENS_PER_DAY": "0",  # hundreds of streams from one caller (budgets: test_e2e_budgets*.py)
    }
    return start_server(tmp, **{**settings, **env})


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory, fake: FakeUpstream) -> Iterator[Server]:
    server = serve(tmp_path_factory.mktemp("resume"), fake, STREAM_GRACE_S="30", METRICS_TOKEN="m")
    try:
        yield server
    finally:
        stop_server(server)


@pytest.fixture(scope="module")
def short(tmp_path_factory: pytest.TempPathFactory, fake: FakeUpstream) -> Iterator[Server]:
    """A grace of 1.5 s and a retention of 1 s: when each runs out can be watched."""
    server = serve(tmp_path_factory.mktemp("short"), fake, STREAM_GRACE_S="1.5", STREAM_RETAIN_S="1")
    try:
        yield server
    finally:
        stop_server(server)


@pytest.fixture(scope="module")
def tokened(tmp_path_factory: pytest.TempPathFactory, fake: FakeUpstream) -> Iterator[Server]:
    server = serve(tmp_path_factory.mktemp("tokens"), fake, API_TOKENS=",".join(TOKENS))
    try:
        yield server
    finally:
        stop_server(server)


def auth(token: str | None) -> str:
    return f"Authorization: Bearer {token}\r\n" if token else ""


def check_rest(items: list[Item], first_id: int) -> Item:
    """Ids consecutive from `first_id`, one terminal event last; returns it."""
    evs = events(items)
    if first_id == 0:
        assert evs[0].name == "start"
        evs = evs[1:]
        first_id = 1
    assert [int(e.id) for e in evs] == list(range(first_id, first_id + len(evs))), [e.id for e in evs]
    assert [e.name for e in evs[:-1]] == ["delta"] * (len(evs) - 1)
    return evs[-1]


def request(srv: Server, method: str, path: str, token: str | None = None, **headers: str) -> tuple:
    hdrs = dict(headers)
    if token:
        hdrs["Authorization"] = f"Bearer {token}"
    status, got, body = srv.request(method, path, headers=hdrs)
    is_json = got.get("content-type", "").startswith("application/json")
    return status, got, json.loads(body) if is_json else body or None


def gone_after(fake: FakeUpstream, timeout: float) -> dict:
    """The provider request's record once it has ended."""
    return fake.wait_for(lambda rs: rs and rs[0]["finished_at"] is not None and rs[0], timeout=timeout)


# -- resume --------------------------------------------------------------------------------------


def test_a_reader_that_leaves_after_three_deltas_resumes_with_exactly_the_rest(
    srv: Server, fake: FakeUpstream
) -> None:
    fake.behave("openai", deltas=DELTAS, chunk_interval_s=0.15)
    reader, chat_id = begin(srv)
    first = events(reader.read_events(3))
    assert [e.id for e in first] == ["1", "2", "3"]
    reader.sock.close()  # the network drops
    again = resume_stream(srv, chat_id, "Last-Event-ID: 3\r\n")
    with again.sock:
        status, headers = again.read_head()
        assert status == 200 and headers["content-type"].startswith("text/event-stream")
        assert headers["cache-control"] == "no-cache"
        rest = again.read_rest()
    end = check_rest(rest, 4)
    assert end.name == "done" and json.loads(end.data)["finish_reason"] == "stop"
    assert delta_text(first) + delta_text(rest) == "".join(DELTAS)
    # One provider request, never restarted, that ran to its end.
    recs = fake.requests()
    assert len(recs) == 1 and recs[0]["completed"] and not recs[0]["client_gone"], recs


def test_resume_after_the_end_replays_every_event_with_its_original_bytes(
    srv: Server, fake: FakeUpstream
) -> None:
    fake.behave("openai", deltas=DELTAS[:5])
    reader, chat_id = begin(srv)
    with reader.sock:
        reader.read_rest()
    original = reader.body
    again = resume_stream(srv, chat_id)
    with again.sock:
        assert again.read_head()[0] == 200
        again.read_rest()
    assert again.body == original
    assert len(fake.requests()) == 1


def test_last_event_id_in_the_query_and_the_header_winning(srv: Server, fake: FakeUpstream) -> None:
    fake.behave("openai", deltas=DELTAS[:6])
    reader, chat_id = begin(srv)
    with reader.sock:
        reader.read_rest()
    by_query = resume_stream(srv, chat_id, query="?last_event_id=4")
    with by_query.sock:
        by_query.read_head()
        rest = by_query.read_rest()
    assert check_rest(rest, 5).name == "done" and delta_text(rest) == "w4 w5 "
    both = resume_stream(srv, chat_id, "Last-Event-ID: 5\r\n", query="?last_event_id=1")
    with both.sock:
        both.read_head()
        rest = both.read_rest()
    assert [e.name for e in events(rest)] == ["delta", "done"] and delta_text(rest) == "w5 "


def test_a_reader_with_every_event_gets_204_and_bad_ids_get_400(srv: Server, fake: FakeUpstream) -> None:
    fake.behave("openai", deltas=DELTAS[:2])
    reader, chat_id = begin(srv)
    with reader.sock:
        items = reader.read_rest()
    last = events(items)[-1].id
    status, _, body = request(srv, "GET", f"/api/chat/stream/{chat_id}", **{"Last-Event-ID": last})
    assert status == 204 and body is None  # an EventSource stops reconnecting
    for bad in ("-1", "x", "1.5", "99999999999999999999"):
        status, _, body = request(srv, "GET", f"/api/chat/stream/{chat_id}", **{"Last-Event-ID": bad})
        assert status == 400 and body["error"]["code"] == "invalid_request", (bad, body)


def test_unknown_and_foreign_ids_are_404_for_resume_and_stop(tokened: Server, fake: FakeUpstream) -> None:
    fake.behave("openai", deltas=DELTAS, chunk_interval_s=0.2)
    alice, chat_id = begin(tokened, auth(TOKENS[0]))
    with alice.sock:
        for token in TOKENS[1:]:  # another caller: as if there were no such stream
            for method, path in (("GET", ""), ("POST", "/stop")):
                status, _, body = request(tokened, method, f"/api/chat/stream/{chat_id}{path}", token)
                assert status == 404 and body["error"]["code"] == "stream_not_found", body
        status, _, body = request(tokened, "GET", "/api/chat/stream/chat_" + "0" * 24, TOKENS[0])
        assert status == 404 and body["error"]["code"] == "stream_not_found"
        status, _, body = request(tokened, "GET", f"/api/chat/stream/{chat_id}")
        assert status == 401  # no token at all
        rest = alice.read_rest()
    assert check_rest(rest, 1).name == "done"  # alice's stream was never disturbed
    assert not fake.requests()[0]["client_gone"]


# -- stop ----------------------------------------------------------------------------------------


def test_stop_cancels_the_upstream_at_once_and_every_reader_sees_cancelled(
    srv: Server, fake: FakeUpstream
) -> None:
    fake.behave("openai", deltas=DELTAS * 3, chunk_interval_s=0.2)
    reader, chat_id = begin(srv)
    other = resume_stream(srv, chat_id)
    with reader.sock, other.sock:
        assert other.read_head()[0] == 200
        events(reader.read_events(2))
        stopped_at = time.monotonic()
        status, _, body = request(srv, "POST", f"/api/chat/stream/{chat_id}/stop")
        assert status == 200 and body == {"stopped": True}
        ends = [check_rest(r.read_rest(), 0 if r is other else 3) for r in (other, reader)]
    for end in ends:
        done = json.loads(end.data)
        assert end.name == "done" and done["finish_reason"] == "cancelled", done
        assert done["usage"]["output_tokens"] >= 1
    rec = gone_after(fake, 5)
    assert rec["client_gone"] and not rec["completed"]
    assert rec["gone_at"] - stopped_at <= 1.0, rec["gone_at"] - stopped_at
    # Idempotent: the stream has ended now.
    assert request(srv, "POST", f"/api/chat/stream/{chat_id}/stop")[2] == {"stopped": False}
    # Its events stay readable, ending with the same `cancelled`.
    again = resume_stream(srv, chat_id, "Last-Event-ID: 1\r\n")
    with again.sock:
        again.read_head()
        assert json.loads(check_rest(again.read_rest(), 2).data)["finish_reason"] == "cancelled"


def test_stop_while_the_provider_has_not_answered_yet(srv: Server, fake: FakeUpstream) -> None:
    fake.behave("openai", head_delay_s=5, deltas=DELTAS)
    reader, chat_id = begin(srv)  # committed on the heartbeat, the provider still silent
    with reader.sock:
        stopped_at = time.monotonic()
        assert request(srv, "POST", f"/api/chat/stream/{chat_id}/stop")[2] == {"stopped": True}
        end = check_rest(reader.read_rest(), 1)
    assert end.name == "done" and json.loads(end.data)["finish_reason"] == "cancelled"
    rec = gone_after(fake, 5)
    assert rec["client_gone"] and rec["head_sent_at"] is None and rec["gone_at"] - stopped_at <= 1.0


# -- the grace period ----------------------------------------------------------------------------


def outcome_count(server: Server, family: str, outcome: str) -> float:
    """One sample of /metrics (answered to loopback, or with the `srv` fixture's token)."""
    status, _, body = server.request("GET", "/metrics", headers={"Authorization": "Bearer m"})
    assert status == 200, status
    line = f'{family}{{outcome="{outcome}"}}'
    return float(next(r for r in body.decode().splitlines() if r.startswith(line)).split()[-1])


def test_the_grace_expiring_cancels_the_upstream_and_not_before(short: Server, fake: FakeUpstream) -> None:
    expired = outcome_count(short, "pwachat_stream_events_total", "grace_expired")
    fake.behave("openai", deltas=DELTAS * 5, chunk_interval_s=0.1)
    reader, chat_id = begin(short)
    events(reader.read_events(1))
    reader.sock.close()
    left_at = time.monotonic()
    rec = gone_after(fake, 8)
    assert rec["client_gone"] and not rec["completed"]
    waited = rec["gone_at"] - left_at
    assert 1.5 - 0.1 <= waited <= 1.5 + 1.0, waited  # the grace (1.5 s), then at once
    # The log ends with `cancelled`, for a reader that comes back (too late) within the retention.
    again = resume_stream(short, chat_id, "Last-Event-ID: 1\r\n")
    with again.sock:
        assert again.read_head()[0] == 200
        end = check_rest(again.read_rest(), 2)
    assert json.loads(end.data)["finish_reason"] == "cancelled"
    assert outcome_count(short, "pwachat_stream_events_total", "grace_expired") == expired + 1


def test_a_reader_back_within_the_grace_keeps_the_answer_going(short: Server, fake: FakeUpstream) -> None:
    fake.behave("openai", deltas=DELTAS * 3, chunk_interval_s=0.1)
    reader, chat_id = begin(short)
    first = events(reader.read_events(2))
    reader.sock.close()
    poll(lambda: fake.requests()[0]["deltas_sent"] >= 6, 5, "the answer going on without a reader")
    again = resume_stream(short, chat_id, f"Last-Event-ID: {first[-1].id}\r\n")
    with again.sock:
        again.read_head()
        rest = again.read_rest()
    assert check_rest(rest, 3).name == "done"
    assert delta_text(first) + delta_text(rest) == "".join(DELTAS * 3)
    rec = fake.requests()[0]
    assert rec["completed"] and not rec["client_gone"]


def test_an_ended_stream_is_forgotten_after_its_retention(short: Server, fake: FakeUpstream) -> None:
    fake.behave("openai", deltas=DELTAS[:2])
    reader, chat_id = begin(short)
    with reader.sock:
        reader.read_rest()
    ended_at = time.monotonic()
    assert request(short, "GET", f"/api/chat/stream/{chat_id}", **{"Last-Event-ID": "0"})[0] == 200
    poll(
        lambda: request(short, "GET", f"/api/chat/stream/{chat_id}")[0] == 404,
        5,
        "the stream forgotten after STREAM_RETAIN_S",
    )
    assert time.monotonic() - ended_at >= 1.0 - 0.05


# -- readers -------------------------------------------------------------------------------------


def test_at_most_four_readers_per_stream(srv: Server, fake: FakeUpstream) -> None:
    fake.behave("openai", deltas=DELTAS, chunk_interval_s=0.2)
    reader, chat_id = begin(srv)
    others = [resume_stream(srv, chat_id) for _ in range(3)]
    try:
        for other in others:
            assert other.read_head()[0] == 200
        status, headers, body = request(srv, "GET", f"/api/chat/stream/{chat_id}")
        assert status == 429 and body["error"]["code"] == "rate_limited" and int(headers["retry-after"]) >= 1
        texts = [delta_text(r.read_rest()) for r in (reader, *others)]
    finally:
        for r in (reader, *others):
            r.sock.close()
    assert all(t == "".join(DELTAS) for t in texts), texts


def test_resumes_are_counted_in_metrics(srv: Server, fake: FakeUpstream) -> None:
    family = "pwachat_stream_resumes_total"
    ok, missing = outcome_count(srv, family, "ok"), outcome_count(srv, family, "not_found")
    fake.behave("openai", deltas=DELTAS[:2])
    reader, chat_id = begin(srv)
    with reader.sock:
        reader.read_rest()
    request(srv, "GET", f"/api/chat/stream/{chat_id}", **{"Last-Event-ID": "0"})
    request(srv, "GET", "/api/chat/stream/chat_nope")
    assert outcome_count(srv, family, "ok") == ok + 1
    assert outcome_count(srv, family, "not_found") == missing + 1


# -- nothing left behind ---------------------------------------------------------------------------


def runtime(server: Server) -> dict:
    return json.loads(server.request("GET", "/api/health")[2])["runtime"]


def test_200_abandoned_streams_leave_nothing_behind(short: Server, fake: FakeUpstream) -> None:
    fake.behave("openai", deltas=DELTAS * 20, chunk_interval_s=0.05)
    before = runtime(short)
    for _ in range(2):  # twice: what one round leaves, the second would add to
        readers = [begin(short)[0] for _ in range(100)]
        for r in readers:
            r.sock.close()
    poll(
        lambda: sum(r["client_gone"] for r in fake.requests()) == 200,
        20,
        "every abandoned provider request cancelled once the grace ran out",
    )
    poll(
        lambda: (
            (now := runtime(short))["open_streams"] == 0
            and now["tasks"] <= before["tasks"]
            and now["kept_streams"] == 0
            and now["kept_stream_bytes"] == 0
        ),
        10,
        "no stream, task or log left in the worker",
    )
    assert fake.open_connections() <= 256  # the idle pool's bound, not one per abandoned stream


def test_no_grace_turns_resumes_off_and_a_stop_still_works(
    tmp_path_factory: pytest.TempPathFactory, fake: FakeUpstream
) -> None:
    off = serve(tmp_path_factory.mktemp("off"), fake, STREAM_GRACE_S="0")
    try:
        fake.behave("openai", deltas=DELTAS * 3, chunk_interval_s=0.2)
        reader, chat_id = begin(off)
        with reader.sock:
            status, _, body = request(off, "GET", f"/api/chat/stream/{chat_id}")
            assert status == 404 and body["error"]["code"] == "stream_not_found"  # nothing is kept
            assert request(off, "POST", f"/api/chat/stream/{chat_id}/stop")[2] == {"stopped": True}
            end = check_rest(reader.read_rest(), 1)
        assert json.loads(end.data)["finish_reason"] == "cancelled"
        assert gone_after(fake, 5)["client_gone"]
        assert runtime(off)["kept_streams"] == 0
    finally:
        stop_server(off)


def test_a_resume_gets_heartbeats_and_costs_no_quota(
    tmp_path_factory: pytest.TempPathFactory, fake: FakeUpstream
) -> None:
    tight = serve(tmp_path_factory.mktemp("tight"), fake, RATELIMIT_PER_MINUTE="2")
    try:
        fake.behave("openai", deltas=["slow ", "words"], chunk_interval_s=1.6)  # silent > a heartbeat
        reader, chat_id = begin(tight)
        reader.sock.close()
        resumes = [resume_stream(tight, chat_id) for _ in range(3)]
        for r in resumes[1:]:
            with r.sock:
                assert r.read_head()[0] == 200
        with resumes[0].sock:
            assert resumes[0].read_head()[0] == 200
            items = resumes[0].read_rest()
        assert ("comment", "ping") in [(i.kind, i.name) for i in items]
        assert delta_text(items) == "slow words" and events(items)[-1].name == "done"
        status, _, body = request(tight, "GET", "/api/rate-limit")
        assert status == 200 and body["remaining"]["per_minute"] == 1  # the one POST only
    finally:
        stop_server(tight)
