//! Load balancer semantics over real sockets on 127.0.0.1 (and plain services where only
//! the pick logic is under test).

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use tower::{Layer, ServiceExt};
use tower_patterns::balance::{
    discover, Balance, BalanceError, EndpointState, HashKey, PassiveHealth, Picker, Retry,
    StickyCookie,
};
use tower_patterns::classify::{Condition, Outcome};
use tower_patterns::gate::Gate;
use tower_patterns::proxy::{Forward, ForwardBody};

const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

struct Backend {
    url: String,
    hits: Arc<AtomicUsize>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Backend {
    async fn kill(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = self.task.await;
    }
}

mod support;
use support::{silent_url, Silence};

/// A real HTTP server answering its name; `/echo` echoes the body.
async fn backend(name: &'static str) -> Backend {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let svc = tower::service_fn(move |req: Request<Incoming>| {
        let h = h.clone();
        async move {
            h.fetch_add(1, SeqCst);
            let body = if req.uri().path() == "/echo" {
                let b = req.into_body().collect().await.unwrap().to_bytes();
                Bytes::from(format!("{name}:{}", String::from_utf8_lossy(&b)))
            } else {
                Bytes::from(name)
            };
            let mut res = Response::new(Full::new(body));
            res.headers_mut()
                .insert("x-instance", http::HeaderValue::from_static(name));
            Ok::<_, Infallible>(res)
        }
    });
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let _ = tower_patterns::server::serve_with_shutdown(listener, svc, async {
            let _ = rx.await;
        })
        .await;
    });
    Backend {
        url,
        hits,
        stop: Some(tx),
        task,
    }
}

/// A port with nothing listening: connecting is refused.
async fn closed_port() -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    drop(l);
    url
}

fn get(path: &str) -> Request<Full<Bytes>> {
    Request::get(path).body(Full::new(Bytes::new())).unwrap()
}

/// The body as text: a `Forward`'s response, or hyper's client's.
async fn text<B>(res: Response<B>) -> String
where
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    String::from_utf8(res.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
}

