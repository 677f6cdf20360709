//! `Vary` (RFC 9111 §4.1): one URL, several stored variants, chosen by request headers.
//!
//! A response with `Vary: Accept-Encoding, Accept-Language` is stored under a *variant key*:
//! the cache key, then a `0x00` byte (which [`authority_key`](super::authority_key) never
//! produces), the marker's generation, then each named request header's normalised value.
//! Under the plain key the cache keeps a small *marker* (no body, the `Vary` line and a
//! random generation), which tells a later lookup which headers to read. Purging the plain
//! key removes the marker; the next fill makes a marker of a new generation, so variants
//! stored before the purge are never reachable again (they age out of the LRU).
//! `Vary: *` or a `Vary` line that cannot be read is never stored.
//!
//! `Accept-Encoding` is normalised (codings lower-cased, `q=0` dropped, sorted,
//! de-duplicated) so `gzip, br` and `br,gzip` share a variant; other headers are compared
//! as their bytes, lists joined with `, ` and surrounding whitespace trimmed.

use std::time::Duration;

use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue, StatusCode};
use tokio::time::Instant;

use super::store::CachedResponse;

/// What a response's `Vary` says about storing it.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Vary {
    /// No `Vary`: one entry for everyone.
    None,
    /// Stored per value of these request headers.
    Names(Vec<HeaderName>),
    /// `Vary: *`, or a line that cannot be read: never stored (fails closed).
    Uncacheable,
}

pub(crate) fn parse(h: &HeaderMap) -> Vary {
    let mut names = Vec::new();
    for line in h.get_all(header::VARY) {
        for item in line.as_bytes().split(|b| *b == b',') {
            let item = item.trim_ascii();
            if item.is_empty() {
                continue;
            }
            if item == b"*" {
                return Vary::Uncacheable;
            }
            match HeaderName::from_bytes(item) {
                Ok(n) if !names.contains(&n) => names.push(n),
                Ok(_) => {}
                Err(_) => return Vary::Uncacheable,
            }
        }
    }
    if names.is_empty() {
        if h.contains_key(header::VARY) {
            return Vary::Uncacheable; // present but empty: not a list we understand
        }
        return Vary::None;
    }
    names.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    Vary::Names(names)
}

/// The key of the variant of `base` that a request with `req` headers selects.
pub(crate) fn variant_key(
    base: &str,
    generation: u64,
    names: &[HeaderName],
    req: &HeaderMap,
) -> String {
    let mut key = String::with_capacity(base.len() + 48);
    key.push_str(base);
    key.push('\0');
    key.push_str(&format!("{generation:016x}"));
    key.push('\0');
    for name in names {
        key.push_str(name.as_str());
        key.push('=');
        let value = if name == header::ACCEPT_ENCODING {
            accept_encoding(req)
        } else {
            joined(req, name)
        };
        escape_into(&mut key, &value);
        key.push('\0');
    }
    key
}

/// The normalised `Accept-Encoding` of a request.
pub(crate) fn accept_encoding(req: &HeaderMap) -> Vec<u8> {
    let mut codings: Vec<Vec<u8>> = Vec::new();
    for line in req.get_all(header::ACCEPT_ENCODING) {
        for item in line.as_bytes().split(|b| *b == b',') {
            let mut parts = item.split(|b| *b == b';');
            let coding = parts
                .next()
                .unwrap_or_default()
                .trim_ascii()
                .to_ascii_lowercase();
            let refused = parts.any(|p| {
                let p = p.trim_ascii();
                let Some(q) = p.strip_prefix(b"q=").or_else(|| p.strip_prefix(b"Q=")) else {
                    return false;
                };
                // q=0, q=0.0, q=0.000: refused.
                q.first() == Some(&b'0') && q[1..].iter().all(|b| *b == b'.' || *b == b'0')
            });
            if !coding.is_empty() && !refused {
                codings.push(coding);
            }
        }
    }
    codings.sort();
    codings.dedup();
    codings.join(&b","[..])
}

