//! [`ForwardBuilder`]: every setting of a [`Forward`], its defaults, and the pools it
//! builds. Kept apart from the request path (`service.rs`): this is the configuration
//! surface users read, that one the code every request runs.

use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;

use super::connect::Protocol;
use super::error::ForwardError;
use super::pool::{PoolConfig, Pools};
use super::service::Forward;
use super::upstream::Upstream;
use crate::BoxError;

/// The per-request options a [`Forward`] and its clones share.
#[derive(Debug, Clone)]
pub(super) struct Options {
    pub(super) response_timeout: Option<Duration>,
    /// Used when the request carries no [`BodyLimits`](super::BodyLimits) extension.
    pub(super) client_body_timeout: Option<Duration>,
    pub(super) preserve_host: bool,
    pub(super) forwarded_proto: Option<HeaderValue>,
    pub(super) append_forwarded_for: bool,
    /// Tunnel HTTP/1.1 upgrades (WebSocket); see [`super::upgrade`].
    pub(super) upgrades: bool,
    pub(super) upgrade_idle_timeout: Option<Duration>,
}

/// Builds a [`Forward`].
///
/// Every timeout has a default, so a hung upstream or client never holds a request
/// forever:
///
/// | setting | default | disable | nginx |
/// |---|---|---|---|
/// | [`connect_timeout`](Self::connect_timeout) | 5 s ([`Self::DEFAULT_CONNECT_TIMEOUT`]) | [`without_connect_timeout`](Self::without_connect_timeout) | `proxy_connect_timeout` (60 s) |
/// | [`response_timeout`](Self::response_timeout) | 60 s ([`Self::DEFAULT_RESPONSE_TIMEOUT`]) | [`without_response_timeout`](Self::without_response_timeout) | `proxy_read_timeout` (60 s) |
/// | [`client_body_timeout`](Self::client_body_timeout) | 30 s ([`Self::DEFAULT_CLIENT_BODY_TIMEOUT`]) | [`without_client_body_timeout`](Self::without_client_body_timeout) | `client_body_timeout` (60 s) |
#[derive(Debug, Clone)]
pub struct ForwardBuilder {
    upstream: String,
    connect_timeout: Option<Duration>,
    pool_idle_timeout: Option<Duration>,
    pool_max_idle_per_host: usize,
    protocol: Protocol,
    h2_keep_alive: Option<(Duration, Duration)>,
    h2_max_streams: usize,
    h2_max_connections: usize,
    acquire_timeout: Option<Duration>,
    #[cfg(feature = "tls")]
    tls: Option<crate::tls::ClientTls>,
    opts: Options,
}

