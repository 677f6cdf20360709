use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderName;
use tower_layer::Layer;

use super::hops::LinkName;
use super::service::{Chain, ChainConfig, Link, LinkPolicy, DEFAULT_HOP_HEADER};
use crate::classify::{Classify, Condition};

/// Wraps a service (the *primary* link) with the *next* link: when the primary's response
/// or error matches the condition, the request is sent again to `next`.
///
/// This is one `<VhostLink Condition="...">next</VhostLink>`. Layers stack left to right
/// with [`ServiceBuilder`](tower::ServiceBuilder): the layer added *last* is the first link
/// after the service, so `foo -> bar -> baz` reads
///
/// ```
/// # use tower_patterns::chain::{ChainLayer, LinkLayer};
/// # use tower_patterns::classify::Condition;
/// # fn svc(_: &'static str) -> tower::util::BoxCloneSyncService<http::Request<tower_patterns::body::ReplayBody<http_body_util::Empty<bytes::Bytes>>>, http::Response<http_body_util::Empty<bytes::Bytes>>, std::convert::Infallible> {
/// #     tower::util::BoxCloneSyncService::new(tower::service_fn(|_| async { Ok(http::Response::new(http_body_util::Empty::new())) }))
/// # }
/// let not_found: Condition = "404".parse().unwrap();
/// let chain = tower::ServiceBuilder::new()
///     .layer(ChainLayer::new())                                           // the edge
///     .layer(LinkLayer::new(not_found.clone(), svc("baz")).names("bar", "baz")) // bar -> baz
///     .layer(LinkLayer::new(not_found, svc("bar")).names("foo", "bar")) // foo -> bar
///     .service(svc("foo"));
/// ```
///
/// A link's condition applies only to the answer of the link right before it: once a link
/// returned an answer its condition does not match, outer layers pass it on untouched.
#[derive(Clone)]
pub struct LinkLayer<N, C = Arc<Condition>> {
    next: Arc<N>,
    policy: Arc<LinkPolicy<C>>,
}

impl<N> LinkLayer<N, Arc<Condition>> {
    /// Hop to `next` when `condition` matches the primary's answer.
    pub fn new(condition: Condition, next: N) -> Self {
        // Shared by reference: the per-request classifier is a pointer, not a copy of the
        // condition's status bitsets, which keeps the response future small.
        Self::with_classify(Arc::new(condition), next)
    }
}

impl<N, C: Classify> LinkLayer<N, C> {
    /// This layer with [`ErrorResponseLayer`](crate::respond::ErrorResponseLayer) on top:
    /// the `Infallible`-error form that mounts directly in axum (`Router::layer`,
    /// `route_layer`) and in hyper; errors become responses with the status each error
    /// stands for. See `docs/foundation.md`, "Mounting in axum".
    pub fn respond(self) -> tower::layer::util::Stack<Self, crate::respond::ErrorResponseLayer> {
        tower::layer::util::Stack::new(self, crate::respond::ErrorResponseLayer)
    }

    /// Hop to `next` when the per-request classifier made by `classify` reports a failure
    /// (see [`classify_fn`](crate::classify::classify_fn)).
    pub fn with_classify(classify: C, next: N) -> Self {
        LinkLayer {
            next: Arc::new(next),
            policy: Arc::new(LinkPolicy {
                classify,
                non_idempotent: false,
                primary_name: LinkName::from("primary"),
                next_name: LinkName::from("next"),
                drain_limit: crate::body::DISCARD_LIMIT,
                drain_timeout: crate::body::DISCARD_TIMEOUT,
            }),
        }
    }

    fn policy_mut(&mut self) -> &mut LinkPolicy<C> {
        // Copies only if the layer was cloned before being configured.
        Arc::make_mut(&mut self.policy)
    }

    /// Names of the primary and the next link in the [`ChainHops`](super::ChainHops) trail
    /// (default `primary`, `next`). A link that is itself a chain reports its own names.
    pub fn names(mut self, primary: impl Into<LinkName>, next: impl Into<LinkName>) -> Self {
        let p = self.policy_mut();
        p.primary_name = primary.into();
        p.next_name = next.into();
        self
    }

    /// Also hop for non-idempotent methods (POST, PATCH, LOCK, extensions), like nginx's
    /// `proxy_next_upstream ... non_idempotent`. Default `false`: such a request hops only
    /// when it surely never reached the primary (connecting failed).
    pub fn non_idempotent(mut self, yes: bool) -> Self {
        self.policy_mut().non_idempotent = yes;
        self
    }

