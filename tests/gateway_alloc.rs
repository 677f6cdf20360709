//! Heap allocations per request of the API-gateway stack over `Forward` (issue 14): a
//! budget, as `tests/proxy_alloc.rs` keeps one for bare `Forward`.
//!
//! The stack is `reverse_proxy --gateway`'s (`examples/common/gateway.rs`) without the
//! example's `/metrics` scrape: route rate limit, API key, request trace, metrics,
//! bulkhead, breaker, `Forward`, under `ErrorResponse`, served by `server::serve` on a
//! counted thread of its own. Each allocation and its free cost ~300-400 instructions
//! under callgrind in the gateway process (session 16), more than any one layer's glue.

use std::num::NonZeroU32;

use tower::ServiceBuilder;
use tower_patterns::auth::{ApiKeys, AuthConfig};
use tower_patterns::breaker::{CircuitBreakerConfig, CircuitBreakerLayer};
use tower_patterns::bulkhead::BulkheadLayer;
use tower_patterns::proxy::{ErrorResponseLayer, ForwardBuilder};
use tower_patterns::ratelimit::{LocalLimiter, Quota, RateLimitLayer, RouteKey};
use tower_patterns::telemetry::MetricsLayer;
use tower_patterns::trace::RequestTraceLayer;

mod alloc_support;
mod common;

const KEY: &str = "alloc-key-0123456789";

/// Allocations per request the gateway stack may make: bare `Forward`'s (`tests/proxy_alloc.rs`:
/// 4 since session 20's lean HTTP/1 path, 8 before) and the layers' (the trace context's box in the request
/// extensions, the rest the trace layer's: see docs/BENCHMARKS.md, "session 16, the
/// stack's glue"). Session 16: 16 -> 13, the request's extension map (the map, its table,
/// the `ClientAddr` box) is handed back by `Forward` with the identity and trace context
/// in it too (`client_addr::recycle`). Session 17: 13 -> 12, the example's auth layer
/// puts no `Identity` extension in (`identity_extension(false)`: nothing after it reads
/// one), as here. Session 17 (gw11): 12 -> 11, the trace context's record of the
/// upstream calls is shared (an `Arc`) only once the context is cloned, which nothing
/// here does (it read 12.00 before, 11.00 after). Session 20: the lean upstream path,
/// 11 -> 7 (it read 7.00).
const BUDGET_PER_REQUEST: u64 = 7;

#[tokio::test]
async fn gateway_stack_stays_within_its_allocation_budget() {
    let (be_url, _) = alloc_support::spawn_backend(false).await;
    let proxy_addr = alloc_support::serve_counted(move |listener| async move {
        let fwd = ForwardBuilder::new(be_url)
            .build::<hyper::body::Incoming>()
            .unwrap();
        let auth = AuthConfig::new()
            .api_keys(ApiKeys::new().key("client", KEY, ["proxy"]).unwrap())
            .hide_credentials(true)
            .build()
            .unwrap();
        let rate = NonZeroU32::new(1_000_000).unwrap();
        let svc = ServiceBuilder::new()
            .layer(ErrorResponseLayer)
            .layer(RateLimitLayer::new(
                RouteKey::new("proxy"),
                LocalLimiter::new(Quota::per_second(rate).allow_burst(rate)),
            ))
            .layer(
                auth.layer()
                    .require_scopes(["proxy"])
                    .identity_extension(false),
            )
            .layer(RequestTraceLayer::new("proxy"))
            .layer(MetricsLayer::new("proxy"))
            .layer(BulkheadLayer::new("proxy", 64))
            .layer(CircuitBreakerLayer::new(CircuitBreakerConfig::new().name("proxy")).unwrap())
            .service(fwd);
        let _ = tower_patterns::server::serve(listener, svc).await;
    });
    let mut conns = alloc_support::connect(proxy_addr, 4).await;
    let req = format!(
        "GET /alloc HTTP/1.1\r\nhost: {proxy_addr}\r\nuser-agent: t\r\nx-api-key: {KEY}\r\n\r\n"
    );
    alloc_support::assert_budget("gateway", &mut conns, req.as_bytes(), BUDGET_PER_REQUEST).await;
}
