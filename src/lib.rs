//! # tower-patterns
//!
//! Distributed-systems patterns as composable [`tower`] layers, for axum/hyper services.
//!
//! | pattern | module | example | docs |
//! |---|---|---|---|
//! | failure classification (shared) | [`classify`] | — | `docs/foundation.md` |
//! | replayable request bodies (shared) | [`body::replay`] | — | `docs/foundation.md` |
//! | forwarding to an upstream (shared) | [`proxy`] | `reverse_proxy_min`, `tour` | `docs/foundation.md` |
//! | error → status, mounting in axum/hyper (shared) | [`error`], [`respond`] | `axum_gateway` | `docs/foundation.md` |
//! | client address under any server, trusted proxies (shared) | [`client_addr`] | `axum_gateway` | `docs/foundation.md` |
//! | content chain (STON virtual-host link) | [`chain`] | `content_chain` | `docs/content_chain.md` |
//! | service discovery, self-registration, path routing | [`discovery`], [`route`] | `dynamic_balancer` | `docs/discovery.md` |
//! | circuit breaker with fallback, breaker-gated endpoints | [`breaker`] | `circuit_breaker` | `docs/circuit_breaker.md` |
//! | backup pipe (tee to storage) + edge cache | [`backup`], [`cache`] | `backup_pipe` | `docs/backup_tee.md`, `docs/edge_cache.md` |
//! | gateway metrics (feature `metrics`), request tracing + access log, bulkhead, composition (feature `compose`) | [`telemetry`], [`trace`], [`bulkhead`], `compose` | `api_gateway` | `docs/api_gateway.md` |
//! | authentication: API keys, JWT (HS/RS/ES, JWKS), scopes (feature `auth`) | `auth` | — | `docs/auth.md` |
//! | rate limiting per key, GCRA, local or Redis (features `rate-limit`, `redis`) | `ratelimit` | — | `docs/rate_limit.md` |
//! | load balancing: round robin, weighted, sticky, hash, passive health, retry-next; cluster | [`balance`] | `reverse_proxy`, `p2p_client`, `sticky_sessions`, `cluster` | `docs/balance.md`, `docs/cluster.md` |
//!
//! Every layer uses [`classify`] to decide what a failure is, so "5xx and transport errors"
//! is configured the same way for every pattern. Every layer has a `respond()` form whose
//! error type is `Infallible`, so it mounts directly in axum (`Router::layer`,
//! `route_service`, `fallback_service`) and hyper; [`respond::respond`] does the same for a
//! built service such as [`proxy::Forward`].
//!
//! The guides in the docs column are Markdown files shipped inside the crate package (and
//! kept in the source repository) under `docs/`; they are not part of this API
//! documentation, so they are named rather than linked. Examples run with
//! `cargo run --example <name>` from the package sources.
//!
//! Items behind a cargo feature (`etcd`, `consul`, `object-store`, `auth`, `rate-limit`,
//! `redis`, `metrics`, `compose`) are marked with it here.
//!
//! ```no_run
//! use tower::ServiceBuilder;
//! use tower_patterns::proxy::ForwardBuilder;
//! use tower_patterns::respond::ErrorResponseLayer;
//!
//! # async fn run() -> Result<(), tower_patterns::BoxError> {
//! let forward = ForwardBuilder::new("http://127.0.0.1:3000").build::<hyper::body::Incoming>()?;
//! // Answer 502/504 instead of dropping the connection when the upstream fails.
//! let svc = ServiceBuilder::new().layer(ErrorResponseLayer).service(forward);
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! tower_patterns::server::serve(listener, svc).await?;
//! # Ok(()) }
//! ```
#![warn(missing_docs)]
#![forbid(unsafe_code)]
// Feature badges on docs.rs (which builds with `--cfg docsrs` on nightly). Since Rust 1.92
// `doc_cfg` also labels `#[cfg(feature = ..)]` items by itself; `doc_auto_cfg` was folded
// into it and naming that one now fails the docs.rs build.
#![cfg_attr(docsrs, feature(doc_cfg))]

#[cfg(feature = "auth")]
pub mod auth;
pub mod backup;
pub mod balance;
pub mod body;
pub mod breaker;
pub mod bulkhead;
pub mod cache;
pub mod chain;
pub mod classify;
pub mod client_addr;
#[cfg(feature = "compose")]
pub mod compose;
#[cfg(any(feature = "auth", feature = "tls"))]
mod der;
pub mod discovery;
pub mod error;
mod fields;
pub mod gate;
pub mod proxy;
#[cfg(feature = "rate-limit")]
pub mod ratelimit;
pub mod respond;
pub mod route;
pub mod server;
mod stripe;
pub mod telemetry;
#[cfg(feature = "tls")]
pub mod tls;
pub mod trace;

/// A type-erased error, as in tower.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

// Compiles the README's snippets as doc tests so they cannot rot.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;

// The usage snippets of docs/auth.md and docs/rate_limit.md, compiled the same way.
#[doc = include_str!("../docs/auth.md")]
#[cfg(all(doctest, feature = "auth", feature = "rate-limit", feature = "axum"))]
pub struct AuthDocDoctests;

#[doc = include_str!("../docs/rate_limit.md")]
#[cfg(all(doctest, feature = "redis"))]
pub struct RateLimitDocDoctests;
