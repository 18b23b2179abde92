"""Resumable streams across instances (contract, "Resumable streams", with `REDIS_URL`): two real
server processes sharing a real redis-server and the fake upstream. A stream started on one is
resumed and stopped on the other; Redis dying mid-stream never breaks the live reader; keys
always carry a TTL and abandoned streams leave none behind."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
import redis as redis_py

from fake_upstream import FakeUpstream
from redis_server import RedisServer
from server import Server, poll, start_server, stop_server
from sse_client import Item, begin, delta_text, events, resume_stream

OPENAI_KEY = "sk-test-resume-redis"
DELTAS = [f"r{i} " for i in range(12)]
GRACE_S = 1.5
RETAIN_S = 3


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeUpstream]:
    with FakeUpstream(OPENAI_KEY, "sk-ant-unused") as upstream:
        yield upstream


@pytest.fixture(autouse=True)
def _fresh_fake(fake: FakeUpstream) -> Iterator[None]:
    fake.reset()
    yield
    fake.reset()


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def pair(
    tmp_path_factory: pytest.TempPathFactory, fake: FakeUpstream, redis: RedisServer
) -> Iterator[tuple[Server, Server]]:
    env = {
        "REDIS_URL": redis.url,
        "OPENAI_API_KEY": OPENAI_KEY,
        "OPENAI_BASE_URL": fake.openai_base_url,
        "UPSTREAM_MAX_RETRIES": "0",
        "SSE_HEARTBEAT_S": "0.5",
        "STREAM_GRACE_S": str(GRACE_S),
        "STREAM_RETAIN_S": str(RETAIN_S),
        "RATELIMIT_PER_MINUTE": "100000",
        "RATELIMIT_PER_HOUR": "100000",
        "RATELIMIT_PER_DAY": "100000",
        "TOKENS_PER_DAY": "0",  # hundreds of streams from one caller (budgets: test_e2e_budgets*.py)
    }
    servers = [start_server(tmp_path_factory.mktemp(name), **env) for name in ("a", "b")]
    try:
        yield servers[0], servers[1]
    finally:
        for server in servers:
            stop_server(server)


@pytest.fixture
def client(redis: RedisServer) -> Iterator[redis_py.Redis]:
    conn = redis_py.Redis.from_url(redis.url)
    yield conn
    conn.close()


def rest_ids(items: list[Item]) -> list[int]:
    return [int(e.id) for e in events(items)]


def stream_keys(conn: redis_py.Redis) -> list[bytes]:
    return list(conn.scan_iter(match="pwachat:st:*"))


def test_started_on_one_instance_resumed_on_the_other(
    pair: tuple[Server, Server], fake: FakeUpstream
) -> None:
    a, b = pair
    fake.behave("openai", deltas=DELTAS, chunk_interval_s=0.15)
    reader, chat_id = begin(a)
    first = events(reader.read_events(3))
    reader.sock.close()
    again = resume_stream(b, chat_id, "Last-Event-ID: 3\r\n")
    with again.sock:
        assert again.read_head()[0] == 200
        rest = again.read_rest()
    ids = rest_ids(rest)
    assert ids == list(range(4, 4 + len(ids))), ids
    assert events(rest)[-1].name == "done"
    assert delta_text(first) + delta_text(rest) == "".join(DELTAS)
    recs = fake.requests()
    assert len(recs) == 1 and recs[0]["completed"] and not recs[0]["client_gone"], recs
    # After its end, from the start, on the other instance: every event, the same bytes.
    full = resume_stream(b, chat_id)
    with full.sock:
        full.read_head()
        full.read_rest()
    local = resume_stream(a, chat_id)
    with local.sock:
        local.read_head()
        local.read_rest()
    assert full.body == local.body


def test_stopped_on_the_other_instance_every_reader_sees_cancelled(
    pair: tuple[Server, Server], fake: FakeUpstream
) -> None:
    a, b = pair
    fake.behave("openai", deltas=DELTAS * 4, chunk_interval_s=0.2)
    reader, chat_id = begin(a)
    remote = resume_stream(b, chat_id)
    with reader.sock, remote.sock:
        assert remote.read_head()[0] == 200
        events(remote.read_events(2))
        stopped_at = time.monotonic()
        status, _, body = b.request("POST", f"/api/chat/stream/{chat_id}/stop")
        assert status == 200 and json.loads(body) == {"stopped": True}
        ends = [events(r.read_rest())[-1] for r in (reader, remote)]
    for end in ends:
        assert end.name == "done" and json.loads(end.data)["finish_reason"] == "cancelled"
    rec = fake.wait_for(lambda rs: rs and rs[0]["finished_at"] is not None and rs[0], timeout=5)
    assert rec["client_gone"] and rec["gone_at"] - stopped_at <= 1.0, rec["gone_at"] - stopped_at
    assert json.loads(b.request("POST", f"/api/chat/stream/{chat_id}/stop")[2]) == {"stopped": False}
    assert json.loads(a.request("POST", f"/api/chat/stream/{chat_id}/stop")[2]) == {"stopped": False}


def test_a_stop_whose_message_is_missed_still_stops_the_stream(
    pair: tuple[Server, Server], fake: FakeUpstream, client: redis_py.Redis
) -> None:
    a, b = pair
    fake.behave("openai", deltas=DELTAS * 4, chunk_interval_s=0.1)
    reader, chat_id = begin(a)
    with reader.sock:
        events(reader.read_events(2))
        # Every subscriber's connection cut: the generating worker reconnects 0.5 s later, so the
        # stop's message, published now, reaches nobody.
        assert client.client_kill_filter(_type="pubsub") >= 2
        stopped_at = time.monotonic()
        assert json.loads(b.request("POST", f"/api/chat/stream/{chat_id}/stop")[2]) == {"stopped": True}
        end = events(reader.read_rest())[-1]
    assert end.name == "done" and json.loads(end.data)["finish_reason"] == "cancelled"
    rec = fake.wait_for(lambda rs: rs and rs[0]["finished_at"] is not None and rs[0], timeout=5)
    assert rec["client_gone"] and rec["gone_at"] - stopped_at <= 0.45, rec["gone_at"] - stopped_at


def test_a_reader_on_the_other_instance_keeps_the_grace_from_expiring(
    pair: tuple[Server, Server], fake: FakeUpstream
) -> None:
    a, b = pair
    fake.behave("openai", deltas=DELTAS * 4, chunk_interval_s=0.1)  # ~5 s: past the grace
    reader, chat_id = begin(a)
    first = events(reader.read_events(1))
    reader.sock.close()
    remote = resume_stream(b, chat_id, f"Last-Event-ID: {first[-1].id}\r\n")
    with remote.sock:
        remote.read_head()
        rest = remote.read_rest()
    assert events(rest)[-1].name == "done" and json.loads(events(rest)[-1].data)["finish_reason"] == "stop"
    assert delta_text(first) + delta_text(rest) == "".join(DELTAS * 4)
    rec = fake.requests()[0]
    assert rec["completed"] and not rec["client_gone"]


def test_every_key_has_a_ttl_and_an_ended_stream_keeps_only_its_retention(
    pair: tuple[Server, Server], fake: FakeUpstream, client: redis_py.Redis
) -> None:
    a, _ = pair
    fake.behave("openai", deltas=DELTAS, chunk_interval_s=0.1)
    reader, chat_id = begin(a)
    with reader.sock:
        events(reader.read_events(3))
        key = poll(lambda: [k for k in stream_keys(client) if chat_id.encode() in k], 5, "the stream's key")[
            0
        ]
        assert client.ttl(key) > RETAIN_S  # while it runs: longer than the retention
        entries = client.xrange(key)
        assert entries[0][1][b"f"] == b"0" and b"o" in entries[0][1]  # from `start`, with its owner
        assert b"chat text" not in b"".join(entries[0][1].values())
        reader.read_rest()
    poll(lambda: 0 < client.ttl(key) <= RETAIN_S, 5, "the retention as its TTL once ended")
    assert all(client.ttl(k) != -1 for k in stream_keys(client))  # -1: no expiry (-2: just gone)


def test_redis_killed_mid_stream_the_live_reader_finishes(
    pair: tuple[Server, Server], fake: FakeUpstream, redis: RedisServer
) -> None:
    a, b = pair
    fake.behave("openai", deltas=DELTAS, chunk_interval_s=0.15)
    reader, chat_id = begin(a)
    with reader.sock:
        first = events(reader.read_events(2))
        redis.kill()
        try:
            rest = reader.read_rest()
            assert events(rest)[-1].name == "done", rest
            assert delta_text(first) + delta_text(rest) == "".join(DELTAS)
            # Its own instance still has it; the other cannot see it while Redis is down.
            local = resume_stream(a, chat_id, "Last-Event-ID: 2\r\n")
            with local.sock:
                assert local.read_head()[0] == 200
                assert delta_text(local.read_rest()) == "".join(DELTAS)[len(delta_text(first)) :]
            assert b.request("GET", f"/api/chat/stream/{chat_id}")[0] == 404
        finally:
            redis.start()
    assert "Traceback" not in a.output() and "Traceback" not in b.output()
    # Back: a new stream is resumable across instances again.
    fake.reset()
    fake.behave("openai", deltas=DELTAS[:4], chunk_interval_s=0.05)

    def resumable_elsewhere() -> bool:
        reader, chat_id = begin(a)
        with reader.sock:
            reader.read_rest()
        return b.request("GET", f"/api/chat/stream/{chat_id}", headers={"Last-Event-ID": "0"})[0] == 200

    poll(resumable_elsewhere, 10, "cross-instance resume back once Redis is", interval=0.5)


def test_200_abandoned_streams_leave_no_key_task_or_connection(
    pair: tuple[Server, Server], fake: FakeUpstream, client: redis_py.Redis
) -> None:
    a, _ = pair
    fake.behave("openai", deltas=DELTAS * 20, chunk_interval_s=0.05)

    def runtime() -> dict:
        return json.loads(a.request("GET", "/api/health")[2])["runtime"]

    def connections() -> int:
        return len(client.client_list())

    poll(lambda: runtime()["open_streams"] == 0, 10, "a quiet instance")
    before, conns = runtime(), connections()
    for _ in range(2):
        readers = [begin(a)[0] for _ in range(100)]
        for r in readers:
            r.sock.close()
    poll(
        lambda: sum(r["client_gone"] for r in fake.requests()) == 200, 30, "every abandoned request cancelled"
    )
    assert all(client.ttl(k) != -1 for k in stream_keys(client))  # -1: no expiry (-2: just gone)
    poll(
        lambda: (
            (now := runtime())["open_streams"] == 0
            and now["tasks"] <= before["tasks"]
            and now["kept_streams"] == 0
        ),
        15,
        "no stream, task or log left in the worker",
    )
    poll(lambda: not stream_keys(client), RETAIN_S + 5, "every stream key expired after its retention")
    # The lookups' bounded pool (8) at most, and a few more limit-check connections when checks
    # overlapped (kept idle for reuse): never one per stream (200).
    assert connections() <= conns + 8 + 8


def test_a_stream_ended_by_a_restart_stays_readable_on_another_instance(
    tmp_path_factory: pytest.TempPathFactory,
    pair: tuple[Server, Server],
    fake: FakeUpstream,
    redis: RedisServer,
) -> None:
    _, b = pair
    leaving = start_server(
        tmp_path_factory.mktemp("leaving"),
        REDIS_URL=redis.url,
        OPENAI_API_KEY=OPENAI_KEY,
        OPENAI_BASE_URL=fake.openai_base_url,
        UPSTREAM_MAX_RETRIES="0",
        SSE_HEARTBEAT_S="0.5",
        SHUTDOWN_GRACE_S="1",
        RATELIMIT_PER_MINUTE="100000",  # the same caller as every other test here, in the same Redis
        RATELIMIT_PER_HOUR="100000",
        RATELIMIT_PER_DAY="100000",
    )
    try:
        fake.behave("openai", deltas=DELTAS * 10, chunk_interval_s=0.1)  # far longer than the grace
        reader, chat_id = begin(leaving)
        with reader.sock:
            first = events(reader.read_events(2))
            leaving.proc.terminate()  # SIGTERM: the drain
            rest = reader.read_rest()
        end = events(rest)[-1]
        assert end.name == "error" and json.loads(end.data)["error"]["code"] == "shutting_down"
        leaving.proc.wait(timeout=15)
    finally:
        stop_server(leaving)
    again = resume_stream(b, chat_id, f"Last-Event-ID: {first[-1].id}\r\n")
    with again.sock:
        assert again.read_head()[0] == 200
        replay = again.read_rest()
    assert [e.id for e in events(replay)] == [e.id for e in events(rest)]
    assert events(replay)[-1].name == "error" and delta_text(replay) == delta_text(rest)
