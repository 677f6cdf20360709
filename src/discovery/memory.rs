//! The embedded, in-process registry.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::stream::{self, BoxStream, StreamExt};
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use super::{saturating_deadline, DiscoveryError, Instance, Lease, Registry, RegistryEvent};

/// An in-process registry: the embedded default for examples, tests and services that
/// discover each other inside one process.
///
/// Registrations expire after their TTL unless kept alive (the [`Registration`] guard does
/// that), measured with `tokio::time`, so tests can pause time. Clones share the registry.
///
/// [`Registration`]: super::Registration
#[derive(Clone, Default)]
pub struct MemoryRegistry {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    state: Mutex<State>,
    /// Wakes the reaper when an earlier deadline appears or the registry is dropped.
    wake: Arc<Notify>,
    reaper: AtomicBool,
}

#[derive(Default)]
struct State {
    services: HashMap<String, ServiceState>,
    next_lease: i64,
}

struct ServiceState {
    entries: BTreeMap<String, Entry>,
    tx: watch::Sender<Arc<Vec<Instance>>>,
}

struct Entry {
    instance: Instance,
    lease: i64,
    expires: Instant,
}

impl ServiceState {
    fn new() -> Self {
        ServiceState {
            entries: BTreeMap::new(),
            tx: watch::channel(Arc::new(Vec::new())).0,
        }
    }

    fn list(&self) -> Vec<Instance> {
        self.entries.values().map(|e| e.instance.clone()).collect()
    }

    fn publish(&self) {
        self.tx.send_replace(Arc::new(self.list()));
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Let the reaper task see that the registry is gone.
        self.wake.notify_one();
    }
}

impl fmt::Debug for MemoryRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.inner.lock();
        let mut d = f.debug_map();
        for (name, s) in &state.services {
            d.entry(name, &s.entries.len());
        }
        d.finish()
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the maps half-updated in a way that
        // matters to readers, so a poisoned lock is still used.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl MemoryRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        MemoryRegistry::default()
    }

    /// Drops a registration as if the registry had lost it (a restart without its data).
    /// The [`Registration`](super::Registration) guard notices at its next refresh and
    /// registers again. For failure drills and tests. Returns `true` if it was there.
    pub fn evict(&self, service: &str, id: &str) -> bool {
        let mut state = self.inner.lock();
        let Some(svc) = state.services.get_mut(service) else {
            return false;
        };
        let removed = svc.entries.remove(id).is_some();
        if removed {
            svc.publish();
        }
        removed
    }

    fn ensure_reaper(&self) {
        if self.inner.reaper.swap(true, Ordering::AcqRel) {
            return;
        }
        let weak = Arc::downgrade(&self.inner);
        let wake = self.inner.wake.clone();
        tokio::spawn(reap(weak, wake));
    }
}

/// Removes expired registrations at their deadline and tells the watchers.
async fn reap(weak: Weak<Inner>, wake: Arc<Notify>) {
    loop {
        let next = {
            let Some(inner) = weak.upgrade() else { return };
            let now = Instant::now();
            let mut state = inner.lock();
            let mut next: Option<Instant> = None;
            for (name, svc) in state.services.iter_mut() {
                let before = svc.entries.len();
                svc.entries.retain(|id, e| {
                    let keep = e.expires > now;
                    if !keep {
                        tracing::info!(service = %name, id = %id, "registration expired");
                    }
                    keep
                });
                if svc.entries.len() != before {
                    svc.publish();
                }
                for e in svc.entries.values() {
                    next = Some(next.map_or(e.expires, |n| n.min(e.expires)));
                }
            }
            next
        };
        match next {
            Some(at) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(at) => {}
                    _ = wake.notified() => {}
                }
            }
            None => wake.notified().await,
        }
    }
}

impl Registry for MemoryRegistry {
    fn register<'a>(
        &'a self,
        instance: &'a Instance,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Lease, DiscoveryError>> {
        Box::pin(async move {
            instance.validate()?;
            if ttl.is_zero() {
                return Err(DiscoveryError::InvalidConfig("ttl must be positive".into()));
            }
            self.ensure_reaper();
            let lease = {
                let mut state = self.inner.lock();
                state.next_lease += 1;
                let lease = state.next_lease;
                let svc = state
                    .services
                    .entry(instance.service.clone())
                    .or_insert_with(ServiceState::new);
                svc.entries.insert(
                    instance.id.clone(),
                    Entry {
                        instance: instance.clone(),
                        lease,
                        expires: saturating_deadline(Instant::now(), ttl),
                    },
                );
                svc.publish();
                lease
            };
            self.inner.wake.notify_one();
            tracing::info!(%instance, ?ttl, "registered");
            Ok(Lease::new(instance.clone(), lease, ttl))
        })
    }

    fn keep_alive<'a>(&'a self, lease: &'a Lease) -> BoxFuture<'a, Result<(), DiscoveryError>> {
        Box::pin(async move {
            let mut state = self.inner.lock();
            let entry = state
                .services
                .get_mut(&lease.instance().service)
                .and_then(|s| s.entries.get_mut(&lease.instance().id))
                .filter(|e| e.lease == lease.id());
            match entry {
                Some(e) => {
                    e.expires = saturating_deadline(Instant::now(), lease.ttl());
                    Ok(())
                }
                None => Err(DiscoveryError::LeaseLost(lease.instance().id.clone())),
            }
        })
    }

    fn deregister<'a>(&'a self, lease: &'a Lease) -> BoxFuture<'a, Result<(), DiscoveryError>> {
        Box::pin(async move {
            let mut state = self.inner.lock();
            if let Some(svc) = state.services.get_mut(&lease.instance().service) {
                // Only this registration: a newer one under the same id stays.
                if svc
                    .entries
                    .get(&lease.instance().id)
                    .is_some_and(|e| e.lease == lease.id())
                {
                    svc.entries.remove(&lease.instance().id);
                    svc.publish();
                    tracing::info!(instance = %lease.instance(), "deregistered");
                }
            }
            Ok(())
        })
    }

    fn instances<'a>(
        &'a self,
        service: &'a str,
    ) -> BoxFuture<'a, Result<Vec<Instance>, DiscoveryError>> {
        Box::pin(async move {
            let state = self.inner.lock();
            Ok(state
                .services
                .get(service)
                .map(ServiceState::list)
                .unwrap_or_default())
        })
    }

    fn events(&self, service: &str) -> BoxStream<'static, RegistryEvent> {
        let rx = {
            let mut state = self.inner.lock();
            state
                .services
                .entry(service.to_string())
                .or_insert_with(ServiceState::new)
                .tx
                .subscribe()
        };
        // The first item is the current list, then one full list per change.
        stream::unfold((rx, true), |(mut rx, first)| async move {
            if !first && rx.changed().await.is_err() {
                return None;
            }
            let list = rx.borrow_and_update().as_ref().clone();
            Some((RegistryEvent::Snapshot(list), (rx, false)))
        })
        .boxed()
    }
}
