//! Retry on the next endpoint (nginx `proxy_next_upstream`).

use std::time::Duration;

use bytes::Bytes;
use http::Method;
use http_body_util::{Empty, Full};

use crate::body::ReplayBody;
use crate::classify::Condition;

/// When a failed request is sent again to another endpoint.
///
/// | failure | retried when |
/// |---|---|
/// | connect error (refused, connect timeout): nothing was sent | always, any method |
/// | error or status matching [`on`](Retry::on) (default `fail`: transport errors and timeouts) | the method is idempotent (GET, HEAD, OPTIONS, TRACE, PUT, DELETE), or [`non_idempotent`](Retry::non_idempotent) is set |
/// | no response head within the balancer's [per-try timeout](super::BalanceBuilder::try_timeout) (a timeout) | as the row above |
/// | client-caused failure ([`FailureKind::Client`](crate::classify::FailureKind::Client)) | never |
///
/// and in every case only if the body can be sent again ([`CloneBody`]), fewer than
/// [`tries`](Retry::tries) endpoints were tried, the time since the first try is under
/// [`timeout`](Retry::timeout), and an untried endpoint is available. Otherwise the last
/// response or error is returned as is.
///
/// The copy kept for the next try is made only when one could follow: tries left, and
/// an untried endpoint in the set at dispatch or a
/// [`queue_timeout`](super::BalanceBuilder::queue_timeout) to wait for one. A request to
/// the only endpoint of a set without a queue is not copied (and so not retried on an
/// endpoint that joins while it is in flight).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retry {
    pub(crate) tries: u32,
    pub(crate) timeout: Option<Duration>,
    pub(crate) on: Condition,
    pub(crate) non_idempotent: bool,
}

impl Default for Retry {
    /// 3 tries, no time limit, on transport errors and timeouts (nginx's `error timeout`),
    /// idempotent methods only (plus connect errors for any method).
    fn default() -> Self {
        Retry {
            tries: 3,
            timeout: None,
            on: Condition::never().any_error(),
            non_idempotent: false,
        }
    }
}

impl Retry {
    /// No retry at all: one endpoint per request.
    pub fn never() -> Self {
        Retry {
            tries: 1,
            ..Self::default()
        }
    }

    /// Endpoints tried per request, the first included (nginx `proxy_next_upstream_tries`;
    /// 0 is taken as 1).
    pub fn tries(mut self, n: u32) -> Self {
        self.tries = n.max(1);
        self
    }

    /// No new try starts later than this after the first (nginx `proxy_next_upstream_timeout`).
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = Some(t);
        self
    }

    /// What else than a connect error is retried (e.g. `"fail,502,503"`).
    pub fn on(mut self, condition: Condition) -> Self {
        self.on = condition;
        self
    }

    /// Also retry non-idempotent methods (POST, PATCH) on [`on`](Self::on) failures (nginx
    /// `non_idempotent`). Off by default: the upstream may have acted on the request.
    pub fn non_idempotent(mut self, yes: bool) -> Self {
        self.non_idempotent = yes;
        self
    }

    pub(crate) fn method_allows(&self, m: &Method) -> bool {
        crate::classify::may_send_again(m.is_idempotent(), self.non_idempotent, false)
    }
}

/// A request body the balancer can copy before sending, so it can send it again.
///
/// Streaming bodies ([`hyper::body::Incoming`], boxed bodies) return `None`: a request with
/// such a body is never retried. Buffer it first with
/// [`buffer_request`](crate::body::replay::buffer_request) (or [`Replay`](super::Replay)) to
/// make it retryable.
pub trait CloneBody: Sized {
    /// A copy that yields the same bytes from the start, or `None`.
    fn try_clone_body(&self) -> Option<Self>;
}

impl<B> CloneBody for ReplayBody<B> {
    #[inline]
    fn try_clone_body(&self) -> Option<Self> {
        self.try_clone()
    }
}

impl CloneBody for Full<Bytes> {
    #[inline]
    fn try_clone_body(&self) -> Option<Self> {
        Some(self.clone())
    }
}

impl CloneBody for Empty<Bytes> {
    #[inline]
    fn try_clone_body(&self) -> Option<Self> {
        Some(Empty::new())
    }
}

impl CloneBody for String {
    #[inline]
    fn try_clone_body(&self) -> Option<Self> {
        Some(self.clone())
    }
}

impl CloneBody for hyper::body::Incoming {
    #[inline]
    fn try_clone_body(&self) -> Option<Self> {
        None
    }
}

impl CloneBody for crate::body::BoxBody {
    #[inline]
    fn try_clone_body(&self) -> Option<Self> {
        None
    }
}
