"""Relaying a provider's stream to the client as the contract's SSE events.

`open_upstream` starts the provider request in a task of its own, so that the route can wait for
the response head for up to `SSE_HEARTBEAT_S` (answering a quick failure as JSON) and, past that,
commit the stream and keep waiting with heartbeats. `EventStream` is the committed response: a
bare ASGI app, rather than Litestar's `Stream`, because this is the hot path. Once the head is in,
the relay pulls batches of deltas from the provider stream itself, in the request's own task: each
network read of the upstream becomes one native parse, one native framing call and one `send`,
with no task hand-off in between.

Timing rules (contract, "POST /api/chat/stream"):
- `UPSTREAM_TIMEOUT_S` bounds the wait for the provider's head (retries included) and each gap
  between two chunks; either ends a committed stream with an `upstream_timeout` error event.
- While the provider is silent for `SSE_HEARTBEAT_S`, a `: ping` comment goes out.
- The reader leaving: the generation goes on into the stream's log for `STREAM_GRACE_S`, for a
  resume to pick up; then, or at once with a grace of 0, or on an explicit stop, the upstream
  connection is closed and the log ends with `done` `cancelled` (pwachat/streams.py owns when).
- On SIGTERM, streams get `SHUTDOWN_GRACE_S` to finish (`pwachat/drain.py`); the rest then end with
  an `error` event `shutting_down`, their upstream connections closed (`end_streams`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import msgspec

from pwachat._native import PanicException, SseEncoder, sse_comment
from pwachat.drain import DRAIN
from pwachat.errors import ApiError, ShuttingDown, as_api_error, error_body
from pwachat.metrics import METRICS
from pwachat.providers import (
    ChatInput,
    Provider,
    ProviderError,
    ProviderStream,
    UpstreamError,
    UpstreamTimeout,
)
from pwachat.schemas import DoneEvent, StartEvent, Usage
from pwachat.streams import StreamLog, Streams

__all__ = [
    "NO_ANSWER",
    "STREAM_HEADERS",
    "EventStream",
    "abandon",
    "end_streams",
    "open_streams",
    "open_upstream",
    "reader_gone",
]

log = logging.getLogger("pwachat.relay")

_encode = msgspec.json.Encoder().encode
PING = sse_comment("ping")
#: The head of every event stream (the POST's, a resume's).
STREAM_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
_open_streams = 0


def open_streams() -> int:
    """Streams this process is relaying now (for /api/health's runtime block)."""
    return _open_streams


# -- the drain's end (see pwachat/drain.py) ---------------------------------------------------------
# The upstreams being pulled now: a set entry per stream (no cost per event), so that the end of
# the grace reaches every one of them. A stream still waiting for its head wakes on `DRAIN.ending`.
_pulling: set[ProviderStream] = set()


def end_streams() -> int:
    """The drain's grace is over: close every upstream still being relayed, which wakes its relay
    (a pending read fails); seeing `DRAIN.over`, it ends with an `error` event `shutting_down`.
    Returns how many streams it ends (those waiting for their head included)."""
    for stream in tuple(_pulling):
        stream.abort()
    return _open_streams


async def _open(provider: Provider, chat: ChatInput, timeout_s: float, request_id: str) -> ProviderStream:
    try:
        async with asyncio.timeout(timeout_s):
            return await provider.open_stream(chat)
    except TimeoutError:
        raise UpstreamTimeout("The provider did not answer in time") from None
    except ProviderError:
        raise
    except (Exception, PanicException):
        log.exception(
            "provider stream failed to open", extra={"provider": provider.name, "request_id": request_id}
        )
        raise UpstreamError("The provider failed") from None


def open_upstream(
    provider: Provider, chat: ChatInput, timeout_s: float, request_id: str
) -> asyncio.Task[ProviderStream]:
    """Start the provider request; the task ends with the open stream or a `ProviderError`."""
    return asyncio.get_running_loop().create_task(_open(provider, chat, timeout_s, request_id))


def reader_gone(receive: Any) -> asyncio.Future[Any]:
    """A future that is done when the reader disconnects (the one reader of `receive` from then
    on). Once the body has been read, the next ASGI message can only be `http.disconnect`, and
    Granian's `receive()` is already a future: no task is needed to wait for it. It is wrapped in
    an asyncio future of ours, because Granian's keeps only one done-callback (`asyncio.wait` on
    it would silently replace the relay's)."""
    pending = receive()
    if asyncio.isfuture(pending):
        gone = asyncio.get_running_loop().create_future()
        pending.add_done_callback(partial(_settle, gone))
        return gone
    return asyncio.ensure_future(_until_disconnect_after(pending, receive))


def _settle(gone: asyncio.Future[Any], _pending: object) -> None:
    if not gone.done():
        gone.set_result(None)


async def _until_disconnect_after(first: Any, receive: Any) -> None:
    message = await first
    while message["type"] != "http.disconnect":
        message = await receive()


def abandon(opening: asyncio.Task[ProviderStream]) -> None:
    """The reader has gone before the stream was committed: cancel the provider request now
    (cancelling the task closes its connection; a stream that has just opened is closed). No grace
    here: the reader never got the stream's id (its `start` event), so nobody could resume it."""
    if not opening.done():
        opening.cancel()
    elif not opening.cancelled() and opening.exception() is None:
        opening.result().abort()  # the head arrived just as the reader left


async def _no_answer(scope: Any, receive: Any, send: Any) -> None:
    """The answer to a reader that has already gone: nothing to send."""


NO_ANSWER = _no_answer


class _Alarm:
    """One timer per stream for its deadlines (the next heartbeat, the gap timeout), which only
    ever move later: `set` just stores the new one, and the timer, when it fires before it, is
    armed again for it. Per relayed event that is an attribute store, where `asyncio.timeout`
    made, scheduled and cancelled a timer each time (about 7% of a paced stream's CPU, py-spy)."""

    __slots__ = ("deadline", "handle", "loop", "stream")

    def __init__(self, loop: asyncio.AbstractEventLoop, stream: ProviderStream) -> None:
        self.loop = loop
        self.stream = stream
        self.deadline = 0.0
        self.handle: asyncio.TimerHandle | None = None

    def set(self, deadline: float) -> None:
        self.deadline = deadline
        if self.handle is None:
            self.handle = self.loop.call_at(deadline, self._fire)

    def _fire(self) -> None:
        if self.loop.time() >= self.deadline:
            self.handle = None
            self.stream.interrupt()
        else:
            self.handle = self.loop.call_at(self.deadline, self._fire)

    def cancel(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None


def _usage(stream: ProviderStream, fields: dict[str, Any]) -> Usage:
    """The stream's usage for `done`, and into the access line (`usage_estimated` when the counts
    are the server's own: see providers/http_provider.py)."""
    estimated = stream.usage_estimated
    usage = Usage(stream.input_tokens, stream.output_tokens, estimated)
    fields.update(input_tokens=usage.input_tokens, output_tokens=usage.output_tokens)
    if estimated:
        fields["usage_estimated"] = True
    return usage


#: How each way a stream ends is counted (`pwachat_stream_events_total{outcome}`), by stop reason.
_OUTCOMES = {"stopped": "cancelled", "reader_gone": "cancelled", "grace_expired": "grace_expired"}


class EventStream:
    """The committed stream: `start`, then deltas as they arrive, then one `done` or `error`; the
    generation of its log (pwachat/streams.py) and the original reader's answer, in one task."""

    __slots__ = (
        "attached",
        "chat_id",
        "fields",
        "gap_s",
        "gone",
        "headers",
        "heartbeat_s",
        "log",
        "logged",
        "model",
        "opening",
        "owner",
        "provider",
        "request_id",
        "settle",
        "started",
        "streams",
        "upstream",
    )

    def __init__(
        self,
        *,
        opening: asyncio.Task[ProviderStream],
        chat_id: str,
        provider: str,
        model: str,
        headers: list[tuple[bytes, bytes]],
        fields: dict[str, Any],
        request_id: str,
        heartbeat_s: float,
        gap_s: float,
        gone: asyncio.Future[Any],
        started: float,
        streams: Streams,
        owner: str,
        settle: Callable[[int], None],
    ) -> None:
        self.opening = opening
        self.started = started  # time.monotonic() when the provider request began
        self.gone = gone  # ends when the reader disconnects (see `reader_gone`)
        self.chat_id = chat_id
        self.provider = provider
        self.model = model
        self.headers = headers
        self.fields = fields
        self.request_id = request_id
        self.heartbeat_s = heartbeat_s
        self.gap_s = gap_s
        self.streams = streams
        self.owner = owner
        self.settle = settle  # the token reservation, replaced by what was used at the end
        self.attached = True  # the original reader is still there
        self.logged = 0  # events appended to the log so far
        self.upstream: ProviderStream | None = None
        self.log: StreamLog | None = None

    def _charge(self, stream: ProviderStream | None) -> None:
        """The token reservation replaced by what was used (once; later calls do nothing): before
        the terminal event goes out, so that a client asking `/api/rate-limit` on it sees it."""
        fields = self.fields
        if stream is None or ("error" in fields and not fields.get("output_chars")):
            self.settle(0)  # the provider failed (or was stopped) before producing anything
            return
        if "input_tokens" not in fields:  # ended otherwise than done: what was used so far
            _usage(stream, fields)
        self.settle(fields["input_tokens"] + fields["output_tokens"])

    def _cancel_generation(self) -> None:
        """The log's `control`: close the provider request now (a stop, the grace over), which
        wakes the relay; it then ends the log with `done` `cancelled`."""
        if self.upstream is not None:
            self.upstream.abort()
        elif not self.opening.done():
            self.opening.cancel()
        elif not self.opening.cancelled() and self.opening.exception() is None:
            self.opening.result().abort()

    def _reader_gone(self, _future: object = None) -> None:
        """The original reader has gone (disconnected, or a send to it failed): from now on the
        generation only appends to the log."""
        if self.attached:
            self.attached = False
            self.fields["client_gone"] = True
            if self.log is not None:
                self.log.reader_left()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        global _open_streams  # a per-process gauge, read by /api/health
        _open_streams += 1
        METRICS.stream_opened()  # pwachat_streams_active, summed over the workers
        fields = self.fields
        stream: ProviderStream | None = None
        enc = SseEncoder()
        self.log = self.streams.open(self.chat_id, self.owner, self._cancel_generation)
        gone = self.gone
        if gone.done():
            self._reader_gone()
        else:
            gone.add_done_callback(self._reader_gone)
        try:
            if self.attached:
                try:
                    await send({"type": "http.response.start", "status": 200, "headers": self.headers})
                except (OSError, RuntimeError):
                    self._reader_gone()
            stream = await self._relay(send, enc)
        except PanicException as exc:
            # A bug in the extension mid-stream (a BaseException): logged once, and the readers
            # still get their terminal event.
            err = as_api_error(exc, scope)
            fields["error"] = err.code
            event = enc.event("error", error_body(err.code, err.message, self.request_id))
            if not self.log.ended:
                self.log.append(event, enc.next_id - 1, True)
            if self.attached:
                with contextlib.suppress(OSError, RuntimeError):
                    await send({"type": "http.response.body", "body": event, "more_body": False})
        finally:
            _open_streams -= 1
            METRICS.stream_closed()
            gone.remove_done_callback(self._reader_gone)
            gone.cancel()
            log_ = self.log
            if not log_.ended:  # cancelled from outside (the server going away): end it anyway
                log_.append(b"", enc.next_id - 1, True)
            # A stream the provider finished is `done` even if its last send found the reader gone.
            if "error" in fields:
                METRICS.stream_ended("error")
            elif log_.stop_reason in _OUTCOMES:
                METRICS.stream_ended(_OUTCOMES[log_.stop_reason])
            elif "finish_reason" in fields:
                METRICS.stream_ended("done")
            else:
                METRICS.stream_ended("cancelled")
            if not self.opening.done():
                abandon(self.opening)  # still waiting for the head
            elif stream is None and not self.opening.cancelled() and self.opening.exception() is None:
                stream = self.opening.result()
            self._charge(stream)  # (done before the terminal event, unless cancelled from outside)
            if stream is not None:
                await stream.aclose()

    async def _relay(self, send: Any, enc: SseEncoder) -> ProviderStream | None:
        """Frames go out as soon as nothing more is at hand: what arrives together (the start
        event and the first deltas, the last deltas and `done`) leaves in one send, and nothing is
        held back while waiting for the provider. Each send is first appended to the stream's log.
        Returns the stream for closing."""
        loop = asyncio.get_running_loop()
        fields = self.fields
        log_ = self.log
        assert log_ is not None
        gone = self.gone
        pending = [enc.event("start", _encode(StartEvent(self.chat_id, self.provider, self.model)))]

        async def flush(more: bool) -> None:
            body = b"".join(pending)
            pending.clear()
            n = enc.next_id
            if n != self.logged or not more:
                log_.append(body, n - 1, not more)
                self.logged = n
            fields["events"] = n
            if self.attached:
                try:
                    await send({"type": "http.response.body", "body": body, "more_body": more})
                except (OSError, RuntimeError):  # sending to a reader that has gone
                    self._reader_gone()

        # The head: committed already, so wait on with heartbeats (the task bounds the whole wait).
        last_sent = loop.time()
        while not self.opening.done():
            await flush(True)
            last_sent = loop.time()
            waits = (self.opening, gone) if DRAIN.ending is None else (self.opening, gone, DRAIN.ending)
            await asyncio.wait(waits, timeout=self.heartbeat_s, return_when="FIRST_COMPLETED")
            if DRAIN.over and not self.opening.done():
                self.opening.cancel()  # the provider request goes with it
                await asyncio.wait((self.opening,))
                return await self._fail(ShuttingDown(), enc, pending, flush)
            if not self.opening.done() and self.attached and not gone.done():
                pending.append(PING)
        if self.opening.cancelled():  # a stop, or the grace over, while waiting for the head
            return await self._cancelled(None, enc, pending, flush)
        error = self.opening.exception()
        if error is not None:
            return await self._fail(error, enc, pending, flush)
        stream = self.upstream = self.opening.result()
        alarm = _Alarm(loop, stream)
        _pulling.add(stream)
        if DRAIN.over:  # the grace ended while this stream was being prepared
            stream.abort()
        try:
            if log_.stop_reason is not None:
                return await self._cancelled(stream, enc, pending, flush)
            return await self._pull(stream, alarm, enc, pending, flush, last_sent)
        finally:
            _pulling.discard(stream)
            alarm.cancel()

    async def _pull(
        self,
        stream: ProviderStream,
        alarm: _Alarm,
        enc: SseEncoder,
        pending: list[bytes],
        flush: Any,
        last_sent: float,
    ) -> ProviderStream:
        """The body of the stream: deltas as they arrive, pings while the provider is silent, the
        gap timeout, then `done` or `error`."""
        loop = asyncio.get_running_loop()
        fields = self.fields
        chars = 0
        last_chunk = loop.time()
        deltas = stream.ready()
        while True:
            if deltas:
                if not chars:
                    METRICS.first_token(self.provider, self.model, time.monotonic() - self.started)
                chars += sum(map(len, deltas))
                fields["output_chars"] = chars
                pending.append(enc.deltas(deltas))
            if stream.finished:
                fields["finish_reason"] = stream.finish_reason
                usage = _usage(stream, fields)
                METRICS.provider_call(self.provider, self.model, "", time.monotonic() - self.started)
                METRICS.token_usage(self.provider, self.model, usage.input_tokens, usage.output_tokens)
                self._charge(stream)
                pending.append(enc.event("done", _encode(DoneEvent(stream.finish_reason, usage))))
                await flush(False)
                return stream
            if not stream.failed and pending:  # a failure known already: no need to send first
                await flush(True)
                last_sent = loop.time()
            try:
                alarm.set(min(last_sent + self.heartbeat_s, last_chunk + self.gap_s))
                deltas = await stream.next()
            except TimeoutError:  # the alarm: a heartbeat is due, or the provider is past its gap
                deltas = []
                now = loop.time()
                if now >= last_chunk + self.gap_s:
                    stream.abort()
                    return await self._fail(
                        UpstreamTimeout("The provider stopped sending"), enc, pending, flush, stream
                    )
                if now >= last_sent + self.heartbeat_s:  # (not an alarm that a send overtook)
                    if self.attached:
                        pending.append(PING)
                    else:
                        last_sent = now
                continue
            except ProviderError as err:
                if self.log is not None and self.log.stop_reason is not None:
                    return await self._cancelled(stream, enc, pending, flush)
                # Past the drain's grace, the failure is `end_streams` closing the upstream.
                return await self._fail(ShuttingDown() if DRAIN.over else err, enc, pending, flush, stream)
            last_chunk = loop.time()

    async def _cancelled(
        self, stream: ProviderStream | None, enc: SseEncoder, pending: list[bytes], flush: Any
    ) -> ProviderStream | None:
        """The generation was cancelled (a stop, the grace over, the log past its bound): the log
        ends with `done` and the usage so far, for every reader still there."""
        reason = self.log.stop_reason if self.log is not None else None
        finish = "length" if reason == "too_long" else "cancelled"
        if stream is not None:
            stream.abort()
            usage = _usage(stream, self.fields)
        else:
            usage = Usage(0, 0)
        self.fields.update(finish_reason=finish, stop_reason=reason)
        self._charge(stream)
        pending.append(enc.event("done", _encode(DoneEvent(finish, usage))))
        await flush(False)
        return stream

    async def _fail(
        self, err: BaseException, enc: SseEncoder, pending: list[bytes], flush: Any, stream: Any = None
    ) -> Any:
        if not isinstance(err, ApiError):
            log.error("provider stream failed", exc_info=err, extra={"request_id": self.request_id})
            err = UpstreamError("The provider failed")
        self.fields["error"] = err.code
        if isinstance(err, ProviderError):
            METRICS.upstream_error(self.provider, err.code)
        METRICS.provider_call(self.provider, self.model, err.code, time.monotonic() - self.started)
        self._charge(stream)
        pending.append(enc.event("error", error_body(err.code, err.message, self.request_id)))
        await flush(False)
        return stream
