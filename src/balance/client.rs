//! Peer-to-peer (client-side) balancing: the seed's `balancedRequest`.
//!
//! The caller holds the server list and rotates over it itself, with no proxy in between.
//! [`balanced`] puts [`Origin`]s sharing one [`Forward`](crate::proxy::Forward) pool set in a [`Balance`], so every
//! picker, passive health and retry-next of the balancer apply on the client side too.

use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::builder::BalanceBuilder;
use super::service::{Balance, MakeGate};
use crate::classify::Classify;
use crate::proxy::ForwardBuilder;
use crate::BoxError;

/// A server URI could not be used as an [`Origin`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid server {uri:?}: expected http://host:port")]
pub struct InvalidServer {
    /// The URI as given.
    pub uri: String,
}

/// Sends requests to one server: [`Forward`](crate::proxy::Forward) with `Host` set to
/// the server called, so the client side uses the same keep-alive pool (and the same typed
/// errors, classification and retry rules) as the proxy side.
pub type Origin<B> = crate::proxy::Forward<B>;

/// A plain pooled HTTP/1.1 client (hyper-util's), for callers that need one besides the
/// balanced [`Origin`]s, such as health checks.
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
    B: http_body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
    C: Classify,
    M: MakeGate<String>,
{
    let mut template: Option<Origin<B>> = None;
    let mut list = Vec::new();
    for s in servers {
        let s = s.as_ref();
        let bad = |_| InvalidServer { uri: s.to_string() };
        if !s.starts_with("http://") {
            return Err(InvalidServer { uri: s.to_string() });
        }
        // The first server makes the pool set; the others share it.
        let origin = match &template {
            Some(t) => t.to(s).map_err(bad)?,
            None => ForwardBuilder::new(s)
                .preserve_host(false)
                .connect_timeout(std::time::Duration::from_secs(2))
                .build::<B>()
                .map_err(bad)?,
        };
        template.get_or_insert_with(|| origin.clone());
        list.push((s.to_string(), origin));
    }
    Ok(builder.build_static(list))
}
