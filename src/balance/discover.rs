//! A [`Discover`](tower::discover::Discover) fed through a channel, for membership that a
//! supervisor, a registry watcher or a test changes at run time.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_util::Stream;
use tokio::sync::mpsc;
use tower::discover::Change;

/// Sends membership changes to a [`ChannelDiscover`].
#[derive(Debug)]
pub struct DiscoverSender<K, S> {
    tx: mpsc::UnboundedSender<Change<K, S>>,
}

impl<K, S> Clone for DiscoverSender<K, S> {
    fn clone(&self) -> Self {
        DiscoverSender {
            tx: self.tx.clone(),
        }
    }
}

impl<K, S> DiscoverSender<K, S> {
    /// Adds (or replaces) the endpoint `key`. `false` when the balancer's driver is gone.
    pub fn insert(&self, key: K, service: S) -> bool {
        self.tx.send(Change::Insert(key, service)).is_ok()
    }

    /// Removes the endpoint `key`. `false` when the balancer's driver is gone.
    pub fn remove(&self, key: K) -> bool {
        self.tx.send(Change::Remove(key)).is_ok()
    }
}

/// The receiving side: a `Discover` that yields what the [`DiscoverSender`]s send and ends
/// when all of them are dropped.
#[derive(Debug)]
pub struct ChannelDiscover<K, S> {
    rx: mpsc::UnboundedReceiver<Change<K, S>>,
}

/// A connected sender and `Discover`.
pub fn channel<K, S>() -> (DiscoverSender<K, S>, ChannelDiscover<K, S>) {
    let (tx, rx) = mpsc::unbounded_channel();
    (DiscoverSender { tx }, ChannelDiscover { rx })
}

impl<K, S> Stream for ChannelDiscover<K, S> {
    type Item = Result<Change<K, S>, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx).map(|c| c.map(Ok))
    }
}
