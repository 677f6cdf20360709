//! Bulkhead: a maximum of concurrent calls per service, a bounded queue with a maximum wait.
//!
//! One slow service must not take every connection, task and socket of the gateway with
//! it (Hystrix's "limit the calls to a service", the ship's watertight compartments). A
//! [`BulkheadLayer`] per service admits at most `max_concurrent` calls at a time; up to
//! `max_queue` more wait at most `max_wait` for a slot; anything beyond is refused **at
//! once** with [`BulkheadFull`] (503), so the caller's resources are never held by a
//! service that is already saturated.
//!
//! | situation | behaviour |
//! |---|---|
//! | under the limit | admitted: a slot taken and given back with atomics only (no lock, no allocation; a slot goes back through the semaphore's lock only when a call is queued for it) |
//! | at the limit, queue not full | waits for a slot, at most `max_wait` |
//! | waited `max_wait` | [`BulkheadFull`] `QueueTimeout` → 503 |
//! | at the limit, queue full | [`BulkheadFull`] `QueueFull` → 503 at once |
//! | call cancelled while queued | leaves the queue, nothing held |
//! | slot release | when the response future completes or is dropped (the response head) |
//!
//! A rejection is the gateway protecting itself, not the service failing: it is a
//! [`FailureKind::Client`](crate::classify::FailureKind::Client), which the breaker,
//! passive health and retries never charge to an upstream. Rejections are counted in
//! [`telemetry::BULKHEAD_REJECTED`](crate::telemetry::BULKHEAD_REJECTED).
//!
//! The limit is taken in `call`, not `poll_ready`: the service stays always ready and
//! can be cloned freely (axum clones per request) with all clones sharing one bulkhead.
//!
//! ```
//! use std::time::Duration;
//! use tower_patterns::bulkhead::BulkheadLayer;
//! let layer = BulkheadLayer::new("payments", 32)
//!     .max_queue(64)
//!     .max_wait(Duration::from_millis(50));
//! # let _ = layer;
//! ```

mod error;
mod future;
mod layer;
mod service;

pub use error::{BulkheadFull, Rejection};
pub use future::ResponseFuture;
pub use layer::{BulkheadLayer, DEFAULT_MAX_WAIT};
pub use service::Bulkhead;
