//! TLS on rustls (the `tls` feature, `ring` provider: no OpenSSL, no C toolchain).
//!
//! A proxy that fetches from an outside origin (an S3 bucket, a CDN, another company's
//! site) must speak HTTPS and must verify whom it talks to, and a listener facing browsers
//! must terminate HTTPS:
//!
//! - [`ClientTls`] is the client side used by
//!   [`ForwardBuilder::tls`](crate::proxy::ForwardBuilder::tls): verification against the
//!   webpki roots by default, or a custom CA bundle, an optional client certificate (mTLS),
//!   and one shared rustls `ClientConfig` per `Forward` so that session resumption works
//!   across its connections.
//! - [`ServerTls`] terminates HTTPS for [`server`](crate::server): certificate and key from
//!   PEM files, ALPN h2/http1.1, a handshake timeout and certificate reload, several
//!   certificates chosen by SNI, and client certificates (mTLS) whose verified subject
//!   reaches the service as a [`ClientCertificate`] request extension.

mod certs;
mod client;
mod client_cert;
mod server;
mod sni;

pub use client::{ClientTls, ClientTlsBuilder, ClientTlsError};
pub use client_cert::ClientCertificate;
pub use server::{FileWatch, ServerTls, ServerTlsError, DEFAULT_HANDSHAKE_TIMEOUT};
