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
        state: State<F, R>,
    }
}

pin_project! {
    // One of the two, not both side by side: this future is moved whole by the server
    // and every layer above, and two options were 16 bytes more than the inner future
    // (the balancer's, 240), past the 256 of glibc's short `memcpy` path (issue 12).
    #[project = StateProj]
    enum State<F, R> {
        // A request without a body: the inner service's future as it is.
        Direct { #[pin] fut: F },
        // A body to buffer first, then the call.
        Buffered { fut: Boxed<R> },
        Done,
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
        let mut state = self.project().state;
        // The finished future is dropped at once, so a further poll lands on the one
        // panic of the crate instead of re-polling it.
        let out = match state.as_mut().project() {
            StateProj::Direct { fut } => std::task::ready!(fut.poll(cx)).map_err(Into::into),
            StateProj::Buffered { fut } => std::task::ready!(fut.as_mut().poll(cx)),
            StateProj::Done => crate::error::polled_after_completion("balance::ReplayFuture"),
        };
        state.set(State::Done);
        Poll::Ready(out)
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
                state: State::Direct {
                    fut: self.inner.call(req),
                },
            };
        }
        // The ready service is taken for this request; a fresh clone stays behind.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let limit = self.limit;
        ReplayFuture {
            state: State::Buffered {
                fut: Box::pin(async move {
                    let req = buffer_request(req, limit).await?;
                    inner.oneshot(req).await.map_err(Into::into)
                }),
            },
        }
    }
}
