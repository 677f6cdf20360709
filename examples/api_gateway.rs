//! An API gateway in one axum app (PATTERNS §7), on embedded defaults: a memory registry,
//! in-process upstreams (the Node.js chapter's store: cart, product and checkout
//! services), routing by the registry + balancer + breaker, and this crate's gateway layers:
//! trace context / request id / access log, per-route metrics (Prometheus text on
//! `/metrics`), a bulkhead per service, and the composition endpoints (a read composition
//! of the cart and its products, the checkout orchestration).
//!
//! It finishes by itself after a short load run that prints, per route, the call count,
//! error rate, mean and maximum latency, and the Prometheus series of the gateway.
//!
//! `cargo run --example api_gateway --features metrics,compose`
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
use tower::ServiceBuilder;
use tower_patterns::balance::{Balance, PassiveHealth, ReplayLayer, Retry};
use tower_patterns::body::ReplayBody;
use tower_patterns::breaker::{Circuit, CircuitBreakerConfig, CircuitBreakerLayer, Window};
use tower_patterns::bulkhead::BulkheadLayer;
use tower_patterns::classify::Condition;
use tower_patterns::compose::{Call, Composite, Part, PartResult, IDEMPOTENCY_KEY};
use tower_patterns::discovery::{
    Instance, MemoryRegistry, Registration, Registry, Selector, Watcher,
};
use tower_patterns::proxy::{Forward, ForwardBuilder};
use tower_patterns::telemetry::{metered, Metrics, MetricsLayer};
use tower_patterns::trace::{RequestTraceLayer, TraceContext, TraceId};
use tower_patterns::BoxError;

// ---------------------------------------------------------------- the store's services

/// The services' shared state and fault switches.
#[derive(Default)]
pub struct Store {
    /// product id -> (name, price in cents, stock)
    pub products: Mutex<BTreeMap<String, (String, u64, i64)>>,
    /// user -> [(product id, quantity)]
    pub carts: Mutex<HashMap<String, Vec<(String, i64)>>>,
    /// idempotency key -> amount charged (a key charges once).
    pub charges: Mutex<HashMap<String, u64>>,
    /// Idempotency keys of the stock updates and cart deletions already applied.
    pub applied: Mutex<HashSet<String>>,
    /// The next N `product/update` calls answer 503.
    pub fail_updates: AtomicU32,
    /// Every product read answers 503.
    pub products_down: AtomicBool,
    /// `checkout/pay` answers 402.
    pub payment_declined: AtomicBool,
    /// `checkout/pay` calls received.
    pub pay_calls: AtomicU64,
}

impl Store {
    /// Three products and two users with a cart.
    pub fn seeded() -> Arc<Store> {
        let store = Store::default();
        {
            let mut p = store.products.lock().unwrap();
            p.insert("p1".into(), ("keyboard".into(), 4900, 100));
            p.insert("p2".into(), ("mouse".into(), 1900, 100));
            p.insert("p3".into(), ("screen".into(), 19900, 100));
        }
        store.reset_carts();
        Arc::new(store)
    }

    /// Every user `u0`..`u9` gets a cart with p1 x1 and p2 x2.
    pub fn reset_carts(&self) {
        for u in 0..10 {
            self.reset_cart(&format!("u{u}"));
        }
    }

    /// `user` gets a cart with p1 x1 and p2 x2.
    pub fn reset_cart(&self, user: &str) {
        let mut c = self.carts.lock().unwrap();
        c.insert(user.to_owned(), vec![("p1".into(), 1), ("p2".into(), 2)]);
    }

    pub fn stock(&self, id: &str) -> i64 {
        self.products.lock().unwrap()[id].2
    }
}

/// The idempotency key of a request, if any.
fn key(headers: &HeaderMap) -> Option<String> {
    headers
        .get(IDEMPOTENCY_KEY)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

fn cart_service(store: Arc<Store>) -> Router {
    Router::new()
        .route(
            "/cart/{user}",
            get(|State(s): State<Arc<Store>>, Path(user): Path<String>| async move {
                let carts = s.carts.lock().unwrap();
                let items: Vec<Value> = carts
                    .get(&user)
                    .map(|c| c.iter().map(|(p, q)| json!({"product": p, "qty": q})).collect())
                    .unwrap_or_default();
                Json(json!({"user": user, "items": items}))
            }),
        )
        .route(
            "/cart/delete",
            post(|State(s): State<Arc<Store>>, headers: HeaderMap, Json(body): Json<Value>| async move {
                let user = body["user"].as_str().unwrap_or_default().to_owned();
                if let Some(k) = key(&headers) {
                    if !s.applied.lock().unwrap().insert(k) {
                        return Json(json!({"deleted": user, "replayed": true}));
                    }
                }
                s.carts.lock().unwrap().remove(&user);
                Json(json!({"deleted": user}))
            }),
        )
        .with_state(store)
}

fn product_service(store: Arc<Store>) -> Router {
    Router::new()
        .route(
            "/product/{id}",
            get(|State(s): State<Arc<Store>>, Path(id): Path<String>| async move {
                if s.products_down.load(Ordering::SeqCst) {
                    return (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"error": "down"})));
                }
                match s.products.lock().unwrap().get(&id) {
                    Some((name, price, stock)) => (
                        StatusCode::OK,
                        Json(json!({"id": id, "name": name, "price": price, "stock": stock})),
                    ),
                    None => (StatusCode::NOT_FOUND, Json(json!({"error": "no such product"}))),
                }
            }),
        )
        .route(
            "/product/update",
            post(|State(s): State<Arc<Store>>, headers: HeaderMap, Json(body): Json<Value>| async move {
                let failing = s
                    .fail_updates
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok();
                if failing {
                    return (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"error": "busy"})));
                }
                if let Some(k) = key(&headers) {
                    if !s.applied.lock().unwrap().insert(k) {
                        return (StatusCode::OK, Json(json!({"replayed": true})));
                    }
                }
                let mut products = s.products.lock().unwrap();
                for item in body["items"].as_array().into_iter().flatten() {
                    let id = item["product"].as_str().unwrap_or_default();
                    if let Some(p) = products.get_mut(id) {
                        p.2 -= item["qty"].as_i64().unwrap_or(0);
                    }
                }
                (StatusCode::OK, Json(json!({"updated": true})))
            }),
        )
        .with_state(store)
}

