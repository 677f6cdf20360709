use http::StatusCode;

use crate::BoxError;

/// An object key that cannot be used: the response is still served, but not backed up.
///
/// Keys come from requests, so they are validated before any sink sees them: a key must
/// never climb out of the storage root or name an absolute path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// Nothing left after removing the leading `/` (for example the request `/`).
    #[error("empty object key")]
    Empty,
    /// The key starts with `/` or `\` or a drive letter.
    #[error("absolute object key")]
    Absolute,
    /// A `..` segment.
    #[error("object key contains a `..` segment")]
    ParentSegment,
    /// A `.` segment or an empty segment (`a//b`, trailing `/`).
    #[error("object key contains an empty or `.` segment")]
    EmptySegment,
    /// A NUL, a backslash or another control character.
    #[error("object key contains a forbidden character {0:?}")]
    ForbiddenChar(char),
    /// Longer than 1024 bytes (the S3 limit).
    #[error("object key longer than 1024 bytes")]
    TooLong,
    /// The path's percent-escapes are malformed or do not decode to UTF-8.
    #[error("object key is not valid percent-encoded UTF-8")]
    BadEncoding,
    /// The first segment is the sinks' reserved directory ([`RESERVED_DIR`](super::RESERVED_DIR),
    /// any case), where [`FsSink`](super::FsSink) keeps its temporary files: a request
    /// must never name, and so replace, a copy in progress.
    #[error("object key is in the reserved `.tmp` directory")]
    Reserved,
}

/// A sink failed to start, write, or commit a copy.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// A file system error.
    #[error("sink I/O failed")]
    Io(#[from] std::io::Error),
    /// The object does not fit the sink (for example over a cache's entry limit).
    #[error("object too large for the sink ({limit} bytes)")]
    TooLarge {
        /// The sink's limit.
        limit: u64,
    },
    /// Any other failure, such as an object store error.
    #[error("sink failed")]
    Other(#[source] BoxError),
}

/// Why a back-fill key failed.
#[derive(Debug, thiserror::Error)]
pub enum BackfillError {
    /// The key is not a valid object key, or does not form a request path.
    #[error("invalid key")]
    InvalidKey(#[from] KeyError),
    /// The service answered with a status other than 2xx.
    #[error("service answered {0}")]
    Status(StatusCode),
    /// The service failed.
    #[error("service failed")]
    Service(#[source] BoxError),
    /// The response body failed while it was read.
    #[error("response body failed")]
    Body(#[source] BoxError),
}
