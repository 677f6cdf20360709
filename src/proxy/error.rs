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
    /// The TLS handshake with an `https://` upstream failed: its certificate does not
    /// verify (unknown issuer, expired, wrong name), it asked for a client certificate we
    /// do not have, or it speaks no TLS. `502`, [`FailureKind::Transport`], and like
    /// [`ForwardError::Connect`] the request never left. There is no plaintext fallback.
    /// The source is the `rustls::Error` when rustls gave one (find it with
    /// `source()`/`downcast_ref`), else the I/O error.
    #[error("TLS handshake with upstream {upstream} failed")]
    Tls {
        /// `host:port` of the upstream.
        upstream: String,
        /// The underlying error.
        #[source]
        source: BoxError,
    },
    /// The HTTP/2 upstream reset the stream or closed the connection (`RST_STREAM` or
    /// `GOAWAY` with an error code, flow-control violations included): `502`,
    /// [`FailureKind::Transport`]. With `REFUSED_STREAM`, or a graceful `GOAWAY`
    /// (`NO_ERROR`) that left the stream out, the upstream guarantees it did not process
    /// the request (RFC 9113 §8.7, §6.8; [`is_refused_stream`](Self::is_refused_stream)),
    /// so it counts as never sent and may be sent again whatever the method.
    #[error("upstream {upstream} reset the HTTP/2 stream (error code {code:#x})")]
    StreamReset {
        /// `host:port` of the upstream.
        upstream: String,
        /// The HTTP/2 error code (RFC 9113 §7), e.g. `0x7` for `REFUSED_STREAM`.
        code: u32,
        /// The upstream did not process the stream.
        refused: bool,
        /// The underlying error.
        #[source]
        source: BoxError,
    },
    /// Every HTTP/2 connection to the upstream had all its streams in use, no further
    /// connection was allowed (`ForwardBuilder::http2_max_connections`), and no stream
    /// came free within the pool's acquire timeout: `503`, [`FailureKind::Client`] (the
    /// proxy's own limit, not the upstream's fault). The request never left, so another
    /// endpoint may take it.
    #[error("no free HTTP/2 stream to upstream {upstream} within {after:?}")]
    PoolTimeout {
        /// `host:port` of the upstream.
        upstream: String,
        /// The acquire timeout that elapsed.
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
            ForwardError::Connect { .. }
            | ForwardError::Tls { .. }
            | ForwardError::StreamReset { .. }
            | ForwardError::Transport { .. } => FailureKind::Transport,
            ForwardError::InvalidUpstream { .. } | ForwardError::InvalidRequest(_) => {
                FailureKind::Other
            }
            ForwardError::ClientBody { .. }
            | ForwardError::ClientBodyTooLarge { .. }
            | ForwardError::ClientBodyTimeout { .. }
            | ForwardError::BadRequest { .. }
            | ForwardError::MethodNotSupported { .. }
            | ForwardError::PoolTimeout { .. }
            | ForwardError::LocalResource { .. } => FailureKind::Client,
        }
    }

    /// `true` when the request surely never reached the upstream (connect failed or timed
    /// out), so even a non-idempotent request may be sent elsewhere. `false` for
    /// [`ForwardError::LocalResource`]: another endpoint would fail the same way.
    pub fn is_connect(&self) -> bool {
        matches!(
            self,
            ForwardError::Connect { .. }
                | ForwardError::ConnectTimeout { .. }
                | ForwardError::Tls { .. }
        )
    }

    /// `true` when an HTTP/2 upstream refused the stream (`REFUSED_STREAM`, or a graceful
    /// `GOAWAY` that left it out): it did not process the request (RFC 9113 §8.7), so it
    /// may be sent again like a failed connect.
    pub fn is_refused_stream(&self) -> bool {
        matches!(self, ForwardError::StreamReset { refused: true, .. })
    }

    /// The status a proxy should answer with: 504 for upstream timeouts, 502 for other
    /// upstream failures, 500 for configuration errors; for the client's faults 400, 408
    /// (idle body), 413 (body too large), 501 (`CONNECT`); 503 when the proxy ran out of
    /// local resources or free HTTP/2 streams.
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
            ForwardError::LocalResource { .. } | ForwardError::PoolTimeout { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ForwardError::Connect { .. }
            | ForwardError::Tls { .. }
            | ForwardError::StreamReset { .. }
            | ForwardError::Transport { .. } => StatusCode::BAD_GATEWAY,
        }
    }
}

impl KnownFailure for ForwardError {
    fn failure_kind(&self) -> FailureKind {
        self.kind()
    }
    fn never_sent(&self) -> bool {
        self.is_connect()
            || self.is_refused_stream()
            || matches!(self, ForwardError::PoolTimeout { .. })
    }
}

impl HttpStatus for ForwardError {
    fn status(&self) -> StatusCode {
        ForwardError::status(self)
    }
}
