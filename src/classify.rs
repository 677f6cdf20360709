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
use std::str::FromStr;

use http::{HeaderMap, Request, Response, StatusCode};

mod grpc;

use grpc::GrpcBits;
pub use grpc::{
    grpc_code_name, grpc_status, LateOutcomes, StreamEnd, Trailers, TrailersBody, TrailersFuture,
    TrailersLayer, GRPC_CODE_NAMES, GRPC_INTERNAL, GRPC_UNKNOWN,
};

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

/// A set of status codes (100..=999) as a bitset: membership is one shift and one AND.
#[derive(Clone, Copy, Default, PartialEq, Eq)]
struct StatusBits([u64; 16]);

impl StatusBits {
    fn insert(&mut self, code: u16) {
        let c = code as usize;
        self.0[c / 64] |= 1 << (c % 64);
    }
    fn insert_class(&mut self, class: u16) {
        for c in class * 100..class * 100 + 100 {
            self.insert(c);
        }
    }
    fn contains(&self, code: u16) -> bool {
        let c = code as usize;
        c < 1024 && self.0[c / 64] & (1 << (c % 64)) != 0
    }
    fn is_empty(&self) -> bool {
        self.0.iter().all(|w| *w == 0)
    }
    fn codes(&self) -> impl Iterator<Item = u16> + '_ {
        (100u16..1000).filter(|c| self.contains(*c))
    }
}

/// Which errors a [`Condition`] counts as failures.
#[derive(Clone, Copy, Default, PartialEq, Eq)]
struct ErrorBits {
    transport: bool,
    timeout: bool,
    other: bool,
}

/// A declarative failure condition: statuses, status classes, and error kinds.
///
/// Text form (comma separated, case-insensitive, as STON's `Condition` attribute):
///
/// | token | matches |
/// |---|---|
/// | `404` | exactly that status (100-999) |
/// | `4xx`, `5xx` | the whole status class (1xx-9xx) |
/// | `transport` | connection refused/reset, protocol errors |
/// | `timeout` | connect or response timeout |
/// | `error` | any other error of the inner service |
/// | `fail` | `transport` + `timeout` + `error`: the hop failed without a response |
/// | `grpc:unavailable`, `grpc:14` | that gRPC status (by name or number), from `grpc-status` in the head or the trailers |
/// | `grpc:5xx` | the gRPC codes that map to a 5xx: `unknown`, `deadline_exceeded`, `unimplemented`, `internal`, `unavailable`, `data_loss` |
///
/// A gRPC status in the response head (a trailers-only answer) is classified at once; in
/// the trailers, the classification is deferred to the end of the body
/// ([`Classifier::defers_to_trailers`], run by [`TrailersLayer`]). A gRPC stream that ends
/// without a status counts as `internal`, an unreadable status as `unknown`, as a gRPC
/// client reports them.
///
/// Statuses given to [`Condition::ignore_status`] classify as [`Outcome::Ignored`]; they win
/// over the failure statuses. Everything else is [`Outcome::Success`].
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub struct Condition {
    fail: StatusBits,
    ignore: StatusBits,
    errors: ErrorBits,
    grpc: GrpcBits,
}

impl Condition {
    /// A condition that matches nothing: every response and error is a success.
    pub fn never() -> Self {
        Self::default()
    }

    /// nginx's and Envoy's usual default: `5xx,fail`.
    pub fn server_errors_and_failures() -> Self {
        Self::never().status_class(5).any_error()
    }

    /// Count this exact status as a failure.
    ///
    /// # Panics
    /// Never: a `StatusCode` is always 100..=999.
    pub fn status(mut self, status: StatusCode) -> Self {
        self.fail.insert(status.as_u16());
        self
    }

    /// Count a whole class as failures: `status_class(5)` is `5xx`. Classes outside 1..=9
    /// are ignored.
    pub fn status_class(mut self, class: u8) -> Self {
        if (1..=9).contains(&class) {
            self.fail.insert_class(u16::from(class));
        }
        self
    }

    /// Classify this status as [`Outcome::Ignored`].
    pub fn ignore_status(mut self, status: StatusCode) -> Self {
        self.ignore.insert(status.as_u16());
        self
    }

    /// Count the gRPC status `code` (0-16; see [`GRPC_CODE_NAMES`]) as a failure.
    pub fn grpc_code(mut self, code: u8) -> Self {
        self.grpc.insert(code);
        self
    }

