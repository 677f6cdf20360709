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
//! Two ways (Linux), both ending with the old process draining: it stops accepting,
//! finishes its in-flight requests within [`ServerConfig::drain_timeout`], and exits.
//!
//! - **Socket handoff** (HAProxy's `-x`; use it where you can): the old process serves a
//!   unix socket ([`Workers::handoff_socket`]); the new one receives the listening sockets
//!   themselves ([`Inherited::receive`], [`Workers::inherit`]), tells the old one it serves
//!   them, and the old one shuts down by itself. No socket is ever closed, so no
//!   connection waiting in an accept queue is reset: zero failed requests, by
//!   construction.
//! - **Take-over** ([`Workers::take_over`]): the new process binds new `SO_REUSEPORT`
//!   sockets next to the old ones and steers new connections to them; the old one is then
//!   shut down ([`WorkersHandle::shutdown`], e.g. on `SIGTERM`). For setups that cannot
//!   pass descriptors (other user, other container); it leaves a small window, see there.

use std::fmt;
use std::io;
use std::net::SocketAddr;
#[cfg(target_os = "linux")]
use std::path::PathBuf;
use std::sync::Arc;
#[cfg(target_os = "linux")]
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use tokio::sync::watch;
use tower_service::Service;

mod handle;

pub(crate) use handle::Phase;
pub use handle::WorkersHandle;

use handle::shutdown_signal;

use super::anchor;
use super::balance::Balance;
#[cfg(target_os = "linux")]
use super::handoff::{self, HandoffServer, Inherited, HANDOFF_TIMEOUT};
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
    #[cfg(target_os = "linux")]
    restart: Restart,
}

/// The socket handoff settings of a [`Workers`] (Linux).
#[cfg(target_os = "linux")]
#[derive(Debug, Default)]
struct Restart {
    /// Sockets received from the process being replaced.
    inherited: Option<Inherited>,
    /// Where this process hands its sockets to the next one.
    handoff: Option<PathBuf>,
    timeout: Option<Duration>,
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
            #[cfg(target_os = "linux")]
            restart: Restart::default(),
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
            #[cfg(target_os = "linux")]
            restart: self.restart,
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
    /// load that is rare but real (a restart test failed 1 of about 40 runs here). Linux
    /// 5.14+ closes it with `sysctl net.ipv4.tcp_migrate_req=1`, which moves such
    /// connections to another socket of the group instead of resetting them. Passing the
    /// listening sockets to the new process closes none ([`inherit`](Self::inherit)):
    /// prefer it where both processes run as the same user on one host.
    pub fn take_over(mut self, previous_sockets: usize) -> Self {
        self.take_over = Some(u32::try_from(previous_sockets).unwrap_or(u32::MAX));
        self
    }

    /// Serves the sockets received from the process being replaced instead of binding
    /// new ones (Linux; see [`Inherited::receive`]). Once the workers accept from them,
    /// [`spawn`](Self::spawn) tells the old process, which then stops accepting and
    /// drains; the sockets stay open here, so nothing in their accept queues is lost.
    ///
    /// With more workers than sockets received, the extra workers bind new sockets into
    /// the same `SO_REUSEPORT` group (spread by the kernel's hash). With fewer, a worker
    /// also accepts from the sockets left over (socket `i` goes to worker `i % workers`,
    /// without [`balance_connections`](Self::balance_connections) for those): a socket
    /// can leave the group only by closing, which would reset its queue, so every
    /// received socket keeps being served. The connection cap is split over the sockets.
    ///
    /// [`spawn`](Self::spawn) fails with [`HandoffError::AddressMismatch`] (as an
    /// `io::Error` whose inner error it is) if its address is not the one the sockets
    /// listen on, and with `InvalidInput` together with [`take_over`](Self::take_over).
    ///
    /// [`HandoffError::AddressMismatch`]: super::HandoffError::AddressMismatch
    #[cfg(target_os = "linux")]
    pub fn inherit(mut self, sockets: Inherited) -> Self {
        self.restart.inherited = Some(sockets);
        self
    }

    /// Hands this process's listening sockets to the next one over a unix socket at
    /// `path` (Linux): the socket handoff's old side. The file is created with mode
    /// `0600` (a socket file already there is replaced; [`spawn`](Self::spawn) fails
    /// with [`HandoffError::NotASocket`] if something else is), only a peer of the same
    /// user is served, and a peer that fails the exchange is refused with the workers
    /// still serving. After a handoff the workers shut down as by
    /// [`WorkersHandle::shutdown`]: [`WorkersHandle::join`] returns once they drained.
    ///
    /// [`HandoffError::NotASocket`]: super::HandoffError::NotASocket
    #[cfg(target_os = "linux")]
    pub fn handoff_socket(mut self, path: impl Into<PathBuf>) -> Self {
        self.restart.handoff = Some(path.into());
        self
    }

    /// How long each step of serving a handoff waits for the peer
    /// (default [`HANDOFF_TIMEOUT`]).
    #[cfg(target_os = "linux")]
    pub fn handoff_timeout(mut self, timeout: Duration) -> Self {
        self.restart.timeout = Some(timeout);
        self
    }

