//! The discovery driver: applies a [`Discover`]'s membership changes to a balancer by
//! publishing new immutable snapshots (off the request path).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;
use tower::discover::{Change, Discover};

use super::service::{EpList, MakeGate, Shared};
use crate::BoxError;

pin_project! {
    /// Applies a [`Discover`]'s changes to a [`Balance`](super::Balance): spawn it, or await it next to the
    /// server. Changes that are ready together are published as one new set. Ends when the
    /// stream ends (`Ok`) or fails (`Err`); the last set stays in use either way.
    pub struct Driver<D, M, C>
    where
        D: Discover,
        M: MakeGate<D::Key>,
    {
        #[pin]
        discover: D,
        shared: Arc<Shared<D::Key, D::Service, M, C>>,
    }
}

impl<D, M, C> Driver<D, M, C>
where
    D: Discover,
    M: MakeGate<D::Key>,
{
    pub(crate) fn new(discover: D, shared: Arc<Shared<D::Key, D::Service, M, C>>) -> Self {
        Driver { discover, shared }
    }
}

impl<D, M, C> fmt::Debug for Driver<D, M, C>
where
    D: Discover,
    M: MakeGate<D::Key>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Driver")
    }
}

impl<D, M, C> Future for Driver<D, M, C>
where
    D: Discover,
    D::Key: Clone + Eq + std::hash::Hash + fmt::Debug,
    D::Error: Into<BoxError>,
    M: MakeGate<D::Key>,
{
    type Output = Result<(), BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let mut next: Option<EpList<D::Key, D::Service, M>> = None;
        let result = loop {
            match this.discover.as_mut().poll_discover(cx) {
                Poll::Pending => break Poll::Pending,
                Poll::Ready(None) => break Poll::Ready(Ok(())),
                Poll::Ready(Some(Err(e))) => break Poll::Ready(Err(e.into())),
                Poll::Ready(Some(Ok(change))) => {
                    let list =
                        next.get_or_insert_with(|| this.shared.snapshot.load().endpoints.clone());
                    match change {
                        Change::Insert(key, svc) => {
                            let ep = Arc::new(this.shared.make_endpoint(key, svc));
                            match list.iter_mut().find(|e| e.key == ep.key) {
                                Some(slot) => {
                                    tracing::info!(endpoint = ?ep.key, "endpoint replaced");
                                    *slot = ep;
                                }
                                None => {
                                    tracing::info!(endpoint = ?ep.key, id = ep.id, "endpoint added");
                                    list.push(ep);
                                }
                            }
                        }
                        Change::Remove(key) => {
                            let before = list.len();
                            list.retain(|e| e.key != key);
                            if list.len() != before {
                                tracing::info!(endpoint = ?key, "endpoint removed");
                            }
                        }
                    }
                }
            }
        };
        if let Some(list) = next {
            this.shared.publish(list);
        }
        result
    }
}
