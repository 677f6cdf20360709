//! The verified identity of a request.

use std::sync::Arc;

use super::jwt::Claims;

/// How a request authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum AuthMethod {
    /// A configured API key ([`ApiKeys`](super::ApiKeys)); the subject is the key's name.
    ApiKey,
    /// A verified JWT bearer token; the subject is its `sub`.
    Jwt,
}

impl AuthMethod {
    /// `"api-key"` or `"jwt"`.
    pub fn as_str(&self) -> &'static str {
        match self {
            AuthMethod::ApiKey => "api-key",
            AuthMethod::Jwt => "jwt",
        }
    }
}

/// Who a request is, once [`Auth`](super::Auth) verified it: a request extension for the
/// layers after it (the rate limiter keys on it) and the source of the identity headers
/// sent upstream.
///
/// One shared allocation: a clone (the extension, the balancer's copy of the request for a
/// retry) is one reference count, and an API key's identity is made once per key.
#[derive(Clone)]
pub struct Identity(pub(crate) Arc<IdentityInner>);

pub(crate) struct IdentityInner {
    pub(crate) subject: Arc<str>,
    pub(crate) scopes: Arc<[String]>,
    pub(crate) method: AuthMethod,
    pub(crate) claims: Option<Arc<Claims>>,
    /// An API key's identity header values, made once per key (none for a JWT).
    pub(crate) values: Option<super::api_key::IdentityValues>,
    /// Whether this identity meets the requirements of the one service whose key table
    /// made it (an API key's identity in a per-service copy, see `ApiKeys::per_service`):
    /// decided once there, where it cannot change, instead of comparing the route's
    /// scopes with the key's on every request. `None`: checked per request (a token).
    pub(crate) granted: Option<bool>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let i = &*self.0;
        f.debug_struct("Identity")
            .field("subject", &i.subject)
            .field("scopes", &i.scopes)
            .field("method", &i.method)
            .field("claims", &i.claims)
            .field("values", &i.values)
            .finish()
    }
}

impl Identity {
    pub(crate) fn new(inner: IdentityInner) -> Self {
        Identity(Arc::new(inner))
    }
    /// The API key's configured name, or the token's `sub`.
    pub fn subject(&self) -> &str {
        &self.0.subject
    }
    /// Granted scopes.
    pub fn scopes(&self) -> &[String] {
        &self.0.scopes
    }
    /// `true` if `scope` was granted.
    pub fn has_scope(&self, scope: &str) -> bool {
        self.0.scopes.iter().any(|s| s == scope)
    }
    /// API key or JWT.
    pub fn method(&self) -> AuthMethod {
        self.0.method
    }
    /// All claims of the token (none for an API key).
    pub fn claims(&self) -> Option<&Claims> {
        self.0.claims.as_deref()
    }
    /// One claim of the token.
    pub fn claim(&self, name: &str) -> Option<&serde_json::Value> {
        self.0.claims.as_deref().and_then(|c| c.get(name))
    }
}

/// What a route requires of an authenticated identity; a miss is `403 insufficient_scope`.
#[derive(Debug, Clone, Default)]
pub(crate) struct Requirements {
    pub(crate) scopes: Vec<String>,
    pub(crate) claims: Vec<(String, serde_json::Value)>,
}

impl Requirements {
    pub(crate) fn is_empty(&self) -> bool {
        self.scopes.is_empty() && self.claims.is_empty()
    }

    /// Every scope granted, and every claim equal to (or, for an array claim, containing)
    /// the required value.
    pub(crate) fn met_by(&self, id: &Identity) -> bool {
        self.met_by_parts(id.scopes(), |name| id.claim(name))
    }

    /// [`met_by`](Self::met_by) on an identity's scopes and claims, before it is one.
    pub(crate) fn met_by_parts<'a>(
        &self,
        scopes: &[String],
        claim: impl Fn(&str) -> Option<&'a serde_json::Value>,
    ) -> bool {
        self.scopes.iter().all(|s| scopes.iter().any(|g| g == s))
            && self.claims.iter().all(|(name, want)| match claim(name) {
                Some(serde_json::Value::Array(have)) => have.contains(want),
                Some(have) => have == want,
                None => false,
            })
    }
}
