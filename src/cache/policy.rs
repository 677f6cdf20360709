//! What may be stored, and for how long (RFC 9111, shared-cache rules, simplified).
//!
//! Header values are read as bytes: a `Cache-Control` line holding a byte that is not
//! visible ASCII is not skipped (that would drop a `private` next to it and fail open), it
//! makes the whole response uncacheable. Numbers saturate at 2^31 seconds, as RFC 9111
//! §1.2.2 asks, so no later duration arithmetic can overflow.

use std::time::{Duration, SystemTime};

use http::{header, HeaderMap, StatusCode};

/// The largest delta-seconds value a cache uses (RFC 9111 §1.2.2): about 68 years, far
/// below anything that could overflow an `Instant` or `Duration` sum.
pub(crate) const MAX_DELTA_SECS: u64 = 1 << 31;

/// Statuses a shared cache may store when the response gives an explicit lifetime
/// (RFC 9110 §15.1 "heuristically cacheable", minus 206 which needs range handling).
pub(crate) fn cacheable_status(s: StatusCode) -> bool {
    matches!(
        s.as_u16(),
        200 | 203 | 204 | 300 | 301 | 308 | 404 | 405 | 410 | 414 | 501
    )
}

/// One `Cache-Control` directive: lower-cased name, and its value (quotes removed) if any.
type Directive = (String, Option<Vec<u8>>);

/// The directives of every `Cache-Control` line, or `None` when one of them cannot be
/// read (a byte outside visible ASCII in a directive name, an empty name): the caller must
/// then assume the worst (`no-store`).
fn directives(h: &HeaderMap) -> Option<Vec<Directive>> {
    let mut out = Vec::new();
    for line in h.get_all(header::CACHE_CONTROL) {
        for d in line.as_bytes().split(|b| *b == b',') {
            let d = d.trim_ascii();
            if d.is_empty() {
                continue; // "a, , b" is legal list syntax (RFC 9110 §5.6.1)
            }
            let (name, value) = match d.iter().position(|b| *b == b'=') {
                Some(i) => (d[..i].trim_ascii(), Some(d[i + 1..].trim_ascii())),
                None => (d, None),
            };
            if name.is_empty() || !name.iter().all(|b| is_tchar(*b)) {
                return None;
            }
            let name = String::from_utf8_lossy(name).to_ascii_lowercase();
            let value = value.map(|v| {
                let v = v.strip_prefix(b"\"").unwrap_or(v);
                v.strip_suffix(b"\"").unwrap_or(v).to_vec()
            });
            out.push((name, value));
        }
    }
    Some(out)
}

/// RFC 9110 `tchar`: the bytes a token (a directive name) may hold.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Parses delta-seconds from bytes, saturating at [`MAX_DELTA_SECS`]; `None` if it is not
/// a number.
fn delta_seconds(v: &[u8]) -> Option<u64> {
    if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let mut n: u64 = 0;
    for d in v {
        n = n.saturating_mul(10).saturating_add(u64::from(d - b'0'));
    }
    Some(n.min(MAX_DELTA_SECS))
}

/// Whether the request forbids storing the response (`Cache-Control: no-store`, or a
/// `Cache-Control` that cannot be read).
pub(crate) fn request_no_store(h: &HeaderMap) -> bool {
    directives(h).is_none_or(|ds| ds.iter().any(|(k, _)| k == "no-store"))
}

/// Whether the request asks not to be answered from the cache without asking the origin
/// (`no-cache`, `max-age=0`; an unreadable `Cache-Control` counts, failing closed).
pub(crate) fn request_no_cache(h: &HeaderMap) -> bool {
    directives(h).is_none_or(|ds| {
        ds.iter().any(|(k, v)| {
            k == "no-cache" || (k == "max-age" && v.as_deref().and_then(delta_seconds) == Some(0))
        })
    })
}