fn forwards(urls: &[(&'static str, &str)]) -> Vec<(&'static str, Forward<Full<Bytes>>)> {
    let first = Forward::<Full<Bytes>>::new(urls[0].1).unwrap();
    urls.iter()
        .map(|(k, u)| (*k, first.to(u).unwrap()))
        .collect()
}

#[tokio::test]
async fn round_robin_spreads_evenly_over_real_instances() {
    let bs = [
        backend("a").await,
        backend("b").await,
        backend("c").await,
        backend("d").await,
    ];
    let names = ["a", "b", "c", "d"];
    let list: Vec<_> = names
        .iter()
        .zip(&bs)
        .map(|(n, b)| (*n, b.url.as_str()))
        .collect();
    let lb = Balance::builder().build_static(forwards(&list));
    let mut seq = String::new();
    for _ in 0..400 {
        let res = lb.clone().oneshot(get("/")).await.unwrap();
        seq.push_str(&text(res).await);
    }
    assert!(seq.starts_with("abcdabcd"), "{}", &seq[..16]);
    for b in &bs {
        assert_eq!(b.hits.load(SeqCst), 100);
    }
    let st = lb.endpoints();
    assert_eq!(st.len(), 4);
    assert!(st
        .iter()
        .all(|e| e.requests == 100 && e.in_flight == 0 && e.state == EndpointState::Healthy));
}

#[tokio::test]
async fn smooth_weighted_round_robin_matches_nginx() {
    let (a, b, c) = (backend("a").await, backend("b").await, backend("c").await);
    let lb = Balance::builder()
        .picker(Picker::WeightedRoundRobin)
        .weight(|k: &&str| if *k == "a" { 5 } else { 1 })
        .build_static(forwards(&[("a", &a.url), ("b", &b.url), ("c", &c.url)]));
    let mut seq = String::new();
    for _ in 0..14 {
        seq.push_str(&text(lb.clone().oneshot(get("/")).await.unwrap()).await);
    }
    assert_eq!(seq, "aabacaaaabacaa");
    assert_eq!(lb.endpoints()[0].weight, 5);
}

#[tokio::test]
async fn least_pending_avoids_the_busy_endpoint() {
    // "slow" holds every request until released; "fast" answers at once.
    let release = Arc::new(tokio::sync::Notify::new());
    let slow_hits = Arc::new(AtomicUsize::new(0));
    let (r, sh) = (release.clone(), slow_hits.clone());
    let slow = tower::service_fn(move |_req: Request<Full<Bytes>>| {
        let (r, sh) = (r.clone(), sh.clone());
        async move {
            sh.fetch_add(1, SeqCst);
            r.notified().await;
            Ok::<_, Infallible>(Response::new("slow".to_string()))
        }
    });
    let fast = tower::service_fn(|_req: Request<Full<Bytes>>| async {
        Ok::<_, Infallible>(Response::new("fast".to_string()))
    });
    let lb = Balance::builder()
        .picker(Picker::LeastPending)
        .build_static([
            ("slow", tower::util::BoxCloneSyncService::new(slow)),
            ("fast", tower::util::BoxCloneSyncService::new(fast)),
        ]);
    let mut stuck = Vec::new();
    let mut fast_answers = 0;
    for _ in 0..40 {
        let fut = tokio::spawn(lb.clone().oneshot(get("/")));
        // Let it reach its endpoint.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        if fut.is_finished() {
            let res = fut.await.unwrap().unwrap();
            assert_eq!(res.into_body(), "fast");
            fast_answers += 1;
        } else {
            stuck.push(fut);
        }
    }
    // Once one request is pending at "slow", every pick prefers "fast".
    assert!(slow_hits.load(SeqCst) <= 1, "{}", slow_hits.load(SeqCst));
    assert!(fast_answers >= 39);
    let slow_status = lb
        .endpoints()
        .into_iter()
        .find(|e| e.key == "slow")
        .unwrap();
    assert_eq!(slow_status.in_flight, stuck.len());
    release.notify_waiters();
}

fn set_cookie(res: &Response<ForwardBody>) -> Option<String> {
    res.headers()
        .get(header::SET_COOKIE)
        .map(|v| v.to_str().unwrap().to_string())
}

fn cookie_pair(set_cookie: &str) -> String {
    set_cookie.split(';').next().unwrap().to_string()
}

#[tokio::test]
async fn sticky_cookie_sticks_then_moves_and_is_rewritten_when_its_endpoint_leaves() {
    let bs = [backend("a").await, backend("b").await, backend("c").await];
    let (tx, disc) = discover::channel();
    let first = Forward::<Full<Bytes>>::new(&bs[0].url).unwrap();
    for (n, b) in ["a", "b", "c"].iter().zip(&bs) {
        tx.insert(*n, first.to(&b.url).unwrap());
    }
    let cookie = StickyCookie::new("srv", SECRET)
        .unwrap()
        .max_age(Duration::from_secs(3600))
        .secure(true);
    let lb = Balance::builder().sticky(cookie).spawn(disc).unwrap();
    lb.members().wait_for(|n| *n == 3).await.unwrap();

    let res = lb.clone().oneshot(get("/")).await.unwrap();
    let sc = set_cookie(&res).expect("first response sets the cookie");
    assert!(sc.contains("Max-Age=3600") && sc.contains("Secure") && sc.contains("HttpOnly"));
    assert!(sc.contains("Path=/") && sc.contains("SameSite=Lax"));
    let owner = text(res).await;
    let jar = cookie_pair(&sc);
    for _ in 0..10 {
        let mut req = get("/");
        req.headers_mut()
            .insert(header::COOKIE, format!("x=1; {jar}").parse().unwrap());
        let res = lb.clone().oneshot(req).await.unwrap();
        assert!(set_cookie(&res).is_none(), "no rewrite while it sticks");
        assert_eq!(text(res).await, owner);
    }

    // The owner leaves the set: the session moves and the cookie is rewritten.
    let owner_key = ["a", "b", "c"].into_iter().find(|n| *n == owner).unwrap();
    tx.remove(owner_key);
    lb.members().wait_for(|n| *n == 2).await.unwrap();
    let mut req = get("/");
    req.headers_mut()
        .insert(header::COOKIE, jar.parse().unwrap());
    let res = lb.clone().oneshot(req).await.unwrap();
    let rewritten = set_cookie(&res).expect("cookie rewritten after redispatch");
    let new_owner = text(res).await;
    assert_ne!(new_owner, owner);
    let jar2 = cookie_pair(&rewritten);
    assert_ne!(jar2, jar);
    for _ in 0..5 {
        let mut req = get("/");
        req.headers_mut()
            .insert(header::COOKIE, jar2.parse().unwrap());
        let res = lb.clone().oneshot(req).await.unwrap();
        assert!(set_cookie(&res).is_none());
        assert_eq!(text(res).await, new_owner);
    }
}

#[tokio::test]
async fn tampered_and_forged_cookies_are_ignored() {
    let (a, b) = (backend("a").await, backend("b").await);
    let cookie = StickyCookie::new("srv", SECRET).unwrap();
    let lb = Balance::builder()
        .sticky(cookie.clone())
        .build_static(forwards(&[("a", &a.url), ("b", &b.url)]));
    let res = lb.clone().oneshot(get("/")).await.unwrap();
    let good = cookie_pair(&set_cookie(&res).unwrap());
    let value = good.strip_prefix("srv=").unwrap().to_string();

    // A valid value signed with another secret, naming a real endpoint.
    let forger = StickyCookie::new("srv", b"another secret, 32 bytes long!!!").unwrap();
    let real_id = lb.endpoints()[1].id;
    let mut flipped = value.clone().into_bytes();
    flipped[20] = if flipped[20] == b'0' { b'1' } else { b'0' };
    let cases = [
        format!("srv={}", forger.value_for(real_id)),
        format!("srv={}", String::from_utf8(flipped).unwrap()),
        format!("srv={}", &value[..value.len() - 2]),
        "srv=127.0.0.1:22".to_string(),
        "srv=".to_string(),
        format!("srv={}", "f".repeat(4000)),
        "srv=ffffffffffffffff.00000000000000000000000000000000".to_string(),
    ];
    for c in cases {
        let mut req = get("/");
        req.headers_mut().insert(header::COOKIE, c.parse().unwrap());
        let res = lb.clone().oneshot(req).await.expect("never an error");
        assert_eq!(res.status(), StatusCode::OK);
        // Treated as absent: a fresh, valid cookie naming a configured endpoint.
        let sc = set_cookie(&res).expect("a new cookie replaces the bad one");
        let id = cookie
            .verify(cookie_pair(&sc).strip_prefix("srv=").unwrap())
            .unwrap();
        assert!(lb.endpoints().iter().any(|e| e.id == id));
        let who = text(res).await;
        assert!(who == "a" || who == "b");
    }
    assert_eq!(a.hits.load(SeqCst) + b.hits.load(SeqCst), 8);
}

#[tokio::test]
async fn consistent_hash_remaps_about_one_nth_of_keys() {
    fn named(n: usize) -> Flaky {
        tower::util::BoxCloneSyncService::new(tower::service_fn(
            move |_r: Request<Full<Bytes>>| async move {
                Ok::<_, Infallible>(Response::new(format!("e{n}")))
            },
        ))
    }
    async fn owners(lb: &Balance<usize, Flaky>) -> Vec<String> {
        let mut out = Vec::new();
        for k in 0..2000 {
            let mut req = get("/");
            req.headers_mut()
                .insert("x-user", format!("user-{k}").parse().unwrap());
            out.push(lb.clone().oneshot(req).await.unwrap().into_body());
        }
        out
    }
    let picker = Picker::ConsistentHash(HashKey::Header(http::HeaderName::from_static("x-user")));
    let ten = Balance::builder()
        .picker(picker.clone())
        .build_static((0..10).map(|i| (i, named(i))));
    let nine = Balance::builder()
        .picker(picker.clone())
        .build_static((0..10).filter(|i| *i != 3).map(|i| (i, named(i))));
    let eleven = Balance::builder()
        .picker(picker)
        .build_static((0..11).map(|i| (i, named(i))));
    let (o10, o9, o11) = (
        owners(&ten).await,
        owners(&nine).await,
        owners(&eleven).await,
    );

    // Same key, same endpoint, every time.
    assert_eq!(o10, owners(&ten).await);
    // Balanced enough: every endpoint owns some keys.
    let mut per: HashMap<&str, usize> = HashMap::new();
    for o in &o10 {
        *per.entry(o).or_default() += 1;
    }
    assert_eq!(per.len(), 10);
    assert!(per.values().all(|n| *n > 100 && *n < 330), "{per:?}");

    // Removing one endpoint moves only its keys (about 1/10).
    let moved: Vec<usize> = (0..2000).filter(|k| o10[*k] != o9[*k]).collect();
    assert!(moved.iter().all(|k| o10[*k] == "e3"));
    let frac = moved.len() as f64 / 2000.0;
    assert!((0.05..0.17).contains(&frac), "{frac}");
    // Adding one moves keys only to it (about 1/11).
    let moved: Vec<usize> = (0..2000).filter(|k| o10[*k] != o11[*k]).collect();
    assert!(moved.iter().all(|k| o11[*k] == "e10"));
    let frac = moved.len() as f64 / 2000.0;
    assert!((0.04..0.16).contains(&frac), "{frac}");
}

type Flaky = tower::util::BoxCloneSyncService<Request<Full<Bytes>>, Response<String>, Infallible>;

fn flaky(name: &'static str, failing: Arc<AtomicBool>, hits: Arc<AtomicUsize>) -> Flaky {
    tower::util::BoxCloneSyncService::new(tower::service_fn(move |_r: Request<Full<Bytes>>| {
        let failing = failing.load(SeqCst);
        hits.fetch_add(1, SeqCst);
        async move {
            let mut res = Response::new(name.to_string());
            if failing {
                *res.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
            }
            Ok::<_, Infallible>(res)
        }
    }))
}

#[tokio::test(start_paused = true)]
async fn passive_health_ejects_and_restores_with_paused_time() {
    let bad_fails = Arc::new(AtomicBool::new(true));
    let (bad_hits, good_hits) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let lb = Balance::builder()
        .classify("5xx,fail".parse::<Condition>().unwrap())
        .health(PassiveHealth::new(2, Duration::from_secs(10)))
        .retry(Retry::never())
        .build_static([
            ("bad", flaky("bad", bad_fails.clone(), bad_hits.clone())),
            (
                "good",
                flaky("good", Arc::new(AtomicBool::new(false)), good_hits.clone()),
            ),
        ]);
    // Round robin: bad, good, bad (second failure within 10 s: ejected), good.
    for _ in 0..4 {
        lb.clone().oneshot(get("/")).await.unwrap();
    }
    assert_eq!(bad_hits.load(SeqCst), 2);
    let bad = |lb: &Balance<&'static str, Flaky, _, _>| {
        lb.endpoints().into_iter().find(|e| e.key == "bad").unwrap()
    };
    assert!(matches!(bad(&lb).state, EndpointState::Ejected { .. }));
    assert_eq!(bad(&lb).failures, 2);
    for _ in 0..10 {
        assert_eq!(
            lb.clone().oneshot(get("/")).await.unwrap().into_body(),
            "good"
        );
    }
    assert_eq!(bad_hits.load(SeqCst), 2);

    // After fail_timeout it is tried again; still failing, it is ejected at once.
    tokio::time::advance(Duration::from_millis(10_001)).await;
    let mut saw_bad = 0;
    for _ in 0..4 {
        if lb.clone().oneshot(get("/")).await.unwrap().into_body() == "bad" {
            saw_bad += 1;
        }
    }
    assert_eq!(saw_bad, 1, "one probation request, then ejected again");
    assert!(matches!(bad(&lb).state, EndpointState::Ejected { .. }));

    // Healthy again: the probation request succeeds and it stays in.
    bad_fails.store(false, SeqCst);
    tokio::time::advance(Duration::from_millis(10_001)).await;
    let mut saw_bad = 0;
    for _ in 0..10 {
        if lb.clone().oneshot(get("/")).await.unwrap().into_body() == "bad" {
            saw_bad += 1;
        }
    }
    assert_eq!(saw_bad, 5);
    assert_eq!(bad(&lb).state, EndpointState::Healthy);

    // Failures spread out beyond the window do not add up.
    bad_fails.store(true, SeqCst);
    for _ in 0..2 {
        lb.clone().oneshot(get("/")).await.unwrap();
        tokio::time::advance(Duration::from_millis(10_001)).await;
        lb.clone().oneshot(get("/")).await.unwrap();
    }
    assert_eq!(bad(&lb).state, EndpointState::Healthy);
}

