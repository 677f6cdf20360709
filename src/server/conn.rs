//! Serving one accepted connection: the acceptor's handshake (TLS), telling HTTP/2 from
//! HTTP/1.1, hyper's connection with the server's limits, the per-request extensions
//! ([`ClientAddr`], [`BodyLimits`], the acceptor's), and the connection's part of a
//! graceful drain. Split from the accept loop (`serve.rs`), which only decides *whether*
//! a connection is served.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::Body as _;
use http_body_util::{Either, Empty};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use pin_project_lite::pin_project;
use tokio::sync::{watch, Notify};
use tower_service::Service;

use super::conn_service::ConnService;
use super::detect::{sniff, Prefixed};
use super::head_timer::HeadTimer;
use super::lease::ConnectionLease;
use super::on_wake::OnWake;
use super::serve::{CLOSE, RUN};
use super::small_writes::SmallWrites;
use super::{Accept, Protocol, ServerConfig};
use crate::proxy::{BodyLimits, ClientAddr};
use crate::BoxError;

/// hyper's own HTTP/1 limit on header fields (`proto::h1::role::DEFAULT_MAX_HEADERS`,
/// not exported), used when none is set.
const HYPER_DEFAULT_MAX_HEADERS: usize = 100;

/// The HTTP/1.1 and HTTP/2 connection settings, built once per accept loop.
pub(super) struct Protocols {
    h1: hyper::server::conn::http1::Builder,
    h2: hyper::server::conn::http2::Builder<TokioExecutor>,
    http2: bool,
    /// Bounds telling h2 prior knowledge from HTTP/1.1 (the first request head's own
    /// timeout starts after it, so a head gets at most twice this), and an HTTP/2
    /// connection's idle time (the header read timeout's role on HTTP/1).
    detect_timeout: Duration,
}

impl Protocols {
    pub(super) fn new(config: &ServerConfig) -> Self {
        let mut h1 = hyper::server::conn::http1::Builder::new();
        // Each connection replaces this timer with its own (`head_timer`).
        h1.timer(TokioTimer::new())
            .header_read_timeout(config.header_read_timeout)
            // A head larger than this, or with too many fields, is answered 431 by hyper.
            .max_header_size(config.max_header_bytes);
        // hyper parses at most 100 fields by default, into arrays on the stack; naming any
        // limit, even 100, makes it build both arrays element by element (and on the heap
        // past 100) for every request head: ~1,600 instructions a request (issue 12).
        if config.max_headers != HYPER_DEFAULT_MAX_HEADERS {
            h1.max_headers(config.max_headers);
        }
        // Stream tasks are spawned on the connection's own runtime: with `Workers`, the
        // worker's thread.
        let mut h2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new())
            .max_concurrent_streams(config.h2_max_concurrent_streams)
            // The decoded header list; a larger one is answered 431 by hyper.
            .max_header_list_size(u32::try_from(config.max_header_bytes).unwrap_or(u32::MAX))
            .keep_alive_interval(config.h2_keep_alive_interval)
            .keep_alive_timeout(config.h2_keep_alive_timeout);
        Protocols {
            h1,
            h2,
            http2: config.http2,
            detect_timeout: config.header_read_timeout,
        }
    }
}

/// What every accepted connection is served with.
pub(super) struct Conns<A> {
    pub(super) http: Arc<Protocols>,
    pub(super) acceptor: Arc<A>,
    pub(super) limits: BodyLimits,
    pub(super) phase: watch::Receiver<u8>,
    pub(super) first_request_grace: Duration,
}

