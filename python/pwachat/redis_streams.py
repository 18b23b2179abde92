"""Resumable streams across workers and instances: each stream's log mirrored to a Redis Stream.

Layout: the stream `pwachat:st:{<chat id>}`, one entry per flush of the generation, whose id is
`1-<id of the flush's last event>` (the event id as the entry's sequence: a resume after event N
reads from `1-<N+1>`), with fields `b` (the framed bytes, exactly as they went out), `f` (the id of
the flush's first event), on the first entry `o` (the owner: a digest of the caller key) and on
the terminal one `t`. `XADD ... MAXLEN ~` bounds it; its TTL is set with the first entry,
refreshed while the stream runs, and set to `STREAM_RETAIN_S` at the end. A reader on another
instance holds `pwachat:st:{<chat id>}:r` (a short TTL, refreshed) so that the generating
instance's grace does not expire under it. Stops go over pub/sub (`pwachat:st:stop`): every worker
subscribes, and the one generating the stream cancels it at once; a stop is also left as a key
(`pwachat:st:{<chat id>}:stop`, TTL `STREAM_RETAIN_S`) that the generating process's next batch
of writes finds, should the message have been missed.

Writes never hold the generation up: `append` only packs the flush's arguments; one writer task
per process sends what `BATCH_DELAY_S` (2 ms) gathered as one script call (`APPEND_LUA`: the XADDs
and EXPIREs of every stream that flushed meanwhile, one round trip and one reply), while the next
batch gathers. A failed or slow batch marks Redis down for streams (logged once): the streams it
carried, and any that flush while it is down, are no longer mirrored (only their cross-instance
resume is lost: the original reader, and resumes on the generating worker, go on from the local
log); a probe brings mirroring back for new streams.

Redis Cluster: not mirrored yet (streams stay in their worker, as with `memory://`); see the README.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.exceptions import NoScriptError, RedisError, ResponseError

from pwachat._native import sse_comment
from pwachat.redis_limiter import connection_options
from pwachat.relay import STREAM_HEADERS
from pwachat.settings import split_cluster_url
from pwachat.streams import StreamLog, Streams, cut_after, until_disconnect

__all__ = ["RedisStreams", "create_mirror"]

log = logging.getLogger("pwachat.streams")

PREFIX = b"pwachat:st:"
STOP_CHANNEL = "pwachat:st:stop"
#: The longest a batch of writes may take before Redis counts as down for streams.
WRITE_TIMEOUT_S = 1.0
#: The longest a resume or a stop waits on Redis to find a stream.
LOOKUP_TIMEOUT_S = 0.5
#: How long a lookup that found nothing waits before looking once more (see `_head_and_tail`).
LATE_START_S = 0.05
RECONNECT_INTERVAL_S = 0.5
#: Flushes per script call (a call of a few hundred XADDs keeps Redis busy well under a
#: millisecond), and the most that may wait for Redis: past that, a stream stops being mirrored.
BATCH = 256
#: How long flushes wait to be sent together: a resume elsewhere sees an event this much later.
BATCH_DELAY_S = 0.002
MAX_QUEUED = 20_000
#: Connections for lookups, per process (the writer, the subscriber and each remote reader have
#: their own besides).
MAX_CONNECTIONS = 8
PING = sse_comment("ping")


def create_mirror(settings: Any) -> Any:
    """The Redis mirror when `REDIS_URL` names one Redis server, else None (`memory://`, and for now
    Redis Cluster: streams then live in their worker)."""
    if settings.redis_url.startswith("memory://") or split_cluster_url(settings.redis_url) is not None:
        return None  # Redis Cluster: not mirrored yet (see pwachat/redis_streams.py)
    if settings.stream_grace_s <= 0:
        return None  # resumes off
    return RedisStreams(settings)


# One batch of flushes, from every stream that flushed since the last batch: KEYS are their streams,
# ARGV[1] the MAXLEN, then six arguments per flush: entry id, bytes, first event id, owner (on the
# first entry only), TTL to set ("0": leave it), terminal ("1" or ""). An id already there (the same
# batch sent again after a NOSCRIPT) is no failure; any other refusal is, and comes back as the
# 1-based index of that flush.
APPEND_LUA = """
local maxlen = ARGV[1]
local failed, stopped = {}, {}
local a = 2
for i = 1, #KEYS do
  local k, t = KEYS[i], ARGV[a + 5]
  local args = {'XADD', k, 'MAXLEN', '~', maxlen, ARGV[a], 'b', ARGV[a + 1], 'f', ARGV[a + 2]}
  if ARGV[a + 3] ~= '' then
    args[#args + 1] = 'o'
    args[#args + 1] = ARGV[a + 3]
  end
  if t ~= '' then
    args[#args + 1] = 't'
    args[#args + 1] = t
  end
  local ttl = ARGV[a + 4]
  a = a + 6
  local r = redis.pcall(unpack(args))
  if type(r) == 'table' and r.err and not string.find(r.err, 'equal or smaller', 1, true) then
    failed[#failed + 1] = i
  end
  if ttl ~= '0' then
    redis.pcall('EXPIRE', k, ttl)
  end
  if t == '' and redis.call('EXISTS', k .. ':stop') == 1 then
    stopped[#stopped + 1] = i
  end
end
return {failed, stopped}
"""


def _pack(*parts: bytes) -> bytes:
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)


def _owner(caller: str) -> bytes:
    return hashlib.sha256(caller.encode()).hexdigest()[:32].encode()


def _key(chat_id: str) -> bytes:
    return PREFIX + b"{" + chat_id.encode() + b"}"


class RedisStreams:
    """The mirror (see `pwachat/streams.py: Mirror`) and the lookups of other processes' streams."""

    def __init__(self, settings: Any) -> None:
        # Lookups (a resume, a stop, the grace's check for remote readers) share a few connections:
        # 200 graces ending at once wait their turn instead of opening 200 connections.
        pool = BlockingConnectionPool.from_url(
            settings.redis_url,
            max_connections=MAX_CONNECTIONS,
            timeout=LOOKUP_TIMEOUT_S,
            **connection_options(),
        )
        self.redis = Redis(connection_pool=pool)
        self.retain_s = max(1, round(settings.stream_retain_s))
        # While a stream runs: long enough for its slowest honest life between two refreshes.
        self.live_ttl = int(self.retain_s + max(60.0, 2 * settings.upstream_timeout_s))
        self.refresh_s = self.live_ttl / 4
        self.gap_s = settings.upstream_timeout_s + 2 * settings.sse_heartbeat_s
        self.maxlen = b"%d" % (2 * settings.max_tokens + 64)
        self.lease_s = max(2, round(2 * settings.sse_heartbeat_s))
        self.up = True
        self.streams: Streams | None = None
        # The next batch: per flush its key and its six script arguments, packed, and its stream.
        self._keys: list[bytes] = []
        self._args: list[bytes] = []
        self._carried: list[StreamLog] = []
        self._sha = hashlib.sha1(APPEND_LUA.encode()).hexdigest().encode()  # noqa: S324 - Redis names scripts so
        self._maxlen_arg = b"$%d\r\n%s\r\n" % (len(self.maxlen), self.maxlen)
        self.retain_ttl = b"%d" % self.retain_s
        self.live_ttl_arg = b"%d" % self.live_ttl
        self._writer: asyncio.Task[None] | None = None
        self._writer_conn: Any = None
        # Live mirrored streams: [time of the last TTL set, the key packed as a RESP bulk string,
        # the id of the last event sent].
        self._live: dict[str, list[Any]] = {}
        self._tick: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False

    async def start(self, streams: Streams) -> None:
        self.streams = streams
        self._spawn(self._subscribe())

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- the generation's side ---------------------------------------------------------------------
    def append(self, stream: StreamLog, chunk: bytes, last_id: int, terminal: bool) -> None:
        """Queue one flush for the next batch (this costs the relay one packing, no I/O)."""
        chat_id = stream.chat_id
        if not self.up or len(self._carried) >= MAX_QUEUED:  # down, or too slow to keep up
            self._unmirror(stream)
            return
        live = self._live.get(chat_id)
        now = time.monotonic()
        if live is None:  # its first flush (`start`): the key, the owner, the running TTL
            key = PREFIX + b"{" + chat_id.encode() + b"}"
            live = self._live[chat_id] = [now, b"$%d\r\n%s\r\n" % (len(key), key), last_id]
            first = 0
            owner = _owner(stream.owner)
            ttl = self.live_ttl_arg
        else:
            first = live[2] + 1  # the event after the previous flush's last
            live[2] = last_id
            owner = b""
            ttl = b"0"
            if now - live[0] >= self.refresh_s:
                live[0] = now
                ttl = self.live_ttl_arg
        t = b""
        if terminal:
            del self._live[chat_id]
            ttl = self.retain_ttl
            t = b"1"
        self._keys.append(live[1])
        last = b"1-%d" % last_id
        f = b"%d" % first
        self._args.append(
            b"$%d\r\n%s\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n"
            % (len(last), last, len(chunk), chunk, len(f), f, len(owner), owner, len(ttl), ttl, len(t), t)
        )
        self._carried.append(stream)
        if self._tick is None and self._writer is None:
            # Flushes of the next BATCH_DELAY_S go together: one call for all of them (a lookup
            # elsewhere that finds nothing looks again LATE_START_S later).
            self._tick = asyncio.get_running_loop().call_later(BATCH_DELAY_S, self._start_writer)

    def _start_writer(self) -> None:
        self._tick = None
        if self._writer is None and self._carried:
            self._writer = asyncio.get_running_loop().create_task(self._write())

    async def _write(self) -> None:
        """Everything queued, as one script call per batch (one round trip, one reply), until the
        queue is empty; what queues up meanwhile is the next batch."""
        try:
            while self._carried and not self._closing:
                keys, args, carried = self._keys[:BATCH], self._args[:BATCH], self._carried[:BATCH]
                del self._keys[:BATCH], self._args[:BATCH], self._carried[:BATCH]
                n = len(carried)
                head = b"*%d\r\n$7\r\nEVALSHA\r\n$40\r\n%s\r\n$%d\r\n%d\r\n" % (
                    3 + n + 1 + 6 * n,
                    self._sha,
                    len(b"%d" % n),
                    n,
                )
                command = b"".join((head, *keys, self._maxlen_arg, *args))
                try:
                    async with asyncio.timeout(WRITE_TIMEOUT_S):
                        reply = await self._send(command)
                except (RedisError, OSError, TimeoutError) as err:
                    self._lost(carried, f"Redis unavailable for streams ({type(err).__name__})")
                    return
                if isinstance(reply, ResponseError):
                    # The whole call refused (out of memory, a read-only replica): those logs are
                    # incomplete in Redis from now on.
                    for stream in carried:
                        self._unmirror(stream)
                    continue
                failed, stopped = reply
                for index in failed:  # the entries the script could not add
                    self._unmirror(carried[int(index) - 1])
                for index in stopped:  # a stop whose message this process missed
                    carried[int(index) - 1].stop()
        finally:
            self._writer = None

    async def _send(self, command: bytes) -> Any:
        conn = self._writer_conn
        if conn is None:
            conn = self._writer_conn = self.redis.connection_pool.make_connection()
        try:
            await conn.connect()
            await conn.send_packed_command(command, check_health=False)
            try:
                return await conn.read_response(disable_decoding=True)
            except NoScriptError:  # a Redis restarted since: load it, and send the batch again
                await conn.send_packed_command(_pack(b"SCRIPT", b"LOAD", APPEND_LUA.encode()))
                await conn.read_response()
                await conn.send_packed_command(command, check_health=False)
                try:
                    return await conn.read_response(disable_decoding=True)
                except ResponseError as err:
                    return err
            except ResponseError as err:
                return err
        except BaseException:
            self._writer_conn = None
            await conn.disconnect(nowait=True)
            raise

    def _unmirror(self, stream: StreamLog) -> None:
        """A write of this stream's was lost: its log in Redis is incomplete, so no more of it."""
        stream.mirrored = False
        self._live.pop(stream.chat_id, None)

    def _lost(self, carried: list[StreamLog], why: str) -> None:
        for stream in (*carried, *self._carried):
            self._unmirror(stream)
        self._keys, self._args, self._carried = [], [], []
        if self.up:
            self.up = False
            log.warning("%s; streams are resumable on their own worker only until it is back", why)
            self._spawn(self._reconnect())

    async def _reconnect(self) -> None:
        while not self._closing:
            await asyncio.sleep(RECONNECT_INTERVAL_S)
            try:
                async with asyncio.timeout(LOOKUP_TIMEOUT_S):
                    await self.redis.ping()
            except (RedisError, OSError, TimeoutError):
                continue
            self.up = True
            log.info("Redis is back for streams: new streams are resumable on every instance again")
            return

    async def has_remote_readers(self, chat_id: str) -> bool:
        async with asyncio.timeout(LOOKUP_TIMEOUT_S):
            return bool(await self.redis.exists(_key(chat_id) + b":r"))

    # -- stops -------------------------------------------------------------------------------------
    async def _subscribe(self) -> None:
        """Every stop published, for the streams this process generates."""
        while not self._closing:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(STOP_CHANNEL)
                while not self._closing:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None and self.streams is not None:
                        self.streams.stop_local(message["data"].decode("ascii", "replace"))
            except (RedisError, OSError):
                await asyncio.sleep(RECONNECT_INTERVAL_S)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    async def _head_and_tail(self, chat_id: str, owner: str) -> tuple[bytes, list[Any]] | None:
        """The stream's key and its last entry, if the caller's; None if no such stream of its. A
        stream not there is looked for once more a moment later: its `start` may still be on its
        way to Redis (a reader faster than the generating instance's write)."""
        key = _key(chat_id)
        try:
            for attempt in range(2):
                async with asyncio.timeout(LOOKUP_TIMEOUT_S):
                    async with self.redis.pipeline(transaction=False) as pipe:
                        pipe.xrange(key, count=1)
                        pipe.xrevrange(key, count=1)
                        head, tail = await pipe.execute()
                if head or attempt:
                    break
                await asyncio.sleep(LATE_START_S)
        except (RedisError, OSError, TimeoutError):
            return None
        if not head or head[0][1].get(b"o") != _owner(owner):
            return None
        return key, tail

    async def stop(self, chat_id: str, owner: str) -> bool | None:
        """A stop for a stream another process generates: None if there is no such stream of the
        caller's, False if it has ended, else True once the stop is published. It is also left
        as a key (`...:stop`) that the generating process's next write finds: a message missed
        while its subscriber was reconnecting does not lose the stop."""
        found = await self._head_and_tail(chat_id, owner)
        if found is None:
            return None
        key, tail = found
        if tail and b"t" in tail[0][1]:
            return False
        try:
            async with asyncio.timeout(LOOKUP_TIMEOUT_S):
                async with self.redis.pipeline(transaction=False) as pipe:
                    pipe.set(key + b":stop", b"1", ex=self.retain_s)
                    pipe.publish(STOP_CHANNEL, chat_id)
                    await pipe.execute()
        except (RedisError, OSError, TimeoutError):
            return None
        return True

    async def open_follow(
        self, chat_id: str, owner: str, after: int, heartbeat_s: float
    ) -> RemoteResume | None:
        found = await self._head_and_tail(chat_id, owner)
        if found is None:
            return None
        key, tail = found
        last_id = int(tail[0][0].split(b"-")[1]) if tail else -1
        ended = bool(tail) and b"t" in tail[0][1]
        return RemoteResume(self, key, after, heartbeat_s, nothing_left=ended and after >= last_id)

    async def aclose(self) -> None:
        """The last flushes (the drain's `shutting_down` events, say) are written before closing."""
        for task in tuple(self._tasks):
            task.cancel()
        if self._tick is not None:
            self._tick.cancel()
            self._start_writer()
        if self._writer is not None:
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(asyncio.shield(self._writer), WRITE_TIMEOUT_S)
        self._closing = True
        if self._writer_conn is not None:
            await self._writer_conn.disconnect()
        await self.redis.aclose()


def _xread_entries(reply: Any) -> list[Any]:
    """The entries of one stream's `XREAD` reply: a map in RESP3, a list of pairs in RESP2, and
    nothing at all when the block timed out."""
    if not reply:
        return []
    if isinstance(reply, dict):
        return next(iter(reply.values()))
    return reply[0][1]


class RemoteResume:
    """A resume of a stream generated elsewhere: its entries after the reader's last event
    (`XRANGE`), then new ones as they come (`XREAD BLOCK`, a connection of its own), pings while
    none do. A Redis failure, or a stream silent longer than its generation could be (its
    generator gone), ends the response without a terminal event: the client resumes again."""

    __slots__ = ("after", "heartbeat_s", "key", "mirror", "nothing_left")

    def __init__(
        self, mirror: RedisStreams, key: bytes, after: int, heartbeat_s: float, nothing_left: bool
    ) -> None:
        self.mirror = mirror
        self.key = key
        self.after = after
        self.heartbeat_s = heartbeat_s
        self.nothing_left = nothing_left

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        gone = until_disconnect(receive)
        mirror = self.mirror
        loop = asyncio.get_running_loop()
        conn = mirror.redis.connection_pool.make_connection()
        lease = self.key + b":r"
        lease_at = -1e9
        try:
            await send({"type": "http.response.start", "status": 200, "headers": STREAM_HEADERS})
            await conn.connect()
            # XRANGE from the first entry the reader lacks (inclusive), XREAD after the cursor
            # (exclusive): the entry before that one, or before the first of all.
            command = (b"XRANGE", self.key, b"1-%d" % (self.after + 1), b"+")
            cursor = b"1-%d" % self.after if self.after >= 0 else b"0-0"
            last_entry = loop.time()
            while not gone.done():
                if loop.time() - lease_at > mirror.lease_s / 2:
                    await conn.send_packed_command(_pack(b"SET", lease, b"1", b"EX", b"%d" % mirror.lease_s))
                    await conn.read_response()
                    lease_at = loop.time()
                await conn.send_packed_command(_pack(*command), check_health=False)
                reading = asyncio.ensure_future(conn.read_response(disable_decoding=True))
                await asyncio.wait((reading, gone), return_when="FIRST_COMPLETED")
                if gone.done():
                    reading.cancel()
                    break
                reply = reading.result()
                entries = _xread_entries(reply) if command[0] == b"XREAD" else reply
                body = []
                terminal = False
                for entry_id, flat in entries:
                    f = flat if isinstance(flat, dict) else dict(zip(flat[::2], flat[1::2], strict=True))
                    chunk = f[b"b"]
                    if int(f[b"f"]) <= self.after:
                        chunk = cut_after(chunk, self.after)
                    body.append(chunk)
                    terminal = terminal or b"t" in f
                    cursor = entry_id
                if body:
                    last_entry = loop.time()
                    self.after = int(cursor.split(b"-")[1])
                elif command[0] == b"XREAD":
                    if loop.time() - last_entry > mirror.gap_s:
                        break  # its generator is gone: the client may try again
                    body.append(PING)
                await send({"type": "http.response.body", "body": b"".join(body), "more_body": not terminal})
                if terminal:
                    return
                block = b"%d" % int(self.heartbeat_s * 1000)
                command = (b"XREAD", b"COUNT", b"512", b"BLOCK", block, b"STREAMS", self.key, cursor)
            with contextlib.suppress(OSError, RuntimeError):
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except (RedisError, OSError, RuntimeError):
            with contextlib.suppress(OSError, RuntimeError):
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except Exception:
            log.exception("a resume through Redis failed")
            with contextlib.suppress(OSError, RuntimeError):
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            gone.cancel()
            await conn.disconnect(nowait=True)
