//! What answers a call the circuit rejected.

use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::{Request, Response};
use http_body_util::Either;
use pin_project_lite::pin_project;
use tower::util::Oneshot;
use tower::ServiceExt;
use tower_service::Service;

use super::error::CircuitOpen;
use crate::BoxError;

/// Answers a rejected call (Hystrix's fallback method). Implemented by [`NoFallback`]
/// (fail fast with [`CircuitOpen`]), [`ServiceFallback`] and [`FnFallback`].
///
/// A fallback answers with its own body type: the breaker's responses then carry
/// [`Self::Body`], an enum of the inner service's body `RB` and the fallback's (no boxing),
/// so a fallback over `Forward` never has to build a `proxy::ForwardBody`.
pub trait Fallback<Req, RB>: Clone {
    /// The body of every response of the breaker: `RB` itself for [`NoFallback`],
    /// `Either<RB, FallbackBody>` for a fallback with a body of its own.
    type Body;
    /// The answer.
    type Future: Future<Output = Result<Response<Self::Body>, BoxError>>;
    /// Handles `req`, which the circuit refused for the reason in `rejected`.
    fn fallback(&self, req: Req, rejected: CircuitOpen) -> Self::Future;
    /// Turns an admitted call's body into [`Self::Body`].
    fn inner_body(body: RB) -> Self::Body;
}

/// No fallback: a rejected call fails with a boxed [`CircuitOpen`].
#[derive(Debug, Clone, Copy, Default)]
pub struct NoFallback;

impl<Req, RB> Fallback<Req, RB> for NoFallback {
    type Body = RB;
    type Future = Rejected<RB>;
    fn fallback(&self, _req: Req, rejected: CircuitOpen) -> Self::Future {
        Rejected {
            err: Some(Box::new(rejected)),
            _body: PhantomData,
        }
    }
    #[inline]
    fn inner_body(body: RB) -> RB {
        body
    }
}

/// [`NoFallback`]'s answer: the boxed [`CircuitOpen`], as the error.
///
/// It holds the error alone. A `Ready` of the whole result had room for a response head
/// (~150 bytes over `Forward`), and the breaker's response future, an enum of the admitted
/// call and this, was as large for every request, admitted ones included: the breaker's
/// future over `Forward` was 152 bytes, 96 with this, and the whole future is moved a
/// few times a request by the layers above and the server (issue 14).
pub struct Rejected<RB> {
    err: Option<BoxError>,
    _body: PhantomData<fn() -> RB>,
}

impl<RB> std::fmt::Debug for Rejected<RB> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rejected").field("err", &self.err).finish()
    }
}

impl<RB> Future for Rejected<RB> {
    type Output = Result<Response<RB>, BoxError>;
    fn poll(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut().err.take() {
            Some(e) => Poll::Ready(Err(e)),
            None => crate::error::polled_after_completion("breaker::Rejected"),
        }
    }
}

/// A `tower::Service` as fallback. For HTTP requests the [`CircuitOpen`] is added to the
/// request extensions first, so the service can say why and when to retry.
#[derive(Debug, Clone)]
pub struct ServiceFallback<T>(pub T);

impl<B, RB, FB, T> Fallback<Request<B>, RB> for ServiceFallback<T>
where
    T: Service<Request<B>, Response = Response<FB>> + Clone,
    T::Error: Into<BoxError>,
{
    type Body = Either<RB, FB>;
    type Future = FallbackFuture<Oneshot<T, Request<B>>, RB>;
    fn fallback(&self, mut req: Request<B>, rejected: CircuitOpen) -> Self::Future {
        req.extensions_mut().insert(rejected);
        FallbackFuture {
            fut: self.0.clone().oneshot(req),
            _inner: PhantomData,
        }
    }
    #[inline]
    fn inner_body(body: RB) -> Self::Body {
        Either::Left(body)
    }
}

/// A closure `Fn(Request, CircuitOpen) -> impl Future<Output = Result<Response<FB>, E>>` as
/// fallback; `FB` is the closure's own body type.
#[derive(Clone)]
pub struct FnFallback<F>(pub F);

impl<F> std::fmt::Debug for FnFallback<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FnFallback")
    }
}

impl<B, RB, FB, E, F, Fut> Fallback<Request<B>, RB> for FnFallback<F>
where
    F: Fn(Request<B>, CircuitOpen) -> Fut + Clone,
    Fut: Future<Output = Result<Response<FB>, E>>,
    E: Into<BoxError>,
{
    type Body = Either<RB, FB>;
    type Future = FallbackFuture<Fut, RB>;
    fn fallback(&self, req: Request<B>, rejected: CircuitOpen) -> Self::Future {
        FallbackFuture {
            fut: (self.0)(req, rejected),
            _inner: PhantomData,
        }
    }
    #[inline]
    fn inner_body(body: RB) -> Self::Body {
        Either::Left(body)
    }
}

pin_project! {
    /// The answer of a [`ServiceFallback`] or [`FnFallback`]: its response with the body
    /// put on the right of the breaker's body enum, its error boxed.
    #[derive(Debug)]
    pub struct FallbackFuture<Fut, RB> {
        #[pin]
        fut: Fut,
        // The inner body type only names the left side of the enum; nothing is stored.
        _inner: PhantomData<fn() -> RB>,
    }
}

impl<Fut, RB, FB, E> Future for FallbackFuture<Fut, RB>
where
    Fut: Future<Output = Result<Response<FB>, E>>,
    E: Into<BoxError>,
{
    type Output = Result<Response<Either<RB, FB>>, BoxError>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.project()
            .fut
            .poll(cx)
            .map(|r| r.map(|res| res.map(Either::Right)).map_err(Into::into))
    }
}
