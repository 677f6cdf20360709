use std::fmt;
use std::hash::Hash;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::{Request, Response};
use tower::discover::Discover;
use tower_service::Service;

use super::driver::Driver;
use super::endpoint::{Clock, Endpoint, EndpointStatus, PassiveHealth};
use super::error::{BalanceError, BuildError};
use super::future::ResponseFuture;
use super::hash::key_id;
use super::pick::{Picker, Snapshot};
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

type WeightFn<K> = Arc<dyn Fn(&K) -> u32 + Send + Sync>;

pub(crate) type Snap<K, S, M> = Snapshot<K, S, <M as MakeGate<K>>::Gate>;
pub(crate) type Ep<K, S, M> = Endpoint<K, S, <M as MakeGate<K>>::Gate>;
pub(crate) type EpList<K, S, M> = Vec<Arc<Ep<K, S, M>>>;
/// What [`BalanceBuilder::build`] returns: the balancer and its discovery driver.
pub type Built<D, M, C> = (
    Balance<<D as Discover>::Key, <D as Discover>::Service, M, C>,
    Driver<D, M, C>,
);

pub(crate) struct Shared<K, S, M: MakeGate<K>, C> {
    pub(crate) snapshot: ArcSwap<Snap<K, S, M>>,
    pub(crate) picker: Picker,
    pub(crate) health: PassiveHealth,
    pub(crate) retry: Retry,
    pub(crate) queue_timeout: Option<Duration>,
    pub(crate) try_timeout: Option<Duration>,
    pub(crate) sticky: Option<StickyCookie>,
    pub(crate) classify: C,
    make_gate: M,
    weight: Option<WeightFn<K>>,
    pub(crate) clock: Clock,
    /// Serialises ejection decisions so the budget holds (cold path only).
    eject_lock: Mutex<()>,
    /// Health shared with other workers' balancers (their cells, clock and ejection lock).
    shared_health: Option<SharedHealth<K>>,
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

/// Configures a [`Balance`]. Start with [`Balance::builder`].
pub struct BalanceBuilder<K, C = Condition, M = NoGates> {
    picker: Picker,
    health: PassiveHealth,
    retry: Retry,
    queue_timeout: Option<Duration>,
    try_timeout: Option<Duration>,
    sticky: Option<StickyCookie>,
    classify: C,
    make_gate: M,
    weight: Option<WeightFn<K>>,
    shared_health: Option<SharedHealth<K>>,
    _key: PhantomData<fn(&K)>,
}

/// The default [per-try timeout](BalanceBuilder::try_timeout): 10 s.
///
/// Long enough for a slow but working endpoint (a heavy page, a cold cache: it bounds the
/// wait for the response *head* only, never a long download), far shorter than nginx's
/// 60 s `proxy_read_timeout`, and equal to the default `fail_timeout`, so a hung endpoint
/// costs at most one timed-out request per ejection period.
pub const DEFAULT_TRY_TIMEOUT: Duration = Duration::from_secs(10);

impl<K, C: fmt::Debug, M> fmt::Debug for BalanceBuilder<K, C, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BalanceBuilder")
            .field("picker", &self.picker)
            .field("health", &self.health)
            .field("retry", &self.retry)
            .field("try_timeout", &self.try_timeout)
            .field("sticky", &self.sticky)
            .field("classify", &self.classify)
            .finish_non_exhaustive()
    }
}

impl<K> Default for BalanceBuilder<K> {
    fn default() -> Self {
        BalanceBuilder {
            picker: Picker::default(),
            health: PassiveHealth::default(),
            retry: Retry::default(),
            queue_timeout: None,
            try_timeout: Some(DEFAULT_TRY_TIMEOUT),
            sticky: None,
            classify: Condition::never().any_error(),
            make_gate: NoGates,
            weight: None,
            shared_health: None,
            _key: PhantomData,
        }
    }
}

