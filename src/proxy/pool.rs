//! A lean connection pool, one per upstream: keep-alive HTTP/1.1 connections, or one
//! shared HTTP/2 connection.
//!
//! hyper-util's legacy client spawns a task per request to learn when a connection is idle,
//! boxes several futures and hashes a pool key on every call. A reverse proxy knows its
//! upstreams up front, so each `Forward` holds its upstream's pool directly: checkout is a
//! short uncontended lock and a scan from the most recently used connection, and a
//! connection goes back as soon as its response headers arrived (HTTP/1 `SendRequest`
//! reports itself not ready until the body is done, so it cannot be double-booked).
//!
//! An HTTP/2 upstream gets one connection that every request multiplexes over (its
//! `SendRequest` is a cheap clone). It is opened single-flight: the first requests of a
//! burst share one connect instead of racing to open one each. When it closes (`GOAWAY`,
//! a broken socket) the next request opens the next one. Requests over the upstream's
//! `SETTINGS_MAX_CONCURRENT_STREAMS` wait in hyper's queue for a free stream.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::future::{BoxFuture, Shared};
use futures_util::FutureExt;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use tokio::time::Instant;

use super::body::BodyFault;
use super::connect::{Conn, Connector, Protocol};
use super::error::ForwardError;
use super::h2::{reset_error, to_h2};
use super::upstream::Upstream;
use crate::BoxError;

#[derive(Debug, Clone)]
pub(crate) struct PoolConfig {
    pub connect_timeout: Option<Duration>,
    pub idle_timeout: Duration,
    pub max_idle: usize,
    pub protocol: Protocol,
    pub h2_keep_alive: Option<(Duration, Duration)>,
    #[cfg(feature = "tls")]
    pub tls: Option<crate::tls::ClientTls>,
}

struct Idle<B> {
    tx: http1::SendRequest<B>,
    since: Instant,
}

/// What a single-flight connect produced, shared by everyone who waited for it.
enum Opened<B> {
    H2(http2::SendRequest<B>),
    /// The upstream chose HTTP/1.1: one waiter takes the connection, the others open
    /// their own on the HTTP/1.1 path.
    H1(Arc<Mutex<Option<http1::SendRequest<B>>>>),
}

impl<B> Clone for Opened<B> {
    fn clone(&self) -> Self {
        match self {
            Opened::H2(tx) => Opened::H2(tx.clone()),
            Opened::H1(slot) => Opened::H1(slot.clone()),
        }
    }
}

type SharedConnect<B> = Shared<BoxFuture<'static, Result<Opened<B>, Arc<ForwardError>>>>;

struct H2Slot<B> {
    conn: Option<http2::SendRequest<B>>,
    connecting: Option<SharedConnect<B>>,
    /// When a request last started on `conn`: an h2 connection unused for the pool's idle
    /// timeout is replaced (a NAT or firewall may have dropped it silently meanwhile).
    last_used: Instant,
}

/// What the upstream spoke on its last new connection.
const UNKNOWN: u8 = 0;
const SPOKE_H1: u8 = 1;
const SPOKE_H2: u8 = 2;

/// The pool of one upstream.
pub(crate) struct HostPool<B> {
    upstream: Upstream,
    connector: Arc<Connector>,
    idle: Mutex<Vec<Idle<B>>>,
    h2: Mutex<H2Slot<B>>,
    learned: AtomicU8,
    config: Arc<PoolConfig>,
}

/// All pools of one `ForwardBuilder::build`, so `Forward::to` shares connections.
pub(crate) struct Pools<B> {
    hosts: Mutex<HashMap<String, Arc<HostPool<B>>>>,
    config: Arc<PoolConfig>,
    /// The webpki-roots configuration for `https://` upstreams when none was given: made
    /// once, so all of them share one session store (resumption).
    #[cfg(feature = "tls")]
    default_tls: std::sync::OnceLock<crate::tls::ClientTls>,
}

impl<B> Pools<B> {
    pub(crate) fn new(config: PoolConfig) -> Self {
        Pools {
            hosts: Mutex::new(HashMap::new()),
            config: Arc::new(config),
            #[cfg(feature = "tls")]
            default_tls: std::sync::OnceLock::new(),
        }
    }

