//! Failure classification shared by every pattern.
//!
//! The content chain needs to know when to hop to the next link, the circuit breaker when a
//! call failed, and the balancer when an endpoint is unhealthy. All three answer the same
//! question — *was this response (or error) a failure?* — so it is configured once, here.
//!
//! The shape follows tower-http's classification: a [`Classify`] value is asked, per
//! request, for a [`Classifier`]; that classifier is then given either the response or the
//! error of that request and returns an [`Outcome`]:
//!
//! | outcome | meaning |
//! |---|---|
//! | [`Outcome::Success`] | counts as a success |
//! | [`Outcome::Failure`] | counts as a failure of the given [`FailureKind`] |
//! | [`Outcome::Ignored`] | counts as neither (e.g. a client cancellation for a breaker) |
//!
//! The ready-made [`Condition`] covers what STON's `<VhostLink Condition=...>` and nginx's
//! `proxy_next_upstream` express: exact statuses, status classes, transport errors and
//! timeouts, in any combination, and parses from the same compact text:
//!
//! ```
//! use tower_patterns::classify::{Classify, Classifier, Condition, FailureKind, Outcome};
//!
//! let cond: Condition = "404,5xx,fail".parse().unwrap();
//! let req = http::Request::new(());
//! let res = http::Response::builder().status(503).body(()).unwrap();
//! assert_eq!(
//!     cond.classify_request(&req).classify_response(&res),
//!     Outcome::Failure(FailureKind::Status(http::StatusCode::SERVICE_UNAVAILABLE)),
//! );
//! ```

use std::error::Error as StdError;
use std::fmt;

use http::{Request, Response, StatusCode};

mod condition;
mod grpc;
mod late;
mod statuses;

pub use condition::{Condition, ParseConditionError};
pub use grpc::{grpc_code_name, grpc_status, GRPC_CODE_NAMES, GRPC_INTERNAL, GRPC_UNKNOWN};
pub use late::{LateOutcomes, StreamEnd, Trailers, TrailersBody, TrailersFuture, TrailersLayer};

/// What kind of failure a call had.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureKind {
    /// The response had a status the classifier counts as a failure.
    Status(StatusCode),
    /// The connection could not be made or broke (refused, reset, protocol error).
    Transport,
    /// A connect or response timeout elapsed.
    Timeout,
    /// Any other error returned by the inner service.
    Other,
    /// A gRPC call ended with this `grpc-status` code (see [`grpc_code_name`]), from the
    /// response head or its trailers.
    Grpc(u8),
    /// Not the upstream's fault: the client's request body broke or was too large, or the
    /// proxy itself ran out of a local resource (file descriptors, memory). Classified as
    /// [`Outcome::Ignored`], so passive health, the breaker and retries never charge it to
    /// an upstream.
    Client,
}

impl FailureKind {
    /// `true` when the failure says something about the upstream (everything but
    /// [`FailureKind::Client`]).
    pub fn is_upstream_fault(&self) -> bool {
        !matches!(self, FailureKind::Client)
    }
}

impl fmt::Display for FailureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FailureKind::Status(s) => write!(f, "status {}", s.as_u16()),
            FailureKind::Transport => f.write_str("transport error"),
            FailureKind::Timeout => f.write_str("timeout"),
            FailureKind::Other => f.write_str("error"),
            FailureKind::Grpc(c) => match grpc_code_name(*c) {
                Some(name) => write!(f, "grpc status {c} ({name})"),
                None => write!(f, "grpc status {c}"),
            },
            FailureKind::Client => f.write_str("client or local error"),
        }
    }
}

/// The result of classifying one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The call succeeded.
    Success,
    /// The call failed.
    Failure(FailureKind),
    /// The call neither succeeded nor failed as far as the caller's statistics go.
    Ignored,
}

impl Outcome {
    /// `true` for [`Outcome::Failure`].
    pub fn is_failure(&self) -> bool {
        matches!(self, Outcome::Failure(_))
    }
}

/// Makes a [`Classifier`] for each request (tower-http's `MakeClassifier`).
///
/// Per-request classifiers let the decision depend on the request, e.g. "a 404 is a failure
/// for `GET /assets/*` only".
pub trait Classify: Clone + Send + Sync + 'static {
    /// The classifier for one request.
    type Classifier: Classifier;
    /// Look at the request before it is sent and return its classifier.
    fn classify_request<B>(&self, req: &Request<B>) -> Self::Classifier;
}

