//! The bulkhead's rejection.

use http::StatusCode;

use crate::classify::FailureKind;
use crate::error::{HttpStatus, KnownFailure};

/// Why a call was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// All slots busy and the queue full.
    QueueFull,
    /// Waited the maximum time in the queue.
    QueueTimeout,
}

impl Rejection {
    /// The metrics label.
    pub fn as_str(&self) -> &'static str {
        match self {
            Rejection::QueueFull => "queue_full",
            Rejection::QueueTimeout => "queue_timeout",
        }
    }
}

/// A call the bulkhead refused; answers **503**.
#[derive(Debug, Clone, thiserror::Error)]
#[error("bulkhead {name} full ({})", reason.as_str())]
pub struct BulkheadFull {
    /// The bulkhead's configured name.
    pub name: std::sync::Arc<str>,
    /// Why.
    pub reason: Rejection,
}

impl HttpStatus for BulkheadFull {
    fn status(&self) -> StatusCode {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

impl KnownFailure for BulkheadFull {
    /// The gateway's own limit, not the upstream's fault.
    fn failure_kind(&self) -> FailureKind {
        FailureKind::Client
    }
    fn never_sent(&self) -> bool {
        true
    }
}
