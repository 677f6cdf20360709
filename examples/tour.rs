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
use tower::Layer;
use tower::ServiceBuilder;
use tower_patterns::backup::{MemorySink, TeeLayer};
use tower_patterns::balance::{Balance, PassiveHealth, ReplayLayer};
use tower_patterns::body::ReplayBody;
use tower_patterns::breaker::{CircuitBreakerConfig, CircuitBreakerLayer, CircuitOpen};
use tower_patterns::cache::{CacheLayer, MemoryStore};
use tower_patterns::chain::{ChainLayer, LinkTable};
use tower_patterns::classify::{Classifier, Classify, Condition};
use tower_patterns::discovery::{Instance, MemoryRegistry, Registration, Selector, Watcher};
use tower_patterns::proxy::{ErrorResponseLayer, ForwardBody, ForwardBuilder};
use tower_patterns::route::{Backend, RouteTable};
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
    Ok(server::spawn_local(svc).await?.addr())
}

/// A named backend: `/missing` is 404, everything else 200 naming the backend; answers
/// may be cached for a minute.
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
        res.headers_mut().insert(
            http::header::CACHE_CONTROL,
            http::HeaderValue::from_static("max-age=60"),
        );
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
    let b = server::spawn_local(backend("B")).await?;
    let b_addr = b.addr();
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
        .map_response(|res: Response<ForwardBody>| res.map(tower_patterns::body::boxed))
        .service(to_b);
    let a = start(a).await?;
    let (status, body) = get(a, "/data", "a.local").await?;
    println!("  B up:   GET /data -> {} {body:?}", status.as_u16());
    b.shutdown().await?;
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

async fn backup_and_cache() -> Result<(), BoxError> {
    section("backup tee + edge cache: one download feeds the client, a backup and the cache");
    let origin = start(backend("origin")).await?;
    let backup = MemorySink::new("backup");
    let tee = TeeLayer::new(backup.clone());
    let mut events = tee.subscribe();
    let edge = ServiceBuilder::new()
        .layer(ErrorResponseLayer)
        .layer(CacheLayer::new(MemoryStore::new(16 << 20)))
        .layer(tee)
        .service(ForwardBuilder::new(format!("http://{origin}")).build::<Incoming>()?);
    let edge = start(edge).await?;
    for _ in 0..2 {
        let (status, body) = get_with(edge, "/report.pdf", "x-cache").await?;
        println!("  GET /report.pdf -> {} {body}", status.as_u16());
    }
    let event = events.recv().await?;
    println!(
        "  backup of {}: {:?}; the backup now holds {:?}",
        event.key.as_str(),
        event.outcome,
        backup.keys()
    );
    Ok(())
}

/// GET returning the status and "`header`=value body".
async fn get_with(
    addr: SocketAddr,
    path: &str,
    header: &str,
) -> Result<(StatusCode, String), BoxError> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (mut tx, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let res = tx
        .send_request(
            Request::get(path)
                .header("host", "edge.local")
                .body(Full::new(Bytes::new()))?,
        )
        .await?;
    let status = res.status();
    let value = res
        .headers()
        .get(header)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_string();
    let body = res.into_body().collect().await?.to_bytes();
    Ok((
        status,
        format!("{header}={value} {:?}", String::from_utf8_lossy(&body)),
    ))
}

async fn balancer() -> Result<(), BoxError> {
    section("balance: round robin over three instances, passive health, retry on the next");
    let mut instances = Vec::new();
    let template = ForwardBuilder::new("http://127.0.0.1:1").build::<ReplayBody<Incoming>>()?;
    let mut endpoints = Vec::new();
    for name in ["instance-1", "instance-2", "instance-3"] {
        let instance = server::spawn_local(backend(name)).await?;
        endpoints.push((name.to_string(), template.to(&instance.url())?));
        instances.push(instance);
    }
    let lb = Balance::builder()
        .health(PassiveHealth::new(1, Duration::from_secs(10)))
        .build_static(endpoints);
    let status = lb.clone();
    let front = start(
        ServiceBuilder::new()
            .layer(ErrorResponseLayer)
            .layer(ReplayLayer::new(64 * 1024))
            .service(lb),
    )
    .await?;
    for _ in 0..3 {
        let (_, body) = get(front, "/", "lb.local").await?;
        println!("  GET / -> {body:?}");
    }
    instances.remove(1).shutdown().await?;
    println!("  instance-2 stopped");
    for _ in 0..4 {
        let (code, body) = get(front, "/", "lb.local").await?;
        println!("  GET / -> {} {body:?}", code.as_u16());
    }
    for e in status.endpoints() {
        println!("  {:<10} {:?}, {} failures", e.key, e.state, e.failures);
    }
    Ok(())
}

async fn discovery() -> Result<(), BoxError> {
    section("discovery + route: instances self-register, the gateway follows the registry");
    let registry = MemoryRegistry::new();
    let template = ForwardBuilder::new("http://127.0.0.1:1").build::<ReplayBody<Incoming>>()?;
    let router = RouteTable::new()
        .route("/api", "api-service")
        .build(|service, selector| {
            let watcher = Watcher::new(&registry, service, selector.clone());
            let (balance, driver) = Balance::builder().build(watcher.discover(template.clone()));
            tokio::spawn(driver);
            Backend::new(ReplayLayer::new(64 * 1024).layer(balance), watcher)
        })?;
    let watcher = Watcher::new(&registry, "api-service", Selector::any());
    let gateway = start(router).await?;
    let (code, body) = get(gateway, "/api/users", "gw.local").await?;
    println!(
        "  no instance yet:  GET /api/users -> {} {body:?}",
        code.as_u16()
    );
    let addr = start(backend("api-service@1")).await?;
    let instance = Instance::new("api-service", "api-1", addr.ip().to_string(), addr.port());
    let registration =
        Registration::new(registry.clone(), instance, Duration::from_secs(10)).await?;
    watcher.wait_until(|s| s.len() == 1).await;
    tokio::task::yield_now().await;
    let (code, body) = get(gateway, "/api/users", "gw.local").await?;
    println!(
        "  api-1 registered: GET /api/users -> {} {body:?}",
        code.as_u16()
    );
    registration.deregister().await?;
    watcher.wait_until(|s| s.is_empty()).await;
    let (code, body) = get(gateway, "/api/users", "gw.local").await?;
    println!(
        "  api-1 left:       GET /api/users -> {} {body:?}",
        code.as_u16()
    );
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    println!("tower-patterns tour (all servers on 127.0.0.1, free ports)");
    foundation().await?;
    content_chain().await?;
    circuit_breaker().await?;
    backup_and_cache().await?;
    balancer().await?;
    discovery().await?;
    println!("\ntour finished");
    Ok(())
}
