"""SSE framing: what a WHATWG-conformant client reads back is what the server framed."""

from __future__ import annotations

import json
import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pwachat import _native
from pwachat._native import SseEncoder, SseFieldError, sse_comment, sse_event
from reference import SseMessage, parse_sse, sse_delta, sse_encode

# Any str a Rust `&str` can hold (no surrogates), with line ends over-represented.
texts = st.lists(
    st.one_of(
        st.characters(codec="utf-8"),
        st.sampled_from(["\r\n", "\r", "\n", "\0", " ", ":", "\u2028", "\x85"]),
    ),
).map("".join)
clean_fields = st.text(st.characters(codec="utf-8", exclude_characters="\r\n\0"))


def lf(text: str) -> str:
    """What a parser returns for `text`: every line end becomes LF."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


@given(data=texts, id=st.none() | st.integers() | clean_fields, event=st.none() | clean_fields)
def test_event_round_trips_through_a_spec_parser(data: str, id: int | str | None, event: str | None) -> None:
    frame = sse_event(data, id=id, event=event)
    events, comments = parse_sse(frame)
    assert events == [SseMessage(event or "message", lf(data), "" if id is None else str(id))]
    assert comments == []
    assert frame == sse_encode(data, id=id, event=event)


@given(data=texts)
def test_bytes_data_frames_like_str(data: str) -> None:
    assert sse_event(data.encode(), event="x") == sse_event(data, event="x")


def test_exact_frames() -> None:
    assert sse_event("hi", id=3, event="delta") == b"id: 3\nevent: delta\ndata: hi\n\n"
    assert sse_event("") == b"data: \n\n"
    assert sse_event("a\n") == b"data: a\ndata: \n\n"
    assert sse_event("a\r\nb\rc") == b"data: a\ndata: b\ndata: c\n\n"


def test_empty_and_trailing_newline_data_are_still_dispatched() -> None:
    assert parse_sse(sse_event(""))[0] == [SseMessage("message", "", "")]
    assert parse_sse(sse_event("\n"))[0] == [SseMessage("message", "\n", "")]


def test_invalid_utf8_bytes_refused() -> None:
    with pytest.raises(ValueError, match="UTF-8"):
        sse_event(b"\xff")


def test_data_of_another_type_refused() -> None:
    with pytest.raises(TypeError):
        sse_event(3)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["1\n", "1\r", "a\0", "\r\nevent: admin"])
def test_field_injection_refused(bad: str) -> None:
    with pytest.raises(SseFieldError):
        sse_event("x", id=bad)
    with pytest.raises(SseFieldError):
        sse_event("x", event=bad)
    assert issubclass(SseFieldError, ValueError)


def test_comments() -> None:
    assert sse_comment() == b": ping\n\n"
    assert sse_comment("a\r\nb") == b": a\n: b\n\n"
    events, comments = parse_sse(sse_comment("a\nb") + sse_event("x"))
    assert comments == ["a", "b"]
    assert events == [SseMessage("message", "x", "")]


@given(content=texts)
def test_delta_is_json_dumps_byte_for_byte(content: str) -> None:
    frame = SseEncoder(41).delta(content)
    assert frame == sse_delta(41, content)
    [event], _ = parse_sse(frame)
    assert event.type == "delta"
    assert event.last_event_id == "41"
    assert json.loads(event.data) == {"content": content}


def test_delta_keeps_line_separators_raw_like_json_dumps() -> None:
    assert b'"\xe2\x80\xa8\x7f\\u001f"' in SseEncoder().delta("\u2028\x7f\x1f")


def test_delta_refuses_lone_surrogates() -> None:
    encoder = SseEncoder()
    with pytest.raises(ValueError):
        encoder.delta("\ud800")


def test_a_stream_has_rising_ids_from_start_id() -> None:
    encoder = SseEncoder()
    assert encoder.next_id == 0
    stream = (
        encoder.event("start", b'{"id":"chat_1"}')
        + encoder.delta("Once")
        + sse_comment()
        + encoder.delta(" upon\na time")
        + encoder.event("done", '{"finish_reason":"stop"}')
    )
    events, comments = parse_sse(stream)
    assert [(e.type, e.last_event_id) for e in events] == [
        ("start", "0"),
        ("delta", "1"),
        ("delta", "2"),
        ("done", "3"),
    ]
    assert "".join(json.loads(e.data)["content"] for e in events if e.type == "delta") == "Once upon\na time"
    assert comments == ["ping"]
    assert encoder.next_id == 4
    assert SseEncoder(start_id=7).delta("x").startswith(b"id: 7\n")


def test_refused_event_name_uses_no_id() -> None:
    encoder = SseEncoder()
    with pytest.raises(SseFieldError):
        encoder.event("a\nb", "x")
    assert encoder.next_id == 0


def test_ids_are_unique_across_threads() -> None:
    encoder = SseEncoder()
    frames: list[bytes] = []
    lock = threading.Lock()

    def work() -> None:
        mine = [encoder.delta("x") for _ in range(500)]
        with lock:
            frames.extend(mine)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ids = sorted(int(f.split(b"\n", 1)[0].removeprefix(b"id: ")) for f in frames)
    assert ids == list(range(4000))


def test_version() -> None:
    assert _native.__version__ == "0.1.0"
