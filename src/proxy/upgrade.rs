//! HTTP/1.1 upgrades (WebSocket and others) tunnelled through [`Forward`](super::Forward).
//!
//! `Upgrade` and `Connection` are hop-by-hop headers, so a plain proxy strips them and a
//! WebSocket handshake never reaches the upstream. When a request *really* asks for an
//! upgrade (HTTP/1.1, `Connection: upgrade` and one `Upgrade` header; `GET` for
//! `websocket`, RFC 6455 §4.1), `Forward` keeps both headers, sends the request on a
//! connection of its own (an upgraded connection never returns to the pool), and when the
//! upstream answers `101 Switching Protocols` joins the client's and the upstream's
//! upgraded connections byte for byte. An upstream that refuses (any other status) has its
//! answer passed through unchanged.
//!
//! The tunnel has an idle timeout (default 60 s, nginx's `proxy_read_timeout` applies the
//! same way to WebSocket): no byte in either direction for that long closes both sides.
//! Whoever must know how long the tunnel lives (the balancer's in-flight count) finds a
//! [`Tunnel`] in the `101` response's extensions and [`holds`](Tunnel::hold) a guard on it.

use std::fmt;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::body::{far_future, Progress};
use super::connect::Connector;
use super::error::ForwardError;
use super::headers::strip_hop_by_hop;
use super::response_body::ForwardBody;
use super::upstream::Upstream;
use crate::BoxError;

/// `true` when the request asks for a protocol upgrade a proxy can tunnel: HTTP/1.1 (an
/// HTTP/2 request cannot carry `Upgrade`), a `Connection` header naming `upgrade`, exactly
/// one `Upgrade` header, and `GET` when the protocol is `websocket`. Headers are read as
/// bytes; anything unreadable means "no upgrade", and the headers are then stripped as
/// usual.
pub(crate) fn requested(method: &Method, version: Version, headers: &HeaderMap) -> bool {
    if version != Version::HTTP_11 {
        return false;
    }
    let mut upgrades = headers.get_all(header::UPGRADE).iter();
    let (Some(proto), None) = (upgrades.next(), upgrades.next()) else {
        return false;
    };
    let names_upgrade = headers.get_all(header::CONNECTION).iter().any(|v| {
        v.as_bytes()
            .split(|b| *b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"upgrade"))
    });
    if !names_upgrade || proto.as_bytes().trim_ascii().is_empty() {
        return false;
    }
    let websocket = proto
        .as_bytes()
        .split(|b| *b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"websocket"));
    !websocket || method == Method::GET
}

/// `true` for a request that [`Forward`](super::Forward) would tunnel: the balancer
/// does not replay such a request once an upstream has seen it.
pub(crate) fn is_upgrade_request<B>(req: &Request<B>) -> bool {
    requested(req.method(), req.version(), req.headers())
        && req.extensions().get::<OnUpgrade>().is_some()
}

/// Puts back what [`strip_hop_by_hop`] removed and an upgrade needs.
fn keep_upgrade_headers(headers: &mut HeaderMap, proto: Option<HeaderValue>) {
    if let Some(p) = proto {
        headers.insert(header::UPGRADE, p);
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// Strips hop-by-hop headers of an upgrade request, keeping `Upgrade` and
/// `Connection: upgrade`.
pub(crate) fn strip_keeping_upgrade(headers: &mut HeaderMap) {
    let proto = headers.get(header::UPGRADE).cloned();
    strip_hop_by_hop(headers);
    keep_upgrade_headers(headers, proto);
}

/// A tunnel opened by a `101 Switching Protocols` response, found in that response's
/// extensions. Guards handed to [`hold`](Self::hold) are dropped when the tunnel closes
/// (both directions done, an error, or the idle timeout), or at once if it already has.
///
/// The balancer holds its in-flight count here, so least-loaded and bounded-load picks see
/// an open WebSocket as load on its endpoint.
#[derive(Clone, Default)]
pub struct Tunnel {
    held: Arc<Mutex<Held>>,
}

/// Guards kept while the tunnel is open; `None` once it has closed.
type Held = Option<Vec<Box<dyn Send>>>;

impl Tunnel {
    fn new() -> Self {
        Tunnel {
            held: Arc::new(Mutex::new(Some(Vec::new()))),
        }
    }

    /// Keeps `guard` alive until the tunnel closes.
    pub fn hold<T: Send + 'static>(&self, guard: T) {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        match held.as_mut() {
            Some(v) => v.push(Box::new(guard)),
            // Closed already: the guard goes now (outside the lock).
            None => {
                drop(held);
                drop(guard);
            }
        }
    }

    /// `true` once the tunnel has closed.
    pub fn is_closed(&self) -> bool {
        self.held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_none()
    }

    fn close(&self) {
        let guards = self
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        drop(guards);
    }
}

impl fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tunnel")
            .field("closed", &self.is_closed())
            .finish()
    }
}

/// Closes the tunnel when the task ends however it ends (also on a panic or cancellation).
struct CloseOnDrop(Tunnel);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// What the upgrade exchange needs from `Forward`.
pub(super) struct UpgradeCall {
    pub upstream: Upstream,
    /// The upstream's dialler: TCP, TLS for `https://` (ALPN `http/1.1`), the timeout.
    pub connector: Arc<Connector>,
    pub response_timeout: Option<Duration>,
    pub idle_timeout: Option<Duration>,
    pub client: OnUpgrade,
    /// The client connection's slot in [`crate::server`], held while the tunnel is open
    /// (absent under another server).
    pub lease: Option<crate::server::ConnectionLease>,
}

