"""OpenAI, and any OpenAI-compatible server (`OPENAI_BASE_URL`, or a `PROVIDERS` entry with
`N_FORMAT=openai`: Ollama, vLLM, llama.cpp, Groq, ...): one object per provider of this format.

The official `openai` SDK client is made once at start-up for what it knows best: the default base
URL, the auth and identification headers, the retry count. Requests go through the pooled raw path
(`http_provider.HttpProvider`); answers are decoded by msgspec (JSON) or the native parser (streams).
"""

from __future__ import annotations

import msgspec

from pwachat.providers.base import (
    ChatInput,
    Completion,
    ProviderError,
    UpstreamError,
    UpstreamRateLimited,
    normalise_finish_reason,
)
from pwachat.providers.http_provider import HttpProvider
from pwachat.settings import ProviderSpec, Settings

__all__ = ["OpenAIProvider"]

_encode = msgspec.json.Encoder().encode


class _Message(msgspec.Struct):
    content: str | None = None


class _Choice(msgspec.Struct):
    message: _Message
    finish_reason: str | None = None


class _Usage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class _Completion(msgspec.Struct):
    choices: list[_Choice]
    usage: _Usage | None = None


_decode_completion = msgspec.json.Decoder(_Completion).decode


class OpenAIProvider(HttpProvider):
    kind = "openai"
    path = "/chat/completions"

    def __init__(
        self, settings: Settings, base_url: str, headers: dict[str, str], spec: ProviderSpec | None = None
    ) -> None:
        # `spec`: which provider of the table this is (default the built-in `openai`).
        spec = spec if spec is not None else settings.provider("openai")
        self.name, self.label = spec.name, spec.label
        super().__init__(spec.models, settings, base_url, headers)

    def _body(self, chat: ChatInput, stream: bool) -> bytes:
        messages = [{"role": "system", "content": chat.system}]
        messages.extend({"role": role, "content": content} for role, content in chat.history)
        messages.append({"role": "user", "content": chat.message})
        body: dict[str, object] = {
            "model": chat.model,
            "messages": messages,
            "temperature": chat.temperature,
            # `max_tokens` rather than `max_completion_tokens`: every OpenAI-compatible server knows it.
            "max_tokens": chat.max_tokens,
        }
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return _encode(body)

    def _completion(self, raw: bytes) -> Completion:
        answer = _decode_completion(raw)
        choice = answer.choices[0]
        usage = answer.usage or _Usage()
        return Completion(
            text=choice.message.content or "",
            finish_reason=normalise_finish_reason(choice.finish_reason),
            input_tokens=usage.prompt_tokens,
            output_tokens=usage.completion_tokens,
        )

    def _map_event_error(self, kind: str, message: str) -> ProviderError:
        # The provider's own message may quote the request; ours names only the kind of failure.
        if kind in ("rate_limit_exceeded", "rate_limit_error", "insufficient_quota"):
            return UpstreamRateLimited(f"{self.label} is rate limiting requests; try again later")
        return UpstreamError(f"{self.label} reported an error mid-stream ({kind})")
