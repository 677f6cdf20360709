//! Thread-per-core serving: N workers, each a current-thread tokio runtime on its own
//! thread with its own `SO_REUSEPORT` listener and its own service instance.
//!
//! On a multi-thread runtime every connection's wake-ups may hop threads, and every
//! request path shares the upstream connection pools across cores; measured at four
//! cores, four independent single-threaded proxies served 45–55 % more than one proxy with
//! four tokio workers (issue 12). Here the kernel spreads connections over the workers'
//! listeners, and a worker keeps a connection, its requests and its upstream connections
//! on one thread: nothing is shared on the request path except what the user shares on
//! purpose through an `Arc` (a balancer's membership, health and breaker state).
//!
//! Each worker applies the same [`ServerConfig`]; the connection cap is split:
//! `max_connections / workers` per worker (at least 1), so that a worker's cap is checked
//! without touching the others'.
//!
//! The kernel's hash leaves a few hundred long-lived connections uneven over the workers;
//! by default a worker hands a connection it just accepted to a less-loaded worker, before
//! the TLS handshake or any request, so that their open connections differ by at most one
//! ([`Workers::balance_connections`]; the only cross-worker step, once per connection).
//!
//! ## Restarts without downtime
//! A new process binds the same address with [`Workers::take_over`] while the old one still
//! serves; the old one is then shut down ([`WorkersHandle::shutdown`], e.g. on `SIGTERM`):
//! it stops accepting, serves what its accept queues already hold, finishes its in-flight
//! requests within [`ServerConfig::drain_timeout`], and exits. See
//! [`Workers::take_over`] for why new connections must be steered away from the old
//! sockets first, and for the one window that steering leaves open.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use http::{Request, Response};
use hyper::body::Incoming;
use tokio::sync::watch;
use tower_service::Service;

use super::anchor;
use super::balance::Balance;
use super::listen::{reuseport_listener, steer_to_newest, Accept, PlainTcp};
use super::serve::serve_loop;
use super::{Server, ServerConfig};
use crate::BoxError;

/// Which worker a service instance is built for: `0..workers` (`default()` is worker 0,
/// for code shared with a single-runtime [`Server`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkerId(usize);

impl WorkerId {
    /// The worker's index, `0..workers`.
    pub fn index(self) -> usize {
        self.0
    }
}

impl fmt::Display for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "worker-{}", self.0)
    }
}

/// Builder of a thread-per-core server.
///
/// ```no_run
/// use tower_patterns::server::{Workers, WorkerId};
///
/// # fn main() -> std::io::Result<()> {
/// let handle = Workers::new(4).spawn("127.0.0.1:8080".parse().unwrap(), |id: WorkerId| {
///     // Built on the worker's own thread: its own upstream pools live there.
///     tower::service_fn(move |_req: http::Request<hyper::body::Incoming>| async move {
///         Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(
///             bytes::Bytes::from(format!("served by {id}\n")),
///         )))
///     })
/// })?;
/// handle.join()
/// # }
/// ```
#[derive(Debug)]
pub struct Workers<A = PlainTcp> {
    workers: usize,
    config: ServerConfig,
    acceptor: Arc<A>,
    take_over: Option<u32>,
    backlog: i32,
    balance: bool,
}

impl Workers {
    /// `workers` workers (at least 1) with the default [`ServerConfig`].
    pub fn new(workers: usize) -> Self {
        Workers {
            workers: workers.max(1),
            config: ServerConfig::default(),
            acceptor: Arc::new(PlainTcp),
            take_over: None,
            backlog: 1024,
            balance: true,
        }
    }

    /// One worker per CPU the process may run on.
    pub fn per_core() -> Self {
        Workers::new(std::thread::available_parallelism().map_or(1, |n| n.get()))
    }
}

impl<A: Accept> Workers<A> {
    /// The limits every worker applies; `max_connections` is the total, split evenly.
    pub fn config(mut self, config: ServerConfig) -> Self {
        self.config = config;
        self
    }

    /// The limits of `server` (see [`config`](Self::config)).
    pub fn server(self, server: Server) -> Self {
        let config = server.config().clone();
        self.config(config)
    }

    /// How accepted connections are turned into the stream HTTP is spoken over (TLS:
    /// `tls::ServerTls`, whose clones share one reloadable certificate); [`PlainTcp`] by
    /// default.
    pub fn acceptor<B: Accept>(self, acceptor: B) -> Workers<B> {
        Workers {
            workers: self.workers,
            config: self.config,
            acceptor: Arc::new(acceptor),
            take_over: self.take_over,
            backlog: self.backlog,
            balance: self.balance,
        }
    }

    /// Listen backlog of each worker's socket (default 1024).
    pub fn backlog(mut self, backlog: u32) -> Self {
        self.backlog = i32::try_from(backlog).unwrap_or(i32::MAX);
        self
    }

    /// Whether the workers even out their connections (default: yes).
    ///
    /// The kernel spreads connections over the workers' `SO_REUSEPORT` sockets by a hash
    /// of their addresses, which leaves a few hundred long-lived connections uneven (55
    /// against 74 of 129 measured): the busier worker sets the latency while the other
    /// idles. With balancing, a worker that accepts a connection while holding more than
    /// the least-loaded worker hands it over, before the TLS handshake or any request, so
    /// that open connections differ by at most one between workers (as HAProxy spreads
    /// them over its threads). It costs a channel send and a wake-up of the other worker
    /// per connection handed over, nothing per request.
    pub fn balance_connections(mut self, on: bool) -> Self {
        self.balance = on;
        self
    }

