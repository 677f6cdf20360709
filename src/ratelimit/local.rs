//! [`LocalLimiter`]: GCRA per key in this process, through governor.

use std::collections::HashMap;
use std::fmt;
use std::hash::Hash;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use governor::clock::{Clock, QuantaClock};
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};

use super::limiter::{Bucket, Check, Decision, Limiter};
use super::store::BoundedStore;

/// Default of [`LocalLimiterBuilder::max_keys`].
pub const DEFAULT_MAX_KEYS: usize = 100_000;
/// Default of [`LocalLimiterBuilder::evict_every`].
pub const DEFAULT_EVICT_EVERY: Duration = Duration::from_secs(60);

type Keyed<K, C> = RateLimiter<K, BoundedStore<K>, C, NoOpMiddleware<<C as Clock>::Instant>>;
type Unkeyed<C> = RateLimiter<NotKeyed, InMemoryState, C, NoOpMiddleware<<C as Clock>::Instant>>;

/// The keyed buckets, and the one bucket shared by requests without a key (kept apart so
/// the keyed path hashes and borrows the key as it is: no `Option` wrapper, no clone).
struct Inner<K: Hash + Eq + Clone, C: Clock> {
    keyed: Keyed<K, C>,
    unkeyed: Unkeyed<C>,
    /// Makes a fixed key's bucket: the quota and a clone of the clock (built where the
    /// clock is known to be `Clone`).
    new_bucket: Box<dyn Fn() -> Unkeyed<C> + Send + Sync>,
    /// The buckets of fixed keys ([`Limiter::pin`]: a route's name), one per key, made
    /// when a layer is built (the lock is never taken per request). Outside the keyed
    /// table: never evicted, not counted in `max_keys` (one per configured route).
    pins: Mutex<HashMap<K, Arc<Pinned<C>>>>,
}

/// The bucket of one fixed key: governor's direct limiter, the same GCRA and quota as a
/// keyed bucket.
struct Pinned<C: Clock>(Unkeyed<C>);

impl<C: Clock> fmt::Debug for Pinned<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("LocalLimiter bucket")
    }
}

impl<C> Bucket for Pinned<C>
where
    C: Clock + Send + Sync + 'static,
    C::Instant: Send + Sync,
{
    fn decide(&self) -> Decision {
        decision(self.0.check(), self.0.clock())
    }
}

/// governor's answer as a [`Decision`].
fn decision<C: Clock>(checked: Result<(), governor::NotUntil<C::Instant>>, clock: &C) -> Decision {
    match checked {
        Ok(()) => Decision::Allow,
        Err(not_until) => Decision::Deny {
            retry_after: not_until.wait_time_from(clock.now()),
        },
    }
}

/// GCRA rate limiting per key, in this process ([`governor`]).
///
/// - state is one 8-byte atomic per key in a sharded map, updated without a lock;
/// - at most [`max_keys`](LocalLimiterBuilder::max_keys) keys (default [`DEFAULT_MAX_KEYS`]); new keys
///   beyond it share one overflow bucket;
/// - idle keys (whose bucket is full again, so forgetting them changes nothing) are evicted
///   every [`evict_every`](LocalLimiterBuilder::evict_every) (default 60 s) by a tokio task that stops with
///   the last clone, or on demand with [`evict_idle`](Self::evict_idle).
///
/// The clock is governor's `QuantaClock`; [`TokioClock`](super::TokioClock) follows
/// tokio's paused test time.
pub struct LocalLimiter<K: Hash + Eq + Clone, C: Clock = QuantaClock> {
    inner: Arc<Inner<K, C>>,
}

impl<K: Hash + Eq + Clone, C: Clock> Clone for LocalLimiter<K, C> {
    fn clone(&self) -> Self {
        LocalLimiter {
            inner: self.inner.clone(),
        }
    }
}

impl<K: Hash + Eq + Clone, C: Clock> fmt::Debug for LocalLimiter<K, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalLimiter")
            .field("keys", &self.inner.keyed.len())
            .finish_non_exhaustive()
    }
}

/// Builds a [`LocalLimiter`].
#[derive(Debug, Clone)]
pub struct LocalLimiterBuilder<C = QuantaClock> {
    quota: Quota,
    clock: C,
    max_keys: usize,
    evict_every: Option<Duration>,
}

