//! State transitions (with their timers) and metrics snapshots.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use rand::Rng;

use super::config::WaitStrategy;
use super::error::IllegalTransition;
use super::state::{
    epoch_of, ho_epoch25, ho_epoch32, rate, Metrics, MetricsSnapshot, Shared, State, BUSY,
    HALF_OPEN, OPEN, R, RMASK, TARGET,
};
use super::window::Counts;

impl Shared {
    pub(super) fn reset_window(&self) {
        match &self.window {
            Metrics::Count(w) => w.reset(),
            Metrics::Time(w) => w.reset(),
        }
        self.consecutive.reset();
    }

    pub(super) fn open_wait(&self) -> Duration {
        let n = self.open_attempts.fetch_add(1, Ordering::Relaxed);
        match self.cfg.wait {
            WaitStrategy::Constant(d) => d,
            WaitStrategy::Exponential {
                initial,
                multiplier,
                max,
                jitter,
            } => {
                let exp = multiplier.powi(n.min(1_000) as i32);
                let base = initial.as_secs_f64() * exp;
                let base = if base.is_finite() {
                    base.min(max.as_secs_f64())
                } else {
                    max.as_secs_f64()
                };
                let factor = if jitter > 0.0 {
                    1.0 + rand::rng().random_range(-jitter..=jitter)
                } else {
                    1.0
                };
                Duration::try_from_secs_f64(base * factor).unwrap_or(max)
            }
        }
    }

    /// Moves from `expect` (or whatever the state is, when `None`) to `to`.
    /// `Ok(false)`: nothing changed (already there, or `expect` is stale).
    pub(super) fn transition(
        self: &Arc<Self>,
        expect: Option<u64>,
        to: State,
    ) -> Result<bool, IllegalTransition> {
        let mut spins = 0u32;
        let (cur, busy) = loop {
            let cur = self.state.load(Ordering::Acquire);
            if let Some(e) = expect {
                if cur != e {
                    return Ok(false);
                }
            }
            let from = State::from_bits(cur);
            if cur & BUSY != 0 {
                // Another transition is being prepared; operator calls wait it out.
                spins += 1;
                if spins > 64 {
                    std::thread::yield_now();
                } else {
                    std::hint::spin_loop();
                }
                continue;
            }
            if from == to {
                return Ok(false);
            }
            if to == State::HalfOpen && from != State::Open {
                return Err(IllegalTransition { from, to });
            }
            let busy = ((epoch_of(cur) + 1) << 4) | BUSY | (cur & 7);
            if self
                .state
                .compare_exchange(cur, busy, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                break (cur, busy);
            }
        };
        let from = State::from_bits(cur);
        let word = (busy & !(BUSY | 7)) | to as u64;
        let now = self.now_nanos();
        match to {
            State::Open => {
                let wait = self.open_wait();
                let until = now.saturating_add(u64::try_from(wait.as_nanos()).unwrap_or(u64::MAX));
                self.open_until.store(until, Ordering::Release);
            }
            State::HalfOpen => {
                self.ho_permits.store(
                    (ho_epoch32(word) << 32) | u64::from(self.cfg.half_open_permits),
                    Ordering::Release,
                );
                self.ho_results
                    .store(ho_epoch25(word) << 39, Ordering::Release);
                let deadline = match self.cfg.max_half_open_wait {
                    Some(d) => now.saturating_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)),
                    None => u64::MAX,
                };
                self.ho_deadline.store(deadline, Ordering::Release);
            }
            State::Closed | State::MetricsOnly => {
                self.reset_window();
                // Every close restarts the backoff, not only a successful half-open probe:
                // an operator's `force_closed()` / `transition_to(Closed)` from open,
                // forced-open, disabled or metrics-only is a close too (resilience4j
                // resets its interval function on any transition to closed).
                if to == State::Closed {
                    self.open_attempts.store(0, Ordering::Relaxed);
                }
            }
            State::ForcedOpen | State::Disabled => {}
        }
        self.state.store(word, Ordering::Release);

        crate::telemetry::breaker_transition(&self.name, to);
        tracing::info!(
            target: TARGET,
            breaker = %self.name,
            from = %from,
            to = %to,
            "circuit breaker state transition"
        );
        // Publish the latest state, read under the channel's lock, so racing transitions
        // never leave subscribers on a stale value.
        self.tx.send_if_modified(|v| {
            let now = State::from_bits(self.state.load(Ordering::Acquire));
            let changed = *v != now;
            *v = now;
            changed
        });
        self.notify.notify_waiters();
        self.schedule(word, to);
        Ok(true)
    }

    /// Timers for automatic half-open and the maximum half-open wait. Without a Tokio
    /// runtime the same checks happen lazily on the next call.
    pub(super) fn schedule(self: &Arc<Self>, word: u64, to: State) {
        let deadline = match to {
            State::Open if self.cfg.automatic_half_open => self.open_until.load(Ordering::Acquire),
            State::HalfOpen if self.cfg.max_half_open_wait.is_some() => {
                self.ho_deadline.load(Ordering::Acquire)
            }
            _ => return,
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let at = self.base + Duration::from_nanos(deadline);
        let weak: Weak<Shared> = Arc::downgrade(self);
        rt.spawn(async move {
            tokio::time::sleep_until(at).await;
            if let Some(s) = weak.upgrade() {
                let next = if to == State::Open {
                    State::HalfOpen
                } else {
                    tracing::debug!(target: TARGET, breaker = %s.name, "half-open probes did not decide in time");
                    State::Open
                };
                let _ = s.transition(Some(word), next);
            }
        });
    }

    pub(super) fn metrics(&self) -> MetricsSnapshot {
        let w = self.state.load(Ordering::Acquire);
        let state = State::from_bits(w);
        let now = self.now_nanos();
        let (c, min) = if w & 15 == HALF_OPEN {
            let r = self.ho_results.load(Ordering::Acquire);
            let c = if r >> 39 == ho_epoch25(w) {
                Counts {
                    calls: (r & RMASK) as u32,
                    failures: ((r >> R) & RMASK) as u32,
                    slow: ((r >> (2 * R)) & RMASK) as u32,
                }
            } else {
                Counts::default()
            };
            (c, self.cfg.half_open_permits)
        } else {
            let c = match &self.window {
                Metrics::Count(win) => win.counts(),
                Metrics::Time(win) => win.counts(now / 1_000_000_000),
            };
            (c, self.min_calls)
        };
        let enough = c.calls >= min && c.calls > 0;
        let half_open_available = (w & 15 == HALF_OPEN).then(|| {
            let p = self.ho_permits.load(Ordering::Acquire);
            if p >> 32 == ho_epoch32(w) {
                (p & 0xFFFF_FFFF) as u32
            } else {
                0
            }
        });
        MetricsSnapshot {
            state,
            failure_rate: enough.then(|| rate(c.failures, c.calls)),
            slow_call_rate: enough.then(|| rate(c.slow, c.calls)),
            calls: c.calls,
            failed_calls: c.failures,
            successful_calls: c.calls - c.failures.min(c.calls),
            slow_calls: c.slow,
            consecutive_failures: self.consecutive.get(),
            not_permitted_calls: self.not_permitted.load(Ordering::Relaxed),
            open_remaining: (w & 15 == OPEN).then(|| self.remaining(now)),
            half_open_available,
        }
    }
}
