use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use super::flight::{FillFailed, FlightBody};
use super::store::CachedResponse;
use crate::body::tee::TeeBody;

/// The error of a [`CacheBody`].
#[derive(Debug, thiserror::Error)]
pub enum CacheBodyError<E> {
    /// The upstream body failed (on a miss).
    #[error("upstream body failed")]
    Upstream(#[source] E),
    /// The response was shared from another request's origin fetch (request coalescing)
    /// and that fetch failed mid-way: the body is incomplete.
    #[error(transparent)]
    Coalesced(#[from] FillFailed),
}

/// The body of a [`Cache`](super::Cache) response: a stored entry, a short message, or the
/// upstream body (teed into the store on a fill).
pub struct CacheBody<B> {
    kind: Kind<B>,
}

enum Kind<B> {
    Stored {
        entry: Arc<CachedResponse>,
        next: usize,
    },
    Bytes(Option<Bytes>),
    Live(TeeBody<B>),
    Flight(FlightBody),
}

impl<B> CacheBody<B> {
    pub(crate) fn stored(entry: Arc<CachedResponse>) -> Self {
        CacheBody {
            kind: Kind::Stored { entry, next: 0 },
        }
    }

    pub(crate) fn bytes(b: Bytes) -> Self {
        CacheBody {
            kind: Kind::Bytes((!b.is_empty()).then_some(b)),
        }
    }

    pub(crate) fn flight(b: FlightBody) -> Self {
        CacheBody {
            kind: Kind::Flight(b),
        }
    }

    pub(crate) fn live(b: TeeBody<B>) -> Self {
        CacheBody {
            kind: Kind::Live(b),
        }
    }
}

impl<B> fmt::Debug for CacheBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.kind {
            Kind::Stored { .. } => "CacheBody::Stored",
            Kind::Bytes(_) => "CacheBody::Bytes",
            Kind::Live(_) => "CacheBody::Live",
            Kind::Flight(_) => "CacheBody::Flight",
        })
    }
}

impl<B> Body for CacheBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = CacheBodyError<B::Error>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match &mut self.get_mut().kind {
            Kind::Stored { entry, next } => {
                let chunk = entry.body.get(*next).cloned();
                *next += 1;
                Poll::Ready(chunk.map(|c| Ok(Frame::data(c))))
            }
            Kind::Bytes(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Kind::Live(b) => Pin::new(b).poll_frame(cx).map_err(CacheBodyError::Upstream),
            Kind::Flight(b) => b
                .poll_chunk(cx)
                .map_ok(Frame::data)
                .map_err(CacheBodyError::Coalesced),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Stored { entry, next } => *next >= entry.body.len(),
            Kind::Bytes(b) => b.is_none(),
            Kind::Live(b) => b.is_end_stream(),
            Kind::Flight(b) => b.is_end(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Stored { entry, next } => {
                SizeHint::with_exact(entry.body.iter().skip(*next).map(|c| c.len() as u64).sum())
            }
            Kind::Bytes(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Live(b) => b.size_hint(),
            Kind::Flight(_) => SizeHint::default(),
        }
    }
}
