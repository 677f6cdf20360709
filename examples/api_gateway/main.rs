//! An API gateway in one axum app (PATTERNS §7), on embedded defaults: a memory registry,
//! in-process upstreams (the Node.js chapter's store: cart, product and checkout
//! services), routing by the registry + balancer + breaker, and this crate's gateway layers:
//! trace context / request id / access log, per-route metrics (Prometheus text on
//! `/metrics`), a bulkhead per service, an API key for the checkout, a rate limit per client
//! address, and the composition endpoints (a read composition of the cart and its
//! products, the checkout orchestration).
//!
//! It finishes by itself after a short load run that prints, per route, the call count,
//! error rate, mean and maximum latency, and the Prometheus series of the gateway.
//!
//! `cargo run --example api_gateway --features metrics,compose,auth,rate-limit`
//!
//! `tests/compose_store.rs` drives the same code.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};
use std::num::NonZeroU32;
use tower::ServiceBuilder;
use tower_patterns::auth::{ApiKeys, AuthConfig};
use tower_patterns::balance::{Balance, PassiveHealth, ReplayLayer, Retry};
use tower_patterns::body::ReplayBody;
use tower_patterns::breaker::{Circuit, CircuitBreakerConfig, CircuitBreakerLayer, Window};
use tower_patterns::bulkhead::BulkheadLayer;
use tower_patterns::classify::Condition;
use tower_patterns::client_addr::ClientAddrLayer;
use tower_patterns::compose::{Call, Composite, Part, PartResult, IDEMPOTENCY_KEY};
use tower_patterns::discovery::{
    Instance, MemoryRegistry, Registration, Registry, Selector, Watcher,
};
use tower_patterns::proxy::{Forward, ForwardBuilder};
use tower_patterns::ratelimit::{ClientIpKey, LocalLimiter, Quota, RateLimitLayer};
use tower_patterns::telemetry::{metered, Metrics, MetricsLayer};
use tower_patterns::trace::{RequestTraceLayer, TraceContext, TraceId};
use tower_patterns::BoxError;

/// The API key of the example's shop front end (scope `checkout`).
pub const API_KEY: &str = "example-shop-key-0123456789abcdef";

mod bff;
#[path = "../common/prometheus.rs"]
mod prometheus;
mod store;

use bff::{cart_view, checkout_flow, Bff};
use store::key;
pub use store::{serve, start_upstreams, Upstreams};

// ---------------------------------------------------------------- the gateway

/// One service as the gateway sees it: a registry-fed balancer, its breaker, a part for
/// the compositions.
struct Service {
    watcher: Watcher,
    circuit: Circuit,
    part: Part,
}

fn breaker(name: &str) -> Result<Circuit, BoxError> {
    Ok(Circuit::new(
        CircuitBreakerConfig::new()
            .name(name)
            .window(Window::Count(20))
            .minimum_calls(10)
            .failure_rate_threshold(50.0)
            .wait_in_open(Duration::from_millis(500)),
    )?)
}

/// A balancer over the registered instances of a service (round robin, passive health,
/// retry on the next instance); each endpoint measured under its instance id.
fn balance<B>(
    watcher: &Watcher,
    template: &Forward<B>,
) -> Balance<String, Metrics<Forward<B>, Condition>>
where
    B: http_body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
    Forward<B>: Clone,
{
    let (lb, driver) = Balance::builder()
        .health(PassiveHealth::new(3, Duration::from_secs(2)))
        .retry(Retry::default())
        .build(watcher.discover(metered(watcher.service(), template.clone())));
    tokio::spawn(driver);
    lb
}

fn service(registry: &Arc<dyn Registry>, name: &str) -> Result<Service, BoxError> {
    let watcher = Watcher::new(registry, name, Selector::any());
    let template = ForwardBuilder::new("http://127.0.0.1:1")
        .connect_timeout(Duration::from_secs(1))
        .build::<Full<Bytes>>()?;
    let circuit = breaker(name)?;
    let part = Part::new(name.to_owned(), balance(&watcher, &template))
        .breaker(circuit.clone())
        .timeout(Duration::from_secs(2));
    Ok(Service {
        watcher,
        circuit,
        part,
    })
}

pub struct Handles {
    pub circuits: Vec<Circuit>,
    pub watchers: Vec<Watcher>,
}

