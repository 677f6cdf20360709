//! The tower service of one connection, called by hyper without a clone per request.
//!
//! hyper calls its `Service` through `&self`, while a tower service is called through
//! `&mut self` after `poll_ready`. hyper-util's `TowerToHyperService` bridges the two by
//! cloning the whole service stack for every request and driving the clone through a
//! `Oneshot` (ready, then call): for `Forward` behind the server's per-connection wrapper
//! that is six `Arc` increments and decrements a request (atomic read-modify-writes, each
//! a few dozen cycles) and a larger future moved around hyper's dispatcher (issue 12).
//!
//! [`ConnService`] keeps the connection's one instance and asks it first: when
//! `poll_ready` answers at once, the request is called on it directly. Only a service that
//! is not ready (a concurrency limit at its bound, a rate limit) pays the old way: the
//! instance that said "not ready" waits for readiness with the request's own waker, as a
//! clone does under `TowerToHyperService` for every request, and the connection keeps a
//! fresh clone for its next request.
//!
//! A behaviour to know: a service's own per-instance state now lives as long as the
//! connection (a tower `RateLimit`'s window, say), where each request used to start from a
//! fresh clone of the connection's instance.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use pin_project_lite::pin_project;
use tower::util::Oneshot;
use tower_service::Service;

use crate::BoxError;

/// A connection's tower service as a hyper service; see the module docs.
pub(super) struct ConnService<S> {
    /// hyper calls `call` from the connection's own task, one request at a time, and the
    /// borrow ends before `call` returns: it is never contended. (A `RefCell`, not a
    /// lock: the connection future only has to be `Send`.)
    svc: RefCell<S>,
}

impl<S> ConnService<S> {
    pub(super) fn new(svc: S) -> Self {
        ConnService {
            svc: RefCell::new(svc),
        }
    }
}

impl<S, R> hyper::service::Service<R> for ConnService<S>
where
    S: Service<R> + Clone,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    // Boxed here rather than later by hyper: the future holds no `S::Error`, which the
    // server does not require to be `Send`.
    type Error = BoxError;
    type Future = ConnFuture<S, R>;

    fn call(&self, req: R) -> Self::Future {
        let Ok(mut svc) = self.svc.try_borrow_mut() else {
            // Not reachable through hyper (its calls do not nest, and the borrow ends
            // here); answered with an error rather than a panic all the same.
            return ConnFuture::Failed {
                err: Some("connection service called while in use".into()),
            };
        };
        // Nothing is lost by asking with a waker that does nothing: a service that is not
        // ready is not called here; it goes with the request, whose future asks it again
        // with the real waker.
        let mut cx = Context::from_waker(Waker::noop());
        match svc.poll_ready(&mut cx) {
            Poll::Ready(Ok(())) => ConnFuture::Called { fut: svc.call(req) },
            Poll::Ready(Err(e)) => ConnFuture::Failed {
                err: Some(e.into()),
            },
            // The instance that is not ready may have queued for capacity (a semaphore
            // permit) with the waker that does nothing: left in place, it could take a
            // permit nobody uses until the connection's next request, or be served before
            // the request waiting behind it. So it goes with this request, whose future
            // polls it with the real waker, and the connection keeps a fresh clone.
            Poll::Pending => {
                let fresh = svc.clone();
                ConnFuture::Waiting {
                    fut: Box::pin(Oneshot::new(std::mem::replace(&mut *svc, fresh), req)),
                }
            }
        }
    }
}

pin_project! {
    /// The response future of [`ConnService`].
    #[project = ConnFutureProj]
    pub(super) enum ConnFuture<S: Service<R>, R> {
        /// Called on the connection's instance.
        Called { #[pin] fut: S::Future },
        /// A clone waiting for readiness (the service was not ready at once). Boxed: it
        /// holds the service and the request, and inline it would size every request's
        /// future, which hyper's dispatcher moves with `memcpy` when it stores it (issue
        /// 12, session 15); this path pays a clone already.
        Waiting { fut: Pin<Box<Oneshot<S, R>>> },
        /// `poll_ready` failed: the request is answered with its error.
        Failed { err: Option<BoxError> },
    }
}

impl<S, R> Future for ConnFuture<S, R>
where
    S: Service<R>,
    S::Error: Into<BoxError>,
{
    type Output = Result<S::Response, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            ConnFutureProj::Called { fut } => fut.poll(cx).map_err(Into::into),
            ConnFutureProj::Waiting { fut } => fut.as_mut().poll(cx).map_err(Into::into),
            // Polled once: a second poll after Ready is a caller bug; stay pending.
            ConnFutureProj::Failed { err } => match err.take() {
                Some(e) => Poll::Ready(Err(e)),
                None => Poll::Pending,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::future::{ready, Ready};

    use http::Request;
    use hyper::body::Incoming;

    use super::*;

    type Svc = tower::util::ServiceFn<fn(Request<Incoming>) -> Ready<Result<u8, Infallible>>>;

    fn svc(_: Request<Incoming>) -> Ready<Result<u8, Infallible>> {
        ready(Ok(0))
    }

    /// Every request's future is stored by hyper's dispatcher, a `memcpy` of its whole
    /// size: the rare wait for readiness (a service clone and the whole request) must not
    /// size it (272 bytes inline, here with a `u8` response); what is left is the error of
    /// the `Failed` case.
    #[test]
    fn waiting_does_not_size_the_future() {
        let _: Svc = tower::service_fn(svc as fn(_) -> _);
        let size = std::mem::size_of::<ConnFuture<Svc, Request<Incoming>>>();
        assert!(size <= 3 * std::mem::size_of::<usize>(), "{size} bytes");
    }
}
