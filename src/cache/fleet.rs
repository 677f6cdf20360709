//! The fleet of edge nodes: the other instances of the edge service as the registry
//! lists them, and how to reach them. Shared by fleet purge ([`super::purge`]) and
//! sibling lookup ([`super::sibling`]).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::balance::{build_ring, hash_bytes};
use crate::discovery::{Instance, Watcher};

/// Default time a peer has to answer a fanned-out `PURGE` or a catch-up request.
pub const DEFAULT_PEER_TIMEOUT: Duration = Duration::from_secs(2);
/// Default time the owner of a key has to answer a sibling lookup before the origin is
/// asked: short, since a miss pays it on top of the origin's latency.
pub const DEFAULT_SIBLING_TIMEOUT: Duration = Duration::from_millis(300);

/// Why a peer gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// No answer within the timeout.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// Connection or protocol error.
    #[error("request failed: {0}")]
    Request(#[from] hyper_util::client::legacy::Error),
    /// The request to it could not be built (an address that is not a valid URI).
    #[error("bad request: {0}")]
    Build(#[from] http::Error),
}

/// The other edge nodes, from a [`Watcher`] of the edge service (memory, etcd or Consul
/// registry), and an HTTP client to reach them. Cheap to clone.
///
/// ```no_run
/// # async fn f(registry: tower_patterns::discovery::MemoryRegistry) {
/// use tower_patterns::cache::Fleet;
/// use tower_patterns::discovery::{Selector, Watcher};
/// let watcher = Watcher::new(&registry, "edge", Selector::any());
/// let fleet = Fleet::builder(watcher, "edge-a").token("s3cret").build();
/// # let _ = fleet; }
/// ```
#[derive(Clone)]
pub struct Fleet {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    watcher: Watcher,
    pub(crate) self_id: String,
    pub(crate) token: Option<Vec<u8>>,
    pub(crate) peer_timeout: Duration,
    pub(crate) sibling_timeout: Duration,
    pub(crate) sibling: bool,
    client: Client<HttpConnector, Empty<Bytes>>,
    /// The ring of the last snapshot revision it was built for.
    ring: ArcSwapOption<Ring>,
}

struct Ring {
    revision: u64,
    points: Vec<(u64, u32)>,
    nodes: Vec<Instance>,
}

impl fmt::Debug for Fleet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fleet")
            .field("self_id", &self.inner.self_id)
            .field("watcher", &self.inner.watcher)
            .finish()
    }
}

/// Builds a [`Fleet`].
pub struct FleetBuilder {
    watcher: Watcher,
    self_id: String,
    token: Option<Vec<u8>>,
    peer_timeout: Duration,
    sibling_timeout: Duration,
    sibling: bool,
}

impl fmt::Debug for FleetBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FleetBuilder")
            .field("self_id", &self.self_id)
            .finish()
    }
}

impl Fleet {
    /// The fleet `watcher` lists, seen from the instance with id `self_id` (it is never
    /// asked about itself).
    pub fn builder(watcher: Watcher, self_id: impl Into<String>) -> FleetBuilder {
        FleetBuilder {
            watcher,
            self_id: self_id.into(),
            token: None,
            peer_timeout: DEFAULT_PEER_TIMEOUT,
            sibling_timeout: DEFAULT_SIBLING_TIMEOUT,
            sibling: true,
        }
    }

    /// This node's instance id.
    pub fn self_id(&self) -> &str {
        &self.inner.self_id
    }

    /// The other instances now.
    pub fn peers(&self) -> Vec<Instance> {
        let snap = self.inner.watcher.snapshot();
        snap.instances()
            .filter(|i| i.id != self.inner.self_id)
            .cloned()
            .collect()
    }

