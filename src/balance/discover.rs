//! A [`Discover`](tower::discover::Discover) fed through a channel, for membership that a
//! supervisor, a registry watcher or a test changes at run time; and a [`Broadcast`] that
//! feeds one membership to the balancers of several workers.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_util::Stream;
use tokio::sync::{mpsc, watch};
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

/// One membership feed for several balancers (one per worker): nginx's shared upstream
/// membership, for thread-per-core serving.
///
/// The problem: every [`Workers`](crate::server::Workers) thread builds its own balancer,
/// and each needs the same membership from one discovery source. A `Broadcast` holds the
/// current membership (`key → value`); [`insert`](Self::insert) / [`remove`](Self::remove)
/// change it (or [`follow`](Self::follow) a [`Discover`](tower::discover::Discover) such as a
/// registry watcher), and every [`subscribe`](Self::subscribe)r gets a `Discover` that
/// starts with the current members, then follows the changes.
///
/// Bounded: the broadcast keeps one snapshot, not a queue. A subscriber that falls behind
/// (its worker busy) catches up in one step by diffing the latest snapshot against what it
/// last applied, so it never sees stale intermediate sets and memory does not grow with
/// its lag. A value re-inserted under a present key reaches subscribers as a replace.
///
/// The value is usually what a worker needs to make its own endpoint service (a URL), so
/// that each worker's services (and connection pools) stay on its thread:
/// [`subscribe_map`](Self::subscribe_map) turns it into the service per worker.
/// When every `Broadcast` clone is dropped, the subscribers' streams end (each balancer
/// keeps its last set).
pub struct Broadcast<K, V> {
    tx: std::sync::Arc<watch::Sender<Members<K, V>>>,
}

/// The current membership; every entry carries the generation of its last insert, so a
/// subscriber can tell a replaced value from an unchanged one.
struct Members<K, V> {
    map: HashMap<K, (V, u64)>,
    next_gen: u64,
}

impl<K, V> Clone for Broadcast<K, V> {
    fn clone(&self) -> Self {
        Broadcast {
            tx: self.tx.clone(),
        }
    }
}

impl<K, V> fmt::Debug for Broadcast<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Broadcast")
            .field("members", &self.tx.borrow().map.len())
            .field("subscribers", &self.tx.receiver_count())
            .finish()
    }
}

impl<K, V> Default for Broadcast<K, V>
where
    K: Clone + Eq + Hash,
    V: Clone,
{
    fn default() -> Self {
        Self::new()
    }
}

