//! Sliding-window rate limiter, the "sliding window counter" approximation
//! (as Cloudflare describes it).
//!
//! For each window of `w` seconds and limit `L`, a key keeps two counts: the
//! requests admitted in the current bucket and in the one before. Buckets are
//! aligned to the unix epoch (`bucket = floor(now / w)`), so that several
//! processes, and later Redis, agree on their boundaries. At `e` seconds into
//! the current bucket,
//!
//! ```text
//! estimate = prev * (w - e) / w + cur
//! ```
//!
//! A request is admitted iff `estimate + 1 <= L` in every window, and then
//! adds 1 to `cur` in every window; a refused request changes no count.
//!
//! Arithmetic is exact: time is taken in whole milliseconds and the
//! comparison is `prev * (w_ms - e_ms) + (cur + 1) * w_ms <= L * w_ms` in
//! 128-bit integers, so there is no float error at the boundary. That
//! arithmetic lives in `window.rs`, shared with the token budget
//! (`budget.rs`): this limiter is a budget where every request costs 1.
//!
//! # The bound
//!
//! For every window (`L`, `w`), with time moving forward:
//!
//! * in any bucket-aligned interval `[k w, (k + 1) w)` at most `L` requests
//!   are admitted (each admission needs `cur + 1 <= L`);
//! * in any interval of length `w`, at most `2 L - 1` requests are admitted.
//!   Proof: the interval `[t, t + w)` meets bucket `k` (where `t` lies) and
//!   bucket `k + 1`. Let `p <= L` be bucket `k`'s count and `f = t - k w` in
//!   `[0, w)`. The last request admitted in bucket `k + 1` before `t + w`, at
//!   offset `e <= f`, needed `p (w - e) / w + n <= L` where `n` counts it and
//!   those before it in bucket `k + 1`, so `n <= L - p (w - f) / w`. At most
//!   `p` requests of bucket `k` lie in the interval, so the total is at most
//!   `p + L - p (w - f) / w = L + p f / w < 2 L`. It is reached: `L`
//!   requests in the last millisecond of a bucket, then `L - 1` in the last
//!   milliseconds of the next one.
//! * it never refuses a request while the two buckets `k - 1` and `k` hold
//!   fewer than `L` admitted requests together (the estimate is at most
//!   `prev + cur`).
//!
//! If the clock goes back into an earlier bucket than the key's latest, the
//! key's latest bucket is used at its start (`e = 0`), the most cautious
//! reading.
//!
//! # Memory
//!
//! Keys live in a slab table (`lru.rs`) kept in least-recently-checked
//! order. A key whose every bucket has expired (`now >= (bucket + 2) * w` in
//! every window) holds no information and is dropped from the front on each
//! `check`: amortised O(1). When `max_keys` is reached, the least recently
//! checked key is evicted so that a new caller is never refused because of
//! the cap; evicting a key that is still active forgets its counts (it starts
//! afresh), which is the price of a memory bound.

use std::fmt;
use std::sync::Mutex;

use crate::lru::Keys;
use crate::window::{self, Counter, SlidingWindow, View, ceil_seconds};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyList;

// ---------------------------------------------------------------------------
// Plain Rust
// ---------------------------------------------------------------------------

/// More windows than any sane policy needs; lets every decision live in a
/// fixed-size array with no allocation.
pub const MAX_WINDOWS: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigError {
    NoWindows,
    TooManyWindows,
    BadLimit,
    BadWindow,
    BadMaxKeys,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::NoWindows => "at least one window is needed",
            Self::TooManyWindows => "at most 8 windows are supported",
            Self::BadLimit => "a window's limit must be between 1 and 2**32 - 1",
            Self::BadWindow => "a window's length must be between 1 and 2**40 seconds",
            Self::BadMaxKeys => "max_keys must be at least 1",
        })
    }
}

impl std::error::Error for ConfigError {}

