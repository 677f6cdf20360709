//! `Range` requests (RFC 9110 §14) answered from the cache.
//!
//! | request | answer |
//! |---|---|
//! | one satisfiable range of a `200` whose length is known | `206`, `Content-Range` |
//! | several ranges, from a stored entry | `206` `multipart/byteranges` |
//! | several ranges on a miss (length known only as the body streams) | the full `200` (RFC 9110 §14.2 lets a server ignore `Range`) |
//! | no range satisfiable | `416`, `Content-Range: bytes */len` |
//! | malformed `Range`, another unit, more than [`MAX_RANGES`] ranges | ignored: the full `200` |
//! | `If-Range` that does not match (strong `ETag`, or the exact `Last-Modified`) | ignored: the full `200` |
//!
//! A miss with `Range` fetches the *whole* object from the origin (the `Range` and
//! `If-Range` headers are not forwarded) and answers the range from the stream as it
//! arrives, as nginx does by default; the rest of the body is read into the store in the
//! background (the tee's disconnect policy). Parsing works on bytes with checked
//! arithmetic: no input panics or indexes out of bounds (`tests/fuzz_parsers/range.rs`).

use http::header::{self, HeaderValue};
use http::{HeaderMap, Response, StatusCode};

use super::body::CacheBody;
use super::conditional;
use super::store::CachedResponse;

/// More ranges than this in one request are ignored (a full `200`): many small or
/// overlapping ranges cost more than the whole body (RFC 9110 §14.2).
pub const MAX_RANGES: usize = 16;

/// A parsed `Range` against a body of known length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ranges {
    /// Ignore the header: answer the full response.
    Ignore,
    /// No range overlaps the body: `416`.
    Unsatisfiable,
    /// The satisfiable ranges, inclusive `(first, last)` byte offsets, each within the
    /// body, in the order asked.
    Satisfiable(Vec<(u64, u64)>),
}

/// Parses a `Range` header value for a body of `len` bytes.
pub fn parse_range(value: &[u8], len: u64) -> Ranges {
    let Some(eq) = value.iter().position(|b| *b == b'=') else {
        return Ranges::Ignore;
    };
    if !value[..eq].trim_ascii().eq_ignore_ascii_case(b"bytes") {
        return Ranges::Ignore;
    }
    let mut out = Vec::new();
    let mut specs = 0usize;
    for spec in value[eq + 1..].split(|b| *b == b',') {
        let spec = spec.trim_ascii();
        if spec.is_empty() {
            continue;
        }
        specs += 1;
        if specs > MAX_RANGES {
            return Ranges::Ignore;
        }
        let Some(dash) = spec.iter().position(|b| *b == b'-') else {
            return Ranges::Ignore;
        };
        let (first, last) = (spec[..dash].trim_ascii(), spec[dash + 1..].trim_ascii());
        let range = if first.is_empty() {
            // Suffix: the last `n` bytes.
            let Some(n) = number(last) else {
                return Ranges::Ignore;
            };
            (n > 0 && len > 0).then(|| (len - n.min(len), len - 1))
        } else {
            let Some(a) = number(first) else {
                return Ranges::Ignore;
            };
            let b = if last.is_empty() {
                None
            } else {
                let Some(b) = number(last) else {
                    return Ranges::Ignore;
                };
                if b < a {
                    return Ranges::Ignore; // invalid spec: the whole header is ignored
                }
                Some(b)
            };
            (a < len).then(|| (a, b.unwrap_or(u64::MAX).min(len - 1)))
        };
        out.extend(range);
    }
    match (specs, out.is_empty()) {
        (0, _) => Ranges::Ignore,
        (_, true) => Ranges::Unsatisfiable,
        _ => Ranges::Satisfiable(out),
    }
}

