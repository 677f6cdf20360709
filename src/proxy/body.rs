//! The client's request body on its way to the upstream.
//!
//! A client that stalls an upload, breaks its chunked encoding or sends more than allowed
//! must not look like an upstream failure: `Forward` wraps the request body in
//! [`ClientBody`], which turns every failure of the body into a [`BodyFault`] that the
//! pool recognises in hyper's error chain and reports as a client error (400/408/413,
//! [`FailureKind::Client`](crate::classify::FailureKind::Client)). It also tells the
//! response timeout when the upstream made progress, so a long but moving upload is not
//! cut as a hung upstream.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::StatusCode;
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use crate::BoxError;

/// Limits on a request body, carried as a request extension.
///
/// [`crate::server`] inserts the limits of its [`ServerConfig`](crate::server::ServerConfig)
/// into every request; [`Forward`](super::Forward), which reads the body, enforces them.
/// With axum, insert one yourself (e.g. with `map_request`). Without the extension,
/// `Forward` uses [`ForwardBuilder::client_body_timeout`](super::ForwardBuilder::client_body_timeout)
/// and no size limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyLimits {
    /// At most this many body bytes (`413 Payload Too Large` beyond), like nginx's
    /// `client_max_body_size`; `None` for no limit.
    pub max_bytes: Option<u64>,
    /// At most this long without a body chunk from the client (`408 Request Timeout`),
    /// like nginx's `client_body_timeout`; `None` for no limit.
    pub idle_timeout: Option<Duration>,
}

/// Why the client's body could not be passed on; found by the pool in hyper's error chain.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BodyFault {
    #[error("reading the client's request body failed")]
    Read(#[source] BoxError),
    #[error("request body larger than {0} bytes")]
    TooLarge(u64),
    #[error("no request-body data from the client for {0:?}")]
    Idle(Duration),
}

impl BodyFault {
    fn status(&self) -> StatusCode {
        match self {
            BodyFault::Read(_) => StatusCode::BAD_REQUEST,
            BodyFault::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            BodyFault::Idle(_) => StatusCode::REQUEST_TIMEOUT,
        }
    }
}

/// 400, 408 or 413: the client's body broke, stalled or was too large.
impl crate::error::HttpStatus for BodyFault {
    fn status(&self) -> StatusCode {
        BodyFault::status(self)
    }
}

/// The client's fault: never charged to an upstream.
impl crate::error::KnownFailure for BodyFault {
    fn failure_kind(&self) -> crate::classify::FailureKind {
        crate::classify::FailureKind::Client
    }
}

/// When the upstream last took a body chunk: shared by [`ClientBody`] and the response
/// timeout, which restarts from it (nginx's `proxy_send_timeout` and `proxy_read_timeout`
/// are likewise measured between two operations, not over the whole exchange).
#[derive(Debug)]
pub(crate) struct Progress {
    start: Instant,
    nanos: AtomicU64,
}

impl Progress {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Progress {
            start: Instant::now(),
            nanos: AtomicU64::new(0),
        })
    }

    pub(crate) fn touch(&self) {
        // Saturating: u64 nanoseconds last 584 years.
        let n = u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.nanos.store(n, Ordering::Relaxed);
    }

    /// The instant of the last progress.
    pub(crate) fn last(&self) -> Instant {
        self.start + Duration::from_nanos(self.nanos.load(Ordering::Relaxed))
    }
}

/// The request body as `Forward` sends it: counts bytes against a limit, times out an idle
/// client, and reports progress.
pub(crate) struct ClientBody<B> {
    inner: B,
    max_bytes: Option<u64>,
    read: u64,
    idle: Option<Duration>,
    // Created on the first `Pending` only: most requests have no body or one that is
    // already buffered, and need no timer.
    timer: Option<Pin<Box<Sleep>>>,
    progress: Option<Arc<Progress>>,
    failed: bool,
}

impl<B: Body> ClientBody<B> {
    pub(crate) fn new(inner: B, limits: BodyLimits, progress: Option<Arc<Progress>>) -> Self {
        ClientBody {
            inner,
            max_bytes: limits.max_bytes,
            read: 0,
            idle: limits.idle_timeout,
            timer: None,
            progress,
            failed: false,
        }
    }
}

