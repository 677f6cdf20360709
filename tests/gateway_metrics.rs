//! `telemetry::MetricsLayer` (feature `metrics`) over real sockets, read back through
//! `metrics-util`'s `DebuggingRecorder`; bulkhead rejections counted.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::routing::get;
use axum::Router;
use http::{Request, StatusCode};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use tokio::sync::Notify;
use tower::{ServiceBuilder, ServiceExt};
use tower_patterns::bulkhead::BulkheadLayer;
use tower_patterns::proxy::ForwardBuilder;
use tower_patterns::telemetry::{MetricsLayer, DURATION, FAILURES, IN_FLIGHT, REQUESTS};

async fn serve(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

/// Everything recorded so far, as `Kind:name{labels sorted}` -> value. A snapshot drains
/// counters, gauges and histograms, so `into` accumulates them across snapshots.
fn read_into(snap: &Snapshotter, into: &mut HashMap<String, DebugValue>) {
    for (k, v) in read(snap) {
        match (into.get_mut(&k), v) {
            (Some(DebugValue::Counter(a)), DebugValue::Counter(b)) => *a += b,
            (Some(DebugValue::Histogram(a)), DebugValue::Histogram(b)) => a.extend(b),
            (Some(DebugValue::Gauge(a)), DebugValue::Gauge(b)) => {
                *a = (a.into_inner() + b.into_inner()).into()
            }
            (_, v) => {
                into.insert(k, v);
            }
        }
    }
}

fn read(snap: &Snapshotter) -> HashMap<String, DebugValue> {
    snap.snapshot()
        .into_vec()
        .into_iter()
        .map(|(ck, _, _, v)| {
            let (kind, key) = ck.into_parts();
            let mut labels: Vec<String> = key
                .labels()
                .map(|l| format!("{}={}", l.key(), l.value()))
                .collect();
            labels.sort();
            let k = format!("{:?}:{}{{{}}}", kind, key.name(), labels.join(","));
            (k, v)
        })
        .collect()
}

fn counter(m: &HashMap<String, DebugValue>, key: &str) -> u64 {
    match m.get(key) {
        Some(DebugValue::Counter(n)) => *n,
        other => panic!("{key}: {other:?} in {:#?}", m.keys().collect::<Vec<_>>()),
    }
}

fn gauge(m: &HashMap<String, DebugValue>, key: &str) -> f64 {
    match m.get(key) {
        Some(DebugValue::Gauge(n)) => n.into_inner(),
        other => panic!("{key}: {other:?}"),
    }
}

async fn call(gw: SocketAddr, path: &str) -> StatusCode {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let req = Request::get(format!("http://{gw}{path}"))
        .body(Default::default())
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .unwrap()
        .unwrap()
        .status()
}

#[tokio::test]
async fn requests_failures_latency_and_in_flight_per_route_with_bounded_labels() {
    let recorder = DebuggingRecorder::new();
    let snap = recorder.snapshotter();
    let release = Arc::new(Notify::new());
    let arrived = Arc::new(Notify::new());
    let (release2, arrived2) = (release.clone(), arrived.clone());
    let upstream = serve(
        Router::new()
            .route("/orders/ok/{n}", get(|| async { "ok" }))
            .route("/orders/missing", get(|| async { StatusCode::NOT_FOUND }))
            .route(
                "/orders/fail",
                get(|| async { StatusCode::SERVICE_UNAVAILABLE }),
            )
            .route(
                "/orders/slow",
                get(move || {
                    let (r, a) = (release2.clone(), arrived2.clone());
                    async move {
                        a.notify_one();
                        r.notified().await;
                        "slow"
                    }
                }),
            ),
    )
    .await;
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    // Handles are registered when the layers are built: with the recorder in place.
    let (orders, down) = metrics::with_local_recorder(&recorder, || {
        (MetricsLayer::new("orders"), MetricsLayer::new("down"))
    });
    let forward = ForwardBuilder::new(format!("http://{upstream}"))
        .build::<Body>()
        .unwrap();
    let dead = ForwardBuilder::new(format!("http://{closed}"))
        .build::<Body>()
        .unwrap();
    let app = Router::new()
        .route_service(
            "/orders/{*rest}",
            ServiceBuilder::new()
                .layer(orders.respond())
                .service(forward),
        )
        .route_service(
            "/down/{*rest}",
            ServiceBuilder::new().layer(down.respond()).service(dead),
        );
    let gw = serve(app).await;

    // 200s under many different raw paths and queries, a 404 (a success for "5xx,fail"),
    // two 503s, one refused connection on the other route.
    for n in 0..3 {
        assert_eq!(
            call(gw, &format!("/orders/ok/{n}?q={n}")).await,
            StatusCode::OK
        );
    }
    assert_eq!(call(gw, "/orders/missing").await, StatusCode::NOT_FOUND);
    for _ in 0..2 {
        assert_eq!(
            call(gw, "/orders/fail").await,
            StatusCode::SERVICE_UNAVAILABLE
        );
    }
    assert_eq!(call(gw, "/down/x").await, StatusCode::BAD_GATEWAY);

    // One request held at the upstream: in flight 1.
    let slow = tokio::spawn(call(gw, "/orders/slow"));
    tokio::time::timeout(Duration::from_secs(10), arrived.notified())
        .await
        .unwrap();
    let mut m = HashMap::new();
    read_into(&snap, &mut m);
    assert_eq!(
        gauge(&m, &format!("Gauge:{IN_FLIGHT}{{route=orders}}")),
        1.0
    );
    release.notify_one();
    assert_eq!(slow.await.unwrap(), StatusCode::OK);
    read_into(&snap, &mut m);
    assert_eq!(
        counter(&m, &format!("Counter:{REQUESTS}{{route=orders}}")),
        7
    );
    assert_eq!(
        counter(
            &m,
            &format!("Counter:{FAILURES}{{kind=status,route=orders}}")
        ),
        2
    );
    assert_eq!(counter(&m, &format!("Counter:{REQUESTS}{{route=down}}")), 1);
    assert_eq!(
        counter(
            &m,
            &format!("Counter:{FAILURES}{{kind=transport,route=down}}")
        ),
        1
    );
    assert_eq!(
        gauge(&m, &format!("Gauge:{IN_FLIGHT}{{route=orders}}")),
        0.0
    );
    match m.get(&format!("Histogram:{DURATION}{{route=orders}}")) {
        Some(DebugValue::Histogram(v)) => {
            assert_eq!(v.len(), 7, "{v:?}");
            assert!(
                !v.is_empty() && v.iter().all(|s| s.into_inner() >= 0.0),
                "{v:?}"
            )
        }
        other => panic!("{other:?}"),
    }
    // Bounded cardinality: the series are the fixed set, whatever paths the clients sent.
    let mut keys: Vec<&String> = m.keys().collect();
    keys.sort();
    assert!(
        keys.iter()
            .all(|k| !k.contains("/orders") && !k.contains("q=")),
        "{keys:?}"
    );
    assert_eq!(keys.len(), 2 * (3 + 5), "{keys:?}");
}

#[tokio::test(flavor = "current_thread")]
async fn bulkhead_rejections_are_counted() {
    let recorder = DebuggingRecorder::new();
    let snap = recorder.snapshotter();
    // The rejection is recorded in `call`, on this (only) thread.
    let _guard = metrics::set_default_local_recorder(&recorder);
    let gate = Arc::new(Notify::new());
    let g = gate.clone();
    let layer = BulkheadLayer::new("payments", 1);
    let svc = ServiceBuilder::new()
        .layer(layer.clone())
        .service(tower::service_fn(move |_req: Request<()>| {
            let g = g.clone();
            async move {
                g.notified().await;
                Ok::<_, std::convert::Infallible>(http::Response::new(()))
            }
        }));
    let held = tokio::spawn(svc.clone().oneshot(Request::new(())));
    while layer.in_flight() == 0 {
        tokio::task::yield_now().await;
    }
    for _ in 0..3 {
        let err = svc.clone().oneshot(Request::new(())).await.unwrap_err();
        assert_eq!(
            tower_patterns::error::error_status(&*err),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }
    gate.notify_one();
    held.await.unwrap().unwrap();
    let m = read(&snap);
    assert_eq!(
        counter(
            &m,
            "Counter:tower_patterns_bulkhead_rejected_total{bulkhead=payments,reason=queue_full}"
        ),
        3
    );
}

#[tokio::test]
async fn metered_endpoints_are_labelled_by_instance_id() {
    use tower_patterns::discovery::{Instance, MakeEndpoint};
    let recorder = DebuggingRecorder::new();
    let snap = recorder.snapshotter();
    let upstream = serve(Router::new().route("/x", get(|| async { "ok" }))).await;
    let template = ForwardBuilder::new("http://127.0.0.1:1")
        .build::<http_body_util::Empty<bytes::Bytes>>()
        .unwrap();
    let mut make = tower_patterns::telemetry::metered("orders", template);
    let instance = Instance::new("orders", "orders-7", "127.0.0.1", upstream.port());
    let endpoint =
        metrics::with_local_recorder(&recorder, || make.make_endpoint(&instance)).unwrap();
    let res = endpoint
        .oneshot(Request::get("/x").body(Default::default()).unwrap())
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let m = read(&snap);
    assert_eq!(
        counter(
            &m,
            &format!("Counter:{REQUESTS}{{endpoint=orders-7,route=orders}}")
        ),
        1
    );
}

/// The patterns' own counters (one call into `telemetry` at each site): breaker
/// transitions, retries, ejections, chain hops, cache answers. Current-thread runtime: every
/// event happens on this thread, where the recorder is the default.
#[tokio::test(flavor = "current_thread")]
async fn breaker_balancer_chain_and_cache_report_through_the_facade() {
    use bytes::Bytes;
    use http_body_util::Full;
    use tower_patterns::balance::{Balance, PassiveHealth, Retry};
    use tower_patterns::body::ReplayBody;
    use tower_patterns::breaker::{CircuitBreakerConfig, CircuitBreakerLayer, Window};
    use tower_patterns::cache::{CacheLayer, MemoryStore};
    use tower_patterns::chain::{ChainLayer, LinkService, LinkTable};
    use tower_patterns::telemetry::{
        BREAKER_STATE, BREAKER_TRANSITIONS, CACHE, CHAIN_HOPS, EJECTIONS, RETRIES,
    };

    let recorder = DebuggingRecorder::new();
    let snap = recorder.snapshotter();
    let _guard = metrics::set_default_local_recorder(&recorder);
    let answer = |status: u16| {
        tower::service_fn(move |_req: Request<Full<Bytes>>| async move {
            let mut res = http::Response::new(Full::new(Bytes::from_static(b"x")));
            *res.status_mut() = StatusCode::from_u16(status).unwrap();
            Ok::<_, std::convert::Infallible>(res)
        })
    };

    // Breaker: two 503s in a window of two trip it.
    let breaker = CircuitBreakerLayer::new(
        CircuitBreakerConfig::new()
            .name("pay")
            .window(Window::Count(2))
            .minimum_calls(2),
    )
    .unwrap();
    let svc = ServiceBuilder::new().layer(breaker).service(answer(503));
    for _ in 0..2 {
        let _ = svc.clone().oneshot(Request::new(Full::default())).await;
    }

    // Balancer: "bad" answers 503, is retried on "good" and ejected (max_fails 1).
    let lb = Balance::builder()
        .classify(
            "5xx,fail"
                .parse::<tower_patterns::classify::Condition>()
                .unwrap(),
        )
        .health(PassiveHealth::default())
        .retry(Retry::default().on("503".parse().unwrap()))
        .build_static([("bad", answer(503)), ("good", answer(200))]);
    for _ in 0..2 {
        let res = lb
            .clone()
            .oneshot(Request::new(Full::default()))
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
    }

    // Chain: a.com answers 404, hops to b.com.
    type Req = Request<ReplayBody<Full<Bytes>>>;
    let link = |status: u16| {
        let svc = tower::service_fn(move |_req: Req| async move {
            let mut res = http::Response::new(Full::new(Bytes::from_static(b"x")));
            *res.status_mut() = StatusCode::from_u16(status).unwrap();
            Ok::<_, std::convert::Infallible>(res)
        });
        LinkService::new(
            svc.map_response(|r| r.map(tower_patterns::body::boxed))
                .map_err(Into::into),
        )
    };
    let table = LinkTable::builder()
        .vhost("a.com", link(404))
        .vhost("b.com", link(200))
        .link("a.com", "404".parse().unwrap(), "b.com")
        .chain(ChainLayer::new())
        .build()
        .unwrap();
    let req = Request::get("/f")
        .header("host", "a.com")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(table.oneshot(req).await.unwrap().status(), StatusCode::OK);

    // Cache: a miss, then a hit.
    let cache = CacheLayer::new(MemoryStore::new(1 << 20));
    let origin = tower::service_fn(|_req: Request<()>| async {
        let res = http::Response::builder()
            .header("cache-control", "max-age=60")
            .body(Full::new(Bytes::from("hello")))
            .unwrap();
        Ok::<_, std::convert::Infallible>(res)
    });
    let svc = ServiceBuilder::new().layer(cache).service(origin);
    let get = || Request::get("/a").body(()).unwrap();
    let first = svc.clone().oneshot(get()).await.unwrap();
    http_body_util::BodyExt::collect(first.into_body())
        .await
        .unwrap();
    tokio::task::yield_now().await;
    let second = svc.clone().oneshot(get()).await.unwrap();
    assert_eq!(second.headers()["x-cache"], "HIT");

    let m = read(&snap);
    assert_eq!(
        counter(
            &m,
            &format!("Counter:{BREAKER_TRANSITIONS}{{breaker=pay,to=open}}")
        ),
        1
    );
    assert_eq!(
        gauge(&m, &format!("Gauge:{BREAKER_STATE}{{breaker=pay}}")),
        1.0
    );
    assert_eq!(counter(&m, &format!("Counter:{RETRIES}{{}}")), 1);
    assert_eq!(
        counter(&m, &format!("Counter:{EJECTIONS}{{endpoint=bad}}")),
        1
    );
    assert_eq!(counter(&m, &format!("Counter:{CHAIN_HOPS}{{}}")), 1);
    assert_eq!(counter(&m, &format!("Counter:{CACHE}{{result=MISS}}")), 1);
    assert_eq!(counter(&m, &format!("Counter:{CACHE}{{result=HIT}}")), 1);
}
