//! A tour of tower-patterns: every pattern on embedded defaults, on local ports only.
//!
//! ```text
//! cargo run --example tour
//! ```
//!
//! Each section starts real servers on 127.0.0.1, sends requests through the pattern and
//! prints what happened. Nothing outside this process is needed.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use tokio::net::TcpListener;
use tower::ServiceBuilder;
use tower_patterns::body::ReplayBody;
use tower_patterns::breaker::{CircuitBreakerConfig, CircuitBreakerLayer, CircuitOpen};
use tower_patterns::chain::{ChainLayer, LinkTable};
use tower_patterns::classify::{Classifier, Classify, Condition};
use tower_patterns::proxy::{ErrorResponseLayer, ForwardBuilder};
use tower_patterns::{server, BoxError};

/// Starts `svc` on a free local port.
async fn start<S, B>(svc: S) -> Result<SocketAddr, BoxError>
where
    S: tower::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(server::serve(listener, svc));
    Ok(addr)
}

/// A named backend: `/missing` is 404, everything else 200 naming the backend.
fn backend(
    name: &'static str,
) -> impl tower::Service<
    Request<Incoming>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl Send,
> + Clone {
    tower::service_fn(move |req: Request<Incoming>| async move {
        let mut res = Response::new(Full::new(Bytes::from(format!(
            "{name} answered {}",
            req.uri().path()
        ))));
        if req.uri().path() == "/missing" {
            *res.status_mut() = StatusCode::NOT_FOUND;
        }
        Ok::<_, Infallible>(res)
    })
}

async fn get(addr: SocketAddr, path: &str, host: &str) -> Result<(StatusCode, String), BoxError> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (mut tx, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let res = tx
        .send_request(
            Request::get(path)
                .header("host", host)
                .body(Full::new(Bytes::new()))?,
        )
        .await?;
    let status = res.status();
    let body = res.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).trim().to_string()))
}

fn section(title: &str) {
    println!("\n== {title}");
}

async fn foundation() -> Result<(), BoxError> {
    section("classify: one vocabulary for 'what is a failure'");
    let cond: Condition = "404,5xx,fail".parse()?;
    for code in [200u16, 404, 503] {
        let res = Response::builder().status(code).body(())?;
        let outcome = cond
            .classify_request(&Request::new(()))
            .classify_response(&res);
        println!("  condition {cond} on status {code}: {outcome:?}");
    }
    match "404,5x".parse::<Condition>() {
        Ok(_) => println!("  unexpected: bad condition accepted"),
        Err(e) => println!("  a typo is refused: {e}"),
    }

    section("proxy::Forward: a reverse proxy in front of one backend");
    let be = start(backend("backend-1")).await?;
    let fwd = ForwardBuilder::new(format!("http://{be}")).build::<Incoming>()?;
    let proxy = start(ServiceBuilder::new().layer(ErrorResponseLayer).service(fwd)).await?;
    let (status, body) = get(proxy, "/hello", "tour.local").await?;
    println!(
        "  GET /hello via proxy {proxy} -> {} {body:?}",
        status.as_u16()
    );

    let dead = {
        let l = TcpListener::bind("127.0.0.1:0").await?;
        l.local_addr()?
    };
    let fwd = ForwardBuilder::new(format!("http://{dead}")).build::<Incoming>()?;
    let proxy = start(ServiceBuilder::new().layer(ErrorResponseLayer).service(fwd)).await?;
    let (status, body) = get(proxy, "/hello", "tour.local").await?;
    println!(
        "  GET /hello via a proxy whose backend is down -> {} {body:?}",
        status.as_u16()
    );
    Ok(())
}

async fn content_chain() -> Result<(), BoxError> {
    section("chain: STON virtual-host link, foo.com -(404)-> bar.com");
    let storage = start(backend("storage")).await?;
    let origin = start(backend("origin")).await?;
    let fwd = ForwardBuilder::new(format!("http://{storage}")).build::<ReplayBody<Incoming>>()?;
    let to_origin = fwd.to(&format!("http://{origin}"))?;
    let table = LinkTable::builder()
        .vhost("foo.com", fwd)
        .vhost("bar.com", to_origin)
        .link("foo.com", "404".parse()?, "bar.com")
        .chain(ChainLayer::new().report_header(http::HeaderName::from_static("x-content-chain")))
        .build()?;
    let front = start(table).await?;
    for path in ["/logo.png", "/missing"] {
        let (status, body) = get(front, path, "foo.com").await?;
        println!("  GET foo.com{path} -> {} {body:?}", status.as_u16());
    }
    let refused = LinkTable::<Incoming>::builder()
        .vhost(
            "foo.com",
            ForwardBuilder::new(format!("http://{storage}")).build::<ReplayBody<Incoming>>()?,
        )
        .link("foo.com", "404".parse()?, "foo.com")
        .build();
    if let Err(e) = refused {
        println!("  foo.com -> foo.com is refused: {e}");
    }
    Ok(())
}

async fn circuit_breaker() -> Result<(), BoxError> {
    section("breaker: A calls B; B goes down, the circuit opens, a fallback answers");
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let b_addr = listener.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let b = tokio::spawn(server::serve_with_shutdown(listener, backend("B"), async {
        let _ = stopped.await;
    }));
    let layer = CircuitBreakerLayer::new(
        CircuitBreakerConfig::new()
            .name("B")
            .failure_rate_threshold(50.0)
            .minimum_calls(4)
            .window(tower_patterns::breaker::Window::Count(4))
            .wait_in_open(Duration::from_millis(300))
            .half_open_permits(1),
    )?
    .fallback_fn(|_req: Request<Incoming>, why: CircuitOpen| async move {
        let body = format!("fallback: cached answer ({why})");
        Ok::<_, Infallible>(Response::new(tower_patterns::body::boxed(Full::new(
            Bytes::from(body),
        ))))
    });
    let breaker = layer.breaker().clone();
    let mut states = breaker.subscribe();
    tokio::spawn(async move {
        while states.changed().await.is_ok() {
            let state = *states.borrow();
            println!("    [breaker B is now {state:?}]");
        }
    });
    let to_b = ForwardBuilder::new(format!("http://{b_addr}")).build::<Incoming>()?;
    let a = ServiceBuilder::new()
        .layer(ErrorResponseLayer)
        .layer(layer)
        .map_response(|res: Response<Incoming>| res.map(tower_patterns::body::boxed))
        .service(to_b);
    let a = start(a).await?;
    let (status, body) = get(a, "/data", "a.local").await?;
    println!("  B up:   GET /data -> {} {body:?}", status.as_u16());
    let _ = stop.send(());
    b.await??;
    for _ in 0..5 {
        let (status, body) = get(a, "/data", "a.local").await?;
        println!("  B down: GET /data -> {} {body:?}", status.as_u16());
    }
    let listener = TcpListener::bind(b_addr).await?;
    tokio::spawn(server::serve(listener, backend("B")));
    tokio::time::sleep(Duration::from_millis(350)).await;
    println!("  B is back; the next call is the half-open probe");
    let (status, body) = get(a, "/data", "a.local").await?;
    println!("  GET /data -> {} {body:?}", status.as_u16());
    tokio::task::yield_now().await;
    println!("  breaker state: {:?}", breaker.state());
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    println!("tower-patterns tour (all servers on 127.0.0.1, free ports)");
    foundation().await?;
    content_chain().await?;
    circuit_breaker().await?;
    println!("\ntour finished");
    Ok(())
}
