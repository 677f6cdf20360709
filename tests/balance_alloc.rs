//! Heap allocations per request on the balanced HTTP/1 path (issue 12): a budget, as
//! `tests/proxy_alloc.rs` keeps one for bare `Forward`.
//!
//! `reverse_proxy --serve` runs `Replay` + `Balance` (round robin over two `Forward`s,
//! default retry) in front of two upstreams. A `GET` there may be retried on the other
//! upstream after it was sent, so the balancer keeps a copy of its head; that copy is the
//! balancer's own allocations per request. This test proxies keep-alive requests over real
//! sockets on 127.0.0.1 through that stack and counts the allocations made on the proxy's
//! own thread only (backends and client run on other threads): exact and load-independent.
//! A second test checks what the copy must still carry: a `GET` retried after the first
//! upstream read it and hung up reaches the second with the client's `X-Forwarded-For`
//! (the server's `ClientAddr` extension, kept in the copy).

use std::sync::atomic::Ordering;

use tower::Layer;
use tower_patterns::balance::{Balance, ReplayLayer, Retry};
use tower_patterns::body::ReplayBody;
use tower_patterns::proxy::{ErrorResponseLayer, ForwardBuilder};

mod alloc_support;
mod common;

use alloc_support::{count_from_here, counted_since, requests, spawn_backend};

/// Bare `Forward`'s budget (`tests/proxy_alloc.rs`: 4 since session 20's lean HTTP/1
/// path, 8 before): the balancer adds none. Its kept
/// copy of the head reuses a box (and its header list) recycled on the proxy's thread
/// (`balance::spare`; 10 before session 16: the box and the list allocated and freed for
/// every request; the test fails at the old code with this budget). The `X-Forwarded-For` value is
/// reused as under bare `Forward`: a balancer instance (one per connection) calls its own
/// clone of each endpoint's `Forward` (`balance::local`), whose last-value cache hits.
/// Before that, each try called a fresh clone from the shared snapshot and the value was
/// made again: two allocations (the copy, and the promotion of that `Bytes` to shared when
/// the cache kept a clone), 12 in all. The server's extensions (the client's address) are
/// copied as plain values, not as a second extension map (that was 3 more: the map, its
/// table, the value; 17 in all before session 15).
const BUDGET_PER_REQUEST: u64 = 4;

/// `reverse_proxy --serve`'s stack for one worker over `backends`, served on its own
/// thread with a current-thread runtime; only that thread's allocations are counted.
fn spawn_balanced_proxy(backends: Vec<String>) -> std::net::SocketAddr {
    alloc_support::serve_counted(move |listener| async move {
        let endpoints = backends.iter().map(|url| {
            let fwd = ForwardBuilder::new(url.as_str())
                .build::<ReplayBody<hyper::body::Incoming>>()
                .unwrap();
            (url.clone(), fwd)
        });
        let lb = Balance::builder()
            .retry(Retry::default())
            .try_timeout(None)
            .build_static(endpoints);
        let svc = ErrorResponseLayer.layer(ReplayLayer::new(64 * 1024).layer(lb));
        let _ = tower_patterns::server::serve(listener, svc).await;
    })
}

#[tokio::test]
async fn balanced_path_stays_within_its_allocation_budget() {
    let backends = vec![spawn_backend(false).await.0, spawn_backend(false).await.0];
    let proxy_addr = spawn_balanced_proxy(backends);
    let mut conns = alloc_support::connect(proxy_addr, 4).await;
    let req = format!("GET /alloc HTTP/1.1\r\nhost: {proxy_addr}\r\nuser-agent: t\r\n\r\n");
    alloc_support::assert_budget(
        "balanced proxy",
        &mut conns,
        req.as_bytes(),
        BUDGET_PER_REQUEST,
    )
    .await;
}

#[tokio::test]
async fn a_get_retried_after_it_was_sent_still_carries_the_client_address() {
    // Round robin from the first endpoint: every other request lands on the one that
    // reads the head and hangs up (sent, then failed), and is retried on the other.
    let (hangs_up, sent_to_first) = spawn_backend(true).await;
    let (answers, _) = spawn_backend(false).await;
    let proxy_addr = spawn_balanced_proxy(vec![hangs_up, answers]);
    let mut conn = tokio::net::TcpStream::connect(proxy_addr).await.unwrap();
    let req = format!("GET /retried HTTP/1.1\r\nhost: {proxy_addr}\r\n\r\n");
    // Passive health ejects the failing endpoint after a few failures; before that, at
    // least one request went to it first and was retried.
    requests(std::slice::from_mut(&mut conn), req.as_bytes(), 4).await;
    assert!(
        sent_to_first.load(Ordering::Relaxed) >= 1,
        "a request was sent to the endpoint that hangs up, and then retried"
    );
}

#[tokio::test]
async fn a_balancer_cloned_per_request_pays_nothing_for_per_instance_clones() {
    use http::{Request, Response};
    use http_body_util::Full;
    use tower::{Service, ServiceExt};
    type Req = Request<Full<bytes::Bytes>>;
    // An endpoint whose clone and answer allocate nothing, so only the balancer counts.
    let endpoint = tower::service_fn(|_req: Req| async {
        Ok::<_, std::convert::Infallible>(Response::new(String::new()))
    });
    let lb = Balance::builder().build_static([("a", endpoint), ("b", endpoint)]);
    let get = || {
        Request::get("/")
            .body(Full::new(bytes::Bytes::new()))
            .unwrap()
    };
    const N: u64 = 200;
    // One long-lived instance (the server's: one per connection), warmed up first.
    let mut kept = lb.clone();
    for _ in 0..4 {
        kept.ready().await.unwrap().call(get()).await.unwrap();
    }
    let start = count_from_here();
    for _ in 0..N {
        kept.ready().await.unwrap().call(get()).await.unwrap();
    }
    let long_lived = counted_since(start);
    // A clone per request, as axum's `Router` and `oneshot` on a clone call it: such an
    // instance is called once, so keeping clones of its endpoints (a list to allocate)
    // would only cost it; it must allocate no more than the long-lived instance does.
    let start = count_from_here();
    for _ in 0..N {
        lb.clone().oneshot(get()).await.unwrap();
    }
    let per_request = counted_since(start);
    println!(
        "allocations for {N} requests: long-lived {long_lived}, clone per request {per_request}"
    );
    assert!(
        per_request <= long_lived + 2,
        "a clone per request allocated {per_request} for {N} requests, a long-lived instance {long_lived}"
    );
}