    /// Binds `addr` once per worker (port 0: a free port, the same for all), starts the
    /// workers, and returns at once. `make_service` is called once on each worker's thread.
    ///
    /// Binding errors are returned here; a worker that fails later reports it through
    /// [`WorkersHandle::join`].
    pub fn spawn<F, S, B>(
        #[cfg_attr(not(target_os = "linux"), allow(unused_mut))] mut self,
        addr: SocketAddr,
        make_service: F,
    ) -> io::Result<WorkersHandle>
    where
        F: Fn(WorkerId) -> S + Send + Sync + 'static,
        S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: http_body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        #[cfg(target_os = "linux")]
        let (listeners, addr, took) = match self.restart.inherited.take() {
            Some(inherited) => {
                let (listeners, addr, took) = self.inherited_listeners(inherited, addr)?;
                (listeners, addr, Some(took))
            }
            None => {
                let (listeners, addr) = self.bind(addr)?;
                (listeners, addr, None)
            }
        };
        #[cfg(not(target_os = "linux"))]
        let (listeners, addr) = self.bind(addr)?;

        let stop = Arc::new(watch::channel(Phase::Running).0);
        // Bound before any worker starts: a path that is not a socket fails the spawn
        // while the old process (if any) still serves alone.
        #[cfg(target_os = "linux")]
        let handoff = match &self.restart.handoff {
            Some(path) => {
                let timeout = self.restart.timeout.unwrap_or(HANDOFF_TIMEOUT);
                let server = HandoffServer::bind(path, timeout)?;
                let dups = listeners
                    .iter()
                    .map(|l| l.try_clone().map(std::os::fd::OwnedFd::from))
                    .collect::<io::Result<Vec<_>>>()?;
                Some((server, dups))
            }
            None => None,
        };

        // Socket `i` is served by worker `i % workers` (more sockets than workers only
        // when inherited from a process with more workers).
        let sockets = listeners.len();
        let mut assigned: Vec<Vec<std::net::TcpListener>> =
            (0..self.workers).map(|_| Vec::new()).collect();
        for (i, listener) in listeners.into_iter().enumerate() {
            assigned[i % self.workers].push(listener);
        }
        let mut config = self.config;
        config.max_connections = (config.max_connections / sockets.max(1)).max(1);
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
        for ((i, listeners), balance) in assigned.into_iter().enumerate().zip(balances.drain(..)) {
            let id = WorkerId(i);
            let config = config.clone();
            let acceptor = self.acceptor.clone();
            let make_service = make_service.clone();
            let stopped = stop.subscribe();
            let spawned = std::thread::Builder::new()
                .name(id.to_string())
                .spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()?;
                    rt.block_on(async move {
                        let svc = make_service(id);
                        // Keeps arming the requests' timers free of wake-up syscalls
                        // (see `anchor`), for as long as the worker serves.
                        let _anchor = anchor::spawn();
                        let mut listeners = listeners.into_iter();
                        let Some(first) = listeners.next() else {
                            return Ok(());
                        };
                        // Inherited sockets beyond one per worker: their own accept loops
                        // on this worker's runtime, so that no received queue goes unserved.
                        let mut extra = Vec::new();
                        for listener in listeners {
                            let listener = tokio::net::TcpListener::from_std(listener)?;
                            extra.push(tokio::spawn(serve_loop(
                                config.clone(),
                                listener,
                                svc.clone(),
                                acceptor.clone(),
                                shutdown_signal(stopped.clone()),
                                None,
                            )));
                        }
                        let first = tokio::net::TcpListener::from_std(first)?;
                        let shutdown = shutdown_signal(stopped);
                        let mut result =
                            serve_loop(config, first, svc, acceptor, shutdown, balance).await;
                        for task in extra {
                            let r = task.await.unwrap_or_else(|e| Err(io::Error::other(e)));
                            if result.is_ok() {
                                result = r;
                            }
                        }
                        result
                    })
                    // Dropping the runtime ends what the drain timeout left running.
                });
            match spawned {
                Ok(thread) => threads.push(thread),
                Err(e) => {
                    // Stop the workers already started rather than leave them unowned.
                    stop.send_replace(Phase::Drain);
                    return Err(e);
                }
            }
        }
        #[cfg(target_os = "linux")]
        let handoff = match handoff {
            Some((server, dups)) => match server.spawn(dups, stop.clone()) {
                Ok(thread) => Some(thread),
                Err(e) => {
                    stop.send_replace(Phase::Drain);
                    return Err(e);
                }
            },
            None => None,
        };
        // Every worker accepts from the inherited sockets now (or will at its first poll:
        // connections wait in the queues meanwhile): the old process may stop.
        #[cfg(target_os = "linux")]
        if let Some(took) = took {
            took.confirm();
        }
        Ok(WorkersHandle {
            addr,
            stop,
            threads,
            #[cfg(target_os = "linux")]
            handoff,
        })
    }

    /// Binds `addr` once per worker, steering to the new sockets after a take-over.
    fn bind(&self, addr: SocketAddr) -> io::Result<(Vec<std::net::TcpListener>, SocketAddr)> {
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
        Ok((listeners, addr))
    }

    /// The received sockets, plus new ones in their group if there are more workers.
    #[cfg(target_os = "linux")]
    fn inherited_listeners(
        &self,
        inherited: Inherited,
        addr: SocketAddr,
    ) -> io::Result<(Vec<std::net::TcpListener>, SocketAddr, handoff::Took)> {
        if self.take_over.is_some() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "take_over and inherit are two ways to restart: use one",
            ));
        }
        let got = inherited.local_addr();
        if got.ip() != addr.ip() || (addr.port() != 0 && addr.port() != got.port()) {
            return Err(super::HandoffError::AddressMismatch { wanted: addr, got }.into());
        }
        let (mut listeners, took) = inherited.into_parts();
        if listeners.len() < self.workers {
            // A program an earlier take-over left on the group would keep new sockets
            // idle; the kernel's hash spreads over all of them.
            handoff::steer_by_hash(&listeners[0])?;
            while listeners.len() < self.workers {
                listeners.push(reuseport_listener(got, self.backlog)?);
            }
        }
        Ok((listeners, got, took))
    }
}
