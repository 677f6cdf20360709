use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::Response;
use http_body::Body;
use pin_project_lite::pin_project;

use super::body::CacheBody;
use super::layer::Config;
use super::service::{from_entry, on_response};
use super::store::CachedResponse;
use crate::body::tee::TeeBody;

pub(crate) struct Miss {
    pub(crate) key: String,
    /// The request allows storing (GET, no `no-store`).
    pub(crate) fill: bool,
    pub(crate) head: bool,
    /// An expired entry still inside the stale-if-error window.
    pub(crate) stale: Option<Arc<CachedResponse>>,
    pub(crate) cfg: Arc<Config>,
}

pin_project! {
    #[project = StateProj]
    enum State<F, B> {
        Ready { res: Option<Response<CacheBody<B>>> },
        Inner { #[pin] fut: F, miss: Option<Miss> },
    }
}

pin_project! {
    /// Response future of [`Cache`](super::Cache).
    pub struct ResponseFuture<F, B> {
        #[pin]
        state: State<F, B>,
    }
}

impl<F, B> ResponseFuture<F, B> {
    pub(crate) fn ready(res: Response<CacheBody<B>>) -> Self {
        ResponseFuture {
            state: State::Ready { res: Some(res) },
        }
    }

    pub(crate) fn pass(fut: F) -> Self {
        ResponseFuture {
            state: State::Inner { fut, miss: None },
        }
    }

    pub(crate) fn miss(fut: F, miss: Miss) -> Self {
        ResponseFuture {
            state: State::Inner {
                fut,
                miss: Some(miss),
            },
        }
    }
}

fn upstream_failed(s: http::StatusCode) -> bool {
    matches!(s.as_u16(), 500 | 502 | 503 | 504)
}

impl<F, B, E> Future for ResponseFuture<F, B>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: Body<Data = Bytes> + Send + 'static,
{
    type Output = Result<Response<CacheBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Ready { res } => match res.take() {
                Some(r) => Poll::Ready(Ok(r)),
                // Pending here would hang the caller forever without a waker.
                None => crate::error::polled_after_completion("cache::ResponseFuture"),
            },
            StateProj::Inner { fut, miss } => {
                let out = std::task::ready!(fut.poll(cx));
                let Some(mut m) = miss.take() else {
                    return Poll::Ready(
                        out.map(|r| r.map(|b| CacheBody::live(TeeBody::passthrough(b)))),
                    );
                };
                let failed = match &out {
                    Ok(r) => upstream_failed(r.status()),
                    Err(_) => true,
                };
                if let (true, Some(entry)) = (failed, m.stale.take()) {
                    m.cfg.stats.stale.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(key = m.key, "upstream failed; serving stale entry");
                    return Poll::Ready(Ok(from_entry(entry, m.head, "STALE")));
                }
                Poll::Ready(out.map(|r| on_response(r, m)))
            }
        }
    }
}
