//! Edge cache under hostile origins and clients (issue 10 items 2, 9, 12 and the PURGE
//! item), over real sockets on 127.0.0.1: an origin, a `Forward` to it behind a
//! `CacheLayer`, served by the crate's server, and a hyper client.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{header, HeaderValue, Request, Response};
use http_body_util::{Empty, Full};
use hyper::body::Incoming;
use tower::{service_fn, ServiceBuilder};
use tower_patterns::cache::{CacheLayer, CacheLayerBuilder, MemoryStore};
use tower_patterns::proxy::ForwardBuilder;

/// The origin: `/huge` answers with `max-age` and `Age` of `u64::MAX`; `/private` with a
/// page for the user named by `x-user`, marked `private` in a `Cache-Control` line that also
/// holds raw UTF-8; anything else with the `Host` it was asked for. Counts requests.
async fn origin(hits: Arc<AtomicU64>) -> SocketAddr {
    spawn_server(service_fn(move |req: Request<Incoming>| {
        let hits = hits.clone();
        async move {
            let n = hits.fetch_add(1, Ordering::SeqCst) + 1;
            let mut res = Response::builder();
            let body = match req.uri().path() {
                "/huge" => {
                    res = res
                        .header(header::CACHE_CONTROL, "max-age=18446744073709551615")
                        .header(header::AGE, "18446744073709551615");
                    format!("huge v{n}")
                }
                "/private" => {
                    let cc =
                        HeaderValue::from_bytes(b"max-age=60, private, note=caf\xc3\xa9").unwrap();
                    res = res.header(header::CACHE_CONTROL, cc);
                    let user = req.headers()["x-user"].to_str().unwrap().to_owned();
                    format!("private page of {user}")
                }
                _ => {
                    res = res.header(header::CACHE_CONTROL, "max-age=60");
                    let host = req.headers()[header::HOST].to_str().unwrap().to_owned();
                    format!("object of {host}")
                }
            };
            Ok::<_, Infallible>(res.body(Full::new(Bytes::from(body))).unwrap())
        }
    }))
    .await
}

async fn edge(origin: SocketAddr, cache: CacheLayerBuilder) -> SocketAddr {
    let fwd = ForwardBuilder::new(format!("http://{origin}"))
        .build::<Incoming>()
        .unwrap();
    spawn_server(ServiceBuilder::new().layer(cache.build()).service(fwd)).await
}