/// Whether a stored response may not be served stale, even when the origin fails
/// (RFC 9111 §5.2.2.2 `must-revalidate`, §5.2.2.8 `proxy-revalidate`, §5.2.2.10
/// `s-maxage` implies it for a shared cache). Unreadable counts as yes.
pub(crate) fn must_revalidate(h: &HeaderMap) -> bool {
    directives(h).is_none_or(|ds| {
        ds.iter().any(|(k, _)| {
            matches!(
                k.as_str(),
                "must-revalidate" | "proxy-revalidate" | "s-maxage"
            )
        })
    })
}

/// The `stale-while-revalidate` window of a stored response (RFC 5861 §3): how long past
/// its expiry it may be served while one background request refreshes it. Zero when
/// absent, not a number, or the list cannot be read.
pub(crate) fn stale_while_revalidate(h: &HeaderMap) -> Duration {
    directives(h)
        .and_then(|ds| {
            ds.iter().find_map(|(k, v)| {
                (k == "stale-while-revalidate").then(|| v.as_deref().and_then(delta_seconds))?
            })
        })
        .map(Duration::from_secs)
        .unwrap_or_default()
}

/// How long a response stays fresh, or `None` if a shared cache must not store it.
///
/// `no-store`, `private`, `no-cache`, `Set-Cookie` and `Vary` (no variant support) make it
/// uncacheable, and so does a `Cache-Control` that cannot be read or a `max-age`/`s-maxage`
/// that is not a number (RFC 9111 §4.2.1: treat as stale); then `s-maxage`, `max-age`,
/// `Expires` (relative to `Date`), and finally `default_ttl` decide the lifetime, capped
/// at [`MAX_DELTA_SECS`]. A lifetime of zero is not stored.
pub(crate) fn freshness(h: &HeaderMap, default_ttl: Option<Duration>) -> Option<Duration> {
    if h.contains_key(header::VARY) {
        return None;
    }
    lifetime(h, default_ttl)
}

/// Whether a response to a request with `Authorization` may be stored and shared
/// (RFC 9111 §3.5: only with `public`, `s-maxage` or `must-revalidate`). Unreadable: no.
pub(crate) fn shareable_with_authorization(h: &HeaderMap) -> bool {
    directives(h).is_some_and(|ds| {
        ds.iter()
            .any(|(k, _)| matches!(k.as_str(), "public" | "s-maxage" | "must-revalidate"))
    })
}

/// [`freshness`] for a cache that stores `Vary` variants (the layer): the same rules,
/// `Vary` left to the caller.
pub(crate) fn lifetime(h: &HeaderMap, default_ttl: Option<Duration>) -> Option<Duration> {
    if h.contains_key(header::SET_COOKIE) {
        return None;
    }
    let mut max_age = None;
    let mut s_maxage = None;
    for (k, v) in directives(h)? {
        match k.as_str() {
            "no-store" | "private" | "no-cache" => return None,
            "s-maxage" => s_maxage = Some(delta_seconds(v.as_deref()?)?),
            "max-age" => max_age = Some(delta_seconds(v.as_deref()?)?),
            _ => {}
        }
    }
    let ttl = match s_maxage.or(max_age) {
        Some(secs) => Some(Duration::from_secs(secs)),
        None => match h.get(header::EXPIRES) {
            // An invalid Expires (such as "0") means already expired.
            Some(v) => {
                let expires = v
                    .to_str()
                    .ok()
                    .and_then(|s| httpdate::parse_http_date(s).ok());
                let date = h
                    .get(header::DATE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|s| httpdate::parse_http_date(s).ok())
                    .unwrap_or_else(SystemTime::now);
                Some(
                    expires
                        .and_then(|e| e.duration_since(date).ok())
                        .unwrap_or(Duration::ZERO),
                )
            }
            None => default_ttl,
        },
    }?;
    let ttl = ttl.min(Duration::from_secs(MAX_DELTA_SECS));
    (!ttl.is_zero()).then_some(ttl)
}

