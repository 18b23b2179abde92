"""Upstream stream parsing: whatever the network splits, the relay sees what the provider sent."""

from __future__ import annotations

import json

import pytest
from anthropic.types import RawMessageStreamEvent
from hypothesis import given
from hypothesis import strategies as st
from openai.types.chat import ChatCompletionChunk
from pydantic import TypeAdapter

from pwachat._native import SseEncoder, UpstreamFormatError, UpstreamParser
from reference import (
    UpstreamResult,
    anthropic_stream,
    openai_stream,
    parse_sse,
    parse_upstream,
    sse_delta,
)

# Any str a Rust `&str` can hold, with what JSON escapes and SSE splits on over-represented.
texts = st.lists(
    st.one_of(
        st.characters(codec="utf-8"),
        st.sampled_from(["\r\n", "\r", "\n", '"', "\\", "\0", "\u2028", "\ufeff", "😀", "data: x"]),
    ),
    max_size=12,
).map("".join)
line_ends = st.sampled_from(["\n", "\r\n", "\r"])
reasons = st.sampled_from(["stop", "length", "content_filter", "tool_calls", "end_turn", "max_tokens"])
counts = st.integers(0, 2**63)


def feed_split(kind: str, body: bytes, cuts: list[int]) -> tuple[UpstreamResult, UpstreamParser]:
    parser = UpstreamParser(kind)
    deltas: list[str] = []
    start = 0
    for cut in [*sorted(c % (len(body) + 1) for c in cuts), len(body)]:
        deltas += parser.feed(body[start:cut])
        start = cut
    got = UpstreamResult(
        deltas, parser.finish_reason, parser.input_tokens, parser.output_tokens, parser.error, parser.done
    )
    return got, parser


@given(
    deltas=st.lists(st.none() | texts, max_size=8),
    reason=reasons,
    usage=st.none() | st.tuples(counts, counts),
    line_end=line_ends,
    ensure_ascii=st.booleans(),
    bom=st.booleans(),
    cuts=st.lists(st.integers(0, 10**6), max_size=12),
)
def test_openai_stream_split_anywhere_matches_reference(
    deltas: list[str | None],
    reason: str,
    usage: tuple[int, int] | None,
    line_end: str,
    ensure_ascii: bool,
    bom: bool,
    cuts: list[int],
) -> None:
    body = openai_stream(deltas, reason, usage, line_end=line_end, ensure_ascii=ensure_ascii)
    body = b"\xef\xbb\xbf" + body if bom else body
    got, _ = feed_split("openai", body, cuts)
    assert got == parse_upstream("openai", body)
    assert got.deltas == [d for d in deltas if d]
    assert (got.finish_reason, got.done, got.error) == (reason, True, None)
    assert (got.input_tokens, got.output_tokens) == (usage or (0, 0))


@given(
    deltas=st.lists(texts, max_size=8),
    reason=reasons,
    usage=st.tuples(counts, counts),
    line_end=line_ends,
    ensure_ascii=st.booleans(),
    event_field=st.booleans(),
    cuts=st.lists(st.integers(0, 10**6), max_size=12),
)
def test_anthropic_stream_split_anywhere_matches_reference(
    deltas: list[str],
    reason: str,
    usage: tuple[int, int],
    line_end: str,
    ensure_ascii: bool,
    event_field: bool,
    cuts: list[int],
) -> None:
    body = anthropic_stream(
        deltas, reason, usage, line_end=line_end, ensure_ascii=ensure_ascii, event_field=event_field
    )
    got, _ = feed_split("anthropic", body, cuts)
    assert got == parse_upstream("anthropic", body)
    assert got.deltas == [d for d in deltas if d]
    assert got == UpstreamResult(got.deltas, reason, usage[0], usage[1], None, True)


# Events of arbitrary SSE shape: comments, unknown fields, data spread over several lines
# (json.dumps with indent never puts a raw line end inside a string), blank runs.
@st.composite
def noisy_openai_stream(draw: st.DrawFn) -> bytes:
    line_end = draw(line_ends)
    out = ""
    for delta in draw(st.lists(texts, max_size=6)):
        if draw(st.booleans()):
            out += f": {draw(texts).replace(chr(13), '').replace(chr(10), '')}{line_end}"
        if draw(st.booleans()):
            out += f"id: 7{line_end}retry: 100{line_end}unknown{line_end}"
        chunk = {"choices": [{"index": 0, "delta": {"content": delta}}], "x": [1, {"y": None}]}
        indent = draw(st.none() | st.integers(0, 2))
        for line in json.dumps(chunk, indent=indent).split("\n"):
            out += f"data:{draw(st.sampled_from(['', ' ']))}{line}{line_end}"
        out += line_end * draw(st.integers(1, 3))
    return (out + f"data: [DONE]{line_end}{line_end}").encode()


