//! Refusals of [`ratelimit`](super) and configuration errors.

use std::time::Duration;

use http::StatusCode;

use crate::error::HttpStatus;

/// A request refused by [`RateLimit`](super::RateLimit); put in the response extensions
/// (for access logs and metrics) of the `429`/`503` it answered with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RateLimited {
    /// Over the limit (`429`).
    #[error("rate limit exceeded; retry after {retry_after:?}")]
    Exceeded {
        /// When a request of this key would next be allowed.
        retry_after: Duration,
    },
    /// The shared limiter is unreachable and configured to fail closed (`503`).
    #[error("rate limiter unavailable; retry after {retry_after:?}")]
    Unavailable {
        /// When the limiter tries its backend again.
        retry_after: Duration,
    },
}

impl HttpStatus for RateLimited {
    fn status(&self) -> StatusCode {
        match self {
            RateLimited::Exceeded { .. } => StatusCode::TOO_MANY_REQUESTS,
            RateLimited::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// `Retry-After` in whole seconds, rounded up (a client retrying at the floor would be
/// refused again), at least 1, saturating instead of overflowing.
pub(crate) fn retry_after_secs(d: Duration) -> u64 {
    let secs = d.as_secs().saturating_add(u64::from(d.subsec_nanos() > 0));
    secs.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_rounds_up_and_saturates() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1001)), 2);
        assert_eq!(retry_after_secs(Duration::from_secs(10)), 10);
        assert_eq!(retry_after_secs(Duration::MAX), u64::MAX);
    }
}
