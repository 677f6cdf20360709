//! A lean HTTP/1.1 connection pool, one per upstream.
//!
//! hyper-util's legacy client spawns a task per request to learn when a connection is idle,
//! boxes several futures and hashes a pool key on every call. A reverse proxy knows its
//! upstreams up front, so each `Forward` holds its upstream's pool directly: checkout is a
//! short uncontended lock and a scan from the most recently used connection, and a
//! connection goes back as soon as its response headers arrived (HTTP/1 `SendRequest`
//! reports itself not ready until the body is done, so it cannot be double-booked).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::body::BodyFault;
use super::error::ForwardError;
use super::service::Upstream;
use crate::classify::is_local_resource_error;
use crate::BoxError;

#[derive(Debug, Clone)]
pub(crate) struct PoolConfig {
    pub connect_timeout: Option<Duration>,
    pub idle_timeout: Duration,
    pub max_idle: usize,
}

struct Idle<B> {
    tx: SendRequest<B>,
    since: Instant,
}

/// The pool of one upstream.
pub(crate) struct HostPool<B> {
    upstream: Upstream,
    addr: Option<SocketAddr>,
    idle: Mutex<Vec<Idle<B>>>,
    config: Arc<PoolConfig>,
}

/// All pools of one `ForwardBuilder::build`, so `Forward::to` shares connections.
pub(crate) struct Pools<B> {
    hosts: Mutex<HashMap<String, Arc<HostPool<B>>>>,
    config: Arc<PoolConfig>,
}

impl<B> Pools<B> {
    pub(crate) fn new(config: PoolConfig) -> Self {
        Pools {
            hosts: Mutex::new(HashMap::new()),
            config: Arc::new(config),
        }
    }

    /// The pool for `upstream` (created on first use). Not on the request path.
    pub(crate) fn host(&self, upstream: &Upstream) -> Arc<HostPool<B>> {
        let mut hosts = self.hosts.lock().unwrap_or_else(PoisonError::into_inner);
        hosts
            .entry(upstream.authority().to_string())
            .or_insert_with(|| {
                Arc::new(HostPool {
                    addr: upstream.authority().parse().ok(),
                    upstream: upstream.clone(),
                    idle: Mutex::new(Vec::new()),
                    config: self.config.clone(),
                })
            })
            .clone()
    }
}

impl<B> Pools<B> {
    pub(crate) fn connect_timeout(&self) -> Option<Duration> {
        self.config.connect_timeout
    }
}

impl<B> HostPool<B> {
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
    fn checkout(&self) -> Option<SendRequest<B>> {
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

    fn checkin(&self, tx: SendRequest<B>) {
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

    async fn connect(&self) -> Result<SendRequest<B>, ForwardError> {
        let upstream = || self.upstream.authority().to_string();
        let connect = async {
            match self.addr {
                Some(addr) => TcpStream::connect(addr).await,
                None => TcpStream::connect(self.upstream.authority()).await,
            }
        };
        let connected = match self.config.connect_timeout {
            Some(after) => tokio::time::timeout(after, connect).await,
            None => Ok(connect.await),
        };
        let stream = match connected {
            Err(_) => {
                return Err(ForwardError::ConnectTimeout {
                    upstream: upstream(),
                })
            }
            Ok(Err(e)) => return Err(connect_error(upstream(), e)),
            Ok(Ok(s)) => s,
        };
        let _ = stream.set_nodelay(true);
        let failed = |e: hyper::Error| ForwardError::Connect {
            upstream: upstream(),
            source: Box::new(e),
        };
        let (mut tx, conn) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(failed)?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream connection ended with an error");
            }
        });
        // hyper refuses a request on a connection that has not signalled readiness yet.
        tx.ready().await.map_err(failed)?;
        Ok(tx)
    }

    /// Sends `req` on a pooled or new connection. A pooled connection that turns out to
    /// be closed before the request was written is retried once on a fresh one: the
    /// request never left, so this is safe for every method.
    pub(crate) async fn send(&self, req: Request<B>) -> Result<Response<Incoming>, ForwardError> {
        let (mut tx, pooled) = match self.checkout() {
            Some(tx) => (tx, true),
            None => (self.connect().await?, false),
        };
        let res = match tx.try_send_request(req).await {
            Ok(res) => res,
            Err(mut e) => match e.take_message() {
                Some(req) if pooled => {
                    tracing::debug!(error = %e.error(), "pooled connection was closed; reconnecting");
                    tx = self.connect().await?;
                    tx.send_request(req).await.map_err(|e| self.transport(e))?
                }
                _ => return Err(self.transport(e.into_error())),
            },
        };
        self.checkin(tx);
        Ok(res)
    }

    /// A failed exchange: the client's body fault if hyper's error chain holds one (the
    /// client broke it, not the upstream), else a transport failure of the upstream.
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
        ForwardError::Transport {
            upstream: self.upstream.authority().to_string(),
            source: Box::new(e),
        }
    }
}

/// The error of a failed TCP connect: the proxy's own resource exhaustion is not the
/// upstream's fault ([`ForwardError::LocalResource`]); a timeout reported by the OS is a
/// connect timeout; anything else a refused/unreachable upstream.
pub(crate) fn connect_error(upstream: String, e: std::io::Error) -> ForwardError {
    if is_local_resource_error(&e) {
        ForwardError::LocalResource {
            upstream,
            source: e,
        }
    } else if e.kind() == std::io::ErrorKind::TimedOut {
        ForwardError::ConnectTimeout { upstream }
    } else {
        ForwardError::Connect {
            upstream,
            source: Box::new(e),
        }
    }
}

#[cfg(test)]
mod tests {
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
