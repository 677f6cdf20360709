//! The response body of the lean path. A body already in the read buffer with the head
//! (the common small response) is handed over whole and its connection goes back to the
//! pool at once; a longer one is read from the connection as the caller polls, and the
//! connection goes back when the body's end has been read.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use tokio::time::Instant;

use super::conn::{H1Conn, Idle};
use super::decode::{Decoded, Decoder};
use super::error::Http1Error;

/// The body of a response read by the lean HTTP/1 path.
pub(crate) struct H1Body {
    kind: Kind,
}

enum Kind {
    /// Complete in hand (or empty).
    Whole(Option<Bytes>),
    Streaming(Box<Streaming>),
}

struct Streaming {
    /// `None` once the end was read (the connection went back or was closed).
    conn: Option<Box<H1Conn>>,
    decoder: Decoder,
    keep_alive: bool,
    /// The upstream closed: whatever the decoder still needs will not come.
    eof: bool,
    idle: Arc<Idle>,
    since: Instant,
}

impl H1Body {
    /// The body after a head; checks the connection in at once when the body is already
    /// read.
    pub(super) fn new(
        mut conn: Box<H1Conn>,
        mut decoder: Decoder,
        keep_alive: bool,
        idle: &Arc<Idle>,
        since: Instant,
    ) -> Self {
        let whole = match decoder.remaining() {
            Some(0) => Some(None),
            Some(n) if n <= conn.buf.len() as u64 => match decoder.decode(&mut conn.buf, false) {
                Ok(Decoded::Data(b)) => Some(Some(b)),
                _ => None,
            },
            _ => None,
        };
        match whole {
            Some(data) => {
                if keep_alive {
                    idle.checkin(conn, since);
                }
                H1Body {
                    kind: Kind::Whole(data),
                }
            }
            None => H1Body {
                kind: Kind::Streaming(Box::new(Streaming {
                    conn: Some(conn),
                    decoder,
                    keep_alive,
                    eof: false,
                    idle: idle.clone(),
                    since,
                })),
            },
        }
    }
}

impl Streaming {
    /// The body's end was read: a clean keep-alive connection goes back to the pool.
    fn finish(&mut self) {
        if let Some(conn) = self.conn.take() {
            if self.keep_alive {
                self.idle.checkin(conn, self.since);
            }
        }
    }
}

impl http_body::Body for H1Body {
    type Data = Bytes;
    type Error = Http1Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Http1Error>>> {
        let s = match &mut self.kind {
            Kind::Whole(data) => return Poll::Ready(data.take().map(|b| Ok(Frame::data(b)))),
            Kind::Streaming(s) => s,
        };
        loop {
            let Some(conn) = s.conn.as_mut() else {
                return Poll::Ready(None);
            };
            let step = match s.decoder.decode(&mut conn.buf, s.eof) {
                Ok(step) => step,
                Err(e) => {
                    s.conn = None;
                    return Poll::Ready(Some(Err(e)));
                }
            };
            match step {
                Decoded::Data(b) => {
                    // The last bytes of a known length: hand the connection back now,
                    // before a caller that trusts `is_end_stream` stops polling.
                    if s.decoder.is_done() {
                        s.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(b))));
                }
                Decoded::Trailers(t) => {
                    s.finish();
                    return Poll::Ready(Some(Ok(Frame::trailers(t))));
                }
                Decoded::End => {
                    s.finish();
                    return Poll::Ready(None);
                }
                Decoded::NeedMore => match ready!(conn.poll_fill(cx)) {
                    Ok(0) => s.eof = true,
                    Ok(_) => {}
                    Err(e) => {
                        s.conn = None;
                        return Poll::Ready(Some(Err(Http1Error::Io(e))));
                    }
                },
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Whole(data) => data.is_none(),
            Kind::Streaming(s) => s.conn.is_none() || s.decoder.is_done(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Whole(data) => SizeHint::with_exact(data.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Streaming(s) => match s.decoder.remaining() {
                Some(n) => SizeHint::with_exact(n),
                None => SizeHint::default(),
            },
        }
    }
}

impl std::fmt::Debug for H1Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("H1Body")
    }
}
