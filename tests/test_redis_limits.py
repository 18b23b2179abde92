"""The Redis-backed limit, in process, against a real `redis-server` started by the fixture."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from redis_server import RedisServer
from server import free_port

MSG = {"message": "hello"}


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    srv = RedisServer(tmp_path).start()
    yield srv
    srv.stop()


def chat(client, token: str | None = None):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return client.post("/api/chat", json=MSG, headers=headers)


def wait_until(predicate, timeout: float = 5.0, interval: float = 0.05):
    """Poll `predicate` until it returns something truthy, or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(interval)


def test_limit_is_shared_by_two_apps_on_one_redis(make_client, redis: RedisServer) -> None:
    a = make_client(REDIS_URL=redis.url, RATELIMIT_PER_MINUTE="5")
    b = make_client(REDIS_URL=redis.url, RATELIMIT_PER_MINUTE="5")
    statuses = [chat(c).status_code for c in (a, b) * 5]
    assert statuses.count(200) == 5
    assert statuses.count(429) == 5
    assert a.get("/api/health").json()["rate_limit"] == {"backend": "redis", "redis": "ok"}
    # Both read the same state: nothing left for this caller anywhere.
    assert b.get("/api/rate-limit").json()["remaining"]["per_minute"] == 0
    assert a.get("/api/rate-limit").json()["backend"] == "redis"


def test_refused_requests_consume_nothing_in_redis(make_client, redis: RedisServer) -> None:
    client = make_client(REDIS_URL=redis.url, RATELIMIT_PER_MINUTE="3", RATELIMIT_PER_HOUR="50")
    assert [chat(client).status_code for _ in range(6)] == [200, 200, 200, 429, 429, 429]
    limits = client.get("/api/rate-limit").json()
    # Three admitted, three refused: the hour window counted only the three.
    assert limits["remaining"]["per_hour"] == 47
    resp = chat(client)
    assert resp.status_code == 429
    assert 1 <= int(resp.headers["retry-after"]) <= 120
    assert resp.headers["ratelimit"].startswith('"minute";r=0;')


def test_a_flood_from_an_over_limit_key_makes_no_round_trips(make_client, redis: RedisServer) -> None:
    # Budgets off: their settles are calls of their own (tests/test_budgets_redis.py).
    client = make_client(REDIS_URL=redis.url, RATELIMIT_PER_MINUTE="2", TOKENS_PER_DAY="0")
    assert [chat(client).status_code for _ in range(3)] == [200, 200, 429]
    before = redis.evalsha_calls()
    assert [chat(client).status_code for _ in range(200)] == [429] * 200
    assert redis.evalsha_calls() == before


def test_each_token_has_its_own_quota_in_redis(make_client, redis: RedisServer) -> None:
    client = make_client(REDIS_URL=redis.url, RATELIMIT_PER_MINUTE="2", API_TOKENS="alpha,beta")
    assert [chat(client, "alpha").status_code for _ in range(3)] == [200, 200, 429]
    assert [chat(client, "beta").status_code for _ in range(3)] == [200, 200, 429]
    keys = redis.command("KEYS", "pwachat:rl:*")
    assert keys and not any("alpha" in k or "beta" in k for k in keys)  # tokens never stored in clear


def test_redis_down_at_start_up_is_an_outage_not_a_crash(make_client, caplog) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    with caplog.at_level(logging.WARNING, logger="pwachat.ratelimit"):
        client = make_client(REDIS_URL=dead, RATELIMIT_PER_MINUTE="3")
        health = client.get("/api/health").json()
        assert health["status"] == "degraded"
        assert health["rate_limit"] == {"backend": "redis", "redis": "unavailable"}
        # Still limited, per process: never open, never 5xx.
        assert [chat(client).status_code for _ in range(5)] == [200, 200, 200, 429, 429]
    downs = [r for r in caplog.records if getattr(r, "event", None) == "redis_down"]
    assert len(downs) == 1


