use http::header::{self, HeaderMap, HeaderName};

/// Hop-by-hop headers of RFC 9110 §7.6.1 plus the legacy ones proxies also drop.
///
/// `Trailer` is not among them: it is end to end (RFC 9110 §6.6.2; RFC 2616's list named a
/// "Trailers" header that does not exist), and over HTTP/1.1 hyper sends only the trailer
/// fields a response declares in it, so stripping it would drop a gRPC status on the way.
///
/// A `static`, not a `const`: every use of a `const` array builds and drops eight
/// `HeaderName`s (two scans per request; issue 12's profile).
/// `Connection` first: bit 0 ([`CONNECTION_BIT`]).
static HOP_BY_HOP: [HeaderName; 8] = [
    HeaderName::from_static(HOP_BY_HOP_TEXT[0]),
    HeaderName::from_static(HOP_BY_HOP_TEXT[1]),
    HeaderName::from_static(HOP_BY_HOP_TEXT[2]),
    HeaderName::from_static(HOP_BY_HOP_TEXT[3]),
    HeaderName::from_static(HOP_BY_HOP_TEXT[4]),
    HeaderName::from_static(HOP_BY_HOP_TEXT[5]),
    HeaderName::from_static(HOP_BY_HOP_TEXT[6]),
    HeaderName::from_static(HOP_BY_HOP_TEXT[7]),
];

/// The names of [`HOP_BY_HOP`], which is built from this list (one source for both): a
/// key is matched by its text, where comparing `HeaderName`s, each standard one turned
/// into text again, cost ~80 instructions per key of every request and response (issue
/// 12's profile).
const HOP_BY_HOP_TEXT: [&str; 8] = [
    "connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "transfer-encoding",
    "upgrade",
    "keep-alive",
    "proxy-connection",
];

/// Where `name` is in [`HOP_BY_HOP`]. One bit test on the length first: most names
/// (`host`, `date`, `server`, `content-type`, `content-length`, `accept`) have a length
/// none of the eight has.
fn hop_index(name: &str) -> Option<usize> {
    const LENGTHS: u32 = 1 << 2 | 1 << 7 | 1 << 10 | 1 << 16 | 1 << 17 | 1 << 18 | 1 << 19;
    let len = name.len();
    if len >= 32 || LENGTHS & (1 << len) == 0 {
        return None;
    }
    HOP_BY_HOP_TEXT.iter().position(|h| *h == name)
}

/// End-to-end headers that naming in `Connection` does not remove.
///
/// RFC 9110 §7.6.1 lets a sender mark any header hop-by-hop by naming it in `Connection`,
/// which would let a client delete what the proxy or the layers around it rely on:
/// credentials (`Authorization`, `Cookie`, `Set-Cookie`), message framing (`Host`,
/// `Content-Length`, `Content-Type`, `Content-Encoding`), the client address chain
/// (`X-Forwarded-*`, `Forwarded`, `X-Real-IP`, `Via`) and request tracing
/// (`X-Request-Id`, `traceparent`, `tracestate`, `baggage`). These are kept; the fixed hop-by-hop set is still removed.
/// nginx goes further and ignores the names in `Connection` altogether.
pub const PROTECTED_FROM_CONNECTION: [&str; 17] = [
    "authorization",
    "baggage",
    "content-encoding",
    "content-length",
    "content-type",
    "cookie",
    "forwarded",
    "host",
    "set-cookie",
    "traceparent",
    "tracestate",
    "via",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-real-ip",
    "x-request-id",
];

/// Removes hop-by-hop headers: the fixed RFC 9110 set, `Keep-Alive`, `Proxy-Connection`,
/// and every header named in `Connection` except the [`PROTECTED_FROM_CONNECTION`] ones.
///
/// `Connection` is read as bytes: a token that is not valid UTF-8 or not a header name
/// cannot name a header present in the map and is skipped, while the other tokens of the
/// same line are still honoured (a non-ASCII byte must not switch stripping off).
///
/// ```
/// let mut h = http::HeaderMap::new();
/// h.insert("connection", "close, x-secret, authorization".parse().unwrap());
/// h.insert("x-secret", "1".parse().unwrap());
/// h.insert("authorization", "Bearer t".parse().unwrap());
/// h.insert("accept", "*/*".parse().unwrap());
/// tower_patterns::proxy::strip_hop_by_hop(&mut h);
/// assert_eq!(h.len(), 2);
/// assert!(h.contains_key("accept"));
/// assert!(h.contains_key("authorization"), "protected end-to-end header");
/// ```
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most requests and responses carry none or only `Connection` (`keep-alive` from most
    // servers): one scan over what is present, noting which of the fixed set it holds,
    // is cheaper than a hash lookup and removal for each of the eight names.
    let mut present: u8 = 0;
    // Whether every `Connection` line holds only `keep-alive`/`close` (nginx's responses:
    // `Connection: keep-alive`), read in the same pass: then nothing it names is to be
    // removed, and `Connection` goes by one removal instead of a lookup of its lines, a
    // second parse and the removal (issue 12's profile: ~850 instructions a response).
    let mut connection_names_nothing = true;
    for (key, value) in headers.iter() {
        if let Some(i) = hop_index(key.as_str()) {
            present |= 1 << i;
            if i == 0 && !names_nothing(value.as_bytes()) {
                connection_names_nothing = false;
            }
        }
    }
    if present == CONNECTION_BIT && connection_names_nothing {
        headers.remove(header::CONNECTION);
        return;
    }
    strip_present(headers, present);
}

