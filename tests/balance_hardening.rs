//! Balancer hardening (issue 10): hung endpoints (per-try timeout, single trial after an
//! ejection), client-caused failures, cookie bytes, even split around an ejected endpoint,
//! saturating durations. Real sockets on 127.0.0.1 where the transport matters; plain
//! in-process services (with paused time) where only pick and health logic is under test.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Incoming;
use tower::{Layer, ServiceExt};
use tower_patterns::balance::{
    error_status, Balance, BalanceError, EndpointState, HashKey, PassiveHealth, Picker,
    ReplayLayer, Retry, StickyCookie, DEFAULT_TRY_TIMEOUT,
};
use tower_patterns::body::{boxed, BoxBody, ReplayBody};
use tower_patterns::classify::Condition;
use tower_patterns::proxy::Forward;
use tower_patterns::BoxError;

const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

type Svc = tower::util::BoxCloneSyncService<Request<Full<Bytes>>, Response<String>, BoxError>;

mod support;
use support::{silent_url, Silence};

/// An in-process endpoint answering its name (500 while `fail` is set), counting hits.
fn named(name: &'static str, hits: Arc<AtomicUsize>) -> Svc {
    tower::util::BoxCloneSyncService::new(tower::service_fn(move |_r: Request<Full<Bytes>>| {
        hits.fetch_add(1, SeqCst);
        async move { Ok::<_, BoxError>(Response::new(name.to_string())) }
    }))
}

/// An in-process endpoint that takes the request and never answers (SIGSTOP, deadlock).
fn hung(hits: Arc<AtomicUsize>) -> Svc {
    tower::util::BoxCloneSyncService::new(tower::service_fn(move |_r: Request<Full<Bytes>>| {
        hits.fetch_add(1, SeqCst);
        std::future::pending::<Result<Response<String>, BoxError>>()
    }))
}

fn get(path: &str) -> Request<Full<Bytes>> {
    Request::get(path).body(Full::new(Bytes::new())).unwrap()
}

