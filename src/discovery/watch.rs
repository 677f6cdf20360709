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
    held: usize,
}

impl Snapshot {
    fn empty() -> Self {
        Snapshot {
            instances: Arc::new(BTreeMap::new()),
            revision: 0,
            synced: false,
            stale_since: None,
            last_error: None,
            held: 0,
        }
    }

    /// How many of the instances the registry no longer lists but the watcher keeps for
    /// a bounded time: removed during the reconnect grace, or all gone at once (see
    /// [`WatcherConfig`]).
    pub fn held(&self) -> usize {
        self.held
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
/// removed, except right after an outage and when every instance disappears at once: those
/// removals are held for a bounded time ([`WatcherConfig`]), so a registry that expired
/// every lease while it was away does not empty the service before the instances register
/// again.
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
        Self::with_config(registry, service, selector, WatcherConfig::default())
    }

    /// [`Watcher::new`] with how long instances are held around registry outages.
    pub fn with_config<R: Registry + ?Sized>(
        registry: &R,
        service: &str,
        selector: Selector,
        config: WatcherConfig,
    ) -> Self {
        let shared = Arc::new(Shared {
            service: service.to_string(),
            selector,
            current: ArcSwap::from_pointee(Snapshot::empty()),
            changed: watch::channel(0).0,
        });
        let events = registry.events(service);
        let task = tokio::spawn(follow(shared.clone(), events, config));
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

/// How long a [`Watcher`] keeps instances the registry stopped listing around an outage.
///
/// When a registry was unreachable for longer than the registrations' TTL, it expires
/// every lease at once when it comes back (etcd after a pause; a registry restarted
/// without its data has none of them), while the instances register again only on their
/// next refresh. Applying those removals at once would leave a service with no instance
/// for that moment, and every request would fail. Two rules keep the last instances
/// instead, each for a bounded time; an instance that registers again ends its hold:
///
/// - **Reconnect grace** (default 10 s): for this long after the registry answers again
///   following an outage ([`RegistryEvent::Unavailable`] then a
///   [`Snapshot`](RegistryEvent::Snapshot)), every removal is held for this long. Set it
///   above a re-registration round trip ([`Registration`](super::Registration) registers
///   again at once when it finds its lease lost).
/// - **All gone at once** (default 30 s): when one registry update (one snapshot, or the
///   events that arrive together) removes two or more instances and leaves the service
///   empty, those instances are kept for this long. Deregistering instances one by one
///   still empties a service at once.
///
/// [`Snapshot::held`] counts the instances kept this way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WatcherConfig {
    reconnect_grace: Duration,
    empty_hold: Duration,
}

impl Default for WatcherConfig {
    fn default() -> Self {
        WatcherConfig {
            reconnect_grace: Duration::from_secs(10),
            empty_hold: Duration::from_secs(30),
        }
    }
}

impl WatcherConfig {
    /// The defaults: 10 s reconnect grace, 30 s hold when all instances go at once.
    pub fn new() -> Self {
        Self::default()
    }

    /// How long removals are held after the registry is reachable again (0 disables).
    pub fn reconnect_grace(mut self, d: Duration) -> Self {
        self.reconnect_grace = d;
        self
    }

    /// How long instances that all disappeared in one update are kept (0 disables).
    pub fn empty_hold(mut self, d: Duration) -> Self {
        self.empty_hold = d;
        self
    }
}

/// At most this many events that are already waiting are applied as one update.
const MAX_BATCH: usize = 1024;

/// The watcher's state: what the registry lists, and what is held despite it.
struct View {
    cfg: WatcherConfig,
    /// What the registry says now.
    live: BTreeMap<String, Instance>,
    /// Removed by the registry but still published, until the deadline.
    held: BTreeMap<String, (Instance, Instant)>,
    /// Removals until then are held (set when the registry answers after an outage).
    grace_until: Option<Instant>,
}

use super::saturating_deadline as deadline;

impl View {
    fn published(&self) -> BTreeMap<String, Instance> {
        let mut all: BTreeMap<String, Instance> = self
            .held
            .iter()
            .map(|(id, (i, _))| (id.clone(), i.clone()))
            .collect();
        all.extend(self.live.iter().map(|(id, i)| (id.clone(), i.clone())));
        all
    }

    fn in_grace(&self, now: Instant) -> bool {
        self.grace_until.is_some_and(|t| now < t)
    }

