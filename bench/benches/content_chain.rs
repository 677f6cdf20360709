//! Overhead of the content chain when its first link answers, against the bare service:
//! - `content_chain/first_link_answers/*`: in-process leaf services (no sockets), so the
//!   figures are the layers' own cost;
//! - `content_chain/over_forward/*`: the links are `Forward`s to a local HTTP backend, the
//!   realistic case (a request through `Forward` alone vs through the chain).
//!
//! `cargo bench -p tower-patterns-bench --bench content_chain -- --warm-up-time 1 --measurement-time 3`

use std::convert::Infallible;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_patterns::body::ReplayBody;
use tower_patterns::chain::{ChainLayer, LinkLayer, LinkTable};
use tower_patterns::classify::Condition;

type Body = Full<Bytes>;

fn answer<T>(_req: Request<T>) -> std::future::Ready<Result<Response<Body>, Infallible>> {
    std::future::ready(Ok(Response::new(Full::new(Bytes::from_static(b"hello")))))
}

fn not_found<T>(_req: Request<T>) -> std::future::Ready<Result<Response<Body>, Infallible>> {
    let mut res = Response::new(Full::new(Bytes::from_static(b"nope")));
    *res.status_mut() = StatusCode::NOT_FOUND;
    std::future::ready(Ok(res))
}

fn request() -> Request<Body> {
    // Static header values: like hyper's parsed headers (slices of a shared buffer), they
    // clone without allocating, as a copy for the next link does.
    use http::HeaderValue;
    Request::get("/a.txt")
        .header("host", HeaderValue::from_static("foo.com"))
        .header("accept", HeaderValue::from_static("*/*"))
        .header("user-agent", HeaderValue::from_static("bench"))
        .body(Full::new(Bytes::new()))
        .unwrap()
}

async fn drive<S>(svc: &mut S)
where
    S: Service<Request<Body>>,
    S::Error: std::fmt::Debug,
{
    let res = svc.ready().await.unwrap().call(request()).await;
    assert!(res.is_ok());
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let cond: Condition = "404".parse().unwrap();
    let mut g = c.benchmark_group("content_chain/first_link_answers");

    let mut bare = tower::service_fn(answer::<Body>);
    g.bench_function(BenchmarkId::from_parameter("bare"), |b| {
        b.iter(|| rt.block_on(drive(&mut bare)))
    });

    let mut one = ServiceBuilder::new()
        .layer(ChainLayer::new())
        .layer(LinkLayer::new(
            cond.clone(),
            tower::service_fn(answer::<ReplayBody<Body>>),
        ))
        .service(tower::service_fn(answer::<ReplayBody<Body>>));
    g.bench_function(BenchmarkId::from_parameter("chain_2_links"), |b| {
        b.iter(|| rt.block_on(drive(&mut one)))
    });

    let mut three = ServiceBuilder::new()
        .layer(ChainLayer::new())
        .layer(LinkLayer::new(
            cond.clone(),
            tower::service_fn(answer::<ReplayBody<Body>>),
        ))
        .layer(LinkLayer::new(
            cond.clone(),
            tower::service_fn(answer::<ReplayBody<Body>>),
        ))
        .service(tower::service_fn(answer::<ReplayBody<Body>>));
    g.bench_function(BenchmarkId::from_parameter("chain_3_links"), |b| {
        b.iter(|| rt.block_on(drive(&mut three)))
    });

    let mut table = LinkTable::<Body>::builder()
        .vhost("foo.com", tower::service_fn(answer::<ReplayBody<Body>>))
        .vhost("bar.com", tower::service_fn(answer::<ReplayBody<Body>>))
        .link("foo.com", cond.clone(), "bar.com")
        .build()
        .unwrap();
    g.bench_function(BenchmarkId::from_parameter("link_table_2_links"), |b| {
        b.iter(|| rt.block_on(drive(&mut table)))
    });

    // For scale: one hop taken (first link 404, second answers).
    let mut hop = ServiceBuilder::new()
        .layer(ChainLayer::new())
        .layer(LinkLayer::new(
            cond,
            tower::service_fn(answer::<ReplayBody<Body>>),
        ))
        .service(tower::service_fn(not_found::<ReplayBody<Body>>));
    g.bench_function(BenchmarkId::from_parameter("chain_one_hop_taken"), |b| {
        b.iter(|| rt.block_on(drive(&mut hop)))
    });
    g.finish();
}

fn backend(rt: &tokio::runtime::Runtime) -> std::net::SocketAddr {
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|_r| async {
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        addr
    })
}

async fn drive_collect<S, B>(svc: &mut S)
where
    S: Service<Request<Body>, Response = Response<B>>,
    S::Error: std::fmt::Debug,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    use http_body_util::BodyExt;
    let res = svc.ready().await.unwrap().call(request()).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    res.into_body().collect().await.unwrap();
}

fn over_forward(c: &mut Criterion) {
    use tower_patterns::proxy::Forward;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let first = format!("http://{}", backend(&rt));
    let second = format!("http://{}", backend(&rt));
    let cond: Condition = "404".parse().unwrap();
    let mut g = c.benchmark_group("content_chain/over_forward");

    let mut bare: Forward<Body> = Forward::new(&first).unwrap();
    g.bench_function(BenchmarkId::from_parameter("bare_forward"), |b| {
        b.iter(|| rt.block_on(drive_collect(&mut bare)))
    });

    let next: Forward<ReplayBody<Body>> = Forward::new(&second).unwrap();
    let mut chain = ServiceBuilder::new()
        .layer(ChainLayer::new())
        .layer(LinkLayer::new(cond, next))
        .service(Forward::<ReplayBody<Body>>::new(&first).unwrap());
    g.bench_function(BenchmarkId::from_parameter("chain_2_links"), |b| {
        b.iter(|| rt.block_on(drive_collect(&mut chain)))
    });
    g.finish();
}

criterion_group!(benches, bench, over_forward);
criterion_main!(benches);