impl<A: Accept> Conns<A> {
    pub(super) fn serve<S, B>(
        &self,
        stream: tokio::net::TcpStream,
        peer: std::net::SocketAddr,
        permit: Option<tokio::sync::OwnedSemaphorePermit>,
        svc: &S,
    ) where
        S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: http_body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        let _ = stream.set_nodelay(true);
        let started = Arc::new(Started::default());
        // The permit lives in the lease: an upgraded tunnel holding a clone keeps it.
        let lease = ConnectionLease::new(permit, self.phase.clone());
        let mut svc = Limits {
            conn_extensions: None,
            lease: lease.clone(),
            inner: svc.clone(),
            peer: ClientAddr(peer),
            limits: self.limits,
            started: started.clone(),
        };
        let http = self.http.clone();
        let acceptor = self.acceptor.clone();
        let mut phase = self.phase.clone();
        let mut drain_phase = self.phase.clone();
        let grace = self.first_request_grace;
        tokio::spawn(async move {
            let served = async {
                // The acceptor's handshake (TLS) runs here, off the accept loop.
                let mut io = match acceptor.accept(stream, peer).await {
                    Ok(io) => io,
                    Err(e) => {
                        tracing::debug!(error = %e, %peer, "handshake failed");
                        return;
                    }
                };
                svc.conn_extensions = match acceptor.request_extensions(&io) {
                    Ok(ext) => ext,
                    Err(e) => {
                        tracing::debug!(error = %e, %peer, "connection refused by the acceptor");
                        return;
                    }
                };
                let (h2, prefix) = match acceptor.protocol(&io) {
                    Protocol::Http2 if http.http2 => (true, Bytes::new()),
                    Protocol::Http2 => {
                        tracing::debug!(%peer, "h2 agreed but HTTP/2 is off; closing");
                        return;
                    }
                    Protocol::Http1 => (false, Bytes::new()),
                    Protocol::Detect if !http.http2 => (false, Bytes::new()),
                    Protocol::Detect => {
                        // Bounded like a request head, and cut short by a drain like a
                        // connection that has not started a request.
                        let draining = async {
                            let _ = drain_phase.wait_for(|p| *p != RUN).await;
                            tokio::time::sleep(grace).await;
                        };
                        tokio::select! {
                            biased;
                            sniffed = tokio::time::timeout(http.detect_timeout, sniff(&mut io)) => {
                                match sniffed {
                                    Ok(Ok(Some(sniffed))) => sniffed,
                                    Ok(Ok(None)) => return,
                                    Ok(Err(e)) => {
                                        tracing::debug!(error = %e, %peer, "connection failed before a request");
                                        return;
                                    }
                                    Err(_) => {
                                        tracing::debug!(%peer, "no request within the header read timeout");
                                        return;
                                    }
                                }
                            }
                            () = draining => return,
                        }
                    }
                };
                // Small responses leave as one `send` (see `small_writes`).
                let io = TokioIo::new(SmallWrites::new(Prefixed::new(prefix, io)));
                // One service instance for all the connection's requests, not a clone
                // per request (see `conn_service`).
                let svc = ConnService::new(svc);
                let ended = if h2 {
                    let conn = http.h2.serve_connection(io, svc);
                    let idle = Some(http.detect_timeout);
                    drain(conn, &mut drain_phase, &started, grace, idle).await
                } else {
                    // The connection's own timer: one timer-wheel entry for all its
                    // request heads (see `head_timer`).
                    let mut h1 = http.h1.clone();
                    h1.timer(HeadTimer::default());
                    // Upgrades (WebSocket) hand the connection over to the service.
                    let conn = h1.serve_connection(io, svc).with_upgrades();
                    // hyper's header read timeout bounds an idle HTTP/1 connection.
                    drain(conn, &mut drain_phase, &started, grace, None).await
                };
                if let Err(e) = ended {
                    tracing::debug!(error = %e, %peer, "connection ended with an error");
                }
            };
            // The close signal is polled only when it fires, not at each request's
            // wakes (see `on_wake`).
            tokio::select! {
                biased;
                () = served => {}
                _ = OnWake::new(phase.wait_for(|p| *p == CLOSE)) => {}
            }
            drop(lease);
        });
    }
}

