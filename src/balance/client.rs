//! Peer-to-peer (client-side) balancing: the seed's `balancedRequest`.
//!
//! The caller holds the server list and rotates over it itself, with no proxy in between.
//! [`balanced`] wraps one pooled hyper client in a [`Balance`] of [`Origin`]s, so every
//! picker, passive health and retry-next of the balancer apply on the client side too.

use std::fmt;
use std::task::{Context, Poll};

use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::{Client, ResponseFuture};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tower_service::Service;

use super::service::{Balance, BalanceBuilder, MakeGate};
use crate::classify::Classify;

/// A server URI could not be used as an [`Origin`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid server {uri:?}: expected http://host:port")]
pub struct InvalidServer {
    /// The URI as given.
    pub uri: String,
}

/// Sends requests to one server: the request's path and query go to `http://host:port`.
pub struct Origin<B> {
    client: Client<HttpConnector, B>,
    scheme: Scheme,
    authority: Authority,
}

impl<B> Clone for Origin<B> {
    fn clone(&self) -> Self {
        Origin {
            client: self.client.clone(),
            scheme: self.scheme.clone(),
            authority: self.authority.clone(),
        }
    }
}

impl<B> fmt::Debug for Origin<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Origin({}://{})", self.scheme, self.authority)
    }
}

impl<B> Origin<B>
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
{
    /// An origin for `server` (`http://host:port`) over `client` (shared pool).
    pub fn new(client: Client<HttpConnector, B>, server: &str) -> Result<Self, InvalidServer> {
        let bad = || InvalidServer {
            uri: server.to_string(),
        };
        let uri: Uri = server.parse().map_err(|_| bad())?;
        let scheme = uri.scheme().cloned().ok_or_else(bad)?;
        if scheme != Scheme::HTTP {
            return Err(bad());
        }
        let authority = uri.authority().cloned().ok_or_else(bad)?;
        Ok(Origin {
            client,
            scheme,
            authority,
        })
    }
}

impl<B> Service<Request<B>> for Origin<B>
where
    B: http_body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = Response<Incoming>;
    type Error = hyper_util::client::legacy::Error;
    type Future = ResponseFuture;

    #[inline]
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<B>) -> ResponseFuture {
        let pq = req
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(self.authority.clone());
        parts.path_and_query = Some(pq);
        if let Ok(uri) = Uri::from_parts(parts) {
            *req.uri_mut() = uri;
        }
        // Host follows the server actually called (hyper sets it from the URI when absent).
        req.headers_mut().remove(http::header::HOST);
        self.client.request(req)
    }
}

/// A pooled HTTP/1.1 client suitable for [`Origin`]s.
pub fn http_client<B>() -> Client<HttpConnector, B>
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
{
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.set_connect_timeout(Some(std::time::Duration::from_secs(2)));
    Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .build(http)
}

/// The seed's `balancedRequest`: a [`Balance`] over `servers` (`http://host:port`), keyed
/// by the server string, sharing one connection pool.
///
/// ```no_run
/// use tower::ServiceExt;
/// use tower_patterns::balance::{client, Balance};
///
/// # async fn run() -> Result<(), tower_patterns::BoxError> {
/// let servers = ["http://127.0.0.1:9081", "http://127.0.0.1:9082"];
/// let request = client::balanced::<http_body_util::Empty<bytes::Bytes>, _, _>(
///     Balance::builder(),
///     servers,
/// )?;
/// for _ in 0..10 {
///     let res = request.clone().oneshot(http::Request::get("/").body(Default::default())?).await?;
///     println!("{}", res.status());
/// }
/// # Ok(()) }
/// ```
pub fn balanced<B, C, M>(
    builder: BalanceBuilder<String, C, M>,
    servers: impl IntoIterator<Item = impl AsRef<str>>,
) -> Result<Balance<String, Origin<B>, M, C>, InvalidServer>
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    C: Classify,
    M: MakeGate<String>,
{
    let client = http_client::<B>();
    let mut list = Vec::new();
    for s in servers {
        let s = s.as_ref();
        list.push((s.to_string(), Origin::new(client.clone(), s)?));
    }
    Ok(builder.build_static(list))
}
