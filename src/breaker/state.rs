//! The state machine and the shareable [`Circuit`] handle.
//!
//! The state lives in one `AtomicU64`: `epoch << 4 | busy << 3 | state`. Every transition
//! bumps the epoch, so outcomes and half-open permits of an earlier state are recognised
//! and discarded. A transition first swaps in a *busy* word (calls are refused while it
//! lasts), prepares the new state's data, then publishes it: two racing transitions can
//! never interleave their preparation.

use std::fmt;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use rand::Rng;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use super::config::{CircuitBreakerConfig, WaitStrategy, Window};
use super::error::{CircuitOpen, ConfigError, IllegalTransition};
use super::window::{CountWindow, Counts, TimeWindow};
use crate::classify::Outcome;
use crate::gate::Gate;

const TARGET: &str = "tower_patterns::breaker";

/// The state of a circuit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum State {
    /// Calls pass; outcomes are recorded and may trip the circuit.
    Closed = 0,
    /// Calls are rejected until the wait ends.
    Open = 1,
    /// A fixed number of probe calls pass; their outcomes decide closed or open.
    HalfOpen = 2,
    /// Calls are rejected until an operator changes the state.
    ForcedOpen = 3,
    /// Calls pass and nothing is recorded.
    Disabled = 4,
    /// Calls pass, outcomes are recorded, the circuit never trips.
    MetricsOnly = 5,
}

impl State {
    fn from_bits(b: u64) -> State {
        match b & 7 {
            0 => State::Closed,
            1 => State::Open,
            2 => State::HalfOpen,
            3 => State::ForcedOpen,
            4 => State::Disabled,
            _ => State::MetricsOnly,
        }
    }

    /// The name used in events: `closed`, `open`, `half-open`, `forced-open`, `disabled`,
    /// `metrics-only`.
    pub fn as_str(&self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Open => "open",
            State::HalfOpen => "half-open",
            State::ForcedOpen => "forced-open",
            State::Disabled => "disabled",
            State::MetricsOnly => "metrics-only",
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

const BUSY: u64 = 8;
const CLOSED: u64 = State::Closed as u64;
const OPEN: u64 = State::Open as u64;
const HALF_OPEN: u64 = State::HalfOpen as u64;
const FORCED_OPEN: u64 = State::ForcedOpen as u64;
const DISABLED: u64 = State::Disabled as u64;
const METRICS_ONLY: u64 = State::MetricsOnly as u64;

#[inline]
fn epoch_of(word: u64) -> u64 {
    word >> 4
}

// Half-open permits word: epoch (low 32 bits) << 32 | available.
// Half-open results word: epoch (low 25 bits) << 39 | slow << 26 | failures << 13 | calls.
const R: u32 = 13;
const RMASK: u64 = (1 << R) - 1;

#[inline]
fn ho_epoch32(word: u64) -> u64 {
    epoch_of(word) & 0xFFFF_FFFF
}
#[inline]
fn ho_epoch25(word: u64) -> u64 {
    epoch_of(word) & ((1 << 25) - 1)
}

enum Metrics {
    Count(CountWindow),
    Time(TimeWindow),
}

pub(crate) struct Shared {
    name: String,
    cfg: CircuitBreakerConfig,
    base: Instant,
    state: AtomicU64,
    window: Metrics,
    min_calls: u32,
    consecutive: AtomicU32,
    open_until: AtomicU64,
    open_attempts: AtomicU32,
    ho_permits: AtomicU64,
    ho_results: AtomicU64,
    ho_deadline: AtomicU64,
    not_permitted: AtomicU64,
    tx: watch::Sender<State>,
    notify: Arc<Notify>,
}

/// Proof that the circuit admitted one call. Hand it back with [`Circuit::complete`];
/// dropping it instead (the call was cancelled) returns a half-open probe permit without
/// recording anything.
#[must_use = "a permit must be completed or dropped"]
pub struct Permit {
    word: u64,
    release: Option<Arc<Shared>>,
}

impl fmt::Debug for Permit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Permit")
            .field("state", &State::from_bits(self.word))
            .field("epoch", &epoch_of(self.word))
            .finish()
    }
}

impl Permit {
    /// The state that admitted the call.
    pub fn state(&self) -> State {
        State::from_bits(self.word)
    }
}

impl Drop for Permit {
    #[inline]
    fn drop(&mut self) {
        if let Some(shared) = self.release.take() {
            shared.release_probe(self.word);
        }
    }
}