    /// The pool for `upstream` (created on first use). Not on the request path.
    pub(crate) fn host(&self, upstream: &Upstream) -> Result<Arc<HostPool<B>>, ForwardError> {
        let mut hosts = self.hosts.lock().unwrap_or_else(PoisonError::into_inner);
        // Keyed by scheme and authority: `http://a:443` and `https://a:443` are different
        // connections; two path prefixes on one origin share them.
        let key = upstream.origin();
        if let Some(pool) = hosts.get(&key) {
            return Ok(pool.clone());
        }
        #[cfg(feature = "tls")]
        let tls = match (&self.config.tls, upstream.is_https()) {
            (Some(tls), _) => Some(tls),
            (None, true) => Some(
                self.default_tls
                    .get_or_init(crate::tls::ClientTls::webpki_roots),
            ),
            (None, false) => None,
        };
        let connector = Connector::new(
            upstream,
            self.config.connect_timeout,
            self.config.protocol,
            self.config.h2_keep_alive,
            #[cfg(feature = "tls")]
            tls,
        )?;
        let pool = Arc::new(HostPool {
            upstream: upstream.clone(),
            connector: Arc::new(connector),
            idle: Mutex::new(Vec::new()),
            h2: Mutex::new(H2Slot {
                conn: None,
                connecting: None,
                last_used: Instant::now(),
            }),
            learned: AtomicU8::new(UNKNOWN),
            config: self.config.clone(),
        });
        hosts.insert(key, pool.clone());
        Ok(pool)
    }

    pub(crate) fn connect_timeout(&self) -> Option<Duration> {
        self.config.connect_timeout
    }
}

impl<B> HostPool<B> {
    /// How this upstream is dialled (for connections that never join the pool).
    pub(crate) fn connector(&self) -> &Arc<Connector> {
        &self.connector
    }

    pub(crate) fn upstream(&self) -> &Upstream {
        &self.upstream
    }
}

