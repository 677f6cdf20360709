//! When the balancer copies a request for a retry (issue 12/14, the balancer's own cost per
//! request): only when another try could follow. A body type that counts its copies
//! tells; in-process endpoints with paused time, since only the balancer's bookkeeping is
//! under test (the retry over real sockets is in `balance.rs`).

mod common;

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame};
use tower::util::BoxCloneSyncService;
use tower::ServiceExt;
use tower_patterns::balance::{discover, Balance, CloneBody, PassiveHealth, Retry};
use tower_patterns::BoxError;

/// An empty body that counts how often the balancer copied it.
struct Counted(Arc<AtomicUsize>);

impl Body for Counted {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(None)
    }
    fn is_end_stream(&self) -> bool {
        true
    }
}

impl CloneBody for Counted {
    fn try_clone_body(&self) -> Option<Self> {
        self.0.fetch_add(1, SeqCst);
        Some(Counted(self.0.clone()))
    }
}

type Svc = BoxCloneSyncService<Request<Counted>, Response<String>, BoxError>;

/// Answers its name, or fails every request (a transport error, retried by default).
fn endpoint(name: &'static str, fail: bool) -> Svc {
    BoxCloneSyncService::new(tower::service_fn(move |_r: Request<Counted>| async move {
        if fail {
            Err::<Response<String>, BoxError>("upstream reset".into())
        } else {
            Ok(Response::new(name.to_string()))
        }
    }))
}

fn get(copies: &Arc<AtomicUsize>) -> Request<Counted> {
    Request::get("/").body(Counted(copies.clone())).unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_request_to_the_only_endpoint_is_not_copied() {
    let lb = Balance::builder()
        .retry(Retry::default())
        .build_static([("a", endpoint("a", false))]);
    let copies = Arc::new(AtomicUsize::new(0));
    for _ in 0..3 {
        let res = lb.clone().oneshot(get(&copies)).await.unwrap();
        assert_eq!(res.into_body(), "a");
    }
    assert_eq!(
        copies.load(SeqCst),
        0,
        "no second endpoint: nothing to retry on"
    );

    // Failing, it is answered with the error after its one try, as before.
    let lb = Balance::builder()
        .retry(Retry::default())
        .build_static([("a", endpoint("a", true))]);
    let err = lb.oneshot(get(&copies)).await.unwrap_err();
    assert_eq!(err.to_string(), lb_error_after_one_try());
    assert_eq!(copies.load(SeqCst), 0);
}

fn lb_error_after_one_try() -> String {
    tower_patterns::balance::BalanceError::Upstream {
        tries: 1,
        source: "upstream reset".into(),
    }
    .to_string()
}

#[tokio::test(start_paused = true)]
async fn with_a_second_endpoint_the_copy_is_kept_and_retried() {
    let lb = Balance::builder()
        .retry(Retry::default())
        .build_static([("a", endpoint("a", true)), ("b", endpoint("b", false))]);
    let copies = Arc::new(AtomicUsize::new(0));
    // Round robin starts at "a" (fails, retried on "b"), then "b" directly.
    let res = lb.clone().oneshot(get(&copies)).await.unwrap();
    assert_eq!(res.into_body(), "b");
    assert_eq!(copies.load(SeqCst), 1, "one copy, for the try on b");
    // Without retries, never a copy.
    let lb = Balance::builder()
        .retry(Retry::never())
        .build_static([("a", endpoint("a", false)), ("b", endpoint("b", false))]);
    let copies = Arc::new(AtomicUsize::new(0));
    lb.oneshot(get(&copies)).await.unwrap();
    assert_eq!(copies.load(SeqCst), 0);
}

#[tokio::test(start_paused = true)]
async fn with_a_queue_the_only_endpoint_is_copied_and_retried_on_one_that_joins() {
    let (tx, disc) = discover::channel::<&'static str, Svc>();
    tx.insert("a", endpoint("a", true));
    let lb = Balance::builder()
        .retry(Retry::default())
        .queue_timeout(Duration::from_secs(2))
        .spawn(disc)
        .unwrap();
    lb.members().wait_for(|n| *n == 1).await.unwrap();
    let copies = Arc::new(AtomicUsize::new(0));
    let pending = tokio::spawn(lb.clone().oneshot(get(&copies)));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !pending.is_finished(),
        "a failed, queued for another endpoint"
    );
    tx.insert("b", endpoint("b", false));
    let res = pending.await.unwrap().unwrap();
    assert_eq!(res.into_body(), "b");
    // One copy per try that another could follow: the try on a, the try on b (a third
    // try could still wait in the queue).
    assert_eq!(copies.load(SeqCst), 2);
}

/// An upgrade (WebSocket) that an endpoint saw and failed on is not sent again: the other
/// endpoint may not take over a half-open tunnel. Over a real hyper server, which marks
/// the upgrade request (its `OnUpgrade`), with the request buffered for retries as
/// `reverse_proxy` does.
#[tokio::test]
async fn a_failed_upgrade_is_not_retried_on_another_endpoint() {
    use http_body_util::Full;
    use hyper::body::Incoming;
    use tokio::io::AsyncWriteExt;
    use tower::Layer;
    use tower_patterns::balance::ReplayLayer;
    use tower_patterns::body::ReplayBody;

    type Up = BoxCloneSyncService<Request<ReplayBody<Incoming>>, Response<Full<Bytes>>, BoxError>;
    let hits = Arc::new(AtomicUsize::new(0));
    let failing = |hits: Arc<AtomicUsize>| -> Up {
        BoxCloneSyncService::new(tower::service_fn(move |_r| {
            hits.fetch_add(1, SeqCst);
            async { Err::<Response<Full<Bytes>>, BoxError>("reset after the request".into()) }
        }))
    };
    // Health off: the first failure would otherwise eject one of the two.
    let lb = Balance::builder()
        .retry(Retry::default())
        .health(PassiveHealth::disabled())
        .build_static([("a", failing(hits.clone())), ("b", failing(hits.clone()))]);
    let front = ReplayLayer::new(64 * 1024).respond().layer(lb);
    let server = tower_patterns::server::spawn_local(front).await.unwrap();

    // One request per connection, its answer's head read under a bound.
    let addr = server.addr();
    let ask = |raw: &'static [u8]| async move {
        let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
        conn.write_all(raw).await.unwrap();
        tokio::time::timeout(
            Duration::from_secs(10),
            common::read_raw_response(&mut conn),
        )
        .await
        .expect("an answer")
        .0
    };
    let head =
        ask(b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n")
            .await;
    assert!(head.starts_with("HTTP/1.1 502"), "{head}");
    assert_eq!(hits.load(SeqCst), 1, "sent to one endpoint only");

    // The same request without the upgrade is retried on the other endpoint.
    let head = ask(b"GET /plain HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 502"), "{head}");
    assert_eq!(hits.load(SeqCst), 3, "tried on both endpoints");
}
