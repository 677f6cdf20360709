//! The background drain: finishes the sinks' copies after the client left
//! ([`DisconnectPolicy::Finish`]), within its own caps and the global [`DrainBudget`].

use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body::Body;

use super::budget::DrainPermit;
use super::{check_len, AbortReason, DisconnectPolicy, DrainBudget, Outlet, TeeStats};

pub(super) type DrainFn<B> = fn(Pin<Box<B>>, Drain);

/// State handed to the background task that finishes the copies after a disconnect.
pub(super) struct Drain {
    pub(super) outlets: Vec<Outlet>,
    pub(super) seen: u64,
    pub(super) expected: Option<u64>,
    pub(super) policy: DisconnectPolicy,
    pub(super) stats: Arc<TeeStats>,
    pub(super) budget: Arc<DrainBudget>,
}

/// Runs when the client dropped the body before its end (generic, so it knows `B: Body`).
pub(super) fn spawn_drain<B>(body: Pin<Box<B>>, mut d: Drain)
where
    B: Body<Data = Bytes> + Send + 'static,
{
    if body.is_end_stream() {
        d.finish();
        return;
    }
    match d.policy {
        DisconnectPolicy::Finish { max_bytes, .. }
            if tokio::runtime::Handle::try_current().is_ok() =>
        {
            // What is left of a body of known length is reserved up front, so drains
            // that cannot all finish are not started. A rest beyond the per-drain cap
            // would be stopped anyway: reserving it fails the same way.
            let rest = d.expected.map_or(0, |e| e.saturating_sub(d.seen));
            let permit = (rest <= max_bytes)
                .then(|| d.budget.try_start(rest))
                .flatten();
            let Some(permit) = permit else {
                d.stats.drains_refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    received = d.seen,
                    "client left and the drain budget is full; backup copies aborted"
                );
                return d.abort(AbortReason::DrainLimit);
            };
            d.stats.drains_started.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(
                received = d.seen,
                "client left; finishing backup copies in the background"
            );
            tokio::spawn(run_drain(body, d, permit));
        }
        _ => {
            d.stats.client_gone_aborts.fetch_add(1, Ordering::Relaxed);
            tracing::info!(received = d.seen, "client left; backup copies aborted");
            d.abort(AbortReason::ClientGone);
        }
    }
}

impl Drain {
    fn finish(&mut self) {
        match check_len(self.expected, self.seen) {
            Ok(()) => self.outlets.iter_mut().for_each(Outlet::end),
            Err(r) => {
                self.stats.length_mismatches.fetch_add(1, Ordering::Relaxed);
                self.abort(r);
            }
        }
    }

    fn abort(&mut self, reason: AbortReason) {
        for o in &mut self.outlets {
            o.abort(reason.clone());
        }
    }
}

async fn run_drain<B>(mut body: Pin<Box<B>>, mut d: Drain, mut permit: DrainPermit)
where
    B: Body<Data = Bytes> + Send + 'static,
{
    let DisconnectPolicy::Finish {
        max_bytes,
        max_time,
    } = d.policy
    else {
        return d.abort(AbortReason::ClientGone);
    };
    let now = tokio::time::Instant::now();
    // A configured `Duration::MAX` means "no practical limit", not a panic.
    let deadline = now
        .checked_add(max_time)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 86_400));
    let start = d.seen;
    let reason = loop {
        if d.outlets.iter().all(|o| !o.is_open()) {
            return;
        }
        let frame = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx));
        // The error is dropped at once: only its occurrence matters here.
        let frame = match tokio::time::timeout_at(deadline, frame).await {
            Ok(f) => f.map(|r| r.map_err(drop)),
            Err(_) => break AbortReason::DrainLimit,
        };
        match frame {
            Some(Ok(frame)) => {
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                let n = data.len() as u64;
                d.seen += n;
                d.stats.drained_bytes.fetch_add(n, Ordering::Relaxed);
                if d.seen - start > max_bytes || !permit.try_charge(n) {
                    break AbortReason::DrainLimit;
                }
                if let Some(e) = d.expected.filter(|e| d.seen > *e) {
                    break AbortReason::TooLong { expected: e };
                }
                let sends = async {
                    for o in &mut d.outlets {
                        o.send_waiting(&data).await;
                    }
                };
                if tokio::time::timeout_at(deadline, sends).await.is_err() {
                    break AbortReason::DrainLimit;
                }
            }
            Some(Err(_)) => break AbortReason::Upstream,
            None => match check_len(d.expected, d.seen) {
                Ok(()) => {
                    d.outlets.iter_mut().for_each(Outlet::end);
                    tracing::debug!(bytes = d.seen, "background drain finished");
                    return;
                }
                Err(r) => break r,
            },
        }
    };
    match reason {
        AbortReason::DrainLimit => d.stats.drain_aborts.fetch_add(1, Ordering::Relaxed),
        AbortReason::Upstream => d.stats.upstream_aborts.fetch_add(1, Ordering::Relaxed),
        _ => d.stats.length_mismatches.fetch_add(1, Ordering::Relaxed),
    };
    tracing::warn!(%reason, "background drain aborted the backup copies");
    d.abort(reason);
}
