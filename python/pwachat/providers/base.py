"""The one small interface every provider implements, and the errors they may raise.

A provider turns a validated `ChatInput` into either a whole `Completion` (`complete`) or an open
`ProviderStream` (`open_stream`). `open_stream` returns once the upstream has answered its response
head, so that the route can still answer an early failure as plain JSON; the relay then pulls
batches of text deltas from it (all the deltas of one network read, so that it frames them in one
native call) and reads `finish_reason` and the token counts at the end. Providers map their own
failures to the `ProviderError` subclasses below inside their own module; the routes never see an
SDK or transport exception. (The error classes live in `pwachat.errors`, the one catalogue;
they are re-exported here for the providers.)
"""

from __future__ import annotations

from typing import Protocol

import msgspec

from pwachat.errors import (
    ProviderError,
    ProviderNotConfigured,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamTimeout,
    UpstreamUnavailable,
)

__all__ = [
    "ChatInput",
    "Completion",
    "Provider",
    "ProviderError",
    "ProviderNotConfigured",
    "ProviderStream",
    "UpstreamError",
    "UpstreamRateLimited",
    "UpstreamTimeout",
    "UpstreamUnavailable",
    "normalise_finish_reason",
]


class ChatInput(msgspec.Struct, frozen=True):
    """A request as a provider sees it: sanitised, bounded, defaults applied."""

    model: str
    system: str
    history: list[tuple[str, str]]  # (role, content), oldest first
    message: str
    temperature: float
    max_tokens: int


class Completion(msgspec.Struct, frozen=True):
    text: str
    finish_reason: str
    input_tokens: int
    output_tokens: int
    usage_estimated: bool = False  # a count is the server's own: the provider reported none


_FINISH = {
    "stop": "stop",
    "end_turn": "stop",
    "stop_sequence": "stop",
    "tool_use": "stop",
    "tool_calls": "stop",
    "function_call": "stop",
    "length": "length",
    "max_tokens": "length",
    "content_filter": "content_filter",
    "refusal": "content_filter",
}


def normalise_finish_reason(raw: str | None) -> str:
    """The contract's three spellings, whatever the provider's own."""
    return _FINISH.get(raw or "stop", "stop")


class ProviderStream(Protocol):
    """An answered upstream stream, read by pulling batches of text deltas.

    `next()` waits for the next batch (the deltas of one network read) and raises `ProviderError`
    on a failure (after the deltas that came before it); it returns [] once `finished`.
    `interrupt()` makes a pending or the next `next()` raise TimeoutError unless something arrives
    first, losing nothing: the relay keeps one timer per stream for its deadlines (heartbeat, gap)
    instead of a timeout per read. `ready()` returns what has already arrived, without waiting.
    When `finished`, `finish_reason` and the token counts are set. The counts are never a false
    zero: where the provider reported none, they are the server's own upper bound and
    `usage_estimated` is true; read before
    the end (a failure, the reader gone), they are what has been used so far.
    """

    finished: bool
    failed: bool  # the next `next()` raises
    finish_reason: str
    input_tokens: int
    output_tokens: int
    usage_estimated: bool

    def ready(self) -> list[str]: ...

    async def next(self) -> list[str]: ...

    def interrupt(self) -> None: ...

    def abort(self) -> None:
        """Close the upstream connection now (the client has gone)."""

    async def aclose(self) -> None:
        """Release the connection: back to the pool when finished, else closed (idempotent)."""


class Provider(Protocol):
    name: str  # the canonical name: "openai", "claude" or "echo"
    label: str  # human name for /api/models and messages
    models: tuple[str, ...]  # the first is the default

    async def complete(self, chat: ChatInput) -> Completion: ...

    async def open_stream(self, chat: ChatInput) -> ProviderStream: ...

    async def aclose(self) -> None: ...
