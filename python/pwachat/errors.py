"""The error catalogue: every contract error code with its status and default message, the one
writer of the envelope, and the one mapping of any exception to what the client is told.

Whatever fails (routing, validation, the rate limit, a provider, a bug), the client gets
`{"error": {"code", "message", "request_id"[, "details"]}}` with a matching status. Messages are
written here or by our own code; an exception's own text, class name or trace never reaches a body.
Raise one of the classes below anywhere; `as_api_error` turns anything else into `internal_error`
(logged once, with its trace), and both the Litestar exception handlers and the raw chat routes
answer through `send_error` / `error_response`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException, MethodNotAllowedException
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import Example, OpenAPIHeader, OpenAPIResponse, OpenAPIType, Operation, Schema

from pwachat._native import PanicException, SanitizeError, SseFieldError, UpstreamFormatError

__all__ = [
    "ApiError",
    "BudgetExceeded",
    "ErrorDetail",
    "HttpsRequired",
    "InternalError",
    "InvalidJson",
    "InvalidRequest",
    "MethodNotAllowed",
    "NotFound",
    "PanicException",
    "PayloadTooLarge",
    "ProviderError",
    "ProviderNotConfigured",
    "RateLimited",
    "RequestTimeout",
    "SanitizeError",
    "ShuttingDown",
    "SseFieldError",
    "StreamNotFound",
    "Unauthorized",
    "UnknownModel",
    "UnknownProvider",
    "UnsupportedMediaType",
    "UpstreamError",
    "UpstreamFormatError",
    "UpstreamRateLimited",
    "UpstreamTimeout",
    "as_api_error",
    "documented",
    "error_body",
    "error_response",
    "exception_handlers",
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
    """The envelope (also the OpenAPI document's schema of every error response)."""

    error: ErrorInfo


# -- the catalogue ----------------------------------------------------------------------------------


class ApiError(Exception):
    """An error with a contract code; raise it anywhere and the client gets the envelope."""

    status: int = 500  # class defaults; an instance may carry another (see `as_api_error`)
    code: str = "internal_error"
    default_message: str = "Internal server error"

    def __init__(
        self,
        message: str | None = None,
        *,
        headers: dict[str, str] | None = None,
        details: list[ErrorDetail] | None = None,
    ) -> None:
        self.message = message or self.default_message
        super().__init__(self.message)
        self.headers = headers or {}
        self.details = details


class InternalError(ApiError):
    pass


class InvalidJson(ApiError):
    status, code, default_message = 400, "invalid_json", "Request body is not valid JSON"


class InvalidRequest(ApiError):
    status, code, default_message = 400, "invalid_request", "The request is not valid"


class UnknownProvider(ApiError):
    status, code = 400, "unknown_provider"
    default_message = "Unknown provider; see /api/models for the ones offered"


class UnknownModel(ApiError):
    status, code = 400, "unknown_model"
    default_message = "Unknown model; see /api/models for the ones offered"


class Unauthorized(ApiError):
    status, code, default_message = 401, "unauthorized", "A valid bearer token is required"

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class HttpsRequired(ApiError):
    status, code, default_message = 403, "https_required", "HTTPS is required"


class NotFound(ApiError):
    status, code, default_message = 404, "not_found", "No such route"


class StreamNotFound(ApiError):
    status, code, default_message = 404, "stream_not_found", "No such stream (or it has expired)"


class MethodNotAllowed(ApiError):
    status, code, default_message = 405, "method_not_allowed", "Method not allowed for this route"


class RequestTimeout(ApiError):
    status, code, default_message = 408, "request_timeout", "The request body did not arrive in time"


class PayloadTooLarge(ApiError):
    status, code, default_message = 413, "payload_too_large", "Request body is too large"


class UnsupportedMediaType(ApiError):
    status, code = 415, "unsupported_media_type"
    default_message = "Content-Type must be application/json"


class RateLimited(ApiError):
    status, code, default_message = 429, "rate_limited", "Rate limit exceeded"


class BudgetExceeded(ApiError):
    status, code, default_message = 429, "budget_exceeded", "Token budget exceeded"


class ShuttingDown(ApiError):
    status, code, default_message = 503, "shutting_down", "The server is restarting; try again shortly"


class ProviderError(ApiError):
    """Anything a provider failed at; the providers map their own failures to these subclasses."""

    status, code, default_message = 502, "upstream_error", "The provider failed"


class UpstreamError(ProviderError):
    pass


class UpstreamUnavailable(UpstreamError):
    """The provider is down or overloaded (connection refused or reset, a 5xx, an overloaded
    error): the same answer as `UpstreamError`, and worth another provider (`N_FALLBACK`)."""


class UpstreamRateLimited(ProviderError):
    status, code = 503, "upstream_rate_limited"
    default_message = "The provider is rate limiting requests; try again later"

    def __init__(self, message: str | None = None, retry_after: int | None = None) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after)} if retry_after else None)
        self.retry_after = retry_after


