"""Resumable streams (contract, "Resumable streams"): each committed stream's log, and its readers.

The relay (`pwachat/relay.py`) is the generation: it pulls the provider stream and appends every
flush, the framed bytes exactly as they go out, to the stream's `StreamLog`; the original POST is
served from those same bytes in the same task (no hand-off: its path costs one buffer append per
flush). Any other reader (a resume, `GET /api/chat/stream/{id}`) follows the log: what is there
after its `Last-Event-ID`, then each flush as it is appended, then the terminal event.

Who decides what (one owner per rule):
- `StreamLog.reader_left`: the last reader gone without a stop starts the grace
  (`STREAM_GRACE_S`); when it runs out with nobody back, the generation is cancelled
  (`grace_expired`). With a grace of 0 it is cancelled at once, as before resumable streams.
- `StreamLog.stop`: an explicit stop cancels the generation at once.
- Either way the relay ends the log with `done`, `finish_reason: "cancelled"` and the usage so
  far, which every reader still attached receives.
- `Streams`: the per-process registry. An ended stream stays readable for `STREAM_RETAIN_S`, and
  ended streams' logs take at most `STREAM_MEMORY_MB` per worker (past that, the oldest ended
  ones are forgotten first: a resume of one answers 404 like an expired one). A live stream's log
  is bounded by what `MAX_TOKENS` can produce (`max_log_bytes`): a provider sending more is
  ended with `finish_reason: "length"`.
- `STREAM_GRACE_S=0` turns resumes off, as they were before: the reader leaving cancels at once,
  nothing is kept or mirrored, and a stop works on the stream's own worker only.
- With `REDIS_URL`, every flush is mirrored to Redis (`pwachat/redis_streams.py`), so that a
  resume or a stop reaching another worker or instance works too; the local log stays the
  first place looked at, and the original reader never waits on Redis.

A stream belongs to its caller (`ratelimit.caller_key`: the bearer token's digest, or the client
address): another caller's id is answered as unknown.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import logging
from collections.abc import Callable
from typing import Any, Protocol

from pwachat._native import sse_comment

__all__ = [
    "MAX_READERS",
    "Mirror",
    "StreamLog",
    "Streams",
    "follow",
    "until_disconnect",
]

log = logging.getLogger("pwachat.streams")

#: Readers one stream may have at once (the original POST included); more answer 429.
MAX_READERS = 4
PING = sse_comment("ping")
_id_line = b"id: %d\n"


def _nothing() -> None:
    pass


class Mirror(Protocol):
    """Where a stream's log is copied for other processes (Redis); see `pwachat/redis_streams.py`."""

    def append(self, stream: StreamLog, chunk: bytes, last_id: int, terminal: bool) -> None: ...

    async def has_remote_readers(self, chat_id: str) -> bool: ...


