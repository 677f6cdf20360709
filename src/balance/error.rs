use std::time::Duration;

use http::StatusCode;

use crate::error::HttpStatus;
use crate::BoxError;

/// One try got no response head within the balancer's
/// [per-try timeout](super::BalanceBuilder::try_timeout); the try was cancelled.
///
/// Classified as [`FailureKind::Timeout`](crate::classify::FailureKind::Timeout) (its
/// source is a [`tower::timeout::error::Elapsed`]), so passive health counts it, retry acts
/// on it, and [`error_status`](crate::error::error_status) maps it to **504**.
#[derive(Debug, thiserror::Error)]
#[error("endpoint did not answer within the per-try timeout ({after:?})")]
pub struct TryTimeout {
    /// The per-try timeout that elapsed.
    pub after: Duration,
    #[source]
    source: tower::timeout::error::Elapsed,
}

impl TryTimeout {
    pub(crate) fn new(after: Duration) -> Self {
        TryTimeout {
            after,
            source: tower::timeout::error::Elapsed::new(),
        }
    }
}

/// Why the balancer could not answer a request.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BalanceError {
    /// The endpoint set is empty (nothing discovered yet, or every instance left).
    /// Maps to **502 Bad Gateway**, as the seed's registry balancer and nginx's
    /// "no live upstreams" answer.
    #[error("no endpoint in the set")]
    NoEndpoints,
    /// Endpoints exist but none may take the request now: ejected by passive health,
    /// refused by their gate (circuit open), or already tried by this request.
    /// Maps to **503 Service Unavailable**, as HAProxy's "no server available" and Envoy's
    /// "no healthy upstream".
    #[error("no endpoint available ({total} in the set: {ejected} ejected, {refused} refused by their gate)")]
    Unavailable {
        /// Endpoints in the set.
        total: usize,
        /// Ejected by passive health.
        ejected: usize,
        /// Refused by their [`Gate`](crate::gate::Gate).
        refused: usize,
    },
    /// The endpoint service failed on the last try.
    #[error("upstream failed after {tries} tries")]
    Upstream {
        /// How many endpoints were tried.
        tries: u32,
        /// The last endpoint's error.
        #[source]
        source: BoxError,
    },
}

impl BalanceError {
    /// The status a proxy answers with ([`HttpStatus`], callable without importing it).
    pub fn status(&self) -> StatusCode {
        HttpStatus::status(self)
    }
}

/// 502 for an empty set, 503 when none is available, and for an upstream error whatever
/// its cause stands for ([`error_status`](crate::error::error_status): 502, 504 for
/// timeouts, 400/408/413 for the client's body, 503 for local resource exhaustion).
impl HttpStatus for BalanceError {
    fn status(&self) -> StatusCode {
        match self {
            BalanceError::NoEndpoints => StatusCode::BAD_GATEWAY,
            BalanceError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            BalanceError::Upstream { source, .. } => crate::error::error_status(&**source),
        }
    }
}

/// A [`StickyCookie`](super::StickyCookie) could not be configured.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StickyError {
    /// The cookie name is not an RFC 6265 token.
    #[error("invalid cookie name {0:?}")]
    InvalidName(String),
    /// The signing secret is shorter than 16 bytes.
    #[error("sticky cookie secret too short ({0} bytes, need at least 16)")]
    ShortSecret(usize),
    /// An attribute contains `;`, `,`, spaces or control characters.
    #[error("invalid cookie {0} attribute")]
    InvalidAttribute(&'static str),
}

/// The balancer could not be started.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// [`BalanceBuilder::spawn`](super::BalanceBuilder::spawn) was called outside a tokio runtime.
    #[error("no tokio runtime to spawn the discovery driver on")]
    NoRuntime,
}
