//! Content chain over real sockets: origins, the chain and the client all talk HTTP/1.1 on
//! 127.0.0.1 with ephemeral ports.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tower::ServiceBuilder;
use tower_patterns::body::ReplayBody;
use tower_patterns::chain::{
    ChainHops, ChainLayer, LinkConfigError, LinkLayer, LinkTable, StopReason,
};
use tower_patterns::classify::Condition;
use tower_patterns::proxy::{Forward, ForwardBuilder};

const REPORT: &str = "x-content-chain";

/// A small origin server: serves `files`, answers `/status/NNN` with that status, echoes the
/// body of `/echo` if `/echo` is among its files, and 404 for the rest. Every response
/// names the origin in `x-served-by`. Counts connections and requests, and keeps the last
/// hop-count header it saw.
#[derive(Clone)]
struct Origin {
    addr: SocketAddr,
    conns: Arc<AtomicUsize>,
    hits: Arc<AtomicUsize>,
    last_hops: Arc<Mutex<Option<String>>>,
}

impl Origin {
    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
    fn last_hops(&self) -> Option<String> {
        self.last_hops.lock().unwrap().clone()
    }
}

async fn origin(name: &'static str, files: &'static [(&'static str, &'static str)]) -> Origin {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let o = Origin {
        addr: listener.local_addr().unwrap(),
        conns: Arc::default(),
        hits: Arc::default(),
        last_hops: Arc::default(),
    };
    let state = o.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            state.conns.fetch_add(1, Ordering::SeqCst);
            let state = state.clone();
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let state = state.clone();
                async move {
                    state.hits.fetch_add(1, Ordering::SeqCst);
                    *state.last_hops.lock().unwrap() = req
                        .headers()
                        .get("x-chain-hops")
                        .map(|v| v.to_str().unwrap().to_string());
                    let path = req.uri().path().to_string();
                    let body = req.into_body().collect().await.unwrap().to_bytes();
                    let (status, out) = if let Some(code) = path.strip_prefix("/status/") {
                        let code: u16 = code.parse().unwrap();
                        (
                            StatusCode::from_u16(code).unwrap(),
                            Bytes::from(format!("{name} says {code}")),
                        )
                    } else if let Some((_, content)) = files.iter().find(|(p, _)| *p == path) {
                        if path == "/echo" {
                            (StatusCode::OK, body.clone())
                        } else {
                            (StatusCode::OK, Bytes::from_static(content.as_bytes()))
                        }
                    } else {
                        (
                            StatusCode::NOT_FOUND,
                            Bytes::from(format!(
                                "{name}: {path} not found ({} bytes read)",
                                body.len()
                            )),
                        )
                    };
                    Ok::<_, Infallible>(
                        Response::builder()
                            .status(status)
                            .header("x-served-by", name)
                            .header("etag", format!("\"{name}-{}\"", out.len()))
                            .body(Full::new(out))
                            .unwrap(),
                    )
                }
            });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    o
}

/// An address where nothing listens: connecting is refused.
async fn closed_port() -> String {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    format!("http://{addr}")
}

type Link = Forward<ReplayBody<Incoming>>;

fn fwd(url: &str) -> Link {
    ForwardBuilder::new(url).build().unwrap()
}

fn cond(s: &str) -> Condition {
    s.parse().unwrap()
}

fn report_layer() -> ChainLayer {
    ChainLayer::new().report_header(HeaderName::from_static(REPORT))
}

/// Serves `svc` on an ephemeral port.
async fn serve<S, B>(svc: S) -> SocketAddr
where
    S: tower::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<tower_patterns::BoxError>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<tower_patterns::BoxError>,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(tower_patterns::server::serve(listener, svc));
    addr
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Reply {
    fn served_by(&self) -> &str {
        self.headers
            .get("x-served-by")
            .map(|v| v.to_str().unwrap())
            .unwrap_or("")
    }
    fn report(&self) -> &str {
        self.headers
            .get(REPORT)
            .map(|v| v.to_str().unwrap())
            .unwrap_or("")
    }
}

fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

async fn send(
    addr: SocketAddr,
    method: Method,
    host: &str,
    path: &str,
    body: impl Into<Bytes>,
    headers: &[(&str, &str)],
) -> Reply {
    let mut req = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .header("host", host);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let res = client()
        .request(req.body(Full::new(body.into())).unwrap())
        .await
        .unwrap();
    let status = res.status();
    let headers = res.headers().clone();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    Reply {
        status,
        headers,
        body,
    }
}

async fn get(addr: SocketAddr, host: &str, path: &str) -> Reply {
    send(addr, Method::GET, host, path, Bytes::new(), &[]).await
}

/// foo.com (storage) -> bar.com (origin) on `condition`, served on a socket.
async fn two_links(
    storage: &Origin,
    origin_url: &str,
    condition: &str,
    configure: impl FnOnce(
        tower_patterns::chain::LinkTableBuilder<Incoming>,
    ) -> tower_patterns::chain::LinkTableBuilder<Incoming>,
) -> SocketAddr {
    let table = configure(
        LinkTable::builder()
            .vhost("foo.com", fwd(&storage.url()))
            .vhost("bar.com", fwd(origin_url))
            .link("foo.com", cond(condition), "bar.com")
            .chain(report_layer()),
    )
    .build()
    .unwrap();
    serve(table).await
}

const STORAGE_FILES: &[(&str, &str)] = &[("/a.txt", "a from storage")];
const ORIGIN_FILES: &[(&str, &str)] = &[
    ("/a.txt", "a from origin"),
    ("/b.txt", "b from origin"),
    ("/echo", ""),
];

#[tokio::test]
async fn seed_scenario_storage_then_origin_on_404() {
    let storage = origin("storage", STORAGE_FILES).await;
    let ext = origin("origin", ORIGIN_FILES).await;
    let front = two_links(&storage, &ext.url(), "404", |b| b).await;

    let hit = get(front, "foo.com", "/a.txt").await;
    assert_eq!(hit.status, StatusCode::OK);
    assert_eq!(hit.body, "a from storage");
    assert_eq!(hit.served_by(), "storage");
    assert_eq!(hit.report(), "foo.com");
    assert_eq!(
        ext.hits(),
        0,
        "the origin is not asked for what storage has"
    );
    assert_eq!(storage.last_hops().as_deref(), Some("1"));

    let miss = get(front, "foo.com", "/b.txt").await;
    assert_eq!(miss.status, StatusCode::OK);
    assert_eq!(miss.body, "b from origin");
    assert_eq!(miss.served_by(), "origin");
    assert_eq!(miss.report(), "foo.com+bar.com");
    // Each request the chain sends counts one hop.
    assert_eq!(ext.last_hops().as_deref(), Some("2"));

    // Host matching ignores case, port and a trailing dot.
    let miss = get(front, "FOO.Com.:8080", "/b.txt").await;
    assert_eq!(miss.served_by(), "origin");
    // bar.com is a host in its own right.
    let direct = get(front, "bar.com", "/a.txt").await;
    assert_eq!(direct.body, "a from origin");
    assert_eq!(direct.report(), "bar.com");
}

#[tokio::test]
async fn condition_exact_status_list() {
    let storage = origin("storage", STORAGE_FILES).await;
    let ext = origin("origin", ORIGIN_FILES).await;
    let front = two_links(&storage, &ext.url(), "403,404", |b| b).await;

    for (path, served_by) in [
        ("/status/403", "origin"),
        ("/status/404", "origin"),
        ("/status/410", "storage"),
        ("/status/500", "storage"),
        ("/a.txt", "storage"),
    ] {
        let r = get(front, "foo.com", path).await;
        assert_eq!(r.served_by(), served_by, "{path}");
    }
}

