//! What a request is counted against: [`KeyExtractor`] and the built-in keys.

use std::fmt;
use std::hash::Hash;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Arc;

use http::Request;

/// Picks the key a request is counted against. `None` (no client address, no identity)
/// counts the request against one shared bucket for all such requests: an unknown client
/// is limited, not let through unlimited.
///
/// Keys must come from a bounded or verified source (a client address, a verified
/// identity, a route template), never from raw client input such as a path or an
/// unverified header: every distinct key is state (bounded anyway by
/// [`LocalLimiterBuilder::max_keys`](super::LocalLimiterBuilder::max_keys)).
pub trait KeyExtractor: Clone + Send + Sync + 'static {
    /// The key. `Display` names it in Redis.
    type Key: Hash + Eq + Clone + fmt::Display + Send + Sync + 'static;
    /// The key of `req`, if it has one.
    fn extract<B>(&self, req: &Request<B>) -> Option<Self::Key>;

    /// The key, when it is the same for every request ([`RouteKey`]): the layer then asks
    /// its limiter for that key's bucket once ([`Limiter::pin`](super::Limiter::pin))
    /// instead of extracting and looking the key up per request. Default `None`.
    fn fixed(&self) -> Option<&Self::Key> {
        None
    }
}

/// The client address ([`client_ip`](crate::client_addr::client_ip): after a
/// [`ClientAddrLayer`](crate::client_addr::ClientAddrLayer), the believed client, else the
/// TCP peer). IPv6 addresses count per `/64` by default: one client usually holds a whole
/// /64, and a per-address limit would be evaded by changing the host bits.
#[derive(Debug, Clone, Copy)]
pub struct ClientIpKey {
    v6_prefix: u8,
}

impl Default for ClientIpKey {
    fn default() -> Self {
        ClientIpKey { v6_prefix: 64 }
    }
}

impl ClientIpKey {
    /// Per IPv4 address and per IPv6 /64.
    pub fn new() -> Self {
        Self::default()
    }
    /// Counts IPv6 clients per `/prefix` (clamped to 0..=128).
    pub fn v6_prefix(mut self, prefix: u8) -> Self {
        self.v6_prefix = prefix.min(128);
        self
    }
}

impl KeyExtractor for ClientIpKey {
    type Key = IpAddr;
    fn extract<B>(&self, req: &Request<B>) -> Option<IpAddr> {
        Some(match crate::client_addr::client_ip(req.extensions())? {
            IpAddr::V6(v6) => {
                // `checked_shl` is None at 128: a /0 keeps nothing.
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.v6_prefix))
                    .unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask))
            }
            v4 => v4,
        })
    }
}

/// One bucket for everything the layer wraps: mounted on one route, a per-route limit.
///
/// The key never changes, so the layer resolves its bucket once, when it is built
/// ([`KeyExtractor::fixed`]): with a [`LocalLimiter`](super::LocalLimiter) a request
/// costs the bucket's GCRA update only (no reference count, no SipHash of the name, no
/// table lookup). Every `RouteKey` of one name on one limiter shares that bucket; it is
/// not in the limiter's key table (not counted in `max_keys`, never evicted).
#[derive(Debug, Clone)]
pub struct RouteKey(Arc<str>);

impl RouteKey {
    /// The route's name (it names the bucket in Redis and in logs).
    pub fn new(name: &str) -> Self {
        RouteKey(name.into())
    }
}

impl KeyExtractor for RouteKey {
    type Key = Arc<str>;
    fn extract<B>(&self, _req: &Request<B>) -> Option<Arc<str>> {
        Some(self.0.clone())
    }
    fn fixed(&self) -> Option<&Arc<str>> {
        Some(&self.0)
    }
}

/// The route *template* axum matched (`/users/{id}`, from `MatchedPath`): one bucket per
/// route of a router, bounded by the number of routes. Feature `axum`.
#[cfg(feature = "axum")]
#[derive(Debug, Clone, Copy, Default)]
pub struct MatchedPathKey;

#[cfg(feature = "axum")]
impl KeyExtractor for MatchedPathKey {
    type Key = Arc<str>;
    fn extract<B>(&self, req: &Request<B>) -> Option<Arc<str>> {
        req.extensions()
            .get::<axum::extract::MatchedPath>()
            .map(|m| Arc::from(m.as_str()))
    }
}

/// The verified identity of [`auth`](crate::auth): the API key's name or the JWT's
/// subject, with the method, so an API key named `alice` and a token for `alice` are two
/// keys. Requests without an identity (anonymous on an optional route) share one bucket.
/// Feature `auth`.
#[cfg(feature = "auth")]
#[derive(Debug, Clone, Copy, Default)]
pub struct IdentityKey;

/// Key of [`IdentityKey`].
#[cfg(feature = "auth")]
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IdentityName {
    /// API key or JWT.
    pub method: crate::auth::AuthMethod,
    /// The key's name or the token's subject.
    pub subject: Arc<str>,
}

#[cfg(feature = "auth")]
impl fmt::Display for IdentityName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.method.as_str(), self.subject)
    }
}

#[cfg(feature = "auth")]
impl KeyExtractor for IdentityKey {
    type Key = IdentityName;
    fn extract<B>(&self, req: &Request<B>) -> Option<IdentityName> {
        let id = req.extensions().get::<crate::auth::Identity>()?;
        Some(IdentityName {
            method: id.method(),
            subject: id.0.subject.clone(),
        })
    }
}

/// A key computed by a closure over the request's headers and extensions (not the path:
/// raw paths are client input, see [`KeyExtractor`]).
#[derive(Clone)]
pub struct FnKey<F>(pub F);

impl<F> fmt::Debug for FnKey<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FnKey")
    }
}

impl<F, K> KeyExtractor for FnKey<F>
where
    F: Fn(&http::HeaderMap, &http::Extensions) -> Option<K> + Clone + Send + Sync + 'static,
    K: Hash + Eq + Clone + fmt::Display + Send + Sync + 'static,
{
    type Key = K;
    fn extract<B>(&self, req: &Request<B>) -> Option<K> {
        (self.0)(req.headers(), req.extensions())
    }
}
