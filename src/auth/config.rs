//! [`AuthConfig`] and the [`Authenticator`] it builds: one per gateway, shared by the
//! [`AuthLayer`](super::AuthLayer)s of its routes.

use std::fmt;
use std::sync::Arc;

use http::{header, HeaderMap, HeaderName, HeaderValue};

use super::api_key::ApiKeys;
use super::error::{AuthConfigError, AuthError};
use super::identity::{AuthMethod, Identity, IdentityInner, Requirements};
use super::jwt::{scopes_of, Jwt, Verifier, VerifyError};
use super::layer::AuthLayer;

/// Default of [`AuthConfig::max_credential_len`]: 8 KiB, larger than any sane JWT.
pub const DEFAULT_MAX_CREDENTIAL_LEN: usize = 8 * 1024;

/// The default header names, as static names (see `AuthConfig::build`).
const DEFAULT_NAMES: [HeaderName; 4] = [
    HeaderName::from_static("x-api-key"),
    HeaderName::from_static("x-auth-subject"),
    HeaderName::from_static("x-auth-scopes"),
    HeaderName::from_static("x-auth-method"),
];

/// What a gateway accepts as credentials and how the verified identity travels upstream.
///
/// | setting | default |
/// |---|---|
/// | API keys | none; header `x-api-key` ([`api_key_header`](Self::api_key_header)) |
/// | JWT bearer tokens | none ([`jwt`](Self::jwt)); from `Authorization: Bearer` |
/// | identity headers sent upstream | `x-auth-subject`, `x-auth-scopes` (space-separated), `x-auth-method`; plus [`forward_claim`](Self::forward_claim) |
/// | client-sent copies of those headers | always removed first, on every request |
/// | credential length | at most [`DEFAULT_MAX_CREDENTIAL_LEN`] bytes, longer is `401` |
/// | credentials sent upstream | yes ([`hide_credentials`](Self::hide_credentials) removes them) |
/// | challenge realm | `api` |
pub struct AuthConfig {
    api_keys: Option<ApiKeys>,
    api_key_header: String,
    jwt: Option<Jwt>,
    subject_header: Option<String>,
    scopes_header: Option<String>,
    method_header: Option<String>,
    claim_headers: Vec<(String, String)>,
    max_credential_len: usize,
    hide_credentials: bool,
    realm: String,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthConfig")
            .field("api_keys", &self.api_keys)
            .field("jwt", &self.jwt)
            .finish_non_exhaustive()
    }
}

impl AuthConfig {
    /// The defaults of the table above, with no credentials yet.
    pub fn new() -> Self {
        AuthConfig {
            api_keys: None,
            api_key_header: "x-api-key".into(),
            jwt: None,
            subject_header: Some("x-auth-subject".into()),
            scopes_header: Some("x-auth-scopes".into()),
            method_header: Some("x-auth-method".into()),
            claim_headers: Vec::new(),
            max_credential_len: DEFAULT_MAX_CREDENTIAL_LEN,
            hide_credentials: false,
            realm: "api".into(),
        }
    }
    /// Accepts these API keys.
    pub fn api_keys(mut self, keys: ApiKeys) -> Self {
        self.api_keys = Some(keys);
        self
    }
    /// The header API keys come in.
    pub fn api_key_header(mut self, name: &str) -> Self {
        self.api_key_header = name.into();
        self
    }
    /// Accepts JWT bearer tokens verified by `jwt`.
    pub fn jwt(mut self, jwt: Jwt) -> Self {
        self.jwt = Some(jwt);
        self
    }
    /// The header carrying the subject upstream (`None`: neither sent nor stripped).
    pub fn subject_header(mut self, name: Option<&str>) -> Self {
        self.subject_header = name.map(Into::into);
        self
    }
    /// The header carrying the scopes upstream, space-separated (`None`: not sent).
    pub fn scopes_header(mut self, name: Option<&str>) -> Self {
        self.scopes_header = name.map(Into::into);
        self
    }
    /// The header carrying `api-key` or `jwt` upstream (`None`: not sent).
    pub fn method_header(mut self, name: Option<&str>) -> Self {
        self.method_header = name.map(Into::into);
        self
    }
    /// Also sends the token's claim `claim` upstream in `header` (strings as they are,
    /// other values as JSON; absent claim: no header). Client-sent copies are removed.
    pub fn forward_claim(mut self, claim: &str, header: &str) -> Self {
        self.claim_headers.push((claim.into(), header.into()));
        self
    }
    /// Longest `Authorization` / API key header accepted, in bytes.
    pub fn max_credential_len(mut self, n: usize) -> Self {
        self.max_credential_len = n;
        self
    }
    /// Removes the credential (the `Authorization` or API key header) before the request
    /// goes upstream, so upstreams see only the identity headers.
    pub fn hide_credentials(mut self, yes: bool) -> Self {
        self.hide_credentials = yes;
        self
    }
    /// The `realm` of the `WWW-Authenticate` challenge (visible ASCII without `"` or `\`;
    /// other characters are dropped).
    pub fn realm(mut self, realm: &str) -> Self {
        self.realm = realm.into();
        self
    }

