//! Range requests in the edge cache (issue 15, item 4), over real sockets on 127.0.0.1:
//! a miss with `Range` fetches and stores the whole object while answering the range; hits
//! answer single ranges, multiple ranges (`multipart/byteranges`), `If-Range`,
//! unsatisfiable (`416`) and malformed (ignored: `200`) ranges.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use common::*;
use http::{header, Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use tower::{service_fn, ServiceBuilder};
use tower_patterns::cache::{CacheLayer, MemoryStore};
use tower_patterns::proxy::ForwardBuilder;

const LEN: usize = 100 * 1024;
const LAST_MODIFIED: &str = "Sun, 06 Nov 1994 08:49:37 GMT";

fn object() -> Vec<u8> {
    (0..LEN).map(|i| (i % 251) as u8).collect()
}

/// The origin: `/obj` is `LEN` bytes with `ETag: "r1"`; records each request's `Range`.
async fn origin(seen: Arc<Mutex<Vec<Option<String>>>>) -> SocketAddr {
    spawn_server(service_fn(move |req: Request<Incoming>| {
        let seen = seen.clone();
        async move {
            seen.lock().unwrap().push(
                req.headers()
                    .get(header::RANGE)
                    .map(|v| v.to_str().unwrap().to_owned()),
            );
            let res = Response::builder()
                .header(header::CACHE_CONTROL, "max-age=60")
                .header(header::ETAG, "\"r1\"")
                .header(header::LAST_MODIFIED, LAST_MODIFIED)
                .header(header::CONTENT_TYPE, "application/octet-stream")
                .body(Full::new(Bytes::from(object())))
                .unwrap();
            Ok::<_, Infallible>(res)
        }
    }))
    .await
}

async fn send(edge: SocketAddr, headers: &[(&str, &str)]) -> Got {
    send_whole(edge, "GET", "/obj", headers).await
}

async fn setup() -> (Arc<Mutex<Vec<Option<String>>>>, CacheLayer, SocketAddr) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let o = origin(seen.clone()).await;
    let cache = CacheLayer::new(MemoryStore::new(16 << 20));
    let fwd = ForwardBuilder::new(format!("http://{o}"))
        .build::<Incoming>()
        .unwrap();
    let e = spawn_server(ServiceBuilder::new().layer(cache.clone()).service(fwd)).await;
    (seen, cache, e)
}

async fn filled(cache: &CacheLayer) {
    for _ in 0..10_000 {
        if cache.stats().snapshot().fills >= 1 {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("fill did not complete");
}

#[tokio::test]
async fn a_miss_with_range_stores_the_whole_object() {
    let (seen, cache, e) = setup().await;
    let got = send(e, &[("range", "bytes=1000-1999")]).await;
    assert_eq!((got.status, got.h("x-cache")), (206, "MISS"));
    assert_eq!(got.h("content-range"), format!("bytes 1000-1999/{LEN}"));
    assert_eq!(&got.body[..], &object()[1000..2000]);
    filled(&cache).await;
    assert_eq!(
        *seen.lock().unwrap(),
        [None],
        "the origin was asked for everything"
    );
    let full = send(e, &[]).await;
    assert_eq!((full.status, full.h("x-cache")), (200, "HIT"));
    assert_eq!(&full.body[..], &object()[..]);
    // An unsatisfiable range on a miss still fills the store.
    let (seen, cache, e) = setup().await;
    let got = send(e, &[("range", "bytes=999999-")]).await;
    assert_eq!(got.status, 416);
    filled(&cache).await;
    assert_eq!(send(e, &[]).await.h("x-cache"), "HIT");
    assert_eq!(seen.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn hits_answer_ranges() {
    let (seen, cache, e) = setup().await;
    send(e, &[]).await;
    filled(&cache).await;
    let obj = object();
    for (range, from, to) in [
        ("bytes=0-0", 0, 1),
        ("bytes=100-", 100, LEN),
        ("bytes=-500", LEN - 500, LEN),
        ("bytes=50000-9999999", 50_000, LEN),
    ] {
        let got = send(e, &[("range", range)]).await;
        assert_eq!((got.status, got.h("x-cache")), (206, "HIT"), "{range}");
        assert_eq!(
            got.h("content-range"),
            format!("bytes {}-{}/{LEN}", from, to - 1)
        );
        assert_eq!(&got.body[..], &obj[from..to], "{range}");
    }
    // Unsatisfiable: 416 with the length.
    let got = send(e, &[("range", "bytes=200000-")]).await;
    assert_eq!(
        (got.status, got.h("content-range")),
        (416, "bytes */102400")
    );
    assert!(got.body.is_empty());
    // Malformed, another unit, too many ranges: ignored, the full 200.
    let many = format!("bytes={}", vec!["1-2"; 17].join(","));
    for range in ["bytes=5-1", "bytes=x-", "lines=1-2", "bytes", many.as_str()] {
        let got = send(e, &[("range", range)]).await;
        assert_eq!((got.status, got.body.len()), (200, LEN), "{range}");
    }
    // If-Range: a strong ETag or the exact Last-Modified keeps the range.
    for (if_range, status) in [
        ("\"r1\"", 206),
        ("\"r0\"", 200),
        ("W/\"r1\"", 200),
        (LAST_MODIFIED, 206),
        ("Mon, 07 Nov 1994 08:49:37 GMT", 200),
        ("garbage", 200),
    ] {
        let got = send(e, &[("range", "bytes=0-9"), ("if-range", if_range)]).await;
        assert_eq!(got.status, status, "If-Range {if_range}");
    }
    assert_eq!(seen.lock().unwrap().len(), 1, "all from the cache");
}

#[tokio::test]
async fn multiple_ranges_are_multipart_byteranges() {
    let (_, cache, e) = setup().await;
    send(e, &[]).await;
    filled(&cache).await;
    let got = send(e, &[("range", "bytes=0-9, 500-599, -5")]).await;
    assert_eq!(got.status, 206);
    let boundary = got
        .h("content-type")
        .strip_prefix("multipart/byteranges; boundary=")
        .expect("multipart content type")
        .to_owned();
    let obj = object();
    let body = got.body.to_vec();
    let delim = format!("\r\n--{boundary}");
    let mut parts = Vec::new();
    let mut rest = &body[..];
    // Split on the delimiter by hand (the payload is binary).
    while let Some(i) = find(rest, delim.as_bytes()) {
        parts.push(&rest[..i]);
        rest = &rest[i + delim.len()..];
    }
    assert_eq!(rest, b"--\r\n", "closing delimiter");
    assert!(parts[0].is_empty(), "nothing before the first part");
    let expect = [(0, 9), (500, 599), (LEN - 5, LEN - 1)];
    assert_eq!(parts.len() - 1, expect.len());
    for (part, (a, b)) in parts[1..].iter().zip(expect) {
        let split = find(part, b"\r\n\r\n").unwrap();
        let head = std::str::from_utf8(&part[..split]).unwrap();
        assert!(
            head.contains(&format!("Content-Range: bytes {a}-{b}/{LEN}")),
            "{head}"
        );
        assert!(head.contains("Content-Type: application/octet-stream"));
        assert_eq!(&part[split + 4..], &obj[a..=b]);
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}