impl ForwardBuilder {
    /// Default of [`connect_timeout`](Self::connect_timeout).
    pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
    /// Default of [`response_timeout`](Self::response_timeout), nginx's `proxy_read_timeout`.
    pub const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);
    /// Default of [`client_body_timeout`](Self::client_body_timeout).
    pub const DEFAULT_CLIENT_BODY_TIMEOUT: Duration = Duration::from_secs(30);
    /// Default of [`http2_max_streams_per_connection`](Self::http2_max_streams_per_connection):
    /// the minimum RFC 9113 §6.5.2 recommends a server allow.
    pub const DEFAULT_HTTP2_MAX_STREAMS: usize = 100;
    /// Default of [`http2_max_connections`](Self::http2_max_connections).
    pub const DEFAULT_HTTP2_MAX_CONNECTIONS: usize = 64;
    /// Default of [`pool_acquire_timeout`](Self::pool_acquire_timeout).
    pub const DEFAULT_POOL_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);
    /// Default of [`upgrade_idle_timeout`](Self::upgrade_idle_timeout).
    pub const DEFAULT_UPGRADE_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

    /// Time allowed to open a TCP connection (default 5 s, nginx's `proxy_connect_timeout`
    /// is 60 s; a proxy in front of local instances wants it short).
    pub fn connect_timeout(mut self, t: Duration) -> Self {
        self.connect_timeout = Some(t);
        self
    }

    /// No connect timeout: only the operating system ends a connect attempt.
    pub fn without_connect_timeout(mut self) -> Self {
        self.connect_timeout = None;
        self
    }

    /// Time the upstream may stay silent before it is treated as hung
    /// ([`ForwardError::ResponseTimeout`], 504): from sending the request — restarted
    /// whenever the upstream takes a chunk of the request body — until the response
    /// headers arrive (default 60 s, nginx's `proxy_read_timeout`). The response body may
    /// take longer. Keep it above the client-body timeout, so that a stalled client is
    /// reported as the client's fault first.
    pub fn response_timeout(mut self, t: Duration) -> Self {
        self.opts.response_timeout = Some(t);
        self
    }

    /// No response timeout: a hung upstream holds the request until the connection breaks.
    pub fn without_response_timeout(mut self) -> Self {
        self.opts.response_timeout = None;
        self
    }

    /// Time the client may send no request-body data
    /// ([`ForwardError::ClientBodyTimeout`], 408; default 30 s). Applies when the request
    /// carries no [`BodyLimits`](super::BodyLimits) extension; [`crate::server`] inserts
    /// one from its configuration.
    pub fn client_body_timeout(mut self, t: Duration) -> Self {
        self.opts.client_body_timeout = Some(t);
        self
    }

    /// No client-body timeout (unless the request carries a
    /// [`BodyLimits`](super::BodyLimits)).
    pub fn without_client_body_timeout(mut self) -> Self {
        self.opts.client_body_timeout = None;
        self
    }

    /// How long an idle pooled connection is kept (default 90 s); an HTTP/2 connection
    /// no request started on for this long is replaced by a new one.
    pub fn pool_idle_timeout(mut self, t: Duration) -> Self {
        self.pool_idle_timeout = Some(t);
        self
    }

    /// Idle connections kept per upstream (default 256, like a generous nginx `keepalive`).
    pub fn pool_max_idle_per_host(mut self, n: usize) -> Self {
        self.pool_max_idle_per_host = n;
        self
    }

    /// Keep the client's `Host` header (default `true`, as HAProxy and Envoy do). With
    /// `false` the upstream's authority is sent, as nginx's default `$proxy_host`.
    pub fn preserve_host(mut self, yes: bool) -> Self {
        self.opts.preserve_host = yes;
        self
    }

    /// The value of `X-Forwarded-Proto` (default: the request URI's scheme, else `http`).
    /// Set `"https"` when TLS is terminated in front of this service.
    pub fn forwarded_proto(mut self, proto: &'static str) -> Self {
        self.opts.forwarded_proto = Some(HeaderValue::from_static(proto));
        self
    }

    /// Append to an incoming `X-Forwarded-For` (default `true`, nginx's
    /// `$proxy_add_x_forwarded_for`). With `false` an incoming value is replaced, for an
    /// edge proxy that must not trust what clients claim.
    pub fn append_forwarded_for(mut self, yes: bool) -> Self {
        self.opts.append_forwarded_for = yes;
        self
    }

    /// Tunnel HTTP/1.1 upgrades such as WebSocket (default `true`): a request with
    /// `Connection: upgrade` and `Upgrade` keeps both headers, and an upstream's `101` joins
    /// the two connections. With `false` both headers are stripped as hop-by-hop and the
    /// upstream sees a plain request. Only `http://` upstreams are tunnelled.
    pub fn upgrades(mut self, yes: bool) -> Self {
        self.opts.upgrades = yes;
        self
    }

    /// Time an upgraded tunnel may carry no byte in either direction before both sides are
    /// closed (default 60 s, like nginx's `proxy_read_timeout` on a WebSocket).
    pub fn upgrade_idle_timeout(mut self, t: Duration) -> Self {
        self.opts.upgrade_idle_timeout = Some(t);
        self
    }

    /// No idle timeout on upgraded tunnels: a silent tunnel stays open until a side closes.
    pub fn without_upgrade_idle_timeout(mut self) -> Self {
        self.opts.upgrade_idle_timeout = None;
        self
    }

    /// The HTTP version spoken to the upstreams (default [`Protocol::Auto`]: HTTP/1.1 in
    /// cleartext, the upstream's ALPN choice of `h2` or `http/1.1` over TLS).
    /// [`Protocol::Http2`] speaks h2c with prior knowledge to an `http://` upstream (a
    /// gRPC backend) and multiplexes all requests over one connection.
    pub fn protocol(mut self, protocol: Protocol) -> Self {
        self.protocol = protocol;
        self
    }

    /// Shorthand for [`protocol`](Self::protocol)`(Protocol::Http2)` (`true`) or
    /// `(Protocol::Auto)` (`false`).
    pub fn http2_only(self, yes: bool) -> Self {
        self.protocol(if yes { Protocol::Http2 } else { Protocol::Auto })
    }

    /// HTTP/2 `PING` keep-alive (default off): while requests are open on an h2 upstream
    /// connection, a `PING` every `interval`; no answer within `timeout` closes the
    /// connection and fails its requests as [`ForwardError::Transport`] (502), so one
    /// upstream that vanished without closing cannot hold all its requests until the
    /// response timeout. Off by default because gRPC servers answer pings more frequent
    /// than their policy (5 min in grpc-go) with `GOAWAY too_many_pings`. Zero durations
    /// are raised to 1 ms.
    pub fn http2_keep_alive(mut self, interval: Duration, timeout: Duration) -> Self {
        let at_least = |d: Duration| d.max(Duration::from_millis(1));
        self.h2_keep_alive = Some((at_least(interval), at_least(timeout)));
        self
    }

    /// Streams one HTTP/2 upstream connection carries at most (default 100, the minimum
    /// RFC 9113 recommends servers allow; Envoy's `max_concurrent_streams` per upstream
    /// connection). The upstream's own `SETTINGS_MAX_CONCURRENT_STREAMS` applies when it
    /// is lower: it is read from its `SETTINGS` frame (hyper does not expose it to a pool
    /// before a request is sent). When every connection is full another one is opened.
    /// `0` is raised to 1.
    pub fn http2_max_streams_per_connection(mut self, n: usize) -> Self {
        self.h2_max_streams = n.max(1);
        self
    }

    /// HTTP/2 connections per upstream at most (default 64). With all of them full a
    /// request waits for a free stream, at most [`pool_acquire_timeout`](Self::pool_acquire_timeout).
    /// `0` is raised to 1.
    pub fn http2_max_connections(mut self, n: usize) -> Self {
        self.h2_max_connections = n.max(1);
        self
    }

    /// How long a request waits for a free HTTP/2 stream when every connection allowed is
    /// full (default 5 s): past it, [`ForwardError::PoolTimeout`] (503). The response
    /// timeout runs meanwhile too.
    pub fn pool_acquire_timeout(mut self, t: Duration) -> Self {
        self.acquire_timeout = Some(t);
        self
    }

    /// No acquire timeout: a request waits for a free stream as long as the response
    /// timeout allows.
    pub fn without_pool_acquire_timeout(mut self) -> Self {
        self.acquire_timeout = None;
        self
    }

    /// How `https://` upstreams are verified and which client certificate is shown
    /// (default [`ClientTls::webpki_roots`](crate::tls::ClientTls::webpki_roots)). All
    /// upstreams of this builder's `Forward`s ([`Forward::to`] included) share it, and with
    /// it rustls's session cache, so reconnects resume their TLS sessions.
    #[cfg(feature = "tls")]
    pub fn tls(mut self, tls: crate::tls::ClientTls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Builds the service, with a new connection pool.
    pub fn build<B>(self) -> Result<Forward<B>, ForwardError>
    where
        B: http_body::Body + Send + Unpin + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        let upstream = Upstream::parse(&self.upstream)?;
        let pools = Arc::new(Pools::new(PoolConfig {
            connect_timeout: self.connect_timeout,
            protocol: self.protocol,
            h2_keep_alive: self.h2_keep_alive,
            h2_max_streams: self.h2_max_streams,
            h2_max_connections: self.h2_max_connections,
            acquire_timeout: self.acquire_timeout,
            #[cfg(feature = "tls")]
            tls: self.tls,
            idle_timeout: self.pool_idle_timeout.unwrap_or(Duration::from_secs(90)),
            max_idle: self.pool_max_idle_per_host,
        }));
        Ok(Forward {
            pool: pools.host(&upstream)?,
            upstream: Arc::new(upstream),
            pools,
            opts: Arc::new(self.opts),
            forwarded_for: super::forwarded::ForwardedFor::default(),
        })
    }
}

