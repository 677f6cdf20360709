//! Registry-aware discovery: instances register themselves, routers follow the registry.
//!
//! Instances of a service are short-lived, listen on ports nobody configured in advance,
//! and several versions run at once. Each instance therefore registers its name and
//! address with a **registry** when it comes online and is removed when it stops (on exit,
//! SIGINT, a crash); a router or client asks the registry for the live instances of a
//! service and keeps its list current without a restart (seed 001's Consul + http-proxy
//! balancer, seeds 002–004's service discovery).
//!
//! - [`Registry`]: register an [`Instance`] under a TTL/lease, keep it alive, deregister,
//!   list a service's healthy instances, stream its changes. Backends: [`MemoryRegistry`]
//!   (embedded, the default), `EtcdRegistry` (feature `etcd`), `ConsulRegistry` (feature
//!   `consul`).
//! - [`Registration`]: a guard that registers on creation, keeps the lease alive,
//!   re-registers when the registry lost it, and deregisters on drop or on
//!   [`shutdown_signal`].
//! - [`Watcher`]: the current instances of a service matching a [`Selector`] (version, tags),
//!   **fail-static**: when the registry is unreachable it keeps the last known instances and
//!   says how stale they are; when the registry comes back having expired every lease, or
//!   every instance disappears at once, it keeps them for a bounded time ([`WatcherConfig`]).
//! - [`ServiceDiscover`]: a watcher as a [`tower::discover::Discover`], so any balancer that
//!   takes a `Discover` (ours or `tower::balance::p2c::Balance`) follows the registry.
//! - [`route`](crate::route): path-prefix routing to services, `502` when a service has no
//!   instance.
//!
//! ```
//! use std::time::Duration;
//! use tower_patterns::discovery::{Instance, MemoryRegistry, Registration, Selector, Watcher};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower_patterns::BoxError> {
//! let registry = MemoryRegistry::new();
//! let watcher = Watcher::new(&registry, "api-service", Selector::any());
//!
//! // An instance announces itself; dropping the guard deregisters it.
//! let me = Instance::new("api-service", "api-8001", "127.0.0.1", 8001).with_version("2.1.0");
//! let registration = Registration::new(registry.clone(), me, Duration::from_secs(10)).await?;
//!
//! watcher.wait_until(|s| s.len() == 1).await;
//! // Feed a balancer: each instance becomes one endpoint service.
//! let discover = watcher.discover(|i: &Instance| Ok::<_, std::convert::Infallible>(i.http_uri()));
//! # let _ = discover;
//! registration.deregister().await?;
//! watcher.wait_until(|s| s.is_empty()).await;
//! # Ok(()) }
//! ```
//!
//! | behaviour | memory | etcd | consul |
//! |---|---|---|---|
//! | registration lifetime | TTL, refreshed by the guard | lease (TTL) + keepalive | agent service + TTL check kept passing |
//! | instance gone when the process dies | after the TTL | after the lease TTL | when the check turns critical (TTL), removed after `deregister_critical_after` |
//! | healthy list | unexpired entries | keys under `<prefix>/<service>/` | `/v1/health/service/<name>?passing` |
//! | change feed | in-process | prefix watch from the listed revision | blocking queries (`index`, `wait`) |
//! | registry lost the registration | re-registered | re-registered when etcd is back | re-registered when the agent forgot it |
//! | registry unreachable | — | watchers keep the last instances, marked stale | same |
//! | registry back after an outage | — | removals held for the reconnect grace ([`WatcherConfig`]) | same |
//! | every instance gone in one update | kept for a bounded time ([`WatcherConfig`]) | same | same |

mod discover;
mod error;
mod instance;
mod memory;
mod registration;
mod watch;

#[cfg(feature = "consul")]
pub mod consul;
#[cfg(feature = "etcd")]
pub mod etcd;

pub use discover::{MakeEndpoint, ServiceDiscover};
pub use error::DiscoveryError;
pub use instance::{Instance, Selector};
pub use memory::MemoryRegistry;
pub use registration::{shutdown_signal, Registration};
pub use watch::{Snapshot, Watcher, WatcherConfig};

#[cfg(feature = "consul")]
pub use consul::ConsulRegistry;
#[cfg(feature = "etcd")]
pub use etcd::EtcdRegistry;

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;

/// A registration held by a registry: what [`Registry::keep_alive`] refreshes and
/// [`Registry::deregister`] removes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    instance: Instance,
    id: i64,
    ttl: Duration,
}

impl Lease {
    /// Makes a lease handle; registry implementations call this.
    pub fn new(instance: Instance, id: i64, ttl: Duration) -> Self {
        Lease { instance, id, ttl }
    }

