//! Authentication and authorisation at the gateway: API keys and JWT bearer tokens.
//!
//! Every service behind a gateway needs to know who calls it, and none of them should
//! verify tokens, fetch key sets and compare API keys on its own. [`AuthLayer`] does it once
//! at the edge: it verifies the credential, checks the route's required scopes/claims, and
//! forwards the verified identity upstream in headers (`x-auth-subject`, `x-auth-scopes`,
//! `x-auth-method`) — after removing any copy of those headers the client sent, so an
//! upstream can trust them. The [`Identity`] is also a request extension, for the layers
//! after it (the rate limiter keys on its subject).
//!
//! ```
//! use tower_patterns::auth::{ApiKeys, AuthConfig, Jwt, JwtKey};
//!
//! let auth = AuthConfig::new()
//!     .api_keys(ApiKeys::new().key("batch", "k-7f3a9c1e", ["orders:read"])?)
//!     .jwt(Jwt::new().key(JwtKey::hs256(b"0123456789abcdef0123456789abcdef")).issuer("https://idp"))
//!     .hide_credentials(true)
//!     .build()?;
//! let read = auth.layer().require_scopes(["orders:read"]); // per route
//! let write = auth.layer().require_scopes(["orders:write"]);
//! # let _ = (read, write);
//! # Ok::<_, tower_patterns::auth::AuthConfigError>(())
//! ```
//!
//! # Semantics
//!
//! | case | answer |
//! |---|---|
//! | no credential | `401`, `WWW-Authenticate: Bearer realm="api"` (or passed on anonymously: [`AuthLayer::optional`]) |
//! | unknown API key; JWT with bad signature, `alg: none`, an algorithm other than its key's, expired, not yet valid (`nbf`), wrong `iss`/`aud`, unknown `kid`, malformed; credential over 8 KiB; two credential headers | `401`, `WWW-Authenticate: Bearer realm="api", error="invalid_token"`, body `Unauthorized` — no detail (the reason, [`AuthError`], is in the response extensions and logged at `debug`) |
//! | valid, but a required scope or claim missing | `403`, `error="insufficient_scope"` |
//! | valid | identity headers written, [`Identity`] extension set, inner service called |
//!
//! - **Algorithms** come from the key ([`JwtKey`]), never from the token: HS256, RS256,
//!   ES256 (and the other algorithms jsonwebtoken verifies). Keys from PEM, a shared
//!   secret, or a [`Jwks`] endpoint refreshed in the background (a failed refresh keeps
//!   the last good keys; interval and timeout bounded). A token whose `kid` is not in the
//!   current set triggers one early, single-flight fetch that the request waits for
//!   (at most once per 30 s by default: [`JwksConfig::unknown_kid_refresh`]).
//! - **API keys** are found by a hash keyed with a per-process random secret and confirmed
//!   by a constant-time compare of the whole key ([`ApiKeys`]).
//! - Refusals are answers, not failures: the error type stays the inner service's, and the
//!   response has `Cache-Control: no-store`.
//!
//! Crate choice: `jsonwebtoken` 9.x, which verifies with `ring` (already used by the `tls`
//! feature) and builds on our Rust 1.85; 10+ needs Rust 1.88 and a crypto-backend feature.
//! See `docs/auth.md`.

mod api_key;
mod config;
mod error;
mod future;
mod identity;
mod jwks;
mod jwt;
mod layer;
mod pem;
mod service;

pub use api_key::ApiKeys;
pub use config::{AuthConfig, Authenticator, DEFAULT_MAX_CREDENTIAL_LEN};
pub use error::{AuthConfigError, AuthError, JwksError};
pub use future::ResponseFuture;
pub use identity::{AuthMethod, Identity};
pub use jsonwebtoken::{Algorithm, DecodingKey};
pub use jwks::{
    Jwks, JwksConfig, JwksStatus, DEFAULT_UNKNOWN_KID_REFRESH, MAX_REFRESH, MAX_TIMEOUT,
    MIN_REFRESH,
};
pub use jwt::{Claims, Jwt, JwtKey, MAX_LEEWAY_SECS};
pub use layer::AuthLayer;
pub use service::Auth;
