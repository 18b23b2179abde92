"""The offline provider: answers `You said: <message>` in word-sized deltas, no key, no network.

It goes through exactly the same route, limits, framing and logging as the real providers, so it
is what `make run` serves with no keys and what the load bench drives.
"""

from __future__ import annotations

import re

from pwachat.providers.base import ChatInput, Completion
from pwachat.settings import ProviderSpec, Settings

__all__ = ["EchoProvider"]

# A word and the white space after it, so that joining the pieces gives back the whole answer.
_PIECES = re.compile(r"\s*\S+\s*|\s+")
_WORDS = re.compile(r"\S+")


def _answer(chat: ChatInput) -> str:
    return f"You said: {chat.message}"


def _input_tokens(chat: ChatInput) -> int:
    return sum(len(_WORDS.findall(t)) for t in (chat.system, chat.message, *(c for _, c in chat.history)))


def _pieces(text: str, max_tokens: int) -> tuple[list[str], str]:
    pieces = _PIECES.findall(text)
    if len(pieces) > max_tokens:
        return pieces[:max_tokens], "length"
    return pieces, "stop"


class EchoStream:
    """The whole answer is ready at once: one batch, then finished."""

    failed = False
    usage_estimated = False  # echo counts its own pieces

    def __init__(self, pieces: list[str], finish_reason: str, input_tokens: int) -> None:
        self._pieces = pieces
        self.finished = False
        self.finish_reason = finish_reason
        self.input_tokens = input_tokens
        self.output_tokens = len(pieces)

    def ready(self) -> list[str]:
        pieces, self._pieces = self._pieces, []
        self.finished = True
        return pieces

    async def next(self) -> list[str]:
        return self.ready()

    def interrupt(self) -> None:
        return None  # never waits

    def abort(self) -> None:
        self._pieces = []

    async def aclose(self) -> None:
        self._pieces = []


class EchoProvider:
    def __init__(self, settings: Settings, spec: ProviderSpec | None = None) -> None:
        # Nothing to connect to; its entry in the settings' provider table names it.
        spec = spec if spec is not None else settings.provider("echo")
        self.name, self.label, self.models = spec.name, spec.label, spec.models

    async def complete(self, chat: ChatInput) -> Completion:
        pieces, finish = _pieces(_answer(chat), chat.max_tokens)
        return Completion("".join(pieces), finish, _input_tokens(chat), len(pieces))

    async def open_stream(self, chat: ChatInput) -> EchoStream:
        pieces, finish = _pieces(_answer(chat), chat.max_tokens)
        return EchoStream(pieces, finish, _input_tokens(chat))

    async def aclose(self) -> None:
        return None
