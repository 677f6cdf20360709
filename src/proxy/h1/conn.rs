//! One upstream connection of the lean path, the list of idle ones, and the exchange that
//! writes a request head and reads the response head, in the request's own task.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{ready, Context, Poll, Waker};
use std::time::Duration;

use bytes::BytesMut;
use http::{HeaderMap, Method, Response};
use tokio::io::AsyncWrite;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::body::H1Body;
use super::decode::Decoder;
use super::error::Http1Error;
use super::head::{encode_request, parse_response, Span};
use crate::proxy::connect::Connector;
use crate::proxy::error::ForwardError;
use crate::proxy::pool::ConnTimer;

/// The first read buffer: a response head and a small body fit in one read.
const INITIAL_READ: usize = 8 * 1024;
/// The largest read a body grows to while reads keep filling the buffer.
const MAX_READ: usize = 256 * 1024;
/// Below this much free space the buffer is replaced before a read rather than used up.
const MIN_SPARE: usize = 1024;
/// The most buffer capacity an idle connection keeps.
const IDLE_BUFFER_LIMIT: usize = 64 * 1024;

/// An open HTTP/1.1 connection to an upstream.
pub(crate) struct H1Conn {
    io: TcpStream,
    /// Read but not yet consumed. Empty whenever the connection is idle.
    pub(super) buf: BytesMut,
    /// The request head being written (kept for its capacity between exchanges).
    out: Vec<u8>,
    /// How much the next read may take (grows while a body's reads fill it).
    next_read: usize,
    /// Scratch for the response head's field offsets.
    spans: Vec<Span>,
    /// The connection's response timer, kept armed between exchanges (see `future.rs`).
    pub(crate) timer: Option<ConnTimer>,
}

impl H1Conn {
    fn new(io: TcpStream, out: Vec<u8>) -> Box<Self> {
        Box::new(H1Conn {
            io,
            buf: BytesMut::new(),
            out,
            next_read: INITIAL_READ,
            spans: Vec::new(),
            timer: None,
        })
    }

    /// Reads more into `buf`. `Ok(0)`: the upstream closed.
    pub(super) fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.buf.capacity() - self.buf.len() < MIN_SPARE {
            // Bytes still shared (a head's field values, a body chunk in flight) are not
            // overwritten: this takes a fresh buffer when the old one is shared. A buffer
            // with room left serves the next responses until it is used up.
            self.buf.reserve(self.next_read);
        }
        let spare = self.buf.capacity() - self.buf.len();
        let n = ready!(tokio_util::io::poll_read_buf(
            Pin::new(&mut self.io),
            cx,
            &mut self.buf
        ))?;
        // A read that filled the space asks for a larger one next time (a large body);
        // one that used little lets it shrink back.
        if n == spare {
            self.next_read = (self.next_read * 2).min(MAX_READ);
        } else if n < spare / 4 {
            self.next_read = (self.next_read / 2).max(INITIAL_READ);
        }
        Poll::Ready(Ok(n))
    }

    /// Whether an idle connection can carry a request: not closed by the upstream and
    /// with nothing unasked to read. No system call unless epoll saw it readable.
    fn usable(&mut self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        match self.io.poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            Poll::Ready(Ok(())) => {
                let mut probe = [0u8; 1];
                matches!(self.io.try_read(&mut probe),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
        }
    }
}

struct IdleConn {
    conn: Box<H1Conn>,
    since: Instant,
}

/// The idle lean connections of one upstream.
pub(crate) struct Idle {
    conns: Mutex<Vec<IdleConn>>,
    max_idle: usize,
    idle_timeout: Duration,
}

impl Idle {
    pub(crate) fn new(max_idle: usize, idle_timeout: Duration) -> Arc<Self> {
        Arc::new(Idle {
            conns: Mutex::new(Vec::new()),
            max_idle,
            idle_timeout,
        })
    }

    /// A usable idle connection, most recently used first, and the time it was taken;
    /// expired and closed ones are dropped on the way.
    fn checkout(&self) -> Option<(Box<H1Conn>, Instant)> {
        let mut conns = self.conns.lock().unwrap_or_else(PoisonError::into_inner);
        let mut now = None;
        while let Some(IdleConn { mut conn, since }) = conns.pop() {
            let now = *now.get_or_insert_with(Instant::now);
            if now.duration_since(since) <= self.idle_timeout && conn.usable() {
                return Some((conn, now));
            }
        }
        None
    }