#[tokio::test]
async fn condition_status_classes() {
    let storage = origin("storage", STORAGE_FILES).await;
    let ext = origin("origin", ORIGIN_FILES).await;
    let four = two_links(&storage, &ext.url(), "4xx", |b| b).await;
    let five = two_links(&storage, &ext.url(), "5xx", |b| b).await;

    for (front, path, served_by) in [
        (four, "/status/400", "origin"),
        (four, "/status/451", "origin"),
        (four, "/status/500", "storage"),
        (four, "/status/302", "storage"),
        (five, "/status/500", "origin"),
        (five, "/status/503", "origin"),
        (five, "/status/404", "storage"),
    ] {
        let r = get(front, "foo.com", path).await;
        assert_eq!(r.served_by(), served_by, "{path}");
    }
    // The origin answers /status/NNN with the same status: the client sees its answer.
    let r = get(five, "foo.com", "/status/503").await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.body, "origin says 503");
    assert_eq!(r.report(), "foo.com+bar.com");
}

#[tokio::test]
async fn condition_fail_hops_when_the_first_link_is_down() {
    let ext = origin("origin", ORIGIN_FILES).await;
    let down = closed_port().await;
    let build = |condition: &str| {
        LinkTable::builder()
            .vhost("foo.com", fwd(&down))
            .vhost("bar.com", fwd(&ext.url()))
            .link("foo.com", cond(condition), "bar.com")
            .chain(report_layer())
            .build()
            .unwrap()
    };
    let fail = serve(build("fail")).await;
    let combined = serve(build("5xx,fail")).await;
    let only_404 = serve(build("404")).await;

    for front in [fail, combined] {
        let r = get(front, "foo.com", "/b.txt").await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.body, "b from origin");
        assert_eq!(r.report(), "foo.com+bar.com");
    }
    // `fail` is not in the condition: the error ends the chain as 502, with the trail.
    let r = get(only_404, "foo.com", "/b.txt").await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert_eq!(r.report(), "foo.com");
    assert_eq!(ext.hits(), 2);
}

#[tokio::test]
async fn combined_condition_covers_statuses_and_errors() {
    let storage = origin("storage", STORAGE_FILES).await;
    let ext = origin("origin", ORIGIN_FILES).await;
    let front = two_links(&storage, &ext.url(), "5xx,fail", |b| b).await;
    assert_eq!(
        get(front, "foo.com", "/status/502").await.served_by(),
        "origin"
    );
    assert_eq!(
        get(front, "foo.com", "/status/404").await.served_by(),
        "storage"
    );
}

#[tokio::test]
async fn four_links_are_followed_in_order_with_each_links_condition() {
    let a = origin("a", &[]).await;
    let b = origin("b", &[("/x", "x from b")]).await;
    let c = origin("c", &[]).await;
    let d = origin("d", &[("/deep", "deep from d")]).await;
    let table = LinkTable::builder()
        .vhost("a.com", fwd(&a.url()))
        .vhost("b.com", fwd(&b.url()))
        .vhost("c.com", fwd(&c.url()))
        .vhost("d.com", fwd(&d.url()))
        .link("a.com", cond("404"), "b.com")
        .link("b.com", cond("4xx"), "c.com")
        .link("c.com", cond("404,5xx"), "d.com")
        .chain(report_layer())
        .build()
        .unwrap();
    assert_eq!(
        table.route("A.com"),
        Some(vec!["a.com", "b.com", "c.com", "d.com"])
    );
    let front = serve(table).await;

    let r = get(front, "a.com", "/deep").await;
    assert_eq!(r.body, "deep from d");
    assert_eq!(r.report(), "a.com+b.com+c.com+d.com");
    // The hop count grows by one per link.
    assert_eq!(d.last_hops().as_deref(), Some("4"));

    // b has /x: the chain stops there.
    let r = get(front, "a.com", "/x").await;
    assert_eq!(r.body, "x from b");
    assert_eq!(r.report(), "a.com+b.com");

    // a -> b on 404 only: a's 500 is final, b is not asked.
    let before = b.hits();
    let r = get(front, "a.com", "/status/500").await;
    assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(r.report(), "a.com");
    assert_eq!(b.hits(), before);

    // Entering the chain in the middle: c.com -> d.com.
    let r = get(front, "c.com", "/deep").await;
    assert_eq!(r.report(), "c.com+d.com");
}

