//! The smallest reverse proxy: a front server that forwards every request to one backend.
//!
//! ```text
//! cargo run --example reverse_proxy_min                       # self-contained demo
//! cargo run --release --example reverse_proxy_min -- --serve \
//!     --listen 127.0.0.1:8080 --upstream http://127.0.0.1:9000  # run until killed
//! ```
//!
//! The demo starts a backend and the proxy on free ports, sends requests through the proxy,
//! shows the headers the backend saw (hop-by-hop gone, `X-Forwarded-*` set), then stops the
//! backend and shows the `502 Bad Gateway` that replaces a dropped connection.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use tokio::net::TcpListener;
use tower::ServiceBuilder;
use tower_patterns::proxy::{ErrorResponseLayer, ForwardBuilder};
use tower_patterns::{server, BoxError};

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

async fn run_proxy(listener: TcpListener, upstream: &str) -> Result<(), BoxError> {
    let forward = ForwardBuilder::new(upstream)
        .connect_timeout(Duration::from_secs(1))
        .response_timeout(Duration::from_secs(30))
        .build::<Incoming>()?;
    let svc = ServiceBuilder::new()
        .layer(ErrorResponseLayer)
        .service(forward);
    server::serve(listener, svc).await?;
    Ok(())
}

/// A backend that reports the headers it received.
async fn backend(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let mut seen = String::new();
    for (k, v) in req.headers() {
        seen.push_str(&format!("    {k}: {}\n", v.to_str().unwrap_or("?")));
    }
    Ok(Response::new(Full::new(Bytes::from(format!(
        "backend saw {} {}\n{seen}",
        req.method(),
        req.uri()
    )))))
}

async fn get(proxy: SocketAddr, path: &str) -> Result<(u16, String), BoxError> {
    let stream = tokio::net::TcpStream::connect(proxy).await?;
    let (mut tx, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = Request::get(path)
        .header("host", "demo.local")
        .header("connection", "keep-alive, x-session-secret")
        .header("x-session-secret", "hop-by-hop: must not reach the backend")
        .body(Full::new(Bytes::new()))?;
    let res = tx.send_request(req).await?;
    let status = res.status().as_u16();
    let body = res.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

fn main() -> Result<(), BoxError> {
    // TOKIO_WORKER_THREADS=1: the current-thread scheduler, like one nginx worker.
    server::runtime(None)?.block_on(async {
        if std::env::args().any(|a| a == "--serve") {
            let listen = arg("--listen").unwrap_or_else(|| "127.0.0.1:8080".into());
            let upstream = arg("--upstream").ok_or("--upstream http://host:port is required")?;
            let listener = TcpListener::bind(&listen).await?;
            eprintln!("proxy on {listen} -> {upstream}");
            return run_proxy(listener, &upstream).await;
        }
        demo().await
    })
}

async fn demo() -> Result<(), BoxError> {
    let be_listener = TcpListener::bind("127.0.0.1:0").await?;
    let be_addr = be_listener.local_addr()?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let be = tokio::spawn(server::serve_with_shutdown(
        be_listener,
        tower::service_fn(backend),
        async {
            let _ = stop_rx.await;
        },
    ));

    let proxy_listener = TcpListener::bind("127.0.0.1:0").await?;
    let proxy_addr = proxy_listener.local_addr()?;
    let upstream = format!("http://{be_addr}");
    tokio::spawn(async move {
        if let Err(e) = run_proxy(proxy_listener, &upstream).await {
            eprintln!("proxy failed: {e}");
        }
    });
    println!("backend on {be_addr}, proxy on {proxy_addr}\n");

    let (status, body) = get(proxy_addr, "/hello?lang=en").await?;
    println!("GET /hello?lang=en through the proxy -> {status}\n{body}");

    let _ = stop_tx.send(());
    be.await??;
    println!("backend stopped");
    let (status, body) = get(proxy_addr, "/hello").await?;
    println!("GET /hello through the proxy -> {status} {}", body.trim());
    Ok(())
}
