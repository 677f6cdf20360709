//! The count-based window: the outcomes of the last `n` calls.
//!
//! A success is the common case and must cost next to nothing, also while the window holds
//! a few failures. So only failures and slow calls ("marked" calls) are stored, each with
//! its position (the number of calls recorded so far, its own included); plain successes
//! only bump a per-thread counter cell ([`StripedCounter`]: no shared write). The window
//! at `t` calls is the positions in `t - n + 1 ..= t`, so a marked call leaves it once `n`
//! more calls have been counted, exactly as in a ring of `n` outcomes.
//!
//! A success can only raise a rate while the window is below the minimum number of calls
//! (until then no rate applies; the success that reaches it may trip): in that phase
//! successes are evaluated ([`EVALUATE`]), afterwards they are only counted ([`COUNT`]),
//! and in a full window without marked calls not even counted ([`CLEAN`]: another success
//! changes nothing). The mode is recomputed under the lock by every evaluation and, in the
//! counting mode, every [`TIDY_EVERY`] successes of a thread.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Mutex, MutexGuard};

use super::Counts;
use crate::stripe::StripedCounter;

/// Full window, no marked call: a success changes nothing.
const CLEAN: u8 = 0;
/// Successes are counted (they slide the window), not evaluated.
const COUNT: u8 = 1;
/// Marked calls in a window still below the minimum: every call is evaluated.
const EVALUATE: u8 = 2;

/// In the counting mode, a thread re-checks the mode (a marked call may have left the
/// window) every this many of its own calls.
const TIDY_EVERY: u64 = 64;

#[derive(Default)]
struct Marked {
    /// `(position, failed, slow)`, in the order recorded (positions nearly sorted: two
    /// threads may push theirs in the opposite order).
    q: VecDeque<(u64, bool, bool)>,
    failures: u32,
    slow: u32,
}

impl Marked {
    /// Drops the marked calls that left the window of `n` at `t` calls.
    fn expire(&mut self, t: u64, n: u64) {
        while let Some(&(pos, f, s)) = self.q.front() {
            // In the window: t - n < pos (positions start at 1).
            if pos.saturating_add(n) > t && self.q.len() as u64 <= n {
                break;
            }
            self.q.pop_front();
            self.failures -= u32::from(f);
            self.slow -= u32::from(s);
        }
    }

    fn counts(&self, t: u64, n: u64) -> Counts {
        let calls = t.min(n) as u32;
        Counts {
            calls,
            failures: self.failures.min(calls),
            slow: self.slow.min(calls),
        }
    }
}

/// The last `n` calls.
pub(crate) struct CountWindow {
    n: u64,
    min_calls: u32,
    mode: AtomicU8,
    calls: StripedCounter,
    marked: Mutex<Marked>,
}

impl CountWindow {
    /// A window of `n` calls whose rates apply from `min_calls` calls on.
    pub fn new(n: u32, min_calls: u32) -> Self {
        Self {
            n: u64::from(n.max(1)),
            min_calls,
            mode: AtomicU8::new(COUNT),
            calls: StripedCounter::new(),
            marked: Mutex::new(Marked::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Marked> {
        // The data stays consistent at every await-free step; a panic elsewhere while the
        // lock was held leaves nothing half-done worth refusing service for.
        self.marked.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn mode_for(&self, m: &Marked, t: u64) -> u8 {
        if m.q.is_empty() {
            if t >= self.n {
                CLEAN
            } else {
                COUNT
            }
        } else if t.min(self.n) < u64::from(self.min_calls) {
            EVALUATE
        } else {
            COUNT
        }
    }

    /// The window now.
    pub fn counts(&self) -> Counts {
        let mut m = self.lock();
        let t = self.calls.sum();
        m.expire(t, self.n);
        m.counts(t, self.n)
    }

    /// Records one call. Returns the window after it when the call could change the
    /// decision (a marked call, or any call below the minimum with marked calls in the
    /// window); `None` when it cannot (then no rate rose).
    #[inline]
    pub fn record(&self, fail: bool, slow: bool) -> Option<Counts> {
        if !fail && !slow {
            match self.mode.load(Ordering::Relaxed) {
                CLEAN => return None,
                COUNT => {
                    if self.calls.add(1) % TIDY_EVERY == 0 {
                        self.tidy();
                    }
                    return None;
                }
                _ => {}
            }
        }
        Some(self.record_evaluated(fail, slow))
    }

    #[inline(never)]
    fn record_evaluated(&self, fail: bool, slow: bool) -> Counts {
        self.calls.add(1);
        let mut m = self.lock();
        let t = self.calls.sum();
        if fail || slow {
            m.q.push_back((t, fail, slow));
            m.failures += u32::from(fail);
            m.slow += u32::from(slow);
        }
        m.expire(t, self.n);
        self.mode.store(self.mode_for(&m, t), Ordering::Relaxed);
        m.counts(t, self.n)
    }

    #[cold]
    fn tidy(&self) {
        // Skipped when an evaluation holds the lock: it sets the mode itself.
        if let Ok(mut m) = self.marked.try_lock() {
            let t = self.calls.sum();
            m.expire(t, self.n);
            self.mode.store(self.mode_for(&m, t), Ordering::Relaxed);
        }
    }

    pub fn reset(&self) {
        let mut m = self.lock();
        *m = Marked::default();
        self.calls.reset();
        self.mode.store(COUNT, Ordering::Relaxed);
    }
}
