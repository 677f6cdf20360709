//! The upstream a `Forward` sends to: parsed and checked once, at build time.

use std::fmt;

use http::header::HeaderValue;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::Uri;

use super::error::ForwardError;

/// A validated upstream: `http://host[:port][/prefix]` or, with the `tls` feature,
/// `https://host[:port][/prefix]` (default ports 80 and 443).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Upstream {
    scheme: Scheme,
    authority: Authority,
    /// Path prefix without a trailing `/`; empty for none.
    prefix: String,
    label: String,
}

impl Upstream {
    /// Parses and validates an upstream URI: `http://`, or `https://` with the `tls`
    /// feature (without it, an `https://` upstream is refused here rather than spoken to in
    /// plaintext); a query or fragment is refused.
    pub fn parse(uri: &str) -> Result<Self, ForwardError> {
        let bad = |reason| ForwardError::InvalidUpstream {
            uri: uri.to_string(),
            reason,
        };
        let parsed: Uri = uri.parse().map_err(|_| bad("not a URI"))?;
        let scheme = parsed
            .scheme()
            .cloned()
            .ok_or_else(|| bad("missing scheme"))?;
        if scheme == Scheme::HTTPS && !cfg!(feature = "tls") {
            // No silent plaintext fallback: without TLS support the upstream is refused.
            return Err(bad(
                "https:// upstreams need the `tls` feature of tower-patterns",
            ));
        }
        if scheme != Scheme::HTTP && scheme != Scheme::HTTPS {
            return Err(bad("only http:// and https:// upstreams are supported"));
        }
        let authority = parsed
            .authority()
            .cloned()
            .ok_or_else(|| bad("missing host"))?;
        if authority.as_str().contains('@') {
            return Err(bad("credentials in the URI are not supported"));
        }
        if parsed.query().is_some() {
            return Err(bad("a query is not allowed in an upstream"));
        }
        let prefix = parsed.path().trim_end_matches('/').to_string();
        let label = authority.as_str().to_string();
        Ok(Upstream {
            scheme,
            authority,
            prefix,
            label,
        })
    }

    /// `host:port` of the upstream.
    pub fn authority(&self) -> &str {
        self.authority.as_str()
    }

    /// `true` for an `https://` upstream.
    pub fn is_https(&self) -> bool {
        self.scheme == Scheme::HTTPS
    }

    /// The host without port (and without the brackets of an IPv6 address): the TLS
    /// server name.
    #[cfg(feature = "tls")]
    pub(crate) fn host(&self) -> &str {
        let host = self.authority.host();
        host.strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host)
    }

    pub(crate) fn scheme(&self) -> &Scheme {
        &self.scheme
    }

    pub(crate) fn authority_ref(&self) -> &Authority {
        &self.authority
    }

    /// `scheme://authority`: what identifies a connection pool.
    pub(crate) fn origin(&self) -> String {
        format!("{}://{}", self.scheme, self.authority)
    }

    /// `host:port` to dial, with the scheme's default port (80, 443) when none is given.
    pub(crate) fn dial_target(&self) -> String {
        match self.authority.port_u16() {
            Some(_) => self.authority.as_str().to_string(),
            None if self.is_https() => format!("{}:443", self.authority.host()),
            None => format!("{}:80", self.authority.host()),
        }
    }

    /// The origin-form target (`/prefix/path?query`) sent on the upstream connection.
    pub(super) fn join(&self, pq: Option<&PathAndQuery>) -> Result<Uri, ForwardError> {
        let path_and_query = match (self.prefix.is_empty(), pq) {
            (true, Some(pq)) => pq.clone(),
            (true, None) => PathAndQuery::from_static("/"),
            (false, pq) => {
                let rest = pq.map(|p| p.as_str()).unwrap_or("/");
                PathAndQuery::try_from(format!("{}{}", self.prefix, rest))
                    .map_err(|e| ForwardError::InvalidRequest(e.into()))?
            }
        };
        Ok(Uri::from(path_and_query))
    }

    /// The `Host` value naming this upstream.
    pub(super) fn host_value(&self) -> Option<HeaderValue> {
        HeaderValue::from_str(self.authority.as_str()).ok()
    }
}

impl fmt::Debug for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Upstream({}://{}{})",
            self.scheme, self.authority, self.prefix
        )
    }
}

impl fmt::Display for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}{}", self.scheme, self.authority, self.prefix)
    }
}
