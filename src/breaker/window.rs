//! Sliding windows of call outcomes: count-based (the last `n` calls) and time-based (the
//! last `n` seconds), built so that recording a success costs no shared write in the
//! common case; see [`count`] and [`time`] for how.

mod clock;
mod count;
mod time;

pub(crate) use clock::SecondClock;
pub(crate) use count::CountWindow;
pub(crate) use time::TimeWindow;

/// Calls, failures and slow calls in a window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Counts {
    pub calls: u32,
    pub failures: u32,
    pub slow: u32,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::VecDeque;

    #[test]
    fn count_window_slides() {
        let w = CountWindow::new(3, 1);
        w.record(true, false);
        w.record(false, true);
        w.record(false, false);
        assert_eq!(
            w.counts(),
            Counts {
                calls: 3,
                failures: 1,
                slow: 1
            }
        );
        // Overwrites the failure.
        w.record(false, false);
        let c = w.counts();
        assert_eq!((c.failures, c.slow), (0, 1));
        w.record(false, false);
        let c = w.counts();
        assert_eq!((c.calls, c.failures, c.slow), (3, 0, 0));
        w.record(false, false);
        assert_eq!(w.counts(), c, "a full clean window stays as is");
        assert_eq!(w.record(true, false).map(|c| c.failures), Some(1));
        w.reset();
        assert_eq!(w.counts(), Counts::default());
    }

    #[test]
    fn count_window_concurrent_totals_are_exact() {
        let w = std::sync::Arc::new(CountWindow::new(64, 64));
        let hs: Vec<_> = (0..4)
            .map(|t| {
                let w = w.clone();
                std::thread::spawn(move || {
                    for i in 0..10_000 {
                        w.record((i + t) % 2 == 0, false);
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        let c = w.counts();
        assert_eq!(c.calls, 64);
        assert!(c.failures <= 64 && c.failures > 0);
    }

    #[test]
    fn time_window_expires_old_buckets() {
        let w = TimeWindow::new(10, 1);
        w.record(0, true, false);
        w.record(5, false, false);
        assert_eq!(w.counts(9).calls, 2);
        assert_eq!(w.counts(10).calls, 1);
        assert_eq!(w.counts(15).calls, 0);
        // Same slot, newer second: replaced.
        let c = w.record(20, false, true).unwrap();
        assert_eq!((c.calls, c.failures, c.slow), (1, 0, 1));
        // A success while the slow call is in the window is evaluated once per second...
        assert_eq!(w.record(29, false, false).map(|c| c.calls), Some(2));
        assert_eq!(
            w.record(29, false, false),
            None,
            "same second: nothing expired"
        );
        // ...and once it has expired, there is nothing to evaluate.
        assert_eq!(w.record(30, false, false), None);
        assert_eq!(w.counts(30).calls, 3);
    }

    /// A plain ring of the last `n` outcomes: what resilience4j's count window holds.
    struct RefCount {
        n: usize,
        q: VecDeque<(bool, bool)>,
    }

    impl RefCount {
        fn record(&mut self, f: bool, s: bool) -> Counts {
            self.q.push_back((f, s));
            if self.q.len() > self.n {
                self.q.pop_front();
            }
            Counts {
                calls: self.q.len() as u32,
                failures: self.q.iter().filter(|c| c.0).count() as u32,
                slow: self.q.iter().filter(|c| c.1).count() as u32,
            }
        }
    }

    /// Would a breaker with a 50 % failure and slow threshold trip on `c`?
    fn trips(c: Counts, min: u32) -> bool {
        c.calls >= min && c.calls > 0 && (c.failures * 2 >= c.calls || c.slow * 2 >= c.calls)
    }

    /// Outcomes: 0 success, 1 failure, 2 slow success; a low failure share most of the
    /// time, so that sequences run long before a trip.
    fn outcomes() -> impl Strategy<Value = Vec<u8>> {
        prop::collection::vec(
            prop_oneof![12 => Just(0u8), 2 => Just(1u8), 1 => Just(2u8)],
            1..600,
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// The striped count window holds what a plain ring holds after every call, and
        /// reports the counts on every call that could trip a breaker, so a breaker on it
        /// trips at the same call as one on the ring.
        #[test]
        fn count_window_equals_a_ring(n in 1u32..40, min in 1u32..40, seq in outcomes()) {
            let min = min.min(n);
            let w = CountWindow::new(n, min);
            let mut r = RefCount { n: n as usize, q: VecDeque::new() };
            for o in seq {
                let (f, s) = (o == 1, o == 2);
                let got = w.record(f, s);
                let want = r.record(f, s);
                prop_assert_eq!(w.counts(), want);
                if trips(want, min) {
                    prop_assert_eq!(got, Some(want), "a tripping call must be evaluated");
                    break; // the breaker would open and reset the window
                }
                if let Some(c) = got {
                    prop_assert_eq!(c, want);
                }
            }
        }

        /// The same for the time window against a plain list of `(second, outcome)`.
        #[test]
        fn time_window_equals_a_list(
            secs in 1u64..12,
            min in 1u32..30,
            seq in prop::collection::vec((0u64..3, 0u8..15), 1..400),
        ) {
            let w = TimeWindow::new(secs, min);
            let mut list: Vec<(u64, bool, bool)> = Vec::new();
            let mut now = 0u64;
            for (step, o) in seq {
                // Mostly the same second, sometimes the next ones.
                now += u64::from(step == 2) * (1 + (u64::from(o) % 4) * (secs / 2));
                let (f, s) = (o == 1, o == 2);
                let got = w.record(now, f, s);
                list.push((now, f, s));
                let live = list.iter().filter(|e| now - e.0 < secs);
                let want = live.fold(Counts::default(), |mut c, e| {
                    c.calls += 1;
                    c.failures += u32::from(e.1);
                    c.slow += u32::from(e.2);
                    c
                });
                prop_assert_eq!(w.counts(now), want);
                if trips(want, min) {
                    prop_assert_eq!(got, Some(want), "a tripping call must be evaluated");
                    break;
                }
                if let Some(c) = got {
                    prop_assert_eq!(c, want);
                }
            }
        }
    }
}
