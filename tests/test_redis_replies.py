"""Replies the limiter cannot use (issue 9, item 6, the Redis part): never a 500, never an outage.

Out-of-range counts come from a real `redis-server` holding corrupted hashes; replies no Redis
sends (non-integers, lists of the wrong length) from a small scripted RESP server on loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pwachat.ratelimit import caller_key
from pwachat.redis_limiter import RedisBackend
from pwachat.settings import Settings
from redis_server import RedisServer

MSG = {"message": "hello"}


def resp(value: object) -> bytes:
    if isinstance(value, bool):
        raise TypeError(value)
    if isinstance(value, int):
        return b":%d\r\n" % value
    if isinstance(value, bytes):
        return b"$%d\r\n%s\r\n" % (len(value), value)
    if isinstance(value, list):
        return b"*%d\r\n" % len(value) + b"".join(resp(v) for v in value)
    if value is None:
        return b"$-1\r\n"
    raise TypeError(value)


class ScriptedRedis:
    """Speaks enough RESP for redis-py and answers like Redis, except that a check of a caller's
    key (`EVALSHA <sha> 1 pwachat:rl:<caller> ...`) is answered with `reply` (raw RESP)."""

    def __init__(self, reply: bytes) -> None:
        self.reply = reply
        self.checks = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        f = conn.makefile("rb")
        try:
            while (args := _read_command(f)) is not None:
                conn.sendall(self._answer(args))
        except (OSError, ValueError):
            pass

    def _answer(self, args: list[bytes]) -> bytes:
        name = args[0].upper()
        if name == b"PING":
            return b"+PONG\r\n"
        if name == b"SCRIPT" and args[1].upper() == b"LOAD":
            return resp(hashlib.sha1(args[2]).hexdigest().encode())
        if name == b"EVALSHA":
            if args[3].startswith(b"pwachat:rl:"):
                self.checks += 1
                return self.reply
            # Anything else (a probe of the server's own) gets what the check script would answer.
            windows = (len(args) - 5) // 2
            return resp([1, int(time.time() * 1000)] + [0, 1] * windows)
        return b"+OK\r\n"

    def close(self) -> None:
        self._listener.close()
        for c in self._conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            c.close()


def _read_command(f) -> list[bytes] | None:
    line = f.readline()
    if not line:
        return None
    if line[:1] != b"*":
        raise ValueError(line)
    args = []
    for _ in range(int(line[1:-2])):
        size = int(f.readline()[1:-2])
        args.append(f.read(size + 2)[:-2])
    return args


NOW = int(time.time() * 1000)
# Three windows: {allowed, now_ms, prev, cur} with a (prev, cur) pair per window.
BAD_REPLIES = {
    "negative count": resp([1, NOW, 0, -1, 0, 1, 0, 1]),
    "count past 32 bits": resp([0, NOW, 0, 2**40, 0, 2**40, 0, 2**40]),
    "count past 64 bits": b"*8\r\n:1\r\n:%d\r\n:0\r\n:%d\r\n:0\r\n:1\r\n:0\r\n:1\r\n" % (NOW, 10**22),
    "count not an integer": resp([1, NOW, 0, b"one", 0, 1, 0, 1]),
    "count a list": resp([1, NOW, 0, [1], 0, 1, 0, 1]),
    "time not an integer": resp([1, b"soon", 0, 1, 0, 1, 0, 1]),
    "flag neither 0 nor 1": resp([7, NOW, 0, 1, 0, 1, 0, 1]),
    "list too short": resp([1, NOW, 0, 1]),
    "list one too long": resp([1, NOW, 0, 1, 0, 1, 0, 1, 0]),
    "list a pair too long": resp([1, NOW, 0, 1, 0, 1, 0, 1, 0, 1]),
    "empty list": resp([]),
    "an integer": resp(1),
    "a string": resp(b"OK"),
    "nil": resp(None),
}


@pytest.mark.parametrize("reply", BAD_REPLIES.values(), ids=BAD_REPLIES.keys())
def test_an_unusable_reply_is_decided_locally_and_logged_once(reply: bytes, caplog) -> None:
    fake = ScriptedRedis(reply)

    async def scenario() -> None:
        backend = RedisBackend(Settings.from_mapping({"LOG_FILE": "", "REDIS_URL": fake.url}))
        await backend.start()
        try:
            assert await backend.redis_state() == "ok"
            # The default limit is 10 a minute: these are decided by this process's own limiter.
            hits = [await backend.hit("ip:203.0.113.7") for _ in range(4)]
            peeks = [await backend.peek("ip:203.0.113.7") for _ in range(3)]
            assert [d.allowed for d in hits] == [True] * 4
            assert [d.remaining for d in hits] == [9, 8, 7, 6]
            assert [d.remaining for d in peeks] == [6] * 3
            assert await backend.redis_state() == "ok"  # Redis answers: no outage
        finally:
            await backend.aclose()

    try:
        with caplog.at_level(logging.INFO, logger="pwachat.ratelimit"):
            asyncio.run(scenario())
        # Every check asked Redis, except (on a busy machine) one whose fresh connection took past
        # the 50 ms deadline: a reply that breaks the protocol costs the connection each time, and
        # such a check is decided locally too (a strike, not an outage; health stayed "ok" above).
        assert fake.checks >= 5 if reply is BAD_REPLIES["count past 64 bits"] else fake.checks == 7
    finally:
        fake.close()
    events = [getattr(r, "event", None) for r in caplog.records]
    assert events.count("redis_bad_reply") == 1
    assert events.count("redis_down") == 0


def test_unusable_replies_never_reach_a_caller_as_a_500(make_client) -> None:
    fake = ScriptedRedis(BAD_REPLIES["negative count"])
    try:
        client = make_client(REDIS_URL=fake.url, RATELIMIT_PER_MINUTE="3")
        statuses = [client.post("/api/chat", json=MSG).status_code for _ in range(5)]
        assert statuses == [200, 200, 200, 429, 429]
        limits = client.get("/api/rate-limit")
        assert limits.status_code == 200
        assert limits.json()["remaining"]["per_minute"] == 0
    finally:
        fake.close()


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    srv = RedisServer(tmp_path).start()
    yield srv
    srv.stop()


def test_corrupted_counts_in_redis_are_decided_locally_without_an_outage(
    make_client, redis: RedisServer, caplog
) -> None:
    # Someone else's writes left callers' hashes holding what the script cannot count with (or
    # count past the native limiter's range). Those callers are limited by this process alone; the
    # others, and Redis's health, are untouched.
    tokens = ["negative", "huge", "text", "kind", "fine"]
    keys = {t: "pwachat:rl:" + caller_key("", t) for t in tokens}
    sec, _ = redis.command("TIME")  # type: ignore[misc]
    minute = f"60000:{int(sec) // 60}"
    redis.command("HSET", keys["negative"], minute, "-5")
    redis.command("HSET", keys["huge"], minute, str(2**40))
    redis.command("HSET", keys["text"], minute, "lots")
    redis.command("SET", keys["kind"], "not a hash")
    with caplog.at_level(logging.INFO, logger="pwachat.ratelimit"):
        client = make_client(REDIS_URL=redis.url, RATELIMIT_PER_MINUTE="3", API_TOKENS=",".join(tokens))
        for token in tokens:
            auth = {"Authorization": f"Bearer {token}"}
            statuses = [client.post("/api/chat", json=MSG, headers=auth).status_code for _ in range(4)]
            assert statuses == [200, 200, 200, 429], token
            assert client.get("/api/rate-limit", headers=auth).status_code == 200
        assert client.get("/api/health").json()["rate_limit"]["redis"] == "ok"
    fields = redis.command("HGETALL", keys["fine"])  # a sound caller is counted in Redis
    pairs = zip(fields[::2], fields[1::2], strict=True)  # type: ignore[index]
    assert sum(int(v) for f, v in pairs if f.startswith("60000:")) == 3
    events = [getattr(r, "event", None) for r in caplog.records]
    assert events.count("redis_bad_reply") == 1
    assert events.count("redis_down") == 0