#[tokio::test]
async fn last_links_answer_reaches_the_client_unchanged() {
    let a = origin("a", &[]).await;
    let b = origin("b", &[]).await;
    let c = origin("c", &[]).await;
    let table = LinkTable::builder()
        .vhost("a.com", fwd(&a.url()))
        .vhost("b.com", fwd(&b.url()))
        .vhost("c.com", fwd(&c.url()))
        .link("a.com", cond("404"), "b.com")
        .link("b.com", cond("404"), "c.com")
        .chain(report_layer())
        .build()
        .unwrap();
    let front = serve(table).await;
    let r = get(front, "a.com", "/nowhere").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.body, "c: /nowhere not found (0 bytes read)");
    assert_eq!(r.served_by(), "c");
    let expected_etag = format!("\"c-{}\"", r.body.len());
    assert_eq!(r.headers["etag"], expected_etag.as_str());
    assert_eq!(r.report(), "a.com+b.com+c.com");
    assert_eq!((a.hits(), b.hits(), c.hits()), (1, 1, 1));
}

type OkFuture = std::future::Ready<Result<Response<Full<Bytes>>, Infallible>>;

fn ok_handler(_req: Request<ReplayBody<Incoming>>) -> OkFuture {
    std::future::ready(Ok(Response::new(Full::new(Bytes::new()))))
}

type OkFn = fn(Request<ReplayBody<Incoming>>) -> OkFuture;

fn ok_service() -> tower::util::ServiceFn<OkFn> {
    tower::service_fn(ok_handler as fn(_) -> _)
}

#[test]
fn broken_link_configurations_are_refused_naming_the_hosts() {
    let err = LinkTable::<Incoming>::builder()
        .vhost("foo.com", ok_service())
        .link("foo.com", cond("404"), "nowhere.com")
        .build()
        .unwrap_err();
    assert_eq!(
        err,
        LinkConfigError::MissingTarget {
            host: "foo.com".into(),
            target: "nowhere.com".into()
        }
    );
    assert_eq!(
        err.to_string(),
        "virtual host \"foo.com\" links to \"nowhere.com\", which does not exist"
    );

    let err = LinkTable::<Incoming>::builder()
        .vhost("foo.com", ok_service())
        .link("foo.com", cond("404"), "FOO.com")
        .build()
        .unwrap_err();
    assert_eq!(
        err,
        LinkConfigError::SelfLink {
            host: "foo.com".into()
        }
    );

    let err = LinkTable::<Incoming>::builder()
        .vhost("foo.com", ok_service())
        .vhost("bar.com", ok_service())
        .link("foo.com", cond("404"), "bar.com")
        .link("bar.com", cond("404"), "foo.com")
        .build()
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "recursive virtual host link: foo.com -> bar.com -> foo.com"
    );

    // A longer cycle entered from a host outside it: the whole cycle is named.
    let err = LinkTable::<Incoming>::builder()
        .vhost("entry.com", ok_service())
        .vhost("a.com", ok_service())
        .vhost("b.com", ok_service())
        .vhost("c.com", ok_service())
        .link("entry.com", cond("404"), "a.com")
        .link("a.com", cond("404"), "b.com")
        .link("b.com", cond("5xx"), "c.com")
        .link("c.com", cond("fail"), "a.com")
        .build()
        .unwrap_err();
    assert_eq!(
        err,
        LinkConfigError::RecursiveLink {
            cycle: vec![
                "a.com".into(),
                "b.com".into(),
                "c.com".into(),
                "a.com".into()
            ]
        }
    );

    let err = LinkTable::<Incoming>::builder()
        .vhost("foo.com", ok_service())
        .vhost("Foo.com", ok_service())
        .build()
        .unwrap_err();
    assert!(
        matches!(err, LinkConfigError::DuplicateHost { .. }),
        "{err}"
    );

    let err = LinkTable::<Incoming>::builder()
        .vhost("foo.com", ok_service())
        .vhost("bar.com", ok_service())
        .link("ghost.com", cond("404"), "bar.com")
        .build()
        .unwrap_err();
    assert!(matches!(err, LinkConfigError::UnknownHost { .. }), "{err}");

    let err = LinkTable::<Incoming>::builder()
        .vhost("foo.com", ok_service())
        .vhost("bar.com", ok_service())
        .link("foo.com", cond("404"), "bar.com")
        .link("foo.com", cond("5xx"), "bar.com")
        .build()
        .unwrap_err();
    assert!(
        matches!(err, LinkConfigError::DuplicateLink { .. }),
        "{err}"
    );

    let err = LinkTable::<Incoming>::builder()
        .vhost("foo.com:80", ok_service())
        .build()
        .unwrap_err();
    assert!(matches!(err, LinkConfigError::InvalidHost { .. }), "{err}");

    let err = LinkTable::<Incoming>::builder()
        .vhost("foo.com", ok_service())
        .default_vhost("bar.com")
        .build()
        .unwrap_err();
    assert!(
        matches!(err, LinkConfigError::MissingDefault { .. }),
        "{err}"
    );
}

