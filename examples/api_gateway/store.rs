//! The Node.js chapter's store: cart, product and checkout services, two instances each,
//! registered in the memory registry, with fault switches for the load run and the tests.

use super::*;

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
pub(super) fn key(headers: &HeaderMap) -> Option<String> {
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
