//! [`BalanceBuilder`]: every knob of a [`Balance`] and its defaults (nginx's where nginx
//! has one), and the three ways to build it (a static list, a `Discover` with its driver,
//! or a spawned driver).
//!
//! Split from `service.rs`: configuration is read once at build time and copied into the
//! shared state; nothing here runs per request.

use std::fmt;
use std::hash::Hash;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use tower::discover::Discover;

use super::driver::Driver;
use super::endpoint::{Clock, PassiveHealth};
use super::error::BuildError;
use super::pick::Snapshot;
use super::picker::Picker;
use super::retry::Retry;
use super::service::{Balance, EpList, MakeGate, NoGates, Shared, WeightFn};
use super::shared::SharedHealth;
use super::sticky::StickyCookie;
use crate::classify::{Classify, Condition};
use crate::BoxError;

/// What [`BalanceBuilder::build`] returns: the balancer and its discovery driver.
pub type Built<D, M, C> = (
    Balance<<D as Discover>::Key, <D as Discover>::Service, M, C>,
    Driver<D, M, C>,
);

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
    /// The timer is armed only once a try is pending, i.e. on every proxied request; it
    /// costs about 650 instructions per request (registration in Tokio's timer wheel and
    /// removal) and one allocation (the timer lives in a box made then, so that requests
    /// without one do not carry its 112 bytes). Over [`Forward`](crate::proxy::Forward),
    /// which has its own response timeout (60 s by default) and so a second timer per
    /// try, set that one to the per-try limit and this one to `None`: the same
    /// protection with one timer (`examples/reverse_proxy.rs` does). A
    /// [`ForwardError::ResponseTimeout`] is a timeout failure like this one's.
    ///
    /// [`FailureKind::Timeout`]: crate::classify::FailureKind::Timeout
    /// [`ForwardError::ResponseTimeout`]: crate::proxy::ForwardError::ResponseTimeout
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

    /// One [`Gate`](crate::gate::Gate) per endpoint (a circuit breaker, say); an endpoint whose gate refuses
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
        let retry_heads = self.retry.on.judges_heads();
        Arc::new(Shared {
            snapshot: ArcSwap::from_pointee(Snapshot::new(Vec::new(), &self.picker)),
            picker: self.picker,
            health: self.health,
            retry: self.retry,
            retry_heads,
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
        Balance::from_shared(shared)
    }

    /// A balancer fed by `discover`, and the [`Driver`] future that applies its changes.
    /// Spawn the driver (or use [`spawn`](Self::spawn)); until it has run, the set is empty.
    pub fn build<D>(self, discover: D) -> Built<D, M, C>
    where
        M: MakeGate<K>,
        D: Discover<Key = K>,
    {
        let shared = self.shared();
        let balance = Balance::from_shared(shared.clone());
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
