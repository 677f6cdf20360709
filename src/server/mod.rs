//! A small HTTP/1.1 and HTTP/2 accept loop for examples, tests and workers.
//!
//! Every example of this crate needs a server that records the client's address (for
//! `X-Forwarded-For`), can stop gracefully (stop accepting, let in-flight requests
//! finish, then return — what a rolling restart needs to drain a worker), and holds up
//! against slow or hostile clients: every wait has a timeout, bodies and heads have a
//! size limit, connections have a cap, and running out of file descriptors pauses
//! accepting instead of spinning ([`ServerConfig`]). axum users can keep `axum::serve`;
//! this helper exists so the core does not depend on axum.
//!
//! Two ways to run it: [`Server`] on whatever tokio runtime calls it (one multi-thread
//! runtime: [`runtime`]), or [`Workers`], thread-per-core — one current-thread runtime,
//! `SO_REUSEPORT` listener and service instance per worker thread, the model of nginx's
//! worker processes, with restarts that pass the listening sockets to the next process
//! ([`Workers::handoff_socket`], [`Workers::inherit`]) or bind next to it
//! ([`Workers::take_over`]).
//! Both run the same accept loop with the same limits, and serve HTTP/1.1 and HTTP/2 (h2c
//! prior knowledge, or h2 by TLS ALPN) on one port; an [`Accept`] implementation plugs
//! TLS in (`tls::ServerTls`, feature `tls`; [`Server::serve_with_acceptor`],
//! [`Workers::acceptor`]). See `docs/protocols.md`.
//!
//! The service is cloned once per connection, and that instance serves all the
//! connection's requests (hyper-util's `TowerToHyperService` clones it for every request);
//! a request that finds it not ready waits on it while the connection goes on with a fresh
//! clone. State a service keeps per instance therefore lasts as long as the connection.
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

mod accept;
mod anchor;
mod balance;
mod config;
mod conn;
mod conn_service;
mod detect;
#[cfg(target_os = "linux")]
mod handoff;
mod head_timer;
mod lease;
mod listen;
mod on_wake;
mod serve;
mod small_writes;
mod workers;

pub use config::ServerConfig;
#[cfg(target_os = "linux")]
pub use handoff::{HandoffError, Inherited, HANDOFF_TIMEOUT};
pub use lease::ConnectionLease;
pub use listen::{Accept, PlainTcp, Protocol};
pub use workers::{WorkerId, Workers, WorkersHandle};

pub(crate) use small_writes::SmallWrites;

use std::future::Future;
use std::sync::Arc;

use http::{Request, Response};
use hyper::body::Incoming;
use tokio::net::TcpListener;
use tower_service::Service;

use self::serve::serve_loop;
use crate::BoxError;

/// Serves `svc` on `listener` until the process ends, with the default
/// [`ServerConfig`]. See [`serve_with_shutdown`].
pub async fn serve<S, B>(listener: TcpListener, svc: S) -> std::io::Result<()>
where
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    Server::builder().serve(listener, svc).await
}

/// Serves `svc` on `listener` with the default [`ServerConfig`]; when `shutdown`
/// completes, stops accepting, lets open connections finish their in-flight requests
/// (keep-alive connections are closed after their current response), and returns.
///
/// Each request carries the peer address as a [`ClientAddr`](crate::proxy::ClientAddr) extension and, when it
/// has a body, the body limits as a [`BodyLimits`](crate::proxy::BodyLimits) extension. Accept errors (such as running out of file
/// descriptors) pause accepting briefly instead of ending the server.
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
    Server::builder()
        .serve_with_shutdown(listener, svc, shutdown)
        .await
}

/// An HTTP/1.1 and HTTP/2 server with the limits of a [`ServerConfig`].
///
/// ```no_run
/// use std::time::Duration;
/// use tower_patterns::server::Server;
///
/// # async fn run() -> std::io::Result<()> {
/// # let svc = tower::service_fn(|_req: http::Request<hyper::body::Incoming>| async {
/// #     Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Empty::<bytes::Bytes>::new()))
/// # });
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
/// Server::builder()
///     .max_connections(4096)
///     .body_timeout(Some(Duration::from_secs(10)))
///     .max_body_bytes(Some(100 * 1024 * 1024))
///     .serve(listener, svc)
///     .await
/// # }
/// ```
#[derive(Debug, Clone, Default)]
pub struct Server {
    config: ServerConfig,
}

