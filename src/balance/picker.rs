//! How the balancer chooses an endpoint ([`Picker`]) and what a consistent hash reads from
//! a request ([`HashKey`]): the configuration side of picking.
//!
//! Split from `pick.rs`, which holds the per-membership snapshot and the pick algorithms;
//! this file is what a user names in the builder, plus the byte-level cookie reader that
//! the hash key and the sticky cookie share.

use std::fmt;
use std::sync::Arc;

use http::{HeaderMap, HeaderName, Uri};

use super::hash::hash_bytes;

/// How the balancer chooses an endpoint.
#[derive(Clone, Default)]
#[non_exhaustive]
pub enum Picker {
    /// Each endpoint in turn, ignoring weights (nginx `upstream` with equal weights).
    #[default]
    RoundRobin,
    /// nginx's smooth weighted round robin: weights 5,1,1 give `a a b a c a a`, repeating.
    WeightedRoundRobin,
    /// Power of two choices: two random endpoints, the one with fewer requests in flight
    /// per unit of weight (tower's `p2c`, Envoy `LEAST_REQUEST`, nginx `least_conn`).
    LeastPending,
    /// Consistent hashing (ketama ring, 160 points per unit of weight) of a request key:
    /// the same key goes to the same endpoint, and adding or removing one of N endpoints
    /// moves about 1/N of the keys. Requests without the key fall back to round robin.
    ConsistentHash(HashKey),
}

impl fmt::Debug for Picker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Picker::RoundRobin => f.write_str("RoundRobin"),
            Picker::WeightedRoundRobin => f.write_str("WeightedRoundRobin"),
            Picker::LeastPending => f.write_str("LeastPending"),
            Picker::ConsistentHash(k) => f.debug_tuple("ConsistentHash").field(k).finish(),
        }
    }
}

type KeyFn = dyn Fn(&Uri, &HeaderMap) -> Option<u64> + Send + Sync;

/// What a [`Picker::ConsistentHash`] hashes.
#[derive(Clone)]
#[non_exhaustive]
pub enum HashKey {
    /// The value of a request header (e.g. `x-user-id`).
    Header(HeaderName),
    /// The value of a cookie (e.g. a session id the application sets).
    Cookie(String),
    /// The request path (cache affinity).
    Path,
    /// The client IP ([`client_ip`](crate::client_addr::client_ip): the one a
    /// [`ClientAddrLayer`](crate::client_addr::ClientAddrLayer) believed, else the peer;
    /// nginx `ip_hash`, all of the address).
    ClientIp,
    /// Any function of the request head; return [`hash_bytes`] of what identifies the session.
    Custom(Arc<KeyFn>),
}

impl HashKey {
    /// A key computed by `f` from the request URI and headers.
    pub fn custom<F>(f: F) -> Self
    where
        F: Fn(&Uri, &HeaderMap) -> Option<u64> + Send + Sync + 'static,
    {
        HashKey::Custom(Arc::new(f))
    }

    pub(crate) fn hash<B>(&self, req: &http::Request<B>) -> Option<u64> {
        match self {
            HashKey::Header(name) => req.headers().get(name).map(|v| hash_bytes(v.as_bytes())),
            HashKey::Cookie(name) => cookie_value(req.headers(), name).map(hash_bytes),
            HashKey::Path => Some(hash_bytes(req.uri().path().as_bytes())),
            HashKey::ClientIp => {
                crate::client_addr::client_ip(req.extensions()).map(|ip| match ip {
                    std::net::IpAddr::V4(ip) => hash_bytes(&ip.octets()),
                    std::net::IpAddr::V6(ip) => hash_bytes(&ip.octets()),
                })
            }
            HashKey::Custom(f) => f(req.uri(), req.headers()),
        }
    }
}

impl fmt::Debug for HashKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HashKey::Header(h) => f.debug_tuple("Header").field(h).finish(),
            HashKey::Cookie(c) => f.debug_tuple("Cookie").field(c).finish(),
            HashKey::Path => f.write_str("Path"),
            HashKey::ClientIp => f.write_str("ClientIp"),
            HashKey::Custom(_) => f.write_str("Custom"),
        }
    }
}

/// The first value of cookie `name` in the request's `Cookie` headers (all of them), as
/// bytes.
///
/// Parsed from the header *bytes*, as nginx and HAProxy do: browsers send every cookie of a
/// site in one line, and one other cookie with a raw UTF-8 (non-ASCII) value must not hide
/// the one we look for (`HeaderValue::to_str` would refuse the whole line).
pub(crate) fn cookie_value<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a [u8]> {
    let name = name.as_bytes();
    for h in headers.get_all(http::header::COOKIE) {
        for pair in h.as_bytes().split(|b| *b == b';') {
            let pair = pair.trim_ascii_start();
            if let Some(rest) = pair.strip_prefix(name) {
                if let Some(v) = rest.strip_prefix(b"=") {
                    return Some(v.trim_ascii_end());
                }
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookie_lookup() {
        let mut h = HeaderMap::new();
        h.append(http::header::COOKIE, "a=1; lbx=2".parse().unwrap());
        h.append(http::header::COOKIE, "lb=3".parse().unwrap());
        assert_eq!(cookie_value(&h, "lb"), Some(&b"3"[..]));
        assert_eq!(cookie_value(&h, "a"), Some(&b"1"[..]));
        assert_eq!(cookie_value(&h, "zz"), None);
    }

    #[test]
    fn cookie_lookup_reads_bytes() {
        // A raw UTF-8 (or any non-ASCII) value elsewhere in the line hides nothing.
        let mut h = HeaderMap::new();
        h.append(
            http::header::COOKIE,
            http::HeaderValue::from_bytes(b"t=caf\xc3\xa9; lb=7 ;x=\xff").unwrap(),
        );
        assert_eq!(cookie_value(&h, "lb"), Some(&b"7"[..]));
        assert_eq!(cookie_value(&h, "x"), Some(&b"\xff"[..]));
        assert_eq!(cookie_value(&h, "t"), Some("café".as_bytes()));
    }
}
