"""Rate-limit costs, measured in one run (issue: limits that hold everywhere).

- `redis-check`: the cost a Redis-backed check adds to an admitted request, as the difference
  between the Redis backend's `hit` and the memory backend's `hit` driven the same way (a real
  `redis-server` on loopback, started here).
- `flood`: 10,000 requests from one over-limit key; how many reached Redis (INFO commandstats).
- `limiter-vs-limits`: native limiter checks against the `limits` library's moving-window and
  sliding-window strategies in memory, one window and three windows.

Run: make bench (or pytest benches --benchmark-only). Benches measure; they assert no times.
"""

from __future__ import annotations

import asyncio
import itertools
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


def _bench_hits(benchmark, loop: asyncio.AbstractEventLoop, backend) -> None:  # type: ignore[no-untyped-def]
    """Rounds of BATCH sequential admitted checks inside the running loop (so the loop's own start-up
    is not measured); the table's times are per round: divide by 100 for one check."""
    loop.run_until_complete(backend.start())
    keys = itertools.cycle([f"ip:198.51.100.{i}" for i in range(64)])

    async def batch() -> None:
        for _ in range(BATCH):
            assert (await backend.hit(next(keys))).allowed

    benchmark.pedantic(lambda: loop.run_until_complete(batch()), rounds=60, iterations=1, warmup_rounds=5)
    per_check = benchmark.stats.stats.median / BATCH * 1e6
    print(f"\n{type(backend).__name__}: {per_check:.1f} us per admitted check (median)")
    loop.run_until_complete(backend.aclose())


@pytest.mark.benchmark(group="redis-check")
def test_admitted_check_memory(benchmark, loop) -> None:  # type: ignore[no-untyped-def]
    _bench_hits(benchmark, loop, MemoryBackend(_settings()))


@pytest.mark.benchmark(group="redis-check")
def test_admitted_check_redis(benchmark, loop, redis: RedisServer) -> None:  # type: ignore[no-untyped-def]
    _bench_hits(benchmark, loop, RedisBackend(_settings(redis.url)))


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
    local = 10_000 - trips
    benchmark.extra_info.update(admitted=admitted, refused=refused, redis_round_trips=trips)
    print(
        f"\nflood: 10000 requests, {admitted} admitted, {refused} refused, {trips} Redis round trips; "
        f"refused without a round trip: {local - admitted} of {refused} ({(local - admitted) / refused:.2%})"
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


@pytest.mark.benchmark(group="limiter-vs-limits-3-windows")
def test_native_three_windows(benchmark) -> None:  # type: ignore[no-untyped-def]
    limiter = RateLimiter(WINDOWS)
    keys = _cycle_keys()
    benchmark(lambda: limiter.check(next(keys)))


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

    benchmark(check)


@pytest.mark.benchmark(group="limiter-vs-limits-1-window")
def test_native_one_window(benchmark) -> None:  # type: ignore[no-untyped-def]
    limiter = RateLimiter(WINDOWS[:1])
    keys = _cycle_keys()
    benchmark(lambda: limiter.check(next(keys)))


@pytest.mark.benchmark(group="limiter-vs-limits-1-window")
@pytest.mark.parametrize("strategy", ["moving", "sliding"])
def test_limits_one_window(benchmark, strategy: str) -> None:  # type: ignore[no-untyped-def]
    limiter = _limits(strategy)
    keys = _cycle_keys()
    benchmark(lambda: limiter.hit(ITEMS[0], next(keys)))
