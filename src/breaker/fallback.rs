//! What answers a call the circuit rejected.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_util::future::{ready, Ready};
use pin_project_lite::pin_project;
use tower::util::Oneshot;
use tower::ServiceExt;
use tower_service::Service;

use super::error::CircuitOpen;
use crate::BoxError;

/// Answers a rejected call (Hystrix's fallback method). Implemented by [`NoFallback`]
/// (fail fast with [`CircuitOpen`]), [`ServiceFallback`] and [`FnFallback`].
pub trait Fallback<Req, Res>: Clone {
    /// The answer.
    type Future: Future<Output = Result<Res, BoxError>>;
    /// Handles `req`, which the circuit refused for the reason in `rejected`.
    fn fallback(&self, req: Req, rejected: CircuitOpen) -> Self::Future;
}

/// No fallback: a rejected call fails with a boxed [`CircuitOpen`].
#[derive(Debug, Clone, Copy, Default)]
pub struct NoFallback;

impl<Req, Res> Fallback<Req, Res> for NoFallback {
    type Future = Ready<Result<Res, BoxError>>;
    fn fallback(&self, _req: Req, rejected: CircuitOpen) -> Self::Future {
        ready(Err(Box::new(rejected)))
    }
}

/// A `tower::Service` as fallback. For HTTP requests the [`CircuitOpen`] is added to the
/// request extensions first, so the service can say why and when to retry.
#[derive(Debug, Clone)]
pub struct ServiceFallback<T>(pub T);

/// Lets a fallback see why the call was rejected.
pub trait WithRejection {
    /// Attaches the rejection to the request.
    fn with_rejection(self, rejected: CircuitOpen) -> Self;
}

impl<B> WithRejection for http::Request<B> {
    fn with_rejection(mut self, rejected: CircuitOpen) -> Self {
        self.extensions_mut().insert(rejected);
        self
    }
}

impl<Req, T> Fallback<Req, T::Response> for ServiceFallback<T>
where
    Req: WithRejection,
    T: Service<Req> + Clone,
    T::Error: Into<BoxError>,
{
    type Future = ErrInto<Oneshot<T, Req>>;
    fn fallback(&self, req: Req, rejected: CircuitOpen) -> Self::Future {
        ErrInto {
            fut: self.0.clone().oneshot(req.with_rejection(rejected)),
        }
    }
}

/// A closure `Fn(Req, CircuitOpen) -> impl Future<Output = Result<Res, E>>` as fallback.
#[derive(Clone)]
pub struct FnFallback<F>(pub F);

impl<F> std::fmt::Debug for FnFallback<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FnFallback")
    }
}

impl<Req, Res, E, F, Fut> Fallback<Req, Res> for FnFallback<F>
where
    F: Fn(Req, CircuitOpen) -> Fut + Clone,
    Fut: Future<Output = Result<Res, E>>,
    E: Into<BoxError>,
{
    type Future = ErrInto<Fut>;
    fn fallback(&self, req: Req, rejected: CircuitOpen) -> Self::Future {
        ErrInto {
            fut: (self.0)(req, rejected),
        }
    }
}

pin_project! {
    /// Boxes the error of the inner future.
    #[derive(Debug)]
    pub struct ErrInto<Fut> {
        #[pin]
        fut: Fut,
    }
}

impl<Fut, T, E> Future for ErrInto<Fut>
where
    Fut: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.project().fut.poll(cx).map_err(Into::into)
    }
}
