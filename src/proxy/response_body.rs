//! [`ForwardBody`]: the body of a response [`Forward`](super::Forward) received from an
//! upstream, and its error [`ForwardBodyError`].
//!
//! `Forward` hands out its own body type rather than hyper's `Incoming`, which has no public
//! constructor: an upstream client other than hyper's (a lean HTTP/1.1 path) can produce a
//! `ForwardBody` too: the lean HTTP/1.1 path (`super::h1`) does.

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

/// The body of a response [`Forward`](super::Forward) received from an upstream.
///
/// An [`http_body::Body`] with `Data = Bytes` and [`ForwardBodyError`] as its error, `Send +
/// Sync + Unpin + 'static`. [`ForwardBody::from`] wraps a hyper `Incoming` body.
pub struct ForwardBody {
    pub(crate) kind: Kind,
}

/// Where the body's bytes come from.
pub(crate) enum Kind {
    /// A response read by hyper's client connection (HTTP/1.1 or HTTP/2).
    Hyper(Incoming),
    /// A response read by the lean HTTP/1.1 path (`super::h1`).
    Http1(super::h1::H1Body),
}

/// Why reading a [`ForwardBody`] failed.
///
/// Its [`source`](std::error::Error::source) is the underlying error (for
/// [`Upstream`](Self::Upstream) a `hyper::Error`), so code walking the source chain
/// (such as [`classify::error_kind`](crate::classify::error_kind)) sees what it saw when
/// the body was hyper's own.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ForwardBodyError {
    /// The upstream connection failed while the body was read (reset, closed early,
    /// malformed framing, HTTP/2 stream error).
    #[error("upstream response body")]
    Upstream(#[source] hyper::Error),
    /// The same, on the lean HTTP/1.1 path: the upstream closed before the body's end,
    /// its chunked framing is malformed, or the connection failed.
    #[error("upstream response body")]
    Http1(#[source] super::h1::Http1Error),
}

impl From<Incoming> for ForwardBody {
    #[inline]
    fn from(body: Incoming) -> Self {
        ForwardBody {
            kind: Kind::Hyper(body),
        }
    }
}

impl ForwardBody {
    #[inline]
    pub(crate) fn http1(body: super::h1::H1Body) -> Self {
        ForwardBody {
            kind: Kind::Http1(body),
        }
    }
}

impl Body for ForwardBody {
    type Data = Bytes;
    type Error = ForwardBodyError;

    #[inline]
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ForwardBodyError>>> {
        match &mut self.get_mut().kind {
            Kind::Hyper(body) => Pin::new(body)
                .poll_frame(cx)
                .map_err(ForwardBodyError::Upstream),
            Kind::Http1(body) => Pin::new(body)
                .poll_frame(cx)
                .map_err(ForwardBodyError::Http1),
        }
    }

    #[inline]
    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Hyper(body) => body.is_end_stream(),
            Kind::Http1(body) => body.is_end_stream(),
        }
    }

    #[inline]
    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Hyper(body) => body.size_hint(),
            Kind::Http1(body) => body.size_hint(),
        }
    }
}

impl fmt::Debug for ForwardBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::Hyper(body) => f.debug_tuple("ForwardBody").field(body).finish(),
            Kind::Http1(body) => f.debug_tuple("ForwardBody").field(body).finish(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `ForwardBody` keeps the auto traits hyper's `Incoming` has, and its error goes
    /// where a `BoxError` is expected.
    #[test]
    fn auto_traits_and_error_bounds() {
        fn body<T: Send + Sync + Unpin + 'static>() {}
        fn error<E: std::error::Error + Send + Sync + 'static + Into<crate::BoxError>>() {}
        body::<Incoming>();
        body::<ForwardBody>();
        error::<ForwardBodyError>();
    }
}
