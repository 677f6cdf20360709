//! Revalidation in the edge cache (issue 15, item 2): stale or client-refused entries are
//! checked with `If-None-Match`/`If-Modified-Since`, a `304` refreshes the entry without a
//! body; clients' own conditional requests are answered `304` from a fresh entry;
//! `must-revalidate` forbids serving stale. Real sockets on 127.0.0.1, except the expiry
//! test, which runs in-process under paused time.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{header, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use tower::{service_fn, Service, ServiceBuilder, ServiceExt};
use tower_patterns::cache::{CacheLayer, MemoryStore};
use tower_patterns::proxy::ForwardBuilder;

const BODY_LEN: usize = 64 * 1024;
const LAST_MODIFIED: &str = "Sun, 06 Nov 1994 08:49:37 GMT";

#[derive(Default)]
struct Counts {
    requests: AtomicU64,
    not_modified: AtomicU64,
    body_bytes: AtomicU64,
}

/// The origin: `/etag` has `ETag: "v1"`, `/lm` has a `Last-Modified`; both `max-age=60`
/// on a `200` and `max-age=120` on the `304` they answer to a matching condition.
async fn origin(counts: Arc<Counts>) -> SocketAddr {
    spawn_server(service_fn(move |req: Request<Incoming>| {
        let counts = counts.clone();
        async move {
            counts.requests.fetch_add(1, Ordering::SeqCst);
            let h = req.headers();
            let matches = match req.uri().path() {
                "/etag" => h.get(header::IF_NONE_MATCH).is_some_and(|v| v == "\"v1\""),
                _ => h
                    .get(header::IF_MODIFIED_SINCE)
                    .is_some_and(|v| v == LAST_MODIFIED),
            };
            let res = Response::builder()
                .header(header::ETAG, "\"v1\"")
                .header(header::LAST_MODIFIED, LAST_MODIFIED);
            let res = if matches {
                counts.not_modified.fetch_add(1, Ordering::SeqCst);
                res.status(304)
                    .header(header::CACHE_CONTROL, "max-age=120")
                    .header("x-origin-note", "refreshed")
                    .body(Full::new(Bytes::new()))
            } else {
                counts
                    .body_bytes
                    .fetch_add(BODY_LEN as u64, Ordering::SeqCst);
                res.header(header::CACHE_CONTROL, "max-age=60")
                    .body(Full::new(Bytes::from(vec![b'x'; BODY_LEN])))
            };
            Ok::<_, Infallible>(res.unwrap())
        }
    }))
    .await
}

async fn edge(origin: SocketAddr, cache: CacheLayer) -> SocketAddr {
    let fwd = ForwardBuilder::new(format!("http://{origin}"))
        .build::<Incoming>()
        .unwrap();
    spawn_server(ServiceBuilder::new().layer(cache).service(fwd)).await
}

