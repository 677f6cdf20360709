//! What can go wrong on the lean HTTP/1 path: each variant is the upstream's fault (a
//! malformed or cut-off response) or the connection's (I/O), answered `502` through
//! [`ForwardError::Transport`](crate::proxy::ForwardError::Transport).

/// An upstream's HTTP/1 response that could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Http1Error {
    /// The response head is malformed (httparse's verdict).
    #[error("malformed response head: {0}")]
    Parse(#[source] httparse::Error),
    /// The status code is outside 100-999.
    #[error("invalid response status {0}")]
    Status(u16),
    /// The response head did not end within the head limit.
    #[error("response head too large")]
    HeadTooLarge,
    /// A field name `http` does not accept.
    #[error("invalid response header name")]
    FieldName,
    /// A field value `http` does not accept.
    #[error("invalid response header value")]
    FieldValue,
    /// `Content-Length` is not one decimal number (or several lines disagree).
    #[error("invalid Content-Length")]
    ContentLength,
    /// `Transfer-Encoding` in an HTTP/1.0 response, which cannot use it.
    #[error("Transfer-Encoding in an HTTP/1.0 response")]
    TransferEncodingInHttp10,
    /// The chunked body's framing is malformed or over a limit.
    #[error("invalid chunked body: {0}")]
    Chunked(&'static str),
    /// Trailer fields that cannot be parsed.
    #[error("invalid trailers")]
    Trailers,
    /// The upstream closed the connection before the response (head or body) was complete.
    #[error("connection closed before the response was complete")]
    Incomplete,
    /// Reading from or writing to the upstream failed.
    #[error("upstream connection failed")]
    Io(#[source] std::io::Error),
}

impl crate::error::KnownFailure for Http1Error {
    /// Always the upstream's side: a malformed or cut-off response, or its connection.
    fn failure_kind(&self) -> crate::classify::FailureKind {
        crate::classify::FailureKind::Transport
    }
}
