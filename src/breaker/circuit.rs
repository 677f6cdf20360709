//! [`Circuit`]: the shareable handle of one circuit (admission, operator controls,
//! events, metrics); every clone drives the same [`Shared`] state.

use std::fmt;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use super::config::{CircuitBreakerConfig, Window};
use super::consecutive::{Consecutive, Kind as ConsecutiveKind};
use super::error::{CircuitOpen, ConfigError, IllegalTransition};
use super::state::{threshold, Metrics, MetricsSnapshot, Permit, Shared, State, CLOSED, OPEN};
use super::window::{CountWindow, SecondClock, TimeWindow};
use crate::classify::Outcome;
use crate::gate::Gate;

/// The shareable handle of one circuit: admission ([`try_acquire`](Circuit::try_acquire) /
/// [`complete`](Circuit::complete), also as a [`Gate`] for the balancer), operator
/// controls, events and metrics. Cloning is cheap and every clone drives the same circuit.
#[derive(Clone)]
pub struct Circuit {
    shared: Arc<Shared>,
}

impl fmt::Debug for Circuit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Circuit")
            .field("name", &self.shared.name)
            .field("state", &self.state())
            .finish()
    }
}

impl Circuit {
    /// Builds a circuit from a validated configuration.
    pub fn new(cfg: CircuitBreakerConfig) -> Result<Self, ConfigError> {
        cfg.validate()?;
        let (window, min_calls) = match cfg.window {
            Window::Count(n) => (
                Metrics::Count(CountWindow::new(n, cfg.minimum_calls.min(n))),
                cfg.minimum_calls.min(n),
            ),
            Window::Time(_) => (
                Metrics::Time(TimeWindow::new(cfg.window_secs(), cfg.minimum_calls)),
                cfg.minimum_calls,
            ),
        };
        let (failure_threshold, slow_threshold) =
            (threshold(cfg.failure_rate), threshold(cfg.slow_rate));
        let (tx, _) = watch::channel(State::Closed);
        let base = Instant::now();
        let consecutive = Consecutive::new(match (&cfg.consecutive_failures, &cfg.window) {
            (Some(_), _) => ConsecutiveKind::Exact,
            (None, Window::Count(_)) => ConsecutiveKind::Plain,
            (None, Window::Time(_)) => ConsecutiveKind::Striped,
        });
        Ok(Self {
            shared: Arc::new(Shared {
                name: cfg.name.clone(),
                cfg,
                base,
                secs: SecondClock::new(base),
                state: AtomicU64::new(CLOSED),
                window,
                min_calls,
                failure_threshold,
                slow_threshold,
                consecutive,
                open_until: AtomicU64::new(0),
                open_attempts: AtomicU32::new(0),
                ho_permits: AtomicU64::new(0),
                ho_results: AtomicU64::new(0),
                ho_deadline: AtomicU64::new(u64::MAX),
                not_permitted: AtomicU64::new(0),
                tx,
                notify: Arc::new(Notify::new()),
            }),
        })
    }

    /// The configured name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// The configuration.
    pub fn config(&self) -> &CircuitBreakerConfig {
        &self.shared.cfg
    }

    /// The current state.
    pub fn state(&self) -> State {
        let w = self.shared.state.load(Ordering::Acquire);
        State::from_bits(w)
    }

    /// A subscription to state changes (the current state is marked seen).
    pub fn subscribe(&self) -> watch::Receiver<State> {
        self.shared.tx.subscribe()
    }

    /// `true` when outcomes need the call's duration (a slow-call rate is configured).
    pub fn measures_duration(&self) -> bool {
        self.shared.cfg.slow_rate.is_some()
    }

    /// Asks to send one call. A refusal counts as a call not permitted and emits the
    /// "call not permitted" event.
    #[inline(always)]
    pub fn try_acquire(&self) -> Result<Permit, CircuitOpen> {
        self.shared.try_acquire(true)
    }

    /// Like [`try_acquire`](Circuit::try_acquire), but a refusal is not counted: for
    /// callers that will send the call elsewhere or wait (a balancer skipping this
    /// endpoint, back-pressure), so the call was not refused.
    #[inline]
    pub fn try_acquire_uncounted(&self) -> Result<Permit, CircuitOpen> {
        self.shared.try_acquire(false)
    }

    /// Reports how an admitted call ended and how long it took.
    #[inline(always)]
    pub fn complete(&self, permit: Permit, outcome: Outcome, elapsed: Duration) {
        self.shared.complete(permit, outcome, elapsed)
    }

    /// Moves to `to`. Returns `Ok(false)` when already there (no event is emitted).
    /// Half-open can only be entered from open.
    pub fn transition_to(&self, to: State) -> Result<bool, IllegalTransition> {
        self.shared.transition(None, to)
    }

    /// Rejects every call until another operator action.
    pub fn force_open(&self) {
        let _ = self.shared.transition(None, State::ForcedOpen);
    }

    /// Moves to closed, starting an empty window (no-op when already closed; see
    /// [`reset`](Circuit::reset) to clear a closed window).
    pub fn force_closed(&self) {
        let _ = self.shared.transition(None, State::Closed);
    }

    /// Closes the circuit and clears every counter, including the backoff and the
    /// not-permitted count. Emits a transition event only if the state changes.
    pub fn reset(&self) {
        let _ = self.shared.transition(None, State::Closed);
        let s = &self.shared;
        s.reset_window();
        s.open_attempts.store(0, Ordering::Relaxed);
        s.not_permitted.store(0, Ordering::Relaxed);
    }

    /// Admits everything and records nothing.
    pub fn disable(&self) {
        let _ = self.shared.transition(None, State::Disabled);
    }

    /// Admits everything, records outcomes, never trips.
    pub fn metrics_only(&self) {
        let _ = self.shared.transition(None, State::MetricsOnly);
    }

    /// A snapshot of the counters.
    pub fn metrics(&self) -> MetricsSnapshot {
        self.shared.metrics()
    }

    /// The time left in open state, if open.
    pub fn open_remaining(&self) -> Option<Duration> {
        let s = &self.shared;
        let w = s.state.load(Ordering::Acquire);
        (w & 15 == OPEN).then(|| s.remaining(s.now_nanos()))
    }

    pub(crate) fn notify(&self) -> &Arc<Notify> {
        &self.shared.notify
    }

    pub(crate) fn open_deadline(&self) -> Option<Instant> {
        let s = &self.shared;
        let w = s.state.load(Ordering::Acquire);
        (w & 15 == OPEN)
            .then(|| s.base + Duration::from_nanos(s.open_until.load(Ordering::Acquire)))
    }
}

impl Gate for Circuit {
    type Permit = Permit;

    /// An endpoint skipped by the balancer is not a refused call: not counted.
    #[inline]
    fn try_acquire(&self) -> Option<Permit> {
        self.shared.try_acquire(false).ok()
    }

    #[inline]
    fn complete(&self, permit: Permit, outcome: Outcome, elapsed: Duration) {
        self.shared.complete(permit, outcome, elapsed)
    }
}
