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

use super::error::error_response;
use crate::BoxError;

/// Response body of [`ErrorResponse`]: the inner service's body, or the error page. No
/// boxing, so the proxy path does not allocate per response for it.
pub type ErrorResponseBody<B> = Either<B, Full<Bytes>>;

/// Turns the errors of the wrapped service into `502`/`504` responses
/// ([`error_response`]), so a front server answers instead of dropping the connection.
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
