use std::time::Duration;

use http::StatusCode;

use crate::classify::FailureKind;
use crate::error::{HttpStatus, KnownFailure};
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

impl KnownFailure for ForwardError {
    fn failure_kind(&self) -> FailureKind {
        self.kind()
    }
    fn never_sent(&self) -> bool {
        self.is_connect()
    }
}

impl HttpStatus for ForwardError {
    fn status(&self) -> StatusCode {
        ForwardError::status(self)
    }
}
