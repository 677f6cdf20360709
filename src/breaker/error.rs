//! Errors of the circuit breaker.

use std::time::Duration;

use http::StatusCode;

use super::State;
use crate::error::HttpStatus;

/// A call the circuit did not admit. Carried by the error of a rejected call, and put in
/// the request extensions before a fallback runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("circuit breaker {state}: call not permitted{}", fmt_remaining(.remaining))]
pub struct CircuitOpen {
    /// The state that refused the call: open, forced-open or half-open (probes all taken).
    pub state: State,
    /// Time left before the open circuit lets probes through; `None` when it is not
    /// known (forced open, half-open).
    pub remaining: Option<Duration>,
}

/// 503 Service Unavailable: the upstream is being given time to recover.
impl HttpStatus for CircuitOpen {
    fn status(&self) -> StatusCode {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

fn fmt_remaining(r: &Option<Duration>) -> String {
    match r {
        Some(d) => format!(" (retry in {} ms)", d.as_millis()),
        None => String::new(),
    }
}

/// A transition the state machine does not allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("illegal circuit breaker transition {from} -> {to}")]
pub struct IllegalTransition {
    /// The state the breaker was in.
    pub from: State,
    /// The state that was asked for.
    pub to: State,
}

/// An invalid [`CircuitBreakerConfig`](super::CircuitBreakerConfig).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A percentage outside `(0, 100]`.
    #[error("{name} must be in (0, 100], got {value}")]
    Percent {
        /// Setting name.
        name: &'static str,
        /// Value given.
        value: f64,
    },
    /// A setting that must be positive was zero.
    #[error("{0} must be greater than zero")]
    Zero(&'static str),
    /// A setting over its limit.
    #[error("{name} must be at most {max}")]
    TooLarge {
        /// Setting name.
        name: &'static str,
        /// The limit.
        max: u64,
    },
    /// No failure rate, slow-call rate or consecutive-failure condition: it could never trip.
    #[error("no trip condition: set a failure rate, a slow-call rate or consecutive failures")]
    NoTripCondition,
    /// Backoff multiplier below 1 or not finite.
    #[error("backoff multiplier must be finite and >= 1, got {0}")]
    Multiplier(f64),
    /// Jitter outside `0..=1`.
    #[error("backoff jitter must be in 0..=1, got {0}")]
    Jitter(f64),
}
