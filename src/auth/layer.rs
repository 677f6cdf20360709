//! The per-route [`AuthLayer`].

use std::sync::Arc;

use tower_layer::Layer;

use super::config::Authenticator;
use super::identity::Requirements;
use super::service::Auth;

/// Authenticates every request of the routes it wraps with the shared [`Authenticator`],
/// and authorises it against this route's required scopes and claims.
///
/// Make one per route from one `Authenticator` ([`Authenticator::layer`]): the keys, the
/// JWKS refresher and the header settings are shared.
#[derive(Debug, Clone)]
pub struct AuthLayer {
    pub(crate) auth: Authenticator,
    pub(crate) require: Arc<Requirements>,
    pub(crate) optional: bool,
    /// Whether the verified [`Identity`](super::Identity) goes into the request's
    /// extensions (see [`identity_extension`](Self::identity_extension)).
    pub(crate) extension: bool,
}

impl AuthLayer {
    /// Requires a valid credential.
    pub fn new(auth: Authenticator) -> Self {
        AuthLayer {
            auth,
            require: Arc::new(Requirements::default()),
            optional: false,
            extension: true,
        }
    }

    /// Requires every one of `scopes` (`403 insufficient_scope` otherwise).
    pub fn require_scopes<I, S>(mut self, scopes: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Arc::make_mut(&mut self.require)
            .scopes
            .extend(scopes.into_iter().map(Into::into));
        self
    }

    /// Requires the token's claim `name` to equal `value` (or, for an array claim, to
    /// contain it); `403 insufficient_scope` otherwise. An API key has no claims.
    pub fn require_claim(
        mut self,
        name: impl Into<String>,
        value: impl Into<serde_json::Value>,
    ) -> Self {
        Arc::make_mut(&mut self.require)
            .claims
            .push((name.into(), value.into()));
        self
    }

    /// Lets requests *without* any credential through, anonymously (no [`Identity`]
    /// extension, identity headers still stripped). A credential that is present but
    /// invalid is still `401`: a bad token is never silently downgraded to anonymous.
    ///
    /// [`Identity`]: super::Identity
    pub fn optional(mut self) -> Self {
        self.optional = true;
        self
    }

    /// Whether the verified [`Identity`] is put into the request's extensions for the
    /// layers and handlers after this one (default `true`). The upstream gets the identity
    /// headers either way. Turn it off only where nothing after this layer reads it: the
    /// extension is a boxed value in the request's extension map, inserted and later
    /// dropped on every request (~700 instructions a request in the gateway process,
    /// session 17). A rate limiter keyed by `ratelimit::IdentityKey` *after* this layer
    /// needs it: without it every request shares the anonymous bucket.
    ///
    /// [`Identity`]: super::Identity
    pub fn identity_extension(mut self, yes: bool) -> Self {
        self.extension = yes;
        self
    }

    /// This layer with [`ErrorResponseLayer`](crate::respond::ErrorResponseLayer) on top:
    /// the `Infallible`-error form for axum and hyper (the layer's own refusals are already
    /// responses; this turns the inner service's errors into responses too). See
    /// `docs/foundation.md`, "Mounting in axum".
    pub fn respond(self) -> tower::layer::util::Stack<Self, crate::respond::ErrorResponseLayer> {
        tower::layer::util::Stack::new(self, crate::respond::ErrorResponseLayer)
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Auth<S>;
    fn layer(&self, inner: S) -> Auth<S> {
        // Each service its own copy of the API key table (see
        // `Authenticator::per_service`): a gateway that builds its stack per worker then
        // writes no reference count shared with another worker per request.
        Auth {
            inner,
            layer: AuthLayer {
                auth: self.auth.per_service(&self.require),
                require: self.require.clone(),
                optional: self.optional,
                extension: self.extension,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use http::{HeaderMap, HeaderValue};

    use super::*;
    use crate::auth::{ApiKeys, AuthConfig, Identity};

    #[test]
    fn each_service_hands_out_its_own_copy_of_an_api_keys_identity() {
        let keys = ApiKeys::new().key("ops", "k-1", ["r", "w"]).unwrap();
        let layer = AuthConfig::new().api_keys(keys).build().unwrap().layer();
        let (a, b) = (layer.layer(()), layer.layer(()));
        let mut h = HeaderMap::new();
        h.insert("x-api-key", HeaderValue::from_static("k-1"));
        let id = |svc: &Auth<()>| -> Identity { svc.layer.auth.authenticate(&h).unwrap().unwrap() };
        let (a1, a2, b1) = (id(&a), id(&a), id(&b));
        // One service: one identity per key, a reference count per request.
        assert!(Arc::ptr_eq(&a1.0, &a2.0));
        // Another service (another worker's stack): its own allocation, same content.
        assert!(!Arc::ptr_eq(&a1.0, &b1.0));
        assert_eq!(
            (a1.subject(), a1.scopes(), a1.method()),
            (b1.subject(), b1.scopes(), b1.method())
        );
        let (va, vb) = (a1.0.values.as_ref().unwrap(), b1.0.values.as_ref().unwrap());
        assert_eq!((&va.subject, &va.scopes), (&vb.subject, &vb.scopes));
        assert_ne!(
            va.subject.as_bytes().as_ptr(),
            vb.subject.as_bytes().as_ptr()
        );
        // The route's requirements are still the layer's.
        assert!(Arc::ptr_eq(&a.layer.require, &layer.require));
        // A wrong key is still refused by each copy.
        h.insert("x-api-key", HeaderValue::from_static("k-2"));
        assert!(b.layer.auth.authenticate(&h).is_err());
    }
}
