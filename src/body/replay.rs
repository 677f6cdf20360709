//! A request body that can be sent more than once.
//!
//! A chain that hops to the next link, or a balancer that retries on the next endpoint,
//! must send the *same* request again, but a streamed body is consumed by the first send.
//! [`ReplayBody::buffer`] reads the body up front, up to a byte limit (like nginx's
//! `proxy_request_buffering` with `client_body_buffer_size`):
//!
//! | body | result |
//! |---|---|
//! | ends within the limit | replayable: [`ReplayBody::try_clone`] returns copies that share the bytes |
//! | declares (`size_hint`) more than the limit | not read at all, streamed once, not replayable |
//! | grows past the limit while reading | what was read plus the rest streamed once, not replayable |
//!
//! The body is never truncated and never held whole past the limit. A caller that sees
//! `is_replayable() == false` must not retry; the layers of this crate answer with the
//! current response instead.
//!
//! ```
//! use http_body_util::{BodyExt, Full};
//! use tower_patterns::body::ReplayBody;
//!
//! # tokio_test_block_on(async {
//! let body = ReplayBody::buffer(Full::new(bytes::Bytes::from("hello")), 1024).await.unwrap();
//! let copy = body.try_clone().expect("5 bytes fit the limit");
//! assert_eq!(copy.collect().await.unwrap().to_bytes(), "hello");
//! assert_eq!(body.collect().await.unwrap().to_bytes(), "hello");
//! # });
//! # fn tokio_test_block_on<F: std::future::Future>(f: F) -> F::Output {
//! #     tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
//! # }
//! ```

use std::collections::VecDeque;
use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use http::{HeaderMap, Request};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;

use crate::proxy::body::BodyFault;
use crate::proxy::BodyLimits;
use crate::BoxError;

/// The request body failed while it was being buffered or streamed.
#[derive(Debug, thiserror::Error)]
#[error("request body failed")]
pub struct ReplayError(#[source] pub BoxError);

/// 400 Bad Request: the client's own body broke; 408/413 when a body limit stopped the buffering.
impl crate::error::HttpStatus for ReplayError {
    fn status(&self) -> http::StatusCode {
        // A limit that stopped the buffering (408/413) says more than "bad body".
        let cause: &(dyn std::error::Error + 'static) = &*self.0;
        crate::error::registered_status(cause).unwrap_or(http::StatusCode::BAD_REQUEST)
    }
}

/// The client's body broke: never charged to an upstream.
impl crate::error::KnownFailure for ReplayError {
    fn failure_kind(&self) -> crate::classify::FailureKind {
        crate::classify::FailureKind::Client
    }
}

/// Marker extension on a request whose body went over the replay limit: it can be sent
/// only once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotReplayable;

#[derive(Debug)]
struct Buffered {
    chunks: Vec<Bytes>,
    trailers: Option<HeaderMap>,
    len: u64,
}

/// A body that is either fully buffered (replayable) or a buffered prefix followed by the
/// rest of the original stream (sent once). See the [module docs](self).
pub struct ReplayBody<B> {
    state: State<B>,
}

enum State<B> {
    /// Replayable: `next` indexes the next chunk of `data` to yield. `None` is the empty
    /// body (most requests: GET, HEAD), which so costs no allocation per request.
    Full {
        data: Option<Arc<Buffered>>,
        next: usize,
        trailers_sent: bool,
    },
    /// Not replayable: the prefix read before the limit was hit, then the rest. Boxed:
    /// the body is moved with every move of its request (the server, each layer, the
    /// balancer's dispatch, hyper's client), and inline this rare state made
    /// `ReplayBody<Incoming>` 72 bytes instead of 24 and the request 296 instead of 248,
    /// past the 256 bytes where glibc's `memcpy` takes its longer path (issue 12).
    Once(Box<Once<B>>),
}

/// The state of a body sent once: see [`State::Once`].
struct Once<B> {
    prefix: VecDeque<Frame<Bytes>>,
    rest: Option<B>,
}

impl<B> fmt::Debug for ReplayBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.state {
            State::Full { data, .. } => write!(
                f,
                "ReplayBody::Full({} bytes)",
                data.as_ref().map_or(0, |d| d.len)
            ),
            State::Once(_) => f.write_str("ReplayBody::Once"),
        }
    }
}