#[tokio::test(start_paused = true)]
async fn the_last_endpoint_is_never_ejected() {
    let all_fail = Arc::new(AtomicBool::new(true));
    let lb = Balance::builder()
        .classify("5xx".parse::<Condition>().unwrap())
        .health(PassiveHealth::new(1, Duration::from_secs(30)))
        .retry(Retry::never())
        .build_static([
            ("a", flaky("a", all_fail.clone(), Arc::default())),
            ("b", flaky("b", all_fail.clone(), Arc::default())),
        ]);
    for _ in 0..10 {
        let res = lb.clone().oneshot(get("/")).await.unwrap();
        assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
    }
    let ejected = lb
        .endpoints()
        .iter()
        .filter(|e| matches!(e.state, EndpointState::Ejected { .. }))
        .count();
    assert_eq!(ejected, 1);
    // Envoy-style budget: 40% of 5 = 2.
    let lb = Balance::builder()
        .classify("5xx".parse::<Condition>().unwrap())
        .health(PassiveHealth::new(1, Duration::from_secs(30)).max_ejection_percent(40))
        .retry(Retry::never())
        .build_static(
            ["a", "b", "c", "d", "e"].map(|n| (n, flaky(n, all_fail.clone(), Arc::default()))),
        );
    for _ in 0..10 {
        lb.clone().oneshot(get("/")).await.unwrap();
    }
    let ejected = lb
        .endpoints()
        .iter()
        .filter(|e| matches!(e.state, EndpointState::Ejected { .. }))
        .count();
    assert_eq!(ejected, 2);
}

