//! # tower-patterns
//!
//! Distributed-systems patterns as composable [`tower`] layers, for axum/hyper services.
//!
//! | pattern | module | example | docs |
//! |---|---|---|---|
//! | failure classification (shared) | [`classify`] | — | `docs/foundation.md` |
//! | replayable request bodies (shared) | [`body::replay`] | — | `docs/foundation.md` |
//! | forwarding to an upstream (shared) | [`proxy`] | `reverse_proxy_min`, `tour` | `docs/foundation.md` |
//! | load balancing: round robin, weighted, sticky, hash, passive health, retry-next; cluster | [`balance`] | `reverse_proxy`, `p2p_client`, `sticky_sessions`, `cluster` | `docs/balance.md`, `docs/cluster.md` |
//!
//! Every layer uses [`classify`] to decide what a failure is, so "5xx and transport errors"
//! is configured the same way for every pattern.
//!
//! ```no_run
//! use tower_patterns::proxy::{error_response, ForwardBuilder};
//! use tower::ServiceExt;
//!
//! # async fn run() -> Result<(), tower_patterns::BoxError> {
//! let forward = ForwardBuilder::new("http://127.0.0.1:3000").build::<hyper::body::Incoming>()?;
//! // Answer 502/504 instead of dropping the connection when the upstream fails.
//! let svc = forward.then(|res| async move {
//!     Ok::<_, std::convert::Infallible>(match res {
//!         Ok(res) => res.map(tower_patterns::body::boxed),
//!         Err(e) => error_response(&e).map(tower_patterns::body::boxed),
//!     })
//! });
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! tower_patterns::server::serve(listener, svc).await?;
//! # Ok(()) }
//! ```
#![warn(missing_docs)]
#![forbid(unsafe_code)]

pub mod balance;
pub mod body;
pub mod classify;
pub mod gate;
pub mod proxy;
pub mod server;

/// A type-erased error, as in tower.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;
