//! [`Balance`], the service, and the state its clones and requests share ([`Shared`]):
//! the published endpoint snapshot, the configuration, the ejection decision.
//!
//! The builder that fills in this state lives in `builder.rs`; the per-request work in
//! `future.rs` and its neighbours. What stays here is what every request reads.

use std::fmt;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::{Request, Response};
use tower_service::Service;

use super::builder::BalanceBuilder;
use super::endpoint::{Clock, Endpoint, EndpointStatus, PassiveHealth};
use super::error::BalanceError;
use super::future::ResponseFuture;
use super::hash::key_id;
use super::local::Local;
use super::pick::Snapshot;
use super::picker::Picker;
use super::retry::{CloneBody, Retry};
use super::shared::SharedHealth;
use super::sticky::StickyCookie;
use crate::classify::{Classify, Condition};
use crate::gate::{Gate, NoGate};
use crate::BoxError;

/// Makes the [`Gate`] of each endpoint when it joins the set (one circuit breaker per
/// endpoint, say). Any `Fn(&K) -> G` is a `MakeGate`.
pub trait MakeGate<K>: Send + Sync + 'static {
    /// The gate type.
    type Gate: Gate;
    /// The gate for the endpoint with discovery key `key`.
    fn make_gate(&self, key: &K) -> Self::Gate;
}

/// The default [`MakeGate`]: every endpoint gets a [`NoGate`].
#[derive(Debug, Clone, Copy, Default)]
pub struct NoGates;

impl<K> MakeGate<K> for NoGates {
    type Gate = NoGate;
    #[inline]
    fn make_gate(&self, _key: &K) -> NoGate {
        NoGate
    }
}

impl<K, G, F> MakeGate<K> for F
where
    F: Fn(&K) -> G + Send + Sync + 'static,
    G: Gate,
{
    type Gate = G;
    fn make_gate(&self, key: &K) -> G {
        self(key)
    }
}

pub(super) type WeightFn<K> = Arc<dyn Fn(&K) -> u32 + Send + Sync>;

pub(crate) type Snap<K, S, M> = Snapshot<K, S, <M as MakeGate<K>>::Gate>;
pub(crate) type Ep<K, S, M> = Endpoint<K, S, <M as MakeGate<K>>::Gate>;
pub(crate) type EpList<K, S, M> = Vec<Arc<Ep<K, S, M>>>;
pub(crate) struct Shared<K, S, M: MakeGate<K>, C> {
    pub(crate) snapshot: ArcSwap<Snap<K, S, M>>,
    pub(crate) picker: Picker,
    pub(crate) health: PassiveHealth,
    pub(crate) retry: Retry,
    /// `retry.on.judges_heads()`, asked once here instead of for every answered request
    /// (`Retry` is fixed at build; the lookup was ~20 of the retry decision's ~35
    /// instructions, dispatch bench).
    pub(crate) retry_heads: bool,
    pub(crate) queue_timeout: Option<Duration>,
    pub(crate) try_timeout: Option<Duration>,
    pub(crate) sticky: Option<StickyCookie>,
    pub(crate) classify: C,
    pub(super) make_gate: M,
    pub(super) weight: Option<WeightFn<K>>,
    pub(crate) clock: Clock,
    /// Serialises ejection decisions so the budget holds (cold path only).
    pub(super) eject_lock: Mutex<()>,
    /// Health shared with other workers' balancers (their cells, clock and ejection lock).
    pub(super) shared_health: Option<SharedHealth<K>>,
    pub(crate) members: tokio::sync::watch::Sender<usize>,
}

impl<K, S, M, C> Shared<K, S, M, C>
where
    K: fmt::Debug,
    M: MakeGate<K>,
{
    /// Ejects `ep` if the ejection budget of the current set allows it.
    pub(crate) fn try_eject(&self, ep: &Arc<Ep<K, S, M>>) {
        // With shared health the lock is the handle's: the budget holds across workers.
        let lock = self
            .shared_health
            .as_ref()
            .map_or(&self.eject_lock, |h| h.eject_lock());
        let _guard = lock.lock().unwrap_or_else(|e| e.into_inner());
        let now = self.clock.now_ms();
        if ep.ejected_at(now) {
            return;
        }
        let snap = self.snapshot.load();
        if !snap.endpoints.iter().any(|e| Arc::ptr_eq(e, ep)) {
            return;
        }
        let ejected = snap.endpoints.iter().filter(|e| e.ejected_at(now)).count();
        if ejected < self.health.ejection_budget(snap.endpoints.len()) {
            ep.eject(&self.health, &self.clock);
        } else {
            tracing::debug!(endpoint = ?ep.key, ejected, "ejection budget reached; endpoint kept");
        }
    }

    pub(crate) fn make_endpoint(&self, key: K, service: S) -> Ep<K, S, M>
    where
        K: Eq + Hash + Clone,
    {
        let id = key_id(&key);
        let weight = self.weight.as_ref().map_or(1, |f| f(&key));
        let gate = self.make_gate.make_gate(&key);
        let cookie = self.sticky.as_ref().map(|c| c.set_cookie_for(id));
        let cell = self.shared_health.as_ref().map(|h| h.cell(&key));
        let ep = Endpoint::new(key, id, weight, service, gate, cookie);
        match cell {
            Some(cell) => ep.with_shared_health(cell),
            None => ep,
        }
    }

    pub(crate) fn publish(&self, endpoints: EpList<K, S, M>) {
        let n = endpoints.len();
        self.snapshot
            .store(Arc::new(Snapshot::new(endpoints, &self.picker)));
        self.members.send_replace(n);
    }
}

