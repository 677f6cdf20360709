//! The accept loop shared by [`Server`](super::Server) and each
//! of the per-core [`Workers`](super::Workers): the same limits, the same drain on
//! shutdown, whatever runtime runs it and whatever [`Accept`] makes of a TCP stream.
//! Serving each accepted connection is `conn.rs`.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tower_service::Service;

use super::accept::AcceptBackoff;
use super::balance::{next_handed, Balance};
use super::conn::{Conns, Protocols};
use super::{Accept, ServerConfig};
use crate::BoxError;

/// Phases of a server, sent to its connections.
pub(super) const RUN: u8 = 0;
const DRAIN: u8 = 1;
pub(super) const CLOSE: u8 = 2;

/// At most this long, a connection accepted just before a shutdown may take to start its
/// first request (bounded further by the header read timeout and the drain timeout).
const FIRST_REQUEST_GRACE: Duration = Duration::from_secs(1);

/// What a shutdown does with the connections still waiting in the accept queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Queued {
    /// Accepts and serves them: closing the listener would reset them.
    Serve,
    /// Leaves them: the listening socket lives on in another process, which serves them
    /// (a socket handoff).
    Leave,
}

/// A plain shutdown signal serves the queue.
impl From<()> for Queued {
    fn from((): ()) -> Self {
        Queued::Serve
    }
}

/// The accept loop shared by [`Server`] and every [`Workers`] worker: the same limits,
/// whatever runtime it runs on and whatever [`Accept`] turns a TCP stream into. With
/// `balance` (one of several [`Workers`](super::Workers) that even out their connections,
/// [`Balance`]) the connection cap is the shared one, and connections come from this
/// listener and from the other workers.
pub(crate) async fn serve_loop<S, B, A, F, Q>(
    config: ServerConfig,
    listener: TcpListener,
    svc: S,
    acceptor: Arc<A>,
    shutdown: F,
    mut balance: Option<Balance>,
) -> std::io::Result<()>
where
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
    A: Accept,
    F: Future<Output = Q>,
    Q: Into<Queued>,
{
    // One channel tells connections to drain (1) or close now (2); each connection
    // holds a receiver, so "all receivers gone" means every connection has ended.
    let (phase, phase_rx) = watch::channel(RUN);
    let conns = Conns {
        http: Arc::new(Protocols::new(&config)),
        acceptor,
        limits: config.body_limits(),
        phase: phase_rx,
        first_request_grace: config.header_read_timeout.min(FIRST_REQUEST_GRACE),
    };
    // Each connection holds a permit; without one the loop does not call accept, so
    // new clients wait in the kernel backlog (back-pressure) instead of being
    // accepted and dropped.
    let permits = match &balance {
        Some(balance) => balance.permits(),
        None => Arc::new(Semaphore::new(config.max_connections.max(1))),
    };
    let mut backoff = AcceptBackoff::new(config.accept_backoff);
    tokio::pin!(shutdown);
    let queued = loop {
        let permit = tokio::select! {
            biased;
            q = &mut shutdown => break q.into(),
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break Queued::Serve, // the semaphore is never closed
            },
        };
        let (stream, peer) = tokio::select! {
            biased;
            q = &mut shutdown => break q.into(),
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    let (pause, _) = backoff.on_error(&e);
                    if !pause.is_zero() {
                        tokio::select! {
                            biased;
                            q = &mut shutdown => break q.into(),
                            () = tokio::time::sleep(pause) => {}
                        }
                    }
                    continue;
                }
            },
            Some((stream, peer)) = next_handed(&mut balance) => {
                conns.serve(stream, peer, Some(permit), &svc);
                continue;
            }
        };
        backoff.on_success();
        let routed = match &balance {
            Some(balance) => balance.route(stream, peer),
            None => Some((stream, peer)),
        };
        // Handed to another worker: the permit taken for it here is released.
        if let Some((stream, peer)) = routed {
            conns.serve(stream, peer, Some(permit), &svc);
        }
    };
    // Connections other workers handed over and this one has not picked up yet.
    for (stream, peer) in balance.as_mut().map(Balance::close).unwrap_or_default() {
        conns.serve(stream, peer, permits.clone().try_acquire_owned().ok(), &svc);
    }
    // Connections the kernel already completed but this loop has not accepted yet would
    // be reset by closing the listener: serve them too (at most the listen backlog, so
    // without a permit when the cap is reached), then close. After a socket handoff the
    // successor serves them from the same socket, which stays open there.
    match listener.into_std() {
        Ok(_) if queued == Queued::Leave => {}
        Ok(std_listener) => {
            while let Ok((stream, peer)) = std_listener.accept() {
                let stream = stream
                    .set_nonblocking(true)
                    .and_then(|()| tokio::net::TcpStream::from_std(stream));
                if let Ok(stream) = stream {
                    conns.serve(stream, peer, permits.clone().try_acquire_owned().ok(), &svc);
                }
            }
        }
        Err(e) => tracing::debug!(error = %e, "listener not drained before closing"),
    }
    drop(conns);
    phase.send_replace(DRAIN);
    if tokio::time::timeout(config.drain_timeout, phase.closed())
        .await
        .is_err()
    {
        tracing::warn!(
            timeout = ?config.drain_timeout,
            "drain timeout: closing connections with requests still in flight"
        );
        phase.send_replace(CLOSE);
    }
    Ok(())
}
