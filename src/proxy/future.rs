//! [`ResponseFuture`]: one exchange with the upstream under the response timeout.
//!
//! The pooled HTTP/1.1 case is a hand-written future around hyper's response future, not an
//! `async` block around `async` methods: each of those held the request in its own state,
//! so the boxed future was 2.7 KiB (allocated outside the allocator's thread cache and
//! copied whole on every request, issue 12). The request now lives only in hyper's queue.
//! The lean HTTP/1.1 path (`super::h1`) is a step of the same future: its exchange is
//! driven here, in the request's task, under the same response timeout and timer.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use pin_project_lite::pin_project;
use tokio::time::Instant;

use super::body::{far_future, poll_lazy_deadline, Progress};
use super::error::ForwardError;
use super::h1;
use super::headers::strip_hop_by_hop;
use super::pool::{BoxExchange, ConnTimer, Dispatched, HostPool};
use super::response_body::ForwardBody;
use crate::BoxError;

type Inner = Pin<Box<dyn Future<Output = Result<Response<ForwardBody>, ForwardError>> + Send>>;

/// Response future of [`Forward`](super::Forward).
pub struct ResponseFuture {
    inner: Inner,
}

impl ResponseFuture {
    /// Sends `req` now (see [`HostPool::dispatch`]) and waits for its response.
    pub(super) fn new<B>(
        pool: Arc<HostPool<B>>,
        req: Request<B>,
        timeout: Option<Duration>,
        progress: Option<Arc<Progress>>,
    ) -> Self
    where
        B: http_body::Body + Send + Unpin + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        let (step, tx, start, sleep) = match pool.dispatch(req) {
            Dispatched::Pooled(fut, conn) => {
                (Step::Sent { fut }, Some(conn.tx), Some(conn.at), conn.timer)
            }
            Dispatched::Lean(mut ex) => {
                let (start, sleep) = (ex.started, ex.take_timer());
                (Step::Lean { ex }, None, start, sleep)
            }
            Dispatched::Other(fut) => (Step::Boxed { fut }, None, None, None),
        };
        ResponseFuture {
            inner: Box::pin(Exchange {
                step,
                tx,
                pool,
                timer: timeout.map(|after| Timer {
                    after,
                    progress,
                    start,
                }),
                sleep,
            }),
        }
    }

    /// A response future from any boxed exchange (the upgrade path).
    pub(super) fn boxed(
        f: impl Future<Output = Result<Response<ForwardBody>, ForwardError>> + Send + 'static,
    ) -> Self {
        ResponseFuture { inner: Box::pin(f) }
    }

    pub(super) fn failed(e: ForwardError) -> Self {
        ResponseFuture {
            inner: Box::pin(std::future::ready(Err(e))),
        }
    }
}

impl std::fmt::Debug for ResponseFuture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ResponseFuture")
    }
}

impl Future for ResponseFuture {
    type Output = Result<Response<ForwardBody>, ForwardError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}

pin_project! {
    #[project = StepProj]
    enum Step<F> {
        // hyper's response future of a request queued on a pooled connection.
        Sent { #[pin] fut: F },
        // Any other path, and the retry of a pooled connection found closed.
        Boxed { fut: BoxExchange },
        // The lean HTTP/1.1 path (`super::h1`), driven here in the request's task.
        Lean { ex: h1::Exchange },
    }
}

/// The response timeout's state: the upstream is silent for `after` since the later of
/// the start and its last taken body chunk (`progress`).
struct Timer {
    after: Duration,
    progress: Option<Arc<Progress>>,
    /// The pooled connection's checkout, else set when the exchange first waits.
    start: Option<Instant>,
}

impl Timer {
    /// When the upstream's silence becomes a timeout, counted from the latest progress.
    fn deadline(&mut self) -> Instant {
        let start = *self.start.get_or_insert_with(Instant::now);
        let from = self
            .progress
            .as_ref()
            .map_or(start, |p| p.last().max(start));
        from.checked_add(self.after).unwrap_or_else(far_future)
    }
}

pin_project! {
    struct Exchange<F, B> {
        #[pin]
        step: Step<F>,
        // The pooled connection, checked in again once the response head is here.
        tx: Option<http1::SendRequest<B>>,
        pool: Arc<HostPool<B>>,
        timer: Option<Timer>,
        // The response timer. A pooled connection's comes with it and goes back with it:
        // it stays registered between exchanges at a deadline that is never later than
        // the current one (an earlier exchange's), and is moved only when it fires early.
        // The timer wheel is then touched about once per `after` per connection instead
        // of twice per request.
        sleep: Option<ConnTimer>,
    }
}

impl<F, B> Future for Exchange<F, B>
where
    F: Future<Output = Result<Response<Incoming>, hyper::client::conn::TrySendError<Request<B>>>>,
    B: http_body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type Output = Result<Response<ForwardBody>, ForwardError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            let res = match this.step.as_mut().project() {
                StepProj::Sent { fut } => match fut.poll(cx) {
                    Poll::Pending => break,
                    Poll::Ready(Ok(res)) => {
                        if let Some(tx) = this.tx.take() {
                            let since = this.timer.as_ref().and_then(|t| t.start);
                            this.pool.checkin(tx, since, this.sleep.take());
                        }
                        Ok(res.map(ForwardBody::from))
                    }
                    Poll::Ready(Err(mut e)) => match e.take_message() {
                        Some(req) => {
                            // Closed before the request was written: the closed
                            // connection is dropped, the request sent on a new one.
                            this.tx.take();
                            let pool = this.pool.clone();
                            let closed = e.into_error();
                            this.step.set(Step::Boxed {
                                fut: Box::pin(async move { pool.reconnect(req, closed).await }),
                            });
                            continue;
                        }
                        None => Err(this.pool.transport(e.into_error())),
                    },
                },
                StepProj::Boxed { fut } => match fut.as_mut().poll(cx) {
                    Poll::Pending => break,
                    Poll::Ready(res) => res,
                },
                StepProj::Lean { ex } => {
                    // Always there: the pool dispatches to the lean path only when it
                    // has the lean idle list.
                    let Some(idle) = this.pool.lean.as_ref() else {
                        return Poll::Ready(Err(this
                            .pool
                            .transport_h1(h1::Http1Error::Incomplete)));
                    };
                    match ex.poll(cx, idle, &this.pool.connector, this.sleep) {
                        Poll::Pending => break,
                        Poll::Ready(Ok(res)) => Ok(res.map(ForwardBody::http1)),
                        Poll::Ready(Err(h1::Failed::Connect(e))) => Err(e),
                        Poll::Ready(Err(h1::Failed::Upstream(e))) => Err(this.pool.transport_h1(e)),
                    }
                }
            };
            return Poll::Ready(res.map(|mut res| {
                strip_hop_by_hop(res.headers_mut());
                res
            }));
        }
        let Some(timer) = this.timer.as_mut() else {
            return Poll::Pending;
        };
        let sleep = match this.sleep {
            Some(sleep) => sleep,
            None => this
                .sleep
                .insert(Box::pin(tokio::time::sleep_until(timer.deadline()))),
        };
        // The registered deadline may be a previous exchange's on this connection, or
        // one from before body data went up meanwhile: the current one is read again
        // whenever the timer fires.
        ready!(poll_lazy_deadline(sleep.as_mut(), cx, || timer.deadline()));
        Poll::Ready(Err(ForwardError::ResponseTimeout {
            upstream: this.pool.upstream().authority().to_string(),
            after: timer.after,
        }))
    }
}
