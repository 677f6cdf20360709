//! Passive health shared by the balancers of several workers.
//!
//! The problem: with thread-per-core serving ([`Workers`](crate::server::Workers)) every
//! worker builds its own [`Balance`](super::Balance), so each one learns on its own that an
//! endpoint is dead: with N workers a dead endpoint fails N × `max_fails` requests before
//! every worker ejects it, and after `fail_timeout` each worker sends its own trial. nginx
//! avoids this with `upstream { zone ...; }`: the upstream's health lives in shared memory.
//!
//! [`SharedHealth`] is that zone. Create one, pass it to every worker's builder with
//! [`BalanceBuilder::shared_health`](super::BalanceBuilder::shared_health); an endpoint then
//! takes its health cell (`max_fails` window, ejection, single trial) from the handle when
//! it joins a worker's set, keyed by its discovery key, so every worker holding that key
//! reads and writes the same atomics. The lookup is a mutex on the cold path (membership
//! changes); the request path is unchanged: one relaxed load of the cell per pick. The
//! ejection budget (`max_ejection_percent`) is decided under one lock in the handle, so
//! two workers cannot each eject "the last one the budget allows". One clock base is shared
//! so ejection deadlines mean the same instant on every worker.
//!
//! What stays per worker, on purpose: in-flight counts (least-pending picks on the local
//! view, which is what that worker's pool sees), request/failure totals (a shared counter
//! bumped on every request would be a cache line bounced between cores), round-robin
//! positions and connection pools.

use std::collections::HashMap;
use std::fmt;
use std::hash::Hash;
use std::sync::atomic::{AtomicU32, AtomicU64};
use std::sync::{Arc, Mutex, Weak};

use super::endpoint::Clock;

/// The passive-health state of one endpoint: the `max_fails` window and the ejection word.
/// Inline in an endpoint of an unshared balancer, or one per key in a [`SharedHealth`].
#[derive(Debug, Default)]
pub(crate) struct HealthCell {
    /// Failures counted in the current window.
    pub(crate) fails: AtomicU32,
    /// Clock time of the window's first failure (0: no window open).
    pub(crate) window_start: AtomicU64,
    /// Health state in one word, so a pick costs one relaxed load: 0 in rotation,
    /// `t` ejected until clock time `t` (then due for a trial), `TRIAL` trial in flight.
    pub(crate) ejected_until: AtomicU64,
}

/// Passive health shared by several balancers (one per worker): nginx's upstream `zone`.
///
/// ```
/// use bytes::Bytes;
/// use http_body_util::Full;
/// use tower::ServiceExt;
/// use tower_patterns::balance::{Balance, EndpointState, Retry, SharedHealth};
/// use tower_patterns::proxy::Forward;
///
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let health = SharedHealth::new();
/// // Two workers' balancers over the same two (closed) ports.
/// let worker = || {
///     let fwd = Forward::<Full<Bytes>>::new("http://127.0.0.1:1").unwrap();
///     let other = fwd.to("http://127.0.0.1:2").unwrap();
///     Balance::builder()
///         .retry(Retry::never())
///         .shared_health(&health)
///         .build_static([("one", fwd), ("two", other)])
/// };
/// let (a, b) = (worker(), worker());
/// // Worker A's refused connection ejects an endpoint (the budget allows one of two)...
/// let req = http::Request::get("/").body(Full::default()).unwrap();
/// assert!(a.oneshot(req).await.is_err());
/// // ... and worker B, which sent nothing, sees it ejected.
/// let ejected = b.endpoints().into_iter().filter(|e| matches!(e.state, EndpointState::Ejected { .. }));
/// assert_eq!(ejected.count(), 1);
/// assert_eq!(health.len(), 2);
/// # });
/// ```
///
/// Cloning is cheap; clones are the same table. A cell lives as long as some balancer's
/// endpoint holds it: when every balancer has dropped the key from its set, the cell is
/// freed, so the table is bounded by the membership (dead entries are pruned at the next
/// lookup).
pub struct SharedHealth<K> {
    inner: Arc<Inner<K>>,
}