/// Serves `conn` until it ends; on the drain signal, lets its in-flight request finish
/// and closes it.
///
/// hyper closes an idle connection at once on `graceful_shutdown`, and a connection
/// accepted a moment ago counts as idle even when its first request is already in the
/// socket: the client would see the connection closed without an answer. A connection
/// that has not started a request yet, or an HTTP/1 connection between two requests, gets
/// `grace` to start one (the request is then served, and the connection closed after
/// its response).
///
/// `idle` (HTTP/2, which hyper gives no idle timeout): when a whole period passes without
/// a new stream, the connection is shut down gracefully (GOAWAY: streams still open,
/// such as a long download, finish; the client opens a new connection for its next
/// request), so idle clients cannot hold connection slots forever.
async fn drain<C>(
    conn: C,
    phase: &mut watch::Receiver<u8>,
    started: &Started,
    grace: Duration,
    idle: Option<Duration>,
) -> Result<(), hyper::Error>
where
    C: Future<Output = Result<(), hyper::Error>> + GracefulConnection,
{
    tokio::pin!(conn);
    let mut seen = started.2.load(Ordering::Relaxed);
    loop {
        let idle_check = tokio::select! {
            biased;
            r = conn.as_mut() => return r,
            _ = OnWake::new(phase.wait_for(|p| *p != RUN)) => false,
            () = tokio::time::sleep(idle.unwrap_or(Duration::MAX)), if idle.is_some() => true,
        };
        if !idle_check {
            break;
        }
        let now = started.2.load(Ordering::Relaxed);
        if now == seen {
            tracing::debug!("idle HTTP/2 connection: GOAWAY");
            conn.as_mut().graceful_shutdown();
            return conn.await;
        }
        seen = now;
    }
    if idle.is_none() && started.0.load(Ordering::Acquire) {
        // HTTP/1 between two requests of a kept-alive connection: closing it now races the
        // client's next request, which would see the close instead of an answer (wrk: a
        // few read errors per restart). Like a fresh connection it gets `grace` to start
        // one more, the last one it serves. Clearing the flag makes that
        // request's `call` wake this (the check every request already does); a wake-up
        // stored by the first request is consumed first.
        tokio::select! {
            biased;
            () = started.1.notified() => {}
            () = std::future::ready(()) => {}
        }
        started.0.store(false, Ordering::Release);
    }
    if !started.0.load(Ordering::Acquire) {
        tokio::select! {
            biased;
            r = conn.as_mut() => return r,
            () = started.1.notified() => {}
            () = tokio::time::sleep(grace) => {}
        }
    }
    conn.as_mut().graceful_shutdown();
    conn.await
}

/// hyper's server connections, which can be asked to finish and close.
trait GracefulConnection {
    fn graceful_shutdown(self: Pin<&mut Self>);
}

impl<I, S> GracefulConnection for hyper::server::conn::http1::UpgradeableConnection<I, S>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<Incoming>,
    S::ResBody: http_body::Body + 'static,
    <S::ResBody as http_body::Body>::Error: Into<BoxError>,
{
    fn graceful_shutdown(self: Pin<&mut Self>) {
        hyper::server::conn::http1::UpgradeableConnection::graceful_shutdown(self);
    }
}

/// HTTP/2: sends GOAWAY; streams already open finish, new ones are refused.
impl<I, S, B> GracefulConnection for hyper::server::conn::http2::Connection<I, S, TokioExecutor>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    S: hyper::service::HttpService<Incoming, ResBody = B>,
    S::Error: Into<BoxError>,
    B: http_body::Body + 'static,
    B::Error: Into<BoxError>,
    TokioExecutor: hyper::rt::bounds::Http2ServerConnExec<S::Future, B>,
{
    fn graceful_shutdown(self: Pin<&mut Self>) {
        hyper::server::conn::http2::Connection::graceful_shutdown(self);
    }
}

/// Whether a connection has started its first request, a wake-up when it does, and how
/// many HTTP/2 streams it has started (for the idle timeout; HTTP/1 does not count).
#[derive(Default)]
struct Started(AtomicBool, Notify, AtomicU64);

/// Per-connection wrapper: inserts [`ClientAddr`] and (on a request with a body)
/// [`BodyLimits`], and answers `413`
/// for a declared body over the limit without reading it.
#[derive(Clone)]
struct Limits<S> {
    inner: S,
    peer: ClientAddr,
    limits: BodyLimits,
    started: Arc<Started>,
    lease: ConnectionLease,
    /// What the acceptor attaches to every request (`Accept::request_extensions`).
    conn_extensions: Option<http::Extensions>,
}