impl<B> Body for ClientBody<B>
where
    B: Body + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = BodyFault;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        if this.failed {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let len = u64::try_from(bytes::Buf::remaining(data)).unwrap_or(u64::MAX);
                    this.read = this.read.saturating_add(len);
                    if let Some(max) = this.max_bytes {
                        if this.read > max {
                            this.failed = true;
                            return Poll::Ready(Some(Err(BodyFault::TooLarge(max))));
                        }
                    }
                }
                if let (Some(timer), Some(idle)) = (this.timer.as_mut(), this.idle) {
                    timer
                        .as_mut()
                        .reset(Instant::now().checked_add(idle).unwrap_or_else(far_future));
                }
                if let Some(p) = &this.progress {
                    p.touch();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.failed = true;
                Poll::Ready(Some(Err(BodyFault::Read(e.into()))))
            }
            Poll::Ready(None) => {
                if let Some(p) = &this.progress {
                    p.touch();
                }
                Poll::Ready(None)
            }
            Poll::Pending => {
                let Some(idle) = this.idle else {
                    return Poll::Pending;
                };
                let timer = this.timer.get_or_insert_with(|| {
                    Box::pin(tokio::time::sleep_until(
                        Instant::now().checked_add(idle).unwrap_or_else(far_future),
                    ))
                });
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        this.failed = true;
                        Poll::Ready(Some(Err(BodyFault::Idle(idle))))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.failed || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A deadline that never comes in practice (about 30 years), for a duration too large
/// to add to `now`.
pub(crate) fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86_400 * 365 * 30)
}

/// Polls a timer that is kept registered between uses and moved only when it fires early
/// (one timer-wheel entry for many waits, instead of an insert and a removal per wait):
/// its registered deadline may be earlier than the one that counts now, never later.
/// Ready once `deadline()`, read again at each firing, has passed; otherwise the timer is
/// moved there and waited on.
pub(crate) fn poll_lazy_deadline(
    mut sleep: Pin<&mut Sleep>,
    cx: &mut Context<'_>,
    mut deadline: impl FnMut() -> Instant,
) -> Poll<()> {
    loop {
        std::task::ready!(sleep.as_mut().poll(cx));
        let deadline = deadline();
        if deadline <= Instant::now() {
            return Poll::Ready(());
        }
        sleep.as_mut().reset(deadline);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full, StreamBody};

    #[tokio::test]
    async fn counts_bytes_against_the_limit() {
        let limits = BodyLimits {
            max_bytes: Some(4),
            idle_timeout: None,
        };
        let ok = ClientBody::new(Full::new(Bytes::from("abcd")), limits, None);
        assert_eq!(ok.collect().await.unwrap().to_bytes(), "abcd");
        let big = ClientBody::new(Full::new(Bytes::from("abcde")), limits, None);
        assert!(matches!(big.collect().await, Err(BodyFault::TooLarge(4))));
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_client_is_timed_out_and_moving_one_is_not() {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(1);
        let stream = StreamBody::new(Box::pin(futures_util::stream::unfold(
            rx,
            |mut rx| async move { rx.recv().await.map(|f| (f, rx)) },
        )));
        let limits = BodyLimits {
            max_bytes: None,
            idle_timeout: Some(Duration::from_secs(10)),
        };
        let progress = Progress::new();
        let mut body = ClientBody::new(stream, limits, Some(progress.clone()));
        let start = Instant::now();
        // A chunk every 9 s keeps it going past the 10 s idle limit.
        for _ in 0..3 {
            let tx = tx.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(9)).await;
                let _ = tx.send(Ok(Frame::data(Bytes::from("x")))).await;
            });
            let frame = body.frame().await.unwrap().unwrap();
            assert_eq!(frame.into_data().unwrap(), "x");
        }
        assert_eq!(progress.last(), start + Duration::from_secs(27));
        let err = body.frame().await.unwrap().unwrap_err();
        assert!(matches!(err, BodyFault::Idle(d) if d == Duration::from_secs(10)));
        assert_eq!(start.elapsed(), Duration::from_secs(37));
        drop(tx);
    }
}
