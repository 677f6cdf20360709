//! The HTTP/2 side of an upstream's pool: requests multiplex over a few connections, and
//! another one is opened when every stream of the open ones is in use.
//!
//! A request takes a stream on the first connection with one free (open streams are
//! counted on the wire, see [`super::h2wire`]; the limit is the smaller of
//! `max_streams_per_connection` and the upstream's `SETTINGS_MAX_CONCURRENT_STREAMS`).
//! When all are full another connection is opened, single-flight (the requests of a burst
//! share one connect instead of racing to open one each), up to the per-upstream
//! connection limit; past it a request waits for a free stream, at most the acquire
//! timeout (then [`ForwardError::PoolTimeout`], 503). This is Envoy's behaviour; hyper
//! alone would queue every request past the limit on the one connection.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};

use futures_util::future::{BoxFuture, Shared};
use futures_util::FutureExt;
use http::{Request, Response};
use hyper::client::conn::{http1, http2};
use tokio::time::Instant;

use super::connect::Conn;
use super::error::ForwardError;
use super::h2::to_h2;
use super::h2wire::{Pending, Streams};
use super::pool::{HostPool, SPOKE_H1, SPOKE_H2};
use super::response_body::ForwardBody;
use crate::BoxError;

/// What a single-flight connect produced, shared by everyone who waited for it.
pub(super) enum Opened<B> {
    H2(http2::SendRequest<B>, Arc<Streams>),
    /// The upstream chose HTTP/1.1: one waiter takes the connection, the others open
    /// their own on the HTTP/1.1 path.
    H1(Arc<Mutex<Option<http1::SendRequest<B>>>>),
}

impl<B> Clone for Opened<B> {
    fn clone(&self) -> Self {
        match self {
            Opened::H2(tx, streams) => Opened::H2(tx.clone(), streams.clone()),
            Opened::H1(slot) => Opened::H1(slot.clone()),
        }
    }
}

pub(super) type SharedConnect<B> = Shared<BoxFuture<'static, Result<Opened<B>, Arc<ForwardError>>>>;

pub(super) struct H2Conn<B> {
    tx: http2::SendRequest<B>,
    streams: Arc<Streams>,
}

pub(super) struct H2Slot<B> {
    conns: Vec<H2Conn<B>>,
    connecting: Option<SharedConnect<B>>,
    /// When a request last started on one of `conns`: h2 connections unused for the pool's
    /// idle timeout are replaced (a NAT or firewall may have dropped them silently meanwhile).
    last_used: Instant,
}

/// Where a request goes on the HTTP/2 path.
enum Pick<B> {
    /// A stream reserved on a live connection.
    Ready(http2::SendRequest<B>, Pending),
    /// Every connection is full and there is room for another.
    Connect,
    /// Every connection is full and there may be no more.
    Wait,
}

impl<B> H2Slot<B> {
    pub(super) fn new() -> Self {
        H2Slot {
            conns: Vec::new(),
            connecting: None,
            last_used: Instant::now(),
        }
    }
}

