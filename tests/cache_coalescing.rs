//! Request coalescing in the edge cache (issue 15, item 1), over real sockets on
//! 127.0.0.1: an origin that counts its requests and holds each response until the test
//! releases it, a `Forward` to it behind a `CacheLayer`, served by the crate's server, and
//! hyper clients.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;

use bytes::Bytes;
use common::*;
use http::{header, Request, Response};
use http_body::Frame;
use http_body_util::{Empty, StreamBody};
use hyper::body::Incoming;
use tokio::sync::watch;
use tower::{service_fn, ServiceBuilder};
use tower_patterns::body::{boxed, BoxBody};
use tower_patterns::cache::{CacheLayer, MemoryStore, Store};
use tower_patterns::proxy::ForwardBuilder;
use tower_patterns::BoxError;

const BODY_LEN: u64 = 256 * 1024;
/// Larger than loopback socket buffers can hold, so a client that does not read blocks
/// whoever is paced by it.
const BIG_LEN: u64 = 32 << 20;

/// The origin. Every request waits for `gate` to hold `true` (except `/fast`), then:
/// `/obj` answers `BODY_LEN` pattern bytes (`max-age=60`) in 64 KiB chunks; `/cut`
/// promises `BODY_LEN` bytes, sends one chunk and fails, so the connection is cut mid-body;
/// `/private` answers a `private` page. Counts requests per path.
struct Origin {
    addr: SocketAddr,
    requests: Arc<AtomicU64>,
    gate: watch::Sender<bool>,
    /// `/cut` fails its body once this holds `true`.
    cut: watch::Sender<bool>,
}

async fn origin() -> Origin {
    let requests = Arc::new(AtomicU64::new(0));
    let (gate, rx) = watch::channel(false);
    let (cut, cut_rx) = watch::channel(false);
    let count = requests.clone();
    let addr = spawn_server(service_fn(move |req: Request<Incoming>| {
        let count = count.clone();
        let mut rx = rx.clone();
        let cut_rx = cut_rx.clone();
        async move {
            let n = count.fetch_add(1, Ordering::SeqCst);
            let path = req.uri().path().to_owned();
            // The first request of a test waits for the gate; later ones (a follower
            // that timed out or was released) answer at once.
            if n == 0 {
                rx.wait_for(|open| *open).await.unwrap();
            }
            let total = if path == "/big" { BIG_LEN } else { BODY_LEN };
            let res = Response::builder()
                .header(header::CONTENT_LENGTH, total)
                .header(header::CACHE_CONTROL, "max-age=60");
            let body: BoxBody = match path.as_str() {
                "/cut" => {
                    let first = futures_util::stream::iter([Ok::<_, BoxError>(Frame::data(
                        Bytes::from(vec![pattern_byte(0); CHUNK]),
                    ))]);
                    let fail = futures_util::stream::once(async move {
                        let mut cut_rx = cut_rx;
                        let _ = cut_rx.wait_for(|c| *c).await;
                        Err::<Frame<Bytes>, BoxError>("origin cut the body".into())
                    });
                    boxed(StreamBody::new(futures_util::StreamExt::chain(first, fail)))
                }
                "/private" => {
                    let res = res
                        .header(header::CACHE_CONTROL, "private")
                        .header(header::CONTENT_LENGTH, BODY_LEN);
                    return Ok::<_, Infallible>(res.body(pattern_body(BODY_LEN)).unwrap());
                }
                _ => pattern_body(total),
            };
            Ok::<_, Infallible>(res.body(body).unwrap())
        }
    }))
    .await;
    Origin {
        addr,
        requests,
        gate,
        cut,
    }
}

async fn edge(origin: SocketAddr, cache: CacheLayer) -> SocketAddr {
    let fwd = ForwardBuilder::new(format!("http://{origin}"))
        .build::<Incoming>()
        .unwrap();
    spawn_server(ServiceBuilder::new().layer(cache).service(fwd)).await
}

