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
///
/// The slots are `max_concurrent` permits of a semaphore, plus `spare`: slots given back
/// while nobody was queued. Taking a slot is lock-free either way (a spare one, else a
/// semaphore `try_acquire`; permits are forgotten once taken, a [`Slot`] gives its place
/// back). Giving a slot back to the semaphore takes tokio's waiter-list mutex (its
/// `release` always does), so a slot goes back there only when a call is queued for it;
/// otherwise it becomes spare with one atomic add — no lock on the path under the limit,
/// in `call` or on release, with any number of workers.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) name: Arc<str>,
    pub(crate) max_concurrent: usize,
    pub(crate) max_queue: usize,
    pub(crate) max_wait: Duration,
    pub(crate) slots: Semaphore,
    /// Slots given back while nobody was queued (not in the semaphore).
    spare: AtomicUsize,
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
            slots: Semaphore::new(max_concurrent),
            spare: AtomicUsize::new(0),
            queued: AtomicUsize::new(0),
        }
    }

    pub(crate) fn in_flight(&self) -> usize {
        // Two loads, not one snapshot: a gauge, never below zero.
        self.max_concurrent
            .saturating_sub(self.slots.available_permits())
            .saturating_sub(self.spare.load(Ordering::Relaxed))
    }

    pub(crate) fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// Takes a spare slot, if there is one.
    pub(crate) fn take_spare(&self) -> bool {
        // SeqCst with `give_back` and the queue's increment (see there).
        self.spare
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }

    /// Gives one slot back: spare when nobody is queued (no lock), else to the semaphore,
    /// which hands it to the first queued call.
    fn give_back(&self) {
        if self.queued.load(Ordering::SeqCst) == 0 {
            self.spare.fetch_add(1, Ordering::SeqCst);
            // A call may have queued since the load above. It takes a spare slot after
            // counting itself in the queue, and here the queue is read again after the
            // slot became spare: with SeqCst one of the two sees the other, so the slot
            // never stays spare while a call waits for it.
            if self.queued.load(Ordering::SeqCst) == 0 || !self.take_spare() {
                return;
            }
        }
        self.slots.add_permits(1);
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
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < self.max_queue).then_some(n + 1)
            })
            .ok()
            .map(|_| QueueSlot(self.clone()))
    }
}

/// One service's hold on its bulkhead's [`Shared`] state: what each admitted call's
/// [`Slot`] clones and drops. Every service a layer wraps (one per worker of a
/// thread-per-core server) has its own, so the two reference-count writes of each call
/// land on a cache line of that worker's, not on the shared state's, which every worker
/// writes already for the slot itself (`spare`, the semaphore). As `MetricsLayer` does
/// with its handles (session 16).
#[derive(Debug)]
pub(crate) struct Local(pub(crate) Arc<Shared>);

impl Local {
    /// A slot now, without waiting and without a lock: a spare one, else a permit.
    pub(crate) fn try_slot(self: &Arc<Self>) -> Option<Slot> {
        if self.0.take_spare() {
            return Some(Slot(self.clone()));
        }
        let permit = self.0.slots.try_acquire().ok()?;
        // The place is held by the `Slot` from here on (given back in its `drop`).
        permit.forget();
        Some(Slot(self.clone()))
    }
}

/// One admitted call's place in the bulkhead, given back when dropped.
#[derive(Debug)]
pub(crate) struct Slot(Arc<Local>);

impl Slot {
    /// The place of a semaphore permit the caller has just forgotten.
    pub(crate) fn from_forgotten_permit(local: Arc<Local>) -> Self {
        Slot(local)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0 .0.give_back();
    }
}

/// See [`BulkheadLayer`](super::BulkheadLayer).
#[derive(Debug)]
pub struct Bulkhead<S> {
    inner: S,
    /// This service's own (see [`Local`]); its clones (the connections of one worker)
    /// share it.
    local: Arc<Local>,
}

impl<S: Clone> Clone for Bulkhead<S> {
    fn clone(&self) -> Self {
        Bulkhead {
            inner: self.inner.clone(),
            local: self.local.clone(),
        }
    }
}

