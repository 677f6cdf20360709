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
//! | `AuthLayer` | API key in `x-api-key` with scope `proxy`, removed before forwarding; sends `x-auth-subject`/`-scopes`/`-method` upstream, drops client-sent copies; no `Identity` extension (nothing after it reads one) | `401` + `WWW-Authenticate` |
//! | `/metrics` | `GET /metrics` answers the Prometheus text here (needs the key; not traced, not counted as proxied) | — |
//! | `RequestTraceLayer` | `traceparent` continued or started, `x-request-id` kept or made, both sent upstream; one access-log event | — |
//! | `MetricsLayer` | requests, failures, latency histogram, in flight, label `route="proxy"` | — |
//! | `BulkheadLayer` | at most `--bulkhead` calls at once over all workers, no queue | `503` |
//! | circuit breaker | the default window (failure rate over the last calls), shared by all workers | `503` while open |
//!
//! One instance of each layer is built at start-up and cloned into every worker, so limits,
//! breaker and bulkhead hold for the process, as nginx's shared zones do.

use std::convert::Infallible;
use std::future::Future;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use metrics_exporter_prometheus::PrometheusHandle;
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
        let prometheus = crate::prometheus::install()?;
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
            // Nothing after the key check reads the `Identity` extension (the limiter in
            // front keys on the route; upstreams get the identity headers): not boxed
            // into every request's extensions for nobody.
            auth: auth
                .layer()
                .require_scopes(["proxy"])
                .identity_extension(false),
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

impl<S, RB> Service<Request<Incoming>> for MetricsEndpoint<S>
where
    S: Service<Request<Incoming>, Response = Response<RB>>,
{
    type Response = Response<Either<RB, Full<Bytes>>>;
    type Error = S::Error;
    type Future = EndpointFuture<S::Future, RB>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        // Readied but not called for a scrape: the layers below take their resources in
        // `call` (bulkhead slot, breaker permit), so nothing is held.
        self.inner.poll_ready(cx)
    }

    #[inline]
    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        if req.uri().path() == "/metrics" && req.method() == Method::GET {
            return EndpointFuture::Scrape {
                res: Some(scrape(&self.prometheus)),
                _body: std::marker::PhantomData,
            };
        }
        EndpointFuture::Proxied {
            fut: self.inner.call(req),
        }
    }
}

/// The scrape's answer, out of line: rare, and its body building stays off the proxied path.
#[cold]
#[inline(never)]
fn scrape(prometheus: &PrometheusHandle) -> Box<Response<Full<Bytes>>> {
    let mut res = Response::new(Full::new(Bytes::from(prometheus.render())));
    res.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    Box::new(res)
}

pin_project_lite::pin_project! {
    /// The proxied call, or the scrape's answer (boxed: a response head inline would add
    /// ~150 bytes to every request's future, moved with it). One move of the proxied
    /// response on the way out, where `futures_util`'s `MapOk` in an `Either` made two.
    #[project = EndpointProj]
    pub(crate) enum EndpointFuture<F, RB> {
        Proxied { #[pin] fut: F },
        Scrape { res: Option<Box<Response<Full<Bytes>>>>, _body: std::marker::PhantomData<fn() -> RB> },
    }
}

impl<F, RB, E> Future for EndpointFuture<F, RB>
where
    F: Future<Output = Result<Response<RB>, E>>,
{
    type Output = Result<Response<Either<RB, Full<Bytes>>>, E>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            EndpointProj::Proxied { fut } => fut.poll(cx).map_ok(|res| res.map(Either::Left)),
            EndpointProj::Scrape { res, .. } => match res.take() {
                Some(res) => Poll::Ready(Ok((*res).map(Either::Right))),
                // Polled again after its answer: a bug of the caller.
                None => panic!("EndpointFuture polled after completion"),
            },
        }
    }
}