/// One window's state as a decision reports it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WindowStatus {
    pub limit: u64,
    pub window_s: u64,
    pub remaining: u64,
    pub reset_s: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub allowed: bool,
    /// 0 when allowed; else whole seconds (ceil) until every window has room.
    pub retry_after: u64,
    /// Index of the window with the fewest remaining (shortest on a tie).
    pub tightest: usize,
    pub len: usize,
    pub windows: [WindowStatus; MAX_WINDOWS],
}

impl Outcome {
    pub fn windows(&self) -> &[WindowStatus] {
        &self.windows[..self.len]
    }

    pub fn tightest(&self) -> &WindowStatus {
        &self.windows[self.tightest]
    }
}

pub struct Limiter {
    windows: Vec<SlidingWindow>,
    max_keys: usize,
    keys: Keys,
}

impl Limiter {
    /// `windows` as `(limit, window_seconds)` pairs.
    pub fn new(windows: &[(i64, i64)], max_keys: usize) -> Result<Self, ConfigError> {
        if windows.is_empty() {
            return Err(ConfigError::NoWindows);
        }
        if windows.len() > MAX_WINDOWS {
            return Err(ConfigError::TooManyWindows);
        }
        if max_keys == 0 {
            return Err(ConfigError::BadMaxKeys);
        }
        let windows = windows
            .iter()
            .map(|&(limit, window_s)| {
                // Limits stay within u32: the Redis side's replies are checked as such.
                let limit = u32::try_from(limit)
                    .ok()
                    .filter(|&l| l >= 1)
                    .ok_or(ConfigError::BadLimit)?;
                SlidingWindow::new(u64::from(limit), window_s).ok_or(ConfigError::BadWindow)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            windows,
            max_keys,
            keys: Keys::new(),
        })
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.len() == 0
    }

    fn views(&self, counters: Option<&[Counter]>, now_ms: i64) -> [Option<View>; MAX_WINDOWS] {
        let mut views = [None; MAX_WINDOWS];
        for (i, w) in self.windows.iter().enumerate() {
            views[i] = Some(w.view(counters.map(|c| c[i]), now_ms));
        }
        views
    }

    fn outcome(&self, allowed: bool, views: &[Option<View>; MAX_WINDOWS]) -> Outcome {
        let mut out = Outcome {
            allowed,
            retry_after: 0,
            tightest: 0,
            len: self.windows.len(),
            windows: [WindowStatus::default(); MAX_WINDOWS],
        };
        let mut longest_wait = 0;
        for (i, (w, v)) in self.windows.iter().zip(views.iter().flatten()).enumerate() {
            // A limit is >= 1, so one request always fits some day.
            let wait = w.wait_ms(*v, 1).unwrap_or_default();
            longest_wait = longest_wait.max(wait);
            out.windows[i] = WindowStatus {
                limit: w.limit,
                window_s: w.window_s,
                remaining: w.remaining(*v),
                reset_s: ceil_seconds(wait),
            };
            let best = out.windows[out.tightest];
            let this = out.windows[i];
            if (this.remaining, this.window_s) < (best.remaining, best.window_s) {
                out.tightest = i;
            }
        }
        if !allowed {
            // A refusal means some window has no room, so this is >= 1.
            out.retry_after = ceil_seconds(longest_wait).max(1);
        }
        out
    }

    /// The decision a `check` would make now, without consuming anything.
    pub fn peek(&self, key: &str, now_ms: i64) -> Outcome {
        let slot = self.keys.find(self.keys.hash(key), key);
        let views = self.views(slot.map(|s| self.keys.counters(s)), now_ms);
        let allowed = self
            .windows
            .iter()
            .zip(views.iter().flatten())
            .all(|(w, v)| w.fits(*v, 1));
        self.outcome(allowed, &views)
    }

