"""POST /api/chat and POST /api/chat/stream.

Both run the contract's checks in its order (media type, body size, auth, JSON, validation, rate
limit, provider) in `prepare`, then differ only in how the answer goes out. The stream is committed
(200 + `start`) once the provider has answered its head or `SSE_HEARTBEAT_S` has passed, so a quick
upstream failure is still a plain JSON error with its real status, or, for a provider with a
fallback (`N_FALLBACK`), goes once to that one instead (see `pwachat/providers/__init__.py`).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import msgspec
from litestar import Request, post
from litestar.di import Provide
from litestar.handlers import HTTPRouteHandler
from litestar.openapi.datastructures import ResponseSpec
from litestar.types import ASGIApp

from pwachat._native import SanitizeError, sanitize_chat
from pwachat.auth import authorize
from pwachat.budgets import Ticket, budget_headers, cost
from pwachat.errors import (
    ApiError,
    BudgetExceeded,
    ErrorDetail,
    HttpsRequired,
    InvalidJson,
    InvalidRequest,
    PayloadTooLarge,
    ProviderNotConfigured,
    RateLimited,
    RequestTimeout,
    Unauthorized,
    UnknownModel,
    UnknownProvider,
    UnsupportedMediaType,
    UpstreamError,
    UpstreamRateLimited,
    documented,
)
from pwachat.forwarded import client_ip
from pwachat.metrics import METRICS
from pwachat.providers import (
    Breaker,
    ChatInput,
    Completion,
    Fallback,
    Provider,
    ProviderError,
    UpstreamTimeout,
    fallback_worthy,
)
from pwachat.ratelimit import RateLimitBackend, caller_key, rate_limit_headers, refusal
from pwachat.relay import NO_ANSWER, STREAM_HEADERS, EventStream, abandon, open_upstream, reader_gone
from pwachat.schemas import ChatRequest, ChatResponse, Usage, chat_request_document, stream_event_document
from pwachat.services import Services
from pwachat.settings import Settings

__all__ = ["HOT_ROUTES", "chat_routes"]

_decode_request = msgspec.json.Decoder(ChatRequest).decode
_encode = msgspec.json.Encoder().encode
JSON_TYPE = (b"content-type", b"application/json")
RawApp = Callable[[Any, Any, Any], Awaitable[None]]


@dataclass(slots=True)
class Prepared:
    chat_id: str
    provider: Provider
    chat: ChatInput
    headers: list[tuple[bytes, bytes]]  # the rate-limit headers every later answer carries
    log: dict[str, Any]
    caller: str  # `ratelimit.caller_key`: whose quota, and whose stream
    settle: Callable[[int], None]  # the token reservation replaced by what was used (once)


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
        raise InvalidJson("Request body is empty; send a JSON object")
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
        raise InvalidJson() from None
    try:
        return msgspec.convert(obj, ChatRequest)
    except msgspec.ValidationError as err:
        detail = _validation_detail(err)
        raise InvalidRequest(f"Invalid request: {detail.field} {detail.message}", details=[detail]) from None


def _request_headers(scope: dict[str, Any]) -> tuple[str | None, str | None]:
    """Content-Type and Content-Length, in one pass over the raw headers."""
    ctype = length = None
    for name, value in scope["headers"]:
        if name == b"content-type":
            ctype = value.decode("latin-1")
        elif name == b"content-length":
            length = value.decode("latin-1")
    return ctype, length


async def read_body(receive: Any, limit: int, timeout_s: float) -> bytes:
    """The whole request body from ASGI `receive`, refused past `limit` bytes (chunked bodies have no
    Content-Length to check up front) or when it has not all arrived within `timeout_s` (a body
    that trickles in would otherwise hold its connection, unlimited and costing no quota)."""
    try:
        async with asyncio.timeout(timeout_s):
            message = await receive()
            body = message.get("body", b"")
            if not message.get("more_body", False) and message["type"] == "http.request":
                if len(body) > limit:
                    raise PayloadTooLarge(f"Request body is larger than {limit} bytes")
                return body  # the usual case: one message
            chunks = [body]
            size = len(body)
            while True:
                if message["type"] == "http.disconnect":
                    raise InvalidRequest("The request body ended early")
                if size > limit:
                    raise PayloadTooLarge(f"Request body is larger than {limit} bytes")
                if not message.get("more_body", False):
                    return b"".join(chunks)
                message = await receive()
                body = message.get("body", b"")
                chunks.append(body)
                size += len(body)
    except TimeoutError:
        raise RequestTimeout(f"The request body did not arrive within {timeout_s:g} s") from None


async def prepare(scope: Any, receive: Any, svc: Services) -> Prepared:
    """Every check of the contract, in its order; returns what the provider call needs."""
    settings = svc.settings
    fields: dict[str, Any] = scope["state"]["log"]
    ctype, length = _request_headers(scope)
    if not _is_json(ctype):
        raise UnsupportedMediaType("Content-Type must be application/json")
    if length is not None and length.isdigit() and int(length) > settings.max_body_bytes:
        raise PayloadTooLarge(f"Request body is larger than {settings.max_body_bytes} bytes")
    token = authorize(scope, svc)
    req = _parse(await read_body(receive, settings.max_body_bytes, settings.request_body_timeout_s))

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
    # unknown_provider / unknown_model are validation (400, no quota); a provider without a key is
    # decided after the rate limit, as the contract orders it ("then the rate limit, then the provider").
    name, model = svc.providers.resolve(req.provider, req.model)
    fields.update(provider=name, model=model)

    caller = caller_key(client_ip(scope), token)
    provider = svc.providers.serving.get(name)
    chat = ChatInput(
        model=model or (provider.models[0] if provider is not None else ""),
        system=settings.system_prompt,
        history=[(h.role, c) for h, c in zip(history, contents, strict=True)],
        message=message,
        temperature=settings.temperature if req.temperature is None else req.temperature,
        max_tokens=settings.max_tokens if req.max_tokens is None else req.max_tokens,
    )
    # The request limits and the token reservation, decided together (a provider that cannot serve
    # reserves nothing: it answers 503 before any token could be spent).
    limiter = svc.limiter
    tokens = cost(chat) if provider is not None and limiter.budgets.on else 0
    admission = await limiter.admit(caller, tokens)
    decision = admission.decision
    # Redis decided if it is still up after the hit (a failed round trip leaves it down: local).
    METRICS.ratelimit(admission.allowed, "redis" if getattr(limiter, "up", False) else "local")
    if not decision.allowed:
        raise refusal(decision, svc.policy)
    headers = rate_limit_headers(decision, svc.policy)
    verdict = admission.budget
    if verdict is not None:
        if verdict.refused_by is not None:
            fields["budget"] = verdict.refused_by  # whose budget refused (never the caller's id)
            raise _with_headers(limiter.budgets.refusal(verdict, tokens), headers)
        headers += budget_headers(verdict.decision)
    if provider is None:
        raise _with_headers(svc.providers.not_configured(name), headers)
    fields["model"] = chat.model
    ticket = admission.ticket
    if ticket is not None:
        METRICS.budget_tokens("reserved", ticket.tokens)
        settle = partial(_settle, limiter, ticket)
    else:
        settle = _no_settle
    return Prepared("chat_" + os.urandom(12).hex(), provider, chat, headers, fields, caller, settle)


def _settle(limiter: RateLimitBackend, ticket: Ticket, used: int) -> None:
    if ticket.settled:
        return
    used = max(0, used)
    METRICS.budget_tokens("settled", used)
    if ticket.tokens > used:
        METRICS.budget_tokens("released", ticket.tokens - used)
    limiter.settle(ticket, used)


def _no_settle(used: int) -> None:
    return None


_SANITIZE_REASONS = {
    "empty": "is empty after sanitising",
    "lone_surrogate": "contains a lone surrogate",
}


def _with_headers(err: ApiError, headers: list[tuple[bytes, bytes]]) -> ApiError:
    err.headers = {**{k.decode(): v.decode() for k, v in headers}, **err.headers}
    return err


class JsonAnswer:
    """A finished 200 JSON answer as a bare ASGI app: the hot routes skip Litestar's Response."""

    __slots__ = ("body", "headers")

    def __init__(self, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        self.body = body
        self.headers = [JSON_TYPE, (b"content-length", str(len(body)).encode()), *headers]

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.headers})
        await send({"type": "http.response.body", "body": self.body})


