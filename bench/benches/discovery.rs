//! Discovery hot paths, each next to a peer measured in the same run:
//! - `route`: our prefix `Router` dispatch vs axum's `Router` (`nest_service` + fallback).
//! - `instances_read`: `Watcher::len` (ArcSwap) vs a `tokio::sync::watch` borrow (RwLock).
//! - `discover_change`: applying one membership change among 100 instances (no peer).
//!
//! `cargo bench -p tower-patterns-bench --bench discovery -- --warm-up-time 1 --measurement-time 3`

use std::convert::Infallible;
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use futures_util::StreamExt;
use http::{Request, Response};
use http_body_util::Full;
use tower::ServiceExt;
use tower_patterns::discovery::{Instance, MemoryRegistry, Registry, Selector, Watcher};
use tower_patterns::route::{Backend, RouteTable};

type Leaf = tower::util::ServiceFn<
    fn(Request<Body>) -> std::future::Ready<Result<Response<Full<Bytes>>, Infallible>>,
>;

fn answer(_req: Request<Body>) -> std::future::Ready<Result<Response<Full<Bytes>>, Infallible>> {
    std::future::ready(Ok(Response::new(Full::new(Bytes::from_static(b"ok")))))
}

fn leaf() -> Leaf {
    tower::service_fn(answer as fn(_) -> _)
}

fn route(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let ours = RouteTable::new()
        .route("/api", "api-service")
        .route("/api/admin", "admin-service")
        .route("/", "webapp-service")
        .build(|_, _| Backend::fixed(leaf()))
        .unwrap();
    let axum = axum::Router::new()
        .nest_service("/api/admin", leaf())
        .nest_service("/api", leaf())
        .fallback_service(leaf());
    let mut g = c.benchmark_group("route");
    g.bench_function("tower_patterns::route::Router", |b| {
        b.to_async(&rt).iter(|| {
            let req = Request::get("/api/users/7").body(Body::empty()).unwrap();
            ours.clone().oneshot(req)
        })
    });
    g.bench_function("axum::Router (peer)", |b| {
        b.to_async(&rt).iter(|| {
            let req = Request::get("/api/users/7").body(Body::empty()).unwrap();
            axum.clone().oneshot(req)
        })
    });
    g.finish();
}

fn instances_read(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let reg = MemoryRegistry::new();
    let watcher = rt.block_on(async {
        for i in 0..10u16 {
            reg.register(
                &Instance::new("api", format!("a{i}"), "127.0.0.1", 8000 + i),
                Duration::from_secs(3600),
            )
            .await
            .unwrap();
        }
        let w = Watcher::new(&reg, "api", Selector::any());
        w.wait_until(|s| s.len() == 10).await;
        w
    });
    let (tx, rx) = tokio::sync::watch::channel(vec![0u8; 10]);
    let mut g = c.benchmark_group("instances_read");
    g.bench_function("Watcher::len (arc-swap)", |b| {
        b.iter(|| std::hint::black_box(watcher.len()))
    });
    g.bench_function("tokio watch borrow (peer)", |b| {
        b.iter(|| std::hint::black_box(rx.borrow().len()))
    });
    g.finish();
    drop(tx);
}

fn discover_change(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let reg = MemoryRegistry::new();
    let ttl = Duration::from_secs(3600);
    let (watcher, mut discover) = rt.block_on(async {
        for i in 0..100u16 {
            reg.register(
                &Instance::new("api", format!("a{i}"), "127.0.0.1", 8000 + i),
                ttl,
            )
            .await
            .unwrap();
        }
        let w = Watcher::new(&reg, "api", Selector::any());
        w.wait_until(|s| s.len() == 100).await;
        let mut d = w.discover(|i: &Instance| Ok::<_, Infallible>(i.port));
        for _ in 0..100 {
            d.next().await.unwrap().unwrap();
        }
        (w, d)
    });
    let mut port = 9000u16;
    c.bench_function(
        "discover_change/1_of_100 (register + watcher + diff)",
        |b| {
            b.iter_batched(
                || {
                    port = port.wrapping_add(1).max(9000);
                    Instance::new("api", "a7", "127.0.0.1", port)
                },
                |inst| {
                    rt.block_on(async {
                        reg.register(&inst, ttl).await.unwrap();
                        discover.next().await.unwrap().unwrap()
                    })
                },
                BatchSize::SmallInput,
            )
        },
    );
    drop(watcher);
}

criterion_group!(benches, route, instances_read, discover_change);
criterion_main!(benches);