@given(body=noisy_openai_stream(), cuts=st.lists(st.integers(0, 10**6), max_size=20))
def test_event_stream_details_match_the_reference(body: bytes, cuts: list[int]) -> None:
    got, _ = feed_split("openai", body, cuts)
    assert got == parse_upstream("openai", body)
    assert got.done


@given(deltas=st.lists(st.none() | texts, max_size=8), usage=st.none() | st.tuples(counts, counts))
def test_generated_openai_stream_is_what_the_openai_sdk_reads(
    deltas: list[str | None], usage: tuple[int, int] | None
) -> None:
    body = openai_stream(deltas, "stop", usage)
    events, _ = parse_sse(body)
    sdk_deltas = []
    for event in events[:-1]:
        chunk = ChatCompletionChunk.model_validate(json.loads(event.data))
        if chunk.choices and chunk.choices[0].delta.content:
            sdk_deltas.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            assert (chunk.usage.prompt_tokens, chunk.usage.completion_tokens) == usage
    assert events[-1].data == "[DONE]"
    got, _ = feed_split("openai", body, [])
    assert got.deltas == sdk_deltas


_anthropic_event = TypeAdapter(RawMessageStreamEvent)


@given(deltas=st.lists(texts, max_size=8), usage=st.tuples(counts, counts))
def test_generated_anthropic_stream_is_what_the_anthropic_sdk_reads(
    deltas: list[str], usage: tuple[int, int]
) -> None:
    body = anthropic_stream(deltas, "end_turn", usage)
    sdk_deltas = []
    for event in parse_sse(body)[0]:
        if event.type == "ping":  # the SDK skips pings before validating
            continue
        model = _anthropic_event.validate_python(json.loads(event.data))
        assert model.type == event.type
        if model.type == "content_block_delta" and model.delta.type == "text_delta" and model.delta.text:
            sdk_deltas.append(model.delta.text)
        if model.type == "message_delta":
            assert model.usage.output_tokens == usage[1]
            assert model.delta.stop_reason == "end_turn"
    got, _ = feed_split("anthropic", body, [])
    assert got.deltas == sdk_deltas


def test_nothing_is_returned_before_an_event_is_complete() -> None:
    body = openai_stream(["Hello", " world"], "stop", (9, 12))
    first_end = body.index(b"\n\n") + 2
    second_end = body.index(b"\n\n", first_end) + 2
    parser = UpstreamParser("openai")
    assert parser.feed(body[: second_end - 1]) == []
    assert parser.feed(body[second_end - 1 : second_end]) == ["Hello"]
    assert not parser.done
    assert parser.feed(body[second_end:]) == [" world"]
    assert parser.done
    assert (parser.finish_reason, parser.input_tokens, parser.output_tokens) == ("stop", 9, 12)


def test_fresh_parser_state() -> None:
    parser = UpstreamParser("anthropic")
    assert (parser.done, parser.finish_reason, parser.input_tokens, parser.output_tokens) == (
        False,
        None,
        0,
        0,
    )
    assert parser.error is None
    assert parser.feed(b"") == []


def test_anthropic_overloaded_error_ends_the_stream() -> None:
    body = anthropic_stream(["Hi"])
    cut = body.index(b"event: content_block_stop")
    error = b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}'
    error += b"\n\n"
    parser = UpstreamParser("anthropic")
    assert parser.feed(body[:cut] + error + body[cut:]) == ["Hi"]
    assert parser.error == ("overloaded_error", "Overloaded")
    assert parser.done
    assert parser.finish_reason is None
    late = b'event: content_block_delta\ndata: {"delta":{"type":"text_delta","text":"x"}}\n\n'
    assert parser.feed(late) == []


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        ({"message": "Rate limit reached", "type": "requests", "code": "rate_limit"}, "requests"),
        ({"message": "Rate limit reached", "type": None, "code": "rate_limit"}, "rate_limit"),
        ({"message": "Rate limit reached", "type": "", "code": 429}, "error"),
    ],
)
def test_openai_error_chunk(error: dict[str, object], expected: str) -> None:
    body = openai_stream(["a"])
    cut = body.index(b"data: [DONE]")
    body = body[:cut] + f"data: {json.dumps({'error': error})}\n\n".encode()
    parser = UpstreamParser("openai")
    assert parser.feed(body) == ["a"]
    assert parser.error == (expected, "Rate limit reached")
    assert parser.done
    assert parse_upstream("openai", body).error == parser.error


