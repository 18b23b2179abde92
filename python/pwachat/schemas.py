"""Request and response bodies. Requests refuse unknown fields; `null` means absent."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

__all__ = [
    "ChatRequest",
    "ChatResponse",
    "HealthResponse",
    "HistoryItem",
    "ModelInfo",
    "ModelsResponse",
    "RateLimitResponse",
    "Usage",
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


class Usage(msgspec.Struct, frozen=True):
    input_tokens: int
    output_tokens: int


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


class RateLimitHealth(msgspec.Struct, frozen=True):
    backend: str
    redis: str


class RuntimeHealth(msgspec.Struct, frozen=True):
    """This worker process's own gauges (an extension of the contract's health body)."""

    pid: int
    tasks: int  # asyncio tasks alive: a leak shows here first
    open_streams: int  # /api/chat/stream responses in progress


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


class RateLimitResponse(msgspec.Struct, frozen=True):
    backend: str
    limits: WindowCounts
    remaining: WindowCounts
    reset_s: WindowCounts


# Stream event payloads (what follows `data:` in each event).
class StartEvent(msgspec.Struct, frozen=True):
    id: str
    provider: str
    model: str


class DoneEvent(msgspec.Struct, frozen=True):
    finish_reason: str
    usage: Usage
