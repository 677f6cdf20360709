//! The gateway layers' cost, each next to its baseline in one run:
//! - `gateway/*` (CPU time per request, see `cpuclock::thread_cpu`): a request over loopback through bare `Forward` vs the gateway stack over
//!   the same `Forward` (request trace + access log, metrics with a Prometheus recorder
//!   installed, bulkhead, circuit breaker, balancer) — the bar is ≤ 1.15x — and
//!   the breaker + balancer alone (what routing costs without this layers);
//! - `gateway_layer/*` (CPU time per request): each issue-14 layer alone over the same
//!   `Forward`, to tell which one costs what;
//! - with `GATEWAY_ALLOCS=1`, first the heap allocations per request of each case (a
//!   counting global allocator; printed, not benched);
//! - with `GATEWAY_RUN=<case> GATEWAY_N=<n>` (and a filter matching no bench, e.g.
//!   `nothing`), `n` requests (default 1000) of that one case after a warm-up, then exit:
//!   a fixed workload for `valgrind --tool=callgrind` or `perf stat`, whose instruction
//!   counts (two `n`, subtracted) are the load-independent cost per request — less the
//!   Prometheus recorder's one-time clock calibration, which differs in every process
//!   (`scripts/callgrind-gateway.sh` runs every case and subtracts it);
//! - with `GATEWAY_BACKEND=thread`, the backend runs on a thread of its own: the figures
//!   are then the client's and the gateway's alone (as in the process bench), without
//!   the backend parsing the headers the gateway adds;
//! - with `GATEWAY_HEADERS=recycled`, each request's header map starts with room for 12
//!   headers, as a request hyper's server parsed into a recycled map does (see
//!   `recycled_headers`); `GATEWAY_ALLOCS=1` also prints each case's future size;
//! - `bulkhead/*`: one call through `Bulkhead` vs `tower::limit::ConcurrencyLimit` around
//!   an immediate service (the limit's own cost).

use std::alloc::{GlobalAlloc, Layout, System};
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use http::{Request, Response};
use http_body_util::{BodyExt, Empty};
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_patterns::auth::{ApiKeys, AuthConfig};
use tower_patterns::balance::{Balance, PassiveHealth, Retry};
use tower_patterns::breaker::{CircuitBreakerConfig, CircuitBreakerLayer};
use tower_patterns::bulkhead::BulkheadLayer;
use tower_patterns::proxy::Forward;
use tower_patterns::ratelimit::{LocalLimiter, Quota, RateLimitLayer, RouteKey};
use tower_patterns::telemetry::MetricsLayer;
use tower_patterns::trace::RequestTraceLayer;

/// Counts allocations (for `GATEWAY_ALLOCS=1`); one relaxed add per allocation otherwise.
struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);

#[allow(unsafe_code)]
// SAFETY: every call is passed on unchanged to `System`.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract is `System`'s.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Sends `n` requests through clones of `svc`, one after the other, each read to its end.
/// Each must answer 200: a refusal (401/429) would measure the wrong path.
async fn requests<S, RB>(svc: &S, n: u64)
where
    S: Service<Request<Empty<Bytes>>, Response = Response<RB>> + Clone,
    S::Error: std::fmt::Debug,
    RB: http_body::Body,
    RB::Error: std::fmt::Debug,
{
    for _ in 0..n {
        let mut svc = svc.clone();
        let res = svc.ready().await.unwrap().call(request()).await.unwrap();
        assert_eq!(res.status(), http::StatusCode::OK);
        res.into_body().collect().await.unwrap();
    }
}

/// Prints the allocations per request of `svc` (after a warm-up) when `GATEWAY_ALLOCS=1`.
fn allocs<S, RB>(rt: &tokio::runtime::Runtime, name: &str, svc: S)
where
    S: Service<Request<Empty<Bytes>>, Response = Response<RB>> + Clone,
    S::Error: std::fmt::Debug,
    RB: http_body::Body,
    RB::Error: std::fmt::Debug,
{
    if std::env::var("GATEWAY_ALLOCS").map_or(true, |v| v != "1") {
        return;
    }
    const N: u64 = 2000;
    let run = |n: u64| rt.block_on(requests(&svc, n));
    run(200);
    let before = ALLOCS.load(Ordering::Relaxed);
    run(N);
    let n = ALLOCS.load(Ordering::Relaxed) - before;
    println!(
        "allocs/request {name}: {:.2} (future: {} bytes)",
        n as f64 / N as f64,
        std::mem::size_of::<S::Future>()
    );
}

/// With `GATEWAY_RUN=name`, runs `GATEWAY_N` requests of `svc` and exits the process.
fn drive<S, RB>(rt: &tokio::runtime::Runtime, name: &str, svc: S)
where
    S: Service<Request<Empty<Bytes>>, Response = Response<RB>> + Clone,
    S::Error: std::fmt::Debug,
    RB: http_body::Body,
    RB::Error: std::fmt::Debug,
{
    let Some(n) = cpuclock::fixed_run("GATEWAY_RUN", "GATEWAY_N", name, 1000) else {
        return;
    };
    rt.block_on(requests(&svc, 100 + n));
    std::process::exit(0);
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
                let start = cpuclock::thread_cpu();
                requests(&svc, iters).await;
                cpuclock::thread_cpu().saturating_sub(start)
            }
        })
    });
}

const KEY: &str = "bench-key-0123456789abcdef0123456789abcdef";