def _fall_back(p: Prepared, fallback: Fallback, reason: str) -> None:
    """The request goes to the fallback: the answer names it, carries X-Fallback-From, is counted;
    `reason` (the failure's code, or `circuit_open`) goes into the access line."""
    METRICS.fallback(fallback.source, fallback.provider.name)
    p.provider = fallback.provider
    p.chat = msgspec.structs.replace(p.chat, model=fallback.model)
    p.headers = [*p.headers, fallback.header]
    p.log.update(
        provider=fallback.provider.name,
        model=fallback.model,
        fallback_from=fallback.source,
        fallback_reason=reason,
    )


async def _complete(p: Prepared, timeout_s: float, breaker: Breaker | None) -> Completion:
    """`p.provider`'s whole answer within `timeout_s`, counted (and told to its breaker)."""
    name, model = p.provider.name, p.chat.model
    started = time.monotonic()
    try:
        async with asyncio.timeout(timeout_s):
            done = await p.provider.complete(p.chat)
    except (TimeoutError, ProviderError) as exc:
        err = (
            exc if isinstance(exc, ProviderError) else UpstreamTimeout("The provider did not answer in time")
        )
        METRICS.upstream_error(name, err.code)
        METRICS.provider_call(name, model, err.code, time.monotonic() - started)
        if breaker is not None:
            breaker.record(err)
        raise err from None
    METRICS.provider_call(name, model, "", time.monotonic() - started)
    if breaker is not None:
        breaker.record(None)
    return done