async fn send(edge: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Got {
    send_whole(edge, "GET", path, headers).await
}

async fn filled(cache: &CacheLayer, n: u64) {
    for _ in 0..10_000 {
        if cache.stats().snapshot().fills >= n {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("fill did not complete");
}

#[tokio::test]
async fn a_304_refreshes_the_entry_without_a_body() {
    for path in ["/etag", "/lm"] {
        let counts = Arc::new(Counts::default());
        let cache = CacheLayer::new(MemoryStore::new(16 << 20));
        let e = edge(origin(counts.clone()).await, cache.clone()).await;
        let first = send(e, path, &[]).await;
        assert_eq!((first.status, first.h("x-cache")), (200, "MISS"));
        filled(&cache, 1).await;
        // The client refuses an unchecked copy: the cache asks the origin with its
        // validators, gets a 304 and serves its own body.
        let checked = send(e, path, &[("cache-control", "no-cache")]).await;
        assert_eq!(
            (checked.status, checked.h("x-cache")),
            (200, "REVALIDATED"),
            "{path}"
        );
        assert_eq!(checked.body.len(), BODY_LEN);
        assert_eq!(checked.h("cache-control"), "max-age=120", "headers merged");
        assert_eq!(counts.requests.load(Ordering::SeqCst), 2);
        assert_eq!(counts.not_modified.load(Ordering::SeqCst), 1);
        assert_eq!(
            counts.body_bytes.load(Ordering::SeqCst),
            BODY_LEN as u64,
            "the body crossed once"
        );
        // The refreshed entry is served from then on.
        let hit = send(e, path, &[]).await;
        assert_eq!((hit.h("x-cache"), hit.body.len()), ("HIT", BODY_LEN));
        assert_eq!(hit.h("cache-control"), "max-age=120");
        assert_eq!(counts.requests.load(Ordering::SeqCst), 2);
        assert_eq!(cache.stats().snapshot().revalidated, 1);
    }
}

#[tokio::test]
async fn client_conditionals_are_answered_304_from_a_fresh_entry() {
    let counts = Arc::new(Counts::default());
    let cache = CacheLayer::new(MemoryStore::new(16 << 20));
    let e = edge(origin(counts.clone()).await, cache.clone()).await;
    send(e, "/etag", &[]).await;
    filled(&cache, 1).await;
    for (h, v) in [
        ("if-none-match", "\"v1\""),
        ("if-none-match", "\"v0\", W/\"v1\""),
        ("if-none-match", "*"),
        ("if-modified-since", LAST_MODIFIED),
        ("if-modified-since", "Mon, 07 Nov 1994 08:49:37 GMT"),
    ] {
        let got = send(e, "/etag", &[(h, v)]).await;
        assert_eq!((got.status, got.h("x-cache")), (304, "HIT"), "{h}: {v}");
        assert!(got.body.is_empty());
    }
    for (h, v) in [
        ("if-none-match", "\"v2\""),
        ("if-modified-since", "Sat, 05 Nov 1994 08:49:37 GMT"),
        ("if-modified-since", "not a date"),
        // If-None-Match wins over If-Modified-Since (RFC 9110 §13.2.2).
    ] {
        let got = send(e, "/etag", &[(h, v)]).await;
        assert_eq!((got.status, got.body.len()), (200, BODY_LEN), "{h}: {v}");
    }
    let got = send(
        e,
        "/etag",
        &[
            ("if-none-match", "\"v2\""),
            ("if-modified-since", LAST_MODIFIED),
        ],
    )
    .await;
    assert_eq!(got.status, 200, "If-None-Match decides when present");
    assert_eq!(
        counts.requests.load(Ordering::SeqCst),
        1,
        "all from the cache"
    );
}

#[tokio::test]
async fn concurrent_revalidations_make_one_origin_request() {
    let counts = Arc::new(Counts::default());
    let cache = CacheLayer::new(MemoryStore::new(16 << 20));
    let e = edge(origin(counts.clone()).await, cache.clone()).await;
    send(e, "/etag", &[]).await;
    filled(&cache, 1).await;
    let clients: Vec<_> = (0..50)
        .map(|_| tokio::spawn(send(e, "/etag", &[("cache-control", "no-cache")])))
        .collect();
    for c in clients {
        let got = c.await.unwrap();
        assert_eq!(got.status, 200);
        assert_eq!(got.body.len(), BODY_LEN);
        assert!(
            ["REVALIDATED", "COALESCED"].contains(&got.h("x-cache")),
            "{}",
            got.h("x-cache")
        );
    }
    // Each request either led a revalidation (one 304 from the origin) or followed one;
    // one that arrives after a revalidation finished leads its own.
    let n = counts.requests.load(Ordering::SeqCst);
    let s = cache.stats().snapshot();
    assert_eq!(s.revalidated, n - 1, "{s:?}");
    assert_eq!(s.revalidated + s.coalesced, 50, "{s:?}");
    assert_eq!(counts.body_bytes.load(Ordering::SeqCst), BODY_LEN as u64);
}

/// In-process origin with validators for the paused-time test: `ETag: "v1"` and
/// `cache_control`; answers `304` to `If-None-Match: "v1"`; `503` while `down`.
#[derive(Clone)]
struct PausedOrigin {
    calls: Arc<AtomicU64>,
    seen_inm: Arc<Mutex<Vec<String>>>,
    down: Arc<Mutex<bool>>,
    cache_control: &'static str,
}

impl Service<Request<()>> for PausedOrigin {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;
    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn call(&mut self, req: Request<()>) -> Self::Future {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let inm = req
            .headers()
            .get(header::IF_NONE_MATCH)
            .map(|v| v.to_str().unwrap().to_owned());
        self.seen_inm
            .lock()
            .unwrap()
            .push(inm.clone().unwrap_or_default());
        let res = if *self.down.lock().unwrap() {
            Response::builder().status(503).body(Full::default())
        } else if inm.as_deref() == Some("\"v1\"") {
            Response::builder()
                .status(304)
                .header(header::ETAG, "\"v1\"")
                .header(header::CACHE_CONTROL, self.cache_control)
                .body(Full::default())
        } else {
            Response::builder()
                .header(header::ETAG, "\"v1\"")
                .header(header::CACHE_CONTROL, self.cache_control)
                .body(Full::new(Bytes::from_static(b"body")))
        };
        std::future::ready(Ok(res.unwrap()))
    }
}

async fn get<S>(svc: &mut S) -> (StatusCode, String, Bytes)
where
    S: Service<Request<()>, Response = Response<tower_patterns::cache::CacheBody<Full<Bytes>>>>,
    S::Error: std::fmt::Debug,
{
    let res = svc
        .ready()
        .await
        .unwrap()
        .call(Request::get("/a").body(()).unwrap())
        .await
        .unwrap();
    let xc = res.headers()["x-cache"].to_str().unwrap().to_owned();
    let status = res.status();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    tokio::task::yield_now().await; // let the fill task store
    (status, xc, body)
}

#[tokio::test(start_paused = true)]
async fn expired_entries_are_revalidated_and_must_revalidate_is_never_served_stale() {
    for (cc, stale_ok) in [("max-age=60", true), ("max-age=60, must-revalidate", false)] {
        let origin = PausedOrigin {
            calls: Arc::default(),
            seen_inm: Arc::default(),
            down: Arc::default(),
            cache_control: cc,
        };
        let cache = CacheLayer::builder(MemoryStore::new(1 << 20))
            .stale_if_error(Duration::from_secs(600))
            .build();
        let mut svc = ServiceBuilder::new()
            .layer(cache.clone())
            .service(origin.clone());
        assert_eq!(get(&mut svc).await.1, "MISS");
        tokio::time::advance(Duration::from_secs(61)).await;
        let (s, xc, body) = get(&mut svc).await;
        assert_eq!(
            (s, xc.as_str(), &body[..]),
            (StatusCode::OK, "REVALIDATED", &b"body"[..])
        );
        assert_eq!(*origin.seen_inm.lock().unwrap(), ["", "\"v1\""]);
        assert_eq!(get(&mut svc).await.1, "HIT", "fresh again for 60 s");
        // Expired while the origin is down.
        tokio::time::advance(Duration::from_secs(61)).await;
        *origin.down.lock().unwrap() = true;
        let (s, xc, _) = get(&mut svc).await;
        if stale_ok {
            assert_eq!((s, xc.as_str()), (StatusCode::OK, "STALE"), "{cc}");
        } else {
            assert_eq!(
                (s, xc.as_str()),
                (StatusCode::SERVICE_UNAVAILABLE, "MISS"),
                "{cc}"
            );
        }
    }
}

/// Yields until `f` holds (bounded: a hang guard, not a timing assumption).
async fn until(what: &str, f: impl Fn() -> bool) {
    for _ in 0..10_000 {
        if f() {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("never happened: {what}");
}

#[tokio::test(start_paused = true)]
async fn stale_while_revalidate_serves_stale_during_one_background_refresh() {
    let calls = Arc::new(AtomicU64::new(0));
    let (gate, gate_rx) = tokio::sync::watch::channel(true);
    let c = calls.clone();
    let origin = service_fn(move |req: Request<()>| {
        let n = c.fetch_add(1, Ordering::SeqCst) + 1;
        let mut gate_rx = gate_rx.clone();
        async move {
            gate_rx.wait_for(|open| *open).await.unwrap();
            let cc = "max-age=60, stale-while-revalidate=30";
            let res = if req
                .headers()
                .get(header::IF_NONE_MATCH)
                .is_some_and(|v| v == "\"v1\"")
            {
                Response::builder()
                    .status(304)
                    .header(header::CACHE_CONTROL, cc)
                    .body(Full::default())
            } else {
                Response::builder()
                    .header(header::ETAG, "\"v1\"")
                    .header(header::CACHE_CONTROL, cc)
                    .body(Full::new(Bytes::from(format!("v{n}"))))
            };
            Ok::<_, Infallible>(res.unwrap())
        }
    });
    let cache = CacheLayer::new(MemoryStore::new(1 << 20));
    let mut svc = ServiceBuilder::new().layer(cache.clone()).service(origin);
    assert_eq!(get(&mut svc).await.1, "MISS");
    tokio::time::advance(Duration::from_secs(61)).await;
    gate.send_replace(false); // hold the refresh at the origin
    for _ in 0..10 {
        let (s, xc, body) = get(&mut svc).await;
        assert_eq!(
            (s, xc.as_str(), &body[..]),
            (StatusCode::OK, "STALE", &b"v1"[..])
        );
    }
    until("refresh at the origin", || {
        calls.load(Ordering::SeqCst) == 2
    })
    .await;
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "one background refresh for ten stale hits"
    );
    gate.send_replace(true);
    until("refreshed", || cache.stats().snapshot().revalidated == 1).await;
    let (_, xc, body) = get(&mut svc).await;
    assert_eq!(
        (xc.as_str(), &body[..]),
        ("HIT", &b"v1"[..]),
        "refreshed by the 304"
    );
    // Past the window (60 s fresh + 30 s): revalidated before answering, not stale.
    tokio::time::advance(Duration::from_secs(91)).await;
    assert_eq!(get(&mut svc).await.1, "REVALIDATED");
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}