/// `metrics`: a Prometheus render function served on `/metrics` (the recorder must be
/// installed before this is called: the layers register their handles here).
pub fn gateway(
    up: &Upstreams,
    metrics: Option<Arc<dyn Fn() -> String + Send + Sync>>,
) -> Result<(Router, Handles), BoxError> {
    let cart = service(&up.registry, "cart")?;
    let product = service(&up.registry, "product")?;
    let checkout = service(&up.registry, "checkout")?;

    // The proxied product API: trace, metrics, bulkhead, replay, breaker, balancer.
    let template = ForwardBuilder::new("http://127.0.0.1:1")
        .connect_timeout(Duration::from_secs(1))
        .build::<ReplayBody<Body>>()?;
    let products_api = ServiceBuilder::new()
        .layer(RequestTraceLayer::new("/product/{id}").respond())
        .layer(MetricsLayer::new("/product/{id}").respond())
        .layer(BulkheadLayer::new("product", 32).max_queue(64).respond())
        .layer(ReplayLayer::new(64 * 1024).respond())
        .layer(CircuitBreakerLayer::from_breaker(product.circuit.clone()))
        .service(balance(&product.watcher, &template));

    let bff = Arc::new(Bff {
        cart: cart.part.clone(),
        product_read: product
            .part
            .clone()
            .fallback(json!({"available": "unknown"})),
        product: product.part.clone(),
        checkout: checkout.part.clone(),
    });
    let cart_view = get(cart_view).layer(
        ServiceBuilder::new()
            .layer(RequestTraceLayer::new("/bff/cart/{user}").respond())
            .layer(MetricsLayer::new("/bff/cart/{user}").respond()),
    );
    // Checkout needs an API key with the `checkout` scope (401/403 otherwise); the key's
    // name reaches the services in `x-auth-subject`, never a client-sent copy of it.
    let auth = AuthConfig::new()
        .api_keys(ApiKeys::new().key("shop-frontend", API_KEY, ["checkout"])?)
        .build()?;
    let checkout_route = post(checkout_flow).layer(
        ServiceBuilder::new()
            .layer(RequestTraceLayer::new("/bff/checkout/{user}").respond())
            .layer(MetricsLayer::new("/bff/checkout/{user}").respond())
            .layer(auth.layer().require_scopes(["checkout"]))
            .layer(BulkheadLayer::new("checkout", 16).max_queue(16).respond()),
    );
    // Per client address: 2,000 requests/s with a burst of 2,000 (the load run stays under it).
    let per_client = Quota::per_second(NonZeroU32::new(2000).ok_or("quota")?)
        .allow_burst(NonZeroU32::new(2000).ok_or("burst")?);
    let render = metrics.clone();
    let app = Router::new()
        .route_service("/product/{id}", products_api)
        .route("/bff/cart/{user}", cart_view)
        .route("/bff/checkout/{user}", checkout_route)
        .route(
            "/metrics",
            get(move || {
                let r = render.clone();
                async move { r.map(|f| f()).unwrap_or_default() }
            }),
        )
        .with_state(bff)
        .layer(RateLimitLayer::new(
            ClientIpKey::new(),
            LocalLimiter::new(per_client),
        ))
        .layer(ClientAddrLayer::new());
    Ok((
        app,
        Handles {
            circuits: vec![cart.circuit, product.circuit, checkout.circuit],
            watchers: vec![cart.watcher, product.watcher, checkout.watcher],
        },
    ))
}

// ---------------------------------------------------------------- load run

