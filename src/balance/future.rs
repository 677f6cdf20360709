//! The balancer's response future: pick, send, and on a failure pick again.
//!
//! One request is a small state machine: dispatched to an endpoint (or queued when none
//! is available), answered or timed out, then either returned or retried on another
//! endpoint. The state a request carries between tries is in `attempt.rs`, the recording
//! of each answer in `outcome.rs`; this file only drives the loop and the per-try timer.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use http::{Request, Response};
use pin_project_lite::pin_project;
use tokio::time::Instant;
use tower_service::Service;

use super::attempt::{deadline_after, first_pick, miss_error, Attempt};
use super::call::Call;
use super::error::BalanceError;
use super::error::TryTimeout;
use super::local::Local;
use super::outcome::Settled;
use super::retry::CloneBody;
use super::service::{MakeGate, Shared};
use crate::classify::Classify;
use crate::BoxError;

pin_project! {
    /// Response future of [`Balance`](super::Balance).
    pub struct ResponseFuture<K, S, M, C, B>
    where
        S: Service<Request<B>>,
        M: MakeGate<K>,
        C: Classify,
    {
        #[pin]
        inner: Option<Call<S, Request<B>>>,
        // The per-try timeout; one timer per request, reset for each try. Boxed, made
        // when a try first turns out pending with a per-try timeout set: inline, its 112
        // bytes were moved with every move of this future even with no timeout configured
        // (the recommended proxy setup, `Forward`'s response timeout instead), and they
        // took the future past the 256 bytes of glibc's short `memcpy` path (issue 12).
        // The box is ~100 instructions beside the timer's own ~650 (wheel registration
        // and removal).
        timer: Option<Pin<Box<tokio::time::Sleep>>>,
        st: Attempt<K, S, M, C, B, S::Response>,
        done: bool,
    }
}

impl<K, S, M, C, B> fmt::Debug for ResponseFuture<K, S, M, C, B>
where
    S: Service<Request<B>>,
    M: MakeGate<K>,
    C: Classify,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("tries", &self.st.tries)
            .finish_non_exhaustive()
    }
}

impl<K, S, M, C, B, RB> ResponseFuture<K, S, M, C, B>
where
    K: Clone + fmt::Debug,
    S: Service<Request<B>, Response = Response<RB>> + Clone,
    S::Error: Into<BoxError>,
    M: MakeGate<K>,
    C: Classify,
    B: CloneBody,
{
    pub(crate) fn start(
        shared: Arc<Shared<K, S, M, C>>,
        local: &mut Local<K, S, M>,
        req: Request<B>,
    ) -> Self {
        let snap = shared.snapshot.load();
        let (picked, cookie_id, key) = first_pick(&shared, &snap, &req);
        // Moved, not cloned: one reference-count round trip per request is enough. (Whether
        // the method may be sent again is asked of the kept copy, once a try failed.)
        let mut st = Attempt::new(shared, key, cookie_id);
        let inner = match picked {
            Ok(p) => {
                let svc = local.service(&snap, p.index);
                Some(st.dispatch(&snap, p, req, svc))
            }
            Err(m) => {
                st.set_last(Err(miss_error(m)));
                st.queue(req);
                None
            }
        };
        ResponseFuture {
            inner,
            timer: None,
            st,
            done: false,
        }
    }
}

impl<K, S, M, C, B, RB> Future for ResponseFuture<K, S, M, C, B>
where
    K: Clone + fmt::Debug + Send + Sync + 'static,
    S: Service<Request<B>, Response = Response<RB>> + Clone + Send + Sync + 'static,
    S::Error: Into<BoxError>,
    M: MakeGate<K>,
    C: Classify,
    B: CloneBody,
    RB: http_body::Body + Send + 'static,
{
    type Output = Result<Response<RB>, BalanceError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if self.done {
            crate::error::polled_after_completion("balance::ResponseFuture");
        }
        let out = self.as_mut().poll_attempt(cx);
        if out.is_ready() {
            *self.project().done = true;
        }
        out
    }
}

