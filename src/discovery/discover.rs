//! A [`Watcher`] as a `tower::discover::Discover`.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_util::stream::{self, BoxStream, Stream, StreamExt};
use tower::discover::Change;

use super::{DiscoveryError, Instance, Watcher};
use crate::proxy::{Forward, ForwardError};

/// Makes the endpoint service for an [`Instance`].
///
/// Implemented for closures `FnMut(&Instance) -> Result<S, E>` and for
/// [`Forward`] (a `Forward` to the instance's `http://address:port`, sharing the
/// template's connection pool), which gives a nameable `ServiceDiscover<Forward<B>>`.
pub trait MakeEndpoint {
    /// The endpoint service.
    type Service;
    /// Why an endpoint could not be made (logged; the instance is left out).
    type Error: fmt::Display;
    /// Makes the endpoint for `instance`.
    fn make_endpoint(&mut self, instance: &Instance) -> Result<Self::Service, Self::Error>;
}

impl<F, S, E> MakeEndpoint for F
where
    F: FnMut(&Instance) -> Result<S, E>,
    E: fmt::Display,
{
    type Service = S;
    type Error = E;
    fn make_endpoint(&mut self, instance: &Instance) -> Result<S, E> {
        self(instance)
    }
}

impl<B> MakeEndpoint for Forward<B>
where
    B: http_body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<crate::BoxError>,
{
    type Service = Forward<B>;
    type Error = ForwardError;
    fn make_endpoint(&mut self, instance: &Instance) -> Result<Forward<B>, ForwardError> {
        self.to(&instance.http_uri())
    }
}

/// The instances of a [`Watcher`] as a stream of [`Change`]s, i.e. a
/// [`tower::discover::Discover`] keyed by instance id.
///
/// On the first poll it inserts every current instance; afterwards it sends the difference
/// between consecutive snapshots: `Insert` for a new instance or one whose address, tags or
/// version changed (a balancer replaces the endpoint under the same key), `Remove` for one
/// that is gone. Because the watcher is fail-static, an unreachable registry removes
/// nothing. If `make` fails for an instance, a warning is logged and the instance is left
/// out (and removed if an older version of it was in).
///
/// The stream does not end: if the registry's feed stops, the last instances stay
/// (fail-static), like while the registry is unreachable.
pub struct ServiceDiscover<M: MakeEndpoint> {
    watcher: Watcher,
    changes: BoxStream<'static, ()>,
    primed: bool,
    current: HashMap<String, Instance>,
    pending: VecDeque<Change<String, M::Service>>,
    make: M,
}

// Nothing is pinned structurally: the endpoint services only sit in a queue.
impl<M: MakeEndpoint> Unpin for ServiceDiscover<M> {}

impl<M: MakeEndpoint> fmt::Debug for ServiceDiscover<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceDiscover")
            .field("service", &self.watcher.service())
            .field("endpoints", &self.current.len())
            .field("pending", &self.pending.len())
            .finish()
    }
}

impl<M: MakeEndpoint> ServiceDiscover<M> {
    /// Follows `watcher`, making endpoint services with `make`.
    pub fn new(watcher: Watcher, make: M) -> Self {
        // Subscribe before the first diff so no change between them is missed.
        let rx = watcher.subscribe();
        let changes = stream::unfold(rx, |mut rx| async move {
            rx.changed().await.ok()?;
            Some(((), rx))
        })
        .boxed();
        ServiceDiscover {
            watcher,
            changes,
            primed: false,
            current: HashMap::new(),
            pending: VecDeque::new(),
            make,
        }
    }

    /// The watcher this follows (for its snapshot and staleness).
    pub fn watcher(&self) -> &Watcher {
        &self.watcher
    }

    fn diff(&mut self) {
        let snap = self.watcher.snapshot();
        let gone: Vec<String> = self
            .current
            .keys()
            .filter(|id| snap.get(id).is_none())
            .cloned()
            .collect();
        for id in gone {
            self.current.remove(&id);
            self.pending.push_back(Change::Remove(id));
        }
        for inst in snap.instances() {
            if self.current.get(&inst.id) == Some(inst) {
                continue;
            }
            match self.make.make_endpoint(inst) {
                Ok(svc) => {
                    self.current.insert(inst.id.clone(), inst.clone());
                    self.pending.push_back(Change::Insert(inst.id.clone(), svc));
                }
                Err(e) => {
                    tracing::warn!(instance = %inst, error = %e, "cannot make an endpoint for this instance; leaving it out");
                    if self.current.remove(&inst.id).is_some() {
                        self.pending.push_back(Change::Remove(inst.id.clone()));
                    }
                }
            }
        }
    }
}

impl<M: MakeEndpoint> Stream for ServiceDiscover<M> {
    type Item = Result<Change<String, M::Service>, DiscoveryError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(change) = this.pending.pop_front() {
                return Poll::Ready(Some(Ok(change)));
            }
            if !this.primed {
                this.primed = true;
                this.diff();
                continue;
            }
            match this.changes.poll_next_unpin(cx) {
                Poll::Ready(Some(())) => this.diff(),
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}
