//! The time-based window: the calls of the last `secs` seconds, one bucket per second.
//!
//! Every call is counted in a bucket of *its thread's* row (per-thread rows, see
//! [`crate::stripe`]): with two threads, one shared bucket per second was a contended
//! compare-and-swap on every call. The window is the sum over the rows that were ever
//! written, read only when a call could change the decision:
//! - a failure or a slow call;
//! - a success while the window holds a failure or a slow call (`dirty_until`), at most
//!   once per second once the window holds the minimum number of calls: within one second
//!   nothing expires, so successes can only lower the rates; below the minimum every call
//!   is evaluated (the one that reaches it may trip).

use std::sync::atomic::{AtomicU64, Ordering};

use super::Counts;
use crate::stripe::{default_cells, my_cell, total_cells};

// Bucket word: second stamp (19 bits, wraps after ~6 days) | calls | failures | slow
// (15 bits each). A bucket from an older second is replaced, so a rollover never loses or
// double-counts a call. Past 32767 calls in one second the bucket keeps its first 32767
// outcomes as a sample.
const TB: u32 = 15;
const TMASK: u64 = (1 << TB) - 1;
const STAMP_BITS: u32 = 19;
const STAMP_MASK: u64 = (1 << STAMP_BITS) - 1;
const STAMP_SHIFT: u32 = 3 * TB;

/// Upper bound on buckets (rows x seconds) per window: 32 KiB. Long windows get fewer rows.
const MAX_BUCKETS: u64 = 4_096;

/// Eight buckets: rows start on their own cache line.
#[repr(align(64))]
#[derive(Default)]
struct Line([AtomicU64; 8]);

/// `eval` before any evaluation: matches no second.
const NEVER: u64 = u64::MAX;

/// The calls of the last `secs` seconds.
pub(crate) struct TimeWindow {
    secs: u64,
    min_calls: u32,
    /// Rows with an exclusive owner (then the shared ones, see `stripe::total_cells`).
    exclusive: usize,
    lines_per_row: usize,
    lines: Box<[Line]>,
    /// Bit `r`: row `r` was written since the last reset (rows past 63 share bit 63).
    used: AtomicU64,
    /// The second until which the window may hold a failure or a slow call.
    dirty_until: AtomicU64,
    /// `second << 1 | below_minimum` of the last evaluation.
    eval: AtomicU64,
}

impl TimeWindow {
    pub fn new(secs: u64, min_calls: u32) -> Self {
        let secs = secs.max(1);
        let mut exclusive = default_cells();
        while exclusive > 1 && total_cells(exclusive) as u64 * secs > MAX_BUCKETS {
            exclusive /= 2;
        }
        let lines_per_row = usize::try_from(secs.div_ceil(8)).unwrap_or(usize::MAX);
        let rows = total_cells(exclusive);
        Self {
            secs,
            min_calls,
            exclusive,
            lines_per_row,
            lines: (0..rows * lines_per_row).map(|_| Line::default()).collect(),
            used: AtomicU64::new(0),
            dirty_until: AtomicU64::new(0),
            eval: AtomicU64::new(NEVER),
        }
    }

    #[inline]
    fn bucket(&self, row: usize, i: usize) -> &AtomicU64 {
        &self.lines[row * self.lines_per_row + i / 8].0[i % 8]
    }

    fn rows(&self) -> usize {
        self.lines.len() / self.lines_per_row.max(1)
    }

    pub fn counts(&self, now_s: u64) -> Counts {
        let stamp_now = now_s & STAMP_MASK;
        let used = self.used.load(Ordering::Acquire);
        let mut c = Counts::default();
        for row in 0..self.rows() {
            if used & (1 << row.min(63)) == 0 {
                continue;
            }
            for i in 0..self.secs as usize {
                let w = self.bucket(row, i).load(Ordering::Acquire);
                if w == 0 {
                    continue;
                }
                let age = stamp_now.wrapping_sub(w >> STAMP_SHIFT) & STAMP_MASK;
                if age < self.secs {
                    c.calls += (w & TMASK) as u32;
                    c.failures += ((w >> TB) & TMASK) as u32;
                    c.slow += ((w >> (2 * TB)) & TMASK) as u32;
                }
            }
        }
        c
    }

    /// Records one call at second `now_s`. Returns the window when the call could change
    /// the decision, `None` when it cannot (no rate rose).
    #[inline(always)]
    pub fn record(&self, now_s: u64, fail: bool, slow: bool) -> Option<Counts> {
        self.add(now_s, fail, slow);
        if fail || slow {
            return Some(self.record_marked(now_s));
        }
        if now_s >= self.dirty_until.load(Ordering::Relaxed)
            || self.eval.load(Ordering::Relaxed) == now_s << 1
        {
            return None;
        }
        Some(self.evaluate(now_s))
    }

    #[inline(always)]
    fn add(&self, now_s: u64, fail: bool, slow: bool) {
        let stamp = now_s & STAMP_MASK;
        let delta = 1 | (u64::from(fail) << TB) | (u64::from(slow) << (2 * TB));
        let (row, exclusive) = my_cell(self.exclusive);
        let bit = 1u64 << row.min(63);
        if self.used.load(Ordering::Relaxed) & bit == 0 {
            self.used.fetch_or(bit, Ordering::AcqRel);
        }
        let b = self.bucket(row, (now_s % self.secs) as usize);
        let next = |w: u64| -> Option<u64> {
            if w >> STAMP_SHIFT == stamp && w != 0 {
                // Saturated this second: keep the sample.
                (w & TMASK != TMASK).then_some(w + delta)
            } else {
                Some((stamp << STAMP_SHIFT) | delta)
            }
        };
        if exclusive {
            // Only this thread writes this row (see `crate::stripe`).
            if let Some(n) = next(b.load(Ordering::Relaxed)) {
                b.store(n, Ordering::Release);
            }
        } else {
            let _ = b.fetch_update(Ordering::AcqRel, Ordering::Acquire, next);
        }
    }

    #[inline(never)]
    fn record_marked(&self, now_s: u64) -> Counts {
        // A locked read-modify-write on a line every thread reads, but only when the
        // deadline moves (at most once per second): every other failure only loads it.
        let until = now_s.saturating_add(self.secs);
        if self.dirty_until.load(Ordering::Relaxed) < until {
            self.dirty_until.fetch_max(until, Ordering::AcqRel);
        }
        self.evaluate(now_s)
    }

    #[inline(never)]
    fn evaluate(&self, now_s: u64) -> Counts {
        let c = self.counts(now_s);
        let below = c.calls < self.min_calls;
        // Written only when it changes (a new second, or crossing the minimum), so the
        // successes of other threads, which read it, keep their cached copy.
        let e = (now_s << 1) | u64::from(below);
        if self.eval.load(Ordering::Relaxed) != e {
            self.eval.store(e, Ordering::Relaxed);
        }
        c
    }

    pub fn reset(&self) {
        for l in self.lines.iter() {
            for b in l.0.iter() {
                b.store(0, Ordering::Release);
            }
        }
        self.used.store(0, Ordering::Release);
        self.dirty_until.store(0, Ordering::Release);
        self.eval.store(NEVER, Ordering::Relaxed);
    }
}