fn joined(req: &HeaderMap, name: &HeaderName) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, v) in req.get_all(name).iter().enumerate() {
        if i > 0 {
            out.extend_from_slice(b", ");
        }
        out.extend_from_slice(v.as_bytes().trim_ascii());
    }
    out
}

/// Visible ASCII but `%` and the separators as is, every other byte `%XX`: distinct
/// values give distinct keys.
fn escape_into(key: &mut String, value: &[u8]) {
    for &b in value {
        if b.is_ascii_graphic() && b != b'%' || b == b' ' {
            key.push(b as char);
        } else {
            key.push_str(&format!("%{b:02X}"));
        }
    }
}

/// The header of a marker that holds its generation (markers are never served).
const GENERATION: &str = "x-cache-vary-generation";

/// The generation of a marker (0 if unreadable: that only risks reaching variants of an
/// older marker with the same unreadable value, which a marker this cache wrote never has).
pub(crate) fn generation(marker: &CachedResponse) -> u64 {
    marker
        .headers
        .get(GENERATION)
        .and_then(|v| std::str::from_utf8(v.as_bytes()).ok())
        .and_then(|s| u64::from_str_radix(s, 16).ok())
        .unwrap_or(0)
}

/// The marker stored under the plain key: no body, the `Vary` line, its generation, the
/// variant's lifetime.
pub(crate) fn marker(names: &[HeaderName], generation: u64, fresh_for: Duration) -> CachedResponse {
    let list = names
        .iter()
        .map(HeaderName::as_str)
        .collect::<Vec<_>>()
        .join(", ");
    let mut headers = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_str(&list) {
        headers.insert(header::VARY, v);
    }
    if let Ok(v) = HeaderValue::from_str(&format!("{generation:x}")) {
        headers.insert(GENERATION, v);
    }
    CachedResponse {
        status: StatusCode::OK,
        headers,
        body: Vec::new(),
        stored_at: Instant::now(),
        fresh_for,
        initial_age: Duration::ZERO,
    }
}

/// Whether an entry under a plain key is a variant marker.
pub(crate) fn is_marker(entry: &CachedResponse) -> bool {
    entry.headers.contains_key(header::VARY)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(*k, HeaderValue::from_static(v));
        }
        m
    }

    #[test]
    fn accept_encoding_is_normalised() {
        let a = accept_encoding(&h(&[("accept-encoding", "gzip, br")]));
        let b = accept_encoding(&h(&[("accept-encoding", "BR,gzip;q=0.8, identity;q=0")]));
        assert_eq!(a, b);
        assert_eq!(a, b"br,gzip");
        assert_eq!(accept_encoding(&h(&[])), b"");
    }

    #[test]
    fn vary_lines() {
        assert_eq!(parse(&h(&[])), Vary::None);
        assert_eq!(parse(&h(&[("vary", "*")])), Vary::Uncacheable);
        assert_eq!(parse(&h(&[("vary", "Accept, *")])), Vary::Uncacheable);
        assert_eq!(parse(&h(&[("vary", "a b")])), Vary::Uncacheable);
        assert_eq!(
            parse(&h(&[
                ("vary", "X-User, accept-encoding"),
                ("vary", "x-user")
            ])),
            Vary::Names(vec![
                header::ACCEPT_ENCODING,
                HeaderName::from_static("x-user")
            ])
        );
        let names = [HeaderName::from_static("x-user")];
        assert_ne!(
            variant_key("/a", 1, &names, &h(&[("x-user", "ann")])),
            variant_key("/a", 1, &names, &h(&[("x-user", "bob")]))
        );
        assert_ne!(
            variant_key("/a", 1, &names, &h(&[("x-user", "ann")])),
            variant_key("/a", 2, &names, &h(&[("x-user", "ann")]))
        );
    }
}