fn to_bytes<D: Buf>(mut d: D) -> Bytes {
    d.copy_to_bytes(d.remaining())
}

impl<B> ReplayBody<B>
where
    B: Body + Unpin,
    B::Error: Into<BoxError>,
{
    /// Reads `body` up to `limit` bytes. See the [module docs](self) for what happens past
    /// the limit. Errors only when the body itself fails while being read.
    pub async fn buffer(body: B, limit: usize) -> Result<Self, ReplayError> {
        Self::buffer_within(body, limit, None).await
    }

    /// [`buffer`](Self::buffer), within the client's [`BodyLimits`]: buffering happens
    /// before any upstream is involved, so it must not wait for an idle client longer
    /// than the idle timeout, nor read past the size limit (the error's source is then
    /// the fault, answered 408/413 by [`error_status`](crate::error::error_status)).
    pub(crate) async fn buffer_within(
        mut body: B,
        limit: usize,
        limits: Option<BodyLimits>,
    ) -> Result<Self, ReplayError> {
        let limit = limit as u64;
        let hint = body.size_hint();
        let max_bytes = limits.and_then(|l| l.max_bytes);
        let too_large = |max| ReplayError(Box::new(BodyFault::TooLarge(max)));
        if let Some(max) = max_bytes {
            if hint.lower() > max {
                return Err(too_large(max));
            }
        }
        if hint.lower() > limit {
            return Ok(Self::once(VecDeque::new(), Some(body)));
        }
        let mut chunks = Vec::new();
        let mut len = 0u64;
        let mut trailers = None;
        loop {
            if body.is_end_stream() {
                break;
            }
            let next = match limits.and_then(|l| l.idle_timeout) {
                Some(idle) => tokio::time::timeout(idle, body.frame())
                    .await
                    .map_err(|_| ReplayError(Box::new(BodyFault::Idle(idle))))?,
                None => body.frame().await,
            };
            let frame = match next {
                None => break,
                Some(f) => f.map_err(|e| ReplayError(e.into()))?,
            };
            match frame.into_data() {
                Ok(data) => {
                    let data = to_bytes(data);
                    len += data.len() as u64;
                    if let Some(max) = max_bytes {
                        if len > max {
                            return Err(too_large(max));
                        }
                    }
                    chunks.push(data);
                    if len > limit {
                        let prefix = chunks.into_iter().map(Frame::data).collect();
                        return Ok(Self::once(prefix, Some(body)));
                    }
                }
                Err(frame) => {
                    if let Ok(t) = frame.into_trailers() {
                        trailers = Some(t);
                    }
                }
            }
        }
        let data = if chunks.is_empty() && trailers.is_none() {
            None
        } else {
            Some(Arc::new(Buffered {
                chunks,
                trailers,
                len,
            }))
        };
        Ok(ReplayBody {
            state: State::Full {
                data,
                next: 0,
                trailers_sent: false,
            },
        })
    }
}

impl<B> ReplayBody<B> {
    fn once(prefix: VecDeque<Frame<Bytes>>, rest: Option<B>) -> Self {
        ReplayBody {
            state: State::Once(Box::new(Once { prefix, rest })),
        }
    }

    /// An empty, replayable body.
    pub fn empty() -> Self {
        ReplayBody {
            state: State::Full {
                data: None,
                next: 0,
                trailers_sent: false,
            },
        }
    }

