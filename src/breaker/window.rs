//! Lock-free sliding windows: count-based (a ring of outcomes) and time-based (one bucket
//! per second).

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};

/// Calls, failures and slow calls in a window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Counts {
    pub calls: u32,
    pub failures: u32,
    pub slow: u32,
}

// Count window aggregate: three 21-bit fields, each biased by 2^20 so a field that is
// transiently negative (two writers racing on one ring slot) never borrows from its
// neighbour. One fetch_add then updates all three consistently.
const F: u32 = 21;
const MASK: u64 = (1 << F) - 1;
const BIAS: u64 = 1 << 20;
const BIASED_ZERO: u64 = BIAS | (BIAS << F) | (BIAS << (2 * F));

const CALL: u8 = 1;
const FAIL: u8 = 2;
const SLOW: u8 = 4;

#[inline]
fn slot_bits(fail: bool, slow: bool) -> u8 {
    CALL | if fail { FAIL } else { 0 } | if slow { SLOW } else { 0 }
}

#[inline]
fn packed(slot: u8) -> u64 {
    u64::from(slot & CALL)
        | (u64::from((slot & FAIL) >> 1) << F)
        | (u64::from((slot & SLOW) >> 2) << (2 * F))
}

#[inline]
fn field(w: u64, i: u32, max: u32) -> u32 {
    let v = ((w >> (i * F)) & MASK) as i64 - BIAS as i64;
    v.clamp(0, i64::from(max)) as u32
}

#[inline]
fn unpack(w: u64, max: u32) -> Counts {
    Counts {
        calls: field(w, 0, max),
        failures: field(w, 1, max),
        slow: field(w, 2, max),
    }
}

/// The last `n` calls. Each slot holds one outcome; overwriting a slot swaps the old outcome
/// out and adjusts the aggregate by the difference.
pub(crate) struct CountWindow {
    slots: Box<[AtomicU8]>,
    next: AtomicU64,
    agg: AtomicU64,
    n: u32,
}

impl CountWindow {
    pub fn new(n: u32) -> Self {
        Self {
            slots: (0..n).map(|_| AtomicU8::new(0)).collect(),
            next: AtomicU64::new(0),
            agg: AtomicU64::new(BIASED_ZERO),
            n,
        }
    }

    #[inline]
    pub fn counts(&self) -> Counts {
        unpack(self.agg.load(Ordering::Acquire), self.n)
    }

    /// A full window of plain successes: another success would change nothing.
    #[inline]
    pub fn is_full_and_clean(&self) -> bool {
        let c = self.counts();
        c.calls == self.n && c.failures == 0 && c.slow == 0
    }

    /// Records one call and returns the window after it.
    #[inline]
    pub fn record(&self, fail: bool, slow: bool) -> Counts {
        if !fail && !slow {
            // A full window of plain successes does not change when another success
            // replaces one of them: skip the write entirely (the common healthy case).
            let c = self.counts();
            if c.calls == self.n && c.failures == 0 && c.slow == 0 {
                return c;
            }
        }
        let i = (self.next.fetch_add(1, Ordering::Relaxed) % u64::from(self.n)) as usize;
        let new = slot_bits(fail, slow);
        let old = self.slots[i].swap(new, Ordering::AcqRel);
        let delta = packed(new).wrapping_sub(packed(old));
        let after = self
            .agg
            .fetch_add(delta, Ordering::AcqRel)
            .wrapping_add(delta);
        unpack(after, self.n)
    }

    pub fn reset(&self) {
        for s in self.slots.iter() {
            s.store(0, Ordering::Relaxed);
        }
        self.next.store(0, Ordering::Relaxed);
        self.agg.store(BIASED_ZERO, Ordering::Release);
    }
}

// Time bucket word: second stamp (19 bits, wraps after ~6 days) | calls | failures | slow
// (15 bits each). A bucket from an older second is replaced by CAS, so a rollover never
// loses or double-counts a call. Past 32767 calls in one second the bucket keeps its first
// 32767 outcomes as a sample.
const TB: u32 = 15;
const TMASK: u64 = (1 << TB) - 1;
const STAMP_BITS: u32 = 19;
const STAMP_MASK: u64 = (1 << STAMP_BITS) - 1;
const STAMP_SHIFT: u32 = 3 * TB;

