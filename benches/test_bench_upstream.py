"""Relaying one provider stream end to end on our side: raw reads in, browser SSE frames out.

Run: pytest benches/test_bench_upstream.py --benchmark-only. One group per provider; compare
the rows: native (UpstreamParser.feed + SseEncoder.deltas per read), the plain Python a
developer would write (split, json.loads, json.dumps), and the SDK's own per-event work
(its SSE decoder, json.loads, then `construct_type` as `_process_response_data` does by
default, or strict pydantic validation as with `_strict_response_validation=True`) followed by
our Python framing. These measure, they do not assert times.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable

import pytest
from anthropic._models import construct_type as anthropic_construct
from anthropic._streaming import SSEDecoder as AnthropicSSEDecoder
from anthropic.types import RawMessageStreamEvent
from openai._models import construct_type as openai_construct
from openai._streaming import SSEDecoder as OpenAISSEDecoder
from openai.types.chat import ChatCompletionChunk
from pydantic import TypeAdapter

import reference
from pwachat._native import SseEncoder, UpstreamParser

# 20 content chunks of the sizes a model streams (a few characters each, some escapes).
TOKENS = [
    "Once",
    " upon",
    " a",
    " time",
    ",",
    " in",
    " a",
    ' "small"',
    " café",
    " by",
    " the",
    " sea",
    ",\n",
    "there",
    " lived",
    " a",
    " curious",
    " robot",
    " 🤖",
    ".",
]


def _reads(body: bytes) -> list[bytes]:
    """One network read per event, as a provider flushes them."""
    return [event + b"\n\n" for event in body.split(b"\n\n") if event]


OPENAI_READS = _reads(reference.openai_stream(TOKENS, "stop", (42, 20)))
ANTHROPIC_READS = _reads(reference.anthropic_stream(TOKENS, "end_turn", (42, 20)))
_anthropic_event: TypeAdapter[RawMessageStreamEvent] = TypeAdapter(RawMessageStreamEvent)


def relay_native(kind: str, reads: list[bytes]) -> list[bytes]:
    parser = UpstreamParser(kind)
    encoder = SseEncoder()
    return [encoder.deltas(parser.feed(read)) for read in reads]


def relay_python_openai(reads: list[bytes]) -> list[bytes]:
    ids = itertools.count()
    out = []
    pending = b""
    for read in reads:
        pending += read
        *events, pending = pending.split(b"\n\n")
        frames = b""
        for event in events:
            for line in event.split(b"\n"):
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    break
                chunk = json.loads(payload)
                if chunk.get("choices") and (content := chunk["choices"][0]["delta"].get("content")):
                    frames += reference.sse_delta(next(ids), content)
        out.append(frames)
    return out


def relay_python_anthropic(reads: list[bytes]) -> list[bytes]:
    ids = itertools.count()
    out = []
    pending = b""
    for read in reads:
        pending += read
        *events, pending = pending.split(b"\n\n")
        frames = b""
        for event in events:
            for line in event.split(b"\n"):
                if not line.startswith(b"data:"):
                    continue
                data = json.loads(line[5:])
                is_text = data["type"] == "content_block_delta" and data["delta"]["type"] == "text_delta"
                if is_text and (text := data["delta"]["text"]):
                    frames += reference.sse_delta(next(ids), text)
        out.append(frames)
    return out


def relay_sdk_openai(reads: list[bytes], build: Callable[[str], ChatCompletionChunk]) -> list[bytes]:
    ids = itertools.count()
    out = []
    for sse in OpenAISSEDecoder().iter_bytes(iter(reads)):
        if sse.data.startswith("[DONE]"):
            break
        chunk = build(sse.data)
        if chunk.choices and (content := chunk.choices[0].delta.content):
            out.append(reference.sse_delta(next(ids), content))
    return out


def relay_sdk_anthropic(reads: list[bytes], build: Callable[[str], RawMessageStreamEvent]) -> list[bytes]:
    ids = itertools.count()
    out = []
    for sse in AnthropicSSEDecoder().iter_bytes(iter(reads)):
        if sse.event in ("ping", None):
            continue
        event = build(sse.data)
        if event.type == "content_block_delta" and event.delta.type == "text_delta" and event.delta.text:
            out.append(reference.sse_delta(next(ids), event.delta.text))
    return out


def _openai_construct(data: str) -> ChatCompletionChunk:
    chunk = openai_construct(type_=ChatCompletionChunk, value=json.loads(data))
    assert isinstance(chunk, ChatCompletionChunk)
    return chunk


def _anthropic_construct(data: str) -> RawMessageStreamEvent:
    return anthropic_construct(type_=RawMessageStreamEvent, value=json.loads(data))  # type: ignore[return-value]


def _frames(out: list[bytes]) -> bytes:
    return b"".join(out)


EXPECTED = b"".join(reference.sse_delta(i, t) for i, t in enumerate(TOKENS))

OPENAI_RELAYS: dict[str, Callable[[], list[bytes]]] = {
    "native": lambda: relay_native("openai", OPENAI_READS),
    "python": lambda: relay_python_openai(OPENAI_READS),
    "sdk-construct": lambda: relay_sdk_openai(OPENAI_READS, _openai_construct),
    "sdk-validate-json": lambda: relay_sdk_openai(OPENAI_READS, ChatCompletionChunk.model_validate_json),
}
ANTHROPIC_RELAYS: dict[str, Callable[[], list[bytes]]] = {
    "native": lambda: relay_native("anthropic", ANTHROPIC_READS),
    "python": lambda: relay_python_anthropic(ANTHROPIC_READS),
    "sdk-construct": lambda: relay_sdk_anthropic(ANTHROPIC_READS, _anthropic_construct),
    "sdk-validate-json": lambda: relay_sdk_anthropic(ANTHROPIC_READS, _anthropic_event.validate_json),
}


def _run(benchmark, relay: Callable[[], list[bytes]]) -> None:  # type: ignore[no-untyped-def]
    # Every row relays the same stream to the same bytes, so the rows compare like with like.
    assert _frames(relay()) == EXPECTED
    benchmark(relay)


@pytest.mark.benchmark(group="relay-openai-20-chunks")
@pytest.mark.parametrize("name", OPENAI_RELAYS)
def test_relay_openai(benchmark, name: str) -> None:  # type: ignore[no-untyped-def]
    _run(benchmark, OPENAI_RELAYS[name])


@pytest.mark.benchmark(group="relay-anthropic-20-chunks")
@pytest.mark.parametrize("name", ANTHROPIC_RELAYS)
def test_relay_anthropic(benchmark, name: str) -> None:  # type: ignore[no-untyped-def]
    _run(benchmark, ANTHROPIC_RELAYS[name])