/// Whether a `Connection` line's tokens are all `keep-alive`, `close` or empty: it names
/// no header to remove. Anything else (another token, an unreadable byte) says no, and the
/// full strip reads the line.
fn names_nothing(line: &[u8]) -> bool {
    line.split(|b| *b == b',').all(|token| {
        let token = token.trim_ascii();
        token.is_empty()
            || token.eq_ignore_ascii_case(b"keep-alive")
            || token.eq_ignore_ascii_case(b"close")
    })
}

/// Bits of [`HOP_BY_HOP`] in [`Seen::hop`].
pub(crate) const CONNECTION_BIT: u8 = 1;
pub(crate) const TE_BIT: u8 = 1 << 3;
pub(crate) const UPGRADE_BIT: u8 = 1 << 5;

/// What one pass over a request's fields found: `Forward` asks several questions of every
/// request (hop-by-hop fields, `Host` count and value, `TE`, `Upgrade`,
/// `X-Forwarded-For`), and a hash lookup for each cost more than reading the names once
/// (~90 instructions a lookup, ~10 a field; issue 12's profile).
#[derive(Debug, Default)]
pub(crate) struct Seen {
    /// Which of [`HOP_BY_HOP`] are present, by index.
    pub(crate) hop: u8,
    /// `Host` fields (saturating).
    pub(crate) hosts: u8,
    /// The first `Host` value.
    pub(crate) host: Option<http::HeaderValue>,
    pub(crate) forwarded_for: bool,
}

impl Seen {
    pub(crate) fn scan(headers: &HeaderMap) -> Seen {
        let mut seen = Seen::default();
        for (name, value) in headers {
            if *name == header::HOST {
                seen.hosts = seen.hosts.saturating_add(1);
                if seen.host.is_none() {
                    seen.host = Some(value.clone());
                }
            } else if let Some(i) = hop_index(name.as_str()) {
                seen.hop |= 1 << i;
            } else if name.as_str().len() == 15 && name == "x-forwarded-for" {
                seen.forwarded_for = true;
            }
        }
        seen
    }
}