    /// Checks the configuration and builds the shared [`Authenticator`].
    pub fn build(self) -> Result<Authenticator, AuthConfigError> {
        let name = |s: &str| {
            let n =
                HeaderName::try_from(s).map_err(|_| AuthConfigError::HeaderName(s.to_owned()))?;
            // A default name as a static one: a configured name is a shared buffer, whose
            // every clone and drop (each identity header written, per request) is an
            // atomic reference count; a static one's are free.
            Ok(DEFAULT_NAMES
                .iter()
                .find(|d| **d == n)
                .cloned()
                .unwrap_or(n))
        };
        let has_keys = self.api_keys.as_ref().is_some_and(|k| !k.is_empty());
        let has_jwt = self.jwt.as_ref().is_some_and(Jwt::has_keys);
        if !has_keys && !has_jwt {
            return Err(AuthConfigError::NoCredentials);
        }
        let opt = |s: &Option<String>| s.as_deref().map(name).transpose();
        let claim_headers = self
            .claim_headers
            .iter()
            .map(|(c, h)| Ok((c.clone(), name(h)?)))
            .collect::<Result<Vec<_>, AuthConfigError>>()?;
        let subject_header = opt(&self.subject_header)?;
        let scopes_header = opt(&self.scopes_header)?;
        let method_header = opt(&self.method_header)?;
        let mut stripped: Vec<HeaderName> = [&subject_header, &scopes_header, &method_header]
            .into_iter()
            .flatten()
            .cloned()
            .collect();
        stripped.extend(claim_headers.iter().map(|(_, h)| h.clone()));
        let realm: String = self
            .realm
            .chars()
            .filter(|c| c.is_ascii_graphic() && *c != '"' && *c != '\\' || *c == ' ')
            .collect();
        let challenge = |error: Option<&str>| {
            let v = match error {
                None => format!("Bearer realm=\"{realm}\""),
                Some(e) => format!("Bearer realm=\"{realm}\", error=\"{e}\""),
            };
            // Only visible ASCII went in.
            HeaderValue::try_from(v).unwrap_or_else(|_| HeaderValue::from_static("Bearer"))
        };
        Ok(Authenticator {
            inner: Arc::new(Inner {
                api_keys: self.api_keys.filter(|k| !k.is_empty()),
                api_key_header: name(&self.api_key_header)?,
                jwt: self.jwt.filter(Jwt::has_keys).map(|j| Arc::new(j.build())),
                subject_header,
                scopes_header,
                method_header,
                claim_headers,
                stripped,
                max_credential_len: self.max_credential_len,
                hide_credentials: self.hide_credentials,
                challenge_missing: challenge(None),
                challenge_invalid: challenge(Some("invalid_token")),
                challenge_scope: challenge(Some("insufficient_scope")),
            }),
        })
    }
}

