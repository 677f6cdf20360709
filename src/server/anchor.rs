//! A once-a-second timer per worker, so that arming a request's timers costs no syscall.
//!
//! tokio's time driver remembers the earliest instant it has promised to wake at; a timer
//! registered with an earlier deadline makes it unpark its I/O driver, which is an
//! `eventfd` write (plus an extra event in the next `epoll_wait`), even when the thread
//! doing it is the worker's own, running thread that will look at the timers before it
//! sleeps anyway. A forwarded HTTP/1 request arms two timers with different spans:
//! `proxy::Forward`'s response timeout (60 s) while the upstream answers, then hyper's
//! header-read timeout (30 s) for the connection's next request. With the 60 s timer the
//! last one the driver saw, every 30 s timer is "earlier": one `eventfd` write per
//! request, a third write-class syscall next to the two `writev`s (measured: 0.4-1 per
//! request under wrk; HAProxy has none).
//!
//! With a timer that fires every second in the wheel, the driver's promise is never more
//! than a second away, and no request timer (all of them seconds or longer) is earlier:
//! registering it is a wheel insert, nothing more. The price is one wake-up a second per
//! idle worker, and the `eventfd` write once a second when this timer re-arms.

use std::time::Duration;

use tokio::task::JoinHandle;

/// How often the anchor fires: below every request timeout (the shortest default is the
/// 5 s connect timeout), far above the cost of a wake-up.
const PERIOD: Duration = Duration::from_secs(1);

/// Runs the anchor on the current runtime until the returned guard is dropped.
pub(crate) fn spawn() -> Anchor {
    let task = tokio::spawn(async {
        let mut tick = tokio::time::interval(PERIOD);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
        }
    });
    Anchor(task)
}

/// Stops the anchor when dropped (when the worker's accept loop and drain are over).
pub(crate) struct Anchor(JoinHandle<()>);

impl Drop for Anchor {
    fn drop(&mut self) {
        self.0.abort();
    }
}
