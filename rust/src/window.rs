//! The sliding-window counter's arithmetic, one implementation for the
//! request limiter (`limiter.rs`, where every request costs 1) and the token
//! budget (`budget.rs`, where a reservation costs its tokens).
//!
//! Per window of `w` seconds and limit `L`, a key keeps two counts: what was
//! admitted in the current epoch-aligned bucket (`bucket = floor(now / w)`)
//! and in the one before. At `e` milliseconds into the current bucket
//!
//! ```text
//! estimate = prev * (w - e) / w + cur
//! ```
//!
//! and a cost `n` fits iff `estimate + n <= L`. Everything is scaled by `w`
//! in milliseconds and computed in 128-bit integers: with counts and limits
//! below 2**64 and windows up to 2**40 s every product is below 2**116, so
//! nothing overflows and there is no float error at a boundary. limiter.rs
//! states and proves the bound this gives.

/// One key's counts in one window, as stored.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Counter {
    pub(crate) bucket: i64,
    pub(crate) prev: u64,
    pub(crate) cur: u64,
}

/// A counter seen at one instant: the bucket that instant falls in, the
/// milliseconds elapsed in it and the counts that apply.
#[derive(Debug, Clone, Copy)]
pub(crate) struct View {
    pub(crate) bucket: i64,
    pub(crate) elapsed: i64,
    pub(crate) prev: u64,
    pub(crate) cur: u64,
}

impl Counter {
    pub(crate) fn fresh(window_ms: i64, now_ms: i64) -> Self {
        Self {
            bucket: now_ms.div_euclid(window_ms),
            prev: 0,
            cur: 0,
        }
    }

    /// If the clock has gone back into an earlier bucket than the counter's,
    /// the counter's bucket is read at its start (`e = 0`), the most cautious
    /// reading.
    pub(crate) fn view(self, window_ms: i64, now_ms: i64) -> View {
        let bucket = now_ms.div_euclid(window_ms);
        if bucket < self.bucket {
            return View {
                bucket: self.bucket,
                elapsed: 0,
                prev: self.prev,
                cur: self.cur,
            };
        }
        let (prev, cur) = match bucket - self.bucket {
            0 => (self.prev, self.cur),
            1 => (self.cur, 0),
            _ => (0, 0),
        };
        View {
            bucket,
            elapsed: now_ms - bucket * window_ms,
            prev,
            cur,
        }
    }
}

impl View {
    pub(crate) fn counter(self) -> Counter {
        Counter {
            bucket: self.bucket,
            prev: self.prev,
            cur: self.cur,
        }
    }
}

/// The longest window: 2**40 s keeps `window_ms` and every product in range.
pub(crate) const MAX_WINDOW_S: i64 = 1 << 40;

/// A limit over a window.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SlidingWindow {
    pub(crate) limit: u64,
    pub(crate) window_s: u64,
    pub(crate) window_ms: i64,
}

impl SlidingWindow {
    /// `None` unless `limit >= 1` and `1 <= window_s <= 2**40`.
    pub(crate) fn new(limit: u64, window_s: i64) -> Option<Self> {
        (limit >= 1 && (1..=MAX_WINDOW_S).contains(&window_s)).then(|| Self {
            limit,
            window_s: window_s as u64,
            window_ms: window_s * 1000,
        })
    }

    pub(crate) fn view(self, counter: Option<Counter>, now_ms: i64) -> View {
        counter
            .unwrap_or_else(|| Counter::fresh(self.window_ms, now_ms))
            .view(self.window_ms, now_ms)
    }

    /// The instant from which a counter last written in `bucket` has expired.
    pub(crate) fn expires_ms(self, bucket: i64) -> i64 {
        bucket.saturating_add(2).saturating_mul(self.window_ms)
    }

    /// `estimate * w_ms`, exact.
    fn scaled_estimate(self, v: View) -> i128 {
        let w = i128::from(self.window_ms);
        i128::from(v.prev) * (w - i128::from(v.elapsed)) + i128::from(v.cur) * w
    }

    /// `estimate + cost <= limit`.
    pub(crate) fn fits(self, v: View, cost: u64) -> bool {
        let w = i128::from(self.window_ms);
        self.scaled_estimate(v) + i128::from(cost) * w <= i128::from(self.limit) * w
    }

    /// `max(0, floor(limit - estimate))`: the largest cost that fits now.
    pub(crate) fn remaining(self, v: View) -> u64 {
        let w = i128::from(self.window_ms);
        let room = i128::from(self.limit) * w - self.scaled_estimate(v);
        floor_div(room.max(0), w) as u64
    }

