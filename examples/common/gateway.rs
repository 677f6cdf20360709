//! The API-gateway stack of `reverse_proxy --gateway` (issue 14), in front of `Forward`
//! alone or the balancer: what a gateway process does per request besides forwarding, so
//! `scripts/bench-proxy.sh` (`GATEWAY=1`) can measure it as a process under wrk.
//!
//! Outermost first, per request:
//!
//! | layer | does | refuses with |
//! |---|---|---|
//! | `ErrorResponse` | every error below becomes a 502/503/504 answer | — |
//! | `RateLimitLayer` | one GCRA bucket for the whole route (`--rate-limit` per second, the same burst), shared by all workers | `429` + `Retry-After` |
//! | `AuthLayer` | API key in `x-api-key` with scope `proxy`, removed before forwarding; sends `x-auth-subject`/`-scopes`/`-method` upstream, drops client-sent copies | `401` + `WWW-Authenticate` |
//! | `/metrics` | `GET /metrics` answers the Prometheus text here (needs the key; not traced, not counted as proxied) | — |
//! | `RequestTraceLayer` | `traceparent` continued or started, `x-request-id` kept or made, both sent upstream; one access-log event | — |
//! | `MetricsLayer` | requests, failures, latency histogram, in flight, label `route="proxy"` | — |
//! | `BulkheadLayer` | at most `--bulkhead` calls at once over all workers, no queue | `503` |
//! | circuit breaker | the default window (failure rate over the last calls), shared by all workers | `503` while open |
//!
//! One instance of each layer is built at start-up and cloned into every worker, so limits,
//! breaker and bulkhead hold for the process, as nginx's shared zones do.

use std::convert::Infallible;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::{self, TryFutureExt};
use http::{Method, Request, Response};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tower::{Service, ServiceBuilder};
use tower_patterns::auth::{ApiKeys, AuthConfig, AuthLayer};
use tower_patterns::breaker::{CircuitBreakerConfig, CircuitBreakerLayer};
use tower_patterns::bulkhead::BulkheadLayer;
use tower_patterns::proxy::ErrorResponseLayer;
use tower_patterns::ratelimit::{LocalLimiter, Quota, RateLimitLayer, RouteKey};
use tower_patterns::telemetry::MetricsLayer;
use tower_patterns::trace::RequestTraceLayer;
use tower_patterns::BoxError;

use super::GatewayConfig;

/// The layers, built once; [`wrap`](Self::wrap) puts them around each worker's upstream.
#[derive(Clone)]
pub struct Gateway {
    rate_limit: RateLimitLayer<RouteKey, LocalLimiter<Arc<str>>>,
    auth: AuthLayer,
    prometheus: PrometheusHandle,
    trace: RequestTraceLayer,
    metrics: MetricsLayer,
    bulkhead: BulkheadLayer,
    breaker: CircuitBreakerLayer,
}

impl Gateway {
    /// Installs the Prometheus recorder (before any layer registers its handles) and
    /// builds the layers. Call once per process.
    pub fn new(cfg: &GatewayConfig) -> Result<Self, BoxError> {
        let prometheus = PrometheusBuilder::new().install_recorder()?;
        // Without upkeep the recorder's histogram buffers grow with every request until a
        // scrape; drain them every 5 s (what the exporter's own HTTP listener does).
        let upkeep = prometheus.clone();
        std::thread::Builder::new()
            .name("prometheus-upkeep".into())
            .spawn(move || loop {
                std::thread::sleep(Duration::from_secs(5));
                upkeep.run_upkeep();
            })?;
        let rate = NonZeroU32::new(cfg.rate_limit).ok_or("--rate-limit must be at least 1")?;
        let auth = AuthConfig::new()
            .api_keys(ApiKeys::new().key("client", &cfg.api_key, ["proxy"])?)
            // The key is the gateway's business: upstreams get the identity headers instead.
            .hide_credentials(true)
            .build()?;
        Ok(Gateway {
            rate_limit: RateLimitLayer::new(
                RouteKey::new("proxy"),
                LocalLimiter::new(Quota::per_second(rate).allow_burst(rate)),
            ),
            auth: auth.layer().require_scopes(["proxy"]),
            prometheus,
            trace: RequestTraceLayer::new("proxy"),
            metrics: MetricsLayer::new("proxy"),
            bulkhead: BulkheadLayer::new("proxy", cfg.bulkhead),
            breaker: CircuitBreakerLayer::new(CircuitBreakerConfig::new().name("proxy"))?,
        })
    }

    /// The gateway stack around `upstream` (`Forward`, or the replaying balancer).
    pub fn wrap<S, RB>(
        &self,
        upstream: S,
    ) -> impl Service<
        Request<Incoming>,
        Response = Response<
            impl http_body::Body<Data = Bytes, Error = impl Into<BoxError>> + Send + 'static,
        >,
        Error = Infallible,
        Future = impl Send + 'static,
    > + Clone
           + Send
           + 'static
    where
        S: Service<Request<Incoming>, Response = Response<RB>> + Clone + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        RB: http_body::Body<Data = Bytes> + Send + 'static,
        RB::Error: Into<BoxError>,
    {
        let proxied = ServiceBuilder::new()
            .layer(self.trace.clone())
            .layer(self.metrics.clone())
            .layer(self.bulkhead.clone())
            .layer(self.breaker.clone())
            .service(upstream);
        ServiceBuilder::new()
            .layer(ErrorResponseLayer)
            .layer(self.rate_limit.clone())
            .layer(self.auth.clone())
            .service(MetricsEndpoint {
                inner: proxied,
                prometheus: self.prometheus.clone(),
            })
    }
}

/// Answers `GET /metrics` with the Prometheus text; passes everything else on.
#[derive(Clone)]
struct MetricsEndpoint<S> {
    inner: S,
    prometheus: PrometheusHandle,
}

/// What a proxied answer's body becomes: the upstream's, or the scrape's text.
type Proxied<RB> = fn(Response<RB>) -> Response<Either<RB, Full<Bytes>>>;

impl<S, RB> Service<Request<Incoming>> for MetricsEndpoint<S>
where
    S: Service<Request<Incoming>, Response = Response<RB>>,
{
    type Response = Response<Either<RB, Full<Bytes>>>;
    type Error = S::Error;
    type Future = future::Either<
        future::MapOk<S::Future, Proxied<RB>>,
        std::future::Ready<Result<Self::Response, S::Error>>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        // Readied but not called for a scrape: the layers below take their resources in
        // `call` (bulkhead slot, breaker permit), so nothing is held.
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        if req.uri().path() == "/metrics" && req.method() == Method::GET {
            let mut res = Response::new(Either::Right(Full::new(Bytes::from(
                self.prometheus.render(),
            ))));
            res.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            return future::Either::Right(std::future::ready(Ok(res)));
        }
        let left: Proxied<RB> = |res| res.map(Either::Left);
        future::Either::Left(self.inner.call(req).map_ok(left))
    }
}
