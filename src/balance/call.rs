//! One try's call to an endpoint service: `poll_ready` + `call` + its response future.
//!
//! `tower::util::Oneshot` keeps the service clone and the whole request (~250 bytes) inline
//! until its first poll, and moves the request twice on the way in. The balancer's
//! response future is moved through every layer of the stack, so each inline byte is paid
//! several times per request. Endpoint services are nearly always ready (the proxy's
//! pooled client always is): [`Call::start`] asks at dispatch, with a no-op waker, and
//! calls at once; only a service that is not ready yet parks itself and the request in
//! one box, polled for readiness with the task's real waker.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll, Waker};

use pin_project_lite::pin_project;
use tower_service::Service;

pin_project! {
    /// The future of one try, as `Oneshot` but with the not-ready case boxed.
    #[project = CallProj]
    pub(crate) enum Call<S, R>
    where
        S: Service<R>,
    {
        /// Called: the service's own response future.
        Called {
            #[pin]
            fut: S::Future,
        },
        /// Not ready at dispatch (rare): the service and the request, until it is.
        Waiting {
            parked: Option<Box<(S, R)>>,
        },
        /// `poll_ready` failed at dispatch: that error, returned at the first poll.
        Failed {
            err: Option<S::Error>,
        },
    }
}

impl<S: Service<R>, R> Call<S, R> {
    /// Starts the call: calls `svc` at once when it is ready now.
    #[inline]
    pub(crate) fn start(mut svc: S, req: R) -> Self {
        let mut cx = Context::from_waker(Waker::noop());
        match svc.poll_ready(&mut cx) {
            Poll::Ready(Ok(())) => Call::Called { fut: svc.call(req) },
            Poll::Ready(Err(e)) => Call::Failed { err: Some(e) },
            // The no-op waker registered here is replaced by the task's own at the next
            // `poll_ready` (tower services keep the waker of the latest poll).
            Poll::Pending => Call::Waiting {
                parked: Some(Box::new((svc, req))),
            },
        }
    }
}

impl<S: Service<R>, R> Call<S, R> {
    /// As [`start`](Self::start), on a service the caller keeps (a balancer instance's own
    /// clone, `local.rs`). A service that is not ready, or failed readiness, is the one
    /// parked (or dropped) and the caller keeps `fresh()` instead, as `ConnService` does:
    /// whatever per-instance readiness state it holds (a semaphore acquire, say) stays
    /// with the request that waits on it.
    #[inline]
    pub(crate) fn start_on(svc: &mut S, fresh: impl FnOnce() -> S, req: R) -> Self {
        let mut cx = Context::from_waker(Waker::noop());
        match svc.poll_ready(&mut cx) {
            Poll::Ready(Ok(())) => Call::Called { fut: svc.call(req) },
            Poll::Ready(Err(e)) => {
                *svc = fresh();
                Call::Failed { err: Some(e) }
            }
            Poll::Pending => {
                let parked = std::mem::replace(svc, fresh());
                Call::Waiting {
                    parked: Some(Box::new((parked, req))),
                }
            }
        }
    }
}

impl<S: Service<R>, R> Future for Call<S, R> {
    type Output = Result<S::Response, S::Error>;

    // Inline: the common arm is one call of the endpoint's future; out of line it was
    // ~50 instructions of its own per request (dispatch bench, callgrind).
    #[inline]
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let fut = match self.as_mut().project() {
                CallProj::Called { fut } => return fut.poll(cx),
                CallProj::Failed { err } => match err.take() {
                    Some(e) => return Poll::Ready(Err(e)),
                    None => crate::error::polled_after_completion("balance::Call"),
                },
                CallProj::Waiting { parked } => {
                    let Some(p) = parked.as_mut() else {
                        crate::error::polled_after_completion("balance::Call");
                    };
                    if let Err(e) = ready!(p.0.poll_ready(cx)) {
                        *parked = None;
                        return Poll::Ready(Err(e));
                    }
                    let Some(p) = parked.take() else {
                        crate::error::polled_after_completion("balance::Call");
                    };
                    let (mut svc, req) = *p;
                    svc.call(req)
                }
            };
            self.set(Call::Called { fut });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;
    use std::future::{ready as ready_fut, Ready};
    use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
    use std::sync::Arc;

    /// Not ready for its first `polls_pending` readiness polls, then ready; fails
    /// readiness instead when `fail` is set.
    #[derive(Clone)]
    struct Slow {
        pending_left: Arc<AtomicUsize>,
        fail: bool,
        calls: Arc<AtomicUsize>,
    }