/// The upstream's `Age`, saturated at [`MAX_DELTA_SECS`]; zero when absent or unreadable
/// (a response whose age is unknown is treated as new, as RFC 9111 §5.1 allows).
pub(crate) fn initial_age(h: &HeaderMap) -> Duration {
    h.get(header::AGE)
        .and_then(|v| delta_seconds(v.as_bytes().trim_ascii()))
        .map(Duration::from_secs)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn h(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(*k, HeaderValue::from_static(v));
        }
        m
    }

    #[test]
    fn lifetimes() {
        let s = Duration::from_secs;
        assert_eq!(
            freshness(&h(&[("cache-control", "max-age=60")]), None),
            Some(s(60))
        );
        assert_eq!(
            freshness(
                &h(&[("cache-control", "public, max-age=60, s-maxage=10")]),
                None
            ),
            Some(s(10))
        );
        assert_eq!(
            freshness(&h(&[("cache-control", "max-age=60, private")]), None),
            None
        );
        assert_eq!(
            freshness(&h(&[("cache-control", "no-store")]), Some(s(5))),
            None
        );
        assert_eq!(
            freshness(&h(&[("cache-control", "No-Cache")]), Some(s(5))),
            None
        );
        assert_eq!(freshness(&h(&[("cache-control", "max-age=0")]), None), None);
        assert_eq!(
            freshness(
                &h(&[
                    ("date", "Sun, 06 Nov 1994 08:49:37 GMT"),
                    ("expires", "Sun, 06 Nov 1994 08:50:07 GMT")
                ]),
                None
            ),
            Some(s(30))
        );
        assert_eq!(freshness(&h(&[("expires", "0")]), Some(s(5))), None);
        assert_eq!(freshness(&h(&[]), None), None);
        assert_eq!(freshness(&h(&[]), Some(s(5))), Some(s(5)));
        assert_eq!(
            freshness(
                &h(&[("cache-control", "max-age=60"), ("set-cookie", "a=b")]),
                None
            ),
            None
        );
        assert_eq!(initial_age(&h(&[("age", "7")])), s(7));
    }

    #[test]
    fn huge_numbers_saturate() {
        let max = Duration::from_secs(MAX_DELTA_SECS);
        for v in [
            "max-age=18446744073709551615",
            "max-age=99999999999999999999999999",
            "s-maxage=18446744073709551616",
        ] {
            assert_eq!(
                freshness(&h(&[("cache-control", v)]), None),
                Some(max),
                "{v}"
            );
        }
        assert_eq!(initial_age(&h(&[("age", "18446744073709551615")])), max);
        assert_eq!(initial_age(&h(&[("age", "999999999999999999999999")])), max);
        assert_eq!(
            freshness(&h(&[]), Some(Duration::MAX)),
            Some(max),
            "a configured default_ttl is capped too"
        );
    }

    fn raw(cc: &[u8]) -> HeaderMap {
        let mut m = HeaderMap::new();
        m.insert(header::CACHE_CONTROL, HeaderValue::from_bytes(cc).unwrap());
        m
    }

    #[test]
    fn unreadable_cache_control_fails_closed() {
        // One non-ASCII byte elsewhere in the line must not hide `private`.
        assert_eq!(
            freshness(&raw(b"private, max-age=60, x-\xff=1"), None),
            None
        );
        assert_eq!(
            freshness(
                &raw(b"max-age=60, \xc3\xa9t\xc3\xa9"),
                Some(Duration::from_secs(5))
            ),
            None
        );
        assert!(request_no_store(&raw(b"max-age=0, \xff")));
        // Non-ASCII inside a quoted value of an unknown directive is legal (obs-text): kept.
        assert_eq!(
            freshness(&raw(b"max-age=60, ext=\"\xe9\""), None),
            Some(Duration::from_secs(60))
        );
        // A lifetime that is not a number is treated as stale, not skipped.
        assert_eq!(
            freshness(&raw(b"max-age=6\xff0"), Some(Duration::from_secs(5))),
            None
        );
        assert_eq!(
            freshness(&raw(b"max-age=abc"), Some(Duration::from_secs(5))),
            None
        );
        assert_eq!(
            freshness(&raw(b"max-age=60, , public"), None),
            Some(Duration::from_secs(60))
        );
    }
}
