"""The error envelope, and the one table that turns every exception into it.

Whatever fails (routing, validation, the rate limit, a provider, a bug), the client gets
`{"error": {"code", "message", "request_id"[, "details"]}}` with a matching status. Messages are
written here or by our own code; an exception's own text, class name or trace never reaches a body.
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec
from litestar import Request, Response
from litestar.exceptions import (
    HTTPException,
    MethodNotAllowedException,
    NotFoundException,
)
from litestar.status_codes import HTTP_413_REQUEST_ENTITY_TOO_LARGE

from pwachat._native import SanitizeError, SseFieldError, UpstreamFormatError

__all__ = [
    "ApiError",
    "ErrorDetail",
    "InvalidRequest",
    "SanitizeError",
    "SseFieldError",
    "UpstreamFormatError",
    "error_bytes",
    "exception_handlers",
    "log_internal",
    "send_error",
]

log = logging.getLogger("pwachat.errors")

_encode = msgspec.json.Encoder().encode


class ErrorDetail(msgspec.Struct, frozen=True):
    field: str
    message: str


class ErrorInfo(msgspec.Struct, frozen=True, omit_defaults=True):
    code: str
    message: str
    request_id: str | None = None
    details: list[ErrorDetail] | None = None


class ErrorBody(msgspec.Struct, frozen=True):
    error: ErrorInfo


class ApiError(Exception):
    """An error with a contract code; raise it anywhere and the client gets the envelope."""

    status = 500
    code = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        details: list[ErrorDetail] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code
        self.headers = headers or {}
        self.details = details


class InvalidRequest(ApiError):
    status = 400
    code = "invalid_request"


def error_bytes(
    code: str, message: str, request_id: str | None, details: list[ErrorDetail] | None = None
) -> bytes:
    return _encode(ErrorBody(ErrorInfo(code, message, request_id, details)))


def request_id_of(request: Request[Any, Any, Any]) -> str | None:
    return request.scope.get("state", {}).get("request_id")


def _response(
    request: Request[Any, Any, Any],
    status: int,
    code: str,
    message: str,
    headers: dict[str, str] | None = None,
    details: list[ErrorDetail] | None = None,
) -> Response[bytes]:
    return Response(
        content=error_bytes(code, message, request_id_of(request), details),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


def _api_error(request: Request[Any, Any, Any], exc: ApiError) -> Response[bytes]:
    return _response(request, exc.status, exc.code, exc.message, exc.headers, exc.details)


# Litestar's own HTTP exceptions (routing, method, body size) carry messages we did not write and
# may name internals, so each known status gets our text.
_HTTP_CODES = {
    400: ("invalid_request", "The request is not valid"),
    401: ("unauthorized", "A valid bearer token is required"),
    403: ("forbidden", "Forbidden"),
    404: ("not_found", "No such route"),
    405: ("method_not_allowed", "Method not allowed for this route"),
    413: ("payload_too_large", "Request body is too large"),
    415: ("unsupported_media_type", "Content-Type must be application/json"),
    429: ("rate_limited", "Rate limit exceeded"),
}


def _http_exception(request: Request[Any, Any, Any], exc: HTTPException) -> Response[bytes]:
    status = exc.status_code
    if status >= 500:
        return _internal(request, exc)
    code, message = _HTTP_CODES.get(status, ("invalid_request", "The request is not valid"))
    headers = {}
    if isinstance(exc, MethodNotAllowedException) and exc.headers:
        headers = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
    return _response(request, status, code, message, headers)


def log_internal(exc: BaseException, scope: Any) -> None:
    # The trace goes to the log (with the request id); the client only learns that it failed.
    log.error(
        "unhandled exception",
        exc_info=exc,
        extra={"request_id": scope.get("state", {}).get("request_id"), "path": scope["path"]},
    )


def _internal(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    log_internal(exc, request.scope)
    return _response(request, 500, "internal_error", "Internal server error")


async def send_error(
    send: Any,
    status: int,
    code: str,
    message: str,
    scope: Any,
    headers: dict[str, str] | None = None,
    details: list[ErrorDetail] | None = None,
) -> None:
    """The envelope as plain ASGI messages, for the routes served without Litestar (`serve_hot`):
    the same body and headers as `_response` gives the others."""
    body = error_bytes(code, message, scope.get("state", {}).get("request_id"), details)
    raw = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


exception_handlers: dict[int | type[Exception], Any] = {
    ApiError: _api_error,
    NotFoundException: _http_exception,
    MethodNotAllowedException: _http_exception,
    HTTP_413_REQUEST_ENTITY_TOO_LARGE: _http_exception,
    HTTPException: _http_exception,
    Exception: _internal,
}