@pytest.mark.parametrize(
    ("kind", "body"),
    [
        ("openai", b'data: {"choices":[{"delta":{"content":"secret"}}]\n\n'),
        ("openai", b'data: ["secret"]\n\n'),
        ("openai", b'data: {"choices":[{"delta":{"content":["secret"]}}]}\n\n'),
        ("openai", b'data: {"choices":[{"delta":"secret"}]}\n\n'),
        ("openai", b'data: {"usage":{"prompt_tokens":"secret"}}\n\n'),
        ("openai", b"data: secret\n\n"),
        ("anthropic", b'event: content_block_delta\ndata: {"delta":{"type":"text_delta","text":7}}\n\n'),
        ("anthropic", b'event: message_delta\ndata: {"delta":{"stop_reason":["secret"]}}\n\n'),
        ("anthropic", b"event: ping\ndata: secret\n\n"),
        ("anthropic", b"data: [DONE]\n\n"),
    ],
)
def test_malformed_events_raise_without_echoing_the_body(kind: str, body: bytes) -> None:
    parser = UpstreamParser(kind)
    with pytest.raises(UpstreamFormatError) as caught:
        parser.feed(body)
    assert "secret" not in str(caught.value)
    assert str(caught.value).startswith(f"{kind} stream")
    assert isinstance(caught.value, ValueError)
    with pytest.raises(ValueError):
        parse_upstream(kind, body)
    # The stream stays broken rather than resynchronising mid-way.
    with pytest.raises(UpstreamFormatError):
        parser.feed(b"data: [DONE]\n\n")


def test_invalid_utf8_raises_but_a_sequence_split_across_reads_does_not() -> None:
    with pytest.raises(UpstreamFormatError, match="UTF-8"):
        UpstreamParser("openai").feed(b"data: \xff\n")
    body = openai_stream(["é😀"])
    at = body.index("é".encode())
    for cut in range(at, at + 6):
        parser = UpstreamParser("openai")
        assert parser.feed(body[:cut]) + parser.feed(body[cut:]) == ["é😀"]


def test_only_the_two_kinds() -> None:
    for kind in ("OpenAI", "", "azure"):
        with pytest.raises(ValueError, match="openai"):
            UpstreamParser(kind)


def test_relay_round_trip_feed_then_deltas() -> None:
    body = openai_stream(["Once", " upon\r\na", "", ' "time"'], "stop", (3, 4))
    encoder = SseEncoder()
    parser = UpstreamParser("openai")
    out = b"".join(encoder.deltas(parser.feed(body[i : i + 7])) for i in range(0, len(body), 7))
    events, _ = parse_sse(out)
    assert [json.loads(e.data)["content"] for e in events] == ["Once", " upon\r\na", ' "time"']
    assert [e.last_event_id for e in events] == ["0", "1", "2"]


# --------------------------------------------------------------------------------------------
# SseEncoder.deltas
# --------------------------------------------------------------------------------------------


@given(contents=st.lists(texts, max_size=10), start=st.integers(0, 2**64 - 50))
def test_deltas_is_delta_for_each_non_empty_item(contents: list[str], start: int) -> None:
    encoder = SseEncoder(start)
    out = encoder.deltas(contents)
    kept = [c for c in contents if c]
    assert out == b"".join(sse_delta(start + i, c) for i, c in enumerate(kept))
    assert encoder.next_id == start + len(kept)
    one_by_one = SseEncoder(start)
    assert out == b"".join(one_by_one.delta(c) for c in kept)


def test_deltas_of_nothing_uses_no_id() -> None:
    encoder = SseEncoder(5)
    assert encoder.deltas([]) == b""
    assert encoder.deltas(["", ""]) == b""
    assert encoder.next_id == 5


def test_deltas_refuses_a_lone_surrogate_and_uses_no_id() -> None:
    encoder = SseEncoder()
    with pytest.raises(UnicodeEncodeError):
        encoder.deltas(["ok", "\ud800"])
    assert encoder.next_id == 0
    with pytest.raises(TypeError):
        encoder.deltas(["ok", 3])  # type: ignore[list-item]
    assert encoder.next_id == 0


def test_deltas_before_a_malformed_event_in_the_same_read_are_kept() -> None:
    good = openai_stream(["d0 ", "d1 "], "stop", None).split(b"data: [DONE]")[0]
    parser = UpstreamParser("openai")
    assert parser.feed(good + b"data: {not json\n\n") == ["d0 ", "d1 "]
    assert parser.failed
    with pytest.raises(UpstreamFormatError):
        parser.feed(b"data: [DONE]\n\n")
