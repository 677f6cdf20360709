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
//! | [`FAILURES`] | counter | `route`, `kind` (`status`, `transport`, `timeout`, `other`, `grpc`) |
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
//! `examples/api_gateway/` serves the Prometheus text format.
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

/// Requests seen by a `MetricsLayer` (counter; label `route`).
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

/// Breaker state changes (counter; labels `breaker`, `to`).
pub const BREAKER_TRANSITIONS: &str = "tower_patterns_breaker_transitions_total";
/// A breaker's current state (gauge; label `breaker`): 0 closed, 1 open, 2 half-open,
/// 3 forced open, 4 disabled, 5 metrics only.
pub const BREAKER_STATE: &str = "tower_patterns_breaker_state";
/// Endpoints ejected by passive health (counter; label `endpoint`).
pub const EJECTIONS: &str = "tower_patterns_endpoint_ejections_total";
/// Requests sent again to another endpoint by the balancer (counter).
pub const RETRIES: &str = "tower_patterns_retries_total";
/// Content chain hops to the next link (counter).
pub const CHAIN_HOPS: &str = "tower_patterns_chain_hops_total";
/// Backup copies by outcome (counter; label `outcome`: `committed`, `aborted`, `failed`).
pub const BACKUPS: &str = "tower_patterns_backups_total";
/// Edge cache answers by result (counter; label `result`, the `X-Cache` value: `HIT`,
/// `MISS`, `STALE`, `REVALIDATED`, `COALESCED`).
pub const CACHE: &str = "tower_patterns_cache_requests_total";

/// Records a breaker transition (rare: the name label is copied).
#[inline]
pub fn breaker_transition(name: &str, to: crate::breaker::State) {
    #[cfg(feature = "metrics")]
    {
        let (label, code) = state_label(to);
        ::metrics::counter!(BREAKER_TRANSITIONS, "breaker" => name.to_owned(), "to" => label)
            .increment(1);
        ::metrics::gauge!(BREAKER_STATE, "breaker" => name.to_owned()).set(code);
    }
    #[cfg(not(feature = "metrics"))]
    let _ = (name, to);
}

#[cfg(feature = "metrics")]
fn state_label(s: crate::breaker::State) -> (&'static str, f64) {
    use crate::breaker::State;
    match s {
        State::Closed => ("closed", 0.0),
        State::Open => ("open", 1.0),
        State::HalfOpen => ("half_open", 2.0),
        State::ForcedOpen => ("forced_open", 3.0),
        State::Disabled => ("disabled", 4.0),
        State::MetricsOnly => ("metrics_only", 5.0),
    }
}

/// Records an endpoint ejection (rare: the key is copied).
#[inline]
pub fn endpoint_ejected(endpoint: &dyn std::fmt::Debug) {
    #[cfg(feature = "metrics")]
    {
        // The key's Debug form, without the quotes a string key gets.
        let key = format!("{endpoint:?}");
        let key = key.trim_matches('"').to_owned();
        ::metrics::counter!(EJECTIONS, "endpoint" => key).increment(1);
    }
    #[cfg(not(feature = "metrics"))]
    let _ = endpoint;
}

/// Records a balancer retry (no label: no allocation on the request path).
#[inline]
pub fn retry() {
    #[cfg(feature = "metrics")]
    ::metrics::counter!(RETRIES).increment(1);
}

/// Records a content chain hop (no label: no allocation on the request path).
#[inline]
pub fn chain_hop() {
    #[cfg(feature = "metrics")]
    ::metrics::counter!(CHAIN_HOPS).increment(1);
}

/// Records the end of one backup copy: `committed`, `aborted` (the tee gave up: a sink
/// buffer overflowed, the client or upstream went away) or `failed` (the sink failed).
#[inline]
pub fn backup(outcome: &crate::backup::BackupOutcome) {
    #[cfg(feature = "metrics")]
    {
        use crate::backup::BackupOutcome;
        let label = match outcome {
            BackupOutcome::Committed { .. } => "committed",
            BackupOutcome::Aborted(_) => "aborted",
            BackupOutcome::Failed(_) => "failed",
        };
        ::metrics::counter!(BACKUPS, "outcome" => label).increment(1);
    }
    #[cfg(not(feature = "metrics"))]
    let _ = outcome;
}

/// Records one edge cache answer (`result`: the `X-Cache` value, a fixed set).
#[inline]
pub fn cache(result: &'static str) {
    #[cfg(feature = "metrics")]
    ::metrics::counter!(CACHE, "result" => result).increment(1);
    #[cfg(not(feature = "metrics"))]
    let _ = result;
}
