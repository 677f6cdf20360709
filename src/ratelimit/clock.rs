//! A governor clock on tokio's time, so limits can be tested under `tokio::time::pause()`.

use governor::clock::Clock;
use governor::nanos::Nanos;

/// [`governor`]'s clock on [`tokio::time::Instant`]: paused and advanced with tokio's test
/// time. The default clock of [`LocalLimiter`](super::LocalLimiter) is governor's
/// `QuantaClock` (a TSC read, cheaper than a clock call); use this one in tests.
#[derive(Debug, Clone, Copy)]
pub struct TokioClock {
    base: tokio::time::Instant,
}

impl Default for TokioClock {
    fn default() -> Self {
        TokioClock {
            base: tokio::time::Instant::now(),
        }
    }
}

impl TokioClock {
    /// Time counted from now.
    pub fn new() -> Self {
        Self::default()
    }
}

impl Clock for TokioClock {
    type Instant = Nanos;
    fn now(&self) -> Nanos {
        Nanos::from(self.base.elapsed())
    }
}