impl<K, S, M, C, B, RB> ResponseFuture<K, S, M, C, B>
where
    K: Clone + fmt::Debug + Send + Sync + 'static,
    S: Service<Request<B>, Response = Response<RB>> + Clone + Send + Sync + 'static,
    S::Error: Into<BoxError>,
    M: MakeGate<K>,
    C: Classify,
    B: CloneBody,
    RB: http_body::Body + Send + 'static,
{
    fn poll_attempt(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Response<RB>, BalanceError>> {
        let mut this = self.project();
        loop {
            // Queued: wait for the set to change, then pick again.
            if let Some((_, wait)) = this.st.cold.as_mut().and_then(|c| c.queued.as_mut()) {
                ready!(wait.as_mut().poll(cx));
                let st = &mut *this.st;
                let Some((req, _)) = st.cold.as_mut().and_then(|c| c.queued.take()) else {
                    continue;
                };
                let shared = st.shared.clone();
                let snap = shared.snapshot.load();
                match snap.pick(&shared.picker, st.key, &shared.clock, st.tried()) {
                    Ok(p) => {
                        let fut = st.dispatch(&snap, p, req, None);
                        this.inner.set(Some(fut));
                    }
                    Err(m) => {
                        if st.tries == 0 {
                            st.set_last(Err(miss_error(m)));
                        }
                        if !st.queue(req) {
                            let last = st.take_last();
                            return Poll::Ready(last);
                        }
                        continue;
                    }
                }
            }

            let mut res: Result<Response<RB>, BoxError> = match this.inner.as_mut().as_pin_mut() {
                Some(fut) => match fut.poll(cx) {
                    Poll::Ready(r) => {
                        this.st.arm = false;
                        r.map_err(Into::into)
                    }
                    Poll::Pending => {
                        if let Some(after) = this.st.shared.try_timeout.filter(|_| this.st.arm) {
                            this.st.arm = false;
                            let base = this.st.started.unwrap_or_else(Instant::now);
                            let deadline = deadline_after(base, after);
                            match this.timer.as_mut() {
                                Some(t) => t.as_mut().reset(deadline),
                                None => {
                                    *this.timer =
                                        Some(Box::pin(tokio::time::sleep_until(deadline)));
                                }
                            }
                        }
                        // A hung endpoint (accepts, never answers) gives no outcome by
                        // itself: the per-try timeout turns it into a timeout failure that
                        // health counts and retry acts on. The timer is armed at every
                        // dispatch when a timeout is set.
                        let fired = this
                            .timer
                            .as_mut()
                            .is_some_and(|t| t.as_mut().poll(cx).is_ready());
                        if !fired {
                            return Poll::Pending;
                        }
                        let after = this.st.shared.try_timeout.unwrap_or_default();
                        Err(Box::new(TryTimeout::new(after)))
                    }
                },
                None => {
                    return Poll::Ready(this.st.take_last());
                }
            };
            this.inner.set(None);
            let st = &mut *this.st;
            let Some(guard) = st.endpoint.take() else {
                return Poll::Ready(Err(BalanceError::NoEndpoints));
            };
            let (held, settled) = st.settle(guard, &mut res);
            let ep = &held.ep;
            let wanted = match settled {
                Settled::Deferred => false,
                Settled::Recorded { client_fault } => st.wants_retry(&res, client_fault),
            };
            if wanted && st.within_timeout() {
                let shared = st.shared.clone();
                st.mark_tried(ep.id);
                let snap = shared.snapshot.load();
                let picked = snap.pick(&shared.picker, st.key, &shared.clock, st.tried());
                if let Some(req) = st.replay.take().and_then(|k| k.into_request()) {
                    match picked {
                        Ok(p) => {
                            crate::telemetry::retry();
                            tracing::debug!(
                                from = ?ep.key,
                                to = ?snap.endpoints[p.index].key,
                                try_no = st.tries + 1,
                                "retrying on the next endpoint"
                            );
                            // The failed answer is not returned: discarded the one way the
                            // crate does it, keeping a short body's connection.
                            if let Ok(r) = res {
                                crate::body::discard(
                                    r.into_body(),
                                    crate::body::DISCARD_LIMIT,
                                    crate::body::DISCARD_TIMEOUT,
                                );
                            }
                            let fut = st.dispatch(&snap, p, req, None);
                            this.inner.set(Some(fut));
                            continue;
                        }
                        Err(_) => {
                            // Nobody left to try now; with a queue, wait for the set to change.
                            let done = st.finish(ep, res);
                            st.set_last(done);
                            if st.queue(req) {
                                continue;
                            }
                            let last = st.take_last();
                            return Poll::Ready(last);
                        }
                    }
                }
            }
            st.replay = None;
            return Poll::Ready(st.finish(ep, res));
        }
    }
}
