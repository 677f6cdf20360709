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
}

impl AuthLayer {
    /// Requires a valid credential.
    pub fn new(auth: Authenticator) -> Self {
        AuthLayer {
            auth,
            require: Arc::new(Requirements::default()),
            optional: false,
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
        Auth {
            inner,
            layer: self.clone(),
        }
    }
}
