//! The gateway layers' cost, each next to its baseline in one run:
//! - `gateway/*` (CPU time per request, see [`cpu_now`]): a request over loopback through bare `Forward` vs the gateway stack over
//!   the same `Forward` (request trace + access log, metrics with a Prometheus recorder
//!   installed, bulkhead, circuit breaker, balancer) — the bar is ≤ 1.15x — and
//!   the breaker + balancer alone (what routing costs without this layers);
//! - `bulkhead/*`: one call through `Bulkhead` vs `tower::limit::ConcurrencyLimit` around
//!   an immediate service (the limit's own cost).

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::TokioIo;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_patterns::auth::{ApiKeys, AuthConfig};
use tower_patterns::balance::{Balance, PassiveHealth, Retry};
use tower_patterns::breaker::{CircuitBreakerConfig, CircuitBreakerLayer};
use tower_patterns::bulkhead::BulkheadLayer;
use tower_patterns::proxy::Forward;
use tower_patterns::ratelimit::{LocalLimiter, Quota, RateLimitLayer, RouteKey};
use tower_patterns::telemetry::MetricsLayer;
use tower_patterns::trace::RequestTraceLayer;

fn backend(rt: &tokio::runtime::Runtime) -> std::net::SocketAddr {
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (s, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|_r| async {
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        addr
    })
}

/// CPU time of this thread (`CLOCK_THREAD_CPUTIME_ID`). Everything of a `gateway/*` bench
/// — client, proxy stack, backend — runs on the current-thread runtime of this thread, so
/// this is the CPU per request, which other processes on a shared machine do not inflate as
/// they do wall time.
fn cpu_now() -> Duration {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID)
        .expect("thread CPU clock");
    Duration::new(t.tv_sec() as u64, t.tv_nsec() as u32)
}

/// Benches `svc` by the CPU time its requests cost.
fn bench_cpu<S, RB>(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    rt: &tokio::runtime::Runtime,
    name: &str,
    svc: S,
) where
    S: Service<Request<Empty<Bytes>>, Response = Response<RB>> + Clone,
    S::Error: std::fmt::Debug,
    RB: http_body::Body,
    RB::Error: std::fmt::Debug,
{
    g.bench_function(name, |b| {
        b.to_async(rt).iter_custom(|iters| {
            let svc = svc.clone();
            async move {
                let start = cpu_now();
                for _ in 0..iters {
                    let mut svc = svc.clone();
                    let res = svc.ready().await.unwrap().call(request()).await.unwrap();
                    // A refusal (401/429) would measure the wrong path.
                    assert_eq!(res.status(), http::StatusCode::OK);
                    res.into_body().collect().await.unwrap();
                }
                cpu_now().saturating_sub(start)
            }
        })
    });
}

const KEY: &str = "bench-key-0123456789abcdef0123456789abcdef";

fn request() -> Request<Empty<Bytes>> {
    Request::get("/x")
        .header("host", "bench")
        .header("x-api-key", KEY)
        .header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .body(Empty::new())
        .unwrap()
}

fn gateway(c: &mut Criterion) {
    // Handles register with the installed recorder: install it before building layers.
    let _prometheus = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let url = format!("http://{}", backend(&rt));
    let fwd = Forward::<Empty<Bytes>>::new(&url).unwrap();
    let mut g = c.benchmark_group("gateway");
    bench_cpu(&mut g, &rt, "bare_forward", fwd.clone());
    let stack = {
        let _guard = rt.enter();
        let balance = Balance::builder()
            .health(PassiveHealth::default())
            .retry(Retry::default())
            .build_static([("a", fwd.clone())]);
        ServiceBuilder::new()
            .layer(RequestTraceLayer::new("/x"))
            .layer(MetricsLayer::new("/x"))
            .layer(BulkheadLayer::new("x", 1024))
            .layer(CircuitBreakerLayer::new(CircuitBreakerConfig::new().name("x")).unwrap())
            .service(balance)
    };
    // The whole gateway of issue 14: API key, rate limit, then the stack above.
    let full = {
        let auth = AuthConfig::new()
            .api_keys(ApiKeys::new().key("bench", KEY, ["x"]).unwrap())
            .build()
            .unwrap();
        let n = |n| std::num::NonZeroU32::new(n).unwrap();
        let quota = Quota::per_second(n(1_000_000)).allow_burst(n(1_000_000));
        ServiceBuilder::new()
            .layer(RateLimitLayer::new(
                RouteKey::new("x"),
                LocalLimiter::new(quota),
            ))
            .layer(auth.layer().require_scopes(["x"]))
            .service(stack.clone())
    };
    // The routing part alone (breaker + balancer), to tell it from this layers.
    let routing = {
        let _guard = rt.enter();
        let balance = Balance::builder()
            .health(PassiveHealth::default())
            .retry(Retry::default())
            .build_static([("a", fwd.clone())]);
        ServiceBuilder::new()
            .layer(CircuitBreakerLayer::new(CircuitBreakerConfig::new().name("y")).unwrap())
            .service(balance)
    };
    bench_cpu(&mut g, &rt, "breaker_balance", routing);
    bench_cpu(&mut g, &rt, "gateway_stack", stack);
    bench_cpu(&mut g, &rt, "gateway_stack_auth_ratelimit", full);
    g.finish();
}

fn bulkhead(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let inner =
        tower::service_fn(|_r: Request<()>| async { Ok::<_, Infallible>(Response::new(())) });
    let mut g = c.benchmark_group("bulkhead");
    let limit = ServiceBuilder::new().concurrency_limit(64).service(inner);
    g.bench_function("tower_concurrency_limit", |b| {
        b.to_async(&rt).iter(|| {
            let svc = limit.clone();
            async move { svc.oneshot(Request::new(())).await.unwrap() }
        })
    });
    let bh = ServiceBuilder::new()
        .layer(
            BulkheadLayer::new("b", 64)
                .max_queue(64)
                .max_wait(Duration::from_millis(10)),
        )
        .service(inner);
    g.bench_function("tower_patterns_bulkhead", |b| {
        b.to_async(&rt).iter(|| {
            let svc = bh.clone();
            async move { svc.oneshot(Request::new(())).await.unwrap() }
        })
    });
    g.finish();
}

criterion_group!(benches, gateway, bulkhead);
criterion_main!(benches);
