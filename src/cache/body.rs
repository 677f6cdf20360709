use std::collections::VecDeque;
use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use super::flight::FlightBody;
use super::store::CachedResponse;
use crate::body::tee::TeeBody;
use crate::BoxError;

/// The errors a [`CacheBody`] makes itself (upstream body errors pass through as they
/// are, boxed). Either one means the body is incomplete: the server aborts the response
/// instead of ending it cleanly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CacheBodyError {
    /// The response was shared from another request's origin fetch (request coalescing)
    /// and that fetch failed mid-way.
    #[error("the shared origin response this body followed failed mid-way")]
    FillFailed,
    /// A body answering a `Range` ended before the range did.
    #[error("body ended before the requested range")]
    Truncated,
}

/// The body of a [`Cache`](super::Cache) response: a stored entry, a short message, the
/// upstream body (teed into the store on a fill), or another request's fill it follows;
/// optionally cut to one byte range.
pub struct CacheBody<B> {
    kind: Kind<B>,
    /// A single `Range`: bytes to skip, then bytes to yield.
    window: Option<Window>,
}

#[derive(Debug, Clone, Copy)]
struct Window {
    skip: u64,
    left: u64,
}

enum Kind<B> {
    Stored {
        entry: Arc<CachedResponse>,
        next: usize,
    },
    Chunks(VecDeque<Bytes>),
    Live(TeeBody<B>),
    Flight(FlightBody),
}

impl<B> CacheBody<B> {
    fn of(kind: Kind<B>) -> Self {
        CacheBody { kind, window: None }
    }

    pub(crate) fn stored(entry: Arc<CachedResponse>) -> Self {
        Self::of(Kind::Stored { entry, next: 0 })
    }

    pub(crate) fn bytes(b: Bytes) -> Self {
        Self::chunks(vec![b])
    }

    pub(crate) fn chunks(chunks: Vec<Bytes>) -> Self {
        Self::of(Kind::Chunks(
            chunks.into_iter().filter(|c| !c.is_empty()).collect(),
        ))
    }

    pub(crate) fn flight(b: FlightBody) -> Self {
        Self::of(Kind::Flight(b))
    }

    pub(crate) fn live(b: TeeBody<B>) -> Self {
        Self::of(Kind::Live(b))
    }

    /// Yields only bytes `start..=end` of what the body would yield. The rest of a live
    /// body is not read by the client; the tee's disconnect policy finishes the fill.
    pub(crate) fn window(mut self, start: u64, end: u64) -> Self {
        self.window = Some(Window {
            skip: start,
            left: end.saturating_sub(start).saturating_add(1),
        });
        self
    }
}

impl<B> fmt::Debug for CacheBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.kind {
            Kind::Stored { .. } => "CacheBody::Stored",
            Kind::Chunks(_) => "CacheBody::Bytes",
            Kind::Live(_) => "CacheBody::Live",
            Kind::Flight(_) => "CacheBody::Flight",
        })
    }
}

impl<B> CacheBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    fn poll_inner(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.kind {
            Kind::Stored { entry, next } => {
                let chunk = entry.body.get(*next).cloned();
                *next += 1;
                Poll::Ready(chunk.map(|c| Ok(Frame::data(c))))
            }
            Kind::Chunks(c) => Poll::Ready(c.pop_front().map(|b| Ok(Frame::data(b)))),
            Kind::Live(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            Kind::Flight(b) => b
                .poll_chunk(cx)
                .map_ok(Frame::data)
                .map_err(|e| Box::new(e) as BoxError),
        }
    }
}

impl<B> Body for CacheBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let Some(mut w) = this.window else {
            return this.poll_inner(cx);
        };
        loop {
            if w.left == 0 {
                return Poll::Ready(None);
            }
            let frame = match std::task::ready!(this.poll_inner(cx)) {
                Some(Ok(f)) => f,
                // Ended before the range did: an error, never a short body.
                None => return Poll::Ready(Some(Err(Box::new(CacheBodyError::Truncated)))),
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
            };
            let Ok(mut data) = frame.into_data() else {
                continue; // trailers of a ranged body are dropped
            };
            let n = data.len() as u64;
            if w.skip >= n {
                w.skip -= n;
                this.window = Some(w);
                continue;
            }
            // Both bounds are below `data.len()`, which fits in usize.
            let from = w.skip as usize;
            let to = (w.skip.saturating_add(w.left)).min(n) as usize;
            data = data.slice(from..to);
            w.skip = 0;
            w.left -= data.len() as u64;
            this.window = Some(w);
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
    }

    fn is_end_stream(&self) -> bool {
        if self.window.is_some_and(|w| w.left == 0) {
            return true;
        }
        match &self.kind {
            Kind::Stored { entry, next } => *next >= entry.body.len(),
            Kind::Chunks(c) => c.is_empty(),
            Kind::Live(b) => b.is_end_stream(),
            Kind::Flight(b) => b.is_end(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        if let Some(w) = self.window {
            return SizeHint::with_exact(w.left);
        }
        match &self.kind {
            Kind::Stored { entry, next } => {
                SizeHint::with_exact(entry.body.iter().skip(*next).map(|c| c.len() as u64).sum())
            }
            Kind::Chunks(c) => SizeHint::with_exact(c.iter().map(|b| b.len() as u64).sum()),
            Kind::Live(b) => b.size_hint(),
            Kind::Flight(_) => SizeHint::default(),
        }
    }
}
