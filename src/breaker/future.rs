//! The response future of [`CircuitBreaker`](super::CircuitBreaker).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::Response;
use pin_project_lite::pin_project;
use tokio::time::Instant;

use super::service::Local;
use super::state::Permit;
use crate::classify::{Classifier, LateOutcomes, Outcome};
use crate::BoxError;

/// The admitted call's bookkeeping. Dropping it unfinished drops the permit, which returns
/// a half-open probe permit without recording an outcome.
pub(crate) struct Guard<K> {
    pub(crate) breaker: Arc<Local>,
    pub(crate) permit: Permit,
    pub(crate) classifier: K,
    pub(crate) start: Option<Instant>,
}

impl<K: Classifier> Guard<K> {
    fn finish(self, classify: impl FnOnce(K) -> Outcome) {
        let Guard {
            breaker,
            permit,
            classifier,
            start,
        } = self;
        let elapsed = start.map(|s| s.elapsed()).unwrap_or_default();
        breaker.complete(permit, classify(classifier), elapsed);
    }
}

pin_project! {
    /// Resolves to the inner response, the fallback's answer, or a rejection.
    pub struct ResponseFuture<Fut, K, FF, W> {
        #[pin]
        kind: Kind<Fut, K, FF, W>,
    }
}

pin_project! {
    #[project = Proj]
    enum Kind<Fut, K, FF, W> {
        Admitted {
            #[pin]
            fut: Fut,
            // Puts the inner body into the breaker's body type (identity without fallback).
            wrap: W,
            guard: Option<Guard<K>>,
        },
        Fallback {
            #[pin]
            fut: FF,
        },
    }
}

impl<Fut, K, FF, W> ResponseFuture<Fut, K, FF, W> {
    pub(crate) fn admitted(fut: Fut, wrap: W, guard: Guard<K>) -> Self {
        Self {
            kind: Kind::Admitted {
                fut,
                wrap,
                guard: Some(guard),
            },
        }
    }

    pub(crate) fn fallback(fut: FF) -> Self {
        Self {
            kind: Kind::Fallback { fut },
        }
    }
}

impl<Fut, K, FF, W> std::fmt::Debug for ResponseFuture<Fut, K, FF, W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.kind {
            Kind::Admitted { .. } => f.write_str("ResponseFuture::Admitted"),
            Kind::Fallback { .. } => f.write_str("ResponseFuture::Fallback"),
        }
    }
}

impl<Fut, K, FF, B, OB, E> Future for ResponseFuture<Fut, K, FF, fn(B) -> OB>
where
    Fut: Future<Output = Result<Response<B>, E>>,
    E: Into<BoxError>,
    K: Classifier,
    FF: Future<Output = Result<Response<OB>, BoxError>>,
{
    type Output = Result<Response<OB>, BoxError>;

    // Inline: out of line (as it became with the smaller `Rejected` arm) the layer above
    // moves the finished response in and out of one more call.
    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            Proj::Admitted { fut, wrap, guard } => {
                let res = std::task::ready!(fut.poll(cx));
                match res {
                    Ok(mut res) => {
                        if let Some(g) = guard.take() {
                            if g.classifier.defers_to_trailers(&res) {
                                // gRPC status in the trailers: recorded when the body ends
                                // (`classify::TrailersLayer`); a body dropped before its
                                // end drops the permit, like a cancelled call.
                                LateOutcomes::of(&mut res)
                                    .push(move |end| g.finish(|k| k.classify_end(end)));
                            } else {
                                g.finish(|k| k.classify_response(&res));
                            }
                        }
                        Poll::Ready(Ok(res.map(*wrap)))
                    }
                    Err(e) => {
                        let e: BoxError = e.into();
                        if let Some(g) = guard.take() {
                            g.finish(|k| k.classify_error(&*e));
                        }
                        Poll::Ready(Err(e))
                    }
                }
            }
            Proj::Fallback { fut } => fut.poll(cx),
        }
    }
}

#[cfg(test)]
mod size {
    use http::Request;
    use hyper::body::Incoming;
    use tower_service::Service;

    /// The breaker's future is the admitted call's future and its guard: the rejection's
    /// answer ([`Rejected`](super::super::Rejected)) holds no response inline. Over
    /// `Forward` it was 152 bytes, the room of a `Ready` of a whole response (issue 14).
    #[cfg(target_pointer_width = "64")]
    #[test]
    fn the_future_is_the_inner_one_and_the_guard() {
        type Fwd = crate::proxy::Forward<Incoming>;
        type Fut = <super::super::CircuitBreaker<Fwd> as Service<Request<Incoming>>>::Future;
        let inner = std::mem::size_of::<<Fwd as Service<Request<Incoming>>>::Future>();
        let size = std::mem::size_of::<Fut>();
        // The guard: the breaker's handle, the permit, the classifier (a `Condition`, 32
        // bytes), the start time; and the body mapping's function pointer.
        assert!(
            size <= inner + 80,
            "breaker future {size} bytes, inner {inner}"
        );
    }
}