impl<B> HostPool<B>
where
    B: http_body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    /// A ready idle connection, most recently used first; closed and expired ones are
    /// dropped on the way.
    fn checkout(&self) -> Option<http1::SendRequest<B>> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let mut i = idle.len();
        let mut now = None;
        while i > 0 {
            i -= 1;
            let c = &idle[i];
            if c.tx.is_closed() {
                idle.swap_remove(i);
                continue;
            }
            if !c.tx.is_ready() {
                continue;
            }
            let now = *now.get_or_insert_with(Instant::now);
            if now.duration_since(c.since) > self.config.idle_timeout {
                idle.swap_remove(i);
                continue;
            }
            return Some(idle.swap_remove(i).tx);
        }
        None
    }

    fn checkin(&self, tx: http1::SendRequest<B>) {
        if tx.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < self.config.max_idle {
            idle.push(Idle {
                tx,
                since: Instant::now(),
            });
        }
    }

    /// Sends `req` on a pooled or new connection, HTTP/2 when the upstream speaks it.
    ///
    /// The paths that are not "a pooled HTTP/1.1 connection" (connecting, TLS, HTTP/2) are
    /// boxed where they start: their futures are large, and inline they would make every
    /// request's future as large, which is moved into its box on each call (a memcpy of a
    /// few KiB a request in issue 12's profile). A pooled request pays no box for them.
    pub(crate) async fn send(&self, req: Request<B>) -> Result<Response<Incoming>, ForwardError> {
        if self.connector.may_be_h2() && self.learned.load(Ordering::Relaxed) != SPOKE_H1 {
            return Box::pin(self.send_shared(req)).await;
        }
        // The pooled case directly: one future less that the request is moved through.
        match self.checkout() {
            Some(tx) => self.send_h1_on(tx, true, req).await,
            None => Box::pin(self.send_h1(req)).await,
        }
    }

    /// The HTTP/1.1 path. A pooled connection that turns out to be closed before the
    /// request was written is retried once on a fresh one: the request never left, so
    /// this is safe for every method. A fresh connection on which the upstream chose
    /// HTTP/2 by ALPN becomes the shared one.
    async fn send_h1(&self, req: Request<B>) -> Result<Response<Incoming>, ForwardError> {
        let (tx, pooled) = match self.checkout() {
            Some(tx) => (tx, true),
            // Reached boxed from `send`: no box of its own needed here.
            None => match self.connector.connect().await? {
                Conn::H1(tx) => (tx, false),
                Conn::H2(tx) => return Box::pin(self.send_h2(self.adopt_h2(tx), req, false)).await,
            },
        };
        self.send_h1_on(tx, pooled, req).await
    }

    async fn send_h1_on(
        &self,
        mut tx: http1::SendRequest<B>,
        pooled: bool,
        req: Request<B>,
    ) -> Result<Response<Incoming>, ForwardError> {
        let res = match tx.try_send_request(req).await {
            Ok(res) => res,
            Err(mut e) => match e.take_message() {
                Some(req) if pooled => {
                    tracing::debug!(error = %e.error(), "pooled connection was closed; reconnecting");
                    tx = match Box::pin(self.connector.connect()).await? {
                        Conn::H1(tx) => tx,
                        Conn::H2(tx) => {
                            return Box::pin(self.send_h2(self.adopt_h2(tx), req, false)).await
                        }
                    };
                    tx.send_request(req).await.map_err(|e| self.transport(e))?
                }
                _ => return Err(self.transport(e.into_error())),
            },
        };
        self.checkin(tx);
        Ok(res)
    }

    /// The path while the upstream is known or expected to speak HTTP/2.
    async fn send_shared(&self, req: Request<B>) -> Result<Response<Incoming>, ForwardError> {
        let (opened, fresh) = match self.live_h2() {
            Some(tx) => (Opened::H2(tx), false),
            None => (self.connect_shared().await?, true),
        };
        match opened {
            Opened::H2(tx) => self.send_h2(tx, req, !fresh).await,
            Opened::H1(slot) => {
                self.learned.store(SPOKE_H1, Ordering::Relaxed);
                let taken = slot.lock().unwrap_or_else(PoisonError::into_inner).take();
                match taken {
                    Some(tx) => self.send_h1_on(tx, false, req).await,
                    None => self.send_h1(req).await,
                }
            }
        }
    }

    fn live_h2(&self) -> Option<http2::SendRequest<B>> {
        let mut slot = self.h2.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        let idle = now.saturating_duration_since(slot.last_used) > self.config.idle_timeout;
        slot.last_used = now;
        match &slot.conn {
            Some(tx) if !idle && !tx.is_closed() => Some(tx.clone()),
            // Dropping this handle lets the old connection close once its open streams
            // are done; the next request opens a new one.
            _ => {
                slot.conn = None;
                None
            }
        }
    }

    /// Makes `tx` the shared HTTP/2 connection (unless a live one is there already).
    fn adopt_h2(&self, tx: http2::SendRequest<B>) -> http2::SendRequest<B> {
        self.learned.store(SPOKE_H2, Ordering::Relaxed);
        let mut slot = self.h2.lock().unwrap_or_else(PoisonError::into_inner);
        if slot.conn.as_ref().is_none_or(|c| c.is_closed()) {
            slot.conn = Some(tx.clone());
            slot.last_used = Instant::now();
        }
        tx
    }

    /// Opens the shared connection, once for all who ask while it is being opened.
    async fn connect_shared(&self) -> Result<Opened<B>, ForwardError> {
        let attempt = {
            let mut slot = self.h2.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(tx) = slot.conn.as_ref().filter(|tx| !tx.is_closed()) {
                return Ok(Opened::H2(tx.clone()));
            }
            match &slot.connecting {
                Some(attempt) => attempt.clone(),
                None => {
                    let connector = self.connector.clone();
                    let attempt = async move {
                        match connector.connect::<B>().await {
                            Ok(Conn::H2(tx)) => Ok(Opened::H2(tx)),
                            Ok(Conn::H1(tx)) => Ok(Opened::H1(Arc::new(Mutex::new(Some(tx))))),
                            Err(e) => Err(Arc::new(e)),
                        }
                    }
                    .boxed()
                    .shared();
                    slot.connecting = Some(attempt.clone());
                    attempt
                }
            }
        };
        let res = attempt.clone().await;
        {
            let mut slot = self.h2.lock().unwrap_or_else(PoisonError::into_inner);
            if slot.connecting.as_ref().is_some_and(|a| a.ptr_eq(&attempt)) {
                slot.connecting = None;
                if let Ok(Opened::H2(tx)) = &res {
                    slot.conn = Some(tx.clone());
                    slot.last_used = Instant::now();
                    self.learned.store(SPOKE_H2, Ordering::Relaxed);
                }
            }
        }
        res.map_err(|e| shared_error(&e))
    }

    /// Sends over the shared HTTP/2 connection. When a reused connection turns out to be
    /// closed before the request left, one fresh connection is tried.
    async fn send_h2(
        &self,
        mut tx: http2::SendRequest<B>,
        mut req: Request<B>,
        reused: bool,
    ) -> Result<Response<Incoming>, ForwardError> {
        to_h2(
            &mut req,
            self.upstream.scheme(),
            self.upstream.authority_ref(),
        );
        match tx.try_send_request(req).await {
            Ok(res) => Ok(res),
            Err(mut e) => match e.take_message() {
                Some(req) if reused => {
                    tracing::debug!(error = %e.error(), "HTTP/2 connection was closed; reconnecting");
                    match self.connect_shared().await? {
                        Opened::H2(mut tx) => {
                            tx.send_request(req).await.map_err(|e| self.transport(e))
                        }
                        // The upstream switched to HTTP/1.1 between two connections; the
                        // request is in HTTP/2 shape already: fail it, the next one goes
                        // the HTTP/1.1 way.
                        Opened::H1(slot) => {
                            self.learned.store(SPOKE_H1, Ordering::Relaxed);
                            let taken = slot.lock().unwrap_or_else(PoisonError::into_inner).take();
                            if let Some(tx) = taken {
                                self.checkin(tx);
                            }
                            Err(self.transport(e.into_error()))
                        }
                    }
                }
                _ => Err(self.transport(e.into_error())),
            },
        }
    }

    /// A failed exchange: the client's body fault if hyper's error chain holds one (the
    /// client broke it, not the upstream), an HTTP/2 stream reset, else a transport
    /// failure of the upstream.
    fn transport(&self, e: hyper::Error) -> ForwardError {
        let mut cur = std::error::Error::source(&e);
        while let Some(s) = cur {
            match s.downcast_ref::<BodyFault>() {
                Some(BodyFault::TooLarge(limit)) => {
                    return ForwardError::ClientBodyTooLarge { limit: *limit }
                }
                Some(BodyFault::Idle(after)) => {
                    return ForwardError::ClientBodyTimeout { after: *after }
                }
                Some(BodyFault::Read(_)) => {
                    return ForwardError::ClientBody {
                        source: Box::new(e),
                    }
                }
                None => cur = s.source(),
            }
        }
        #[cfg(feature = "tls")]
        if let Some(alert) = super::connect::handshake_refused(&e) {
            tracing::debug!(error = %e, "upstream refused the TLS handshake");
            return ForwardError::Tls {
                upstream: self.upstream.authority().to_string(),
                source: Box::new(alert),
            };
        }
        match reset_error(self.upstream.authority(), e) {
            Ok(reset) => reset,
            Err(e) => ForwardError::Transport {
                upstream: self.upstream.authority().to_string(),
                source: Box::new(e),
            },
        }
    }
}

