//! Sibling lookup: on a miss, ask the edge node that owns the key before the origin.
//!
//! **The problem.** With N edge nodes each filling its own store, an object is fetched
//! from the origin up to N times and held N times; a node that just joined (or
//! restarted) sends every request to the origin. The portal document's CDN "looks for
//! missing content on another server" first.
//!
//! [`Sibling`] sits *under* the cache layer (between it and the origin): a `GET` the
//! cache could not answer goes first to the instance owning its key on a consistent-hash
//! ring over the registry's edge instances — the balancer's ketama ring
//! ([`Fleet::owner`]) — so each object has one home node. The request carries
//! `x-cache-sibling` (the hop guard) and `Cache-Control: only-if-cached`: the owner answers
//! from its store or with `504`, never from its origin and never from another sibling.
//! A `504`, an error, or no answer within the sibling timeout (default 300 ms) falls back
//! to the origin. What a sibling sends is stored here like an origin response (its `Age`
//! counts), and marked `x-cache-peer: <owner id>`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{Either, Empty};
use hyper::body::Incoming;
use tower_layer::Layer;
use tower_service::Service;

use super::fleet::Fleet;
use super::purge::Purger;
use super::service::X_CACHE;

/// Hop guard of a sibling lookup (its value: the asking node's id). A request with it is
/// answered from the store or with `504`, never passed on.
pub const X_CACHE_SIBLING: &str = "x-cache-sibling";
/// On a response a sibling served: the id of that sibling.
pub const X_CACHE_PEER: &str = "x-cache-peer";

type KeyFn = dyn Fn(&http::request::Parts) -> String + Send + Sync;

/// The body of a [`Sibling`] response: the origin's, or the sibling's.
pub type SiblingBody<B> = Either<B, Incoming>;

/// Whether a request may only be answered from the store: a sibling lookup
/// (`x-cache-sibling`) or a client's `Cache-Control: only-if-cached` (RFC 9111 §5.2.1.7).
pub(crate) fn only_if_cached(h: &http::HeaderMap) -> bool {
    h.contains_key(X_CACHE_SIBLING)
        || h.get_all(header::CACHE_CONTROL).iter().any(|v| {
            v.as_bytes()
                .split(|b| *b == b',')
                .any(|d| d.trim_ascii().eq_ignore_ascii_case(b"only-if-cached"))
        })
}

/// A response's `Age` (`None` when absent or not a number: unknown, so treated as old).
fn age(h: &http::HeaderMap) -> Option<std::time::Duration> {
    let v = std::str::from_utf8(h.get(header::AGE)?.as_bytes()).ok()?;
    v.trim().parse().ok().map(std::time::Duration::from_secs)
}

/// Makes [`Sibling`]; from [`CacheLayer::siblings`](super::CacheLayer::siblings).
#[derive(Clone)]
pub struct SiblingLayer {
    pub(crate) fleet: Option<Fleet>,
    pub(crate) key: Arc<KeyFn>,
    pub(crate) purger: Arc<Purger>,
}

impl std::fmt::Debug for SiblingLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SiblingLayer")
            .field("fleet", &self.fleet)
            .finish()
    }
}

impl<S> Layer<S> for SiblingLayer {
    type Service = Sibling<S>;
    fn layer(&self, inner: S) -> Sibling<S> {
        Sibling {
            inner,
            fleet: self.fleet.clone(),
            key: self.key.clone(),
            purger: self.purger.clone(),
        }
    }
}

/// Asks the key's owner node before the origin; see the [module docs](self).
#[derive(Clone)]
pub struct Sibling<S> {
    inner: S,
    fleet: Option<Fleet>,
    key: Arc<KeyFn>,
    purger: Arc<Purger>,
}

impl<S: std::fmt::Debug> std::fmt::Debug for Sibling<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sibling")
            .field("inner", &self.inner)
            .field("fleet", &self.fleet)
            .finish()
    }
}

/// Headers not copied to a sibling request: hop-by-hop ones, and what a cache-only
/// lookup must not carry.
const NOT_COPIED: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
    "expect",
];

/// The request to send to the owner, or `None` when this request must not be asked of a
/// sibling: not a `GET`, already a sibling's, with credentials (never shared), or a
/// revalidation (carries validators: the origin must judge it).
fn sibling_request(parts: &http::request::Parts, me: &str) -> Option<Request<Empty<Bytes>>> {
    let h = &parts.headers;
    if parts.method != Method::GET
        || h.contains_key(X_CACHE_SIBLING)
        || h.contains_key(header::AUTHORIZATION)
        || h.contains_key(header::IF_NONE_MATCH)
        || h.contains_key(header::IF_MODIFIED_SINCE)
    {
        return None;
    }
    let mut req = Request::new(Empty::new());
    *req.uri_mut() = parts.uri.path_and_query()?.as_str().parse().ok()?;
    let out = req.headers_mut();
    for (name, value) in h {
        if !NOT_COPIED.contains(&name.as_str()) {
            out.append(name.clone(), value.clone());
        }
    }
    // The owner computes the same key: give it the authority the key was made from.
    if let Some(a) = parts.uri.authority() {
        out.insert(header::HOST, HeaderValue::from_str(a.as_str()).ok()?);
    }
    out.append(
        header::CACHE_CONTROL,
        HeaderValue::from_static("only-if-cached"),
    );
    out.insert(X_CACHE_SIBLING, HeaderValue::from_str(me).ok()?);
    Some(req)
}

impl<S, B, ResB> Service<Request<B>> for Sibling<S>
where
    S: Service<Request<B>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
    ResB: Body<Data = Bytes> + Send + 'static,
{
    type Response = Response<SiblingBody<ResB>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        // The service made ready by `poll_ready` goes with this call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let (parts, body) = req.into_parts();
        let ask = self
            .fleet
            .as_ref()
            .filter(|f| f.inner.sibling)
            .and_then(|f| {
                let key = (self.key)(&parts);
                let owner = f.owner(&key)?;
                let req = sibling_request(&parts, f.self_id())?;
                Some((f.clone(), owner, req, key))
            });
        let purger = self.purger.clone();
        Box::pin(async move {
            if let Some((fleet, owner, sreq, key)) = ask {
                match fleet.send(&owner, sreq, fleet.inner.sibling_timeout).await {
                    // The owner may not have applied a purge applied here: its older
                    // copy would undo it.
                    Ok(res)
                        if purger.sibling_copy_is_purged(
                            &key,
                            res.headers(),
                            age(res.headers()),
                        ) =>
                    {
                        tracing::debug!(
                            peer = owner.id,
                            key,
                            "sibling copy predates a purge; asking the origin"
                        );
                    }
                    Ok(mut res)
                        if res.status() != StatusCode::GATEWAY_TIMEOUT
                            && res.headers().contains_key(X_CACHE) =>
                    {
                        if let Ok(v) = HeaderValue::from_str(&owner.id) {
                            res.headers_mut().insert(X_CACHE_PEER, v);
                        }
                        return Ok(res.map(Either::Right));
                    }
                    Ok(res) => {
                        tracing::debug!(peer = owner.id, status = %res.status(), "sibling miss; asking the origin");
                    }
                    Err(e) => {
                        tracing::debug!(peer = owner.id, error = %e, "sibling lookup failed; asking the origin");
                    }
                }
            }
            let res = inner.call(Request::from_parts(parts, body)).await?;
            Ok(res.map(Either::Left))
        })
    }
}
