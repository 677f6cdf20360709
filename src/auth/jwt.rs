//! JWT bearer tokens: keys whose algorithm is fixed by configuration, and the verifier.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};

use super::error::{AuthConfigError, AuthError};
use super::jwks::Jwks;

/// Claims of a verified token.
pub type Claims = Map<String, Value>;

/// Tokens whose header names no `kid` are tried against at most this many keys of the
/// token's algorithm: each try is a signature check, and a token must not make the gateway
/// do unbounded work.
const MAX_KEYS_TRIED: usize = 4;

/// Longest accepted leeway for `exp`/`nbf` (1 hour): more is a configuration mistake.
pub const MAX_LEEWAY_SECS: u64 = 3600;

/// One verification key with the one algorithm it verifies.
///
/// The algorithm belongs to the key, never to the token: a token whose header names
/// another algorithm (`none`, or `HS256` signed with an RSA public key as the HMAC secret —
/// the classic algorithm-confusion attack) does not verify.
#[derive(Clone)]
pub struct JwtKey {
    pub(crate) kid: Option<Arc<str>>,
    pub(crate) alg: Algorithm,
    pub(crate) key: DecodingKey,
}

impl fmt::Debug for JwtKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtKey")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

impl JwtKey {
    /// An HS256 shared secret.
    pub fn hs256(secret: &[u8]) -> Self {
        JwtKey {
            kid: None,
            alg: Algorithm::HS256,
            key: DecodingKey::from_secret(secret),
        }
    }

    /// An RS256 public key in PEM (`BEGIN PUBLIC KEY` or `BEGIN RSA PUBLIC KEY`).
    pub fn rs256_pem(pem: &[u8]) -> Result<Self, AuthConfigError> {
        let der = super::pem::public_key(pem, super::pem::Kind::Rsa)
            .map_err(|e| AuthConfigError::Key(e.into()))?;
        let key = DecodingKey::from_rsa_der(&der);
        Ok(JwtKey {
            kid: None,
            alg: Algorithm::RS256,
            key,
        })
    }

    /// An ES256 (P-256) public key in PEM (`BEGIN PUBLIC KEY`).
    pub fn es256_pem(pem: &[u8]) -> Result<Self, AuthConfigError> {
        let der = super::pem::public_key(pem, super::pem::Kind::EcP256)
            .map_err(|e| AuthConfigError::Key(e.into()))?;
        let key = DecodingKey::from_ec_der(&der);
        Ok(JwtKey {
            kid: None,
            alg: Algorithm::ES256,
            key,
        })
    }

    /// Any key jsonwebtoken can read, for the algorithm `alg`.
    pub fn new(alg: Algorithm, key: DecodingKey) -> Self {
        JwtKey {
            kid: None,
            alg,
            key,
        }
    }

    /// Only tokens whose header names this `kid` are checked against this key (tokens
    /// without a `kid` are tried against every key of their algorithm).
    pub fn with_kid(mut self, kid: impl Into<String>) -> Self {
        self.kid = Some(kid.into().into());
        self
    }

    /// The key's id, if any.
    pub fn kid(&self) -> Option<&str> {
        self.kid.as_deref()
    }

    /// The one algorithm this key verifies.
    pub fn algorithm(&self) -> Algorithm {
        self.alg
    }

    /// A key from a JWK. Its algorithm is the JWK's `alg`, else the one its key type
    /// implies (RSA: RS256, P-256: ES256, P-384: ES384, Ed25519: EdDSA). Encryption keys
    /// (`use: enc`) and symmetric keys without `alg` are refused.
    pub fn from_jwk(jwk: &Jwk) -> Result<Self, String> {
        if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
            return Err("encryption key".into());
        }
        let alg = match jwk.common.key_algorithm {
            Some(ka) => {
                signing_algorithm(ka).ok_or_else(|| format!("{ka:?} is not a signing algorithm"))?
            }
            None => match &jwk.algorithm {
                AlgorithmParameters::RSA(_) => Algorithm::RS256,
                AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
                    EllipticCurve::P256 => Algorithm::ES256,
                    EllipticCurve::P384 => Algorithm::ES384,
                    ref c => return Err(format!("curve {c:?} without alg")),
                },
                AlgorithmParameters::OctetKeyPair(_) => Algorithm::EdDSA,
                AlgorithmParameters::OctetKey(_) => return Err("symmetric key without alg".into()),
            },
        };
        let key = DecodingKey::from_jwk(jwk).map_err(|e| e.to_string())?;
        Ok(JwtKey {
            kid: jwk.common.key_id.as_deref().map(Into::into),
            alg,
            key,
        })
    }
}

