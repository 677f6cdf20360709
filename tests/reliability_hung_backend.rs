//! Reliability scenario (a) of issue 10: one of three backends stops answering (accepts
//! requests, never responds: SIGSTOP, a deadlock, a GC pause) for 21 s under keep-alive
//! load through the balanced reverse-proxy stack on **defaults**
//! (`ErrorResponseLayer` + `ReplayLayer` + `Balance` with default picker, health, retry and
//! per-try timeout + `Forward` with defaults), all over real sockets on 127.0.0.1.
//! Bounded: ~24 s.
//!
//! What must hold:
//! - every request is answered 2xx (GETs are idempotent: a try that hangs is cut by the
//!   default 10 s per-try timeout and retried on another backend);
//! - throughput never falls below a floor in any one-second bucket: round robin's bounded
//!   load stops sending to the backend once it holds more than twice the others' mean in
//!   flight, so only a few closed-loop clients wait on it while the rest keep going;
//! - the hung backend is ejected once its tries time out, and when `fail_timeout` (10 s)
//!   has passed it gets exactly one trial request, not a third of the traffic.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower::ServiceBuilder;
use tower_patterns::balance::{Balance, EndpointState, ReplayLayer};
use tower_patterns::body::ReplayBody;
use tower_patterns::proxy::{ErrorResponseLayer, Forward};

const CLIENTS: usize = 8;
const STALL_AT: Duration = Duration::from_millis(1500);
// Past the trial (timeouts at ~STALL_AT + 10 s eject it, the trial comes 10 s later), so
// the trial is seen held; released a second after it.
const STALL_FOR: Duration = Duration::from_secs(21);
const RUN_FOR: Duration = Duration::from_secs(24);
const TRY_TIMEOUT: Duration = tower_patterns::balance::DEFAULT_TRY_TIMEOUT;

/// A backend that answers its name, or, while `stalled`, takes the request and holds it
/// until resumed (recording when each held request arrived).
struct Backend {
    url: String,
    stalled: tokio::sync::watch::Sender<bool>,
    held: Arc<Mutex<Vec<Duration>>>,
}

