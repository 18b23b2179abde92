"""The native sliding-window limiter against the pure-Python one and the exact sliding log."""

from __future__ import annotations

import math
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pwachat._native import Decision, RateLimiter, WindowState
from reference import RefDecision, SlidingLog, SlidingWindowCounter, now_ms

T0 = 1_699_999_980.0  # an arbitrary instant on a minute boundary

window_lists = st.lists(st.tuples(st.integers(1, 6), st.integers(1, 10)), min_size=1, max_size=3)
# (key, seconds since the previous operation, check or peek)
operations = st.lists(
    st.tuples(st.sampled_from("abc"), st.floats(0, 4, allow_nan=False), st.booleans()),
    max_size=60,
)


def same(native: Decision, ref_decision: RefDecision) -> None:
    assert native.allowed == ref_decision.allowed
    assert native.retry_after == ref_decision.retry_after
    assert [(w.limit, w.window_s, w.remaining, w.reset_s) for w in native.windows] == [
        (w.limit, w.window_s, w.remaining, w.reset_s) for w in ref_decision.windows
    ]
    tight = ref_decision.tightest
    assert (native.limit, native.window_s, native.remaining, native.reset_s) == (
        tight.limit,
        tight.window_s,
        tight.remaining,
        tight.reset_s,
    )


@given(window_lists, operations)
def test_decisions_equal_the_python_sliding_window_counter(
    windows: list[tuple[int, int]], ops: list[tuple[str, float, bool]]
) -> None:
    native = RateLimiter(windows)
    ref = SlidingWindowCounter(windows)
    now = T0
    for key, dt, consume in ops:
        now += dt
        if consume:
            same(native.check(key, now), ref.check(key, now))
        else:
            same(native.peek(key, now), ref.peek(key, now))


@settings(max_examples=200)
@given(
    st.integers(1, 5),
    st.integers(1, 5),
    st.lists(st.integers(0, 1500), min_size=1, max_size=80),
)
def test_within_the_documented_bound_of_the_exact_log(limit: int, window_s: int, gaps_ms: list[int]) -> None:
    """limiter.rs: <= L per bucket-aligned window, <= 2L - 1 per sliding window, and never a
    refusal while the current and previous buckets together hold fewer than L."""
    native = RateLimiter([(limit, window_s)])
    admitted = SlidingLog([(limit, window_s)])  # used as a log of what native admitted
    w = window_s * 1000
    t = now_ms(T0)
    for gap in gaps_ms:
        t += gap
        bucket_start = t // w * w
        two_buckets = admitted.count("k", bucket_start - w, t + 1)
        allowed = native.check("k", t / 1000).allowed
        if two_buckets + 1 <= limit:
            assert allowed
        if allowed:
            admitted.record("k", t)
        assert admitted.count("k", bucket_start, bucket_start + w) <= limit
        assert admitted.count("k", t - w + 1, t + 1) <= 2 * limit - 1


def test_exact_log_and_native_agree_on_a_burst() -> None:
    native, exact = RateLimiter([(5, 60)]), SlidingLog([(5, 60)])
    assert [native.check("k", T0 + 1).allowed for _ in range(7)] == [
        exact.check("k", T0 + 1) for _ in range(7)
    ]


def test_two_l_minus_one_is_reached() -> None:
    native = RateLimiter([(10, 60)])
    start = 1_699_999_980.0  # a minute boundary
    burst = sum(native.check("k", start + 59.999).allowed for _ in range(20))
    late = sum(native.check("k", start + 60 + 59.8 + i / 1000).allowed for i in range(199))
    assert (burst, late) == (10, 9)


def test_refused_requests_consume_nothing() -> None:
    hammered = RateLimiter([(3, 60), (5, 3600)])
    quiet = RateLimiter([(3, 60), (5, 3600)])
    for limiter in (hammered, quiet):
        assert all(limiter.check("k", T0).allowed for _ in range(3))
    assert not any(hammered.check("k", T0 + i).allowed for i in range(50))
    for t in (T0 + 61, T0 + 90, T0 + 200):
        a, b = hammered.check("k", t), quiet.check("k", t)
        assert (a.allowed, a.remaining, a.windows[1].remaining) == (
            b.allowed,
            b.remaining,
            b.windows[1].remaining,
        )


