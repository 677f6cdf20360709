//! The time window's bucket clock: whole seconds since a breaker was built, on Tokio's clock.
//!
//! Placing a call in its second needs the time on every call, and the read itself
//! (`clock_gettime`) is most of a time-window call. The read must stay
//! [`tokio::time::Instant::now`], so that the window follows a paused and advanced clock
//! (`tokio::time::pause`), which tests rely on. What is cut is the arithmetic after it:
//! `now - base` as a `Duration` is an out-of-line timespec subtraction in `std`. A
//! thread-local cache keeps the last second each breaker saw on this thread as its two
//! boundary instants; a call inside them gets its second from two inlined comparisons.
//!
//! The cache decides only by `start <= now < end`, which holds exactly when
//! `(now - base).as_secs()` is that second, so it is exact whatever the clock does
//! (paused, advanced by an hour, or a different runtime's clock on the same thread).

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// Entries per thread, indexed by the clock's id: a few breakers used alternately on one
/// thread each keep their entry.
const WAYS: usize = 4;

/// One breaker's current second on this thread.
#[derive(Clone, Copy)]
struct Entry {
    id: u64,
    sec: u64,
    start: Instant,
    end: Instant,
}

thread_local! {
    // Const-initialised and without a destructor: one TLS-relative access, no lazy-init
    // or destructor-registration branch.
    static CACHE: [Cell<Option<Entry>>; WAYS] = const { [const { Cell::new(None) }; WAYS] };
}

/// Ids for [`SecondClock`]s: a breaker dropped and another built at the same address must
/// never find the first one's entries.
static NEXT_ID: AtomicU64 = AtomicU64::new(0);

/// Whole seconds since `base` on Tokio's clock, read through a per-thread cache.
pub(crate) struct SecondClock {
    base: Instant,
    id: u64,
}

impl SecondClock {
    pub(crate) fn new(base: Instant) -> Self {
        Self {
            base,
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// `(Instant::now() - base).as_secs()`, 0 before `base`.
    #[inline(always)]
    pub(crate) fn now_secs(&self) -> u64 {
        self.secs_at(Instant::now())
    }

    /// `(now - base).as_secs()`, 0 before `base`.
    #[inline(always)]
    pub(crate) fn secs_at(&self, now: Instant) -> u64 {
        let slot = (self.id as usize) % WAYS;
        let hit = CACHE
            .try_with(|c| match c[slot].get() {
                Some(e) if e.id == self.id && e.start <= now && now < e.end => Some(e.sec),
                _ => None,
            })
            .ok()
            .flatten();
        match hit {
            Some(s) => s,
            None => self.miss(now, slot),
        }
    }

    /// Computes the second and caches its boundaries (not before `base`, where every
    /// instant is second 0 and there is no interval to cache).
    #[cold]
    #[inline(never)]
    fn miss(&self, now: Instant, slot: usize) -> u64 {
        let sec = now.saturating_duration_since(self.base).as_secs();
        if now >= self.base {
            let start = self.base.checked_add(Duration::from_secs(sec));
            let end = start.and_then(|s| s.checked_add(Duration::from_secs(1)));
            if let (Some(start), Some(end)) = (start, end) {
                let e = Entry {
                    id: self.id,
                    sec,
                    start,
                    end,
                };
                let _ = CACHE.try_with(|c| c[slot].set(Some(e)));
            }
        }
        sec
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exact(c: &SecondClock, now: Instant) -> u64 {
        now.saturating_duration_since(c.base).as_secs()
    }

    /// On the paused clock: the second changes exactly on the boundary, in both
    /// directions of the cache (a hit just before, a miss just after), after a long idle
    /// gap, and before the base.
    #[tokio::test(start_paused = true)]
    async fn follows_the_paused_clock_exactly_on_boundaries() {
        let base = Instant::now();
        let c = SecondClock::new(base);
        assert_eq!(c.now_secs(), 0);
        tokio::time::advance(Duration::from_millis(999)).await;
        assert_eq!(c.now_secs(), 0, "cached second, still inside it");
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(c.now_secs(), 1, "exactly on the boundary: the next second");
        let edge = base + Duration::from_secs(2);
        assert_eq!(c.secs_at(edge - Duration::from_nanos(1)), 1);
        assert_eq!(c.secs_at(edge), 2);
        assert_eq!(
            c.secs_at(edge - Duration::from_nanos(1)),
            1,
            "back: not stale"
        );
        tokio::time::advance(Duration::from_secs(3_600)).await;
        assert_eq!(c.now_secs(), 3_601, "a long idle gap");
        assert_eq!(c.now_secs(), 3_601);
        let before = base.checked_sub(Duration::from_secs(5)).unwrap();
        assert_eq!(c.secs_at(before), 0, "before the base: saturates to 0");
        assert_eq!(c.now_secs(), 3_601);
    }

    /// More clocks than cache ways on one thread, with different bases, alternating:
    /// every answer is the exact one.
    #[tokio::test(start_paused = true)]
    async fn many_clocks_on_one_thread_never_share_an_entry() {
        let mut clocks = Vec::new();
        for _ in 0..(2 * WAYS + 1) {
            clocks.push(SecondClock::new(Instant::now()));
            tokio::time::advance(Duration::from_millis(300)).await;
        }
        for step in 0..50u64 {
            for c in &clocks {
                let now = Instant::now();
                assert_eq!(c.secs_at(now), exact(c, now));
            }
            tokio::time::advance(Duration::from_millis(137 * (step % 5))).await;
        }
    }

    /// A clock dropped and another built (often at the same address) never inherits the
    /// first one's cached second.
    #[tokio::test(start_paused = true)]
    async fn a_new_clock_does_not_reuse_an_old_entry() {
        for i in 0..20u64 {
            let c = SecondClock::new(Instant::now());
            assert_eq!(c.now_secs(), 0, "round {i}");
            tokio::time::advance(Duration::from_millis(700)).await;
            assert_eq!(c.now_secs(), 0);
            tokio::time::advance(Duration::from_millis(700)).await;
            assert_eq!(c.now_secs(), 1);
        }
    }

    /// Two threads on one clock (real time): each answer lies between the exact seconds
    /// read just before and just after it.
    #[test]
    fn two_threads_read_exact_seconds() {
        let base = Instant::now()
            .checked_sub(Duration::from_millis(999_990))
            .unwrap_or_else(Instant::now);
        let c = SecondClock::new(base);
        std::thread::scope(|s| {
            for _ in 0..2 {
                s.spawn(|| {
                    for _ in 0..200_000 {
                        let lo = exact(&c, Instant::now());
                        let got = c.now_secs();
                        let hi = exact(&c, Instant::now());
                        assert!(lo <= got && got <= hi, "{lo} <= {got} <= {hi}");
                    }
                });
            }
        });
    }
}