/// Sends `method path` to `edge` with extra headers; returns status, `X-Cache` and body.
async fn send(
    edge: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String, Bytes) {
    let mut req = Request::builder()
        .method(method)
        .uri(format!("http://{edge}{path}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let res = client()
        .request(req.body(Empty::<Bytes>::new()).unwrap())
        .await
        .unwrap();
    let status = res.status().as_u16();
    let xc = res
        .headers()
        .get("x-cache")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (status, xc, read_all(res).await.unwrap())
}

/// Waits (bounded) until the fill task stored `n` entries.
async fn wait_fills(cache_fills: impl Fn() -> u64, n: u64) {
    for _ in 0..10_000 {
        if cache_fills() >= n {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("fill did not complete");
}

#[tokio::test]
async fn huge_age_and_max_age_saturate_instead_of_panicking() {
    let hits = Arc::new(AtomicU64::new(0));
    let store = Arc::new(MemoryStore::new(1 << 20));
    let cache = CacheLayer::builder(store.clone());
    let edge = edge(origin(hits.clone()).await, cache).await;

    let (s, xc, body) = send(edge, "GET", "/huge", &[]).await;
    assert_eq!((s, xc.as_str(), &body[..]), (200, "MISS", &b"huge v1"[..]));
    for _ in 0..10_000 {
        if store.stats().entries == 1 {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(store.stats().entries, 1, "the response was not stored");
    // Let the entry age by 2 s without sleeping: its age (u64::MAX s from the origin plus
    // the time held) overflowed a Duration sum and panicked every later request.
    tokio::time::pause();
    tokio::time::advance(Duration::from_secs(2)).await;
    tokio::time::resume();
    // Later requests are answered (the age saturates; no panic, no dropped connection).
    // An age of "forever" is past any lifetime, so the origin is asked again.
    for _ in 0..3 {
        let (s, _, body) = send(edge, "GET", "/huge", &[]).await;
        assert_eq!(s, 200);
        assert!(body.starts_with(b"huge v"), "{body:?}");
    }
    let (s, _, _) = send(edge, "HEAD", "/huge", &[]).await;
    assert_eq!(s, 200);
}

#[tokio::test]
async fn private_with_a_non_ascii_byte_is_never_shared() {
    let hits = Arc::new(AtomicU64::new(0));
    // A default lifetime, as an operator sets for origins that send none: the unreadable
    // Cache-Control must not fall back to it.
    let cache = CacheLayer::builder(MemoryStore::new(1 << 20)).default_ttl(Duration::from_secs(60));
    let layer_stats = {
        // Keep a handle on the counters: build the layer here.
        let layer = cache.build();
        let stats = layer.stats().clone();
        let fwd = ForwardBuilder::new(format!("http://{}", origin(hits.clone()).await))
            .build::<Incoming>()
            .unwrap();
        let edge = spawn_server(ServiceBuilder::new().layer(layer).service(fwd)).await;
        (edge, stats)
    };
    let (edge, stats) = layer_stats;
    let (_, _, a) = send(edge, "GET", "/private", &[("x-user", "alice")]).await;
    assert_eq!(&a[..], b"private page of alice");
    // Give a (wrong) fill every chance to land before user B asks.
    for _ in 0..1000 {
        tokio::task::yield_now().await;
    }
    let (_, xc, b) = send(edge, "GET", "/private", &[("x-user", "bob")]).await;
    assert_eq!(&b[..], b"private page of bob", "user B got user A's page");
    assert_eq!(xc, "MISS");
    assert_eq!(stats.snapshot().fills, 0);
    assert_eq!(hits.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn default_key_keeps_virtual_hosts_apart() {
    let hits = Arc::new(AtomicU64::new(0));
    let layer = CacheLayer::builder(MemoryStore::new(1 << 20)).build();
    let stats = layer.stats().clone();
    let fwd = ForwardBuilder::new(format!("http://{}", origin(hits.clone()).await))
        .build::<Incoming>()
        .unwrap();
    let edge = spawn_server(ServiceBuilder::new().layer(layer.clone()).service(fwd)).await;

    let (_, xc, a) = send(edge, "GET", "/logo.png", &[("host", "a.example")]).await;
    assert_eq!((xc.as_str(), &a[..]), ("MISS", &b"object of a.example"[..]));
    wait_fills(|| stats.snapshot().fills, 1).await;
    let (_, xc, b) = send(edge, "GET", "/logo.png", &[("host", "b.example")]).await;
    assert_eq!((xc.as_str(), &b[..]), ("MISS", &b"object of b.example"[..]));
    wait_fills(|| stats.snapshot().fills, 2).await;
    // Each host hits its own entry; the host is compared case-insensitively.
    let (_, xc, a2) = send(edge, "GET", "/logo.png", &[("host", "A.Example")]).await;
    assert_eq!((xc.as_str(), &a2[..]), ("HIT", &b"object of a.example"[..]));
    let (_, xc, b2) = send(edge, "GET", "/logo.png", &[("host", "b.example")]).await;
    assert_eq!((xc.as_str(), &b2[..]), ("HIT", &b"object of b.example"[..]));
    assert_eq!(hits.load(Ordering::SeqCst), 2);
    assert!(layer.purge("a.example/logo.png"));
}

#[tokio::test]
async fn purge_needs_explicit_authorisation() {
    let hits = Arc::new(AtomicU64::new(0));
    let origin = origin(hits.clone()).await;

    // Default: PURGE is refused, even from 127.0.0.1 (the loopback peer of any proxy on
    // the same host), and the entry stays.
    let default = edge(origin, CacheLayer::builder(MemoryStore::new(1 << 20))).await;
    send(default, "GET", "/x", &[]).await;
    for _ in 0..1000 {
        tokio::task::yield_now().await;
    }
    let (s, _, _) = send(default, "PURGE", "/x", &[]).await;
    assert_eq!(s, 405);
    assert_eq!(send(default, "GET", "/x", &[]).await.1, "HIT");

    // With a token: refused without it or with a wrong one, accepted with it.
    let name = http::HeaderName::from_static("x-purge-token");
    let with_token = edge(
        origin,
        CacheLayer::builder(MemoryStore::new(1 << 20)).purge_token(name, "tok-123"),
    )
    .await;
    send(with_token, "GET", "/y", &[]).await;
    for _ in 0..1000 {
        tokio::task::yield_now().await;
    }
    assert_eq!(send(with_token, "PURGE", "/y", &[]).await.0, 403);
    let wrong = [("x-purge-token", "tok-124")];
    assert_eq!(send(with_token, "PURGE", "/y", &wrong).await.0, 403);
    assert_eq!(send(with_token, "GET", "/y", &[]).await.1, "HIT");
    let right = [("x-purge-token", "tok-123")];
    assert_eq!(send(with_token, "PURGE", "/y", &right).await.0, 200);
    assert_eq!(send(with_token, "GET", "/y", &[]).await.1, "MISS");

    // An IP allow-list that does not hold the client: refused.
    let listed = edge(
        origin,
        CacheLayer::builder(MemoryStore::new(1 << 20)).purge_from(["10.1.2.3".parse().unwrap()]),
    )
    .await;
    assert_eq!(send(listed, "PURGE", "/y", &[]).await.0, 403);
}
