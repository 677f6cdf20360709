//! Who may `PURGE`: a bearer token, or an allow-list of client networks. Never loopback
//! by default — behind a proxy on the same host every client is loopback.

use super::super::layer::{constant_time_eq, CacheLayerBuilder};

impl CacheLayerBuilder {
    /// Allows `PURGE` with `Authorization: Bearer <token>` (scheme case-insensitive, the
    /// token compared as bytes in constant time). An empty token matches nothing. Give
    /// the same token to [`FleetBuilder::token`](crate::cache::FleetBuilder::token) so the
    /// fleet's nodes accept each other's fanned-out purges and catch-up requests.
    pub fn purge_bearer(self, token: impl Into<Vec<u8>>) -> Self {
        let token: Vec<u8> = token.into();
        self.purge_allowed(move |parts| {
            !token.is_empty()
                && parts
                    .headers
                    .get(http::header::AUTHORIZATION)
                    .and_then(|v| bearer_token(v.as_bytes()))
                    .is_some_and(|t| constant_time_eq(t, &token))
        })
    }

    /// Allows `PURGE` only from client addresses inside `nets` (addresses and CIDR
    /// networks, parsed like [`TrustedProxies`](crate::client_addr::TrustedProxies)). The
    /// address is [`client_ip`](crate::client_addr::client_ip): behind a proxy that a
    /// [`ClientAddrLayer`](crate::client_addr::ClientAddrLayer) trusts, the client it
    /// forwarded for — so the proxy's own (often loopback) address does not authorise
    /// its clients. A request without an address is refused.
    pub fn purge_from_nets(self, nets: crate::client_addr::TrustedProxies) -> Self {
        self.purge_allowed(move |parts| {
            crate::client_addr::client_ip(&parts.extensions).is_some_and(|ip| nets.contains(ip))
        })
    }
}

/// The token of an `Authorization: Bearer <token>` value (RFC 6750 §2.1), as bytes.
fn bearer_token(v: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = v.split_at(v.iter().position(|b| *b == b' ')?);
    scheme
        .eq_ignore_ascii_case(b"bearer")
        .then(|| rest.trim_ascii())
        .filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_values() {
        assert_eq!(bearer_token(b"Bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer_token(b"bEaReR   abc "), Some(&b"abc"[..]));
        assert_eq!(bearer_token(b"Bearer"), None);
        assert_eq!(bearer_token(b"Bearer  "), None);
        assert_eq!(bearer_token(b"Basic abc"), None);
        assert_eq!(bearer_token(b"Bearer \xff"), Some(&b"\xff"[..]));
    }
}