/// Classifies the response or the error of one request.
pub trait Classifier: Send + 'static {
    /// Classify a response that arrived.
    fn classify_response<B>(self, res: &Response<B>) -> Outcome;
    /// Classify an error returned instead of a response.
    fn classify_error(self, err: &(dyn StdError + 'static)) -> Outcome;

    /// `true` when this response's outcome is known only at the end of its body (a gRPC
    /// response whose `grpc-status` comes in the trailers). The caller then does not call
    /// [`classify_response`](Self::classify_response) but waits for the end (see
    /// [`LateOutcomes`]) and calls [`classify_end`](Self::classify_end). Default: never.
    fn defers_to_trailers<B>(&self, _res: &Response<B>) -> bool {
        false
    }

    /// Classify a deferred response at the end of its body. Default: a success.
    fn classify_end(self, _end: StreamEnd<'_>) -> Outcome
    where
        Self: Sized,
    {
        Outcome::Success
    }
}

/// Finds the [`FailureKind`] of an error by walking its `source()` chain.
///
/// Recognises this crate's own errors ([`KnownFailure`](crate::error::KnownFailure)), tower
/// and tokio timeouts, `std::io` errors (local resource exhaustion such as `EMFILE` is
/// [`FailureKind::Client`], see [`is_local_resource_error`]), and hyper/hyper-util client
/// errors. Anything else is [`FailureKind::Other`].
pub fn error_kind(err: &(dyn StdError + 'static)) -> FailureKind {
    let mut cur: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(k) = crate::error::as_known_failure(e) {
            return k.failure_kind();
        }
        if e.is::<tower::timeout::error::Elapsed>() || e.is::<tokio::time::error::Elapsed>() {
            return FailureKind::Timeout;
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return io_kind(io);
        }
        if let Some(h) = e.downcast_ref::<hyper::Error>() {
            if h.is_timeout() {
                return FailureKind::Timeout;
            }
            // Keep looking: an io::Error below may say "timed out".
            if h.source().is_none() {
                return FailureKind::Transport;
            }
        }
        if let Some(c) = e.downcast_ref::<hyper_util::client::legacy::Error>() {
            if c.is_connect() {
                // The io error below tells timeout from refusal; default to transport.
                return match c.source() {
                    Some(s) => match error_kind(s) {
                        FailureKind::Timeout => FailureKind::Timeout,
                        _ => FailureKind::Transport,
                    },
                    None => FailureKind::Transport,
                };
            }
        }
        cur = e.source();
    }
    // A hyper error with an unrecognised source is still a transport failure.
    let mut cur: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = cur {
        if e.is::<hyper::Error>() || e.is::<hyper_util::client::legacy::Error>() {
            return FailureKind::Transport;
        }
        cur = e.source();
    }
    FailureKind::Other
}

/// `true` when `err` (or its `source()` chain) shows the request surely never reached the
/// upstream — connecting failed or timed out — so even a non-idempotent request may be sent
/// elsewhere (nginx retries `POST` only in this case).
///
/// Recognises this crate's own errors ([`KnownFailure::never_sent`](crate::error::KnownFailure::never_sent)), hyper-util client connect
/// errors, and a refused `std::io` connection.
pub fn is_connect_error(err: &(dyn StdError + 'static)) -> bool {
    let mut cur: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(k) = crate::error::as_known_failure(e) {
            return k.never_sent();
        }
        if let Some(c) = e.downcast_ref::<hyper_util::client::legacy::Error>() {
            if c.is_connect() {
                return true;
            }
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return io.kind() == std::io::ErrorKind::ConnectionRefused;
        }
        cur = e.source();
    }
    false
}

/// The one rule for "may this request be sent again" (the chain's next hop, the
/// balancer's retry on the next endpoint): an idempotent method, or one the configuration
/// allows anyway (nginx `non_idempotent`), or a request that surely never left
/// ([`is_connect_error`]). Whether the *body* can be sent again is the replay buffer's
/// question, asked separately.
pub(crate) fn may_send_again(
    idempotent: bool,
    allow_non_idempotent: bool,
    never_sent: bool,
) -> bool {
    idempotent || allow_non_idempotent || never_sent
}

/// `true` when `io` says the proxy itself ran out of a local resource: file descriptors
/// (`EMFILE`, `ENFILE`), socket buffers (`ENOBUFS`) or memory (`ENOMEM`).
///
/// Such an error on connect or accept says nothing about the upstream or the client, so
/// [`error_kind`] classifies it [`FailureKind::Client`] (never charged to an upstream), the
/// proxy answers `503`, and the accept loop of [`server`](crate::server) backs off.
pub fn is_local_resource_error(io: &std::io::Error) -> bool {
    if io.kind() == std::io::ErrorKind::OutOfMemory {
        return true;
    }
    #[cfg(unix)]
    if let Some(code) = io.raw_os_error() {
        return matches!(
            code,
            libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM
        );
    }
    false
}

fn io_kind(io: &std::io::Error) -> FailureKind {
    use std::io::ErrorKind::*;
    if is_local_resource_error(io) {
        return FailureKind::Client;
    }
    match io.kind() {
        TimedOut => FailureKind::Timeout,
        ConnectionRefused | ConnectionReset | ConnectionAborted | NotConnected | BrokenPipe
        | UnexpectedEof | AddrNotAvailable | HostUnreachable | NetworkUnreachable => {
            FailureKind::Transport
        }
        _ => FailureKind::Other,
    }
}

/// Adapts a closure over the request head into a per-request [`Classify`]: the condition
/// may depend on the method, URI or headers.
///
/// ```
/// use tower_patterns::classify::{classify_fn, Classify, Classifier, Condition};
///
/// // 404 is a failure only under /assets.
/// let c = classify_fn(|_m: &http::Method, uri: &http::Uri, _h: &http::HeaderMap| {
///     if uri.path().starts_with("/assets") {
///         Condition::never().status(http::StatusCode::NOT_FOUND)
///     } else {
///         Condition::never()
///     }
/// });
/// let req = http::Request::get("/assets/a.png").body(()).unwrap();
/// let res = http::Response::builder().status(404).body(()).unwrap();
/// assert!(c.classify_request(&req).classify_response(&res).is_failure());
/// ```
pub fn classify_fn<F>(f: F) -> ClassifyFn<F>
where
    F: Fn(&http::Method, &http::Uri, &http::HeaderMap) -> Condition + Clone + Send + Sync + 'static,
{
    ClassifyFn { f }
}

/// See [`classify_fn`].
#[derive(Clone)]
pub struct ClassifyFn<F> {
    f: F,
}

impl<F> fmt::Debug for ClassifyFn<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClassifyFn")
    }
}