/// The error of a shared connect attempt for one of the requests that waited for it:
/// the same variant, the original as the source (so a `rustls::Error` is still found in
/// the chain).
fn shared_error(e: &Arc<ForwardError>) -> ForwardError {
    let cause = || -> BoxError { Box::new(SharedCause(e.clone())) };
    match &**e {
        ForwardError::ConnectTimeout { upstream } => ForwardError::ConnectTimeout {
            upstream: upstream.clone(),
        },
        ForwardError::Tls { upstream, .. } => ForwardError::Tls {
            upstream: upstream.clone(),
            source: cause(),
        },
        ForwardError::LocalResource { upstream, source } => ForwardError::LocalResource {
            upstream: upstream.clone(),
            source: std::io::Error::new(source.kind(), SharedCause(e.clone())),
        },
        ForwardError::Connect { upstream, .. } => ForwardError::Connect {
            upstream: upstream.clone(),
            source: cause(),
        },
        // Connecting yields no other variant; keep it a connect failure all the same.
        other => ForwardError::Connect {
            upstream: other.to_string(),
            source: cause(),
        },
    }
}

/// The cause of a connect failure that several requests share.
#[derive(Debug)]
struct SharedCause(Arc<ForwardError>);

impl std::fmt::Display for SharedCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a connect attempt shared with other requests failed")
    }
}

impl std::error::Error for SharedCause {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        std::error::Error::source(&*self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::super::connect::connect_error;
    use super::*;
    use crate::classify::FailureKind;

    #[cfg(unix)]
    #[test]
    fn emfile_on_connect_is_a_local_error_not_the_upstreams() {
        let e = connect_error(
            "127.0.0.1:1".into(),
            std::io::Error::from_raw_os_error(libc::EMFILE),
        );
        assert!(matches!(e, ForwardError::LocalResource { .. }), "{e:?}");
        assert_eq!(e.kind(), FailureKind::Client);
        assert_eq!(e.status(), http::StatusCode::SERVICE_UNAVAILABLE);
        assert!(!e.is_connect());
        let refused = connect_error(
            "127.0.0.1:1".into(),
            std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
        );
        assert_eq!(refused.kind(), FailureKind::Transport);
    }
}
