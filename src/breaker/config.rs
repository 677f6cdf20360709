//! Circuit configuration: trip conditions, open-state wait, half-open probes.

use std::time::Duration;

use super::error::ConfigError;

/// The largest count-based window: counts are packed 21 bits wide (with a sign bias) so one
/// atomic add updates calls, failures and slow calls together.
pub const MAX_WINDOW_CALLS: u32 = 500_000;
/// The largest time-based window, in seconds (one bucket per second).
pub const MAX_WINDOW_SECS: u64 = 3_600;
/// The largest number of half-open probes (they are counted in 13-bit fields).
pub const MAX_HALF_OPEN_PERMITS: u32 = 4_000;

/// The sliding window the failure and slow-call rates are computed over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    /// The last `n` recorded calls (resilience4j `COUNT_BASED`).
    Count(u32),
    /// The calls of the last `duration`, in one-second buckets (resilience4j `TIME_BASED`).
    /// Sub-second parts are rounded up to a whole second.
    Time(Duration),
}

/// How long the breaker stays open before it lets probes through.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum WaitStrategy {
    /// Always the same wait.
    Constant(Duration),
    /// `initial * multiplier^(n-1)` for the n-th consecutive opening (reset when the breaker
    /// closes), capped at `max`, then spread by `±jitter` (a fraction in `0.0..=1.0`).
    Exponential {
        /// The first wait.
        initial: Duration,
        /// Growth factor per consecutive opening (≥ 1.0).
        multiplier: f64,
        /// Upper bound before jitter.
        max: Duration,
        /// Random spread: 0.5 means anywhere in `[0.5 w, 1.5 w]`.
        jitter: f64,
    },
}

/// Where a rejected call is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// `poll_ready` follows the inner service; `call` fails fast (or runs the fallback) when
    /// the circuit does not admit the call. Safe behind `tower::buffer::Buffer`.
    #[default]
    RejectInCall,
    /// `poll_ready` returns `Pending` until the circuit admits a call (the permit is taken
    /// in `poll_ready` and used by the next `call`): back-pressure instead of errors, for
    /// balancers and other readiness-driven callers. The fallback is never used. A service
    /// that became ready in half-open holds a probe permit until it is called or dropped;
    /// set [`max_half_open_wait`](CircuitBreakerConfig::max_half_open_wait) so an idle
    /// one cannot hold the circuit half-open forever.
    BackPressure,
}

/// Circuit breaker settings. Start from [`CircuitBreakerConfig::default`] (resilience4j's
/// defaults) and adjust; [`Circuit::new`](super::Circuit::new) and
/// [`CircuitBreakerLayer::new`](super::CircuitBreakerLayer::new) validate it.
#[derive(Debug, Clone, PartialEq)]
pub struct CircuitBreakerConfig {
    pub(crate) name: String,
    pub(crate) failure_rate: Option<f64>,
    pub(crate) slow_rate: Option<f64>,
    pub(crate) slow_duration: Duration,
    pub(crate) consecutive_failures: Option<u32>,
    pub(crate) window: Window,
    pub(crate) minimum_calls: u32,
    pub(crate) wait: WaitStrategy,
    pub(crate) automatic_half_open: bool,
    pub(crate) half_open_permits: u32,
    pub(crate) max_half_open_wait: Option<Duration>,
    pub(crate) mode: Mode,
}

impl Default for CircuitBreakerConfig {
    fn default() -> Self {
        Self {
            name: "default".into(),
            failure_rate: Some(50.0),
            slow_rate: None,
            slow_duration: Duration::from_secs(60),
            consecutive_failures: None,
            window: Window::Count(100),
            minimum_calls: 100,
            wait: WaitStrategy::Constant(Duration::from_secs(60)),
            automatic_half_open: false,
            half_open_permits: 10,
            max_half_open_wait: None,
            mode: Mode::RejectInCall,
        }
    }
}

impl CircuitBreakerConfig {
    /// The defaults: 50% failure rate over the last 100 calls (at least 100), 60 s open,
    /// 10 half-open probes, lazy half-open, reject in `call`.
    pub fn new() -> Self {
        Self::default()
    }

    /// A name for logs and events.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Trip when the failure rate, in percent, is **at least** `percent` (1..=100).
    ///
    /// Decided in integers (no division per call): `percent` is taken to 1/10,000 %
    /// (rounded), so a threshold with up to four decimals decides exactly.
    pub fn failure_rate_threshold(mut self, percent: f64) -> Self {
        self.failure_rate = Some(percent);
        self
    }

    /// Do not trip on the failure rate (only slow calls or consecutive failures).
    pub fn no_failure_rate(mut self) -> Self {
        self.failure_rate = None;
        self
    }

