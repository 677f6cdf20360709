//! Outcomes decided at the end of a response body: [`LateOutcomes`] (the callbacks a
//! breaker or a balancer leaves on a response whose result is in its trailers) and
//! [`TrailersLayer`], which runs them when the body ends — with the trailers, without any,
//! or with the body's error. A body dropped before its end runs none, as for a cancelled
//! request.
//!
//! Apart from the gRPC codes ([`grpc`](super::grpc)) because this is about bodies and
//! their end, whatever protocol put the result there.

use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{ready, Context, Poll};

use http::{HeaderMap, Request, Response};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use crate::BoxError;

/// How a response body ended, for an outcome decided at its end.
#[derive(Debug, Clone, Copy)]
pub enum StreamEnd<'a> {
    /// The body ended with these trailers.
    Trailers(&'a HeaderMap),
    /// The body ended without trailers.
    NoTrailers,
    /// The body failed (connection reset, stream reset).
    Error(&'a (dyn StdError + 'static)),
}

type Callback = Box<dyn FnOnce(StreamEnd<'_>) + Send>;

/// Outcomes waiting for the end of a response body; a response extension.
///
/// Pushed by whoever deferred its classification ([`Classifier::defers_to_trailers`](super::Classifier::defers_to_trailers));
/// run by [`TrailersBody`] when the body ends. Dropped unrun when nobody reads the body to
/// its end: no outcome is recorded.
#[derive(Clone, Default)]
pub struct LateOutcomes {
    waiting: Arc<Mutex<Vec<Callback>>>,
}

impl LateOutcomes {
    /// Adds a callback to run with the body's end.
    pub fn push(&self, f: impl FnOnce(StreamEnd<'_>) + Send + 'static) {
        self.waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Box::new(f));
    }

    /// Callbacks waiting.
    pub fn len(&self) -> usize {
        self.waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// `true` when none is waiting.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Runs (and removes) every waiting callback with `end`.
    pub fn finish(&self, end: StreamEnd<'_>) {
        let waiting =
            std::mem::take(&mut *self.waiting.lock().unwrap_or_else(PoisonError::into_inner));
        for f in waiting {
            f(end);
        }
    }

    /// The response's waiting outcomes, created empty if it has none yet.
    pub fn of<B>(res: &mut Response<B>) -> &LateOutcomes {
        res.extensions_mut().get_or_insert_default::<LateOutcomes>()
    }
}

impl fmt::Debug for LateOutcomes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LateOutcomes")
            .field("waiting", &self.len())
            .finish()
    }
}

/// Runs the response's [`LateOutcomes`] when its body ends. Put it outside the balancer
/// and breakers whose gRPC outcomes come from trailers (outermost is right); without it,
/// those outcomes are never recorded.
#[derive(Debug, Clone, Copy, Default)]
pub struct TrailersLayer;

impl<S> Layer<S> for TrailersLayer {
    type Service = Trailers<S>;
    fn layer(&self, inner: S) -> Trailers<S> {
        Trailers { inner }
    }
}

/// See [`TrailersLayer`].
#[derive(Debug, Clone)]
pub struct Trailers<S> {
    inner: S,
}

impl<S, ReqB, B> Service<Request<ReqB>> for Trailers<S>
where
    S: Service<Request<ReqB>, Response = Response<B>>,
    B: Body,
    B::Error: Into<BoxError>,
{
    type Response = Response<TrailersBody<B>>;
    type Error = S::Error;
    type Future = TrailersFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        TrailersFuture {
            inner: self.inner.call(req),
        }
    }
}

pin_project! {
    /// Response future of [`Trailers`].
    pub struct TrailersFuture<F> {
        #[pin]
        inner: F,
    }
}

impl<F, B, E> Future for TrailersFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: Body,
    B::Error: Into<BoxError>,
{
    type Output = Result<Response<TrailersBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut res = ready!(self.project().inner.poll(cx))?;
        let late = res.extensions_mut().remove::<LateOutcomes>();
        Poll::Ready(Ok(res.map(|b| TrailersBody::new(b, late))))
    }
}

pin_project! {
    /// A response body that runs its [`LateOutcomes`] at its end.
    pub struct TrailersBody<B> {
        #[pin]
        inner: B,
        late: Option<LateOutcomes>,
    }
}

impl<B> TrailersBody<B> {
    /// Wraps `inner`; `late` runs when it ends.
    pub fn new(inner: B, late: Option<LateOutcomes>) -> Self {
        TrailersBody { inner, late }
    }
}

impl<B> fmt::Debug for TrailersBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrailersBody")
            .field("late", &self.late)
            .finish_non_exhaustive()
    }
}

impl<B> Body for TrailersBody<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let polled = ready!(this.inner.poll_frame(cx));
        match polled {
            Some(Ok(frame)) => {
                if let Some(t) = frame.trailers_ref() {
                    if let Some(late) = this.late.take() {
                        late.finish(StreamEnd::Trailers(t));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => {
                let e: BoxError = e.into();
                if let Some(late) = this.late.take() {
                    late.finish(StreamEnd::Error(&*e));
                }
                Poll::Ready(Some(Err(e)))
            }
            None => {
                if let Some(late) = this.late.take() {
                    late.finish(StreamEnd::NoTrailers);
                }
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        // Not the inner's answer while outcomes wait: the end must be polled to run them.
        self.late.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::grpc_status;
    use bytes::Bytes;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn late_outcomes_run_once_at_the_end_with_the_trailers() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let late = LateOutcomes::default();
        let s = seen.clone();
        late.push(move |end| {
            let code = match end {
                StreamEnd::Trailers(t) => grpc_status(t),
                _ => None,
            };
            s.lock().unwrap().push(code);
        });
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", "14".parse().unwrap());
        let frames = futures_util::stream::iter(vec![
            Ok::<_, BoxError>(Frame::data(Bytes::from("msg"))),
            Ok(Frame::trailers(trailers)),
        ]);
        let body = TrailersBody::new(http_body_util::StreamBody::new(frames), Some(late));
        let collected = body.collect().await.unwrap();
        assert_eq!(collected.trailers().unwrap()["grpc-status"], "14");
        assert_eq!(*seen.lock().unwrap(), vec![Some(14)]);
    }

    #[tokio::test]
    async fn a_body_dropped_early_records_nothing() {
        let ran = Arc::new(Mutex::new(false));
        let late = LateOutcomes::default();
        let r = ran.clone();
        late.push(move |_| *r.lock().unwrap() = true);
        let body = http_body_util::StreamBody::new(futures_util::stream::pending::<
            Result<Frame<Bytes>, BoxError>,
        >());
        drop(TrailersBody::new(body, Some(late.clone())));
        drop(late);
        assert!(!*ran.lock().unwrap());
    }
}
