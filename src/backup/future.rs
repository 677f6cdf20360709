use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Method, Response};
use http_body::Body;
use pin_project_lite::pin_project;

use super::error::KeyError;
use super::key::ObjectKey;
use super::layer::Config;
use super::service::{start, BackupStatus};
use crate::body::tee::TeeBody;

pub(crate) enum Plan {
    None,
    Rejected(KeyError),
    Backup {
        key: ObjectKey,
        method: Method,
        authority: Option<String>,
        cfg: Arc<Config>,
        /// A back-fill fetch ([`BackfillFetch`](super::BackfillFetch)): read at the sinks' pace.
        paced: bool,
    },
}

pin_project! {
    /// Response future of [`Tee`](super::Tee).
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        plan: Option<Plan>,
    }
}

impl<F> ResponseFuture<F> {
    pub(crate) fn new(inner: F, plan: Plan) -> Self {
        ResponseFuture {
            inner,
            plan: Some(plan),
        }
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: Body<Data = Bytes> + Send + 'static,
{
    type Output = Result<Response<TeeBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let res = std::task::ready!(this.inner.poll(cx))?;
        Poll::Ready(Ok(match this.plan.take() {
            Some(Plan::Backup {
                key,
                method,
                authority,
                cfg,
                paced,
            }) => start(res, key, &method, authority, &cfg, paced),
            Some(Plan::Rejected(e)) => {
                let mut res = res.map(TeeBody::passthrough);
                res.extensions_mut().insert(BackupStatus::InvalidKey(e));
                res
            }
            _ => res.map(TeeBody::passthrough),
        }))
    }
}