/// Decimal digits to a number; `None` for anything else or more than `u64` holds.
fn number(v: &[u8]) -> Option<u64> {
    if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    v.iter().try_fold(0u64, |n, d| {
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

/// Whether `If-Range` (if any) lets the range apply to a response with `headers`.
fn if_range_holds(req: &HeaderMap, headers: &HeaderMap) -> bool {
    let Some(cond) = req.get(header::IF_RANGE) else {
        return true;
    };
    let cond = cond.as_bytes().trim_ascii();
    if cond.first() == Some(&b'"') || cond.starts_with(b"W/") {
        return headers
            .get(header::ETAG)
            .is_some_and(|e| conditional::strong_eq(cond, e.as_bytes()));
    }
    let date = |v: &[u8]| {
        std::str::from_utf8(v)
            .ok()
            .and_then(|s| httpdate::parse_http_date(s.trim()).ok())
    };
    match (date(cond), headers.get(header::LAST_MODIFIED)) {
        (Some(a), Some(lm)) => date(lm.as_bytes()) == Some(a),
        _ => false,
    }
}

/// Answers the request's `Range` (headers `req`) from `res`, a `200` of `len` bytes
/// (`None`: unknown, the range is ignored). `entry` is the stored response when there is
/// one: only then are several ranges served (as `multipart/byteranges`).
pub(crate) fn apply<B>(
    req: &HeaderMap,
    res: Response<CacheBody<B>>,
    len: Option<u64>,
    entry: Option<&CachedResponse>,
) -> Response<CacheBody<B>> {
    let (Some(range), Some(len), StatusCode::OK) = (req.get(header::RANGE), len, res.status())
    else {
        return res;
    };
    if !if_range_holds(req, res.headers()) {
        return res;
    }
    match parse_range(range.as_bytes(), len) {
        Ranges::Ignore => res,
        Ranges::Unsatisfiable => {
            let (mut parts, _) = res.into_parts();
            parts.status = StatusCode::RANGE_NOT_SATISFIABLE;
            parts
                .headers
                .insert(header::CONTENT_RANGE, content_range(None, len));
            parts
                .headers
                .insert(header::CONTENT_LENGTH, HeaderValue::from(0));
            Response::from_parts(parts, CacheBody::chunks(Vec::new()))
        }
        Ranges::Satisfiable(ranges) => match (ranges.as_slice(), entry) {
            ([(a, b)], _) => {
                let (a, b) = (*a, *b);
                let (mut parts, body) = res.into_parts();
                parts.status = StatusCode::PARTIAL_CONTENT;
                parts
                    .headers
                    .insert(header::CONTENT_RANGE, content_range(Some((a, b)), len));
                parts
                    .headers
                    .insert(header::CONTENT_LENGTH, HeaderValue::from(b - a + 1));
                Response::from_parts(parts, body.window(a, b))
            }
            (_, Some(entry)) => multipart(res, &ranges, len, entry),
            (_, None) => res,
        },
    }
}

fn content_range(range: Option<(u64, u64)>, len: u64) -> HeaderValue {
    let s = match range {
        Some((a, b)) => format!("bytes {a}-{b}/{len}"),
        None => format!("bytes */{len}"),
    };
    // Digits, spaces, `-`, `/` and `*` only: always a valid value.
    HeaderValue::from_str(&s).unwrap_or_else(|_| HeaderValue::from_static("bytes */0"))
}

/// `multipart/byteranges` (RFC 9110 §14.6) from the stored body, slices shared.
fn multipart<B>(
    res: Response<CacheBody<B>>,
    ranges: &[(u64, u64)],
    len: u64,
    entry: &CachedResponse,
) -> Response<CacheBody<B>> {
    let boundary = "tower-patterns-byteranges";
    let content_type = entry.headers.get(header::CONTENT_TYPE).cloned();
    let mut chunks = Vec::new();
    for &(a, b) in ranges {
        let mut head = format!("\r\n--{boundary}\r\n");
        if let Some(ct) = content_type.as_ref().and_then(|v| v.to_str().ok()) {
            head.push_str(&format!("Content-Type: {ct}\r\n"));
        }
        head.push_str(&format!("Content-Range: bytes {a}-{b}/{len}\r\n\r\n"));
        chunks.push(bytes::Bytes::from(head));
        chunks.extend(slices(&entry.body, a, b));
    }
    chunks.push(bytes::Bytes::from(format!("\r\n--{boundary}--\r\n")));
    let total: u64 = chunks.iter().map(|c| c.len() as u64).sum();
    let (mut parts, _) = res.into_parts();
    parts.status = StatusCode::PARTIAL_CONTENT;
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("multipart/byteranges; boundary=tower-patterns-byteranges"),
    );
    parts
        .headers
        .insert(header::CONTENT_LENGTH, HeaderValue::from(total));
    parts.headers.remove(header::CONTENT_RANGE);
    Response::from_parts(parts, CacheBody::chunks(chunks))
}

/// Bytes `a..=b` of a body kept as chunks, as slices of them (no copy).
fn slices(body: &[bytes::Bytes], a: u64, b: u64) -> Vec<bytes::Bytes> {
    let mut out = Vec::new();
    let mut off = 0u64;
    for c in body {
        let n = c.len() as u64;
        let (start, end) = (a.max(off), b.saturating_add(1).min(off + n));
        if start < end {
            out.push(c.slice((start - off) as usize..(end - off) as usize));
        }
        off += n;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        use Ranges::*;
        assert_eq!(parse_range(b"bytes=0-9", 100), Satisfiable(vec![(0, 9)]));
        assert_eq!(parse_range(b"bytes=90-", 100), Satisfiable(vec![(90, 99)]));
        assert_eq!(parse_range(b"bytes=-10", 100), Satisfiable(vec![(90, 99)]));
        assert_eq!(parse_range(b"bytes=-1000", 100), Satisfiable(vec![(0, 99)]));
        assert_eq!(
            parse_range(b"bytes=50-1000", 100),
            Satisfiable(vec![(50, 99)])
        );
        assert_eq!(
            parse_range(b"Bytes= 0-0, -1", 100),
            Satisfiable(vec![(0, 0), (99, 99)])
        );
        assert_eq!(parse_range(b"bytes=100-", 100), Unsatisfiable);
        assert_eq!(parse_range(b"bytes=-0", 100), Unsatisfiable);
        assert_eq!(parse_range(b"bytes=0-", 0), Unsatisfiable);
        assert_eq!(parse_range(b"bytes=5-1", 100), Ignore);
        assert_eq!(parse_range(b"bytes=a-1", 100), Ignore);
        assert_eq!(parse_range(b"items=0-1", 100), Ignore);
        assert_eq!(parse_range(b"bytes=", 100), Ignore);
        assert_eq!(parse_range(b"bytes=99999999999999999999-", 100), Ignore);
        assert_eq!(
            parse_range(b"bytes=0-18446744073709551615", 100),
            Satisfiable(vec![(0, 99)])
        );
        let many = format!("bytes={}", vec!["0-0"; MAX_RANGES + 1].join(","));
        assert_eq!(parse_range(many.as_bytes(), 100), Ignore);
    }

    #[test]
    fn slicing_across_chunks() {
        let body = [
            bytes::Bytes::from_static(b"abc"),
            bytes::Bytes::from_static(b"defg"),
        ];
        let got: Vec<u8> = slices(&body, 2, 4).concat();
        assert_eq!(got, b"cde");
    }
}