/// Sends an upgrade request on a fresh connection and, on `101`, starts the tunnel.
pub(super) async fn forward<B>(
    call: UpgradeCall,
    req: Request<B>,
) -> Result<Response<ForwardBody>, ForwardError>
where
    B: http_body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let authority = call.upstream.authority().to_string();
    let mut tx = call.connector.connect_for_upgrade::<B>().await?;
    let transport = |e: hyper::Error| ForwardError::Transport {
        upstream: authority.clone(),
        source: Box::new(e),
    };
    let send = tx.send_request(req);
    let mut res = match call.response_timeout {
        None => send.await.map_err(transport)?,
        Some(after) => match tokio::time::timeout(after, send).await {
            Ok(r) => r.map_err(transport)?,
            Err(_) => {
                return Err(ForwardError::ResponseTimeout {
                    upstream: authority,
                    after,
                })
            }
        },
    };
    if res.status() != StatusCode::SWITCHING_PROTOCOLS {
        // Refused (200, 400, 426...): passed through as any response.
        strip_hop_by_hop(res.headers_mut());
        return Ok(res.map(ForwardBody::from));
    }
    strip_keeping_upgrade(res.headers_mut());
    let upstream_side = hyper::upgrade::on(&mut res);
    let tunnel = Tunnel::new();
    res.extensions_mut().insert(tunnel.clone());
    let idle = call.idle_timeout;
    let lease = call.lease;
    tokio::spawn(async move {
        let _close = CloseOnDrop(tunnel);
        // The server's drain timeout ends the tunnel (nginx's `worker_shutdown_timeout`);
        // until then the lease keeps the connection's permit and the drain waiting.
        let closing = async {
            match &lease {
                Some(lease) => lease.closing().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = run_tunnel(call.client, upstream_side, idle, &authority) => {}
            () = closing => tracing::debug!(upstream = %authority, "tunnel closed by the server's drain timeout"),
        }
        drop(lease);
    });
    Ok(res.map(ForwardBody::from))
}

/// Completes both upgrades and copies between them until the tunnel ends.
async fn run_tunnel(
    client: OnUpgrade,
    upstream_side: OnUpgrade,
    idle: Option<Duration>,
    authority: &str,
) {
    // Both upgrades complete once the 101 went out to the client; a client gone by
    // then (or a layer that replaced the 101) fails the client side.
    let both = async { tokio::try_join!(client, upstream_side) };
    let joined = match idle {
        Some(t) => tokio::time::timeout(t, both).await.ok(),
        None => Some(both.await),
    };
    let (client, upstream) = match joined {
        Some(Ok(pair)) => pair,
        Some(Err(e)) => {
            tracing::debug!(upstream = %authority, error = %e, "upgrade not completed");
            return;
        }
        None => {
            tracing::debug!(upstream = %authority, "upgrade not completed in time");
            return;
        }
    };
    let end = join(TokioIo::new(client), TokioIo::new(upstream), idle).await;
    tracing::debug!(
        upstream = %authority,
        client_to_upstream = end.client_to_upstream,
        upstream_to_client = end.upstream_to_client,
        reason = %end.reason,
        "tunnel closed"
    );
}

/// Why a tunnel ended, and what went through it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TunnelEnd {
    pub client_to_upstream: u64,
    pub upstream_to_client: u64,
    pub reason: EndReason,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum EndReason {
    /// Both sides closed their direction.
    Closed,
    /// No byte either way for the idle timeout.
    Idle(Duration),
    /// One side failed (reset, broken pipe).
    Error(io::ErrorKind),
}

impl fmt::Display for EndReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EndReason::Closed => f.write_str("closed"),
            EndReason::Idle(d) => write!(f, "idle for {d:?}"),
            EndReason::Error(k) => write!(f, "error: {k}"),
        }
    }
}

/// Copies both ways between `client` and `upstream` until both directions end, one side
/// fails, or nothing moves for `idle`. Both are dropped (closed) on return.
pub(crate) async fn join<A, U>(client: A, upstream: U, idle: Option<Duration>) -> TunnelEnd
where
    A: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let activity = Progress::new();
    let mut a = Counted::new(client, activity.clone());
    let mut u = Counted::new(upstream, activity.clone());
    let reason = {
        let copy = tokio::io::copy_bidirectional(&mut a, &mut u);
        tokio::pin!(copy);
        match idle {
            None => end_reason(copy.await),
            Some(after) => loop {
                let last = activity.last();
                let deadline = last.checked_add(after).unwrap_or_else(far_future);
                tokio::select! {
                    r = &mut copy => break end_reason(r),
                    () = tokio::time::sleep_until(deadline) => {
                        if activity.last() <= last {
                            break EndReason::Idle(after);
                        }
                    }
                }
            },
        }
    };
    TunnelEnd {
        client_to_upstream: a.read,
        upstream_to_client: u.read,
        reason,
    }
}

fn end_reason(r: io::Result<(u64, u64)>) -> EndReason {
    match r {
        Ok(_) => EndReason::Closed,
        Err(e) => EndReason::Error(e.kind()),
    }
}

/// Counts the bytes read from one side and marks activity for the idle timeout.
struct Counted<T> {
    io: T,
    read: u64,
    activity: Arc<Progress>,
}

impl<T> Counted<T> {
    fn new(io: T, activity: Arc<Progress>) -> Self {
        Counted {
            io,
            read: 0,
            activity,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        let n = buf.filled().len().saturating_sub(before);
        if n > 0 {
            self.read = self
                .read
                .saturating_add(u64::try_from(n).unwrap_or(u64::MAX));
            self.activity.touch();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
#[cfg(test)]
mod tests;