fn checkout_service(store: Arc<Store>) -> Router {
    Router::new()
        .route(
            "/checkout/pay",
            post(|State(s): State<Arc<Store>>, headers: HeaderMap, Json(body): Json<Value>| async move {
                s.pay_calls.fetch_add(1, Ordering::SeqCst);
                if s.payment_declined.load(Ordering::SeqCst) {
                    return (StatusCode::PAYMENT_REQUIRED, Json(json!({"error": "declined"})));
                }
                let Some(k) = key(&headers) else {
                    return (StatusCode::BAD_REQUEST, Json(json!({"error": "Idempotency-Key required"})));
                };
                let amount = body["amount"].as_u64().unwrap_or(0);
                let mut charges = s.charges.lock().unwrap();
                let charged = *charges.entry(k).or_insert(amount);
                (StatusCode::OK, Json(json!({"charged": charged})))
            }),
        )
        .with_state(store)
}

pub async fn serve(app: Router) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let app = app.into_make_service_with_connect_info::<SocketAddr>();
        if let Err(e) = axum::serve(listener, app).await {
            eprintln!("server on {addr} stopped: {e}");
        }
    });
    Ok(addr)
}

/// The running upstreams, registered in the memory registry.
pub struct Upstreams {
    pub store: Arc<Store>,
    pub registry: Arc<dyn Registry>,
    _registrations: Vec<Registration>,
}

/// Two instances of each service, registered under `cart`, `product`, `checkout`.
pub async fn start_upstreams() -> Result<Upstreams, BoxError> {
    let store = Store::seeded();
    let registry: Arc<dyn Registry> = Arc::new(MemoryRegistry::new());
    let mut registrations = Vec::new();
    for (service, app) in [
        ("cart", cart_service as fn(Arc<Store>) -> Router),
        ("product", product_service),
        ("checkout", checkout_service),
    ] {
        for n in 0..2 {
            let addr = serve(app(store.clone())).await?;
            let instance =
                Instance::new(service, format!("{service}-{n}"), "127.0.0.1", addr.port());
            registrations.push(
                Registration::new(registry.clone(), instance, Duration::from_secs(30)).await?,
            );
        }
    }
    Ok(Upstreams {
        store,
        registry,
        _registrations: registrations,
    })
}

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

/// What the compositions use.
pub struct Bff {
    cart: Part,
    /// Reads: a fallback value stands in when the product service fails.
    product_read: Part,
    /// Writes: never a fallback (a stock update did or did not happen).
    product: Part,
    checkout: Part,
}

/// What a caller can look at after building the gateway.
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
    let checkout_route = post(checkout_flow).layer(
        ServiceBuilder::new()
            .layer(RequestTraceLayer::new("/bff/checkout/{user}").respond())
            .layer(MetricsLayer::new("/bff/checkout/{user}").respond())
            .layer(BulkheadLayer::new("checkout", 16).max_queue(16).respond()),
    );
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
        .with_state(bff);
    Ok((
        app,
        Handles {
            circuits: vec![cart.circuit, product.circuit, checkout.circuit],
            watchers: vec![cart.watcher, product.watcher, checkout.watcher],
        },
    ))
}

