//! RFC 9111 storage rules in the edge cache (issue 15, item 3), over real sockets on
//! 127.0.0.1: `Vary` variants isolate users (also while coalescing), `Accept-Encoding` is
//! normalised, `Vary: *`, `private` and `Set-Cookie` responses are never served to another
//! client, `Authorization` requests are stored only when the response allows it, and the
//! key can keep chosen query parameters only.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{header, Request, Response};
use http_body_util::{Empty, Full};
use hyper::body::Incoming;
use tokio::sync::watch;
use tower::{service_fn, ServiceBuilder};
use tower_patterns::cache::{CacheLayer, CacheLayerBuilder, MemoryStore};
use tower_patterns::proxy::ForwardBuilder;

struct Origin {
    addr: SocketAddr,
    requests: Arc<AtomicU64>,
    gate: watch::Sender<bool>,
}

fn header_str(req: &Request<Incoming>, name: &str) -> String {
    req.headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

/// Answers every path with a body naming what it was asked with; `/slow/...` paths wait
/// for the gate first.
async fn origin() -> Origin {
    let requests = Arc::new(AtomicU64::new(0));
    let (gate, rx) = watch::channel(false);
    let count = requests.clone();
    let addr = spawn_server(service_fn(move |req: Request<Incoming>| {
        let count = count.clone();
        let mut rx = rx.clone();
        async move {
            count.fetch_add(1, Ordering::SeqCst);
            let mut path = req.uri().path().to_owned();
            if let Some(p) = path.strip_prefix("/slow") {
                path = p.to_owned();
                rx.wait_for(|open| *open).await.unwrap();
            }
            let user = header_str(&req, "x-user");
            let res = Response::builder().header(header::CACHE_CONTROL, "max-age=60");
            let (res, body) = match path.as_str() {
                "/vary-user" => (
                    res.header(header::VARY, "X-User"),
                    format!("page of {user}"),
                ),
                "/vary-ae" => (
                    res.header(header::VARY, "accept-encoding"),
                    format!("encoded for {}", header_str(&req, "accept-encoding")),
                ),
                "/vary-star" => (res.header(header::VARY, "*"), format!("star for {user}")),
                "/private" => (
                    Response::builder().header(header::CACHE_CONTROL, "private, max-age=60"),
                    format!("private page of {user}"),
                ),
                "/cookie" => (
                    res.header(header::SET_COOKIE, format!("session={user}")),
                    format!("cookie page of {user}"),
                ),
                "/auth" => (res, format!("auth {}", header_str(&req, "authorization"))),
                "/auth-public" => (
                    Response::builder().header(header::CACHE_CONTROL, "public, max-age=60"),
                    "public page".to_owned(),
                ),
                _ => (res, format!("query {}", req.uri().query().unwrap_or(""))),
            };
            Ok::<_, Infallible>(res.body(Full::new(Bytes::from(body))).unwrap())
        }
    }))
    .await;
    Origin {
        addr,
        requests,
        gate,
    }
}

async fn edge(origin: SocketAddr, cache: CacheLayer) -> SocketAddr {
    let fwd = ForwardBuilder::new(format!("http://{origin}"))
        .build::<Incoming>()
        .unwrap();
    spawn_server(ServiceBuilder::new().layer(cache).service(fwd)).await
}

/// `GET path` with headers; returns `X-Cache` and the body as text.
async fn send(edge: SocketAddr, path: &str, headers: &[(&str, &str)]) -> (String, String) {
    let mut req = Request::get(format!("http://{edge}{path}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let res = client()
        .request(req.body(Empty::<Bytes>::new()).unwrap())
        .await
        .unwrap();
    let xc = res
        .headers()
        .get("x-cache")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let body = read_all(res).await.unwrap();
    (xc, String::from_utf8(body.to_vec()).unwrap())
}

/// Waits (bounded) until the cache stored `n` responses in all.
async fn filled(cache: &CacheLayer, n: u64) {
    for _ in 0..10_000 {
        if cache.stats().snapshot().fills >= n {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("fill did not complete");
}

async fn setup(builder: CacheLayerBuilder) -> (Origin, CacheLayer, SocketAddr) {
    let o = origin().await;
    let cache = builder.build();
    let e = edge(o.addr, cache.clone()).await;
    (o, cache, e)
}

fn store() -> CacheLayerBuilder {
    CacheLayer::builder(MemoryStore::new(16 << 20))
}

#[tokio::test]
async fn vary_keeps_users_apart() {
    let (o, cache, e) = setup(store()).await;
    let ann = [("x-user", "ann")];
    let bob = [("x-user", "bob")];
    assert_eq!(
        send(e, "/vary-user", &ann).await,
        ("MISS".into(), "page of ann".into())
    );
    filled(&cache, 1).await;
    assert_eq!(
        send(e, "/vary-user", &bob).await,
        ("MISS".into(), "page of bob".into())
    );
    filled(&cache, 2).await;
    assert_eq!(
        send(e, "/vary-user", &ann).await,
        ("HIT".into(), "page of ann".into())
    );
    assert_eq!(
        send(e, "/vary-user", &bob).await,
        ("HIT".into(), "page of bob".into())
    );
    assert_eq!(
        send(e, "/vary-user", &[]).await.0,
        "MISS",
        "no header is its own variant"
    );
    assert_eq!(o.requests.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn vary_keeps_users_apart_while_coalescing() {
    let (o, cache, e) = setup(store()).await;
    // Cold key: bob joins ann's fetch before anyone knows the response varies.
    let ann = tokio::spawn(async move { send(e, "/slow/vary-user", &[("x-user", "ann")]).await });
    for _ in 0..10_000 {
        if o.requests.load(Ordering::SeqCst) == 1 {
            break;
        }
        tokio::task::yield_now().await;
    }
    let bob = tokio::spawn(async move { send(e, "/slow/vary-user", &[("x-user", "bob")]).await });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while cache.stats().snapshot().coalesced < 1 {
        assert!(tokio::time::Instant::now() < deadline, "bob never followed");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    o.gate.send_replace(true);
    assert_eq!(ann.await.unwrap().1, "page of ann");
    assert_eq!(
        bob.await.unwrap().1,
        "page of bob",
        "released, asked for its own variant"
    );
    assert_eq!(o.requests.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn accept_encoding_is_normalised() {
    let (o, cache, e) = setup(store()).await;
    let first = send(e, "/vary-ae", &[("accept-encoding", "gzip, br")]).await;
    assert_eq!(first, ("MISS".into(), "encoded for gzip, br".into()));
    filled(&cache, 1).await;
    let same = send(
        e,
        "/vary-ae",
        &[("accept-encoding", "BR,gzip;q=0.9, zstd;q=0")],
    )
    .await;
    assert_eq!(same, ("HIT".into(), "encoded for gzip, br".into()));
    let other = send(e, "/vary-ae", &[("accept-encoding", "gzip")]).await;
    assert_eq!(other, ("MISS".into(), "encoded for gzip".into()));
    assert_eq!(o.requests.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn private_cookie_and_vary_star_are_never_served_to_another_client() {
    let (o, cache, e) = setup(store()).await;
    for (path, text) in [
        ("/private", "private page of"),
        ("/cookie", "cookie page of"),
        ("/vary-star", "star for"),
    ] {
        for user in ["ann", "bob", "ann"] {
            let (xc, body) = send(e, path, &[("x-user", user)]).await;
            assert_eq!((xc.as_str(), body), ("MISS", format!("{text} {user}")));
        }
    }
    assert_eq!(o.requests.load(Ordering::SeqCst), 9);
    assert_eq!(cache.stats().snapshot().fills, 0);
}

#[tokio::test]
async fn authorization_responses_are_shared_only_when_marked() {
    let (o, cache, e) = setup(store()).await;
    let auth = [("authorization", "Bearer ann")];
    assert_eq!(send(e, "/auth", &auth).await.1, "auth Bearer ann");
    assert_eq!(
        send(e, "/auth", &[]).await,
        ("MISS".into(), "auth ".into()),
        "not stored"
    );
    filled(&cache, 1).await;
    assert_eq!(send(e, "/auth", &[]).await.0, "HIT");
    // A request with credentials is never answered from the cache.
    assert_eq!(
        send(e, "/auth", &auth).await,
        ("MISS".into(), "auth Bearer ann".into())
    );
    assert_eq!(o.requests.load(Ordering::SeqCst), 3);
    // `public` allows sharing a response to an authorised request.
    assert_eq!(send(e, "/auth-public", &auth).await.0, "MISS");
    filled(&cache, 2).await;
    assert_eq!(
        send(e, "/auth-public", &[]).await,
        ("HIT".into(), "public page".into())
    );
}

#[tokio::test]
async fn key_can_keep_chosen_query_parameters() {
    let (o, cache, e) = setup(store().key_query_params(["v", "lang"])).await;
    assert_eq!(send(e, "/q?v=1&utm=a&lang=en", &[]).await.0, "MISS");
    filled(&cache, 1).await;
    let (xc, body) = send(e, "/q?lang=en&utm=b&v=1", &[]).await;
    assert_eq!(
        (xc.as_str(), body.as_str()),
        ("HIT", "query v=1&utm=a&lang=en")
    );
    assert_eq!(send(e, "/q?v=2&lang=en", &[]).await.0, "MISS");
    assert_eq!(o.requests.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn purge_reaches_every_variant() {
    let (o, cache, e) = setup(store()).await;
    let ann = [("x-user", "ann")];
    let bob = [("x-user", "bob")];
    send(e, "/vary-user", &ann).await;
    filled(&cache, 1).await;
    send(e, "/vary-user", &bob).await;
    filled(&cache, 2).await;
    assert!(cache.purge(&format!("{e}/vary-user")));
    // Ann's refill writes a new marker: bob's variant from before the purge is gone too.
    assert_eq!(send(e, "/vary-user", &ann).await.0, "MISS");
    filled(&cache, 3).await;
    assert_eq!(
        send(e, "/vary-user", &bob).await,
        ("MISS".into(), "page of bob".into())
    );
    assert_eq!(o.requests.load(Ordering::SeqCst), 4);
}
