//! The [`CircuitBreaker`] service.

use std::fmt;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
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
    // The handle of the thread this service (or clone) was made on: response futures
    // clone this one, so threads serving different connections never contend on one
    // reference count (see `Handles`).
    breaker: Arc<Local>,
    // Every thread's handle, made once per thread and shared by this service's clones.
    handles: Arc<Handles>,
    classify: C,
    fallback: F,
    mode: Mode,
    reserved: Option<Permit>,
    notified: Option<Pin<Box<OwnedNotified>>>,
    sleep: Option<Pin<Box<Sleep>>>,
}

/// One thread's handle on the circuit, padded to its own cache lines: handles allocated
/// one after another would otherwise share a line and their reference counts would
/// bounce between cores.
///
/// Padded, not `#[repr(align(128))]`: an over-aligned `Arc` is allocated with
/// `posix_memalign` (~800 instructions with glibc, against ~60 for `malloc`). 128 bytes
/// after the handle keep the reference counts of two handles (at the start of each
/// allocation) at least two cache lines apart, which is what the alignment was for.
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

/// The per-thread handles of one wrapped service and its clones, one slot per stripe
/// (`crate::stripe`: a small id per live thread, the threads past the exclusive ids
/// sharing a few slots), each made the first time a clone is made on its thread.
///
/// A clone takes its thread's handle instead of allocating one of its own: axum and
/// hyper-util's service adapter clone the service for every request, and a handle per
/// clone was a `malloc`, a 128-byte fill and a `free` per request (issue 14, session 18).
/// What the per-clone handle was for stays: the response futures' reference-count writes
/// land on a line of their thread's, and clones made on one thread share it. A clone
/// writes the reference count of this `Arc` instead of the circuit's (the same one
/// contended write per clone as before, now off the circuit's state).
pub(crate) struct Handles {
    circuit: Circuit,
    exclusive: usize,
    slots: Box<[OnceLock<Arc<Local>>]>,
}

impl Handles {
    fn new(circuit: Circuit) -> Self {
        let exclusive = crate::stripe::default_cells();
        Handles {
            circuit,
            exclusive,
            slots: (0..crate::stripe::total_cells(exclusive))
                .map(|_| OnceLock::new())
                .collect(),
        }
    }

    /// This thread's handle, made on its first use.
    #[inline]
    fn mine(&self) -> Arc<Local> {
        let (i, _) = crate::stripe::my_cell(self.exclusive);
        match self.slots.get(i) {
            Some(slot) => slot
                .get_or_init(|| Arc::new(Local::new(self.circuit.clone())))
                .clone(),
            // Not reached (`my_cell` stays below `total_cells`); a handle of its own is
            // still right, only an allocation.
            None => Arc::new(Local::new(self.circuit.clone())),
        }
    }
}

impl<S: Clone, C: Clone, F: Clone> Clone for CircuitBreaker<S, C, F> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            breaker: self.handles.mine(),
            handles: self.handles.clone(),
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
        let handles = Arc::new(Handles::new(breaker));
        Self {
            inner,
            breaker: handles.mine(),
            handles,
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
    fn the_per_thread_handle_is_padded_not_over_aligned() {
        // A plain `malloc` per handle, no `posix_memalign`.
        assert!(std::mem::align_of::<Local>() <= std::mem::align_of::<u128>());
        // Two handles' reference counts never share a cache line or its prefetch pair.
        assert!(std::mem::size_of::<Local>() >= 128);
    }

    #[test]
    fn clones_take_their_threads_handle_instead_of_allocating_one() {
        let circuit = Circuit::new(super::super::CircuitBreakerConfig::new()).unwrap();
        let svc = CircuitBreaker::new((), circuit, (), NoFallback, Mode::RejectInCall);
        // Clones made on one thread (a clone of a clone too) share that thread's handle.
        let a = svc.clone();
        let b = a.clone();
        assert!(Arc::ptr_eq(&svc.breaker, &a.breaker));
        assert!(Arc::ptr_eq(&a.breaker, &b.breaker));
        let here = crate::stripe::my_cell(svc.handles.exclusive).0;
        // A clone made on another thread holds that thread's: another handle unless both
        // threads share a stripe (more live threads than exclusive ids), and the same one
        // for every clone made there.
        let (there, c, d) = std::thread::scope(|s| {
            s.spawn(|| {
                let c = svc.clone();
                let d = b.clone();
                (crate::stripe::my_cell(svc.handles.exclusive).0, c, d)
            })
            .join()
            .unwrap()
        });
        assert!(Arc::ptr_eq(&c.breaker, &d.breaker));
        assert_eq!(Arc::ptr_eq(&c.breaker, &a.breaker), here == there);
        assert!(Arc::ptr_eq(&c.handles, &svc.handles));
    }
}
