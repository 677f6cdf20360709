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

/// Upper bound on buckets (rows x slots) per window: 64 KiB. Long windows get fewer rows.
const MAX_BUCKETS: u64 = 8_192;

/// Eight buckets: rows start on their own cache line.
#[repr(align(64))]
#[derive(Default)]
struct Line([AtomicU64; 8]);

/// `eval` before any evaluation: matches no second.
const NEVER: u64 = u64::MAX;

/// The calls of the last `secs` seconds.
pub(crate) struct TimeWindow {
    secs: u64,
    /// Buckets per row: `secs` rounded up to a power of two, so that a second's bucket is
    /// `second & (slots - 1)` and not a 64-bit division on every call. Two seconds of one
    /// window never share a bucket; the extra buckets only hold expired seconds, which the
    /// stamp check skips.
    slots: usize,
    min_calls: u32,
    /// Rows with an exclusive owner (then the shared ones, see `stripe::total_cells`).
    exclusive: usize,
    lines_per_row: usize,
    /// Rows: `lines.len() / lines_per_row`.
    rows: usize,
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
        let slots = usize::try_from(secs)
            .unwrap_or(usize::MAX)
            .checked_next_power_of_two()
            .unwrap_or(usize::MAX);
        let mut exclusive = default_cells();
        while exclusive > 1
            && (total_cells(exclusive) as u64).saturating_mul(slots as u64) > MAX_BUCKETS
        {
            exclusive /= 2;
        }
        let lines_per_row = slots.div_ceil(8);
        let rows = total_cells(exclusive);
        Self {
            secs,
            slots,
            min_calls,
            exclusive,
            lines_per_row,
            rows,
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

    pub fn counts(&self, now_s: u64) -> Counts {
        // Each live second has one bucket per row: visit exactly those (`secs` per row,
        // not every slot) and keep a bucket only when its stamp is that second's. The
        // sums are packed: calls and slow in one word, 30 bits apart, failures in
        // another; a row's 15-bit fields summed over at most `MAX_BUCKETS` buckets stay
        // below 2^28, so the lanes never carry into each other. Per failure this runs
        // on every call, so it is kept to a load, a compare and two adds per bucket.
        const LANE: u32 = 2 * TB;
        const PAIR: u64 = TMASK | (TMASK << LANE);
        let mask = self.slots - 1;
        let used = self.used.load(Ordering::Acquire);
        let (mut pair, mut failures) = (0u64, 0u64);
        for row in 0..self.rows {
            if used & (1 << row.min(63)) == 0 {
                continue;
            }
            let lines = &self.lines[row * self.lines_per_row..][..self.lines_per_row];
            for i in 0..self.secs {
                let sec = now_s.wrapping_sub(i);
                let slot = (sec as usize) & mask;
                let w = lines[slot / 8].0[slot % 8].load(Ordering::Acquire);
                let live = w >> STAMP_SHIFT == sec & STAMP_MASK;
                // Branch-free: an expired bucket adds zero.
                let keep = u64::from(live).wrapping_neg();
                pair += w & PAIR & keep;
                failures += (w >> TB) & TMASK & keep;
            }
        }
        Counts {
            calls: (pair & ((1 << LANE) - 1)) as u32,
            failures: failures as u32,
            slow: (pair >> LANE) as u32,
        }
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
        // `slots` is a power of two: the mask is `now_s % slots`.
        let b = self.bucket(row, (now_s as usize) & (self.slots - 1));
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
