//! The [`CircuitBreaker`] service.

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tokio::sync::futures::OwnedNotified;
use tokio::time::{Instant, Sleep};
use tower_service::Service;

use super::circuit::Circuit;
use super::config::Mode;
use super::fallback::{Fallback, NoFallback};
use super::future::{Guard, ResponseFuture};
use super::state::Permit;
use crate::classify::{Classify, Condition};
use crate::BoxError;

/// Wraps a service with a circuit breaker. Built by
/// [`CircuitBreakerLayer`](super::CircuitBreakerLayer).
pub struct CircuitBreaker<S, C = Condition, F = NoFallback> {
    inner: S,
    // Each clone of the service owns its own `Arc` around the shared handle: response
    // futures clone this one, so threads serving different connections never contend on
    // one reference count.
    breaker: Arc<Local>,
    classify: C,
    fallback: F,
    mode: Mode,
    reserved: Option<Permit>,
    notified: Option<Pin<Box<OwnedNotified>>>,
    sleep: Option<Pin<Box<Sleep>>>,
}

/// The per-clone handle, padded to its own cache lines: clones made one after another
/// would otherwise share a line and their reference counts would bounce between cores.
///
/// Padded, not `#[repr(align(128))]`: an over-aligned `Arc` is allocated with
/// `posix_memalign` (~800 instructions with glibc, against ~60 for `malloc`), paid on every
/// clone, and axum clones the service for every request. 128 bytes after the handle keep
/// the reference counts of two handles (at the start of each allocation) at least two
/// cache lines apart, which is what the alignment was for.
pub(crate) struct Local {
    circuit: Circuit,
    _pad: [u8; LOCAL_PAD],
}

const LOCAL_PAD: usize = 128;

impl Local {
    fn new(circuit: Circuit) -> Self {
        Local {
            circuit,
            _pad: [0; LOCAL_PAD],
        }
    }
}

impl std::ops::Deref for Local {
    type Target = Circuit;
    fn deref(&self) -> &Circuit {
        &self.circuit
    }
}

impl<S: Clone, C: Clone, F: Clone> Clone for CircuitBreaker<S, C, F> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            breaker: Arc::new(Local::new(self.breaker.circuit.clone())),
            classify: self.classify.clone(),
            fallback: self.fallback.clone(),
            mode: self.mode,
            reserved: None,
            notified: None,
            sleep: None,
        }
    }
}

impl<S: fmt::Debug, C, F> fmt::Debug for CircuitBreaker<S, C, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreaker")
            .field("inner", &self.inner)
            .field("breaker", &self.breaker.circuit)
            .field("mode", &self.mode)
            .finish()
    }
}

impl<S, C, F> CircuitBreaker<S, C, F> {
    pub(crate) fn new(inner: S, breaker: Circuit, classify: C, fallback: F, mode: Mode) -> Self {
        Self {
            inner,
            breaker: Arc::new(Local::new(breaker)),
            classify,
            fallback,
            mode,
            reserved: None,
            notified: None,
            sleep: None,
        }
    }

    /// The circuit's handle.
    pub fn breaker(&self) -> &Circuit {
        &self.breaker
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }

    /// Back-pressure: `Ready` once the circuit admitted a call (the permit is kept for the
    /// next `call`); otherwise registers for the next state change or permit release, and
    /// for the end of the open wait.
    fn poll_permit(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            let notified = self
                .notified
                .get_or_insert_with(|| Box::pin(self.breaker.notify().clone().notified_owned()));
            // Register before looking, so a change between the look and the wait wakes us.
            notified.as_mut().enable();
            // Waiting is not a refusal: not counted as a call not permitted.
            match self.breaker.try_acquire_uncounted() {
                Ok(p) => {
                    self.reserved = Some(p);
                    self.notified = None;
                    self.sleep = None;
                    return Poll::Ready(());
                }
                Err(_) => {
                    if notified.as_mut().poll(cx).is_ready() {
                        self.notified = None;
                        continue;
                    }
                    if let Some(at) = self.breaker.open_deadline() {
                        match &mut self.sleep {
                            Some(s) if s.deadline() == at => {}
                            Some(s) => s.as_mut().reset(at),
                            None => self.sleep = Some(Box::pin(tokio::time::sleep_until(at))),
                        }
                        if let Some(s) = &mut self.sleep {
                            if s.as_mut().poll(cx).is_ready() {
                                self.sleep = None;
                                continue;
                            }
                        }
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

use std::future::Future as _;

impl<S, C, F, B, RB> Service<Request<B>> for CircuitBreaker<S, C, F>
where
    S: Service<Request<B>, Response = Response<RB>>,
    S::Error: Into<BoxError>,
    C: Classify,
    F: Fallback<Request<B>, RB>,
{
    type Response = Response<F::Body>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, C::Classifier, F::Future, fn(RB) -> F::Body>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        if self.mode == Mode::BackPressure && self.reserved.is_none() {
            std::task::ready!(self.poll_permit(cx));
        }
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let permit = match self.reserved.take() {
            Some(p) => Ok(p),
            None => self.breaker.try_acquire(),
        };
        match permit {
            Ok(permit) => {
                let classifier = self.classify.classify_request(&req);
                let start = self.breaker.measures_duration().then(Instant::now);
                let fut = self.inner.call(req);
                ResponseFuture::admitted(
                    fut,
                    F::inner_body,
                    Guard {
                        breaker: self.breaker.clone(),
                        permit,
                        classifier,
                        start,
                    },
                )
            }
            Err(open) => ResponseFuture::fallback(self.fallback.fallback(req, open)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_per_clone_handle_is_padded_not_over_aligned() {
        // A plain `malloc` per clone, no `posix_memalign`.
        assert!(std::mem::align_of::<Local>() <= std::mem::align_of::<u128>());
        // Two handles' reference counts never share a cache line or its prefetch pair.
        assert!(std::mem::size_of::<Local>() >= 128);
    }
}