impl<S, B> Service<Request<Incoming>> for Limits<S>
where
    S: Service<Request<Incoming>, Response = Response<B>>,
    B: http_body::Body,
{
    type Response = Response<Either<B, Empty<B::Data>>>;
    type Error = S::Error;
    type Future = LimitsFuture<S::Future, B>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Incoming>) -> Self::Future {
        // Only the first request of a connection pays more than this uncontended load.
        if !self.started.0.load(Ordering::Relaxed) {
            self.started.0.store(true, Ordering::Release);
            self.started.1.notify_one();
        }
        if req.version() == http::Version::HTTP_2 {
            self.started.2.fetch_add(1, Ordering::Relaxed);
        }
        // hyper's size hint is the parsed Content-Length: refuse before reading a byte,
        // and close the connection rather than drain the announced body.
        if let Some(max) = self.limits.max_bytes {
            if req.body().size_hint().lower() > max {
                // An empty body: the response body type is the service's, whose data type
                // this wrapper cannot produce text in.
                let mut res = Response::new(Either::Right(Empty::new()));
                *res.status_mut() = StatusCode::PAYLOAD_TOO_LARGE;
                // HTTP/2 has no `Connection` header (the stream is reset instead of the
                // body read); HTTP/1 closes rather than drain the announced body.
                if req.version() < http::Version::HTTP_2 {
                    res.headers_mut().insert(
                        http::header::CONNECTION,
                        http::HeaderValue::from_static("close"),
                    );
                }
                return LimitsFuture::Refused {
                    res: Some(Box::new(res)),
                };
            }
        }
        // Only a request that may become a tunnel pays for the lease (see `lease`): one
        // hyper can hand over (an HTTP/1.1 `Upgrade` or a `CONNECT`), which it marks with
        // `OnUpgrade`; asked before anything else is in the map, usually an empty one.
        let tunnel = req
            .extensions()
            .get::<hyper::upgrade::OnUpgrade>()
            .is_some();
        // In a map a `Forward` handed back when there is one (see `client_addr`).
        crate::client_addr::insert_client_addr(req.extensions_mut(), self.peer);
        // The limits only concern a body: a request without one (most `GET`s) is spared
        // an allocation and a map insert (issue 12's profile).
        if !req.body().is_end_stream() {
            req.extensions_mut().insert(self.limits);
        }
        if tunnel {
            req.extensions_mut().insert(self.lease.clone());
        }
        if let Some(ext) = &self.conn_extensions {
            req.extensions_mut().extend(ext.clone());
        }
        LimitsFuture::Inner {
            fut: self.inner.call(req),
        }
    }
}

pin_project! {
    #[project = LimitsProj]
    enum LimitsFuture<F, B: http_body::Body> {
        Inner { #[pin] fut: F },
        // Boxed: the refusal is rare, and inline it sized every request's future (a
        // response head, ~100 bytes), which hyper's dispatcher moves with `memcpy` when
        // it stores it (issue 12, session 15).
        Refused { res: Option<Box<Response<Either<B, Empty<B::Data>>>>> },
    }
}

impl<F, B, E> Future for LimitsFuture<F, B>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: http_body::Body,
{
    type Output = Result<Response<Either<B, Empty<B::Data>>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            LimitsProj::Inner { fut } => fut.poll(cx).map_ok(|res| res.map(Either::Left)),
            // Polled once: a second poll after Ready is a caller bug; stay pending.
            LimitsProj::Refused { res } => match res.take() {
                Some(res) => Poll::Ready(Ok(*res)),
                None => Poll::Pending,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every request's future is stored by hyper's dispatcher, a `memcpy` of its whole
    /// size: the rare refusal must not size it (an inline response made it 120 bytes).
    #[test]
    fn refusal_does_not_size_the_future() {
        type Fut = LimitsFuture<std::future::Pending<()>, Empty<Bytes>>;
        let size = std::mem::size_of::<Fut>();
        assert!(size <= 2 * std::mem::size_of::<usize>(), "{size} bytes");
    }
}
