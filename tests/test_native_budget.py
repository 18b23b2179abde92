"""The native token budget against its pure-Python reference and the bounds budget.rs documents."""

from __future__ import annotations

import math
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pwachat._native import BudgetDecision, TokenBudget
from reference import RefBudgetDecision, SlidingLog, TokenBudgetRef, now_ms

T0 = 1_700_006_400.0  # an arbitrary instant on a day boundary (and so on a minute's)
U64_MAX = 2**64 - 1


def fields(d: BudgetDecision | RefBudgetDecision) -> tuple[bool, int, int, int, int, int]:
    return (d.allowed, d.limit, d.remaining, d.reset_s, d.retry_after, d.bucket)


tokens = st.integers(0, 50)
# (operation, key, seconds since the previous one (the clock may go back), arguments)
operations = st.lists(
    st.one_of(
        st.tuples(st.just("reserve"), st.sampled_from("abcd"), st.floats(-1.5, 4), tokens),
        st.tuples(st.just("peek"), st.sampled_from("abcd"), st.floats(-1.5, 4), tokens),
        st.tuples(
            st.just("settle"),
            st.sampled_from("abcd"),
            st.floats(-1.5, 4),
            st.tuples(st.integers(0, 50), st.integers(-3, 1), tokens),
        ),
        st.tuples(st.just("charge"), st.sampled_from("abcd"), st.floats(-1.5, 4), tokens),
        st.tuples(
            st.just("sync"),
            st.sampled_from("abcd"),
            st.floats(-1.5, 4),
            st.tuples(st.integers(0, 60), st.integers(0, 60), tokens),
        ),
    ),
    max_size=60,
)


@settings(max_examples=300)
@given(st.integers(1, 40), st.integers(1, 6), st.integers(1, 4), operations)
def test_decisions_equal_the_python_reference(
    limit: int, window_s: int, max_keys: int, ops: list[tuple[str, str, float, object]]
) -> None:
    native = TokenBudget(limit, window_s, max_keys=max_keys)
    ref = TokenBudgetRef(limit, window_s, max_keys)
    reservations: list[tuple[str, int, int]] = []  # (key, bucket, tokens) of admitted reserves
    now = T0
    for op, key, dt, args in ops:
        now += dt
        if op == "reserve":
            assert isinstance(args, int)
            a, b = native.reserve(key, args, now), ref.reserve(key, args, now)
            assert fields(a) == fields(b)
            if a.allowed:
                reservations.append((key, a.bucket, args))
        elif op == "peek":
            assert isinstance(args, int)
            assert fields(native.peek(key, now, tokens=args)) == fields(ref.peek(key, now, args))
        elif op == "settle":
            assert isinstance(args, tuple)
            pick, offset, used = args
            if reservations:  # settle an earlier reservation, under whatever key the op names
                _, bucket, reserved = reservations[pick % len(reservations)]
            else:
                bucket, reserved = now_ms(now) // (window_s * 1000) + offset, pick
            native.settle(key, bucket, reserved, used, now)
            ref.settle(key, bucket, reserved, used, now)
        elif op == "charge":
            assert isinstance(args, int)
            native.charge(key, args, now)
            ref.charge(key, args, now)
        else:
            assert isinstance(args, tuple)
            prev, cur, n = args
            assert fields(native.sync(key, now, prev, cur, tokens=n)) == fields(
                ref.sync(key, now, prev, cur, n)
            )
        assert len(native) == len(ref)
    for key in "abcd":
        assert fields(native.peek(key, now)) == fields(ref.peek(key, now))


@settings(max_examples=200)
@given(
    st.integers(1, 30),
    st.integers(1, 5),
    st.lists(st.tuples(st.integers(0, 1500), st.integers(1, 12)), min_size=1, max_size=80),
)
def test_within_the_documented_bound(limit: int, window_s: int, steps: list[tuple[int, int]]) -> None:
    """budget.rs: reservations admitted in one bucket total at most L, in any interval of length w
    less than 2L, and none is refused while the two buckets hold at most L - n."""
    native = TokenBudget(limit, window_s)
    log = SlidingLog([(limit, window_s)])  # one entry per admitted token
    w = window_s * 1000
    t = now_ms(T0)
    for gap, n in steps:
        t += gap
        at = now_ms(t / 1000)  # the millisecond the native side reads
        bucket_start = at // w * w
        two_buckets = log.count("k", bucket_start - w, at + 1)
        allowed = native.reserve("k", n, t / 1000).allowed
        if two_buckets + n <= limit:
            assert allowed
        if allowed:
            for _ in range(n):
                log.record("k", at)
        assert log.count("k", bucket_start, bucket_start + w) <= limit
        assert log.count("k", at - w + 1, at + 1) < 2 * limit


