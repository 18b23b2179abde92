"""The Redis-backed limiter: one atomic round trip per admitted request, outage-proof.

How the pieces fit:
- Redis holds the truth: per caller and window, epoch-aligned bucket counters (one hash per caller),
  checked and consumed for all three windows at once by one Lua script (loaded once, EVALSHA after)
  with the same integer sliding-window arithmetic as the native limiter. A refused request consumes
  nothing. The script derives its hash fields from Redis's own clock (TIME), so every instance
  agrees on the buckets whatever its local clock says.
- The native `RateLimiter` in this process is kept in sync: every Redis answer writes the global
  counts into it (`sync`). Its counts can only lag the global ones, never lead them, so when it
  refuses, Redis would too: a key known to be over its limit is refused locally, with no round trip,
  until its window frees a slot. A flood from one key costs Redis nothing.
- Redis unreachable (down at start-up, killed, too slow): every call is bounded by `REDIS_TIMEOUT_S`;
  the first failure (a refused or broken connection, or `STRIKES` timeouts in a row) marks it down
  (logged once) and from then on no request waits on it: the native
  limiter alone decides, per process, and remembers what it admitted. A background task pings Redis;
  once it answers, those admissions are added to Redis (an outage is no amnesty), the recovery is
  logged once, and global limiting resumes.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import Counter
from typing import Any

from redis.asyncio import Redis
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError
from redis.retry import Retry

from pwachat._native import Decision, RateLimiter
from pwachat.ratelimit import windows_of
from pwachat.settings import Settings

__all__ = ["REDIS_TIMEOUT_S", "RedisBackend"]

log = logging.getLogger("pwachat.ratelimit")

#: The longest any request may wait on Redis (the contract says ~50 ms).
REDIS_TIMEOUT_S = 0.05
RECONNECT_INTERVAL_S = 0.5
STRIKES = 3
#: The longest a check waits while Redis keeps answering other checks (see `_watch`).
MAX_WAIT_ALIVE_S = 1.0
#: A watchdog tick this late means the event loop itself is busy.
LOOP_LAG_S = 0.01
#: How often the watchdog looks at the checks in flight: a check times out 50 to 60 ms in.
WATCH_TICK_S = 0.01
MAX_IDLE_CONNECTIONS = 32
KEY_PREFIX = "pwachat:rl:"
#: Admissions remembered for replay after an outage, as (key, second) counts; beyond this many
#: distinct pairs the oldest are dropped (memory bound over a very long outage).
MAX_PENDING = 200_000

# One hash per caller (KEYS[1]) with a field per window and bucket ("<window_ms>:<bucket>"), so a
# check is a handful of commands whatever the number of windows: TIME and one HMGET, and when
# admitting one HSET and one PEXPIRE. The hash keeps only the buckets that still count (the current
# and the previous one of each window): the first admission in a new bucket deletes the bucket
# before the previous one, or, after a gap, whatever else that window left (HKEYS of a hash this
# small, once per gap). So the common check runs four commands, not five (`INFO commandstats`:
# about 22 us a call against 26 with an HDEL on every admission).
# ARGV[1]: 1 to consume, 0 to peek; then limit, window_ms pairs.
# Returns {allowed, now_ms, prev_1, cur_1, prev_2, cur_2, ...} with cur after consumption.
# Lua numbers are doubles: counts times window_ms stay far below 2^53 for any sane limit.
CHECK_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local n = (#ARGV - 1) / 2
local fields, cur_fields, buckets = {}, {}, {}
local longest = 0
for i = 1, n do
  local w = tonumber(ARGV[2 * i + 1])
  local bucket = math.floor(now / w)
  buckets[i] = bucket
  cur_fields[i] = w .. ':' .. bucket
  fields[2 * i - 1] = w .. ':' .. (bucket - 1)
  fields[2 * i] = cur_fields[i]
  if w > longest then longest = w end
end
local got = redis.call('HMGET', KEYS[1], unpack(fields))
local ok = true
local counts = {}
for i = 1, n do
  local limit = tonumber(ARGV[2 * i])
  local w = tonumber(ARGV[2 * i + 1])
  local elapsed = now - buckets[i] * w
  local prev = tonumber(got[2 * i - 1] or '0')
  local cur = tonumber(got[2 * i] or '0')
  if prev * (w - elapsed) + (cur + 1) * w > limit * w then ok = false end
  counts[2 * i - 1] = prev
  counts[2 * i] = cur
end
if ARGV[1] == '1' and ok then
  local set, stale, keys = {}, {}, nil
  for i = 1, n do
    counts[2 * i] = counts[2 * i] + 1
    set[2 * i - 1] = cur_fields[i]
    set[2 * i] = counts[2 * i]
    if not got[2 * i] then
      local w = ARGV[2 * i + 1]
      if got[2 * i - 1] then
        stale[#stale + 1] = w .. ':' .. (buckets[i] - 2)
      else
        keys = keys or redis.call('HKEYS', KEYS[1])
        local prefix = w .. ':'
        for _, f in ipairs(keys) do
          if string.sub(f, 1, #prefix) == prefix and f ~= cur_fields[i] then stale[#stale + 1] = f end
        end
      end
    end
  end
  if #stale > 0 then redis.call('HDEL', KEYS[1], unpack(stale)) end
  redis.call('HSET', KEYS[1], unpack(set))
  redis.call('PEXPIRE', KEYS[1], 2 * longest)
end
local out = {ok and 1 or 0, now}
for i = 1, 2 * n do out[i + 2] = counts[i] end
return out
"""