    /// The registered instance.
    pub fn instance(&self) -> &Instance {
        &self.instance
    }

    /// The registry's id for this registration (the etcd lease id; a generation number in
    /// memory; unused by Consul, whose check id derives from the instance id).
    pub fn id(&self) -> i64 {
        self.id
    }

    /// The time to live the registry was given.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }
}

/// What a registry reports about one service, in order.
#[derive(Debug)]
pub enum RegistryEvent {
    /// The complete current list (first event, and again after every reconnection).
    Snapshot(Vec<Instance>),
    /// An instance was added or changed.
    Put(Instance),
    /// The instance with this id is gone (deregistered or expired).
    Delete(String),
    /// The registry cannot be reached now; the stream keeps retrying and sends a
    /// [`Snapshot`](RegistryEvent::Snapshot) when it is back.
    Unavailable(DiscoveryError),
}

/// A service registry.
///
/// Object-safe, so the registry can be chosen at run time (`Arc<dyn Registry>`).
/// Methods return boxed futures; none of them is on a request's hot path.
pub trait Registry: Send + Sync + 'static {
    /// Registers `instance` (replacing a registration with the same service and id) for
    /// `ttl`: unless [`keep_alive`](Registry::keep_alive) is called within the TTL, the
    /// registry drops it.
    fn register<'a>(
        &'a self,
        instance: &'a Instance,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Lease, DiscoveryError>>;

    /// Refreshes a registration. [`DiscoveryError::LeaseLost`] means the registry no longer
    /// holds it; [`DiscoveryError::Unavailable`] means it could not be asked.
    fn keep_alive<'a>(&'a self, lease: &'a Lease) -> BoxFuture<'a, Result<(), DiscoveryError>>;

    /// Removes a registration. Removing one that is already gone succeeds.
    fn deregister<'a>(&'a self, lease: &'a Lease) -> BoxFuture<'a, Result<(), DiscoveryError>>;

    /// The healthy instances of `service` now.
    fn instances<'a>(
        &'a self,
        service: &'a str,
    ) -> BoxFuture<'a, Result<Vec<Instance>, DiscoveryError>>;

    /// The changes of `service`: a [`Snapshot`](RegistryEvent::Snapshot) first, then
    /// changes. The stream retries by itself while the registry is unreachable and ends
    /// only when the registry client is dropped.
    fn events(&self, service: &str) -> BoxStream<'static, RegistryEvent>;

    /// The healthy instances of `service` that match `selector` (version-aware lookup).
    fn lookup<'a>(
        &'a self,
        service: &'a str,
        selector: &'a Selector,
    ) -> BoxFuture<'a, Result<Vec<Instance>, DiscoveryError>> {
        Box::pin(async move {
            let mut all = self.instances(service).await?;
            all.retain(|i| selector.matches(i));
            Ok(all)
        })
    }
}

impl<R: Registry + ?Sized> Registry for Arc<R> {
    fn register<'a>(
        &'a self,
        instance: &'a Instance,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Lease, DiscoveryError>> {
        (**self).register(instance, ttl)
    }
    fn keep_alive<'a>(&'a self, lease: &'a Lease) -> BoxFuture<'a, Result<(), DiscoveryError>> {
        (**self).keep_alive(lease)
    }
    fn deregister<'a>(&'a self, lease: &'a Lease) -> BoxFuture<'a, Result<(), DiscoveryError>> {
        (**self).deregister(lease)
    }
    fn instances<'a>(
        &'a self,
        service: &'a str,
    ) -> BoxFuture<'a, Result<Vec<Instance>, DiscoveryError>> {
        (**self).instances(service)
    }
    fn events(&self, service: &str) -> BoxStream<'static, RegistryEvent> {
        (**self).events(service)
    }
}

/// `now + d`, saturating far in the future instead of panicking on overflow: TTLs and
/// other durations come from configuration (`Duration::MAX` means "never").
pub(crate) fn saturating_deadline(now: tokio::time::Instant, d: Duration) -> tokio::time::Instant {
    // About 30 years: "never" for a registry, and far from any platform's Instant limit.
    const FAR: Duration = Duration::from_secs(86_400 * 365 * 30);
    now.checked_add(d.min(FAR)).unwrap_or(now)
}

/// Retry delays for registry clients: doubles from `base` up to `max`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Backoff {
    next: Duration,
    base: Duration,
    max: Duration,
}

impl Backoff {
    pub(crate) fn new(base: Duration, max: Duration) -> Self {
        Backoff {
            next: base,
            base,
            max,
        }
    }
    pub(crate) fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = self.next.saturating_mul(2).min(self.max);
        d
    }
    pub(crate) fn reset(&mut self) {
        self.next = self.base;
    }
}