fn state_of<S, M, C>(lb: &Balance<&'static str, S, M, C>, key: &str) -> EndpointState
where
    M: tower_patterns::balance::MakeGate<&'static str>,
{
    lb.endpoints()
        .into_iter()
        .find(|e| e.key == key)
        .unwrap()
        .state
}

// ---------------------------------------------------------------- item 1: hung endpoints

#[tokio::test(start_paused = true)]
async fn a_hung_endpoint_times_out_is_retried_elsewhere_and_gets_one_trial_not_a_share() {
    let (h, a, b) = (Arc::default(), Arc::default(), Arc::default());
    // All defaults: per-try timeout 10 s, max_fails=1 fail_timeout=10s, 3 tries.
    let lb = Balance::builder().build_static([
        ("hung", hung(Arc::clone(&h))),
        ("a", named("a", Arc::clone(&a))),
        ("b", named("b", Arc::clone(&b))),
    ]);
    // Round robin starts at "hung": the try times out after 10 s (virtual), counts as a
    // failure (ejected) and the GET is answered by the next endpoint.
    let t0 = tokio::time::Instant::now();
    let res = tokio::time::timeout(Duration::from_secs(60), lb.clone().oneshot(get("/")))
        .await
        .expect("a hung endpoint must not stall the request")
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.into_body(), "a");
    assert_eq!(t0.elapsed(), DEFAULT_TRY_TIMEOUT);
    assert!(matches!(
        state_of(&lb, "hung"),
        EndpointState::Ejected { .. }
    ));
    assert_eq!(h.load(SeqCst), 1);

    // After fail_timeout, 60 concurrent requests: the still-hung endpoint gets exactly one
    // trial (not 1/3 of them), every request is answered 200.
    tokio::time::advance(Duration::from_secs(11)).await;
    assert_eq!(state_of(&lb, "hung"), EndpointState::Probation);
    let reqs = (0..60).map(|_| lb.clone().oneshot(get("/")));
    let all = tokio::time::timeout(
        Duration::from_secs(60),
        futures_util::future::join_all(reqs),
    )
    .await
    .expect("no request may stall");
    for r in all {
        assert_eq!(r.unwrap().status(), StatusCode::OK);
    }
    assert_eq!(
        h.load(SeqCst),
        2,
        "one trial request, not a share of the traffic"
    );
    // The trial timed out: ejected again for a full fail_timeout.
    match state_of(&lb, "hung") {
        EndpointState::Ejected { remaining } => assert!(remaining > Duration::from_secs(9)),
        s => panic!("expected ejected, got {s:?}"),
    }
    assert_eq!(
        a.load(SeqCst) + b.load(SeqCst),
        61,
        "everything else went to the live endpoints"
    );
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_trial_hands_the_trial_to_the_next_request() {
    let h = Arc::new(AtomicUsize::new(0));
    let lb = Balance::builder()
        .retry(Retry::never())
        .build_static([("hung", hung(h.clone())), ("a", named("a", Arc::default()))]);
    // Eject "hung" (its try times out; no retry: 504).
    let err = tokio::time::timeout(Duration::from_secs(60), lb.clone().oneshot(get("/")))
        .await
        .expect("the per-try timeout ends the request")
        .unwrap_err();
    assert_eq!(err.status(), StatusCode::GATEWAY_TIMEOUT, "{err}");
    assert!(matches!(
        state_of(&lb, "hung"),
        EndpointState::Ejected { .. }
    ));
    tokio::time::advance(Duration::from_secs(11)).await;

    // The request that takes the trial is given up by its client after 1 s.
    lb.clone().oneshot(get("/")).await.unwrap(); // round robin: "a" first
    let cancelled = tokio::time::timeout(Duration::from_secs(1), lb.clone().oneshot(get("/")));
    assert!(cancelled.await.is_err());
    assert_eq!(h.load(SeqCst), 2);
    // The trial is not lost: the endpoint is not stuck out of rotation, the next pick
    // that reaches it sends the trial.
    assert_eq!(state_of(&lb, "hung"), EndpointState::Probation);
    for _ in 0..2 {
        let _ = tokio::time::timeout(Duration::from_secs(1), lb.clone().oneshot(get("/"))).await;
    }
    assert_eq!(h.load(SeqCst), 3);
}

/// A real HTTP server answering `name`; request bodies are read and dropped (errors too).
async fn live_server(name: &'static str) -> (String, Arc<AtomicUsize>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let svc = tower::service_fn(move |req: Request<Incoming>| {
        let h = h.clone();
        async move {
            h.fetch_add(1, SeqCst);
            let _ = req.into_body().collect().await;
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(name))))
        }
    });
    let server = tower_patterns::server::spawn_local(svc).await.unwrap();
    let url = format!("http://{}", server.addr());
    std::mem::forget(server); // lives for the test process
    (url, hits)
}

