//! TLS configuration on rustls (the `tls` feature): the pieces shared by the patterns that
//! speak TLS.
//!
//! A proxy that fetches from an outside origin (an S3 bucket, a CDN, another company's
//! site) must speak HTTPS and must verify whom it talks to: [`ClientTls`] is the client side
//! used by [`ForwardBuilder::tls`](crate::proxy::ForwardBuilder::tls) — verification against
//! the webpki roots by default, or a custom CA bundle, an optional client certificate
//! (mTLS), and one shared rustls `ClientConfig` per `Forward` so that session resumption
//! works across its connections. Everything uses rustls's `ring` provider (no OpenSSL, no
//! C toolchain).

mod client;

pub use client::{ClientTls, ClientTlsBuilder, ClientTlsError};
