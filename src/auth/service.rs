//! The [`Auth`] service.

use std::task::{Context, Poll};

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response};
use http_body_util::Full;
use tower_service::Service;

use super::error::AuthError;
use super::future::{ResponseFuture, UnknownKidWait};
use super::jwt::VerifyError;
use super::layer::AuthLayer;
use crate::respond::{status_response, AnswerFuture, ErrorResponseBody};

/// See [`AuthLayer`].
#[derive(Debug, Clone)]
pub struct Auth<S> {
    pub(crate) inner: S,
    pub(crate) layer: AuthLayer,
}

impl<S> Auth<S> {
    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
    /// Unwraps the service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

/// What to do with a request once its credential was looked at. The request itself
/// stays with the caller (`step` works on it in place): the accepted path moves it once,
/// into the inner service, instead of in and out of this value too.
pub(crate) enum Step {
    /// Authenticated (identity headers and extension set): call the inner service.
    Call,
    /// Turned away with this answer.
    Refuse(Response<Full<Bytes>>),
    /// The token's `kid` is unknown: wait for the early JWKS fetch, then look again.
    Wait(UnknownKidWait),
}

impl AuthLayer {
    /// Authenticates and authorises `req`. With `early_refresh` false (the second look,
    /// after an early JWKS fetch), an unknown `kid` is a refusal.
    pub(crate) fn step<B>(&self, req: &mut Request<B>, early_refresh: bool) -> Step {
        let auth = &self.auth;
        // A client must never smuggle an identity upstream: every path below that forwards
        // the request removes or overwrites each identity header (a refused request is
        // never forwarded, a waiting one comes back here).
        let identity = match auth.authenticate_or_refresh(req.headers(), early_refresh) {
            Ok(Some(id)) => id,
            Ok(None) if self.optional => {
                auth.strip(req.headers_mut());
                return Step::Call;
            }
            Ok(None) => return Step::Refuse(self.refuse(AuthError::Missing)),
            Err(VerifyError::Refused(e)) => return Step::Refuse(self.refuse(e)),
            Err(VerifyError::UnknownKid { jwks, seen }) => {
                return Step::Wait(Box::pin(jwks.unknown_kid(seen)))
            }
        };
        if let Err(e) = auth.check(&identity, &self.require) {
            return Step::Refuse(self.refuse(e));
        }
        // The subject, scopes and method headers are always written, and `insert` drops
        // every client copy: only the claim headers (absent claims write nothing) need
        // removing first. Three header lookups fewer per request than stripping them all.
        auth.strip_claims(req.headers_mut());
        // The credential goes before the identity headers come: a client's credential
        // header is usually its last, and removing the map's last entry moves no other
        // one (removing it after the three inserts moved the last identity header into
        // its place, a second probe). A refused identity goes nowhere either way.
        auth.hide(req.headers_mut(), identity.method());
        if let Err(e) = auth.write_identity(&identity, req.headers_mut()) {
            return Step::Refuse(self.refuse(e));
        }
        if self.extension {
            crate::client_addr::insert_scoped(req.extensions_mut(), identity);
        }
        Step::Call
    }

