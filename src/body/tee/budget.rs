//! The global limits of the tee: [`DrainBudget`] (background drains) and [`ByteBudget`]
//! (bytes queued for one sink across all its copies).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

#[allow(unused_imports)] // for doc links
use super::{outlet, outlet_in, AbortReason, DisconnectPolicy, TeeOptions};

/// A process-wide (or shared) cap on the background drains of [`DisconnectPolicy::Finish`].
///
/// Each client that leaves early would otherwise start its own drain of up to `max_bytes`
/// and `max_time`, with no limit on how many run at once: ten aborted requests pulled
/// 500 MB from an origin. A budget bounds the drains running at once and the bytes they
/// may pull together. A drain reserves what is left of its body when it starts (the rest
/// of `Content-Length`; without one it is charged chunk by chunk); a drain that does not
/// fit is not started, one that passes its share is stopped, and its copies end with
/// [`AbortReason::DrainLimit`]. The reservation is returned when the drain ends.
#[derive(Debug)]
pub struct DrainBudget {
    max_drains: usize,
    max_bytes: u64,
    active: AtomicUsize,
    bytes: AtomicU64,
}

impl DrainBudget {
    /// At most `max_drains` drains at once, pulling at most `max_bytes` together.
    pub fn new(max_drains: usize, max_bytes: u64) -> Arc<Self> {
        Arc::new(DrainBudget {
            max_drains,
            max_bytes,
            active: AtomicUsize::new(0),
            bytes: AtomicU64::new(0),
        })
    }

    /// The budget used when [`TeeOptions::drain_budget`] is `None`: 16 drains and 256 MiB
    /// for the whole process.
    pub fn global() -> &'static Arc<DrainBudget> {
        static GLOBAL: std::sync::OnceLock<Arc<DrainBudget>> = std::sync::OnceLock::new();
        GLOBAL.get_or_init(|| DrainBudget::new(16, 256 << 20))
    }

    /// Drains running now.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// Bytes pulled by the drains running now.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// A slot for one more drain with `reserve` bytes set aside, if both fit.
    pub(super) fn try_start(self: &Arc<Self>, reserve: u64) -> Option<DrainPermit> {
        let max = self.max_drains;
        self.active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        // From here on, dropping the permit returns the slot (and what it charged).
        let mut permit = DrainPermit {
            budget: self.clone(),
            bytes: 0,
            reserved: 0,
        };
        permit.charge_global(reserve).then(|| {
            permit.reserved = reserve;
            permit
        })
    }
}

/// One running drain's share of a [`DrainBudget`]; returns it on drop.
pub(super) struct DrainPermit {
    budget: Arc<DrainBudget>,
    /// Bytes charged to the budget (the reservation, plus what was pulled beyond it).
    bytes: u64,
    /// Bytes that may still be pulled without charging more.
    reserved: u64,
}

impl DrainPermit {
    /// Accounts `n` pulled bytes: from the reservation first, then from the budget.
    pub(super) fn try_charge(&mut self, n: u64) -> bool {
        let from_reserve = n.min(self.reserved);
        self.reserved -= from_reserve;
        self.charge_global(n - from_reserve)
    }

    fn charge_global(&mut self, n: u64) -> bool {
        if n == 0 {
            return true;
        }
        let max = self.budget.max_bytes;
        let ok = self
            .budget
            .bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| {
                b.checked_add(n).filter(|t| *t <= max)
            })
            .is_ok();
        if ok {
            self.bytes += n;
        }
        ok
    }
}

impl Drop for DrainPermit {
    fn drop(&mut self) {
        self.budget.bytes.fetch_sub(self.bytes, Ordering::AcqRel);
        self.budget.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A byte budget shared by every copy queued for one sink (see [`outlet_in`]).
///
/// The per-copy buffer of [`outlet`] bounds one copy; a sink that stalls (its `begin`
/// hangs while an object store retries) collects one such buffer per response. The budget
/// bounds their sum: a chunk that would pass it aborts that copy with
/// [`AbortReason::BudgetExceeded`] (the client is not slowed). Bytes are charged when
/// queued and returned when the sink takes them; a sink that keeps chunks after taking
/// them (a buffered upload) may keep them charged too.
#[derive(Debug)]
pub struct ByteBudget {
    limit: u64,
    used: AtomicU64,
    peak: AtomicU64,
}

impl ByteBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: u64) -> Arc<Self> {
        Arc::new(ByteBudget {
            limit,
            used: AtomicU64::new(0),
            peak: AtomicU64::new(0),
        })
    }

    /// The limit.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Bytes charged now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// The most bytes ever charged at once (never above [`ByteBudget::limit`]).
    pub fn peak(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }

    /// Charges `n` bytes if they fit; `false` (nothing charged) otherwise.
    pub fn try_charge(&self, n: u64) -> bool {
        let limit = self.limit;
        match self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                u.checked_add(n).filter(|t| *t <= limit)
            }) {
            Ok(prev) => {
                // A plain load first: the read-modify-write only on a new peak (this runs
                // for every chunk of every copy).
                if prev + n > self.peak.load(Ordering::Relaxed) {
                    self.peak.fetch_max(prev + n, Ordering::Relaxed);
                }
                true
            }
            Err(_) => false,
        }
    }

    /// Returns `n` bytes charged before.
    pub fn release(&self, n: u64) {
        if n != 0 {
            self.used.fetch_sub(n, Ordering::AcqRel);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_budget_never_passes_its_limit() {
        let b = ByteBudget::new(100);
        assert!(b.try_charge(60));
        assert!(!b.try_charge(41), "would pass the limit: nothing charged");
        assert!(b.try_charge(40));
        assert_eq!((b.used(), b.peak()), (100, 100));
        b.release(100);
        assert_eq!(b.used(), 0);
        assert!(!b.try_charge(u64::MAX), "no overflow on huge charges");
        assert!(ByteBudget::new(u64::MAX).try_charge(u64::MAX));
    }

    #[test]
    fn drain_budget_limits_slots_and_reservations() {
        let b = DrainBudget::new(2, 100);
        let mut first = b.try_start(70).expect("fits");
        assert!(b.try_start(31).is_none(), "reservation does not fit");
        assert_eq!(b.active(), 1, "a refused start returns its slot");
        let mut second = b.try_start(0).expect("unknown length: no reservation");
        assert!(b.try_start(0).is_none(), "no free slot");
        // Pulled bytes come from the reservation first, then from the budget.
        assert!(first.try_charge(70));
        assert_eq!(b.bytes(), 70);
        assert!(second.try_charge(30));
        assert!(!second.try_charge(1));
        assert!(!first.try_charge(1));
        drop(first);
        assert_eq!((b.active(), b.bytes()), (1, 30));
        drop(second);
        assert_eq!((b.active(), b.bytes()), (0, 0));
    }
}
