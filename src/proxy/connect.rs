//! Opening one upstream connection: TCP, then TLS for `https://` upstreams, then the HTTP/1.1
//! or HTTP/2 handshake, all within the connect timeout.
//!
//! Which HTTP version a connection speaks is decided here, once per connection: the
//! configured [`Protocol`], and on TLS what the upstream picked by ALPN.

use std::net::SocketAddr;
use std::time::Duration;

use hyper::client::conn::{http1, http2};
use hyper::rt::{Read, Write};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::Notify;

use super::error::ForwardError;
use super::h2wire::{Counted, Streams};
use super::upstream::Upstream;
use crate::classify::is_local_resource_error;
use crate::server::SmallWrites;
use crate::BoxError;

/// The HTTP version `Forward` speaks to its upstreams.
///
/// | | `http://` upstream | `https://` upstream |
/// |---|---|---|
/// | [`Auto`](Protocol::Auto) (default) | HTTP/1.1 | ALPN offers `h2` and `http/1.1`; the upstream picks |
/// | [`Http1`](Protocol::Http1) | HTTP/1.1 | ALPN `http/1.1` only |
/// | [`Http2`](Protocol::Http2) | h2c with prior knowledge (RFC 9113 §3.3) | ALPN `h2` only |
///
/// HTTP/2 multiplexes every request of a `Forward`'s upstream over one connection (opened
/// once, replaced when it closes); HTTP/1.1 uses the keep-alive pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Protocol {
    /// HTTP/1.1 in cleartext, ALPN's choice over TLS.
    #[default]
    Auto,
    /// Always HTTP/1.1.
    Http1,
    /// Always HTTP/2 (h2c prior knowledge in cleartext, e.g. a gRPC backend).
    Http2,
}

/// An open connection, ready to send.
pub(crate) enum Conn<B> {
    H1(http1::SendRequest<B>),
    /// With the stream count its byte stream reports to (see `h2pool`).
    H2(http2::SendRequest<B>, std::sync::Arc<Streams>),
}

/// Everything needed to open connections to one upstream; shared by the pool's
/// single-flight HTTP/2 connect, hence owned.
pub(crate) struct Connector {
    /// `host:port` (the label in errors).
    label: String,
    /// What to dial: `host:port` with the scheme's default port filled in.
    target: String,
    addr: Option<SocketAddr>,
    timeout: Option<Duration>,
    protocol: Protocol,
    /// HTTP/2 `PING` every `.0` while streams are open; no answer within `.1` closes the
    /// connection.
    h2_keep_alive: Option<(Duration, Duration)>,
    #[cfg(feature = "tls")]
    tls: Option<TlsTarget>,
    /// The same TLS client offering only `http/1.1`: an upgrade (WebSocket) needs an
    /// HTTP/1.1 connection, which an upstream choosing h2 by ALPN would not give.
    #[cfg(feature = "tls")]
    tls_h1: Option<TlsTarget>,
    /// Woken when a stream of one of this upstream's HTTP/2 connections closes: requests
    /// waiting for a free stream re-check.
    h2_freed: std::sync::Arc<Notify>,
}

#[cfg(feature = "tls")]
struct TlsTarget {
    connector: tokio_rustls::TlsConnector,
    /// SNI and the name the certificate must carry; an IP address sends no SNI and is
    /// checked against the certificate's IP SANs (rustls does both from the variant).
    name: rustls_pki_types::ServerName<'static>,
}

impl Connector {
    /// `tls`: the shared client configuration, required for `https://` (the pool makes
    /// the default one when none was configured).
    pub(crate) fn new(
        upstream: &Upstream,
        timeout: Option<Duration>,
        protocol: Protocol,
        h2_keep_alive: Option<(Duration, Duration)>,
        #[cfg(feature = "tls")] tls: Option<&crate::tls::ClientTls>,
    ) -> Result<Self, ForwardError> {
        let target = upstream.dial_target();
        #[cfg(feature = "tls")]
        let (tls, tls_h1) = match (upstream.is_https(), tls) {
            (true, Some(tls)) => (
                Some(tls_target(upstream, tls, protocol)?),
                Some(tls_target(upstream, tls, Protocol::Http1)?),
            ),
            (true, None) => {
                return Err(ForwardError::InvalidUpstream {
                    uri: upstream.to_string(),
                    reason: "https:// upstream without a TLS configuration",
                })
            }
            (false, _) => (None, None),
        };
        Ok(Connector {
            label: upstream.authority().to_string(),
            addr: target.parse().ok(),
            target,
            timeout,
            protocol,
            h2_keep_alive,
            #[cfg(feature = "tls")]
            tls,
            #[cfg(feature = "tls")]
            tls_h1,
            h2_freed: std::sync::Arc::new(Notify::new()),
        })
    }

