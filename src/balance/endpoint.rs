//! One endpoint of the set: its service, gate, and lock-free counters and health state.

use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;

use super::shared::HealthCell;
use crate::classify::Outcome;

/// Passive health checking, as nginx's `max_fails` / `fail_timeout` plus Envoy's
/// `max_ejection_percent`.
///
/// `max_fails` failures (as classified by the balancer's [`Classify`](crate::classify::Classify))
/// within `fail_timeout` of the first one eject the endpoint for `fail_timeout`. When that
/// time has passed, exactly **one** trial request is let through (nginx's single trial);
/// until it finishes the endpoint stays out of rotation. A success puts it back, a failure
/// ejects it for another `fail_timeout`, and a trial that ends without an outcome
/// (cancelled, or a client-caused error) hands the trial to the next request. At most
/// `max_ejection_percent` of the set is ejected at a time (at least one endpoint when the set
/// has two or more), and the last endpoint is never ejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PassiveHealth {
    pub(crate) max_fails: u32,
    pub(crate) fail_timeout: Duration,
    pub(crate) max_ejection_percent: u8,
}

impl Default for PassiveHealth {
    /// nginx's defaults: `max_fails=1 fail_timeout=10s`, and at most half of the set ejected.
    fn default() -> Self {
        PassiveHealth {
            max_fails: 1,
            fail_timeout: Duration::from_secs(10),
            max_ejection_percent: 50,
        }
    }
}

impl PassiveHealth {
    /// `max_fails` failures within `fail_timeout` eject the endpoint for `fail_timeout`.
    /// Any duration is accepted: one too large for the clock saturates (the endpoint then
    /// stays ejected for the life of the process), it never overflows.
    pub fn new(max_fails: u32, fail_timeout: Duration) -> Self {
        PassiveHealth {
            max_fails,
            fail_timeout,
            ..Self::default()
        }
    }

    /// Never eject (nginx `max_fails=0`).
    pub fn disabled() -> Self {
        PassiveHealth {
            max_fails: 0,
            ..Self::default()
        }
    }

    /// The largest share of the set that may be ejected at once (Envoy
    /// `max_ejection_percent`, clamped to 0..=100). Whatever the value, one endpoint may be
    /// ejected from a set of two or more, and the last healthy one never is.
    pub fn max_ejection_percent(mut self, pct: u8) -> Self {
        self.max_ejection_percent = pct.min(100);
        self
    }

    pub(crate) fn enabled(&self) -> bool {
        self.max_fails > 0
    }

    /// `fail_timeout` in clock milliseconds, saturated (at least 1).
    fn fail_timeout_ms(&self) -> u64 {
        u64::try_from(self.fail_timeout.as_millis())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    /// How many of `n` endpoints may be ejected at once.
    pub(crate) fn ejection_budget(&self, n: usize) -> usize {
        if n < 2 {
            return 0;
        }
        let pct = (n * usize::from(self.max_ejection_percent)) / 100;
        pct.max(1).min(n - 1)
    }
}

/// The health state of an endpoint in a [`EndpointStatus`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndpointState {
    /// Picked normally.
    Healthy,
    /// The ejection is over and its single trial request is pending or in flight: still
    /// out of rotation; the trial's success makes it `Healthy`, its failure `Ejected` again.
    Probation,
    /// Not picked until the time left has passed.
    Ejected {
        /// Time left until it is tried again.
        remaining: Duration,
    },
}

/// A point-in-time view of one endpoint, from [`Balance::endpoints`](super::Balance::endpoints).
#[derive(Debug, Clone)]
pub struct EndpointStatus<K> {
    /// The discovery key.
    pub key: K,
    /// The stable id used in sticky cookies and on the hash ring.
    pub id: u64,
    /// The weight used by weighted pickers.
    pub weight: u32,
    /// Health state.
    pub state: EndpointState,
    /// Requests sent and not yet answered (headers), plus open upgraded tunnels
    /// (WebSocket) to it.
    pub in_flight: usize,
    /// Requests sent to it since it joined the set (by this balancer: not shared across
    /// workers, see [`SharedHealth`](super::SharedHealth)).
    pub requests: u64,
    /// Failed requests since it joined the set (by this balancer).
    pub failures: u64,
    /// Failures counted in the current `fail_timeout` window (every worker's, with
    /// [`SharedHealth`](super::SharedHealth)).
    pub recent_failures: u32,
}

/// Milliseconds since the balancer's epoch, plus one so that 0 can mean "none".
#[derive(Debug, Clone, Copy)]
pub(crate) struct Clock {
    base: tokio::time::Instant,
}

