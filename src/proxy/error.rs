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
    /// The client's request body could not be read (aborted upload, malformed chunked
    /// encoding): the client's fault, answered `400`, classified
    /// [`FailureKind::Client`] so it is never charged to the upstream.
    #[error("reading the client's request body failed")]
    ClientBody {
        /// The underlying error.
        #[source]
        source: BoxError,
    },
    /// The client's request body is larger than the configured limit
    /// ([`BodyLimits::max_bytes`](super::BodyLimits::max_bytes)): `413`, [`FailureKind::Client`].
    #[error("request body larger than {limit} bytes")]
    ClientBodyTooLarge {
        /// The limit in bytes.
        limit: u64,
    },
    /// The client sent no body data for the idle timeout
    /// ([`BodyLimits::idle_timeout`](super::BodyLimits::idle_timeout)): `408`,
    /// [`FailureKind::Client`].
    #[error("no request-body data from the client for {after:?}")]
    ClientBodyTimeout {
        /// The timeout that elapsed.
        after: Duration,
    },
    /// The request is malformed in a way a proxy must not pass on (two `Host` headers, a
    /// `Host` that disagrees with an absolute-form target): `400`, [`FailureKind::Client`].
    #[error("bad request: {reason}")]
    BadRequest {
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The method cannot be forwarded (`CONNECT`: this proxy does not tunnel): `501`,
    /// [`FailureKind::Client`].
    #[error("method {method} is not supported by this proxy")]
    MethodNotSupported {
        /// The refused method.
        method: http::Method,
    },
    /// Connecting failed because the proxy itself ran out of a local resource (file
    /// descriptors, socket buffers, memory; see
    /// [`is_local_resource_error`](crate::classify::is_local_resource_error)): `503`,
    /// [`FailureKind::Client`], never charged to the upstream.
    #[error("no local resources to connect to upstream {upstream}")]
    LocalResource {
        /// `host:port` of the upstream.
        upstream: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
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
            ForwardError::ClientBody { .. }
            | ForwardError::ClientBodyTooLarge { .. }
            | ForwardError::ClientBodyTimeout { .. }
            | ForwardError::BadRequest { .. }
            | ForwardError::MethodNotSupported { .. }
            | ForwardError::LocalResource { .. } => FailureKind::Client,
        }
    }

    /// `true` when the request surely never reached the upstream (connect failed or timed
    /// out), so even a non-idempotent request may be sent elsewhere. `false` for
    /// [`ForwardError::LocalResource`]: another endpoint would fail the same way.
    pub fn is_connect(&self) -> bool {
        matches!(
            self,
            ForwardError::Connect { .. } | ForwardError::ConnectTimeout { .. }
        )
    }

    /// The status a proxy should answer with: 504 for upstream timeouts, 502 for other
    /// upstream failures, 500 for configuration errors; for the client's faults 400, 408
    /// (idle body), 413 (body too large), 501 (`CONNECT`); 503 when the proxy ran out of
    /// local resources.
    pub fn status(&self) -> StatusCode {
        match self {
            ForwardError::ConnectTimeout { .. } | ForwardError::ResponseTimeout { .. } => {
                StatusCode::GATEWAY_TIMEOUT
            }
            ForwardError::InvalidUpstream { .. } => StatusCode::INTERNAL_SERVER_ERROR,
            ForwardError::InvalidRequest(_)
            | ForwardError::ClientBody { .. }
            | ForwardError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ForwardError::ClientBodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ForwardError::ClientBodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            ForwardError::MethodNotSupported { .. } => StatusCode::NOT_IMPLEMENTED,
            ForwardError::LocalResource { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ForwardError::Connect { .. } | ForwardError::Transport { .. } => {
                StatusCode::BAD_GATEWAY
            }
        }
    }
}

/// The status a proxy should answer for any error of a stack built from this crate.
///
/// The first error of the crate found in the `source()` chain decides:
/// [`ForwardError::status`]; a client body failure while a replay layer buffered it
/// ([`ReplayError`](crate::body::ReplayError)) → 400, or 408/413 past the server's
/// [`BodyLimits`](super::BodyLimits); the balancer's `NoEndpoints` → 502 and `Unavailable` → 503
/// (an upstream failure after retries is decided by its cause); a circuit breaker's
/// `CircuitOpen` → 503. Otherwise timeouts are `504` and everything else `502`.
pub fn error_status(err: &(dyn StdError + 'static)) -> StatusCode {
    use crate::balance::BalanceError;
    let mut cur: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(fe) = e.downcast_ref::<ForwardError>() {
            return fe.status();
        }
        if let Some(status) = super::body::client_fault_status(e) {
            return status;
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
        // Outside a ForwardError only local resource exhaustion (an io error) is Client.
        FailureKind::Client => StatusCode::SERVICE_UNAVAILABLE,
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
