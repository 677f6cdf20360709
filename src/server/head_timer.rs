//! hyper's HTTP/1 header read timeout without a timer-wheel entry per request.
//!
//! hyper arms the header read timeout for every request head of a kept-alive connection:
//! a fresh boxed tokio `Sleep` from its `Timer`, registered in the timer wheel when the
//! read first waits (as it does for every head after the first) and removed when the head
//! is in: ~1,000 instructions a request in issue 12's profile of `Forward`'s process path.
//! [`HeadTimer`] is one connection's timer: the heads' sleeps share one tokio `Sleep`.
//! A head's deadline is never earlier than the previous head's (the same timeout counted
//! from a later instant), so the shared entry stays registered at an earlier deadline and
//! is moved only when it fires early: about once per timeout period per connection, plus
//! at most one spurious wake-up of the connection's task then.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

use crate::proxy::body::{far_future, poll_lazy_deadline};

type Shared = Arc<Mutex<Option<Pin<Box<Sleep>>>>>;

/// One connection's [`hyper::rt::Timer`] (see the module docs).
#[derive(Default)]
pub(super) struct HeadTimer {
    shared: Shared,
}

impl hyper::rt::Timer for HeadTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        // Saturates: a configured duration must not overflow the clock.
        let now = Instant::now();
        let deadline = now.checked_add(duration).unwrap_or_else(far_future);
        self.at(deadline)
    }

    fn sleep_until(&self, deadline: std::time::Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        self.at(Instant::from_std(deadline))
    }

    // tokio's clock (which tests can pause), as hyper-util's `TokioTimer` does.
    fn now(&self) -> std::time::Instant {
        Instant::now().into_std()
    }
}

impl HeadTimer {
    fn at(&self, deadline: Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(HeadSleep {
            deadline,
            shared: self.shared.clone(),
        })
    }
}

/// One head's sleep: ready at `deadline`, waiting on the connection's shared `Sleep`.
struct HeadSleep {
    deadline: Instant,
    shared: Shared,
}

impl Future for HeadSleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let deadline = self.deadline;
        // Only the connection's own task polls it: the lock is never contended.
        let mut shared = self.shared.lock().unwrap_or_else(PoisonError::into_inner);
        let sleep = shared.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if sleep.deadline() > deadline {
            // Not expected (deadlines only grow), but never fire late.
            sleep.as_mut().reset(deadline);
        }
        // It may still be at an earlier head's deadline: moved on to this one's when it
        // fires.
        poll_lazy_deadline(sleep.as_mut(), cx, || deadline)
    }
}

impl hyper::rt::Sleep for HeadSleep {}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::rt::Timer as _;

    #[tokio::test(start_paused = true)]
    async fn each_sleep_fires_at_its_own_deadline_over_one_shared_entry() {
        let timer = HeadTimer::default();
        let start = Instant::now();
        // A first head's sleep registers the shared entry at start + 10 s, then is
        // dropped (its head arrived).
        let mut first = timer.sleep(Duration::from_secs(10));
        assert!(futures_util::poll!(first.as_mut()).is_pending());
        drop(first);
        tokio::time::advance(Duration::from_secs(4)).await;
        // The next head's: its whole 10 s from now, not the 6 s left of the first's.
        let second = timer.sleep(Duration::from_secs(10));
        let at = Instant::now();
        second.await;
        assert_eq!(at.elapsed(), Duration::from_secs(10));
        assert_eq!(start.elapsed(), Duration::from_secs(14));
        // A sleep already past its deadline is ready at once.
        timer.sleep(Duration::ZERO).await;
    }
}