impl ForwardBuilder {
    /// Starts a builder for `upstream` (`http://host:port[/prefix]`).
    pub fn new(upstream: impl Into<String>) -> ForwardBuilder {
        ForwardBuilder {
            upstream: upstream.into(),
            connect_timeout: Some(Self::DEFAULT_CONNECT_TIMEOUT),
            pool_idle_timeout: None,
            pool_max_idle_per_host: 256,
            protocol: Protocol::Auto,
            h2_keep_alive: None,
            h2_max_streams: Self::DEFAULT_HTTP2_MAX_STREAMS,
            h2_max_connections: Self::DEFAULT_HTTP2_MAX_CONNECTIONS,
            acquire_timeout: Some(Self::DEFAULT_POOL_ACQUIRE_TIMEOUT),
            #[cfg(feature = "tls")]
            tls: None,
            opts: Options {
                response_timeout: Some(Self::DEFAULT_RESPONSE_TIMEOUT),
                client_body_timeout: Some(Self::DEFAULT_CLIENT_BODY_TIMEOUT),
                preserve_host: true,
                forwarded_proto: None,
                append_forwarded_for: true,
                upgrades: true,
                upgrade_idle_timeout: Some(Self::DEFAULT_UPGRADE_IDLE_TIMEOUT),
            },
        }
    }
}
