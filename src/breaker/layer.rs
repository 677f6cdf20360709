//! The [`CircuitBreakerLayer`].

use std::fmt;

use tower_layer::Layer;

use super::circuit::Circuit;
use super::config::{CircuitBreakerConfig, Mode};
use super::error::{CircuitOpen, ConfigError};
use super::fallback::{FnFallback, NoFallback, ServiceFallback};
use super::service::CircuitBreaker;
use crate::classify::{Classify, Condition};

/// Applies one circuit to every service it wraps: all of them share the same
/// [`Circuit`] (one layer per upstream endpoint).
#[derive(Clone)]
pub struct CircuitBreakerLayer<C = Condition, F = NoFallback> {
    breaker: Circuit,
    classify: C,
    fallback: F,
    mode: Mode,
}

impl<C, F> fmt::Debug for CircuitBreakerLayer<C, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreakerLayer")
            .field("breaker", &self.breaker)
            .field("mode", &self.mode)
            .finish()
    }
}

impl CircuitBreakerLayer {
    /// A layer with a new circuit; failures are `5xx` and every error
    /// ([`Condition::server_errors_and_failures`]); rejections fail fast.
    pub fn new(cfg: CircuitBreakerConfig) -> Result<Self, ConfigError> {
        Ok(Self::from_breaker(Circuit::new(cfg)?))
    }

    /// A layer over an existing circuit (e.g. one the balancer also uses as a gate).
    pub fn from_breaker(breaker: Circuit) -> Self {
        let mode = breaker.config().mode;
        Self {
            breaker,
            classify: Condition::server_errors_and_failures(),
            fallback: NoFallback,
            mode,
        }
    }
}

impl<C, F> CircuitBreakerLayer<C, F> {
    /// This layer with [`ErrorResponseLayer`](crate::respond::ErrorResponseLayer) on top:
    /// the `Infallible`-error form that mounts directly in axum (`Router::layer`,
    /// `route_layer`) and in hyper; errors become responses with the status each error
    /// stands for. See `docs/foundation.md`, "Mounting in axum".
    pub fn respond(self) -> tower::layer::util::Stack<Self, crate::respond::ErrorResponseLayer> {
        tower::layer::util::Stack::new(self, crate::respond::ErrorResponseLayer)
    }

    /// The circuit's handle: state, events, metrics, operator controls.
    pub fn breaker(&self) -> &Circuit {
        &self.breaker
    }

    /// What counts as a failure.
    pub fn classify<C2: Classify>(self, classify: C2) -> CircuitBreakerLayer<C2, F> {
        CircuitBreakerLayer {
            breaker: self.breaker,
            classify,
            fallback: self.fallback,
            mode: self.mode,
        }
    }

    /// Rejected calls go to this service (the [`CircuitOpen`] is in the request
    /// extensions); its body type is its own (the breaker's body becomes
    /// `Either<inner body, fallback body>`).
    pub fn fallback_service<T>(self, svc: T) -> CircuitBreakerLayer<C, ServiceFallback<T>> {
        CircuitBreakerLayer {
            breaker: self.breaker,
            classify: self.classify,
            fallback: ServiceFallback(svc),
            mode: self.mode,
        }
    }

    /// Rejected calls go to `f(request, rejection)`, which answers with a body type of its
    /// own (the breaker's body becomes `Either<inner body, fallback body>`).
    pub fn fallback_fn<G, Req, Fut>(self, f: G) -> CircuitBreakerLayer<C, FnFallback<G>>
    where
        G: Fn(Req, CircuitOpen) -> Fut + Clone,
    {
        CircuitBreakerLayer {
            breaker: self.breaker,
            classify: self.classify,
            fallback: FnFallback(f),
            mode: self.mode,
        }
    }

    /// Reject in `call` or back-pressure in `poll_ready` (overrides the configuration).
    pub fn mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self
    }
}

impl<S, C: Clone, F: Clone> Layer<S> for CircuitBreakerLayer<C, F> {
    type Service = CircuitBreaker<S, C, F>;
    fn layer(&self, inner: S) -> Self::Service {
        CircuitBreaker::new(
            inner,
            self.breaker.clone(),
            self.classify.clone(),
            self.fallback.clone(),
            self.mode,
        )
    }
}