#[tokio::test]
async fn request_body_within_the_limit_is_replayed_to_the_next_link() {
    let storage = origin("storage", STORAGE_FILES).await;
    let ext = origin("origin", ORIGIN_FILES).await;
    let front = two_links(&storage, &ext.url(), "404", |b| {
        b.chain(report_layer().replay_limit(4096))
    })
    .await;
    let payload = Bytes::from(vec![b'x'; 3000]);
    let r = send(front, Method::PUT, "foo.com", "/echo", payload.clone(), &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body, payload, "the origin got the whole body again");
    assert_eq!(r.report(), "foo.com+bar.com");
}

#[tokio::test]
async fn request_body_over_the_limit_stops_the_chain_at_the_first_link() {
    let storage = origin("storage", STORAGE_FILES).await;
    let ext = origin("origin", ORIGIN_FILES).await;
    let front = two_links(&storage, &ext.url(), "404", |b| {
        b.chain(report_layer().replay_limit(1024))
    })
    .await;
    let payload = Bytes::from(vec![b'y'; 5000]);
    let r = send(front, Method::PUT, "foo.com", "/echo", payload, &[]).await;
    // Storage's own 404, with the whole body delivered to it (never truncated).
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.body, "storage: /echo not found (5000 bytes read)");
    assert_eq!(r.report(), "foo.com; stopped=body-over-limit");
    assert_eq!(ext.hits(), 0);
}

#[tokio::test]
async fn post_hops_only_when_configured() {
    let storage = origin("storage", STORAGE_FILES).await;
    let ext = origin("origin", ORIGIN_FILES).await;
    let strict = two_links(&storage, &ext.url(), "404", |b| b).await;
    let lenient = two_links(&storage, &ext.url(), "404", |b| b.non_idempotent(true)).await;

    let r = send(strict, Method::POST, "foo.com", "/echo", "form=1", &[]).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.served_by(), "storage");
    assert_eq!(r.report(), "foo.com; stopped=non-idempotent");
    assert_eq!(ext.hits(), 0);

    let r = send(lenient, Method::POST, "foo.com", "/echo", "form=1", &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body, "form=1");
    assert_eq!(r.report(), "foo.com+bar.com");

    // PUT and DELETE are idempotent: they hop without the option.
    let r = send(strict, Method::PUT, "foo.com", "/echo", "put", &[]).await;
    assert_eq!(r.body, "put");
}

#[tokio::test]
async fn post_hops_when_the_first_link_could_not_be_reached() {
    let ext = origin("origin", ORIGIN_FILES).await;
    let table = LinkTable::builder()
        .vhost("foo.com", fwd(&closed_port().await))
        .vhost("bar.com", fwd(&ext.url()))
        .link("foo.com", cond("fail"), "bar.com")
        .chain(report_layer())
        .build()
        .unwrap();
    let front = serve(table).await;
    // Connecting was refused, so the POST never left: sending it elsewhere is safe.
    let r = send(front, Method::POST, "foo.com", "/echo", "once", &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body, "once");
}

