//! The [`Metrics`] service.

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use metrics::{Counter, Gauge, Histogram};
use tokio::time::Instant;
use tower_service::Service;

use super::future::{InFlight, ResponseFuture};
use super::{DURATION, FAILURES, IN_FLIGHT, REQUESTS};
use crate::classify::{Classify, FailureKind};
use crate::BoxError;

/// The handles of one route, registered once (no label lookup per request). A clone
/// records into the same series (each handle points at the recorder's metric).
#[derive(Clone)]
pub(crate) struct Handles {
    pub(crate) name: String,
    pub(crate) requests: Counter,
    pub(crate) in_flight: Gauge,
    pub(crate) duration: Histogram,
    /// By failure kind: status, transport, timeout, other, grpc.
    failures: [Counter; 5],
}

impl Handles {
    /// `endpoint`: the extra `endpoint` label of a per-endpoint layer.
    pub(crate) fn register(name: String, endpoint: Option<&str>) -> Self {
        let mut labels = vec![metrics::Label::new("route", name.clone())];
        if let Some(e) = endpoint {
            labels.push(metrics::Label::new("endpoint", e.to_owned()));
        }
        let failure = |kind: &'static str| {
            let mut l = labels.clone();
            l.push(metrics::Label::new("kind", kind));
            metrics::counter!(FAILURES, l)
        };
        Handles {
            requests: metrics::counter!(REQUESTS, labels.clone()),
            in_flight: metrics::gauge!(IN_FLIGHT, labels.clone()),
            duration: metrics::histogram!(DURATION, labels.clone()),
            failures: [
                failure("status"),
                failure("transport"),
                failure("timeout"),
                failure("other"),
                failure("grpc"),
            ],
            name,
        }
    }

    pub(crate) fn failure(&self, kind: FailureKind) {
        let i = match kind {
            FailureKind::Status(_) => 0,
            FailureKind::Transport => 1,
            FailureKind::Timeout => 2,
            FailureKind::Other => 3,
            FailureKind::Grpc(_) => 4,
            // Classifiers answer `Ignored` for it; a custom one that does not is still
            // not charged to the route.
            FailureKind::Client => return,
        };
        self.failures[i].increment(1);
    }
}

impl fmt::Debug for Handles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Handles").field("name", &self.name).finish()
    }
}

/// See [`MetricsLayer`](super::MetricsLayer).
#[derive(Clone, Debug)]
pub struct Metrics<S, C> {
    inner: S,
    handles: Arc<Handles>,
    classify: C,
}

impl<S, C> Metrics<S, C> {
    pub(crate) fn new(inner: S, handles: Arc<Handles>, classify: C) -> Self {
        Metrics {
            inner,
            handles,
            classify,
        }
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    #[cfg(test)]
    pub(crate) fn handles(&self) -> &Arc<Handles> {
        &self.handles
    }
}

impl<S, C, B, RB> Service<Request<B>> for Metrics<S, C>
where
    S: Service<Request<B>, Response = Response<RB>>,
    S::Error: Into<BoxError>,
    C: Classify,
{
    type Response = Response<RB>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, C::Classifier>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    #[inline]
    fn call(&mut self, req: Request<B>) -> Self::Future {
        let classifier = self.classify.classify_request(&req);
        self.handles.requests.increment(1);
        let in_flight = InFlight::enter(self.handles.clone(), Instant::now());
        ResponseFuture::new(self.inner.call(req), classifier, in_flight)
    }
}