    /// Milliseconds until `cost` fits if nothing more is admitted meanwhile
    /// (the estimate only falls with time); `None` when it never fits
    /// (`cost > limit`).
    pub(crate) fn wait_ms(self, v: View, cost: u64) -> Option<i128> {
        if self.fits(v, cost) {
            return Some(0);
        }
        let w = i128::from(self.window_ms);
        let limit = i128::from(self.limit);
        let (prev, cur, e, n) = (
            i128::from(v.prev),
            i128::from(v.cur),
            i128::from(v.elapsed),
            i128::from(cost),
        );
        if n > limit {
            return None;
        }
        if cur + n <= limit {
            // It fits in this bucket once prev's weight has fallen far
            // enough: prev * (w - e') <= (L - n - cur) * w. prev > 0 here, or
            // it would fit already; e' = w is the next bucket's start, where
            // the estimate is cur.
            let first_ok = w - floor_div((limit - n - cur) * w, prev);
            Some(first_ok - e)
        } else {
            // Not in this bucket: in the next one, cur becomes prev (> 0, as
            // cur > L - n >= 0) and must fade until cur * (w - e') <= (L - n) * w.
            Some((w - e) + w - floor_div((limit - n) * w, cur))
        }
    }
}

/// `a.div_euclid(b)` for `b > 0`, in 64 bits whenever both fit: a 128-bit
/// division is a slow library call, and with real windows (a day is 8.64e7 ms)
/// and counts the operands always fit, so the wide path is only a guard.
pub(crate) fn floor_div(a: i128, b: i128) -> i128 {
    match (i64::try_from(a), i64::try_from(b)) {
        (Ok(a), Ok(b)) => i128::from(a.div_euclid(b)),
        _ => a.div_euclid(b),
    }
}

pub(crate) fn ceil_seconds(ms: i128) -> u64 {
    floor_div(ms.max(0) + 999, 1000) as u64
}

/// Seconds since the epoch as whole milliseconds (floored); `None` unless
/// finite and within 2**53 ms, which keeps the float -> integer step exact.
pub(crate) fn seconds_to_ms(now: f64) -> Option<i64> {
    (now.is_finite() && (now * 1000.0).abs() < 9.0e15).then(|| (now * 1000.0).floor() as i64)
}

/// The system clock in milliseconds since the epoch; `None` before 1970.
pub(crate) fn system_now_ms() -> Option<i64> {
    use std::time::{SystemTime, UNIX_EPOCH};
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .ok()
        .map(|d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(prev: u64, cur: u64, elapsed: i64) -> View {
        View {
            bucket: 0,
            elapsed,
            prev,
            cur,
        }
    }

    /// The first millisecond from `v` at which `cost` fits, found by walking.
    fn walk(w: SlidingWindow, v: View, cost: u64) -> Option<i128> {
        let counter = v.counter();
        let start = v.bucket * w.window_ms + v.elapsed;
        (start..start + 3 * w.window_ms)
            .find(|&t| w.fits(counter.view(w.window_ms, t), cost))
            .map(|t| i128::from(t - start))
    }

    #[test]
    fn wait_is_the_first_fitting_millisecond_for_every_cost() {
        let w = SlidingWindow::new(7, 1).unwrap();
        for prev in 0..=9 {
            for cur in 0..=9 {
                for e in [0, 1, 499, 999] {
                    for cost in 0..=8 {
                        let v = at(prev, cur, e);
                        assert_eq!(
                            w.wait_ms(v, cost),
                            walk(w, v, cost),
                            "prev {prev} cur {cur} e {e} cost {cost}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn remaining_is_the_largest_cost_that_fits() {
        let w = SlidingWindow::new(10, 60).unwrap();
        for (prev, cur, e) in [(10, 0, 0), (10, 3, 30_000), (0, 10, 5), (20, 20, 1)] {
            let v = at(prev, cur, e);
            let r = w.remaining(v);
            assert!(r == 0 || w.fits(v, r));
            assert!(!w.fits(v, r + 1));
        }
    }

    #[test]
    fn extreme_counts_do_not_overflow() {
        let w = SlidingWindow::new(u64::MAX, MAX_WINDOW_S).unwrap();
        let v = at(u64::MAX, u64::MAX, 0);
        assert!(!w.fits(v, u64::MAX));
        assert_eq!(w.remaining(v), 0);
        assert!(w.wait_ms(v, u64::MAX).is_some());
        assert_eq!(w.remaining(at(0, 0, 0)), u64::MAX);
        assert_eq!(w.expires_ms(i64::MAX - 1), i64::MAX);
    }

    #[test]
    fn config_bounds() {
        assert!(SlidingWindow::new(0, 1).is_none());
        assert!(SlidingWindow::new(1, 0).is_none());
        assert!(SlidingWindow::new(1, MAX_WINDOW_S + 1).is_none());
        assert!(SlidingWindow::new(1, MAX_WINDOW_S).is_some());
    }

    #[test]
    fn seconds_are_floored_to_milliseconds_and_bounded() {
        assert_eq!(seconds_to_ms(1.2345), Some(1234));
        assert_eq!(seconds_to_ms(-0.0005), Some(-1));
        assert_eq!(seconds_to_ms(f64::NAN), None);
        assert_eq!(seconds_to_ms(f64::INFINITY), None);
        assert_eq!(seconds_to_ms(1e13), None);
    }
}