impl<K, V> Broadcast<K, V>
where
    K: Clone + Eq + Hash,
    V: Clone,
{
    /// An empty membership.
    pub fn new() -> Self {
        let (tx, _) = watch::channel(Members {
            map: HashMap::new(),
            next_gen: 0,
        });
        Broadcast {
            tx: std::sync::Arc::new(tx),
        }
    }

    /// Adds (or replaces) `key`; every subscriber sees it.
    pub fn insert(&self, key: K, value: V) {
        self.apply(std::iter::once(Change::Insert(key, value)));
    }

    /// Removes `key`; `false` if it was not a member.
    pub fn remove(&self, key: &K) -> bool {
        let mut found = false;
        self.tx.send_if_modified(|m| {
            found = m.map.remove(key).is_some();
            found
        });
        found
    }

    /// Applies several changes as one new membership (subscribers never see a partial one).
    pub fn apply(&self, changes: impl IntoIterator<Item = Change<K, V>>) {
        self.tx.send_modify(|m| {
            for change in changes {
                match change {
                    Change::Insert(k, v) => {
                        m.next_gen += 1;
                        m.map.insert(k, (v, m.next_gen));
                    }
                    Change::Remove(k) => {
                        m.map.remove(&k);
                    }
                }
            }
        });
    }

    /// The current members' keys.
    pub fn keys(&self) -> Vec<K> {
        self.tx.borrow().map.keys().cloned().collect()
    }

    /// Number of members.
    pub fn len(&self) -> usize {
        self.tx.borrow().map.len()
    }

    /// `true` with no members.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A `Discover` of the values themselves (when they are the endpoint services).
    pub fn subscribe(&self) -> Subscriber<K, V, CloneValue<K, V>> {
        self.subscribe_map(|_, v| Some(v.clone()))
    }

    /// A `Discover` whose services are `make(key, value)`, called on the subscriber's own
    /// task (so on its worker's thread). `None` skips that member (log why in `make`); it
    /// is tried again if the member's value is replaced.
    pub fn subscribe_map<S, F>(&self, make: F) -> Subscriber<K, V, F>
    where
        F: FnMut(&K, &V) -> Option<S>,
    {
        Subscriber {
            rx: Some(self.tx.subscribe()),
            changed: None,
            primed: false,
            applied: HashMap::new(),
            pending: VecDeque::new(),
            make,
        }
    }

    /// Feeds the membership from `discover` (a registry watcher, a [`channel`]): every
    /// batch of changes that is ready together becomes one new membership. Ends when the
    /// stream ends (`Ok`) or fails (`Err`); the last membership stays.
    pub async fn follow<D>(&self, discover: D) -> Result<(), crate::BoxError>
    where
        D: tower::discover::Discover<Key = K, Service = V>,
        D::Error: Into<crate::BoxError>,
    {
        let mut discover = std::pin::pin!(discover);
        loop {
            let first = std::future::poll_fn(|cx| discover.as_mut().poll_discover(cx)).await;
            let mut batch = match first {
                None => return Ok(()),
                Some(Err(e)) => return Err(e.into()),
                Some(Ok(change)) => vec![change],
            };
            // Whatever else is ready now joins the same membership.
            let mut end = None;
            std::future::poll_fn(|cx| loop {
                match discover.as_mut().poll_discover(cx) {
                    Poll::Pending => return Poll::Ready(()),
                    Poll::Ready(Some(Ok(change))) => batch.push(change),
                    Poll::Ready(Some(Err(e))) => {
                        end = Some(Err(e.into()));
                        return Poll::Ready(());
                    }
                    Poll::Ready(None) => {
                        end = Some(Ok(()));
                        return Poll::Ready(());
                    }
                }
            })
            .await;
            self.apply(batch);
            if let Some(end) = end {
                return end;
            }
        }
    }
}

/// The map of [`Broadcast::subscribe`]: the value itself is the service.
pub type CloneValue<K, V> = fn(&K, &V) -> Option<V>;

type Changed<K, V> = Pin<Box<dyn Future<Output = Option<watch::Receiver<Members<K, V>>>> + Send>>;

/// One balancer's view of a [`Broadcast`]: a `Discover` that yields the current members
/// first, then the difference each time the membership changes.
pub struct Subscriber<K, V, F> {
    /// `None` while `changed` waits with it, or once the broadcast is gone.
    rx: Option<watch::Receiver<Members<K, V>>>,
    changed: Option<Changed<K, V>>,
    primed: bool,
    /// Generation of every member this subscriber has inserted.
    applied: HashMap<K, u64>,
    pending: VecDeque<(K, Option<u64>)>,
    make: F,
}

// No field is structurally pinned (the wait is boxed), so moving a subscriber is fine.
impl<K, V, F> Unpin for Subscriber<K, V, F> {}

impl<K, V, F> fmt::Debug for Subscriber<K, V, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscriber")
            .field("applied", &self.applied.len())
            .finish_non_exhaustive()
    }
}

impl<K, V, S, F> Stream for Subscriber<K, V, F>
where
    K: Clone + Eq + Hash + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    F: FnMut(&K, &V) -> Option<S>,
{
    type Item = Result<Change<K, S>, Infallible>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            // Changes diffed earlier: the service is made now, as each is handed out.
            while let Some((key, gen)) = this.pending.pop_front() {
                let Some(gen) = gen else {
                    return Poll::Ready(Some(Ok(Change::Remove(key))));
                };
                let Some(rx) = this.rx.as_ref() else { break };
                let made = {
                    let members = rx.borrow();
                    match members.map.get(&key) {
                        // Replaced or removed since the diff: the next diff handles it.
                        Some((v, g)) if *g == gen => (this.make)(&key, v),
                        _ => None,
                    }
                };
                if let Some(svc) = made {
                    return Poll::Ready(Some(Ok(Change::Insert(key, svc))));
                }
            }
            if !this.primed {
                this.primed = true;
                this.diff();
                continue;
            }
            let fut = match this.changed.as_mut() {
                Some(fut) => fut,
                None => {
                    let Some(mut rx) = this.rx.take() else {
                        return Poll::Ready(None);
                    };
                    this.changed.insert(Box::pin(
                        async move { rx.changed().await.ok().map(|()| rx) },
                    ))
                }
            };
            match fut.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(rx) => {
                    this.changed = None;
                    // The broadcast is gone: end (the balancer keeps its last set).
                    let Some(rx) = rx else {
                        return Poll::Ready(None);
                    };
                    this.rx = Some(rx);
                    this.diff();
                }
            }
        }
    }
}