    /// Decides, and when admitted consumes one request in every window.
    pub fn check(&mut self, key: &str, now_ms: i64) -> Outcome {
        self.keys.drop_expired(now_ms);
        let hash = self.keys.hash(key);
        let slot = self.keys.find(hash, key);
        let mut views = self.views(slot.map(|s| self.keys.counters(s)), now_ms);
        let allowed = self
            .windows
            .iter()
            .zip(views.iter().flatten())
            .all(|(w, v)| w.fits(*v, 1));
        if allowed {
            let mut counters = [Counter::default(); MAX_WINDOWS];
            let mut expires_ms = i64::MIN;
            for ((w, v), c) in self
                .windows
                .iter()
                .zip(views.iter_mut().flatten())
                .zip(counters.iter_mut())
            {
                v.cur += 1;
                *c = v.counter();
                expires_ms = expires_ms.max(w.expires_ms(v.bucket));
            }
            self.keys.put(
                hash,
                slot,
                key,
                &counters[..self.windows.len()],
                expires_ms,
                self.max_keys,
            );
        } else if let Some(slot) = slot {
            // Refused callers still count as recent: evicting a caller that
            // keeps hammering would hand it a fresh quota.
            self.keys.touch(slot);
        }
        self.outcome(allowed, &views)
    }

    /// Takes counts read from a shared store (Redis) for the buckets `now_ms`
    /// falls in, `(prev, cur)` per window, keeps the larger of each local and
    /// given count, and returns the decision those counts mean (`allowed` is
    /// the store's verdict; when it admitted, `cur` already includes it).
    ///
    /// A process's own counts can only lag the store's (every admission it
    /// made is in the store too), so the merged counts are the store's plus
    /// whatever the store has not seen yet, such as admissions made while it
    /// was unreachable. That keeps a later local `peek` refusal exact: when
    /// the local counters have no room, the store has none either.
    ///
    /// Returns `None` when `counts` does not have one pair per window.
    pub fn sync(
        &mut self,
        key: &str,
        now_ms: i64,
        counts: &[(u32, u32)],
        allowed: bool,
    ) -> Option<Outcome> {
        if counts.len() != self.windows.len() {
            return None;
        }
        self.keys.drop_expired(now_ms);
        let hash = self.keys.hash(key);
        let slot = self.keys.find(hash, key);
        let mut views = self.views(slot.map(|s| self.keys.counters(s)), now_ms);
        let mut counters = [Counter::default(); MAX_WINDOWS];
        let mut expires_ms = i64::MIN;
        for (((w, v), &(prev, cur)), c) in self
            .windows
            .iter()
            .zip(views.iter_mut().flatten())
            .zip(counts)
            .zip(counters.iter_mut())
        {
            v.prev = v.prev.max(u64::from(prev));
            v.cur = v.cur.max(u64::from(cur));
            *c = v.counter();
            expires_ms = expires_ms.max(w.expires_ms(v.bucket));
        }
        self.keys.put(
            hash,
            slot,
            key,
            &counters[..self.windows.len()],
            expires_ms,
            self.max_keys,
        );
        Some(self.outcome(allowed, &views))
    }
}

// ---------------------------------------------------------------------------
// Python layer
// ---------------------------------------------------------------------------

impl From<ConfigError> for PyErr {
    fn from(err: ConfigError) -> Self {
        PyValueError::new_err(err.to_string())
    }
}

fn now_ms(now: Option<f64>) -> PyResult<i64> {
    match now {
        None => window::system_now_ms()
            .ok_or_else(|| PyValueError::new_err("the system clock is before 1970")),
        Some(now) => window::seconds_to_ms(now)
            .ok_or_else(|| PyValueError::new_err("now must be a finite number of seconds")),
    }
}

#[pyclass(frozen, get_all, module = "pwachat._native")]
#[derive(Clone, Copy)]
pub struct WindowState {
    limit: u64,
    window_s: u64,
    remaining: u64,
    reset_s: u64,
}

