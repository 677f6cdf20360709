//! The [`RateLimitLayer`].

use std::sync::Arc;

use tower_layer::Layer;

use super::key::KeyExtractor;
use super::limiter::{Bucket, Limiter};
use super::service::RateLimit;

/// Limits the requests of the services it wraps per key: `K` picks the key
/// ([`ClientIpKey`](super::ClientIpKey), [`RouteKey`](super::RouteKey), `IdentityKey`,
/// ...), `L` decides ([`LocalLimiter`](super::LocalLimiter), `RedisLimiter`).
///
/// Every service made by one layer shares the limiter (clones share state).
#[derive(Debug)]
pub struct RateLimitLayer<K, L> {
    pub(crate) key: K,
    pub(crate) limiter: Arc<L>,
    /// The bucket of a fixed key ([`KeyExtractor::fixed`]), resolved here once.
    pub(crate) pinned: Option<Arc<dyn Bucket>>,
}

impl<K: Clone, L> Clone for RateLimitLayer<K, L> {
    fn clone(&self) -> Self {
        RateLimitLayer {
            key: self.key.clone(),
            limiter: self.limiter.clone(),
            pinned: self.pinned.clone(),
        }
    }
}

impl<K: KeyExtractor, L: Limiter<K::Key>> RateLimitLayer<K, L> {
    /// Counts each request under `key(request)` with `limiter`. A fixed key (a
    /// [`RouteKey`](super::RouteKey)) has its bucket resolved here, once.
    pub fn new(key: K, limiter: L) -> Self {
        let pinned = key.fixed().and_then(|k| limiter.pin(k));
        RateLimitLayer {
            key,
            limiter: Arc::new(limiter),
            pinned,
        }
    }

    /// The limiter.
    pub fn limiter(&self) -> &L {
        &self.limiter
    }

    /// This layer with [`ErrorResponseLayer`](crate::respond::ErrorResponseLayer) on top:
    /// the `Infallible`-error form for axum and hyper (its own `429`/`503` are already
    /// responses). See `docs/foundation.md`, "Mounting in axum".
    pub fn respond(self) -> tower::layer::util::Stack<Self, crate::respond::ErrorResponseLayer> {
        tower::layer::util::Stack::new(self, crate::respond::ErrorResponseLayer)
    }
}

impl<S, K: Clone, L> Layer<S> for RateLimitLayer<K, L> {
    type Service = RateLimit<S, K, L>;
    fn layer(&self, inner: S) -> Self::Service {
        RateLimit {
            inner,
            key: self.key.clone(),
            limiter: self.limiter.clone(),
            pinned: self.pinned.clone(),
        }
    }
}
