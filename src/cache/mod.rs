//! Edge cache: serve the copy until it expires, fetch and store on a miss, purge fast.
//!
//! **The problem (seed 004, global CDN; seed 000's note on caching outside content).**
//! Every request that goes to the origin — or to an outside service — costs its latency
//! and its load. An edge cache answers the first request from the origin and stores a copy
//! *at the same time* (through the [tee](crate::body::tee)), answers later requests from
//! the copy until it expires, and offers a fast `PURGE` so new content is fetched at once.
//!
//! ```
//! use tower::{service_fn, Service, ServiceBuilder, ServiceExt};
//! use tower_patterns::cache::{CacheLayer, MemoryStore};
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let cache = CacheLayer::new(MemoryStore::new(64 << 20));
//! let origin = service_fn(|_req: http::Request<()>| async {
//!     let res = http::Response::builder()
//!         .header("cache-control", "max-age=60")
//!         .body(http_body_util::Full::new(bytes::Bytes::from("hello")))
//!         .unwrap();
//!     Ok::<_, std::convert::Infallible>(res)
//! });
//! let mut svc = ServiceBuilder::new().layer(cache.clone()).service(origin);
//! let get = || http::Request::get("/a").body(()).unwrap();
//! let first = svc.ready().await.unwrap().call(get()).await.unwrap();
//! assert_eq!(first.headers()["x-cache"], "MISS");
//! http_body_util::BodyExt::collect(first.into_body()).await.unwrap(); // the fill completes
//! # tokio::task::yield_now().await;
//! let second = svc.ready().await.unwrap().call(get()).await.unwrap();
//! assert_eq!(second.headers()["x-cache"], "HIT");
//! assert!(cache.purge("/a"));
//! # });
//! ```
//!
//! | request / response | behaviour |
//! |---|---|
//! | `GET`/`HEAD`, fresh entry | answered from the store; `Age`, `X-Cache: HIT` (`HEAD` gets headers only); the client's `If-None-Match`/`If-Modified-Since` answered `304`; `Range` answered `206` |
//! | `GET`, no entry or expired | forwarded; the response streams to the client and, if cacheable, into the store (`X-Cache: MISS`) |
//! | concurrent misses for one key | **coalesced**: one origin request, the others stream it (`X-Cache: COALESCED`); a follower waits at most [`CacheLayerBuilder::lock_timeout`] (5 s) for the head, then goes to the origin itself; a fill that fails mid-body errors every follower's body |
//! | expired entry with `ETag`/`Last-Modified` (or a client's `no-cache`/`max-age=0`) | **revalidated** with `If-None-Match`/`If-Modified-Since`; a `304` refreshes the entry (headers merged, new lifetime) without a body (`X-Cache: REVALIDATED`) |
//! | expired within `stale-while-revalidate` | the stale copy (`X-Cache: STALE`) while one background request refreshes it |
//! | lifetime | `s-maxage`, else `max-age`, else `Expires − Date`, else [`CacheLayerBuilder::default_ttl`] (default: not stored; only for the heuristically cacheable statuses) |
//! | never stored | `no-store`, `private`, a `Cache-Control` that cannot be read (fail closed), `no-cache`, `Set-Cookie`, `Vary: *` or an unreadable `Vary`, a request with `Cache-Control: no-store`, a response to a request with `Authorization` unless it says `public`/`s-maxage`/`must-revalidate`, other statuses than 200/203/204/300/301/308/404/405/410/414/501, a body over the store's entry limit, a truncated or failed body |
//! | `Vary` | one entry per variant (the named request headers, `Accept-Encoding` normalised) |
//! | `Authorization` | never answered from the cache, never coalesced |
//! | key | [`authority_key`]: host (lower-cased), path and query; [`CacheLayerBuilder::key_query_params`] keeps chosen query parameters only |
//! | `PURGE <path>` | removes the entry: `200` (`404` if none). Refused with `405` unless configured ([`CacheLayerBuilder::purge_bearer`], [`CacheLayerBuilder::purge_from_nets`], [`CacheLayerBuilder::purge_token`], [`CacheLayerBuilder::purge_from`], [`CacheLayerBuilder::purge_allowed`]); `403` when a configured rule fails — or [`CacheLayer::purge`] |
//! | `PURGE /images/*`, `PURGE /` with `Surrogate-Key`/`Cache-Tag` | every key with that prefix; every entry stored with one of the tags (bounded index) — see [`purge`] |
//! | a [`Fleet`] ([`CacheLayerBuilder::fleet`]) | a client's `PURGE` reaches every instance in the registry (hop guard `x-purge-origin`, JSON answer node → status); [`CacheLayer::catch_up`] reads the peers' purge logs so a node that was down misses no purge; [`CacheLayer::siblings`] asks the key's owner node before the origin ([`sibling`]) |
//! | `Cache-Control: only-if-cached` (and sibling lookups) | a fresh entry or `504`, never the origin |
//! | upstream error or 500/502/503/504 with an entry expired less than `stale_if_error` ago (and not `must-revalidate`/`proxy-revalidate`/`s-maxage`) | the old entry, `X-Cache: STALE` |
//! | other methods | passed through |
//! | time | `tokio::time` (tests pause it) |
//!
//! [`StoreSink`] puts the same store behind a [`TeeLayer`](crate::backup::TeeLayer) as one
//! more sink, so one download feeds the client, the storage backup and the cache at once.
//!
//! Storage: [`MemoryStore`] (moka, TinyLFU admission, a byte budget that holds) and, with
//! the `disk-cache` feature, `DiskStore` behind it in a `TieredStore` (survives a restart,
//! crash-safe writes, checksummed reads). See `docs/edge_cache.md`, "Tiers".

mod body;
mod conditional;
mod fill;
mod fleet;
mod flight;
mod future;
mod layer;
mod policy;
pub mod purge;
mod range;
mod service;
pub mod sibling;
mod sink;
mod store;
mod tier;
mod vary;

pub use body::{CacheBody, CacheBodyError};
pub use future::ResponseFuture;
pub use layer::{
    authority_key, path_and_query_key, purge_from_loopback, request_authority, CacheLayer,
    CacheLayerBuilder, CacheStats, CacheStatsSnapshot, DEFAULT_LOCK_TIMEOUT,
};
pub use range::{parse_range, Ranges, MAX_RANGES};
pub use service::{Cache, X_CACHE};
pub use sink::StoreSink;
pub use store::{CachedResponse, Store, StoreLoad};
#[cfg(feature = "disk-cache")]
pub use tier::disk::{DiskStore, DiskStoreStats, DEFAULT_MAX_PENDING, DEFAULT_MAX_TAG_BYTES};
pub use tier::memory::{MemoryStore, MemoryStoreStats, DEFAULT_STALE_GRACE};
#[cfg(feature = "disk-cache")]
pub use tier::TieredStore;
// Fleet purge and sibling lookup (issue 15).
pub use fleet::{Fleet, FleetBuilder, PeerError, DEFAULT_PEER_TIMEOUT, DEFAULT_SIBLING_TIMEOUT};
pub use purge::CatchUp;
pub use sibling::{Sibling, SiblingBody, SiblingLayer};