impl<K, C, M> BalanceBuilder<K, C, M>
where
    K: Clone + Eq + Hash + fmt::Debug + Send + Sync + 'static,
    C: Classify,
{
    /// The picker (default [`Picker::RoundRobin`]).
    pub fn picker(mut self, picker: Picker) -> Self {
        self.picker = picker;
        self
    }

    /// Passive health (default nginx's `max_fails=1 fail_timeout=10s`, 50% max ejection).
    pub fn health(mut self, health: PassiveHealth) -> Self {
        self.health = health;
        self
    }

    /// Retry on the next endpoint (default [`Retry::default`]).
    pub fn retry(mut self, retry: Retry) -> Self {
        self.retry = retry;
        self
    }

    /// When no endpoint is available (empty set, all ejected, gates closed, all tried), wait
    /// up to `timeout` for one instead of failing at once (nginx-plus `queue ... timeout=`,
    /// linkerd's fail-fast timeout). The request re-picks whenever the set changes, and at
    /// least every 20 ms. Default: fail at once, as nginx OSS and Envoy do. Any duration is
    /// accepted (`Duration::MAX` saturates to a far future; it never overflows).
    pub fn queue_timeout(mut self, timeout: Duration) -> Self {
        self.queue_timeout = Some(timeout);
        self
    }

    /// How long one try waits for the endpoint's response head (Envoy `per_try_timeout`,
    /// nginx `proxy_read_timeout` for the head). Default [`DEFAULT_TRY_TIMEOUT`] (10 s);
    /// `None` waits forever (for endpoints that answer long polls or server-sent events
    /// late; a hung endpoint then stalls its requests until the client gives up).
    ///
    /// A try that times out is cancelled and counts as a [`FailureKind::Timeout`]
    /// failure: passive health counts it, and it is retried on another endpoint under the
    /// [`Retry`] rules (idempotent methods, with the default `fail` condition). If no try
    /// answers, the error maps to **504**. Durations too large for the clock saturate.
    /// Needs a tokio runtime with the time driver enabled (as every hyper server has).
    ///
    /// [`FailureKind::Timeout`]: crate::classify::FailureKind::Timeout
    pub fn try_timeout(mut self, timeout: impl Into<Option<Duration>>) -> Self {
        self.try_timeout = timeout.into();
        self
    }

    /// Sticky sessions by signed cookie.
    pub fn sticky(mut self, cookie: StickyCookie) -> Self {
        self.sticky = Some(cookie);
        self
    }

    /// Each endpoint's weight from its key (default 1; 0 is taken as 1).
    pub fn weight<F>(mut self, f: F) -> Self
    where
        F: Fn(&K) -> u32 + Send + Sync + 'static,
    {
        self.weight = Some(Arc::new(f));
        self
    }

    /// What counts as a failure for passive health (default: errors and timeouts, as
    /// nginx's `max_fails`; use `"5xx,fail"` to count server errors too).
    pub fn classify<C2: Classify>(self, classify: C2) -> BalanceBuilder<K, C2, M> {
        BalanceBuilder {
            picker: self.picker,
            health: self.health,
            retry: self.retry,
            queue_timeout: self.queue_timeout,
            try_timeout: self.try_timeout,
            sticky: self.sticky,
            classify,
            make_gate: self.make_gate,
            weight: self.weight,
            shared_health: self.shared_health,
            _key: PhantomData,
        }
    }

    /// One [`Gate`] per endpoint (a circuit breaker, say); an endpoint whose gate refuses
    /// is not picked.
    pub fn gates<M2: MakeGate<K>>(self, make_gate: M2) -> BalanceBuilder<K, C, M2> {
        BalanceBuilder {
            picker: self.picker,
            health: self.health,
            retry: self.retry,
            queue_timeout: self.queue_timeout,
            try_timeout: self.try_timeout,
            sticky: self.sticky,
            classify: self.classify,
            make_gate,
            weight: self.weight,
            shared_health: self.shared_health,
            _key: PhantomData,
        }
    }

    /// Shares passive health with the other balancers built with the same `health`
    /// handle, one per worker (nginx's upstream `zone`): an endpoint ejected by one worker
    /// is skipped by all, one trial after `fail_timeout` goes to it across all of them,
    /// and the ejection budget counts every worker's ejections. Give every worker the
    /// same membership (a [`Broadcast`](super::discover::Broadcast)) and the same
    /// [`PassiveHealth`]. In-flight counts, request totals, round-robin positions and
    /// pools stay per worker. See [`SharedHealth`].
    pub fn shared_health(mut self, health: &SharedHealth<K>) -> Self {
        self.shared_health = Some(health.clone());
        self
    }

    fn shared<S>(self) -> Arc<Shared<K, S, M, C>>
    where
        M: MakeGate<K>,
    {
        let (members, _) = tokio::sync::watch::channel(0);
        Arc::new(Shared {
            snapshot: ArcSwap::from_pointee(Snapshot::new(Vec::new(), &self.picker)),
            picker: self.picker,
            health: self.health,
            retry: self.retry,
            queue_timeout: self.queue_timeout,
            try_timeout: self.try_timeout,
            sticky: self.sticky,
            classify: self.classify,
            make_gate: self.make_gate,
            weight: self.weight,
            clock: self
                .shared_health
                .as_ref()
                .map_or_else(Clock::new, SharedHealth::clock),
            eject_lock: Mutex::new(()),
            shared_health: self.shared_health,
            members,
        })
    }

    /// A balancer over a fixed list of endpoints.
    pub fn build_static<S, I>(self, endpoints: I) -> Balance<K, S, M, C>
    where
        M: MakeGate<K>,
        I: IntoIterator<Item = (K, S)>,
    {
        let shared = self.shared();
        let mut list: EpList<K, S, M> = Vec::new();
        for (k, s) in endpoints {
            let ep = Arc::new(shared.make_endpoint(k, s));
            match list.iter_mut().find(|e| e.key == ep.key) {
                Some(slot) => *slot = ep,
                None => list.push(ep),
            }
        }
        shared.publish(list);
        Balance { shared }
    }

    /// A balancer fed by `discover`, and the [`Driver`] future that applies its changes.
    /// Spawn the driver (or use [`spawn`](Self::spawn)); until it has run, the set is empty.
    pub fn build<D>(self, discover: D) -> Built<D, M, C>
    where
        M: MakeGate<K>,
        D: Discover<Key = K>,
    {
        let shared = self.shared();
        let balance = Balance {
            shared: shared.clone(),
        };
        (balance, Driver::new(discover, shared))
    }

    /// [`build`](Self::build) and spawn the driver on the current tokio runtime. A
    /// discovery error ends the driver (logged); the last set stays in use.
    pub fn spawn<D>(self, discover: D) -> Result<Balance<K, D::Service, M, C>, BuildError>
    where
        M: MakeGate<K>,
        D: Discover<Key = K> + Send + 'static,
        D::Service: Send + Sync + 'static,
        D::Error: Into<BoxError>,
        C: Send + Sync + 'static,
    {
        let handle = tokio::runtime::Handle::try_current().map_err(|_| BuildError::NoRuntime)?;
        let (balance, driver) = self.build(discover);
        handle.spawn(async move {
            if let Err(e) = driver.await {
                tracing::error!(error = %e, "endpoint discovery failed; keeping the last set");
            }
        });
        Ok(balance)
    }
}

/// A load balancer over a dynamic set of endpoint services. See the [module docs](super).
///
/// Cloning is cheap: clones share the endpoint set, counters and health state.
pub struct Balance<K, S, M: MakeGate<K> = NoGates, C = Condition> {
    pub(crate) shared: Arc<Shared<K, S, M, C>>,
}

impl<K, S, M: MakeGate<K>, C> Clone for Balance<K, S, M, C> {
    fn clone(&self) -> Self {
        Balance {
            shared: self.shared.clone(),
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
        ResponseFuture::start(self.shared.clone(), req)
    }
}