#[tokio::test]
async fn loop_guard_answers_508_without_forwarding() {
    let storage = origin("storage", STORAGE_FILES).await;
    let ext = origin("origin", ORIGIN_FILES).await;
    let front = two_links(&storage, &ext.url(), "404", |b| {
        b.chain(report_layer().max_hops(3))
    })
    .await;

    let r = send(
        front,
        Method::GET,
        "foo.com",
        "/a.txt",
        "",
        &[("x-chain-hops", "4")],
    )
    .await;
    assert_eq!(r.status, StatusCode::LOOP_DETECTED);
    assert_eq!(storage.hits(), 0);

    // At the limit it still passes, counted on.
    let r = send(
        front,
        Method::GET,
        "foo.com",
        "/a.txt",
        "",
        &[("x-chain-hops", "3")],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(storage.last_hops().as_deref(), Some("4"));

    // Garbage is ignored and replaced by a valid count; an absurdly large number is a loop.
    let r = send(
        front,
        Method::GET,
        "foo.com",
        "/a.txt",
        "",
        &[("x-chain-hops", "many")],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(storage.last_hops().as_deref(), Some("1"));
    let r = send(
        front,
        Method::GET,
        "foo.com",
        "/a.txt",
        "",
        &[("x-chain-hops", "99999999999999999999")],
    )
    .await;
    assert_eq!(r.status, StatusCode::LOOP_DETECTED);
}

/// Two processes (two chains) that link to each other by mistake: the hop count stops the
/// ping-pong with 508 after a bounded number of requests.
#[tokio::test]
async fn loop_between_two_chains_ends_with_508() {
    let empty_a = origin("empty-a", &[]).await;
    let empty_b = origin("empty-b", &[]).await;
    // B's address is needed by A and A's by B: bind both listeners first.
    let la = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let lb = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (addr_a, addr_b) = (la.local_addr().unwrap(), lb.local_addr().unwrap());
    let table = |local: &Origin, peer: SocketAddr| {
        LinkTable::builder()
            .vhost("loop.com", fwd(&local.url()))
            .vhost("peer.com", fwd(&format!("http://{peer}")))
            .link("loop.com", cond("404"), "peer.com")
            .chain(report_layer().max_hops(6))
            .build()
            .unwrap()
    };
    tokio::spawn(tower_patterns::server::serve(la, table(&empty_a, addr_b)));
    tokio::spawn(tower_patterns::server::serve(lb, table(&empty_b, addr_a)));

    let r = get(addr_a, "loop.com", "/x").await;
    assert_eq!(r.status, StatusCode::LOOP_DETECTED);
    // Each process adds 2 (its first link and the hop): 0 -> A(1,2) -> B(3,4) -> A(5,6)
    // -> B sees 6 (passes: at the limit) sends 7, 8 -> A sees 8 > 6: 508.
    assert_eq!(empty_a.hits() + empty_b.hits(), 4);
}

#[tokio::test]
async fn unknown_host_is_misdirected_unless_a_default_is_set() {
    let storage = origin("storage", STORAGE_FILES).await;
    let ext = origin("origin", ORIGIN_FILES).await;
    let strict = two_links(&storage, &ext.url(), "404", |b| b).await;
    let r = get(strict, "elsewhere.org", "/a.txt").await;
    assert_eq!(r.status, StatusCode::MISDIRECTED_REQUEST);
    let r = get(strict, "", "/a.txt").await;
    assert_eq!(r.status, StatusCode::MISDIRECTED_REQUEST);
    assert_eq!(storage.hits() + ext.hits(), 0);

    // HTTP/1.0 without a Host header: nothing to route on.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut raw = tokio::net::TcpStream::connect(strict).await.unwrap();
        raw.write_all(b"GET /a.txt HTTP/1.0\r\n\r\n").await.unwrap();
        let mut answer = Vec::new();
        raw.read_to_end(&mut answer).await.unwrap();
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.0 400"), "{answer}");
    }

    let with_default = two_links(&storage, &ext.url(), "404", |b| b.default_vhost("foo.com")).await;
    let r = get(with_default, "elsewhere.org", "/b.txt").await;
    assert_eq!(r.body, "b from origin");
    assert_eq!(r.report(), "foo.com+bar.com");
}

/// The typed form: links stacked with `ServiceBuilder`, all `Forward`s, no boxing.
#[tokio::test]
async fn typed_layers_compose_with_service_builder() {
    let a = origin("a", &[]).await;
    let b = origin("b", &[("/b", "from b")]).await;
    let c = origin("c", &[("/c", "from c")]).await;
    let svc = ServiceBuilder::new()
        .layer(report_layer())
        .layer(LinkLayer::new(cond("5xx,404"), fwd(&c.url())).names("b", "c"))
        .layer(LinkLayer::new(cond("404"), fwd(&b.url())).names("a", "b"))
        .service(fwd(&a.url()));
    let front = serve(svc).await;

    let r = get(front, "any", "/c").await;
    assert_eq!(r.body, "from c");
    assert_eq!(r.report(), "a+b+c");
    let r = get(front, "any", "/b").await;
    assert_eq!(r.body, "from b");
    assert_eq!(r.report(), "a+b");
    // a's 500 does not match a's link (404): final, even though b's link would take a 5xx.
    let r = get(front, "any", "/status/500").await;
    assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(r.served_by(), "a");
    assert_eq!(r.report(), "a");
    assert_eq!(c.hits(), 1);
}

/// The trail is also a response extension, with each hop's result.
#[tokio::test]
async fn trail_extension_lists_hops_with_results() {
    use tower::ServiceExt;
    let storage = origin("storage", STORAGE_FILES).await;
    let ext = origin("origin", ORIGIN_FILES).await;
    let svc = ServiceBuilder::new()
        .layer(ChainLayer::new().replay_limit(8))
        .layer(LinkLayer::new(cond("404"), fwd(&ext.url())).names("foo.com", "bar.com"))
        .service(fwd(&storage.url()));
    // Extensions do not cross the socket: record them in a wrapper on the server side.
    let seen: Arc<Mutex<Option<ChainHops>>> = Arc::default();
    let seen2 = seen.clone();
    let recording = svc.map_response(move |res| {
        *seen2.lock().unwrap() = res.extensions().get::<ChainHops>().cloned();
        res
    });
    let front = serve(recording).await;
    let r = get(front, "foo.com", "/b.txt").await;
    assert_eq!(r.status, StatusCode::OK);
    let hops = seen.lock().unwrap().clone().unwrap();
    assert_eq!(hops.names(), ["foo.com", "bar.com"]);
    let results: Vec<String> = hops.iter().map(|h| h.result().to_string()).collect();
    assert_eq!(results, ["404", "200"]);
    assert_eq!(hops.stopped(), None);

    let r = send(
        front,
        Method::PUT,
        "foo.com",
        "/echo",
        "longer than eight",
        &[],
    )
    .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let hops = seen.lock().unwrap().clone().unwrap();
    assert_eq!(hops.stopped(), Some(StopReason::BodyOverLimit));
}

/// A skipped link's body is read out in the background, so its keep-alive connection goes
/// back to the pool: many hops reuse a handful of connections instead of one each.
#[tokio::test]
async fn skipped_bodies_do_not_leak_connections() {
    let storage = origin("storage", STORAGE_FILES).await;
    let ext = origin("origin", ORIGIN_FILES).await;
    let front = two_links(&storage, &ext.url(), "404", |b| b).await;
    let n = 40;
    for _ in 0..n {
        let r = get(front, "foo.com", "/b.txt").await;
        assert_eq!(r.body, "b from origin");
    }
    let conns = storage.conns.load(Ordering::SeqCst);
    assert!(
        conns <= 4,
        "{conns} connections to the skipped link for {n} sequential requests"
    );
}

/// The discarded body of a skipped link is dropped, observed directly with an in-process
/// link whose body reports its drop.
#[tokio::test]
async fn skipped_body_is_dropped() {
    use std::pin::Pin;
    use std::task::{Context, Poll};
    use tower::ServiceExt;

    struct Watched(Option<tokio::sync::oneshot::Sender<()>>, Option<Bytes>);
    impl http_body::Body for Watched {
        type Data = Bytes;
        type Error = Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
            Poll::Ready(self.1.take().map(|b| Ok(http_body::Frame::data(b))))
        }
        fn size_hint(&self) -> http_body::SizeHint {
            http_body::SizeHint::with_exact(self.1.as_ref().map_or(0, |b| b.len() as u64))
        }
    }
    impl Drop for Watched {
        fn drop(&mut self) {
            if let Some(tx) = self.0.take() {
                let _ = tx.send(());
            }
        }
    }

    for (drain_limit, label) in [(64 * 1024, "drained"), (0, "dropped at once")] {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let tx = Arc::new(Mutex::new(Some(tx)));
        let primary = tower::service_fn(move |_req: Request<ReplayBody<Full<Bytes>>>| {
            let tx = tx.lock().unwrap().take();
            async move {
                let mut res = Response::new(Watched(tx, Some(Bytes::from_static(b"gone"))));
                *res.status_mut() = StatusCode::NOT_FOUND;
                Ok::<_, Infallible>(res)
            }
        });
        let next = tower::service_fn(|_req: Request<ReplayBody<Full<Bytes>>>| async {
            Ok::<_, Infallible>(Response::new(Watched(
                None,
                Some(Bytes::from_static(b"ok")),
            )))
        });
        let svc = ServiceBuilder::new()
            .layer(ChainLayer::new())
            .layer(
                LinkLayer::new(cond("404"), next)
                    .drain(drain_limit, std::time::Duration::from_secs(1)),
            )
            .service(primary);
        let res = svc
            .oneshot(Request::new(Full::new(Bytes::new())))
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        // Resolves only when the skipped body was dropped (the sender goes with it).
        tokio::time::timeout(std::time::Duration::from_secs(5), rx)
            .await
            .unwrap_or_else(|_| panic!("skipped body not {label}"))
            .unwrap();
        let body = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "ok");
    }
}

