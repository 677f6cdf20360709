use thiserror::Error;

use crate::BoxError;

/// Errors of the registry clients, the [`Registration`](super::Registration) guard and
/// instance validation.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum DiscoveryError {
    /// The instance cannot be registered as given (empty name, `/` in an id, port 0...).
    #[error("invalid instance: {0}")]
    InvalidInstance(String),
    /// The registry address or option is not usable.
    #[error("invalid registry configuration: {0}")]
    InvalidConfig(String),
    /// The registry could not be reached or refused the call; callers keep what they know.
    #[error("{registry} registry unavailable: {source}")]
    Unavailable {
        /// `memory`, `etcd` or `consul`.
        registry: &'static str,
        /// What failed.
        #[source]
        source: BoxError,
    },
    /// The registry no longer holds this registration (its lease or TTL check expired, or
    /// the registry lost its data): it has to be registered again.
    #[error("lease lost: the registry no longer holds instance `{0}`")]
    LeaseLost(String),
    /// The registry answered something this client cannot read.
    #[error("unexpected registry response: {0}")]
    Protocol(String),
}

impl DiscoveryError {
    pub(crate) fn unavailable(registry: &'static str, source: impl Into<BoxError>) -> Self {
        DiscoveryError::Unavailable {
            registry,
            source: source.into(),
        }
    }

    /// `true` when the registry could not be reached: try again later.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, DiscoveryError::Unavailable { .. })
    }

    /// `true` when the registration is gone from the registry and must be made again.
    pub fn is_lease_lost(&self) -> bool {
        matches!(self, DiscoveryError::LeaseLost(_))
    }
}