#[derive(Clone)]
pub(crate) struct Inner {
    api_keys: Option<ApiKeys>,
    api_key_header: HeaderName,
    /// Shared by every per-service copy (see [`Authenticator::per_service`]): one JWKS
    /// refresher and key set.
    jwt: Option<Arc<Verifier>>,
    subject_header: Option<HeaderName>,
    scopes_header: Option<HeaderName>,
    method_header: Option<HeaderName>,
    claim_headers: Vec<(String, HeaderName)>,
    /// Every identity header: removed from each incoming request before anything else.
    stripped: Vec<HeaderName>,
    max_credential_len: usize,
    hide_credentials: bool,
    challenge_missing: HeaderValue,
    challenge_invalid: HeaderValue,
    challenge_scope: HeaderValue,
}

/// The built, shared authentication of a gateway; cheap to clone. [`Authenticator::layer`]
/// makes the per-route [`AuthLayer`]s.
#[derive(Clone)]
pub struct Authenticator {
    pub(crate) inner: Arc<Inner>,
}

impl fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authenticator")
            .field("api_keys", &self.inner.api_keys)
            .field("jwt", &self.inner.jwt.is_some())
            .finish_non_exhaustive()
    }
}

/// The refusal of an API key that is not visible ASCII (what a configured key is).
fn not_graphic(key: &[u8]) -> Option<AuthError> {
    (!key.iter().all(u8::is_ascii_graphic))
        .then_some(AuthError::Malformed("API key not visible ASCII"))
}

