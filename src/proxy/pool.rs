//! A lean connection pool, one per upstream: keep-alive HTTP/1.1 connections, or a few
//! shared HTTP/2 connections ([`super::h2pool`]).
//!
//! hyper-util's legacy client spawns a task per request to learn when a connection is idle,
//! boxes several futures and hashes a pool key on every call. A reverse proxy knows its
//! upstreams up front, so each `Forward` holds its upstream's pool directly: checkout is a
//! short uncontended lock and a scan from the most recently used connection, and a
//! connection goes back as soon as its response headers arrived (HTTP/1 `SendRequest`
//! reports itself not ready until the body is done, so it cannot be double-booked).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use tokio::time::Instant;

use super::h1;
use super::h2pool::H2Slot;

use super::body::BodyFault;
use super::connect::{Conn, Connector, Protocol};
use super::error::ForwardError;
use super::h2::reset_error;
use super::response_body::ForwardBody;
use super::upstream::Upstream;
use crate::BoxError;

#[derive(Debug, Clone)]
pub(crate) struct PoolConfig {
    pub connect_timeout: Option<Duration>,
    pub idle_timeout: Duration,
    pub max_idle: usize,
    pub protocol: Protocol,
    pub h2_keep_alive: Option<(Duration, Duration)>,
    /// Streams one HTTP/2 connection carries at most (also bounded by the upstream's).
    pub h2_max_streams: usize,
    /// HTTP/2 connections per upstream at most.
    pub h2_max_connections: usize,
    /// How long a request waits for a free HTTP/2 stream when every connection is full.
    pub acquire_timeout: Option<Duration>,
    #[cfg(feature = "tls")]
    pub tls: Option<crate::tls::ClientTls>,
}

struct Idle<B> {
    tx: http1::SendRequest<B>,
    since: Instant,
    /// The connection's response timer, kept armed between exchanges (see `future.rs`).
    timer: Option<ConnTimer>,
}

/// A pooled connection's response timer: one timer-wheel entry for the connection's life,
/// moved lazily, instead of an entry registered and removed for every request (~550
/// instructions a request, issue 12's profile).
pub(crate) type ConnTimer = Pin<Box<tokio::time::Sleep>>;

/// A connection taken from the pool.
pub(crate) struct Checkout<B> {
    pub(crate) tx: http1::SendRequest<B>,
    /// When it was taken: the exchange's start (one clock read serves the idle check,
    /// the response timeout and the next check-in).
    pub(crate) at: Instant,
    pub(crate) timer: Option<ConnTimer>,
}

/// What the upstream spoke on its last new connection.
const UNKNOWN: u8 = 0;
pub(super) const SPOKE_H1: u8 = 1;
pub(super) const SPOKE_H2: u8 = 2;

/// An exchange on any path but "a pooled HTTP/1.1 connection": boxed, because its future
/// is large (connecting, TLS, HTTP/2) and rare.
pub(crate) type BoxExchange =
    Pin<Box<dyn Future<Output = Result<Response<ForwardBody>, ForwardError>> + Send>>;

/// Where [`HostPool::dispatch`] sent a request.
pub(crate) enum Dispatched<F, B> {
    /// Queued on a pooled HTTP/1.1 connection (checked in again once `F`, hyper's
    /// response future, has the response head).
    Pooled(F, Checkout<B>),
    /// On the lean HTTP/1 path (a request without a body, cleartext upstream).
    Lean(h1::Exchange),
    /// Any other path, already under way once polled.
    Other(BoxExchange),
}