def test_outage_then_recovery_resumes_global_limits_and_keeps_outage_counts(
    make_client, redis: RedisServer, caplog
) -> None:
    with caplog.at_level(logging.WARNING, logger="pwachat.ratelimit"):
        client = make_client(REDIS_URL=redis.url, RATELIMIT_PER_MINUTE="6", RATELIMIT_PER_HOUR="100")
        assert [chat(client).status_code for _ in range(2)] == [200, 200]
        redis.kill()
        during = [chat(client).status_code for _ in range(6)]
        assert all(s < 500 for s in during)
        assert during.count(200) == 4 and during.count(429) == 2  # the local limiter knew about the 2
        assert client.get("/api/health").json()["rate_limit"]["redis"] == "unavailable"

        redis.start()  # the same port
        wait_until(lambda: client.get("/api/health").json()["rate_limit"]["redis"] == "ok")
        # The four admitted during the outage were added to Redis: 6 of 100 used this hour.
        (key,) = redis.command("KEYS", "pwachat:rl:*")
        fields = redis.command("HGETALL", key)
        hour = {f: int(v) for f, v in zip(fields[::2], fields[1::2], strict=True) if f.startswith("3600000:")}
        assert sum(hour.values()) == 4  # the 2 admitted before the crash died with Redis
        assert client.get("/api/rate-limit").json()["remaining"]["per_hour"] == 94
    events = [getattr(r, "event", None) for r in caplog.records]
    assert events.count("redis_down") == 1
    assert events.count("redis_up") == 1


def test_a_hung_redis_times_out_into_local_limiting_and_back(make_client, redis: RedisServer, caplog) -> None:
    # Redis alive on its socket but answering nothing (SIGSTOP): each check gives up on it (after
    # 50 ms, or up to 1 s while Redis answered this process within the last second), three in a
    # row mean an outage, and from then on requests are limited locally without waiting.
    with caplog.at_level(logging.INFO, logger="pwachat.ratelimit"):
        client = make_client(REDIS_URL=redis.url, RATELIMIT_PER_MINUTE="4")
        assert chat(client).status_code == 200
        redis.pause()
        try:
            started = time.monotonic()
            during = [chat(client).status_code for _ in range(5)]
            elapsed = time.monotonic() - started
            health = client.get("/api/health").json()
        finally:
            redis.resume()
        assert during == [200, 200, 200, 429, 429]  # the local limiter knew about the first one
        assert elapsed < 10  # a liveness bound: nothing waited on the hung Redis for long
        assert health["rate_limit"]["redis"] == "unavailable"
        wait_until(lambda: client.get("/api/health").json()["rate_limit"]["redis"] == "ok")
    events = [getattr(r, "event", None) for r in caplog.records]
    assert events.count("redis_timeout") == 2  # two strikes decided locally, the third is the outage
    assert events.count("redis_down") == 1
    assert events.count("redis_up") == 1


def test_health_is_ok_with_redis_and_a_real_provider(make_client, redis: RedisServer) -> None:
    client = make_client(
        REDIS_URL=redis.url, OPENAI_API_KEY="sk-test", OPENAI_BASE_URL="http://127.0.0.1:9/v1"
    )
    body = client.get("/api/health").json()
    assert body["status"] == "ok"
    assert body["rate_limit"] == {"backend": "redis", "redis": "ok"}
    assert json.dumps(body).count("sk-test") == 0


def test_a_flushed_script_is_loaded_again_without_failing_a_request(make_client, redis: RedisServer) -> None:
    client = make_client(REDIS_URL=redis.url, RATELIMIT_PER_MINUTE="3")
    assert chat(client).status_code == 200
    redis.command("SCRIPT", "FLUSH")  # as after a Redis restart that no request noticed
    assert [chat(client).status_code for _ in range(3)] == [200, 200, 429]
    assert client.get("/api/health").json()["rate_limit"]["redis"] == "ok"  # no outage declared


