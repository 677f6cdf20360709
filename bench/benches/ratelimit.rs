//! The rate limiter per call: this crate's `RateLimitLayer` (GCRA per client address over
//! governor, bounded key table) against `governor` alone and `tower::limit::RateLimit`, in
//! the same run.
//!
//! - `governor/*`: governor's keyed limiter (`check_key`, its own dashmap store) and its
//!   direct (one bucket) limiter: the floor our layer builds on; `ours_limiter_*` is our
//!   `LocalLimiter::decide` (governor's GCRA over our bounded store) on the same keys.
//! - `tower/*`: a `tower::Service` around an always-ready inner service, polled once with a
//!   no-op waker: `baseline` (no limiter), `tower_limit` (tower's one-bucket `RateLimit`,
//!   no keys), `ours_1key` and `ours_10k_keys` (`RateLimitLayer` + `ClientIpKey` +
//!   `LocalLimiter`, one client or 10 000 rotating clients), `ours_route_key` (`RouteKey`:
//!   one bucket for the route, resolved when the layer is built, the gateway bench's
//!   case); `governor/keyed_route_key` and
//!   `ours_limiter_route_key` are the same key without the service around it.
//!
//! Quotas are large enough that every call is admitted: the cost of admitting is what a
//! gateway pays on every request.
//!
//! `cargo bench -p tower-patterns-bench --bench ratelimit -- --warm-up-time 1 --measurement-time 3`

use std::convert::Infallible;
use std::future::Future;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::num::NonZeroU32;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use governor::{Quota, RateLimiter};
use http::{Request, Response};
use tower::Service;
use tower_layer::Layer;
use tower_patterns::client_addr::ClientAddr;
use tower_patterns::ratelimit::{ClientIpKey, LocalLimiter, RateLimitLayer, RouteKey};

#[inline]
fn poll_now<F: Future>(fut: F) -> F::Output {
    let mut fut = pin!(fut);
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return v;
        }
    }
}

#[derive(Clone, Copy)]
struct Ready;

impl Service<Request<()>> for Ready {
    type Response = Response<()>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Response<()>, Infallible>>;
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, _req: Request<()>) -> Self::Future {
        std::future::ready(Ok(Response::new(())))
    }
}

fn quota() -> Quota {
    // Never refuses within a bench run.
    Quota::per_second(NonZeroU32::MAX)
}

fn ip(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | (i % 10_000)))
}

/// The same request for every tower case: a client address extension (what our server or
/// `ClientAddrLayer` sets), so the baseline pays the request construction too.
fn request(i: u32) -> Request<()> {
    let mut req = Request::new(());
    req.extensions_mut()
        .insert(ClientAddr(SocketAddr::new(ip(i), 40000)));
    req
}

fn drive<S>(svc: &mut S, req: Request<()>)
where
    S: Service<Request<()>>,
    S::Error: std::fmt::Debug,
{
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(r) = svc.poll_ready(&mut cx) {
            r.unwrap();
            break;
        }
    }
    let _ = black_box(poll_now(svc.call(req)));
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();

    let mut g = c.benchmark_group("ratelimit/governor");
    let keyed = RateLimiter::dashmap(quota());
    g.bench_function("keyed_1key", |b| {
        b.iter(|| black_box(keyed.check_key(&ip(0)).is_ok()))
    });
    let keyed = RateLimiter::dashmap(quota());
    let mut i = 0u32;
    g.bench_function("keyed_10k_keys", |b| {
        b.iter(|| {
            i = i.wrapping_add(1);
            black_box(keyed.check_key(&ip(i)).is_ok())
        })
    });
    // Our LocalLimiter alone (bounded store over governor's GCRA), same keys.
    let ours: LocalLimiter<IpAddr> = LocalLimiter::new(quota());
    g.bench_function("ours_limiter_1key", |b| {
        b.iter(|| black_box(ours.decide(Some(&ip(0)))))
    });
    let ours: LocalLimiter<IpAddr> = LocalLimiter::new(quota());
    let mut i = 0u32;
    g.bench_function("ours_limiter_10k_keys", |b| {
        b.iter(|| {
            i = i.wrapping_add(1);
            black_box(ours.decide(Some(&ip(i))))
        })
    });
    // One route key looked up per request (what `RouteKey` cost before its bucket was
    // resolved when the layer is built; `ours_route_key` below is the resolved one),
    // governor vs ours.
    let route: std::sync::Arc<str> = "orders".into();
    let keyed = RateLimiter::dashmap(quota());
    g.bench_function("keyed_route_key", |b| {
        b.iter(|| black_box(keyed.check_key(&route.clone()).is_ok()))
    });
    let ours: LocalLimiter<std::sync::Arc<str>> = LocalLimiter::new(quota());
    g.bench_function("ours_limiter_route_key", |b| {
        b.iter(|| black_box(ours.decide(Some(&route.clone()))))
    });
    let direct = RateLimiter::direct(quota());
    g.bench_function("direct", |b| b.iter(|| black_box(direct.check().is_ok())));
    g.finish();

    let mut g = c.benchmark_group("ratelimit/tower");
    let mut i = 0u32;
    let mut next = move || {
        i = i.wrapping_add(1);
        i
    };
    let mut svc = Ready;
    g.bench_function("baseline", |b| b.iter(|| drive(&mut svc, request(next()))));
    let mut svc = tower::limit::RateLimitLayer::new(u64::MAX, Duration::from_secs(1)).layer(Ready);
    g.bench_function("tower_limit", |b| {
        b.iter(|| drive(&mut svc, request(next())))
    });
    let mut svc = RateLimitLayer::new(ClientIpKey::new(), LocalLimiter::new(quota())).layer(Ready);
    g.bench_function("ours_1key", |b| b.iter(|| drive(&mut svc, request(0))));
    let mut svc =
        RateLimitLayer::new(RouteKey::new("orders"), LocalLimiter::new(quota())).layer(Ready);
    g.bench_function("ours_route_key", |b| b.iter(|| drive(&mut svc, request(0))));
    let mut svc = RateLimitLayer::new(ClientIpKey::new(), LocalLimiter::new(quota())).layer(Ready);
    g.bench_function("ours_10k_keys", |b| {
        b.iter(|| drive(&mut svc, request(next())))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
