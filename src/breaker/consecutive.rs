//! The consecutive-failure count: failures recorded since the last success.
//!
//! One shared counter that failures raise and successes set back to 0 moves its cache
//! line between threads four times per failure (the failing thread writes it, another
//! thread's next success reads it and writes 0, the first thread's next success reads it
//! again): with two threads at 10 % failures that was ~5 ns of a ~38 ns time-window call.
//!
//! Where the count only feeds the metric (no `consecutive_failures` trigger), it is kept as
//! a failure sequence number that only failures write, and per thread the sequence number
//! its last success saw ([`crate::stripe`] cells, written by their owner): the count is
//! the sequence number minus the largest one any success saw. A success then only reads
//! the shared line (one transfer after a remote failure) and writes its own cell.
//! Recorded one call after another, on any threads, the count is the same as the plain
//! counter's; calls recorded at the same instant on several threads have no order, and
//! each of them may or may not count as "before" the other.
//!
//! With a trigger the count decides a trip, so it stays one exact counter (`fetch_add`).
//! Next to the count window, whose success costs ~2 ns on one thread, the extra cell
//! lookup of the striped form costs more than it saves, so there it stays one counter.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::stripe::{default_cells, my_cell, total_cells, Padded};

/// How the count is kept; see the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// A trigger reads the count: one counter, `fetch_add` per failure.
    Exact,
    /// The metric alone, next to a window whose success costs a couple of ns (the count
    /// window): one counter with a load and a store, which adds the least to a success
    /// on one thread (may miss a concurrent failure).
    Plain,
    /// The metric alone, next to a window that reads the clock anyway (the time window):
    /// a failure sequence and per-thread seen cells, no shared write on a success.
    Striped,
}

pub(crate) enum Consecutive {
    /// [`Kind::Exact`] and [`Kind::Plain`]: the count itself.
    One { count: AtomicU32, exact: bool },
    /// [`Kind::Striped`].
    Striped(Box<Striped>),
}

pub(crate) struct Striped {
    /// Failures recorded so far, on its own line.
    failures: Padded,
    /// Per thread: `failures` as the thread's last success (or reset) saw it.
    seen: Box<[Padded]>,
    exclusive: usize,
}

impl Consecutive {
    pub(crate) fn new(kind: Kind) -> Self {
        match kind {
            Kind::Exact | Kind::Plain => Consecutive::One {
                count: AtomicU32::new(0),
                exact: kind == Kind::Exact,
            },
            Kind::Striped => {
                let exclusive = default_cells();
                Consecutive::Striped(Box::new(Striped {
                    failures: Padded::default(),
                    seen: (0..total_cells(exclusive))
                        .map(|_| Padded::default())
                        .collect(),
                    exclusive,
                }))
            }
        }
    }

    /// A success: the run of failures is over.
    #[inline(always)]
    pub(crate) fn success(&self) {
        match self {
            Consecutive::One { count, .. } => {
                if count.load(Ordering::Relaxed) != 0 {
                    count.store(0, Ordering::Relaxed);
                }
            }
            Consecutive::Striped(s) => s.see(s.failures.0.load(Ordering::Relaxed)),
        }
    }

    /// A failure. Returns the count where a trigger reads it, else 0 (the metric is read
    /// with [`get`](Self::get), not on every failure).
    #[inline(always)]
    pub(crate) fn failure(&self) -> u32 {
        match self {
            Consecutive::One { count, exact: true } => {
                count.fetch_add(1, Ordering::Relaxed).saturating_add(1)
            }
            Consecutive::One {
                count,
                exact: false,
            } => {
                // A metric: a load and a store spare a locked read-modify-write.
                let n = count.load(Ordering::Relaxed).saturating_add(1);
                count.store(n, Ordering::Relaxed);
                0
            }
            Consecutive::Striped(s) => {
                // Likewise; a lost concurrent update can make the sequence step back,
                // which only lowers the count (it saturates at 0), never raises it.
                let f = s.failures.0.load(Ordering::Relaxed).wrapping_add(1);
                s.failures.0.store(f, Ordering::Relaxed);
                0
            }
        }
    }

    /// Failures since the last success.
    pub(crate) fn get(&self) -> u32 {
        match self {
            Consecutive::One { count, .. } => count.load(Ordering::Relaxed),
            Consecutive::Striped(s) => {
                // Cells first: a success between the two loads only lowers the result.
                let seen = s
                    .seen
                    .iter()
                    .map(|c| c.0.load(Ordering::Relaxed))
                    .max()
                    .unwrap_or(0);
                let f = s.failures.0.load(Ordering::Relaxed);
                u32::try_from(f.saturating_sub(seen)).unwrap_or(u32::MAX)
            }
        }
    }

    /// Sets the count to 0 (a state change).
    pub(crate) fn reset(&self) {
        match self {
            Consecutive::One { count, .. } => count.store(0, Ordering::Relaxed),
            // This thread's own cell, so the owner's plain stores stay the only ones.
            Consecutive::Striped(s) => s.see(s.failures.0.load(Ordering::Relaxed)),
        }
    }
}

impl Striped {
    /// Marks every failure so far as seen by this thread.
    #[inline(always)]
    fn see(&self, f: u64) {
        let (i, exclusive) = my_cell(self.exclusive);
        let cell: &AtomicU64 = &self.seen[i].0;
        if exclusive {
            // Only this thread writes this cell: a plain store.
            if cell.load(Ordering::Relaxed) != f {
                cell.store(f, Ordering::Relaxed);
            }
        } else if cell.load(Ordering::Relaxed) < f {
            cell.fetch_max(f, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// Both modes count the same run on one thread and across threads taking turns.
    #[test]
    fn counts_failures_since_the_last_success_in_both_modes() {
        for kind in [Kind::Exact, Kind::Plain, Kind::Striped] {
            let c = Arc::new(Consecutive::new(kind));
            assert_eq!(c.get(), 0);
            c.failure();
            c.failure();
            assert_eq!(c.get(), 2, "{kind:?}");
            c.success();
            assert_eq!(c.get(), 0);
            c.failure();
            // Another thread, one call after another: its success ends this thread's run,
            // its failures extend it.
            let c2 = c.clone();
            std::thread::spawn(move || {
                c2.failure();
                assert_eq!(c2.get(), 2);
                c2.success();
                c2.failure();
            })
            .join()
            .unwrap();
            assert_eq!(c.get(), 1, "{kind:?}");
            c.failure();
            assert_eq!(c.get(), 2);
            c.reset();
            assert_eq!(c.get(), 0);
            c.failure();
            assert_eq!(c.get(), 1);
        }
    }

    /// Successes on threads without an exclusive cell (more live threads than cells)
    /// end the run too.
    #[test]
    fn shared_cells_end_runs() {
        let c = Consecutive::new(Kind::Striped);
        let n = total_cells(default_cells()) + 2;
        let all_alive = std::sync::Barrier::new(n);
        let turn = std::sync::Mutex::new(());
        std::thread::scope(|s| {
            for _ in 0..n {
                s.spawn(|| {
                    // Every thread alive at once: distinct ids, some past the exclusive cells.
                    all_alive.wait();
                    let _t = turn.lock().unwrap();
                    c.failure();
                    c.failure();
                    assert!(c.get() >= 2);
                    c.success();
                    assert_eq!(c.get(), 0);
                });
            }
        });
        c.failure();
        assert_eq!(c.get(), 1);
    }
}
