"""GET /api/chat/stream/{id} (resume) and POST /api/chat/stream/{id}/stop.

The streams themselves, their logs, readers, grace and stop, are `pwachat/streams.py`'s; this
module finds the caller's stream (in this process first, then through the Redis mirror) and
answers. Neither route is rate-limited or costs tokens: a resume generates nothing.
"""

from __future__ import annotations

import contextlib
from typing import Any

from litestar import Request, Response, get, post
from litestar.openapi.datastructures import ResponseSpec
from litestar.types import ASGIApp

from pwachat.auth import authorize
from pwachat.errors import (
    ErrorDetail,
    HttpsRequired,
    InvalidRequest,
    RateLimited,
    StreamNotFound,
    Unauthorized,
    documented,
)
from pwachat.forwarded import client_ip
from pwachat.metrics import METRICS
from pwachat.ratelimit import caller_key
from pwachat.relay import STREAM_HEADERS
from pwachat.schemas import StopResponse, stream_event_document
from pwachat.services import Services
from pwachat.streams import MAX_READERS, StreamLog, follow, until_disconnect

__all__ = ["resume_stream", "stop_stream"]

#: The largest id a resume may name (JavaScript's safe integers: EventSource's ids come from JS).
MAX_EVENT_ID = 2**53 - 1


def _last_event_id(scope: dict[str, Any]) -> int:
    """The `Last-Event-ID` header (what a reconnecting EventSource sends; it wins, being the most
    recent), else `?last_event_id=`, else -1: from the start."""
    raw = None
    for name, value in scope["headers"]:
        if name == b"last-event-id":
            raw, field = value.decode("latin-1").strip(), "Last-Event-ID"
    if not raw:
        for part in scope.get("query_string", b"").decode("latin-1").split("&"):
            key, _, value = part.partition("=")
            if key == "last_event_id":
                raw, field = value.strip(), "last_event_id"
    if not raw:
        return -1
    if not raw.isdigit() or not raw.isascii() or int(raw) > MAX_EVENT_ID:
        message = "must be the id (a non-negative integer) of the last event received"
        raise InvalidRequest(f"Invalid request: {field} {message}", details=[ErrorDetail(field, message)])
    return int(raw)


def _caller(request: Request[Any, Any, Any]) -> tuple[Services, str]:
    svc: Services = request.app.state.services
    token = authorize(request.scope, svc)
    return svc, caller_key(client_ip(request.scope), token)


class _NothingLeft:
    """204 to a reader that has every event of an ended stream: an EventSource stops reconnecting."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})


NOTHING_LEFT = _NothingLeft()


class LocalResume:
    """A resume of a stream this process generates (or has retained)."""

    __slots__ = ("heartbeat_s", "last_event_id", "stream")

    def __init__(self, stream: StreamLog, last_event_id: int, heartbeat_s: float) -> None:
        self.stream = stream
        self.last_event_id = last_event_id
        self.heartbeat_s = heartbeat_s
        stream.reader_came()  # counted from now: the reader limit and the grace see it at once

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        gone = until_disconnect(receive)
        try:
            await send({"type": "http.response.start", "status": 200, "headers": STREAM_HEADERS})
            await follow(self.stream, self.last_event_id, send, gone, self.heartbeat_s)
        except (OSError, RuntimeError):
            pass  # the reader went while being sent to
        finally:
            gone.cancel()
            with contextlib.suppress(BaseException):
                await gone
            self.stream.reader_left()


def _too_many() -> RateLimited:
    return RateLimited(f"This stream already has {MAX_READERS} readers", headers={"Retry-After": "1"})


@get(
    "/chat/stream/{stream_id:str}",
    summary="Resume a stream: the events after Last-Event-ID, then live ones",
    **documented(
        HttpsRequired,
        Unauthorized,
        InvalidRequest,
        StreamNotFound,
        RateLimited,
        ok=ResponseSpec(
            data_container=stream_event_document(),
            generate_examples=False,
            media_type="text/event-stream",
            description="The stream's events after `Last-Event-ID` (or `?last_event_id=`), with their "
            "original ids, then live ones to the terminal event",
        ),
        no_content="The stream has ended and the reader has every event (an EventSource stops reconnecting)",
    ),
)
async def resume_stream(request: Request[Any, Any, Any], stream_id: str) -> ASGIApp:
    svc, owner = _caller(request)
    after = _last_event_id(request.scope)
    heartbeat_s = svc.settings.sse_heartbeat_s
    stream = svc.streams.get(stream_id, owner) if svc.streams.keep else None
    if stream is not None:
        if stream.ended and after >= stream.last_id:
            METRICS.stream_resumed("ok")
            return NOTHING_LEFT
        if stream.readers >= MAX_READERS:
            raise _too_many()
        METRICS.stream_resumed("ok")
        return LocalResume(stream, after, heartbeat_s)
    mirror = svc.streams.mirror
    if mirror is not None:
        remote = await mirror.open_follow(stream_id, owner, after, heartbeat_s)
        if remote is not None:
            METRICS.stream_resumed("ok")
            return NOTHING_LEFT if remote.nothing_left else remote
    METRICS.stream_resumed("not_found")
    raise StreamNotFound()


@post(
    "/chat/stream/{stream_id:str}/stop",
    summary="Stop a stream: the provider request is cancelled, readers get done (cancelled)",
    status_code=200,
    **documented(HttpsRequired, Unauthorized, StreamNotFound),
)
async def stop_stream(request: Request[Any, Any, Any], stream_id: str) -> Response[StopResponse]:
    svc, owner = _caller(request)
    stream = svc.streams.get(stream_id, owner)
    if stream is not None:
        return Response(StopResponse(stopped=stream.stop()))
    mirror = svc.streams.mirror
    if mirror is not None:
        stopped = await mirror.stop(stream_id, owner)
        if stopped is not None:
            return Response(StopResponse(stopped=stopped))
    raise StreamNotFound()