fn signing_algorithm(ka: KeyAlgorithm) -> Option<Algorithm> {
    Some(match ka {
        KeyAlgorithm::HS256 => Algorithm::HS256,
        KeyAlgorithm::HS384 => Algorithm::HS384,
        KeyAlgorithm::HS512 => Algorithm::HS512,
        KeyAlgorithm::ES256 => Algorithm::ES256,
        KeyAlgorithm::ES384 => Algorithm::ES384,
        KeyAlgorithm::RS256 => Algorithm::RS256,
        KeyAlgorithm::RS384 => Algorithm::RS384,
        KeyAlgorithm::RS512 => Algorithm::RS512,
        KeyAlgorithm::PS256 => Algorithm::PS256,
        KeyAlgorithm::PS384 => Algorithm::PS384,
        KeyAlgorithm::PS512 => Algorithm::PS512,
        KeyAlgorithm::EdDSA => Algorithm::EdDSA,
        _ => return None,
    })
}

const ALL_ALGORITHMS: [Algorithm; 12] = [
    Algorithm::HS256,
    Algorithm::HS384,
    Algorithm::HS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::EdDSA,
];

/// How bearer tokens are verified: keys (static and/or from a [`Jwks`]), issuer, audience,
/// leeway.
///
/// Every token must carry `exp` and `sub`; `nbf` is checked when present; `iss`/`aud`,
/// when configured, must be present and match.
///
/// ```
/// use tower_patterns::auth::{Jwt, JwtKey};
/// let jwt = Jwt::new()
///     .key(JwtKey::hs256(b"a shared secret of at least 32 bytes!!").with_kid("v1"))
///     .issuer("https://idp.example")
///     .audience("orders-api");
/// ```
#[derive(Clone, Debug)]
pub struct Jwt {
    keys: Vec<JwtKey>,
    jwks: Option<Jwks>,
    issuers: Vec<String>,
    audiences: Vec<String>,
    leeway: u64,
}

impl Default for Jwt {
    fn default() -> Self {
        Self::new()
    }
}

impl Jwt {
    /// No keys yet; leeway 30 s.
    pub fn new() -> Self {
        Jwt {
            keys: Vec::new(),
            jwks: None,
            issuers: Vec::new(),
            audiences: Vec::new(),
            leeway: 30,
        }
    }

    /// Adds a static key.
    pub fn key(mut self, key: JwtKey) -> Self {
        self.keys.push(key);
        self
    }

    /// Also uses the keys of `jwks` (as they are at each request).
    pub fn jwks(mut self, jwks: Jwks) -> Self {
        self.jwks = Some(jwks);
        self
    }

    /// Accepts tokens of this issuer (call again for more); `iss` becomes required.
    pub fn issuer(mut self, iss: impl Into<String>) -> Self {
        self.issuers.push(iss.into());
        self
    }

    /// Accepts tokens for this audience (call again for more); `aud` becomes required.
    pub fn audience(mut self, aud: impl Into<String>) -> Self {
        self.audiences.push(aud.into());
        self
    }

    /// Clock skew allowed on `exp`/`nbf`, saturating at [`MAX_LEEWAY_SECS`].
    pub fn leeway(mut self, leeway: std::time::Duration) -> Self {
        self.leeway = leeway.as_secs().min(MAX_LEEWAY_SECS);
        self
    }

    pub(crate) fn has_keys(&self) -> bool {
        !self.keys.is_empty() || self.jwks.is_some()
    }

