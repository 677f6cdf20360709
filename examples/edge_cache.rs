//! An edge cache in front of an origin, all on 127.0.0.1 (seed 004's CDN edge, issue 15):
//! request coalescing, `304` revalidation and a range request, with the origin's own count
//! of requests printed after each step.
//!
//! ```text
//! 1,000 clients ─▶ edge: CacheLayer ─▶ Forward ─▶ origin (counts requests, ETag "v1")
//! ```
//!
//! Run: `cargo run --example edge_cache`

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
use tower_patterns::cache::{CacheLayer, MemoryStore};
use tower_patterns::proxy::ForwardBuilder;
use tower_patterns::server::spawn_local;
use tower_patterns::BoxError;

const SIZE: usize = 1 << 20;

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
                .header(header::CACHE_CONTROL, "max-age=60");
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

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let requests = Arc::new(AtomicU64::new(0));
    let origin = origin(requests.clone()).await?;
    let cache = CacheLayer::new(MemoryStore::new(64 << 20));
    let forward = ForwardBuilder::new(format!("http://{origin}")).build::<Incoming>()?;
    let edge = spawn_local(ServiceBuilder::new().layer(cache.clone()).service(forward))
        .await?
        .addr();
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let get = move |headers: &'static [(&'static str, &'static str)]| {
        let client = client.clone();
        async move {
            let mut req = Request::get(format!("http://{edge}/video.mp4"));
            for (k, v) in headers {
                req = req.header(*k, *v);
            }
            let res = client.request(req.body(Empty::new())?).await?;
            let status = res.status().as_u16();
            let x_cache = res.headers().get("x-cache").cloned();
            let len = res.into_body().collect().await?.to_bytes().len();
            Ok::<_, BoxError>((status, x_cache, len))
        }
    };

    // 1. A thundering herd on a cold key: one origin request, 1,000 full bodies.
    let herd: Vec<_> = (0..1000).map(|_| tokio::spawn(get(&[]))).collect();
    let mut full = 0;
    for h in herd {
        if h.await??.2 == SIZE {
            full += 1;
        }
    }
    let s = cache.stats().snapshot();
    println!(
        "1,000 concurrent misses: {full} full bodies, {} origin request(s), {} coalesced",
        requests.load(Ordering::SeqCst),
        s.coalesced
    );

    // 2. A client that refuses an unchecked copy: revalidated with If-None-Match, 304.
    let (status, x_cache, len) = get(&[("cache-control", "no-cache")]).await?;
    println!(
        "no-cache request: {status} {x_cache:?}, {len} bytes to the client, origin requests now {}",
        requests.load(Ordering::SeqCst)
    );

    // 3. A range of the cached object: 206 from the cache.
    let (status, x_cache, len) = get(&[("range", "bytes=1000-1999")]).await?;
    println!(
        "range request: {status} {x_cache:?}, {len} bytes, origin requests now {}",
        requests.load(Ordering::SeqCst)
    );
    Ok(())
}
