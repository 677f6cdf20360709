//! The response future of [`RequestTrace`](super::RequestTrace) and the access-log event.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use http::{HeaderValue, Method, Response};
use pin_project_lite::pin_project;
use tokio::time::Instant;

use super::context::{TraceContext, X_REQUEST_ID};
use crate::BoxError;

/// Status logged for a request whose client went away first (nginx's convention).
const CLIENT_CLOSED: u16 = 499;

/// What the access-log event needs; logging it consumes it, dropping it unlogged logs a
/// cancelled request. Built only when a subscriber wants the event
/// ([`access_log_enabled`], asked when the request arrives): without one, a request pays
/// no clock read, no route or context clone for a log nobody reads.
pub(crate) struct Access {
    pub(crate) method: Method,
    pub(crate) route: Arc<str>,
    pub(crate) cx: TraceContext,
    pub(crate) start: Instant,
}

/// Whether a subscriber wants the access-log event; asked once per request, when it
/// arrives.
#[inline]
pub(crate) fn access_log_enabled() -> bool {
    tracing::enabled!(target: "tower_patterns::access", tracing::Level::INFO)
}

impl Access {
    fn log(&self, status: u16) {
        let upstream = self.cx.upstream();
        tracing::info!(
            target: "tower_patterns::access",
            method = %self.method,
            route = &*self.route,
            status,
            upstream = upstream.as_ref().map_or("-", |a| a.as_str()),
            attempts = self.cx.attempts(),
            duration_ms = self.start.elapsed().as_secs_f64() * 1000.0,
            trace_id = %self.cx.trace_id,
            request_id = self.cx.request_id.to_str().unwrap_or("-"),
            "access"
        );
    }
}

pin_project! {
    /// Resolves to the inner response (with `x-request-id`) or error, logging it.
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        // The id answered to the client; `None` once the future completed.
        request_id: Option<HeaderValue>,
        // `None` when no subscriber wanted the access log as the request arrived. Boxed:
        // inline, the record (method, route, trace context, clock) would make every
        // response future of the layer — and each layer's future around it — about 190
        // bytes larger, copied on each move, also when no subscriber logs anything.
        access: Option<Box<Access>>,
    }

    impl<F> PinnedDrop for ResponseFuture<F> {
        fn drop(this: Pin<&mut Self>) {
            if let Some(a) = this.project().access.take() {
                a.log(CLIENT_CLOSED);
            }
        }
    }
}

impl<F> ResponseFuture<F> {
    pub(crate) fn new(inner: F, request_id: HeaderValue, access: Option<Box<Access>>) -> Self {
        ResponseFuture {
            inner,
            request_id: Some(request_id),
            access,
        }
    }
}

impl<F> std::fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("done", &self.request_id.is_none())
            .finish()
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    E: Into<BoxError>,
{
    type Output = Result<Response<B>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        // The answer is changed in place and handed on as it came: one move of the
        // response here, not one per match arm (as the metrics future does, session 16).
        let mut out = ready!(this.inner.poll(cx)).map_err(Into::into);
        let Some(request_id) = this.request_id.take() else {
            crate::error::polled_after_completion("trace::ResponseFuture")
        };
        let access = this.access.take();
        match &mut out {
            Ok(res) => {
                if let Some(a) = access {
                    a.log(res.status().as_u16());
                }
                res.headers_mut().insert(X_REQUEST_ID, request_id);
            }
            Err(e) => {
                if let Some(a) = access {
                    a.log(crate::error::error_status(&**e).as_u16());
                }
            }
        }
        Poll::Ready(out)
    }
}
