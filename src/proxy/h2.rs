//! What changes when a request goes to an HTTP/2 upstream.
//!
//! HTTP/2 carries the target in pseudo-headers (`:scheme`, `:authority`) and forbids the
//! connection-specific headers of HTTP/1.1 (RFC 9113 §8.2.2) — with one exception a gRPC
//! client depends on: `TE: trailers`. The hop-by-hop stripping of [`super::headers`] runs
//! for every request before the HTTP version is known (it is decided per connection), so
//! the client's `TE: trailers` is remembered in a request extension and put back here.

use http::header::{self, HeaderValue};
use http::uri::{Authority, Scheme};
use http::{HeaderMap, Request, Uri, Version};

use super::error::ForwardError;

/// The client asked for trailers (`TE: trailers`); carried from `Forward::call` to the
/// pool, never sent as such.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TeTrailers;

/// `true` when a `TE` line of `headers` lists `trailers` (read as bytes; other codings
/// are dropped with the header, as HTTP/2 allows nothing else).
pub(crate) fn asks_for_trailers(headers: &HeaderMap) -> bool {
    headers.get_all(header::TE).iter().any(|v| {
        v.as_bytes().split(|b| *b == b',').any(|t| {
            let t = t.trim_ascii();
            // `trailers` takes no parameters; `trailers;q=..` is not valid, so compare whole.
            t.eq_ignore_ascii_case(b"trailers")
        })
    })
}

/// Turns an origin-form HTTP/1.1-shaped request into an HTTP/2 one: the `Host` header
/// becomes `:authority` (or the upstream's authority when there is none or it is no
/// valid authority), `:scheme` is the upstream's, and `TE: trailers` is restored when the
/// client asked for it. Hop-by-hop headers were already stripped.
pub(crate) fn to_h2<B>(req: &mut Request<B>, scheme: &Scheme, upstream: &Authority) {
    let authority = req
        .headers_mut()
        .remove(header::HOST)
        .and_then(|h| Authority::try_from(h.as_bytes()).ok())
        .unwrap_or_else(|| upstream.clone());
    let mut parts = req.uri().clone().into_parts();
    parts.scheme = Some(scheme.clone());
    parts.authority = Some(authority);
    // The path was validated by `Upstream::join`; should the parts still not fit,
    // hyper sends the origin-form target without `:authority`.
    if let Ok(uri) = Uri::from_parts(parts) {
        *req.uri_mut() = uri;
    }
    *req.version_mut() = Version::HTTP_2;
    if req.extensions_mut().remove::<TeTrailers>().is_some() {
        req.headers_mut()
            .insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// The HTTP/2 error code of a stream reset or connection error (`RST_STREAM`, `GOAWAY`)
/// found in `e`'s chain, and whether it says the stream was not processed.
fn stream_reset(e: &(dyn std::error::Error + 'static)) -> Option<(u32, bool)> {
    let mut cur = Some(e);
    while let Some(s) = cur {
        if let Some(h2e) = s.downcast_ref::<h2::Error>() {
            let reason = h2e.reason()?;
            // A stream fails with a graceful GOAWAY's NO_ERROR only when it was above the
            // GOAWAY's last stream id: not processed (RFC 9113 §6.8).
            let refused = reason == h2::Reason::REFUSED_STREAM
                || (h2e.is_go_away() && h2e.is_remote() && reason == h2::Reason::NO_ERROR);
            if h2e.is_reset() || h2e.is_go_away() {
                return Some((u32::from(reason), refused));
            }
            return None;
        }
        cur = s.source();
    }
    None
}

/// [`ForwardError::StreamReset`] for `e` when it is one.
pub(crate) fn reset_error(upstream: &str, e: hyper::Error) -> Result<ForwardError, hyper::Error> {
    match stream_reset(&e) {
        Some((code, refused)) => Ok(ForwardError::StreamReset {
            upstream: upstream.to_string(),
            code,
            refused,
            source: Box::new(e),
        }),
        None => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn te_trailers_is_recognised_as_bytes() {
        let mut h = HeaderMap::new();
        h.append(header::TE, HeaderValue::from_static("gzip"));
        assert!(!asks_for_trailers(&h));
        h.append(
            header::TE,
            HeaderValue::from_bytes(b"caf\xe9, Trailers").unwrap(),
        );
        assert!(asks_for_trailers(&h));
    }

    #[test]
    fn host_becomes_authority() {
        let mut req = Request::get("/p?q=1")
            .header("host", "front.example:8443")
            .body(())
            .unwrap();
        req.extensions_mut().insert(TeTrailers);
        to_h2(
            &mut req,
            &Scheme::HTTPS,
            &Authority::from_static("up.internal"),
        );
        assert_eq!(req.uri(), "https://front.example:8443/p?q=1");
        assert!(req.headers().get(header::HOST).is_none());
        assert_eq!(req.headers()[header::TE], "trailers");
        assert_eq!(req.version(), Version::HTTP_2);

        let mut req = Request::get("/").body(()).unwrap();
        to_h2(&mut req, &Scheme::HTTP, &Authority::from_static("up:80"));
        assert_eq!(req.uri(), "http://up:80/");
        assert!(req.headers().get(header::TE).is_none());
    }
}