    /// A connection of its own for an HTTP/1.1 upgrade (a WebSocket tunnel), within the
    /// connect timeout: TCP, TLS offering only `http/1.1` for an `https://` upstream, and
    /// an HTTP/1 handshake that allows the upgrade. Never pooled: once upgraded it is no
    /// longer HTTP.
    pub(crate) async fn connect_for_upgrade<B>(&self) -> Result<http1::SendRequest<B>, ForwardError>
    where
        B: http_body::Body + Send + Unpin + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        self.within_timeout(async {
            let stream = self.tcp().await?;
            #[cfg(feature = "tls")]
            if let Some(tls) = &self.tls_h1 {
                let stream = tls
                    .connector
                    .connect(tls.name.clone(), stream)
                    .await
                    .map_err(|e| tls_error(self.label.clone(), e))?;
                return self.handshake_for_upgrade(TokioIo::new(stream)).await;
            }
            self.handshake_for_upgrade(TokioIo::new(stream)).await
        })
        .await
    }

    async fn handshake_for_upgrade<T, B>(
        &self,
        io: T,
    ) -> Result<http1::SendRequest<B>, ForwardError>
    where
        T: Read + Write + Unpin + Send + 'static,
        B: http_body::Body + Send + Unpin + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        let (tx, conn) = http1::handshake(io)
            .await
            .map_err(|e| ForwardError::Connect {
                upstream: self.label.clone(),
                source: Box::new(e),
            })?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upgrade connection ended with an error");
            }
        });
        Ok(tx)
    }

    /// Woken when a stream of an HTTP/2 connection to this upstream closes.
    pub(crate) fn h2_freed(&self) -> &std::sync::Arc<Notify> {
        &self.h2_freed
    }

    /// Whether this upstream may answer in HTTP/2 (decides the pool's first path).
    pub(crate) fn may_be_h2(&self) -> bool {
        match self.protocol {
            Protocol::Http2 => true,
            Protocol::Http1 => false,
            #[cfg(feature = "tls")]
            Protocol::Auto => self.tls.is_some(),
            #[cfg(not(feature = "tls"))]
            Protocol::Auto => false,
        }
    }

    /// Whether requests to this upstream can take the lean HTTP/1 path (`h1`): cleartext
    /// HTTP/1.1 only.
    pub(crate) fn is_plain_http1(&self) -> bool {
        #[cfg(feature = "tls")]
        if self.tls.is_some() {
            return false;
        }
        self.protocol != Protocol::Http2
    }

    /// A TCP connection alone, within the connect timeout (the lean HTTP/1 path speaks
    /// HTTP on it itself).
    pub(crate) async fn connect_tcp(&self) -> Result<TcpStream, ForwardError> {
        self.within_timeout(self.tcp()).await
    }

    /// Opens a connection within the connect timeout (TCP, TLS and the HTTP handshake
    /// together: a TLS upstream that accepts and then stalls is a connect timeout too).
    pub(crate) async fn connect<B>(&self) -> Result<Conn<B>, ForwardError>
    where
        B: http_body::Body + Send + Unpin + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        self.within_timeout(self.open()).await
    }

    /// `open` bounded by the connect timeout: past it, a `ConnectTimeout`.
    async fn within_timeout<T>(
        &self,
        open: impl std::future::Future<Output = Result<T, ForwardError>>,
    ) -> Result<T, ForwardError> {
        match self.timeout {
            None => open.await,
            Some(after) => match tokio::time::timeout(after, open).await {
                Ok(res) => res,
                Err(_) => Err(ForwardError::ConnectTimeout {
                    upstream: self.label.clone(),
                }),
            },
        }
    }

    /// The TCP connection to the upstream, `TCP_NODELAY` set.
    async fn tcp(&self) -> Result<TcpStream, ForwardError> {
        let stream = match self.addr {
            Some(addr) => TcpStream::connect(addr).await,
            None => TcpStream::connect(self.target.as_str()).await,
        }
        .map_err(|e| connect_error(self.label.clone(), e))?;
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }

    async fn open<B>(&self) -> Result<Conn<B>, ForwardError>
    where
        B: http_body::Body + Send + Unpin + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        let stream = self.tcp().await?;
        #[cfg(feature = "tls")]
        if let Some(tls) = &self.tls {
            let stream = tls
                .connector
                .connect(tls.name.clone(), stream)
                .await
                .map_err(|e| tls_error(self.label.clone(), e))?;
            let h2 = match stream.get_ref().1.alpn_protocol() {
                Some(b"h2") => true,
                Some(_) => false,
                // No ALPN answer: only an explicit HTTP/2 configuration dares h2.
                None => self.protocol == Protocol::Http2,
            };
            return self.handshake(stream, h2).await;
        }
        let h2 = self.protocol == Protocol::Http2;
        self.handshake(stream, h2).await
    }

    async fn handshake<S, B>(&self, stream: S, h2: bool) -> Result<Conn<B>, ForwardError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        B: http_body::Body + Send + Unpin + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        let failed = |e: hyper::Error| ForwardError::Connect {
            upstream: self.label.clone(),
            source: Box::new(e),
        };
        if h2 {
            let mut builder = http2::Builder::new(TokioExecutor::new());
            if let Some((interval, timeout)) = self.h2_keep_alive {
                builder
                    .timer(TokioTimer::new())
                    .keep_alive_interval(interval)
                    .keep_alive_timeout(timeout);
            }
            let streams = Streams::new(self.h2_freed.clone());
            let io = TokioIo::new(Counted::new(stream, streams.clone()));
            let (tx, conn) = builder.handshake(io).await.map_err(failed)?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "upstream HTTP/2 connection ended with an error");
                }
            });
            // The upstream's first SETTINGS carries its stream limit: without it a burst
            // would overfill this connection before the limit is known.
            streams.settled().await;
            return Ok(Conn::H2(tx, streams));
        }
        // Small requests leave as one `send`, not a `writev` (see `server::SmallWrites`).
        let (mut tx, conn) = http1::handshake(TokioIo::new(SmallWrites::new(stream)))
            .await
            .map_err(failed)?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream connection ended with an error");
            }
        });
        // hyper refuses a request on a connection that has not signalled readiness yet.
        tx.ready().await.map_err(failed)?;
        Ok(Conn::H1(tx))
    }
}