#[pymethods]
impl WindowState {
    fn __repr__(&self) -> String {
        format!(
            "WindowState(limit={}, window_s={}, remaining={}, reset_s={})",
            self.limit, self.window_s, self.remaining, self.reset_s
        )
    }
}

/// The outcome of one `check`/`peek`. Holds the fixed-size Rust outcome;
/// `windows` builds its list only when read.
#[pyclass(frozen, module = "pwachat._native")]
pub struct Decision {
    outcome: Outcome,
}

#[pymethods]
impl Decision {
    #[getter]
    fn allowed(&self) -> bool {
        self.outcome.allowed
    }

    #[getter]
    fn limit(&self) -> u64 {
        self.outcome.tightest().limit
    }

    #[getter]
    fn remaining(&self) -> u64 {
        self.outcome.tightest().remaining
    }

    #[getter]
    fn reset_s(&self) -> u64 {
        self.outcome.tightest().reset_s
    }

    #[getter]
    fn retry_after(&self) -> u64 {
        self.outcome.retry_after
    }

    #[getter]
    fn window_s(&self) -> u64 {
        self.outcome.tightest().window_s
    }

    #[getter]
    fn windows<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let states = self.outcome.windows().iter().map(|w| WindowState {
            limit: w.limit,
            window_s: w.window_s,
            remaining: w.remaining,
            reset_s: w.reset_s,
        });
        PyList::new(py, states)
    }

    fn __repr__(&self) -> String {
        let t = self.outcome.tightest();
        format!(
            "Decision(allowed={}, limit={}, remaining={}, reset_s={}, retry_after={}, window_s={})",
            if self.outcome.allowed {
                "True"
            } else {
                "False"
            },
            t.limit,
            t.remaining,
            t.reset_s,
            self.outcome.retry_after,
            t.window_s
        )
    }
}

/// Thread safe: the state sits behind a `Mutex` in a frozen class, and the
/// lock is never held while Python code runs.
#[pyclass(frozen, name = "RateLimiter", module = "pwachat._native")]
pub struct PyRateLimiter {
    inner: Mutex<Limiter>,
}

impl PyRateLimiter {
    fn lock(&self) -> std::sync::MutexGuard<'_, Limiter> {
        // The limiter cannot panic half-way through an update (no user code
        // runs under the lock), so a poisoned lock still holds sound state.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[pymethods]
impl PyRateLimiter {
    #[new]
    #[pyo3(signature = (windows, *, max_keys = 100_000))]
    fn new(windows: Vec<(i64, i64)>, max_keys: usize) -> PyResult<Self> {
        Ok(Self {
            inner: Mutex::new(Limiter::new(&windows, max_keys)?),
        })
    }

    #[pyo3(signature = (key, now = None))]
    fn check(&self, key: &str, now: Option<f64>) -> PyResult<Decision> {
        let now_ms = now_ms(now)?;
        let outcome = self.lock().check(key, now_ms);
        Ok(Decision { outcome })
    }

    #[pyo3(signature = (key, now = None))]
    fn peek(&self, key: &str, now: Option<f64>) -> PyResult<Decision> {
        let now_ms = now_ms(now)?;
        let outcome = self.lock().peek(key, now_ms);
        Ok(Decision { outcome })
    }

    /// Writes a shared store's counts for `key` into this limiter and returns
    /// the decision they mean; see `Limiter::sync`.
    #[pyo3(signature = (key, now, counts, allowed))]
    fn sync(
        &self,
        key: &str,
        now: f64,
        counts: Vec<(u32, u32)>,
        allowed: bool,
    ) -> PyResult<Decision> {
        let now_ms = now_ms(Some(now))?;
        self.lock()
            .sync(key, now_ms, &counts, allowed)
            .map(|outcome| Decision { outcome })
            .ok_or_else(|| {
                PyValueError::new_err("counts must hold one (prev, cur) pair per window")
            })
    }