/// A load balancer over a dynamic set of endpoint services. See the [module docs](super).
///
/// Cloning is cheap: clones share the endpoint set, counters and health state.
pub struct Balance<K, S, M: MakeGate<K> = NoGates, C = Condition> {
    pub(crate) shared: Arc<Shared<K, S, M, C>>,
    /// This instance's clones of the endpoint services (`local.rs`); a clone of the
    /// balancer starts without any.
    local: Local<K, S, M>,
}

impl<K, S, M: MakeGate<K>, C> Clone for Balance<K, S, M, C> {
    fn clone(&self) -> Self {
        Balance::from_shared(self.shared.clone())
    }
}

impl<K, S, M: MakeGate<K>, C> Balance<K, S, M, C> {
    pub(crate) fn from_shared(shared: Arc<Shared<K, S, M, C>>) -> Self {
        Balance {
            shared,
            local: Local::new(),
        }
    }
}

impl<K: fmt::Debug, S, M: MakeGate<K>, C: fmt::Debug> fmt::Debug for Balance<K, S, M, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Balance")
            .field("endpoints", &self.shared.snapshot.load().endpoints)
            .field("picker", &self.shared.picker)
            .field("health", &self.shared.health)
            .field("retry", &self.shared.retry)
            .field("classify", &self.shared.classify)
            .finish_non_exhaustive()
    }
}

impl<K> Balance<K, (), NoGates, Condition>
where
    K: Clone + Eq + Hash + fmt::Debug + Send + Sync + 'static,
{
    /// Starts a [`BalanceBuilder`].
    pub fn builder() -> BalanceBuilder<K> {
        BalanceBuilder::default()
    }
}

impl<K, S, M, C> Balance<K, S, M, C>
where
    K: Clone + fmt::Debug,
    M: MakeGate<K>,
{
    /// Every endpoint with its health state and counters.
    pub fn endpoints(&self) -> Vec<EndpointStatus<K>> {
        let snap = self.shared.snapshot.load();
        snap.endpoints
            .iter()
            .map(|e| e.status(&self.shared.clock))
            .collect()
    }

    /// Number of endpoints in the set.
    pub fn len(&self) -> usize {
        self.shared.snapshot.load().endpoints.len()
    }

    /// `true` when the set is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Watches the number of endpoints: changes whenever a new set is published.
    pub fn members(&self) -> tokio::sync::watch::Receiver<usize> {
        self.shared.members.subscribe()
    }

    /// Picks an endpoint for `req` exactly as [`call`](Service::call) would (sticky
    /// cookie, picker, health, gates; the round-robin position advances) without sending
    /// anything: the gate's permit is released at once. For routing decisions, logging and
    /// benchmarks (it is the pick cost alone).
    pub fn select<B>(&self, req: &Request<B>) -> Result<K, BalanceError> {
        let snap = self.shared.snapshot.load();
        let (picked, _, _) = super::attempt::first_pick(&self.shared, &snap, req);
        match picked {
            Ok(p) => {
                let ep = &snap.endpoints[p.index];
                if p.trial {
                    // Nothing is sent: the endpoint's trial goes to the next real request.
                    ep.release_trial();
                }
                Ok(ep.key.clone())
            }
            Err(m) => Err(super::attempt::miss_error(m)),
        }
    }

    /// The service of the endpoint with key `key`, if present.
    pub fn service(&self, key: &K) -> Option<S>
    where
        K: PartialEq,
        S: Clone,
    {
        let snap = self.shared.snapshot.load();
        snap.endpoints
            .iter()
            .find(|e| &e.key == key)
            .map(|e| e.service.clone())
    }
}

impl<K, S, M, C, B, RB> Service<Request<B>> for Balance<K, S, M, C>
where
    K: Clone + Eq + Hash + fmt::Debug + Send + Sync + 'static,
    // Send + Sync + 'static: an upgraded response's tunnel task holds the endpoint.
    S: Service<Request<B>, Response = Response<RB>> + Clone + Send + Sync + 'static,
    S::Error: Into<BoxError>,
    M: MakeGate<K>,
    C: Classify,
    B: CloneBody,
    RB: http_body::Body + Send + 'static,
{
    type Response = Response<RB>;
    type Error = BalanceError;
    type Future = ResponseFuture<K, S, M, C, B>;

    #[inline]
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BalanceError>> {
        // Availability is decided per request at pick time (endpoints come and go between
        // poll_ready and call); an empty set is answered with a typed error, not Pending.
        Poll::Ready(Ok(()))
    }

    #[inline]
    fn call(&mut self, req: Request<B>) -> Self::Future {
        ResponseFuture::start(self.shared.clone(), &mut self.local, req)
    }
}