class StreamLog:
    """One stream's events: one buffer of every flush in order (each one or more whole events, maybe
    a `: ping`), from `start` (id 0) to `last_id`. One growing buffer rather than a list of chunks:
    a few objects per stream whatever its length, none the garbage collector has to walk, each
    flush's bytes freed once sent, and per flush one append. Where a resume goes on is found by
    its `id:` line (`after`), once per resume."""

    __slots__ = (
        "buf",
        "chat_id",
        "control",
        "ended",
        "grace_timer",
        "keep",
        "last_id",
        "max_bytes",
        "mirrored",
        "owner",
        "readers",
        "registry",
        "stop_reason",
        "waiters",
    )

    def __init__(self, registry: Streams, chat_id: str, owner: str, control: Callable[[], None]) -> None:
        self.registry = registry
        self.chat_id = chat_id
        self.owner = owner
        self.control = control  # cancels the generation's provider request (the relay's)
        self.buf: bytes | bytearray = bytearray()
        self.last_id = -1  # of the last event appended
        self.keep = registry.keep
        self.max_bytes = registry.max_log_bytes
        self.ended = False
        self.readers = 1  # the original POST
        self.waiters: list[asyncio.Future[None]] = []
        self.stop_reason: str | None = None  # "stopped", "grace_expired", "reader_gone", "too_long"
        self.grace_timer: asyncio.TimerHandle | None = None
        self.mirrored = registry.mirror is not None  # false once a write to the mirror was lost

    @classmethod
    def ended_from(cls, registry: Streams, chat_id: str, owner: str, body: bytes, last_id: int) -> StreamLog:
        """A retained stream's log again, for one resume (`Streams.get`): one chunk, ended."""
        stream = cls(registry, chat_id, owner, _nothing)
        stream.buf = body
        stream.last_id = last_id
        stream.ended = True
        stream.readers = 0
        stream.mirrored = False
        return stream

    def append(self, chunk: bytes, last_id: int, terminal: bool) -> None:
        """One flush of the generation (the relay's): kept, handed to the readers waiting, mirrored."""
        if self.keep:
            self.buf += chunk  # type: ignore[operator] - a live stream's buffer is a bytearray
        self.last_id = last_id
        if self.waiters:
            for waiter in self.waiters:
                if not waiter.done():
                    waiter.set_result(None)
            self.waiters.clear()
        if self.mirrored:
            self.registry.mirror.append(self, chunk, last_id, terminal)  # type: ignore[union-attr]
        if terminal:
            self.ended = True
            if self.grace_timer is not None:
                self.grace_timer.cancel()
                self.grace_timer = None
            self.registry.ended(self)
        elif len(self.buf) > self.max_bytes:
            self.end_generation("too_long")

    def end_generation(self, reason: str) -> None:
        """Cancel the provider request; the relay then ends the log (see `stop_reason`)."""
        if self.stop_reason is None and not self.ended:
            self.stop_reason = reason
            self.control()

    def stop(self) -> bool:
        """`POST .../stop`: true when the stream was still running."""
        if self.ended:
            return False
        self.end_generation("stopped")
        return True

    def reader_came(self) -> None:
        self.readers += 1
        if self.grace_timer is not None:
            self.grace_timer.cancel()
            self.grace_timer = None

    def reader_left(self) -> None:
        self.readers -= 1
        if self.readers > 0 or self.ended:
            return
        grace_s = self.registry.grace_s
        if grace_s <= 0:
            self.end_generation("reader_gone")
        elif self.grace_timer is None:
            self.grace_timer = asyncio.get_running_loop().call_later(grace_s, self._grace_over)

    def _grace_over(self) -> None:
        self.grace_timer = None
        if self.readers > 0 or self.ended:
            return
        if self.mirrored:  # a reader on another worker or instance keeps it going
            asyncio.get_running_loop().create_task(self._grace_over_remote())
        else:
            self.end_generation("grace_expired")

    async def _grace_over_remote(self) -> None:
        mirror = self.registry.mirror
        assert mirror is not None
        try:
            remote = await mirror.has_remote_readers(self.chat_id)
        except Exception:  # Redis gone: nobody can be reading through it
            remote = False
        if self.readers > 0 or self.ended:
            return
        if remote:
            self.grace_timer = asyncio.get_running_loop().call_later(self.registry.grace_s, self._grace_over)
        else:
            self.end_generation("grace_expired")

    def after(self, last_event_id: int) -> int:
        """Where, in `buf`, a reader that has seen `last_event_id` goes on (its end when it has
        everything so far)."""
        if last_event_id < 0:
            return 0
        if last_event_id >= self.last_id:
            return len(self.buf)
        return cut_at(self.buf, last_event_id)


#: What a retained stream takes besides its events: its record, id, and entries in the registry.
RECORD_OVERHEAD = 400


def cut_at(chunk: bytes | bytearray, last_event_id: int) -> int:
    """Where, in `chunk` (holding `last_event_id` and the event after it), the next event starts: each
    event starts with its `id:` line, which only an event's first line can be (`data` never holds
    a raw newline). `len(chunk)` when none follows."""
    marker = _id_line % (last_event_id + 1)
    if chunk.startswith(marker):
        return 0
    at = chunk.find(b"\n" + marker)
    return at + 1 if at >= 0 else len(chunk)


def cut_after(chunk: bytes, last_event_id: int) -> bytes:
    """The events of `chunk` after `last_event_id` (see `cut_at`)."""
    return chunk[cut_at(chunk, last_event_id) :]