class UpstreamTimeout(ProviderError):
    status, code, default_message = 504, "upstream_timeout", "The provider did not answer in time"


class ProviderNotConfigured(ProviderError):
    status, code, default_message = 503, "provider_not_configured", "No provider is configured"


# -- answering --------------------------------------------------------------------------------------


def error_body(
    code: str, message: str, request_id: str | None, details: list[ErrorDetail] | None = None
) -> bytes:
    """The envelope's bytes: the one place it is written (JSON answers and SSE `error` events)."""
    return _encode(ErrorBody(ErrorInfo(code, message, request_id, details)))


def request_id_of(scope: Any) -> str | None:
    return scope.get("state", {}).get("request_id")


# Litestar's own HTTP exceptions (routing, method, body size) carry messages we did not write and
# may name internals, so each known status gets our class (and its text).
_BY_STATUS: dict[int, type[ApiError]] = {
    cls.status: cls
    for cls in (
        InvalidRequest,
        Unauthorized,
        NotFound,
        MethodNotAllowed,
        PayloadTooLarge,
        UnsupportedMediaType,
    )
}
_BY_STATUS[429] = RateLimited


def as_api_error(exc: BaseException, scope: Any) -> ApiError:
    """What to tell the client about `exc`; anything not ours is logged once with its trace."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, HTTPException) and exc.status_code < 500:
        err = _BY_STATUS.get(exc.status_code, InvalidRequest)()
        err.status = exc.status_code  # a 4xx the contract has no code for keeps its status
        if isinstance(exc, MethodNotAllowedException) and exc.headers:
            err.headers = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
        return err
    # The trace goes to the log (with the request id); the client only learns that it failed. A
    # PanicException (a bug in the extension) is a BaseException: callers catch it explicitly.
    log.error(
        "unhandled exception",
        exc_info=exc,
        extra={"request_id": request_id_of(scope), "path": scope.get("path")},
    )
    return InternalError()


def error_response(err: ApiError, scope: Any) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """Status, raw headers and body of the answer for `err`."""
    body = error_body(err.code, err.message, request_id_of(scope), err.details)
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in err.headers.items()),
    ]
    return err.status, headers, body


async def send_error(send: Any, err: ApiError, scope: Any) -> None:
    """The envelope as plain ASGI messages (the edge, the raw chat routes)."""
    status, headers, body = error_response(err, scope)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _litestar_handler(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    status, headers, body = error_response(as_api_error(exc, request.scope), request.scope)
    return Response(
        content=body,
        status_code=status,
        media_type="application/json",
        headers={k.decode("latin-1"): v.decode("latin-1") for k, v in headers[2:]},
    )


exception_handlers: dict[int | type[Exception], Any] = {Exception: _litestar_handler}


# -- the OpenAPI document ---------------------------------------------------------------------------
# What each route may answer, written from the catalogue: `documented(...)` on a route decorator
# gives one envelope response per status with its codes and messages, and the headers of every
# answer. Litestar 2 documents headers only on the 200 (`response_headers`) and a `ResponseSpec`
# has none, so the operation class that `documented` makes adds them to each response.

_RATE_LIMIT_HEADERS = {
    "X-RateLimit-Limit": ("Requests allowed in the tightest window", 1),
    "X-RateLimit-Remaining": ("Requests left in the tightest window", 0),
    "X-RateLimit-Reset": ("Seconds until the tightest window admits one more request (0: it has room)", 0),
    "RateLimit-Policy": ('The three windows, e.g. `"minute";q=10;w=60, "hour";q=100;w=3600, ...`', None),
    "RateLimit": ('The tightest window, e.g. `"minute";r=7;t=41`', None),
}
_BUDGET_HEADERS = {
    "X-TokenBudget-Limit": ("Tokens a day in the caller's budget (or the deployment's, when tighter)", 1),
    "X-TokenBudget-Remaining": ("Tokens left in it, after this request's reservation", 0),
}
_HEADERS: dict[str, tuple[str, int | None]] = {
    "X-Request-ID": ("The request's id (a valid client-sent one is echoed); also in the error body", None),
    "Retry-After": ("Whole seconds to wait before trying again", 1),
    "WWW-Authenticate": ("`Bearer`", None),
    "X-Fallback-From": ("The provider that failed, when its fallback answered (`N_FALLBACK`)", None),
    **_RATE_LIMIT_HEADERS,
    **_BUDGET_HEADERS,
}

#: The headers an error's answer carries besides X-Request-ID: always (True) or when known (False).
_CARRIES: dict[type[ApiError], dict[str, bool]] = {
    Unauthorized: {"WWW-Authenticate": True},
    RateLimited: {"Retry-After": True, **dict.fromkeys(_RATE_LIMIT_HEADERS, True)},
    BudgetExceeded: {
        "Retry-After": True,
        **dict.fromkeys(_RATE_LIMIT_HEADERS, True),
        **dict.fromkeys(_BUDGET_HEADERS, True),
    },
    ShuttingDown: {"Retry-After": True},
    UpstreamRateLimited: {"Retry-After": False},
}


def _header_doc(name: str, required: bool) -> OpenAPIHeader:
    description, minimum = _HEADERS[name]
    if minimum is None:
        schema = Schema(type=OpenAPIType.STRING)
        if name == "X-Request-ID":
            schema.pattern = "^[A-Za-z0-9._:-]{1,128}$"
    else:
        schema = Schema(type=OpenAPIType.INTEGER, minimum=minimum)
    return OpenAPIHeader(schema=schema, description=description, required=required)


def _headers_of(carried: list[dict[str, bool]]) -> dict[str, OpenAPIHeader]:
    """The headers of one status whose answers carry these: required where every answer always does."""
    names = dict.fromkeys(["X-Request-ID", *(name for c in carried for name in c)])
    return {
        name: _header_doc(name, name == "X-Request-ID" or all(c.get(name, False) for c in carried))
        for name in names
    }


@dataclass
class _Operation(Operation):
    headers: ClassVar[dict[str, dict[str, OpenAPIHeader]]] = {}  # status -> name -> header

    def __post_init__(self) -> None:
        # Only the answers declared (`documented`): Litestar adds a 400 with its own error body to
        # any handler with a path parameter, which a `str` parameter can never fail.
        if self.responses:
            self.responses = {s: r for s, r in self.responses.items() if s in self.headers or s < "400"}
        for status, response in (self.responses or {}).items():
            if isinstance(response, OpenAPIResponse) and status in self.headers:
                response.headers = {**(response.headers or {}), **self.headers[status]}


def _example(cls: type[ApiError]) -> Example:
    value = {
        "error": {"code": cls.code, "message": cls.default_message, "request_id": "4f1c0a9e2b7d6c3a5e8f0b1d"}
    }
    return Example(summary=f"{cls.code}: {cls.default_message}", value=value)


def documented(
    *errors: type[ApiError],
    rate_limited: bool = False,
    ok: ResponseSpec | None = None,
    no_content: str | None = None,
) -> dict[str, Any]:
    """`responses` and `operation_class` for a route decorator that may answer `errors` (and
    `internal_error`, which anything may): one `ErrorBody` response per status, listing its codes,
    and the headers of each answer. With `rate_limited`, the answers given once the limit has
    admitted the request (the 200 and a provider's failure) carry the rate-limit headers too. `ok`
    describes the 200 of a handler whose return annotation does not (a raw ASGI answer);
    `no_content`, when and why it may answer 204 instead."""
    by_status: dict[int, list[type[ApiError]]] = {}
    for cls in dict.fromkeys((*errors, InternalError)):
        by_status.setdefault(cls.status, []).append(cls)
    # Once admitted, the answer may come from a provider's fallback, and then says whose it was.
    admitted = (
        {
            **dict.fromkeys(_RATE_LIMIT_HEADERS, True),
            **dict.fromkeys(_BUDGET_HEADERS, False),
            "X-Fallback-From": False,
        }
        if rate_limited
        else {}
    )

    def carried(cls: type[ApiError]) -> dict[str, bool]:
        after_limit = rate_limited and issubclass(cls, ProviderError)
        return {**(admitted if after_limit else {}), **_CARRIES.get(cls, {})}

    responses = {
        status: ResponseSpec(
            data_container=ErrorBody,
            generate_examples=False,
            description=" ".join(f"`{cls.code}`: {cls.default_message}." for cls in classes),
            examples=[_example(cls) for cls in classes],
        )
        for status, classes in sorted(by_status.items())
    }
    if ok is not None:
        responses = {200: ok, **responses}
    headers = {"200": _headers_of([admitted])}
    if no_content is not None:
        responses = {204: ResponseSpec(data_container=None, description=no_content), **responses}
        headers["204"] = headers["200"]
    headers |= {str(s): _headers_of([carried(cls) for cls in classes]) for s, classes in by_status.items()}
    operation = type("DocumentedOperation", (_Operation,), {"headers": headers})
    return {"responses": responses, "operation_class": operation}
