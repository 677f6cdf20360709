use std::fmt;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tower_layer::Layer;

use super::fleet::Fleet;
use super::flight::Flights;
use super::purge::index::{Indexed, TagIndex, DEFAULT_INDEX_BYTES};
use super::purge::log::DEFAULT_LOG_BYTES;
use super::purge::{CatchUp, Purger};
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
    pub(crate) coalesced: AtomicU64,
    pub(crate) lock_timeouts: AtomicU64,
    pub(crate) revalidated: AtomicU64,
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
    /// Misses that followed another request's origin fetch instead of making their own
    /// (request coalescing).
    pub coalesced: u64,
    /// Followers that waited past the lock timeout and went to the origin themselves.
    pub lock_timeouts: u64,
    /// Stale entries the origin confirmed with `304` (refreshed without a body).
    pub revalidated: u64,
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
            coalesced: self.coalesced.load(r),
            lock_timeouts: self.lock_timeouts.load(r),
            revalidated: self.revalidated.load(r),
        }
    }
}

/// What the layer does with a `PURGE` request.
#[derive(Clone)]
pub(crate) enum PurgeMode {
    /// Not configured (the default): `405`. Anyone who can reach the cache could
    /// otherwise empty it, and behind a proxy on the same host every client is loopback.
    Refuse,
    /// Allowed when every rule passes, otherwise `403`.
    Rules(Vec<Arc<PurgeFn>>),
    /// Not handled: passed to the inner service like any other method.
    PassThrough,
}

pub(crate) struct Config {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) key: Arc<KeyFn>,
    pub(crate) purge: PurgeMode,
    pub(crate) default_ttl: Option<Duration>,
    pub(crate) stale_if_error: Duration,
    pub(crate) fill: bool,
    /// Request coalescing: `None` when off, else the lock timeout.
    pub(crate) coalesce: Option<Duration>,
    pub(crate) flights: Arc<Flights>,
    pub(crate) stats: Arc<CacheStats>,
    /// Fleet purge: tag index, purge log, peers (see `purge`).
    pub(crate) purger: Arc<Purger>,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("purge", &matches!(self.purge, PurgeMode::Rules(_)))
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
    purge: PurgeMode,
    default_ttl: Option<Duration>,
    stale_if_error: Duration,
    fill: bool,
    coalesce: Option<Duration>,
    fleet: Option<Fleet>,
    index_bytes: usize,
    log_bytes: usize,
}

/// The default lock timeout of request coalescing: nginx's `proxy_cache_lock_timeout`.
pub const DEFAULT_LOCK_TIMEOUT: Duration = Duration::from_secs(5);

impl fmt::Debug for CacheLayerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CacheLayerBuilder")
            .field("default_ttl", &self.default_ttl)
            .field("stale_if_error", &self.stale_if_error)
            .finish()
    }
}

/// Path and query only (`/a?b=1`): a key for a cache that fronts exactly one site. Not
/// the default: with several virtual hosts one host's object would be served for another.
pub fn path_and_query_key(parts: &http::request::Parts) -> String {
    parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "/".to_owned())
}

/// The default cache key: the request's authority, lower-cased, then path and query
/// (`example.com/a?b=1`); just the path and query when the request names no authority.
/// See [`request_authority`].
pub fn authority_key(parts: &http::request::Parts) -> String {
    let path = path_and_query_key(parts);
    match request_authority(parts) {
        Some(a) => a + &path,
        None => path,
    }
}