def test_the_script_keeps_only_the_buckets_that_still_count(redis: RedisServer) -> None:
    # The script itself, with a 100 ms window so that buckets age within the test: after every
    # admission the caller's hash holds the current bucket and at most the previous one, through
    # steady use across bucket edges and after gaps of several buckets.
    from pwachat.redis_limiter import CHECK_LUA

    sha = str(redis.command("SCRIPT", "LOAD", CHECK_LUA))
    key = "pwachat:rl:test"

    def redis_ms() -> int:
        sec, usec = redis.command("TIME")  # type: ignore[misc]
        return int(sec) * 1000 + int(usec) // 1000

    def consume_and_check() -> int:
        # A 100 ms window and a 10 minute one (which keeps the hash alive across the gaps); no
        # tokens reserved, budgets off.
        args = ["1", "0", "0", "0", "86400000", "100000", "100", "100000", "600000"]
        allowed, now, *_ = redis.command("EVALSHA", sha, "1", key, *args)  # type: ignore[misc]
        assert allowed == 1
        bucket = int(now) // 100
        fields = {f for f in redis.command("HGETALL", key)[::2] if f.startswith("100:")}  # type: ignore[index]
        assert f"100:{bucket}" in fields
        assert fields <= {f"100:{bucket}", f"100:{bucket - 1}"}
        return bucket

    seen: set[int] = set()
    for gap in (False, False, True, False, True):
        bucket = consume_and_check()
        seen.add(bucket)
        target = (bucket + (4 if gap else 1)) * 100
        while redis_ms() < target:  # up to the edge, on Redis's clock: busy use or a silent gap
            if not gap:
                consume_and_check()
    consume_and_check()
    assert len(seen) >= 5


def test_the_script_reserves_tokens_all_or_nothing_and_keeps_only_the_budget_buckets_that_count(
    redis: RedisServer,
) -> None:
    # The budgets in the check script, with a 100 ms budget window so that its buckets age within
    # the test: a reservation is written to the caller's hash and the deployment's only when both
    # budgets and the limits have room; each hash keeps the current and at most the previous
    # bucket, and has a TTL.
    from pwachat.redis_limiter import CHECK_LUA, GLOBAL_BUDGET_KEY

    sha = str(redis.command("SCRIPT", "LOAD", CHECK_LUA))
    key = "pwachat:rl:budget-test"
    limits = ["100000", "600000"]  # one request window of 10 minutes, never full here

    def reserve(tokens: int, caller: int = 1000, overall: int = 1500) -> list[int]:
        args = ["1", str(tokens), str(caller), str(overall), "100", *limits]
        return redis.command("EVALSHA", sha, "2", key, GLOBAL_BUDGET_KEY, *args)  # type: ignore[return-value]

    def tok_fields(name: str) -> dict[str, int]:
        flat = redis.command("HGETALL", name)
        pairs = dict(zip(flat[::2], flat[1::2], strict=True))  # type: ignore[index]
        return {f: int(v) for f, v in pairs.items() if f.startswith("tok:")}

    # Wait for the start of a bucket, on Redis's clock, so that the first three land in one.
    sec, usec = redis.command("TIME")  # type: ignore[misc]
    while (int(sec) * 1000 + int(usec) // 1000) % 100 > 20:
        sec, usec = redis.command("TIME")  # type: ignore[misc]
    status, now, _prev, count, _cprev, ccur, _gprev, gcur = reserve(600)
    bucket = now // 100
    assert (status, count, ccur, gcur) == (1, 1, 600, 600)
    # The caller's budget cannot cover 500 more: refused, nothing written anywhere.
    status, _, _, count, _, ccur, _, gcur = reserve(500)
    assert (status, count, ccur, gcur) == (2, 1, 600, 600)
    # Its own budget could (a larger one), the deployment's cannot: refused by that, nothing written.
    status, _, _, count, _, ccur, _, gcur = reserve(1000, caller=10_000)
    assert (status, count, ccur, gcur) == (3, 1, 600, 600)
    assert tok_fields(key) == {f"tok:{bucket}": 600}
    assert tok_fields(GLOBAL_BUDGET_KEY) == {f"tok:{bucket}": 600}
    assert 0 < int(redis.command("PTTL", GLOBAL_BUDGET_KEY)) <= 200  # type: ignore[arg-type]
    # Later buckets: only the current one and the one before stay (the previous fading).
    for _ in range(4):
        sec, usec = redis.command("TIME")  # type: ignore[misc]
        target = (bucket + 1) * 100
        while int(sec) * 1000 + int(usec) // 1000 < target:
            sec, usec = redis.command("TIME")  # type: ignore[misc]
        status, now, *_ = reserve(1, caller=10**9, overall=10**9)
        assert status == 1
        bucket = now // 100
        for name in (key, GLOBAL_BUDGET_KEY):
            assert f"tok:{bucket}" in tok_fields(name)
            assert set(tok_fields(name)) <= {f"tok:{bucket}", f"tok:{bucket - 1}"}