    /// Whether [`try_clone`](Self::try_clone) can make copies.
    pub fn is_replayable(&self) -> bool {
        matches!(self.state, State::Full { .. })
    }

    /// A fresh copy from the first byte, sharing the buffered data; `None` when the body
    /// went over the limit.
    pub fn try_clone(&self) -> Option<Self> {
        match &self.state {
            State::Full { data, .. } => Some(ReplayBody {
                state: State::Full {
                    data: data.clone(),
                    next: 0,
                    trailers_sent: false,
                },
            }),
            State::Once(_) => None,
        }
    }
}

/// Buffers the body of `req` (see [`ReplayBody::buffer`]); a body over the limit gets the
/// [`NotReplayable`] extension. The request's [`BodyLimits`] extension (inserted by
/// [`crate::server`]) bounds the wait for an idle client and the bytes read.
pub async fn buffer_request<B>(
    req: Request<B>,
    limit: usize,
) -> Result<Request<ReplayBody<B>>, ReplayError>
where
    B: Body + Unpin,
    B::Error: Into<BoxError>,
{
    let (mut parts, body) = req.into_parts();
    let limits = parts.extensions.get::<BodyLimits>().copied();
    let body = ReplayBody::buffer_within(body, limit, limits).await?;
    if !body.is_replayable() {
        parts.extensions.insert(NotReplayable);
    }
    Ok(Request::from_parts(parts, body))
}

/// A copy of `req` (method, URI, version, headers, extensions and body) to send again;
/// `None` when its body is not replayable.
pub fn try_clone_request<B>(req: &Request<ReplayBody<B>>) -> Option<Request<ReplayBody<B>>> {
    let body = req.body().try_clone()?;
    let mut copy = Request::new(body);
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    *copy.extensions_mut() = req.extensions().clone();
    Some(copy)
}

