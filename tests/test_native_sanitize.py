"""Sanitising: the native sanitiser equals the plain-Python reference, error for error.

Honest comparison across Unicode versions: the Rust crate's NFC tables are newer than
Python 3.11's unicodedata (Unicode 14). Normalisation is stable for assigned characters
(Unicode's stability policy: a decomposition never changes once assigned, and new
precomposed characters are excluded from composition), so the strategies draw only code
points assigned in Python's own `unicodedata.unidata_version` (hypothesis' categories come
from that same database: excluding "Cn" excludes what Python calls unassigned) plus the
characters the rules single out. On such text both sides must agree exactly.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

import reference
from pwachat._native import SanitizeError, sanitize, sanitize_chat

SPECIAL = [
    "\r\n", "\r", "\n", "\t", "\0", "\x07", "\x1b", "\x1c", "\x7f", "\x85", "\x9f", "\xa0", " ",
    "\u202a", "\u202e", "\u2066", "\u2069", "\u2028", "\u3000", "\u200b", "\ufeff",
    "e\u0301", "\u0301", "\u2126", "\u1e9b\u0323", "\uac00\u11a8", "\u0344",
]  # fmt: skip
texts = st.lists(
    st.one_of(
        st.characters(blacklist_categories=("Cs", "Cn")),
        st.sampled_from(SPECIAL),
    ),
    max_size=40,
).map("".join)


@given(texts)
def test_sanitize_equals_reference(text: str) -> None:
    assert sanitize(text) == reference.sanitize(text)


@given(texts)
def test_sanitize_is_idempotent(text: str) -> None:
    once = sanitize(text)
    assert sanitize(once) == once


@given(texts, st.lists(texts, max_size=5), st.integers(0, 30))
def test_sanitize_chat_equals_reference(message: str, history: list[str], max_chars: int) -> None:
    try:
        expected = reference.sanitize_chat(message, history, max_chars)
    except reference.SanitizeRefusal as refusal:
        with pytest.raises(SanitizeError) as caught:
            sanitize_chat(message, history, max_chars)
        assert (caught.value.index, caught.value.reason) == (refusal.index, refusal.reason)
    else:
        assert sanitize_chat(message, history, max_chars) == expected


def test_the_rules() -> None:
    assert sanitize("  a\r\nb\rc\0d\x1b[0m\x85e\u202ef\u2066g\u2069\t\n ") == "a\nb\ncd[0mefg"
    assert sanitize("e\u0301") == "\xe9"
    assert sanitize("\u3000x\xa0") == "x"
    assert sanitize("\u200bx") == "\u200bx"  # ZERO WIDTH SPACE is not white space


def test_clean_text_is_returned_as_is() -> None:
    text = "Hello, wörld! " * 3 + "end"
    assert sanitize(text) is text
    message, [item] = sanitize_chat(text, [text], 100)
    assert message is text
    assert item is text


def test_length_counts_code_points_after_sanitising() -> None:
    assert sanitize_chat("é" * 4, [], 4) == ("é" * 4, [])
    assert sanitize_chat("e\u0301" * 4, [], 4) == ("é" * 4, [])
    assert sanitize_chat(" " * 100 + "abcd" + "\0" * 100, [], 4) == ("abcd", [])
    with pytest.raises(SanitizeError) as caught:
        sanitize_chat("é" * 5, [], 4)
    assert caught.value.reason == "too_long"


@pytest.mark.parametrize(
    ("message", "history", "index", "reason", "text"),
    [
        (" \r\n\0 ", [], -1, "empty", "message is empty after sanitising"),
        ("ok", ["fine", "x" * 11], 1, "too_long", "history[1].content is longer than 10 characters"),
        ("ok", ["\u202e"], 0, "empty", "history[0].content is empty after sanitising"),
        ("secret\ud800", [], -1, "lone_surrogate", "message contains a lone surrogate"),
        (
            "ok",
            ["a", "b", "secret\udfff"],
            2,
            "lone_surrogate",
            "history[2].content contains a lone surrogate",
        ),
        # The message is checked first, history in order.
        ("", ["\ud800"], -1, "empty", "message is empty after sanitising"),
        ("ok", ["", "\ud800"], 0, "empty", "history[0].content is empty after sanitising"),
    ],
)
def test_refusals_name_the_item_and_never_echo_it(
    message: str, history: list[str], index: int, reason: str, text: str
) -> None:
    with pytest.raises(SanitizeError) as caught:
        sanitize_chat(message, history, 10)
    assert caught.value.index == index
    assert caught.value.reason == reason
    assert str(caught.value) == text
    assert "secret" not in str(caught.value)
    assert isinstance(caught.value, ValueError)
    assert not isinstance(caught.value, UnicodeError)


def test_sanitize_refuses_lone_surrogates_as_sanitize_error() -> None:
    with pytest.raises(SanitizeError) as caught:
        sanitize("a\udc80b")
    assert (caught.value.index, caught.value.reason) == (-1, "lone_surrogate")


def test_surrogate_pair_in_a_python_str_is_refused_too() -> None:
    # Python keeps "\ud83d\ude00" as two lone surrogates, not U+1F600.
    with pytest.raises(SanitizeError):
        sanitize("\ud83d\ude00")
    assert sanitize("\U0001f600") == "\U0001f600"
