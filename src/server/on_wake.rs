//! Polling a seldom-ready future only after its own waker fired.
//!
//! A served connection's task waits on its traffic and, beside it, on the server's phase
//! (drain, close: a `watch` channel). `select!` polls every branch at each wake of the
//! task, and an HTTP/1 connection's task wakes at least twice per request (the request
//! arrives, the response is ready). A pending `watch::Receiver::wait_for`, polled again,
//! goes through tokio's cooperative budget and its `Notify` (a lock on the waiter list to
//! compare wakers): ~190 instructions a poll, ~800 a forwarded request over the two phase
//! waits of a connection (issue 12's profile of `Forward`'s process path). [`OnWake`]
//! hands the inner future a waker of its own and polls it again only once that waker was
//! woken: ~30 instructions a poll (one uncontended `AtomicWaker` registration).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;
use pin_project_lite::pin_project;

/// The inner future's waker: marks it woken, then wakes the task that polls it.
#[derive(Default)]
struct Gate {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl Wake for Gate {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // Set before the wake: the task, once woken, must see it.
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

pin_project! {
    /// `inner`, polled on the first poll and afterwards only when it asked to be.
    pub(super) struct OnWake<F> {
        #[pin]
        inner: F,
        gate: Arc<Gate>,
        waker: Waker,
        polled: bool,
    }
}

impl<F> OnWake<F> {
    pub(super) fn new(inner: F) -> Self {
        let gate = Arc::new(Gate::default());
        OnWake {
            inner,
            waker: Waker::from(gate.clone()),
            gate,
            polled: false,
        }
    }
}

impl<F: Future> Future for OnWake<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        // Registered before the check: a wake between the two is seen by the check, a
        // later one wakes this task again.
        this.gate.task.register(cx.waker());
        if *this.polled && !this.gate.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        *this.polled = true;
        this.inner.poll(&mut Context::from_waker(this.waker))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Counts its polls; ready once `ready` is set, and wakes whoever polled it last
    /// when `fire` is called.
    struct Probe {
        polls: Arc<AtomicUsize>,
        ready: Arc<AtomicBool>,
        waker: Arc<std::sync::Mutex<Option<Waker>>>,
    }

    impl Future for Probe {
        type Output = ();
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            self.polls.fetch_add(1, Ordering::SeqCst);
            if self.ready.load(Ordering::SeqCst) {
                return Poll::Ready(());
            }
            *self.waker.lock().unwrap() = Some(cx.waker().clone());
            Poll::Pending
        }
    }

    #[test]
    fn polls_the_inner_future_only_after_its_wake() {
        let polls = Arc::new(AtomicUsize::new(0));
        let ready = Arc::new(AtomicBool::new(false));
        let inner_waker = Arc::new(std::sync::Mutex::new(None::<Waker>));
        let mut fut = Box::pin(OnWake::new(Probe {
            polls: polls.clone(),
            ready: ready.clone(),
            waker: inner_waker.clone(),
        }));
        let task_woken = Arc::new(Counter::default());
        let task_waker = Waker::from(task_woken.clone());
        let mut cx = Context::from_waker(&task_waker);

        assert!(fut.as_mut().poll(&mut cx).is_pending());
        assert_eq!(polls.load(Ordering::SeqCst), 1, "the first poll reaches it");
        for _ in 0..5 {
            assert!(fut.as_mut().poll(&mut cx).is_pending());
        }
        assert_eq!(polls.load(Ordering::SeqCst), 1, "unwoken polls do not");

        ready.store(true, Ordering::SeqCst);
        let w = inner_waker
            .lock()
            .unwrap()
            .take()
            .expect("inner registered a waker");
        w.wake();
        assert_eq!(
            task_woken.0.load(Ordering::SeqCst),
            1,
            "its wake wakes the task"
        );
        assert!(fut.as_mut().poll(&mut cx).is_ready());
        assert_eq!(polls.load(Ordering::SeqCst), 2);
    }

    #[derive(Default)]
    struct Counter(AtomicUsize);

    impl Wake for Counter {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
}
