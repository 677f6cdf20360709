//! The state word, the shared state of one circuit, and the permit handed to admitted
//! calls. The [`Circuit`](super::Circuit) handle is in `circuit.rs`, admission and recording
//! in `record.rs`, transitions and metrics in `transition.rs`.
//!
//! The state lives in one `AtomicU64`: `epoch << 4 | busy << 3 | state`. Every transition
//! bumps the epoch, so outcomes and half-open permits of an earlier state are recognised
//! and discarded. A transition first swaps in a *busy* word (calls are refused while it
//! lasts), prepares the new state's data, then publishes it: two racing transitions can
//! never interleave their preparation.

use std::fmt;
use std::sync::atomic::{AtomicU32, AtomicU64};

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use super::config::CircuitBreakerConfig;
use super::consecutive::Consecutive;
use super::window::{CountWindow, SecondClock, TimeWindow};

pub(super) const TARGET: &str = "tower_patterns::breaker";

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
    pub(super) fn from_bits(b: u64) -> State {
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

pub(super) const BUSY: u64 = 8;
pub(super) const CLOSED: u64 = State::Closed as u64;
pub(super) const OPEN: u64 = State::Open as u64;
pub(super) const HALF_OPEN: u64 = State::HalfOpen as u64;
pub(super) const FORCED_OPEN: u64 = State::ForcedOpen as u64;
pub(super) const DISABLED: u64 = State::Disabled as u64;
pub(super) const METRICS_ONLY: u64 = State::MetricsOnly as u64;

#[inline]
pub(super) fn epoch_of(word: u64) -> u64 {
    word >> 4
}

// Half-open permits word: epoch (low 32 bits) << 32 | available.
// Half-open results word: epoch (low 25 bits) << 39 | slow << 26 | failures << 13 | calls.
pub(super) const R: u32 = 13;
pub(super) const RMASK: u64 = (1 << R) - 1;

#[inline]
pub(super) fn ho_epoch32(word: u64) -> u64 {
    epoch_of(word) & 0xFFFF_FFFF
}
#[inline]
pub(super) fn ho_epoch25(word: u64) -> u64 {
    epoch_of(word) & ((1 << 25) - 1)
}

pub(super) enum Metrics {
    Count(CountWindow),
    Time(TimeWindow),
}

pub(crate) struct Shared {
    pub(super) name: String,
    pub(super) cfg: CircuitBreakerConfig,
    pub(super) base: Instant,
    /// Whole seconds since `base`: the time window's bucket clock.
    pub(super) secs: SecondClock,
    pub(super) state: AtomicU64,
    pub(super) window: Metrics,
    pub(super) min_calls: u32,
    /// `failure_rate` as a [`threshold`]; `u64::MAX` when not configured.
    pub(super) failure_threshold: u64,
    /// `slow_rate` as a [`threshold`]; `u64::MAX` when not configured.
    pub(super) slow_threshold: u64,
    pub(super) consecutive: Consecutive,
    pub(super) open_until: AtomicU64,
    pub(super) open_attempts: AtomicU32,
    pub(super) ho_permits: AtomicU64,
    pub(super) ho_results: AtomicU64,
    pub(super) ho_deadline: AtomicU64,
    pub(super) not_permitted: AtomicU64,
    pub(super) tx: watch::Sender<State>,
    pub(super) notify: Arc<Notify>,
}

/// Proof that the circuit admitted one call. Hand it back with [`Circuit::complete`](super::Circuit::complete);
/// dropping it instead (the call was cancelled) returns a half-open probe permit without
/// recording anything.
#[must_use = "a permit must be completed or dropped"]
pub struct Permit {
    pub(super) word: u64,
    pub(super) release: Option<Arc<Shared>>,
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

/// `part` of `calls` in percent, for events and metrics (decisions compare integers).
pub(super) fn rate(part: u32, calls: u32) -> f64 {
    f64::from(part) * 100.0 / f64::from(calls)
}

/// Fixed-point scale of rate thresholds: a percent in units of 1/10,000 %.
const SCALE: u64 = 1_000_000;

/// A threshold in percent as the integer that [`reaches`] compares: `percent * 10,000`,
/// rounded, so thresholds with up to four decimals decide exactly as the real numbers
/// do; `u64::MAX` (never reached) for none.
pub(super) fn threshold(percent: Option<f64>) -> u64 {
    match percent {
        // Validated to (0, 100]: the product is at most 1,000,000, so the cast is exact.
        Some(p) => (p * (SCALE / 100) as f64).round() as u64,
        None => u64::MAX,
    }
}

/// `part / calls >= threshold` (in percent) without a division: both sides are below
/// 2^52 (`part`, `calls` < 2^32, the scale and a threshold <= 10^6 < 2^20).
#[inline]
pub(super) fn reaches(part: u32, calls: u32, threshold: u64) -> bool {
    u64::from(part) * SCALE >= threshold.saturating_mul(u64::from(calls))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// A threshold with two decimals decides exactly as the rational comparison
        /// `part / calls * 100 >= k / 100` does, at every window size.
        #[test]
        fn integer_threshold_is_exact(k in 1u64..=10_000, calls in 1u32..20_000, part in 0u32..20_000) {
            let part = part.min(calls);
            let t = threshold(Some(k as f64 / 100.0));
            let exact = u64::from(part) * 100 * 100 >= k * u64::from(calls);
            prop_assert_eq!(reaches(part, calls, t), exact);
        }
    }

    #[test]
    fn no_threshold_is_never_reached() {
        assert!(!reaches(u32::MAX, u32::MAX, threshold(None)));
        assert!(reaches(1, 1, threshold(Some(100.0))));
        assert!(!reaches(0, 1, threshold(Some(0.0001))));
    }
}
