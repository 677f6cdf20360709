//! Admission and recording in closed and half-open state: the per-call path.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::error::CircuitOpen;
use super::state::{
    ho_epoch25, ho_epoch32, rate, reaches, Metrics, Permit, Shared, State, CLOSED, DISABLED,
    FORCED_OPEN, HALF_OPEN, METRICS_ONLY, OPEN, R, RMASK, TARGET,
};
use super::window::{Counts, TimeWindow};
use crate::classify::Outcome;

impl Shared {
    /// Whole seconds since the circuit was built: the time window's bucket clock (one
    /// read of Tokio's clock, see [`SecondClock`](super::window::SecondClock)).
    #[inline(always)]
    pub(super) fn now_secs(&self) -> u64 {
        self.secs.now_secs()
    }

    #[inline]
    pub(super) fn now_nanos(&self) -> u64 {
        let d = Instant::now().saturating_duration_since(self.base);
        u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
    }

    pub(super) fn remaining(&self, now: u64) -> Duration {
        Duration::from_nanos(self.open_until.load(Ordering::Acquire).saturating_sub(now))
    }

    #[inline(always)]
    pub(super) fn try_acquire(self: &Arc<Self>, counted: bool) -> Result<Permit, CircuitOpen> {
        let w = self.state.load(Ordering::Acquire);
        match w & 15 {
            CLOSED | DISABLED | METRICS_ONLY => Ok(Permit {
                word: w,
                release: None,
            }),
            _ => self.try_acquire_slow(w, counted),
        }
    }

    #[cold]
    pub(super) fn try_acquire_slow(
        self: &Arc<Self>,
        mut w: u64,
        counted: bool,
    ) -> Result<Permit, CircuitOpen> {
        let reject = |state: State, remaining: Option<Duration>| {
            if counted {
                self.reject(state, remaining)
            } else {
                CircuitOpen { state, remaining }
            }
        };
        // At most: open -> half-open (lazy), half-open expired -> open: a few rounds.
        for _ in 0..4 {
            match w & 15 {
                CLOSED | DISABLED | METRICS_ONLY => {
                    return Ok(Permit {
                        word: w,
                        release: None,
                    })
                }
                OPEN => {
                    let now = self.now_nanos();
                    if now < self.open_until.load(Ordering::Acquire) {
                        return Err(reject(State::Open, Some(self.remaining(now))));
                    }
                    let _ = self.transition(Some(w), State::HalfOpen);
                }
                HALF_OPEN => {
                    if self.ho_deadline.load(Ordering::Acquire) <= self.now_nanos() {
                        tracing::debug!(target: TARGET, breaker = %self.name, "half-open probes did not decide in time");
                        let _ = self.transition(Some(w), State::Open);
                    } else {
                        if self.take_probe(w) {
                            return Ok(Permit {
                                word: w,
                                release: Some(self.clone()),
                            });
                        }
                        return Err(reject(State::HalfOpen, None));
                    }
                }
                FORCED_OPEN => return Err(reject(State::ForcedOpen, None)),
                _ => {
                    // Busy: a transition is being prepared.
                    return Err(reject(State::from_bits(w), None));
                }
            }
            w = self.state.load(Ordering::Acquire);
        }
        Err(reject(State::from_bits(w), None))
    }

    pub(super) fn reject(&self, state: State, remaining: Option<Duration>) -> CircuitOpen {
        self.not_permitted.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(
            target: TARGET,
            breaker = %self.name,
            state = %state,
            remaining_ms = remaining.map(|d| d.as_millis() as u64),
            "call not permitted"
        );
        CircuitOpen { state, remaining }
    }

    pub(super) fn take_probe(&self, w: u64) -> bool {
        let ep = ho_epoch32(w);
        let mut p = self.ho_permits.load(Ordering::Acquire);
        loop {
            if p >> 32 != ep || p & 0xFFFF_FFFF == 0 {
                return false;
            }
            match self.ho_permits.compare_exchange_weak(
                p,
                p - 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return true,
                Err(cur) => p = cur,
            }
        }
    }