/// A custom hop header is used by the edge and by every link.
#[tokio::test]
async fn custom_hop_header_is_counted_by_every_link() {
    use tower::ServiceExt;
    type Req = Request<ReplayBody<Full<Bytes>>>;
    // Answers 404 with the hop count it saw in the body.
    let seen = |req: Req| async move {
        let hops = req.headers().get("x-hops").cloned();
        let body = hops.map(|v| Bytes::copy_from_slice(v.as_bytes()));
        let mut res = Response::new(Full::new(body.unwrap_or_default()));
        *res.status_mut() = StatusCode::NOT_FOUND;
        assert!(!req.headers().contains_key("x-chain-hops"));
        Ok::<_, Infallible>(res)
    };
    let svc = ServiceBuilder::new()
        .layer(
            ChainLayer::new()
                .hop_header(HeaderName::from_static("x-hops"))
                .max_hops(5),
        )
        .layer(LinkLayer::new(cond("404"), tower::service_fn(seen)))
        .layer(LinkLayer::new(cond("404"), tower::service_fn(seen)))
        .service(tower::service_fn(seen));
    let req = |hops: &str| {
        Request::get("/")
            .header("x-hops", hops)
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    let res = svc.clone().oneshot(req("2")).await.unwrap();
    let trail = res.extensions().get::<ChainHops>().unwrap().clone();
    assert_eq!(trail.len(), 3);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "5", "third link sees 2 + 3");
    let res = svc.oneshot(req("6")).await.unwrap();
    assert_eq!(res.status(), StatusCode::LOOP_DETECTED);
}
