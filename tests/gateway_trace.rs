//! `trace::RequestTraceLayer` over real sockets: W3C trace context and `x-request-id`
//! through a two-endpoint balancer that retries, and the access-log event. In its own test
//! binary: the `tracing` subscriber is global.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::body::Body;
use axum::Router;
use http::{HeaderMap, Request, StatusCode};
use tower::ServiceBuilder;
use tower_patterns::balance::{Balance, PassiveHealth, ReplayLayer, Retry};
use tower_patterns::body::ReplayBody;
use tower_patterns::proxy::ForwardBuilder;
use tower_patterns::trace::{RequestTraceLayer, TraceParent};

#[derive(Clone, Default)]
struct Buf(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Buf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The access log of the whole binary.
fn log() -> &'static Buf {
    static LOG: OnceLock<Buf> = OnceLock::new();
    LOG.get_or_init(|| {
        let buf = Buf::default();
        let writer = buf.clone();
        tracing_subscriber::fmt()
            .with_env_filter("tower_patterns::access=info")
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .init();
        buf
    })
}

fn access_lines(request_id: &str) -> Vec<String> {
    let all = String::from_utf8(log().0.lock().unwrap().clone()).unwrap();
    all.lines()
        .filter(|l| l.contains(&format!("request_id=\"{request_id}\"")))
        .map(str::to_owned)
        .collect()
}

