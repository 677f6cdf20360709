//! The fail-static view of one service.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use futures_util::StreamExt;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::{Instance, MakeEndpoint, Registry, RegistryEvent, Selector, ServiceDiscover};

/// What a [`Watcher`] knows about a service at one moment.
#[derive(Debug, Clone)]
pub struct Snapshot {
    instances: Arc<BTreeMap<String, Instance>>,
    revision: u64,
    synced: bool,
    stale_since: Option<Instant>,
    last_error: Option<Arc<str>>,
}

impl Snapshot {
    fn empty() -> Self {
        Snapshot {
            instances: Arc::new(BTreeMap::new()),
            revision: 0,
            synced: false,
            stale_since: None,
            last_error: None,
        }
    }

    /// The instances, ordered by id.
    pub fn instances(&self) -> impl ExactSizeIterator<Item = &Instance> + '_ {
        self.instances.values()
    }

    /// The instance with this id.
    pub fn get(&self, id: &str) -> Option<&Instance> {
        self.instances.get(id)
    }

    /// How many instances there are.
    pub fn len(&self) -> usize {
        self.instances.len()
    }

    /// `true` when there is no instance.
    pub fn is_empty(&self) -> bool {
        self.instances.is_empty()
    }

    /// Increases with every published change (instances or freshness).
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// `true` once the registry has answered at least once.
    pub fn is_synced(&self) -> bool {
        self.synced
    }

    /// `true` while the registry is unreachable: the instances are the last known ones.
    pub fn is_stale(&self) -> bool {
        self.stale_since.is_some()
    }

    /// How long the registry has been unreachable (`None` while it answers).
    pub fn staleness(&self) -> Option<Duration> {
        self.stale_since.map(|t| t.elapsed())
    }

    /// Since when the registry has been unreachable.
    pub fn stale_since(&self) -> Option<Instant> {
        self.stale_since
    }

    /// The last registry error seen while stale.
    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }
}

struct Shared {
    service: String,
    selector: Selector,
    current: ArcSwap<Snapshot>,
    changed: watch::Sender<u64>,
}

struct Task(JoinHandle<()>);

impl Drop for Task {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The current instances of one service matching a [`Selector`], kept up to date from
/// [`Registry::events`].
///
/// **Fail-static**: while the registry is unreachable the last known instances are kept
/// (never an empty list because the registry is down) and the [`Snapshot`] says since when
/// it is stale. A registry that answers decides: instances that expired or deregistered are
/// removed.
///
/// Reading is lock-free ([`ArcSwap`]). Clones share one background task, which stops when
/// the last clone (or the last [`ServiceDiscover`] made from it) is dropped.
#[derive(Clone)]
pub struct Watcher {
    shared: Arc<Shared>,
    _task: Arc<Task>,
}

impl fmt::Debug for Watcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.snapshot();
        f.debug_struct("Watcher")
            .field("service", &self.shared.service)
            .field("selector", &self.shared.selector)
            .field("instances", &s.len())
            .field("stale", &s.is_stale())
            .finish()
    }
}

impl Watcher {
    /// Watches `service` in `registry`, keeping the instances `selector` accepts.
    ///
    /// Must be called inside a tokio runtime (it spawns the task that follows the registry).
    pub fn new<R: Registry + ?Sized>(registry: &R, service: &str, selector: Selector) -> Self {
        let shared = Arc::new(Shared {
            service: service.to_string(),
            selector,
            current: ArcSwap::from_pointee(Snapshot::empty()),
            changed: watch::channel(0).0,
        });
        let events = registry.events(service);
        let task = tokio::spawn(follow(shared.clone(), events));
        Watcher {
            shared,
            _task: Arc::new(Task(task)),
        }
    }

    /// The watched service name.
    pub fn service(&self) -> &str {
        &self.shared.service
    }

    /// The selector instances must match.
    pub fn selector(&self) -> &Selector {
        &self.shared.selector
    }

    /// The current state (lock-free).
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.shared.current.load_full()
    }

    /// How many instances there are now (lock-free, no allocation).
    pub fn len(&self) -> usize {
        self.shared.current.load().len()
    }

    /// `true` when there is no instance now.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A receiver that is notified on every change; its value is the snapshot revision.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.shared.changed.subscribe()
    }

    /// Waits until `pred` holds for the current snapshot, and returns that snapshot.
    pub async fn wait_until(&self, mut pred: impl FnMut(&Snapshot) -> bool) -> Arc<Snapshot> {
        let mut rx = self.subscribe();
        loop {
            let snap = self.snapshot();
            if pred(&snap) {
                return snap;
            }
            if rx.changed().await.is_err() {
                // The task ended (registry dropped): nothing will change any more.
                std::future::pending::<()>().await;
            }
        }
    }

    /// A [`tower::discover::Discover`] of this service's instances: `make` turns an
    /// [`Instance`] into the endpoint service: a closure, or a
    /// [`Forward`](crate::proxy::Forward) template (each endpoint is `template.to(instance)`).
    /// Keys are instance ids.
    pub fn discover<M: MakeEndpoint>(&self, make: M) -> ServiceDiscover<M> {
        ServiceDiscover::new(self.clone(), make)
    }
}

async fn follow(
    shared: Arc<Shared>,
    mut events: futures_util::stream::BoxStream<'static, RegistryEvent>,
) {
    let mut instances: BTreeMap<String, Instance> = BTreeMap::new();
    while let Some(event) = events.next().await {
        let prev = shared.current.load_full();
        let mut stale_since = None;
        let mut last_error = None;
        let mut synced = prev.synced;
        let mut changed_set = false;
        match event {
            RegistryEvent::Snapshot(list) => {
                let next: BTreeMap<String, Instance> = list
                    .into_iter()
                    .filter(|i| i.service == shared.service && shared.selector.matches(i))
                    .map(|i| (i.id.clone(), i))
                    .collect();
                changed_set = next != instances;
                instances = next;
                synced = true;
            }
            RegistryEvent::Put(i) => {
                if i.service == shared.service && shared.selector.matches(&i) {
                    if instances.get(&i.id) != Some(&i) {
                        instances.insert(i.id.clone(), i);
                        changed_set = true;
                    }
                } else {
                    // Re-registered with a version/tags the selector refuses.
                    changed_set = instances.remove(&i.id).is_some();
                }
            }
            RegistryEvent::Delete(id) => {
                changed_set = instances.remove(&id).is_some();
            }
            RegistryEvent::Unavailable(e) => {
                // Fail-static: keep the instances, remember since when they are stale.
                if prev.stale_since.is_none() {
                    tracing::warn!(service = %shared.service, error = %e,
                        "registry unreachable; keeping the last known instances");
                }
                stale_since = Some(prev.stale_since.unwrap_or_else(Instant::now));
                last_error = Some(Arc::<str>::from(e.to_string()));
            }
        }
        if !changed_set && stale_since == prev.stale_since && synced == prev.synced {
            continue;
        }
        if prev.stale_since.is_some() && stale_since.is_none() {
            tracing::info!(service = %shared.service, "registry reachable again");
        }
        if changed_set {
            tracing::info!(service = %shared.service, instances = instances.len(), "instances changed");
        }
        let snapshot = Snapshot {
            instances: if changed_set {
                Arc::new(instances.clone())
            } else {
                prev.instances.clone()
            },
            revision: prev.revision + 1,
            synced,
            stale_since,
            last_error,
        };
        let rev = snapshot.revision;
        shared.current.store(Arc::new(snapshot));
        shared.changed.send_replace(rev);
    }
}
