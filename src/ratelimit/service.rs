//! The [`RateLimit`] service.

use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tower_service::Service;

use super::future::{refusal, ResponseFuture};
use super::key::KeyExtractor;
use super::limiter::{Bucket, Check, Decision, Limiter};
use crate::respond::{AnswerFuture, ErrorResponseBody};

/// See [`RateLimitLayer`](super::RateLimitLayer).
#[derive(Debug)]
pub struct RateLimit<S, K, L> {
    pub(crate) inner: S,
    pub(crate) key: K,
    pub(crate) limiter: Arc<L>,
    /// The fixed key's bucket, resolved when the layer was built: counted in directly.
    pub(crate) pinned: Option<Arc<dyn Bucket>>,
}

impl<S: Clone, K: Clone, L> Clone for RateLimit<S, K, L> {
    fn clone(&self) -> Self {
        RateLimit {
            inner: self.inner.clone(),
            key: self.key.clone(),
            limiter: self.limiter.clone(),
            pinned: self.pinned.clone(),
        }
    }
}

impl<S, K, L> RateLimit<S, K, L> {
    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
    /// Unwraps the service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, K, L, B, RB> Service<Request<B>> for RateLimit<S, K, L>
where
    S: Service<Request<B>, Response = Response<RB>> + Clone,
    K: KeyExtractor,
    L: Limiter<K::Key>,
{
    type Response = Response<ErrorResponseBody<RB>>;
    type Error = S::Error;
    type Future = ResponseFuture<S, Request<B>, L::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    #[inline]
    fn call(&mut self, req: Request<B>) -> Self::Future {
        let check = match &self.pinned {
            Some(bucket) => Check::Now(bucket.decide()),
            None => self.limiter.check(self.key.extract(&req).as_ref()),
        };
        match check {
            // The local limiter: decided here, no clone of the inner service.
            Check::Now(Decision::Allow) => {
                ResponseFuture::ready(AnswerFuture::inner(self.inner.call(req)))
            }
            Check::Now(d) => ResponseFuture::ready(AnswerFuture::answered(refusal(d))),
            Check::Later(check) => {
                // The ready service goes with the future (tower's clone-and-swap), a
                // fresh clone stays for the next `poll_ready`.
                let clone = self.inner.clone();
                let ready = std::mem::replace(&mut self.inner, clone);
                ResponseFuture::checking(check, ready, req)
            }
        }
    }
}