    /// The registry no longer lists `id`: held during the reconnect grace, otherwise
    /// returned so the update can decide (all gone at once or not).
    fn remove(&mut self, id: &str, now: Instant) -> Option<Instance> {
        let i = self.live.remove(id)?;
        if self.in_grace(now) {
            let until = deadline(now, self.cfg.reconnect_grace);
            self.held.insert(id.to_string(), (i, until));
            None
        } else {
            Some(i)
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.held.values().map(|(_, t)| *t).min()
    }

    fn expire(&mut self, now: Instant) {
        self.held.retain(|_, (_, t)| *t > now);
    }
}

async fn follow(
    shared: Arc<Shared>,
    events: futures_util::stream::BoxStream<'static, RegistryEvent>,
    cfg: WatcherConfig,
) {
    use futures_util::FutureExt;

    // Fused: the batch below may be the one to see the feed end (`now_or_never` gives
    // `Some(None)`), and the next `select!` polls it again; a registry's stream (the
    // memory and etcd ones are `unfold`s) may panic when polled after its end.
    let mut events = events.fuse();
    let mut view = View {
        cfg,
        live: BTreeMap::new(),
        held: BTreeMap::new(),
        grace_until: None,
    };
    loop {
        let next = view.next_deadline();
        let first = tokio::select! {
            ev = events.next() => match ev {
                Some(ev) => Some(ev),
                // The feed ended: nothing will change any more (fail-static).
                None => return,
            },
            () = tokio::time::sleep_until(next.unwrap_or_else(Instant::now)), if next.is_some() => None,
        };
        let prev = shared.current.load_full();
        let now = Instant::now();
        let mut stale_since = prev.stale_since;
        let mut last_error = prev.last_error.clone();
        let mut synced = prev.synced;
        // Removals of this update that were not held for the reconnect grace.
        let mut removed: Vec<Instance> = Vec::new();
        let mut batch: Vec<RegistryEvent> = first.into_iter().collect();
        // Events that are already waiting belong to the same registry update.
        while !batch.is_empty() && batch.len() < MAX_BATCH {
            match events.next().now_or_never() {
                Some(Some(ev)) => batch.push(ev),
                _ => break,
            }
        }
        for event in batch {
            match event {
                RegistryEvent::Snapshot(list) => {
                    if stale_since.is_some() && synced && !view.cfg.reconnect_grace.is_zero() {
                        // Back after an outage: leases may have expired meanwhile, and
                        // their instances are about to register again.
                        view.grace_until = Some(deadline(now, view.cfg.reconnect_grace));
                    }
                    let next: BTreeMap<String, Instance> = list
                        .into_iter()
                        .filter(|i| i.service == shared.service && shared.selector.matches(i))
                        .map(|i| (i.id.clone(), i))
                        .collect();
                    let gone: Vec<String> = view
                        .live
                        .keys()
                        .filter(|id| !next.contains_key(*id))
                        .cloned()
                        .collect();
                    for id in gone {
                        removed.extend(view.remove(&id, now));
                    }
                    for id in next.keys() {
                        view.held.remove(id);
                    }
                    removed.retain(|r| !next.contains_key(&r.id));
                    view.live = next;
                    synced = true;
                    stale_since = None;
                    last_error = None;
                }
                RegistryEvent::Put(i) => {
                    view.held.remove(&i.id);
                    removed.retain(|r| r.id != i.id);
                    if i.service == shared.service && shared.selector.matches(&i) {
                        view.live.insert(i.id.clone(), i);
                    } else {
                        // Re-registered with a version/tags the selector refuses: an
                        // explicit change, applied at once.
                        view.live.remove(&i.id);
                    }
                    stale_since = None;
                    last_error = None;
                }
                RegistryEvent::Delete(id) => {
                    removed.extend(view.remove(&id, now));
                    stale_since = None;
                    last_error = None;
                }
                RegistryEvent::Unavailable(e) => {
                    // Fail-static: keep the instances, remember since when they are stale.
                    if stale_since.is_none() {
                        tracing::warn!(service = %shared.service, error = %e,
                            "registry unreachable; keeping the last known instances");
                    }
                    stale_since = Some(stale_since.unwrap_or(now));
                    last_error = Some(Arc::<str>::from(e.to_string()));
                }
            }
        }
        if removed.len() >= 2 && view.live.is_empty() && !view.cfg.empty_hold.is_zero() {
            tracing::warn!(service = %shared.service, instances = removed.len(),
                hold = ?view.cfg.empty_hold,
                "every instance disappeared at once; keeping them until they register again");
            let until = deadline(now, view.cfg.empty_hold);
            for i in removed {
                view.held.insert(i.id.clone(), (i, until));
            }
        }
        view.expire(now);

        let instances = view.published();
        let changed_set = *prev.instances != instances;
        if !changed_set
            && stale_since == prev.stale_since
            && synced == prev.synced
            && view.held.len() == prev.held
        {
            continue;
        }
        if prev.stale_since.is_some() && stale_since.is_none() {
            tracing::info!(service = %shared.service, "registry reachable again");
        }
        if changed_set {
            tracing::info!(service = %shared.service, instances = instances.len(),
                held = view.held.len(), "instances changed");
        }
        let snapshot = Snapshot {
            instances: if changed_set {
                Arc::new(instances)
            } else {
                prev.instances.clone()
            },
            revision: prev.revision + 1,
            synced,
            stale_since,
            last_error,
            held: view.held.len(),
        };
        let rev = snapshot.revision;
        shared.current.store(Arc::new(snapshot));
        shared.changed.send_replace(rev);
    }
}

#[cfg(test)]
#[path = "watch_tests.rs"]
mod tests;