/// The pool of one upstream.
pub(crate) struct HostPool<B> {
    pub(super) upstream: Upstream,
    pub(super) connector: Arc<Connector>,
    idle: Mutex<Vec<Idle<B>>>,
    /// The HTTP/2 connections (see `h2pool`).
    pub(super) h2: Mutex<H2Slot<B>>,
    pub(super) learned: AtomicU8,
    pub(super) config: Arc<PoolConfig>,
    /// The lean path's idle connections, when this upstream is cleartext HTTP/1.1.
    pub(super) lean: Option<Arc<h1::Idle>>,
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
        let lean = connector
            .is_plain_http1()
            .then(|| h1::Idle::new(self.config.max_idle, self.config.idle_timeout));
        let pool = Arc::new(HostPool {
            lean,
            upstream: upstream.clone(),
            connector: Arc::new(connector),
            idle: Mutex::new(Vec::new()),
            h2: Mutex::new(H2Slot::new()),
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
    fn checkout(&self) -> Option<Checkout<B>> {
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
            let Idle { tx, timer, .. } = idle.swap_remove(i);
            return Some(Checkout { tx, at: now, timer });
        }
        None
    }

    /// Puts `tx` back. `since` is when its last exchange started (counting idleness from
    /// there is the early, safe side of the upstream's keep-alive timeout and spares a
    /// clock read), `None` for now.
    pub(super) fn checkin(
        &self,
        tx: http1::SendRequest<B>,
        since: Option<Instant>,
        timer: Option<ConnTimer>,
    ) {
        if tx.is_closed() {
            return;
        }
        let since = since.unwrap_or_else(Instant::now);
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < self.config.max_idle {
            idle.push(Idle { tx, since, timer });
        }
    }

    /// Hands `req` to a pooled HTTP/1.1 connection at once, or boxes the path that has to
    /// find one (connecting, TLS, HTTP/2).
    ///
    /// Called from `Forward::call`, not from inside a future: the request is moved into
    /// hyper's queue here and held only there, and [`super::future`] polls hyper's
    /// response future directly. When this was `async`, the request sat in the response
    /// future, in this method's future and in hyper's at once: a 2.7 KiB box per request,
    /// too large for the allocator's thread cache, copied whole on every call (issue 12's
    /// profile, session 13).
    pub(crate) fn dispatch(
        self: &Arc<Self>,
        req: Request<B>,
    ) -> Dispatched<
        impl Future<
                Output = Result<Response<Incoming>, hyper::client::conn::TrySendError<Request<B>>>,
            > + Send
            + 'static,
        B,
    > {
        if let Some(idle) = &self.lean {
            if req.body().is_end_stream() {
                // The head is written from the parts; the body is empty and goes.
                let (parts, _) = req.into_parts();
                return Dispatched::Lean(h1::Exchange::new(idle, &self.connector, parts));
            }
        }
        let shared = self.connector.may_be_h2() && self.learned.load(Ordering::Relaxed) != SPOKE_H1;
        if !shared {
            if let Some(mut conn) = self.checkout() {
                // Queued now; hyper's connection task writes it when next polled.
                let sent = conn.tx.try_send_request(req);
                return Dispatched::Pooled(sent, conn);
            }
        }
        let pool = self.clone();
        Dispatched::Other(Box::pin(async move {
            match shared {
                true => pool.send_shared(req).await,
                false => pool.send_h1(req).await,
            }
        }))
    }

    /// The HTTP/1.1 path. A pooled connection that turns out to be closed before the
    /// request was written is retried once on a fresh one: the request never left, so
    /// this is safe for every method. A fresh connection on which the upstream chose
    /// HTTP/2 by ALPN becomes the shared one.
    pub(super) async fn send_h1(
        &self,
        req: Request<B>,
    ) -> Result<Response<ForwardBody>, ForwardError> {
        let (tx, pooled) = match self.checkout() {
            Some(conn) => (conn.tx, true),
            // Reached boxed from `send`: no box of its own needed here.
            None => match self.connector.connect().await? {
                Conn::H1(tx) => (tx, false),
                Conn::H2(tx, streams) => {
                    let pending = self.adopt_h2(&tx, streams);
                    return Box::pin(self.send_h2(tx, pending, req, false)).await;
                }
            },
        };
        self.send_h1_on(tx, pooled, req).await
    }

    pub(super) async fn send_h1_on(
        &self,
        mut tx: http1::SendRequest<B>,
        pooled: bool,
        req: Request<B>,
    ) -> Result<Response<ForwardBody>, ForwardError> {
        let res = match tx.try_send_request(req).await {
            Ok(res) => res,
            Err(mut e) => match e.take_message() {
                Some(req) if pooled => return self.reconnect(req, e.into_error()).await,
                _ => return Err(self.transport(e.into_error())),
            },
        };
        self.checkin(tx, None, None);
        Ok(res.map(ForwardBody::from))
    }

    /// A pooled connection turned out to be closed before `req` was written (`closed`
    /// says how): the request never left, so it is sent again on a fresh connection,
    /// whatever its method.
    pub(super) async fn reconnect(
        &self,
        req: Request<B>,
        closed: hyper::Error,
    ) -> Result<Response<ForwardBody>, ForwardError> {
        tracing::debug!(error = %closed, "pooled connection was closed; reconnecting");
        let mut tx = match Box::pin(self.connector.connect()).await? {
            Conn::H1(tx) => tx,
            Conn::H2(tx, streams) => {
                let pending = self.adopt_h2(&tx, streams);
                return Box::pin(self.send_h2(tx, pending, req, false)).await;
            }
        };
        let res = tx.send_request(req).await.map_err(|e| self.transport(e))?;
        self.checkin(tx, None, None);
        Ok(res.map(ForwardBody::from))
    }

    /// A failed exchange on the lean HTTP/1.1 path: the upstream's transport failure.
    pub(super) fn transport_h1(&self, e: h1::Http1Error) -> ForwardError {
        ForwardError::Transport {
            upstream: self.upstream.authority().to_string(),
            source: Box::new(e),
        }
    }

    /// A failed exchange: the client's body fault if hyper's error chain holds one (the
    /// client broke it, not the upstream), an HTTP/2 stream reset, else a transport
    /// failure of the upstream.
    pub(super) fn transport(&self, e: hyper::Error) -> ForwardError {
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
