use http::header::{self, HeaderMap, HeaderName};

/// Hop-by-hop headers of RFC 9110 §7.6.1 plus the legacy ones proxies also drop.
const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
];

/// Removes hop-by-hop headers: the fixed RFC 9110 set, `Keep-Alive`, `Proxy-Connection`,
/// and every header named in `Connection`.
///
/// ```
/// let mut h = http::HeaderMap::new();
/// h.insert("connection", "close, x-secret".parse().unwrap());
/// h.insert("x-secret", "1".parse().unwrap());
/// h.insert("accept", "*/*".parse().unwrap());
/// tower_patterns::proxy::strip_hop_by_hop(&mut h);
/// assert_eq!(h.len(), 1);
/// assert!(h.contains_key("accept"));
/// ```
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most requests carry none or only `Connection`: one scan over what is present is
    // cheaper than nine hash lookups for what is absent.
    if !headers.keys().any(|k| HOP_BY_HOP.contains(k)) {
        return;
    }
    // Names listed in Connection go first, before Connection itself is removed. Tokens
    // that are not extra headers (`close`, `keep-alive`, ...) need no allocation.
    let mut listed: Vec<HeaderName> = Vec::new();
    for value in headers.get_all(header::CONNECTION) {
        let Ok(value) = value.to_str() else { continue };
        for token in value.split(',') {
            let token = token.trim();
            if token.is_empty()
                || token.eq_ignore_ascii_case("close")
                || HOP_BY_HOP
                    .iter()
                    .any(|h| token.eq_ignore_ascii_case(h.as_str()))
            {
                continue;
            }
            if let Ok(name) = HeaderName::from_bytes(token.as_bytes()) {
                listed.push(name);
            }
        }
    }
    for name in listed {
        headers.remove(name);
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
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
            ("trailer", "x-t"),
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

    #[test]
    fn ignores_garbage_in_connection() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, "bad header name, ,".parse().unwrap());
        h.insert("x-keep", "1".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
    }
}
