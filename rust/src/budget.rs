//! Sliding-window token budget: the request limiter's window (`window.rs`)
//! where an admission costs its tokens instead of 1.
//!
//! Per key, one window of `w` seconds with limit `L` tokens: the tokens
//! counted in the current epoch-aligned bucket and in the one before, the
//! previous bucket fading linearly (`estimate = prev * (w - e) / w + cur`).
//!
//! * `reserve(n)` is admitted iff `estimate + n <= L`, and then adds `n` to
//!   the current bucket; a refused reserve changes no count. Admitted is
//!   exactly `n <= remaining` for `n >= 1` (remaining is
//!   `max(0, floor(L - estimate))`).
//! * `settle(bucket, reserved, used)` replaces a reservation by what was
//!   used: the bucket it went into gets `used - reserved` (saturating at 0
//!   and at 2**64 - 1) if that bucket is still the current or the previous
//!   one. An older bucket no longer counts, so nothing changes; nor does it
//!   for a bucket later than the key's latest (only a clock gone back gives
//!   one).
//! * `charge(n)` adds `n` to the current bucket without checking (usage to
//!   count whatever the budget says, such as reconciliation); the estimate
//!   may then exceed `L`, and the budget refuses until it has faded.
//! * `sync(prev, cur)` writes a shared store's (Redis's) counts for the
//!   buckets `now` falls in in place of the local ones. They replace rather
//!   than merge (the request limiter keeps the larger): settles made by other
//!   processes lower the store's counts, and local counts that only rose
//!   would go on refusing callers the store admits. Between syncs the local
//!   counts lag the store's (others' reservations) or lead them (others'
//!   settles below their reservations), so a local refusal is exact only up
//!   to the settles made elsewhere since the last sync.
//!
//! The bound is the limiter's with counts for requests: reservations
//! admitted in one bucket total at most `L`, in any interval of length `w`
//! less than `2 L`, and a reserve is never refused while the current and the
//! previous buckets together hold at most `L - n` tokens. Settles then move
//! the counts to what was really used.
//!
//! `reset_s` is whole seconds (ceil) until one more token fits, `retry_after`
//! until the refused `n` does. A reservation larger than `L` never fits; its
//! `retry_after` is the window's length, so that a caller retrying is told
//! to wait a whole window rather than to come straight back (the caller is
//! expected to refuse such a request for what it is: more than the budget).
//!
//! # Memory
//!
//! As the limiter's: keys in the slab table of `lru.rs`, in least recently
//! used order (a refused reserve counts as a use, or a caller hammering a
//! spent budget would be evicted and handed a fresh one). A key whose both
//! buckets have expired is dropped from the front on each write; when
//! `max_keys` are held, a new key evicts the least recently used one,
//! forgetting its counts, so that a new caller is never refused because of
//! the cap. That errs towards admitting: an evicted caller starts afresh. A
//! write that would create a key with only zero counts creates nothing.

use std::fmt;
use std::sync::Mutex;

use crate::lru::Keys;
use crate::window::{self, Counter, SlidingWindow, View, ceil_seconds};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

// ---------------------------------------------------------------------------
// Plain Rust
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigError {
    BadLimit,
    BadWindow,
    BadMaxKeys,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::BadLimit => {
                "a token budget's limit must be between 1 and 2**63 - 1 (turn budgets off instead of 0)"
            }
            Self::BadWindow => "a token budget's window must be between 1 and 2**40 seconds",
            Self::BadMaxKeys => "max_keys must be at least 1",
        })
    }
}

impl std::error::Error for ConfigError {}

/// What a reserve (or a peek, or a sync) decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub allowed: bool,
    pub limit: u64,
    /// Tokens left after this reservation (if admitted): `floor(L - estimate)`, at least 0.
    pub remaining: u64,
    /// Whole seconds until one more token fits; 0 when one does.
    pub reset_s: u64,
    /// 0 when admitted; else whole seconds (at least 1) until the tokens asked
    /// for fit, or the window's length when they never can (more than `L`).
    pub retry_after: u64,
    /// The bucket the reservation went into (or would have): `settle`'s `bucket`.
    pub bucket: i64,
}

pub struct Budget {
    window: SlidingWindow,
    max_keys: usize,
    keys: Keys,
}

