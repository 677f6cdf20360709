//! Two edge nodes in front of an origin, all on 127.0.0.1 (seed 004's CDN edge, issue 15):
//! request coalescing, `304` revalidation, a range request, a miss served by the sibling
//! that owns the key, a restart that keeps the disk tier, and a `PURGE` reaching both
//! nodes (by key, then by surrogate key) — with the origin's own count of requests
//! printed after each step.
//!
//! ```text
//!                  ┌─▶ edge-a: CacheLayer ─▶ Sibling ─┐
//! 1,000 clients ───┤        ▲ sibling lookup / PURGE  ├─▶ Forward ─▶ origin (counts, ETag "v1")
//!                  └─▶ edge-b: CacheLayer ─▶ Sibling ─┘
//!   both registered as `edge` in a MemoryRegistry (etcd/Consul work the same way)
//! ```
//!
//! Run: `cargo run --example edge_cache --features disk-cache` (without the feature, the
//! restart step is skipped: the nodes keep memory tiers only).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower::{service_fn, ServiceBuilder};
use tower_patterns::cache::{CacheLayer, Fleet, MemoryStore, Store};
use tower_patterns::discovery::{Instance, MemoryRegistry, Registry, Selector, Watcher};
use tower_patterns::proxy::ForwardBuilder;
use tower_patterns::server::{spawn_local, LocalServer};
use tower_patterns::BoxError;

const SIZE: usize = 1 << 20;
/// The site both edges serve: the cache key includes the host, so both nodes must see
/// the same one for a purge or a sibling lookup to name the same object.
const HOST: &str = "cdn.example.com";
/// Shared by the nodes: accepted for `PURGE` and sent to peers with fanned-out purges.
const TOKEN: &str = "purge-secret";

/// The origin: a 1 MiB object with `ETag: "v1"`, `max-age=60`; `304` to `If-None-Match:
/// "v1"`. It takes 200 ms to answer, long enough for a thundering herd to pile up.
async fn origin(requests: Arc<AtomicU64>) -> std::io::Result<SocketAddr> {
    let object = Bytes::from(vec![b'x'; SIZE]);
    Ok(spawn_local(service_fn(move |req: Request<Incoming>| {
        let (requests, object) = (requests.clone(), object.clone());
        async move {
            requests.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(200)).await;
            let res = Response::builder()
                .header(header::ETAG, "\"v1\"")
                .header(header::CACHE_CONTROL, "max-age=60")
                // A surrogate key: step 7 purges by it.
                .header("surrogate-key", "catalogue");
            let not_modified = req
                .headers()
                .get(header::IF_NONE_MATCH)
                .is_some_and(|v| v == "\"v1\"");
            let res = if not_modified {
                res.status(304).body(Full::new(Bytes::new()))
            } else {
                res.body(Full::new(object))
            };
            Ok::<_, Infallible>(res.expect("valid response"))
        }
    }))
    .await?
    .addr())
}

/// A node's store: with `--features disk-cache`, memory in front of a disk tier in
/// `dir` (it survives a restart); else memory only.
/// Also returns whether a key's file is written.
#[cfg(feature = "disk-cache")]
fn store(dir: &std::path::Path) -> Result<(Arc<dyn Store>, OnDisk), BoxError> {
    use tower_patterns::cache::{DiskStore, TieredStore};
    let disk = DiskStore::open(dir, 256 << 20)?;
    let on_disk = disk.clone();
    let tiered = TieredStore::new(MemoryStore::new(64 << 20), disk);
    Ok((Arc::new(tiered), Box::new(move |k| on_disk.contains(k))))
}
#[cfg(not(feature = "disk-cache"))]
fn store(_dir: &std::path::Path) -> Result<(Arc<dyn Store>, OnDisk), BoxError> {
    Ok((Arc::new(MemoryStore::new(64 << 20)), Box::new(|_| false)))
}

type OnDisk = Box<dyn Fn(&str) -> bool + Send + Sync>;