    /// Count the gRPC codes that map to a 5xx as failures (`grpc:5xx`).
    pub fn grpc_server_errors(mut self) -> Self {
        self.grpc.0 |= grpc::SERVER_CODES.0;
        self
    }

    /// Classify a response head: its status, then (when the condition names gRPC codes) a
    /// `grpc-status` header of a trailers-only gRPC answer.
    pub fn classify_head(&self, status: StatusCode, headers: &HeaderMap) -> Outcome {
        let by_status = self.classify_status(status);
        if by_status != Outcome::Success || self.grpc.is_empty() {
            return by_status;
        }
        match grpc_status(headers) {
            Some(code) if self.grpc.contains(code) => Outcome::Failure(FailureKind::Grpc(code)),
            _ => Outcome::Success,
        }
    }

    /// `true` when this condition must wait for the trailers of `res`: it names gRPC
    /// codes, and `res` is a gRPC `200` without `grpc-status` in its head.
    pub fn defers_to_trailers_of(&self, status: StatusCode, headers: &HeaderMap) -> bool {
        !self.grpc.is_empty()
            && status == StatusCode::OK
            && grpc::is_grpc(headers)
            && !headers.contains_key("grpc-status")
    }

    /// Classify the end of a deferred gRPC response body.
    pub fn classify_stream_end(&self, end: StreamEnd<'_>) -> Outcome {
        let code = match end {
            StreamEnd::Error(e) => return self.classify_error_ref(e),
            StreamEnd::Trailers(t) => grpc_status(t).unwrap_or(GRPC_INTERNAL),
            StreamEnd::NoTrailers => GRPC_INTERNAL,
        };
        if self.grpc.contains(code) {
            Outcome::Failure(FailureKind::Grpc(code))
        } else {
            Outcome::Success
        }
    }

    /// Count transport errors (refused, reset, protocol) as failures.
    pub fn transport_errors(mut self) -> Self {
        self.errors.transport = true;
        self
    }

    /// Count timeouts as failures.
    pub fn timeouts(mut self) -> Self {
        self.errors.timeout = true;
        self
    }

    /// Count every error (transport, timeout, other) as a failure: STON's `fail`.
    pub fn any_error(mut self) -> Self {
        self.errors = ErrorBits {
            transport: true,
            timeout: true,
            other: true,
        };
        self
    }

    /// The union of two conditions.
    pub fn or(mut self, other: Condition) -> Self {
        for i in 0..16 {
            self.fail.0[i] |= other.fail.0[i];
            self.ignore.0[i] |= other.ignore.0[i];
        }
        self.errors.transport |= other.errors.transport;
        self.errors.timeout |= other.errors.timeout;
        self.errors.other |= other.errors.other;
        self.grpc.0 |= other.grpc.0;
        self
    }

    /// `true` when the condition matches no status and no error.
    pub fn is_never(&self) -> bool {
        self.fail.is_empty() && self.errors == ErrorBits::default() && self.grpc.is_empty()
    }

    /// Classify a status code directly.
    pub fn classify_status(&self, status: StatusCode) -> Outcome {
        let code = status.as_u16();
        if self.ignore.contains(code) {
            Outcome::Ignored
        } else if self.fail.contains(code) {
            Outcome::Failure(FailureKind::Status(status))
        } else {
            Outcome::Success
        }
    }