/// Read composition: the cart, then every product it lists, concurrently.
async fn cart_view(
    State(bff): State<Arc<Bff>>,
    Path(user): Path<String>,
    Extension(cx): Extension<TraceContext>,
) -> Response {
    if !valid_user(&user) {
        return StatusCode::BAD_REQUEST.into_response();
    }
    let mut answer = Composite::new();
    let cart = bff
        .cart
        .send(Call::get(format!("/cart/{user}")).tries(2).trace(Some(&cx)))
        .await;
    let ids: Vec<String> = cart
        .body
        .as_ref()
        .and_then(|b| b["items"].as_array())
        .into_iter()
        .flatten()
        .filter_map(|i| i["product"].as_str().map(str::to_owned))
        .collect();
    answer.push(cart);
    let reads = ids.iter().map(|id| {
        let call = Call::get(format!("/product/{id}"))
            .tries(2)
            .trace(Some(&cx));
        let product = bff.product_read.clone();
        let id = id.clone();
        async move {
            let mut r = product.send(call).await;
            r.name = format!("product:{id}");
            r
        }
    });
    for r in futures_util::future::join_all(reads).await {
        answer.push(r);
    }
    json_response(&answer)
}

/// The checkout orchestration: read the cart, `checkout/pay`, then `product/update`, then
/// `cart/delete`. Every step carries an idempotency key derived from the
/// client's `Idempotency-Key` (or a new one), so retries — ours, or the client resending
/// the checkout with the same key — never charge or update twice.
async fn checkout_flow(
    State(bff): State<Arc<Bff>>,
    Path(user): Path<String>,
    Extension(cx): Extension<TraceContext>,
    headers: HeaderMap,
) -> Response {
    if !valid_user(&user) {
        return StatusCode::BAD_REQUEST.into_response();
    }
    let order = key(&headers)
        .filter(|k| !k.is_empty() && k.len() <= 64)
        .unwrap_or_else(|| TraceId::random().to_string());
    let mut answer = Composite::new();
    answer.field("order", json!(order));
    let step = |call: Call, suffix: &str| {
        call.idempotency_key(&format!("{order}:{suffix}"))
            .map(|c| c.tries(3).trace(Some(&cx)))
    };
    let read = Call::get(format!("/cart/{user}")).tries(2).trace(Some(&cx));
    let cart = bff.cart.send(read).await;
    let items = cart
        .body
        .as_ref()
        .map(|b| b["items"].clone())
        .unwrap_or(Value::Null);
    let amount: u64 = items
        .as_array()
        .into_iter()
        .flatten()
        .map(|i| i["qty"].as_u64().unwrap_or(0) * 1000)
        .sum();
    let cart_ok = cart.is_ok() && amount > 0;
    answer.push(cart);
    let pay = match (
        cart_ok,
        step(
            Call::post("/checkout/pay", &json!({"user": user, "amount": amount})),
            "pay",
        ),
    ) {
        (true, Some(call)) => bff.checkout.send(call).await,
        _ => PartResult::skipped("checkout/pay"),
    };
    let paid = pay.is_ok();
    let mut pay = pay;
    pay.name = "checkout/pay".into();
    answer.push(pay);
    if !paid {
        // Nothing was charged: the cart and the stock are untouched.
        answer.push(PartResult::skipped("cart/delete"));
        answer.push(PartResult::skipped("product/update"));
        answer.field("payment", json!("not charged"));
        answer.status(StatusCode::BAD_GATEWAY);
        return json_response(&answer);
    }
    let (Some(delete), Some(update)) = (
        step(Call::post("/cart/delete", &json!({"user": user})), "cart"),
        step(
            Call::post("/product/update", &json!({"items": items})),
            "stock",
        ),
    ) else {
        answer.status(StatusCode::BAD_REQUEST);
        return json_response(&answer);
    };
    // In sequence, the cart last: while any step is missing the cart is still there, so
    // the client's resend (same key) reads it again and finishes the remaining steps.
    let mut updated = bff.product.send(update).await;
    updated.name = "product/update".into();
    let mut deleted = if updated.is_ok() {
        bff.cart.send(delete).await
    } else {
        PartResult::skipped("cart/delete")
    };
    deleted.name = "cart/delete".into();
    let done = deleted.is_ok() && updated.is_ok();
    answer.push(updated);
    answer.push(deleted);
    answer.field("payment", json!("captured"));
    if !done {
        // Paid, but a later step failed after its retries: say so, and how to finish.
        answer.field(
            "next",
            json!(
                "resend the checkout with the same Idempotency-Key: the payment is not taken again"
            ),
        );
        answer.status(StatusCode::MULTI_STATUS);
    }
    json_response(&answer)
}

/// A user id goes into upstream paths: letters, digits, `-` and `_` only (axum decodes
/// `%2F`, and `../product/update` must not reach another endpoint of the service).
fn valid_user(user: &str) -> bool {
    !user.is_empty()
        && user.len() <= 64
        && user
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn json_response(answer: &Composite) -> Response {
    let (parts, body) = answer.response().into_parts();
    Response::from_parts(parts, Body::new(body))
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
    let prometheus = metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder()?;
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
                            vec![("idempotency-key", key.as_str())],
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
    for (path, key) in &unfinished {
        let (status, body) = fetch(gw, "POST", path, &[("idempotency-key", key)]).await?;
        if status != StatusCode::OK && std::env::var_os("DEBUG_RESEND").is_some() {
            eprintln!("{status} {body}");
        }
        finished += usize::from(status == StatusCode::OK);
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
