//! The Prometheus recorder as a long-running gateway needs it. `install_recorder` leaves
//! the histogram upkeep to the caller, and without it the recorder's buffers grow with
//! every request until a scrape; [`install`] drains them every 5 s on a thread of its own
//! (what the exporter's own HTTP listener does).
//!
//! Included by `reverse_proxy` (`common/prometheus.rs`) and `api_gateway`
//! (`../common/prometheus.rs`) with `#[path]`.

use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tower_patterns::BoxError;

/// Installs the global recorder (before any layer registers its handles) and starts its
/// upkeep. Call once per process.
pub fn install() -> Result<PrometheusHandle, BoxError> {
    let prometheus = PrometheusBuilder::new().install_recorder()?;
    let upkeep = prometheus.clone();
    std::thread::Builder::new()
        .name("prometheus-upkeep".into())
        .spawn(move || loop {
            std::thread::sleep(Duration::from_secs(5));
            upkeep.run_upkeep();
        })?;
    Ok(prometheus)
}
