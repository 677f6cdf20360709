//! Counters of the tee.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

#[allow(unused_imports)] // for doc links
use super::{ByteBudget, DrainBudget};

/// Counters of a tee (or of every tee sharing one `Arc`): cheap atomics, read with
/// [`TeeStats::snapshot`].
#[derive(Debug, Default)]
pub struct TeeStats {
    pub(super) buffered: AtomicUsize,
    pub(super) peak_buffered: AtomicUsize,
    pub(super) overflows: AtomicU64,
    pub(super) upstream_aborts: AtomicU64,
    pub(super) length_mismatches: AtomicU64,
    pub(super) client_gone_aborts: AtomicU64,
    pub(super) drains_started: AtomicU64,
    pub(super) drain_aborts: AtomicU64,
    pub(super) drains_refused: AtomicU64,
    pub(super) drained_bytes: AtomicU64,
    pub(super) budget_aborts: AtomicU64,
}

/// A point-in-time copy of [`TeeStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TeeStatsSnapshot {
    /// Bytes currently queued for sinks (sent by the tee, not yet consumed).
    pub buffered: usize,
    /// Highest value `buffered` reached.
    pub peak_buffered: usize,
    /// Copies aborted because a sink fell behind.
    pub overflows: u64,
    /// Copies aborted because the upstream body failed.
    pub upstream_aborts: u64,
    /// Copies aborted because the length did not match `Content-Length`.
    pub length_mismatches: u64,
    /// Copies aborted because the client left (policy `Abort`).
    pub client_gone_aborts: u64,
    /// Background drains started after a client left (policy `Finish`).
    pub drains_started: u64,
    /// Background drains stopped by their byte/time cap or the [`DrainBudget`].
    pub drain_aborts: u64,
    /// Drains not started because the [`DrainBudget`] had no free slot (copies aborted).
    pub drains_refused: u64,
    /// Bytes read from upstreams by background drains.
    pub drained_bytes: u64,
    /// Copies aborted because their sink's [`ByteBudget`] was exhausted.
    pub budget_aborts: u64,
}

impl TeeStats {
    /// New zeroed counters.
    pub fn new() -> Arc<Self> {
        Arc::new(TeeStats::default())
    }

    /// Reads every counter.
    pub fn snapshot(&self) -> TeeStatsSnapshot {
        let r = Ordering::Relaxed;
        TeeStatsSnapshot {
            buffered: self.buffered.load(r),
            peak_buffered: self.peak_buffered.load(r),
            overflows: self.overflows.load(r),
            upstream_aborts: self.upstream_aborts.load(r),
            length_mismatches: self.length_mismatches.load(r),
            client_gone_aborts: self.client_gone_aborts.load(r),
            drains_started: self.drains_started.load(r),
            drain_aborts: self.drain_aborts.load(r),
            drains_refused: self.drains_refused.load(r),
            drained_bytes: self.drained_bytes.load(r),
            budget_aborts: self.budget_aborts.load(r),
        }
    }

    pub(super) fn add_buffered(&self, n: usize) {
        let now = self.buffered.fetch_add(n, Ordering::Relaxed) + n;
        // A plain load first: the read-modify-write only happens on a new peak.
        if now > self.peak_buffered.load(Ordering::Relaxed) {
            self.peak_buffered.fetch_max(now, Ordering::Relaxed);
        }
    }

    /// Counts a copy aborted by its sink's [`ByteBudget`] outside the tee (bytes a writer
    /// kept after taking them).
    pub(crate) fn count_budget_abort(&self) {
        self.budget_aborts.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn sub_buffered(&self, n: usize) {
        self.buffered.fetch_sub(n, Ordering::Relaxed);
    }
}