#[tokio::test]
async fn retries_the_next_endpoint_when_the_connection_is_refused() {
    let live = backend("live").await;
    let dead = closed_port().await;
    let lb = Balance::builder()
        .health(PassiveHealth::disabled())
        .build_static(forwards(&[("dead", &dead), ("live", &live.url)]));
    for _ in 0..10 {
        let res = lb.clone().oneshot(get("/")).await.unwrap();
        assert_eq!(text(res).await, "live");
    }
    // Nothing was sent, so even a POST goes to the next endpoint, body intact.
    for _ in 0..4 {
        let req = Request::post("/echo")
            .body(Full::new(Bytes::from("payload")))
            .unwrap();
        let res = lb.clone().oneshot(req).await.unwrap();
        assert_eq!(text(res).await, "live:payload");
    }
    let dead_status = lb
        .endpoints()
        .into_iter()
        .find(|e| e.key == "dead")
        .unwrap();
    assert!(dead_status.failures >= 7, "{dead_status:?}");

    // Without retry the refusal surfaces as a 502.
    let lb = Balance::builder()
        .retry(Retry::never())
        .health(PassiveHealth::disabled())
        .build_static(forwards(&[("dead", &dead)]));
    let err = lb.oneshot(get("/")).await.unwrap_err();
    assert!(
        matches!(err, BalanceError::Upstream { tries: 1, .. }),
        "{err:?}"
    );
    assert_eq!(err.status(), StatusCode::BAD_GATEWAY);
    assert!(tower_patterns::balance::is_connect_error(
        std::error::Error::source(&err).unwrap()
    ));
}