    /// Classify an error directly (see [`error_kind`]).
    pub fn classify_error_ref(&self, err: &(dyn StdError + 'static)) -> Outcome {
        let kind = error_kind(err);
        let counted = match kind {
            FailureKind::Transport => self.errors.transport,
            FailureKind::Timeout => self.errors.timeout,
            FailureKind::Other | FailureKind::Status(_) | FailureKind::Grpc(_) => self.errors.other,
            // Never the upstream's fault: neither a success nor a failure of it.
            FailureKind::Client => return Outcome::Ignored,
        };
        if counted {
            Outcome::Failure(kind)
        } else {
            Outcome::Success
        }
    }
}

impl Classify for Condition {
    type Classifier = Condition;
    #[inline]
    fn classify_request<B>(&self, _req: &Request<B>) -> Condition {
        *self
    }
}

impl Classifier for Condition {
    #[inline]
    fn classify_response<B>(self, res: &Response<B>) -> Outcome {
        self.classify_head(res.status(), res.headers())
    }
    fn classify_error(self, err: &(dyn StdError + 'static)) -> Outcome {
        self.classify_error_ref(err)
    }
    #[inline]
    fn defers_to_trailers<B>(&self, res: &Response<B>) -> bool {
        self.defers_to_trailers_of(res.status(), res.headers())
    }
    fn classify_end(self, end: StreamEnd<'_>) -> Outcome {
        self.classify_stream_end(end)
    }
}

/// One [`Condition`] shared by many layers (or many clones of one) by reference: each
/// request's classifier is then a pointer instead of a copy of the status bitsets. The
/// chain's links use it.
impl Classify for std::sync::Arc<Condition> {
    type Classifier = std::sync::Arc<Condition>;
    #[inline]
    fn classify_request<B>(&self, _req: &Request<B>) -> Self::Classifier {
        self.clone()
    }
}

impl Classifier for std::sync::Arc<Condition> {
    #[inline]
    fn classify_response<B>(self, res: &Response<B>) -> Outcome {
        self.classify_head(res.status(), res.headers())
    }
    fn classify_error(self, err: &(dyn StdError + 'static)) -> Outcome {
        self.classify_error_ref(err)
    }
    #[inline]
    fn defers_to_trailers<B>(&self, res: &Response<B>) -> bool {
        self.defers_to_trailers_of(res.status(), res.headers())
    }
    fn classify_end(self, end: StreamEnd<'_>) -> Outcome {
        self.classify_stream_end(end)
    }
}

impl fmt::Debug for Condition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Condition({self})")
    }
}

impl fmt::Display for Condition {
    /// Prints the canonical text form; it parses back to an equal condition.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts: Vec<String> = Vec::new();
        let mut class_done = [false; 10];
        for class in 1u16..=9 {
            if (class * 100..class * 100 + 100).all(|c| self.fail.contains(c)) {
                parts.push(format!("{class}xx"));
                class_done[class as usize] = true;
            }
        }
        for c in self.fail.codes() {
            if !class_done[(c / 100) as usize] {
                parts.push(c.to_string());
            }
        }
        let e = self.errors;
        if e.transport && e.timeout && e.other {
            parts.push("fail".into());
        } else {
            if e.transport {
                parts.push("transport".into());
            }
            if e.timeout {
                parts.push("timeout".into());
            }
            if e.other {
                parts.push("error".into());
            }
        }
        parts.extend(self.grpc.tokens());
        for c in self.ignore.codes() {
            parts.push(format!("!{c}"));
        }
        f.write_str(&parts.join(","))
    }
}

/// A [`Condition`] text that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid condition token {token:?}: expected a status (404), a class (5xx), `fail`, `transport`, `timeout`, `error`, `grpc:<code name or number>`, `grpc:5xx`, or `!404` to ignore a status")]
pub struct ParseConditionError {
    /// The token that was refused.
    pub token: String,
}

impl FromStr for Condition {
    type Err = ParseConditionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut cond = Condition::never();
        let bad = |t: &str| ParseConditionError {
            token: t.to_string(),
        };
        let mut any = false;
        for raw in s.split(',') {
            let t = raw.trim();
            if t.is_empty() {
                continue;
            }
            any = true;
            let lower = t.to_ascii_lowercase();
            match lower.as_str() {
                "fail" => cond = cond.any_error(),
                "transport" => cond = cond.transport_errors(),
                "timeout" => cond = cond.timeouts(),
                "error" => cond.errors.other = true,
                _ if lower.starts_with("grpc:") => {
                    let bits =
                        GrpcBits::parse_token(&lower["grpc:".len()..]).ok_or_else(|| bad(t))?;
                    cond.grpc.0 |= bits.0;
                }
                _ => {
                    let (ignore, body) = match lower.strip_prefix('!') {
                        Some(rest) => (true, rest),
                        None => (false, lower.as_str()),
                    };
                    let b = body.as_bytes();
                    if b.len() == 3 && b[1..] == *b"xx" && (b'1'..=b'9').contains(&b[0]) && !ignore
                    {
                        cond = cond.status_class(b[0] - b'0');
                    } else {
                        let code = StatusCode::from_str(body).map_err(|_| bad(t))?;
                        cond = if ignore {
                            cond.ignore_status(code)
                        } else {
                            cond.status(code)
                        };
                    }
                }
            }
        }
        if !any {
            return Err(bad(s));
        }
        Ok(cond)
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