@given(
    st.integers(1, 100),
    st.integers(1, 10),
    st.lists(st.tuples(st.floats(0, 3), st.integers(1, 120)), max_size=40),
)
def test_retry_after_and_reset_are_the_first_whole_seconds_that_admit(
    limit: int, window_s: int, steps: list[tuple[float, int]]
) -> None:
    native = TokenBudget(limit, window_s)
    now = T0
    for gap, n in steps:
        now += gap
        d = native.reserve("k", n, now)
        if d.allowed:
            assert d.retry_after == 0
        elif n > limit:
            assert d.retry_after == window_s
            assert not native.peek("k", now + 10 * window_s, tokens=n).allowed
        else:
            assert d.retry_after >= 1
            assert native.peek("k", now + d.retry_after, tokens=n).allowed
            assert not native.peek("k", now + d.retry_after - 1, tokens=n).allowed
        if d.reset_s == 0:
            assert d.remaining >= 1
        else:
            assert d.remaining == 0
            assert native.peek("k", now + d.reset_s).allowed
            assert not native.peek("k", now + d.reset_s - 1).allowed


@given(st.integers(1, 1000), st.floats(0, 172_800), st.integers(0, 1000))
def test_a_reserve_is_admitted_exactly_when_it_is_within_remaining(spent: int, later: float, n: int) -> None:
    native = TokenBudget(1000)
    native.reserve("k", spent, T0)
    left = native.peek("k", T0 + later).remaining
    assert native.peek("k", T0 + later, tokens=n).allowed == (n <= left)


def test_a_refused_reserve_consumes_nothing() -> None:
    hammered, quiet = TokenBudget(1000, 60), TokenBudget(1000, 60)
    for budget in (hammered, quiet):
        assert budget.reserve("k", 700, T0).allowed
    refused = [hammered.reserve("k", 301 + i, T0 + i) for i in range(50)]
    assert not any(d.allowed for d in refused)
    assert {d.remaining for d in refused[:5]} == {300}
    for t in (T0 + 61, T0 + 90, T0 + 200):
        assert fields(hammered.peek("k", t)) == fields(quiet.peek("k", t))


