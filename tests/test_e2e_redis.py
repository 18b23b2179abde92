"""Limits across real processes: two server instances with two workers each, one real Redis."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from redis_server import RedisServer
from server import Server, start_server, stop_server

pytestmark = pytest.mark.e2e

AFTER = [f"after{i}" for i in range(40)]
TOKENS = ",".join(["burst", "outage", *AFTER])


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    srv = RedisServer(tmp_path).start()
    yield srv
    srv.stop()


@pytest.fixture
def cluster(tmp_path: Path, redis: RedisServer) -> Iterator[list[Server]]:
    env = {
        "REDIS_URL": redis.url,
        "WORKERS": "2",
        "RATELIMIT_PER_MINUTE": "20",
        "API_TOKENS": TOKENS,
    }
    servers = [start_server(tmp_path, **env) for _ in range(2)]
    yield servers
    for srv in servers:
        stop_server(srv)


def post_chat(srv: Server, token: str) -> tuple[int, dict[str, str]]:
    status, headers, _ = srv.post_json("/api/chat", {"message": "hi"}, Authorization=f"Bearer {token}")
    return status, headers


def burst(servers: list[Server], token: str, count: int) -> list[tuple[int, dict[str, str]]]:
    # 16 client threads: concurrent enough for every worker to race its siblings, few enough that
    # the 2-core test machine still schedules redis-server promptly.
    with ThreadPoolExecutor(max_workers=16) as pool:
        futures = [pool.submit(post_chat, servers[i % len(servers)], token) for i in range(count)]
        return [f.result() for f in futures]


def away_from_minute_edge() -> None:
    # A burst straddling a minute boundary still admits exactly the limit (it lasts far less than
    # the 3 s the previous bucket takes to fade by one request), but its refusals would report two
    # different waits; the test that compares them starts at least 5 s before the boundary.
    left = 60 - time.time() % 60
    if left < 5:
        time.sleep(left + 0.1)


def test_burst_across_instances_admits_exactly_the_limit(cluster: list[Server], redis: RedisServer) -> None:
    away_from_minute_edge()
    results = burst(cluster, "burst", 200)
    statuses = [s for s, _ in results]
    if statuses.count(200) != 20:  # say what the limiter logged, to tell a Redis stall from a bug
        lines = [json.loads(ln) for srv in cluster for ln in srv.app_log.read_text().splitlines()]
        pytest.fail(
            f"{statuses.count(200)} admitted; limiter events: {[x['event'] for x in lines if 'event' in x]}"
        )
    assert statuses.count(429) == 180
    retry = [int(h["retry-after"]) for s, h in results if s == 429]
    # The minute bucket is full: a slot frees when its count has faded in the next minute,
    # between 3 s and 63 s from now with a limit of 20 (see limiter.rs).
    assert all(1 <= r <= 63 for r in retry)
    assert max(retry) - min(retry) <= 2
    assert all(h["x-ratelimit-remaining"] == "0" for s, h in results if s == 429)


def test_killing_redis_mid_load_keeps_limiting_and_recovers(
    cluster: list[Server], redis: RedisServer
) -> None:
    results: list[int] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            for srv in cluster:
                results.append(post_chat(srv, "outage")[0])

    loader = threading.Thread(target=load)
    loader.start()
    try:
        deadline = time.monotonic() + 10
        while len(results) < 40 and time.monotonic() < deadline:
            time.sleep(0.01)
        redis.kill()
        killed_at = len(results)
        deadline = time.monotonic() + 10
        while len(results) < killed_at + 200 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        stop.set()
        loader.join()

    assert not [s for s in results if s >= 500], "a 5xx during the outage"
    after_kill = results[killed_at:]
    # Limited per process during the outage: four processes, 20 each at most, so mostly refusals.
    assert after_kill.count(429) > 0
    assert results.count(200) <= 20 * 4
    for srv in cluster:
        # Health answers from what the last second showed (a flood of health checks costs Redis
        # nothing), so a worker that Redis answered just before the kill says so for up to 1 s.
        deadline = time.monotonic() + 5
        while True:
            health = json.loads(srv.request("GET", "/api/health")[2])
            if health["rate_limit"]["redis"] == "unavailable" or time.monotonic() > deadline:
                break
            time.sleep(0.05)  # polling with a deadline
        assert health["status"] == "degraded" and health["rate_limit"]["redis"] == "unavailable"

    redis.start()  # again on the same port
    restarted = time.monotonic()
    # Global again: a fresh caller's burst over all four processes gets exactly the limit. Until
    # every process is back on Redis a burst gets more (each local limiter admits its own 20).
    for token in AFTER:
        began = time.monotonic() - restarted
        statuses = [s for s, _ in burst(cluster, token, 60)]
        if statuses.count(200) == 20:
            break
        assert began < 5, "not back to global limiting within 5 s"
        time.sleep(0.1)  # polling with a deadline, paced so that the fresh callers last those 5 s
    assert began < 5 and statuses.count(429) == 40
    # Every worker that logged the outage logged the recovery (each once), and health says ok.
    for srv in cluster:
        events = [json.loads(line).get("event") for line in srv.app_log.read_text().splitlines()]
        assert events.count("redis_down") >= 1
        assert events.count("redis_down") == events.count("redis_up") <= 2
        assert json.loads(srv.request("GET", "/api/health")[2])["rate_limit"]["redis"] == "ok"


def test_spoofed_forwarded_for_changes_nothing_without_trusted_proxies(tmp_path: Path) -> None:
    srv = start_server(tmp_path, RATELIMIT_PER_MINUTE="2")
    try:
        statuses = [
            srv.post_json("/api/chat", {"message": "hi"}, **{"X-Forwarded-For": f"198.51.100.{i}"})[0]
            for i in range(4)
        ]
        assert statuses == [200, 200, 429, 429]
    finally:
        stop_server(srv)


def test_trusted_proxy_forwarded_for_is_the_caller(tmp_path: Path) -> None:
    srv = start_server(tmp_path, RATELIMIT_PER_MINUTE="2", TRUSTED_PROXIES="127.0.0.1")
    try:
        one = [srv.post_json("/api/chat", {"message": "hi"}, **{"X-Forwarded-For": "198.51.100.1"})[0]]
        one += [srv.post_json("/api/chat", {"message": "hi"}, **{"X-Forwarded-For": "198.51.100.1"})[0]]
        one += [srv.post_json("/api/chat", {"message": "hi"}, **{"X-Forwarded-For": "198.51.100.1"})[0]]
        # A different client behind the same proxy has its own quota; a spoofed left-most entry
        # added by that client is ignored (the right-most untrusted address counts).
        other = srv.post_json(
            "/api/chat", {"message": "hi"}, **{"X-Forwarded-For": "198.51.100.1, 203.0.113.9"}
        )
        assert one == [200, 200, 429]
        assert other[0] == 200
    finally:
        stop_server(srv)
