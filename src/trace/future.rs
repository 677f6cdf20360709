//! The response future of [`RequestTrace`](super::RequestTrace) and the access-log event.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use http::{Method, Response};
use pin_project_lite::pin_project;
use tokio::time::Instant;

use super::context::{TraceContext, X_REQUEST_ID};
use crate::BoxError;

/// Status logged for a request whose client went away first (nginx's convention).
const CLIENT_CLOSED: u16 = 499;

/// What the access-log event needs; logging it consumes it, dropping it unlogged logs a
/// cancelled request.
pub(crate) struct Access {
    pub(crate) method: Method,
    pub(crate) route: Arc<str>,
    pub(crate) cx: TraceContext,
    pub(crate) start: Instant,
}

impl Access {
    fn log(&self, status: u16) {
        // The fields cost a lock and an Arc clone: only when someone listens.
        if !tracing::enabled!(target: "tower_patterns::access", tracing::Level::INFO) {
            return;
        }
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
        access: Option<Access>,
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
    pub(crate) fn new(inner: F, access: Access) -> Self {
        ResponseFuture {
            inner,
            access: Some(access),
        }
    }
}

impl<F> std::fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("done", &self.access.is_none())
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
        let res = ready!(this.inner.poll(cx));
        let Some(access) = this.access.take() else {
            crate::error::polled_after_completion("trace::ResponseFuture")
        };
        Poll::Ready(match res {
            Ok(mut res) => {
                access.log(res.status().as_u16());
                res.headers_mut()
                    .insert(X_REQUEST_ID, access.cx.request_id.clone());
                Ok(res)
            }
            Err(e) => {
                let e: BoxError = e.into();
                access.log(crate::error::error_status(&*e).as_u16());
                Err(e)
            }
        })
    }
}