def _resp(*parts: str) -> bytes:
    return b"".join(b"$%d\r\n%s\r\n" % (len(p.encode()), p.encode()) for p in parts)


def _packed_parts(sha: str, args: list[str]) -> tuple[bytes, bytes]:
    """`EVALSHA sha 1 <key> *args` in RESP, as the bytes before the key and the bytes after it."""
    return b"*%d\r\n" % (4 + len(args)) + _resp("EVALSHA", sha, "1"), _resp(*args)


class RedisBackend:
    name = "redis"

    def __init__(self, settings: Settings, max_keys: int = 100_000) -> None:
        self.windows = windows_of(settings)
        self.limiter = RateLimiter(self.windows, max_keys=max_keys)
        self.redis = Redis.from_url(
            settings.redis_url,
            # No socket read timeout: every call is bounded by the deadlines here instead.
            socket_timeout=None,
            socket_connect_timeout=REDIS_TIMEOUT_S,
            retry=Retry(NoBackoff(), 0),  # never retry inside a request: fall back instead
            retry_on_timeout=False,
            health_check_interval=0,
        )
        self.sha = hashlib.sha1(CHECK_LUA.encode()).hexdigest()  # noqa: S324 - Redis names scripts by SHA-1
        # The check's own connections: redis-py's Connection objects (URL, auth, TLS, RESP parsing
        # with hiredis), used one command at a time without the client and pool layers, which
        # cost more than the round trip itself (benches/test_bench_limits.py).
        self._idle: list[Any] = []
        # The script's ARGV after the consume flag, and the two EVALSHA commands packed once: only
        # the key differs between checks (RESP framing by hand saves redis-py's per-call
        # `pack_command`, about a tenth of the Python cost of a check).
        limits = [str(v) for q, w in self.windows for v in (q, w * 1000)]
        self._consume = _packed_parts(self.sha, ["1", *limits])
        self._peek = _packed_parts(self.sha, ["0", *limits])
        self.up = False
        self._timeouts = 0
        self._last_reply = 0.0
        self.pending: Counter[tuple[str, int]] = Counter()
        self._reconnect: asyncio.Task[None] | None = None
        self._closing = False
        # Checks in flight: task -> [start, deadline] (loop time), those the watchdog timed out,
        # and the watchdog's next tick (None while nothing is in flight).
        self._inflight: dict[asyncio.Task[Any], list[float]] = {}
        self._expired: set[asyncio.Task[Any]] = set()
        self._watchdog: asyncio.TimerHandle | None = None

    async def start(self) -> None:
        """Called once in the lifespan: a Redis that is down at start-up is an outage, not a crash."""
        try:
            async with asyncio.timeout(REDIS_TIMEOUT_S * 4):
                await self.redis.script_load(CHECK_LUA)
        except (RedisError, OSError, TimeoutError):
            self._mark_down("Redis unreachable at start-up; limiting per process until it answers")
        else:
            self.up = True
            self._last_reply = asyncio.get_running_loop().time()

    async def _evalsha(self, key: str, packed: tuple[bytes, bytes]) -> list[Any]:
        head, tail = packed
        k = (KEY_PREFIX + key).encode()
        command = b"".join((head, b"$%d\r\n" % len(k), k, b"\r\n", tail))
        conn = self._idle.pop() if self._idle else self.redis.connection_pool.make_connection()
        try:
            await conn.connect()  # no-op when connected
            try:
                await conn.send_packed_command(command, check_health=False)
                raw = await conn.read_response()
            except NoScriptError:  # a Redis restarted since we loaded it
                await conn.send_packed_command(
                    conn.pack_command("SCRIPT", "LOAD", CHECK_LUA), check_health=False
                )
                await conn.read_response()
                await conn.send_packed_command(command, check_health=False)
                raw = await conn.read_response()
        except BaseException:
            # Timed out, cancelled or broken half-way: the connection's state is unknown.
            await conn.disconnect(nowait=True)
            raise
        if len(self._idle) < MAX_IDLE_CONNECTIONS:
            self._idle.append(conn)
        else:
            await conn.disconnect()
        return raw

    async def _call(self, key: str, packed: tuple[bytes, bytes]) -> tuple[bool, float, list[tuple[int, int]]]:
        # The deadline is kept by one watchdog for all the calls in flight (`_watch`), not by a
        # timer per call: arming and disarming a timer and an `asyncio.timeout` per check cost
        # about 11 us, a tenth of a loopback check (benches/test_bench_limits.py).
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        start = loop.time()
        inflight = self._inflight
        inflight[task] = [start, start + REDIS_TIMEOUT_S]
        if self._watchdog is None:
            self._watchdog = loop.call_at(start + WATCH_TICK_S, self._watch, start + WATCH_TICK_S)
        try:
            raw = await self._evalsha(key, packed)
        except asyncio.CancelledError:
            if task in self._expired and task.uncancel() == 0:
                raise TimeoutError from None
            raise
        finally:
            del inflight[task]
            self._expired.discard(task)
        self._last_reply = loop.time()
        self._timeouts = 0  # an answer ends a run of timeouts
        counts = [(raw[i], raw[i + 1]) for i in range(2, len(raw), 2)]
        return raw[0] == 1, raw[1] / 1000, counts

    def _watch(self, when: float) -> None:
        """Every `WATCH_TICK_S` while checks are in flight: time out those past their deadline.

        A check's 50 ms are up. If Redis answered this process within the last second, or this
        very tick runs late (the event loop is busy), the wait is most likely this process's own:
        keep waiting, in 50 ms steps up to `MAX_WAIT_ALIVE_S`, rather than decide without Redis and
        risk admitting past the global limit. Otherwise (a quiet process, a silent Redis) time out:
        the task is cancelled and `_call` turns that into a TimeoutError."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        excuse = now - self._last_reply < 1.0 or now - when > LOOP_LAG_S
        for task, times in self._inflight.items():
            start, deadline = times
            if now < deadline or task in self._expired:
                continue
            if excuse and now < start + MAX_WAIT_ALIVE_S:
                times[1] = now + REDIS_TIMEOUT_S
            else:
                self._expired.add(task)
                task.cancel()
        if self._inflight:
            self._watchdog = loop.call_at(now + WATCH_TICK_S, self._watch, now + WATCH_TICK_S)
        else:
            self._watchdog = None

    async def hit(self, key: str) -> Decision:
        if self.up:
            local = self.limiter.peek(key)
            if not local.allowed:
                return local  # over its limit globally too: no round trip
            try:
                allowed, now, counts = await self._call(key, self._consume)
            except (RedisError, OSError, TimeoutError) as err:
                self._failed(err)
            else:
                return self.limiter.sync(key, now, counts, allowed)
        decision = self.limiter.check(key)
        if decision.allowed:
            self._remember(key)
        return decision

    async def peek(self, key: str) -> Decision:
        if self.up:
            try:
                allowed, now, counts = await self._call(key, self._peek)
            except (RedisError, OSError, TimeoutError) as err:
                self._failed(err)
            else:
                return self.limiter.sync(key, now, counts, allowed)
        return self.limiter.peek(key)

    async def redis_state(self) -> str:
        # While up, ask Redis itself (bounded like every call), so that a process which has not
        # needed Redis since it went away still reports the truth; while down, the reconnect task
        # knows and nobody waits.
        if self.up:
            try:
                async with asyncio.timeout(REDIS_TIMEOUT_S):
                    await self.redis.ping()
            except (RedisError, OSError, TimeoutError) as err:
                self._failed(err)
            else:
                self._last_reply = asyncio.get_running_loop().time()
        return "ok" if self.up else "unavailable"

    def _remember(self, key: str) -> None:
        if len(self.pending) >= MAX_PENDING:
            oldest = min(self.pending, key=lambda k: k[1])
            del self.pending[oldest]
        self.pending[(key, int(time.time()))] += 1

    def _failed(self, err: BaseException) -> None:
        # A refused or broken connection is an outage at once. A lone timeout may be this process's
        # own event loop lagging under load rather than Redis: that request is decided locally, and
        # only STRIKES timeouts in a row (a hung Redis makes them back to back) mean an outage.
        if isinstance(err, TimeoutError):
            self._timeouts += 1
            if self._timeouts < STRIKES:
                log.info("Redis call timed out; decided locally", extra={"event": "redis_timeout"})
                return
        self._mark_down("Redis unreachable; limiting per process until it answers")

    def _mark_down(self, message: str) -> None:
        if not self.up and self._reconnect is not None:
            return
        self.up = False
        log.warning(message, extra={"event": "redis_down"})
        if not self._closing and (self._reconnect is None or self._reconnect.done()):
            self._reconnect = asyncio.get_running_loop().create_task(self._reconnect_loop())

    async def _reconnect_loop(self) -> None:
        while not self._closing:
            await asyncio.sleep(RECONNECT_INTERVAL_S)
            try:
                async with asyncio.timeout(REDIS_TIMEOUT_S * 4):
                    await self.redis.script_load(CHECK_LUA)  # a restarted Redis has lost its scripts
                await self._replay()
            except (RedisError, OSError, TimeoutError):
                continue
            # Connections from before the outage are dead; start afresh.
            stale, self._idle = self._idle, []
            for conn in stale:
                await conn.disconnect(nowait=True)
            self.up = True
            self._timeouts = 0
            self._last_reply = asyncio.get_running_loop().time()
            self._reconnect = None
            log.warning("Redis reachable again; global limiting resumed", extra={"event": "redis_up"})
            return

    async def _replay(self) -> None:
        """Add the admissions made during the outage to Redis's buckets (those still alive)."""
        if not self.pending:
            return
        pending, self.pending = self.pending, Counter()
        now = time.time()
        try:
            async with asyncio.timeout(1.0):
                pipe = self.redis.pipeline(transaction=False)
                for (key, second), count in pending.items():
                    for _, w in self.windows:
                        if now - second >= 2 * w:
                            continue
                        w_ms = w * 1000
                        pipe.hincrby(KEY_PREFIX + key, f"{w_ms}:{(second * 1000) // w_ms}", count)
                    pipe.pexpire(KEY_PREFIX + key, 2 * 1000 * max(w for _, w in self.windows))
                await pipe.execute()
        except BaseException:
            self.pending.update(pending)  # not lost: tried again on the next successful ping
            raise

    async def aclose(self) -> None:
        self._closing = True
        if self._reconnect is not None:
            self._reconnect.cancel()
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        for conn in self._idle:
            await conn.disconnect()
        self._idle.clear()
        await self.redis.aclose()