async def answer_chat(scope: Any, receive: Any, svc: Services) -> JsonAnswer:
    """POST /api/chat: the provider's whole answer, as one JSON body (or its fallback's)."""
    p = await prepare(scope, receive, svc)
    # Each provider gets the whole UPSTREAM_TIMEOUT_S: a fallback after a timeout needs one of its own.
    timeout_s = svc.settings.upstream_timeout_s
    fallback = svc.providers.fallbacks.get(p.provider.name)
    try:
        done = await _answer(p, timeout_s, fallback)
    except BaseException:
        p.settle(0)  # a failed request costs nothing: nothing was answered
        raise
    p.settle(done.input_tokens + done.output_tokens)
    name, model = p.provider.name, p.chat.model
    METRICS.token_usage(name, model, done.input_tokens, done.output_tokens)
    p.log.update(
        finish_reason=done.finish_reason,
        output_chars=len(done.text),
        input_tokens=done.input_tokens,
        output_tokens=done.output_tokens,
    )
    if done.usage_estimated:  # the server's own count: the provider reported none
        p.log["usage_estimated"] = True
    body = ChatResponse(
        id=p.chat_id,
        provider=name,
        model=model,
        response=done.text,
        finish_reason=done.finish_reason,
        usage=Usage(done.input_tokens, done.output_tokens, done.usage_estimated),
    )
    return JsonAnswer(_encode(body), p.headers)


async def _answer(p: Prepared, timeout_s: float, fallback: Fallback | None) -> Completion:
    """The whole answer of the provider or of its fallback, or the error to answer."""
    try:
        if fallback is None:
            done = await _complete(p, timeout_s, None)
        elif fallback.breaker.skips():
            _fall_back(p, fallback, "circuit_open")
            done = await _complete(p, timeout_s, fallback.target_breaker)
        else:
            try:
                done = await _complete(p, timeout_s, fallback.breaker)
            except ProviderError as err:
                if not fallback_worthy(err):
                    raise
                _fall_back(p, fallback, err.code)  # once: the fallback's failure is the answer
                done = await _complete(p, timeout_s, fallback.target_breaker)
    except ProviderError as err:
        p.log["error"] = err.code
        raise _with_headers(err, p.headers) from None
    return done


def _open(p: Prepared, svc: Services, request_id: str, breaker: Breaker | None) -> asyncio.Task[Any]:
    opening = open_upstream(p.provider, p.chat, svc.settings.upstream_timeout_s, request_id)
    if breaker is not None:  # told when the head arrives or the opening fails, committed or not
        opening.add_done_callback(breaker.settle)
    return opening


async def answer_stream(scope: Any, receive: Any, svc: Services) -> RawApp:
    """POST /api/chat/stream: the answer as Server-Sent Events (the provider's, or its fallback's
    when the provider failed before the stream was committed)."""
    p = await prepare(scope, receive, svc)
    try:
        answer = await _commit(p, scope, receive, svc)
    except BaseException:
        p.settle(0)  # failed before anything was committed: it costs nothing
        raise
    if answer is NO_ANSWER:
        p.settle(0)  # the reader left first, and the provider request went with it
    return answer