/// [`strip_hop_by_hop`] once the fixed hop-by-hop fields present are known (`present`,
/// bits by index in [`HOP_BY_HOP`]).
pub(crate) fn strip_present(headers: &mut HeaderMap, present: u8) {
    if present == 0 {
        return;
    }
    // Names listed in Connection go first, before Connection itself is removed. Tokens
    // that are not extra headers (`close`, `keep-alive`, ...) need no allocation.
    if present & CONNECTION_BIT != 0 {
        let mut listed: Vec<HeaderName> = Vec::new();
        for value in headers.get_all(header::CONNECTION) {
            for token in value.as_bytes().split(|b| *b == b',') {
                let token = token.trim_ascii();
                // `keep-alive` and `close` are by far the most common tokens.
                if token.is_empty()
                    || token.eq_ignore_ascii_case(b"keep-alive")
                    || token.eq_ignore_ascii_case(b"close")
                    || HOP_BY_HOP_TEXT
                        .iter()
                        .any(|h| token.eq_ignore_ascii_case(h.as_bytes()))
                    || PROTECTED_FROM_CONNECTION
                        .iter()
                        .any(|p| token.eq_ignore_ascii_case(p.as_bytes()))
                {
                    continue;
                }
                // A token that is no header name (a non-ASCII byte, a space) cannot name a
                // header of the map: nothing to strip for it.
                if let Ok(name) = HeaderName::from_bytes(token) {
                    listed.push(name);
                }
            }
        }
        for name in listed {
            headers.remove(name);
        }
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_fixed_and_listed() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("connection", "keep-alive, X-Foo"),
            ("connection", "x-bar"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("proxy-authorization", "Basic x"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("x-foo", "1"),
            ("x-bar", "2"),
            ("x-keep", "3"),
        ] {
            h.append(HeaderName::from_static(k), v.parse().unwrap());
        }
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h["x-keep"], "3");
    }

    /// The one-removal path for `Connection: keep-alive` must strip exactly what the full
    /// path strips, whatever else a `Connection` line names.
    #[test]
    fn a_connection_line_naming_nothing_and_one_naming_more_strip_alike() {
        let cases: [&[&[u8]]; 6] = [
            &[b"keep-alive"],
            &[b"Keep-Alive , close,"],
            &[b"keep-alive", b"x-secret"],
            &[b"keep-alive, x-secret"],
            &[b"close, \xffx"],
            &[b"keep-alive, upgrade"],
        ];
        for lines in cases {
            let mut h = HeaderMap::new();
            for line in lines {
                h.append(
                    header::CONNECTION,
                    http::HeaderValue::from_bytes(line).unwrap(),
                );
            }
            h.insert("x-secret", "1".parse().unwrap());
            h.insert(header::CONTENT_TYPE, "text/plain".parse().unwrap());
            let mut full = h.clone();
            strip_present(&mut full, CONNECTION_BIT);
            strip_hop_by_hop(&mut h);
            assert_eq!(h, full, "{lines:?}");
            assert!(!h.contains_key(header::CONNECTION));
            assert!(h.contains_key(header::CONTENT_TYPE));
            let names = lines.iter().any(|l| l.windows(8).any(|w| w == b"x-secret"));
            assert_eq!(h.contains_key("x-secret"), !names, "{lines:?}");
        }
    }

    #[test]
    fn the_text_table_matches_the_names() {
        for (name, text) in HOP_BY_HOP.iter().zip(HOP_BY_HOP_TEXT) {
            assert_eq!(name.as_str(), text);
            assert_eq!(hop_index(text), HOP_BY_HOP.iter().position(|h| h == name));
        }
        for other in [
            "host",
            "user-agent",
            "content-length",
            "x-forwarded-for",
            "trailer",
        ] {
            assert_eq!(hop_index(other), None, "{other}");
        }
    }

    #[test]
    fn one_scan_answers_what_forward_asks() {
        let mut h = HeaderMap::new();
        h.append(header::HOST, "a".parse().unwrap());
        h.append(header::HOST, "b".parse().unwrap());
        h.append(header::CONNECTION, "upgrade".parse().unwrap());
        h.append(header::UPGRADE, "websocket".parse().unwrap());
        h.append(header::TE, "trailers".parse().unwrap());
        h.append("X-Forwarded-For", "10.0.0.1".parse().unwrap());
        h.append("x-forwarded-host", "n".parse().unwrap());
        let seen = Seen::scan(&h);
        assert_eq!(seen.hosts, 2);
        assert_eq!(seen.host.unwrap(), "a");
        assert_eq!(seen.hop, CONNECTION_BIT | TE_BIT | UPGRADE_BIT);
        assert!(seen.forwarded_for);
        let seen = Seen::scan(&HeaderMap::new());
        assert_eq!((seen.hosts, seen.hop, seen.forwarded_for), (0, 0, false));
        assert!(seen.host.is_none());
        // The bits name the right fields.
        assert_eq!(
            HOP_BY_HOP_TEXT[CONNECTION_BIT.trailing_zeros() as usize],
            "connection"
        );
        assert_eq!(HOP_BY_HOP_TEXT[TE_BIT.trailing_zeros() as usize], "te");
        assert_eq!(
            HOP_BY_HOP_TEXT[UPGRADE_BIT.trailing_zeros() as usize],
            "upgrade"
        );
    }

    #[test]
    fn trailer_is_end_to_end() {
        let mut h = HeaderMap::new();
        h.insert(header::TRAILER, "grpc-status".parse().unwrap());
        h.insert(header::TE, "trailers".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h[header::TRAILER], "grpc-status");
    }

    #[test]
    fn a_non_ascii_byte_in_connection_does_not_disable_stripping() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            http::HeaderValue::from_bytes(b"x-secret, caf\xe9, x-other").unwrap(),
        );
        h.insert("x-secret", "1".parse().unwrap());
        h.insert("x-other", "2".parse().unwrap());
        h.insert("x-keep", "3".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-keep"));
    }

    #[test]
    fn connection_cannot_strip_protected_end_to_end_headers() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            "Authorization, X-Forwarded-For, host, content-length, transfer-encoding, te, \
             x-request-id, traceparent, cookie, x-drop"
                .parse()
                .unwrap(),
        );
        for name in PROTECTED_FROM_CONNECTION {
            h.insert(HeaderName::from_static(name), "v".parse().unwrap());
        }
        h.insert("x-drop", "1".parse().unwrap());
        h.insert("transfer-encoding", "chunked".parse().unwrap());
        strip_hop_by_hop(&mut h);
        for name in PROTECTED_FROM_CONNECTION {
            assert!(h.contains_key(name), "{name} was stripped");
        }
        assert!(!h.contains_key("x-drop"));
        assert!(!h.contains_key("transfer-encoding"), "still hop-by-hop");
        assert_eq!(h.len(), PROTECTED_FROM_CONNECTION.len());
    }

    #[test]
    fn ignores_garbage_in_connection() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, "bad header name, ,".parse().unwrap());
        h.insert("x-keep", "1".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
    }
}