/// What an upstream saw: its name, `traceparent`, `tracestate`, `x-request-id`.
type Seen = Arc<Mutex<Vec<(&'static str, HeaderMap)>>>;

async fn serve(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

async fn upstream(name: &'static str, status: StatusCode, seen: Seen) -> SocketAddr {
    serve(Router::new().fallback(move |headers: HeaderMap| {
        seen.lock().unwrap().push((name, headers));
        async move { (status, name) }
    }))
    .await
}

/// A gateway: trace layer, replay, a balancer over "bad" (502) and "good" (200) that
/// retries 502s.
async fn gateway(seen: &Seen) -> (SocketAddr, SocketAddr) {
    let bad = upstream("bad", StatusCode::BAD_GATEWAY, seen.clone()).await;
    let good = upstream("good", StatusCode::OK, seen.clone()).await;
    let template = ForwardBuilder::new(format!("http://{bad}"))
        .build::<ReplayBody<Body>>()
        .unwrap();
    let balance = Balance::builder()
        .health(PassiveHealth::disabled())
        .retry(Retry::default().on("502,fail".parse().unwrap()))
        .build_static([
            ("bad", template.clone()),
            ("good", template.to(&format!("http://{good}")).unwrap()),
        ]);
    let api = ServiceBuilder::new()
        .layer(RequestTraceLayer::new("/api/{*rest}").respond())
        .layer(ReplayLayer::new(64 * 1024).respond())
        .service(balance);
    let app = Router::new().route_service("/api/{*rest}", api);
    (serve(app).await, good)
}

async fn get(
    gw: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> http::Response<hyper::body::Incoming> {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let mut req = Request::get(format!("http://{gw}{path}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    tokio::time::timeout(
        Duration::from_secs(10),
        client.request(req.body(Default::default()).unwrap()),
    )
    .await
    .unwrap()
    .unwrap()
}

const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

#[tokio::test]
async fn each_retry_attempt_is_a_child_span_of_the_callers_trace() {
    log();
    let seen = Seen::default();
    let (gw, good) = gateway(&seen).await;
    // Round robin: of two requests at least one starts on "bad" and is retried on "good".
    for id in ["trace-a", "trace-b"] {
        let res = get(
            gw,
            "/api/orders/7?secret=1",
            &[
                ("traceparent", PARENT),
                ("tracestate", "vendor=x"),
                ("x-request-id", id),
            ],
        )
        .await;
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(
            res.headers()["x-request-id"],
            id,
            "the request id is answered"
        );
    }
    let seen = seen.lock().unwrap();
    // Round robin starts at least one of the two on "bad" (both, when the retry moved the
    // cursor back): 3 or 4 upstream calls.
    assert!((3..=4).contains(&seen.len()), "{}", seen.len());
    let retried = ["trace-a", "trace-b"]
        .into_iter()
        .find(|id| {
            seen.iter()
                .filter(|(_, h)| h["x-request-id"] == *id)
                .count()
                == 2
        })
        .unwrap();
    let attempts: Vec<_> = seen
        .iter()
        .filter(|(_, h)| h["x-request-id"] == retried)
        .collect();
    assert_eq!(attempts[0].0, "bad");
    assert_eq!(attempts[1].0, "good");
    let spans: Vec<TraceParent> = attempts
        .iter()
        .map(|(_, h)| TraceParent::parse(h["traceparent"].as_bytes()).expect("valid traceparent"))
        .collect();
    for (p, (_, h)) in spans.iter().zip(&attempts) {
        assert_eq!(p.trace_id.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_ne!(
            p.parent_id.to_string(),
            "00f067aa0ba902b7",
            "a child, not the caller"
        );
        assert_eq!(p.flags, 1);
        assert_eq!(h["tracestate"], "vendor=x");
    }
    assert_ne!(
        spans[0].parent_id, spans[1].parent_id,
        "one span per attempt"
    );
    drop(seen);

    // One access-log event per request, with the attempts and the endpoint that answered.
    let lines = access_lines(retried);
    assert_eq!(lines.len(), 1, "{lines:?}");
    let line = &lines[0];
    for part in [
        "method=GET".to_string(),
        "route=\"/api/{*rest}\"".to_string(),
        "status=200".to_string(),
        "attempts=2".to_string(),
        format!("upstream=\"{good}\""),
        "trace_id=4bf92f3577b34da6a3ce929d0e0e4736".to_string(),
    ] {
        assert!(line.contains(&part), "{part} missing in {line}");
    }
    assert!(line.contains("duration_ms="), "{line}");
    assert!(!line.contains("secret"), "never the raw path: {line}");
}

#[tokio::test]
async fn a_malformed_traceparent_starts_a_new_trace_and_ids_are_made_when_missing() {
    log();
    let seen = Seen::default();
    let (gw, _) = gateway(&seen).await;
    // Upper-case hex is malformed (W3C: lower case only); its tracestate goes with it.
    let malformed = "00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01";
    let mut ids = Vec::new();
    for _ in 0..2 {
        let res = get(
            gw,
            "/api/x",
            &[("traceparent", malformed), ("tracestate", "vendor=x")],
        )
        .await;
        assert_eq!(res.status(), StatusCode::OK);
        let id = res.headers()["x-request-id"].to_str().unwrap().to_owned();
        assert!(!id.is_empty());
        ids.push(id);
    }
    assert_ne!(ids[0], ids[1], "a new request id per request");
    let seen = seen.lock().unwrap();
    let mut traces = Vec::new();
    for (_, h) in seen.iter() {
        let p = TraceParent::parse(h["traceparent"].as_bytes()).expect("a valid new traceparent");
        assert_ne!(
            p.trace_id.to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736",
            "not the malformed one's trace"
        );
        assert!(
            h.get("tracestate").is_none(),
            "tracestate dropped with its parent"
        );
        assert!(ids.iter().any(|id| h["x-request-id"] == id.as_str()));
        traces.push((h["x-request-id"].clone(), p.trace_id));
    }
    // Same request: same new trace on every attempt; different requests: different traces.
    for (ia, ta) in &traces {
        for (ib, tb) in &traces {
            assert_eq!(ia == ib, ta == tb);
        }
    }
    for id in &ids {
        let lines = access_lines(id);
        assert_eq!(lines.len(), 1, "{lines:?}");
    }
}

#[tokio::test]
async fn an_oversized_or_unprintable_request_id_is_replaced() {
    log();
    let seen = Seen::default();
    let (gw, _) = gateway(&seen).await;
    let long = "a".repeat(200);
    let res = get(gw, "/api/x", &[("x-request-id", &long)]).await;
    let answered = res.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert_ne!(answered, long);
    assert!(answered.len() <= 128);
    let seen = seen.lock().unwrap();
    assert!(seen
        .iter()
        .all(|(_, h)| h["x-request-id"] == answered.as_str()));
}

#[tokio::test]
async fn each_chain_hop_is_a_child_span_of_the_same_trace() {
    use tower_patterns::chain::{ChainLayer, LinkLayer};
    log();
    let seen = Seen::default();
    let primary = upstream("primary", StatusCode::NOT_FOUND, seen.clone()).await;
    let storage = upstream("storage", StatusCode::OK, seen.clone()).await;
    let first = ForwardBuilder::new(format!("http://{primary}"))
        .build::<ReplayBody<Body>>()
        .unwrap();
    let second = first.to(&format!("http://{storage}")).unwrap();
    let statics = ServiceBuilder::new()
        .layer(RequestTraceLayer::new("/static/{*rest}").respond())
        .layer(ChainLayer::new().respond())
        .layer(LinkLayer::new("404".parse().unwrap(), second))
        .service(first);
    let gw = serve(Router::new().route_service("/static/{*rest}", statics)).await;
    let res = get(
        gw,
        "/static/a.png",
        &[("traceparent", PARENT), ("x-request-id", "hop-1")],
    )
    .await;
    assert_eq!(res.status(), StatusCode::OK);
    let seen = seen.lock().unwrap();
    let names: Vec<&str> = seen.iter().map(|(n, _)| *n).collect();
    assert_eq!(names, ["primary", "storage"]);
    let p: Vec<TraceParent> = seen
        .iter()
        .map(|(_, h)| TraceParent::parse(h["traceparent"].as_bytes()).unwrap())
        .collect();
    assert_eq!(p[0].trace_id, p[1].trace_id);
    assert_eq!(
        p[0].trace_id.to_string(),
        "4bf92f3577b34da6a3ce929d0e0e4736"
    );
    assert_ne!(p[0].parent_id, p[1].parent_id, "one span per hop");
    assert!(seen.iter().all(|(_, h)| h["x-request-id"] == "hop-1"));
    drop(seen);
    let lines = access_lines("hop-1");
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("attempts=2"), "{}", lines[0]);
    assert!(
        lines[0].contains(&format!("upstream=\"{storage}\"")),
        "{}",
        lines[0]
    );
}

#[tokio::test]
async fn stacks_under_tower_https_request_id_and_trace_layers() {
    use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
    log();
    let seen = Seen::default();
    let good = upstream("good", StatusCode::OK, seen.clone()).await;
    let forward = ForwardBuilder::new(format!("http://{good}"))
        .build::<Body>()
        .unwrap();
    let x_request_id = http::HeaderName::from_static("x-request-id");
    let api = ServiceBuilder::new()
        .layer(SetRequestIdLayer::new(
            x_request_id.clone(),
            MakeRequestUuid,
        ))
        .layer(PropagateRequestIdLayer::new(x_request_id))
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .layer(RequestTraceLayer::new("/api/{*rest}").respond())
        .service(forward);
    let gw = serve(Router::new().route_service("/api/{*rest}", api)).await;
    let res = get(gw, "/api/x", &[]).await;
    assert_eq!(res.status(), StatusCode::OK);
    let id = res.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert_eq!(id.len(), 36, "tower-http's UUID kept: {id}");
    let seen = seen.lock().unwrap();
    assert_eq!(seen[0].1["x-request-id"], id.as_str());
    assert!(TraceParent::parse(seen[0].1["traceparent"].as_bytes()).is_some());
}

#[tokio::test]
async fn a_request_dropped_before_its_answer_is_logged_as_499() {
    use std::future::Future;
    use tower::ServiceExt;
    let _ = log();
    let never = tower::service_fn(|_r: Request<Body>| {
        std::future::pending::<Result<http::Response<Body>, std::convert::Infallible>>()
    });
    let svc = ServiceBuilder::new()
        .layer(RequestTraceLayer::new("/gone"))
        .service(never);
    let req = Request::get("/gone")
        .header("x-request-id", "gone-1")
        .body(Body::empty())
        .unwrap();
    let mut fut = Box::pin(svc.oneshot(req));
    // Polled once (the request is in the inner service), then the client goes away.
    std::future::poll_fn(|cx| {
        assert!(fut.as_mut().poll(cx).is_pending());
        std::task::Poll::Ready(())
    })
    .await;
    assert!(access_lines("gone-1").is_empty(), "logged before the end");
    drop(fut);
    let lines = access_lines("gone-1");
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("status=499"), "{}", lines[0]);
    assert!(lines[0].contains("route=\"/gone\""), "{}", lines[0]);
}