/// `GATEWAY_HEADERS=recycled`: each request's header map starts with room for 12 headers
/// (16 slots) instead of http's first-insert 6, as a served request's does. hyper's server
/// parses a request into the map of the connection's previous response, cleared
/// (`cached_headers`), and in a gateway that map went round the stack already (the request
/// map `Forward` sent is reused by the pooled client connection for the next answer, which
/// the server sends and keeps): in steady state it has room for what the stack adds. A
/// fresh `Request::builder` map grows once (a new index table and a moved entry vector,
/// ~1 100 instructions) as soon as the stack passes 6 headers: the API key's three identity
/// headers with `x-api-key` kept, or `x-request-id` and `Forward`'s `x-forwarded-*`. The
/// default keeps the builder's map (comparable with the figures before).
fn recycled_headers() -> bool {
    static RECYCLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *RECYCLED.get_or_init(|| std::env::var("GATEWAY_HEADERS").is_ok_and(|v| v == "recycled"))
}

fn request() -> Request<Empty<Bytes>> {
    let mut builder = Request::get("/x");
    if recycled_headers() {
        if let Some(h) = builder.headers_mut() {
            h.reserve(12);
        }
    }
    builder
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
    // `GATEWAY_BACKEND=thread`: the backend on a runtime of its own thread, so this
    // thread's CPU clock (and callgrind's `--separate-threads` count of it) holds the
    // client and the gateway only, as the process bench (`GATEWAY=1 bench-proxy.sh`) does:
    // there the upstream is nginx, and its parsing of the headers the gateway adds is not
    // the gateway's CPU. The default keeps everything on one thread (comparable with the
    // figures before it, but the backend's share is charged to the gateway).
    let _backend_rt;
    let backend_addr = if std::env::var("GATEWAY_BACKEND").is_ok_and(|v| v == "thread") {
        let brt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let addr = backend::backend(&brt);
        _backend_rt = Some(brt);
        addr
    } else {
        _backend_rt = None;
        backend::backend(&rt)
    };
    let url = format!("http://{backend_addr}");
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
    let full = ServiceBuilder::new()
        .layer(RateLimitLayer::new(
            RouteKey::new("x"),
            LocalLimiter::new(quota()),
        ))
        .layer(auth_layer())
        .service(stack.clone());
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
    allocs(&rt, "bare_forward", fwd.clone());
    drive(&rt, "bare_forward", fwd.clone());
    allocs(&rt, "breaker_balance", routing.clone());
    drive(&rt, "breaker_balance", routing.clone());
    allocs(&rt, "gateway_stack", stack.clone());
    drive(&rt, "gateway_stack", stack.clone());
    allocs(&rt, "gateway_stack_auth_ratelimit", full.clone());
    drive(&rt, "gateway_stack_auth_ratelimit", full.clone());
    bench_cpu(&mut g, &rt, "breaker_balance", routing);
    bench_cpu(&mut g, &rt, "gateway_stack", stack);
    bench_cpu(&mut g, &rt, "gateway_stack_auth_ratelimit", full);
    g.finish();

    // Each layer alone over `Forward`: which one costs what.
    let mut g = c.benchmark_group("gateway_layer");
    let trace = ServiceBuilder::new()
        .layer(RequestTraceLayer::new("/x"))
        .service(fwd.clone());
    let metrics = ServiceBuilder::new()
        .layer(MetricsLayer::new("/l"))
        .service(fwd.clone());
    let bulkhead = ServiceBuilder::new()
        .layer(BulkheadLayer::new("l", 1024))
        .service(fwd.clone());
    let auth = ServiceBuilder::new()
        .layer(auth_layer())
        .service(fwd.clone());
    let ratelimit = ServiceBuilder::new()
        .layer(RateLimitLayer::new(
            RouteKey::new("l"),
            LocalLimiter::new(quota()),
        ))
        .service(fwd.clone());
    allocs(&rt, "trace", trace.clone());
    drive(&rt, "trace", trace.clone());
    allocs(&rt, "metrics", metrics.clone());
    drive(&rt, "metrics", metrics.clone());
    allocs(&rt, "bulkhead", bulkhead.clone());
    drive(&rt, "bulkhead", bulkhead.clone());
    allocs(&rt, "auth", auth.clone());
    drive(&rt, "auth", auth.clone());
    allocs(&rt, "ratelimit", ratelimit.clone());
    drive(&rt, "ratelimit", ratelimit.clone());
    bench_cpu(&mut g, &rt, "bare_forward", fwd.clone());
    bench_cpu(&mut g, &rt, "trace", trace);
    bench_cpu(&mut g, &rt, "metrics", metrics);
    bench_cpu(&mut g, &rt, "bulkhead", bulkhead);
    bench_cpu(&mut g, &rt, "auth", auth);
    bench_cpu(&mut g, &rt, "ratelimit", ratelimit);
    g.finish();
}

fn auth_layer() -> tower_patterns::auth::AuthLayer {
    let auth = AuthConfig::new()
        .api_keys(ApiKeys::new().key("bench", KEY, ["x"]).unwrap())
        .build()
        .unwrap();
    // As `reverse_proxy --gateway` (session 17): the limiters key on the route, nothing
    // after the key check reads the `Identity` extension, so none is put in.
    auth.layer().require_scopes(["x"]).identity_extension(false)
}

fn quota() -> Quota {
    let n = |n| std::num::NonZeroU32::new(n).unwrap();
    Quota::per_second(n(1_000_000)).allow_burst(n(1_000_000))
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

#[path = "util/backend.rs"]
mod backend;
// Only the thread CPU clock is used here: everything of a `gateway/*` bench (client, stack,
// backend) runs on this thread's current-thread runtime, so it is the CPU per request,
// which other processes on a shared machine do not inflate as they do wall time.
#[allow(dead_code)]
#[path = "util/cpuclock.rs"]
mod cpuclock;