impl Clock {
    pub(crate) fn new() -> Self {
        Clock {
            base: tokio::time::Instant::now(),
        }
    }
    #[inline]
    pub(crate) fn now_ms(&self) -> u64 {
        tokio::time::Instant::now()
            .saturating_duration_since(self.base)
            .as_millis() as u64
            + 1
    }
}

/// `ejected_until` while the single trial request after an ejection is in flight.
const TRIAL: u64 = u64::MAX;
/// `ejected_until` of an ejection that is over and waits for its trial (any past time).
const TRIAL_DUE: u64 = 1;

/// What the health state lets a picker do with an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admission {
    /// In rotation.
    Open,
    /// Ejected, or its trial is in flight: skip it.
    Closed,
    /// The ejection is over and this caller now holds its single trial: send one request
    /// and report it with `trial = true`, or give it back with [`Endpoint::release_trial`].
    Trial,
}

pub(crate) struct Endpoint<K, S, G> {
    pub(crate) key: K,
    pub(crate) id: u64,
    pub(crate) weight: u32,
    pub(crate) service: S,
    pub(crate) gate: G,
    /// Precomputed `Set-Cookie` value naming this endpoint (sticky sessions only).
    pub(crate) cookie: Option<HeaderValue>,
    pub(crate) in_flight: AtomicUsize,
    pub(crate) requests: AtomicU64,
    pub(crate) failures: AtomicU64,
    /// Passive health (`max_fails` window, ejection word), this balancer's own...
    local: HealthCell,
    /// ... unless the balancer shares health with other workers ([`SharedHealth`]): then
    /// this key's cell in the shared table, and `local` is unused.
    ///
    /// [`SharedHealth`]: super::SharedHealth
    shared: Option<Arc<HealthCell>>,
}

impl<K: fmt::Debug, S, G> fmt::Debug for Endpoint<K, S, G> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Endpoint")
            .field("key", &self.key)
            .field("id", &self.id)
            .field("weight", &self.weight)
            .finish()
    }
}

impl<K, S, G> Endpoint<K, S, G> {
    /// The health cell in use: the shared one if any. One predictable branch, so an
    /// unshared balancer keeps reading its inline cell (no pointer chase).
    #[inline]
    fn cell(&self) -> &HealthCell {
        match &self.shared {
            Some(cell) => cell,
            None => &self.local,
        }
    }

    /// Uses `cell` (from a [`SharedHealth`](super::SharedHealth)) for passive health
    /// instead of the endpoint's own.
    pub(crate) fn with_shared_health(mut self, cell: Arc<HealthCell>) -> Self {
        self.shared = Some(cell);
        self
    }

    /// Gives back a trial that produced no outcome (cancelled, refused by the gate, or a
    /// client-caused error): the next pick takes it.
    pub(crate) fn release_trial(&self) {
        let _ = self
            .cell()
            .ejected_until
            .compare_exchange(TRIAL, TRIAL_DUE, Relaxed, Relaxed);
    }
}

impl<K: fmt::Debug, S, G> Endpoint<K, S, G> {
    pub(crate) fn new(
        key: K,
        id: u64,
        weight: u32,
        service: S,
        gate: G,
        cookie: Option<HeaderValue>,
    ) -> Self {
        Endpoint {
            key,
            id,
            weight: weight.max(1),
            service,
            gate,
            cookie,
            in_flight: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            local: HealthCell::default(),
            shared: None,
        }
    }

    /// May a request go to this endpoint? When an ejection has just run out, exactly one
    /// caller (the one whose compare-exchange wins) gets [`Admission::Trial`]; everyone else
    /// keeps skipping it until the trial has an outcome. Costs one relaxed load when the
    /// endpoint is in rotation.
    #[inline]
    pub(crate) fn admission(&self, clock: &Clock) -> Admission {
        let until = self.cell().ejected_until.load(Relaxed);
        if until == 0 {
            return Admission::Open;
        }
        self.admission_ejected(until, clock)
    }

    /// [`admission`](Self::admission) of an ejected endpoint. Out of line: with its log
    /// line the whole function was not inlined, and every pick paid a call for the one
    /// load of an endpoint in rotation (~20 instructions, dispatch bench).
    #[inline(never)]
    fn admission_ejected(&self, until: u64, clock: &Clock) -> Admission {
        if until == TRIAL || clock.now_ms() < until {
            return Admission::Closed;
        }
        match self
            .cell()
            .ejected_until
            .compare_exchange(until, TRIAL, Relaxed, Relaxed)
        {
            Ok(_) => {
                tracing::info!(endpoint = ?self.key, id = self.id, "endpoint restored on probation: sending one trial request");
                Admission::Trial
            }
            Err(_) => Admission::Closed,
        }
    }

