use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{Either, Full};
use tower_service::Service;

use super::chain_future::ChainFuture;
use super::future::LinkFuture;
use super::hops::{ChainHops, Hop, HopResult, LinkName};
use crate::body::replay::{buffer_request, try_clone_request};
use crate::body::ReplayBody;
use crate::classify::{Classify, Condition};
use crate::BoxError;

/// The default hop-count request header.
pub(crate) const DEFAULT_HOP_HEADER: &str = "x-chain-hops";

/// The response body of a [`Chain`]: the links' body, or a short text body the chain wrote
/// itself (`508`, `502`, `504`, `400`). No boxing: an enum of the two.
pub type ChainBody<B> = Either<B, Full<Bytes>>;

/// Settings of one link, shared by every clone of a [`Link`].
#[derive(Clone)]
pub(crate) struct LinkPolicy<C> {
    pub(crate) classify: C,
    pub(crate) non_idempotent: bool,
    pub(crate) primary_name: LinkName,
    pub(crate) next_name: LinkName,
    pub(crate) drain_limit: u64,
    pub(crate) drain_timeout: Duration,
}

/// Settings of the chain's edge.
#[derive(Clone, Debug)]
pub(crate) struct ChainConfig {
    pub(crate) replay_limit: usize,
    pub(crate) hop_header: HeaderName,
    pub(crate) max_hops: u32,
    pub(crate) report_header: Option<HeaderName>,
    /// Trail name of the inner service when it reports no trail itself (a link table host
    /// without a link).
    pub(crate) entry_name: Option<LinkName>,
}

/// Request extension telling the links which header counts hops, when it is not the
/// default one.
#[derive(Clone, Debug)]
pub(crate) struct HopHeader(pub(crate) HeaderName);

/// A link with its fallback: sends the request to the primary service and, when the
/// condition matches its answer, to the next one. See [`LinkLayer`](super::LinkLayer).
///
/// Takes requests whose body is a [`ReplayBody`] (put in place by [`Chain`]); the
/// response type of both services must be the same (box them with
/// [`body::boxed`](crate::body::boxed) when they differ). Errors are wrapped in a
/// [`ChainError`](super::ChainError) that carries the trail.
pub struct Link<S, N, C = Arc<Condition>> {
    primary: S,
    next: Arc<N>,
    policy: Arc<LinkPolicy<C>>,
}

impl<S, N, C> Link<S, N, C> {
    pub(crate) fn from_parts(primary: S, next: Arc<N>, policy: Arc<LinkPolicy<C>>) -> Self {
        Link {
            primary,
            next,
            policy,
        }
    }

    /// The primary service.
    pub fn get_ref(&self) -> &S {
        &self.primary
    }

    /// The primary service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.primary
    }

    /// Consumes the link, returning the primary service.
    pub fn into_inner(self) -> S {
        self.primary
    }

    /// The next link.
    pub fn next_ref(&self) -> &N {
        &self.next
    }
}

impl<S: Clone, N, C> Clone for Link<S, N, C> {
    fn clone(&self) -> Self {
        Link {
            primary: self.primary.clone(),
            next: self.next.clone(),
            policy: self.policy.clone(),
        }
    }
}

impl<S: fmt::Debug, N: fmt::Debug, C> fmt::Debug for Link<S, N, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Link")
            .field("primary", &self.primary)
            .field("next", &self.next)
            .field("primary_name", &self.policy.primary_name)
            .field("next_name", &self.policy.next_name)
            .finish()
    }
}

impl<S, N, C, B, RB> Service<Request<ReplayBody<B>>> for Link<S, N, C>
where
    S: Service<Request<ReplayBody<B>>, Response = Response<RB>>,
    S::Error: Into<BoxError>,
    N: Service<Request<ReplayBody<B>>, Response = Response<RB>> + Clone,
    N::Error: Into<BoxError>,
    C: Classify,
    RB: Body + Send + 'static,
{
    type Response = Response<RB>;
    type Error = super::ChainError;
    type Future = LinkFuture<S::Future, N, C, B>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Only the primary: the next link is cloned and made ready if a hop happens.
        self.primary.poll_ready(cx).map_err(|e| {
            let e: BoxError = e.into();
            // A nested link's readiness error is already a ChainError: pass it on.
            let e = match e.downcast::<super::ChainError>() {
                Ok(ce) => return *ce,
                Err(e) => e,
            };
            let kind = crate::classify::error_kind(&*e);
            let hop = Hop::new(self.policy.primary_name.clone(), HopResult::Error(kind));
            let mut hops = ChainHops::new(hop);
            hops.settled = true;
            super::ChainError::new(hops, e)
        })
    }

    fn call(&mut self, req: Request<ReplayBody<B>>) -> Self::Future {
        let classifier = self.policy.classify.classify_request(&req);
        let idempotent = req.method().is_idempotent();
        // The copy for the next link; None when the body went over the replay limit.
        let spare = try_clone_request(&req);
        let fut = self.primary.call(req);
        LinkFuture::new(
            fut,
            classifier,
            spare,
            idempotent,
            self.next.clone(),
            self.policy.clone(),
        )
    }
}

/// The edge of a chain; see [`ChainLayer`](super::ChainLayer).
pub struct Chain<S> {
    inner: S,
    config: Arc<ChainConfig>,
}

impl<S> Chain<S> {
    pub(crate) fn from_parts(inner: S, config: Arc<ChainConfig>) -> Self {
        Chain { inner, config }
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Consumes the chain, returning the wrapped service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: Clone> Clone for Chain<S> {
    fn clone(&self) -> Self {
        Chain {
            inner: self.inner.clone(),
            config: self.config.clone(),
        }
    }
}

impl<S: fmt::Debug> fmt::Debug for Chain<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Chain")
            .field("inner", &self.inner)
            .field("config", &self.config)
            .finish()
    }
}

