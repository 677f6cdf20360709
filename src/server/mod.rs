//! A small HTTP/1.1 accept loop for examples, tests and workers.
//!
//! Every example of this crate needs a server that records the client's address (for
//! `X-Forwarded-For`) and can stop gracefully: stop accepting, let in-flight requests
//! finish, then return — what a rolling restart needs to drain a worker. axum users can
//! keep `axum::serve`; this helper exists so the core does not depend on axum.
//!
//! ```no_run
//! use tower_patterns::server;
//!
//! # async fn run() -> std::io::Result<()> {
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let svc = tower::service_fn(|_req: http::Request<hyper::body::Incoming>| async {
//!     Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(
//!         bytes::Bytes::from("hi"),
//!     )))
//! });
//! server::serve_with_shutdown(listener, svc, async {
//!     let _ = tokio::signal::ctrl_c().await;
//! })
//! .await
//! # }
//! ```

use std::future::Future;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tower::ServiceExt;
use tower_service::Service;

use crate::proxy::ClientAddr;
use crate::BoxError;

/// Serves `svc` on `listener` until the process ends. See [`serve_with_shutdown`].
pub async fn serve<S, B>(listener: TcpListener, svc: S) -> std::io::Result<()>
where
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    serve_with_shutdown(listener, svc, std::future::pending()).await
}

/// Serves `svc` on `listener`; when `shutdown` completes, stops accepting, lets open
/// connections finish their in-flight requests (keep-alive connections are closed after
/// their current response), and returns.
///
/// Each request carries the peer address as a [`ClientAddr`] extension. Accept errors
/// (such as running out of file descriptors) are logged and retried after a short pause
/// instead of ending the server.
pub async fn serve_with_shutdown<S, B, F>(
    listener: TcpListener,
    svc: S,
    shutdown: F,
) -> std::io::Result<()>
where
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
    F: Future<Output = ()>,
{
    let graceful = GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30));
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            biased;
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let svc = svc.clone().map_request(move |mut req: Request<Incoming>| {
            req.extensions_mut().insert(ClientAddr(peer));
            req
        });
        let conn = http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(svc));
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, %peer, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// A tokio runtime for a proxy process with `threads` workers (default: the
/// `TOKIO_WORKER_THREADS` environment variable, else one per CPU).
///
/// One worker gets the current-thread scheduler — no cross-thread wake-ups, like one nginx
/// worker process; more get the multi-thread scheduler.
pub fn runtime(threads: Option<usize>) -> std::io::Result<tokio::runtime::Runtime> {
    let threads = threads.or_else(|| {
        std::env::var("TOKIO_WORKER_THREADS")
            .ok()
            .and_then(|t| t.parse().ok())
    });
    match threads {
        Some(1) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        Some(n) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n.max(1))
            .enable_all()
            .build(),
        None => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build(),
    }
}

/// A server started by [`spawn_local`]: its address, and a handle to stop it.
#[derive(Debug)]
pub struct LocalServer {
    addr: std::net::SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl LocalServer {
    /// The address it listens on.
    pub fn addr(&self) -> std::net::SocketAddr {
        self.addr
    }

    /// `http://` + [`addr`](Self::addr).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops accepting, drains in-flight requests (see [`serve_with_shutdown`]) and waits.
    pub async fn shutdown(self) -> std::io::Result<()> {
        let _ = self.stop.send(());
        self.task.await.map_err(std::io::Error::other)?
    }
}

/// Serves `svc` on a free port of 127.0.0.1 in a background task: what examples and tests
/// need for a backend or a front server. Dropping the handle leaves the server running.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> std::io::Result<()> {
/// let svc = tower::service_fn(|_req: http::Request<hyper::body::Incoming>| async {
///     Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Empty::<bytes::Bytes>::new()))
/// });
/// let server = tower_patterns::server::spawn_local(svc).await?;
/// let addr = server.addr();
/// assert!(addr.ip().is_loopback());
/// server.shutdown().await?;
/// // Stopped: the port no longer accepts.
/// assert!(tokio::net::TcpStream::connect(addr).await.is_err());
/// # Ok(())
/// # }
/// ```
pub async fn spawn_local<S, B>(svc: S) -> std::io::Result<LocalServer>
where
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(serve_with_shutdown(listener, svc, async {
        // Only `shutdown()` stops it: a dropped handle (sender gone) keeps it serving.
        if stopped.await.is_err() {
            std::future::pending::<()>().await;
        }
    }));
    Ok(LocalServer { addr, stop, task })
}
