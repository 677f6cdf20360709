//! Back-fill: request what nobody asked for yet, so it gets backed up too.

use std::collections::{HashSet, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::StreamExt;
use http::{Request, Response};
use http_body::Body;
use http_body_util::{BodyExt, Empty};
use tower::ServiceExt;
use tower_service::Service;

use super::error::BackfillError;
use super::key::ObjectKey;
use crate::BoxError;

/// A request extension that [`backfill`] sets on its fetches: a [`TeeLayer`](super::TeeLayer)
/// seeing it reads the response no faster than its slowest sink writes
/// ([`TeeBody::paced`](crate::body::tee::TeeBody::paced)), so the copy cannot overflow.
/// Set it on your own requests only where nobody waits for the answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BackfillFetch;

/// Keys of backup copies lost because a sink could not keep up with the client, waiting
/// for a paced [`backfill`]. Give it to [`TeeLayerBuilder::backfill_queue`](super::TeeLayerBuilder::backfill_queue)
/// and run `backfill(svc, queue.take_all(), n)` from time to time (or after
/// [`wait`](Self::wait)). Bounded: past `capacity` keys a key is refused and counted
/// ([`refused`](Self::refused)); a key already queued is not queued twice. Clones share
/// the queue.
#[derive(Clone)]
pub struct BackfillQueue {
    inner: Arc<QueueInner>,
}

struct QueueInner {
    keys: Mutex<(VecDeque<ObjectKey>, HashSet<ObjectKey>)>,
    capacity: usize,
    refused: AtomicU64,
    ready: tokio::sync::Notify,
}

impl fmt::Debug for BackfillQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackfillQueue")
            .field("len", &self.len())
            .field("capacity", &self.inner.capacity)
            .finish()
    }
}

impl BackfillQueue {
    /// A queue of at most `capacity` keys.
    pub fn new(capacity: usize) -> Self {
        BackfillQueue {
            inner: Arc::new(QueueInner {
                keys: Mutex::new((VecDeque::new(), HashSet::new())),
                capacity,
                refused: AtomicU64::new(0),
                ready: tokio::sync::Notify::new(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (VecDeque<ObjectKey>, HashSet<ObjectKey>)> {
        // Every update below leaves both collections consistent before it can panic.
        self.inner.keys.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `key`. `false` when it was already queued, or the queue is full (then it
    /// is counted in [`refused`](Self::refused) and logged).
    pub fn push(&self, key: ObjectKey) -> bool {
        let mut g = self.lock();
        if g.1.contains(&key) {
            return false;
        }
        if g.0.len() >= self.inner.capacity {
            drop(g);
            self.inner.refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%key, capacity = self.inner.capacity, "back-fill queue full: key dropped");
            return false;
        }
        g.1.insert(key.clone());
        g.0.push_back(key);
        drop(g);
        self.inner.ready.notify_one();
        true
    }

    /// Takes every queued key, oldest first.
    pub fn take_all(&self) -> Vec<ObjectKey> {
        let mut g = self.lock();
        g.1.clear();
        g.0.drain(..).collect()
    }

    /// Keys queued now.
    pub fn len(&self) -> usize {
        self.lock().0.len()
    }

    /// Whether no key is queued.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keys refused because the queue was full.
    pub fn refused(&self) -> u64 {
        self.inner.refused.load(Ordering::Relaxed)
    }

    /// Waits until at least one key is queued.
    pub async fn wait(&self) {
        loop {
            let notified = self.inner.ready.notified();
            if !self.is_empty() {
                return;
            }
            notified.await;
        }
    }
}

/// The result of [`backfill`].
#[derive(Debug, Default)]
pub struct BackfillReport {
    /// Keys fetched in full with a 2xx status, in completion order.
    pub done: Vec<ObjectKey>,
    /// Keys that failed, in completion order, with the reason. Keys that were not valid
    /// object keys are reported with their original text.
    pub failed: Vec<(String, BackfillError)>,
}

impl fmt::Display for BackfillReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} done, {} failed", self.done.len(), self.failed.len())
    }
}

/// Requests `GET /<key>` through `svc` for every key, at most `concurrency` at a time,
/// reading each body to its end so that a backup layer inside `svc` sees the whole object
/// (the seed's auxiliary process that uploads what storage still lacks). Each request
/// carries [`BackfillFetch`], so a [`TeeLayer`](super::TeeLayer) in `svc` reads it at its
/// sinks' pace: a copy lost to a slow sink (see [`BackfillQueue`]) is not lost again.
///
/// A key succeeds when the status is 2xx and the body was read without error. A
/// successful fetch means the object passed through the service; whether each sink
/// committed it is reported by the backup layer ([`TeeLayer::subscribe`](super::TeeLayer::subscribe)
/// and its stats).
pub async fn backfill<S, B, I>(svc: S, keys: I, concurrency: usize) -> BackfillReport
where
    S: Service<Request<Empty<Bytes>>, Response = Response<B>> + Clone,
    S::Error: Into<BoxError>,
    B: Body,
    B::Error: Into<BoxError>,
    I: IntoIterator,
    I::Item: AsRef<str>,
{
    let jobs = keys.into_iter().map(|k| {
        let svc = svc.clone();
        let raw = k.as_ref().to_owned();
        async move {
            let res = fetch(svc, &raw).await;
            (raw, res)
        }
    });
    let mut stream = futures_util::stream::iter(jobs).buffer_unordered(concurrency.max(1));
    let mut report = BackfillReport::default();
    while let Some((raw, res)) = stream.next().await {
        match res {
            Ok(key) => {
                tracing::debug!(%key, "back-fill fetched");
                report.done.push(key);
            }
            Err(e) => {
                tracing::warn!(key = %raw, error = %e, "back-fill failed");
                report.failed.push((raw, e));
            }
        }
    }
    report
}

async fn fetch<S, B>(svc: S, raw: &str) -> Result<ObjectKey, BackfillError>
where
    S: Service<Request<Empty<Bytes>>, Response = Response<B>>,
    S::Error: Into<BoxError>,
    B: Body,
    B::Error: Into<BoxError>,
{
    let key = ObjectKey::new(raw.trim_start_matches('/'))?;
    let path = encode_path(key.as_str());
    let mut req = Request::get(path)
        .body(Empty::new())
        .map_err(|e| BackfillError::Service(e.into()))?;
    req.extensions_mut().insert(BackfillFetch);
    let res = svc
        .oneshot(req)
        .await
        .map_err(|e| BackfillError::Service(e.into()))?;
    if !res.status().is_success() {
        return Err(BackfillError::Status(res.status()));
    }
    let mut body = std::pin::pin!(res.into_body());
    while let Some(frame) = body.frame().await {
        frame.map_err(|e| BackfillError::Body(e.into()))?;
    }
    Ok(key)
}

/// `/` + the key with every byte outside the URI path alphabet percent-encoded, so that
/// [`ObjectKey::from_path`] gives the key back.
fn encode_path(key: &str) -> String {
    let mut s = String::with_capacity(key.len() + 1);
    s.push('/');
    for b in key.bytes() {
        let keep = b.is_ascii_alphanumeric() || b"-._~/!$&'()*+,;=:@".contains(&b);
        if keep {
            s.push(b as char);
        } else {
            s.push_str(&format!("%{b:02X}"));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    #[test]
    fn encode_roundtrip() {
        let p = super::encode_path("a b/ü?x#%");
        assert_eq!(p, "/a%20b/%C3%BC%3Fx%23%25");
        assert_eq!(
            super::ObjectKey::from_path(&p).unwrap().as_str(),
            "a b/ü?x#%"
        );
    }
}
