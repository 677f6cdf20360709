//! Issue 15, fleet part: PURGE authorisation, prefix and surrogate-key purges, fan-out
//! to every edge node in the registry, catch-up of a node that was down, and sibling
//! lookup — over real sockets on 127.0.0.1 (origin, edge nodes, a hyper client), with
//! the in-memory registry, and (feature `etcd`) fan-out and sibling lookup through a real
//! etcd.

mod common;
#[cfg(feature = "etcd")]
mod discovery_support;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::send_whole;
use http::{header, Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use tower::{service_fn, ServiceBuilder};
use tower_patterns::cache::{CacheLayer, Fleet, MemoryStore};
use tower_patterns::client_addr::{ClientAddrLayer, TrustedProxies};
use tower_patterns::discovery::{Instance, MemoryRegistry, Registry, Selector, Watcher};
use tower_patterns::proxy::ForwardBuilder;
use tower_patterns::server::{spawn_local, LocalServer};

const TOKEN: &str = "fleet-secret";
const HOST: &str = "www.example.com";

/// Origin requests per path.
type Counts = Arc<Mutex<HashMap<String, u64>>>;

fn count(c: &Counts, path: &str) -> u64 {
    c.lock().unwrap().get(path).copied().unwrap_or(0)
}

/// The origin: `max-age=60`, a body naming the path and how often it was asked;
/// `/tagged/<n>` carries surrogate keys (`/tagged/1`: `product-42 all` in
/// `Surrogate-Key`, `/tagged/2`: `product-42` in `Cache-Tag`, others: `other`).
async fn origin(counts: Counts) -> LocalServer {
    spawn_local(service_fn(move |req: Request<Incoming>| {
        let counts = counts.clone();
        async move {
            let path = req.uri().path().to_owned();
            let n = {
                let mut c = counts.lock().unwrap();
                let n = c.entry(path.clone()).or_default();
                *n += 1;
                *n
            };
            let mut res = Response::builder().header(header::CACHE_CONTROL, "max-age=60");
            res = match path.as_str() {
                "/tagged/1" => res.header("surrogate-key", "product-42 all"),
                "/tagged/2" => res.header("cache-tag", "product-42"),
                p if p.starts_with("/tagged/") => res.header("surrogate-key", "other"),
                _ => res,
            };
            let body = format!("{path} v{n}");
            Ok::<_, Infallible>(res.body(Full::new(Bytes::from(body))).unwrap())
        }
    }))
    .await
    .unwrap()
}

struct Node {
    id: String,
    cache: CacheLayer,
    server: Option<LocalServer>,
}

impl Node {
    fn addr(&self) -> SocketAddr {
        self.server.as_ref().unwrap().addr()
    }
}

/// Serves `cache` (over `siblings` when asked) in front of the origin and registers it as
/// `id` of service `edge`.
async fn serve(
    registry: &dyn Registry,
    origin: SocketAddr,
    id: &str,
    cache: CacheLayer,
    siblings: bool,
) -> Node {
    let fwd = ForwardBuilder::new(format!("http://{origin}"))
        .build::<Incoming>()
        .unwrap();
    let server = if siblings {
        let svc = ServiceBuilder::new()
            .layer(cache.clone())
            .layer(cache.siblings())
            .service(fwd);
        spawn_local(svc).await.unwrap()
    } else {
        spawn_local(ServiceBuilder::new().layer(cache.clone()).service(fwd))
            .await
            .unwrap()
    };
    let me = Instance::new("edge", id, "127.0.0.1", server.addr().port());
    registry
        .register(&me, Duration::from_secs(600))
        .await
        .unwrap();
    Node {
        id: id.to_owned(),
        cache,
        server: Some(server),
    }
}

fn fleet_cache(registry: &dyn Registry, id: &str, store: Arc<MemoryStore>) -> CacheLayer {
    let watcher = Watcher::new(registry, "edge", Selector::any());
    let fleet = Fleet::builder(watcher, id)
        .token(TOKEN)
        .peer_timeout(Duration::from_secs(2))
        .build();
    CacheLayer::builder(store)
        .purge_bearer(TOKEN)
        .fleet(fleet)
        .build()
}

async fn wait_for_peers(nodes: &[&Node], n: usize) {
    for node in nodes {
        let f = node.cache.fleet().unwrap();
        tokio::time::timeout(Duration::from_secs(5), async {
            while f.peers().len() != n {
                tokio::task::yield_now().await;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("registry lists the peers");
    }
}

/// `method path` to `addr` with `Host: www.example.com` and extra headers: status,
/// `X-Cache`, `x-cache-peer` and body.
async fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String, String, String) {
    let mut h = vec![("host", HOST)];
    h.extend_from_slice(headers);
    let got = send_whole(addr, method, path, &h).await;
    let (xc, peer) = (
        got.h("x-cache").to_owned(),
        got.h("x-cache-peer").to_owned(),
    );
    (got.status, xc, peer, got.text())
}

async fn get(addr: SocketAddr, path: &str) -> (String, String, String) {
    let (s, xc, peer, body) = send(addr, "GET", path, &[]).await;
    assert_eq!(s, 200, "{path}: {body}");
    // Let the fill land in the store (the tee finishes it after the last chunk).
    tokio::task::yield_now().await;
    (xc, peer, body)
}

async fn purge(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let bearer = format!("Bearer {TOKEN}");
    let mut h = vec![("authorization", bearer.as_str())];
    h.extend_from_slice(headers);
    let (s, _, _, body) = send(addr, "PURGE", path, &h).await;
    (s, body)
}

/// Fills `path` on `addr` and checks it is then a hit.
async fn fill(addr: SocketAddr, path: &str) {
    get(addr, path).await;
    for _ in 0..100 {
        if get(addr, path).await.0 == "HIT" {
            return;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    panic!("{path} never became a hit on {addr}");
}

#[tokio::test]
async fn purge_without_authorisation_is_refused() {
    let counts = Counts::default();
    let o = origin(counts.clone()).await;
    let registry = MemoryRegistry::new();
    let store = Arc::new(MemoryStore::new(16 << 20));
    let cache = CacheLayer::builder(store.clone())
        .purge_bearer(TOKEN)
        .build();
    let node = serve(&registry, o.addr(), "edge-a", cache, false).await;
    fill(node.addr(), "/a").await;
    for h in [
        vec![],
        vec![("authorization", "Bearer wrong")],
        vec![("authorization", "Basic ZmxlZXQtc2VjcmV0")],
        vec![("authorization", "Bearer")],
        vec![("x-purge-token", TOKEN)],
    ] {
        let (s, _, _, _) = send(node.addr(), "PURGE", "/a", &h).await;
        assert_eq!(s, 403, "{h:?}");
    }
    assert_eq!(get(node.addr(), "/a").await.0, "HIT", "nothing was purged");
    // Scheme is case-insensitive.
    let (s, ..) = send(
        node.addr(),
        "PURGE",
        "/a",
        &[("authorization", &format!("bearer {TOKEN}"))],
    )
    .await;
    assert_eq!(s, 200);

    // An allow-list: loopback is not on it, so a loopback client is refused.
    let cache = CacheLayer::builder(MemoryStore::new(16 << 20))
        .purge_from_nets("10.0.0.0/8".parse::<TrustedProxies>().unwrap())
        .build();
    let other = serve(&registry, o.addr(), "edge-b", cache, false).await;
    assert_eq!(send(other.addr(), "PURGE", "/a", &[]).await.0, 403);
    let cache = CacheLayer::builder(MemoryStore::new(16 << 20))
        .purge_from_nets("127.0.0.1/32, ::1".parse::<TrustedProxies>().unwrap())
        .build();
    let listed = serve(&registry, o.addr(), "edge-c", cache, false).await;
    assert_eq!(send(listed.addr(), "PURGE", "/a", &[]).await.0, 404);

    // Behind a trusted proxy (here: loopback) the client it forwarded for is judged, not
    // the proxy: loopback alone never authorises.
    let cache = CacheLayer::builder(MemoryStore::new(16 << 20))
        .purge_from_nets("10.0.0.0/8".parse::<TrustedProxies>().unwrap())
        .build();
    let fwd = ForwardBuilder::new(format!("http://{}", o.addr()))
        .build::<Incoming>()
        .unwrap();
    let proxied = spawn_local(
        ServiceBuilder::new()
            .layer(ClientAddrLayer::new().trust(TrustedProxies::loopback()))
            .layer(cache)
            .service(fwd),
    )
    .await
    .unwrap();
    let xff = |ip: &'static str| [("x-forwarded-for", ip)];
    assert_eq!(send(proxied.addr(), "PURGE", "/a", &[]).await.0, 403);
    assert_eq!(
        send(proxied.addr(), "PURGE", "/a", &xff("192.168.1.9"))
            .await
            .0,
        403
    );
    assert_eq!(
        send(proxied.addr(), "PURGE", "/a", &xff("10.1.2.3"))
            .await
            .0,
        404
    );
    // An unreadable element fails closed (the client is `0.0.0.0`, on no list).
    assert_eq!(
        send(proxied.addr(), "PURGE", "/a", &xff("10.1.2.3, bogus"))
            .await
            .0,
        403
    );
}

#[tokio::test]
async fn prefix_and_surrogate_key_purges() {
    let counts = Counts::default();
    let o = origin(counts.clone()).await;
    let registry = MemoryRegistry::new();
    let cache = CacheLayer::builder(MemoryStore::new(16 << 20))
        .purge_bearer(TOKEN)
        .build();
    let node = serve(&registry, o.addr(), "edge-a", cache, false).await;
    let a = node.addr();
    for p in ["/images/x", "/images/y", "/imagesque", "/other"] {
        fill(a, p).await;
    }
    assert_eq!(purge(a, "/images/*", &[]).await, (200, "purged 2\n".into()));
    assert_eq!(get(a, "/images/x").await.0, "MISS");
    assert_eq!(get(a, "/images/y").await.0, "MISS");
    assert_eq!(get(a, "/imagesque").await.0, "HIT");
    assert_eq!(get(a, "/other").await.0, "HIT");

    for p in ["/tagged/1", "/tagged/2", "/tagged/3"] {
        fill(a, p).await;
    }
    let (s, body) = purge(a, "/", &[("surrogate-key", "product-42")]).await;
    assert_eq!((s, body.as_str()), (200, "purged 2\n"));
    assert_eq!(get(a, "/tagged/1").await.2, "/tagged/1 v2");
    assert_eq!(get(a, "/tagged/2").await.2, "/tagged/2 v2");
    assert_eq!(get(a, "/tagged/3").await.0, "HIT");
    // `Cache-Tag` (comma-separated) purges the same way; an unknown tag purges nothing.
    fill(a, "/tagged/1").await;
    assert_eq!(
        purge(a, "/", &[("cache-tag", "nope,all")]).await.1,
        "purged 1\n"
    );
    assert_eq!(
        purge(a, "/", &[("cache-tag", "nope")]).await.1,
        "purged 0\n"
    );
    assert_eq!(purge(a, "/", &[("surrogate-key", " ")]).await.0, 400);
    assert_eq!(count(&counts, "/tagged/3"), 1);
}

#[tokio::test]
async fn one_purge_reaches_every_node_in_the_registry() {
    let counts = Counts::default();
    let o = origin(counts.clone()).await;
    let registry = MemoryRegistry::new();
    let mut nodes = Vec::new();
    for id in ["edge-a", "edge-b", "edge-c"] {
        let cache = fleet_cache(&registry, id, Arc::new(MemoryStore::new(16 << 20)));
        nodes.push(serve(&registry, o.addr(), id, cache, false).await);
    }
    wait_for_peers(&nodes.iter().collect::<Vec<_>>(), 2).await;
    for n in &nodes {
        fill(n.addr(), "/a").await;
        fill(n.addr(), "/images/1").await;
    }
    assert_eq!(count(&counts, "/a"), 3);

    let (s, json) = purge(nodes[1].addr(), "/a", &[]).await;
    assert_eq!(s, 200, "{json}");
    for n in &nodes {
        assert!(
            json.contains(&format!("\"{}\":{{\"status\":200}}", n.id)),
            "{json}"
        );
    }
    for n in &nodes {
        assert_eq!(get(n.addr(), "/a").await.0, "MISS", "{}", n.id);
    }
    assert_eq!(count(&counts, "/a"), 6);
    // A prefix purge fans out the same way.
    let (s, json) = purge(nodes[0].addr(), "/images/*", &[]).await;
    assert_eq!(s, 200, "{json}");
    for n in &nodes {
        assert_eq!(get(n.addr(), "/images/1").await.0, "MISS", "{}", n.id);
    }

    // The hop guard: a purge that carries `x-purge-origin` is applied where it lands and
    // not sent on (plain answer, not the fleet's JSON; the other nodes keep their copy).
    for n in &nodes {
        fill(n.addr(), "/b").await;
    }
    let (s, body) = purge(nodes[2].addr(), "/b", &[("x-purge-origin", "00ff-1")]).await;
    assert_eq!((s, body.as_str()), (200, "purged\n"));
    assert_eq!(get(nodes[0].addr(), "/b").await.0, "HIT");
    assert_eq!(get(nodes[1].addr(), "/b").await.0, "HIT");
    // Applied once: the same origin id again changes nothing.
    fill(nodes[2].addr(), "/b").await;
    let (_, body) = purge(nodes[2].addr(), "/b", &[("x-purge-origin", "00ff-1")]).await;
    assert_eq!(body, "already applied\n");
    assert_eq!(get(nodes[2].addr(), "/b").await.0, "HIT");
}

#[tokio::test]
async fn a_node_down_during_a_purge_catches_up_when_it_returns() {
    let counts = Counts::default();
    let o = origin(counts.clone()).await;
    let registry = MemoryRegistry::new();
    let a = serve(
        &registry,
        o.addr(),
        "edge-a",
        fleet_cache(&registry, "edge-a", Arc::new(MemoryStore::new(16 << 20))),
        false,
    )
    .await;
    // B's store outlives B's process, as a disk tier does.
    let b_store = Arc::new(MemoryStore::new(16 << 20));
    let mut b = serve(
        &registry,
        o.addr(),
        "edge-b",
        fleet_cache(&registry, "edge-b", b_store.clone()),
        false,
    )
    .await;
    wait_for_peers(&[&a, &b], 1).await;
    for p in ["/a", "/tagged/1", "/images/1", "/keep"] {
        fill(a.addr(), p).await;
        fill(b.addr(), p).await;
    }

    // B goes down (still listed: its lease has not run out). Purges reach A only.
    b.server.take().unwrap().shutdown().await.unwrap();
    let (s, json) = purge(a.addr(), "/a", &[]).await;
    assert_eq!(s, 202, "{json}");
    assert!(json.contains("\"edge-b\":{\"error\""), "{json}");
    let (s, _) = purge(a.addr(), "/", &[("surrogate-key", "product-42")]).await;
    assert_eq!(s, 202);
    assert_eq!(purge(a.addr(), "/images/*", &[]).await.0, 202);

    // B restarts: a new process (new layer, empty log) over the surviving store.
    let b2 = serve(
        &registry,
        o.addr(),
        "edge-b",
        fleet_cache(&registry, "edge-b", b_store.clone()),
        false,
    )
    .await;
    wait_for_peers(&[&a, &b2], 1).await;
    // Without catching up it would serve the purged object:
    assert_eq!(get(b2.addr(), "/keep").await.0, "HIT");
    assert!(b_store.contains(&format!("{HOST}/a")));
    let r = b2.cache.catch_up().await;
    assert_eq!(
        (r.peers, r.answered, r.applied, r.cleared),
        (1, 1, 3, false)
    );
    let (xc, _, body) = get(b2.addr(), "/a").await;
    assert_eq!((xc.as_str(), body.as_str()), ("MISS", "/a v3"));
    assert_eq!(get(b2.addr(), "/tagged/1").await.0, "MISS");
    assert_eq!(get(b2.addr(), "/images/1").await.0, "MISS");
    assert_eq!(
        get(b2.addr(), "/keep").await.0,
        "HIT",
        "only the purged keys"
    );
    // Caught up: a second round applies nothing.
    assert_eq!(b2.cache.catch_up().await.applied, 0);

    // A purge on B while A is cut off: A catches up from B's log (cursor per peer).
    let mut a = a;
    let a_cache = a.cache.clone();
    a.server.take().unwrap().shutdown().await.unwrap();
    let (s, _) = purge(b2.addr(), "/keep", &[]).await;
    assert_eq!(s, 202);
    let r = a_cache.catch_up().await;
    assert_eq!((r.answered, r.applied), (1, 1));
    assert!(a_cache.store().get(&format!("{HOST}/keep")).is_none());
}

#[tokio::test]
async fn a_catch_up_past_the_end_of_a_peers_log_empties_the_store() {
    let o = origin(Counts::default()).await;
    let registry = MemoryRegistry::new();
    let small_log = |id: &str, store| {
        let watcher = Watcher::new(&registry, "edge", Selector::any());
        let fleet = Fleet::builder(watcher, id).token(TOKEN).build();
        CacheLayer::builder(store)
            .purge_bearer(TOKEN)
            .purge_log_bytes(1024)
            .fleet(fleet)
            .build()
    };
    let a = serve(
        &registry,
        o.addr(),
        "edge-a",
        small_log("edge-a", Arc::new(MemoryStore::new(16 << 20))),
        false,
    )
    .await;
    let b_store = Arc::new(MemoryStore::new(16 << 20));
    let b = serve(
        &registry,
        o.addr(),
        "edge-b",
        small_log("edge-b", b_store.clone()),
        false,
    )
    .await;
    wait_for_peers(&[&a, &b], 1).await;
    fill(b.addr(), "/unrelated").await;
    // 50 purges while B is away overflow A's 1 KiB log.
    drop(b);
    for i in 0..50 {
        purge(a.addr(), &format!("/gone/{i}"), &[]).await;
    }
    let b2 = serve(
        &registry,
        o.addr(),
        "edge-b",
        small_log("edge-b", b_store.clone()),
        false,
    )
    .await;
    wait_for_peers(&[&a, &b2], 1).await;
    let r = b2.cache.catch_up().await;
    assert!(r.cleared, "{r:?}");
    assert_eq!(b_store.stats().entries, 0, "fails closed");
}

#[tokio::test]
async fn a_long_catch_up_is_read_page_by_page() {
    let o = origin(Counts::default()).await;
    let registry = MemoryRegistry::new();
    let a = serve(
        &registry,
        o.addr(),
        "edge-a",
        fleet_cache(&registry, "edge-a", Arc::new(MemoryStore::new(16 << 20))),
        false,
    )
    .await;
    let b_store = Arc::new(MemoryStore::new(16 << 20));
    let mut b = serve(
        &registry,
        o.addr(),
        "edge-b",
        fleet_cache(&registry, "edge-b", b_store.clone()),
        false,
    )
    .await;
    wait_for_peers(&[&a, &b], 1).await;
    fill(b.addr(), "/last").await;
    b.server.take().unwrap().shutdown().await.unwrap();
    // 150 purges of 8 KiB keys: about 1.2 MiB of log, more than one page (1 MiB).
    let long = "x".repeat(8 << 10);
    for i in 0..150 {
        assert_eq!(purge(a.addr(), &format!("/{long}/{i}"), &[]).await.0, 202);
    }
    assert_eq!(purge(a.addr(), "/last", &[]).await.0, 202);
    let b2 = serve(
        &registry,
        o.addr(),
        "edge-b",
        fleet_cache(&registry, "edge-b", b_store.clone()),
        false,
    )
    .await;
    wait_for_peers(&[&a, &b2], 1).await;
    let r = b2.cache.catch_up().await;
    assert_eq!((r.answered, r.applied, r.cleared), (1, 151, false));
    assert_eq!(get(b2.addr(), "/last").await.0, "MISS");
}

/// A path whose key `asker`'s fleet says `owner` owns.
fn path_owned_by(asker: &Node, owner: &str, prefix: &str) -> String {
    let f = asker.cache.fleet().unwrap();
    (0..10_000)
        .map(|i| format!("{prefix}{i}"))
        .find(|p| {
            f.owner(&format!("{HOST}{p}"))
                .is_some_and(|i| i.id == owner)
        })
        .expect("some key hashes to the owner")
}

#[tokio::test]
async fn a_miss_is_served_by_the_sibling_that_owns_the_key() {
    let counts = Counts::default();
    let o = origin(counts.clone()).await;
    let registry = MemoryRegistry::new();
    let a = serve(
        &registry,
        o.addr(),
        "edge-a",
        fleet_cache(&registry, "edge-a", Arc::new(MemoryStore::new(16 << 20))),
        true,
    )
    .await;
    let b = serve(
        &registry,
        o.addr(),
        "edge-b",
        fleet_cache(&registry, "edge-b", Arc::new(MemoryStore::new(16 << 20))),
        true,
    )
    .await;
    wait_for_peers(&[&a, &b], 1).await;

    let p = path_owned_by(&b, "edge-a", "/s/");
    // The owner asks nobody: a is the home of `p`, so it goes to the origin.
    assert!(a
        .cache
        .fleet()
        .unwrap()
        .owner(&format!("{HOST}{p}"))
        .is_none());
    fill(a.addr(), &p).await;
    assert_eq!(count(&counts, &p), 1);
    // B's miss is served from A, stored on B, no origin request.
    let (xc, peer, body) = get(b.addr(), &p).await;
    assert_eq!((xc.as_str(), peer.as_str()), ("MISS", "edge-a"));
    assert_eq!(body, format!("{p} v1"));
    assert_eq!(count(&counts, &p), 1);
    fill(b.addr(), &p).await;
    assert_eq!(count(&counts, &p), 1);

    // Not cached at the owner: its `504` sends B to the origin; the owner does not fetch.
    let q = path_owned_by(&b, "edge-a", "/t/");
    let (xc, peer, _) = get(b.addr(), &q).await;
    assert_eq!((xc.as_str(), peer.as_str()), ("MISS", ""));
    assert_eq!(count(&counts, &q), 1);
    assert!(a.cache.store().get(&format!("{HOST}{q}")).is_none());

    // A client's `only-if-cached` gets the same treatment as a sibling's.
    let r = path_owned_by(&a, "edge-b", "/u/");
    let (s, ..) = send(a.addr(), "GET", &r, &[("cache-control", "only-if-cached")]).await;
    assert_eq!(s, 504);
    assert_eq!(count(&counts, &r), 0);
}

/// A purge must not be undone by a sibling that has not applied it yet: B purges, the
/// owner A missed the purge (down during it, back before its catch-up), and B's next
/// miss must not take A's old copy.
#[tokio::test]
async fn a_sibling_that_missed_a_purge_does_not_bring_the_old_object_back() {
    let counts = Counts::default();
    let o = origin(counts.clone()).await;
    let registry = MemoryRegistry::new();
    let a_cache = fleet_cache(&registry, "edge-a", Arc::new(MemoryStore::new(16 << 20)));
    let mut a = serve(&registry, o.addr(), "edge-a", a_cache.clone(), true).await;
    let b = serve(
        &registry,
        o.addr(),
        "edge-b",
        fleet_cache(&registry, "edge-b", Arc::new(MemoryStore::new(16 << 20))),
        true,
    )
    .await;
    wait_for_peers(&[&a, &b], 1).await;
    let p = path_owned_by(&b, "edge-a", "/p/");
    fill(a.addr(), &p).await;
    assert_eq!(get(b.addr(), &p).await.1, "edge-a");

    // A is away while B purges; it comes back (same cache) before catching up.
    a.server.take().unwrap().shutdown().await.unwrap();
    assert_eq!(purge(b.addr(), &p, &[]).await.0, 202);
    let _a2 = serve(&registry, o.addr(), "edge-a", a_cache.clone(), true).await;
    let f = b.cache.fleet().unwrap().clone();
    let a2_port = _a2.addr().port();
    tokio::time::timeout(Duration::from_secs(5), async {
        while f.peers().first().map(|i| i.port) != Some(a2_port) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap();
    assert!(
        a_cache.store().get(&format!("{HOST}{p}")).is_some(),
        "A still has v1"
    );

    let (xc, peer, body) = get(b.addr(), &p).await;
    assert_eq!(
        (xc.as_str(), peer.as_str(), body),
        ("MISS", "", format!("{p} v2")),
        "B went to the origin, not to A's pre-purge copy"
    );
    assert_eq!(count(&counts, &p), 2);
}

#[tokio::test]
async fn a_sibling_that_is_down_or_hangs_falls_back_to_the_origin() {
    let counts = Counts::default();
    let o = origin(counts.clone()).await;
    let registry = MemoryRegistry::new();
    // `edge-z` accepts connections and never answers.
    let hung = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hung_port = hung.local_addr().unwrap().port();
    let _keep = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = hung.accept().await {
            held.push(s);
        }
    });
    registry
        .register(
            &Instance::new("edge", "edge-z", "127.0.0.1", hung_port),
            Duration::from_secs(600),
        )
        .await
        .unwrap();
    let watcher = Watcher::new(&registry, "edge", Selector::any());
    let fleet = Fleet::builder(watcher, "edge-b")
        .sibling_timeout(Duration::from_millis(200))
        .build();
    let cache = CacheLayer::builder(MemoryStore::new(16 << 20))
        .fleet(fleet)
        .build();
    let b = serve(&registry, o.addr(), "edge-b", cache, true).await;
    wait_for_peers(&[&b], 1).await;
    let p = path_owned_by(&b, "edge-z", "/h/");
    let started = tokio::time::Instant::now();
    let (xc, _, body) = get(b.addr(), &p).await;
    assert_eq!((xc.as_str(), body), ("MISS", format!("{p} v1")));
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(200) && took < Duration::from_secs(2),
        "{took:?}"
    );

    // A sibling whose port is closed: connection refused, straight to the origin.
    registry
        .register(
            &Instance::new("edge", "edge-z", "127.0.0.1", 1),
            Duration::from_secs(600),
        )
        .await
        .unwrap();
    let f = b.cache.fleet().unwrap().clone();
    tokio::time::timeout(Duration::from_secs(5), async {
        while f.peers().first().map(|i| i.port) != Some(1) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap();
    let q = path_owned_by(&b, "edge-z", "/r/");
    assert_eq!(get(b.addr(), &q).await.0, "MISS");
    assert_eq!(count(&counts, &q), 1);
}

/// The same fleet, found through a real etcd (started by the test): one purge reaches
/// both nodes, and a miss is served by the owning sibling.
#[cfg(feature = "etcd")]
#[tokio::test]
async fn fleet_purge_and_sibling_lookup_through_etcd() {
    use discovery_support::etcd::Etcd;
    use tower_patterns::discovery::EtcdRegistry;

    let etcd = Etcd::start().await;
    let registry = EtcdRegistry::builder([etcd.url()])
        .prefix("/test/edge")
        .request_timeout(Duration::from_secs(2))
        .connect()
        .await
        .unwrap();
    let counts = Counts::default();
    let o = origin(counts.clone()).await;
    let mut nodes = Vec::new();
    for id in ["edge-a", "edge-b"] {
        let cache = fleet_cache(&registry, id, Arc::new(MemoryStore::new(16 << 20)));
        nodes.push(serve(&registry, o.addr(), id, cache, true).await);
    }
    wait_for_peers(&nodes.iter().collect::<Vec<_>>(), 1).await;
    let (a, b) = (&nodes[0], &nodes[1]);

    let p = path_owned_by(b, "edge-a", "/e/");
    fill(a.addr(), &p).await;
    let (xc, peer, _) = get(b.addr(), &p).await;
    assert_eq!((xc.as_str(), peer.as_str()), ("MISS", "edge-a"));
    assert_eq!(count(&counts, &p), 1);
    fill(b.addr(), &p).await;

    let (s, json) = purge(b.addr(), &p, &[]).await;
    assert_eq!(s, 200, "{json}");
    assert!(json.contains("\"edge-a\":{\"status\":200}"), "{json}");
    assert!(json.contains("\"edge-b\":{\"status\":200}"), "{json}");
    assert_eq!(get(a.addr(), &p).await.0, "MISS");
    assert_eq!(count(&counts, &p), 2);
}

/// A node whose cache has a disk tier is down during a prefix and a surrogate-key purge;
/// it restarts as a new process (memory empty, the entries on disk only) and catches up.
/// Before `TieredStore::remove_where` the catch-up could not apply prefix or tag purges
/// to a tiered store (logged an error, removed nothing): the restarted node served the
/// purged objects from disk.
#[cfg(feature = "disk-cache")]
#[tokio::test]
async fn a_tiered_node_down_during_prefix_and_tag_purges_catches_up_from_disk() {
    use tower_patterns::cache::{DiskStore, TieredStore};

    fn tiered_cache(
        registry: &dyn Registry,
        id: &str,
        dir: &std::path::Path,
    ) -> (CacheLayer, Arc<TieredStore>) {
        let disk = DiskStore::open(dir, 64 << 20).unwrap();
        let store = Arc::new(TieredStore::new(MemoryStore::new(16 << 20), disk));
        let fleet = Fleet::builder(Watcher::new(registry, "edge", Selector::any()), id)
            .token(TOKEN)
            .peer_timeout(Duration::from_secs(2))
            .build();
        let cache = CacheLayer::builder(store.clone())
            .purge_bearer(TOKEN)
            .fleet(fleet)
            .build();
        (cache, store)
    }

    let counts = Counts::default();
    let o = origin(counts.clone()).await;
    let registry = MemoryRegistry::new();
    let dir = tempfile::tempdir().unwrap();
    let a = serve(
        &registry,
        o.addr(),
        "edge-a",
        fleet_cache(&registry, "edge-a", Arc::new(MemoryStore::new(16 << 20))),
        false,
    )
    .await;
    let (b_cache, b_store) = tiered_cache(&registry, "edge-b", dir.path());
    let mut b = serve(&registry, o.addr(), "edge-b", b_cache, false).await;
    wait_for_peers(&[&a, &b], 1).await;
    let paths = [
        "/images/1",
        "/images/2",
        "/tagged/1",
        "/tagged/2",
        "/tagged/3",
        "/keep",
    ];
    for p in paths {
        fill(a.addr(), p).await;
        fill(b.addr(), p).await;
    }
    // Every entry on B's disk before B goes down (the disk write is in the background).
    tokio::time::timeout(Duration::from_secs(10), async {
        while !paths
            .iter()
            .all(|p| b_store.disk().contains(&format!("{HOST}{p}")))
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("written to disk");

    b.server.take().unwrap().shutdown().await.unwrap();
    assert_eq!(purge(a.addr(), "/images/*", &[]).await.0, 202);
    assert_eq!(
        purge(a.addr(), "/", &[("surrogate-key", "product-42")])
            .await
            .0,
        202
    );
    let before: u64 = counts.lock().unwrap().values().sum();

    // B restarts: a new process over the same folder, memory empty.
    let (b2_cache, b2_store) = tiered_cache(&registry, "edge-b", dir.path());
    assert!(b2_store.disk().contains(&format!("{HOST}/images/1")));
    let b2 = serve(&registry, o.addr(), "edge-b", b2_cache, false).await;
    wait_for_peers(&[&a, &b2], 1).await;
    let r = b2.cache.catch_up().await;
    assert_eq!((r.answered, r.applied, r.cleared), (1, 2, false));
    for p in ["/images/1", "/images/2", "/tagged/1", "/tagged/2"] {
        assert_eq!(
            get(b2.addr(), p).await.0,
            "MISS",
            "{p} served after its purge"
        );
    }
    for p in ["/tagged/3", "/keep"] {
        assert_eq!(get(b2.addr(), p).await.0, "HIT", "{p} kept on disk");
    }
    let after: u64 = counts.lock().unwrap().values().sum();
    assert_eq!(
        after,
        before + 4,
        "only the purged objects were fetched again"
    );
}
