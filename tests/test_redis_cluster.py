"""The Redis limiter on Redis Cluster (issue 11, item 6), against three real `redis-server` masters
joined with `redis-cli --cluster create` (tests/redis_server.py `RedisCluster`).

Callers' hashes are spread over the masters by their hash tags; every script call touches one slot;
the scripts are loaded on each master as it needs them; an outage and its replay work as on one node.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pwachat.redis_limiter import RedisBackend
from pwachat.settings import Settings
from redis_server import RedisCluster, RedisServer
from server import Server, start_server, stop_server

CALLERS = [f"ip:198.51.100.{i}" for i in range(30)]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[RedisCluster]:
    c = RedisCluster(tmp_path)
    try:
        yield c.start()
    finally:
        c.stop()


def settings(url: str, **env: str) -> Settings:
    return Settings.from_mapping({"LOG_FILE": "", "REDIS_URL": url, **env})


def minute_count(cluster: RedisCluster, caller: str) -> int:
    """What the cluster holds for `caller` in the minute window (its hash, on the node of its slot)."""
    key = "pwachat:rl:{" + caller + "}"
    fields = cluster.node_of(key).command("HGETALL", key)
    return sum(int(v) for f, v in zip(fields[::2], fields[1::2], strict=True) if f.startswith("60000:"))  # type: ignore[index]


def events(caplog: pytest.LogCaptureFixture) -> list[str | None]:
    return [getattr(r, "event", None) for r in caplog.records]


async def until_ok(backend: RedisBackend) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while await backend.redis_state() != "ok":
        assert loop.time() < deadline, "not back to global limiting"
        await asyncio.sleep(0.05)  # polling with a deadline


def test_callers_on_every_master_are_each_limited_exactly(
    cluster: RedisCluster, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> list[list[bool]]:
        backend = RedisBackend(settings(cluster.url, RATELIMIT_PER_MINUTE="3"))
        await backend.start()
        try:
            assert await backend.redis_state() == "ok"
            got = [[(await backend.hit(c)).allowed for _ in range(5)] for c in CALLERS]
            assert [(await backend.peek(c)).remaining for c in CALLERS] == [0] * len(CALLERS)
            assert await backend.redis_state() == "ok"
            return got
        finally:
            await backend.aclose()

    with caplog.at_level(logging.WARNING, logger="pwachat.ratelimit"):
        got = asyncio.run(scenario())
    assert got == [[True, True, True, False, False]] * len(CALLERS)
    # Each caller's hash is on the master of its own slot, the masters all hold some, and each hash
    # counted exactly what was admitted.
    keys = cluster.keys("pwachat:rl:*")
    assert all(keys.values()), f"callers on {sum(1 for k in keys.values() if k)} of 3 masters"
    assert sorted(k for ks in keys.values() for k in ks) == sorted("pwachat:rl:{" + c + "}" for c in CALLERS)
    assert [minute_count(cluster, c) for c in CALLERS] == [3] * len(CALLERS)
    assert "redis_down" not in events(caplog)


def test_a_script_flushed_on_one_node_mid_traffic_is_loaded_again(
    cluster: RedisCluster, caplog: pytest.LogCaptureFixture
) -> None:
    flushed = cluster.node_of("pwachat:rl:{" + CALLERS[0] + "}")

    async def scenario() -> list[int]:
        backend = RedisBackend(settings(cluster.url, RATELIMIT_PER_MINUTE="1000"))
        await backend.start()
        try:
            admitted = [0] * len(CALLERS)
            for round_ in range(6):
                # Nine checks in flight at a time, over all three masters (more at once on cold
                # connections would time some connects out on a busy machine: strikes, not the case
                # under test); between rounds one node forgets the script.
                for at in range(0, len(CALLERS), 3):
                    chunk = range(at, at + 3)
                    decisions = await asyncio.gather(
                        *(backend.hit(CALLERS[i]) for i in chunk for _ in range(3))
                    )
                    for i, d in zip([i for i in chunk for _ in range(3)], decisions, strict=True):
                        admitted[i] += d.allowed
                if round_ % 2 == 0:
                    flushed.command("SCRIPT", "FLUSH")
            assert await backend.redis_state() == "ok"
            return admitted
        finally:
            await backend.aclose()

    with caplog.at_level(logging.INFO, logger="pwachat.ratelimit"):
        admitted = asyncio.run(scenario())
    assert admitted == [18] * len(CALLERS)
    assert [minute_count(cluster, c) for c in CALLERS] == [18] * len(CALLERS)  # all of them in Redis
    assert not {"redis_down", "redis_timeout", "redis_bad_reply"} & set(events(caplog))


def test_an_outage_of_one_node_is_replayed_on_the_cluster(
    cluster: RedisCluster, caplog: pytest.LogCaptureFixture
) -> None:
    # One master killed: an outage of the backend (logged once), every caller limited per process
    # and remembered; back, the admissions of the outage are replayed, each caller's into its own
    # slot on its own master, exactly once.
    victim = cluster.node_of("pwachat:rl:{" + CALLERS[0] + "}")
    on_victim = {c for c in CALLERS if cluster.node_of("pwachat:rl:{" + c + "}") is victim}

    async def scenario() -> None:
        backend = RedisBackend(settings(cluster.url, RATELIMIT_PER_MINUTE="10"))
        await backend.start()
        try:
            assert all([(await backend.hit(c)).allowed for c in CALLERS])
            victim.kill()
            assert all([(await backend.hit(c)).allowed for c in CALLERS for _ in range(2)])
            assert await backend.redis_state() == "unavailable"
            cluster.restart(victim)
            await until_ok(backend)
            # Global again, with the outage's admissions counted: one more each, on every master.
            assert all([(await backend.hit(c)).allowed for c in CALLERS])
        finally:
            await backend.aclose()

    with caplog.at_level(logging.WARNING, logger="pwachat.ratelimit"):
        asyncio.run(scenario())
    # The victim lost what it held before (no persistence); the outage's two each are there once.
    assert [minute_count(cluster, c) for c in CALLERS] == [3 if c in on_victim else 4 for c in CALLERS]
    assert 0 < len(on_victim) < len(CALLERS)
    assert events(caplog).count("redis_down") == 1
    assert events(caplog).count("redis_up") == 1


def _token_key(token: str) -> str:
    return "pwachat:rl:{t:" + hashlib.sha256(token.encode()).hexdigest()[:32] + "}"


@pytest.mark.e2e
def test_a_burst_through_two_servers_on_the_cluster_admits_exactly_the_limit(
    tmp_path: Path, cluster: RedisCluster
) -> None:
    # One caller per master, 200 requests each from 16 client threads over two `pwachat serve`
    # processes with two workers each: exactly 20 admitted for each.
    tokens: dict[int, str] = {}
    for n in range(100):
        tokens.setdefault(cluster.node_of(_token_key(f"burst{n}")).port, f"burst{n}")
    assert len(tokens) == 3
    env = {
        "REDIS_URL": cluster.url,
        "WORKERS": "2",
        "RATELIMIT_PER_MINUTE": "20",
        "API_TOKENS": ",".join(tokens.values()),
    }
    servers: list[Server] = []
    try:
        servers += [start_server(tmp_path, **env) for _ in range(2)]
        for srv in servers:
            assert json.loads(srv.request("GET", "/api/health")[2])["rate_limit"]["redis"] == "ok"

        def post(i: int) -> tuple[str, int]:
            token = list(tokens.values())[i % 3]
            srv = servers[(i // 3) % 2]
            status, _, _ = srv.post_json("/api/chat", {"message": "hi"}, Authorization=f"Bearer {token}")
            return token, status

        with ThreadPoolExecutor(max_workers=16) as pool:
            results = list(pool.map(post, range(600)))
        admitted = {t: sum(1 for tok, s in results if tok == t and s == 200) for t in tokens.values()}
        refused = {t: sum(1 for tok, s in results if tok == t and s == 429) for t in tokens.values()}
        if set(admitted.values()) != {20}:
            lines = [json.loads(ln) for srv in servers for ln in srv.app_log.read_text().splitlines()]
            pytest.fail(f"admitted {admitted}; limiter events: {[x['event'] for x in lines if 'event' in x]}")
        assert set(refused.values()) == {180}
        for port, token in tokens.items():
            node = next(n for n in cluster.nodes if n.port == port)
            key = _token_key(token)
            fields = node.command("HGETALL", key)
            assert (
                sum(int(v) for f, v in zip(fields[::2], fields[1::2], strict=True) if f.startswith("60000:"))
                == 20
            )  # type: ignore[index]
    finally:
        for srv in servers:
            stop_server(srv)


def test_redis_server_helper_is_a_cluster(cluster: RedisCluster) -> None:
    assert all(isinstance(n, RedisServer) for n in cluster.nodes)
    assert all("cluster_state:ok" in str(n.command("CLUSTER", "INFO")) for n in cluster.nodes)


@pytest.mark.parametrize(
    "url",
    [
        "redis+cluster://127.0.0.1:7000",
        "redis+cluster://:s3cret-pw@10.0.0.1:7000,10.0.0.2:7001/0?socket_keepalive=true",
        "rediss+cluster://user:s3cret-pw@[::1]:7000,node-b:7001",
    ],
)
def test_cluster_urls_are_accepted(url: str) -> None:
    assert settings(url).redis_url == url


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis+cluster://:s3cret-pw@", "seed 1 has no host"),
        ("redis+cluster://:s3cret-pw@h1:7000,", "seed 2 has no host"),
        ("redis+cluster://:s3cret-pw@h1:99999", "port"),
        ("redis+cluster://:s3cret-pw@h1:7000/2", "database 0"),
        ("redis+cluster://:s3cret-pw@h1:7000?s3cret-opt=1", "query option 1"),
        ("redis+clusters://:s3cret-pw@h1:7000", "redis+cluster://"),
    ],
)
def test_bad_cluster_urls_name_redis_url_and_never_echo_it(url: str, says: str) -> None:
    from pwachat.settings import ConfigError

    with pytest.raises(ConfigError) as info:
        settings(url)
    message = str(info.value)
    assert message.startswith("REDIS_URL: ") and says in message
    assert "s3cret" not in message and "h1" not in message


def _stat(node: RedisServer, section: str, name: str) -> int:
    """A count from INFO errorstats (`errorstat_MOVED`) or commandstats (`cmdstat_asking`)."""
    key = "count=" if section == "errorstats" else "calls="
    for line in str(node.command("INFO", section)).splitlines():
        if line.startswith(name + ":"):
            return int(line.split(key)[1].split(",")[0])
    return 0


def test_a_slot_resharded_mid_traffic_is_followed_through_ask_and_moved(
    cluster: RedisCluster, caplog: pytest.LogCaptureFixture
) -> None:
    # A caller's slot moves from one master to another while it is limited: during the migration a
    # caller of that slot whose hash is not on the source yet is sent on with ASK; afterwards the
    # source answers MOVED. Neither is an outage, and the limit holds across the move.
    from redis.crc import key_slot

    moving = CALLERS[0]
    slot = key_slot(("pwachat:rl:{" + moving + "}").encode())
    other = next(
        c
        for c in (f"ip:10.{i >> 16}.{(i >> 8) & 255}.{i & 255}" for i in range(1 << 22))
        if key_slot(("pwachat:rl:{" + c + "}").encode()) == slot
    )
    source = cluster.node_of("pwachat:rl:{" + moving + "}")
    target = next(n for n in cluster.nodes if n is not source)
    source_id, target_id = (str(n.command("CLUSTER", "MYID")) for n in (source, target))

    async def scenario() -> tuple[list[bool], list[bool]]:
        backend = RedisBackend(settings(cluster.url, RATELIMIT_PER_MINUTE="5"))
        await backend.start()
        try:
            first = [(await backend.hit(moving)).allowed for _ in range(2)]
            target.command("CLUSTER", "SETSLOT", str(slot), "IMPORTING", source_id)
            source.command("CLUSTER", "SETSLOT", str(slot), "MIGRATING", target_id)
            first.append((await backend.hit(moving)).allowed)  # its hash is still on the source
            second = [(await backend.hit(other)).allowed for _ in range(2)]  # ASK: on the target
            key = "pwachat:rl:{" + moving + "}"
            source.command("MIGRATE", "127.0.0.1", str(target.port), "", "0", "5000", "KEYS", key)
            for node in (target, source, *(n for n in cluster.nodes if n not in (source, target))):
                node.command("CLUSTER", "SETSLOT", str(slot), "NODE", target_id)
            first += [(await backend.hit(moving)).allowed for _ in range(4)]  # MOVED, then there
            second += [(await backend.hit(other)).allowed for _ in range(4)]
            assert await backend.redis_state() == "ok"
            return first, second
        finally:
            await backend.aclose()

    with caplog.at_level(logging.INFO, logger="pwachat.ratelimit"):
        first, second = asyncio.run(scenario())
    assert first == [True] * 5 + [False] * 2
    assert second == [True] * 5 + [False]
    assert cluster.node_of("pwachat:rl:{" + moving + "}") is target
    assert minute_count(cluster, moving) == 5 and minute_count(cluster, other) == 5
    assert _stat(source, "errorstats", "errorstat_ASK") >= 1
    assert _stat(source, "errorstats", "errorstat_MOVED") >= 1
    assert _stat(target, "commandstats", "cmdstat_asking") >= 1
    assert not {"redis_down", "redis_timeout", "redis_bad_reply"} & set(events(caplog))
