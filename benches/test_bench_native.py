"""Native vs the plain Python a developer would otherwise write, pair by pair.

Run: pytest benches --benchmark-only. Each group holds one pair; compare the two rows.
These measure, they do not assert times.
"""

from __future__ import annotations

import itertools

import pytest

import reference
from pwachat._native import RateLimiter, SseEncoder, sanitize_chat

DELTA = ' upon a time, "quoted"\nand é'
WINDOWS = [(10, 60), (100, 3600), (500, 86400)]
T0 = 1_699_999_980.0


def _chat() -> tuple[str, list[str]]:
    words = ["Hello", "wörld,", "this", "is", "a", "chat", "message", "with", "text\tand", "lines\n"]
    cycle = itertools.cycle(words)
    message = ""
    while len(message) < 4000:
        message += next(cycle) + " "
    message = message[:4000]
    history = [(message[i * 80 : i * 80 + 400]) for i in range(50)]
    return message, history


@pytest.mark.benchmark(group="sse-delta")
def test_sse_delta_native(benchmark) -> None:  # type: ignore[no-untyped-def]
    encoder = SseEncoder()
    benchmark(encoder.delta, DELTA)


@pytest.mark.benchmark(group="sse-delta")
def test_sse_delta_python(benchmark) -> None:  # type: ignore[no-untyped-def]
    ids = itertools.count()
    benchmark(lambda: reference.sse_delta(next(ids), DELTA))


@pytest.mark.benchmark(group="sanitize-4000-chars-50-history")
def test_sanitize_chat_native(benchmark) -> None:  # type: ignore[no-untyped-def]
    message, history = _chat()
    benchmark(sanitize_chat, message, history, 4000)


@pytest.mark.benchmark(group="sanitize-4000-chars-50-history")
def test_sanitize_chat_python(benchmark) -> None:  # type: ignore[no-untyped-def]
    message, history = _chat()
    benchmark(reference.sanitize_chat, message, history, 4000)


# The limiter check advances the clock by 1 ms per call so that the benches stay in the
# admitted-and-counting path rather than the cheap refusal, across many keys.
def _limiter_bench(benchmark, check) -> None:  # type: ignore[no-untyped-def]
    keys = [f"203.0.113.{i}" for i in range(256)]
    tick = itertools.count()

    def one() -> None:
        i = next(tick)
        check(keys[i % 256], T0 + i / 1000)

    benchmark(one)


@pytest.mark.benchmark(group="limiter-check-3-windows")
def test_limiter_check_native(benchmark) -> None:  # type: ignore[no-untyped-def]
    _limiter_bench(benchmark, RateLimiter(WINDOWS).check)


@pytest.mark.benchmark(group="limiter-check-3-windows")
def test_limiter_check_python(benchmark) -> None:  # type: ignore[no-untyped-def]
    _limiter_bench(benchmark, reference.SlidingWindowCounter(WINDOWS).check)
