//! The Consul registry against a local server that follows Consul's documented agent and
//! health HTTP API (no Consul agent can be installed on this machine): service
//! register/deregister, TTL checks (`/v1/agent/check/pass`), `DeregisterCriticalServiceAfter`,
//! and `/v1/health/service/<name>?passing` with blocking queries (`index`, `wait`,
//! `X-Consul-Index`).
#![cfg(feature = "consul")]

mod discovery_support;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use tower_patterns::discovery::{
    ConsulRegistry, Instance, Registration, Registry, Selector, Watcher,
};

use discovery_support::{until, within};

// ---------------------------------------------------------------------------------------
// A local agent following Consul's documented HTTP API.

struct Svc {
    def: Value,
    ttl: Option<Duration>,
    deregister_after: Option<Duration>,
    passing: bool,
    last_pass: Instant,
    critical_since: Option<Instant>,
}

#[derive(Default)]
struct Data {
    index: u64,
    services: BTreeMap<String, Svc>,
}

struct State {
    data: Mutex<Data>,
    changed: watch::Sender<u64>,
    health_queries: AtomicU64,
    blocking_queries: AtomicU64,
}

impl State {
    fn bump(&self, data: &mut Data) {
        data.index += 1;
        self.changed.send_replace(data.index);
    }
}

struct Agent {
    addr: SocketAddr,
    state: Arc<State>,
    server: Option<JoinHandle<()>>,
    reaper: JoinHandle<()>,
}

fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| c.is_ascii_alphabetic())?);
    let n: f64 = num.parse().ok()?;
    let secs = match unit {
        "ns" => n / 1e9,
        "us" => n / 1e6,
        "ms" => n / 1e3,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return None,
    };
    Some(Duration::from_secs_f64(secs))
}

fn reply(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut res = Response::new(Full::new(body.into()));
    *res.status_mut() = status;
    res
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query: HashMap<String, String> = req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|s| !s.is_empty())
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (kv.to_string(), String::new()),
        })
        .collect();
    let body = req.into_body().collect().await.unwrap().to_bytes();

    if method == Method::PUT && path == "/v1/agent/service/register" {
        let def: Value = match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(e) => {
                return reply(
                    StatusCode::BAD_REQUEST,
                    format!("Request decode failed: {e}"),
                )
            }
        };
        let Some(name) = def["Name"].as_str() else {
            return reply(StatusCode::BAD_REQUEST, "Missing service name");
        };
        let id = def["ID"].as_str().unwrap_or(name).to_string();
        let check = &def["Check"];
        let ttl = check["TTL"].as_str().and_then(parse_duration);
        let deregister_after = check["DeregisterCriticalServiceAfter"]
            .as_str()
            .and_then(parse_duration);
        let passing = check["Status"].as_str() == Some("passing") || ttl.is_none();
        let mut data = state.data.lock().unwrap();
        data.services.insert(
            id,
            Svc {
                def: def.clone(),
                ttl,
                deregister_after,
                passing,
                last_pass: Instant::now(),
                critical_since: (!passing).then(Instant::now),
            },
        );
        state.bump(&mut data);
        return reply(StatusCode::OK, "");
    }
    if method == Method::PUT {
        if let Some(id) = path.strip_prefix("/v1/agent/service/deregister/") {
            let mut data = state.data.lock().unwrap();
            return if data.services.remove(id).is_some() {
                state.bump(&mut data);
                reply(StatusCode::OK, "")
            } else {
                reply(StatusCode::NOT_FOUND, format!("Unknown service ID {id:?}"))
            };
        }
        if let Some(check) = path.strip_prefix("/v1/agent/check/pass/") {
            let mut data = state.data.lock().unwrap();
            let svc = check
                .strip_prefix("service:")
                .and_then(|id| data.services.get_mut(id))
                .filter(|s| s.ttl.is_some());
            let Some(svc) = svc else {
                return reply(StatusCode::NOT_FOUND, format!("Unknown check ID {check:?}"));
            };
            svc.last_pass = Instant::now();
            svc.critical_since = None;
            if !svc.passing {
                svc.passing = true;
                state.bump(&mut data);
            }
            return reply(StatusCode::OK, "");
        }
    }
    if method == Method::GET {
        if let Some(name) = path.strip_prefix("/v1/health/service/") {
            state.health_queries.fetch_add(1, Ordering::Relaxed);
            let index: u64 = query.get("index").and_then(|v| v.parse().ok()).unwrap_or(0);
            let wait = query
                .get("wait")
                .and_then(|w| parse_duration(w))
                .unwrap_or(Duration::from_secs(300))
                .min(Duration::from_secs(600));
            if index > 0 {
                state.blocking_queries.fetch_add(1, Ordering::Relaxed);
                let mut rx = state.changed.subscribe();
                let deadline = Instant::now() + wait;
                // Block while nothing changed since `index`.
                while *rx.borrow_and_update() <= index {
                    if tokio::time::timeout_at(deadline, rx.changed())
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            }
            let passing_only = query.contains_key("passing");
            let data = state.data.lock().unwrap();
            let entries: Vec<Value> = data
                .services
                .values()
                .filter(|s| s.def["Name"].as_str() == Some(name))
                .filter(|s| !passing_only || s.passing)
                .map(|s| {
                    let d = &s.def;
                    json!({
                        "Node": {"Node": "local", "Address": "127.0.0.1"},
                        "Service": {
                            "ID": d["ID"], "Service": d["Name"], "Tags": d["Tags"],
                            "Address": d["Address"], "Port": d["Port"], "Meta": d["Meta"],
                        },
                        "Checks": [{"CheckID": d["Check"]["CheckID"],
                                    "Status": if s.passing { "passing" } else { "critical" }}],
                    })
                })
                .collect();
            let mut res = reply(StatusCode::OK, serde_json::to_vec(&entries).unwrap());
            res.headers_mut()
                .insert("x-consul-index", data.index.into());
            res.headers_mut()
                .insert("content-type", "application/json".parse().unwrap());
            return res;
        }
    }
    reply(StatusCode::NOT_FOUND, "no such endpoint")
}