impl<S, B, RB> Service<Request<B>> for Chain<S>
where
    S: Service<Request<ReplayBody<B>>, Response = Response<RB>> + Clone,
    S::Error: Into<BoxError>,
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type Response = Response<ChainBody<RB>>;
    type Error = BoxError;
    type Future = ChainFuture<S, B, RB>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let cfg = &self.config;
        let arrived = incoming_hops(req.headers(), &cfg.hop_header);
        if arrived > cfg.max_hops {
            tracing::warn!(
                target: "tower_patterns::chain",
                hops = arrived,
                max = cfg.max_hops,
                uri = %req.uri(),
                "loop detected: hop count above the limit, not forwarding"
            );
            return ChainFuture::ready(
                crate::respond::status_response(StatusCode::LOOP_DETECTED),
                self.config.clone(),
            );
        }
        // Every request the chain sends counts one hop: the first link gets arrived + 1.
        req.headers_mut()
            .insert(cfg.hop_header.clone(), hop_value(arrived.saturating_add(1)));
        if cfg.hop_header != DEFAULT_HOP_HEADER {
            req.extensions_mut()
                .insert(HopHeader(cfg.hop_header.clone()));
        }
        if req.body().is_end_stream() {
            // Nothing to buffer (GET, HEAD, ...): no allocation for the body future.
            let req = req.map(|_| ReplayBody::empty());
            ChainFuture::calling(self.inner.call(req), self.config.clone())
        } else {
            // Buffering takes time: take the service that was made ready and leave a clone.
            let fresh = self.inner.clone();
            let ready = std::mem::replace(&mut self.inner, fresh);
            let fut = Box::pin(buffer_request(req, cfg.replay_limit));
            ChainFuture::buffering(fut, ready, self.config.clone())
        }
    }
}

/// The hop count a request arrived with.
///
/// Missing: 0. Several header lines: the largest. A value that is not a decimal number
/// (after trimming spaces) is ignored, so a client cannot break a request with garbage,
/// and it is replaced by a valid count when the request is sent on. A number too large
/// for `u32` counts as `u32::MAX`, which is above any limit.
pub(crate) fn incoming_hops(headers: &HeaderMap, name: &HeaderName) -> u32 {
    let mut max = 0u32;
    for v in headers.get_all(name) {
        match parse_hops(v.as_bytes()) {
            Some(n) => max = max.max(n),
            None => tracing::debug!(
                target: "tower_patterns::chain",
                header = %name,
                "ignoring an invalid hop-count value"
            ),
        }
    }
    max
}

fn parse_hops(raw: &[u8]) -> Option<u32> {
    let s = raw.trim_ascii();
    if s.is_empty() || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let mut n: u32 = 0;
    for d in s {
        n = match n
            .checked_mul(10)
            .and_then(|n| n.checked_add(u32::from(d - b'0')))
        {
            Some(n) => n,
            None => return Some(u32::MAX),
        };
    }
    Some(n)
}

/// The header value for a hop count; small counts are static (no allocation).
pub(crate) fn hop_value(n: u32) -> HeaderValue {
    const SMALL: [&str; 17] = [
        "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16",
    ];
    match SMALL.get(n as usize) {
        Some(s) => HeaderValue::from_static(s),
        None => HeaderValue::from(n),
    }
}

/// Sets the hop header of a request about to be sent to the next link. `req` is the copy
/// of what the first link of this `Link` received; `tried` links were tried since
/// (more than one when the primary is itself a chain), so the next one gets `+ tried`.
pub(crate) fn bump_hops<B>(req: &mut Request<B>, tried: usize) {
    let name = match req.extensions().get::<HopHeader>() {
        Some(h) => h.0.clone(),
        None => HeaderName::from_static(DEFAULT_HOP_HEADER),
    };
    let n = incoming_hops(req.headers(), &name);
    let tried = u32::try_from(tried).unwrap_or(u32::MAX);
    req.headers_mut()
        .insert(name, hop_value(n.saturating_add(tried)));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_values_parse() {
        assert_eq!(parse_hops(b"3"), Some(3));
        assert_eq!(parse_hops(b" 12 "), Some(12));
        assert_eq!(parse_hops(b""), None);
        assert_eq!(parse_hops(b"-1"), None);
        assert_eq!(parse_hops(b"1,2"), None);
        assert_eq!(parse_hops(b"x"), None);
        assert_eq!(parse_hops(b"99999999999999999999"), Some(u32::MAX));
        let name = HeaderName::from_static(DEFAULT_HOP_HEADER);
        let mut h = HeaderMap::new();
        assert_eq!(incoming_hops(&h, &name), 0);
        h.append(&name, HeaderValue::from_static("2"));
        h.append(&name, HeaderValue::from_static("junk"));
        h.append(&name, HeaderValue::from_static("5"));
        assert_eq!(incoming_hops(&h, &name), 5);
        assert_eq!(hop_value(3), "3");
        assert_eq!(hop_value(40), "40");
    }

    #[test]
    fn bump_uses_the_configured_header() {
        let mut req = Request::new(());
        bump_hops(&mut req, 1);
        assert_eq!(req.headers()[DEFAULT_HOP_HEADER], "1");
        bump_hops(&mut req, 2);
        assert_eq!(req.headers()[DEFAULT_HOP_HEADER], "3");
        let mut req = Request::new(());
        req.extensions_mut()
            .insert(HopHeader(HeaderName::from_static("x-other")));
        bump_hops(&mut req, 1);
        assert_eq!(req.headers()["x-other"], "1");
        assert!(!req.headers().contains_key(DEFAULT_HOP_HEADER));
    }
}
