use std::error::Error as StdError;
use std::time::Duration;

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;

use crate::classify::{error_kind, FailureKind};
use crate::BoxError;

/// Why a request could not be forwarded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ForwardError {
    /// The configured upstream URI cannot be used.
    #[error("invalid upstream {uri:?}: {reason}")]
    InvalidUpstream {
        /// The URI as given.
        uri: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The request's path cannot be joined to the upstream.
    #[error("request path cannot be forwarded: {0}")]
    InvalidRequest(#[source] http::Error),
    /// No connection could be made (refused, unreachable). The request never left, so
    /// it is safe to try another endpoint whatever the method.
    #[error("connecting to upstream {upstream} failed")]
    Connect {
        /// `host:port` of the upstream.
        upstream: String,
        /// The underlying error.
        #[source]
        source: BoxError,
    },
    /// Connecting took longer than the connect timeout.
    #[error("connecting to upstream {upstream} timed out")]
    ConnectTimeout {
        /// `host:port` of the upstream.
        upstream: String,
    },
    /// The response headers did not arrive within the response timeout.
    #[error("upstream {upstream} did not answer within {after:?}")]
    ResponseTimeout {
        /// `host:port` of the upstream.
        upstream: String,
        /// The timeout that elapsed.
        after: Duration,
    },
    /// The connection broke or the upstream spoke invalid HTTP after the request was sent.
    #[error("upstream {upstream} failed while answering")]
    Transport {
        /// `host:port` of the upstream.
        upstream: String,
        /// The underlying error.
        #[source]
        source: BoxError,
    },
}

impl ForwardError {
    /// The [`FailureKind`] that [`classify`](crate::classify) gives this error.
    pub fn kind(&self) -> FailureKind {
        match self {
            ForwardError::ConnectTimeout { .. } | ForwardError::ResponseTimeout { .. } => {
                FailureKind::Timeout
            }
            ForwardError::Connect { .. } | ForwardError::Transport { .. } => FailureKind::Transport,
            ForwardError::InvalidUpstream { .. } | ForwardError::InvalidRequest(_) => {
                FailureKind::Other
            }
        }
    }

    /// `true` when the request surely never reached the upstream (connect failed or timed
    /// out), so even a non-idempotent request may be sent elsewhere.
    pub fn is_connect(&self) -> bool {
        matches!(
            self,
            ForwardError::Connect { .. } | ForwardError::ConnectTimeout { .. }
        )
    }

    /// The status a proxy should answer with: 504 for timeouts, 502 otherwise, 500 for
    /// configuration errors.
    pub fn status(&self) -> StatusCode {
        match self {
            ForwardError::ConnectTimeout { .. } | ForwardError::ResponseTimeout { .. } => {
                StatusCode::GATEWAY_TIMEOUT
            }
            ForwardError::InvalidUpstream { .. } => StatusCode::INTERNAL_SERVER_ERROR,
            ForwardError::InvalidRequest(_) => StatusCode::BAD_REQUEST,
            ForwardError::Connect { .. } | ForwardError::Transport { .. } => {
                StatusCode::BAD_GATEWAY
            }
        }
    }
}

/// The status a proxy should answer for any error of a stack built from this crate.
///
/// The first error of the crate found in the `source()` chain decides:
/// [`ForwardError::status`]; the balancer's `NoEndpoints` → 502 and `Unavailable` → 503
/// (an upstream failure after retries is decided by its cause); a circuit breaker's
/// `CircuitOpen` → 503. Otherwise timeouts are `504` and everything else `502`. Before
/// all that, a client-caused failure ([`FailureKind::Client`], e.g. its request body
/// broke) is `400`.
pub fn error_status(err: &(dyn StdError + 'static)) -> StatusCode {
    use crate::balance::BalanceError;
    // The client's own request failed (its body broke mid-upload), whatever wrapped the
    // error on the way up: its fault, not the gateway's.
    if error_kind(err) == FailureKind::Client {
        return StatusCode::BAD_REQUEST;
    }
    let mut cur: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(fe) = e.downcast_ref::<ForwardError>() {
            return fe.status();
        }
        match e.downcast_ref::<BalanceError>() {
            Some(BalanceError::NoEndpoints) => return StatusCode::BAD_GATEWAY,
            Some(BalanceError::Unavailable { .. }) => return StatusCode::SERVICE_UNAVAILABLE,
            _ => {}
        }
        if e.is::<crate::breaker::CircuitOpen>() {
            return StatusCode::SERVICE_UNAVAILABLE;
        }
        cur = e.source();
    }
    match error_kind(err) {
        FailureKind::Timeout => StatusCode::GATEWAY_TIMEOUT,
        _ => StatusCode::BAD_GATEWAY,
    }
}

/// A plain-text error response for `err` with the status of [`error_status`]. The body
/// names the failure but not internal addresses.
pub fn error_response(err: &(dyn StdError + 'static)) -> Response<Full<Bytes>> {
    status_response(error_status(err))
}

/// A short plain-text response whose body is the status's reason phrase.
pub fn status_response(status: StatusCode) -> Response<Full<Bytes>> {
    let reason = status.canonical_reason().unwrap_or("error");
    let mut res = Response::new(Full::new(Bytes::from(format!("{reason}\n"))));
    *res.status_mut() = status;
    res.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    res
}
