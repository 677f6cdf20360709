//! What an error of this crate means for the HTTP answer and for failure statistics.
//!
//! A stack built from several patterns returns errors from any of them, often wrapped in
//! each other (a chain's link error is a balancer's error is a forward error). A front
//! server needs one answer — which status to send — and the failure statistics need
//! another — whose fault was it. Each error type answers both for itself, in its own
//! module, through two small traits:
//!
//! - [`HttpStatus`]: the status a proxy answers with (`502`, `503`, `504`, ...);
//! - [`KnownFailure`]: the [`FailureKind`] that [`classify`](crate::classify) gives it, and
//!   whether the request surely never reached the upstream.
//!
//! A `&dyn Error` cannot be asked for a trait it may implement, so this module keeps the
//! one list of the crate's error types that implement them ([`error_status`] and the
//! classifier walk the `source()` chain and consult that list). No pattern module looks
//! at another module's error types.

use std::error::Error as StdError;

use http::StatusCode;

use crate::classify::FailureKind;

/// The HTTP status an error stands for when a proxy answers instead of the upstream.
///
/// Implemented by every error of this crate that can end a request:
/// [`ForwardError`](crate::proxy::ForwardError),
/// [`BalanceError`](crate::balance::BalanceError),
/// [`CircuitOpen`](crate::breaker::CircuitOpen), [`ChainError`](crate::chain::ChainError),
/// [`ReplayError`](crate::body::ReplayError).
pub trait HttpStatus {
    /// The status to answer with.
    fn status(&self) -> StatusCode;
}

/// How [`classify`](crate::classify) counts an error of this crate.
pub trait KnownFailure {
    /// The kind of failure.
    fn failure_kind(&self) -> FailureKind;
    /// `true` when the request surely never reached the upstream (connecting failed or
    /// timed out), so even a non-idempotent request may be sent elsewhere.
    fn never_sent(&self) -> bool {
        false
    }
}

/// Returns the first type of the list that `$e` is, as `&dyn $trait`.
macro_rules! registered {
    ($e:expr, $trait:path: $($t:ty),* $(,)?) => {{
        let e: &(dyn StdError + 'static) = $e;
        $(if let Some(x) = e.downcast_ref::<$t>() {
            return Some(x as &dyn $trait);
        })*
        None
    }};
}

/// The crate's error types implementing [`HttpStatus`]: the one list to extend when a
/// module adds an error that can end a request.
fn as_http_status<'a>(e: &'a (dyn StdError + 'static)) -> Option<&'a dyn HttpStatus> {
    registered!(e, HttpStatus:
        crate::proxy::ForwardError,
        crate::balance::BalanceError,
        crate::breaker::CircuitOpen,
        crate::chain::ChainError,
        crate::body::ReplayError,
        crate::proxy::body::BodyFault,
        crate::bulkhead::BulkheadFull,
    )
}

/// The crate's error types implementing [`KnownFailure`].
pub(crate) fn as_known_failure<'a>(
    e: &'a (dyn StdError + 'static),
) -> Option<&'a dyn KnownFailure> {
    registered!(e, KnownFailure:
        crate::proxy::ForwardError,
        crate::proxy::Http1Error,
        crate::body::ReplayError,
        crate::proxy::body::BodyFault,
        crate::bulkhead::BulkheadFull,
    )
}

/// The status of the first error in `err`'s `source()` chain that implements
/// [`HttpStatus`], if any.
pub(crate) fn registered_status(err: &(dyn StdError + 'static)) -> Option<StatusCode> {
    let mut cur: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(s) = as_http_status(e) {
            return Some(s.status());
        }
        cur = e.source();
    }
    None
}

/// The status a proxy should answer for any error of a stack built from this crate.
///
/// The first error in the `source()` chain that implements [`HttpStatus`] decides (a
/// wrapping error such as a balancer's "upstream failed after N tries" defers to its
/// cause). Otherwise timeouts are `504`, the proxy's own resource exhaustion (an io
/// error, [`FailureKind::Client`]) `503`, and everything else `502`.
pub fn error_status(err: &(dyn StdError + 'static)) -> StatusCode {
    if let Some(s) = registered_status(err) {
        return s;
    }
    match crate::classify::error_kind(err) {
        FailureKind::Timeout => StatusCode::GATEWAY_TIMEOUT,
        FailureKind::Client => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::BAD_GATEWAY,
    }
}

/// The crate's one answer to a future polled again after it returned `Ready`: a clear
/// panic naming the future, as tower's futures do. Returning an invented error or response
/// instead would hide the caller's bug behind a plausible-looking failure.
#[cold]
#[track_caller]
pub(crate) fn polled_after_completion(future: &'static str) -> ! {
    panic!("{future} polled after completion")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BoxError;

    #[test]
    fn status_walks_the_source_chain() {
        let inner = crate::breaker::CircuitOpen {
            state: crate::breaker::State::Open,
            remaining: None,
        };
        let wrapped = crate::balance::BalanceError::Upstream {
            tries: 2,
            source: Box::new(inner),
        };
        assert_eq!(error_status(&wrapped), StatusCode::SERVICE_UNAVAILABLE);
    }

    #[test]
    fn unknown_errors_are_bad_gateway_and_timeouts_gateway_timeout() {
        let other: BoxError = "boom".into();
        assert_eq!(error_status(&*other), StatusCode::BAD_GATEWAY);
        let t: BoxError = Box::new(tower::timeout::error::Elapsed::new());
        assert_eq!(error_status(&*t), StatusCode::GATEWAY_TIMEOUT);
    }

    #[test]
    fn a_client_body_error_is_bad_request_and_not_the_upstreams_fault() {
        let e = crate::body::ReplayError("client hung up".into());
        assert_eq!(error_status(&e), StatusCode::BAD_REQUEST);
        assert_eq!(crate::classify::error_kind(&e), FailureKind::Client);
    }
}
