//! Rate limiting per key at the gateway: GCRA through governor, locally or shared in Redis.
//!
//! One client (or one API key, or one buggy batch job) must not take a gateway's whole
//! capacity, and a public route needs a ceiling. [`RateLimitLayer`] counts each request
//! against a key — client address, verified identity (API key name / JWT subject), route —
//! with the generic cell rate algorithm (a token bucket without a refill timer: one
//! timestamp per key), and answers `429 Too Many Requests` with `Retry-After` (whole seconds,
//! rounded up, saturating) over the limit.
//!
//! ```
//! use std::num::NonZeroU32;
//! use tower_patterns::ratelimit::{ClientIpKey, LocalLimiter, Quota, RateLimitLayer};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let per_client = Quota::per_second(NonZeroU32::new(20).unwrap())
//!     .allow_burst(NonZeroU32::new(40).unwrap());
//! let layer = RateLimitLayer::new(ClientIpKey::new(), LocalLimiter::new(per_client));
//! # let _ = layer; }
//! ```
//!
//! | aspect | behaviour |
//! |---|---|
//! | algorithm | GCRA ([`governor`]); [`Quota`]: rate + burst |
//! | keys | [`KeyExtractor`]: [`ClientIpKey`] (IPv6 per /64), [`RouteKey`], `IdentityKey` (feature `auth`), `MatchedPathKey` (feature `axum`), [`FnKey`]; no key → one shared bucket |
//! | state | [`LocalLimiter`]: at most `max_keys` keys (default 100 000; newcomers beyond share an overflow bucket), idle keys evicted every 60 s |
//! | over the limit | `429`, `Retry-After`, [`RateLimited`] in the response extensions |
//! | across instances | `RedisLimiter` (feature `redis`): the same GCRA in one Lua script, Redis's clock, per-call timeout (default 50 ms), on failure the local limiter (or allow / `503`: `OnRedisFailure`) |
//! | hot path (local) | one sharded-map lookup and one atomic compare-exchange; no lock, no allocation for `Copy` keys |
//!
//! See `docs/rate_limit.md`.

mod clock;
mod error;
mod future;
mod key;
mod layer;
mod limiter;
mod local;
#[cfg(feature = "redis")]
mod redis;
mod service;
mod store;

pub use clock::TokioClock;
pub use error::RateLimited;
pub use future::ResponseFuture;
pub use governor::Quota;
#[cfg(feature = "axum")]
pub use key::MatchedPathKey;
pub use key::{ClientIpKey, FnKey, KeyExtractor, RouteKey};
#[cfg(feature = "auth")]
pub use key::{IdentityKey, IdentityName};
pub use layer::RateLimitLayer;
pub use limiter::{Bucket, Check, Decision, Limiter};
pub use local::{LocalLimiter, LocalLimiterBuilder, DEFAULT_EVICT_EVERY, DEFAULT_MAX_KEYS};
#[cfg(feature = "redis")]
pub use redis::{OnRedisFailure, RedisLimiter, RedisLimiterBuilder, RedisLimiterError};
pub use service::RateLimit;
