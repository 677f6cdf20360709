//! What the gateway stack's own layers add to the per-request future that hyper's
//! dispatcher stores and every layer above moves (issue 14, session 16).
//!
//! The stack is `reverse_proxy --gateway`'s over `Forward` (`examples/common/gateway.rs`,
//! less the example's `/metrics` endpoint). Every move of the whole future is a `memcpy`;
//! glibc's copies more than 256 bytes in a longer loop (~52 instructions against ~29
//! under callgrind). The figures print with `--nocapture`; the assertions pin the bytes
//! the rate limit, metrics, bulkhead and `ErrorResponse` layers add over their inner
//! future, so a field or variant that grows one of them fails here.

use std::mem::size_of;
use std::num::NonZeroU32;

use http::Request;
use hyper::body::Incoming;
use tower::{Layer, Service};
use tower_patterns::auth::{ApiKeys, AuthConfig};
use tower_patterns::breaker::{CircuitBreakerConfig, CircuitBreakerLayer};
use tower_patterns::bulkhead::BulkheadLayer;
use tower_patterns::proxy::{ErrorResponseLayer, Forward};
use tower_patterns::ratelimit::{LocalLimiter, Quota, RateLimitLayer, RouteKey};
use tower_patterns::telemetry::MetricsLayer;
use tower_patterns::trace::RequestTraceLayer;

/// The size of `S`'s future, printed with the layer's name.
fn future_size<S: Service<Request<Incoming>>>(name: &str, _: &S) -> usize {
    let n = size_of::<S::Future>();
    println!(
        "{name:10} future {n:4} bytes, response {:4}",
        size_of::<S::Response>()
    );
    n
}

#[test]
fn the_gateway_layers_add_few_bytes_to_the_request_future() {
    let forward = Forward::<Incoming>::new("http://127.0.0.1:1").unwrap();
    let f = future_size("forward", &forward);
    let breaker = CircuitBreakerLayer::new(CircuitBreakerConfig::new().name("p"))
        .unwrap()
        .layer(forward);
    let b = future_size("breaker", &breaker);
    let bulkhead = BulkheadLayer::new("p", 16).layer(breaker);
    let bh = future_size("bulkhead", &bulkhead);
    let metrics = MetricsLayer::new("p").layer(bulkhead);
    let m = future_size("metrics", &metrics);
    let trace = RequestTraceLayer::new("p").layer(metrics);
    let t = future_size("trace", &trace);
    let auth = AuthConfig::new()
        .api_keys(ApiKeys::new().key("c", "k0123456789012345", ["p"]).unwrap())
        .build()
        .unwrap()
        .layer()
        .require_scopes(["p"])
        .layer(trace);
    let a = future_size("auth", &auth);
    let quota = Quota::per_second(NonZeroU32::new(10).unwrap());
    let limit = RateLimitLayer::new(RouteKey::new("p"), LocalLimiter::new(quota)).layer(auth);
    let r = future_size("ratelimit", &limit);
    let top = ErrorResponseLayer.layer(limit);
    let e = future_size("errresp", &top);
    assert!(f <= 16, "Forward's future is boxed: {f}");
    // The slot (one pointer) and the queued/refused states' tag; the queued call is boxed.
    assert!(bh - b <= 8, "bulkhead adds {}", bh - b);
    // The classifier (a `Condition`, 32 bytes), the handles' `Arc` and the start instant.
    assert!(m - bh <= 56, "metrics adds {}", m - bh);
    // The local limiter decides in `call`: its future is the inner one's, or the answer
    // (which fits beside it), in the same bytes.
    assert!(r - a <= 8, "rate limit adds {}", r - a);
    assert_eq!(e, r, "ErrorResponse adds nothing");
    // What the others add, for the record (theirs: breaker, trace, auth).
    println!("breaker +{}, trace +{}, auth +{}", b - f, t - m, a - t);
}
