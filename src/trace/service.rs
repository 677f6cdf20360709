//! The [`RequestTrace`] service.

use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tokio::time::Instant;
use tower_service::Service;

use super::context::{TraceContext, TRACEPARENT, TRACESTATE, X_REQUEST_ID};
use super::future::{Access, ResponseFuture};
use crate::BoxError;

/// See [`RequestTraceLayer`](super::RequestTraceLayer).
#[derive(Clone, Debug)]
pub struct RequestTrace<S> {
    inner: S,
    route: Arc<str>,
    sampled: bool,
}

impl<S> RequestTrace<S> {
    pub(crate) fn new(inner: S, route: Arc<str>, sampled: bool) -> Self {
        RequestTrace {
            inner,
            route,
            sampled,
        }
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S, B, RB> Service<Request<B>> for RequestTrace<S>
where
    S: Service<Request<B>, Response = Response<RB>>,
    S::Error: Into<BoxError>,
{
    type Response = Response<RB>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let start = Instant::now();
        let cx = TraceContext::from_headers(req.headers(), self.sampled);
        // Handlers and non-`Forward` clients see the gateway's span as the parent and the
        // request id; `Forward` replaces the parent with a child per upstream call.
        let headers = req.headers_mut();
        headers.insert(TRACEPARENT, cx.traceparent(cx.span_id));
        match &cx.tracestate {
            Some(s) => headers.insert(TRACESTATE, s.clone()),
            None => headers.remove(TRACESTATE),
        };
        headers.insert(X_REQUEST_ID, cx.request_id.clone());
        let access = Access {
            method: req.method().clone(),
            route: self.route.clone(),
            cx: cx.clone(),
            start,
        };
        req.extensions_mut().insert(cx);
        ResponseFuture::new(self.inner.call(req), access)
    }
}
