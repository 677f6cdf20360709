//! Validators: revalidating a stale entry with the origin, and answering clients' own
//! conditional requests (`If-None-Match`, `If-Modified-Since`, RFC 9110 §13) from the cache.
//!
//! Everything is read from header bytes; a header that cannot be parsed makes its condition
//! false, so the client gets the full `200` — never a `304` it did not ask for.

use std::time::SystemTime;

use http::header::{self, HeaderName};
use http::HeaderMap;

/// Whether the request carries a precondition of its own.
pub(crate) fn has_conditionals(req: &HeaderMap) -> bool {
    [
        header::IF_NONE_MATCH,
        header::IF_MODIFIED_SINCE,
        header::IF_MATCH,
        header::IF_UNMODIFIED_SINCE,
        header::IF_RANGE,
    ]
    .iter()
    .any(|h| req.contains_key(h))
}

/// Whether a stored response has a validator the origin can check.
pub(crate) fn has_validator(stored: &HeaderMap) -> bool {
    stored.contains_key(header::ETAG) || stored.contains_key(header::LAST_MODIFIED)
}

/// Adds `If-None-Match`/`If-Modified-Since` for the stored response's validators.
pub(crate) fn add_validators(req: &mut HeaderMap, stored: &HeaderMap) {
    if let Some(etag) = stored.get(header::ETAG) {
        req.insert(header::IF_NONE_MATCH, etag.clone());
    }
    if let Some(lm) = stored.get(header::LAST_MODIFIED) {
        req.insert(header::IF_MODIFIED_SINCE, lm.clone());
    }
}

/// RFC 9110 §13.1.2/§13.1.3 for a `GET`/`HEAD` answered from `stored`: `true` when the
/// client's `If-None-Match` matches (weak comparison) or, without one, the entry was not
/// modified since `If-Modified-Since`.
pub(crate) fn not_modified(req: &HeaderMap, stored: &HeaderMap) -> bool {
    if req.contains_key(header::IF_NONE_MATCH) {
        let Some(etag) = stored.get(header::ETAG).map(|v| v.as_bytes()) else {
            return false;
        };
        return req
            .get_all(header::IF_NONE_MATCH)
            .iter()
            .any(|line| entity_tags(line.as_bytes()).any(|t| t == b"*" || weak_eq(t, etag)));
    }
    let (Some(since), Some(modified)) = (
        date(req, &header::IF_MODIFIED_SINCE),
        date(stored, &header::LAST_MODIFIED),
    ) else {
        return false;
    };
    modified <= since
}

fn date(h: &HeaderMap, name: &HeaderName) -> Option<SystemTime> {
    let v = std::str::from_utf8(h.get(name)?.as_bytes()).ok()?;
    httpdate::parse_http_date(v.trim()).ok()
}

/// The entity-tags of an `If-None-Match` line, split on commas outside quotes.
pub(crate) fn entity_tags(line: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = line;
    std::iter::from_fn(move || loop {
        if rest.is_empty() {
            return None;
        }
        let mut quoted = false;
        let end = rest
            .iter()
            .position(|&b| {
                if b == b'"' {
                    quoted = !quoted;
                }
                b == b',' && !quoted
            })
            .unwrap_or(rest.len());
        let item = rest[..end].trim_ascii();
        rest = rest.get(end + 1..).unwrap_or(&[]);
        if !item.is_empty() {
            return Some(item);
        }
    })
}

/// Weak comparison (RFC 9110 §8.8.3.2): the opaque tags match, `W/` ignored.
pub(crate) fn weak_eq(a: &[u8], b: &[u8]) -> bool {
    let strip = |t: &[u8]| -> Vec<u8> {
        t.trim_ascii()
            .strip_prefix(b"W/")
            .unwrap_or(t.trim_ascii())
            .to_vec()
    };
    let (a, b) = (strip(a), strip(b));
    a.len() >= 2 && a.first() == Some(&b'"') && a.last() == Some(&b'"') && a == b
}

/// Strong comparison (RFC 9110 §8.8.3.2), for `If-Range`: neither tag weak, same bytes.
pub(crate) fn strong_eq(a: &[u8], b: &[u8]) -> bool {
    let (a, b) = (a.trim_ascii(), b.trim_ascii());
    !a.starts_with(b"W/") && a.len() >= 2 && a.first() == Some(&b'"') && a == b
}

/// The headers of a `304` to a client from `stored` (RFC 9110 §15.4.5: the ones a `200`
/// would carry, less the body's framing).
pub(crate) fn not_modified_headers(stored: &HeaderMap) -> HeaderMap {
    let mut h = stored.clone();
    h.remove(header::CONTENT_LENGTH);
    h.remove(header::TRANSFER_ENCODING);
    h
}

/// A stored response's headers updated by a `304` from the origin (RFC 9111 §3.2): every
/// field the `304` carries replaces the stored one, except the body's framing.
pub(crate) fn merge_304(stored: &HeaderMap, fresh: &HeaderMap) -> HeaderMap {
    let mut out = stored.clone();
    for name in fresh.keys() {
        if name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING || name == "x-cache"
        {
            continue;
        }
        out.remove(name);
        for v in fresh.get_all(name) {
            out.append(name.clone(), v.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etag_lists() {
        let tags: Vec<&[u8]> = entity_tags(b" \"a\", W/\"b,c\" ,,\"d\"").collect();
        assert_eq!(tags, vec![&b"\"a\""[..], b"W/\"b,c\"", b"\"d\""]);
        assert!(weak_eq(b"W/\"x\"", b"\"x\""));
        assert!(!weak_eq(b"x", b"x"));
        assert!(strong_eq(b"\"x\"", b"\"x\""));
        assert!(!strong_eq(b"W/\"x\"", b"W/\"x\""));
    }
}