    fn __len__(&self) -> usize {
        self.lock().len()
    }
}

pub fn init(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyRateLimiter>()?;
    m.add_class::<Decision>()?;
    m.add_class::<WindowState>()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: i64 = 60_000;

    fn limiter(windows: &[(i64, i64)]) -> Limiter {
        Limiter::new(windows, 100).unwrap()
    }

    #[test]
    fn config_is_checked() {
        assert_eq!(Limiter::new(&[], 1).err(), Some(ConfigError::NoWindows));
        assert_eq!(
            Limiter::new(&[(0, 60)], 1).err(),
            Some(ConfigError::BadLimit)
        );
        assert_eq!(
            Limiter::new(&[(1, 0)], 1).err(),
            Some(ConfigError::BadWindow)
        );
        assert_eq!(
            Limiter::new(&[(1, 1)], 0).err(),
            Some(ConfigError::BadMaxKeys)
        );
        assert_eq!(
            Limiter::new(&[(1, 1); 9], 1).err(),
            Some(ConfigError::TooManyWindows)
        );
    }

    #[test]
    fn admits_limit_per_bucket_then_refuses_without_consuming() {
        let mut l = limiter(&[(3, 60)]);
        for remaining in [2, 1, 0] {
            let o = l.check("k", 10 * MIN);
            assert!(o.allowed);
            assert_eq!(o.tightest().remaining, remaining);
        }
        for _ in 0..5 {
            let o = l.check("k", 10 * MIN + 1);
            assert!(!o.allowed);
            assert_eq!(o.tightest().remaining, 0);
        }
        // Refusals consumed nothing: cur stayed at 3, so in the next bucket
        // at 1/3 of the way the estimate is 3 * 2/3 = 2 and one fits.
        let o = l.peek("k", 11 * MIN + 20_000);
        assert!(o.allowed);
        assert_eq!(o.tightest().remaining, 1);
    }

    #[test]
    fn previous_bucket_fades_linearly() {
        let mut l = limiter(&[(10, 60)]);
        for _ in 0..10 {
            assert!(l.check("k", 0).allowed);
        }
        // Half-way through the next bucket the estimate is 5.
        let o = l.peek("k", MIN + 30_000);
        assert_eq!(o.tightest().remaining, 5);
        // Exactly at the boundary where 10 * (60 - e) / 60 + 1 <= 10, i.e.
        // e = 6 s: one millisecond earlier is refused, at 6 s admitted.
        assert!(!l.peek("k", MIN + 5_999).allowed);
        assert!(l.peek("k", MIN + 6_000).allowed);
        // Two buckets on, everything has gone.
        assert_eq!(l.peek("k", 2 * MIN).tightest().remaining, 10);
    }

    #[test]
    fn reset_and_retry_after_point_at_the_first_admitting_second() {
        let mut l = limiter(&[(10, 60)]);
        for _ in 0..10 {
            l.check("k", 0);
        }
        let o = l.check("k", 0);
        assert!(!o.allowed);
        // Full bucket: the next bucket starts at 60 s and 10 * (60 - e)/60
        // <= 9 needs e >= 6 s: 66 s from now.
        assert_eq!(o.retry_after, 66);
        assert_eq!(o.tightest().reset_s, 66);
        assert!(!l.peek("k", 65_999).allowed);
        assert!(l.peek("k", 66_000).allowed);
        // A fractional wait rounds up.
        let o = l.check("k", 500);
        assert_eq!(o.retry_after, 66);
    }

    #[test]
    fn limit_one_waits_two_buckets_from_the_start() {
        let mut l = limiter(&[(1, 10)]);
        assert!(l.check("k", 0).allowed);
        let o = l.check("k", 0);
        assert_eq!(o.retry_after, 20);
        assert!(!l.peek("k", 19_999).allowed);
        assert!(l.peek("k", 20_000).allowed);
    }

    #[test]
    fn any_window_can_refuse_and_the_tightest_is_reported() {
        let mut l = limiter(&[(100, 3600), (2, 60)]);
        assert!(l.check("k", 0).allowed);
        let o = l.check("k", 0);
        assert!(o.allowed);
        assert_eq!(o.tightest, 1);
        assert_eq!(o.tightest().remaining, 0);
        // No room in the minute window: reset is when it frees one slot.
        assert_eq!(o.tightest().reset_s, 90);
        let o = l.check("k", 1_000);
        assert!(!o.allowed);
        assert_eq!(o.windows()[0].remaining, 98);
        assert_eq!(o.retry_after, 89);
    }

    #[test]
    fn tie_on_remaining_picks_the_shortest_window() {
        let l = limiter(&[(5, 3600), (5, 60)]);
        let o = l.peek("k", 0);
        assert_eq!(o.tightest().window_s, 60);
    }

    #[test]
    fn at_most_two_limit_minus_one_in_any_sliding_window() {
        let mut l = limiter(&[(10, 60)]);
        let mut admitted = 0;
        for _ in 0..20 {
            admitted += u32::from(l.check("k", MIN - 1).allowed);
        }
        for t in (2 * MIN - 200)..(2 * MIN - 1) {
            admitted += u32::from(l.check("k", t).allowed);
        }
        // Interval [MIN - 1, 2 * MIN - 1) has length w and holds them all.
        assert_eq!(admitted, 19);
    }

    #[test]
    fn clock_going_back_is_read_cautiously() {
        let mut l = limiter(&[(2, 60)]);
        assert!(l.check("k", 2 * MIN).allowed);
        assert!(l.check("k", 2 * MIN).allowed);
        assert!(!l.check("k", MIN).allowed);
    }

    #[test]
    fn expired_keys_are_dropped_and_the_cap_evicts_least_recent() {
        let mut l = Limiter::new(&[(5, 60), (5, 10)], 3).unwrap();
        l.check("a", 0);
        l.check("b", 60_000);
        // a's buckets (bucket 0 of 60 s) expire at 120 s, b's at 180 s.
        l.check("c", 119_999);
        assert_eq!(l.len(), 3);
        l.check("d", 120_000);
        assert_eq!(l.len(), 3);
        assert!(l.keys.find(l.keys.hash("a"), "a").is_none());
        // Cap: e evicts the least recently checked (c), not d.
        l.check("b", 120_001);
        l.check("e", 120_002);
        assert_eq!(l.len(), 3);
        assert!(l.keys.find(l.keys.hash("c"), "c").is_none());
        assert!(l.keys.find(l.keys.hash("d"), "d").is_some());
    }

    #[test]
    fn sync_takes_the_larger_counts_and_refuses_locally_after() {
        let mut l = limiter(&[(3, 60), (100, 3600)]);
        let now = 10 * MIN + 1_000;
        assert!(l.check("k", now).allowed);
        // The store saw 3 this minute (2 from other processes): no room left.
        let out = l.sync("k", now, &[(0, 3), (0, 3)], true).unwrap();
        assert!(out.allowed);
        assert_eq!(out.tightest().remaining, 0);
        assert!(!l.peek("k", now + 1).allowed);
        // Smaller store counts never lower what this process counted itself.
        let out = l.sync("k", now + 2, &[(0, 1), (0, 1)], true).unwrap();
        assert_eq!(out.windows()[1].remaining, 97);
        assert!(l.sync("k", now, &[(0, 1)], true).is_none());
    }

    #[test]
    fn peek_never_creates_or_consumes() {
        let mut l = limiter(&[(1, 60)]);
        for _ in 0..3 {
            assert!(l.peek("k", 0).allowed);
        }
        assert!(l.is_empty());
        assert!(l.check("k", 0).allowed);
        assert!(!l.peek("k", 0).allowed);
    }
}