/// One edge node: a cache over `store` in the fleet of `edge` instances, sibling lookup
/// under it, registered under `id` once it listens.
async fn edge(
    registry: &MemoryRegistry,
    origin: SocketAddr,
    id: &str,
    store: Arc<dyn Store>,
) -> Result<(CacheLayer, LocalServer), BoxError> {
    let fleet = Fleet::builder(Watcher::new(registry, "edge", Selector::any()), id)
        .token(TOKEN)
        .build();
    let cache = CacheLayer::builder(store)
        .purge_bearer(TOKEN)
        .fleet(fleet)
        .build();
    let forward = ForwardBuilder::new(format!("http://{origin}")).build::<Incoming>()?;
    let svc = ServiceBuilder::new()
        .layer(cache.clone())
        .layer(cache.siblings())
        .service(forward);
    let server = spawn_local(svc).await?;
    let me = Instance::new("edge", id, "127.0.0.1", server.addr().port());
    registry.register(&me, Duration::from_secs(60)).await?;
    // A node that was down reads the purges it missed from its peers' logs (its disk
    // tier may hold purged objects) before it serves, then every 10 s.
    cache.catch_up().await;
    cache.spawn_catch_up(Duration::from_secs(10));
    Ok((cache, server))
}

type Answer = (
    u16,
    Option<http::HeaderValue>,
    Option<http::HeaderValue>,
    Bytes,
);

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let requests = Arc::new(AtomicU64::new(0));
    let origin = origin(requests.clone()).await?;
    let registry = MemoryRegistry::new();
    let dirs = [tempfile::tempdir()?, tempfile::tempdir()?];
    let (store_a, on_disk_a) = store(dirs[0].path())?;
    let (store_b, on_disk_b) = store(dirs[1].path())?;
    let (cache_a, server_a) = edge(&registry, origin, "edge-a", store_a).await?;
    let (cache_b, server_b) = edge(&registry, origin, "edge-b", store_b).await?;
    let (addr_a, addr_b) = (server_a.addr(), server_b.addr());
    for c in [&cache_a, &cache_b] {
        let fleet = c.fleet().expect("configured");
        while fleet.peers().is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    // The object's home on the consistent-hash ring: the herd goes there, the other node
    // then finds it on its sibling.
    let key = format!("{HOST}/video.mp4");
    let a_is_home = cache_a.fleet().and_then(|f| f.owner(&key)).is_none();
    let (home, home_id, other_id) = if a_is_home {
        (addr_a, "edge-a", "edge-b")
    } else {
        (addr_b, "edge-b", "edge-a")
    };
    let (home_cache, other_cache) = if a_is_home {
        (&cache_a, cache_b.clone())
    } else {
        (&cache_b, cache_a.clone())
    };
    let (other_server, other_dir, on_disk) = if a_is_home {
        (server_b, dirs[1].path(), on_disk_b)
    } else {
        (server_a, dirs[0].path(), on_disk_a)
    };
    let mut other = other_server.addr();

    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let send = move |edge: SocketAddr, method: &'static str, headers: &[(&'static str, &str)]| {
        let client = client.clone();
        let headers: Vec<(&'static str, String)> =
            headers.iter().map(|(k, v)| (*k, v.to_string())).collect();
        async move {
            let mut req = Request::builder()
                .method(method)
                .uri(format!("http://{edge}/video.mp4"))
                .header(header::HOST, HOST);
            for (k, v) in headers {
                req = req.header(k, v);
            }
            let res = client.request(req.body(Empty::new())?).await?;
            let status = res.status().as_u16();
            let x_cache = res.headers().get("x-cache").cloned();
            let peer = res.headers().get("x-cache-peer").cloned();
            let body = res.into_body().collect().await?.to_bytes();
            Ok::<Answer, BoxError>((status, x_cache, peer, body))
        }
    };
    let origin_requests = || requests.load(Ordering::SeqCst);

    // 1. A thundering herd on a cold key: one origin request, 1,000 full bodies.
    let herd: Vec<_> = (0..1000)
        .map(|_| tokio::spawn(send(home, "GET", &[])))
        .collect();
    let mut full = 0;
    for h in herd {
        if h.await??.3.len() == SIZE {
            full += 1;
        }
    }
    let s = home_cache.stats().snapshot();
    println!(
        "1. 1,000 concurrent misses on {home_id}: {full} full bodies, {} origin request(s), {} coalesced",
        origin_requests(),
        s.coalesced
    );

    // 2. A client that refuses an unchecked copy: revalidated with If-None-Match, 304.
    let (status, x_cache, _, body) = send(home, "GET", &[("cache-control", "no-cache")]).await?;
    println!(
        "2. no-cache request: {status} {x_cache:?}, {} bytes to the client, origin requests now {} (it answered 304: no body from it)",
        body.len(),
        origin_requests()
    );

    // 3. A range of the cached object: 206 from the cache.
    let (status, x_cache, _, body) = send(home, "GET", &[("range", "bytes=1000-1999")]).await?;
    println!(
        "3. range request: {status} {x_cache:?}, {} bytes, origin requests now {}",
        body.len(),
        origin_requests()
    );

    // 4. The other node misses: it asks the key's owner before the origin.
    let (status, x_cache, peer, body) = send(other, "GET", &[]).await?;
    println!(
        "4. {other_id} miss: {status} {x_cache:?} from sibling {peer:?}, {} bytes, origin requests still {}",
        body.len(),
        origin_requests()
    );
    tokio::task::yield_now().await;
    let (_, x_cache, _, _) = send(other, "GET", &[]).await?;
    println!("   {other_id} again: {x_cache:?} (stored locally)");

    // 5. The other node restarts: a new process would find its disk tier as it left it.
    if cfg!(feature = "disk-cache") {
        // The disk write runs in the background: wait (at most 5 s) until it landed.
        for _ in 0..500 {
            if on_disk(&key) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        other_server.shutdown().await?;
        drop((other_cache, on_disk));
        let (reopened, _) = store(other_dir)?;
        let (_, server) = edge(&registry, origin, other_id, reopened).await?;
        other = server.addr();
        let (status, x_cache, _, body) = send(other, "GET", &[]).await?;
        println!(
            "5. {other_id} restarted (new memory tier, same disk): {status} {x_cache:?}, {} bytes, origin requests still {}",
            body.len(),
            origin_requests()
        );
    } else {
        println!("5. (a restart keeping the disk tier: run with --features disk-cache)");
        let _ = (other_server, other_dir, on_disk); // keeps serving
    }

    // 6. One PURGE, sent to one node, reaches every node of the registry.
    let bearer = format!("Bearer {TOKEN}");
    let (status, _, _, body) = send(other, "PURGE", &[("authorization", &bearer)]).await?;
    println!(
        "6. PURGE on {other_id}: {status} {}",
        String::from_utf8_lossy(&body).trim()
    );
    let (status, _, _, _) = send(other, "PURGE", &[]).await?;
    println!("   PURGE without the token: {status}");
    let before = origin_requests();
    for (edge, id) in [(home, home_id), (other, other_id)] {
        let (_, x_cache, _, _) = send(edge, "GET", &[]).await?;
        println!("   {id} after the purge: {x_cache:?}");
    }
    println!(
        "   origin requests after the purge: {} (was {before}: the purged object was fetched again)",
        origin_requests()
    );

    // 7. A surrogate-key PURGE (every object tagged `catalogue`), fanned out the same way;
    // with the disk tier it reaches the disk copies too.
    let tag = [
        ("authorization", bearer.as_str()),
        ("surrogate-key", "catalogue"),
    ];
    let (status, _, _, body) = send(other, "PURGE", &tag).await?;
    println!(
        "7. PURGE by surrogate key on {other_id}: {status} {}",
        String::from_utf8_lossy(&body).trim()
    );
    for (edge, id) in [(home, home_id), (other, other_id)] {
        let (_, x_cache, _, _) = send(edge, "GET", &[]).await?;
        println!("   {id} after the tag purge: {x_cache:?}");
    }
    Ok(())
}