impl Server {
    /// A server with the default [`ServerConfig`], to adjust with the setters.
    pub fn builder() -> Server {
        Server::default()
    }

    /// A server with `config`.
    pub fn with_config(config: ServerConfig) -> Server {
        Server { config }
    }

    /// The configuration in effect.
    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    /// See [`ServerConfig::header_read_timeout`].
    pub fn header_read_timeout(mut self, t: std::time::Duration) -> Self {
        self.config.header_read_timeout = t;
        self
    }

    /// See [`ServerConfig::body_timeout`].
    pub fn body_timeout(mut self, t: Option<std::time::Duration>) -> Self {
        self.config.body_timeout = t;
        self
    }

    /// See [`ServerConfig::max_body_bytes`].
    pub fn max_body_bytes(mut self, n: Option<u64>) -> Self {
        self.config.max_body_bytes = n;
        self
    }

    /// See [`ServerConfig::max_header_bytes`].
    pub fn max_header_bytes(mut self, n: usize) -> Self {
        self.config.max_header_bytes = n;
        self
    }

    /// See [`ServerConfig::max_headers`].
    pub fn max_headers(mut self, n: usize) -> Self {
        self.config.max_headers = n;
        self
    }

    /// See [`ServerConfig::max_connections`] (at least 1).
    pub fn max_connections(mut self, n: usize) -> Self {
        self.config.max_connections = n;
        self
    }

    /// See [`ServerConfig::drain_timeout`].
    pub fn drain_timeout(mut self, t: std::time::Duration) -> Self {
        self.config.drain_timeout = t;
        self
    }

    /// See [`ServerConfig::accept_backoff`].
    pub fn accept_backoff(mut self, t: std::time::Duration) -> Self {
        self.config.accept_backoff = t;
        self
    }

    /// See [`ServerConfig::http2`].
    pub fn http2(mut self, enabled: bool) -> Self {
        self.config.http2 = enabled;
        self
    }

    /// See [`ServerConfig::h2_max_concurrent_streams`].
    pub fn h2_max_concurrent_streams(mut self, n: u32) -> Self {
        self.config.h2_max_concurrent_streams = n;
        self
    }

    /// See [`ServerConfig::h2_keep_alive_interval`] and
    /// [`ServerConfig::h2_keep_alive_timeout`].
    pub fn h2_keep_alive(
        mut self,
        interval: Option<std::time::Duration>,
        timeout: std::time::Duration,
    ) -> Self {
        self.config.h2_keep_alive_interval = interval;
        self.config.h2_keep_alive_timeout = timeout;
        self
    }

    /// Serves `svc` on `listener` until the process ends.
    pub async fn serve<S, B>(self, listener: TcpListener, svc: S) -> std::io::Result<()>
    where
        S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: http_body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        self.serve_with_shutdown(listener, svc, std::future::pending())
            .await
    }

    /// Serves `svc` on `listener` until `shutdown` completes, then drains (see
    /// [`serve_with_shutdown`]).
    pub async fn serve_with_shutdown<S, B, F>(
        self,
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
        self.serve_with_acceptor(listener, PlainTcp, svc, shutdown)
            .await
    }

    /// Like [`serve_with_shutdown`](Self::serve_with_shutdown), with `acceptor` turning
    /// each accepted connection into the stream HTTP is spoken over (TLS:
    /// `tls::ServerTls`, feature `tls`).
    pub async fn serve_with_acceptor<A, S, B, F>(
        self,
        listener: TcpListener,
        acceptor: A,
        svc: S,
        shutdown: F,
    ) -> std::io::Result<()>
    where
        A: Accept,
        S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: http_body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
        F: Future<Output = ()>,
    {
        serve_loop(
            self.config,
            listener,
            svc,
            Arc::new(acceptor),
            shutdown,
            None,
        )
        .await
    }

    /// Serves `svc` on a free port of 127.0.0.1 in a background task (see
    /// [`spawn_local`]).
    pub async fn spawn_local<S, B>(self, svc: S) -> std::io::Result<LocalServer>
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
        let task = tokio::spawn(self.serve_with_shutdown(listener, svc, async {
            // Only `shutdown()` stops it: a dropped handle (sender gone) keeps it serving.
            if stopped.await.is_err() {
                std::future::pending::<()>().await;
            }
        }));
        Ok(LocalServer { addr, stop, task })
    }
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
    Server::builder().spawn_local(svc).await
}
