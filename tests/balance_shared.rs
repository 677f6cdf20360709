//! Balancer state shared across thread-per-core workers, over real sockets on 127.0.0.1:
//! two balancers, each on its own current-thread runtime on its own thread (as
//! `server::Workers` runs them), fed by one `discover::Broadcast` and sharing passive
//! health through one `SharedHealth`.
//!
//! Real durations here: each runtime has its own (pausable) clock, and the point is that
//! two runtimes agree on one. Waits are bounded polls of the balancers' state, never sleeps
//! standing in for an assertion.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use tower::ServiceExt;
use tower_patterns::balance::discover::Broadcast;
use tower_patterns::balance::{
    hash_bytes, Balance, EndpointState, EndpointStatus, HashKey, MakeGate, PassiveHealth, Picker,
    Retry, SharedHealth,
};
use tower_patterns::breaker::{Circuit, CircuitBreakerConfig};
use tower_patterns::classify::Condition;
use tower_patterns::proxy::Forward;

type Fwd = Forward<Full<Bytes>>;
type Lb = Balance<String, Fwd, Gates>;

/// One breaker per key from a shared table (cloned into every worker), or a breaker
/// that never opens where the gate is not under test.
struct Gates(Option<Arc<std::collections::HashMap<String, Circuit>>>);

impl MakeGate<String> for Gates {
    type Gate = Circuit;
    fn make_gate(&self, key: &String) -> Circuit {
        match &self.0 {
            Some(b) => b[key].clone(),
            None => Circuit::new(
                CircuitBreakerConfig::new()
                    .no_failure_rate()
                    .consecutive_failures(u32::MAX),
            )
            .unwrap(),
        }
    }
}
type Job = Box<dyn FnOnce(Lb) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

/// What a test backend does with a request.
const OK: u8 = 0;
const FAIL: u8 = 1;
/// Holds the request until `release` is notified, then answers 200.
const HOLD: u8 = 2;

struct Backend {
    url: String,
    hits: Arc<AtomicUsize>,
    mode: Arc<AtomicU8>,
    release: Arc<tokio::sync::Notify>,
}

/// A real HTTP server that answers its name (200), or 500, or holds the request.
async fn backend(name: &'static str, mode: u8) -> Backend {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let hits = Arc::new(AtomicUsize::new(0));
    let mode = Arc::new(AtomicU8::new(mode));
    let release = Arc::new(tokio::sync::Notify::new());
    let (h, m, r) = (hits.clone(), mode.clone(), release.clone());
    let svc = tower::service_fn(move |_req: Request<Incoming>| {
        let (h, m, r) = (h.clone(), m.clone(), r.clone());
        async move {
            h.fetch_add(1, SeqCst);
            let status = match m.load(SeqCst) {
                FAIL => StatusCode::INTERNAL_SERVER_ERROR,
                HOLD => {
                    r.notified().await;
                    StatusCode::OK
                }
                _ => StatusCode::OK,
            };
            let mut res = Response::new(Full::new(Bytes::from(name)));
            *res.status_mut() = status;
            Ok::<_, std::convert::Infallible>(res)
        }
    });
    tokio::spawn(tower_patterns::server::serve(listener, svc));
    Backend {
        url,
        hits,
        mode,
        release,
    }
}

#[derive(Clone)]
struct Config {
    health: PassiveHealth,
    picker: Picker,
    shared: Option<SharedHealth<String>>,
    /// One breaker per key, cloned into every worker's gate.
    breakers: Option<Arc<std::collections::HashMap<String, Circuit>>>,
}

impl Config {
    fn new(health: PassiveHealth, shared: bool) -> Self {
        Config {
            health,
            picker: Picker::RoundRobin,
            shared: shared.then(SharedHealth::new),
            breakers: None,
        }
    }
}

/// One worker: a thread running a current-thread runtime with its own balancer (and its
/// own `Forward`s, so its own pool), following the broadcast membership.
struct Worker {
    jobs: tokio::sync::mpsc::UnboundedSender<Job>,
}