async fn backend(name: &'static str, t0: Instant) -> Backend {
    let (stalled, rx) = tokio::sync::watch::channel(false);
    let held = Arc::new(Mutex::new(Vec::new()));
    let h = held.clone();
    let svc = tower::service_fn(move |_req: Request<Incoming>| {
        let mut rx = rx.clone();
        let h = h.clone();
        async move {
            if *rx.borrow() {
                h.lock().unwrap().push(t0.elapsed());
                let _ = rx.wait_for(|s| !*s).await;
            }
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(name))))
        }
    });
    let server = tower_patterns::server::spawn_local(svc).await.unwrap();
    let url = server.url();
    std::mem::forget(server); // serves until the test process ends
    Backend { url, stalled, held }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_of_three_backends_hangs_under_keep_alive_load() {
    let t0 = Instant::now();
    let backends = [
        backend("a", t0).await,
        backend("b", t0).await,
        backend("c", t0).await,
    ];

    // The balancer stack of examples/reverse_proxy.rs, with the library defaults (the
    // balancer's per-try timer on; the example with `--workers` moves that timeout into
    // `Forward`'s response timeout instead, which balance_hardening covers).
    let first = Forward::<ReplayBody<Incoming>>::new(&backends[0].url).unwrap();
    let lb = Balance::builder().build_static(
        backends
            .iter()
            .map(|b| (b.url.clone(), first.to(&b.url).unwrap())),
    );
    let proxy = ServiceBuilder::new()
        .layer(ErrorResponseLayer)
        .layer(ReplayLayer::new(64 * 1024))
        .service(lb.clone());
    let front = tower_patterns::server::spawn_local(proxy).await.unwrap();
    let front_url = front.url();

    // Closed-loop keep-alive clients; completions counted per second.
    let buckets: Arc<Vec<AtomicU64>> = Arc::new(
        (0..RUN_FOR.as_secs() + 2)
            .map(|_| AtomicU64::new(0))
            .collect(),
    );
    let non_2xx = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let (client, url) = (client.clone(), front_url.clone());
        let (buckets, non_2xx, errors, stop) = (
            buckets.clone(),
            non_2xx.clone(),
            errors.clone(),
            stop.clone(),
        );
        tasks.push(tokio::spawn(async move {
            while !stop.load(SeqCst) {
                let req = Request::get(format!("{url}/")).body(Empty::new()).unwrap();
                match client.request(req).await {
                    Ok(res) => {
                        let ok = res.status().is_success();
                        let body = res.into_body().collect().await;
                        if !ok {
                            non_2xx.fetch_add(1, SeqCst);
                        } else if body.is_err() {
                            errors.fetch_add(1, SeqCst);
                        } else {
                            let s = t0.elapsed().as_secs() as usize;
                            buckets[s.min(buckets.len() - 1)].fetch_add(1, SeqCst);
                        }
                    }
                    Err(_) => {
                        errors.fetch_add(1, SeqCst);
                    }
                }
            }
        }));
    }

    let hung = &backends[1];
    let hung_key = hung.url.clone();
    tokio::time::sleep_until((t0 + STALL_AT).into()).await;
    hung.stalled.send_replace(true);

    // Once the held tries have timed out: ejected.
    tokio::time::sleep_until((t0 + STALL_AT + TRY_TIMEOUT + Duration::from_secs(3)).into()).await;
    let state = lb
        .endpoints()
        .into_iter()
        .find(|e| e.key == hung_key)
        .unwrap()
        .state;
    assert!(
        matches!(state, EndpointState::Ejected { .. }),
        "hung backend not ejected: {state:?}"
    );

    tokio::time::sleep_until((t0 + STALL_AT + STALL_FOR).into()).await;
    hung.stalled.send_replace(false);
    tokio::time::sleep_until((t0 + RUN_FOR).into()).await;
    stop.store(true, SeqCst);
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(5), t)
            .await
            .expect("a client is stuck")
            .unwrap();
    }

    let per_sec: Vec<u64> = buckets.iter().map(|b| b.load(SeqCst)).collect();
    let held = hung.held.lock().unwrap().clone();
    let report = format!("completions per second {per_sec:?}, held requests at {held:?}");
    eprintln!("{report}");
    assert_eq!(non_2xx.load(SeqCst), 0, "{report}");
    assert_eq!(errors.load(SeqCst), 0, "{report}");

    // Throughput floor: every full second of the run at least 10% of the median second
    // (generous: a loaded 2-core CI box jitters; a stall is ~0).
    let full = &per_sec[..RUN_FOR.as_secs() as usize];
    let mut sorted = full.to_vec();
    sorted.sort_unstable();
    let median = sorted[sorted.len() / 2];
    assert!(median >= 50, "too little load to judge: {report}");
    for (s, n) in full.iter().enumerate() {
        assert!(
            *n * 10 >= median,
            "second {s}: {n} completions, median {median}: {report}"
        );
    }

    // Held requests: the burst when the stall began (bounded by the load bound, at most
    // one per client), cut by the per-try timeout, then nothing until fail_timeout (10 s)
    // has passed, then exactly one trial request.
    let burst_end = STALL_AT + TRY_TIMEOUT + Duration::from_secs(1);
    let burst = held.iter().filter(|t| **t < burst_end).count();
    let later: Vec<_> = held.iter().filter(|t| **t >= burst_end).collect();
    assert!(
        (1..CLIENTS).contains(&burst),
        "some clients never waited: {report}"
    );
    assert_eq!(later.len(), 1, "exactly one trial request: {report}");
    assert!(
        *later[0] >= STALL_AT + TRY_TIMEOUT + Duration::from_secs(10),
        "the trial waits for fail_timeout: {report}"
    );
}
