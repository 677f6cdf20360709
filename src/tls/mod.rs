//! TLS on rustls (ring provider): the server side terminates HTTPS for
//! [`server`](crate::server) ([`ServerTls`]).

mod server;

pub use server::{FileWatch, ServerTls, ServerTlsError, DEFAULT_HANDSHAKE_TIMEOUT};