    /// The instance owning `key` on the consistent-hash ring over every instance (this
    /// one included); `None` when that is this node or the registry lists none. The ring
    /// is the balancer's ketama ring, rebuilt only when the registry's list changes.
    pub fn owner(&self, key: &str) -> Option<Instance> {
        let snap = self.inner.watcher.snapshot();
        let ring = match self.inner.ring.load_full() {
            Some(r) if r.revision == snap.revision() => r,
            _ => {
                let nodes: Vec<Instance> = snap.instances().cloned().collect();
                let ids: Vec<(u64, u32)> = nodes
                    .iter()
                    .map(|i| (hash_bytes(i.id.as_bytes()), 1))
                    .collect();
                let r = Arc::new(Ring {
                    revision: snap.revision(),
                    points: build_ring(&ids),
                    nodes,
                });
                self.inner.ring.store(Some(r.clone()));
                r
            }
        };
        if ring.points.is_empty() {
            return None;
        }
        let h = hash_bytes(key.as_bytes());
        let at = ring.points.partition_point(|p| p.0 < h) % ring.points.len();
        let node = &ring.nodes[ring.points[at].1 as usize];
        (node.id != self.inner.self_id).then(|| node.clone())
    }

    /// Sends `req` (its URI's path and query; the authority is `to`'s) within `timeout`.
    pub(crate) async fn send(
        &self,
        to: &Instance,
        mut req: Request<Empty<Bytes>>,
        timeout: Duration,
    ) -> Result<Response<Incoming>, PeerError> {
        let pq = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/")
            .to_owned();
        *req.uri_mut() = format!("http://{}{pq}", to.authority())
            .parse()
            .map_err(http::Error::from)?;
        match tokio::time::timeout(timeout, self.inner.client.request(req)).await {
            Ok(r) => Ok(r?),
            Err(_) => Err(PeerError::Timeout(timeout)),
        }
    }

    /// The `Authorization` value sent to peers, if a token is set.
    pub(crate) fn bearer(&self) -> Option<http::HeaderValue> {
        let t = self.inner.token.as_ref()?;
        let mut v = b"Bearer ".to_vec();
        v.extend_from_slice(t);
        let mut v = http::HeaderValue::from_bytes(&v).ok()?;
        v.set_sensitive(true);
        Some(v)
    }

    /// Waits (at most `timeout`) until the registry has answered once.
    pub(crate) async fn synced(&self, timeout: Duration) {
        let _ =
            tokio::time::timeout(timeout, self.inner.watcher.wait_until(|s| s.is_synced())).await;
    }
}

impl FleetBuilder {
    /// The token sent to peers as `Authorization: Bearer <token>` with fanned-out purges
    /// and catch-up requests: the one their
    /// [`purge_bearer`](super::CacheLayerBuilder::purge_bearer) accepts.
    pub fn token(mut self, token: impl Into<Vec<u8>>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// How long a peer has to answer a fanned-out purge or a catch-up request (default
    /// [`DEFAULT_PEER_TIMEOUT`]).
    pub fn peer_timeout(mut self, d: Duration) -> Self {
        self.peer_timeout = d;
        self
    }

    /// How long the owner of a key has to answer a sibling lookup (default
    /// [`DEFAULT_SIBLING_TIMEOUT`]); past it the origin is asked.
    pub fn sibling_timeout(mut self, d: Duration) -> Self {
        self.sibling_timeout = d;
        self
    }

    /// Turns sibling lookup off (fleet purge only).
    pub fn no_sibling_lookup(mut self) -> Self {
        self.sibling = false;
        self
    }

    /// Builds the fleet.
    pub fn build(self) -> Fleet {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_connect_timeout(Some(self.peer_timeout.max(self.sibling_timeout)));
        Fleet {
            inner: Arc::new(Inner {
                watcher: self.watcher,
                self_id: self.self_id,
                token: self.token,
                peer_timeout: self.peer_timeout,
                sibling_timeout: self.sibling_timeout,
                sibling: self.sibling,
                client: Client::builder(TokioExecutor::new()).build(http),
                ring: ArcSwapOption::empty(),
            }),
        }
    }
}
