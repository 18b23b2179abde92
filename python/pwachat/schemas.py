"""Request and response bodies. Requests refuse unknown fields; `null` means absent."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

import msgspec
from litestar.params import Body

from pwachat.errors import ErrorBody
from pwachat.settings import PROVIDER_ALIASES, Settings

__all__ = [
    "VISIBLE_TEXT",
    "ChatRequest",
    "ChatResponse",
    "HealthResponse",
    "HistoryItem",
    "ModelInfo",
    "ModelsResponse",
    "RateLimitResponse",
    "StopResponse",
    "Usage",
    "chat_request_document",
    "stream_event_document",
]


class HistoryItem(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    role: Literal["user", "assistant"]
    content: str


class ChatRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    message: str
    provider: str | None = None
    model: str | None = None
    history: list[HistoryItem] | None = None
    temperature: Annotated[float, msgspec.Meta(ge=0, le=2)] | None = None
    max_tokens: Annotated[int, msgspec.Meta(ge=1)] | None = None


# -- the request as the OpenAPI document shows it --------------------------------------------------
# `ChatRequest` decodes; the limits are checked after sanitising, in the contract's order and with
# its error details (`routes/chat.py:prepare`), so it carries no bounds of its own. The document's
# request body is this one instead, built per app from its settings: it accepts what the server
# accepts, but for what a JSON Schema cannot say: lengths are counted after sanitising (which may
# shorten a text, or lengthen it through NFC), the body's total size (MAX_BODY_BYTES), that
# `model` must be one of the named provider's models, that a provider's name may be in any case,
# and that `max_tokens` is written without a fraction (5, not 5.0, which JSON Schema calls equal).

#: Text that sanitising leaves non-empty holds one character that it neither removes (C0 and C1
#: controls but tab and line feed, the bidi overrides and isolates) nor trims (Unicode White_Space):
#: see rust/src/sanitize.rs; tests/test_openapi.py checks that the two agree on every code point.
VISIBLE_TEXT = r"[^\x00-\x20\x7f-\xa0\u1680\u2000-\u200a\u2028\u2029\u202a-\u202f\u205f\u2066-\u2069\u3000]"

# Litestar's OpenAPI generator leaves out two things msgspec knows: `forbid_unknown_fields` (so
# `additionalProperties: false` is said through Litestar's own `Body(schema_extra=...)`) and a
# bound of 0 on an optional field (it tests the bound for truth), restated in `extra_json_schema`'s
# `extra`, which Litestar copies onto the field's schema.
_CLOSED = Body(schema_extra={"additional_properties": False})


def _meta(description: str, **bounds: Any) -> msgspec.Meta:
    extra: dict[str, Any] = {"description": description}
    if zeros := {{"ge": "minimum", "max_length": "max_items"}[k]: 0 for k, v in bounds.items() if v == 0}:
        extra["extra"] = zeros
    return msgspec.Meta(**bounds, extra_json_schema=extra)


def chat_request_document(settings: Settings) -> Any:
    """The annotation of the chat routes' request body in the OpenAPI document: `ChatRequest` with
    this app's rules (MAX_MESSAGE_CHARS, MAX_HISTORY_MESSAGES, MAX_TOKENS, the providers that can
    serve and their models) as msgspec constraints. Never used to decode."""
    chars = settings.max_message_chars
    text = Annotated[
        str,
        msgspec.Meta(
            min_length=1,
            max_length=chars,
            pattern=VISIBLE_TEXT,
            description=f"Sanitised (see the contract), then 1..{chars} code points",
        ),
    ]
    serving = [name for name in settings.provider_models if settings.provider_configured(name)]
    aliases = tuple(alias for alias, name in PROVIDER_ALIASES.items() if name in serving)
    models = tuple(dict.fromkeys(m for name in serving for m in settings.provider_models[name]))
    history_item = msgspec.defstruct(
        "HistoryItem",
        [("role", Literal["user", "assistant"]), ("content", text)],
        frozen=True,
        forbid_unknown_fields=True,
    )
    fields: list[tuple[str, Any, Any]] = [
        ("message", text, msgspec.NODEFAULT),
        (
            "provider",
            Annotated[
                Literal[aliases] if aliases else None,  # type: ignore[valid-type]
                msgspec.Meta(description="One that can serve (see /api/models); absent: the default"),
            ]
            | None,
            None,
        ),
        (
            "model",
            Annotated[
                Literal[models] if models else None,  # type: ignore[valid-type]
                msgspec.Meta(description="One of the provider's models; without `provider`, picks it"),
            ]
            | None,
            None,
        ),
        (
            "history",
            Annotated[
                list[Annotated[history_item, _CLOSED]],  # type: ignore[valid-type]
                _meta("Earlier turns, oldest first", max_length=settings.max_history_messages),
            ]
            | None,
            None,
        ),
        (
            "temperature",
            Annotated[float, _meta(f"Default {settings.temperature:g}", ge=0, le=2)] | None,
            None,
        ),
        (
            "max_tokens",
            Annotated[int, _meta(f"Default {settings.max_tokens}", ge=1, le=settings.max_tokens)] | None,
            None,
        ),
    ]
    document = msgspec.defstruct("ChatRequest", fields, frozen=True, forbid_unknown_fields=True)
    return Annotated[document, _CLOSED]


class Usage(msgspec.Struct, frozen=True, omit_defaults=True):
    """Token counts: the provider's, or the server's own upper-bound estimate where the provider
    reported none (`estimated` then true; absent otherwise, so that reported usage reads as before)."""

    input_tokens: int
    output_tokens: int
    estimated: Annotated[
        bool,
        msgspec.Meta(
            description="True when the provider reported no usage (or only part of it) and the server "
            "counted it itself: an upper bound from the UTF-8 bytes sent and relayed; absent otherwise"
        ),
    ] = False


class ChatResponse(msgspec.Struct, frozen=True):
    id: str
    provider: str
    model: str
    response: str
    finish_reason: str
    usage: Usage


class ModelInfo(msgspec.Struct, frozen=True, omit_defaults=True):
    id: str
    provider: str
    default: bool
    label: str | None = None


class ModelsResponse(msgspec.Struct, frozen=True):
    default_provider: str | None
    models: list[ModelInfo]


class ProviderHealth(msgspec.Struct, frozen=True):
    configured: bool
    models: int
    status: Annotated[
        Literal["ok", "degraded", "disabled"],
        msgspec.Meta(
            description="`ok` when it serves; `degraded` while its circuit breaker is open (it failed "
            "5 times in a row and requests go straight to its fallback, in the worker that answered); "
            "`disabled` when it cannot serve (`configured` false)"
        ),
    ] = "ok"


class RateLimitHealth(msgspec.Struct, frozen=True):
    backend: str
    redis: str


class RuntimeHealth(msgspec.Struct, frozen=True):
    """This worker process's own gauges (an extension of the contract's health body)."""

    pid: int
    tasks: int  # asyncio tasks alive: a leak shows here first
    open_streams: int  # /api/chat/stream responses in progress
    kept_streams: int = 0  # stream logs held for resumes (live ones and ended ones still retained)
    kept_stream_bytes: int = 0  # the events those hold


class HealthResponse(msgspec.Struct, frozen=True):
    status: Literal["ok", "degraded"]
    version: str
    environment: str
    providers: dict[str, ProviderHealth]
    rate_limit: RateLimitHealth
    runtime: RuntimeHealth


class StatusResponse(msgspec.Struct, frozen=True):
    status: str


class WindowCounts(msgspec.Struct, frozen=True):
    per_minute: int
    per_hour: int
    per_day: int


class TokenCounts(msgspec.Struct, frozen=True):
    """The caller's token budget (the tighter of its own and the deployment's): tokens per day,
    tokens left now, whole seconds until one more token fits (0 while one does)."""

    limit: int
    remaining: int
    reset_s: int


class RateLimitResponse(msgspec.Struct, frozen=True):
    backend: str
    limits: WindowCounts
    remaining: WindowCounts
    reset_s: WindowCounts
    tokens: TokenCounts | None = None  # null when budgets are off (TOKENS_PER_DAY=0, no global)


class StopResponse(msgspec.Struct, frozen=True):
    """`POST /api/chat/stream/{id}/stop`: true when the stream was running (it is ended now with
    `done`, `finish_reason: "cancelled"`), false when it had already ended."""

    stopped: bool


# Stream event payloads (what follows `data:` in each event).
class StartEvent(msgspec.Struct, frozen=True):
    id: str
    provider: str
    model: str


class DoneEvent(msgspec.Struct, frozen=True):
    finish_reason: str
    usage: Usage


class DeltaEvent(msgspec.Struct, frozen=True):
    """A `delta` event's payload, for the document (the native encoder writes it: `rust/src/sse.rs`)."""

    content: Annotated[str, msgspec.Meta(min_length=1)]


