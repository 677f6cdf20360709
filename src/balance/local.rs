//! A balancer instance's own clones of its endpoints' services.
//!
//! Every try used to clone the endpoint's service out of the shared snapshot and drop the
//! clone once called: for `Forward`, five reference-count round trips (atomic
//! read-modify-writes) a request, and the clone's per-instance state lost with it (its
//! last `X-Forwarded-For` value, so that value was formatted and allocated again for every
//! request: two allocations; issue 12). The server keeps one balancer instance per
//! connection (`server::conn_service`), so an instance keeping its own clones calls the
//! same one for each first try of the connection's requests.
//!
//! The snapshot stays the source of truth: the clones belong to the snapshot they were
//! made from, recognised by its address (a [`Weak`] keeps that allocation, not its
//! contents, so the address is not reused), and are all dropped when another is
//! published. Retries and queued requests, which run in the response future without the
//! instance, still clone from the snapshot (the cold path).
//!
//! An instance keeps clones only from its second call on. A balancer cloned for every
//! request (axum's `Router` clones its service per request; so does `ServiceExt::oneshot`
//! on a clone) calls each instance once, and a kept clone would then cost it the list's
//! allocation and a weak reference for nothing (one allocation more a request in the
//! gateway bench before this rule); such an instance clones from the snapshot, as before.
//!
//! Bounds: only the first [`LOCAL_MAX`] endpoints of a snapshot are kept, made on first
//! use, so a connection holds at most that many clones however large the set. A clone of
//! an endpoint removed from the set lives until the connection's next request or its end.

use std::sync::{Arc, Weak};

use super::service::{MakeGate, Snap};

/// At most this many endpoint clones per balancer instance (per connection).
const LOCAL_MAX: usize = 32;

pub(crate) struct Local<K, S, M: MakeGate<K>> {
    /// The snapshot `services` mirror (index for index).
    of: Weak<Snap<K, S, M>>,
    services: Vec<Option<S>>,
    /// Whether this instance was called before: clones are kept from the second call on.
    called: bool,
}

impl<K, S, M: MakeGate<K>> Local<K, S, M> {
    pub(crate) fn new() -> Self {
        Local {
            of: Weak::new(),
            services: Vec::new(),
            called: false,
        }
    }

    /// This instance's clone of the service of `snap`'s endpoint `index`, made on first
    /// use; `None` on the instance's first call and past [`LOCAL_MAX`] (the caller clones
    /// from the snapshot).
    #[inline]
    pub(crate) fn service(&mut self, snap: &Arc<Snap<K, S, M>>, index: usize) -> Option<&mut S>
    where
        S: Clone,
    {
        if !self.called {
            self.called = true;
            return None;
        }
        let ep = snap.endpoints.get(index)?;
        if index >= LOCAL_MAX {
            return None;
        }
        // `Weak::new()` points nowhere any `Arc` does: the first call always rebuilds.
        if !std::ptr::eq(self.of.as_ptr(), Arc::as_ptr(snap)) {
            self.services.clear();
            self.of = Arc::downgrade(snap);
        }
        if self.services.len() <= index {
            self.services.resize_with(index + 1, || None);
        }
        Some(self.services[index].get_or_insert_with(|| ep.service.clone()))
    }
}
