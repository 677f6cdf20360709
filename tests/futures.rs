//! Every response future of the crate has one behaviour when polled again after it
//! returned `Ready`: a clear panic naming the future (tower's convention), never an
//! invented error, an invented response, or a hang.

use std::convert::Infallible;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::task::noop_waker_ref;
use http::{Request, Response};
use http_body_util::Full;
use tower::{Layer, Service, ServiceExt};
use tower_patterns::balance::{Balance, ReplayLayer};
use tower_patterns::chain::ChainLayer;

/// Polls `fut` to completion (it must not need a real waker), then polls it once more and
/// returns the panic message of that second poll.
fn second_poll_panics<F: Future>(fut: F) -> String {
    let mut fut = pin!(fut);
    let mut cx = Context::from_waker(noop_waker_ref());
    let mut first = None;
    for _ in 0..100 {
        if let Poll::Ready(out) = fut.as_mut().poll(&mut cx) {
            first = Some(out);
            break;
        }
    }
    assert!(first.is_some(), "the future did not complete");
    let again = std::panic::catch_unwind(AssertUnwindSafe(|| {
        let _ = fut.as_mut().poll(&mut cx);
    }));
    let payload = again.expect_err("a second poll must panic");
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}

fn ok_service<B: Send + 'static>() -> impl Service<
    Request<B>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send,
> + Clone
       + Send {
    tower::service_fn(|_req: Request<B>| async {
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
    })
}

#[test]
fn chain_future_panics_in_its_ready_state() {
    // A request over the hop limit is answered at once (the `Ready` state).
    let mut chain = ChainLayer::new().max_hops(1).layer(ok_service());
    let req = Request::get("/")
        .header("x-chain-hops", "5")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let msg = second_poll_panics(chain.call(req));
    assert!(msg.contains("ChainFuture polled after completion"), "{msg}");
}

#[test]
fn chain_future_panics_in_its_calling_state() {
    let mut chain = ChainLayer::new().layer(ok_service());
    let req = Request::get("/").body(Full::new(Bytes::new())).unwrap();
    let msg = second_poll_panics(chain.call(req));
    assert!(msg.contains("ChainFuture polled after completion"), "{msg}");
}

#[tokio::test]
async fn balance_future_panics_instead_of_inventing_no_endpoints() {
    let mut lb = Balance::builder().build_static([("a", ok_service())]);
    let req = Request::get("/").body(Full::new(Bytes::new())).unwrap();
    let msg = second_poll_panics(lb.call(req));
    assert!(
        msg.contains("balance::ResponseFuture polled after completion"),
        "{msg}"
    );
}

#[tokio::test]
async fn replay_future_panics_after_a_buffered_request() {
    let lb = Balance::builder().build_static([("a", ok_service())]);
    let mut replay = ReplayLayer::new(1024).layer(lb);
    replay.ready().await.unwrap();
    let req = Request::post("/")
        .body(Full::new(Bytes::from_static(b"body")))
        .unwrap();
    let msg = second_poll_panics(replay.call(req));
    assert!(msg.contains("polled after completion"), "{msg}");
}

#[tokio::test]
async fn cache_hit_future_panics_instead_of_hanging() {
    use http_body_util::BodyExt;
    use tower_patterns::cache::{CacheLayer, MemoryStore};
    let cache = CacheLayer::new(MemoryStore::new(1 << 20));
    let origin = tower::service_fn(|_req: Request<Full<Bytes>>| async {
        Ok::<_, Infallible>(
            Response::builder()
                .header("cache-control", "public, max-age=60")
                .body(Full::new(Bytes::from_static(b"cached")))
                .unwrap(),
        )
    });
    let mut svc = cache.clone().layer(origin);
    let get = || Request::get("/a").body(Full::new(Bytes::new())).unwrap();
    let first = svc.ready().await.unwrap().call(get()).await.unwrap();
    first.into_body().collect().await.unwrap();
    // The fill completes on its own task; wait for it, bounded.
    for _ in 0..1000 {
        if cache.stats().snapshot().fills == 1 {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(cache.stats().snapshot().fills, 1);
    let hit = svc.ready().await.unwrap().call(get());
    let msg = second_poll_panics(hit);
    assert!(
        msg.contains("cache::ResponseFuture polled after completion"),
        "{msg}"
    );
}