    /// Puts back a connection whose exchange started at `since` (idleness is counted
    /// from there: the early, safe side of the upstream's keep-alive timeout).
    pub(super) fn checkin(&self, mut conn: Box<H1Conn>, since: Instant) {
        if !conn.buf.is_empty() {
            // Bytes past the response: the upstream is out of step; never reuse it.
            return;
        }
        // An idle connection keeps at most a small buffer: one that grew for a large
        // body, or a large request head, is let go (the pool's memory is bounded by
        // `max_idle` times this, not by the largest exchange).
        if conn.buf.capacity() > IDLE_BUFFER_LIMIT {
            conn.buf = BytesMut::new();
            conn.next_read = INITIAL_READ;
        }
        if conn.out.capacity() > IDLE_BUFFER_LIMIT {
            conn.out = Vec::new();
        }
        let mut conns = self.conns.lock().unwrap_or_else(PoisonError::into_inner);
        // Reuse is last-in first-out, so the oldest idle connections sit at the bottom;
        // once the oldest has expired, the expired ones are closed here rather than
        // left open (perhaps half-closed by the upstream) until a burst reaches them.
        let expired = |c: &IdleConn| since.saturating_duration_since(c.since) > self.idle_timeout;
        if conns.first().is_some_and(expired) {
            conns.retain(|c| !expired(c));
        }
        if conns.len() < self.max_idle {
            conns.push(IdleConn { conn, since });
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.conns
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

type Dialing = Pin<Box<dyn Future<Output = Result<TcpStream, ForwardError>> + Send>>;

fn dial(connector: &Arc<Connector>) -> Dialing {
    let connector = connector.clone();
    Box::pin(async move { connector.connect_tcp().await })
}

enum State {
    Connecting(Dialing),
    Writing { conn: Box<H1Conn>, written: usize },
    Reading { conn: Box<H1Conn> },
    Done,
}

/// One request without a body: its head written, the response head read.
pub(crate) struct Exchange {
    state: State,
    /// The head while no connection holds it (connecting).
    out: Vec<u8>,
    head_request: bool,
    /// The connection came from the pool: if it turns out closed before any byte of the
    /// request left, the request goes out once more on a new connection; an idempotent
    /// one also when the connection closes before any byte of an answer (the upstream's
    /// keep-alive timeout racing our reuse: nginx retries a cached connection so too).
    reused: bool,
    idempotent: bool,
    /// Bytes of the answer have arrived.
    answered: bool,
    /// When the exchange started: a pooled connection's checkout, else `None`.
    pub(crate) started: Option<Instant>,
    /// The request's header map, cleared: the answer's fields go into its allocation.
    fields: HeaderMap,
}

/// Why an exchange failed.
pub(crate) enum Failed {
    /// Connecting failed (already the right `ForwardError`).
    Connect(ForwardError),
    /// The upstream's side broke.
    Upstream(Http1Error),
}

impl Exchange {
    /// Starts an exchange for a request whose head `encode` writes, on an idle connection
    /// or a new one.
    pub(crate) fn new(idle: &Idle, connector: &Arc<Connector>, req: http::request::Parts) -> Self {
        let head_request = req.method == Method::HEAD;
        let idempotent = req.method.is_idempotent();
        let encode = |out: &mut Vec<u8>| encode_request(&req, out);
        match idle.checkout() {
            Some((mut conn, at)) => {
                encode(&mut conn.out);
                Exchange {
                    state: State::Writing { conn, written: 0 },
                    out: Vec::new(),
                    head_request,
                    reused: true,
                    idempotent,
                    answered: false,
                    started: Some(at),
                    fields: req.headers,
                }
            }
            None => {
                let mut out = Vec::new();
                encode(&mut out);
                Exchange {
                    state: State::Connecting(dial(connector)),
                    out,
                    head_request,
                    reused: false,
                    idempotent,
                    answered: false,
                    started: None,
                    fields: req.headers,
                }
            }
        }
    }

    /// The connection's response timer, for the caller to run during the exchange; it
    /// goes back into the connection with [`Exchange::poll`]'s `timer`.
    pub(crate) fn take_timer(&mut self) -> Option<ConnTimer> {
        match &mut self.state {
            State::Writing { conn, .. } | State::Reading { conn } => conn.timer.take(),
            _ => None,
        }
    }

    /// Drives the exchange to the response head.
    pub(crate) fn poll(
        &mut self,
        cx: &mut Context<'_>,
        idle: &Arc<Idle>,
        connector: &Arc<Connector>,
        timer: &mut Option<ConnTimer>,
    ) -> Poll<Result<Response<H1Body>, Failed>> {
        loop {
            match &mut self.state {
                State::Connecting(fut) => {
                    let io = match ready!(fut.as_mut().poll(cx)) {
                        Ok(io) => io,
                        Err(e) => {
                            self.state = State::Done;
                            return Poll::Ready(Err(Failed::Connect(e)));
                        }
                    };
                    let conn = H1Conn::new(io, std::mem::take(&mut self.out));
                    self.state = State::Writing { conn, written: 0 };
                }
                State::Writing { conn, written } => {
                    let conn = &mut **conn;
                    match Pin::new(&mut conn.io).poll_write(cx, &conn.out[*written..]) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(Ok(0)) => {
                            return self.fail(Http1Error::Io(io::ErrorKind::WriteZero.into()))
                        }
                        Poll::Ready(Ok(n)) => {
                            *written += n;
                            if *written == conn.out.len() {
                                self.start_reading();
                            }
                        }
                        Poll::Ready(Err(e)) if *written == 0 && self.reused => {
                            // Closed while idle, found only now: nothing of the request
                            // left, so it is safe to send again whatever its method.
                            tracing::debug!(error = %e, "pooled connection was closed; reconnecting");
                            self.reconnect(connector);
                        }
                        Poll::Ready(Err(e)) => return self.fail(Http1Error::Io(e)),
                    }
                }
                State::Reading { conn } => {
                    if !conn.buf.is_empty() {
                        match parse_response(
                            &mut conn.buf,
                            self.head_request,
                            &mut conn.spans,
                            &mut self.fields,
                        ) {
                            Ok(Some(head)) => {
                                let State::Reading { mut conn } =
                                    std::mem::replace(&mut self.state, State::Done)
                                else {
                                    return self.fail(Http1Error::Incomplete);
                                };
                                conn.timer = timer.take();
                                let since = self.started.unwrap_or_else(Instant::now);
                                let decoder = Decoder::new(head.framing);
                                let body = H1Body::new(conn, decoder, head.keep_alive, idle, since);
                                return Poll::Ready(Ok(head.response.map(|()| body)));
                            }
                            Ok(None) => {}
                            Err(e) => return self.fail(e),
                        }
                    }
                    let read = ready!(conn.poll_fill(cx));
                    let unanswered = self.reused && self.idempotent && !self.answered;
                    match read {
                        Ok(0) if unanswered => {
                            tracing::debug!("pooled connection closed before an answer; resending");
                            self.reconnect(connector);
                        }
                        Ok(0) => return self.fail(Http1Error::Incomplete),
                        Ok(_) => self.answered = true,
                        Err(e) if unanswered && e.kind() == io::ErrorKind::ConnectionReset => {
                            tracing::debug!(error = %e, "pooled connection reset before an answer; resending");
                            self.reconnect(connector);
                        }
                        Err(e) => return self.fail(Http1Error::Io(e)),
                    }
                }
                State::Done => return Poll::Ready(Err(Failed::Upstream(Http1Error::Incomplete))),
            }
        }
    }

    fn start_reading(&mut self) {
        if let State::Writing { conn, .. } = std::mem::replace(&mut self.state, State::Done) {
            self.state = State::Reading { conn };
        }
    }

    /// Sends the request again on a new connection (once: the new one is not `reused`).
    fn reconnect(&mut self, connector: &Arc<Connector>) {
        if let State::Writing { mut conn, .. } | State::Reading { mut conn } =
            std::mem::replace(&mut self.state, State::Done)
        {
            self.out = std::mem::take(&mut conn.out);
        }
        self.reused = false;
        self.started = None;
        self.state = State::Connecting(dial(connector));
    }

    fn fail<T>(&mut self, e: Http1Error) -> Poll<Result<T, Failed>> {
        // The connection is dropped, so closed: its state is unknown.
        self.state = State::Done;
        Poll::Ready(Err(Failed::Upstream(e)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (ours, theirs) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (ours.expect("connect"), theirs.expect("accept").0)
    }

    #[tokio::test]
    async fn an_idle_connection_keeps_a_small_buffer_and_a_dirty_one_is_not_kept() {
        let idle = Idle::new(4, Duration::from_secs(60));
        let (ours, _theirs) = pair().await;
        let mut conn = H1Conn::new(ours, Vec::with_capacity(1 << 20));
        conn.buf.reserve(1 << 20);
        conn.next_read = MAX_READ;
        idle.checkin(conn, Instant::now());
        let (conn, _) = idle.checkout().expect("kept");
        assert!(
            conn.buf.capacity() <= IDLE_BUFFER_LIMIT && conn.out.capacity() <= IDLE_BUFFER_LIMIT
        );
        assert_eq!(conn.next_read, INITIAL_READ);
        let mut conn = conn;
        conn.buf.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
        idle.checkin(conn, Instant::now());
        assert_eq!(idle.len(), 0, "bytes past an answer: not reused");
    }

    #[tokio::test]
    async fn expired_idle_connections_are_closed_at_the_next_checkin() {
        let idle = Idle::new(4, Duration::from_secs(10));
        let now = Instant::now();
        let old = now.checked_sub(Duration::from_secs(11)).unwrap_or(now);
        for since in [old, old, now] {
            let (ours, _) = pair().await;
            idle.checkin(H1Conn::new(ours, Vec::new()), since);
        }
        assert_eq!(
            idle.len(),
            1,
            "the two expired ones went when the fresh one came"
        );
    }

    #[tokio::test]
    async fn checkout_skips_a_connection_the_upstream_closed() {
        let idle = Idle::new(4, Duration::from_secs(60));
        let (ours, theirs) = pair().await;
        let conn = H1Conn::new(ours, Vec::new());
        drop(theirs);
        // Once the reactor has seen the close, the probe reads the end and the
        // connection is dropped instead of carrying a request.
        conn.io.readable().await.expect("readable");
        idle.checkin(conn, Instant::now());
        assert_eq!(idle.len(), 1);
        assert!(idle.checkout().is_none());
        assert_eq!(idle.len(), 0);
    }
}
