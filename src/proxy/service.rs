use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::{self, HeaderName, HeaderValue};
use http::uri::Scheme;
use http::{HeaderMap, Request, Response, Uri, Version};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use tower_service::Service;

use super::body::{BodyLimits, ClientBody, Progress};
use super::connect::Protocol;
use super::error::ForwardError;
use super::future::ResponseFuture;
use super::h2::{asks_for_trailers, TeTrailers};
use super::headers::strip_hop_by_hop;
use super::pool::{HostPool, PoolConfig, Pools};
use super::upgrade;
use super::upstream::Upstream;
use crate::client_addr::{joined_forwarded_for, ClientAddr};
use crate::BoxError;

// `HeaderName`s, not `&str`s: a custom name given as `&str` is parsed and copied into a
// fresh allocation on every insert (three per request, issue 12's profile).
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

#[derive(Debug, Clone)]
struct Options {
    response_timeout: Option<Duration>,
    /// Used when the request carries no [`BodyLimits`] extension.
    client_body_timeout: Option<Duration>,
    preserve_host: bool,
    forwarded_proto: Option<HeaderValue>,
    append_forwarded_for: bool,
    /// Tunnel HTTP/1.1 upgrades (WebSocket); see [`super::upgrade`].
    upgrades: bool,
    upgrade_idle_timeout: Option<Duration>,
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
    /// carries no [`BodyLimits`] extension; [`crate::server`] inserts one from its
    /// configuration.
    pub fn client_body_timeout(mut self, t: Duration) -> Self {
        self.opts.client_body_timeout = Some(t);
        self
    }

    /// No client-body timeout (unless the request carries [`BodyLimits`]).
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
        })
    }
}

/// A [`Service`] that sends each request to one configured upstream.
///
/// Cloning is cheap and shares the connection pool; [`Forward::to`] makes a `Forward` for
/// another upstream that also shares it.
pub struct Forward<B> {
    pool: Arc<HostPool<ClientBody<B>>>,
    /// This `Forward`'s upstream: its path prefix may differ from the pool's (one pool
    /// per origin).
    upstream: Arc<Upstream>,
    pools: Arc<Pools<ClientBody<B>>>,
    opts: Arc<Options>,
}

impl<B> Clone for Forward<B> {
    fn clone(&self) -> Self {
        Forward {
            pool: self.pool.clone(),
            upstream: self.upstream.clone(),
            pools: self.pools.clone(),
            opts: self.opts.clone(),
        }
    }
}

impl<B> fmt::Debug for Forward<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Forward")
            .field("upstream", &self.upstream)
            .field("opts", &self.opts)
            .finish()
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

impl<B> Forward<B>
where
    B: http_body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    /// A `Forward` with default options for `upstream`.
    pub fn new(upstream: &str) -> Result<Self, ForwardError> {
        ForwardBuilder::new(upstream).build()
    }

    /// The same options and connection pool, another upstream.
    pub fn to(&self, upstream: &str) -> Result<Self, ForwardError> {
        let upstream = Upstream::parse(upstream)?;
        Ok(Forward {
            pool: self.pools.host(&upstream)?,
            upstream: Arc::new(upstream),
            pools: self.pools.clone(),
            opts: self.opts.clone(),
        })
    }

    /// The upstream this service sends to.
    pub fn upstream(&self) -> &Upstream {
        &self.upstream
    }

    /// The connect timeout in effect (`None`: disabled).
    pub fn connect_timeout(&self) -> Option<Duration> {
        self.pools.connect_timeout()
    }

    /// The response timeout in effect (`None`: disabled).
    pub fn response_timeout(&self) -> Option<Duration> {
        self.opts.response_timeout
    }

    /// The client-body timeout used without a [`BodyLimits`] extension (`None`: disabled).
    pub fn client_body_timeout(&self) -> Option<Duration> {
        self.opts.client_body_timeout
    }
}

