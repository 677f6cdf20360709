//! The [`Bulkhead`] service.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::Semaphore;
use tower_service::Service;

use super::error::{BulkheadFull, Rejection};
use super::future::{QueueSlot, ResponseFuture};
use crate::BoxError;

/// The state one bulkhead's services share.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) name: Arc<str>,
    pub(crate) max_concurrent: usize,
    pub(crate) max_queue: usize,
    pub(crate) max_wait: Duration,
    pub(crate) slots: Arc<Semaphore>,
    pub(crate) queued: AtomicUsize,
}

impl Shared {
    pub(crate) fn new(
        name: Arc<str>,
        max_concurrent: usize,
        max_queue: usize,
        max_wait: Duration,
    ) -> Self {
        Shared {
            name,
            max_concurrent,
            max_queue,
            max_wait,
            slots: Arc::new(Semaphore::new(max_concurrent)),
            queued: AtomicUsize::new(0),
        }
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.max_concurrent - self.slots.available_permits()
    }

    pub(crate) fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    pub(crate) fn reject(&self, reason: Rejection) -> BulkheadFull {
        crate::telemetry::bulkhead_rejected(&self.name, reason.as_str());
        tracing::debug!(target: "tower_patterns::bulkhead", bulkhead = &*self.name, reason = reason.as_str(), "call refused");
        BulkheadFull {
            name: self.name.clone(),
            reason,
        }
    }

    /// Takes a queue place unless the queue is full (a CAS loop: never over `max_queue`,
    /// even for an instant).
    fn enqueue(self: &Arc<Self>) -> Option<QueueSlot> {
        self.queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_queue).then_some(n + 1)
            })
            .ok()
            .map(|_| QueueSlot(self.clone()))
    }
}

/// See [`BulkheadLayer`](super::BulkheadLayer).
#[derive(Debug)]
pub struct Bulkhead<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S: Clone> Clone for Bulkhead<S> {
    fn clone(&self) -> Self {
        Bulkhead {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<S> Bulkhead<S> {
    pub(crate) fn new(inner: S, shared: Arc<Shared>) -> Self {
        Bulkhead { inner, shared }
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S, R> Service<R> for Bulkhead<S>
where
    S: Service<R> + Clone,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S, R>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: R) -> Self::Future {
        // The path under the limit: one CAS on the semaphore, no lock, no allocation.
        if let Ok(permit) = self.shared.slots.clone().try_acquire_owned() {
            return ResponseFuture::running(self.inner.call(req), permit);
        }
        match self.shared.enqueue() {
            Some(slot) => {
                // The ready service goes with the request; this one keeps a fresh clone
                // (tower's convention for services called later).
                let clone = self.inner.clone();
                let svc = std::mem::replace(&mut self.inner, clone);
                ResponseFuture::queued(svc, req, slot)
            }
            None => ResponseFuture::rejected(self.shared.reject(Rejection::QueueFull)),
        }
    }
}
