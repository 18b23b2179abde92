"""Redis outages and recoveries, against real `redis-server` processes (issue 9, item 7).

The backend is driven directly on an event loop of the test's own where the test needs to watch the
loop (replay, stalls); through the app where what matters is what a caller and an operator see.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from pwachat.redis_limiter import RedisBackend
from pwachat.settings import Settings
from redis_server import RedisServer
from server import free_port

MSG = {"message": "hello"}

# The sum, over every caller's hash, of the counts of one window's buckets (fields "<window_ms>:<n>").
SUM_LUA = """
local total = 0
for _, k in ipairs(redis.call('KEYS', 'pwachat:rl:*')) do
  local f = redis.call('HGETALL', k)
  for i = 1, #f, 2 do
    if string.sub(f[i], 1, #ARGV[1]) == ARGV[1] then total = total + tonumber(f[i + 1]) end
  end
end
return total
"""


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    srv = RedisServer(tmp_path).start()
    yield srv
    srv.stop()


def settings(url: str, **env: str) -> Settings:
    return Settings.from_mapping({"LOG_FILE": "", "REDIS_URL": url, **env})


def counted(srv: RedisServer) -> dict[int, int]:
    """What Redis holds for all callers together, per window (seconds -> admissions)."""
    return {w: int(srv.command("EVAL", SUM_LUA, "0", f"{w * 1000}:")) for w in (60, 3600, 86400)}  # type: ignore[arg-type]


def errors_of(srv: RedisServer, kind: str) -> int:
    """How many `kind` error replies (READONLY, OOM, ...) the server has sent (INFO errorstats)."""
    for line in str(srv.command("INFO", "errorstats")).splitlines():
        if line.startswith(f"errorstat_{kind}:"):
            return int(line.split("count=")[1].split(",")[0])
    return 0


def events(caplog: pytest.LogCaptureFixture) -> list[str | None]:
    return [getattr(r, "event", None) for r in caplog.records]


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.05):
    """Poll `predicate` until it returns something truthy, or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(interval)


def stall(seconds: float) -> None:
    """Keep the running event loop busy, as a flood of requests does (not a wait for anything)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def chat(client):
    return client.post("/api/chat", json=MSG)


def health(client) -> str:
    return client.get("/api/health").json()["rate_limit"]["redis"]


class LossyProxy:
    """A TCP proxy to Redis on loopback that loses the answers on the first connection whose
    commands carry `marker`: Redis runs those commands, their sender never hears back (as when a
    reply is lost or comes too late). Everything else passes both ways untouched."""

    def __init__(self, port: int, upstream: int, marker: bytes) -> None:
        self.upstream = upstream
        self.marker = marker
        self.lost = 0
        self._armed = True
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", port))
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream))
            self._socks += [client, upstream]
            lose = threading.Event()
            threading.Thread(target=self._requests, args=(client, upstream, lose), daemon=True).start()
            threading.Thread(target=self._replies, args=(upstream, client, lose), daemon=True).start()

    def _requests(self, src: socket.socket, dst: socket.socket, lose: threading.Event) -> None:
        tail = b""
        try:
            while data := src.recv(65536):
                with self._lock:
                    if self._armed and self.marker in tail + data:
                        self._armed = False
                        self.lost += 1
                        lose.set()
                tail = data[-len(self.marker) :]
                dst.sendall(data)
        except OSError:
            pass
        finally:
            _shut(dst)
            _shut(src)

    def _replies(self, src: socket.socket, dst: socket.socket, lose: threading.Event) -> None:
        try:
            while data := src.recv(65536):
                if not lose.is_set():
                    dst.sendall(data)
        except OSError:
            pass
        finally:
            _shut(dst)

    def close(self) -> None:
        self._listener.close()
        for s in self._socks:
            _shut(s)
            s.close()


def _shut(s: socket.socket) -> None:
    with contextlib.suppress(OSError):
        s.shutdown(socket.SHUT_RDWR)


# -- replaying what was admitted during an outage ------------------------------------------------


def test_a_long_outage_is_replayed_in_batches_without_stalling_the_loop(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # 190k callers admitted while Redis was down: near the most a process remembers (200k; the
    # room left is for what is admitted while the replay runs). Their replay must neither hold the
    # event loop for long (requests keep being served while it runs) nor count anything twice, and
    # must end: the process goes back to global limiting.
    n = 190_000
    port = free_port()
    srv = RedisServer(tmp_path, port=port)

    async def scenario() -> tuple[int, int]:
        backend = RedisBackend(settings(f"redis://127.0.0.1:{port}/0"), max_keys=n + 10_000)
        await backend.start()
        view: Redis | None = None
        try:
            assert await backend.redis_state() == "unavailable"
            for i in range(n):
                assert (await backend.hit(f"ip:10.{i >> 16}.{(i >> 8) & 255}.{i & 255}")).allowed
            srv.start()  # on the port the backend keeps trying
            view = Redis.from_url(srv.url)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 60
            longest, sizes, last, during = 0.0, set(), loop.time(), 0
            # This coroutine is "the other requests": it must keep getting turns while the replay
            # runs (and its own admissions must be counted too), and it watches Redis's key count
            # grow batch by batch.
            while await backend.redis_state() != "ok":
                await asyncio.sleep(0.005)
                sizes.add(await view.dbsize())
                assert (await backend.hit(f"ip:172.16.{during >> 8}.{during & 255}")).allowed
                during += 1
                now = loop.time()
                longest = max(longest, now - last)
                last = now
                assert longest < 1.0, f"the event loop was held for {longest:.1f} s"
                assert now < deadline, "not back to global limiting"
            return during, len(sizes)
        finally:
            if view is not None:
                await view.aclose()
            await backend.aclose()

    try:
        with caplog.at_level(logging.WARNING, logger="pwachat.ratelimit"):
            during, steps = asyncio.run(scenario())
        # Every admission is in Redis exactly once, in every window, those made during the replay
        # included.
        total = n + during
        assert counted(srv) == {60: total, 3600: total, 86400: total}
    finally:
        srv.stop()
    assert steps >= 10, f"Redis's key count grew in {steps} steps: not replayed in batches"
    assert during >= 10  # requests were served while it ran
    assert events(caplog).count("redis_up") == 1


def test_a_replay_batch_whose_answer_is_lost_is_not_counted_twice(
    redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    # Redis applies a replay batch but its answer never arrives: the batch is sent again, and
    # Redis must not add it a second time.
    port = free_port()
    admitted = 0

    async def scenario() -> LossyProxy:
        nonlocal admitted
        backend = RedisBackend(settings(f"redis://127.0.0.1:{port}/0", RATELIMIT_PER_MINUTE="5"))
        await backend.start()  # nothing listens there yet: an outage from the start
        proxy: LossyProxy | None = None
        try:
            for i in range(40):
                for _ in range(3):
                    assert (await backend.hit(f"ip:198.51.100.{i}")).allowed
                    admitted += 1
            proxy = LossyProxy(port, redis.port, b"ip:198.51.100.")
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 20
            while await backend.redis_state() != "ok":
                assert loop.time() < deadline, "not back to global limiting"
                await asyncio.sleep(0.02)
            return proxy
        finally:
            await backend.aclose()
            if proxy is not None:
                proxy.close()

    with caplog.at_level(logging.WARNING, logger="pwachat.ratelimit"):
        proxy = asyncio.run(scenario())
    assert proxy.lost == 1  # the case under test did happen
    assert counted(redis) == {60: admitted, 3600: admitted, 86400: admitted}
    assert events(caplog).count("redis_up") == 1


def test_remembering_at_the_cap_costs_no_more_than_below_it(tmp_path: Path) -> None:
    # At the cap every new admission evicts the oldest remembered one; that must not scan them all.
    from pwachat.redis_limiter import MAX_PENDING

    dead = f"redis://127.0.0.1:{free_port()}/0"

    async def admissions(backend: RedisBackend, prefix: str, count: int) -> float:
        started = time.perf_counter()
        for i in range(count):
            await backend.hit(f"ip:{prefix}.{i >> 8}.{i & 255}")
        return time.perf_counter() - started

    async def scenario() -> tuple[float, float]:
        backend = RedisBackend(settings(dead), max_keys=MAX_PENDING + 10_000)
        await backend.start()
        try:
            # The best of several short runs: a run that another process preempted does not count.
            below = min([await admissions(backend, f"10.{r}", 100) for r in range(7)])
            await admissions(backend, "11", MAX_PENDING)  # now at the cap
            at_cap = min([await admissions(backend, f"12.{r}", 100) for r in range(7)])
            return below, at_cap
        finally:
            await backend.aclose()

    below, at_cap = asyncio.run(scenario())
    # Same run, same work but the eviction: a ratio, not a wall-clock bound (a scan is ~1000x).
    assert at_cap < 25 * below, f"{at_cap / below:.0f}x slower at the cap"


def test_past_the_cap_the_oldest_admissions_are_forgotten(tmp_path: Path) -> None:
    port = free_port()
    srv = RedisServer(tmp_path, port=port)

    async def scenario() -> None:
        backend = RedisBackend(settings(f"redis://127.0.0.1:{port}/0"), max_pending=100)
        await backend.start()
        try:
            for i in range(150):
                await backend.hit(f"ip:192.0.2.{i}")
            srv.start()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 20
            while await backend.redis_state() != "ok":
                assert loop.time() < deadline, "not back to global limiting"
                await asyncio.sleep(0.02)
        finally:
            await backend.aclose()

    try:
        asyncio.run(scenario())
        kept = {k.removeprefix("pwachat:rl:ip:192.0.2.") for k in srv.command("KEYS", "pwachat:rl:*")}  # type: ignore[union-attr]
        assert kept == {str(i) for i in range(50, 150)}
        assert counted(srv)[60] == 100
    finally:
        srv.stop()


# -- what may and may not mark Redis down ---------------------------------------------------------


def test_health_and_rate_limit_floods_through_a_stalled_loop_do_not_mark_redis_down(
    redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        backend = RedisBackend(settings(redis.url, RATELIMIT_PER_MINUTE="10"))
        await backend.start()
        try:
            assert (await backend.hit("ip:192.0.2.1")).allowed
            for _ in range(2):  # with the health state freshly known, then with it a second old
                flood = [asyncio.ensure_future(backend.redis_state()) for _ in range(50)]
                flood += [asyncio.ensure_future(backend.peek("ip:192.0.2.1")) for _ in range(50)]
                await asyncio.sleep(0)  # all of them are on their way to Redis (or answered)
                stall(1.5)  # the loop is busy past every deadline
                answers = await asyncio.gather(*flood)
                assert answers[:50] == ["ok"] * 50
                assert [d.remaining for d in answers[50:]] == [9] * 50
            assert await backend.redis_state() == "ok"
            before = redis.evalsha_calls()
            assert (await backend.hit("ip:192.0.2.1")).remaining == 8
            assert redis.evalsha_calls() == before + 1  # still asking Redis
        finally:
            await backend.aclose()

    with caplog.at_level(logging.INFO, logger="pwachat.ratelimit"):
        asyncio.run(scenario())
    assert events(caplog).count("redis_down") == 0


def test_a_connect_timeout_is_a_strike_not_an_outage(
    redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    # Two checks each open a new connection; the loop stalls past the connect timeout. That is two
    # timeouts (decided locally), not an outage: three in a row would be.
    async def scenario() -> None:
        backend = RedisBackend(settings(redis.url, RATELIMIT_PER_MINUTE="10"))
        await backend.start()
        try:
            checks = [asyncio.ensure_future(backend.hit(f"ip:192.0.2.{i}")) for i in range(2)]
            await asyncio.sleep(0)  # both are connecting
            stall(0.3)
            assert all(d.allowed for d in await asyncio.gather(*checks))
            assert await backend.redis_state() == "ok"
            before = redis.evalsha_calls()
            assert (await backend.hit("ip:192.0.2.9")).allowed
            assert redis.evalsha_calls() == before + 1
        finally:
            await backend.aclose()

    with caplog.at_level(logging.INFO, logger="pwachat.ratelimit"):
        asyncio.run(scenario())
    assert events(caplog).count("redis_timeout") == 2
    assert events(caplog).count("redis_down") == 0


def test_a_read_only_replica_is_an_outage_logged_once_until_promoted(
    make_client, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A failover left us on a replica: it answers, but refuses every write. That is an outage
    # (limits per process, degraded) for as long as it lasts, logged once: not up, then down again.
    primary = RedisServer(tmp_path).start()
    replica = RedisServer(tmp_path).start()
    try:
        replica.command("REPLICAOF", "127.0.0.1", str(primary.port))
        with caplog.at_level(logging.WARNING, logger="pwachat.ratelimit"):
            client = make_client(REDIS_URL=replica.url, RATELIMIT_PER_MINUTE="3")
            assert client.get("/api/health").json()["status"] == "degraded"
            assert health(client) == "unavailable"
            assert [chat(client).status_code for _ in range(5)] == [200, 200, 200, 429, 429]
            refused = errors_of(replica, "READONLY")
            # Until the reconnect loop has been refused a few times (or, wrongly, declared Redis back).
            wait_until(lambda: errors_of(replica, "READONLY") >= refused + 4 or health(client) == "ok")
            assert health(client) == "unavailable"
            replica.command("REPLICAOF", "NO", "ONE")
            wait_until(lambda: health(client) == "ok")
            assert counted(replica)[60] == 3  # the outage's admissions, replayed once
            assert client.get("/api/rate-limit").json()["remaining"]["per_minute"] == 0
        assert events(caplog).count("redis_down") == 1
        assert events(caplog).count("redis_up") == 1
    finally:
        replica.stop()
        primary.stop()


def test_a_redis_out_of_memory_is_an_outage_logged_once_until_it_has_room(
    make_client, redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    redis.command("CONFIG", "SET", "maxmemory-policy", "noeviction")
    redis.command("CONFIG", "SET", "maxmemory", "1")
    with caplog.at_level(logging.WARNING, logger="pwachat.ratelimit"):
        client = make_client(REDIS_URL=redis.url, RATELIMIT_PER_MINUTE="3")
        assert health(client) == "unavailable"
        assert [chat(client).status_code for _ in range(5)] == [200, 200, 200, 429, 429]
        refused = errors_of(redis, "OOM")
        # Until the reconnect loop has been refused a few times (or, wrongly, declared Redis back).
        wait_until(lambda: errors_of(redis, "OOM") >= refused + 4 or health(client) == "ok")
        assert health(client) == "unavailable"
        redis.command("CONFIG", "SET", "maxmemory", "0")
        wait_until(lambda: health(client) == "ok")
        assert counted(redis)[60] == 3
    assert events(caplog).count("redis_down") == 1
    assert events(caplog).count("redis_up") == 1


def test_redis_coming_back_as_a_replica_is_not_a_recovery(
    make_client, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Killed, then back on the same port as a replica, with nothing admitted in between: answering
    # is not enough to resume global limiting, accepting writes is.
    primary = RedisServer(tmp_path).start()
    srv = RedisServer(tmp_path).start()
    try:
        with caplog.at_level(logging.WARNING, logger="pwachat.ratelimit"):
            client = make_client(REDIS_URL=srv.url, RATELIMIT_PER_MINUTE="3")
            assert chat(client).status_code == 200
            srv.kill()
            wait_until(lambda: health(client) == "unavailable")
            srv.start("--replicaof", "127.0.0.1", str(primary.port))  # a replica from its first answer
            refused = errors_of(srv, "READONLY")
            # Until the reconnect loop has been refused a few times (or, wrongly, declared Redis back).
            wait_until(lambda: errors_of(srv, "READONLY") >= refused + 4 or health(client) == "ok")
            assert health(client) == "unavailable"
            assert [chat(client).status_code for _ in range(4)] == [200, 200, 429, 429]
        assert events(caplog).count("redis_up") == 0
        assert events(caplog).count("redis_down") == 1
    finally:
        srv.stop()
        primary.stop()
