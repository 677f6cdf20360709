//! One endpoint of the set: its service, gate, and lock-free counters and health state.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

use http::HeaderValue;

use crate::classify::Outcome;

/// Passive health checking, as nginx's `max_fails` / `fail_timeout` plus Envoy's
/// `max_ejection_percent`.
///
/// `max_fails` failures (as classified by the balancer's [`Classify`](crate::classify::Classify))
/// within `fail_timeout` of the first one eject the endpoint for `fail_timeout`. After that
/// it is picked again on *probation*: one more failure ejects it again at once, one success
/// clears it. At most `max_ejection_percent` of the set is ejected at a time (at least one
/// endpoint when the set has two or more), and the last endpoint is never ejected.
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
    /// Back after an ejection: the next failure ejects it again, a success clears it.
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
    /// Requests sent and not yet answered (headers).
    pub in_flight: usize,
    /// Requests sent to it since it joined the set.
    pub requests: u64,
    /// Failed requests since it joined the set.
    pub failures: u64,
    /// Failures counted in the current `fail_timeout` window.
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
    fails: AtomicU32,
    window_start: AtomicU64,
    /// 0 when not ejected.
    ejected_until: AtomicU64,
    probation: AtomicBool,
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
            fails: AtomicU32::new(0),
            window_start: AtomicU64::new(0),
            ejected_until: AtomicU64::new(0),
            probation: AtomicBool::new(false),
        }
    }

    /// `true` while ejected. The first caller to see an expired ejection restores the
    /// endpoint (on probation) and logs it. Costs one relaxed load when never ejected.
    #[inline]
    pub(crate) fn is_ejected(&self, clock: &Clock) -> bool {
        let until = self.ejected_until.load(Relaxed);
        if until == 0 {
            return false;
        }
        if clock.now_ms() < until {
            return true;
        }
        if self
            .ejected_until
            .compare_exchange(until, 0, Relaxed, Relaxed)
            .is_ok()
        {
            self.probation.store(true, Relaxed);
            self.fails.store(0, Relaxed);
            tracing::info!(endpoint = ?self.key, id = self.id, "endpoint restored on probation");
        }
        false
    }

    /// Ejected as of `now` (does not restore).
    pub(crate) fn ejected_at(&self, now: u64) -> bool {
        let until = self.ejected_until.load(Relaxed);
        until != 0 && now < until
    }

    /// Records an outcome. Returns `true` when the failure calls for ejection; the caller
    /// checks the budget and calls [`eject`](Self::eject).
    pub(crate) fn record(&self, outcome: Outcome, health: &PassiveHealth, clock: &Clock) -> bool {
        match outcome {
            Outcome::Success => {
                if self.probation.load(Relaxed) {
                    self.probation.store(false, Relaxed);
                    self.fails.store(0, Relaxed);
                }
                false
            }
            Outcome::Ignored => false,
            Outcome::Failure(_) => {
                self.failures.fetch_add(1, Relaxed);
                if !health.enabled() {
                    return false;
                }
                if self.probation.load(Relaxed) {
                    return true;
                }
                let now = clock.now_ms();
                let window = health.fail_timeout.as_millis() as u64;
                let start = self.window_start.load(Relaxed);
                let fails = if start == 0 || now.saturating_sub(start) > window {
                    // A new window opens with this failure (nginx counts from the first).
                    self.window_start.store(now, Relaxed);
                    self.fails.store(1, Relaxed);
                    1
                } else {
                    self.fails.fetch_add(1, Relaxed) + 1
                };
                fails >= health.max_fails
            }
        }
    }

    /// Ejects for `fail_timeout` from now. Called under the balancer's ejection lock (cold path).
    pub(crate) fn eject(&self, health: &PassiveHealth, clock: &Clock) {
        let now = clock.now_ms();
        let until = now + (health.fail_timeout.as_millis() as u64).max(1);
        self.ejected_until.store(until, Relaxed);
        self.probation.store(false, Relaxed);
        let fails = self.fails.swap(0, Relaxed);
        self.window_start.store(0, Relaxed);
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
        let until = self.ejected_until.load(Relaxed);
        let state = if until != 0 && now < until {
            EndpointState::Ejected {
                remaining: Duration::from_millis(until - now),
            }
        } else if until != 0 || self.probation.load(Relaxed) {
            EndpointState::Probation
        } else {
            EndpointState::Healthy
        };
        EndpointStatus {
            key: self.key.clone(),
            id: self.id,
            weight: self.weight,
            state,
            in_flight: self.in_flight.load(Relaxed),
            requests: self.requests.load(Relaxed),
            failures: self.failures.load(Relaxed),
            recent_failures: self.fails.load(Relaxed),
        }
    }
}