def _inline(schema: Any, defs: dict[str, Any]) -> Any:
    """`schema` with each `$ref` into `defs` replaced by what it names (none here is recursive)."""
    if isinstance(schema, dict):
        if set(schema) == {"$ref"}:
            return _inline(defs[schema["$ref"].rsplit("/", 1)[-1]], defs)
        return {k: _inline(v, defs) for k, v in schema.items()}
    if isinstance(schema, list):
        return [_inline(v, defs) for v in schema]
    return schema


def stream_event_document() -> Any:
    """What each event of a chat stream is, for the OpenAPI document: one variant per event type,
    its `data` the JSON of that event's payload, whose schema msgspec writes (inlined: a `$ref`
    inside `contentSchema` would not resolve against the document)."""
    # An `error` event carries the error envelope.
    payloads = {"start": StartEvent, "delta": DeltaEvent, "done": DoneEvent, "error": ErrorBody}
    event_id = Annotated[
        str, msgspec.Meta(pattern="^[0-9]+$", description="0 for `start`, then +1 per event")
    ]
    variants = []
    for name, payload in payloads.items():
        generated = msgspec.json.schema(payload)
        content = _inline(generated, generated.pop("$defs", {}))
        data = msgspec.Meta(
            extra_json_schema={
                "description": f"`{payload.__name__}` as JSON",
                "extra": {"content_media_type": "application/json", "content_schema": content},
            }
        )
        fields = [("id", event_id), ("event", Literal[name]), ("data", Annotated[str, data])]
        variants.append(msgspec.defstruct(f"{name.title()}StreamEvent", fields, frozen=True))
    return Union[tuple(variants)]  # noqa: UP007 - a union built at run time