    /// Trip when the share of calls taking at least `slow_call_duration` is at least
    /// `percent` (taken to 1/10,000 %, like the failure rate).
    pub fn slow_call_rate_threshold(mut self, percent: f64) -> Self {
        self.slow_rate = Some(percent);
        self
    }

    /// A call taking this long or longer is slow.
    pub fn slow_call_duration(mut self, d: Duration) -> Self {
        self.slow_duration = d;
        self
    }

    /// Trip after `n` failures in a row, whatever the window says.
    pub fn consecutive_failures(mut self, n: u32) -> Self {
        self.consecutive_failures = Some(n);
        self
    }

    /// The sliding window for the rates.
    pub fn window(mut self, w: Window) -> Self {
        self.window = w;
        self
    }

    /// Rates are not evaluated before this many calls are in the window.
    pub fn minimum_calls(mut self, n: u32) -> Self {
        self.minimum_calls = n;
        self
    }

    /// Stay open this long (constant wait).
    pub fn wait_in_open(mut self, d: Duration) -> Self {
        self.wait = WaitStrategy::Constant(d);
        self
    }

    /// Any [`WaitStrategy`], e.g. exponential backoff with jitter.
    pub fn wait_strategy(mut self, w: WaitStrategy) -> Self {
        self.wait = w;
        self
    }

    /// `true`: a timer moves the breaker to half-open when the wait ends. `false` (the
    /// default): the first call after the wait does it.
    pub fn automatic_half_open(mut self, yes: bool) -> Self {
        self.automatic_half_open = yes;
        self
    }

    /// How many probe calls half-open admits; their results decide.
    pub fn half_open_permits(mut self, n: u32) -> Self {
        self.half_open_permits = n;
        self
    }

    /// Go back to open when the probes have not decided within this time.
    pub fn max_half_open_wait(mut self, d: Duration) -> Self {
        self.max_half_open_wait = Some(d);
        self
    }

    /// Reject in `call` (default) or back-pressure in `poll_ready`.
    pub fn mode(mut self, m: Mode) -> Self {
        self.mode = m;
        self
    }

    /// Checks the settings.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let pct = |name: &'static str, v: Option<f64>| match v {
            Some(p) if !(p > 0.0 && p <= 100.0) => Err(ConfigError::Percent { name, value: p }),
            _ => Ok(()),
        };
        pct("failure_rate_threshold", self.failure_rate)?;
        pct("slow_call_rate_threshold", self.slow_rate)?;
        if self.failure_rate.is_none()
            && self.slow_rate.is_none()
            && self.consecutive_failures.is_none()
        {
            return Err(ConfigError::NoTripCondition);
        }
        if self.consecutive_failures == Some(0) {
            return Err(ConfigError::Zero("consecutive_failures"));
        }
        match self.window {
            Window::Count(0) => return Err(ConfigError::Zero("window")),
            Window::Count(n) if n > MAX_WINDOW_CALLS => {
                return Err(ConfigError::TooLarge {
                    name: "window",
                    max: u64::from(MAX_WINDOW_CALLS),
                })
            }
            Window::Time(d) if d.is_zero() => return Err(ConfigError::Zero("window")),
            Window::Time(_) if self.window_secs() > MAX_WINDOW_SECS => {
                return Err(ConfigError::TooLarge {
                    name: "window (seconds)",
                    max: MAX_WINDOW_SECS,
                })
            }
            _ => {}
        }
        if self.minimum_calls == 0 {
            return Err(ConfigError::Zero("minimum_calls"));
        }
        if self.half_open_permits == 0 {
            return Err(ConfigError::Zero("half_open_permits"));
        }
        if self.half_open_permits > MAX_HALF_OPEN_PERMITS {
            return Err(ConfigError::TooLarge {
                name: "half_open_permits",
                max: u64::from(MAX_HALF_OPEN_PERMITS),
            });
        }
        if let WaitStrategy::Exponential {
            multiplier, jitter, ..
        } = self.wait
        {
            if !(multiplier.is_finite() && multiplier >= 1.0) {
                return Err(ConfigError::Multiplier(multiplier));
            }
            if !(0.0..=1.0).contains(&jitter) {
                return Err(ConfigError::Jitter(jitter));
            }
        }
        Ok(())
    }

    /// The number of one-second buckets of a time window (0 for a count window).
    pub(crate) fn window_secs(&self) -> u64 {
        match self.window {
            Window::Time(d) => d.as_secs().saturating_add(u64::from(d.subsec_nanos() > 0)),
            Window::Count(_) => 0,
        }
    }
}
