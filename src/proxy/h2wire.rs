//! Counting the open streams of an HTTP/2 upstream connection, so the pool can open another
//! connection when one is full (as Envoy does) instead of queueing inside hyper.
//!
//! hyper neither tells how many streams a connection has open nor when a response body
//! ends (when this was written, `Forward` handed out hyper's own `Incoming` body, which
//! could not be wrapped without changing the public response type; `ForwardBody` now wraps
//! it). The stream states are visible on the wire, though:
//! [`Counted`] wraps the connection's byte stream and reads only the 9-byte frame headers
//! going each way (payloads are skipped, except a `SETTINGS` frame's, which carries the
//! upstream's `SETTINGS_MAX_CONCURRENT_STREAMS`). A stream counts from our `HEADERS` that
//! opened it until both sides sent `END_STREAM`, or either reset it (RFC 9113 §5.1) — the
//! exact rule the upstream applies to its limit. Requests handed to hyper whose `HEADERS`
//! are not written yet count too ([`Pending`]), so a burst does not overfill a connection.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;
/// The client connection preface precedes our first frame (RFC 9113 §3.4).
const PREFACE_LEN: usize = 24;
/// A `SETTINGS` payload is read up to this many bytes (42 settings); the rest is skipped.
const MAX_SETTINGS_READ: usize = 252;

const LOCAL_CLOSED: u8 = 1;
const REMOTE_CLOSED: u8 = 2;
/// The upstream's response `HEADERS` arrived on the stream.
const ANSWERED: u8 = 4;

#[derive(Default)]
struct State {
    /// Open streams by id, with the flags above.
    streams: HashMap<u32, u8>,
    /// The highest stream id we opened: a `HEADERS` above it opens a stream, one at or
    /// below it is trailers.
    max_opened: u32,
    /// Open streams the upstream has not answered yet.
    unanswered: usize,
    /// Requests given to hyper on this connection whose exchange has not finished
    /// (see [`Pending`]).
    pending: usize,
}

impl State {
    /// Streams counted against the limit: open ones, plus requests hyper holds that have
    /// no stream yet (`pending` also covers the open but unanswered ones).
    fn load(&self) -> usize {
        self.streams.len() + self.pending.saturating_sub(self.unanswered)
    }

    fn close(&mut self, id: u32, flag: u8) -> bool {
        let Some(f) = self.streams.get_mut(&id) else {
            return false;
        };
        *f |= flag;
        if *f & (LOCAL_CLOSED | REMOTE_CLOSED) == LOCAL_CLOSED | REMOTE_CLOSED {
            self.remove(id)
        } else {
            false
        }
    }

    fn remove(&mut self, id: u32) -> bool {
        match self.streams.remove(&id) {
            Some(f) => {
                if f & ANSWERED == 0 {
                    self.unanswered = self.unanswered.saturating_sub(1);
                }
                true
            }
            None => false,
        }
    }
}

/// The stream count of one HTTP/2 connection, shared by its [`Counted`] I/O and the pool.
pub(crate) struct Streams {
    state: Mutex<State>,
    /// The upstream's `SETTINGS_MAX_CONCURRENT_STREAMS` (unlimited until it says).
    peer_max: AtomicUsize,
    /// The upstream's first `SETTINGS` frame arrived.
    settled: AtomicBool,
    settled_notify: Notify,
    /// Woken whenever a stream closes or a request finishes: the pool's waiters re-check.
    freed: Arc<Notify>,
}