    /// Binds next to a running process that listens on the same address with
    /// `previous_sockets` `SO_REUSEPORT` sockets (its worker count), and steers every new
    /// connection to this server's sockets (Linux; elsewhere [`spawn`](Self::spawn)
    /// fails with `Unsupported`).
    ///
    /// Without steering the kernel keeps hashing new connections to the old sockets
    /// until they close, and closing a listener resets the connections waiting in its
    /// accept queue. With it, once this server listens the old process receives no new
    /// connection while all its sockets are open. The steering undoes itself when the old
    /// sockets close if `previous_sockets >= workers` (the usual restart with the same
    /// count); with fewer, the group's spreading stays uneven until this process restarts.
    ///
    /// One window remains: when the first old socket closes, the kernel moves the group's
    /// last socket into its slot, so the program's indices no longer all exist, and until
    /// the last old socket has closed a connection can fall back to the kernel's hash and
    /// land on an old socket after its final accept, which its close then resets. Under
    /// load that is rare but real (the restart test failed 1 of about 40 runs here). Linux
    /// 5.14+ closes it with `sysctl net.ipv4.tcp_migrate_req=1`, which moves such
    /// connections to another socket of the group instead of resetting them; passing the
    /// listening sockets to the new process (HAProxy's `-x`) avoids closing them at all
    /// and is not built.
    pub fn take_over(mut self, previous_sockets: usize) -> Self {
        self.take_over = Some(u32::try_from(previous_sockets).unwrap_or(u32::MAX));
        self
    }

    /// Binds `addr` once per worker (port 0: a free port, the same for all), starts the
    /// workers, and returns at once. `make_service` is called once on each worker's thread.
    ///
    /// Binding errors are returned here; a worker that fails later reports it through
    /// [`WorkersHandle::join`].
    pub fn spawn<F, S, B>(self, addr: SocketAddr, make_service: F) -> io::Result<WorkersHandle>
    where
        F: Fn(WorkerId) -> S + Send + Sync + 'static,
        S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: http_body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        let first = reuseport_listener(addr, self.backlog)?;
        let addr = first.local_addr()?;
        let mut listeners = vec![first];
        for _ in 1..self.workers {
            listeners.push(reuseport_listener(addr, self.backlog)?);
        }
        if let Some(previous) = self.take_over {
            let ours = u32::try_from(self.workers).unwrap_or(u32::MAX);
            steer_to_newest(&listeners[0], previous, ours)?;
        }

        let mut config = self.config;
        config.max_connections = (config.max_connections / self.workers).max(1);
        let (stop, stopped) = watch::channel(false);
        let make_service = Arc::new(make_service);
        let mut balances: Vec<Option<Balance>> = if self.balance && self.workers > 1 {
            Balance::group(self.workers, config.max_connections)
                .into_iter()
                .map(Some)
                .collect()
        } else {
            (0..self.workers).map(|_| None).collect()
        };
        let mut threads = Vec::with_capacity(self.workers);
        for ((i, listener), balance) in listeners.into_iter().enumerate().zip(balances.drain(..)) {
            let id = WorkerId(i);
            let config = config.clone();
            let acceptor = self.acceptor.clone();
            let make_service = make_service.clone();
            let shutdown = shutdown_signal(stopped.clone());
            let spawned = std::thread::Builder::new()
                .name(id.to_string())
                .spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()?;
                    rt.block_on(async move {
                        let listener = tokio::net::TcpListener::from_std(listener)?;
                        let svc = make_service(id);
                        // Keeps arming the requests' timers free of wake-up syscalls
                        // (see `anchor`), for as long as the worker serves.
                        let _anchor = anchor::spawn();
                        serve_loop(config, listener, svc, acceptor, shutdown, balance).await
                    })
                    // Dropping the runtime ends what the drain timeout left running.
                });
            match spawned {
                Ok(thread) => threads.push(thread),
                Err(e) => {
                    // Stop the workers already started rather than leave them unowned.
                    stop.send_replace(true);
                    return Err(e);
                }
            }
        }
        Ok(WorkersHandle {
            addr,
            stop,
            threads,
        })
    }
}

/// Completes when the handle signals shutdown; a dropped handle leaves workers serving.
async fn shutdown_signal(mut stopped: watch::Receiver<bool>) {
    if stopped.wait_for(|s| *s).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Running [`Workers`]: their address, a shutdown signal, and their threads.
#[derive(Debug)]
pub struct WorkersHandle {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    threads: Vec<std::thread::JoinHandle<io::Result<()>>>,
}

impl WorkersHandle {
    /// The address every worker listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// How many workers run.
    pub fn workers(&self) -> usize {
        self.threads.len()
    }

    /// Tells every worker to stop accepting and drain (non-blocking; see
    /// [`join`](Self::join) to wait).
    pub fn shutdown(&self) {
        // `send_replace`: the signal holds even when no worker is waiting on it yet.
        self.stop.send_replace(true);
    }

    /// Waits (blocking the thread) until every worker has stopped; the first error of a
    /// worker, if any.
    pub fn join(self) -> io::Result<()> {
        let WorkersHandle { stop, threads, .. } = self;
        let mut result = Ok(());
        for t in threads {
            let r = t
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("a worker thread panicked")));
            if result.is_ok() {
                result = r;
            }
        }
        drop(stop);
        result
    }

    /// [`shutdown`](Self::shutdown), then waits for every worker without blocking the
    /// calling async task.
    pub async fn shutdown_and_wait(self) -> io::Result<()> {
        self.shutdown();
        tokio::task::spawn_blocking(move || self.join())
            .await
            .map_err(io::Error::other)?
    }
}