/// A key's slot (after `drop_expired`), if it has one, and its hash.
struct Found {
    hash: u64,
    slot: Option<u32>,
}

impl Budget {
    pub fn new(limit: i64, window_s: i64, max_keys: usize) -> Result<Self, ConfigError> {
        let limit = u64::try_from(limit).map_err(|_| ConfigError::BadLimit)?;
        if limit == 0 {
            return Err(ConfigError::BadLimit);
        }
        let window = SlidingWindow::new(limit, window_s).ok_or(ConfigError::BadWindow)?;
        if max_keys == 0 {
            return Err(ConfigError::BadMaxKeys);
        }
        Ok(Self {
            window,
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

    fn find(&self, key: &str) -> Found {
        let hash = self.keys.hash(key);
        Found {
            hash,
            slot: self.keys.find(hash, key),
        }
    }

    fn view(&self, slot: Option<u32>, now_ms: i64) -> View {
        let counter = slot.map(|s| self.keys.counters(s)[0]);
        self.window.view(counter, now_ms)
    }

    fn verdict(&self, v: View, allowed: bool, tokens: u64) -> Verdict {
        let w = self.window;
        let retry_after = if allowed {
            0
        } else {
            w.wait_ms(v, tokens).map_or(w.window_s, ceil_seconds).max(1)
        };
        Verdict {
            allowed,
            limit: w.limit,
            remaining: w.remaining(v),
            // The limit is >= 1, so one token always fits some day.
            reset_s: ceil_seconds(w.wait_ms(v, 1).unwrap_or_default()),
            retry_after,
            bucket: v.bucket,
        }
    }

    /// Stores `v` for the key; creates no key for zero counts.
    fn write(&mut self, key: &str, found: &Found, v: View) {
        if found.slot.is_none() && v.prev == 0 && v.cur == 0 {
            return;
        }
        let counter: [Counter; 1] = [v.counter()];
        let expires_ms = self.window.expires_ms(v.bucket);
        self.keys.put(
            found.hash,
            found.slot,
            key,
            &counter,
            expires_ms,
            self.max_keys,
        );
    }

    fn lookup(&mut self, key: &str, now_ms: i64) -> (Found, View) {
        self.keys.drop_expired(now_ms);
        let found = self.find(key);
        let v = self.view(found.slot, now_ms);
        (found, v)
    }

    /// Admits `tokens` iff they fit, and then counts them in the current bucket.
    pub fn reserve(&mut self, key: &str, tokens: u64, now_ms: i64) -> Verdict {
        let (found, mut v) = self.lookup(key, now_ms);
        let allowed = self.window.fits(v, tokens);
        if allowed {
            // Fitting means cur + tokens <= limit: no overflow.
            v.cur += tokens;
            self.write(key, &found, v);
        } else if let Some(slot) = found.slot {
            self.keys.touch(slot);
        }
        self.verdict(v, allowed, tokens)
    }

    /// The verdict `reserve` would give now, reserving nothing (`remaining`
    /// is what is left now).
    pub fn peek(&self, key: &str, tokens: u64, now_ms: i64) -> Verdict {
        let v = self.view(self.find(key).slot, now_ms);
        self.verdict(v, self.window.fits(v, tokens), tokens)
    }

    /// Replaces a reservation of `reserved` tokens made in `bucket` by `used`.
    pub fn settle(&mut self, key: &str, bucket: i64, reserved: u64, used: u64, now_ms: i64) {
        let (found, mut v) = self.lookup(key, now_ms);
        let count = if bucket == v.bucket {
            &mut v.cur
        } else if Some(bucket) == v.bucket.checked_sub(1) {
            &mut v.prev
        } else {
            return;
        };
        *count = if used >= reserved {
            count.saturating_add(used - reserved)
        } else {
            count.saturating_sub(reserved - used)
        };
        self.write(key, &found, v);
    }

    /// Counts `tokens` in the current bucket, admitted or not.
    pub fn charge(&mut self, key: &str, tokens: u64, now_ms: i64) {
        let (found, mut v) = self.lookup(key, now_ms);
        v.cur = v.cur.saturating_add(tokens);
        self.write(key, &found, v);
    }

    /// Writes a shared store's counts for the buckets `now_ms` falls in (the
    /// key's latest and the one before it if the clock has gone back) and
    /// returns the verdict a reservation of `tokens` on top of them would get:
    /// 0 after the store admitted a reservation (the counts include it), the
    /// refused reservation's tokens after it refused one.
    pub fn sync(&mut self, key: &str, now_ms: i64, prev: u64, cur: u64, tokens: u64) -> Verdict {
        let (found, mut v) = self.lookup(key, now_ms);
        v.prev = prev;
        v.cur = cur;
        self.write(key, &found, v);
        self.verdict(v, self.window.fits(v, tokens), tokens)
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

/// Like the limiter's, and negative instants are refused too: an instant
/// before 1970 is a caller's mistake, not a time to count tokens at.
fn now_ms(now: Option<f64>) -> PyResult<i64> {
    match now {
        None => window::system_now_ms()
            .ok_or_else(|| PyValueError::new_err("the system clock is before 1970")),
        Some(now) => window::seconds_to_ms(now)
            .filter(|&ms| ms >= 0)
            .ok_or_else(|| {
                PyValueError::new_err("now must be a finite, non-negative number of seconds")
            }),
    }
}

#[pyclass(frozen, get_all, module = "pwachat._native")]
pub struct BudgetDecision {
    allowed: bool,
    limit: u64,
    remaining: u64,
    reset_s: u64,
    retry_after: u64,
    bucket: i64,
}

impl From<Verdict> for BudgetDecision {
    fn from(v: Verdict) -> Self {
        Self {
            allowed: v.allowed,
            limit: v.limit,
            remaining: v.remaining,
            reset_s: v.reset_s,
            retry_after: v.retry_after,
            bucket: v.bucket,
        }
    }
}

#[pymethods]
impl BudgetDecision {
    fn __repr__(&self) -> String {
        format!(
            "BudgetDecision(allowed={}, limit={}, remaining={}, reset_s={}, retry_after={}, bucket={})",
            if self.allowed { "True" } else { "False" },
            self.limit,
            self.remaining,
            self.reset_s,
            self.retry_after,
            self.bucket
        )
    }
}

/// Thread safe: the state sits behind a `Mutex` in a frozen class, and the
/// lock is never held while Python code runs.
#[pyclass(frozen, name = "TokenBudget", module = "pwachat._native")]
pub struct PyTokenBudget {
    inner: Mutex<Budget>,
}

impl PyTokenBudget {
    fn lock(&self) -> std::sync::MutexGuard<'_, Budget> {
        // No user code runs under the lock and no update panics half-way, so
        // a poisoned lock still holds sound state.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[pymethods]
impl PyTokenBudget {
    #[new]
    #[pyo3(signature = (limit, window_s = 86_400, *, max_keys = 100_000))]
    fn new(limit: i64, window_s: i64, max_keys: usize) -> PyResult<Self> {
        Ok(Self {
            inner: Mutex::new(Budget::new(limit, window_s, max_keys)?),
        })
    }

    #[pyo3(signature = (key, tokens, now = None))]
    fn reserve(&self, key: &str, tokens: u64, now: Option<f64>) -> PyResult<BudgetDecision> {
        let now_ms = now_ms(now)?;
        Ok(self.lock().reserve(key, tokens, now_ms).into())
    }

    #[pyo3(signature = (key, bucket, reserved, used, now = None))]
    fn settle(
        &self,
        key: &str,
        bucket: i64,
        reserved: u64,
        used: u64,
        now: Option<f64>,
    ) -> PyResult<()> {
        let now_ms = now_ms(now)?;
        self.lock().settle(key, bucket, reserved, used, now_ms);
        Ok(())
    }

    #[pyo3(signature = (key, now = None, *, tokens = 1))]
    fn peek(&self, key: &str, now: Option<f64>, tokens: u64) -> PyResult<BudgetDecision> {
        let now_ms = now_ms(now)?;
        Ok(self.lock().peek(key, tokens, now_ms).into())
    }

    #[pyo3(signature = (key, now, prev, cur, *, tokens = 0))]
    fn sync(
        &self,
        key: &str,
        now: f64,
        prev: u64,
        cur: u64,
        tokens: u64,
    ) -> PyResult<BudgetDecision> {
        let now_ms = now_ms(Some(now))?;
        Ok(self.lock().sync(key, now_ms, prev, cur, tokens).into())
    }

    #[pyo3(signature = (key, tokens, now = None))]
    fn charge(&self, key: &str, tokens: u64, now: Option<f64>) -> PyResult<()> {
        let now_ms = now_ms(now)?;
        self.lock().charge(key, tokens, now_ms);
        Ok(())
    }

    fn __len__(&self) -> usize {
        self.lock().len()
    }
}

pub fn init(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyTokenBudget>()?;
    m.add_class::<BudgetDecision>()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: i64 = 1_000;
    const MIN: i64 = 60 * S;

    fn budget(limit: i64, window_s: i64) -> Budget {
        Budget::new(limit, window_s, 100).unwrap()
    }

    fn held(b: &Budget, key: &str) -> bool {
        b.keys.find(b.keys.hash(key), key).is_some()
    }

    #[test]
    fn config_is_checked() {
        assert_eq!(Budget::new(0, 60, 1).err(), Some(ConfigError::BadLimit));
        assert_eq!(Budget::new(-1, 60, 1).err(), Some(ConfigError::BadLimit));
        assert_eq!(Budget::new(1, 0, 1).err(), Some(ConfigError::BadWindow));
        assert_eq!(
            Budget::new(1, (1 << 40) + 1, 1).err(),
            Some(ConfigError::BadWindow)
        );
        assert_eq!(Budget::new(1, 1, 0).err(), Some(ConfigError::BadMaxKeys));
        assert!(Budget::new(i64::MAX, 1 << 40, 1).is_ok());
    }

    #[test]
    fn reserves_until_full_and_a_refusal_consumes_nothing() {
        let mut b = budget(1000, 60);
        let now = 10 * MIN;
        let o = b.reserve("k", 600, now);
        assert!(o.allowed);
        assert_eq!((o.remaining, o.reset_s, o.retry_after), (400, 0, 0));
        assert_eq!(o.bucket, 10);
        // 600 + 401 > 1000: refused, and nothing is counted.
        let o = b.reserve("k", 401, now + 1);
        assert!(!o.allowed);
        assert_eq!(o.remaining, 400);
        assert_eq!(o.reset_s, 0, "one more token still fits");
        for _ in 0..5 {
            assert!(!b.reserve("k", 401, now + 2).allowed);
        }
        let o = b.reserve("k", 400, now + 3);
        assert!(o.allowed);
        assert_eq!(o.remaining, 0);
        assert!(!b.reserve("k", 1, now + 4).allowed);
        // Another key has its own budget.
        assert!(b.reserve("other", 1000, now).allowed);
    }

    #[test]
    fn admitted_is_exactly_tokens_within_remaining() {
        let mut b = budget(1000, 60);
        b.reserve("k", 900, 0);
        for t in [MIN, MIN + 7_777, MIN + 30 * S, MIN + 59_999] {
            let left = b.peek("k", 1, t).remaining;
            assert!(b.peek("k", left, t).allowed, "{t}");
            assert!(!b.peek("k", left + 1, t).allowed, "{t}");
        }
    }

    #[test]
    fn previous_bucket_fades_linearly() {
        let mut b = budget(1000, 60);
        assert!(b.reserve("k", 1000, 0).allowed);
        assert_eq!(b.peek("k", 1, MIN).remaining, 0);
        // Half-way through the next bucket, half of it still counts.
        assert_eq!(b.peek("k", 1, MIN + 30 * S).remaining, 500);
        // 1000 * (60 - e) / 60 + 250 <= 1000 needs e >= 15 s.
        assert!(!b.peek("k", 250, MIN + 14_999).allowed);
        assert!(b.peek("k", 250, MIN + 15 * S).allowed);
        // Two buckets on, nothing counts.
        assert_eq!(b.peek("k", 1, 2 * MIN).remaining, 1000);
    }

    #[test]
    fn retry_after_and_reset_are_exact_at_the_boundaries() {
        let mut b = budget(1000, 60);
        assert!(b.reserve("k", 1000, 0).allowed);
        let o = b.reserve("k", 250, 0);
        assert!(!o.allowed);
        // 250 fit from 60 + 15 s; one token from 60 + 0.06 s (1000 * (60 - e)
        // <= 999 * 60 at e = 60 ms), which rounds up to a whole second.
        assert_eq!((o.retry_after, o.reset_s), (75, 61));
        assert!(!b.peek("k", 250, 74_999).allowed);
        assert!(b.peek("k", 250, 75 * S).allowed);
        assert!(!b.peek("k", 1, MIN + 59).allowed);
        assert!(b.peek("k", 1, MIN + 60).allowed);
        // A wait of a fraction of a second is a whole one.
        let o = b.reserve("k", 250, 75 * S - 1);
        assert_eq!((o.allowed, o.retry_after), (false, 1));
        // The whole budget fits only once the bucket has faded entirely.
        let o = b.reserve("k", 1000, 500);
        assert_eq!(o.retry_after, 120);
        assert!(!b.peek("k", 1000, 2 * MIN - 1).allowed);
        assert!(b.peek("k", 1000, 2 * MIN).allowed);
        // With room in the bucket, the wait is the previous bucket fading.
        let mut b = budget(1000, 60);
        b.reserve("k", 800, 0);
        b.reserve("k", 100, MIN);
        let o = b.reserve("k", 500, MIN);
        // 800 * (60 - e) / 60 + 100 + 500 <= 1000 needs e >= 30 s.
        assert_eq!((o.allowed, o.retry_after, o.reset_s), (false, 30, 0));
    }

    #[test]
    fn more_than_the_limit_never_fits_and_waits_a_window() {
        let mut b = budget(1000, 86_400);
        let o = b.reserve("k", 1001, 0);
        assert!(!o.allowed);
        assert_eq!((o.retry_after, o.reset_s, o.remaining), (86_400, 0, 1000));
        assert!(b.is_empty(), "a refusal creates no key");
        assert!(!b.peek("k", 1001, 10 * 86_400 * S).allowed);
    }

    #[test]
    fn settle_in_the_current_bucket() {
        let mut b = budget(1000, 60);
        let o = b.reserve("k", 800, 5 * S);
        assert!(!b.peek("k", 300, 6 * S).allowed);
        b.settle("k", o.bucket, 800, 150, 6 * S);
        assert_eq!(b.peek("k", 1, 6 * S).remaining, 850);
        // Using more than reserved counts the excess.
        let o = b.reserve("k", 100, 7 * S);
        b.settle("k", o.bucket, 100, 300, 7 * S);
        assert_eq!(b.peek("k", 1, 7 * S).remaining, 550);
        // Never below zero.
        b.settle("k", o.bucket, 10_000, 0, 8 * S);
        assert_eq!(b.peek("k", 1, 8 * S).remaining, 1000);
        assert!(held(&b, "k"));
    }

    #[test]
    fn settle_in_the_previous_bucket() {
        let mut b = budget(1000, 60);
        let o = b.reserve("k", 1000, MIN - 1);
        b.reserve("k", 100, MIN + 30 * S);
        // The answer ended in the next bucket: 1000 * 1/2 + 100 counts now.
        assert_eq!(b.peek("k", 1, MIN + 30 * S).remaining, 400);
        b.settle("k", o.bucket, 1000, 200, MIN + 30 * S);
        assert_eq!(b.peek("k", 1, MIN + 30 * S).remaining, 800);
        // The current bucket was untouched.
        assert_eq!(b.peek("k", 1, 2 * MIN).remaining, 900);
    }

    #[test]
    fn settle_in_an_older_bucket_changes_nothing() {
        let mut b = budget(1000, 60);
        let o = b.reserve("k", 1000, 0);
        b.reserve("k", 300, 2 * MIN);
        b.settle("k", o.bucket, 1000, 5000, 2 * MIN + 1);
        b.settle("k", o.bucket, 1000, 0, 2 * MIN + 1);
        assert_eq!(b.peek("k", 1, 2 * MIN + 1).remaining, 700);
        // Nor does a bucket later than any the key has seen.
        b.settle("k", 1_000, 0, 500, 2 * MIN + 1);
        assert_eq!(b.peek("k", 1, 2 * MIN + 1).remaining, 700);
        // Nor does a settle for a key that has gone, nor does it create one.
        b.settle("gone", o.bucket, 10, 0, 2 * MIN);
        b.settle("gone", 2, 10, 0, 2 * MIN);
        assert!(!held(&b, "gone"));
    }

    #[test]
    fn charge_counts_without_checking_and_saturates() {
        let mut b = budget(1000, 60);
        b.charge("k", 1500, 0);
        let o = b.peek("k", 1, 0);
        assert!(!o.allowed);
        assert_eq!(o.remaining, 0);
        // 1500 * (60 - e) <= 999 * 60 at e >= 20.04 s into the next bucket.
        assert_eq!(o.reset_s, 81);
        b.charge("k", u64::MAX, 1);
        b.settle("k", 0, 0, u64::MAX, 2);
        assert_eq!(b.keys.counters(b.find("k").slot.unwrap())[0].cur, u64::MAX);
        assert_eq!(b.peek("k", 1, 2).retry_after, 120);
        b.charge("zero", 0, 3);
        assert!(!held(&b, "zero"));
    }

    #[test]
    fn sync_writes_the_store_counts_in_place_of_the_local_ones() {
        let mut b = budget(1000, 60);
        let now = 10 * MIN + 30 * S;
        b.reserve("k", 100, now);
        // The store holds more (others' reservations) and says this one is in.
        let o = b.sync("k", now, 400, 700, 0);
        assert!(o.allowed);
        assert_eq!((o.remaining, o.bucket), (100, 10));
        assert!(!b.peek("k", 101, now).allowed);
        // Others settled below their reservations: the store's lower counts win.
        let o = b.sync("k", now + 1, 0, 300, 0);
        assert_eq!(o.remaining, 700);
        assert_eq!(b.peek("k", 1, now + 1).remaining, 700);
        // After a refusal by the store: the verdict for the refused tokens.
        let o = b.sync("k", now + 2, 1000, 400, 300);
        assert!(!o.allowed);
        assert_eq!(o.remaining, 100);
        // 1000 * (60 - e) / 60 + 400 + 300 <= 1000 at e = 42 s: 12 s from 30 s.
        assert_eq!(o.retry_after, 12);
        // Zero counts for an unknown key create nothing.
        b.sync("new", now, 0, 0, 0);
        assert!(!held(&b, "new"));
    }

    #[test]
    fn clock_going_back_is_read_cautiously() {
        let mut b = budget(1000, 60);
        assert!(b.reserve("k", 900, 2 * MIN).allowed);
        let o = b.reserve("k", 200, MIN);
        assert!(!o.allowed);
        assert_eq!(o.bucket, 2);
        let o = b.reserve("k", 100, MIN);
        assert!(o.allowed);
        // The reservation went into the key's latest bucket and settles there.
        assert_eq!(o.bucket, 2);
        b.settle("k", o.bucket, 100, 0, MIN);
        assert_eq!(b.peek("k", 1, 2 * MIN).remaining, 100);
    }

    #[test]
    fn expired_keys_are_dropped_and_the_cap_evicts_least_recent() {
        let mut b = Budget::new(100, 60, 3).unwrap();
        b.reserve("a", 10, 0);
        b.reserve("b", 10, MIN);
        // a's buckets expire at 120 s, b's at 180 s.
        b.reserve("c", 10, 2 * MIN - 1);
        assert_eq!(b.len(), 3);
        b.reserve("d", 10, 2 * MIN);
        assert_eq!(b.len(), 3);
        assert!(!held(&b, "a"));
        // A refused reserve counts as recent: b is refused, then e evicts c.
        assert!(!b.reserve("b", 1000, 2 * MIN + 1).allowed);
        b.reserve("e", 10, 2 * MIN + 2);
        assert_eq!(b.len(), 3);
        assert!(!held(&b, "c"));
        assert!(held(&b, "b") && held(&b, "d"));
        // An evicted key starts afresh: it errs towards admitting.
        assert_eq!(b.peek("c", 1, 2 * MIN + 3).remaining, 100);
        // Settles and charges are uses too.
        b.charge("b", 1, 2 * MIN + 4);
        b.settle("d", 2, 10, 5, 2 * MIN + 5);
        b.reserve("f", 10, 2 * MIN + 6);
        assert!(!held(&b, "e"));
    }

    #[test]
    fn peek_never_creates_or_consumes() {
        let mut b = budget(10, 60);
        for _ in 0..3 {
            assert_eq!(b.peek("k", 10, 0).remaining, 10);
        }
        assert!(b.is_empty());
        assert!(b.reserve("k", 10, 0).allowed);
        let o = b.peek("k", 1, 0);
        assert!(!o.allowed);
        assert_eq!(o.retry_after, o.reset_s);
    }
}