def test_reserve_then_settle_what_was_used() -> None:
    budget = TokenBudget(10_000)
    worst = budget.reserve("k", 4_000, T0 + 10)
    assert (worst.allowed, worst.remaining, worst.bucket) == (True, 6_000, int(T0 // 86_400))
    budget.settle("k", worst.bucket, 4_000, 350, T0 + 20)
    assert budget.peek("k", T0 + 20).remaining == 9_650
    # A provider that failed before producing anything costs nothing.
    failed = budget.reserve("k", 4_000, T0 + 30)
    budget.settle("k", failed.bucket, 4_000, 0, T0 + 31)
    assert budget.peek("k", T0 + 31).remaining == 9_650


def test_settle_reaches_the_previous_bucket_but_not_an_older_one() -> None:
    budget = TokenBudget(10_000, 60)
    early = budget.reserve("k", 6_000, T0 + 59)  # a long answer that ends in the next bucket
    budget.settle("k", early.bucket, 6_000, 1_000, T0 + 90)
    # Half-way through the next bucket: 1000 / 2 still counts.
    assert budget.peek("k", T0 + 90).remaining == 9_500
    old = budget.reserve("k", 2_000, T0 + 100)
    budget.reserve("k", 500, T0 + 185)
    budget.settle("k", old.bucket, 2_000, 9_000, T0 + 185)  # two buckets on: too late to count
    assert budget.peek("k", T0 + 185).remaining == 9_500


def test_more_than_the_limit_never_fits_and_is_told_to_wait_a_window() -> None:
    budget = TokenBudget(1_000)
    d = budget.reserve("k", 1_001, T0)
    assert (d.allowed, d.remaining, d.reset_s, d.retry_after) == (False, 1_000, 0, 86_400)
    assert len(budget) == 0


def test_sync_writes_the_stores_counts_even_when_lower() -> None:
    budget = TokenBudget(1_000, 60)
    budget.reserve("k", 900, T0 + 30)
    assert not budget.peek("k", T0 + 30, tokens=200).allowed
    # Other processes settled below their reservations: Redis's lower counts win.
    admitted = budget.sync("k", T0 + 30, 0, 400)
    assert (admitted.allowed, admitted.remaining, admitted.retry_after) == (True, 600, 0)
    assert budget.peek("k", T0 + 30, tokens=200).allowed
    # After Redis refused 700: the decision and Retry-After for those 700.
    refused = budget.sync("k", T0 + 30, 0, 400, tokens=700)
    assert (refused.allowed, refused.remaining, refused.retry_after) == (False, 600, 30 + 15)


def test_charge_counts_without_checking() -> None:
    budget = TokenBudget(1_000, 60)
    budget.charge("k", 1_500, T0)
    d = budget.peek("k", T0)
    assert (d.allowed, d.remaining, d.reset_s) == (False, 0, 81)
    budget.charge("k", U64_MAX, T0)  # saturates
    assert budget.peek("k", T0).remaining == 0
    budget.charge("nobody", 0, T0)
    assert len(budget) == 1


def test_decision_shape() -> None:
    d = TokenBudget(1_000, 60).reserve("k", 10, T0)
    assert repr(d) == (
        f"BudgetDecision(allowed=True, limit=1000, remaining=990, reset_s=0, retry_after=0, "
        f"bucket={int(T0 // 60)})"
    )
    with pytest.raises(AttributeError):
        d.remaining = 5  # type: ignore[misc]


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [((0,), {}), ((-1,), {}), ((1, 0), {}), ((1, 2**40 + 1), {}), ((1,), {"max_keys": 0})],
)
def test_bad_configuration_is_refused(args: tuple[int, ...], kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        TokenBudget(*args, **kwargs)


@pytest.mark.parametrize("now", [math.nan, math.inf, -math.inf, -1.0, -0.001])
def test_bad_instants_are_refused_everywhere(now: float) -> None:
    budget = TokenBudget(10)
    calls = [
        lambda: budget.reserve("k", 1, now),
        lambda: budget.peek("k", now),
        lambda: budget.settle("k", 0, 1, 1, now),
        lambda: budget.charge("k", 1, now),
        lambda: budget.sync("k", now, 0, 0),
    ]
    for call in calls:
        with pytest.raises(ValueError):
            call()
    assert len(budget) == 0


def test_negative_counts_are_refused() -> None:
    budget = TokenBudget(10)
    with pytest.raises(OverflowError):
        budget.reserve("k", -1, T0)
    with pytest.raises(OverflowError):
        budget.settle("k", 0, -1, 0, T0)


def test_system_clock_is_the_default() -> None:
    budget = TokenBudget(1_000)
    d = budget.reserve("k", 100)
    assert d.allowed
    budget.settle("k", d.bucket, 100, 40)
    budget.charge("k", 10)
    assert budget.peek("k").remaining == 950


def test_peek_neither_consumes_nor_creates() -> None:
    budget = TokenBudget(10, 60)
    assert all(budget.peek("k", T0, tokens=10).allowed for _ in range(5))
    assert len(budget) == 0
    assert budget.reserve("k", 10, T0).allowed
    assert not budget.peek("k", T0).allowed


def test_threads_reserving_on_one_key_get_exactly_the_budget() -> None:
    budget = TokenBudget(100_000)
    start = threading.Barrier(8)
    admitted = [0] * 8

    def work(slot: int) -> None:
        start.wait()
        admitted[slot] = sum(7 for _ in range(5_000) if budget.reserve("k", 7, T0).allowed)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(admitted) == 100_000 // 7 * 7


def test_idle_keys_are_dropped() -> None:
    budget = TokenBudget(5, 2)
    for i in range(10_000):
        budget.reserve(f"caller-{i}", 1, T0 + i)
        # A key is dropped by the end of the bucket after its last one, i.e. within 2 x 2 s
        # of its last reserve: at most 4 of these keys are ever held.
        assert len(budget) <= 4
    assert budget.peek("caller-0", T0 + 10_000).remaining == 5


def test_cap_evicts_the_least_recent_and_never_refuses_a_newcomer() -> None:
    budget = TokenBudget(100, max_keys=3)
    for key in "abc":
        assert budget.reserve(key, 100, T0).allowed
    assert not budget.reserve("a", 1, T0 + 1).allowed  # a is refused but now the most recent
    assert budget.reserve("d", 100, T0 + 2).allowed  # evicts b
    assert len(budget) == 3
    assert not budget.reserve("a", 1, T0 + 3).allowed  # a still remembered
    # b was forgotten, so it starts afresh: the cap errs towards admitting.
    assert budget.reserve("b", 100, T0 + 4).allowed
