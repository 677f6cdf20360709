use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tower_layer::Layer;

use super::service::Cache;
use super::store::Store;
use crate::body::tee::TeeStats;

type KeyFn = dyn Fn(&http::request::Parts) -> String + Send + Sync;
type PurgeFn = dyn Fn(&http::request::Parts) -> bool + Send + Sync;

/// Counters of a [`CacheLayer`].
#[derive(Debug, Default)]
pub struct CacheStats {
    pub(crate) hits: AtomicU64,
    pub(crate) misses: AtomicU64,
    pub(crate) stale: AtomicU64,
    pub(crate) bypass: AtomicU64,
    pub(crate) fills: AtomicU64,
    pub(crate) fills_aborted: AtomicU64,
    pub(crate) purges: AtomicU64,
    pub(crate) tee: Arc<TeeStats>,
}

/// A point-in-time copy of [`CacheStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStatsSnapshot {
    /// Answered from a fresh entry.
    pub hits: u64,
    /// Sent upstream (no entry, or an expired one).
    pub misses: u64,
    /// Answered from an expired entry because upstream failed.
    pub stale: u64,
    /// Not cacheable requests (method, `Authorization`), passed through.
    pub bypass: u64,
    /// Responses stored.
    pub fills: u64,
    /// Fills abandoned (body failed, truncated, too large, client gone).
    pub fills_aborted: u64,
    /// Entries removed by `PURGE` or [`CacheLayer::purge`].
    pub purges: u64,
}

impl CacheStats {
    /// Reads every counter.
    pub fn snapshot(&self) -> CacheStatsSnapshot {
        let r = Ordering::Relaxed;
        CacheStatsSnapshot {
            hits: self.hits.load(r),
            misses: self.misses.load(r),
            stale: self.stale.load(r),
            bypass: self.bypass.load(r),
            fills: self.fills.load(r),
            fills_aborted: self.fills_aborted.load(r),
            purges: self.purges.load(r),
        }
    }
}

pub(crate) struct Config {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) key: Arc<KeyFn>,
    pub(crate) purge: Option<Arc<PurgeFn>>,
    pub(crate) default_ttl: Option<Duration>,
    pub(crate) stale_if_error: Duration,
    pub(crate) fill: bool,
    pub(crate) stats: Arc<CacheStats>,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("purge", &self.purge.is_some())
            .field("default_ttl", &self.default_ttl)
            .field("stale_if_error", &self.stale_if_error)
            .finish()
    }
}

/// The edge cache: answers fresh hits, fills misses through the tee, `PURGE`, and serves
/// stale on upstream errors. See the [module docs](super).
#[derive(Clone, Debug)]
pub struct CacheLayer {
    pub(crate) cfg: Arc<Config>,
}

/// Builds a [`CacheLayer`].
pub struct CacheLayerBuilder {
    store: Arc<dyn Store>,
    key: Arc<KeyFn>,
    purge: Option<Arc<PurgeFn>>,
    default_ttl: Option<Duration>,
    stale_if_error: Duration,
    fill: bool,
}

impl fmt::Debug for CacheLayerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CacheLayerBuilder")
            .field("default_ttl", &self.default_ttl)
            .field("stale_if_error", &self.stale_if_error)
            .finish()
    }
}

/// The default cache key: path and query (`/a?b=1`).
pub fn path_and_query_key(parts: &http::request::Parts) -> String {
    parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "/".to_owned())
}

/// The default `PURGE` permission: only clients on a loopback address
/// ([`client_ip`](crate::client_addr::client_ip): behind a trusted proxy, the client it
/// forwarded for, not the proxy). No known address: refused.
pub fn purge_from_loopback(parts: &http::request::Parts) -> bool {
    crate::client_addr::client_ip(&parts.extensions).is_some_and(|ip| ip.is_loopback())
}

impl CacheLayer {
    /// This layer with [`ErrorResponseLayer`](crate::respond::ErrorResponseLayer) on top:
    /// the `Infallible`-error form that mounts directly in axum (`Router::layer`,
    /// `route_layer`) and in hyper; errors become responses with the status each error
    /// stands for. See `docs/foundation.md`, "Mounting in axum".
    pub fn respond(self) -> tower::layer::util::Stack<Self, crate::respond::ErrorResponseLayer> {
        tower::layer::util::Stack::new(self, crate::respond::ErrorResponseLayer)
    }

    /// A cache over `store` with the defaults.
    pub fn new(store: impl Store) -> Self {
        CacheLayer::builder(store).build()
    }

    /// Starts a builder over `store`.
    pub fn builder(store: impl Store) -> CacheLayerBuilder {
        CacheLayerBuilder {
            store: Arc::new(store),
            key: Arc::new(path_and_query_key),
            purge: Some(Arc::new(purge_from_loopback)),
            default_ttl: None,
            stale_if_error: Duration::ZERO,
            fill: true,
        }
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.cfg.store
    }

    /// Removes the entry for `key` (as made by the key function, by default the path and
    /// query); `true` if there was one.
    pub fn purge(&self, key: &str) -> bool {
        let removed = self.cfg.store.remove(key);
        if removed {
            self.cfg.stats.purges.fetch_add(1, Ordering::Relaxed);
            tracing::info!(key, "cache entry purged");
        }
        removed
    }

    /// The counters.
    pub fn stats(&self) -> &Arc<CacheStats> {
        &self.cfg.stats
    }
}

impl CacheLayerBuilder {
    /// Computes the cache key of a request (default [`path_and_query_key`]; add the `Host`
    /// when one cache fronts several sites).
    pub fn key<F>(mut self, f: F) -> Self
    where
        F: Fn(&http::request::Parts) -> String + Send + Sync + 'static,
    {
        self.key = Arc::new(f);
        self
    }

    /// Who may send `PURGE` (default [`purge_from_loopback`]); others get `403`.
    pub fn purge_allowed<F>(mut self, f: F) -> Self
    where
        F: Fn(&http::request::Parts) -> bool + Send + Sync + 'static,
    {
        self.purge = Some(Arc::new(f));
        self
    }

    /// Treat `PURGE` as any other method (passed through); purge with
    /// [`CacheLayer::purge`] only.
    pub fn disable_purge_method(mut self) -> Self {
        self.purge = None;
        self
    }

    /// Lifetime of responses without `Cache-Control`/`Expires` (default: not stored).
    pub fn default_ttl(mut self, ttl: Duration) -> Self {
        self.default_ttl = Some(ttl);
        self
    }

    /// How long past its expiry an entry may still be served when upstream fails (an
    /// error, or a 500/502/503/504). Default zero: never serve stale.
    pub fn stale_if_error(mut self, window: Duration) -> Self {
        self.stale_if_error = window;
        self
    }

    /// Whether a miss fills the store through this layer's own tee (default `true`). Turn
    /// it off when a [`StoreSink`](super::StoreSink) behind a backup tee fills the same
    /// store, so one tee copies to storage and cache at once.
    pub fn fill_on_miss(mut self, yes: bool) -> Self {
        self.fill = yes;
        self
    }

    /// Builds the layer.
    pub fn build(self) -> CacheLayer {
        CacheLayer {
            cfg: Arc::new(Config {
                store: self.store,
                key: self.key,
                purge: self.purge,
                default_ttl: self.default_ttl,
                stale_if_error: self.stale_if_error,
                fill: self.fill,
                stats: Arc::default(),
            }),
        }
    }
}

impl<S> Layer<S> for CacheLayer {
    type Service = Cache<S>;

    fn layer(&self, inner: S) -> Cache<S> {
        Cache::from_parts(inner, self.cfg.clone())
    }
}
