//! An axum 0.8 gateway built from this crate's patterns, mounted with no adapter code:
//!
//! | path | what answers |
//! |---|---|
//! | `/`, `/health` | local axum handlers |
//! | `/api/*` | round robin over two upstreams, retry on the next, passive health, behind a circuit breaker whose fallback answers while the upstreams fail |
//! | `/static/*` | the primary; on 404 the storage (content chain) |
//! | `/downloads/*` | the origin, every download teed to a directory |
//!
//! plus tower-http trace, timeout and request-id around everything, and
//! [`ClientAddrLayer`] so the upstreams get `X-Forwarded-For` under `axum::serve`.
//! Everything runs in-process on embedded defaults; the demo finishes by itself.
//!
//! ```text
//! cargo run --example axum_gateway
//! ```
//!
//! `tests/axum_gateway.rs` includes this file and drives the same gateway over sockets.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use tower::ServiceBuilder;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;
use tower_patterns::backup::{BackupEvent, FsSink, TeeLayer};
use tower_patterns::balance::{Balance, PassiveHealth, ReplayLayer, Retry};
use tower_patterns::body::ReplayBody;
use tower_patterns::breaker::{
    Circuit, CircuitBreakerConfig, CircuitBreakerLayer, CircuitOpen, Window,
};
use tower_patterns::chain::{ChainLayer, LinkLayer};
use tower_patterns::client_addr::ClientAddrLayer;
use tower_patterns::proxy::ForwardBuilder;
use tower_patterns::BoxError;

/// The in-process upstreams the gateway talks to.
pub struct Upstreams {
    /// The two `/api` instances.
    pub api: [SocketAddr; 2],
    /// While set, both `/api` instances answer 503.
    pub api_down: Arc<AtomicBool>,
    /// Serves `/static/logo.png` only.
    pub primary: SocketAddr,
    /// Serves every `/static/*` path.
    pub storage: SocketAddr,
    /// Serves `/downloads/*`.
    pub origin: SocketAddr,
}

/// Starts an axum app on an ephemeral 127.0.0.1 port.
pub async fn serve(app: Router) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let app = app.into_make_service_with_connect_info::<SocketAddr>();
        if let Err(e) = axum::serve(listener, app).await {
            eprintln!("server on {addr} stopped: {e}");
        }
    });
    Ok(addr)
}

/// Starts the upstreams.
pub async fn start_upstreams() -> std::io::Result<Upstreams> {
    let api_down = Arc::new(AtomicBool::new(false));
    let mut api = Vec::new();
    for name in ["api-a", "api-b"] {
        let down = api_down.clone();
        let app = Router::new().fallback(move |headers: http::HeaderMap| {
            let down = down.load(Ordering::SeqCst);
            async move {
                if down {
                    return (StatusCode::SERVICE_UNAVAILABLE, String::from("down\n"));
                }
                let xff = headers
                    .get("x-forwarded-for")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("-")
                    .to_owned();
                (StatusCode::OK, format!("{name} (for {xff})\n"))
            }
        });
        api.push(serve(app).await?);
    }
    let primary =
        serve(Router::new().route("/static/logo.png", get(|| async { "logo from primary\n" })))
            .await?;
    let storage = serve(
        Router::new()
            .fallback(|uri: http::Uri| async move { format!("{} from storage\n", uri.path()) }),
    )
    .await?;
    let origin = serve(
        Router::new()
            .fallback(|uri: http::Uri| async move { format!("contents of {}\n", uri.path()) }),
    )
    .await?;
    Ok(Upstreams {
        api: [api[0], api[1]],
        api_down,
        primary,
        storage,
        origin,
    })
}

/// What the caller may watch: the `/api` circuit and the backups.
pub struct Handles {
    /// The `/api` circuit.
    pub breaker: Circuit,
    /// One event per finished backup.
    pub backups: tokio::sync::broadcast::Receiver<BackupEvent>,
}