    pub(crate) fn build(self) -> Verifier {
        let mut required = vec!["exp", "sub"];
        if !self.issuers.is_empty() {
            required.push("iss");
        }
        if !self.audiences.is_empty() {
            required.push("aud");
        }
        let validations = ALL_ALGORITHMS
            .iter()
            .map(|&alg| {
                let mut v = Validation::new(alg);
                v.leeway = self.leeway;
                v.validate_nbf = true;
                v.set_required_spec_claims(&required);
                if !self.issuers.is_empty() {
                    v.set_issuer(&self.issuers);
                }
                if self.audiences.is_empty() {
                    // Not configured: a token's `aud` is not checked against anything
                    // (jsonwebtoken would refuse every token that has one).
                    v.validate_aud = false;
                } else {
                    v.set_audience(&self.audiences);
                }
                (alg, v)
            })
            .collect();
        Verifier {
            keys: self.keys,
            jwks: self.jwks,
            validations,
        }
    }
}

/// Why [`Verifier::verify`] refused a token.
pub(crate) enum VerifyError {
    /// Refused for good.
    Refused(AuthError),
    /// The token names a `kid` that neither the static keys nor `seen`, the JWKS set it
    /// was checked against, has: an early JWKS fetch may know it.
    UnknownKid { jwks: Jwks, seen: Arc<Vec<JwtKey>> },
}

impl From<AuthError> for VerifyError {
    fn from(e: AuthError) -> Self {
        VerifyError::Refused(e)
    }
}

/// A built [`Jwt`]: one prepared `Validation` per algorithm, so no allocation per request
/// for it.
pub(crate) struct Verifier {
    keys: Vec<JwtKey>,
    jwks: Option<Jwks>,
    validations: HashMap<Algorithm, Validation>,
}

impl Verifier {
    /// Verifies `token` and returns its claims. With `early_refresh`, a `kid` unknown to
    /// a JWKS that refreshes on unknown kids is [`VerifyError::UnknownKid`] instead of a
    /// refusal.
    pub(crate) fn verify(&self, token: &str, early_refresh: bool) -> Result<Claims, VerifyError> {
        let invalid = |e: jsonwebtoken::errors::Error| AuthError::InvalidToken(e.to_string());
        // Fails for `alg: none` too: jsonwebtoken knows no such algorithm.
        let header = jsonwebtoken::decode_header(token).map_err(invalid)?;
        let from_jwks = self.jwks.as_ref().map(Jwks::keys);
        if let (true, Some(jwks), Some(seen), Some(kid)) =
            (early_refresh, &self.jwks, &from_jwks, &header.kid)
        {
            let known = |k: &JwtKey| k.kid.as_deref() == Some(kid.as_str());
            if jwks.refreshes_unknown_kids()
                && !self.keys.iter().any(known)
                && !seen.iter().any(known)
            {
                return Err(VerifyError::UnknownKid {
                    jwks: jwks.clone(),
                    seen: seen.clone(),
                });
            }
        }
        let candidates = self
            .keys
            .iter()
            .chain(from_jwks.iter().flat_map(|k| k.iter()))
            .filter(|k| k.alg == header.alg)
            .filter(|k| match (&header.kid, &k.kid) {
                (Some(want), Some(have)) => **want == **have,
                _ => true,
            })
            .take(MAX_KEYS_TRIED);
        let mut last = AuthError::InvalidToken("no key for this kid and algorithm".into());
        for key in candidates {
            let Some(validation) = self.validations.get(&key.alg) else {
                continue;
            };
            match jsonwebtoken::decode::<Claims>(token, &key.key, validation) {
                Ok(data) => return Ok(data.claims),
                // Another key of the same algorithm may have signed it.
                Err(e) if matches!(e.kind(), jsonwebtoken::errors::ErrorKind::InvalidSignature) => {
                    last = invalid(e)
                }
                Err(e) => return Err(invalid(e).into()),
            }
        }
        Err(last.into())
    }
}

/// The scopes of verified claims: `scope` (space-separated, RFC 8693) or `scp` (a string
/// or an array of strings). Values of another type grant nothing.
pub(crate) fn scopes_of(claims: &Claims) -> Vec<String> {
    let mut out = Vec::new();
    for name in ["scope", "scp"] {
        match claims.get(name) {
            Some(Value::String(s)) => out.extend(s.split_ascii_whitespace().map(str::to_owned)),
            Some(Value::Array(a)) => {
                out.extend(a.iter().filter_map(|v| v.as_str().map(str::to_owned)))
            }
            _ => {}
        }
    }
    out
}
