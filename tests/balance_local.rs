//! A balancer instance calls its own clone of each endpoint's service (issue 12: no clone
//! from the shared snapshot per try, and a service's per-instance state, such as
//! `Forward`'s last `X-Forwarded-For` value, is kept between a connection's requests).
//! What must not change: membership is the snapshot's (a removed endpoint is never called
//! through a kept clone), and a service that is not ready waits with its request without
//! blocking the instance's next ones.

use std::convert::Infallible;
use std::future::{ready, Ready};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use tower::{Service, ServiceExt};
use tower_patterns::balance::{discover, Balance};

fn get() -> Request<Full<Bytes>> {
    Request::get("/").body(Full::new(Bytes::new())).unwrap()
}

/// Answers with its name and how many requests this instance (not its clones) has
/// served; counts how often it is cloned.
struct Named {
    name: &'static str,
    served_here: usize,
    clones: Arc<AtomicUsize>,
}

impl Clone for Named {
    fn clone(&self) -> Self {
        self.clones.fetch_add(1, SeqCst);
        Named {
            name: self.name,
            served_here: self.served_here,
            clones: self.clones.clone(),
        }
    }
}

impl Service<Request<Full<Bytes>>> for Named {
    type Response = Response<String>;
    type Error = Infallible;
    type Future = Ready<Result<Response<String>, Infallible>>;
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, _req: Request<Full<Bytes>>) -> Self::Future {
        self.served_here += 1;
        ready(Ok(Response::new(format!(
            "{} {}",
            self.name, self.served_here
        ))))
    }
}

fn named(name: &'static str, clones: &Arc<AtomicUsize>) -> Named {
    Named {
        name,
        served_here: 0,
        clones: clones.clone(),
    }
}

async fn send<S>(lb: &mut S) -> String
where
    S: Service<Request<Full<Bytes>>, Response = Response<String>>,
    S::Error: std::fmt::Debug,
{
    lb.ready()
        .await
        .unwrap()
        .call(get())
        .await
        .unwrap()
        .into_body()
}

#[tokio::test]
async fn one_instance_calls_the_same_endpoint_clone_for_each_request() {
    let clones = Arc::new(AtomicUsize::new(0));
    let mut lb =
        Balance::builder().build_static([("a", named("a", &clones)), ("b", named("b", &clones))]);
    // The instance's first call is served by a clone from the snapshot: an instance called
    // once (a clone per request, as axum's `Router` makes) keeps nothing. It keeps its own
    // clones from the second call on.
    assert_eq!(send(&mut lb).await, "a 1");
    let mut seen = Vec::new();
    for _ in 0..2 {
        seen.push(send(&mut lb).await);
    }
    let clones_after_first_round = clones.load(SeqCst);
    for _ in 0..4 {
        seen.push(send(&mut lb).await);
    }
    seen.sort();
    // Each endpoint's clone in this instance served its three requests itself.
    assert_eq!(seen, ["a 1", "a 2", "a 3", "b 1", "b 2", "b 3"]);
    assert_eq!(
        clones.load(SeqCst),
        clones_after_first_round,
        "no clone from the snapshot per request once the instance has its own"
    );
    // Another instance (a clone of the balancer: another connection) has its own clones.
    let mut other = lb.clone();
    let first = send(&mut other).await;
    assert!(first.ends_with(" 1"), "{first}");
}

#[tokio::test]
async fn a_kept_clone_never_outlives_its_endpoints_membership() {
    let clones = Arc::new(AtomicUsize::new(0));
    let (tx, disc) = discover::channel();
    let mut lb = Balance::builder().spawn(disc).unwrap();
    let mut members = lb.members();
    tx.insert("a", named("a", &clones));
    tx.insert("b", named("b", &clones));
    members.wait_for(|n| *n == 2).await.unwrap();
    for _ in 0..4 {
        send(&mut lb).await;
    }
    tx.remove("a");
    tx.insert("c", named("c", &clones));
    // Removal and insertion may publish separately: wait until `a` is gone and `c` is in.
    tokio::time::timeout(Duration::from_secs(5), async {
        while lb.endpoints().iter().map(|e| e.key).collect::<Vec<_>>() != ["b", "c"] {
            members.changed().await.unwrap();
        }
    })
    .await
    .expect("the set became {b, c}");
    let mut after = Vec::new();
    for _ in 0..4 {
        after.push(send(&mut lb).await);
    }
    assert!(after.iter().all(|r| !r.starts_with('a')), "{after:?}");
    assert_eq!(after.iter().filter(|r| r.starts_with('c')).count(), 2);
    drop(tx);
}

#[tokio::test(start_paused = true)]
async fn a_not_ready_endpoint_parks_its_request_and_the_instance_goes_on() {
    // One request at a time (a real tower `ConcurrencyLimit`); the first one is held
    // until `release`, so the second finds the endpoint not ready.
    let hold = Arc::new(AtomicBool::new(true));
    let release = Arc::new(tokio::sync::Notify::new());
    let inner = {
        let (hold, release) = (hold.clone(), release.clone());
        tower::service_fn(move |_r: Request<Full<Bytes>>| {
            let held = hold.swap(false, SeqCst);
            let release = release.clone();
            async move {
                if held {
                    release.notified().await;
                }
                Ok::<_, Infallible>(Response::new(String::from("ok")))
            }
        })
    };
    let svc = tower::limit::ConcurrencyLimit::new(inner, 1);
    let mut lb = Balance::builder().build_static([("a", svc)]);
    let first = tokio::spawn(lb.ready().await.unwrap().call(get()));
    let second = tokio::spawn(lb.ready().await.unwrap().call(get()));
    tokio::task::yield_now().await;
    assert!(
        !second.is_finished(),
        "waits for the first request's permit"
    );
    release.notify_one();
    let wait = Duration::from_secs(5);
    for (name, task) in [("first", first), ("second", second)] {
        let res = tokio::time::timeout(wait, task).await;
        let body = res.expect(name).expect(name).expect(name).into_body();
        assert_eq!(body, "ok", "{name}");
    }
    // The instance's next request is not stuck behind the parked one's state.
    let third = tokio::time::timeout(wait, async { lb.ready().await.unwrap().call(get()).await })
        .await
        .expect("third request answered");
    assert_eq!(third.unwrap().into_body(), "ok");
}
