//! A few named header fields found in one pass over a request's fields.
//!
//! `HeaderMap::get` hashes a custom name byte by byte for every lookup, and a lookup
//! that misses costs as much as one that hits; a layer that reads two or three fields,
//! most of them absent on most requests, spends less reading the names of the request's
//! few fields once (issue 14, session 17: the trace edge and the API key credential).
//! Each name gets what `get` would answer (its first value) and how many values it had,
//! so a caller can refuse a repeated field as `get_all` let it.

use http::{HeaderMap, HeaderName, HeaderValue};

/// One name's fields in a request.
#[derive(Clone, Copy, Default)]
pub(crate) struct Seen<'a> {
    /// The first value, as `HeaderMap::get` answers.
    pub(crate) first: Option<&'a HeaderValue>,
    /// How many values the name had (saturating).
    pub(crate) count: u8,
}

/// `names[i]`'s fields in `headers`, in one pass. Every field is compared with every
/// name: a name given twice (a configured header that is also a standard one) sees the
/// same fields at both places.
#[inline]
pub(crate) fn scan<'a, const N: usize>(
    headers: &'a HeaderMap,
    names: [&HeaderName; N],
) -> [Seen<'a>; N] {
    let mut seen = [Seen::default(); N];
    for (name, value) in headers {
        for (want, s) in names.iter().zip(seen.iter_mut()) {
            // Name against name: a standard name differs from a custom one by its kind
            // alone, two custom ones mostly by their length.
            if *name == **want {
                s.first.get_or_insert(value);
                s.count = s.count.saturating_add(1);
            }
        }
    }
    seen
}

/// The response's `Content-Length` as the cache and the backup tee read it: the first
/// line, parsed whole as a `u64` (a listed `5, 5` is no length).
pub(crate) fn content_length(h: &HeaderMap) -> Option<u64> {
    h.get(http::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::{AUTHORIZATION, HOST};

    #[test]
    fn each_name_gets_its_first_value_and_its_count_as_get_and_get_all_do() {
        let mut h = HeaderMap::new();
        h.append(HOST, HeaderValue::from_static("gw"));
        h.append("x-a", HeaderValue::from_static("1"));
        h.append("x-ab", HeaderValue::from_static("other"));
        h.append(AUTHORIZATION, HeaderValue::from_static("Bearer t"));
        h.append("x-a", HeaderValue::from_static("2"));
        let xa = HeaderName::from_static("x-a");
        let absent = HeaderName::from_static("x-absent");
        let [a, authz, none, again] = scan(&h, [&xa, &AUTHORIZATION, &absent, &xa]);
        for (s, name) in [
            (a, &xa),
            (authz, &AUTHORIZATION),
            (none, &absent),
            (again, &xa),
        ] {
            assert_eq!(s.first, h.get(name), "{name}");
            assert_eq!(
                usize::from(s.count),
                h.get_all(name).iter().count(),
                "{name}"
            );
        }
        assert_eq!(a.count, 2);
        assert_eq!(
            again.count, 2,
            "a name given twice sees its fields at both places"
        );
    }
}
