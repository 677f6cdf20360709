//! What may be stored, and for how long (RFC 9111, shared-cache rules, simplified).

use std::time::{Duration, SystemTime};

use http::{header, HeaderMap, StatusCode};

/// Statuses a shared cache may store when the response gives an explicit lifetime
/// (RFC 9110 §15.1 "heuristically cacheable", minus 206 which needs range handling).
pub(crate) fn cacheable_status(s: StatusCode) -> bool {
    matches!(
        s.as_u16(),
        200 | 203 | 204 | 300 | 301 | 308 | 404 | 405 | 410 | 414 | 501
    )
}

fn directives(h: &HeaderMap) -> impl Iterator<Item = (String, Option<String>)> + '_ {
    h.get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|d| {
            let d = d.trim();
            match d.split_once('=') {
                Some((k, v)) => (
                    k.trim().to_ascii_lowercase(),
                    Some(v.trim().trim_matches('"').to_owned()),
                ),
                None => (d.to_ascii_lowercase(), None),
            }
        })
}

/// Whether the request forbids storing the response (`Cache-Control: no-store`).
pub(crate) fn request_no_store(h: &HeaderMap) -> bool {
    directives(h).any(|(k, _)| k == "no-store")
}

/// How long a response stays fresh, or `None` if a shared cache must not store it.
///
/// `no-store`, `private`, `no-cache`, `Set-Cookie` and `Vary` (no variant support) make it
/// uncacheable; then `s-maxage`, `max-age`, `Expires` (relative to `Date`), and finally
/// `default_ttl` decide the lifetime. A lifetime of zero is not stored.
pub(crate) fn freshness(h: &HeaderMap, default_ttl: Option<Duration>) -> Option<Duration> {
    if h.contains_key(header::SET_COOKIE) || h.contains_key(header::VARY) {
        return None;
    }
    let mut max_age = None;
    let mut s_maxage = None;
    for (k, v) in directives(h) {
        match k.as_str() {
            "no-store" | "private" | "no-cache" => return None,
            "s-maxage" => s_maxage = v.and_then(|v| v.parse::<u64>().ok()),
            "max-age" => max_age = v.and_then(|v| v.parse::<u64>().ok()),
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
    (!ttl.is_zero()).then_some(ttl)
}

/// The upstream's `Age`.
pub(crate) fn initial_age(h: &HeaderMap) -> Duration {
    h.get(header::AGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.trim().parse::<u64>().ok())
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
}