    #[cold]
    pub(super) fn release_probe(&self, w: u64) {
        let ep = ho_epoch32(w);
        let mut p = self.ho_permits.load(Ordering::Acquire);
        loop {
            if p >> 32 != ep {
                return; // a later state: this permit no longer exists
            }
            match self.ho_permits.compare_exchange_weak(
                p,
                p + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => break,
                Err(cur) => p = cur,
            }
        }
        self.notify.notify_waiters();
    }

    /// Records how an admitted call ended. The common case (a success in closed state)
    /// stays small enough to inline into the caller: everything else is out of line.
    #[inline(always)]
    pub(super) fn complete(self: &Arc<Self>, permit: Permit, outcome: Outcome, elapsed: Duration) {
        let word = permit.word;
        if word & 15 == CLOSED
            && permit.release.is_none()
            && matches!(outcome, Outcome::Success)
            && (self.cfg.slow_rate.is_none() || elapsed < self.cfg.slow_duration)
        {
            // A closed-state permit holds no probe slot, so it has nothing to release: skip
            // its destructor (an out-of-line call per request otherwise).
            std::mem::forget(permit);
            return self.record_success(word);
        }
        self.complete_slow(permit, outcome, elapsed)
    }

    #[inline(never)]
    fn complete_slow(self: &Arc<Self>, mut permit: Permit, outcome: Outcome, elapsed: Duration) {
        if outcome == Outcome::Ignored {
            return; // dropping the permit returns a probe permit
        }
        permit.release = None;
        let fail = outcome.is_failure();
        let slow = match self.cfg.slow_rate {
            Some(_) => elapsed >= self.cfg.slow_duration,
            None => false,
        };
        match permit.word & 15 {
            CLOSED | METRICS_ONLY => self.record_closed(permit.word, fail, slow),
            HALF_OPEN => self.record_probe(permit.word, fail, slow),
            _ => {}
        }
    }

    /// A plain success in closed state: one load of the state word, one of the
    /// failure sequence (see `consecutive.rs`), and at most a bump of this thread's own counter cell in
    /// the count window (no clock read, no shared write).
    #[inline(always)]
    fn record_success(self: &Arc<Self>, word: u64) {
        if self.state.load(Ordering::Relaxed) != word {
            return; // admitted in an earlier state
        }
        self.consecutive.success();
        let c = match &self.window {
            Metrics::Count(w) => w.record(false, false),
            Metrics::Time(w) => return self.record_time_success(word, w),
        };
        if let Some(c) = c {
            self.evaluate(word, c, 0);
        }
    }

    #[inline(never)]
    fn record_time_success(self: &Arc<Self>, word: u64, w: &TimeWindow) {
        if let Some(c) = w.record(self.now_secs(), false, false) {
            self.evaluate(word, c, 0);
        }
    }

    #[inline]
    pub(super) fn record_closed(self: &Arc<Self>, word: u64, fail: bool, slow: bool) {
        if self.state.load(Ordering::Relaxed) != word {
            return; // admitted in an earlier state
        }
        if fail {
            return self.record_failure(word, slow);
        }
        self.consecutive.success();
        let c = match &self.window {
            Metrics::Count(w) => w.record(false, slow),
            Metrics::Time(w) => w.record(self.now_secs(), false, slow),
        };
        if let Some(c) = c {
            self.evaluate(word, c, 0);
        }
    }

    #[inline]
    fn record_failure(self: &Arc<Self>, word: u64, slow: bool) {
        // The count only where a trigger reads it (exact then); 0 for the metric alone.
        let consecutive = self.consecutive.failure();
        let c = match &self.window {
            Metrics::Count(w) => w.record(true, slow),
            Metrics::Time(w) => w.record(self.now_secs(), true, slow),
        };
        self.evaluate(word, c.unwrap_or_default(), consecutive);
    }

