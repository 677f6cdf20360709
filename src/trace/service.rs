//! The [`RequestTrace`] service.

use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tokio::time::Instant;
use tower_service::Service;

use super::context::TraceContext;
use super::future::{access_log_enabled, Access, ResponseFuture};
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
        // The access log's clock starts first, and only when a subscriber wants the log.
        let start = access_log_enabled().then(Instant::now);
        // `Forward` writes a child `traceparent` per upstream call; here only what the
        // upstream must not see is fixed: a `tracestate` of a refused parent, and an absent
        // or refused request id.
        let cx = TraceContext::at_edge(req.headers_mut(), self.sampled);
        let access = start.map(|start| {
            Box::new(Access {
                method: req.method().clone(),
                route: self.route.clone(),
                cx: cx.clone(),
                start,
            })
        });
        let request_id = cx.request_id.clone();
        crate::client_addr::insert_scoped(req.extensions_mut(), cx);
        ResponseFuture::new(self.inner.call(req), request_id, access)
    }
}