/// Waits (at most 30 s, a hang guard) until `f` holds.
async fn until(what: &str, f: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// One client request: status, `X-Cache`, and the body or the error reading it.
async fn fetch(edge: SocketAddr, path: &str) -> (u16, String, Result<Bytes, hyper::Error>) {
    // A client per request: every request gets its own connection, as 1,000 browsers would.
    let res = client()
        .request(
            Request::get(format!("http://{edge}{path}"))
                .body(Empty::<Bytes>::new())
                .unwrap(),
        )
        .await
        .unwrap();
    let xc = res
        .headers()
        .get("x-cache")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let status = res.status().as_u16();
    (status, xc, read_all(res).await)
}

/// Like [`fetch`], but a request that fails before the head is an `Err`.
async fn try_fetch(
    edge: SocketAddr,
    path: &str,
    heads: Arc<AtomicU64>,
) -> Result<(u16, Result<Bytes, hyper::Error>), hyper_util::client::legacy::Error> {
    let res = client()
        .request(
            Request::get(format!("http://{edge}{path}"))
                .body(Empty::<Bytes>::new())
                .unwrap(),
        )
        .await?;
    heads.fetch_add(1, Ordering::SeqCst);
    let status = res.status().as_u16();
    Ok((status, read_all(res).await))
}

fn is_pattern(b: &[u8]) -> bool {
    b.len() as u64 == BODY_LEN
        && b.iter()
            .enumerate()
            .all(|(i, x)| *x == pattern_byte(i as u64))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_concurrent_misses_make_one_origin_request() {
    let o = origin().await;
    let cache = CacheLayer::new(MemoryStore::new(64 << 20));
    let e = edge(o.addr, cache.clone()).await;
    let clients: Vec<_> = (0..1000).map(|_| tokio::spawn(fetch(e, "/obj"))).collect();
    // Every other request joined the first one's flight before the origin answers.
    until("999 followers", || {
        cache.stats().snapshot().coalesced == 999
    })
    .await;
    o.gate.send_replace(true);
    let mut labels = std::collections::HashMap::<String, usize>::new();
    for c in clients {
        let (status, xc, body) = c.await.unwrap();
        assert_eq!(status, 200);
        assert!(is_pattern(&body.unwrap()), "a full, correct body");
        *labels.entry(xc).or_default() += 1;
    }
    assert_eq!(o.requests.load(Ordering::SeqCst), 1, "one origin request");
    assert_eq!(labels.get("MISS"), Some(&1));
    assert_eq!(labels.get("COALESCED"), Some(&999));
    until("stored", || cache.stats().snapshot().fills == 1).await;
    assert_eq!(cache.flights_in_progress(), 0);
    let (_, xc, body) = fetch(e, "/obj").await;
    assert_eq!(xc, "HIT");
    assert!(is_pattern(&body.unwrap()));
    assert_eq!(o.requests.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_cut_mid_body_fails_every_follower_and_caches_nothing() {
    let o = origin().await;
    let cache = CacheLayer::new(MemoryStore::new(64 << 20));
    let e = edge(o.addr, cache.clone()).await;
    let heads = Arc::new(AtomicU64::new(0));
    let clients: Vec<_> = (0..1000)
        .map(|_| tokio::spawn(try_fetch(e, "/cut", heads.clone())))
        .collect();
    until("999 followers", || {
        cache.stats().snapshot().coalesced == 999
    })
    .await;
    o.gate.send_replace(true);
    // Every client has the head (and part of the body) before the origin cuts.
    until("1000 heads", || heads.load(Ordering::SeqCst) == 1000).await;
    o.cut.send_replace(true);
    for c in clients {
        let (status, body) = c.await.unwrap().unwrap();
        assert_eq!(status, 200);
        assert!(body.is_err(), "a truncated body must never end cleanly");
    }
    assert_eq!(o.requests.load(Ordering::SeqCst), 1);
    until("fill aborted", || {
        cache.stats().snapshot().fills_aborted == 1
    })
    .await;
    assert_eq!(cache.stats().snapshot().fills, 0);
    let key = format!("{e}/cut");
    assert!(cache.store().get(&key).is_none(), "nothing cached");
    assert_eq!(cache.flights_in_progress(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uncacheable_leader_releases_followers_to_the_origin() {
    let o = origin().await;
    let cache = CacheLayer::new(MemoryStore::new(64 << 20));
    let e = edge(o.addr, cache.clone()).await;
    let clients: Vec<_> = (0..20)
        .map(|_| tokio::spawn(fetch(e, "/private")))
        .collect();
    until("19 followers", || cache.stats().snapshot().coalesced == 19).await;
    o.gate.send_replace(true);
    for c in clients {
        let (status, xc, body) = c.await.unwrap();
        assert_eq!(
            (status, xc.as_str()),
            (200, "MISS"),
            "never a shared private page"
        );
        assert!(is_pattern(&body.unwrap()));
    }
    // The leader's private answer is not handed to anyone else: each asked for its own.
    assert_eq!(o.requests.load(Ordering::SeqCst), 20);
    assert_eq!(cache.flights_in_progress(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_goes_to_the_origin_after_the_lock_timeout() {
    let o = origin().await;
    let cache = CacheLayer::builder(MemoryStore::new(64 << 20))
        .lock_timeout(Duration::from_millis(200))
        .build();
    let e = edge(o.addr, cache.clone()).await;
    // The leader's origin request hangs until the gate opens.
    let leader = tokio::spawn(fetch(e, "/obj"));
    until("leader at the origin", || {
        o.requests.load(Ordering::SeqCst) == 1
    })
    .await;
    let started = tokio::time::Instant::now();
    let (status, xc, body) = fetch(e, "/obj").await;
    assert!(started.elapsed() >= Duration::from_millis(200));
    assert_eq!((status, xc.as_str()), (200, "MISS"));
    assert!(is_pattern(&body.unwrap()));
    assert_eq!(o.requests.load(Ordering::SeqCst), 2);
    let s = cache.stats().snapshot();
    assert_eq!((s.coalesced, s.lock_timeouts, s.fills), (1, 1, 0), "{s:?}");
    // The timed-out follower did not store (as nginx): the leader's fill does.
    o.gate.send_replace(true);
    let (_, xc, body) = leader.await.unwrap();
    assert_eq!(xc, "MISS");
    assert!(is_pattern(&body.unwrap()));
    until("stored", || cache.stats().snapshot().fills == 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_coalescing_sends_every_miss_to_the_origin() {
    let o = origin().await;
    let cache = CacheLayer::builder(MemoryStore::new(64 << 20))
        .no_coalescing()
        .build();
    let e = edge(o.addr, cache.clone()).await;
    let clients: Vec<_> = (0..20).map(|_| tokio::spawn(fetch(e, "/obj"))).collect();
    until("20 at the origin", || {
        o.requests.load(Ordering::SeqCst) == 20
    })
    .await;
    o.gate.send_replace(true);
    for c in clients {
        assert!(is_pattern(&c.await.unwrap().2.unwrap()));
    }
    assert_eq!(cache.stats().snapshot().coalesced, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_never_reads_does_not_stall_its_followers() {
    let o = origin().await;
    let cache = CacheLayer::new(MemoryStore::new(256 << 20));
    let e = edge(o.addr, cache.clone()).await;
    // The leader sends its request and never reads a byte of the answer.
    let mut leader = tokio::net::TcpStream::connect(e).await.unwrap();
    leader
        .write_all(format!("GET /big HTTP/1.1\r\nHost: {e}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    until("leader at the origin", || {
        o.requests.load(Ordering::SeqCst) == 1
    })
    .await;
    let followers: Vec<_> = (0..20).map(|_| tokio::spawn(fetch(e, "/big"))).collect();
    until("20 followers", || cache.stats().snapshot().coalesced == 20).await;
    o.gate.send_replace(true);
    for f in followers {
        let (status, xc, body) = tokio::time::timeout(Duration::from_secs(60), f)
            .await
            .expect("a follower stalled behind the leader")
            .unwrap();
        assert_eq!((status, xc.as_str()), (200, "COALESCED"));
        let body = body.unwrap();
        assert_eq!(body.len() as u64, BIG_LEN);
        assert!(body
            .iter()
            .enumerate()
            .all(|(i, b)| *b == pattern_byte(i as u64)));
    }
    until("stored", || cache.stats().snapshot().fills == 1).await;
    assert_eq!(o.requests.load(Ordering::SeqCst), 1);
    drop(leader);
}