/// Refuses what a proxy must not pass on: `CONNECT` (this proxy does not tunnel; `501 Not
/// Implemented`, RFC 9110 §15.6.2, rather than nginx's `405`, which would need an `Allow`
/// list of what the upstream accepts), and an ambiguous target (two `Host` headers, or a `Host`
/// that disagrees with an absolute-form request target: RFC 9112 §3.2 answers `400`,
/// because two hops could read two different hosts — a cache-poisoning and routing-bypass
/// vector).
fn check_request(parts: &http::request::Parts) -> Result<(), ForwardError> {
    if parts.method == http::Method::CONNECT {
        return Err(ForwardError::MethodNotSupported {
            method: parts.method.clone(),
        });
    }
    let mut hosts = parts.headers.get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(ForwardError::BadRequest {
            reason: "more than one Host header",
        });
    }
    if let (Some(host), Some(authority)) = (host, parts.uri.authority()) {
        if !host
            .as_bytes()
            .eq_ignore_ascii_case(authority.as_str().as_bytes())
        {
            return Err(ForwardError::BadRequest {
                reason: "Host disagrees with the request target",
            });
        }
    }
    Ok(())
}

fn set_forwarded(opts: &Options, headers: &mut HeaderMap, client: Option<ClientAddr>, uri: &Uri) {
    if let Some(ClientAddr(addr)) = client {
        let mut ip = IpText::default();
        ip.write(addr.ip());
        // Every line of a repeated header counts: reading only the first would drop the
        // hops the others name (RFC 9110 §5.3 combines them with ", ").
        let value = match joined_forwarded_for(headers) {
            Some(mut v) if opts.append_forwarded_for => {
                v.extend_from_slice(b", ");
                v.extend_from_slice(ip.as_bytes());
                // The joined line becomes the value without another copy.
                HeaderValue::from_maybe_shared(bytes::Bytes::from(v)).ok()
            }
            _ => HeaderValue::from_bytes(ip.as_bytes()).ok(),
        };
        if let Some(v) = value {
            headers.insert(X_FORWARDED_FOR, v);
        }
    } else if !opts.append_forwarded_for {
        headers.remove(X_FORWARDED_FOR);
    }
    let proto = match (&opts.forwarded_proto, uri.scheme()) {
        (Some(p), _) => p.clone(),
        (None, Some(s)) if *s == Scheme::HTTPS => HeaderValue::from_static("https"),
        _ => HeaderValue::from_static("http"),
    };
    headers.insert(X_FORWARDED_PROTO, proto);
    let host = match headers.get(header::HOST) {
        Some(h) => Some(h.clone()),
        None => uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok()),
    };
    if let Some(h) = host {
        headers.insert(X_FORWARDED_HOST, h);
    }
}

/// An IP address as text on the stack: `IpAddr::to_string` went through the formatting
/// machinery into a `String` that was then copied again into the header value, once per
/// request. The longest IPv6 text (an IPv4-mapped address) is 45 bytes.
struct IpText {
    buf: [u8; 48],
    len: usize,
}

impl Default for IpText {
    fn default() -> Self {
        IpText {
            buf: [0; 48],
            len: 0,
        }
    }
}

impl IpText {
    fn write(&mut self, ip: std::net::IpAddr) {
        match ip {
            std::net::IpAddr::V4(v4) => {
                for (i, octet) in v4.octets().into_iter().enumerate() {
                    if i > 0 {
                        self.push(b'.');
                    }
                    if octet >= 100 {
                        self.push(b'0' + octet / 100);
                    }
                    if octet >= 10 {
                        self.push(b'0' + octet / 10 % 10);
                    }
                    self.push(b'0' + octet % 10);
                }
            }
            // Rare enough on a proxy's hot path to keep std's canonical (RFC 5952) form.
            std::net::IpAddr::V6(v6) => {
                use std::fmt::Write as _;
                let _ = write!(self, "{v6}");
            }
        }
    }

    fn push(&mut self, b: u8) {
        if let Some(slot) = self.buf.get_mut(self.len) {
            *slot = b;
            self.len += 1;
        }
    }

    fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl std::fmt::Write for IpText {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let end = self.len.checked_add(s.len()).ok_or(std::fmt::Error)?;
        self.buf
            .get_mut(self.len..end)
            .ok_or(std::fmt::Error)?
            .copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

impl<B> Service<Request<B>> for Forward<B>
where
    B: http_body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type Response = Response<Incoming>;
    type Error = ForwardError;
    type Future = ResponseFuture;

    #[inline]
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // The pooled client is always ready; back-pressure belongs to a limit layer.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let (mut parts, body) = req.into_parts();
        if let Err(e) = check_request(&parts) {
            return ResponseFuture::failed(e);
        }
        let uri = match self.upstream.join(parts.uri.path_and_query()) {
            Ok(u) => u,
            Err(e) => return ResponseFuture::failed(e),
        };
        // A real upgrade request whose client connection can be taken over keeps its
        // `Upgrade`/`Connection` headers and goes through the tunnel path.
        let upgrade = match self.opts.upgrades
            && upgrade::requested(&parts.method, parts.version, &parts.headers)
        {
            true => parts.extensions.remove::<OnUpgrade>(),
            false => None,
        };
        // `TE` is hop-by-hop, but a client that takes trailers (gRPC) gets them through
        // Forward, so Forward asks for them on its own hop: HTTP/1.1 servers (hyper's) send
        // trailers only then, and HTTP/2 allows `TE: trailers` alone (see `h2::to_h2`).
        let trailers = asks_for_trailers(&parts.headers);
        if trailers {
            parts.extensions.insert(TeTrailers);
        }
        if upgrade.is_some() {
            upgrade::strip_keeping_upgrade(&mut parts.headers);
        } else {
            strip_hop_by_hop(&mut parts.headers);
        }
        if trailers {
            parts
                .headers
                .insert(header::TE, HeaderValue::from_static("trailers"));
        }
        let client = parts.extensions.get::<ClientAddr>().copied();
        set_forwarded(&self.opts, &mut parts.headers, client, &parts.uri);
        crate::trace::on_upstream_call(
            &mut parts.headers,
            &parts.extensions,
            self.pool.upstream().authority_ref(),
        );
        if !self.opts.preserve_host || !parts.headers.contains_key(header::HOST) {
            // HTTP/2 clients send :authority instead of Host; HTTP/1.1 upstreams need Host.
            let host = match parts.uri.authority() {
                Some(a) if self.opts.preserve_host => HeaderValue::from_str(a.as_str()).ok(),
                _ => self.upstream.host_value(),
            };
            if let Some(h) = host {
                parts.headers.insert(header::HOST, h);
            }
        }
        parts.uri = uri;
        parts.version = Version::HTTP_11;
        let limits = parts
            .extensions
            .get::<BodyLimits>()
            .copied()
            .unwrap_or(BodyLimits {
                max_bytes: None,
                idle_timeout: self.opts.client_body_timeout,
            });
        // Progress is shared only when a body is still to come: a bodiless request pays
        // no allocation for it.
        let progress = match self.opts.response_timeout {
            Some(_) if !body.is_end_stream() => Some(Progress::new()),
            _ => None,
        };
        let body = ClientBody::new(body, limits, progress.clone());
        if let Some(client) = upgrade {
            let call = upgrade::UpgradeCall {
                upstream: (*self.upstream).clone(),
                connector: self.pool.connector().clone(),
                response_timeout: self.opts.response_timeout,
                idle_timeout: self.opts.upgrade_idle_timeout,
                client,
                lease: parts.extensions.remove::<crate::server::ConnectionLease>(),
            };
            let req = Request::from_parts(parts, body);
            return ResponseFuture::boxed(upgrade::forward(call, req));
        }
        ResponseFuture::new(
            self.pool.clone(),
            Request::from_parts(parts, body),
            self.opts.response_timeout,
            progress,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::IpText;
    use std::net::IpAddr;

    #[test]
    fn ip_text_matches_std_display() {
        for ip in [
            "0.0.0.0",
            "127.0.0.1",
            "10.20.100.255",
            "9.99.199.200",
            "::1",
            "2001:db8::8a2e:370:7334",
            "::ffff:255.255.255.255",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            let mut t = IpText::default();
            t.write(ip);
            assert_eq!(t.as_bytes(), ip.to_string().as_bytes());
        }
    }
}