async def _commit(p: Prepared, scope: Any, receive: Any, svc: Services) -> RawApp:
    """The stream once committed (its relay settles the reservation), or NO_ANSWER, or raises
    the JSON error to answer."""
    settings = svc.settings
    p.log.update(stream=True, events=0, output_chars=0)
    request_id = scope["state"]["request_id"]
    fallback = svc.providers.fallbacks.get(p.provider.name)
    breaker = None
    if fallback is not None:
        breaker = fallback.breaker
        if breaker.skips():
            _fall_back(p, fallback, "circuit_open")
            breaker, fallback = fallback.target_breaker, None
    began = started = time.monotonic()
    opening = _open(p, svc, request_id, breaker)
    gone = reader_gone(receive)
    wait_s = settings.sse_heartbeat_s
    while True:
        try:
            # Wait for the provider's head for up to a heartbeat: a quick failure is still plain JSON.
            await asyncio.wait((opening, gone), timeout=wait_s, return_when="FIRST_COMPLETED")
        except BaseException:
            gone.cancel()
            abandon(opening)  # the request itself was cancelled: take the upstream request with it
            raise
        if gone.done():  # the reader left before anything was committed to it
            p.log["client_gone"] = True
            abandon(opening)
            return NO_ANSWER
        if not opening.done() or (error := opening.exception()) is None:
            break  # committed: the head is in, or the wait is over
        code = getattr(error, "code", "upstream_error")
        METRICS.upstream_error(p.provider.name, code)
        METRICS.provider_call(p.provider.name, p.chat.model, code, time.monotonic() - started)
        if fallback is None or not fallback_worthy(error):
            gone.cancel()
            p.log["error"] = code
            if isinstance(error, ApiError):
                raise _with_headers(error, p.headers)
            raise error
        # Not committed yet: the fallback, once, under the same rule: committed when its head is
        # in or when the request has waited SSE_HEARTBEAT_S in all (the client's wait for a first
        # byte stays one heartbeat at most).
        _fall_back(p, fallback, code)
        breaker, fallback = fallback.target_breaker, None
        wait_s = max(0.0, began + settings.sse_heartbeat_s - time.monotonic())
        started = time.monotonic()
        opening = _open(p, svc, request_id, breaker)
    return EventStream(
        opening=opening,
        chat_id=p.chat_id,
        provider=p.provider.name,
        model=p.chat.model,
        headers=[*STREAM_HEADERS, *p.headers],
        fields=p.log,
        request_id=request_id,
        heartbeat_s=settings.sse_heartbeat_s,
        gap_s=settings.upstream_timeout_s,
        gone=gone,
        started=started,
        streams=svc.streams,
        owner=p.caller,
        settle=p.settle,
    )


#: The chat routes as raw answers: `app.py` dispatches `POST` to exactly these paths straight to
#: them, without Litestar's router (see `ChatFastPath` there).
HOT_ROUTES: dict[str, Callable[[Any, Any, Services], Awaitable[RawApp]]] = {
    "/api/chat": answer_chat,
    "/api/chat/stream": answer_stream,
}


# The Litestar handlers: the routes' declaration for the OpenAPI document, and the same functions
# as the fast path for requests that reach the router (another spelling of the path). Declared per
# app (`chat_routes`), so that the document's request body carries that app's limits.
async def chat(request: Request[Any, Any, Any]) -> ASGIApp:
    return await answer_chat(request.scope, request.receive, request.app.state.services)


async def chat_stream(request: Request[Any, Any, Any]) -> ASGIApp:
    return await answer_stream(request.scope, request.receive, request.app.state.services)


#: What the edge, `prepare` and the provider may answer instead of the 200, in the contract's order.
CHAT_ERRORS = (
    HttpsRequired,  # production, over plain HTTP
    UnsupportedMediaType,
    PayloadTooLarge,
    Unauthorized,
    RequestTimeout,
    InvalidJson,
    InvalidRequest,
    UnknownProvider,
    UnknownModel,
    RateLimited,
    BudgetExceeded,
    ProviderNotConfigured,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamTimeout,
)


def _body_declared_as(annotation: Any) -> Provide:
    def declared(data: Any) -> None:  # pragma: no cover - never called
        """Never resolved: it only shows the OpenAPI generator the request body, which the handlers
        decode themselves (to keep the contract's order of checks and error codes)."""

    declared.__annotations__ = {"data": annotation, "return": None}
    return Provide(declared, sync_to_thread=False)


def chat_routes(settings: Settings) -> list[HTTPRouteHandler]:
    """POST /chat and /chat/stream as Litestar handlers, with `settings`' limits in the document."""
    # A `Provide` of this app's own: Litestar keeps what it parsed of a dependency on it.
    body = {"_chat_body": _body_declared_as(chat_request_document(settings))}
    answer = ResponseSpec(
        data_container=ChatResponse, generate_examples=False, description="The provider's whole answer"
    )
    events = ResponseSpec(
        data_container=stream_event_document(),
        generate_examples=False,
        media_type="text/event-stream",
        description="`start`, then `delta` events as the provider sends text, then `done` or `error`",
    )
    return [
        post(
            "/chat",
            dependencies=body,
            summary="Chat (one JSON answer)",
            status_code=200,
            **documented(*CHAT_ERRORS, rate_limited=True, ok=answer),
        )(chat),
        post(
            "/chat/stream",
            dependencies=body,
            summary="Chat (Server-Sent Events)",
            status_code=200,
            **documented(*CHAT_ERRORS, rate_limited=True, ok=events),
        )(chat_stream),
    ]