impl<K, V, F> Subscriber<K, V, F>
where
    K: Clone + Eq + Hash,
{
    /// Queues the difference between the latest membership and what was applied.
    fn diff(&mut self) {
        let Some(rx) = self.rx.as_mut() else { return };
        let members = rx.borrow_and_update();
        self.pending.clear();
        self.applied.retain(|k, _| {
            let keep = members.map.contains_key(k);
            if !keep {
                self.pending.push_back((k.clone(), None));
            }
            keep
        });
        for (k, (_, gen)) in &members.map {
            if self.applied.get(k) != Some(gen) {
                self.applied.insert(k.clone(), *gen);
                self.pending.push_back((k.clone(), Some(*gen)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::{FutureExt, StreamExt};

    fn key_of(c: &Change<&'static str, u32>) -> (&'static str, Option<u32>) {
        match c {
            Change::Insert(k, v) => (k, Some(*v)),
            Change::Remove(k) => (k, None),
        }
    }

    /// Everything the subscriber has ready now, sorted (a diff's order is the map's).
    fn ready<F>(sub: &mut Subscriber<&'static str, u32, F>) -> Vec<(&'static str, Option<u32>)>
    where
        F: FnMut(&&'static str, &u32) -> Option<u32>,
    {
        let mut out = Vec::new();
        while let Some(Some(Ok(c))) = sub.next().now_or_never() {
            out.push(key_of(&c));
        }
        out.sort();
        out
    }

    #[tokio::test]
    async fn starts_from_the_current_members_then_follows() {
        let b = Broadcast::new();
        b.insert("a", 1);
        b.insert("b", 2);
        let mut sub = b.subscribe();
        assert_eq!(ready(&mut sub), [("a", Some(1)), ("b", Some(2))]);
        assert_eq!(ready(&mut sub), []);
        b.insert("a", 3); // a replace
        assert!(b.remove(&"b"));
        assert!(!b.remove(&"b"));
        assert_eq!(ready(&mut sub), [("a", Some(3)), ("b", None)]);
    }

    #[tokio::test]
    async fn a_slow_subscriber_gets_the_latest_set_not_a_queue() {
        let b = Broadcast::new();
        let mut sub = b.subscribe();
        assert_eq!(ready(&mut sub), []);
        // A thousand changes while the subscriber does not poll: it sees only the result.
        for i in 0..1000 {
            b.insert("churn", i);
            if i % 2 == 0 {
                b.remove(&"churn");
            }
        }
        b.insert("kept", 7);
        assert_eq!(ready(&mut sub), [("churn", Some(999)), ("kept", Some(7))]);
    }

    #[tokio::test]
    async fn map_runs_per_subscriber_and_none_skips() {
        let b = Broadcast::new();
        b.insert("a", 1);
        b.insert("bad", 0);
        let mut sub = b.subscribe_map(|_, v: &u32| (*v > 0).then_some(v * 10));
        assert_eq!(ready(&mut sub), [("a", Some(10))]);
        b.insert("bad", 2); // fixed: tried again
        assert_eq!(ready(&mut sub), [("bad", Some(20))]);
    }

    #[tokio::test]
    async fn ends_when_the_broadcast_is_dropped() {
        let b = Broadcast::new();
        b.insert("a", 1);
        let mut sub = b.subscribe();
        drop(b);
        // The last membership is still delivered, then the stream ends.
        assert_eq!(key_of(&sub.next().await.unwrap().unwrap()), ("a", Some(1)));
        assert!(sub.next().await.is_none());
    }

    #[tokio::test]
    async fn follow_feeds_from_a_discover() {
        let b = Broadcast::new();
        let (tx, disc) = channel();
        tx.insert("a", 1);
        tx.insert("b", 2);
        tx.remove("a");
        drop(tx);
        b.follow(disc).await.unwrap();
        assert_eq!(b.keys(), ["b"]);
        let mut sub = b.subscribe();
        assert_eq!(ready(&mut sub), [("b", Some(2))]);
    }
}