/// `cargo test --release --features metrics,auth,rate-limit --example reverse_proxy`: the
/// stack over a real `Forward` to a loopback backend, served on a loopback port.
#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use http::StatusCode;
    use http_body_util::{BodyExt, Empty};
    use tower_patterns::proxy::Forward;

    use super::*;

    const KEY: &str = "test-key-0123456789";

    /// A backend answering the request headers it got, one `name: value` line each.
    async fn echo_backend() -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let echo = tower::service_fn(|req: Request<Incoming>| async move {
            let mut text = String::new();
            for (name, value) in req.headers() {
                text += &format!("{name}: {}\n", String::from_utf8_lossy(value.as_bytes()));
            }
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(text))))
        });
        tokio::spawn(tower_patterns::server::serve(listener, echo));
        addr
    }

    /// `GET path` with `headers`: status, `retry-after`, body.
    async fn get(
        gw: SocketAddr,
        path: &str,
        headers: &[(&str, &str)],
    ) -> (StatusCode, Option<String>, String) {
        let client = tower_patterns::balance::client::http_client::<Empty<Bytes>>();
        let mut req = Request::get(format!("http://{gw}{path}"));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let call = client.request(req.body(Empty::new()).unwrap());
        let res = tokio::time::timeout(std::time::Duration::from_secs(10), call)
            .await
            .expect("an answer within 10 s")
            .unwrap();
        let status = res.status();
        let retry_after = res
            .headers()
            .get(http::header::RETRY_AFTER)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        let body = res.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            retry_after,
            String::from_utf8_lossy(&body).into_owned(),
        )
    }

    /// The series value of `name` in the Prometheus text.
    fn series(text: &str, name: &str) -> Option<f64> {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    // One test: the Prometheus recorder is global, installed once per process.
    #[tokio::test]
    async fn key_trace_metrics_and_rate_limit_over_loopback() {
        let backend = echo_backend().await;
        let gw = Gateway::new(&crate::GatewayConfig {
            api_key: KEY.into(),
            generated_key: false,
            // A burst of 3: the three checks below pass, the next requests find it empty.
            rate_limit: 3,
            bulkhead: 16,
        })
        .unwrap();
        let forward = Forward::<Incoming>::new(&format!("http://{backend}")).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(tower_patterns::server::serve(listener, gw.wrap(forward)));

        let (status, _, _) = get(addr, "/a", &[]).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "no key");

        let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let (status, _, seen) = get(
            addr,
            "/a",
            &[
                ("x-api-key", KEY),
                ("traceparent", parent),
                ("x-request-id", "req-1"),
                ("x-auth-subject", "spoofed"),
            ],
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        let lines: Vec<&str> = seen.lines().collect();
        // The caller's trace continues in a child span; the request id is kept.
        assert!(
            lines.iter().any(|l| l
                .starts_with("traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-")
                && *l != format!("traceparent: {parent}")),
            "{seen}"
        );
        assert!(lines.contains(&"x-request-id: req-1"), "{seen}");
        // The verified identity, not the client's copy; the key stays at the gateway.
        assert!(lines.contains(&"x-auth-subject: client"), "{seen}");
        assert!(!seen.contains("spoofed"), "{seen}");
        assert!(!seen.contains(KEY), "{seen}");

        let (status, _, text) = get(addr, "/metrics", &[("x-api-key", KEY)]).await;
        assert_eq!(status, StatusCode::OK);
        // One proxied request; the scrape and the refusal are not counted.
        assert_eq!(
            series(&text, "tower_patterns_requests_total{route=\"proxy\"}"),
            Some(1.0),
            "{text}"
        );
        // The latency is a Prometheus histogram (buckets), not a summary: the upkeep
        // folds a bucketed sample in a few comparisons, where a summary's quantile
        // sketch cost ~1,200 instructions per request (session 15, process callgrind).
        assert_eq!(
            series(
                &text,
                "tower_patterns_request_duration_seconds_bucket{route=\"proxy\",le=\"+Inf\"}"
            ),
            Some(1.0),
            "{text}"
        );
        assert!(!text.contains("quantile="), "{text}");

        // Three requests used the burst of 3 (one per 333 ms comes back): within a few
        // more, one is refused with a whole number of seconds to wait.
        let mut refused = None;
        for _ in 0..30 {
            let (status, retry_after, _) = get(addr, "/a", &[("x-api-key", KEY)]).await;
            if status == StatusCode::TOO_MANY_REQUESTS {
                refused = retry_after;
                break;
            }
            assert_eq!(status, StatusCode::OK);
        }
        let retry_after = refused.expect("a 429 once the burst is spent");
        assert!(
            retry_after.parse::<u64>().is_ok_and(|s| s >= 1),
            "{retry_after}"
        );
    }
}
