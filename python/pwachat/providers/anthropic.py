"""Anthropic (Claude), answering as `claude`.

As for OpenAI: the official `anthropic` SDK client supplies the base URL, the auth and version
headers and the retry count; requests take the pooled raw path and answers are decoded by msgspec
or the native stream parser.
"""

from __future__ import annotations

from collections.abc import Mapping

import msgspec

from pwachat.providers.base import (
    ChatInput,
    Completion,
    ProviderError,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamTimeout,
    normalise_finish_reason,
)
from pwachat.providers.http_provider import HttpProvider
from pwachat.settings import Settings

__all__ = ["AnthropicProvider"]

LABEL = "Anthropic"
_encode = msgspec.json.Encoder().encode


class _Block(msgspec.Struct):
    type: str
    text: str | None = None


class _Usage(msgspec.Struct):
    input_tokens: int = 0
    output_tokens: int = 0


class _Message(msgspec.Struct):
    content: list[_Block]
    stop_reason: str | None = None
    usage: _Usage | None = None


_decode_message = msgspec.json.Decoder(_Message).decode


class AnthropicProvider(HttpProvider):
    name = "claude"
    label = LABEL
    kind = "anthropic"
    path = "/v1/messages"

    def __init__(self, settings: Settings, base_url: str, headers: dict[str, str]) -> None:
        super().__init__(settings.anthropic_models, settings, base_url, headers)

    def _body(self, chat: ChatInput, stream: bool) -> bytes:
        messages = [{"role": role, "content": content} for role, content in chat.history]
        messages.append({"role": "user", "content": chat.message})
        body: dict[str, object] = {
            "model": chat.model,
            "system": chat.system,
            "messages": messages,
            "temperature": chat.temperature,
            "max_tokens": chat.max_tokens,
        }
        if stream:
            body["stream"] = True
        return _encode(body)

    def _completion(self, raw: bytes) -> Completion:
        answer = _decode_message(raw)
        usage = answer.usage or _Usage()
        return Completion(
            text="".join(b.text or "" for b in answer.content if b.type == "text"),
            finish_reason=normalise_finish_reason(answer.stop_reason),
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
        )

    def _map_status(self, status: int, headers: Mapping[str, str]) -> ProviderError:
        if status == 529:
            return UpstreamError(f"{LABEL} is overloaded (HTTP 529)")
        return super()._map_status(status, headers)

    def _map_event_error(self, kind: str, message: str) -> ProviderError:
        if kind == "rate_limit_error":
            return UpstreamRateLimited(f"{LABEL} is rate limiting requests; try again later")
        if kind == "overloaded_error":
            return UpstreamError(f"{LABEL} is overloaded; try again later")
        if kind == "timeout_error":
            return UpstreamTimeout(f"{LABEL} timed out")
        return UpstreamError(f"{LABEL} reported an error mid-stream ({kind})")
