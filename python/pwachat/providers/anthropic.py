"""Anthropic (Claude), answering as `claude`, and any Anthropic-compatible server (a `PROVIDERS`
entry with `N_FORMAT=anthropic`): one object per provider of this format.

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
    UpstreamUnavailable,
    normalise_finish_reason,
)
from pwachat.providers.http_provider import HttpProvider
from pwachat.settings import ProviderSpec, Settings

__all__ = ["AnthropicProvider"]

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
    kind = "anthropic"
    path = "/v1/messages"

    def __init__(
        self, settings: Settings, base_url: str, headers: dict[str, str], spec: ProviderSpec | None = None
    ) -> None:
        # `spec`: which provider of the table this is (default the built-in `claude`).
        spec = spec if spec is not None else settings.provider("claude")
        self.name, self.label = spec.name, spec.label
        super().__init__(spec.models, settings, base_url, headers)

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
            return UpstreamUnavailable(f"{self.label} is overloaded (HTTP 529)")
        return super()._map_status(status, headers)

    def _map_event_error(self, kind: str, message: str) -> ProviderError:
        if kind == "rate_limit_error":
            return UpstreamRateLimited(f"{self.label} is rate limiting requests; try again later")
        if kind == "overloaded_error":
            return UpstreamUnavailable(f"{self.label} is overloaded; try again later")
        if kind == "timeout_error":
            return UpstreamTimeout(f"{self.label} timed out")
        return UpstreamError(f"{self.label} reported an error mid-stream ({kind})")
