//! The Prometheus recorder as a long-running gateway needs it. `install_recorder` leaves
//! the histogram upkeep to the caller, and without it the recorder's buffers grow with
//! every request until a scrape; [`install`] drains them every 5 s on a thread of its own
//! (what the exporter's own HTTP listener does).
//!
//!
//! The request latency (`tower_patterns_request_duration_seconds`) is exported as a
//! Prometheus histogram with fixed buckets, not the recorder's default summary: the
//! upkeep folds every recorded sample into the series, and a summary's quantile sketch
//! cost ~1,200 instructions per sample there (a third of the gateway's cost over bare
//! `Forward` as a process, session 15), a bucket a few comparisons. Buckets also add
//! up across gateway instances, where quantiles do not.
//!
//! Included by `reverse_proxy` (`common/prometheus.rs`) and `api_gateway`
//! (`../common/prometheus.rs`) with `#[path]`.

use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tower_patterns::BoxError;

/// Latency buckets in seconds: sub-millisecond for a loopback hop, up to the 10 s of a
/// slow upstream (Prometheus clients' defaults, with 0.5/1/2.5 ms added below).
const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Installs the global recorder (before any layer registers its handles) and starts its
/// upkeep. Call once per process.
pub fn install() -> Result<PrometheusHandle, BoxError> {
    let prometheus = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(tower_patterns::telemetry::DURATION.into()),
            &LATENCY_BUCKETS,
        )?
        .install_recorder()?;
    let upkeep = prometheus.clone();
    std::thread::Builder::new()
        .name("prometheus-upkeep".into())
        .spawn(move || loop {
            std::thread::sleep(Duration::from_secs(5));
            upkeep.run_upkeep();
        })?;
    Ok(prometheus)
}