    fn res(code: u16) -> Response<()> {
        Response::builder().status(code).body(()).unwrap()
    }

    fn classify(c: &Condition, code: u16) -> Outcome {
        c.classify_request(&Request::new(()))
            .classify_response(&res(code))
    }

    #[test]
    fn exact_status_set() {
        let c: Condition = "403, 404".parse().unwrap();
        assert!(classify(&c, 404).is_failure());
        assert!(classify(&c, 403).is_failure());
        assert_eq!(classify(&c, 405), Outcome::Success);
        assert_eq!(classify(&c, 200), Outcome::Success);
    }

    #[test]
    fn status_classes() {
        let c: Condition = "4xx".parse().unwrap();
        for code in [400, 404, 451, 499] {
            assert!(classify(&c, code).is_failure(), "{code}");
        }
        assert_eq!(classify(&c, 500), Outcome::Success);
        assert_eq!(classify(&c, 399), Outcome::Success);
        let c: Condition = "5XX".parse().unwrap();
        assert!(classify(&c, 503).is_failure());
        assert_eq!(classify(&c, 404), Outcome::Success);
    }

    #[test]
    fn ignored_wins_over_failure() {
        let c: Condition = "5xx,!503".parse().unwrap();
        assert_eq!(classify(&c, 503), Outcome::Ignored);
        assert!(classify(&c, 502).is_failure());
    }

    #[test]
    fn errors_by_kind() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let timed_out = std::io::Error::from(std::io::ErrorKind::TimedOut);
        let other = std::io::Error::other("boom");
        let elapsed = tower::timeout::error::Elapsed::new();

        let transport_only: Condition = "transport".parse().unwrap();
        assert_eq!(
            transport_only.classify_error_ref(&refused),
            Outcome::Failure(FailureKind::Transport)
        );
        assert_eq!(
            transport_only.classify_error_ref(&timed_out),
            Outcome::Success
        );
        assert_eq!(
            transport_only.classify_error_ref(&elapsed),
            Outcome::Success
        );

        let timeout_only: Condition = "timeout".parse().unwrap();
        assert_eq!(
            timeout_only.classify_error_ref(&elapsed),
            Outcome::Failure(FailureKind::Timeout)
        );
        assert_eq!(
            timeout_only.classify_error_ref(&timed_out),
            Outcome::Failure(FailureKind::Timeout)
        );
        assert_eq!(timeout_only.classify_error_ref(&refused), Outcome::Success);

        let fail: Condition = "fail".parse().unwrap();
        assert_eq!(
            fail.classify_error_ref(&other),
            Outcome::Failure(FailureKind::Other)
        );
        assert!(fail.classify_error_ref(&refused).is_failure());
        // A response is never an error.
        assert_eq!(classify(&fail, 500), Outcome::Success);
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
    fn combination_and_round_trip() {
        let c: Condition = "404,5xx,fail".parse().unwrap();
        assert!(classify(&c, 404).is_failure());
        assert!(classify(&c, 500).is_failure());
        assert_eq!(classify(&c, 403), Outcome::Success);
        assert_eq!(c.to_string(), "5xx,404,fail");
        let back: Condition = c.to_string().parse().unwrap();
        assert_eq!(back, c);
        let or = Condition::never()
            .status(StatusCode::NOT_FOUND)
            .or(Condition::never().timeouts());
        assert_eq!(or.to_string(), "404,timeout");
        assert_eq!(or, "404,timeout".parse().unwrap());
    }

    #[test]
    fn parse_errors_name_the_token() {
        for bad in ["", " , ", "4x", "1000", "abc", "0xx", "!4xx", "99"] {
            let err = bad.parse::<Condition>().unwrap_err();
            assert!(err.to_string().contains("invalid condition token"), "{bad}");
        }
        let err = "404,nope".parse::<Condition>().unwrap_err();
        assert_eq!(err.token, "nope");
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

    #[test]
    fn never_and_defaults() {
        assert!(Condition::never().is_never());
        let d = Condition::server_errors_and_failures();
        assert_eq!(d.to_string(), "5xx,fail");
        assert!(!d.is_never());
    }
}
