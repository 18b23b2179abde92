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
- Redis unusable (down at start-up, killed, too slow, or answering but refusing writes: a read-only
  replica, an out-of-memory Redis): every call is bounded by `REDIS_TIMEOUT_S`; the first failure (a
  refused or broken connection, a refused write, or `STRIKES` timeouts in a row, connecting
  included) marks it down (logged once) and from then on no request waits on it: the native limiter
  alone decides, per process, and remembers what it admitted. A background task probes Redis with a
  real write through the check script; once that works, those admissions are added to Redis in
  bounded batches, each applied exactly once (an outage is no amnesty, a lost answer no double
  count), the recovery is logged once, and global limiting resumes.
- A reply the limiter cannot use (a count out of range, not an integer, a list of the wrong length,
  a caller's hash the script cannot read) is not an outage: that one check is decided locally and
  the first such reply is logged.
- Redis Cluster (`redis+cluster://`): each caller's hash is `pwachat:rl:{<caller>}`, one slot, and
  every script call touches one slot only (a replay batch is sent as one call per slot, each with
  a token key of that slot). The checks are routed by slot on redis-py connections, one idle list
  per master, as packed as on one node (`_Cluster`); a NOSCRIPT loads the script on that node,
  MOVED and ASK are followed. Any node failing is an outage of the whole backend (logged once),
  and the probe writes through every master before global limiting resumes.
- Only checks and the health probe can mark Redis down: a flood of `/api/rate-limit` peeks or of
  health checks through a busy event loop cannot fake an outage (peeks never count a strike; health
  answers from what the last second showed and probes at most once a second).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import math
import secrets
import time
from collections import OrderedDict
from typing import Any

from redis.asyncio import ConnectionPool, Redis
from redis.backoff import NoBackoff
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot
from redis.exceptions import (
    AskError,
    ClusterError,
    InvalidResponse,
    MovedError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    ResponseError,
)
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from pwachat._native import Decision, RateLimiter
from pwachat.budgets import DAY_S, GLOBAL_KEY, Admission, LocalBudgets, Ticket, Verdict, admit_locally
from pwachat.settings import Settings, split_cluster_url

__all__ = ["MAX_PENDING", "REDIS_TIMEOUT_S", "RedisBackend", "connection_options"]

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
#: Admissions remembered for replay after an outage, as (key, bucket) counts; beyond this many
#: distinct pairs the oldest are dropped (memory bound over a very long outage).
MAX_PENDING = 200_000
#: Remembered (key, bucket) counts per replay call: up to ~2000 commands, about 2 ms of Redis and
#: of this loop, between which requests are served.
REPLAY_BATCH = 500
#: How long one replay batch may take; past it the batch is sent again (under the same token) at the
#: next reconnect attempt.
REPLAY_TIMEOUT_S = 1.0
#: How long health checks trust what the last answer from Redis showed.
STATE_TTL_S = 1.0
#: A check that always admits, on a window of 1 s: the probe's ARGV (it writes, so it proves writes).
PROBE_ARGS = ("1", "0", "0", "0", "86400000", "1000000000", "1000")
REPLAY_TOKEN_PREFIX = "pwachat:rlreplay:"  # noqa: S105 - a key name, not a secret
#: The deployment's token budget (TOKENS_GLOBAL_PER_DAY): one hash, day buckets "tok:<bucket>".
GLOBAL_BUDGET_KEY = "pwachat:budget:global"
#: Settles (and reservations made during an outage) wait this long to go to Redis together: one
#: replay call for every request that ended meanwhile. Until then Redis counts the reservation,
#: which errs towards refusing.
SETTLE_INTERVAL_S = 0.05
#: A budget refusal from Redis is repeated locally, with no round trip, for this long: a flood
#: from a spent caller costs Redis one call a second. (Longer could refuse a caller that settles
#: made elsewhere have given tokens back.)
REFUSAL_TRUST_S = 1.0
#: Redirections (MOVED, ASK) followed for one call before it counts as failed: a slot is moved at
#: most once or twice while a cluster is resharded.
MAX_REDIRECTS = 5

# One hash per caller (KEYS[1]) with a field per window and bucket ("<window_ms>:<bucket>"), so a
# check is a handful of commands whatever the number of windows: TIME and one HMGET, and when
# admitting one HSET and one PEXPIRE. The hash keeps only the buckets that still count (the current
# and the previous one of each window): the first admission in a new bucket deletes the bucket
# before the previous one, or, after a gap, whatever else that window left (HKEYS of a hash this
# small, once per gap). So the common check runs four commands, not five (`INFO commandstats`:
# about 22 us a call against 26 with an HDEL on every admission).
# The token budgets (pwachat/budgets.py) ride along in the same call: the caller's day buckets are
# fields of the same hash ("tok:<bucket>", read by the same HMGET, written by the same HSET), the
# deployment's a hash of its own (KEYS[2], present only when that budget is on: never on a
# cluster). A request is admitted only if the limits have room and every budget can cover its
# reservation; otherwise nothing is written (status 0: the limits refused, 2: the caller's budget,
# 3: the deployment's).
# ARGV: 1 to consume or 0 to peek, the tokens to reserve (0: none), the caller's and the
# deployment's budget (0: off), the budgets' window (ms), then limit, window_ms pairs.
# Returns {status, now_ms, prev_1, cur_1, ..., budget prev, cur, global prev, cur} (counts after
# consumption; a budget that is off counts 0).
# Lua numbers are doubles: counts times window_ms are exact below 2^53 (a budget of 10^8 a day);
# counts are written with %d, exact up to 2^53.
CHECK_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local tokens = tonumber(ARGV[2])
local climit, glimit, bw = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local n = (#ARGV - 5) / 2
local fields, cur_fields, buckets = {}, {}, {}
local longest = 0
for i = 1, n do
  local w = tonumber(ARGV[2 * i + 5])
  local bucket = math.floor(now / w)
  buckets[i] = bucket
  cur_fields[i] = w .. ':' .. bucket
  fields[2 * i - 1] = w .. ':' .. (bucket - 1)
  fields[2 * i] = cur_fields[i]
  if w > longest then longest = w end
end
local bb = math.floor(now / bw)
local be = now - bb * bw
local tok_cur = 'tok:' .. bb
if climit > 0 then
  fields[2 * n + 1] = 'tok:' .. (bb - 1)
  fields[2 * n + 2] = tok_cur
  if bw > longest then longest = bw end
end
local got = redis.call('HMGET', KEYS[1], unpack(fields))
local ok = true
local counts = {}
for i = 1, n do
  local limit = tonumber(ARGV[2 * i + 4])
  local w = tonumber(ARGV[2 * i + 5])
  local elapsed = now - buckets[i] * w
  local prev = tonumber(got[2 * i - 1] or '0')
  local cur = tonumber(got[2 * i] or '0')
  if prev * (w - elapsed) + (cur + 1) * w > limit * w then ok = false end
  counts[2 * i - 1] = prev
  counts[2 * i] = cur
end
local cprev, ccur, gprev, gcur = 0, 0, 0, 0
if climit > 0 then
  cprev = tonumber(got[2 * n + 1] or '0')
  ccur = tonumber(got[2 * n + 2] or '0')
end
local g = nil
if glimit > 0 then
  g = redis.call('HMGET', KEYS[2], 'tok:' .. (bb - 1), tok_cur)
  gprev = tonumber(g[1] or '0')
  gcur = tonumber(g[2] or '0')
end
local status = ok and 1 or 0
if ok and tokens > 0 then
  if climit > 0 and cprev * (bw - be) + (ccur + tokens) * bw > climit * bw then
    status = 2
  elseif glimit > 0 and gprev * (bw - be) + (gcur + tokens) * bw > glimit * bw then
    status = 3
  end
end
if ARGV[1] == '1' and status == 1 then
  local set, stale, keys = {}, {}, nil
  for i = 1, n do
    counts[2 * i] = counts[2 * i] + 1
    set[2 * i - 1] = cur_fields[i]
    set[2 * i] = counts[2 * i]
    if not got[2 * i] then
      local w = ARGV[2 * i + 5]
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
  if tokens > 0 and climit > 0 then
    ccur = ccur + tokens
    set[#set + 1] = tok_cur
    set[#set + 1] = string.format('%d', ccur)
    if not got[2 * n + 2] then stale[#stale + 1] = 'tok:' .. (bb - 2) end
  end
  if #stale > 0 then redis.call('HDEL', KEYS[1], unpack(stale)) end
  redis.call('HSET', KEYS[1], unpack(set))
  redis.call('PEXPIRE', KEYS[1], 2 * longest)
  if tokens > 0 and glimit > 0 then
    gcur = gcur + tokens
    if not g[2] then redis.call('HDEL', KEYS[2], 'tok:' .. (bb - 2)) end
    redis.call('HSET', KEYS[2], tok_cur, string.format('%d', gcur))
    redis.call('PEXPIRE', KEYS[2], 2 * bw)
  end
end
local out = {status, now}
for i = 1, 2 * n do out[i + 2] = counts[i] end
out[2 * n + 3] = cprev
out[2 * n + 4] = ccur
out[2 * n + 5] = gprev
out[2 * n + 6] = gcur
return out
"""


# Adds one batch of admissions made during an outage, or of token budget changes (settles, which
# may be negative: a count is never left below 0, and reservations made during an outage): KEYS[1]
# is the batch's token, KEYS[2..] the callers' hashes (and the deployment's budget); ARGV[1] the
# token's life and ARGV[2] the hashes' (ms), then for each hash a field count n and n (field,
# increment) pairs. The token is written first and only if absent, so a batch
# sent again (its answer lost or late) is not added twice, and a Redis refusing writes refuses the
# whole batch. A hash the script cannot add to (someone else's data there) is skipped, not fatal.
# Returns 1 when applied now, 0 when it had been already.
REPLAY_LUA = """
if not redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[1]) then return 0 end
local a = 3
for i = 2, #KEYS do
  local n = tonumber(ARGV[a])
  for j = a + 1, a + 2 * n, 2 do
    local v = redis.pcall('HINCRBY', KEYS[i], ARGV[j], ARGV[j + 1])
    if type(v) == 'number' and v < 0 then redis.pcall('HSET', KEYS[i], ARGV[j], '0') end
  end
  redis.pcall('PEXPIRE', KEYS[i], ARGV[2])
  a = a + 1 + 2 * n
end
return 1
"""

# The status of a check's reply (see CHECK_LUA); anything else is not a reply of the script's.
_STATUS = {1: "admitted", 0: "limited", 2: "caller", 3: "global"}


def _probe_answered(raw: Any) -> bool:
    """The probe's reply as the script makes it: admitted, the time, one window's pair, the
    budgets' two pairs."""
    return isinstance(raw, list) and len(raw) == 8 and all(type(v) is int for v in raw) and raw[0] == 1


class BadReply(Exception):
    """An answer the limiter cannot use: malformed (not even RESP), counts out of range, or an
    error about the caller's own hash (someone else's data there). Redis itself answered."""


def _refuses_writes(err: BaseException) -> bool:
    """A read-only replica or an out-of-memory Redis: it answers, but no check can consume."""
    if isinstance(err, (ReadOnlyError, OutOfMemoryError)):
        return True
    if not isinstance(err, ResponseError):
        return False
    msg = str(err)
    return msg.startswith(("OOM", "READONLY")) or "-OOM " in msg or "-READONLY " in msg


def _about_the_key(err: ResponseError) -> bool:
    """An error caused by what one caller's hash holds (a wrong type, a count the script cannot
    compute with), not by Redis's state: redis-py strips the `ERR ` of a script's runtime error."""
    if isinstance(err, NoScriptError) or _refuses_writes(err):
        return False
    return str(err).startswith(("WRONGTYPE", "user_script:", "Error running script"))


def _why(err: BaseException) -> str:
    if _refuses_writes(err):
        return "refuses writes (a read-only replica, or out of memory)"
    if isinstance(err, BadReply):
        return "answers what the limiter cannot use"
    if isinstance(err, (TimeoutError, RedisTimeoutError)):
        return "does not answer in time"
    return "unreachable"


def _resp(*parts: str) -> bytes:
    return b"".join(b"$%d\r\n%s\r\n" % (len(p.encode()), p.encode()) for p in parts)


def _bulk(b: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(b), b)


def _packed_parts(sha: str, args: list[str]) -> tuple[bytes, bytes]:
    """`EVALSHA sha 1 <key> *args` in RESP, as the bytes before the key and the bytes after it."""
    return b"*%d\r\n" % (4 + len(args)) + _resp("EVALSHA", sha, "1"), _resp(*args)


def connection_options() -> dict[str, Any]:
    """redis-py connection options for every Redis client here (limits, streams): calls bounded by
    our own deadlines, never retried inside a request."""
    return {
        # No socket read timeout: every call is bounded by the deadlines here instead.
        "socket_timeout": None,
        "socket_connect_timeout": REDIS_TIMEOUT_S,
        "retry": Retry(NoBackoff(), 0),  # never retry inside a request: fall back instead
        "retry_on_timeout": False,
        "health_check_interval": 0,
    }


class _Cluster:
    """Redis Cluster by slot on redis-py's own connections (URL, auth, TLS, hiredis parsing), so a
    check stays one packed command on an idle connection, as on one node; redis-py's RedisCluster
    would add its command layer (more than the round trip) and retries of its own inside a request.

    The slot map comes from CLUSTER SLOTS (`refresh`, at every probe: start-up, health, recovery);
    a MOVED updates that slot and retries there, an ASK retries once on the target after ASKING, a
    NOSCRIPT loads the script on that node and retries. Anything else is raised as it came."""

    def __init__(self, url: str, seeds: tuple[tuple[str, int], ...]) -> None:
        # Only for its connection class and keyword arguments (credentials, TLS, options): one
        # connection per node is made from them with that node's host and port.
        self._pool = ConnectionPool.from_url(url, **connection_options())
        self.seeds = seeds
        self.slots: list[tuple[str, int] | None] = [None] * REDIS_CLUSTER_HASH_SLOTS
        self.idle: dict[tuple[str, int], list[Any]] = {}

    def _connection(self, addr: tuple[str, int]) -> Any:
        idle = self.idle.get(addr)
        if idle:
            return idle.pop()
        kwargs = {**self._pool.connection_kwargs, "host": addr[0], "port": addr[1]}
        return self._pool.connection_class(**kwargs)

    async def _release(self, addr: tuple[str, int], conn: Any) -> None:
        idle = self.idle.setdefault(addr, [])
        if len(idle) < MAX_IDLE_CONNECTIONS:
            idle.append(conn)
        else:
            await conn.disconnect()

    def masters(self) -> set[tuple[str, int]]:
        return {a for a in self.slots if a is not None}

    async def refresh(self) -> None:
        """The slot map from the first node that answers CLUSTER SLOTS (those known, then the
        seeds). A slot no master serves stays None: a check on it fails (an outage)."""
        last: BaseException = ClusterError("no cluster node to ask")
        for addr in dict.fromkeys([*self.masters(), *self.seeds]):
            conn = self._connection(addr)
            try:
                await conn.connect()
                await conn.send_packed_command(conn.pack_command("CLUSTER", "SLOTS"), check_health=False)
                reply = await conn.read_response()
            except (RedisError, OSError) as err:
                await conn.disconnect(nowait=True)
                last = err
                continue
            except BaseException:
                await conn.disconnect(nowait=True)
                raise
            await self._release(addr, conn)
            slots: list[tuple[str, int] | None] = [None] * REDIS_CLUSTER_HASH_SLOTS
            for start, end, master, *_ in reply:
                host = master[0].decode() if isinstance(master[0], bytes) else master[0]
                # An empty host: the node does not know its own address; it is the one asked.
                node = (host if host and host != "?" else addr[0], int(master[1]))
                slots[int(start) : int(end) + 1] = [node] * (int(end) - int(start) + 1)
            self.slots = slots
            return
        raise last

    async def call(self, key: bytes, command: bytes, script: str) -> Any:
        """`command` (packed, touching `key`'s slot only) on the master serving that slot."""
        slot = key_slot(key)
        addr = self.slots[slot]
        asking = False
        for _ in range(MAX_REDIRECTS):
            if addr is None:
                raise ClusterError("a slot that no master serves")
            conn = self._connection(addr)
            try:
                await conn.connect()  # no-op when connected
                try:
                    raw = await self._send(conn, command, asking)
                except NoScriptError:  # a node that has not seen it (or restarted, or flushed)
                    await conn.send_packed_command(
                        conn.pack_command("SCRIPT", "LOAD", script), check_health=False
                    )
                    await conn.read_response()
                    raw = await self._send(conn, command, asking)
            except AskError as err:  # MOVED too: the reply was read whole, the connection is fine
                await self._release(addr, conn)
                asking = not isinstance(err, MovedError)
                if not asking:
                    self.slots[err.slot_id] = err.node_addr
                addr = err.node_addr
                continue
            except BaseException:
                # Timed out, cancelled or broken half-way: the connection's state is unknown.
                await conn.disconnect(nowait=True)
                raise
            await self._release(addr, conn)
            return raw
        raise ClusterError("too many redirections")

    @staticmethod
    async def _send(conn: Any, command: bytes, asking: bool) -> Any:
        if not asking:
            await conn.send_packed_command(command, check_health=False)
            return await conn.read_response()
        await conn.send_packed_command(_ASKING + command, check_health=False)
        try:
            await conn.read_response()  # +OK
        except ResponseError:
            await conn.read_response()  # the command's reply too: the connection stays in step
            raise
        return await conn.read_response()

    async def drop_idle(self) -> None:
        idle, self.idle = self.idle, {}
        for conns in idle.values():
            for conn in conns:
                await conn.disconnect(nowait=True)

    async def aclose(self) -> None:
        await self.drop_idle()
        await self._pool.disconnect()


_ASKING = b"*1\r\n$6\r\nASKING\r\n"


class RedisBackend:
    name = "redis"

    def __init__(self, settings: Settings, max_keys: int = 100_000, max_pending: int = MAX_PENDING) -> None:
        self.windows = settings.rate_windows
        self.limiter = RateLimiter(self.windows, max_keys=max_keys)
        cluster = split_cluster_url(settings.redis_url)
        self._cluster: _Cluster | None = None
        if cluster is None:
            self.redis = Redis.from_url(settings.redis_url, **connection_options())
        else:
            self._cluster = _Cluster(*cluster)
            self._evalsha = self._evalsha_cluster  # type: ignore[method-assign]
            self._probe = self._probe_cluster  # type: ignore[method-assign]
        self.sha = hashlib.sha1(CHECK_LUA.encode()).hexdigest()  # noqa: S324 - Redis names scripts by SHA-1
        self._replay_sha = hashlib.sha1(REPLAY_LUA.encode()).hexdigest()  # noqa: S324
        # The check's own connections: redis-py's Connection objects (URL, auth, TLS, RESP parsing
        # with hiredis), used one command at a time without the client and pool layers, which
        # cost more than the round trip itself (benches/test_bench_limits.py).
        self._idle: list[Any] = []
        # The script's ARGV after the consume flag, and the two EVALSHA commands packed once: only
        # the key differs between checks (RESP framing by hand saves redis-py's per-call
        # `pack_command`, about a tenth of the Python cost of a check).
        limits = [str(v) for q, w in self.windows for v in (q, w * 1000)]
        # The budgets: the deployment's hash is KEYS[2] when its budget is on; the tokens to
        # reserve are the one argument that differs between checks (packed in `admit`).
        self.budgets = LocalBudgets(settings, max_keys=max_keys)
        budget_args = [str(settings.tokens_per_day), str(settings.tokens_global_per_day), str(DAY_S * 1000)]
        more_keys = [GLOBAL_BUDGET_KEY] if settings.tokens_global_per_day else []
        rest = _resp(*budget_args, *limits)
        self._head = b"*%d\r\n" % (6 + len(more_keys) + len(budget_args) + len(limits)) + _resp(
            "EVALSHA", self.sha, str(1 + len(more_keys))
        )
        self._consume_mid = _resp(*more_keys, "1")
        self._rest = rest
        self._consume = (self._head, self._consume_mid + _resp("0") + rest)
        self._peek = (self._head, _resp(*more_keys, "0", "0") + rest)
        self._n_counts = 2 * len(self.windows)
        # Token budget changes for Redis ((caller or GLOBAL_KEY, day bucket) -> tokens, the net of
        # settles, and of reservations made while it was away), sent in batches by `_flush_deltas`,
        # the batch in flight kept with its token until Redis confirms it (as `pending`).
        self.deltas: dict[tuple[str, int], int] = {}
        # Which of (the caller's, the deployment's) budgets are on, as a slice of that pair.
        self._delta_slice = slice(
            0 if settings.tokens_per_day else 1, 2 if settings.tokens_global_per_day else 1
        )
        self._delta_batch: tuple[str, list[tuple[tuple[str, int], int]]] | None = None
        self._flusher: asyncio.Task[None] | None = None
        # Keys (a caller, or GLOBAL_KEY) whose budget Redis refused, until when that is trusted.
        self._refused_until: dict[str, float] = {}
        # The probe's key is this process's own (and gone 2 s after its last probe): nobody else's
        # data there can make it fail.
        self._probe_key = "pwachat:rlprobe:" + secrets.token_hex(8)
        self.up = False
        self._timeouts = 0
        self._last_strike = -math.inf  # loop time of the last timeout counted as a strike
        self._last_reply = 0.0
        self._last_probe = -math.inf
        self._bad_reply_logged = False
        # Admissions made while Redis was down, for the replay: (key, bucket) -> count, in the order
        # first seen, so the oldest is first (evicted and dropped in O(1)). A bucket is `_grain`
        # seconds, the largest span inside one bucket of every window (their gcd), so an entry names
        # one bucket of each window and nothing is lost by grouping.
        self.max_pending = max_pending
        self.pending: OrderedDict[tuple[str, int], int] = OrderedDict()
        self._window_s = [w for _, w in self.windows]
        self._grain = math.gcd(*self._window_s)
        self._longest = max(self._window_s)
        # The batch being replayed, with its token, until Redis confirms it.
        self._batch: tuple[str, list[tuple[tuple[str, int], int]]] | None = None
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
                await self._probe()
        except (RedisError, OSError, TimeoutError, BadReply) as err:
            self._mark_down(f"Redis {_why(err)} at start-up; limiting per process until it recovers")
        else:
            self.up = True
            self._last_reply = asyncio.get_running_loop().time()

    async def _probe(self) -> None:
        """One write through the check script on this process's own key: Redis answers, has the
        script (loaded again if it lost it), accepts writes (a read-only replica or an out-of-memory
        Redis answers a PING or a SCRIPT LOAD, but no check), and replies as the script does."""
        try:
            raw = await self.redis.evalsha(self.sha, 1, self._probe_key, *PROBE_ARGS)
        except NoScriptError:
            await self.redis.script_load(CHECK_LUA)
            raw = await self.redis.evalsha(self.sha, 1, self._probe_key, *PROBE_ARGS)
        if not _probe_answered(raw):
            raise BadReply("the probe's reply")

    def _key_name(self, key: str) -> str:
        """The caller's hash in Redis; on a cluster the caller is its hash tag: one slot."""
        return KEY_PREFIX + ("{" + key + "}" if self._cluster is not None else key)

    async def _probe_cluster(self) -> None:
        """`_probe` on every master (concurrently), each with a key of a slot it serves, after
        reading the slot map again: the script is loaded on each, and each accepts writes."""
        assert self._cluster is not None
        cluster = self._cluster
        await cluster.refresh()
        masters = cluster.masters()
        if not masters or None in cluster.slots:
            raise ClusterError("the cluster does not serve every slot")
        keys: dict[tuple[str, int], bytes] = {}
        n = 0
        while len(keys) < len(masters):  # a few tries per master: its share of the slots
            key = b"%s{%d}" % (self._probe_key.encode(), n)
            keys.setdefault(cluster.slots[key_slot(key)], key)  # type: ignore[arg-type]
            n += 1
        head, tail = _packed_parts(self.sha, list(PROBE_ARGS))

        async def one(key: bytes) -> None:
            raw = await cluster.call(key, b"".join((head, _bulk(key), tail)), CHECK_LUA)
            if not _probe_answered(raw):
                raise BadReply("the probe's reply")

        tasks = [asyncio.ensure_future(one(k)) for k in keys.values()]
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:  # one failed, or time is up: none is left waiting on a node
                task.cancel()

    async def _evalsha_cluster(self, key: str, packed: tuple[bytes, bytes]) -> list[Any]:
        head, tail = packed
        k = (KEY_PREFIX + "{" + key + "}").encode()
        return await self._cluster.call(k, b"".join((head, b"$%d\r\n" % len(k), k, b"\r\n", tail)), CHECK_LUA)  # type: ignore[union-attr]

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

    async def _call(self, key: str, packed: tuple[bytes, bytes], tokens: int = 0) -> Admission:
        """One check on Redis (reserving `tokens`), its answer written into the local limiter and
        budgets. Raises what redis-py raises for a failed call, TimeoutError past the deadline, and
        BadReply for an answer that cannot be used (malformed, counts out of range, an error about
        this caller's hash)."""
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
        except (ResponseError, InvalidResponse) as err:
            # An answer, but an error about this caller's hash (Redis is fine, the hash is not), or
            # one that is not even RESP (an integer past 64 bits, say: the connection is dropped).
            if isinstance(err, ResponseError) and not _about_the_key(err):
                raise
            self._last_reply = loop.time()
            self._timeouts = 0
            raise BadReply(str(err)) from None
        finally:
            del inflight[task]
            self._expired.discard(task)
        self._last_reply = loop.time()
        self._timeouts = 0  # an answer ends a run of timeouts
        try:
            return self._decide(key, raw, tokens, loop.time())
        except (TypeError, ValueError, OverflowError, IndexError, KeyError):
            raise BadReply("a check's reply") from None

    def _decide(self, key: str, raw: list[Any], tokens: int, now: float) -> Admission:
        """The script's reply as this process's decision (see CHECK_LUA), its counts written into
        the local limiter and budgets. `sync` refuses counts that are not one (prev, cur) pair of
        u32 per window, negative budget counts and a time that is not a finite number: the checks
        here are the ones it does not make."""
        n = self._n_counts
        if len(raw) != n + 6:
            raise IndexError
        status = _STATUS[raw[0]]
        at = raw[1] / 1000
        counts = [(raw[i], raw[i + 1]) for i in range(2, n + 2, 2)]
        decision = self.limiter.sync(key, at, counts, status != "limited")
        budgets = self.budgets
        if not budgets.on:
            return Admission(decision)
        spent = raw[n + 2 :]  # (`sync` raises TypeError for anything but a count)
        if tokens == 0 and (self.deltas or self._delta_batch is not None):
            spent = self._with_unsent(key, raw[1] // (DAY_S * 1000), spent)
        verdict, ticket = budgets.sync(key, at, tuple(spent), tokens, status == "admitted")  # type: ignore[arg-type]
        if status == "limited" or tokens == 0:
            return Admission(decision, verdict if tokens == 0 else None)
        if status != "admitted":
            verdict.refused_by = status
            refused = self._refused_until
            if len(refused) > 10_000:
                refused.clear()
            refused[key if status == "caller" else GLOBAL_KEY] = now + REFUSAL_TRUST_S
        return Admission(decision, verdict, ticket)

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

    def _with_unsent(self, key: str, bucket: int, spent: list[int]) -> list[int]:
        """Redis's budget counts plus this process's changes not yet sent (settles wait up to
        SETTLE_INTERVAL_S): a caller asking `/api/rate-limit` as its answer ends sees it settled."""
        batch = dict(self._delta_batch[1]) if self._delta_batch is not None else {}
        entries = ((key, bucket - 1), (key, bucket), (GLOBAL_KEY, bucket - 1), (GLOBAL_KEY, bucket))
        return [
            max(0, count + self.deltas.get(entry, 0) + batch.get(entry, 0))
            for count, entry in zip(spent, entries, strict=True)
        ]

    async def hit(self, key: str) -> Decision:
        return (await self.admit(key, 0)).decision

    async def admit(self, key: str, tokens: int) -> Admission:
        budgets = self.budgets
        if not budgets.on:
            tokens = 0
        if self.up:
            local = self.limiter.peek(key)
            if not local.allowed:
                return Admission(local)  # over its limit globally too: no round trip
            if tokens:
                verdict = budgets.peek(key, tokens)
                if verdict is not None and verdict.refused_by is not None:
                    # Redis refused it just now (or it can never fit): no round trip.
                    until = self._refused_until.get(key if verdict.refused_by == "caller" else GLOBAL_KEY)
                    if tokens > verdict.decision.limit or (
                        until is not None and until > asyncio.get_running_loop().time()
                    ):
                        return Admission(local, verdict)
                packed = (self._head, b"".join((self._consume_mid, _bulk(b"%d" % tokens), self._rest)))
            else:
                packed = self._consume
            try:
                return await self._call(key, packed, tokens)
            except BadReply as err:
                # Redis ran the script, and counted what it admitted: decided here, not replayed.
                self._bad_reply(err)
                return admit_locally(self.limiter, budgets, key, tokens)
            except (RedisError, OSError, TimeoutError) as err:
                self._failed(err)
        admission = admit_locally(self.limiter, budgets, key, tokens)
        if admission.allowed:
            self._remember(key)
            if admission.ticket is not None:  # Redis is to count it when it is back
                self._add_delta(admission.ticket, admission.ticket.tokens)
        return admission

    def settle(self, ticket: Ticket, used: int) -> None:
        """The reservation replaced by what was used: here at once, in Redis with the next batch
        of settles (`_flush_deltas`), or after an outage, with the rest of what it missed."""
        if ticket.settled:
            return
        ticket.settled = True
        used = max(0, used)
        if used == ticket.tokens:
            return
        self.budgets.settle(ticket, used)
        self._add_delta(ticket, used - ticket.tokens)

    def _add_delta(self, ticket: Ticket, delta: int) -> None:
        deltas = self.deltas
        for entry in ((ticket.key, ticket.bucket), (GLOBAL_KEY, ticket.bucket))[self._delta_slice]:
            now = deltas.get(entry)
            if now is None and len(deltas) >= self.max_pending:
                del deltas[next(iter(deltas))]  # the oldest: memory bound over a long outage
            deltas[entry] = (now or 0) + delta
        if self.up and self._flusher is None and not self._closing:
            self._flusher = asyncio.get_running_loop().create_task(self._flush_deltas())

    async def _flush_deltas(self) -> None:
        """While Redis is up: every SETTLE_INTERVAL_S, what has been settled meanwhile, in one call.
        A failed call is kept (its batch sent again, under its token); a refused or broken
        connection is an outage, as for a check (a slow answer is left to the checks' strikes);
        while Redis is down the reconnect loop sends what is left once it is back."""
        try:
            while (self.deltas or self._delta_batch is not None) and self.up and not self._closing:
                await asyncio.sleep(SETTLE_INTERVAL_S)
                if not self.up:
                    return
                try:
                    async with asyncio.timeout(REPLAY_TIMEOUT_S):
                        await self._send_deltas(only_now=True)
                except (TimeoutError, RedisTimeoutError):
                    continue  # kept, sent again; checks and the probe tell a hung Redis (strikes)
                except (RedisError, OSError, BadReply) as err:
                    self._failed(err)
                except Exception:  # a bug: logged, and the next settle starts the flusher again
                    log.exception(
                        "sending budget settles to Redis failed", extra={"event": "budget_flush_error"}
                    )
                    return
        finally:
            self._flusher = None

    async def _send_deltas(self, only_now: bool = False) -> None:
        """Every budget change not yet in Redis (with `only_now`, those there when it is called:
        what settles while a batch is on its way waits for the next interval, or each round trip
        would carry one settle), in batches of `REPLAY_BATCH`, each applied once (the replay
        script and its token). Raises as redis-py does; what was not confirmed stays."""
        left = len(self.deltas) if only_now else -1
        while True:
            if self._delta_batch is None:
                deltas = self.deltas
                if not deltas or left == 0:
                    return
                left = max(0, left - REPLAY_BATCH) if only_now else -1
                take = list(itertools.islice(deltas, REPLAY_BATCH))  # the oldest first
                self._delta_batch = (
                    REPLAY_TOKEN_PREFIX + secrets.token_hex(16),
                    [(entry, deltas.pop(entry)) for entry in take],
                )
            token, entries = self._delta_batch
            if self._cluster is not None:
                await self._replay_cluster(token, entries, self._budget_fields, "_delta_batch")
            else:
                command = self._replay_command(token, entries, self._budget_fields)
                if command is not None:
                    await self._send_replay(command)
            self._delta_batch = None

    async def peek(self, key: str) -> Decision:
        return (await self.view(key))[0]

    async def view(self, key: str) -> tuple[Decision, Verdict | None]:
        if self.up:
            try:
                got = await self._call(key, self._peek)
                return got.decision, got.budget
            except BadReply as err:
                self._bad_reply(err)
            except (RedisError, OSError, TimeoutError):
                # Not a strike: peeks come as fast as anyone sends /api/rate-limit, and a flood of
                # them through a busy loop would time out together. Checks and the health probe
                # find real outages; a peek only answers from what this process knows.
                pass
        return self.limiter.peek(key), self.budgets.peek(key)

    async def redis_state(self) -> str:
        # Health checks come as often as anyone sends them. An answer from Redis within the last
        # STATE_TTL_S (any check's) is the state; otherwise one probe, at most one per STATE_TTL_S
        # whoever asks, finds out (a process that has not needed Redis since it went away still
        # reports the truth), while other health checks answer what is known without waiting.
        if self.up:
            loop = asyncio.get_running_loop()
            now = loop.time()
            if now - self._last_reply >= STATE_TTL_S and now - self._last_probe >= STATE_TTL_S:
                self._last_probe = now
                try:
                    async with asyncio.timeout(REDIS_TIMEOUT_S):
                        await self._probe()
                except (RedisError, OSError, TimeoutError, BadReply) as err:
                    self._failed(err)
                else:
                    self._last_reply = loop.time()
                    self._timeouts = 0
        return "ok" if self.up else "unavailable"

    def _remember(self, key: str) -> None:
        now = int(time.time())
        entry = (key, now // self._grain)
        pending = self.pending
        count = pending.get(entry)
        if count is not None:
            pending[entry] = count + 1
            return
        # A new entry (the newest bucket, so it goes last): first forget what no window counts any
        # more (at the front), then the oldest if at the cap. Each entry is dropped once: O(1).
        dead = (now // self._longest - 1) * self._longest // self._grain
        while pending and next(iter(pending))[1] < dead:
            pending.popitem(last=False)
        if len(pending) >= self.max_pending:
            pending.popitem(last=False)
        pending[entry] = 1

    def _bad_reply(self, err: BadReply) -> None:
        if not self._bad_reply_logged:
            self._bad_reply_logged = True  # again only after the next outage and recovery
            log.warning(
                "Redis answered a check with what the limiter cannot use; such checks are decided "
                "per process",
                extra={"event": "redis_bad_reply", "reason": str(err)[:200]},
            )

    def _failed(self, err: BaseException) -> None:
        # A refused or broken connection, or a refused write, is an outage at once. A lone timeout
        # (of a command or of connecting) may be this process's own event loop lagging under load
        # rather than Redis: that request is decided locally, and only STRIKES timeouts in a row (a
        # hung Redis makes them back to back) mean an outage. Checks timed out together (the
        # watchdog ends every overdue one in the same tick: a burst on a cold worker) are one stall,
        # one strike.
        if isinstance(err, (TimeoutError, RedisTimeoutError)):
            now = asyncio.get_running_loop().time()
            if now - self._last_strike >= REDIS_TIMEOUT_S / 2:
                self._timeouts += 1
                self._last_strike = now
            if self._timeouts < STRIKES:
                log.info("Redis call timed out; decided locally", extra={"event": "redis_timeout"})
                return
        self._mark_down(f"Redis {_why(err)}; limiting per process until it recovers")

    def _mark_down(self, message: str) -> None:
        if not self.up and self._reconnect is not None:
            return
        self.up = False
        log.warning(message, extra={"event": "redis_down"})
        if not self._closing and (self._reconnect is None or self._reconnect.done()):
            self._reconnect = asyncio.get_running_loop().create_task(self._reconnect_loop())

    async def _reconnect_loop(self) -> None:
        # The pool's connections from before the outage are most likely dead: the first attempt on
        # one would fail for that alone, and global limiting resume an interval late.
        with contextlib.suppress(RedisError, OSError):
            if self._cluster is not None:
                await self._cluster.drop_idle()
            else:
                await self.redis.connection_pool.disconnect(inuse_connections=False)
        while not self._closing:
            await asyncio.sleep(RECONNECT_INTERVAL_S)
            try:
                async with asyncio.timeout(REDIS_TIMEOUT_S * 4):
                    await self._probe()  # a write: answering is not enough
                await self._replay()
            except (RedisError, OSError, TimeoutError, BadReply) as err:
                # Still down: logged once (at WARNING), when it went down.
                log.debug(
                    "Redis still unusable: %s",
                    _why(err),
                    extra={"event": "redis_retry", "error": f"{type(err).__name__}: {err}"[:200]},
                )
                continue
            # `_replay` has just found nothing left to send: up from here, with no await in between
            # (an admission made meanwhile would be remembered and never replayed). The budget
            # changes made meanwhile go with the first batch of settles (`_flush_deltas`): every
            # request settles, so under load they are never all sent at one moment.
            stale, self._idle = self._idle, []
            self.up = True
            self._timeouts = 0
            self._last_reply = asyncio.get_running_loop().time()
            self._bad_reply_logged = False
            self._reconnect = None
            log.warning("Redis reachable again; global limiting resumed", extra={"event": "redis_up"})
            if (self.deltas or self._delta_batch is not None) and self._flusher is None:
                self._flusher = asyncio.get_running_loop().create_task(self._flush_deltas())
            for conn in stale:  # connections from before the outage are dead
                await conn.disconnect(nowait=True)
            return

    async def _replay(self) -> None:
        """Add the admissions made during the outage to Redis's buckets (those still counted).

        A batch at a time (`REPLAY_BATCH` entries, one script call), yielding to the loop between
        batches: requests go on being served, decided locally and remembered (they join the end of
        the queue). Each batch is sent under a token of its own that the script sets, so Redis
        applies it once however many times it is sent: a batch whose answer was lost or came too
        late (`REPLAY_TIMEOUT_S`) is kept and sent again, under the same token, at the next
        attempt, and only a batch Redis confirmed is forgotten. Raises as redis-py does."""
        while True:
            if self._batch is None:
                pending = self.pending
                if not pending:
                    return
                take = min(REPLAY_BATCH, len(pending))
                self._batch = (
                    REPLAY_TOKEN_PREFIX + secrets.token_hex(16),
                    [pending.popitem(last=False) for _ in range(take)],
                )
            token, entries = self._batch
            if self._cluster is not None:
                async with asyncio.timeout(REPLAY_TIMEOUT_S):
                    await self._replay_cluster(token, entries, self._window_fields, "_batch")
                self._batch = None
                await asyncio.sleep(0)
                continue
            command = self._replay_command(token, entries, self._window_fields)
            if command is not None:  # None: nothing in it that a window still counts
                async with asyncio.timeout(REPLAY_TIMEOUT_S):
                    await self._send_replay(command)
            self._batch = None
            await asyncio.sleep(0)

    async def _send_replay(self, command: bytes) -> None:
        try:
            applied = await self._send(command)
        except NoScriptError:
            await self.redis.script_load(REPLAY_LUA)
            applied = await self._send(command)
        if applied not in (0, 1):
            raise BadReply("a replay's reply")

    async def _replay_cluster(
        self, token: str, entries: list[tuple[tuple[str, int], int]], fields: Any, batch: str
    ) -> None:
        """A batch on a cluster: one replay call per slot, its token key in that slot (tagged with
        the slot's first caller, so a batch sent again names the same token keys). The slots
        confirmed are dropped from the batch (the attribute named `batch`), so a batch cut short is
        sent again for the rest."""
        assert self._cluster is not None
        by_slot: dict[int, list[tuple[tuple[str, int], int]]] = {}
        for entry in entries:
            by_slot.setdefault(key_slot(self._key_name(entry[0][0]).encode()), []).append(entry)
        done: set[int] = set()
        try:
            for slot, group in by_slot.items():
                token_key = f"{REPLAY_TOKEN_PREFIX}{{{group[0][0][0]}}}{token}"
                command = self._replay_command(token_key, group, fields)
                if command is not None:
                    applied = await self._cluster.call(token_key.encode(), command, REPLAY_LUA)
                    if applied not in (0, 1):
                        raise BadReply("a replay's reply")
                done.add(slot)
        finally:
            if done and len(done) < len(by_slot):
                setattr(self, batch, (token, [e for s, g in by_slot.items() if s not in done for e in g]))

    def _window_fields(self, bucket: int, now: int) -> list[bytes]:
        """The request windows' fields that an admission in `bucket` (of `_grain` seconds) counts
        in, those that a window still counts (the current or the previous one)."""
        start = bucket * self._grain
        return [
            _bulk(b"%d:%d" % (w * 1000, start // w)) for w in self._window_s if start // w >= now // w - 1
        ]

    @staticmethod
    def _budget_fields(bucket: int, now: int) -> list[bytes]:
        """A budget day bucket's field, while it still counts (the current or the previous day)."""
        return [_bulk(b"tok:%d" % bucket)] if bucket >= now // DAY_S - 1 else []

    def _replay_command(
        self, token: str, entries: list[tuple[tuple[str, int], int]], fields_for: Any
    ) -> bytes | None:
        """The replay script's EVALSHA for a batch, in RESP: each caller once, with each of its
        fields (`fields_for(bucket, now)`: the buckets that still count) and the batch's sum.
        Packed by hand, the bucket fields once per batch: redis-py's `pack_command` would take more
        than half of a replay's time (200k callers: seconds)."""
        now = int(time.time())
        fields_of: dict[int, list[bytes]] = {}  # the batch's entries share a handful of buckets
        per_key: dict[str, dict[bytes, int]] = {}
        for (key, bucket), count in entries:
            fields = fields_of.get(bucket)
            if fields is None:
                fields = fields_of[bucket] = fields_for(bucket, now)
            if fields and count:
                mine = per_key.setdefault(key, {})
                for f in fields:
                    mine[f] = mine.get(f, 0) + count
        if not per_key:
            return None
        ttl = _bulk(b"%d" % (2 * 1000 * self._longest))  # the token matters as long as the counts
        names = [GLOBAL_BUDGET_KEY if key == GLOBAL_KEY else self._key_name(key) for key in per_key]
        parts = [_bulk(token.encode()), *(_bulk(name.encode()) for name in names), ttl, ttl]
        for sums in per_key.values():
            parts.append(_bulk(b"%d" % len(sums)))
            for f, c in sums.items():
                parts += (f, _bulk(b"%d" % c))
        head = b"*%d\r\n" % (3 + len(parts)) + _resp("EVALSHA", self._replay_sha, str(1 + len(per_key)))
        return head + b"".join(parts)

    async def _send(self, command: bytes) -> Any:
        """One packed command on a connection of the client's pool, dropped if anything goes wrong
        half-way (timed out, cancelled: its state is unknown)."""
        pool = self.redis.connection_pool
        conn = await pool.get_connection()
        try:
            await conn.send_packed_command(command, check_health=False)
            return await conn.read_response()
        except BaseException:
            await conn.disconnect(nowait=True)
            raise
        finally:
            await pool.release(conn)

    async def aclose(self) -> None:
        if self.up and (self.deltas or self._delta_batch is not None):
            # The settles of the last requests: otherwise Redis would go on counting their whole
            # reservations for a day.
            with contextlib.suppress(RedisError, OSError, TimeoutError, BadReply):
                async with asyncio.timeout(REPLAY_TIMEOUT_S):
                    await self._send_deltas()
        self._closing = True
        if self._flusher is not None:
            self._flusher.cancel()
        if self._reconnect is not None:
            self._reconnect.cancel()
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        for conn in self._idle:
            await conn.disconnect()
        self._idle.clear()
        if self._cluster is not None:
            await self._cluster.aclose()
        else:
            await self.redis.aclose()
