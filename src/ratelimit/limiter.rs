//! The [`Limiter`] trait: a decision now, or (Redis) after a round trip.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// What a limiter decided for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Within the limit.
    Allow,
    /// Over the limit: `429 Too Many Requests`, `Retry-After` when a request would next
    /// be allowed.
    Deny {
        /// Time until a request of this key would be allowed.
        retry_after: Duration,
    },
    /// The limiter cannot decide and is configured to fail closed (a Redis limiter with
    /// `OnRedisFailure::Deny`): `503`, `Retry-After`.
    Unavailable {
        /// Time until the limiter tries its backend again.
        retry_after: Duration,
    },
}

/// A decision available at once, or one to wait for.
#[derive(Debug)]
pub enum Check<F> {
    /// Decided without waiting (the local limiter, always).
    Now(Decision),
    /// Wait for this future (a Redis round trip, bounded by its timeout).
    Later(F),
}

/// A rate limiter the [`RateLimitLayer`](super::RateLimitLayer) can ask about a key:
/// [`LocalLimiter`](super::LocalLimiter) (governor, in this process) or, with the `redis`
/// feature, `RedisLimiter` (shared by every gateway instance).
pub trait Limiter<K>: Send + Sync + 'static {
    /// The future of a [`Check::Later`].
    type Future: Future<Output = Decision> + Send + 'static;
    /// Counts one request of `key` (`None`: the shared bucket of requests without a key).
    fn check(&self, key: Option<&K>) -> Check<Self::Future>;

    /// The bucket of `key` resolved once, for a key that is the same for every request
    /// ([`KeyExtractor::fixed`](super::KeyExtractor::fixed): a route's name), when this
    /// limiter can then decide without looking the key up; `None` (the default, and
    /// `RedisLimiter`) keeps [`check`](Self::check) per request.
    /// [`RateLimitLayer::new`](super::RateLimitLayer::new) asks once.
    fn pin(&self, key: &K) -> Option<Arc<dyn Bucket>> {
        let _ = key;
        None
    }
}

/// One bucket a [`Limiter`] resolved ahead ([`Limiter::pin`]): each request is counted
/// in it directly, with no hash of the key and no table lookup.
pub trait Bucket: fmt::Debug + Send + Sync + 'static {
    /// Counts one request now.
    fn decide(&self) -> Decision;
}
