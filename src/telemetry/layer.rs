//! The [`MetricsLayer`].

use std::sync::Arc;

use tower_layer::Layer;

use super::service::{Handles, Metrics};
use crate::classify::{Classify, Condition};

/// Records requests, failures, latency and in-flight calls of the wrapped service under one
/// configured route name (see the [module docs](super)). The service's errors pass through
/// unchanged as a [`BoxError`](crate::BoxError) (use [`respond`](Self::respond) for axum).
///
/// ```
/// use tower_patterns::classify::Condition;
/// use tower_patterns::telemetry::MetricsLayer;
/// // Install the exporter first: the handles are registered here. Pass the breaker's and
/// // balancer's condition, so a failure means the same thing in all three.
/// let failures: Condition = "5xx,fail".parse().unwrap();
/// let layer = MetricsLayer::new("/api/orders/{id}").classify(failures);
/// # let _ = layer;
/// ```
#[derive(Clone, Debug)]
pub struct MetricsLayer<C = Condition> {
    handles: Arc<Handles>,
    classify: C,
}

impl MetricsLayer {
    /// A layer recording under the label `route = name`; failures are `5xx` and every error
    /// ([`Condition::server_errors_and_failures`], the breaker's and balancer's default).
    ///
    /// `name` must be a configured constant (a route template such as `/api/orders/{id}`,
    /// a service name), never a value taken from a request.
    pub fn new(name: impl Into<String>) -> Self {
        MetricsLayer {
            handles: Arc::new(Handles::register(name.into(), None)),
            classify: Condition::server_errors_and_failures(),
        }
    }

    /// A layer for one endpoint of a service: labels `route = service`, `endpoint = id`
    /// (an instance id from the registry or configuration, never client input). A
    /// registry whose instances come and go creates series for each; let the exporter
    /// expire idle ones (`metrics-exporter-prometheus`'s `idle_timeout`).
    /// [`metered`](super::metered) makes these for every endpoint a balancer discovers.
    pub fn endpoint(service: impl Into<String>, id: &str) -> Self {
        MetricsLayer {
            handles: Arc::new(Handles::register(service.into(), Some(id))),
            classify: Condition::server_errors_and_failures(),
        }
    }
}

impl<C> MetricsLayer<C> {
    /// What counts as a failure: pass the same [`Classify`] as the breaker and balancer.
    pub fn classify<C2: Classify>(self, classify: C2) -> MetricsLayer<C2> {
        MetricsLayer {
            handles: self.handles,
            classify,
        }
    }

    /// The route name this layer records under.
    pub fn name(&self) -> &str {
        &self.handles.name
    }

    /// This layer with [`ErrorResponseLayer`](crate::respond::ErrorResponseLayer) on top:
    /// the `Infallible` form for axum and hyper (`docs/foundation.md`, "Mounting in axum").
    pub fn respond(self) -> tower::layer::util::Stack<Self, crate::respond::ErrorResponseLayer> {
        tower::layer::util::Stack::new(self, crate::respond::ErrorResponseLayer)
    }
}

impl<S, C: Clone> Layer<S> for MetricsLayer<C> {
    type Service = Metrics<S, C>;
    fn layer(&self, inner: S) -> Self::Service {
        // Each service gets its own `Arc` of (clones of) the same handles: the per-request
        // clone and drop of that `Arc` (the in-flight guard) then writes a reference count
        // on a cache line of this service's (one worker's) alone, not on one that every
        // worker of a thread-per-core server writes twice per request. One allocation per
        // `layer` call; the series recorded into are the same.
        Metrics::new(
            inner,
            Arc::new((*self.handles).clone()),
            self.classify.clone(),
        )
    }
}

/// Wraps the endpoints a [`MakeEndpoint`](crate::discovery::MakeEndpoint) makes (e.g. the
/// `Forward` template of [`Watcher::discover`](crate::discovery::Watcher::discover)) in a
/// per-endpoint [`MetricsLayer`] labelled `route = service`, `endpoint = instance id`.
pub fn metered<M>(service: impl Into<String>, make: M) -> Metered<M> {
    Metered {
        service: service.into(),
        make,
    }
}

/// See [`metered`].
#[derive(Clone, Debug)]
pub struct Metered<M> {
    service: String,
    make: M,
}

impl<M: crate::discovery::MakeEndpoint> crate::discovery::MakeEndpoint for Metered<M> {
    type Service = Metrics<M::Service, Condition>;
    type Error = M::Error;
    fn make_endpoint(
        &mut self,
        instance: &crate::discovery::Instance,
    ) -> Result<Self::Service, Self::Error> {
        let svc = self.make.make_endpoint(instance)?;
        Ok(MetricsLayer::endpoint(self.service.clone(), &instance.id).layer(svc))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_service_has_its_own_handles_of_the_same_series() {
        let layer = MetricsLayer::new("r");
        let a = layer.layer(());
        let b = layer.layer(());
        // Not the layer's `Arc`, nor one shared by two services (a per-request reference
        // count on a line every worker writes).
        assert!(!Arc::ptr_eq(a.handles(), b.handles()));
        assert!(!Arc::ptr_eq(a.handles(), &layer.handles));
        // A clone of a service (one worker's connections) shares its service's.
        assert!(Arc::ptr_eq(a.handles(), a.clone().handles()));
        assert_eq!(a.handles().name, "r");
    }
}