#[tokio::test]
async fn post_is_not_retried_after_it_was_sent_by_default() {
    let live = backend("live").await;
    let (hangup, hangup_hits) = silent_url(Silence::HangUp).await;
    let build = |retry: Retry| {
        Balance::builder()
            .retry(retry)
            .health(PassiveHealth::disabled())
            .build_static(forwards(&[("hangup", &hangup), ("live", &live.url)]))
    };
    let post = || {
        Request::post("/echo")
            .body(Full::new(Bytes::from("x")))
            .unwrap()
    };
    // Round robin starts with "hangup".
    let lb = build(Retry::default());
    let err = lb.clone().oneshot(post()).await.unwrap_err();
    assert!(
        matches!(err, BalanceError::Upstream { tries: 1, .. }),
        "{err:?}"
    );
    assert_eq!(err.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(hangup_hits.load(SeqCst), 1);
    assert_eq!(live.hits.load(SeqCst), 0);

    // A GET is idempotent: sent again to the next endpoint.
    let lb = build(Retry::default());
    let res = lb.clone().oneshot(get("/")).await.unwrap();
    assert_eq!(text(res).await, "live");
    assert_eq!(hangup_hits.load(SeqCst), 2);

    // Opting in (nginx `non_idempotent`) retries the POST too.
    let lb = build(Retry::default().non_idempotent(true));
    let res = lb.clone().oneshot(post()).await.unwrap();
    assert_eq!(text(res).await, "live:x");
    assert_eq!(hangup_hits.load(SeqCst), 3);
}

#[tokio::test]
async fn retry_respects_the_tries_bound() {
    let dead1 = closed_port().await;
    let dead2 = closed_port().await;
    let live = backend("live").await;
    let lb = Balance::builder()
        .retry(Retry::default().tries(2))
        .health(PassiveHealth::disabled())
        .build_static(forwards(&[
            ("d1", &dead1),
            ("d2", &dead2),
            ("live", &live.url),
        ]));
    // Starts at d1, then d2: two tries used up before reaching "live".
    let err = lb.clone().oneshot(get("/")).await.unwrap_err();
    assert!(
        matches!(err, BalanceError::Upstream { tries: 2, .. }),
        "{err:?}"
    );
    assert_eq!(live.hits.load(SeqCst), 0);
}

#[tokio::test]
async fn membership_changes_through_a_channel_fed_discover() {
    let bs = [backend("a").await, backend("b").await, backend("c").await];
    let fwd = Forward::<Full<Bytes>>::new(&bs[0].url).unwrap();
    let (tx, disc) = discover::channel();
    let lb = Balance::builder().spawn(disc).unwrap();
    // Empty set: a typed error mapping to 502.
    let err = lb.clone().oneshot(get("/")).await.unwrap_err();
    assert!(matches!(err, BalanceError::NoEndpoints));
    assert_eq!(err.status(), StatusCode::BAD_GATEWAY);

    tx.insert("a", fwd.to(&bs[0].url).unwrap());
    tx.insert("b", fwd.to(&bs[1].url).unwrap());
    lb.members().wait_for(|n| *n == 2).await.unwrap();
    for _ in 0..4 {
        lb.clone().oneshot(get("/")).await.unwrap();
    }
    assert_eq!((bs[0].hits.load(SeqCst), bs[1].hits.load(SeqCst)), (2, 2));

    tx.insert("c", fwd.to(&bs[2].url).unwrap());
    lb.members().wait_for(|n| *n == 3).await.unwrap();
    tx.remove("a");
    lb.members().wait_for(|n| *n == 2).await.unwrap();
    for _ in 0..6 {
        lb.clone().oneshot(get("/")).await.unwrap();
    }
    assert_eq!(bs[0].hits.load(SeqCst), 2, "a left the set");
    assert_eq!((bs[1].hits.load(SeqCst), bs[2].hits.load(SeqCst)), (5, 3));
    // Counters survive the change for endpoints that stayed.
    let b = lb.endpoints().into_iter().find(|e| e.key == "b").unwrap();
    assert_eq!(b.requests, 5);
    drop(tx);
}

/// A gate that refuses while closed, and records outcomes.
#[derive(Default)]
struct Switch {
    closed: AtomicBool,
    outcomes: std::sync::Mutex<Vec<Outcome>>,
}

#[derive(Clone, Default)]
struct SharedSwitch(Arc<Switch>);

impl Gate for SharedSwitch {
    type Permit = ();
    fn try_acquire(&self) -> Option<()> {
        (!self.0.closed.load(SeqCst)).then_some(())
    }
    fn complete(&self, _p: (), outcome: Outcome, _elapsed: Duration) {
        self.0.outcomes.lock().unwrap().push(outcome);
    }
}

#[tokio::test]
async fn endpoints_whose_gate_refuses_are_not_picked() {
    let (a, b) = (backend("a").await, backend("b").await);
    let gates: HashMap<&str, SharedSwitch> = [
        ("a", SharedSwitch::default()),
        ("b", SharedSwitch::default()),
    ]
    .into();
    let g = gates.clone();
    let lb = Balance::builder()
        .gates(move |k: &&'static str| g[*k].clone())
        .build_static(forwards(&[("a", &a.url), ("b", &b.url)]));
    gates["a"].0.closed.store(true, SeqCst);
    for _ in 0..6 {
        assert_eq!(text(lb.clone().oneshot(get("/")).await.unwrap()).await, "b");
    }
    assert_eq!(gates["b"].0.outcomes.lock().unwrap().len(), 6);
    gates["b"].0.closed.store(true, SeqCst);
    let err = lb.clone().oneshot(get("/")).await.unwrap_err();
    assert!(
        matches!(
            err,
            BalanceError::Unavailable {
                total: 2,
                refused: 2,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(err.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(a.hits.load(SeqCst), 0);
}

#[tokio::test]
async fn reverse_proxy_retries_a_buffered_post_after_a_refused_connection() {
    use tower_patterns::body::ReplayBody;
    let live = backend("live").await;
    let dead = closed_port().await;
    let fwd = Forward::<ReplayBody<Incoming>>::new(&dead).unwrap();
    let lb = Balance::builder()
        .health(PassiveHealth::disabled())
        .build_static([("dead", fwd.clone()), ("live", fwd.to(&live.url).unwrap())]);
    let proxy = tower::ServiceBuilder::new()
        .layer(tower_patterns::balance::ReplayLayer::new(64 * 1024))
        .service(lb)
        .then(
            |r: Result<Response<ForwardBody>, tower_patterns::BoxError>| async move {
                Ok::<_, tower_patterns::BoxError>(match r {
                    Ok(res) => res.map(tower_patterns::body::boxed),
                    Err(e) => tower_patterns::respond::error_response(&*e)
                        .map(tower_patterns::body::boxed),
                })
            },
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(tower_patterns::server::serve(listener, proxy));

    let client = tower_patterns::balance::client::http_client::<Full<Bytes>>();
    for i in 0..6 {
        let req = Request::post(format!("http://{addr}/echo"))
            .body(Full::new(Bytes::from(format!("body{i}"))))
            .unwrap();
        let res = client.request(req).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(text(res).await, format!("live:body{i}"));
    }
    live.kill().await;
    let res = client
        .request(
            Request::get(format!("http://{addr}/"))
                .body(Full::default())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::BAD_GATEWAY);
}

#[tokio::test(start_paused = true)]
async fn queue_timeout_waits_for_an_endpoint_to_join() {
    let (tx, disc) = discover::channel::<&'static str, Flaky>();
    let lb = Balance::builder()
        .queue_timeout(Duration::from_secs(2))
        .spawn(disc)
        .unwrap();
    let pending = tokio::spawn(lb.clone().oneshot(get("/")));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!pending.is_finished(), "queued while the set is empty");
    tx.insert("late", flaky("late", Arc::default(), Arc::default()));
    let res = pending.await.unwrap().unwrap();
    assert_eq!(res.into_body(), "late");

    // Nobody joins: after the queue timeout, the typed error.
    tx.remove("late");
    lb.members().wait_for(|n| *n == 0).await.unwrap();
    let start = tokio::time::Instant::now();
    let err = lb.clone().oneshot(get("/")).await.unwrap_err();
    assert!(matches!(err, BalanceError::NoEndpoints));
    assert!(start.elapsed() >= Duration::from_secs(2));
}

/// Captures formatted `tracing` output.
#[derive(Clone, Default)]
struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(start_paused = true)]
async fn ejection_and_restoration_emit_tracing_events() {
    let out = Captured::default();
    let writer = out.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::INFO)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let lb = Balance::builder()
        .classify("5xx".parse::<Condition>().unwrap())
        .health(PassiveHealth::new(1, Duration::from_secs(5)))
        .retry(Retry::never())
        .build_static([
            (
                "bad",
                flaky("bad", Arc::new(AtomicBool::new(true)), Arc::default()),
            ),
            ("good", flaky("good", Arc::default(), Arc::default())),
        ]);
    lb.clone().oneshot(get("/")).await.unwrap();
    tokio::time::advance(Duration::from_secs(6)).await;
    lb.clone().oneshot(get("/")).await.unwrap();
    lb.clone().oneshot(get("/")).await.unwrap();
    let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
    let ejected = text.matches("endpoint ejected").count();
    assert!(ejected >= 1, "{text}");
    assert!(text.contains("endpoint=\"bad\""), "{text}");
    assert!(text.contains("endpoint restored on probation"), "{text}");
}

#[tokio::test]
async fn a_body_over_the_replay_limit_is_sent_once_and_not_retried() {
    use tower_patterns::body::ReplayBody;
    let live = backend("live").await;
    let dead = closed_port().await;
    let fwd = Forward::<ReplayBody<Full<Bytes>>>::new(&dead).unwrap();
    let lb = Balance::builder()
        .health(PassiveHealth::disabled())
        .build_static([("dead", fwd.clone()), ("live", fwd.to(&live.url).unwrap())]);
    let svc = tower_patterns::balance::ReplayLayer::new(4).layer(lb.clone());
    // Round robin starts at "dead": a 5-byte body fits no 4-byte buffer, so no copy exists.
    let req = Request::post("/echo")
        .body(Full::new(Bytes::from("12345")))
        .unwrap();
    let err = svc.clone().oneshot(req).await.unwrap_err();
    assert_eq!(
        tower_patterns::error::error_status(&*err),
        StatusCode::BAD_GATEWAY
    );
    assert_eq!(live.hits.load(SeqCst), 0);
    // Within the limit: the request that starts at "dead" is retried on "live".
    for _ in 0..2 {
        let req = Request::post("/echo")
            .body(Full::new(Bytes::from("1234")))
            .unwrap();
        let res = svc.clone().oneshot(req).await.unwrap();
        assert_eq!(text(res).await, "live:1234");
    }
    let dead = lb
        .endpoints()
        .into_iter()
        .find(|e| e.key == "dead")
        .unwrap();
    assert_eq!(dead.requests, 2, "one over the limit, one retried");
}

/// The peer-to-peer client rotates over its servers on `Forward`'s pool, and each server
/// sees its own authority as `Host` (not a stale one from the caller).
#[tokio::test]
async fn peer_to_peer_client_uses_forward_and_sets_host_per_server() {
    let mut addrs = Vec::new();
    for _ in 0..2 {
        let svc = tower::service_fn(|req: Request<Incoming>| async move {
            let host = req
                .headers()
                .get(header::HOST)
                .map(|h| h.to_str().unwrap_or("?").to_owned())
                .unwrap_or_default();
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(host))))
        });
        addrs.push(
            tower_patterns::server::spawn_local(svc)
                .await
                .unwrap()
                .addr(),
        );
    }
    let servers: Vec<String> = addrs.iter().map(|a| format!("http://{a}")).collect();
    let lb = tower_patterns::balance::client::balanced::<http_body_util::Empty<Bytes>, _, _>(
        Balance::builder(),
        &servers,
    )
    .unwrap();
    let mut seen = Vec::new();
    for _ in 0..2 {
        let req = Request::get("/x")
            .header(header::HOST, "caller.example")
            .body(http_body_util::Empty::new())
            .unwrap();
        let res = lb.clone().oneshot(req).await.unwrap();
        let body = res.into_body().collect().await.unwrap().to_bytes();
        seen.push(String::from_utf8(body.to_vec()).unwrap());
    }
    seen.sort();
    let mut want: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
    want.sort();
    assert_eq!(seen, want);
    assert!(
        tower_patterns::balance::client::balanced::<http_body_util::Empty<Bytes>, _, _>(
            Balance::builder(),
            ["https://127.0.0.1:1"],
        )
        .is_err()
    );
}

/// A body that records whether it was read to its end.
struct Tracked {
    data: Option<Bytes>,
    ended: Arc<AtomicBool>,
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        match self.data.take() {
            Some(d) => std::task::Poll::Ready(Some(Ok(http_body::Frame::data(d)))),
            None => {
                self.ended.store(true, SeqCst);
                std::task::Poll::Ready(None)
            }
        }
    }
    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.data.as_ref().map_or(0, |d| d.len() as u64))
    }
}