/// TTL checks turn critical when not passed in time; critical services are removed after
/// `DeregisterCriticalServiceAfter`.
async fn reap(state: Arc<State>) {
    loop {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = Instant::now();
        let mut data = state.data.lock().unwrap();
        let mut changed = false;
        for s in data.services.values_mut() {
            if let Some(ttl) = s.ttl {
                if s.passing && now >= s.last_pass + ttl {
                    s.passing = false;
                    s.critical_since = Some(now);
                    changed = true;
                }
            }
        }
        let before = data.services.len();
        data.services
            .retain(|_, s| match (s.critical_since, s.deregister_after) {
                (Some(since), Some(after)) => now < since + after,
                _ => true,
            });
        if changed || data.services.len() != before {
            state.bump(&mut data);
        }
    }
}

async fn serve_agent(listener: TcpListener, state: Arc<State>) {
    // Connections live in this task's JoinSet: aborting the task drops them all, as a
    // crashed agent would.
    let mut conns = JoinSet::new();
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(a) => a,
            Err(_) => continue,
        };
        let state = state.clone();
        conns.spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, std::convert::Infallible>(handle(state, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
        while conns.try_join_next().is_some() {}
    }
}

impl Agent {
    async fn start() -> Agent {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State {
            // A fresh agent's index is already past 0.
            data: Mutex::new(Data {
                index: 1,
                services: BTreeMap::new(),
            }),
            changed: watch::channel(1).0,
            health_queries: AtomicU64::new(0),
            blocking_queries: AtomicU64::new(0),
        });
        Agent {
            addr,
            server: Some(tokio::spawn(serve_agent(listener, state.clone()))),
            reaper: tokio::spawn(reap(state.clone())),
            state,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The agent becomes unreachable (listener and connections gone).
    async fn stop(&mut self) {
        if let Some(s) = self.server.take() {
            s.abort();
            let _ = s.await;
        }
    }

    /// Back on the same port, with its services, but its index starts over (as after a
    /// restart): clients must reset their blocking index.
    async fn resume(&mut self) {
        let listener = TcpListener::bind(self.addr).await.unwrap();
        {
            let mut data = self.state.data.lock().unwrap();
            data.index = 0;
            self.state.bump(&mut data);
        }
        self.server = Some(tokio::spawn(serve_agent(listener, self.state.clone())));
    }

    /// Loses every service, as an agent restarted without its state.
    fn forget_all(&self) {
        let mut data = self.state.data.lock().unwrap();
        data.services.clear();
        self.state.bump(&mut data);
    }

    fn service(&self, id: &str) -> Option<Value> {
        self.state
            .data
            .lock()
            .unwrap()
            .services
            .get(id)
            .map(|s| s.def.clone())
    }

    fn service_count(&self) -> usize {
        self.state.data.lock().unwrap().services.len()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            s.abort();
        }
        self.reaper.abort();
    }
}

