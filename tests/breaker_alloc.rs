//! Heap allocations the circuit breaker makes per request when its service is cloned for
//! every request, as axum and hyper-util's service adapter do (issue 14, session 18), in
//! process: the layer around an inner service that answers at once, less that inner
//! service alone. In the closed state the breaker admits and records without allocating,
//! and a clone takes its thread's handle on the circuit (made on the thread's first
//! clone) instead of allocating one: it allocated one padded handle per clone before.

use std::convert::Infallible;

use http::{Request, Response};
use tower_patterns::breaker::{CircuitBreakerConfig, CircuitBreakerLayer};

mod alloc_support;
// `alloc_support`'s raw response reader is there; this test needs nothing else of it.
mod common;

use alloc_support::per_request_in_process as per_request;

/// Nothing per request: the admission, the outcome and the clone are all allocation-free.
const BUDGET_PER_REQUEST: u64 = 0;

fn request() -> Request<()> {
    Request::new(())
}

#[tokio::test]
async fn a_breaker_cloned_per_request_allocates_nothing_per_request() {
    let inner =
        tower::service_fn(|_req: Request<()>| async { Ok::<_, Infallible>(Response::new(())) });
    let bare = per_request(inner, request).await;
    let layer = CircuitBreakerLayer::new(CircuitBreakerConfig::new().name("alloc")).unwrap();
    let guarded = per_request(
        tower::ServiceBuilder::new().layer(layer).service(inner),
        request,
    )
    .await;
    let own = guarded.saturating_sub(bare);
    println!("allocations per request: inner {bare}, with the breaker {guarded}: +{own}");
    assert!(
        guarded <= bare + BUDGET_PER_REQUEST,
        "the breaker made {own} allocations per request, budget {BUDGET_PER_REQUEST}"
    );
}