#[tokio::test]
async fn over_real_sockets_a_hung_backend_is_retried_elsewhere_and_a_post_gets_504() {
    let (hung_url, hung_hits) = silent_url(Silence::Hang).await;
    let (a_url, _) = live_server("a").await;
    let (b_url, _) = live_server("b").await;
    let fwd = Forward::<Full<Bytes>>::new(&hung_url).unwrap();
    let lb = Balance::builder()
        .try_timeout(Duration::from_millis(200))
        .build_static([
            ("hung", fwd.clone()),
            ("a", fwd.to(&a_url).unwrap()),
            ("b", fwd.to(&b_url).unwrap()),
        ]);
    for _ in 0..20 {
        let res = tokio::time::timeout(Duration::from_secs(10), lb.clone().oneshot(get("/")))
            .await
            .expect("a hung backend must not stall the request")
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
    }
    assert_eq!(hung_hits.load(SeqCst), 1, "tried once, then ejected");
    assert!(matches!(
        state_of(&lb, "hung"),
        EndpointState::Ejected { .. }
    ));

    // A POST was sent and may have been acted on: not retried; no answer in time is 504.
    let lb = Balance::builder()
        .try_timeout(Duration::from_millis(200))
        .build_static([("hung", fwd.clone()), ("a", fwd.to(&a_url).unwrap())]);
    let post = Request::post("/")
        .body(Full::new(Bytes::from("x")))
        .unwrap();
    let err = tokio::time::timeout(Duration::from_secs(10), lb.clone().oneshot(post))
        .await
        .expect("the per-try timeout ends the request")
        .unwrap_err();
    assert!(
        matches!(err, BalanceError::Upstream { tries: 1, .. }),
        "{err:?}"
    );
    assert_eq!(err.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(error_status(&err), StatusCode::GATEWAY_TIMEOUT);
}

/// The configuration `examples/reverse_proxy.rs` runs (one timer per try, not two): the
/// balancer's per-try timer off, `Forward`'s response timeout as the limit. A hung backend
/// still times out, is retried elsewhere and ejected.
#[tokio::test]
async fn with_forwards_response_timeout_instead_of_the_try_timer_a_hung_backend_still_times_out() {
    let (hung_url, hung_hits) = silent_url(Silence::Hang).await;
    let (a_url, _) = live_server("a").await;
    let fwd = tower_patterns::proxy::ForwardBuilder::new(hung_url.as_str())
        .response_timeout(Duration::from_millis(200))
        .build::<Full<Bytes>>()
        .unwrap();
    let lb = Balance::builder()
        .try_timeout(None)
        .build_static([("hung", fwd.clone()), ("a", fwd.to(&a_url).unwrap())]);
    for _ in 0..10 {
        let res = tokio::time::timeout(Duration::from_secs(10), lb.clone().oneshot(get("/")))
            .await
            .expect("a hung backend must not stall the request")
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
    }
    assert_eq!(hung_hits.load(SeqCst), 1, "tried once, then ejected");
    assert!(matches!(
        state_of(&lb, "hung"),
        EndpointState::Ejected { .. }
    ));
}

// ---------------------------------------------------- item 7: client-caused failures

/// A request body that sends `prefix` bytes and then fails (an aborted upload).
fn aborted_upload(prefix: usize) -> BoxBody {
    let frames: Vec<Result<http_body::Frame<Bytes>, BoxError>> = vec![
        Ok(http_body::Frame::data(Bytes::from(vec![b'x'; prefix]))),
        Err("client went away mid-upload".into()),
    ];
    boxed(StreamBody::new(futures_util::stream::iter(frames)))
}

#[tokio::test]
async fn three_aborted_uploads_do_not_eject_a_healthy_backend_and_get_400() {
    let (a_url, _) = live_server("a").await;
    let (b_url, _) = live_server("b").await;
    let fwd = Forward::<ReplayBody<_>>::new(&a_url).unwrap();
    let lb = Balance::builder().build_static([("a", fwd.clone()), ("b", fwd.to(&b_url).unwrap())]);
    // Bodies over the 16-byte replay limit are streamed once; these break mid-way.
    let svc = ReplayLayer::new(16).layer(lb.clone());
    for _ in 0..3 {
        let req = Request::post("/upload").body(aborted_upload(64)).unwrap();
        let err = svc.clone().oneshot(req).await.unwrap_err();
        assert_eq!(error_status(&*err), StatusCode::BAD_REQUEST, "{err:?}");
    }
    for e in lb.endpoints() {
        assert_eq!(e.state, EndpointState::Healthy, "{e:?}");
        assert_eq!(e.failures, 0, "{e:?}");
    }
    // Both still serve.
    let mut seen = std::collections::HashSet::new();
    for _ in 0..4 {
        let req = Request::get("/").body(boxed(http_body_util::Empty::<Bytes>::new()));
        let res = svc.clone().oneshot(req.unwrap()).await.unwrap();
        seen.insert(res.into_body().collect().await.unwrap().to_bytes());
    }
    assert_eq!(seen.len(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_client_error_is_neither_counted_nor_retried() {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let bad_body: Svc = tower::util::BoxCloneSyncService::new(tower::service_fn(
        move |_r: Request<Full<Bytes>>| {
            c.fetch_add(1, SeqCst);
            async move {
                let e = tower_patterns::body::ReplayError("malformed chunked body".into());
                Err::<Response<String>, BoxError>(Box::new(e))
            }
        },
    ));
    // Even a classifier that counts every error must not charge a client error.
    let lb = Balance::builder()
        .classify("5xx,fail".parse::<Condition>().unwrap())
        .build_static([("a", bad_body.clone()), ("b", bad_body)]);
    for _ in 0..3 {
        let err = lb.clone().oneshot(get("/")).await.unwrap_err();
        assert!(
            matches!(err, BalanceError::Upstream { tries: 1, .. }),
            "{err:?}"
        );
        assert_eq!(err.status(), StatusCode::BAD_REQUEST);
    }
    assert_eq!(calls.load(SeqCst), 3, "never retried");
    for e in lb.endpoints() {
        assert_eq!(e.state, EndpointState::Healthy);
        assert_eq!(e.failures, 0);
    }
}

// ------------------------------------------------------------- item 14: cookie bytes

fn with_cookies(lines: &[&[u8]]) -> Request<Full<Bytes>> {
    let mut req = get("/");
    for l in lines {
        req.headers_mut()
            .append(header::COOKIE, HeaderValue::from_bytes(l).unwrap());
    }
    req
}

#[tokio::test]
async fn a_non_ascii_cookie_does_not_hide_the_sticky_cookie() {
    let sticky = StickyCookie::new("lb", SECRET).unwrap();
    let lb = Balance::builder()
        .sticky(sticky.clone())
        .build_static(["a", "b", "c"].map(|n| (n, named(n, Arc::default()))));
    let id = lb
        .endpoints()
        .into_iter()
        .find(|e| e.key == "c")
        .unwrap()
        .id;
    let value = sticky.value_for(id);
    // Browsers send every cookie of the site in one line; one holds raw UTF-8.
    let one_line = format!("theme=caf\u{e9}; lb={value}; lang=fr");
    let lines: [Vec<&[u8]>; 3] = [
        vec![one_line.as_bytes()],
        vec![
            "pref=\u{1f600}".as_bytes(),
            format!("lb={value}").leak().as_bytes(),
        ],
        vec![b"x=\xff\xfe", format!("a=1; lb={value}").leak().as_bytes()],
    ];
    for cookies in &lines {
        for _ in 0..3 {
            let res = lb.clone().oneshot(with_cookies(cookies)).await.unwrap();
            assert_eq!(res.body(), "c", "{cookies:?}");
            assert!(res.headers().get(header::SET_COOKIE).is_none());
        }
    }
}

#[tokio::test]
async fn hash_key_cookie_reads_bytes() {
    let lb = Balance::builder()
        .picker(Picker::ConsistentHash(HashKey::Cookie("session".into())))
        .build_static(["a", "b", "c", "d"].map(|n| (n, named(n, Arc::default()))));
    // The same session must map to one endpoint whatever other cookies hold; without the
    // key the request falls back to round robin and would visit several endpoints.
    for s in ["s1", "s2", "s3", "s4", "s5"] {
        let mut owners = std::collections::HashSet::new();
        for other in ["plain=1", "n=\u{e9}t\u{e9}", "z=\u{1f600}\u{1f600}"] {
            let line = format!("{other}; session={s}");
            for _ in 0..2 {
                let res = lb
                    .clone()
                    .oneshot(with_cookies(&[line.as_bytes()]))
                    .await
                    .unwrap();
                owners.insert(res.into_body());
            }
        }
        assert_eq!(owners.len(), 1, "session {s}: {owners:?}");
    }
}

// ------------------------------------------------- item 15: even split around ejection

async fn split_after_ejecting_b(picker: Picker, weights: [u32; 3], n: usize) -> [usize; 3] {
    let hits: [Arc<AtomicUsize>; 3] = Default::default();
    let b_hits = hits[1].clone();
    let b_fails = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let bf = b_fails.clone();
    let b: Svc = tower::util::BoxCloneSyncService::new(tower::service_fn(
        move |_r: Request<Full<Bytes>>| {
            b_hits.fetch_add(1, SeqCst);
            let fail = bf.load(SeqCst);
            async move {
                let mut r = Response::new("b".to_string());
                if fail {
                    *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                }
                Ok::<_, BoxError>(r)
            }
        },
    ));
    let lb = Balance::builder()
        .picker(picker)
        .weight(move |k: &&'static str| match *k {
            "a" => weights[0],
            "b" => weights[1],
            _ => weights[2],
        })
        .classify("5xx".parse::<Condition>().unwrap())
        .retry(Retry::never())
        .build_static([
            ("a", named("a", hits[0].clone())),
            ("b", b),
            ("c", named("c", hits[2].clone())),
        ]);
    while !matches!(state_of(&lb, "b"), EndpointState::Ejected { .. }) {
        lb.clone().oneshot(get("/")).await.unwrap();
    }
    for h in &hits {
        h.store(0, SeqCst);
    }
    for _ in 0..n {
        lb.clone().oneshot(get("/")).await.unwrap();
    }
    hits.map(|h| h.load(SeqCst))
}

#[tokio::test(start_paused = true)]
async fn survivors_split_an_ejected_endpoints_share_evenly() {
    // Round robin: 300 requests over a and c, 150 each (the neighbour used to take 2/3).
    let [a, b, c] = split_after_ejecting_b(Picker::RoundRobin, [1, 1, 1], 300).await;
    assert_eq!(b, 0);
    assert!(
        (140..=160).contains(&a) && (140..=160).contains(&c),
        "a={a} c={c}"
    );

    // Weighted 2:1:1 with b ejected: a and c keep their 2:1 ratio (was 1:1).
    let [a, b, c] = split_after_ejecting_b(Picker::WeightedRoundRobin, [2, 1, 1], 300).await;
    assert_eq!(b, 0);
    assert!(
        (190..=210).contains(&a) && (90..=110).contains(&c),
        "a={a} c={c}"
    );
}

// ------------------------------------------------- item 5: durations saturate

#[tokio::test(start_paused = true)]
async fn huge_configured_durations_saturate_instead_of_panicking() {
    let h = Arc::new(AtomicUsize::new(0));
    let lb = Balance::builder()
        .health(PassiveHealth::new(1, Duration::MAX))
        .retry(Retry::default().timeout(Duration::MAX))
        .try_timeout(Duration::MAX)
        .queue_timeout(Duration::MAX)
        .classify("5xx".parse::<Condition>().unwrap())
        .build_static([
            (
                "bad",
                tower::util::BoxCloneSyncService::new(tower::service_fn(
                    |_r: Request<Full<Bytes>>| async {
                        let mut r = Response::new("bad".to_string());
                        *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                        Ok::<_, BoxError>(r)
                    },
                )) as Svc,
            ),
            ("a", named("a", h.clone())),
        ]);
    for _ in 0..4 {
        lb.clone().oneshot(get("/")).await.unwrap();
    }
    // Ejected "forever" (saturated), not for a wrapped-around few milliseconds.
    match state_of(&lb, "bad") {
        EndpointState::Ejected { remaining } => {
            assert!(remaining > Duration::from_secs(86_400 * 365))
        }
        s => panic!("{s:?}"),
    }
    tokio::time::advance(Duration::from_secs(86_400)).await;
    for _ in 0..4 {
        assert_eq!(lb.clone().oneshot(get("/")).await.unwrap().body(), "a");
    }
    // An empty set with a saturated queue timeout waits (no panic computing the deadline).
    let empty = Balance::builder()
        .queue_timeout(Duration::MAX)
        .build_static(Vec::<(&'static str, Svc)>::new());
    let waited = tokio::time::timeout(Duration::from_secs(5), empty.oneshot(get("/"))).await;
    assert!(waited.is_err(), "still queued");
}