/// The gateway: only `.layer(..)`, `.route_service(..)` and `.fallback_service(..)`.
pub fn gateway(up: &Upstreams, downloads: PathBuf) -> Result<(Router, Handles), BoxError> {
    // /api/*: retry-able bodies, a breaker with a fallback, a balancer with health and retry.
    let template = ForwardBuilder::new("http://127.0.0.1:1")
        .connect_timeout(Duration::from_secs(1))
        .build::<ReplayBody<Body>>()?;
    let endpoints = [
        ("api-a", template.to(&format!("http://{}", up.api[0]))?),
        ("api-b", template.to(&format!("http://{}", up.api[1]))?),
    ];
    let balance = Balance::builder()
        .health(PassiveHealth::new(3, Duration::from_secs(10)))
        .retry(Retry::default())
        .build_static(endpoints);
    let breaker = CircuitBreakerLayer::new(
        CircuitBreakerConfig::new()
            .name("api")
            // The window is what `minimum_calls` is counted in: 4 calls, all failed, trip.
            .window(Window::Count(4))
            .minimum_calls(4)
            .failure_rate_threshold(50.0)
            .wait_in_open(Duration::from_secs(30)),
    )?
    .fallback_fn(
        |_req: Request<ReplayBody<Body>>, why: CircuitOpen| async move {
            // The fallback's own body type: nothing to build from the upstream's.
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(format!(
                "fallback: the api is resting ({why})\n"
            )))))
        },
    );
    let circuit = breaker.breaker().clone();
    let api = ServiceBuilder::new()
        .layer(ReplayLayer::new(64 * 1024).respond())
        .layer(breaker)
        .service(balance);

    // /static/*: the primary, then the storage on 404.
    let primary =
        ForwardBuilder::new(format!("http://{}", up.primary)).build::<ReplayBody<Body>>()?;
    let storage = primary.to(&format!("http://{}", up.storage))?;
    let statics = ServiceBuilder::new()
        .layer(ChainLayer::new().respond())
        .layer(LinkLayer::new("404".parse()?, storage))
        .service(primary);

    // /downloads/*: teed to a directory while the client downloads.
    let tee = TeeLayer::new(FsSink::new(downloads));
    let backups = tee.subscribe();
    let downloads = ServiceBuilder::new()
        .layer(tee.respond())
        .service(ForwardBuilder::new(format!("http://{}", up.origin)).build::<Body>()?);

    let app = Router::new()
        .route("/", get(|| async { "gateway\n" }))
        .route("/health", get(|| async { "ok\n" }))
        .route_service("/api/{*rest}", api)
        .route_service("/static/{*rest}", statics)
        .route_service("/downloads/{*rest}", downloads)
        .layer(
            ServiceBuilder::new()
                .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
                .layer(TraceLayer::new_for_http())
                .layer(TimeoutLayer::with_status_code(
                    StatusCode::GATEWAY_TIMEOUT,
                    Duration::from_secs(10),
                ))
                .layer(PropagateRequestIdLayer::x_request_id())
                .layer(ClientAddrLayer::new()),
        );
    Ok((
        app,
        Handles {
            breaker: circuit,
            backups,
        },
    ))
}

/// GET `path` from `addr`: status and body.
pub async fn fetch(addr: SocketAddr, path: &str) -> Result<(StatusCode, String), BoxError> {
    use http_body_util::BodyExt;
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (mut tx, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = Request::get(path)
        .header("host", "gateway.local")
        .body(http_body_util::Empty::<Bytes>::new())?;
    let res = tokio::time::timeout(Duration::from_secs(10), tx.send_request(req)).await??;
    let status = res.status();
    let body = res.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

#[allow(dead_code)] // the integration test includes this file without calling `main`
#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let up = start_upstreams().await?;
    let dir = std::env::temp_dir().join(format!("axum-gateway-{}", std::process::id()));
    let (app, mut handles) = gateway(&up, dir.clone())?;
    let gw = serve(app).await?;
    println!("gateway on {gw}");
    for path in [
        "/",
        "/api/users",
        "/api/users",
        "/static/logo.png",
        "/static/old.png",
        "/downloads/report.pdf",
    ] {
        let (status, body) = fetch(gw, path).await?;
        print!("GET {path:<22} -> {} {body}", status.as_u16());
    }
    let event = tokio::time::timeout(Duration::from_secs(10), handles.backups.recv()).await??;
    println!(
        "backup of {}: {:?} (in {})",
        event.key.as_str(),
        event.outcome,
        dir.display()
    );

    up.api_down.store(true, Ordering::SeqCst);
    println!("the api upstreams now answer 503");
    for _ in 0..5 {
        let (status, body) = fetch(gw, "/api/users").await?;
        print!("GET /api/users -> {} {body}", status.as_u16());
    }
    println!("circuit: {:?}", handles.breaker.state());
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
