//! Heap allocations the request-trace layer makes per request under a foreign server
//! (axum's, hyper's: no map recycling of ours), in process: the layer around an inner
//! service that answers at once, less that inner service alone (issue 14, session 17).
//!
//! What the layer needs, a request without extensions and without an access-log
//! subscriber: the `Extensions` map's box and table (a request that arrives with some
//! extension, as axum's do, has them already), the context's box in it, and one buffer
//! shared by the request id and the first upstream call's `traceparent`. The record of
//! the upstream calls is shared with a clone of the context (a retry's copy, the access
//! log) only once one is made, so it costs nothing here.

use std::convert::Infallible;

use http::{HeaderMap, Request, Response};
use tower_patterns::trace::{RequestTraceLayer, TraceContext};

mod alloc_support;
// `alloc_support`'s raw response reader is there; this test needs nothing else of it.
mod common;

use alloc_support::per_request_in_process as per_request;

/// See the module docs: map box, map table, context box, id buffer.
const BUDGET_PER_REQUEST: u64 = 4;

fn request() -> Request<()> {
    let mut req = Request::new(());
    // Room for what the layer adds: the map's growth is the request's, not the layer's.
    *req.headers_mut() = HeaderMap::with_capacity(16);
    req.headers_mut().insert("host", "gw".parse().unwrap());
    req
}

#[tokio::test]
async fn the_trace_layer_allocates_within_its_budget_per_request() {
    let inner = tower::service_fn(|req: Request<()>| async move {
        // The upstream call `Forward` makes: the first child, as in a gateway (the map
        // is built either way: it is the inner service's, counted on both sides).
        let mut h = HeaderMap::with_capacity(4);
        if let Some(cx) = req.extensions().get::<TraceContext>() {
            cx.inject(&mut h, &http::uri::Authority::from_static("up:80"));
        }
        let mut res = Response::new(());
        // Room for the answered `x-request-id`, as a parsed response's map has.
        *res.headers_mut() = HeaderMap::with_capacity(8);
        Ok::<_, Infallible>(res)
    });
    let bare = per_request(inner, request).await;
    let traced = per_request(
        tower::ServiceBuilder::new()
            .layer(RequestTraceLayer::new("/x"))
            .service(inner),
        request,
    )
    .await;
    let own = traced - bare;
    println!("allocations per request: inner {bare}, with the trace layer {traced}: +{own}");
    assert!(
        own <= BUDGET_PER_REQUEST,
        "the trace layer made {own} allocations per request, budget {BUDGET_PER_REQUEST}"
    );
}