    /// Ejected or its trial in flight, as of `now` (does not start a trial). Counted
    /// against the ejection budget.
    pub(crate) fn ejected_at(&self, now: u64) -> bool {
        let until = self.cell().ejected_until.load(Relaxed);
        until != 0 && now < until
    }

    /// Records an outcome; `trial` says whether this request was the endpoint's trial.
    /// Returns `true` when the failure calls for ejection; the caller checks the budget and
    /// calls [`eject`](Self::eject). A trial's failure re-ejects here directly: the
    /// endpoint already counts against the budget.
    #[inline]
    pub(crate) fn record(
        &self,
        outcome: Outcome,
        trial: bool,
        health: &PassiveHealth,
        clock: &Clock,
    ) -> bool {
        // A success outside a trial changes nothing: answered inline, where the call of
        // the whole function was ~20 instructions of every answered request.
        if !trial && outcome == Outcome::Success {
            return false;
        }
        self.record_outcome(outcome, trial, health, clock)
    }

    #[inline(never)]
    fn record_outcome(
        &self,
        outcome: Outcome,
        trial: bool,
        health: &PassiveHealth,
        clock: &Clock,
    ) -> bool {
        match outcome {
            Outcome::Success => {
                if trial
                    && self
                        .cell()
                        .ejected_until
                        .compare_exchange(TRIAL, 0, Relaxed, Relaxed)
                        .is_ok()
                {
                    self.cell().fails.store(0, Relaxed);
                    self.cell().window_start.store(0, Relaxed);
                    tracing::info!(endpoint = ?self.key, id = self.id, "endpoint restored: trial request succeeded");
                }
                false
            }
            Outcome::Ignored => {
                if trial {
                    self.release_trial();
                }
                false
            }
            Outcome::Failure(_) => {
                self.failures.fetch_add(1, Relaxed);
                if trial {
                    // Ejected again for a full fail_timeout, whatever max_fails says
                    // (nginx: a failed trial marks the server down again at once).
                    self.eject(health, clock);
                    return false;
                }
                if !health.enabled() {
                    return false;
                }
                let now = clock.now_ms();
                let window = health.fail_timeout_ms();
                let start = self.cell().window_start.load(Relaxed);
                let fails = if start == 0 || now.saturating_sub(start) > window {
                    // A new window opens with this failure (nginx counts from the first).
                    self.cell().window_start.store(now, Relaxed);
                    self.cell().fails.store(1, Relaxed);
                    1
                } else {
                    self.cell().fails.fetch_add(1, Relaxed).saturating_add(1)
                };
                fails >= health.max_fails
            }
        }
    }

    /// Ejects for `fail_timeout` from now (saturating). Called under the balancer's
    /// ejection lock, or by the holder of the trial (cold paths).
    pub(crate) fn eject(&self, health: &PassiveHealth, clock: &Clock) {
        let now = clock.now_ms();
        // Below TRIAL so the state stays "ejected until"; a saturated value never expires.
        let until = now.saturating_add(health.fail_timeout_ms()).min(TRIAL - 1);
        self.cell().ejected_until.store(until, Relaxed);
        let fails = self.cell().fails.swap(0, Relaxed);
        self.cell().window_start.store(0, Relaxed);
        crate::telemetry::endpoint_ejected(&self.key);
        tracing::warn!(
            endpoint = ?self.key,
            id = self.id,
            failures = fails,
            for_ms = until - now,
            "endpoint ejected"
        );
    }

    pub(crate) fn status(&self, clock: &Clock) -> EndpointStatus<K>
    where
        K: Clone,
    {
        let now = clock.now_ms();
        let until = self.cell().ejected_until.load(Relaxed);
        let state = if until == 0 {
            EndpointState::Healthy
        } else if until != TRIAL && now < until {
            EndpointState::Ejected {
                remaining: Duration::from_millis(until - now),
            }
        } else {
            EndpointState::Probation
        };
        EndpointStatus {
            key: self.key.clone(),
            id: self.id,
            weight: self.weight,
            state,
            in_flight: self.in_flight.load(Relaxed),
            requests: self.requests.load(Relaxed),
            failures: self.failures.load(Relaxed),
            recent_failures: self.cell().fails.load(Relaxed),
        }
    }
}
