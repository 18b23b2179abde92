"""OpenAI, and any OpenAI-compatible server (`OPENAI_BASE_URL`: Ollama, vLLM, llama.cpp, ...).

The official `openai` SDK client is made once at start-up for what it knows best: the default base
URL, the auth and identification headers, the retry count. Requests go through the pooled raw path
(`_http.UpstreamHTTP`); answers are decoded by msgspec (JSON) or the native parser (streams).
"""

from __future__ import annotations

import msgspec
from multidict import CIMultiDictProxy

from pwachat.providers._http import RawStream, UpstreamHTTP, error_for_status, read_body
from pwachat.providers.base import (
    ChatInput,
    Completion,
    ProviderError,
    UpstreamError,
    UpstreamRateLimited,
    normalise_finish_reason,
)
from pwachat.settings import Settings

__all__ = ["OpenAIProvider"]

LABEL = "OpenAI"
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


def _map_status(status: int, headers: CIMultiDictProxy[str]) -> ProviderError:
    return error_for_status(LABEL, status, headers)


def _map_event_error(kind: str, _message: str) -> ProviderError:
    # The provider's own message may quote the request; ours names only the kind of failure.
    if kind in ("rate_limit_exceeded", "rate_limit_error", "insufficient_quota"):
        return UpstreamRateLimited(f"{LABEL} is rate limiting requests; try again later")
    return UpstreamError(f"{LABEL} reported an error mid-stream ({kind})")


class OpenAIProvider:
    name = "openai"
    label = LABEL

    def __init__(self, settings: Settings, base_url: str, headers: dict[str, str]) -> None:
        # base_url and headers are the SDK client's own (pwachat/wire.py).
        self.models = settings.openai_models
        self.http = UpstreamHTTP(
            label=LABEL,
            base_url=base_url,
            headers=headers,
            max_retries=settings.upstream_max_retries,
            map_status=_map_status,
        )

    @staticmethod
    def _body(chat: ChatInput, stream: bool) -> bytes:
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

    async def complete(self, chat: ChatInput) -> Completion:
        resp = await self.http.post("/chat/completions", self._body(chat, stream=False))
        raw = await read_body(resp, LABEL)
        try:
            answer = _decode_completion(raw)
            choice = answer.choices[0]
        except (msgspec.DecodeError, IndexError):
            raise UpstreamError(f"{LABEL} answered something unusable") from None
        usage = answer.usage or _Usage()
        return Completion(
            text=choice.message.content or "",
            finish_reason=normalise_finish_reason(choice.finish_reason),
            input_tokens=usage.prompt_tokens,
            output_tokens=usage.completion_tokens,
        )

    async def open_stream(self, chat: ChatInput) -> RawStream:
        resp = await self.http.post("/chat/completions", self._body(chat, stream=True))
        return RawStream(resp, "openai", LABEL, _map_event_error)

    async def aclose(self) -> None:
        await self.http.aclose()
