//! The one way every pattern of this crate mounts where `Infallible` is required.
//!
//! axum's `Router::layer`, `route_service`, `fallback_service` and `route_layer`, and a
//! hyper server, want a service whose error type is [`Infallible`]: a failure must already
//! be a response. The patterns return typed errors (so a user who wants to handle them
//! can), and each error says its own status ([`HttpStatus`](crate::error::HttpStatus)).
//! [`ErrorResponseLayer`] turns those errors into short plain-text responses with that
//! status. Every layer of the crate has a `respond()` convenience that stacks it on top,
//! and [`respond`] wraps an already-built service (a `Forward`, a `Balance`).
//!
//! The response body becomes [`ErrorResponseBody`], an enum of the inner body and the
//! error page: nothing is boxed on the proxy path.
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http::Response;
use http_body_util::{Either, Full};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use crate::error::error_status;
use crate::BoxError;

/// Response body of [`ErrorResponse`]: the inner service's body, or the error page. No
/// boxing, so the proxy path does not allocate per response for it.
pub type ErrorResponseBody<B> = Either<B, Full<Bytes>>;

/// Turns the errors of the wrapped service into responses with the status each error
/// stands for ([`error_response`]), so a front server answers instead of dropping the
/// connection.
///
/// The response body becomes [`ErrorResponseBody`] (the inner body or the error page); the
/// error type becomes [`Infallible`], which is what `axum::Router::fallback_service` and
/// [`crate::server::serve`] want.
#[derive(Debug, Clone, Copy, Default)]
pub struct ErrorResponseLayer;

impl<S> Layer<S> for ErrorResponseLayer {
    type Service = ErrorResponse<S>;
    fn layer(&self, inner: S) -> ErrorResponse<S> {
        ErrorResponse { inner }
    }
}

/// See [`ErrorResponseLayer`].
#[derive(Debug, Clone)]
pub struct ErrorResponse<S> {
    inner: S,
}

impl<S> ErrorResponse<S> {
    /// Wraps `inner`.
    pub fn new(inner: S) -> Self {
        ErrorResponse { inner }
    }
    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
    /// The wrapped service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }
    /// Unwraps the service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, R, B> Service<R> for ErrorResponse<S>
where
    S: Service<R, Response = Response<B>>,
    S::Error: Into<BoxError>,
{
    type Response = Response<ErrorResponseBody<B>>;
    type Error = Infallible;
    type Future = ErrorResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // An inner service that fails readiness is reported per call instead.
        match self.inner.poll_ready(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(())) => Poll::Ready(Ok(())),
            Poll::Ready(Err(e)) => {
                let e: BoxError = e.into();
                tracing::warn!(error = %e, "inner service failed readiness");
                Poll::Ready(Ok(()))
            }
        }
    }

    #[inline]
    fn call(&mut self, req: R) -> Self::Future {
        ErrorResponseFuture {
            inner: self.inner.call(req),
        }
    }
}

pin_project! {
    /// Response future of [`ErrorResponse`].
    #[derive(Debug)]
    pub struct ErrorResponseFuture<F> {
        #[pin]
        inner: F,
    }
}

impl<F, B, E> Future for ErrorResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    E: Into<BoxError>,
{
    type Output = Result<Response<ErrorResponseBody<B>>, Infallible>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Poll::Ready(Ok(match ready!(self.project().inner.poll(cx)) {
            Ok(res) => res.map(Either::Left),
            Err(e) => {
                let e: BoxError = e.into();
                tracing::debug!(error = %e, "answering with an error response");
                error_response(&*e).map(Either::Right)
            }
        }))
    }
}

/// Wraps an already-built service (a `Forward`, a `Balance`, a `Chain`) in
/// [`ErrorResponse`]; layers have a `respond()` method that does the same.
pub fn respond<S>(inner: S) -> ErrorResponse<S> {
    ErrorResponse::new(inner)
}

/// A plain-text error response for `err` with the status of
/// [`error_status`]. The body names the failure but not
/// internal addresses.
pub fn error_response(err: &(dyn std::error::Error + 'static)) -> Response<Full<Bytes>> {
    status_response(error_status(err))
}

/// A short plain-text response whose body is the status's reason phrase.
pub fn status_response(status: http::StatusCode) -> Response<Full<Bytes>> {
    let reason = status.canonical_reason().unwrap_or("error");
    let mut res = Response::new(Full::new(Bytes::from(format!("{reason}\n"))));
    *res.status_mut() = status;
    res.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    res
}

pin_project! {
    /// Response future of a layer that may answer a request itself instead of calling the
    /// wrapped service (authentication's `401`/`403`, rate limiting's `429`): the inner
    /// service's future, or the layer's own answer. A refusal is an answer, not a failure,
    /// so it carries its own headers (`WWW-Authenticate`, `Retry-After`) and the error type
    /// stays the inner service's.
    #[project = AnswerProj]
    #[derive(Debug)]
    // pin-project-lite takes no docs on variant fields: the future and the answer.
    #[allow(missing_docs)]
    pub enum AnswerFuture<F> {
        /// Calling the wrapped service.
        Inner {
            #[pin]
            fut: F,
        },
        /// The layer's own answer.
        Answered {
            res: Option<Response<Full<Bytes>>>,
        },
    }
}

impl<F> AnswerFuture<F> {
    /// The wrapped service's future.
    pub fn inner(fut: F) -> Self {
        AnswerFuture::Inner { fut }
    }
    /// The layer's own answer.
    pub fn answered(res: Response<Full<Bytes>>) -> Self {
        AnswerFuture::Answered { res: Some(res) }
    }
}

impl<F, B, E> Future for AnswerFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<ErrorResponseBody<B>>, E>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            AnswerProj::Inner { fut } => {
                Poll::Ready(ready!(fut.poll(cx)).map(|r| r.map(Either::Left)))
            }
            AnswerProj::Answered { res } => match res.take() {
                Some(r) => Poll::Ready(Ok(r.map(Either::Right))),
                None => crate::error::polled_after_completion("AnswerFuture"),
            },
        }
    }
}
