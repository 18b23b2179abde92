"""Relaying a provider's stream to the client as the contract's SSE events.

`Pump` owns the upstream; `EventStream` is the response: a bare ASGI app that the stream route
returns once the stream is committed. It sends frames itself, rather than through Litestar's
`Stream`, because this is the hot path: one task per stream (the pump) plus one waiting for the
client to leave, no task group, and each network read of the upstream becomes one native parse,
one native framing call and one `send`.

Timing rules (contract, "POST /api/chat/stream"):
- `UPSTREAM_TIMEOUT_S` bounds the wait for the provider's head (inside the pump) and each gap
  between two chunks (here); either ends the stream with an `upstream_timeout` error event.
- While the provider is silent for `SSE_HEARTBEAT_S`, a `: ping` comment goes out.
- The client leaving cancels the pump at once, which closes the upstream connection.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import msgspec

from pwachat._native import SseEncoder, sse_comment
from pwachat.errors import ApiError, error_bytes
from pwachat.providers import ChatInput, Provider, ProviderError, UpstreamError, UpstreamTimeout
from pwachat.schemas import DoneEvent, StartEvent, Usage

__all__ = ["EventStream", "Pump", "open_streams"]

log = logging.getLogger("pwachat.relay")

_encode = msgspec.json.Encoder().encode
PING = sse_comment("ping")
_open_streams = 0


def open_streams() -> int:
    """Streams this process is relaying now (for /api/health's runtime block)."""
    return _open_streams


class Pump:
    """Owns the upstream: opens it, reads its delta batches into a buffer, closes it, whatever happens.

    Running in its own task lets the relay wait on it with a deadline (for heartbeats) without
    cancelling a read half-way, and lets a client disconnect cancel it cleanly: cancelling the task
    closes the upstream connection from inside the task that opened it.
    """

    def __init__(self, provider: Provider, chat: ChatInput, timeout_s: float) -> None:
        self.buf: list[str] = []
        self.opened = False
        self.done = False
        self.error: ProviderError | None = None
        self.finish_reason = "stop"
        self.input_tokens = 0
        self.output_tokens = 0
        self._wake = asyncio.Event()
        self._timeout_s = timeout_s
        self.task = asyncio.get_running_loop().create_task(self._run(provider, chat))

    async def _run(self, provider: Provider, chat: ChatInput) -> None:
        stream = None
        try:
            async with asyncio.timeout(self._timeout_s):
                stream = await provider.open_stream(chat)
            self.opened = True
            self._wake.set()
            async for batch in stream:
                self.buf.extend(batch)
                self._wake.set()
            self.finish_reason = stream.finish_reason
            self.input_tokens = stream.input_tokens
            self.output_tokens = stream.output_tokens
        except TimeoutError:
            self.error = UpstreamTimeout("The provider did not answer in time")
        except ProviderError as err:
            self.error = err
        except Exception:
            log.exception("provider stream failed", extra={"provider": provider.name})
            self.error = UpstreamError("The provider failed")
        finally:
            self.done = True
            self._wake.set()
            if stream is not None:
                await stream.aclose()

    def poke(self, *_: object) -> None:
        """Wake a waiting relay (used when the client goes away)."""
        self._wake.set()

    async def wait(self, timeout_s: float) -> bool:
        """Wait until there is something to do (deltas, the end, a poke); False when time ran out."""
        self._wake.clear()
        if self.buf or self.done:
            return True
        try:
            async with asyncio.timeout(max(timeout_s, 0)):
                await self._wake.wait()
        except TimeoutError:
            return False
        return True

    async def wait_opened(self, timeout_s: float) -> bool:
        """True once the upstream answered its head or failed; False if `timeout_s` passed first."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not (self.opened or self.done):
            if not await self.wait(deadline - loop.time()):
                return False
        return True

    def take(self) -> list[str]:
        out, self.buf = self.buf, []
        return out

    def cancel(self) -> None:
        if not self.task.done():
            self.task.cancel()


async def _until_disconnect(receive: Any) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class EventStream:
    """The committed stream: `start`, then deltas as they arrive, then one `done` or `error`."""

    __slots__ = (
        "chat_id",
        "fields",
        "gap_s",
        "headers",
        "heartbeat_s",
        "model",
        "provider",
        "pump",
        "request_id",
    )

    def __init__(
        self,
        *,
        pump: Pump,
        chat_id: str,
        provider: str,
        model: str,
        headers: list[tuple[bytes, bytes]],
        fields: dict[str, Any],
        request_id: str,
        heartbeat_s: float,
        gap_s: float,
    ) -> None:
        self.pump = pump
        self.chat_id = chat_id
        self.provider = provider
        self.model = model
        self.headers = headers
        self.fields = fields
        self.request_id = request_id
        self.heartbeat_s = heartbeat_s
        self.gap_s = gap_s

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        global _open_streams  # a per-process gauge, read by /api/health
        _open_streams += 1
        watcher: list[asyncio.Task[None]] = []
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.headers})
            await self._relay(receive, send, watcher)
        except (OSError, RuntimeError):
            # Sending to a client that has gone: nothing more to say to it.
            self.fields["client_gone"] = True
        finally:
            _open_streams -= 1
            if watcher:
                watcher[0].cancel()
            if not self.pump.done:
                self.fields["client_gone"] = True
            self.pump.cancel()

    async def _relay(self, receive: Any, send: Any, watcher: list[asyncio.Task[None]]) -> None:
        """Frames go out as soon as nothing more is at hand: everything that arrived together
        (the start event and the first deltas, the last deltas and `done`) leaves in one send,
        and nothing is ever held back while waiting for the provider."""
        loop = asyncio.get_running_loop()
        pump = self.pump
        fields = self.fields
        enc = SseEncoder()
        chars = 0
        pending = [enc.event("start", _encode(StartEvent(self.chat_id, self.provider, self.model)))]
        gone: asyncio.Task[None] | None = None
        last_sent = last_chunk = loop.time()
        while True:
            if gone is not None and gone.done():
                fields["client_gone"] = True
                return
            if pump.buf:
                pieces = pump.take()
                chars += sum(map(len, pieces))
                fields["output_chars"] = chars
                last_chunk = loop.time()
                pending.append(enc.deltas(pieces))
                continue
            if pump.done:
                if pump.error is not None:
                    fields["error"] = pump.error.code
                    pending.append(self._error(enc, pump.error))
                else:
                    fields.update(
                        finish_reason=pump.finish_reason,
                        input_tokens=pump.input_tokens,
                        output_tokens=pump.output_tokens,
                    )
                    usage = Usage(pump.input_tokens, pump.output_tokens)
                    pending.append(enc.event("done", _encode(DoneEvent(pump.finish_reason, usage))))
                await send({"type": "http.response.body", "body": b"".join(pending), "more_body": False})
                fields["events"] = enc.next_id
                return
            now = loop.time()
            if pending:
                await send({"type": "http.response.body", "body": b"".join(pending), "more_body": True})
                fields["events"] = enc.next_id
                pending.clear()
                last_sent = now
            if gone is None:
                # Only a stream that has to wait needs to hear about the client leaving meanwhile.
                gone = loop.create_task(_until_disconnect(receive))
                gone.add_done_callback(pump.poke)
                watcher.append(gone)
            if not pump.opened:
                last_chunk = now  # the head's own deadline is enforced inside the pump
            if await pump.wait(min(last_sent + self.heartbeat_s, last_chunk + self.gap_s) - now):
                continue
            now = loop.time()
            if pump.opened and now >= last_chunk + self.gap_s:
                pump.cancel()
                fields["error"] = "upstream_timeout"
                frame = self._error(enc, UpstreamTimeout("The provider stopped sending"))
                await send({"type": "http.response.body", "body": frame, "more_body": False})
                fields["events"] = enc.next_id
                return
            if now >= last_sent + self.heartbeat_s:
                await send({"type": "http.response.body", "body": PING, "more_body": True})
                last_sent = now

    def _error(self, enc: SseEncoder, err: ApiError) -> bytes:
        return enc.event("error", error_bytes(err.code, err.message, self.request_id))
