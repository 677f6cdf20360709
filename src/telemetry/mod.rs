//! Gateway metrics through the [`metrics`](https://docs.rs/metrics) facade.
//!
//! An API gateway has to answer "what is the error rate, the mean and maximum latency, the
//! call count of each route?" (PATTERNS §7). Answering it per route needs counters that (a)
//! count a failure exactly when the breaker and the balancer do — one [`Classify`] for all,
//! so "error rate" means one thing everywhere — and (b) never grow with client input: a
//! label built from a raw path lets any client create unbounded time series.
//!
//! `MetricsLayer` (feature `metrics`) records, per configured route name:
//!
//! | metric | kind | labels |
//! |---|---|---|
//! | [`REQUESTS`] | counter | `route` |
//! | [`FAILURES`] | counter | `route`, `kind` (`status`, `transport`, `timeout`, `other`) |
//! | [`DURATION`] | histogram, seconds to the response head | `route` |
//! | [`IN_FLIGHT`] | gauge | `route` |
//!
//! Labels are the name given to the layer and a fixed set of kinds, never a path, a header
//! or a status received from a client. Per endpoint, `MetricsLayer::endpoint` adds an
//! `endpoint` label (the instance id), and `metered` wraps every endpoint a
//! registry-fed balancer makes. The handles are registered once when the layer is
//! built, so the per-request cost is a few atomic operations and no label hashing; install
//! the recorder (exporter) before building the layers.
//!
//! The other patterns report through the functions of this module (for example
//! [`bulkhead_rejected`]): each is a single call at its site and compiles to nothing
//! without the `metrics` feature.
//!
//! The user chooses the exporter (`metrics-exporter-prometheus`, statsd, ...);
//! `examples/api_gateway.rs` serves the Prometheus text format.
//!
//! [`Classify`]: crate::classify::Classify

#[cfg(feature = "metrics")]
mod future;
#[cfg(feature = "metrics")]
mod layer;
#[cfg(feature = "metrics")]
mod service;

#[cfg(feature = "metrics")]
pub use future::ResponseFuture;
#[cfg(feature = "metrics")]
pub use layer::MetricsLayer;
#[cfg(feature = "metrics")]
pub use layer::{metered, Metered};
#[cfg(feature = "metrics")]
pub use service::Metrics;

/// Requests seen by a [`MetricsLayer`] (counter; label `route`).
pub const REQUESTS: &str = "tower_patterns_requests_total";
/// Requests the layer's classifier counted as failures (counter; labels `route`, `kind`).
pub const FAILURES: &str = "tower_patterns_request_failures_total";
/// Seconds from the call to the response head or the error (histogram; label `route`).
pub const DURATION: &str = "tower_patterns_request_duration_seconds";
/// Requests in progress (gauge; label `route`).
pub const IN_FLIGHT: &str = "tower_patterns_requests_in_flight";
/// Calls a bulkhead refused (counter; labels `bulkhead`, `reason`: `queue_full`, `queue_timeout`).
pub const BULKHEAD_REJECTED: &str = "tower_patterns_bulkhead_rejected_total";

/// Counts one call refused by the bulkhead `name` (`reason` is one of a fixed set).
#[inline]
pub fn bulkhead_rejected(name: &str, reason: &'static str) {
    #[cfg(feature = "metrics")]
    ::metrics::counter!(BULKHEAD_REJECTED, "bulkhead" => name.to_owned(), "reason" => reason)
        .increment(1);
    #[cfg(not(feature = "metrics"))]
    let _ = (name, reason);
}
