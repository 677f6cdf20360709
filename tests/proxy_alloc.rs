//! Heap allocations per request on the HTTP/1 `Forward` path (issue 12): a budget.
//!
//! Every allocation is CPU on the proxy's hot path (malloc + free were ~12 % of its user-space
//! instructions under callgrind). This test proxies keep-alive requests over real sockets on
//! 127.0.0.1 and counts the allocations made on the proxy's own thread only (the backend and
//! the client run on other threads), so the figure is exact and load-independent. A change
//! that adds an allocation per request fails here and has to say why in the budget.

use tower::ServiceBuilder;
use tower_patterns::proxy::{ErrorResponseLayer, ForwardBuilder};

mod alloc_support;
mod common;

use alloc_support::LARGE;

/// Allocations per request the proxy may make: measured 18 before issue 12's work, 13 after
/// session 13, 12 after session 14, 8 after session 15 (see docs/BENCHMARKS.md, proxy
/// section), 4 after session 20. Session 15: the `X-Forwarded-For` value is made once per
/// client and connection, then shared (12 -> 11); the server's `ClientAddr` extension map
/// (the map, its table, the value) is handed back by `Forward` and reused by the next
/// request (11 -> 8; see `client_addr`). Session 20: the lean HTTP/1 upstream path
/// (`proxy/h1`) has no response-body channel, no dispatch callback and no second read
/// buffer per request, and the answer's fields reuse the request's header map (8 -> 4).
/// What is left: hyper's server (its read buffer, the header-read timer), `Forward`'s
/// response future, and the shared head bytes of the upstream's answer. `BodyLimits` only
/// goes on a request with a body, which this `GET` has not.
const BUDGET_PER_REQUEST: u64 = 4;
/// Of those, at most this many larger than [`LARGE`]: the server's 8 KiB read buffer,
/// re-allocated while the message parsed from it is still in flight. The upstream
/// connection's was a second until session 20 (the lean path reads the next answers into
/// what is left of its buffer); `Forward`'s response future was a third (2.7 KiB, its
/// request held in several nested futures at once) before issue 12's session 13.
const LARGE_BUDGET_PER_REQUEST: u64 = 1;

#[tokio::test]
async fn forward_path_stays_within_its_allocation_budget() {
    let (be_url, _) = alloc_support::spawn_backend(false).await;
    let proxy_addr = alloc_support::serve_counted(move |listener| async move {
        let fwd = ForwardBuilder::new(be_url)
            .build::<hyper::body::Incoming>()
            .unwrap();
        let svc = ServiceBuilder::new().layer(ErrorResponseLayer).service(fwd);
        let _ = tower_patterns::server::serve(listener, svc).await;
    });
    let mut conns = alloc_support::connect(proxy_addr, 4).await;
    let req = format!("GET /alloc HTTP/1.1\r\nhost: {proxy_addr}\r\nuser-agent: t\r\n\r\n");
    let large =
        alloc_support::assert_budget("proxy", &mut conns, req.as_bytes(), BUDGET_PER_REQUEST).await;
    let large_per_request = large as f64 / alloc_support::N as f64;
    println!("of which larger than {LARGE} bytes: {large} ({large_per_request:.3} a request)");
    assert!(
        large <= LARGE_BUDGET_PER_REQUEST * alloc_support::N + alloc_support::ONE_OFF,
        "{large_per_request:.2} allocations over {LARGE} bytes per request, budget {LARGE_BUDGET_PER_REQUEST}"
    );
}