/// The authority a request is for: the URI's (absolute form, RFC 9112 §3.2.2), else the
/// `Host` header; lower-cased, with every byte that is not visible ASCII (or is `%` or
/// `/`) written as `%XX`, so two different hosts never give the same string and a host
/// can never reach into the path part of a key.
pub fn request_authority(parts: &http::request::Parts) -> Option<String> {
    let raw: &[u8] = match parts.uri.authority() {
        Some(a) => a.as_str().as_bytes(),
        None => parts.headers.get(http::header::HOST)?.as_bytes(),
    };
    if raw.is_empty() {
        return None;
    }
    let mut out = String::with_capacity(raw.len());
    for &b in raw {
        if b.is_ascii_graphic() && b != b'%' && b != b'/' {
            out.push(b.to_ascii_lowercase() as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    Some(out)
}

/// A `PURGE` rule for [`CacheLayerBuilder::purge_allowed`]: clients on a loopback address
/// ([`client_ip`](crate::client_addr::client_ip): behind a trusted proxy of a
/// [`ClientAddrLayer`](crate::client_addr::ClientAddrLayer), the client it forwarded for,
/// not the proxy). No known address: refused.
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
            key: Arc::new(authority_key),
            purge: PurgeMode::Refuse,
            default_ttl: None,
            stale_if_error: Duration::ZERO,
            fill: true,
            coalesce: Some(DEFAULT_LOCK_TIMEOUT),
            fleet: None,
            index_bytes: DEFAULT_INDEX_BYTES,
            log_bytes: DEFAULT_LOG_BYTES,
        }
    }

    /// The store (wrapped so that what is stored reaches the surrogate-key index: give
    /// this one, not the store passed to the builder, to a [`StoreSink`](super::StoreSink)).
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.cfg.store
    }

    /// Removes the entry for `key` (as made by the key function, by default
    /// [`authority_key`]: `host/path?query`, or `/path?query` for requests without an
    /// authority); `true` if there was one.
    pub fn purge(&self, key: &str) -> bool {
        let removed = self.cfg.store.remove(key);
        if removed {
            self.cfg.stats.purges.fetch_add(1, Ordering::Relaxed);
            tracing::info!(key, "cache entry purged");
        }
        removed
    }

    /// Asks every peer of the [fleet](CacheLayerBuilder::fleet) for the purges in its
    /// log that this node has not applied yet, and applies them: run it when a node
    /// starts (its disk tier may hold objects purged while it was down) or comes back
    /// from a partition; [`CacheLayer::spawn_catch_up`] does it periodically. Without a
    /// fleet it does nothing.
    pub async fn catch_up(&self) -> CatchUp {
        super::purge::catch_up(&self.cfg).await
    }

    /// Spawns a task that runs [`CacheLayer::catch_up`] now and then every `every`
    /// (at least 100 ms); abort the handle to stop it.
    pub fn spawn_catch_up(&self, every: Duration) -> tokio::task::JoinHandle<()> {
        tokio::spawn(super::purge::catch_up_every(self.cfg.clone(), every))
    }

    /// The [sibling lookup](super::sibling) layer for this cache: put it *under* the
    /// cache (`.layer(cache.clone()).layer(cache.siblings())`), so a miss asks the node
    /// owning the key before the origin. Without a fleet it passes every request on.
    pub fn siblings(&self) -> super::SiblingLayer {
        super::SiblingLayer {
            fleet: self.cfg.purger.fleet.clone(),
            key: self.cfg.key.clone(),
            purger: self.cfg.purger.clone(),
        }
    }

    /// The fleet, if one was configured.
    pub fn fleet(&self) -> Option<&Fleet> {
        self.cfg.purger.fleet.as_ref()
    }

    /// The counters.
    pub fn stats(&self) -> &Arc<CacheStats> {
        &self.cfg.stats
    }

    /// Origin fetches that other requests are following right now (request coalescing).
    pub fn flights_in_progress(&self) -> usize {
        self.cfg.flights.len()
    }
}

impl CacheLayerBuilder {
    /// Computes the cache key of a request (default [`authority_key`]: host, path and
    /// query; [`path_and_query_key`] for a cache in front of a single site).
    pub fn key<F>(mut self, f: F) -> Self
    where
        F: Fn(&http::request::Parts) -> String + Send + Sync + 'static,
    {
        self.key = Arc::new(f);
        self
    }

    /// Keys on the authority, the path and only the query parameters named in `keep`
    /// (sorted by name, then value, so `?b=2&a=1` and `?a=1&b=2` share an entry; every
    /// other parameter — tracking ids, cache busters — is ignored). Parameters are
    /// compared as sent (not percent-decoded).
    pub fn key_query_params<I, P>(self, keep: I) -> Self
    where
        I: IntoIterator<Item = P>,
        P: Into<String>,
    {
        let keep: Vec<String> = keep.into_iter().map(Into::into).collect();
        self.key(move |parts| {
            let mut kept: Vec<&str> = parts
                .uri
                .query()
                .unwrap_or("")
                .split('&')
                .filter(|p| {
                    let name = p.split('=').next().unwrap_or("");
                    keep.iter().any(|k| k == name)
                })
                .collect();
            kept.sort_unstable();
            let mut key = request_authority(parts).unwrap_or_default();
            key.push_str(parts.uri.path());
            if !kept.is_empty() {
                key.push('?');
                key.push_str(&kept.join("&"));
            }
            key
        })
    }

