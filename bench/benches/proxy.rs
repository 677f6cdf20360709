//! In-process cost of the proxy building blocks, each next to its baseline in one run:
//! - `forward/*`: a request through `Forward` (own pool) vs the bare hyper-util pooled client to the
//!   same local backend (what our header handling, URI join and error mapping add); with
//!   `BENCH_CLOCK=cpu` in thread CPU time (`util/cpuclock.rs`), for a shared machine;
//! - `h2_upstream/*`: 64 concurrent requests through one `Forward` to an upstream speaking
//!   HTTP/1.1 (the keep-alive pool opens up to 64 connections) vs HTTP/2 (h2c prior knowledge,
//!   all 64 multiplexed over one connection); same backend (hyper's auto server), same run;
//! - `headers/*`: hop-by-hop stripping on a typical request;
//! - `classify/*`: classifying a response with a parsed `Condition`.

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use http::{Request, Response};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower::{Service, ServiceExt};
use tower_patterns::classify::{Classifier, Classify, Condition};
use tower_patterns::proxy::{strip_hop_by_hop, Forward, ForwardBuilder, Protocol};

fn forward(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let addr = backend::backend(&rt);
    let url = format!("http://{addr}");
    let mut g = c.benchmark_group("forward");
    let bare: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new())
        .build(hyper_util::client::legacy::connect::HttpConnector::new());
    let uri: http::Uri = format!("{url}/x").parse().unwrap();
    // `iter_custom` + `cpuclock::measure`: with `BENCH_CLOCK=cpu` the thread's CPU time,
    // which on this current-thread runtime is the whole exchange (client, connection
    // task and backend), free of the scheduler noise of a shared machine.
    g.bench_function("bare_hyper_util_client", |b| {
        b.iter_custom(|iters| {
            cpuclock::measure(|| {
                rt.block_on(async {
                    for _ in 0..iters {
                        let res = bare.get(uri.clone()).await.unwrap();
                        res.into_body().collect().await.unwrap();
                    }
                })
            })
        })
    });
    let fwd = Forward::<Empty<Bytes>>::new(&url).unwrap();
    g.bench_function("tower_patterns_forward", |b| {
        b.iter_custom(|iters| {
            let mut fwd = fwd.clone();
            cpuclock::measure(|| {
                rt.block_on(async {
                    for _ in 0..iters {
                        let req = Request::get("/x")
                            .header("host", "bench")
                            .body(Empty::new())
                            .unwrap();
                        let res = fwd.ready().await.unwrap().call(req).await.unwrap();
                        res.into_body().collect().await.unwrap();
                    }
                })
            })
        })
    });
    g.finish();
}

/// 64 concurrent clients, each one request per iteration: the h1 pool against one h2
/// connection. Criterion reports the time per batch of 64.
fn h2_upstream(c: &mut Criterion) {
    const CLIENTS: usize = 64;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let addr = backend::auto_backend(&rt);
    let mut g = c.benchmark_group("h2_upstream");
    g.throughput(criterion::Throughput::Elements(CLIENTS as u64));
    for (name, protocol) in [("h1_pool_64", Protocol::Http1), ("h2_64", Protocol::Http2)] {
        let fwd: Forward<Empty<Bytes>> = ForwardBuilder::new(format!("http://{addr}"))
            .protocol(protocol)
            .build()
            .unwrap();
        g.bench_function(name, |b| {
            b.to_async(&rt).iter(|| {
                let calls = (0..CLIENTS).map(|_| {
                    let mut fwd = fwd.clone();
                    async move {
                        let req = Request::get("/x")
                            .header("host", "bench")
                            .body(Empty::new())
                            .unwrap();
                        let res = fwd.ready().await.unwrap().call(req).await.unwrap();
                        res.into_body().collect().await.unwrap();
                    }
                });
                futures_util::future::join_all(calls)
            })
        });
    }
    g.finish();
}

fn headers(c: &mut Criterion) {
    let base = Request::get("/")
        .header("host", "example.com")
        .header("user-agent", "bench/1.0")
        .header("accept", "*/*")
        .header("accept-encoding", "gzip")
        .header("connection", "keep-alive")
        .body(())
        .unwrap();
    let mut g = c.benchmark_group("headers");
    g.bench_function("clone_only", |b| b.iter(|| base.headers().clone()));
    g.bench_function("clone_and_strip_hop_by_hop", |b| {
        b.iter(|| {
            let mut h = base.headers().clone();
            strip_hop_by_hop(&mut h);
            h
        })
    });
    g.finish();
}

fn classify(c: &mut Criterion) {
    let cond: Condition = "404,5xx,fail".parse().unwrap();
    let req = Request::new(());
    let res = Response::builder().status(503).body(()).unwrap();
    c.bench_function("classify/condition_response", |b| {
        b.iter(|| {
            std::hint::black_box(&cond)
                .classify_request(&req)
                .classify_response(std::hint::black_box(&res))
        })
    });
}

#[path = "util/backend.rs"]
mod backend;
#[path = "util/cpuclock.rs"]
mod cpuclock;

criterion_group!(benches, forward, h2_upstream, headers, classify);
criterion_main!(benches);