    /// How a skipped link's response body is discarded: if it is known to be at most
    /// `limit` bytes it is read to the end in a background task (at most `timeout`), so a
    /// keep-alive connection goes back to its pool; otherwise it is dropped at once, which
    /// closes that connection. Default 64 KiB, 1 s. `limit` 0 always drops at once.
    pub fn drain(mut self, limit: u64, timeout: Duration) -> Self {
        let p = self.policy_mut();
        p.drain_limit = limit;
        p.drain_timeout = timeout;
        self
    }
}

impl<S, N: Clone, C: Classify> Layer<S> for LinkLayer<N, C> {
    type Service = Link<S, N, C>;

    fn layer(&self, primary: S) -> Self::Service {
        Link::from_parts(primary, self.next.clone(), self.policy.clone())
    }
}

impl<N, C> fmt::Debug for LinkLayer<N, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LinkLayer")
            .field("primary", &self.policy.primary_name)
            .field("next", &self.policy.next_name)
            .field("non_idempotent", &self.policy.non_idempotent)
            .finish_non_exhaustive()
    }
}

/// The edge of a chain: what runs once per client request, around the links.
///
/// - refuses a request whose hop-count header is above [`max_hops`](Self::max_hops) with
///   `508 Loop Detected`;
/// - buffers the request body up to [`replay_limit`](Self::replay_limit) into a
///   [`ReplayBody`](crate::body::ReplayBody) so links can resend it;
/// - answers a link error with `502`/`504` ([`error_status`](crate::error::error_status))
///   and a failed request body with `400`;
/// - copies the [`ChainHops`](super::ChainHops) trail into the report header, if set.
#[derive(Clone)]
pub struct ChainLayer {
    config: Arc<ChainConfig>,
}

impl Default for ChainLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl ChainLayer {
    /// This layer with [`ErrorResponseLayer`](crate::respond::ErrorResponseLayer) on top:
    /// the `Infallible`-error form that mounts directly in axum (`Router::layer`,
    /// `route_layer`) and in hyper; errors become responses with the status each error
    /// stands for. See `docs/foundation.md`, "Mounting in axum".
    pub fn respond(self) -> tower::layer::util::Stack<Self, crate::respond::ErrorResponseLayer> {
        tower::layer::util::Stack::new(self, crate::respond::ErrorResponseLayer)
    }

    /// Defaults: replay limit 64 KiB, hop header `x-chain-hops`, at most 8 hops, no report
    /// header.
    pub fn new() -> Self {
        ChainLayer {
            config: Arc::new(ChainConfig {
                replay_limit: 64 * 1024,
                hop_header: HeaderName::from_static(DEFAULT_HOP_HEADER),
                max_hops: 8,
                report_header: None,
                entry_name: None,
            }),
        }
    }

    fn config_mut(&mut self) -> &mut ChainConfig {
        Arc::make_mut(&mut self.config)
    }

    /// Request bodies up to `bytes` are kept so the request can hop; a larger body is
    /// streamed to the first link only, and that link's answer is returned whatever it is.
    pub fn replay_limit(mut self, bytes: usize) -> Self {
        self.config_mut().replay_limit = bytes;
        self
    }

    /// The request header that counts hops between processes (default `x-chain-hops`).
    pub fn hop_header(mut self, name: HeaderName) -> Self {
        self.config_mut().hop_header = name;
        self
    }

    /// A request arriving with a hop count above `max` is answered `508 Loop Detected`
    /// (default 8).
    pub fn max_hops(mut self, max: u32) -> Self {
        self.config_mut().max_hops = max;
        self
    }

    pub(crate) fn entry_name(mut self, name: LinkName) -> Self {
        self.config_mut().entry_name = Some(name);
        self
    }

    /// Adds a response header listing the links tried (`foo.com+bar.com`), e.g.
    /// `x-content-chain`. Replaces a header of that name from the link.
    pub fn report_header(mut self, name: HeaderName) -> Self {
        self.config_mut().report_header = Some(name);
        self
    }
}

impl<S> Layer<S> for ChainLayer {
    type Service = Chain<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Chain::from_parts(inner, self.config.clone())
    }
}

impl fmt::Debug for ChainLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChainLayer")
            .field("replay_limit", &self.config.replay_limit)
            .field("hop_header", &self.config.hop_header)
            .field("max_hops", &self.config.max_hops)
            .field("report_header", &self.config.report_header)
            .finish()
    }
}