    /// Adds a rule a `PURGE` must pass (for example [`purge_from_loopback`]). Without
    /// any rule `PURGE` is refused with `405`; with rules, a request that fails one gets
    /// `403`. Rules combine: every one must pass.
    pub fn purge_allowed<F>(mut self, f: F) -> Self
    where
        F: Fn(&http::request::Parts) -> bool + Send + Sync + 'static,
    {
        let rule: Arc<PurgeFn> = Arc::new(f);
        match &mut self.purge {
            PurgeMode::Rules(rules) => rules.push(rule),
            other => *other = PurgeMode::Rules(vec![rule]),
        }
        self
    }

    /// Allows `PURGE` with the header `name` carrying exactly `token` (compared as bytes,
    /// in time independent of where they differ). An empty token matches nothing.
    pub fn purge_token(self, name: http::HeaderName, token: impl Into<Vec<u8>>) -> Self {
        let token: Vec<u8> = token.into();
        self.purge_allowed(move |parts| {
            !token.is_empty()
                && parts
                    .headers
                    .get(&name)
                    .is_some_and(|v| constant_time_eq(v.as_bytes(), &token))
        })
    }

    /// Joins a fleet of edge nodes (see [`Fleet`]): a client's `PURGE` is fanned out to
    /// every other instance, purges are logged for [`CacheLayer::catch_up`], and
    /// [`CacheLayer::siblings`] asks the node owning a key before the origin.
    pub fn fleet(mut self, fleet: Fleet) -> Self {
        self.fleet = Some(fleet);
        self
    }

    /// Bound of the surrogate-key index (default 16 MiB). Past it, tag purges scan the
    /// store instead (and the scan rebuilds the index when it fits again).
    pub fn surrogate_key_index_bytes(mut self, bytes: usize) -> Self {
        self.index_bytes = bytes;
        self
    }

    /// Bound of the purge log (default 8 MiB, tens of thousands of purges). A node that
    /// missed more than a peer's log holds empties its store when it catches up.
    pub fn purge_log_bytes(mut self, bytes: usize) -> Self {
        self.log_bytes = bytes;
        self
    }

    /// Allows `PURGE` only from these client addresses
    /// ([`client_ip`](crate::client_addr::client_ip): behind a trusted proxy of a
    /// [`ClientAddrLayer`](crate::client_addr::ClientAddrLayer), the client it forwarded
    /// for; a request without an address is refused).
    pub fn purge_from(self, ips: impl IntoIterator<Item = IpAddr>) -> Self {
        let ips: Vec<IpAddr> = ips.into_iter().collect();
        self.purge_allowed(move |parts| {
            crate::client_addr::client_ip(&parts.extensions).is_some_and(|ip| ips.contains(&ip))
        })
    }

    /// Treat `PURGE` as any other method (passed through); purge with
    /// [`CacheLayer::purge`] only.
    pub fn disable_purge_method(mut self) -> Self {
        self.purge = PurgeMode::PassThrough;
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

    /// Request coalescing (default on, like nginx `proxy_cache_lock`): concurrent misses
    /// for one key make one origin request and the others stream its response. A follower
    /// waits at most `lock_timeout` for the response head (default
    /// [`DEFAULT_LOCK_TIMEOUT`], 5 s), then goes to the origin itself without storing.
    /// Only applies when this layer fills the store ([`Self::fill_on_miss`]).
    pub fn lock_timeout(mut self, lock_timeout: Duration) -> Self {
        self.coalesce = Some(lock_timeout);
        self
    }

    /// Turns request coalescing off: every miss goes to the origin.
    pub fn no_coalescing(mut self) -> Self {
        self.coalesce = None;
        self
    }

    /// Builds the layer.
    pub fn build(self) -> CacheLayer {
        let index = Arc::new(TagIndex::new(self.index_bytes));
        let store: Arc<dyn Store> = Arc::new(Indexed {
            inner: self.store,
            index: index.clone(),
        });
        CacheLayer {
            cfg: Arc::new(Config {
                purger: Arc::new(Purger::new(index, self.log_bytes, self.fleet)),
                store,
                key: self.key,
                purge: self.purge,
                default_ttl: self.default_ttl,
                stale_if_error: self.stale_if_error,
                fill: self.fill,
                coalesce: self.coalesce,
                flights: Arc::default(),
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

/// Byte equality whose time does not depend on where the inputs differ (only on their
/// lengths), so a `PURGE` token cannot be guessed byte by byte from response times.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
