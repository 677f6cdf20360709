//! Buffering request bodies so the balancer can retry them.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::Request;
use http_body::Body;
use pin_project_lite::pin_project;
use tower::util::ServiceExt;
use tower_layer::Layer;
use tower_service::Service;

use crate::body::replay::buffer_request;
use crate::body::ReplayBody;
use crate::BoxError;

/// Wraps a service in [`Replay`].
#[derive(Debug, Clone, Copy)]
pub struct ReplayLayer {
    limit: usize,
}

impl ReplayLayer {
    /// This layer with [`ErrorResponseLayer`](crate::respond::ErrorResponseLayer) on top:
    /// the `Infallible`-error form that mounts directly in axum (`Router::layer`,
    /// `route_layer`) and in hyper; errors become responses with the status each error
    /// stands for. See `docs/foundation.md`, "Mounting in axum".
    pub fn respond(self) -> tower::layer::util::Stack<Self, crate::respond::ErrorResponseLayer> {
        tower::layer::util::Stack::new(self, crate::respond::ErrorResponseLayer)
    }

    /// Buffers request bodies of up to `limit` bytes (nginx `client_body_buffer_size`);
    /// larger bodies are streamed once and not retried.
    pub fn new(limit: usize) -> Self {
        ReplayLayer { limit }
    }
}

impl<S> Layer<S> for ReplayLayer {
    type Service = Replay<S>;
    fn layer(&self, inner: S) -> Replay<S> {
        Replay {
            inner,
            limit: self.limit,
        }
    }
}

/// Turns `Request<B>` into `Request<ReplayBody<B>>` so a [`Balance`](super::Balance) behind
/// it can retry. A request without a body (the usual GET) costs no buffering and no await;
/// a body is read up to the limit first (see [`ReplayBody::buffer`]).
#[derive(Debug, Clone)]
pub struct Replay<S> {
    inner: S,
    limit: usize,
}

impl<S> Replay<S> {
    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }
    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

type Boxed<R> = Pin<Box<dyn Future<Output = Result<R, BoxError>> + Send>>;

pin_project! {
    /// Response future of [`Replay`].
    pub struct ReplayFuture<F, R> {
        #[pin]
        direct: Option<F>,
        buffered: Option<Boxed<R>>,
    }
}

impl<F, R> fmt::Debug for ReplayFuture<F, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ReplayFuture")
    }
}

impl<F, R, E> Future for ReplayFuture<F, R>
where
    F: Future<Output = Result<R, E>>,
    E: Into<BoxError>,
{
    type Output = Result<R, BoxError>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        // Each branch drops its future once it is done, so a further poll lands on the
        // one panic of the crate instead of re-polling a finished future.
        if let Some(f) = this.direct.as_mut().as_pin_mut() {
            let out = std::task::ready!(f.poll(cx)).map_err(Into::into);
            this.direct.set(None);
            return Poll::Ready(out);
        }
        match this.buffered {
            Some(f) => {
                let out = std::task::ready!(f.as_mut().poll(cx));
                *this.buffered = None;
                Poll::Ready(out)
            }
            None => crate::error::polled_after_completion("balance::ReplayFuture"),
        }
    }
}

impl<S, B> Service<Request<B>> for Replay<S>
where
    S: Service<Request<ReplayBody<B>>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
    S::Response: Send,
    B: Body + Unpin + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ReplayFuture<S::Future, S::Response>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        if req.body().is_end_stream() {
            let req = req.map(|_| ReplayBody::empty());
            return ReplayFuture {
                direct: Some(self.inner.call(req)),
                buffered: None,
            };
        }
        // The ready service is taken for this request; a fresh clone stays behind.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let limit = self.limit;
        ReplayFuture {
            direct: None,
            buffered: Some(Box::pin(async move {
                let req = buffer_request(req, limit).await?;
                inner.oneshot(req).await.map_err(Into::into)
            })),
        }
    }
}
