//! The [`RequestTraceLayer`].

use std::sync::Arc;

use tower_layer::Layer;

use super::service::RequestTrace;

/// Trace context, request id and access log for every request of the wrapped service (see
/// the [module docs](super)). The service's errors pass through unchanged as a
/// [`BoxError`](crate::BoxError) (use [`respond`](Self::respond) for axum).
///
/// ```
/// use tower_patterns::trace::RequestTraceLayer;
/// let layer = RequestTraceLayer::new("/api/orders/{id}");
/// # let _ = layer;
/// ```
#[derive(Clone, Debug)]
pub struct RequestTraceLayer {
    route: Arc<str>,
    sampled: bool,
}

impl RequestTraceLayer {
    /// `route` names the requests in the access log: a configured name or route template,
    /// never a value taken from the request.
    pub fn new(route: impl Into<Arc<str>>) -> Self {
        RequestTraceLayer {
            route: route.into(),
            sampled: true,
        }
    }

    /// The sampled flag of traces started here (default `true`); a continued trace keeps
    /// the caller's flags.
    pub fn sampled(mut self, sampled: bool) -> Self {
        self.sampled = sampled;
        self
    }

    /// This layer with [`ErrorResponseLayer`](crate::respond::ErrorResponseLayer) on top:
    /// the `Infallible` form for axum and hyper.
    pub fn respond(self) -> tower::layer::util::Stack<Self, crate::respond::ErrorResponseLayer> {
        tower::layer::util::Stack::new(self, crate::respond::ErrorResponseLayer)
    }
}

impl<S> Layer<S> for RequestTraceLayer {
    type Service = RequestTrace<S>;
    fn layer(&self, inner: S) -> RequestTrace<S> {
        RequestTrace::new(inner, self.route.clone(), self.sampled)
    }
}