/// Which credential a request carried.
enum Credential<'a> {
    ApiKey(&'a [u8]),
    Bearer(&'a str),
}

impl Authenticator {
    /// This authenticator for one service (what [`AuthLayer`] builds): its own copy of
    /// the API key table, so the identity each accepted key hands out (a reference count
    /// per request, its header values two more) lives on this service's cache lines, not
    /// on lines every worker's requests write; the JWT verifier and its JWKS stay shared.
    /// Without API keys, the shared authenticator itself.
    pub(crate) fn per_service(&self, require: &Requirements) -> Authenticator {
        match &self.inner.api_keys {
            Some(keys) => Authenticator {
                inner: Arc::new(Inner {
                    api_keys: Some(keys.per_service(require)),
                    ..(*self.inner).clone()
                }),
            },
            None => self.clone(),
        }
    }

    /// A layer requiring a valid credential and nothing more (add scopes/claims with
    /// [`AuthLayer::require_scopes`] / [`AuthLayer::require_claim`]).
    pub fn layer(&self) -> AuthLayer {
        AuthLayer::new(self.clone())
    }

    /// The identity of `headers`' credential: `Ok(None)` when there is none.
    ///
    /// Synchronous: a token with an unknown `kid` is refused here without the early JWKS
    /// fetch that [`AuthLayer`] waits for.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<Option<Identity>, AuthError> {
        self.authenticate_or_refresh(headers, false)
            .map_err(|e| match e {
                VerifyError::Refused(e) => e,
                VerifyError::UnknownKid { .. } => {
                    AuthError::InvalidToken("no key for this kid and algorithm".into())
                }
            })
    }

    /// [`authenticate`](Self::authenticate), or with `early_refresh` the news that the
    /// token's `kid` is unknown to the JWKS (the caller may wait for an early fetch and
    /// try again without it).
    pub(crate) fn authenticate_or_refresh(
        &self,
        headers: &HeaderMap,
        early_refresh: bool,
    ) -> Result<Option<Identity>, VerifyError> {
        let inner = &*self.inner;
        let Some(cred) = self.credential(headers)? else {
            return Ok(None);
        };
        match cred {
            Credential::ApiKey(key) => {
                let Some(keys) = &inner.api_keys else {
                    return Err(not_graphic(key)
                        .unwrap_or(AuthError::Malformed("API keys are not accepted here"))
                        .into());
                };
                // A key found equals a configured one, which is visible ASCII (checked
                // when configured): the byte check is needed only to name a miss, not on
                // every accepted request (a scan of the whole key, ~170 instructions).
                match keys.find(key) {
                    Some(id) => Ok(Some(id)),
                    None => Err(not_graphic(key).unwrap_or(AuthError::UnknownApiKey).into()),
                }
            }
            Credential::Bearer(token) => {
                let verifier = inner.jwt.as_ref().ok_or(AuthError::JwtNotConfigured)?;
                let claims = verifier.verify(token, early_refresh)?;
                let subject = match claims.get("sub") {
                    Some(serde_json::Value::String(s)) if !s.is_empty() => {
                        Arc::<str>::from(s.as_str())
                    }
                    _ => return Err(AuthError::InvalidToken("no string sub".into()).into()),
                };
                Ok(Some(Identity::new(IdentityInner {
                    subject,
                    scopes: scopes_of(&claims).into(),
                    method: AuthMethod::Jwt,
                    claims: Some(Arc::new(claims)),
                    values: None,
                    granted: None,
                })))
            }
        }
    }

    /// Reads the one credential of the request from the header *bytes*. Anything
    /// ambiguous fails closed: two `Authorization` headers, two API key headers, both
    /// kinds at once, a non-`Bearer` scheme, non-ASCII, over the length limit.
    fn credential<'a>(&self, headers: &'a HeaderMap) -> Result<Option<Credential<'a>>, AuthError> {
        let inner = &*self.inner;
        // Both names in one pass over the fields (`crate::fields`): two hash lookups, the
        // API key's custom name hashed byte by byte, cost more, and the one for the kind
        // that is absent, usually one, found nothing (issue 14, session 17). A key header
        // configured as `authorization` is both, refused below as with two lookups.
        let [key, authz] =
            crate::fields::scan(headers, [&inner.api_key_header, &header::AUTHORIZATION]);
        let one = |seen: crate::fields::Seen<'a>| {
            if seen.count > 1 {
                return Err(AuthError::Malformed("repeated credential header"));
            }
            if seen
                .first
                .is_some_and(|v| v.len() > inner.max_credential_len)
            {
                return Err(AuthError::Malformed("credential too long"));
            }
            Ok(seen.first)
        };
        let key = one(key)?;
        let authz = one(authz)?;
        match (key, authz) {
            (None, None) => Ok(None),
            (Some(_), Some(_)) => Err(AuthError::Malformed("both an API key and Authorization")),
            (Some(k), None) => {
                let k = k.as_bytes().trim_ascii();
                if k.is_empty() {
                    return Err(AuthError::Malformed("API key not visible ASCII"));
                }
                // Visible ASCII only: checked by `authenticate_or_refresh` on a miss.
                Ok(Some(Credential::ApiKey(k)))
            }
            (None, Some(a)) => {
                let a = a.as_bytes();
                // RFC 9110 §11.1: the scheme is case-insensitive.
                let Some((scheme, token)) = a.split_first_chunk::<7>() else {
                    return Err(AuthError::Malformed("not a Bearer credential"));
                };
                if !scheme.eq_ignore_ascii_case(b"bearer ") {
                    return Err(AuthError::Malformed("not a Bearer credential"));
                }
                let token = token.trim_ascii();
                // base64url segments and dots only: anything else is not a JWS.
                if token.is_empty()
                    || !token.iter().all(|b| {
                        b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'=')
                    })
                {
                    return Err(AuthError::Malformed("token characters"));
                }
                let token = std::str::from_utf8(token)
                    .map_err(|_| AuthError::Malformed("token characters"))?;
                Ok(Some(Credential::Bearer(token)))
            }
        }
    }

    /// Removes every client-sent copy of the identity headers.
    pub(crate) fn strip(&self, headers: &mut HeaderMap) {
        for h in &self.inner.stripped {
            // `remove` drops every value of the name, not only the first.
            headers.remove(h);
        }
    }

    /// Removes every client-sent copy of the claim headers (before
    /// [`write_identity`](Self::write_identity), which writes the others unconditionally).
    pub(crate) fn strip_claims(&self, headers: &mut HeaderMap) {
        for (_, h) in &self.inner.claim_headers {
            headers.remove(h);
        }
    }

    /// Removes the credential the request authenticated with, when configured to. Only
    /// that one header: [`credential`](Self::credential) refuses a request carrying both
    /// kinds, so the other is not there (one header-map probe fewer per request).
    pub(crate) fn hide(&self, headers: &mut HeaderMap, method: AuthMethod) {
        if self.inner.hide_credentials {
            match method {
                AuthMethod::ApiKey => headers.remove(&self.inner.api_key_header),
                AuthMethod::Jwt => headers.remove(header::AUTHORIZATION),
            };
        }
    }

    /// Writes the identity headers; an identity that cannot be written exactly fails the
    /// request (the upstream must not see a different subject than the verified one).
    /// Each configured subject, scopes and method header is written with `insert`, which
    /// replaces every client-sent copy: the layer's `step` relies on it.
    pub(crate) fn write_identity(
        &self,
        id: &Identity,
        headers: &mut HeaderMap,
    ) -> Result<(), AuthError> {
        let inner = &*self.inner;
        let value =
            |s: &str| HeaderValue::from_str(s).map_err(|_| AuthError::UnforwardableIdentity);
        // An API key's values were made (and checked) once; a token's are made here.
        if let Some(h) = &inner.subject_header {
            let v = match &id.0.values {
                Some(v) => v.subject.clone(),
                None => value(id.subject())?,
            };
            headers.insert(h.clone(), v);
        }
        if let Some(h) = &inner.scopes_header {
            let v = match &id.0.values {
                Some(v) => v.scopes.clone(),
                None => value(&id.scopes().join(" "))?,
            };
            headers.insert(h.clone(), v);
        }
        if let Some(h) = &inner.method_header {
            // Constants: checked when compiled, where `from_static` at run time checks
            // the bytes on every request.
            const API_KEY: HeaderValue = HeaderValue::from_static("api-key");
            const JWT: HeaderValue = HeaderValue::from_static("jwt");
            let v = match id.method() {
                AuthMethod::ApiKey => API_KEY,
                AuthMethod::Jwt => JWT,
            };
            headers.insert(h.clone(), v);
        }
        for (claim, h) in &inner.claim_headers {
            match id.claim(claim) {
                None | Some(serde_json::Value::Null) => {}
                Some(serde_json::Value::String(s)) => {
                    headers.insert(h.clone(), value(s)?);
                }
                Some(other) => {
                    headers.insert(h.clone(), value(&other.to_string())?);
                }
            }
        }
        Ok(())
    }

    pub(crate) fn challenge(&self, err: &AuthError) -> HeaderValue {
        match err.bearer_error() {
            None => self.inner.challenge_missing.clone(),
            Some("insufficient_scope") => self.inner.challenge_scope.clone(),
            Some(_) => self.inner.challenge_invalid.clone(),
        }
    }

    /// `req` is the requirements of the service whose per-service copy made `id`, when
    /// that copy decided already (`granted`, an API key's identity).
    pub(crate) fn check(&self, id: &Identity, req: &Requirements) -> Result<(), AuthError> {
        let met = match id.0.granted {
            Some(granted) => granted,
            None => req.is_empty() || req.met_by(id),
        };
        if met {
            Ok(())
        } else {
            Err(AuthError::InsufficientScope)
        }
    }
}