    pub(crate) fn refuse(&self, err: AuthError) -> Response<Full<Bytes>> {
        tracing::debug!(target: "tower_patterns::auth", reason = %err, "request refused");
        let mut res = status_response(err.status());
        res.headers_mut()
            .insert(header::WWW_AUTHENTICATE, self.auth.challenge(&err));
        // Responses to a credential must not be cached by anyone in between.
        res.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        res.extensions_mut().insert(err);
        res
    }
}

impl<S, B, RB> Service<Request<B>> for Auth<S>
where
    S: Service<Request<B>, Response = Response<RB>> + Clone,
{
    type Response = Response<ErrorResponseBody<RB>>;
    type Error = S::Error;
    type Future = ResponseFuture<S, B>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        match self.layer.step(&mut req, true) {
            Step::Call => ResponseFuture::ready(AnswerFuture::inner(self.inner.call(req))),
            Step::Refuse(res) => ResponseFuture::ready(AnswerFuture::answered(res)),
            Step::Wait(wait) => {
                // The request leaves with the service `poll_ready` readied; this one gets
                // a fresh clone (tower's usual hand-over for a call that runs later).
                let fresh = self.inner.clone();
                let ready = std::mem::replace(&mut self.inner, fresh);
                ResponseFuture::waiting(wait, req, ready, self.layer.clone())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use http::{HeaderValue, Request};

    use super::*;
    use crate::auth::{ApiKeys, AuthConfig};

    #[test]
    fn a_hidden_credential_is_gone_and_the_identity_headers_are_all_there() {
        // Also when the credential's header is one of the identity headers (a
        // configuration that reuses a name): the credential is removed first, so the
        // identity written after it is what the upstream sees, as without `hide`.
        for key_header in ["x-api-key", "x-auth-subject"] {
            let layer = AuthConfig::new()
                .api_keys(ApiKeys::new().key("batch", "k-1", ["r"]).unwrap())
                .api_key_header(key_header)
                .hide_credentials(true)
                .build()
                .unwrap()
                .layer();
            let mut req = Request::new(());
            let h = req.headers_mut();
            h.insert("host", HeaderValue::from_static("gw"));
            h.insert(key_header, HeaderValue::from_static("k-1"));
            assert!(matches!(layer.step(&mut req, true), Step::Call));
            let h = req.headers();
            assert_eq!(h.get("x-auth-subject").unwrap(), "batch", "{key_header}");
            assert_eq!(h.get("x-auth-scopes").unwrap(), "r", "{key_header}");
            assert_eq!(h.get("x-auth-method").unwrap(), "api-key", "{key_header}");
            assert!(h.get_all(key_header).iter().all(|v| v != "k-1"));
            assert_eq!(h.len(), 4, "{key_header}");
        }
    }

    #[test]
    fn the_identity_extension_is_there_unless_turned_off_and_the_headers_either_way() {
        let auth = AuthConfig::new()
            .api_keys(ApiKeys::new().key("batch", "k-1", ["r"]).unwrap())
            .hide_credentials(true)
            .build()
            .unwrap();
        for (layer, extension) in [
            (auth.layer(), true),
            (auth.layer().identity_extension(true), true),
            (auth.layer().identity_extension(false), false),
        ] {
            // The per-service copy the service uses keeps the setting.
            let svc = tower_layer::Layer::layer(&layer, ());
            let mut req = Request::new(());
            req.headers_mut()
                .insert("x-api-key", HeaderValue::from_static("k-1"));
            req.headers_mut()
                .insert("x-auth-subject", HeaderValue::from_static("spoofed"));
            assert!(matches!(svc.layer.step(&mut req, true), Step::Call));
            let id = req.extensions().get::<crate::auth::Identity>();
            assert_eq!(id.is_some(), extension);
            if let Some(id) = id {
                assert_eq!(id.subject(), "batch");
            }
            let h = req.headers();
            assert_eq!(
                h.get_all("x-auth-subject").iter().collect::<Vec<_>>(),
                ["batch"]
            );
            assert_eq!(h.get("x-auth-method").unwrap(), "api-key");
            assert!(h.get("x-api-key").is_none());
        }
    }

    #[test]
    fn an_api_keys_route_decision_made_once_per_service_is_the_per_request_one() {
        let auth = AuthConfig::new()
            .api_keys(
                ApiKeys::new()
                    .key("reader", "k-r", ["orders:read"])
                    .unwrap()
                    .key("writer", "k-w", ["orders:read", "orders:write"])
                    .unwrap(),
            )
            .build()
            .unwrap();
        let routes = [
            (auth.layer(), [true, true]),
            (auth.layer().require_scopes(["orders:read"]), [true, true]),
            (auth.layer().require_scopes(["orders:write"]), [false, true]),
            (
                auth.layer().require_scopes(["orders:write", "x"]),
                [false, false],
            ),
            // An API key has no claims.
            (auth.layer().require_claim("tenant", "a"), [false, false]),
        ];
        for (i, (layer, want)) in routes.into_iter().enumerate() {
            // What the service uses: the layer's per-service copy.
            let svc = tower_layer::Layer::layer(&layer, ());
            for (key, want) in ["k-r", "k-w"].into_iter().zip(want) {
                let mut req = Request::new(());
                req.headers_mut()
                    .insert("x-api-key", HeaderValue::from_static(key));
                let status = match svc.layer.step(&mut req, true) {
                    Step::Call => 200,
                    Step::Refuse(res) => res.status().as_u16(),
                    Step::Wait(_) => 0,
                };
                assert_eq!(status, if want { 200 } else { 403 }, "route {i} key {key}");
                // The shared authenticator's identity, checked per request, agrees.
                let id = layer.auth.authenticate(req.headers()).ok().flatten();
                if let Some(id) = id {
                    assert_eq!(layer.auth.check(&id, &layer.require).is_ok(), want);
                }
            }
        }
    }
}