    /// Trips the circuit when `c` (or the consecutive count) reaches a threshold. Inlined
    /// into the recording paths: the check is a few integer comparisons, and only a trip
    /// (logging, the transition) leaves the line.
    #[inline]
    fn evaluate(self: &Arc<Self>, word: u64, c: Counts, consecutive: u32) {
        if c.failures == 0 && c.slow == 0 && consecutive == 0 {
            return;
        }
        if let Some(reason) = self.trip_reason(c, consecutive, self.min_calls) {
            self.trip(word, c, consecutive, reason);
        }
    }

    #[cold]
    #[inline(never)]
    fn trip(self: &Arc<Self>, word: u64, c: Counts, consecutive: u32, reason: &'static str) {
        if word & 15 == METRICS_ONLY {
            return;
        }
        tracing::warn!(
            target: TARGET,
            breaker = %self.name,
            failure_rate = rate(c.failures, c.calls.max(1)),
            slow_call_rate = rate(c.slow, c.calls.max(1)),
            consecutive_failures = self.consecutive.get().max(consecutive),
            calls = c.calls,
            reason,
            "failure rate exceeded threshold"
        );
        let _ = self.transition(Some(word), State::Open);
    }

    #[inline]
    pub(super) fn trip_reason(
        &self,
        c: Counts,
        consecutive: u32,
        min_calls: u32,
    ) -> Option<&'static str> {
        if let Some(k) = self.cfg.consecutive_failures {
            if consecutive >= k {
                return Some("consecutive failures");
            }
        }
        // Rates apply from the minimum number of calls on. Integers, not a float division
        // per evaluation: `part / calls >= t` as `part * SCALE >= t * calls`.
        if c.calls >= min_calls && c.calls > 0 {
            if reaches(c.failures, c.calls, self.failure_threshold) {
                return Some("failure rate");
            }
            if reaches(c.slow, c.calls, self.slow_threshold) {
                return Some("slow-call rate");
            }
        }
        None
    }

    #[cold]
    pub(super) fn record_probe(self: &Arc<Self>, word: u64, fail: bool, slow: bool) {
        let ep = ho_epoch25(word);
        let n = u64::from(self.cfg.half_open_permits);
        let mut r = self.ho_results.load(Ordering::Acquire);
        let next = loop {
            if r >> 39 != ep || r & RMASK >= n {
                return; // stale, or already decided
            }
            let next = r + 1 + (u64::from(fail) << R) + (u64::from(slow) << (2 * R));
            match self.ho_results.compare_exchange_weak(
                r,
                next,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => break next,
                Err(cur) => r = cur,
            }
        };
        if next & RMASK < n {
            return;
        }
        let c = Counts {
            calls: (next & RMASK) as u32,
            failures: ((next >> R) & RMASK) as u32,
            slow: ((next >> (2 * R)) & RMASK) as u32,
        };
        // Probes decide by the same rates; consecutive failures count as "all probes
        // failed up to k".
        let consecutive = if self.cfg.consecutive_failures.is_some() {
            c.failures
        } else {
            0
        };
        let to = match self.probe_trip(c, consecutive) {
            Some(reason) => {
                tracing::warn!(
                    target: TARGET,
                    breaker = %self.name,
                    failure_rate = rate(c.failures, c.calls),
                    slow_call_rate = rate(c.slow, c.calls),
                    reason,
                    "half-open probes exceeded threshold"
                );
                State::Open
            }
            None => State::Closed,
        };
        let _ = self.transition(Some(word), to);
    }

    pub(super) fn probe_trip(&self, c: Counts, failures: u32) -> Option<&'static str> {
        if let Some(k) = self.cfg.consecutive_failures {
            if failures >= k.min(c.calls) {
                return Some("consecutive failures");
            }
        }
        self.trip_reason(c, 0, c.calls)
    }
}