impl LocalLimiter<()> {
    /// A builder for a limiter of `quota` per key (`Quota::per_second(n).allow_burst(b)`,
    /// ...); the key type is fixed by [`LocalLimiterBuilder::build`].
    pub fn builder(quota: Quota) -> LocalLimiterBuilder {
        LocalLimiterBuilder {
            quota,
            clock: QuantaClock::default(),
            max_keys: DEFAULT_MAX_KEYS,
            evict_every: Some(DEFAULT_EVICT_EVERY),
        }
    }
}

impl<K: Hash + Eq + Clone + Send + Sync + 'static> LocalLimiter<K> {
    /// A limiter of `quota` per key with the defaults (needs a tokio runtime for the
    /// eviction task; without one, call [`evict_idle`](Self::evict_idle) yourself).
    pub fn new(quota: Quota) -> Self {
        LocalLimiter::builder(quota).build()
    }
}

impl<C> LocalLimiterBuilder<C> {
    /// Another clock ([`TokioClock`](super::TokioClock) for tests).
    pub fn clock<C2: Clock>(self, clock: C2) -> LocalLimiterBuilder<C2> {
        LocalLimiterBuilder {
            quota: self.quota,
            clock,
            max_keys: self.max_keys,
            evict_every: self.evict_every,
        }
    }
    /// Most keys with their own state (at least 1).
    pub fn max_keys(mut self, n: usize) -> Self {
        self.max_keys = n.max(1);
        self
    }
    /// How often idle keys are evicted (`None`: only by [`LocalLimiter::evict_idle`]);
    /// at least 1 s.
    pub fn evict_every(mut self, every: Option<Duration>) -> Self {
        self.evict_every = every.map(|e| e.max(Duration::from_secs(1)));
        self
    }

    /// Builds the limiter and, inside a tokio runtime, starts the eviction task.
    pub fn build<K>(self) -> LocalLimiter<K, C>
    where
        K: Hash + Eq + Clone + Send + Sync + 'static,
        C: Clock + Clone + Send + Sync + 'static,
    {
        let bucket_clock = self.clock.clone();
        let inner = Arc::new(Inner {
            keyed: RateLimiter::new(
                self.quota,
                BoundedStore::new(self.max_keys),
                self.clock.clone(),
            ),
            unkeyed: RateLimiter::direct_with_clock(self.quota, self.clock),
            new_bucket: Box::new(move || {
                RateLimiter::direct_with_clock(self.quota, bucket_clock.clone())
            }),
            pins: Mutex::new(HashMap::new()),
        });
        if let (Some(every), Ok(rt)) = (self.evict_every, tokio::runtime::Handle::try_current()) {
            rt.spawn(evict_loop(Arc::downgrade(&inner), every));
        }
        LocalLimiter { inner }
    }
}

async fn evict_loop<K, C>(weak: Weak<Inner<K, C>>, every: Duration)
where
    K: Hash + Eq + Clone,
    C: Clock,
{
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(inner) = weak.upgrade() else { return };
        inner.keyed.retain_recent();
        inner.keyed.shrink_to_fit();
    }
}

impl<K: Hash + Eq + Clone, C: Clock> LocalLimiter<K, C> {
    /// Counts one request of `key` now.
    pub fn decide(&self, key: Option<&K>) -> Decision {
        let checked = match key {
            Some(k) => self.inner.keyed.check_key(k),
            None => self.inner.unkeyed.check(),
        };
        decision(checked, self.inner.keyed.clock())
    }

    /// Drops the keys whose bucket is full again; returns how many keys remain.
    pub fn evict_idle(&self) -> usize {
        self.inner.keyed.retain_recent();
        self.inner.keyed.shrink_to_fit();
        self.inner.keyed.len()
    }

    /// Keys with their own state now.
    pub fn len(&self) -> usize {
        self.inner.keyed.len()
    }

    /// `true` when no key has state.
    pub fn is_empty(&self) -> bool {
        self.inner.keyed.is_empty()
    }
}

impl<K, C> Limiter<K> for LocalLimiter<K, C>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    C: Clock + Send + Sync + 'static,
    C::Instant: Send + Sync,
{
    type Future = std::future::Ready<Decision>;
    #[inline]
    fn check(&self, key: Option<&K>) -> Check<Self::Future> {
        Check::Now(self.decide(key))
    }

    fn pin(&self, key: &K) -> Option<Arc<dyn Bucket>> {
        // A poisoned lock (a panic while another layer was built) only costs the fast
        // path: the layer then checks per request.
        let mut pins = self.inner.pins.lock().ok()?;
        let bucket = pins
            .entry(key.clone())
            .or_insert_with(|| Arc::new(Pinned((self.inner.new_bucket)())));
        Some(bucket.clone() as Arc<dyn Bucket>)
    }
}