// ---------------------------------------------------------------------------------------

fn inst(service: &str, id: &str, port: u16) -> Instance {
    Instance::new(service, id, "127.0.0.1", port)
}

fn registry(agent: &Agent) -> ConsulRegistry {
    ConsulRegistry::builder(agent.url())
        .wait(Duration::from_secs(30))
        .request_timeout(Duration::from_secs(2))
        .deregister_critical_after(Duration::from_millis(600))
        .build()
        .unwrap()
}

const TTL: Duration = Duration::from_millis(1500);

#[tokio::test]
async fn consul_register_sends_a_ttl_check_and_lists_passing_instances() {
    let agent = Agent::start().await;
    let reg = registry(&agent);
    let me = inst("api-service", "api-1", 8001)
        .with_version("2.1.0")
        .with_tag("blue")
        .with_metadata("zone", "a");
    let guard = Registration::new(reg.clone(), me.clone(), TTL)
        .await
        .unwrap();

    let def = agent.service("api-1").unwrap();
    assert_eq!(def["Name"], "api-service");
    assert_eq!(def["Port"], 8001);
    assert_eq!(def["Tags"], json!(["blue"]));
    assert_eq!(def["Meta"], json!({"version": "2.1.0", "zone": "a"}));
    assert_eq!(def["Check"]["CheckID"], "service:api-1");
    assert_eq!(def["Check"]["TTL"], "1500ms");
    assert_eq!(def["Check"]["DeregisterCriticalServiceAfter"], "600ms");

    // The guard keeps the TTL check passing well past the TTL.
    tokio::time::sleep(TTL * 3).await;
    assert_eq!(
        reg.instances("api-service").await.unwrap(),
        vec![me.clone()]
    );
    assert_eq!(
        reg.lookup("api-service", &Selector::any().version("2.1"))
            .await
            .unwrap()
            .len(),
        1
    );
    assert!(reg
        .lookup("api-service", &Selector::any().version("3"))
        .await
        .unwrap()
        .is_empty());

    guard.deregister().await.unwrap();
    assert!(agent.service("api-1").is_none());
    assert!(reg.instances("api-service").await.unwrap().is_empty());
}

#[tokio::test]
async fn consul_watch_follows_changes_with_blocking_queries() {
    let agent = Agent::start().await;
    let reg = registry(&agent);
    let watcher = Watcher::new(&reg, "api-service", Selector::any());
    within("synced", watcher.wait_until(|s| s.is_synced())).await;

    let g1 = Registration::new(reg.clone(), inst("api-service", "a1", 8001), TTL)
        .await
        .unwrap();
    within("a1", watcher.wait_until(|s| s.len() == 1)).await;
    let g2 = Registration::new(reg.clone(), inst("api-service", "a2", 8002), TTL)
        .await
        .unwrap();
    within("a2", watcher.wait_until(|s| s.len() == 2)).await;
    // Another service's changes do not show up.
    let _w = Registration::new(reg.clone(), inst("webapp-service", "w1", 9001), TTL)
        .await
        .unwrap();

    // Changes arrive through blocking queries (index + wait), not by polling.
    assert!(agent.state.blocking_queries.load(Ordering::Relaxed) >= 2);
    drop(g1);
    within("a1 gone", watcher.wait_until(|s| s.len() == 1)).await;
    assert!(watcher.snapshot().get("a2").is_some());
    g2.deregister().await.unwrap();
    within("empty", watcher.wait_until(|s| s.is_empty())).await;
}

#[tokio::test]
async fn consul_dead_instance_fails_its_check_and_is_removed() {
    let agent = Agent::start().await;
    let reg = registry(&agent);
    let watcher = Watcher::new(&reg, "api-service", Selector::any());
    let guard = Registration::new(reg.clone(), inst("api-service", "crash", 8001), TTL)
        .await
        .unwrap();
    within("registered", watcher.wait_until(|s| s.len() == 1)).await;
    guard.abandon(); // the process died: nobody passes the check any more
    within(
        "check critical: not passing",
        watcher.wait_until(|s| s.is_empty()),
    )
    .await;
    // Then the agent removes the critical service (DeregisterCriticalServiceAfter).
    until("agent removed it", || agent.service_count() == 0).await;
}

