//! The response future of [`Bulkhead`](super::Bulkhead).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use pin_project_lite::pin_project;
use tower_service::Service;

use super::error::{BulkheadFull, Rejection};
use super::service::{Local, Shared, Slot};
use crate::BoxError;

/// A place in the queue, given back when dropped (admitted, timed out or cancelled).
pub(crate) struct QueueSlot(pub(crate) Arc<Shared>);

impl Drop for QueueSlot {
    fn drop(&mut self) {
        self.0.queued.fetch_sub(1, Ordering::AcqRel);
    }
}

type Wait = Pin<Box<dyn Future<Output = Option<Slot>> + Send>>;

/// What a queued call holds while it waits. Boxed (the queued path allocates its wait
/// anyway): inline, the service and the request made every bulkhead future as large as
/// both (280 bytes around `Forward`'s 16-byte future, more around a breaker and balancer),
/// bytes that each layer above moved on every call; the running state needs the inner
/// future and the slot only.
struct Queue<S, R> {
    wait: Wait,
    svc: Option<S>,
    req: Option<R>,
    slot: Option<QueueSlot>,
}

pin_project! {
    /// Waits for a slot if queued, then resolves to the inner response; the slot is held
    /// until this future completes or is dropped.
    pub struct ResponseFuture<S, R>
    where
        S: Service<R>,
    {
        #[pin]
        state: State<S, R>,
    }
}

pin_project! {
    #[project = Proj]
    enum State<S, R>
    where
        S: Service<R>,
    {
        Running {
            #[pin]
            fut: S::Future,
            permit: Option<Slot>,
        },
        Queued {
            queue: Box<Queue<S, R>>,
        },
        Rejected {
            err: Option<BulkheadFull>,
        },
    }
}

impl<S: Service<R>, R> ResponseFuture<S, R> {
    pub(crate) fn running(fut: S::Future, permit: Slot) -> Self {
        ResponseFuture {
            state: State::Running {
                fut,
                permit: Some(permit),
            },
        }
    }

    pub(crate) fn queued(svc: S, req: R, slot: QueueSlot, local: Arc<Local>) -> Self {
        let shared = slot.0.clone();
        // Allocates only on the queued path.
        let wait: Wait = Box::pin(async move {
            // Counted in the queue already: a slot given back as spare in the meantime
            // is this call's (see `Shared::give_back`).
            if shared.take_spare() {
                return Some(Slot::from_forgotten_permit(local));
            }
            let admitted = {
                let acquired = tokio::time::timeout(shared.max_wait, shared.slots.acquire()).await;
                match acquired {
                    Ok(Ok(permit)) => {
                        // Held by the `Slot` from here on.
                        permit.forget();
                        true
                    }
                    // Timed out (the semaphore is never closed).
                    _ => false,
                }
            };
            admitted.then(|| Slot::from_forgotten_permit(local))
        });
        ResponseFuture {
            state: State::Queued {
                queue: Box::new(Queue {
                    wait,
                    svc: Some(svc),
                    req: Some(req),
                    slot: Some(slot),
                }),
            },
        }
    }

    pub(crate) fn rejected(err: BulkheadFull) -> Self {
        ResponseFuture {
            state: State::Rejected { err: Some(err) },
        }
    }
}

impl<S: Service<R>, R> std::fmt::Debug for ResponseFuture<S, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("bulkhead::ResponseFuture")
    }
}

impl<S, R> Future for ResponseFuture<S, R>
where
    S: Service<R>,
    S::Error: Into<BoxError>,
{
    type Output = Result<S::Response, BoxError>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.project().state;
        loop {
            match state.as_mut().project() {
                Proj::Running { fut, permit } => {
                    let out = ready!(fut.poll(cx));
                    // The slot is free as soon as the answer (head) is here.
                    drop(permit.take());
                    return Poll::Ready(out.map_err(Into::into));
                }
                Proj::Queued { queue } => {
                    let Queue {
                        wait,
                        svc,
                        req,
                        slot,
                    } = &mut **queue;
                    let permit = ready!(wait.as_mut().poll(cx));
                    let Some(slot) = slot.take() else {
                        crate::error::polled_after_completion("bulkhead::ResponseFuture")
                    };
                    let Some(permit) = permit else {
                        let err = slot.0.reject(Rejection::QueueTimeout);
                        drop(slot);
                        state.set(State::Rejected { err: Some(err) });
                        continue;
                    };
                    drop(slot);
                    let (Some(mut svc), Some(req)) = (svc.take(), req.take()) else {
                        crate::error::polled_after_completion("bulkhead::ResponseFuture")
                    };
                    let fut = svc.call(req);
                    state.set(State::Running {
                        fut,
                        permit: Some(permit),
                    });
                }
                Proj::Rejected { err } => {
                    return match err.take() {
                        Some(e) => Poll::Ready(Err(Box::new(e))),
                        None => crate::error::polled_after_completion("bulkhead::ResponseFuture"),
                    };
                }
            }
        }
    }
}