/// A response the balancer retries elsewhere is discarded the way the chain discards a
/// skipped link's answer: a short body is read to its end (so its keep-alive connection
/// is reused), not dropped.
#[tokio::test]
async fn a_retried_response_is_drained_like_a_skipped_chain_link() {
    let ended = Arc::new(AtomicBool::new(false));
    let e = ended.clone();
    let failing = tower::service_fn(move |_r: Request<Full<Bytes>>| {
        let e = e.clone();
        async move {
            let body = Tracked {
                data: Some(Bytes::from_static(b"busy")),
                ended: e,
            };
            Ok::<_, Infallible>(Response::builder().status(503).body(body).unwrap())
        }
    });
    let healthy = tower::service_fn(|_r: Request<Full<Bytes>>| async {
        let body = Tracked {
            data: Some(Bytes::from_static(b"ok")),
            ended: Arc::new(AtomicBool::new(false)),
        };
        Ok::<_, Infallible>(Response::builder().status(200).body(body).unwrap())
    });
    let lb = Balance::builder()
        .retry(tower_patterns::balance::Retry::default().on("5xx".parse().unwrap()))
        .build_static([
            ("a", tower::util::BoxCloneSyncService::new(failing)),
            ("b", tower::util::BoxCloneSyncService::new(healthy)),
        ]);
    let mut answered = 0;
    for _ in 0..2 {
        let res = lb
            .clone()
            .oneshot(Request::get("/").body(Full::new(Bytes::new())).unwrap())
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        answered += 1;
    }
    assert_eq!(answered, 2);
    // The drain runs on its own task; wait for it, bounded.
    for _ in 0..1000 {
        if ended.load(SeqCst) {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert!(
        ended.load(SeqCst),
        "the retried 503's body was dropped, not drained"
    );
}