    impl Service<u32> for Slow {
        type Response = u32;
        type Error = &'static str;
        type Future = Ready<Result<u32, &'static str>>;
        fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), &'static str>> {
            if self.fail {
                return Poll::Ready(Err("not ready, ever"));
            }
            if self.pending_left.load(Relaxed) > 0 {
                self.pending_left.fetch_sub(1, Relaxed);
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, req: u32) -> Self::Future {
            self.calls.fetch_add(1, Relaxed);
            ready_fut(Ok(req + 1))
        }
    }

    fn slow(pending: usize, fail: bool) -> Slow {
        Slow {
            pending_left: Arc::new(AtomicUsize::new(pending)),
            fail,
            calls: Arc::new(AtomicUsize::new(0)),
        }
    }

    #[test]
    fn a_ready_service_is_called_at_start() {
        let s = slow(0, false);
        let call = Call::start(s.clone(), 1);
        assert!(matches!(call, Call::Called { .. }));
        assert_eq!(s.calls.load(Relaxed), 1);
        let mut call = std::pin::pin!(call);
        let mut cx = Context::from_waker(Waker::noop());
        assert_eq!(call.as_mut().poll(&mut cx), Poll::Ready(Ok(2)));
    }

    #[test]
    fn a_service_not_ready_yet_is_called_once_it_is() {
        let s = slow(2, false);
        let call = Call::start(s.clone(), 41);
        assert!(matches!(call, Call::Waiting { .. }));
        assert_eq!(s.calls.load(Relaxed), 0);
        let mut call = std::pin::pin!(call);
        let mut cx = Context::from_waker(Waker::noop());
        assert_eq!(call.as_mut().poll(&mut cx), Poll::Pending);
        assert_eq!(s.calls.load(Relaxed), 0);
        assert_eq!(call.as_mut().poll(&mut cx), Poll::Ready(Ok(42)));
        assert_eq!(s.calls.load(Relaxed), 1);
    }

    #[test]
    fn a_readiness_error_is_the_answer() {
        let s = slow(0, true);
        let call = Call::start(s.clone(), 1);
        let mut call = std::pin::pin!(call);
        let mut cx = Context::from_waker(Waker::noop());
        assert_eq!(
            call.as_mut().poll(&mut cx),
            Poll::Ready(Err("not ready, ever"))
        );
        assert_eq!(s.calls.load(Relaxed), 0);
    }

    #[test]
    fn infallible_services_work_too() {
        let svc = tower::service_fn(|x: u8| ready_fut(Ok::<_, Infallible>(x)));
        let call = Call::start(svc, 7);
        let mut call = std::pin::pin!(call);
        let mut cx = Context::from_waker(Waker::noop());
        assert!(matches!(call.as_mut().poll(&mut cx), Poll::Ready(Ok(7))));
    }
}

/// The balancer's response future is moved through every layer above it; its size is a
/// per-request cost (it was 1024 bytes with `Oneshot` and an inline retry copy, 672 with
/// the 264-byte `Condition`, 408 with the whole retry copy boxed, 432 with the copy's body
/// handle inline beside its recycled head box; the per-try timer boxed and the replay
/// body three words: 240 in the proxy's stack, within glibc's 256-byte short `memcpy`).
#[cfg(test)]
mod size {
    use std::convert::Infallible;
    use std::future::Ready;

    use http::{Request, Response};

    use crate::balance::{NoGates, ResponseFuture};
    use crate::classify::Condition;

    #[derive(Clone)]
    struct Ok200;

    impl tower_service::Service<Request<String>> for Ok200 {
        type Response = Response<String>;
        type Error = Infallible;
        type Future = Ready<Result<Response<String>, Infallible>>;
        fn poll_ready(
            &mut self,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), Infallible>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn call(&mut self, _req: Request<String>) -> Self::Future {
            std::future::ready(Ok(Response::new(String::new())))
        }
    }

    #[test]
    fn the_response_future_holds_no_request_inline() {
        type Fut = ResponseFuture<usize, Ok200, NoGates, Condition, String>;
        let request = std::mem::size_of::<Request<String>>();
        let classifier = std::mem::size_of::<Condition>();
        let timer = std::mem::size_of::<tokio::time::Sleep>();
        let inner =
            std::mem::size_of::<<Ok200 as tower_service::Service<Request<String>>>::Future>();
        // The try's future, the classifier (a few words: it was two 900-bit status sets),
        // the retry copy's body handle and 136 bytes of bookkeeping (the timer, the copy's
        // head, retry, queue and tried-endpoint state are boxed); no timer (112 bytes,
        // most requests never arm one) and no request (neither the one being sent nor
        // the retry copy's head).
        assert!(classifier <= 32, "Condition is {classifier} bytes");
        let body = std::mem::size_of::<String>();
        let bound = inner + classifier + body + 136;
        let size = std::mem::size_of::<Fut>();
        assert!(
            size <= bound && bound < inner + classifier + timer + request,
            "ResponseFuture is {size} bytes (bound {bound}; request {request}, classifier {classifier}, timer {timer}, inner {inner})"
        );
    }

    /// The future the proxy's balanced stack hands the server (`Replay` over `Balance`
    /// over `Forward`, as `examples/reverse_proxy.rs --serve` builds it): hyper and the
    /// server move it whole a few times a request, and past 256 bytes glibc's `memcpy`
    /// takes its longer path (issue 12). It was 408 bytes with the timer inline, the
    /// replay body's streamed state inline and `Replay`'s two options.
    #[cfg(target_pointer_width = "64")]
    #[test]
    fn the_proxy_stack_future_stays_within_256_bytes() {
        use crate::body::ReplayBody;
        use hyper::body::Incoming;
        type Lb = crate::balance::Balance<String, crate::proxy::Forward<ReplayBody<Incoming>>>;
        type Stack = crate::balance::Replay<Lb>;
        let size =
            std::mem::size_of::<<Stack as tower_service::Service<Request<Incoming>>>::Future>();
        assert!(size <= 256, "the balanced stack's future is {size} bytes");
    }
}