impl Streams {
    pub(crate) fn new(freed: Arc<Notify>) -> Arc<Self> {
        Arc::new(Streams {
            state: Mutex::new(State::default()),
            peer_max: AtomicUsize::new(usize::MAX),
            settled: AtomicBool::new(false),
            settled_notify: Notify::new(),
            freed,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Reserves a stream when fewer than `limit` (and the upstream's own limit) are in
    /// use; the [`Pending`] gives it back when the exchange ends.
    pub(crate) fn try_reserve(self: &Arc<Self>, limit: usize) -> Option<Pending> {
        let limit = limit.min(self.peer_max.load(Ordering::Relaxed));
        let mut s = self.lock();
        if s.load() >= limit {
            return None;
        }
        s.pending += 1;
        Some(Pending(self.clone()))
    }

    /// Streams in use (open or about to be opened).
    #[cfg(test)]
    pub(crate) fn load(&self) -> usize {
        self.lock().load()
    }

    /// Waits for the upstream's first `SETTINGS` frame, which carries its stream limit.
    pub(crate) async fn settled(&self) {
        loop {
            let notified = self.settled_notify.notified();
            if self.settled.load(Ordering::Acquire) {
                return;
            }
            notified.await;
        }
    }

    fn freed(&self) {
        self.freed.notify_waiters();
    }

    /// A frame we sent.
    fn sent(&self, kind: u8, flags: u8, id: u32) {
        // Most frames (DATA mid-body, WINDOW_UPDATE, PING, ...) change no stream's state:
        // they take no lock.
        if !matters(kind, flags) {
            return;
        }
        let mut s = self.lock();
        let freed = match kind {
            HEADERS if id > s.max_opened && id % 2 == 1 => {
                s.max_opened = id;
                let f = if flags & END_STREAM != 0 {
                    LOCAL_CLOSED
                } else {
                    0
                };
                s.streams.insert(id, f);
                s.unanswered += 1;
                false
            }
            HEADERS | DATA if flags & END_STREAM != 0 => s.close(id, LOCAL_CLOSED),
            RST_STREAM => s.remove(id),
            _ => false,
        };
        drop(s);
        if freed {
            self.freed();
        }
    }

    /// A frame the upstream sent (its `SETTINGS` payload is read separately).
    fn received(&self, kind: u8, flags: u8, id: u32, last_stream_id: Option<u32>) {
        if !matters(kind, flags) && kind != GOAWAY {
            return;
        }
        let mut s = self.lock();
        let freed = match kind {
            HEADERS => {
                if let Some(f) = s.streams.get_mut(&id) {
                    if *f & ANSWERED == 0 {
                        *f |= ANSWERED;
                        s.unanswered = s.unanswered.saturating_sub(1);
                    }
                }
                flags & END_STREAM != 0 && s.close(id, REMOTE_CLOSED)
            }
            DATA if flags & END_STREAM != 0 => s.close(id, REMOTE_CLOSED),
            RST_STREAM => s.remove(id),
            GOAWAY => {
                // Streams above the last one the upstream processes never will be.
                let last = last_stream_id.unwrap_or(u32::MAX);
                let above: Vec<u32> = s.streams.keys().copied().filter(|i| *i > last).collect();
                let mut any = false;
                for i in above {
                    any |= s.remove(i);
                }
                any
            }
            _ => false,
        };
        drop(s);
        if freed {
            self.freed();
        }
    }

    /// The connection's byte stream ended or broke.
    fn ended(&self) {
        if !self.settled.swap(true, Ordering::AcqRel) {
            self.settled_notify.notify_waiters();
        }
        self.freed();
    }

    fn settings(&self, payload: &[u8]) {
        for setting in payload.chunks_exact(6) {
            let id = u16::from_be_bytes([setting[0], setting[1]]);
            if id == SETTINGS_MAX_CONCURRENT_STREAMS {
                let v = u32::from_be_bytes([setting[2], setting[3], setting[4], setting[5]]);
                let v = usize::try_from(v).unwrap_or(usize::MAX);
                let old = self.peer_max.swap(v, Ordering::Relaxed);
                if v > old {
                    self.freed();
                }
            }
        }
        if !self.settled.swap(true, Ordering::AcqRel) {
            self.settled_notify.notify_waiters();
        }
    }
}

/// Whether a frame can open, answer or close a stream.
fn matters(kind: u8, flags: u8) -> bool {
    match kind {
        HEADERS | RST_STREAM => true,
        DATA => flags & END_STREAM != 0,
        _ => false,
    }
}

/// One reserved stream of a connection: held from before the request is given to hyper
/// until its exchange ends (response headers or an error), or dropped with the request.
pub(crate) struct Pending(Arc<Streams>);

impl Drop for Pending {
    fn drop(&mut self) {
        let mut s = self.0.lock();
        s.pending = s.pending.saturating_sub(1);
        drop(s);
        self.0.freed();
    }
}

/// Follows the frame headers in one direction of the byte stream.
struct FrameScan {
    /// Bytes of the client preface still to skip (write side only).
    preface: usize,
    header: [u8; 9],
    have: usize,
    /// Payload bytes of the current frame still to pass.
    payload: usize,
    /// The current frame's payload is collected (`SETTINGS`, `GOAWAY`) up to this many.
    collect: usize,
    buf: Vec<u8>,
    kind: u8,
    flags: u8,
}

impl FrameScan {
    fn new(preface: usize) -> Self {
        FrameScan {
            preface,
            header: [0; 9],
            have: 0,
            payload: 0,
            collect: 0,
            buf: Vec::new(),
            kind: 0,
            flags: 0,
        }
    }

    /// Feeds `bytes`; `on_frame(kind, flags, stream id, payload)` once per frame, with
    /// the payload when it was collected (else empty).
    fn feed(&mut self, mut bytes: &[u8], mut on_frame: impl FnMut(u8, u8, u32, &[u8])) {
        while !bytes.is_empty() {
            if self.preface > 0 {
                let n = self.preface.min(bytes.len());
                self.preface -= n;
                bytes = &bytes[n..];
                continue;
            }
            if self.payload > 0 {
                let n = self.payload.min(bytes.len());
                if self.collect > self.buf.len() {
                    let take = (self.collect - self.buf.len()).min(n);
                    self.buf.extend_from_slice(&bytes[..take]);
                }
                self.payload -= n;
                bytes = &bytes[n..];
                if self.payload == 0 && self.collect > 0 {
                    self.finish(&mut on_frame);
                }
                continue;
            }
            let n = (9 - self.have).min(bytes.len());
            self.header[self.have..self.have + n].copy_from_slice(&bytes[..n]);
            self.have += n;
            bytes = &bytes[n..];
            if self.have < 9 {
                continue;
            }
            self.have = 0;
            let h = self.header;
            let len = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
            self.kind = h[3];
            self.flags = h[4];
            self.payload = len;
            self.collect = match self.kind {
                SETTINGS if self.flags & ACK == 0 => len.min(MAX_SETTINGS_READ),
                GOAWAY => len.min(4),
                _ => 0,
            };
            self.buf.clear();
            if self.collect == 0 || len == 0 {
                self.collect = 0;
                let id = stream_id(&h[5..9]);
                on_frame(self.kind, self.flags, id, &[]);
            }
        }
    }

    fn finish(&mut self, on_frame: &mut impl FnMut(u8, u8, u32, &[u8])) {
        self.collect = 0;
        let id = stream_id(&self.header[5..9]);
        on_frame(self.kind, self.flags, id, &self.buf);
    }
}

fn stream_id(b: &[u8]) -> u32 {
    let mut id = [0u8; 4];
    id.copy_from_slice(&b[..4]);
    u32::from_be_bytes(id) & 0x7fff_ffff
}

/// An upstream connection's byte stream (TCP or TLS) that reports its HTTP/2 frames to
/// [`Streams`]. Costs one pass over the frame headers; payloads are not copied.
pub(crate) struct Counted<S> {
    inner: S,
    streams: Arc<Streams>,
    read: FrameScan,
    write: FrameScan,
}

impl<S> Counted<S> {
    pub(crate) fn new(inner: S, streams: Arc<Streams>) -> Self {
        Counted {
            inner,
            streams,
            read: FrameScan::new(0),
            write: FrameScan::new(PREFACE_LEN),
        }
    }

    fn on_read(&mut self, bytes: &[u8]) {
        let streams = &self.streams;
        self.read
            .feed(bytes, |kind, flags, id, payload| match kind {
                SETTINGS if flags & ACK == 0 => streams.settings(payload),
                GOAWAY => {
                    let last = (payload.len() >= 4).then(|| stream_id(payload));
                    streams.received(kind, flags, id, last)
                }
                _ => streams.received(kind, flags, id, None),
            });
    }

    fn on_written(&mut self, bytes: &[u8]) {
        let streams = &self.streams;
        self.write
            .feed(bytes, |kind, flags, id, _| streams.sent(kind, flags, id));
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let res = Pin::new(&mut this.inner).poll_read(cx, buf);
        match &res {
            Poll::Ready(Ok(())) if buf.filled().len() > before => {
                this.on_read(&buf.filled()[before..]);
            }
            // End of stream or a broken one: nobody waits for SETTINGS that cannot come.
            Poll::Ready(_) => this.streams.ended(),
            Poll::Pending => {}
        }
        res
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let res = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = res {
            this.on_written(&buf[..n.min(buf.len())]);
        }
        res
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let res = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = res {
            let mut left = n;
            for b in bufs {
                if left == 0 {
                    break;
                }
                let take = left.min(b.len());
                this.on_written(&b[..take]);
                left -= take;
            }
        }
        res
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
#[cfg(test)]
mod tests;