impl<B> HostPool<B>
where
    B: http_body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    /// The path while the upstream is known or expected to speak HTTP/2: a free stream
    /// on a live connection, else a new connection, else a wait for a free stream.
    pub(super) async fn send_shared(
        &self,
        req: Request<B>,
    ) -> Result<Response<ForwardBody>, ForwardError> {
        let mut deadline = None;
        let mut fresh = false;
        loop {
            let freed = self.connector.h2_freed().notified();
            tokio::pin!(freed);
            // Registered before looking, so a stream freed meanwhile is not missed.
            freed.as_mut().enable();
            match self.pick_h2() {
                Pick::Ready(tx, pending) => {
                    return self.send_h2(tx, Some(pending), req, !fresh).await
                }
                Pick::Connect => match self.connect_shared().await? {
                    Opened::H2(..) => fresh = true,
                    Opened::H1(slot) => {
                        self.learned.store(SPOKE_H1, Ordering::Relaxed);
                        let taken = slot.lock().unwrap_or_else(PoisonError::into_inner).take();
                        return match taken {
                            Some(tx) => self.send_h1_on(tx, false, req).await,
                            None => self.send_h1(req).await,
                        };
                    }
                },
                Pick::Wait => {
                    let Some(after) = self.config.acquire_timeout else {
                        freed.await;
                        continue;
                    };
                    let at = *deadline.get_or_insert_with(|| {
                        Instant::now()
                            .checked_add(after)
                            .unwrap_or_else(super::body::far_future)
                    });
                    if tokio::time::timeout_at(at, freed).await.is_err() {
                        return Err(ForwardError::PoolTimeout {
                            upstream: self.upstream.authority().to_string(),
                            after,
                        });
                    }
                }
            }
        }
    }

    /// A stream on the first live HTTP/2 connection with one free.
    fn pick_h2(&self) -> Pick<B> {
        let mut slot = self.h2.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        if now.saturating_duration_since(slot.last_used) > self.config.idle_timeout {
            // Dropping the handles lets the old connections close once their open
            // streams are done; the next request opens a new one.
            slot.conns.clear();
        }
        slot.last_used = now;
        slot.conns.retain(|c| !c.tx.is_closed());
        for c in &slot.conns {
            if let Some(pending) = c.streams.try_reserve(self.config.h2_max_streams) {
                return Pick::Ready(c.tx.clone(), pending);
            }
        }
        if slot.conns.len() < self.config.h2_max_connections {
            Pick::Connect
        } else {
            Pick::Wait
        }
    }

    /// Adds `tx` (an HTTP/1.1 path's connection on which the upstream chose HTTP/2 by
    /// ALPN) to the shared set when there is room, and reserves a stream on it.
    pub(super) fn adopt_h2(
        &self,
        tx: &http2::SendRequest<B>,
        streams: Arc<Streams>,
    ) -> Option<Pending> {
        self.learned.store(SPOKE_H2, Ordering::Relaxed);
        let pending = streams.try_reserve(self.config.h2_max_streams);
        let mut slot = self.h2.lock().unwrap_or_else(PoisonError::into_inner);
        slot.conns.retain(|c| !c.tx.is_closed());
        if slot.conns.len() < self.config.h2_max_connections {
            slot.conns.push(H2Conn {
                tx: tx.clone(),
                streams,
            });
            slot.last_used = Instant::now();
        }
        pending
    }

    /// Opens another shared connection, once for all who ask while it is being opened.
    async fn connect_shared(&self) -> Result<Opened<B>, ForwardError> {
        let attempt = {
            let mut slot = self.h2.lock().unwrap_or_else(PoisonError::into_inner);
            match &slot.connecting {
                Some(attempt) => attempt.clone(),
                None => {
                    let connector = self.connector.clone();
                    let attempt = async move {
                        match connector.connect::<B>().await {
                            Ok(Conn::H2(tx, streams)) => Ok(Opened::H2(tx, streams)),
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
                if let Ok(Opened::H2(tx, streams)) = &res {
                    slot.conns.push(H2Conn {
                        tx: tx.clone(),
                        streams: streams.clone(),
                    });
                    slot.last_used = Instant::now();
                    self.learned.store(SPOKE_H2, Ordering::Relaxed);
                }
            }
        }
        res.map_err(|e| shared_error(&e))
    }

    /// Sends over the shared HTTP/2 connection. When a reused connection turns out to be
    /// closed before the request left, one fresh connection is tried.
    /// `pending` is the stream reserved for the request, given back when the exchange
    /// ends (the stream itself is counted until the upstream ends it).
    pub(super) async fn send_h2(
        &self,
        mut tx: http2::SendRequest<B>,
        pending: Option<Pending>,
        mut req: Request<B>,
        reused: bool,
    ) -> Result<Response<ForwardBody>, ForwardError> {
        to_h2(
            &mut req,
            self.upstream.scheme(),
            self.upstream.authority_ref(),
        );
        let sent = tx.try_send_request(req).await;
        drop(pending);
        match sent {
            Ok(res) => Ok(res.map(ForwardBody::from)),
            Err(mut e) => match e.take_message() {
                Some(req) if reused => {
                    tracing::debug!(error = %e.error(), "HTTP/2 connection was closed; reconnecting");
                    match self.connect_shared().await? {
                        Opened::H2(mut tx, streams) => {
                            let _pending = streams.try_reserve(self.config.h2_max_streams);
                            tx.send_request(req)
                                .await
                                .map(|res| res.map(ForwardBody::from))
                                .map_err(|e| self.transport(e))
                        }
                        // The upstream switched to HTTP/1.1 between two connections; the
                        // request is in HTTP/2 shape already: fail it, the next one goes
                        // the HTTP/1.1 way.
                        Opened::H1(slot) => {
                            self.learned.store(SPOKE_H1, Ordering::Relaxed);
                            let taken = slot.lock().unwrap_or_else(PoisonError::into_inner).take();
                            if let Some(tx) = taken {
                                self.checkin(tx, None, None);
                            }
                            Err(self.transport(e.into_error()))
                        }
                    }
                }
                _ => Err(self.transport(e.into_error())),
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
