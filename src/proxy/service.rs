//! [`Forward`] itself: the request path from a client's request to the upstream's response
//! (checks, hop-by-hop stripping, forwarded headers, body limits, the pool, upgrades).
//! Its settings are in `builder.rs`, the `X-Forwarded-*` writing in `forwarded.rs`.

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::{self, HeaderValue};
use http::{Request, Response, Version};
use hyper::upgrade::OnUpgrade;
use tower_service::Service;

use super::body::{BodyLimits, ClientBody, Progress};
use super::builder::{ForwardBuilder, Options};
use super::error::ForwardError;
use super::forwarded::{set_forwarded, ForwardedFor};
use super::future::ResponseFuture;
use super::h2::{asks_for_trailers, TeTrailers};
use super::headers::{strip_present, Seen, TE_BIT, UPGRADE_BIT};
use super::pool::{HostPool, Pools};
use super::response_body::ForwardBody;
use super::upgrade;
use super::upstream::Upstream;
use crate::client_addr::ClientAddr;
use crate::BoxError;

/// A [`Service`] that sends each request to one configured upstream.
///
/// Cloning is cheap and shares the connection pool; [`Forward::to`] makes a `Forward` for
/// another upstream that also shares it.
pub struct Forward<B> {
    pub(super) pool: Arc<HostPool<ClientBody<B>>>,
    /// This `Forward`'s upstream: its path prefix may differ from the pool's (one pool
    /// per origin).
    pub(super) upstream: Arc<Upstream>,
    pub(super) pools: Arc<Pools<ClientBody<B>>>,
    pub(super) opts: Arc<Options>,
    /// The last client's `X-Forwarded-For` value (see `forwarded::ForwardedFor`).
    pub(super) forwarded_for: ForwardedFor,
}

impl<B> Clone for Forward<B> {
    fn clone(&self) -> Self {
        Forward {
            pool: self.pool.clone(),
            upstream: self.upstream.clone(),
            pools: self.pools.clone(),
            opts: self.opts.clone(),
            forwarded_for: self.forwarded_for.clone(),
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
            forwarded_for: ForwardedFor::default(),
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
fn check_request(parts: &http::request::Parts, seen: &Seen) -> Result<(), ForwardError> {
    if parts.method == http::Method::CONNECT {
        return Err(ForwardError::MethodNotSupported {
            method: parts.method.clone(),
        });
    }
    if seen.hosts > 1 {
        return Err(ForwardError::BadRequest {
            reason: "more than one Host header",
        });
    }
    if let (Some(host), Some(authority)) = (&seen.host, parts.uri.authority()) {
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

impl<B> Service<Request<B>> for Forward<B>
where
    B: http_body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type Response = Response<ForwardBody>;
    type Error = ForwardError;
    type Future = ResponseFuture;

    #[inline]
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // The pooled client is always ready; back-pressure belongs to a limit layer.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let (mut parts, body) = req.into_parts();
        // One pass over the fields answers the questions below (see `Seen`).
        let seen = Seen::scan(&parts.headers);
        if let Err(e) = check_request(&parts, &seen) {
            return ResponseFuture::failed(e);
        }
        let uri = match self.upstream.join(parts.uri.path_and_query()) {
            Ok(u) => u,
            Err(e) => return ResponseFuture::failed(e),
        };
        // A real upgrade request whose client connection can be taken over keeps its
        // `Upgrade`/`Connection` headers and goes through the tunnel path.
        let upgrade = match self.opts.upgrades
            && seen.hop & UPGRADE_BIT != 0
            && upgrade::requested(&parts.method, parts.version, &parts.headers)
        {
            true => parts.extensions.remove::<OnUpgrade>(),
            false => None,
        };
        // `TE` is hop-by-hop, but a client that takes trailers (gRPC) gets them through
        // Forward, so Forward asks for them on its own hop: HTTP/1.1 servers (hyper's) send
        // trailers only then, and HTTP/2 allows `TE: trailers` alone (see `h2::to_h2`).
        let trailers = seen.hop & TE_BIT != 0 && asks_for_trailers(&parts.headers);
        if trailers {
            parts.extensions.insert(TeTrailers);
        }
        if upgrade.is_some() {
            upgrade::strip_keeping_upgrade(&mut parts.headers);
        } else {
            strip_present(&mut parts.headers, seen.hop);
        }
        if trailers {
            parts
                .headers
                .insert(header::TE, HeaderValue::from_static("trailers"));
        }
        let client = parts.extensions.get::<ClientAddr>().copied();
        set_forwarded(
            &self.opts,
            &mut self.forwarded_for,
            &mut parts.headers,
            client,
            &parts.uri,
            &seen,
        );
        crate::trace::on_upstream_call(
            &mut parts.headers,
            &parts.extensions,
            self.pool.upstream().authority_ref(),
        );
        // `Host` is protected from `Connection`, so what the scan saw is still there.
        if !self.opts.preserve_host || seen.hosts == 0 {
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
        // Nothing below reads the server's `ClientAddr`: its map goes back to the server
        // for the next request when it holds nothing else (see `client_addr`).
        crate::client_addr::recycle(&mut parts.extensions);
        ResponseFuture::new(
            self.pool.clone(),
            Request::from_parts(parts, body),
            self.opts.response_timeout,
            progress,
        )
    }
}