impl<B> Body for ReplayBody<B>
where
    B: Body + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = ReplayError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ReplayError>>> {
        let this = self.get_mut();
        match &mut this.state {
            State::Full {
                data,
                next,
                trailers_sent,
            } => {
                let Some(data) = data else {
                    return Poll::Ready(None);
                };
                if let Some(chunk) = data.chunks.get(*next) {
                    *next += 1;
                    return Poll::Ready(Some(Ok(Frame::data(chunk.clone()))));
                }
                if !*trailers_sent {
                    *trailers_sent = true;
                    if let Some(t) = &data.trailers {
                        return Poll::Ready(Some(Ok(Frame::trailers(t.clone()))));
                    }
                }
                Poll::Ready(None)
            }
            State::Once(once) => {
                let Once { prefix, rest } = &mut **once;
                if let Some(f) = prefix.pop_front() {
                    return Poll::Ready(Some(Ok(f)));
                }
                let Some(body) = rest.as_mut() else {
                    return Poll::Ready(None);
                };
                match Pin::new(body).poll_frame(cx) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(None) => {
                        *rest = None;
                        Poll::Ready(None)
                    }
                    Poll::Ready(Some(Err(e))) => {
                        *rest = None;
                        Poll::Ready(Some(Err(ReplayError(e.into()))))
                    }
                    Poll::Ready(Some(Ok(f))) => Poll::Ready(Some(Ok(f.map_data(to_bytes)))),
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.state {
            State::Full {
                data,
                next,
                trailers_sent,
            } => data.as_ref().is_none_or(|data| {
                *next >= data.chunks.len() && (*trailers_sent || data.trailers.is_none())
            }),
            State::Once(once) => {
                let Once { prefix, rest } = &**once;
                prefix.is_empty() && rest.as_ref().is_none_or(|b| b.is_end_stream())
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.state {
            State::Full { data, next, .. } => {
                let left: u64 = data.as_ref().map_or(0, |data| {
                    data.chunks[(*next).min(data.chunks.len())..]
                        .iter()
                        .map(|c| c.len() as u64)
                        .sum()
                });
                SizeHint::with_exact(left)
            }
            State::Once(once) => {
                let Once { prefix, rest } = &**once;
                let pre: u64 = prefix
                    .iter()
                    .filter_map(|f| f.data_ref())
                    .map(|d| d.len() as u64)
                    .sum();
                match rest {
                    None => SizeHint::with_exact(pre),
                    Some(b) => {
                        let h = b.size_hint();
                        let mut out = SizeHint::new();
                        // A body may claim any size: saturate rather than overflow.
                        out.set_lower(h.lower().saturating_add(pre));
                        if let Some(u) = h.upper() {
                            out.set_upper(u.saturating_add(pre));
                        }
                        out
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{Empty, Full};

    /// The body is moved inside its request through every layer and into hyper's client:
    /// three words, and the request within the 256 bytes glibc's `memcpy` copies on its
    /// short path. With the streamed state inline they were 72 and 296 bytes (issue 12).
    #[cfg(target_pointer_width = "64")]
    #[test]
    fn the_body_is_three_words_and_its_request_stays_within_256_bytes() {
        type Replayed = ReplayBody<hyper::body::Incoming>;
        let body = std::mem::size_of::<Replayed>();
        let request = std::mem::size_of::<Request<Replayed>>();
        assert!(body <= 24, "ReplayBody<Incoming> is {body} bytes");
        assert!(
            request <= 256,
            "Request<ReplayBody<Incoming>> is {request} bytes"
        );
    }

    fn shares_nothing<B>(body: &ReplayBody<B>) -> bool {
        matches!(body.state, State::Full { data: None, .. })
    }

    #[tokio::test]
    async fn an_empty_body_is_replayable_and_allocates_no_buffer() {
        let body = ReplayBody::buffer(Empty::<Bytes>::new(), 1024)
            .await
            .unwrap();
        assert!(shares_nothing(&body), "{body:?}");
        let copy = body.try_clone().expect("empty is replayable");
        assert!(copy.is_end_stream());
        assert_eq!(copy.size_hint().exact(), Some(0));
        assert!(copy.collect().await.unwrap().to_bytes().is_empty());
        assert!(shares_nothing(&ReplayBody::<Empty<Bytes>>::empty()));
    }

    #[tokio::test]
    async fn trailers_alone_are_kept_and_replayed() {
        let mut t = HeaderMap::new();
        t.insert("grpc-status", http::HeaderValue::from_static("0"));
        let src = http_body_util::StreamBody::new(futures_util::stream::iter([Ok::<
            _,
            std::convert::Infallible,
        >(
            Frame::<Bytes>::trailers(t.clone()),
        )]));
        let body = ReplayBody::buffer(src, 1024).await.unwrap();
        assert!(!shares_nothing(&body));
        for copy in [body.try_clone().unwrap(), body] {
            assert_eq!(copy.collect().await.unwrap().trailers(), Some(&t));
        }
    }

    /// Yields 20 bytes, then claims an endless rest.
    struct Endless(bool);

    impl Body for Endless {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            if self.0 {
                return Poll::Pending;
            }
            self.0 = true;
            Poll::Ready(Some(Ok(Frame::data(Bytes::from(vec![b'x'; 20])))))
        }
        fn size_hint(&self) -> SizeHint {
            if self.0 {
                SizeHint::with_exact(u64::MAX)
            } else {
                SizeHint::new()
            }
        }
    }

    #[tokio::test]
    async fn a_size_hint_past_u64_saturates() {
        let body = ReplayBody::buffer(Endless(false), 10).await.unwrap();
        assert!(!body.is_replayable());
        let h = body.size_hint();
        assert_eq!((h.lower(), h.upper()), (u64::MAX, Some(u64::MAX)));
        let full = ReplayBody::buffer(Full::new(Bytes::from("abc")), 10)
            .await
            .unwrap();
        assert_eq!(full.size_hint().exact(), Some(3));
    }
}
