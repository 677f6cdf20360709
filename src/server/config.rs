//! The limits of a server, in one value that every accept loop (the [`Server`](super::Server)
//! on any runtime, or each of the per-core [`Workers`](super::Workers)) applies the same way.

use std::time::Duration;

use crate::proxy::BodyLimits;

/// Limits and timeouts of [`Server`](super::Server); every one has a default, so a slow
/// or hostile client cannot hold resources forever.
///
/// | field | default | answer at the limit | nginx |
/// |---|---|---|---|
/// | `header_read_timeout` | 30 s | connection closed | `client_header_timeout` (60 s) |
/// | `body_timeout` | 30 s between body chunks | `408` | `client_body_timeout` (60 s) |
/// | `max_body_bytes` | 16 MiB | `413` (declared `Content-Length`: before reading it) | `client_max_body_size` (1 MiB) |
/// | `max_header_bytes` | 64 KiB (request line + headers) | `431` | `large_client_header_buffers` (4 × 8 KiB) |
/// | `max_headers` | 100 | `431` | — |
/// | `max_connections` | 10 000 | stop accepting until one closes | `worker_connections` |
/// | `drain_timeout` | 30 s | connections still busy after shutdown are closed | `worker_shutdown_timeout` |
/// | `accept_backoff` | 100 ms | pause accepting on `EMFILE`/`ENFILE`/`ENOBUFS`/`ENOMEM` | `accept_mutex_delay` |
/// | `http2` | on | h2c prior knowledge / ALPN `h2` refused: HTTP/1.1 only | `http2` |
/// | `h2_max_concurrent_streams` | 128 | further streams refused (`REFUSED_STREAM`) | `http2_max_concurrent_streams` (128) |
/// | `h2_keep_alive_interval` | 60 s | an unanswered ping closes the connection after `h2_keep_alive_timeout` (20 s) | — |
///
/// On HTTP/2, `max_header_bytes` bounds the decoded header list (`SETTINGS_MAX_HEADER_LIST_SIZE`,
/// a larger one is answered `431`), `max_headers` does not apply (the list size bounds it),
/// and the header read timeout bounds the connection preface and idleness (a whole period
/// without a new stream: GOAWAY, open streams finish); streams are bounded by
/// `h2_max_concurrent_streams` and hyper's flow-control windows (1 MiB per connection).
///
/// The body limits travel with each request that has a body as a [`BodyLimits`] extension and are
/// enforced by whatever reads the body ([`Forward`](crate::proxy::Forward) does); only a
/// declared `Content-Length` over the limit is refused by the server itself.
///
/// ```
/// use std::time::Duration;
/// let mut config = tower_patterns::server::ServerConfig::default();
/// config.max_connections = 512;
/// config.body_timeout = Some(Duration::from_secs(10));
/// let server = tower_patterns::server::Server::with_config(config);
/// assert_eq!(server.config().max_connections, 512);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServerConfig {
    /// Time allowed to receive a request's line and headers (also bounds an idle
    /// keep-alive connection).
    pub header_read_timeout: Duration,
    /// Time allowed between two chunks of a request body; `None` for none.
    pub body_timeout: Option<Duration>,
    /// Largest request body; `None` for no limit.
    pub max_body_bytes: Option<u64>,
    /// Largest request head (request line and headers).
    pub max_header_bytes: usize,
    /// Most header fields in one request.
    pub max_headers: usize,
    /// Most connections served at once; at the limit the server stops accepting (new
    /// clients wait in the kernel's backlog) instead of accepting and dropping. An
    /// upgraded connection (a WebSocket tunnel) keeps its slot while the tunnel is open
    /// (see [`ConnectionLease`](super::ConnectionLease)).
    pub max_connections: usize,
    /// After a shutdown signal, how long in-flight requests and open upgrade tunnels may
    /// take to finish before their connections are closed anyway (a stuck client cannot
    /// hold a restart; nginx's `worker_shutdown_timeout`).
    pub drain_timeout: Duration,
    /// Pause before accepting again after the process ran out of file descriptors or
    /// memory: gives closing connections time to free them instead of spinning.
    pub accept_backoff: Duration,
    /// Serve HTTP/2 besides HTTP/1.1: h2c prior knowledge on plain TCP (detected from the
    /// connection preface) and `h2` when TLS ALPN picks it. Off: HTTP/1.1 only.
    pub http2: bool,
    /// Most concurrent streams one HTTP/2 connection may open.
    pub h2_max_concurrent_streams: u32,
    /// Interval of HTTP/2 keep-alive pings, which find dead peers; `None` for none.
    pub h2_keep_alive_interval: Option<Duration>,
    /// How long a keep-alive ping may go unanswered before the connection is closed.
    pub h2_keep_alive_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            header_read_timeout: Duration::from_secs(30),
            body_timeout: Some(Duration::from_secs(30)),
            max_body_bytes: Some(16 * 1024 * 1024),
            max_header_bytes: 64 * 1024,
            max_headers: 100,
            max_connections: 10_000,
            drain_timeout: Duration::from_secs(30),
            accept_backoff: Duration::from_millis(100),
            http2: true,
            h2_max_concurrent_streams: 128,
            h2_keep_alive_interval: Some(Duration::from_secs(60)),
            h2_keep_alive_timeout: Duration::from_secs(20),
        }
    }
}

impl ServerConfig {
    /// The body limits put on every request as an extension.
    pub fn body_limits(&self) -> BodyLimits {
        BodyLimits {
            max_bytes: self.max_body_bytes,
            idle_timeout: self.body_timeout,
        }
    }
}
