//! Circuit breaker with fallback, and breaker-gated endpoints.
//!
//! When service B fails, its caller A waits on every call and soon looks failed too. A
//! circuit breaker watches A's calls to B; once B's failures pass a threshold it *opens*
//! and every call fails at once — or a **fallback** answers instead — so B is isolated and
//! A stays responsive. After a wait it lets a few probe calls through (*half-open*) and
//! *closes* again when they show B is healthy (Hystrix, resilience4j).
//!
//! ```
//! use std::time::Duration;
//! use tower::{ServiceBuilder, ServiceExt};
//! use tower_patterns::breaker::{CircuitBreakerConfig, CircuitBreakerLayer, CircuitOpen, Window};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower_patterns::BoxError> {
//! let layer = CircuitBreakerLayer::new(
//!     CircuitBreakerConfig::new()
//!         .name("b")
//!         .failure_rate_threshold(50.0)
//!         // The rate is taken over the window once it holds `minimum_calls` calls: set
//!         // both (with the default 100-call window, old successes dilute new failures).
//!         .window(Window::Count(10))
//!         .minimum_calls(5)
//!         .wait_in_open(Duration::from_secs(10)),
//! )?
//! .fallback_fn(|_req: http::Request<String>, why: CircuitOpen| async move {
//!     Ok::<_, std::convert::Infallible>(http::Response::new(format!("cached answer ({why})")))
//! });
//! let breaker = layer.breaker().clone();
//! let svc = ServiceBuilder::new().layer(layer).service_fn(|_req: http::Request<String>| async {
//!     Ok::<_, std::convert::Infallible>(
//!         http::Response::builder().status(503).body(String::new()).unwrap(),
//!     )
//! });
//! for _ in 0..5 {
//!     let res = svc.clone().oneshot(http::Request::new(String::new())).await?;
//!     assert_eq!(res.status(), 503);
//! }
//! assert_eq!(breaker.state(), tower_patterns::breaker::State::Open);
//! let res = svc.oneshot(http::Request::new(String::new())).await?;
//! // The fallback's own body is on the right of the breaker's body enum.
//! assert!(matches!(res.body(), http_body_util::Either::Right(s) if s.starts_with("cached answer")));
//! # Ok(()) }
//! ```
//!
//! # Semantics
//!
//! | aspect | behaviour |
//! |---|---|
//! | states | closed, open, half-open, plus forced-open, disabled, metrics-only ([`State`]) |
//! | failure | decided by [`crate::classify`] (default `5xx,fail`); `Ignored` outcomes neither count nor consume a permit |
//! | trip | failure rate ≥ threshold, slow-call rate ≥ threshold, or N consecutive failures — any combination; rates only once the window holds the minimum number of calls |
//! | window | count-based (last N calls) or time-based (last N seconds, 1 s buckets) |
//! | open | constant wait or exponential backoff with jitter; half-open entered by the next call (lazy) or by a timer (automatic) |
//! | half-open | N probe permits; extra calls rejected; a cancelled or ignored probe returns its permit; the N results decide by the same thresholds; optional maximum wait, then open again |
//! | rejection | [`CircuitOpen`] error with the remaining open time, or a [`Fallback`] (service or closure) answering with its own body type |
//! | integration | reject in `call` (safe behind `Buffer`) or back-pressure in `poll_ready` ([`Mode`]); [`Circuit`] is a [`Gate`](crate::gate::Gate) for the balancer |
//! | same-state transition | no event; half-open can only be entered from open ([`IllegalTransition`]) |
//! | events | `tracing` (target `tower_patterns::breaker`): transition (info), failure rate exceeded (warn), call not permitted (debug); [`Circuit::subscribe`] watches the state |
//! | hot path | closed state: one atomic load to admit, atomics to record, no lock, no allocation |
//!
//! See `docs/circuit_breaker.md` for the side-by-side table with resilience4j's options.

mod circuit;
mod config;
mod consecutive;
mod error;
mod fallback;
mod future;
mod layer;
mod record;
mod service;
mod state;
mod transition;
mod window;

pub use circuit::Circuit;
pub use config::{
    CircuitBreakerConfig, Mode, WaitStrategy, Window, MAX_HALF_OPEN_PERMITS, MAX_WINDOW_CALLS,
    MAX_WINDOW_SECS,
};
pub use error::{CircuitOpen, ConfigError, IllegalTransition};
pub use fallback::{Fallback, FallbackFuture, FnFallback, NoFallback, Rejected, ServiceFallback};
pub use future::ResponseFuture;
pub use layer::CircuitBreakerLayer;
pub use service::CircuitBreaker;
pub use state::{MetricsSnapshot, Permit, State};