impl<S> Bulkhead<S> {
    pub(crate) fn new(inner: S, shared: Arc<Shared>) -> Self {
        Bulkhead {
            inner,
            local: Arc::new(Local(shared)),
        }
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

    #[inline]
    fn call(&mut self, req: R) -> Self::Future {
        // The path under the limit: one CAS on the semaphore, no lock, no allocation.
        if let Some(slot) = self.local.try_slot() {
            return ResponseFuture::running(self.inner.call(req), slot);
        }
        match self.local.0.enqueue() {
            Some(place) => {
                // The ready service goes with the request; this one keeps a fresh clone
                // (tower's convention for services called later).
                let clone = self.inner.clone();
                let svc = std::mem::replace(&mut self.inner, clone);
                ResponseFuture::queued(svc, req, place, self.local.clone())
            }
            None => ResponseFuture::rejected(self.local.0.reject(Rejection::QueueFull)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use tower::{service_fn, Layer, Service, ServiceExt};

    use super::super::BulkheadLayer;
    use super::{Local, Shared};

    #[test]
    fn the_future_is_the_inner_future_and_a_slot_not_the_queued_request() {
        // The queued state (service + request) is boxed: the future every call makes, and
        // every layer above moves, holds the inner future and the slot only.
        type Inner = tower::util::ServiceFn<fn([u8; 1024]) -> std::future::Ready<Result<(), ()>>>;
        type Fut = super::super::future::ResponseFuture<Inner, [u8; 1024]>;
        assert!(
            std::mem::size_of::<Fut>() <= 32,
            "{}",
            std::mem::size_of::<Fut>()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_queued_call_with_a_large_request_is_served_once_a_slot_frees() {
        let layer = BulkheadLayer::new("t", 1)
            .max_queue(1)
            .max_wait(Duration::from_secs(5));
        let mut svc = layer.layer(service_fn(|r: [u8; 1024]| async move {
            Ok::<_, std::convert::Infallible>(r[1023])
        }));
        let slot = svc.ready().await.unwrap().call([1; 1024]);
        let queued = svc.ready().await.unwrap().call([2; 1024]);
        assert_eq!(slot.await.unwrap(), 1);
        assert_eq!(queued.await.unwrap(), 2);
    }

    #[test]
    fn a_slot_given_back_with_nobody_queued_is_spare_and_taken_again() {
        let shared = Arc::new(Shared::new("t".into(), 2, 0, Duration::ZERO));
        let local = Arc::new(Local(shared.clone()));
        let a = local.try_slot().unwrap();
        let b = local.try_slot().unwrap();
        assert!(local.try_slot().is_none());
        assert_eq!(shared.in_flight(), 2);
        drop(a);
        // Spare, not back in the semaphore: no lock was taken.
        assert_eq!(shared.slots.available_permits(), 0);
        assert_eq!(shared.in_flight(), 1);
        let c = local.try_slot().unwrap();
        assert!(local.try_slot().is_none());
        drop((b, c));
        assert_eq!(shared.in_flight(), 0);
        // Both places usable again, never more.
        let (_d, _e) = (local.try_slot().unwrap(), local.try_slot().unwrap());
        assert!(local.try_slot().is_none());
    }

    /// The race `give_back` guards against, in order: a call finds no slot, the slot is
    /// given back while nobody is queued yet (it becomes spare), then the call queues. It
    /// must be admitted at once, not left waiting for `max_wait` beside a free slot.
    #[tokio::test(start_paused = true)]
    async fn a_call_queued_just_after_a_slot_became_spare_takes_it() {
        let shared = Arc::new(Shared::new("t".into(), 1, 1, Duration::from_secs(30)));
        let local = Arc::new(Local(shared.clone()));
        let held = local.try_slot().unwrap();
        assert!(local.try_slot().is_none());
        drop(held);
        let place = shared.enqueue().unwrap();
        let inner = service_fn(|_: ()| async { Ok::<_, std::convert::Infallible>(()) });
        let fut = super::ResponseFuture::queued(inner, (), place, local);
        let start = tokio::time::Instant::now();
        fut.await.expect("admitted, not refused after max_wait");
        assert_eq!(start.elapsed(), Duration::ZERO);
        assert_eq!(shared.in_flight(), 0);
        assert_eq!(shared.queued(), 0);
    }

    /// Many workers through one bulkhead of 2 with a deep queue and a long wait: every call
    /// is admitted (a slot left spare while a call waits would stall it for `max_wait`,
    /// past this test's bound) and never more than 2 run at once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn no_queued_call_is_left_waiting_while_a_slot_is_free() {
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let (r, m) = (running.clone(), most.clone());
        let inner = service_fn(move |_: ()| {
            let (r, m) = (r.clone(), m.clone());
            async move {
                let now = r.fetch_add(1, Ordering::SeqCst) + 1;
                m.fetch_max(now, Ordering::SeqCst);
                tokio::task::yield_now().await;
                r.fetch_sub(1, Ordering::SeqCst);
                Ok::<_, std::convert::Infallible>(())
            }
        });
        let layer = BulkheadLayer::new("stress", 2)
            .max_queue(64)
            .max_wait(Duration::from_secs(30));
        let svc = tower::Layer::layer(&layer, inner);
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let svc = svc.clone();
                tokio::spawn(async move {
                    for _ in 0..500 {
                        let mut s = svc.clone();
                        s.ready().await.unwrap().call(()).await.unwrap();
                    }
                })
            })
            .collect();
        let all = futures_util::future::try_join_all(tasks);
        tokio::time::timeout(Duration::from_secs(20), all)
            .await
            .expect("a queued call stalled")
            .unwrap();
        assert!(most.load(Ordering::SeqCst) <= 2);
        assert_eq!(layer.in_flight(), 0);
        assert_eq!(layer.queued(), 0);
    }
}