impl<F> Classify for ClassifyFn<F>
where
    F: Fn(&http::Method, &http::Uri, &http::HeaderMap) -> Condition + Clone + Send + Sync + 'static,
{
    type Classifier = Condition;
    fn classify_request<B>(&self, req: &Request<B>) -> Condition {
        (self.f)(req.method(), req.uri(), req.headers())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    #[test]
    fn local_resource_exhaustion_is_never_charged_to_an_upstream() {
        for code in [libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::ENOMEM] {
            let io = std::io::Error::from_raw_os_error(code);
            assert!(is_local_resource_error(&io), "{io}");
            assert_eq!(error_kind(&io), FailureKind::Client, "{io}");
            // Even a condition counting every error ignores it.
            let fail: Condition = "fail".parse().unwrap();
            assert_eq!(fail.classify_error_ref(&io), Outcome::Ignored, "{io}");
        }
        // Refusal stays the upstream's fault.
        let refused = std::io::Error::from_raw_os_error(libc::ECONNREFUSED);
        assert!(!is_local_resource_error(&refused));
        assert_eq!(error_kind(&refused), FailureKind::Transport);
    }

    #[test]
    fn error_kind_walks_the_source_chain() {
        #[derive(Debug, thiserror::Error)]
        #[error("wrapped")]
        struct Wrapped(#[source] std::io::Error);
        let e = Wrapped(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert_eq!(error_kind(&e), FailureKind::Transport);
        let boxed: crate::BoxError = Box::new(Wrapped(std::io::ErrorKind::TimedOut.into()));
        assert_eq!(error_kind(&*boxed), FailureKind::Timeout);
    }

    #[test]
    fn connect_errors_are_told_from_errors_after_sending() {
        use crate::proxy::ForwardError;
        let refused = ForwardError::Connect {
            upstream: "127.0.0.1:1".into(),
            source: Box::new(std::io::Error::from(std::io::ErrorKind::ConnectionRefused)),
        };
        let timed_out = ForwardError::ConnectTimeout {
            upstream: "127.0.0.1:1".into(),
        };
        let after_sending = ForwardError::Transport {
            upstream: "127.0.0.1:1".into(),
            source: Box::new(std::io::Error::from(std::io::ErrorKind::ConnectionReset)),
        };
        assert!(is_connect_error(&refused));
        assert!(is_connect_error(&timed_out));
        assert!(!is_connect_error(&after_sending));
        // Found through wrappers too; a bare refused io error never carried a request.
        let boxed: crate::BoxError = Box::new(refused);
        assert!(is_connect_error(&*boxed));
        assert!(is_connect_error(&std::io::Error::from(
            std::io::ErrorKind::ConnectionRefused
        )));
        assert!(!is_connect_error(&std::io::Error::from(
            std::io::ErrorKind::ConnectionReset
        )));
    }
}