#[cfg(feature = "tls")]
fn tls_target(
    upstream: &Upstream,
    tls: &crate::tls::ClientTls,
    protocol: Protocol,
) -> Result<TlsTarget, ForwardError> {
    let alpn: &[&[u8]] = match protocol {
        Protocol::Auto => &[b"h2", b"http/1.1"],
        Protocol::Http1 => &[b"http/1.1"],
        Protocol::Http2 => &[b"h2"],
    };
    let name =
        rustls_pki_types::ServerName::try_from(upstream.host().to_string()).map_err(|_| {
            ForwardError::InvalidUpstream {
                uri: upstream.to_string(),
                reason: "the host is no valid TLS server name",
            }
        })?;
    Ok(TlsTarget {
        connector: tokio_rustls::TlsConnector::from(tls.with_alpn(alpn)),
        name,
    })
}

/// A failed TLS handshake, with the `rustls::Error` as the source when there is one (a
/// certificate that does not verify, an alert from the upstream).
#[cfg(feature = "tls")]
fn tls_error(upstream: String, e: std::io::Error) -> ForwardError {
    if is_local_resource_error(&e) {
        return ForwardError::LocalResource {
            upstream,
            source: e,
        };
    }
    let source: BoxError = if e.get_ref().is_some_and(|inner| inner.is::<rustls::Error>()) {
        e.into_inner()
            .unwrap_or_else(|| "TLS handshake failed".into())
    } else {
        Box::new(e)
    };
    ForwardError::Tls { upstream, source }
}

/// The alert in `e`'s chain when it is one the upstream sends only to refuse a handshake
/// (a missing or rejected client certificate, no common parameters). With TLS 1.3 the
/// client finishes its side first, so a server that refuses our client certificate says
/// so only when the request's answer is read; it never processed the request.
#[cfg(feature = "tls")]
pub(crate) fn handshake_refused(e: &(dyn std::error::Error + 'static)) -> Option<rustls::Error> {
    use rustls::AlertDescription as A;
    let mut cur = Some(e);
    while let Some(s) = cur {
        // `io::Error::source` skips the error it wraps: look inside.
        let inner = s
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .map(|i| i as &(dyn std::error::Error + 'static));
        let found = s
            .downcast_ref::<rustls::Error>()
            .or_else(|| inner.and_then(|i| i.downcast_ref::<rustls::Error>()));
        if let Some(err) = found {
            let refused = matches!(
                err,
                rustls::Error::AlertReceived(
                    A::CertificateRequired
                        | A::BadCertificate
                        | A::UnsupportedCertificate
                        | A::CertificateRevoked
                        | A::CertificateExpired
                        | A::CertificateUnknown
                        | A::UnknownCA
                        | A::AccessDenied
                        | A::HandshakeFailure
                )
            );
            return refused.then(|| err.clone());
        }
        cur = s.source();
    }
    None
}

/// The error of a failed TCP connect: the proxy's own resource exhaustion is not the
/// upstream's fault ([`ForwardError::LocalResource`]); a timeout reported by the OS is a
/// connect timeout; anything else a refused/unreachable upstream.
pub(crate) fn connect_error(upstream: String, e: std::io::Error) -> ForwardError {
    if is_local_resource_error(&e) {
        ForwardError::LocalResource {
            upstream,
            source: e,
        }
    } else if e.kind() == std::io::ErrorKind::TimedOut {
        ForwardError::ConnectTimeout { upstream }
    } else {
        ForwardError::Connect {
            upstream,
            source: Box::new(e),
        }
    }
}
