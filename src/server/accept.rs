//! What the accept loop does when `accept` fails.
//!
//! Out of file descriptors (`EMFILE`/`ENFILE`), the listening socket stays readable, so a
//! loop that retries at once spins and logs thousands of lines a second while nothing
//! gets better. Resource errors pause accepting for a while (in-flight connections close
//! and free descriptors meanwhile) and are logged at most once per second with a count;
//! an error about one aborted connection (`ECONNABORTED`) is retried at once.

use std::io;
use std::time::Duration;

use tokio::time::Instant;

use crate::classify::is_local_resource_error;

/// How often a persisting accept failure is logged.
const LOG_EVERY: Duration = Duration::from_secs(1);

/// Back-off and log throttling of accept errors.
#[derive(Debug)]
pub(crate) struct AcceptBackoff {
    pause: Duration,
    last_log: Option<Instant>,
    suppressed: u64,
}

impl AcceptBackoff {
    pub(crate) fn new(pause: Duration) -> Self {
        AcceptBackoff {
            pause,
            last_log: None,
            suppressed: 0,
        }
    }

    /// How long to wait before the next `accept` after `e` (zero: retry at once). Logs
    /// at most once per [`LOG_EVERY`]; returns whether this call logged.
    pub(crate) fn on_error(&mut self, e: &io::Error) -> (Duration, bool) {
        if is_per_connection(e) {
            tracing::debug!(error = %e, "accept: connection aborted before it was accepted");
            return (Duration::ZERO, false);
        }
        let now = Instant::now();
        let due = self
            .last_log
            .is_none_or(|t| now.saturating_duration_since(t) >= LOG_EVERY);
        if due {
            let suppressed = std::mem::take(&mut self.suppressed);
            if is_local_resource_error(e) {
                tracing::warn!(error = %e, pause = ?self.pause, suppressed,
                    "accept: out of file descriptors or memory; pausing accepts");
            } else {
                tracing::warn!(error = %e, pause = ?self.pause, suppressed, "accept failed");
            }
            self.last_log = Some(now);
        } else {
            self.suppressed = self.suppressed.saturating_add(1);
        }
        (self.pause, due)
    }

    /// An accept succeeded: the next failure is logged at once.
    pub(crate) fn on_success(&mut self) {
        if self.last_log.is_some() {
            self.last_log = None;
            self.suppressed = 0;
        }
    }
}

/// Errors about one connection that died in the backlog: the listener is fine.
fn is_per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    #[tokio::test(start_paused = true)]
    async fn fd_exhaustion_pauses_accepting_and_logs_once_per_second() {
        let mut b = AcceptBackoff::new(Duration::from_millis(100));
        let emfile = io::Error::from_raw_os_error(libc::EMFILE);
        let mut logged = 0;
        // Three seconds of EMFILE: one accept attempt per pause.
        for _ in 0..30 {
            let (pause, log) = b.on_error(&emfile);
            assert_eq!(pause, Duration::from_millis(100));
            logged += usize::from(log);
            tokio::time::sleep(pause).await;
        }
        assert_eq!(logged, 3, "one line per second, not one per attempt");
        // Recovery: the next failure is reported at once.
        b.on_success();
        assert!(b.on_error(&io::Error::from_raw_os_error(libc::ENFILE)).1);
        // One aborted connection is no reason to pause.
        let aborted = io::Error::from(io::ErrorKind::ConnectionAborted);
        assert_eq!(b.on_error(&aborted), (Duration::ZERO, false));
    }
}