class Streams:
    """This process's streams: live ones, and ended ones while they are retained."""

    def __init__(self, settings: Any, mirror: Any = None) -> None:
        self.grace_s = settings.stream_grace_s
        # STREAM_GRACE_S=0 turns resumes off (as before them): nothing is kept or mirrored, a
        # stream is known only to its own worker, for a stop.
        self.keep = self.grace_s > 0
        self.retain_s = settings.stream_retain_s
        self.memory_cap = settings.stream_memory_mb * 1024 * 1024
        # What MAX_TOKENS can produce: a token is a few bytes of text, framed as a delta event of
        # about 40 bytes; 64 per token leaves room for long tokens and escapes.
        self.max_log_bytes = 64 * settings.max_tokens + 64 * 1024
        self.mirror = mirror
        self.logs: dict[str, StreamLog] = {}  # live ones; ended ones as (owner, events, last id)
        self._retained: collections.deque[tuple[float, str, tuple[str, bytes, int], int]] = (
            collections.deque()
        )
        self.retained_bytes = 0
        self._sweeper: asyncio.TimerHandle | None = None

    def open(self, chat_id: str, owner: str, control: Callable[[], None]) -> StreamLog:
        stream = StreamLog(self, chat_id, owner, control)
        self.logs[chat_id] = stream
        return stream

    def ended(self, stream: StreamLog) -> None:
        """Keep an ended stream for `STREAM_RETAIN_S`, as one tuple (owner, events, last id): a
        tuple of strings, bytes and ints leaves the garbage collector's lists, so that hundreds of
        thousands of retained streams cost no collection time (the live `StreamLog`, with its lists,
        would)."""
        chat_id = stream.chat_id
        if self.logs.get(chat_id) is not stream:
            return
        if not self.keep:  # resumes off: nothing to keep it for
            del self.logs[chat_id]
            return
        body = bytes(stream.buf)
        record = (stream.owner, body, stream.last_id)
        self.logs[chat_id] = record  # type: ignore[assignment]
        held = len(body) + RECORD_OVERHEAD
        loop = asyncio.get_running_loop()
        self._retained.append((loop.time() + self.retain_s, chat_id, record, held))
        self.retained_bytes += held
        self.sweep()
        if self._sweeper is None and self._retained:
            self._sweeper = loop.call_at(self._retained[0][0], self._sweep_timer)

    def _sweep_timer(self) -> None:
        self._sweeper = None
        self.sweep()
        if self._retained:
            self._sweeper = asyncio.get_running_loop().call_at(self._retained[0][0], self._sweep_timer)

    def sweep(self) -> None:
        """Forget the ended streams past their retention, and the oldest past the memory cap."""
        retained = self._retained
        if not retained:
            return
        now = asyncio.get_running_loop().time()
        while retained and (retained[0][0] <= now or self.retained_bytes > self.memory_cap):
            _, chat_id, record, held = retained.popleft()
            self.retained_bytes -= held
            if self.logs.get(chat_id) is record:
                del self.logs[chat_id]

    def get(self, chat_id: str, owner: str) -> StreamLog | None:
        """The caller's stream, if this process has it (another caller's is no stream). With
        resumes off, its log is empty: only a stop can use it."""
        self.sweep()
        entry: Any = self.logs.get(chat_id)
        if entry is None:
            return None
        if type(entry) is tuple:  # ended, retained: a log of its own for this reader
            if not hmac.compare_digest(entry[0], owner):
                return None
            return StreamLog.ended_from(self, chat_id, *entry)
        if not hmac.compare_digest(entry.owner, owner):
            return None
        return entry

    def stop_local(self, chat_id: str) -> None:
        """A stop that reached another process (through the mirror) for a stream this one runs."""
        stream = self.logs.get(chat_id)
        if isinstance(stream, StreamLog):
            stream.stop()

    def kept_bytes(self) -> int:
        """The events held now (for /api/health's runtime block: a leak shows here)."""
        self.sweep()
        return sum(len(s[1]) if type(s) is tuple else len(s.buf) for s in self.logs.values())

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None


def until_disconnect(receive: Any) -> asyncio.Future[Any]:
    """A future done when the client of a request without a body disconnects."""

    async def wait() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    return asyncio.ensure_future(wait())


async def follow(
    stream: StreamLog,
    last_event_id: int,
    send: Any,
    gone: asyncio.Future[Any],
    heartbeat_s: float,
) -> None:
    """A resuming reader of a local stream, from after `last_event_id` to the terminal event: what
    is in the log at once (one send), then each flush as it comes, `: ping` while nothing does.
    The response head has been sent."""
    loop = asyncio.get_running_loop()
    pos = stream.after(last_event_id)
    pending = b""
    while True:
        size = len(stream.buf)
        if pos < size:
            pending += stream.buf[pos:size]
            pos = size
        if stream.ended:
            await send({"type": "http.response.body", "body": bytes(pending), "more_body": False})
            return
        if pending:
            await send({"type": "http.response.body", "body": bytes(pending), "more_body": True})
            pending = b""
        waiter: asyncio.Future[None] = loop.create_future()
        stream.waiters.append(waiter)
        await asyncio.wait((waiter, gone), timeout=heartbeat_s, return_when="FIRST_COMPLETED")
        if gone.done():
            return
        if not waiter.done():
            waiter.cancel()
            if pos >= len(stream.buf) and not stream.ended:
                pending += PING
