//! Errors of [`auth`](super): why a request was turned away, and configuration errors.

use http::StatusCode;

use crate::error::HttpStatus;

/// Why [`Auth`](super::Auth) turned a request away.
///
/// The response never says which of these it was (a client probing tokens learns nothing
/// but "invalid token"); the value is put in the response extensions and logged at `debug`
/// (target `tower_patterns::auth`) for the operator.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// No credentials on a route that requires them (`401`, a bare `Bearer` challenge).
    #[error("no credentials")]
    Missing,
    /// Credentials that cannot be read: several `Authorization` or API key headers, both
    /// kinds at once, an unknown scheme, bytes that are not visible ASCII, or longer than
    /// the configured maximum (`401 invalid_token`).
    #[error("unreadable credentials: {0}")]
    Malformed(&'static str),
    /// An API key that is not configured (`401 invalid_token`).
    #[error("unknown API key")]
    UnknownApiKey,
    /// A JWT that fails verification: signature, algorithm, `exp`/`nbf`, `iss`/`aud`,
    /// unknown `kid`, malformed (`401 invalid_token`). The string is jsonwebtoken's reason,
    /// for the log only.
    #[error("invalid token: {0}")]
    InvalidToken(String),
    /// A JWT was presented but no JWT keys are configured (`401 invalid_token`).
    #[error("bearer tokens are not accepted here")]
    JwtNotConfigured,
    /// A verified identity whose subject, scopes or a forwarded claim cannot be written in
    /// an HTTP header (control characters, ...). Failing closed: the upstream must never
    /// get an identity that differs from the verified one (`401 invalid_token`).
    #[error("identity cannot be forwarded in a header")]
    UnforwardableIdentity,
    /// The identity lacks a scope or claim the route requires (`403 insufficient_scope`).
    #[error("insufficient scope")]
    InsufficientScope,
}

impl AuthError {
    /// `401` for every failure to authenticate, `403` for a known identity that lacks a
    /// scope or claim.
    pub fn status(&self) -> StatusCode {
        match self {
            AuthError::InsufficientScope => StatusCode::FORBIDDEN,
            _ => StatusCode::UNAUTHORIZED,
        }
    }

    /// The RFC 6750 `error` code of the `WWW-Authenticate` challenge, if any.
    pub fn bearer_error(&self) -> Option<&'static str> {
        match self {
            AuthError::Missing => None,
            AuthError::InsufficientScope => Some("insufficient_scope"),
            _ => Some("invalid_token"),
        }
    }
}

impl HttpStatus for AuthError {
    fn status(&self) -> StatusCode {
        AuthError::status(self)
    }
}

/// A configuration that cannot work; reported when it is built, never per request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthConfigError {
    /// A header name that is not a valid HTTP header name.
    #[error("invalid header name {0:?}")]
    HeaderName(String),
    /// A key that jsonwebtoken cannot read (bad PEM, wrong key type for the algorithm).
    #[error("invalid key: {0}")]
    Key(String),
    /// An algorithm this crate does not verify with the given key kind.
    #[error("unsupported algorithm {0}")]
    Algorithm(String),
    /// An API key that is empty or not visible ASCII (it could never match a header).
    #[error("API key {0:?} is empty or not visible ASCII")]
    ApiKey(String),
    /// Neither API keys nor JWT keys are configured: every request would be refused.
    #[error("no API keys and no JWT keys configured")]
    NoCredentials,
}

/// A JWKS document that could not be loaded. The keys loaded before stay in use.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JwksError {
    /// The URL is not an absolute `http://` (or, with the `tls` feature on the proxy,
    /// `https://`) URL.
    #[error("invalid JWKS url {0:?}")]
    Url(String),
    /// Connecting or the request failed.
    #[error("fetching the JWKS failed: {0}")]
    Fetch(#[source] crate::BoxError),
    /// No complete answer within the configured timeout.
    #[error("fetching the JWKS timed out")]
    Timeout,
    /// The endpoint answered with a status other than `200`.
    #[error("JWKS endpoint answered {0}")]
    Status(StatusCode),
    /// The document is larger than the configured maximum.
    #[error("JWKS document larger than {0} bytes")]
    TooLarge(usize),
    /// Not a JWKS document, or not one usable key in it.
    #[error("invalid JWKS document: {0}")]
    Document(String),
}