pub async fn fetch(
    gw: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<(StatusCode, Value), BoxError> {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<Bytes>>();
    let mut req = http::Request::builder()
        .method(method)
        .uri(format!("http://{gw}{path}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let res = tokio::time::timeout(
        Duration::from_secs(10),
        client.request(req.body(Default::default())?),
    )
    .await??;
    let status = res.status();
    let body = res.into_body().collect().await?.to_bytes();
    Ok((status, serde_json::from_slice(&body).unwrap_or(Value::Null)))
}

#[derive(Default)]
struct RouteStats {
    calls: u64,
    /// 5xx or no answer.
    errors: u64,
    /// 207: answered in part (a fallback, or a checkout step to finish).
    partial: u64,
    statuses: BTreeMap<u16, u64>,
    /// Checkouts answered 207: (path, idempotency key), resent at the end.
    unfinished: Vec<(String, String)>,
    total: Duration,
    max: Duration,
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    // The recorder with its histogram upkeep, as a long-running gateway needs it.
    let prometheus = prometheus::install()?;
    let up = start_upstreams().await?;
    let render: Arc<dyn Fn() -> String + Send + Sync> = Arc::new(move || prometheus.render());
    let (app, handles) = gateway(&up, Some(render))?;
    for w in &handles.watchers {
        w.wait_until(|s| s.len() == 2).await;
    }
    let gw = serve(app).await?;
    println!("gateway on http://{gw}");

    // The load: 8 clients, 60 rounds each over the three routes. Half-way the product
    // service fails for a while (its breaker opens, the cart view falls back) and stock
    // updates fail (checkouts answer 207 and are completed by resending).
    let stats: Arc<Mutex<BTreeMap<&'static str, RouteStats>>> = Arc::default();
    let mut clients = Vec::new();
    for c in 0..8u32 {
        let (stats, store) = (stats.clone(), up.store.clone());
        clients.push(tokio::spawn(async move {
            for round in 0..60u32 {
                if c == 0 && round == 20 {
                    store.products_down.store(true, Ordering::SeqCst);
                    store.fail_updates.store(12, Ordering::SeqCst);
                }
                if c == 0 && round == 35 {
                    store.products_down.store(false, Ordering::SeqCst);
                }
                let user = format!("u{c}");
                // Each checkout is a new order with its own cart.
                let buyer = format!("u{c}-{round}");
                let key = format!("order-{c}-{round}");
                let (route, method, path, h): (&'static str, &str, String, Vec<(&str, &str)>) =
                    match round % 4 {
                        0 | 1 => (
                            "/product/{id}",
                            "GET",
                            format!("/product/p{}", 1 + round % 3),
                            vec![],
                        ),
                        2 => (
                            "/bff/cart/{user}",
                            "GET",
                            format!("/bff/cart/{user}"),
                            vec![],
                        ),
                        _ => (
                            "/bff/checkout/{user}",
                            "POST",
                            format!("/bff/checkout/{buyer}"),
                            vec![("idempotency-key", key.as_str()), ("x-api-key", API_KEY)],
                        ),
                    };
                if route == "/bff/checkout/{user}" {
                    store.reset_cart(&buyer);
                }
                let start = Instant::now();
                let status = fetch(gw, method, &path, &h).await.map(|(s, _)| s);
                let took = start.elapsed();
                let mut st = stats.lock().unwrap();
                let s = st.entry(route).or_default();
                s.calls += 1;
                match &status {
                    Ok(code) => *s.statuses.entry(code.as_u16()).or_default() += 1,
                    Err(e) => eprintln!("{route}: {e}"),
                }
                match status {
                    Ok(StatusCode::MULTI_STATUS) => {
                        s.partial += 1;
                        if route == "/bff/checkout/{user}" {
                            s.unfinished.push((path.clone(), key.clone()));
                        }
                    }
                    Ok(code) if code.is_success() => {}
                    _ => s.errors += 1,
                }
                s.total += took;
                s.max = s.max.max(took);
            }
        }));
    }
    for c in clients {
        c.await?;
    }
    println!(
        "\n{:<24} {:>6} {:>11} {:>8} {:>10} {:>10}",
        "route", "calls", "error rate", "partial", "mean ms", "max ms"
    );
    for (route, s) in stats.lock().unwrap().iter() {
        println!(
            "{route:<24} {:>6} {:>10.1}% {:>8} {:>10.2} {:>10.2}",
            s.calls,
            100.0 * s.errors as f64 / s.calls.max(1) as f64,
            s.partial,
            s.total.as_secs_f64() * 1000.0 / s.calls.max(1) as f64,
            s.max.as_secs_f64() * 1000.0
        );
        println!("{:<24} statuses {:?}", "", s.statuses);
    }
    let unfinished: Vec<(String, String)> = stats
        .lock()
        .unwrap()
        .values_mut()
        .flat_map(|s| std::mem::take(&mut s.unfinished))
        .collect();
    let charges = up.store.charges.lock().unwrap().len();
    let mut finished = 0;
    // A client resends an unfinished checkout with the same key, every 250 ms for up to
    // 3 s: longer than the product endpoints stay ejected by passive health (2 s) and
    // the breaker stays open (500 ms) after the fault, so a checkout answered 207 at the
    // very end of a fast (release) run still finds the service back.
    const RESENDS: u32 = 12;
    for (path, key) in &unfinished {
        for attempt in 0..RESENDS {
            let headers = [("idempotency-key", key.as_str()), ("x-api-key", API_KEY)];
            let (status, _) = fetch(gw, "POST", path, &headers).await?;
            if status == StatusCode::OK {
                finished += 1;
                break;
            }
            if attempt + 1 < RESENDS {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }
    println!(
        "checkouts answered 207: {}, finished by resending with the same key: {finished}; \
         charges before {charges}, after {} (a key is charged once)",
        unfinished.len(),
        up.store.charges.lock().unwrap().len()
    );
    for c in &handles.circuits {
        println!("breaker {}: {:?}", c.name(), c.state());
    }
    let text = fetch_text(gw, "/metrics").await?;
    println!("\nPrometheus series of the gateway (/metrics):");
    for line in text.lines().filter(|l| !l.ends_with(" 0")).filter(|l| {
        l.starts_with("tower_patterns_requests_total")
            || l.starts_with("tower_patterns_request_failures_total")
            || l.starts_with("tower_patterns_bulkhead")
            || l.starts_with("tower_patterns_request_duration_seconds_count")
    }) {
        println!("  {line}");
    }
    Ok(())
}

async fn fetch_text(gw: SocketAddr, path: &str) -> Result<String, BoxError> {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<Bytes>>();
    let res = client
        .request(http::Request::get(format!("http://{gw}{path}")).body(Default::default())?)
        .await?;
    let body = res.into_body().collect().await?.to_bytes();
    Ok(String::from_utf8_lossy(&body).into_owned())
}
