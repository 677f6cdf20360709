use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;

use tokio::time::Instant;

use super::body::{far_future, Progress};
use super::error::ForwardError;
use super::headers::strip_hop_by_hop;
use super::pool::HostPool;
use crate::BoxError;

type Inner = Pin<Box<dyn Future<Output = Result<Response<Incoming>, ForwardError>> + Send>>;

/// Response future of [`Forward`](super::Forward).
pub struct ResponseFuture {
    inner: Inner,
}

impl ResponseFuture {
    pub(super) fn new<B>(
        pool: Arc<HostPool<B>>,
        req: Request<B>,
        timeout: Option<Duration>,
        progress: Option<Arc<Progress>>,
    ) -> Self
    where
        B: http_body::Body + Send + Unpin + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        ResponseFuture {
            inner: Box::pin(async move {
                let mut res = match timeout {
                    None => pool.send(req).await?,
                    Some(after) => {
                        let send = pool.send(req);
                        tokio::pin!(send);
                        let start = Instant::now();
                        loop {
                            // The upstream is silent for `after` since the later of the
                            // start and its last taken body chunk.
                            let last = progress.as_ref().map_or(start, |p| p.last().max(start));
                            let deadline = last.checked_add(after).unwrap_or_else(far_future);
                            tokio::select! {
                                res = &mut send => break res?,
                                () = tokio::time::sleep_until(deadline) => {
                                    let moved = progress.as_ref().is_some_and(|p| p.last() > last);
                                    if !moved {
                                        return Err(ForwardError::ResponseTimeout {
                                            upstream: pool.upstream().authority().to_string(),
                                            after,
                                        });
                                    }
                                }
                            }
                        }
                    }
                };
                strip_hop_by_hop(res.headers_mut());
                Ok(res)
            }),
        }
    }

    /// A response future from any boxed exchange (the upgrade path).
    pub(super) fn boxed(
        f: impl Future<Output = Result<Response<Incoming>, ForwardError>> + Send + 'static,
    ) -> Self {
        ResponseFuture { inner: Box::pin(f) }
    }

    pub(super) fn failed(e: ForwardError) -> Self {
        ResponseFuture {
            inner: Box::pin(std::future::ready(Err(e))),
        }
    }
}

impl std::fmt::Debug for ResponseFuture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ResponseFuture")
    }
}

impl Future for ResponseFuture {
    type Output = Result<Response<Incoming>, ForwardError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}
