"""Rate-limit costs, measured in one run (issue: limits that hold everywhere).

- `redis-check`: the cost a Redis-backed check adds to an admitted request, as the difference
  between the medians of the Redis backend's `hit` and the memory backend's `hit`, each timed one
  check at a time and driven the same way (a real `redis-server` on loopback, started here); the
  table shows rounds of 100 checks besides.
- `flood`: 10,000 requests from one over-limit key; how many reached Redis (INFO commandstats).
- `limiter-vs-limits`: native limiter checks against the `limits` library's moving-window and
  sliding-window strategies in memory, one window and three windows.

Run: make bench (or pytest benches --benchmark-only). Benches measure; they assert no times.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import time
from collections.abc import Iterator

import pytest
import uvloop
from limits import RateLimitItemPerDay, RateLimitItemPerHour, RateLimitItemPerMinute, storage, strategies

from pwachat._native import RateLimiter
from pwachat.ratelimit import MemoryBackend
from pwachat.redis_limiter import RedisBackend
from pwachat.settings import Settings
from redis_server import RedisServer

WINDOWS = [(10, 60), (100, 3600), (500, 86400)]
ITEMS = [RateLimitItemPerMinute(10), RateLimitItemPerHour(100), RateLimitItemPerDay(500)]


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    srv = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    # The event loop the server runs on (Granian picks uvloop when it is installed).
    loop = uvloop.new_event_loop()
    yield loop
    loop.close()


def _settings(redis_url: str = "memory://") -> Settings:
    # High limits so that every measured request is admitted (the path that pays the round trip).
    return Settings.from_mapping(
        {
            "REDIS_URL": redis_url,
            "RATELIMIT_PER_MINUTE": "1000000000",
            "RATELIMIT_PER_HOUR": "1000000000",
            "RATELIMIT_PER_DAY": "1000000000",
        }
    )


BATCH = 100
SINGLES = 5000
#: Per-check medians of this run, by backend, for the added-cost line.
MEDIANS: dict[str, float] = {}


def _bench_hits(benchmark, loop: asyncio.AbstractEventLoop, backend) -> None:  # type: ignore[no-untyped-def]
    """Two measures of an admitted check, inside the running loop (so the loop's own start-up is
    not measured):
    - the table: rounds of BATCH sequential checks (divide by 100 for one check; a round's mean
      carries every stall of the shared machine within it);
    - the printed line: SINGLES checks timed one by one, and their median: the issue's "median"
      cost of one check, which the batch means overstate on a noisy machine."""
    loop.run_until_complete(backend.start())
    keys = itertools.cycle([f"ip:198.51.100.{i}" for i in range(64)])

    async def batch() -> None:
        for _ in range(BATCH):
            assert (await backend.hit(next(keys))).allowed

    async def singles() -> list[int]:
        clock = time.perf_counter_ns
        times = []
        for _ in range(SINGLES):
            key = next(keys)
            start = clock()
            decision = await backend.hit(key)
            times.append(clock() - start)
            assert decision.allowed
        return times

    benchmark.pedantic(lambda: loop.run_until_complete(batch()), rounds=60, iterations=1, warmup_rounds=5)
    times = sorted(loop.run_until_complete(singles()))
    median = times[len(times) // 2] / 1000
    name = type(backend).__name__
    MEDIANS[name] = median
    benchmark.extra_info.update(
        single_check_median_us=median, single_check_p90_us=times[len(times) * 9 // 10] / 1000
    )
    batches = ""
    if benchmark.stats is not None:  # None under --benchmark-disable
        batches = f"; batches of {BATCH}: {benchmark.stats.stats.median / BATCH * 1e6:.1f} us a check"
    print(
        f"\n{name}: one admitted check, median of {SINGLES} timed one by one: {median:.1f} us "
        f"(p10 {times[len(times) // 10] / 1000:.1f}, p90 {times[len(times) * 9 // 10] / 1000:.1f}){batches}"
    )
    if "MemoryBackend" in MEDIANS and "RedisBackend" in MEDIANS:
        added = MEDIANS["RedisBackend"] - MEDIANS["MemoryBackend"]
        print(f"cost Redis adds to an admitted check (median): {added:.1f} us (target < 150 us)")
    loop.run_until_complete(backend.aclose())


@pytest.mark.benchmark(group="redis-check")
def test_admitted_check_memory(benchmark, loop) -> None:  # type: ignore[no-untyped-def]
    _bench_hits(benchmark, loop, MemoryBackend(_settings()))


@pytest.mark.benchmark(group="redis-check")
def test_admitted_check_redis(benchmark, loop, redis: RedisServer) -> None:  # type: ignore[no-untyped-def]
    backend = RedisBackend(_settings(redis.url))
    _bench_hits(benchmark, loop, backend)
    # The floor on this machine, same run: the same EVALSHA (and a PING) from a blocking socket,
    # no event loop, no Python client: what the round trip and the script cost by themselves.
    head, tail = backend._consume
    with socket.create_connection(("127.0.0.1", redis.port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for name, command in (
            ("PING", b"*1\r\n$4\r\nPING\r\n"),
            ("EVALSHA", head + b"$19\r\npwachat:rl:ip:floor\r\n" + tail),
        ):
            times = []
            for _ in range(SINGLES):
                start = time.perf_counter_ns()
                sock.sendall(command)
                sock.recv(4096)
                times.append(time.perf_counter_ns() - start)
            times.sort()
            print(f"floor: {name} from a blocking socket, median {times[len(times) // 2] / 1000:.1f} us")


@pytest.mark.benchmark(group="flood")
def test_flood_from_one_over_limit_key(benchmark, loop, redis: RedisServer) -> None:  # type: ignore[no-untyped-def]
    settings = Settings.from_mapping({"REDIS_URL": redis.url, "RATELIMIT_PER_MINUTE": "20"})
    backend = RedisBackend(settings)
    loop.run_until_complete(backend.start())

    async def flood() -> tuple[int, int]:
        admitted = refused = 0
        for _ in range(10_000):
            if (await backend.hit("ip:203.0.113.66")).allowed:
                admitted += 1
            else:
                refused += 1
        return admitted, refused

    before = redis.evalsha_calls()
    admitted, refused = benchmark.pedantic(lambda: loop.run_until_complete(flood()), rounds=1, iterations=1)
    trips = redis.evalsha_calls() - before
    loop.run_until_complete(backend.aclose())
    # Every admission takes a round trip; a refusal takes one only if the local limiter did not
    # know yet (it learns from the admission's answer).
    refused_locally = refused - max(0, trips - admitted)
    benchmark.extra_info.update(admitted=admitted, refused=refused, redis_round_trips=trips)
    print(
        f"\nflood: 10000 requests, {admitted} admitted, {refused} refused, {trips} Redis round trips; "
        f"refused without a round trip: {refused_locally} of {refused} ({refused_locally / refused:.2%}); "
        f"requests without a round trip: {10_000 - trips} ({(10_000 - trips) / 10_000:.2%})"
    )


def _cycle_keys() -> Iterator[str]:
    # Enough distinct callers that nearly every check is admitted and counted: the full path on
    # both sides (a refusal is cheaper for both).
    return itertools.cycle([f"ip:{i}" for i in range(500_000)])


def _limits(strategy: str) -> strategies.RateLimiter:
    store = storage.MemoryStorage()
    if strategy == "moving":
        return strategies.MovingWindowRateLimiter(store)
    return strategies.SlidingWindowCounterRateLimiter(store)


#: Callers seen before the measurement: the native limiter is then full (its default cap) and
#: evicts one key per new caller, as a busy server's does; `limits` holds as many.
PREFILL = 100_000


def _checks_per_second(benchmark, check) -> None:  # type: ignore[no-untyped-def]
    """Checks of new callers run back to back, 100 per timed round: the table's times are per
    check, with the timer's own cost (about 100 ns a reading here) spread over the 100 instead of
    added to each. Both sides first see PREFILL callers, so that neither is measured growing."""
    for _ in range(PREFILL):
        check()
    benchmark.pedantic(check, iterations=100, rounds=300, warmup_rounds=3)


@pytest.mark.benchmark(group="limiter-vs-limits-3-windows")
def test_native_three_windows(benchmark) -> None:  # type: ignore[no-untyped-def]
    limiter = RateLimiter(WINDOWS)
    keys = _cycle_keys()
    _checks_per_second(benchmark, lambda: limiter.check(next(keys)))


@pytest.mark.benchmark(group="limiter-vs-limits-3-windows")
@pytest.mark.parametrize("strategy", ["moving", "sliding"])
def test_limits_three_windows(benchmark, strategy: str) -> None:  # type: ignore[no-untyped-def]
    limiter = _limits(strategy)
    keys = _cycle_keys()

    def check() -> bool:
        # Admitted only when all three have room, as the contract asks (limits has no atomic
        # multi-window hit, so test all, then hit all).
        key = next(keys)
        if all(limiter.test(item, key) for item in ITEMS):
            return all([limiter.hit(item, key) for item in ITEMS])
        return False

    _checks_per_second(benchmark, check)


@pytest.mark.benchmark(group="limiter-vs-limits-1-window")
def test_native_one_window(benchmark) -> None:  # type: ignore[no-untyped-def]
    limiter = RateLimiter(WINDOWS[:1])
    keys = _cycle_keys()
    _checks_per_second(benchmark, lambda: limiter.check(next(keys)))


@pytest.mark.benchmark(group="limiter-vs-limits-1-window")
@pytest.mark.parametrize("strategy", ["moving", "sliding"])
def test_limits_one_window(benchmark, strategy: str) -> None:  # type: ignore[no-untyped-def]
    limiter = _limits(strategy)
    keys = _cycle_keys()
    _checks_per_second(benchmark, lambda: limiter.hit(ITEMS[0], next(keys)))


def _budget_settings(redis_url: str, global_budget: bool) -> Settings:
    return Settings.from_mapping(
        {
            "REDIS_URL": redis_url,
            "RATELIMIT_PER_MINUTE": "1000000000",
            "RATELIMIT_PER_HOUR": "1000000000",
            "RATELIMIT_PER_DAY": "1000000000",
            "TOKENS_PER_DAY": "1000000000000",
            "TOKENS_GLOBAL_PER_DAY": "1000000000000000" if global_budget else "0",
        }
    )


@pytest.mark.parametrize("global_budget", [False, True], ids=["caller", "caller+global"])
def test_budget_redis_cost(loop, redis: RedisServer, global_budget: bool) -> None:  # type: ignore[no-untyped-def]
    """Issue #14's budget: what Redis adds per admitted request with budgets on (the admission,
    reserving 1,050 tokens, and its settle to 30, the settles' batches included) against what it
    adds to the request limit check alone (budgets off: `hit`), each as Redis minus memory://
    driven the same way, in one run: rounds of 200 requests, the four kinds interleaved, medians of
    the rounds' means (a round's mean carries the batched settles' share). Two measures: this
    process's CPU per request (what a server core pays; redis-server's own CPU is not in it) and
    the wall time per sequential request (the round trip's latency included)."""
    backends = {
        "off memory": MemoryBackend(_settings()),
        "off redis": RedisBackend(_settings(redis.url)),
        "on memory": MemoryBackend(_budget_settings("memory://", global_budget)),
        "on redis": RedisBackend(_budget_settings(redis.url, global_budget)),
    }
    for backend in backends.values():
        loop.run_until_complete(backend.start())
    keys = itertools.cycle([f"ip:198.51.100.{i}" for i in range(64)])

    async def round_of(name: str, n: int = 200) -> tuple[float, float]:
        backend = backends[name]
        wall, cpu = time.perf_counter_ns(), time.process_time_ns()
        if name.startswith("off"):
            for _ in range(n):
                assert (await backend.hit(next(keys))).allowed
        else:
            for _ in range(n):
                admission = await backend.admit(next(keys), 1050)
                assert admission.allowed and admission.ticket is not None
                backend.settle(admission.ticket, 30)
        return (time.process_time_ns() - cpu) / n / 1000, (time.perf_counter_ns() - wall) / n / 1000

    rounds: dict[str, list[tuple[float, float]]] = {name: [] for name in backends}
    for i in range(100):
        order = list(backends) if i % 2 == 0 else list(reversed(backends))
        for name in order:
            rounds[name].append(loop.run_until_complete(round_of(name)))
    what = "caller and global" if global_budget else "caller"
    for index, measure in ((0, "CPU"), (1, "wall time")):
        med = {name: sorted(r[index] for r in v)[len(v) // 2] for name, v in rounds.items()}
        off = med["off redis"] - med["off memory"]
        on = med["on redis"] - med["on memory"]
        print(
            f"\n{measure} per admitted request (median of 100 rounds' means): "
            + ", ".join(f"{name} {value:.1f} us" for name, value in med.items())
            + f"\n  Redis's {measure}: limits alone {off:.1f} us, with budgets ({what}) {on:.1f} us: "
            f"ratio {on / off:.3f} (budget <= 1.10)"
        )
    for backend in backends.values():
        loop.run_until_complete(backend.aclose())