struct Inner<K> {
    cells: Mutex<HashMap<K, Weak<HealthCell>>>,
    clock: Clock,
    /// Serialises ejection decisions of every balancer using this handle, so the ejection
    /// budget holds across workers (cold path: only on a failure that calls for ejection).
    eject_lock: Mutex<()>,
}

impl<K> Clone for SharedHealth<K> {
    fn clone(&self) -> Self {
        SharedHealth {
            inner: self.inner.clone(),
        }
    }
}

impl<K> fmt::Debug for SharedHealth<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedHealth")
            .field("cells", &self.lock().len())
            .finish_non_exhaustive()
    }
}

impl<K: Eq + Hash + Clone> Default for SharedHealth<K> {
    fn default() -> Self {
        Self::new()
    }
}

impl<K> SharedHealth<K> {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<K, Weak<HealthCell>>> {
        // A panic elsewhere while holding the lock leaves the map consistent (inserts and
        // removes are single calls), so a poisoned lock is still usable.
        self.inner.cells.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn clock(&self) -> Clock {
        self.inner.clock
    }

    pub(crate) fn eject_lock(&self) -> &Mutex<()> {
        &self.inner.eject_lock
    }
}

impl<K: Eq + Hash + Clone> SharedHealth<K> {
    /// An empty table. Its clock starts now: create it before the workers.
    pub fn new() -> Self {
        SharedHealth {
            inner: Arc::new(Inner {
                cells: Mutex::new(HashMap::new()),
                clock: Clock::new(),
                eject_lock: Mutex::new(()),
            }),
        }
    }

    /// The cell of `key`: the live one if any balancer holds it, else a fresh one.
    /// Cold path (an endpoint joining a set); prunes cells nobody holds any more.
    pub(crate) fn cell(&self, key: &K) -> Arc<HealthCell> {
        let mut cells = self.lock();
        if let Some(cell) = cells.get(key).and_then(Weak::upgrade) {
            return cell;
        }
        cells.retain(|_, w| w.strong_count() > 0);
        let cell = Arc::new(HealthCell::default());
        cells.insert(key.clone(), Arc::downgrade(&cell));
        cell
    }

    /// Number of endpoints whose health is held by at least one balancer.
    pub fn len(&self) -> usize {
        let mut cells = self.lock();
        cells.retain(|_, w| w.strong_count() > 0);
        cells.len()
    }

    /// `true` when no balancer holds any endpoint's health here.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering::Relaxed;

    #[test]
    fn same_key_same_cell_and_freed_when_unheld() {
        let h = SharedHealth::<&str>::new();
        let a = h.cell(&"a");
        let a2 = h.cell(&"a");
        assert!(Arc::ptr_eq(&a, &a2));
        a.ejected_until.store(7, Relaxed);
        assert_eq!(a2.ejected_until.load(Relaxed), 7);
        let b = h.cell(&"b");
        assert!(!Arc::ptr_eq(&a, &b));
        assert_eq!(h.len(), 2);
        drop(a);
        assert_eq!(h.len(), 2, "a2 still holds it");
        drop(a2);
        assert_eq!(h.len(), 1);
        // A key that comes back after being freed starts healthy.
        let a3 = h.cell(&"a");
        assert_eq!(a3.ejected_until.load(Relaxed), 0);
        drop((a3, b));
        assert!(h.is_empty());
    }

    #[test]
    fn clones_share_the_table_and_clock() {
        let h = SharedHealth::<u32>::new();
        let h2 = h.clone();
        let c = h.cell(&1);
        assert!(Arc::ptr_eq(&c, &h2.cell(&1)));
        assert!(std::ptr::eq(h.eject_lock(), h2.eject_lock()));
    }
}