/// The calls of the last `secs` seconds.
pub(crate) struct TimeWindow {
    buckets: Box<[AtomicU64]>,
    secs: u64,
    // The second until which the window may hold a failure or a slow call. A success
    // before then is evaluated; after it, nothing can trip and the buckets are not summed.
    dirty_until: AtomicU64,
}

impl TimeWindow {
    pub fn new(secs: u64) -> Self {
        Self {
            buckets: (0..secs).map(|_| AtomicU64::new(0)).collect(),
            secs,
            dirty_until: AtomicU64::new(0),
        }
    }

    pub fn counts(&self, now_s: u64) -> Counts {
        let stamp_now = now_s & STAMP_MASK;
        let mut c = Counts::default();
        for b in self.buckets.iter() {
            let w = b.load(Ordering::Acquire);
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
        c
    }

    /// Records one call. Returns the window, or empty counts when the window holds no
    /// failure and no slow call (nothing to evaluate).
    pub fn record(&self, now_s: u64, fail: bool, slow: bool) -> Counts {
        let stamp = now_s & STAMP_MASK;
        let delta = 1 | (u64::from(fail) << TB) | (u64::from(slow) << (2 * TB));
        let b = &self.buckets[(now_s % self.secs) as usize];
        let mut w = b.load(Ordering::Acquire);
        loop {
            let next = if w >> STAMP_SHIFT == stamp && w != 0 {
                if w & TMASK == TMASK {
                    break; // saturated this second: keep the sample
                }
                w + delta
            } else {
                (stamp << STAMP_SHIFT) | delta
            };
            match b.compare_exchange_weak(w, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => break,
                Err(cur) => w = cur,
            }
        }
        if fail || slow {
            self.dirty_until
                .fetch_max(now_s + self.secs, Ordering::AcqRel);
        } else if now_s >= self.dirty_until.load(Ordering::Acquire) {
            return Counts::default();
        }
        self.counts(now_s)
    }

    pub fn reset(&self) {
        for b in self.buckets.iter() {
            b.store(0, Ordering::Release);
        }
        self.dirty_until.store(0, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn count_window_slides() {
        let w = CountWindow::new(3);
        w.record(true, false);
        w.record(false, true);
        let c = w.record(false, false);
        assert_eq!(
            c,
            Counts {
                calls: 3,
                failures: 1,
                slow: 1
            }
        );
        // Overwrites the failure.
        let c = w.record(false, false);
        assert_eq!(c.failures, 0);
        assert_eq!(c.slow, 1);
        let c = w.record(false, false);
        assert_eq!((c.calls, c.failures, c.slow), (3, 0, 0));
        // Fast path: full healthy window stays as is.
        assert_eq!(w.record(false, false), c);
        let c = w.record(true, false);
        assert_eq!(c.failures, 1);
        w.reset();
        assert_eq!(w.counts(), Counts::default());
    }

    #[test]
    fn count_window_concurrent_totals_are_exact() {
        let w = std::sync::Arc::new(CountWindow::new(64));
        let hs: Vec<_> = (0..4)
            .map(|t| {
                let w = w.clone();
                std::thread::spawn(move || {
                    for i in 0..10_000 {
                        w.record((i + t) % 2 == 0, false);
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        let c = w.counts();
        assert_eq!(c.calls, 64);
        assert!(c.failures <= 64);
    }

    #[test]
    fn time_window_expires_old_buckets() {
        let w = TimeWindow::new(10);
        w.record(0, true, false);
        w.record(5, false, false);
        assert_eq!(w.counts(9).calls, 2);
        assert_eq!(w.counts(10).calls, 1);
        assert_eq!(w.counts(15).calls, 0);
        // Same slot, newer second: replaced.
        let c = w.record(20, false, true);
        assert_eq!((c.calls, c.failures, c.slow), (1, 0, 1));
        // Successes while the slow call is in the window are evaluated...
        assert_eq!(w.record(29, false, false).calls, 2);
        // ...and once it has expired, there is nothing to evaluate.
        assert_eq!(w.record(30, false, false), Counts::default());
        assert_eq!(w.counts(30).calls, 2);
    }
}