/// A snapshot of a breaker's counters.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricsSnapshot {
    /// Current state.
    pub state: State,
    /// Failure rate in percent over the window (or the half-open probes); `None` below the
    /// minimum number of calls.
    pub failure_rate: Option<f64>,
    /// Slow-call rate in percent; `None` below the minimum number of calls.
    pub slow_call_rate: Option<f64>,
    /// Calls in the window (or recorded probes in half-open).
    pub calls: u32,
    /// Failed calls among them.
    pub failed_calls: u32,
    /// Successful calls among them.
    pub successful_calls: u32,
    /// Slow calls among them (successful or not).
    pub slow_calls: u32,
    /// Failures in a row, as last recorded in closed state.
    pub consecutive_failures: u32,
    /// Calls rejected since the breaker was built or reset.
    pub not_permitted_calls: u64,
    /// Time left in open state.
    pub open_remaining: Option<Duration>,
    /// Probe permits not yet handed out, in half-open state.
    pub half_open_available: Option<u32>,
}

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
                Metrics::Count(CountWindow::new(n)),
                cfg.minimum_calls.min(n),
            ),
            Window::Time(_) => (
                Metrics::Time(TimeWindow::new(cfg.window_secs())),
                cfg.minimum_calls,
            ),
        };
        let (tx, _) = watch::channel(State::Closed);
        Ok(Self {
            shared: Arc::new(Shared {
                name: cfg.name.clone(),
                cfg,
                base: Instant::now(),
                state: AtomicU64::new(CLOSED),
                window,
                min_calls,
                consecutive: AtomicU32::new(0),
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

fn rate(part: u32, calls: u32) -> f64 {
    f64::from(part) * 100.0 / f64::from(calls)
}

impl Shared {
    #[inline]
    fn now_nanos(&self) -> u64 {
        let d = Instant::now().saturating_duration_since(self.base);
        u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
    }

    fn remaining(&self, now: u64) -> Duration {
        Duration::from_nanos(self.open_until.load(Ordering::Acquire).saturating_sub(now))
    }

    #[inline(always)]
    fn try_acquire(self: &Arc<Self>, counted: bool) -> Result<Permit, CircuitOpen> {
        let w = self.state.load(Ordering::Acquire);
        match w & 15 {
            CLOSED | DISABLED | METRICS_ONLY => Ok(Permit {
                word: w,
                release: None,
            }),
            _ => self.try_acquire_slow(w, counted),
        }
    }

    #[cold]
    fn try_acquire_slow(
        self: &Arc<Self>,
        mut w: u64,
        counted: bool,
    ) -> Result<Permit, CircuitOpen> {
        let reject = |state: State, remaining: Option<Duration>| {
            if counted {
                self.reject(state, remaining)
            } else {
                CircuitOpen { state, remaining }
            }
        };
        // At most: open -> half-open (lazy), half-open expired -> open: a few rounds.
        for _ in 0..4 {
            match w & 15 {
                CLOSED | DISABLED | METRICS_ONLY => {
                    return Ok(Permit {
                        word: w,
                        release: None,
                    })
                }
                OPEN => {
                    let now = self.now_nanos();
                    if now < self.open_until.load(Ordering::Acquire) {
                        return Err(reject(State::Open, Some(self.remaining(now))));
                    }
                    let _ = self.transition(Some(w), State::HalfOpen);
                }
                HALF_OPEN => {
                    if self.ho_deadline.load(Ordering::Acquire) <= self.now_nanos() {
                        tracing::debug!(target: TARGET, breaker = %self.name, "half-open probes did not decide in time");
                        let _ = self.transition(Some(w), State::Open);
                    } else {
                        if self.take_probe(w) {
                            return Ok(Permit {
                                word: w,
                                release: Some(self.clone()),
                            });
                        }
                        return Err(reject(State::HalfOpen, None));
                    }
                }
                FORCED_OPEN => return Err(reject(State::ForcedOpen, None)),
                _ => {
                    // Busy: a transition is being prepared.
                    return Err(reject(State::from_bits(w), None));
                }
            }
            w = self.state.load(Ordering::Acquire);
        }
        Err(reject(State::from_bits(w), None))
    }

    fn reject(&self, state: State, remaining: Option<Duration>) -> CircuitOpen {
        self.not_permitted.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(
            target: TARGET,
            breaker = %self.name,
            state = %state,
            remaining_ms = remaining.map(|d| d.as_millis() as u64),
            "call not permitted"
        );
        CircuitOpen { state, remaining }
    }

    fn take_probe(&self, w: u64) -> bool {
        let ep = ho_epoch32(w);
        let mut p = self.ho_permits.load(Ordering::Acquire);
        loop {
            if p >> 32 != ep || p & 0xFFFF_FFFF == 0 {
                return false;
            }
            match self.ho_permits.compare_exchange_weak(
                p,
                p - 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return true,
                Err(cur) => p = cur,
            }
        }
    }

    #[cold]
    fn release_probe(&self, w: u64) {
        let ep = ho_epoch32(w);
        let mut p = self.ho_permits.load(Ordering::Acquire);
        loop {
            if p >> 32 != ep {
                return; // a later state: this permit no longer exists
            }
            match self.ho_permits.compare_exchange_weak(
                p,
                p + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => break,
                Err(cur) => p = cur,
            }
        }
        self.notify.notify_waiters();
    }

    #[inline(always)]
    fn complete(self: &Arc<Self>, mut permit: Permit, outcome: Outcome, elapsed: Duration) {
        if outcome == Outcome::Ignored {
            return; // dropping the permit returns a probe permit
        }
        permit.release = None;
        let fail = outcome.is_failure();
        let slow = match self.cfg.slow_rate {
            Some(_) => elapsed >= self.cfg.slow_duration,
            None => false,
        };
        match permit.word & 15 {
            CLOSED | METRICS_ONLY => self.record_closed(permit.word, fail, slow),
            HALF_OPEN => self.record_probe(permit.word, fail, slow),
            _ => {}
        }
    }

    #[inline(always)]
    fn record_closed(self: &Arc<Self>, word: u64, fail: bool, slow: bool) {
        if self.state.load(Ordering::Relaxed) != word {
            return; // admitted in an earlier state
        }
        if !fail && !slow {
            // The healthy steady state: a success into a clean, full count window changes
            // nothing. Kept small so it inlines into the caller.
            if let Metrics::Count(w) = &self.window {
                if w.is_full_and_clean() {
                    if self.consecutive.load(Ordering::Relaxed) != 0 {
                        self.consecutive.store(0, Ordering::Relaxed);
                    }
                    return;
                }
            }
        }
        self.record_closed_slow(word, fail, slow)
    }

    #[inline(never)]
    fn record_closed_slow(self: &Arc<Self>, word: u64, fail: bool, slow: bool) {
        let consecutive = if fail {
            self.consecutive.fetch_add(1, Ordering::Relaxed) + 1
        } else {
            if self.consecutive.load(Ordering::Relaxed) != 0 {
                self.consecutive.store(0, Ordering::Relaxed);
            }
            0
        };
        let c = match &self.window {
            Metrics::Count(w) => w.record(fail, slow),
            Metrics::Time(w) => w.record(self.now_nanos() / 1_000_000_000, fail, slow),
        };
        if c.failures == 0 && c.slow == 0 && consecutive == 0 {
            return;
        }
        if let Some(reason) = self.trip_reason(c, consecutive, self.min_calls) {
            if word & 15 == METRICS_ONLY {
                return;
            }
            tracing::warn!(
                target: TARGET,
                breaker = %self.name,
                failure_rate = rate(c.failures, c.calls.max(1)),
                slow_call_rate = rate(c.slow, c.calls.max(1)),
                consecutive_failures = consecutive,
                calls = c.calls,
                reason,
                "failure rate exceeded threshold"
            );
            let _ = self.transition(Some(word), State::Open);
        }
    }

    fn trip_reason(&self, c: Counts, consecutive: u32, min_calls: u32) -> Option<&'static str> {
        if let Some(k) = self.cfg.consecutive_failures {
            if consecutive >= k {
                return Some("consecutive failures");
            }
        }
        if c.calls >= min_calls && c.calls > 0 {
            if let Some(t) = self.cfg.failure_rate {
                if rate(c.failures, c.calls) >= t {
                    return Some("failure rate");
                }
            }
            if let Some(t) = self.cfg.slow_rate {
                if rate(c.slow, c.calls) >= t {
                    return Some("slow-call rate");
                }
            }
        }
        None
    }

    #[cold]
    fn record_probe(self: &Arc<Self>, word: u64, fail: bool, slow: bool) {
        let ep = ho_epoch25(word);
        let n = u64::from(self.cfg.half_open_permits);
        let mut r = self.ho_results.load(Ordering::Acquire);
        let next = loop {
            if r >> 39 != ep || r & RMASK >= n {
                return; // stale, or already decided
            }
            let next = r + 1 + (u64::from(fail) << R) + (u64::from(slow) << (2 * R));
            match self.ho_results.compare_exchange_weak(
                r,
                next,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => break next,
                Err(cur) => r = cur,
            }
        };
        if next & RMASK < n {
            return;
        }
        let c = Counts {
            calls: (next & RMASK) as u32,
            failures: ((next >> R) & RMASK) as u32,
            slow: ((next >> (2 * R)) & RMASK) as u32,
        };
        // Probes decide by the same rates; consecutive failures count as "all probes
        // failed up to k".
        let consecutive = if self.cfg.consecutive_failures.is_some() {
            c.failures
        } else {
            0
        };
        let to = match self.probe_trip(c, consecutive) {
            Some(reason) => {
                tracing::warn!(
                    target: TARGET,
                    breaker = %self.name,
                    failure_rate = rate(c.failures, c.calls),
                    slow_call_rate = rate(c.slow, c.calls),
                    reason,
                    "half-open probes exceeded threshold"
                );
                State::Open
            }
            None => State::Closed,
        };
        let _ = self.transition(Some(word), to);
    }

    fn probe_trip(&self, c: Counts, failures: u32) -> Option<&'static str> {
        if let Some(k) = self.cfg.consecutive_failures {
            if failures >= k.min(c.calls) {
                return Some("consecutive failures");
            }
        }
        self.trip_reason(c, 0, c.calls)
    }

    fn reset_window(&self) {
        match &self.window {
            Metrics::Count(w) => w.reset(),
            Metrics::Time(w) => w.reset(),
        }
        self.consecutive.store(0, Ordering::Relaxed);
    }

    fn open_wait(&self) -> Duration {
        let n = self.open_attempts.fetch_add(1, Ordering::Relaxed);
        match self.cfg.wait {
            WaitStrategy::Constant(d) => d,
            WaitStrategy::Exponential {
                initial,
                multiplier,
                max,
                jitter,
            } => {
                let exp = multiplier.powi(n.min(1_000) as i32);
                let base = initial.as_secs_f64() * exp;
                let base = if base.is_finite() {
                    base.min(max.as_secs_f64())
                } else {
                    max.as_secs_f64()
                };
                let factor = if jitter > 0.0 {
                    1.0 + rand::rng().random_range(-jitter..=jitter)
                } else {
                    1.0
                };
                Duration::try_from_secs_f64(base * factor).unwrap_or(max)
            }
        }
    }

    /// Moves from `expect` (or whatever the state is, when `None`) to `to`.
    /// `Ok(false)`: nothing changed (already there, or `expect` is stale).
    fn transition(
        self: &Arc<Self>,
        expect: Option<u64>,
        to: State,
    ) -> Result<bool, IllegalTransition> {
        let mut spins = 0u32;
        let (cur, busy) = loop {
            let cur = self.state.load(Ordering::Acquire);
            if let Some(e) = expect {
                if cur != e {
                    return Ok(false);
                }
            }
            let from = State::from_bits(cur);
            if cur & BUSY != 0 {
                // Another transition is being prepared; operator calls wait it out.
                spins += 1;
                if spins > 64 {
                    std::thread::yield_now();
                } else {
                    std::hint::spin_loop();
                }
                continue;
            }
            if from == to {
                return Ok(false);
            }
            if to == State::HalfOpen && from != State::Open {
                return Err(IllegalTransition { from, to });
            }
            let busy = ((epoch_of(cur) + 1) << 4) | BUSY | (cur & 7);
            if self
                .state
                .compare_exchange(cur, busy, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                break (cur, busy);
            }
        };
        let from = State::from_bits(cur);
        let word = (busy & !(BUSY | 7)) | to as u64;
        let now = self.now_nanos();
        match to {
            State::Open => {
                let wait = self.open_wait();
                let until = now.saturating_add(u64::try_from(wait.as_nanos()).unwrap_or(u64::MAX));
                self.open_until.store(until, Ordering::Release);
            }
            State::HalfOpen => {
                self.ho_permits.store(
                    (ho_epoch32(word) << 32) | u64::from(self.cfg.half_open_permits),
                    Ordering::Release,
                );
                self.ho_results
                    .store(ho_epoch25(word) << 39, Ordering::Release);
                let deadline = match self.cfg.max_half_open_wait {
                    Some(d) => now.saturating_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)),
                    None => u64::MAX,
                };
                self.ho_deadline.store(deadline, Ordering::Release);
            }
            State::Closed | State::MetricsOnly => {
                self.reset_window();
                // Every close restarts the backoff, not only a successful half-open probe:
                // an operator's `force_closed()` / `transition_to(Closed)` from open,
                // forced-open, disabled or metrics-only is a close too (resilience4j
                // resets its interval function on any transition to closed).
                if to == State::Closed {
                    self.open_attempts.store(0, Ordering::Relaxed);
                }
            }
            State::ForcedOpen | State::Disabled => {}
        }
        self.state.store(word, Ordering::Release);

        crate::telemetry::breaker_transition(&self.name, to);
        tracing::info!(
            target: TARGET,
            breaker = %self.name,
            from = %from,
            to = %to,
            "circuit breaker state transition"
        );
        // Publish the latest state, read under the channel's lock, so racing transitions
        // never leave subscribers on a stale value.
        self.tx.send_if_modified(|v| {
            let now = State::from_bits(self.state.load(Ordering::Acquire));
            let changed = *v != now;
            *v = now;
            changed
        });
        self.notify.notify_waiters();
        self.schedule(word, to);
        Ok(true)
    }

    /// Timers for automatic half-open and the maximum half-open wait. Without a Tokio
    /// runtime the same checks happen lazily on the next call.
    fn schedule(self: &Arc<Self>, word: u64, to: State) {
        let deadline = match to {
            State::Open if self.cfg.automatic_half_open => self.open_until.load(Ordering::Acquire),
            State::HalfOpen if self.cfg.max_half_open_wait.is_some() => {
                self.ho_deadline.load(Ordering::Acquire)
            }
            _ => return,
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let at = self.base + Duration::from_nanos(deadline);
        let weak: Weak<Shared> = Arc::downgrade(self);
        rt.spawn(async move {
            tokio::time::sleep_until(at).await;
            if let Some(s) = weak.upgrade() {
                let next = if to == State::Open {
                    State::HalfOpen
                } else {
                    tracing::debug!(target: TARGET, breaker = %s.name, "half-open probes did not decide in time");
                    State::Open
                };
                let _ = s.transition(Some(word), next);
            }
        });
    }

    fn metrics(&self) -> MetricsSnapshot {
        let w = self.state.load(Ordering::Acquire);
        let state = State::from_bits(w);
        let now = self.now_nanos();
        let (c, min) = if w & 15 == HALF_OPEN {
            let r = self.ho_results.load(Ordering::Acquire);
            let c = if r >> 39 == ho_epoch25(w) {
                Counts {
                    calls: (r & RMASK) as u32,
                    failures: ((r >> R) & RMASK) as u32,
                    slow: ((r >> (2 * R)) & RMASK) as u32,
                }
            } else {
                Counts::default()
            };
            (c, self.cfg.half_open_permits)
        } else {
            let c = match &self.window {
                Metrics::Count(win) => win.counts(),
                Metrics::Time(win) => win.counts(now / 1_000_000_000),
            };
            (c, self.min_calls)
        };
        let enough = c.calls >= min && c.calls > 0;
        let half_open_available = (w & 15 == HALF_OPEN).then(|| {
            let p = self.ho_permits.load(Ordering::Acquire);
            if p >> 32 == ho_epoch32(w) {
                (p & 0xFFFF_FFFF) as u32
            } else {
                0
            }
        });
        MetricsSnapshot {
            state,
            failure_rate: enough.then(|| rate(c.failures, c.calls)),
            slow_call_rate: enough.then(|| rate(c.slow, c.calls)),
            calls: c.calls,
            failed_calls: c.failures,
            successful_calls: c.calls - c.failures.min(c.calls),
            slow_calls: c.slow,
            consecutive_failures: self.consecutive.load(Ordering::Relaxed),
            not_permitted_calls: self.not_permitted.load(Ordering::Relaxed),
            open_remaining: (w & 15 == OPEN).then(|| self.remaining(now)),
            half_open_available,
        }
    }
}
