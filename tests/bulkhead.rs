//! `bulkhead::BulkheadLayer`: concurrent limit, bounded queue, maximum wait, 503 at once,
//! over real sockets and (for the wait) with paused time.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::routing::get;
use axum::Router;
use http::{Request, Response, StatusCode};
use tokio::sync::{Notify, Semaphore};
use tower::{ServiceBuilder, ServiceExt};
use tower_patterns::bulkhead::{BulkheadFull, BulkheadLayer, Rejection};
use tower_patterns::classify::{error_kind, FailureKind};
use tower_patterns::error::error_status;
use tower_patterns::proxy::ForwardBuilder;

async fn serve(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

async fn call(gw: SocketAddr) -> StatusCode {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let req = Request::get(format!("http://{gw}/pay"))
        .body(Default::default())
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .unwrap()
        .unwrap()
        .status()
}

/// Waits (bounded) until `f` holds, yielding to the runtime in between.
async fn until(what: &str, f: impl Fn() -> bool) {
    tokio::time::timeout(Duration::from_secs(10), async {
        while !f() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
}

#[tokio::test]
async fn limits_concurrency_queues_and_refuses_beyond_at_once_over_real_sockets() {
    // The upstream holds every request until a permit is added.
    let gate = Arc::new(Semaphore::new(0));
    let arrived = Arc::new(AtomicUsize::new(0));
    let (g, a) = (gate.clone(), arrived.clone());
    let upstream = serve(Router::new().route(
        "/pay",
        get(move || {
            let (g, a) = (g.clone(), a.clone());
            async move {
                a.fetch_add(1, Ordering::SeqCst);
                g.acquire().await.unwrap().forget();
                "paid"
            }
        }),
    ))
    .await;
    let bulkhead = BulkheadLayer::new("payments", 2)
        .max_queue(1)
        .max_wait(Duration::from_secs(30));
    let forward = ForwardBuilder::new(format!("http://{upstream}"))
        .build::<Body>()
        .unwrap();
    let app = Router::new().route_service(
        "/pay",
        ServiceBuilder::new()
            .layer(bulkhead.clone().respond())
            .service(forward),
    );
    let gw = serve(app).await;

    let held: Vec<_> = (0..2).map(|_| tokio::spawn(call(gw))).collect();
    until("two calls at the upstream", || {
        arrived.load(Ordering::SeqCst) == 2
    })
    .await;
    assert_eq!(bulkhead.in_flight(), 2);
    let queued = tokio::spawn(call(gw));
    until("one call queued", || bulkhead.queued() == 1).await;
    assert_eq!(
        arrived.load(Ordering::SeqCst),
        2,
        "the queued call is not sent"
    );

    // Beyond the queue: 503 at once, while the upstream still holds everything.
    for _ in 0..3 {
        assert_eq!(call(gw).await, StatusCode::SERVICE_UNAVAILABLE);
    }
    gate.add_permits(3);
    for h in held {
        assert_eq!(h.await.unwrap(), StatusCode::OK);
    }
    assert_eq!(queued.await.unwrap(), StatusCode::OK);
    assert_eq!(arrived.load(Ordering::SeqCst), 3);
    until("all slots free", || bulkhead.in_flight() == 0).await;
    assert_eq!(bulkhead.queued(), 0);
}

/// An in-process service that answers when `release` is notified.
fn held(
    release: Arc<Notify>,
) -> impl tower::Service<Request<()>, Response = Response<()>, Error = Infallible, Future: Send>
       + Clone
       + Send {
    tower::service_fn(move |_req: Request<()>| {
        let r = release.clone();
        async move {
            r.notified().await;
            Ok::<_, Infallible>(Response::new(()))
        }
    })
}

#[tokio::test(start_paused = true)]
async fn a_queued_call_waits_at_most_max_wait_then_503() {
    let release = Arc::new(Notify::new());
    let layer = BulkheadLayer::new("slow", 1)
        .max_queue(1)
        .max_wait(Duration::from_millis(50));
    let svc = ServiceBuilder::new()
        .layer(layer.clone())
        .service(held(release.clone()));
    let first = tokio::spawn(svc.clone().oneshot(Request::new(())));
    until("first admitted", || layer.in_flight() == 1).await;

    let start = tokio::time::Instant::now();
    let err = svc.clone().oneshot(Request::new(())).await.unwrap_err();
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(50) && waited < Duration::from_millis(60),
        "{waited:?}"
    );
    let full = err.downcast_ref::<BulkheadFull>().expect("a BulkheadFull");
    assert_eq!(full.reason, Rejection::QueueTimeout);
    assert_eq!(&*full.name, "slow");
    assert_eq!(error_status(&*err), StatusCode::SERVICE_UNAVAILABLE);
    // The gateway's own limit: never charged to the upstream by breaker/health/retry.
    assert_eq!(error_kind(&*err), FailureKind::Client);
    assert_eq!(layer.queued(), 0);

    // A queued call admitted within the wait goes through.
    let second = tokio::spawn(svc.clone().oneshot(Request::new(())));
    until("second queued", || layer.queued() == 1).await;
    release.notify_one();
    first.await.unwrap().unwrap();
    until("second admitted", || {
        layer.in_flight() == 1 && layer.queued() == 0
    })
    .await;
    release.notify_one();
    second.await.unwrap().unwrap();
    assert_eq!(layer.in_flight(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_call_gives_back_its_queue_place_and_its_slot() {
    let release = Arc::new(Notify::new());
    let layer = BulkheadLayer::new("c", 1)
        .max_queue(1)
        .max_wait(Duration::from_secs(60));
    let svc = ServiceBuilder::new()
        .layer(layer.clone())
        .service(held(release.clone()));
    let first = tokio::spawn(svc.clone().oneshot(Request::new(())));
    until("first admitted", || layer.in_flight() == 1).await;
    let queued = tokio::spawn(svc.clone().oneshot(Request::new(())));
    until("queued", || layer.queued() == 1).await;
    queued.abort();
    until("queue place returned", || layer.queued() == 0).await;
    first.abort();
    until("slot returned", || layer.in_flight() == 0).await;
    // Both free again: a new call is admitted at once.
    let third = tokio::spawn(svc.clone().oneshot(Request::new(())));
    until("third admitted", || layer.in_flight() == 1).await;
    release.notify_one();
    third.await.unwrap().unwrap();
}

#[tokio::test]
async fn without_a_queue_the_call_over_the_limit_is_refused_immediately() {
    let release = Arc::new(Notify::new());
    let layer = BulkheadLayer::new("n", 1);
    let svc = ServiceBuilder::new()
        .layer(layer.clone())
        .service(held(release.clone()));
    let first = tokio::spawn(svc.clone().oneshot(Request::new(())));
    until("first admitted", || layer.in_flight() == 1).await;
    let err = svc.clone().oneshot(Request::new(())).await.unwrap_err();
    assert_eq!(
        err.downcast_ref::<BulkheadFull>().unwrap().reason,
        Rejection::QueueFull
    );
    release.notify_one();
    first.await.unwrap().unwrap();
}
