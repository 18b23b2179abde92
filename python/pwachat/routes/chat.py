"""POST /api/chat and POST /api/chat/stream.

Both run the contract's checks in its order (media type, body size, auth, JSON, validation, rate
limit, provider) in `prepare`, then differ only in how the answer goes out. The stream is committed
(200 + `start`) once the provider has answered its head or `SSE_HEARTBEAT_S` has passed, so a quick
upstream failure is still a plain JSON error with its real status.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import msgspec
from litestar import Request, Response, post
from litestar.datastructures import State
from litestar.di import Provide
from litestar.response import Stream

from pwachat._native import SanitizeError, SseEncoder, sanitize_chat, sse_comment
from pwachat.errors import ApiError, ErrorDetail, InvalidRequest, error_bytes
from pwachat.providers import ChatInput, Provider, ProviderError, UpstreamError, UpstreamTimeout
from pwachat.ratelimit import caller_key, rate_limit_headers, refusal
from pwachat.routes.auth import authorize
from pwachat.schemas import ChatRequest, ChatResponse, DoneEvent, StartEvent, Usage
from pwachat.security import client_ip
from pwachat.services import Services

__all__ = ["chat", "chat_stream", "open_streams"]

log = logging.getLogger("pwachat.chat")

_decode_request = msgspec.json.Decoder(ChatRequest).decode
_encode = msgspec.json.Encoder().encode
PING = sse_comment("ping")
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


_OPEN_STREAMS = 0


def open_streams() -> int:
    """Streams this process is relaying now (for /api/health's runtime block)."""
    return _OPEN_STREAMS


class UnsupportedMediaType(ApiError):
    status = 415
    code = "unsupported_media_type"


class PayloadTooLarge(ApiError):
    status = 413
    code = "payload_too_large"


@dataclass(slots=True)
class Prepared:
    chat_id: str
    provider: Provider
    chat: ChatInput
    headers: dict[str, str]  # the rate-limit headers every later answer carries
    log: dict[str, Any]


def _is_json(content_type: str | None) -> bool:
    return content_type is not None and content_type.split(";", 1)[0].strip().lower() == "application/json"


_AT = re.compile(r"^(?P<msg>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.DOTALL)
_NAMED = re.compile(r"^Object (?:contains unknown|missing required) field `(?P<name>[^`]*)`")


def _validation_detail(err: msgspec.ValidationError) -> ErrorDetail:
    """msgspec's message, with its `$.a[0].b` path turned into a field name and no client value echoed."""
    m = _AT.match(str(err))
    message, path = (m["msg"], m["path"] or "") if m else (str(err), "")
    field = path.lstrip(".")
    named = _NAMED.match(message)
    if named:
        field = f"{field}.{named['name']}" if field else named["name"]
        message = "unknown field" if "unknown" in message else "missing required field"
    elif message.startswith("Invalid enum value"):
        message = "must be 'user' or 'assistant' (the system prompt is set by the server)"
    elif field == "" and message.startswith("Expected `object`"):
        message = "the body must be a JSON object"
    return ErrorDetail(field or "body", message)


def _invalid(field: str, message: str) -> InvalidRequest:
    return InvalidRequest(f"Invalid request: {field} {message}", details=[ErrorDetail(field, message)])


def _not_json(name: str) -> None:
    raise ValueError(name)


def _parse(body: bytes) -> ChatRequest:
    if not body.strip():
        raise ApiError("Request body is empty; send a JSON object", status=400, code="invalid_json")
    try:
        return _decode_request(body)
    except msgspec.ValidationError as err:
        detail = _validation_detail(err)
        raise InvalidRequest(f"Invalid request: {detail.field} {detail.message}", details=[detail]) from None
    except (msgspec.DecodeError, UnicodeDecodeError):
        pass
    # msgspec refuses escaped lone surrogates ("\ud800") as malformed, but they are valid JSON whose
    # text the sanitiser refuses; the stdlib parser accepts them, so ask it before saying invalid_json
    # (and refuse the NaN/Infinity it would otherwise accept: they are not JSON).
    try:
        obj = json.loads(body, parse_constant=_not_json)
    except (ValueError, RecursionError):
        raise ApiError("Request body is not valid JSON", status=400, code="invalid_json") from None
    try:
        return msgspec.convert(obj, ChatRequest)
    except msgspec.ValidationError as err:
        detail = _validation_detail(err)
        raise InvalidRequest(f"Invalid request: {detail.field} {detail.message}", details=[detail]) from None


async def prepare(request: Request[Any, Any, Any], svc: Services) -> Prepared:
    settings = svc.settings
    fields: dict[str, Any] = request.scope["state"]["log"]
    if not _is_json(request.headers.get("content-type")):
        raise UnsupportedMediaType("Content-Type must be application/json")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > settings.max_body_bytes:
        raise PayloadTooLarge(f"Request body is larger than {settings.max_body_bytes} bytes")
    token = authorize(request.scope, svc)
    body = await request.body()  # Litestar enforces MAX_BODY_BYTES while reading chunked bodies
    req = _parse(body)

    history = req.history or []
    if len(history) > settings.max_history_messages:
        raise _invalid("history", f"has more than {settings.max_history_messages} items")
    if req.max_tokens is not None and req.max_tokens > settings.max_tokens:
        raise _invalid("max_tokens", f"must be <= {settings.max_tokens}")
    try:
        message, contents = sanitize_chat(
            req.message, [h.content for h in history], settings.max_message_chars
        )
    except SanitizeError as err:
        field = "message" if err.index < 0 else f"history[{err.index}].content"
        if err.reason == "too_long":
            raise _invalid(field, f"is longer than {settings.max_message_chars} characters") from None
        raise _invalid(field, _SANITIZE_REASONS.get(err.reason, "is not valid text")) from None

    provider, model = svc.providers.resolve(req.provider, req.model)
    fields.update(provider=provider.name, model=model)

    decision = await svc.limiter.hit(caller_key(client_ip(request.scope), token))
    if not decision.allowed:
        raise refusal(decision, svc.policy)
    chat = ChatInput(
        model=model,
        system=settings.system_prompt,
        history=[(h.role, c) for h, c in zip(history, contents, strict=True)],
        message=message,
        temperature=settings.temperature if req.temperature is None else req.temperature,
        max_tokens=settings.max_tokens if req.max_tokens is None else req.max_tokens,
    )
    return Prepared(
        "chat_" + os.urandom(12).hex(), provider, chat, rate_limit_headers(decision, svc.policy), fields
    )


_SANITIZE_REASONS = {
    "empty": "is empty after sanitising",
    "lone_surrogate": "contains a lone surrogate",
}


def _with_headers(err: ApiError, headers: dict[str, str]) -> ApiError:
    err.headers = {**headers, **err.headers}
    return err


def _chat_body_schema(data: ChatRequest) -> None:  # pragma: no cover - never called
    """Never resolved: it only shows the OpenAPI generator the request body, which the handlers
    decode themselves (to keep the contract's order of checks and error codes)."""


_schema_only = {"_chat_body": Provide(_chat_body_schema, sync_to_thread=False)}


@post("/chat", dependencies=_schema_only, summary="Chat (one JSON answer)", status_code=200)
async def chat(request: Request[Any, Any, Any], state: State) -> Response[ChatResponse]:
    svc: Services = state.services
    p = await prepare(request, svc)
    try:
        async with asyncio.timeout(svc.settings.upstream_timeout_s):
            done = await p.provider.complete(p.chat)
    except TimeoutError:
        raise _with_headers(UpstreamTimeout("The provider did not answer in time"), p.headers) from None
    except ProviderError as err:
        p.log["error"] = err.code
        raise _with_headers(err, p.headers) from None
    p.log.update(finish_reason=done.finish_reason, output_chars=len(done.text))
    body = ChatResponse(
        id=p.chat_id,
        provider=p.provider.name,
        model=p.chat.model,
        response=done.text,
        finish_reason=done.finish_reason,
        usage=Usage(done.input_tokens, done.output_tokens),
    )
    return Response(body, headers=p.headers)


@post("/chat/stream", dependencies=_schema_only, summary="Chat (Server-Sent Events)", status_code=200)
async def chat_stream(request: Request[Any, Any, Any], state: State) -> Stream:
    svc: Services = state.services
    p = await prepare(request, svc)
    p.log.update(stream=True, events=0, output_chars=0)
    pump = Pump(p.provider, p.chat, svc.settings.upstream_timeout_s)
    # Not answered within a heartbeat: commit anyway, and let heartbeats cover the rest of the wait.
    if await pump.wait_opened(svc.settings.sse_heartbeat_s) and pump.error is not None and not pump.opened:
        p.log["error"] = pump.error.code
        raise _with_headers(pump.error, p.headers)
    return Stream(
        _relay(p, pump, svc.settings, request.scope["state"]["request_id"]),
        media_type="text/event-stream",
        headers={**p.headers, **STREAM_HEADERS},
    )


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

    async def wait(self, timeout_s: float) -> bool:
        """Wait until there is something to do (deltas, the end); False when the time ran out."""
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


def _error_event(enc: SseEncoder, err: ApiError, request_id: str) -> bytes:
    return enc.event("error", error_bytes(err.code, err.message, request_id))


async def _relay(p: Prepared, pump: Pump, settings: Any, request_id: str) -> AsyncIterator[bytes]:
    global _OPEN_STREAMS  # noqa: PLW0603 - a per-process gauge, read by /api/health
    _OPEN_STREAMS += 1
    loop = asyncio.get_running_loop()
    enc = SseEncoder()
    fields = p.log
    heartbeat = settings.sse_heartbeat_s
    gap_limit = settings.upstream_timeout_s
    events = 1
    chars = 0
    try:
        yield enc.event("start", _encode(StartEvent(p.chat_id, p.provider.name, p.chat.model)))
        fields["events"] = events
        last_sent = last_chunk = loop.time()
        while True:
            if pump.buf:
                pieces = pump.take()
                out = enc.deltas(pieces)
                events = enc.next_id
                chars += sum(map(len, pieces))
                fields.update(events=events, output_chars=chars)
                last_sent = last_chunk = loop.time()
                yield out
                continue
            if pump.done:
                if pump.error is not None:
                    fields["error"] = pump.error.code
                    yield _error_event(enc, pump.error, request_id)
                else:
                    fields.update(
                        finish_reason=pump.finish_reason,
                        input_tokens=pump.input_tokens,
                        output_tokens=pump.output_tokens,
                    )
                    usage = Usage(pump.input_tokens, pump.output_tokens)
                    yield enc.event("done", _encode(DoneEvent(pump.finish_reason, usage)))
                fields["events"] = events + 1
                return
            now = loop.time()
            if not pump.opened:
                last_chunk = now  # the head's own deadline is enforced inside the pump
            if await pump.wait(min(last_sent + heartbeat, last_chunk + gap_limit) - now):
                continue
            now = loop.time()
            if pump.opened and now >= last_chunk + gap_limit:
                pump.cancel()
                fields["error"] = "upstream_timeout"
                yield _error_event(enc, UpstreamTimeout("The provider stopped sending"), request_id)
                fields["events"] = events + 1
                return
            if now >= last_sent + heartbeat:
                yield PING
                last_sent = now
    finally:
        _OPEN_STREAMS -= 1
        if not pump.done:
            fields["client_gone"] = True
        pump.cancel()