@given(window_lists, st.lists(st.floats(0, 3, allow_nan=False), max_size=40))
def test_retry_after_is_the_first_whole_second_that_admits(
    windows: list[tuple[int, int]], gaps: list[float]
) -> None:
    native = RateLimiter(windows)
    now = T0
    for gap in gaps:
        now += gap
        decision = native.check("k", now)
        if decision.allowed:
            assert decision.retry_after == 0
            continue
        assert decision.retry_after >= 1
        assert native.peek("k", now + decision.retry_after).allowed
        assert not native.peek("k", now + decision.retry_after - 1).allowed
        # A refusal means some window is full, so the tightest one has remaining 0 and a reset.
        tight = min(decision.windows, key=lambda w: (w.remaining, w.window_s))
        assert decision.remaining == tight.remaining == 0
        assert decision.reset_s == tight.reset_s >= 1


def test_headers_view_of_a_decision() -> None:
    native = RateLimiter([(10, 60), (100, 3600), (500, 86400)])
    first = native.check("k", T0)
    headline = (first.allowed, first.limit, first.remaining, first.reset_s, first.retry_after, first.window_s)
    assert headline == (True, 10, 9, 0, 0, 60)
    assert [(w.limit, w.window_s, w.remaining, w.reset_s) for w in first.windows] == [
        (10, 60, 9, 0),
        (100, 3600, 99, 0),
        (500, 86400, 499, 0),
    ]
    for _ in range(9):
        last = native.check("k", T0)
    assert (last.remaining, last.reset_s) == (0, 66)
    refused = native.check("k", T0 + 1)
    assert (refused.allowed, refused.retry_after, refused.reset_s) == (False, 65, 65)
    assert repr(refused) == (
        "Decision(allowed=False, limit=10, remaining=0, reset_s=65, retry_after=65, window_s=60)"
    )
    assert repr(refused.windows[1]) == "WindowState(limit=100, window_s=3600, remaining=90, reset_s=0)"
    assert isinstance(refused.windows[0], WindowState)


def test_tie_goes_to_the_shortest_window() -> None:
    decision = RateLimiter([(5, 3600), (5, 60)]).peek("k", T0)
    assert (decision.window_s, decision.remaining) == (60, 5)


@pytest.mark.parametrize(
    ("windows", "max_keys"),
    [([], 10), ([(0, 60)], 10), ([(1, 0)], 10), ([(-1, 60)], 10), ([(1, 60)], 0), ([(1, 1)] * 9, 10)],
)
def test_bad_configuration_is_refused(windows: list[tuple[int, int]], max_keys: int) -> None:
    with pytest.raises(ValueError):
        RateLimiter(windows, max_keys=max_keys)


@pytest.mark.parametrize("now", [math.nan, math.inf, -math.inf])
def test_non_finite_now_is_refused(now: float) -> None:
    with pytest.raises(ValueError):
        RateLimiter([(1, 1)]).check("k", now)


def test_system_clock_is_the_default() -> None:
    native = RateLimiter([(2, 86400)])
    assert native.check("k").allowed
    assert native.peek("k").remaining == 1


def test_peek_neither_consumes_nor_creates() -> None:
    native = RateLimiter([(1, 60)])
    assert all(native.peek("k", T0).allowed for _ in range(5))
    assert len(native) == 0
    assert native.check("k", T0).allowed
    assert not native.peek("k", T0).allowed


def test_threads_hammering_one_key_get_exactly_the_limit() -> None:
    native = RateLimiter([(250, 60), (1000, 3600)])
    start = threading.Barrier(8)
    admitted = [0] * 8

    def work(slot: int) -> None:
        start.wait()
        admitted[slot] = sum(native.check("k", T0).allowed for _ in range(200))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(admitted) == 250


def test_idle_keys_are_dropped() -> None:
    native = RateLimiter([(5, 1), (5, 2)])
    for i in range(10_000):
        native.check(f"caller-{i}", T0 + i)
        # A key is dropped by the end of the bucket after its last one, i.e. within
        # 2 x 2 s of its last check: at most 4 of these keys are ever held.
        assert len(native) <= 4
    assert native.peek("caller-0", T0 + 10_000).remaining == 5


def test_cap_evicts_the_least_recently_checked_and_never_refuses_a_newcomer() -> None:
    native = RateLimiter([(1, 3600)], max_keys=3)
    for key in "abc":
        assert native.check(key, T0).allowed
    assert not native.check("a", T0 + 1).allowed  # a is refused but now the most recent
    assert native.check("d", T0 + 2).allowed  # evicts b
    assert len(native) == 3
    assert not native.check("a", T0 + 3).allowed  # a still remembered
    # b was forgotten, so it starts afresh (documented cost of the cap).
    assert native.check("b", T0 + 4).allowed