impl Worker {
    fn start(members: &Broadcast<String, String>, cfg: &Config) -> Worker {
        let (jobs, mut rx) = tokio::sync::mpsc::unbounded_channel::<Job>();
        let cfg = cfg.clone();
        let sub = {
            let forward = Fwd::new("http://127.0.0.1:1").unwrap();
            members.subscribe_map(move |_key: &String, url: &String| forward.to(url).ok())
        };
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let gates = Gates(cfg.breakers.clone());
                let mut b = Balance::builder()
                    .picker(cfg.picker.clone())
                    .health(cfg.health)
                    .retry(Retry::default().tries(1))
                    .classify(Condition::server_errors_and_failures())
                    .gates(gates);
                if let Some(h) = &cfg.shared {
                    b = b.shared_health(h);
                }
                let lb = b.spawn(sub).unwrap();
                while let Some(job) = rx.recv().await {
                    tokio::spawn(job(lb.clone()));
                }
            });
        });
        Worker { jobs }
    }

    async fn run<T: Send + 'static, F>(&self, f: impl FnOnce(Lb) -> F + Send + 'static) -> T
    where
        F: Future<Output = T> + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move |lb| {
            Box::pin(async move {
                let _ = tx.send(f(lb).await);
            })
        });
        assert!(self.jobs.send(job).is_ok(), "worker thread is gone");
        tokio::time::timeout(Duration::from_secs(20), rx)
            .await
            .expect("worker answered in time")
            .expect("worker job completed")
    }

    /// A GET through this worker's balancer: status and the answering backend's name.
    async fn get(&self, to: Option<String>) -> (u16, String) {
        self.run(move |lb| async move {
            let mut req = Request::get("/");
            if let Some(to) = to {
                req = req.header("x-to", to);
            }
            match lb.oneshot(req.body(Full::default()).unwrap()).await {
                Ok(res) => {
                    let status = res.status().as_u16();
                    let body = res.into_body().collect().await.unwrap().to_bytes();
                    (status, String::from_utf8_lossy(&body).into_owned())
                }
                Err(e) => (e.status().as_u16(), e.to_string()),
            }
        })
        .await
    }

    async fn status(&self) -> Vec<EndpointStatus<String>> {
        self.run(|lb| async move { lb.endpoints() }).await
    }

    async fn state(&self, key: &str) -> Option<EndpointState> {
        let key = key.to_string();
        self.status()
            .await
            .into_iter()
            .find(|e| e.key == key)
            .map(|e| e.state)
    }

    /// Waits (bounded) until this worker's balancer holds exactly `keys`.
    async fn wait_members(&self, keys: &[&str]) {
        let mut want: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
        want.sort();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let mut have: Vec<String> = self.status().await.into_iter().map(|e| e.key).collect();
            have.sort();
            if have == want {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "membership {have:?}, want {want:?}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

fn ejected(state: Option<EndpointState>) -> bool {
    matches!(state, Some(EndpointState::Ejected { .. }))
}

/// Two workers over `good` and `bad`; worker A's failures on `bad` must take it out of
/// worker B's rotation too when health is shared.
async fn ejection_reaches_other_worker(shared: bool) -> (usize, Option<EndpointState>) {
    let good = backend("good", OK).await;
    let bad = backend("bad", FAIL).await;
    let members = Broadcast::new();
    members.insert("good".to_string(), good.url.clone());
    members.insert("bad".to_string(), bad.url.clone());
    let cfg = Config::new(PassiveHealth::new(2, Duration::from_secs(60)), shared);
    let (a, b) = (Worker::start(&members, &cfg), Worker::start(&members, &cfg));
    a.wait_members(&["good", "bad"]).await;
    b.wait_members(&["good", "bad"]).await;

    // Round robin over two: four requests on A reach `bad` twice = max_fails.
    for _ in 0..4 {
        a.get(None).await;
    }
    assert!(ejected(a.state("bad").await), "A ejected it");
    let before = bad.hits.load(SeqCst);
    for _ in 0..10 {
        b.get(None).await;
    }
    (bad.hits.load(SeqCst) - before, b.state("bad").await)
}

#[tokio::test]
async fn an_endpoint_ejected_by_one_worker_is_skipped_by_the_other() {
    let (hits_on_b, state_on_b) = ejection_reaches_other_worker(true).await;
    assert_eq!(hits_on_b, 0, "B sent nothing to the ejected endpoint");
    assert!(ejected(state_on_b), "B sees it ejected: {state_on_b:?}");
}

#[tokio::test]
async fn without_shared_health_each_worker_learns_on_its_own() {
    // The baseline the shared table fixes: B keeps sending to the dead endpoint until its
    // own max_fails is reached.
    let (hits_on_b, state_on_b) = ejection_reaches_other_worker(false).await;
    assert_eq!(hits_on_b, 2, "B had to fail max_fails times itself");
    assert!(ejected(state_on_b));
}

#[tokio::test]
async fn one_trial_across_all_workers_after_fail_timeout() {
    let good = backend("good", OK).await;
    let bad = backend("bad", FAIL).await;
    let members = Broadcast::new();
    members.insert("good".to_string(), good.url.clone());
    members.insert("bad".to_string(), bad.url.clone());
    let cfg = Config::new(PassiveHealth::new(1, Duration::from_millis(300)), true);
    let (a, b) = (Worker::start(&members, &cfg), Worker::start(&members, &cfg));
    a.wait_members(&["good", "bad"]).await;
    b.wait_members(&["good", "bad"]).await;

    for _ in 0..2 {
        a.get(None).await;
    }
    assert!(ejected(b.state("bad").await));
    // From now on `bad` holds what it gets: a trial stays in flight until released.
    bad.mode.store(HOLD, SeqCst);
    let hits = bad.hits.load(SeqCst);
    // Bounded wait for fail_timeout to pass (state turns to probation, trial due).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while ejected(a.state("bad").await) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never came off ejection"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // Twenty requests from both workers at once: exactly one reaches `bad` (the trial,
    // held in flight); the others all go to `good`.
    let (a, b) = (Arc::new(a), Arc::new(b));
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
    for i in 0..20 {
        let w = if i % 2 == 0 { a.clone() } else { b.clone() };
        let done_tx = done_tx.clone();
        tokio::spawn(async move {
            let _ = done_tx.send(w.get(None).await);
        });
    }
    // The held trial cannot finish before it is released: the 19 others must.
    for _ in 0..19 {
        let got = tokio::time::timeout(Duration::from_secs(20), done_rx.recv())
            .await
            .expect("the other requests are answered")
            .unwrap();
        assert_eq!(got, (200, "good".to_string()));
    }
    assert_eq!(
        bad.hits.load(SeqCst) - hits,
        1,
        "one trial across both workers"
    );
    assert!(done_rx.try_recv().is_err(), "the trial is still held");
    assert_eq!(a.state("bad").await, Some(EndpointState::Probation));
    assert_eq!(b.state("bad").await, Some(EndpointState::Probation));

    // The trial succeeds: both workers put it back in rotation.
    bad.mode.store(OK, SeqCst);
    bad.release.notify_one();
    let trial = tokio::time::timeout(Duration::from_secs(20), done_rx.recv()).await;
    assert_eq!(trial.unwrap().unwrap(), (200, "bad".to_string()));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while b.state("bad").await != Some(EndpointState::Healthy) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "trial never restored it"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let before = bad.hits.load(SeqCst);
    for _ in 0..4 {
        b.get(None).await;
    }
    assert_eq!(
        bad.hits.load(SeqCst) - before,
        2,
        "B round-robins to it again"
    );
}

/// Finds an `x-to` value that the worker's hash ring sends to `key`.
async fn hash_value_for(w: &Worker, key: &'static str) -> String {
    w.run(move |lb| async move {
        (0..10_000)
            .map(|i| format!("k{i}"))
            .find(|v| {
                let req = Request::get("/")
                    .header("x-to", v.as_str())
                    .body(())
                    .unwrap();
                lb.select(&req).ok().as_deref() == Some(key)
            })
            .expect("some value hashes to each endpoint")
    })
    .await
}

/// Three endpoints, two of them failing, a budget of one ejection: A fails `bad1`, B
/// fails `bad2`. Shared, the second ejection is refused; per worker, each ejects one.
async fn ejections_across_workers(shared: bool) -> usize {
    let good = backend("good", OK).await;
    let bad1 = backend("bad1", FAIL).await;
    let bad2 = backend("bad2", FAIL).await;
    let members = Broadcast::new();
    for (k, b) in [("good", &good), ("bad1", &bad1), ("bad2", &bad2)] {
        members.insert(k.to_string(), b.url.clone());
    }
    let mut cfg = Config::new(
        PassiveHealth::new(1, Duration::from_secs(60)).max_ejection_percent(34),
        shared,
    );
    let by_header =
        |_: &http::Uri, h: &http::HeaderMap| h.get("x-to").map(|v| hash_bytes(v.as_bytes()));
    cfg.picker = Picker::ConsistentHash(HashKey::Custom(Arc::new(by_header)));
    let (a, b) = (Worker::start(&members, &cfg), Worker::start(&members, &cfg));
    a.wait_members(&["good", "bad1", "bad2"]).await;
    b.wait_members(&["good", "bad1", "bad2"]).await;
    let to_bad1 = hash_value_for(&a, "bad1").await;
    let to_bad2 = hash_value_for(&b, "bad2").await;

    assert_eq!(a.get(Some(to_bad1)).await.0, 500);
    assert!(ejected(a.state("bad1").await));
    for _ in 0..3 {
        let (status, _) = b.get(Some(to_bad2.clone())).await;
        if shared {
            // Kept in rotation: the budget is spent (by worker A), so it keeps failing.
            assert_eq!(status, 500, "kept: budget spent");
        }
    }
    let mut keys = std::collections::HashSet::new();
    for w in [&a, &b] {
        for e in w.status().await {
            if ejected(Some(e.state)) {
                keys.insert(e.key);
            }
        }
    }
    keys.len()
}

#[tokio::test]
async fn the_ejection_budget_holds_across_workers() {
    assert_eq!(ejections_across_workers(true).await, 1);
}

#[tokio::test]
async fn without_shared_health_the_budget_is_per_worker() {
    // The baseline: each worker spends its own budget, two of three endpoints are out.
    assert_eq!(ejections_across_workers(false).await, 2);
}

#[tokio::test]
async fn membership_changes_reach_every_worker_and_removal_frees_the_cell() {
    let one = backend("one", OK).await;
    let two = backend("two", OK).await;
    let members = Broadcast::new();
    members.insert("one".to_string(), one.url.clone());
    let cfg = Config::new(PassiveHealth::default(), true);
    let health = cfg.shared.clone().unwrap();
    let (a, b) = (Worker::start(&members, &cfg), Worker::start(&members, &cfg));
    a.wait_members(&["one"]).await;
    b.wait_members(&["one"]).await;
    assert_eq!(health.len(), 1, "one cell for the key both workers hold");

    members.insert("two".to_string(), two.url.clone());
    a.wait_members(&["one", "two"]).await;
    b.wait_members(&["one", "two"]).await;
    assert_eq!(health.len(), 2);
    assert_eq!(b.get(None).await.0, 200);

    assert!(members.remove(&"one".to_string()));
    a.wait_members(&["two"]).await;
    b.wait_members(&["two"]).await;
    // The balancers dropped the endpoint; its cell goes with it (bounded wait: the old
    // snapshot is released once no request holds it).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while health.len() != 1 {
        assert!(tokio::time::Instant::now() < deadline, "cell never freed");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for _ in 0..4 {
        assert_eq!(a.get(None).await, (200, "two".to_string()));
    }
}

#[tokio::test]
async fn a_breaker_cloned_into_each_workers_gate_is_shared() {
    // The breaker needs no SharedHealth: `Circuit` clones share their state, so one per
    // key, cloned into every worker's gate, opens for all of them.
    let good = backend("good", OK).await;
    let bad = backend("bad", FAIL).await;
    let members = Broadcast::new();
    members.insert("good".to_string(), good.url.clone());
    members.insert("bad".to_string(), bad.url.clone());
    let breaker = || {
        Circuit::new(
            CircuitBreakerConfig::new()
                .no_failure_rate()
                .consecutive_failures(2)
                .wait_in_open(Duration::from_secs(60)),
        )
        .unwrap()
    };
    let mut cfg = Config::new(PassiveHealth::disabled(), false);
    cfg.breakers = Some(Arc::new(
        [("good", breaker()), ("bad", breaker())]
            .into_iter()
            .map(|(k, c)| (k.to_string(), c))
            .collect(),
    ));
    let (a, b) = (Worker::start(&members, &cfg), Worker::start(&members, &cfg));
    a.wait_members(&["good", "bad"]).await;
    b.wait_members(&["good", "bad"]).await;
    for _ in 0..4 {
        a.get(None).await;
    }
    let before = bad.hits.load(SeqCst);
    for _ in 0..10 {
        assert_eq!(b.get(None).await, (200, "good".to_string()));
    }
    assert_eq!(
        bad.hits.load(SeqCst),
        before,
        "B's gate is the same open breaker"
    );
}
