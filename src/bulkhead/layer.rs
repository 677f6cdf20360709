//! The [`BulkheadLayer`].

use std::sync::Arc;
use std::time::Duration;

use tower_layer::Layer;

use super::service::{Bulkhead, Shared};

/// The default maximum wait in the queue.
pub const DEFAULT_MAX_WAIT: Duration = Duration::from_millis(100);

/// One bulkhead shared by every service it wraps and by the layer's clones (one layer per
/// protected service, as with the breaker). Configure it before wrapping services: each
/// setter starts a new, empty bulkhead. Errors are [`BoxError`](crate::BoxError)s: the
/// service's own, or a [`BulkheadFull`](super::BulkheadFull) (use
/// [`respond`](Self::respond) for axum).
#[derive(Clone, Debug)]
pub struct BulkheadLayer {
    shared: Arc<Shared>,
}

impl BulkheadLayer {
    /// At most `max_concurrent` calls at a time (at least 1); no queue until
    /// [`max_queue`](Self::max_queue) is set; `name` labels errors and metrics.
    pub fn new(name: impl Into<Arc<str>>, max_concurrent: usize) -> Self {
        BulkheadLayer {
            shared: Arc::new(Shared::new(
                name.into(),
                max_concurrent.max(1),
                0,
                DEFAULT_MAX_WAIT,
            )),
        }
    }

    /// Up to `n` calls wait for a slot (default 0: refuse at once).
    pub fn max_queue(self, n: usize) -> Self {
        let s = &self.shared;
        let shared = Shared::new(s.name.clone(), s.max_concurrent, n, s.max_wait);
        BulkheadLayer {
            shared: Arc::new(shared),
        }
    }

    /// How long a queued call waits at most (default [`DEFAULT_MAX_WAIT`]).
    pub fn max_wait(self, d: Duration) -> Self {
        let s = &self.shared;
        let shared = Shared::new(s.name.clone(), s.max_concurrent, s.max_queue, d);
        BulkheadLayer {
            shared: Arc::new(shared),
        }
    }

    /// This layer with [`ErrorResponseLayer`](crate::respond::ErrorResponseLayer) on top:
    /// the `Infallible` form for axum and hyper.
    pub fn respond(self) -> tower::layer::util::Stack<Self, crate::respond::ErrorResponseLayer> {
        tower::layer::util::Stack::new(self, crate::respond::ErrorResponseLayer)
    }

    /// Calls holding a slot now.
    pub fn in_flight(&self) -> usize {
        self.shared.in_flight()
    }

    /// Calls waiting in the queue now.
    pub fn queued(&self) -> usize {
        self.shared.queued()
    }
}

impl<S> Layer<S> for BulkheadLayer {
    type Service = Bulkhead<S>;
    fn layer(&self, inner: S) -> Bulkhead<S> {
        Bulkhead::new(inner, self.shared.clone())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tower::{service_fn, Layer, Service};

    use super::BulkheadLayer;

    /// An admitted call holds its slot through its service's own handle: the state every
    /// service of the layer (every worker) shares sees no reference-count write per call.
    #[test]
    fn a_call_in_flight_takes_no_reference_on_the_shared_state() {
        let layer = BulkheadLayer::new("t", 4);
        let mut svc = layer.layer(service_fn(|_: ()| async {
            Ok::<_, std::convert::Infallible>(())
        }));
        let mut other = layer.layer(service_fn(|_: ()| async {
            Ok::<_, std::convert::Infallible>(())
        }));
        let before = Arc::strong_count(&layer.shared);
        let a = svc.call(());
        let b = other.call(());
        assert_eq!(layer.in_flight(), 2);
        assert_eq!(Arc::strong_count(&layer.shared), before);
        drop((a, b));
        // The slots went back all the same, into the one bulkhead.
        assert_eq!(layer.in_flight(), 0);
    }
}