#[tokio::test]
async fn consul_agent_that_forgot_the_service_gets_it_again() {
    let agent = Agent::start().await;
    let reg = registry(&agent);
    let watcher = Watcher::new(&reg, "api-service", Selector::any());
    let guard = Registration::new(reg.clone(), inst("api-service", "a1", 8001), TTL)
        .await
        .unwrap();
    within("registered", watcher.wait_until(|s| s.len() == 1)).await;
    agent.forget_all();
    until("registered again", || guard.registrations() == 2).await;
    within("listed again", watcher.wait_until(|s| s.len() == 1)).await;
    assert!(agent.service("a1").is_some());
}

#[tokio::test]
async fn consul_watchers_are_fail_static_while_the_agent_is_down() {
    let mut agent = Agent::start().await;
    let reg = registry(&agent);
    let watcher = Watcher::new(&reg, "api-service", Selector::any());
    let ttl = Duration::from_secs(5);
    let _g1 = Registration::new(reg.clone(), inst("api-service", "a1", 8001), ttl)
        .await
        .unwrap();
    let _g2 = Registration::new(reg.clone(), inst("api-service", "a2", 8002), ttl)
        .await
        .unwrap();
    within("both", watcher.wait_until(|s| s.len() == 2)).await;

    agent.stop().await;
    let snap = within("stale", watcher.wait_until(|s| s.is_stale())).await;
    assert_eq!(snap.len(), 2, "the last known instances stay");
    assert!(snap.last_error().unwrap().contains("consul"));

    // Back, with an index that starts over: the client resets and keeps following.
    agent.resume().await;
    let snap = within("fresh", watcher.wait_until(|s| !s.is_stale())).await;
    assert_eq!(snap.len(), 2);
    let _g3 = Registration::new(reg.clone(), inst("api-service", "a3", 8003), ttl)
        .await
        .unwrap();
    within(
        "a3 seen after the index reset",
        watcher.wait_until(|s| s.len() == 3),
    )
    .await;
}

#[tokio::test]
async fn consul_bad_address_and_bad_instance_are_typed_errors() {
    assert!(ConsulRegistry::new("https://127.0.0.1:8500").is_err());
    assert!(ConsulRegistry::new("not a uri").is_err());
    let agent = Agent::start().await;
    let reg = registry(&agent);
    let err = reg.register(&inst("api", "a/1", 1), TTL).await.unwrap_err();
    assert!(matches!(
        err,
        tower_patterns::discovery::DiscoveryError::InvalidInstance(_)
    ));
    // Nothing listens: unavailable, not a panic.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let down = ConsulRegistry::new(format!("http://127.0.0.1:{port}")).unwrap();
    assert!(down.instances("api").await.unwrap_err().is_unavailable());
}

/// Issue 10 item 5, Consul: an agent back without its state lists nothing until the
/// instances register again; the watcher holds the removals for the reconnect grace, so
/// the service is never empty, and the instances are listed by the agent again.
#[tokio::test]
async fn consul_agent_back_without_state_never_empties_the_service() {
    use std::sync::atomic::AtomicBool;
    let mut agent = Agent::start().await;
    let reg = registry(&agent);
    let watcher = Watcher::new(&reg, "api-service", Selector::any());
    let g1 = Registration::new(reg.clone(), inst("api-service", "a1", 8001), TTL)
        .await
        .unwrap();
    let g2 = Registration::new(reg.clone(), inst("api-service", "a2", 8002), TTL)
        .await
        .unwrap();
    within("both", watcher.wait_until(|s| s.len() == 2)).await;
    let emptied = Arc::new(AtomicBool::new(false));
    let observer = {
        let (watcher, emptied) = (watcher.clone(), emptied.clone());
        tokio::spawn(async move {
            let mut rx = watcher.subscribe();
            while rx.changed().await.is_ok() {
                if watcher.is_empty() {
                    emptied.store(true, Ordering::SeqCst);
                }
            }
        })
    };

    agent.stop().await;
    within("stale", watcher.wait_until(|s| s.is_stale())).await;
    agent.forget_all();
    agent.resume().await;
    until("both registered again", || {
        g1.registrations() == 2 && g2.registrations() == 2 && agent.service_count() == 2
    })
    .await;
    let snap = within(
        "listed again, nothing held",
        watcher.wait_until(|s| !s.is_stale() && s.held() == 0 && s.len() == 2),
    )
    .await;
    assert!(snap.get("a1").is_some() && snap.get("a2").is_some());
    observer.abort();
    assert!(
        !emptied.load(Ordering::SeqCst),
        "the watched set became empty"
    );
}
