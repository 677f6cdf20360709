use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use super::store::CachedResponse;
use crate::body::tee::TeeBody;

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
        })
    }
}

impl<B> Body for CacheBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match &mut self.get_mut().kind {
            Kind::Stored { entry, next } => {
                let chunk = entry.body.get(*next).cloned();
                *next += 1;
                Poll::Ready(chunk.map(|c| Ok(Frame::data(c))))
            }
            Kind::Bytes(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Kind::Live(b) => Pin::new(b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Stored { entry, next } => *next >= entry.body.len(),
            Kind::Bytes(b) => b.is_none(),
            Kind::Live(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Stored { entry, next } => {
                SizeHint::with_exact(entry.body.iter().skip(*next).map(|c| c.len() as u64).sum())
            }
            Kind::Bytes(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Live(b) => b.size_hint(),
        }
    }
}
