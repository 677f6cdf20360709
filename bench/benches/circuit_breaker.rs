//! Closed-state overhead per call: this crate's breaker against `failsafe`, `recloser` and
//! `tower-resilience-circuitbreaker`, in the same run.
//!
//! Two shapes, compared like for like:
//! - `gate/*`: the synchronous admit + record API (failsafe's and recloser's `call`, our
//!   `try_acquire` + `complete`);
//! - `tower/*`: a `tower::Service` around an always-ready inner service, polled once with a
//!   no-op waker (ours and tower-resilience's; `tower/baseline` is the bare inner service).
//!
//! Each shape runs single-threaded (`1t`) and with two threads hammering the same breaker
//! (`2t`, time per call per thread; the tower services are then driven by one
//! current-thread Tokio runtime per thread).
//!
//! `circuit_breaker_mixed/*` runs mixed outcomes (0, 2, 10 % failures) with like-for-like
//! windows; `BENCH_CLOCK=cpu` times them in thread CPU time (see `util/cpuclock.rs`).
//!
//! `cargo bench -p tower-patterns-bench --bench circuit_breaker -- --warm-up-time 1 --measurement-time 3`

use std::convert::Infallible;
use std::future::Future;
use std::hint::black_box;
use std::pin::pin;
use std::sync::{Arc, Barrier};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use http::{Request, Response};
use tower::Service;
use tower_layer::Layer;
use tower_patterns::breaker::{Circuit, CircuitBreakerConfig, CircuitBreakerLayer, Window};
use tower_patterns::classify::{Classifier, Classify, FailureKind, Outcome};

fn ours_cfg() -> CircuitBreakerConfig {
    CircuitBreakerConfig::new()
        .failure_rate_threshold(50.0)
        .window(Window::Count(100))
        .minimum_calls(100)
}

fn failsafe_cb() -> impl failsafe::CircuitBreaker + Send + Sync + Clone + 'static {
    let backoff = failsafe::backoff::constant(Duration::from_secs(60));
    let policy = failsafe::failure_policy::success_rate_over_time_window(
        0.5,
        100,
        Duration::from_secs(30),
        backoff,
    );
    failsafe::Config::new().failure_policy(policy).build()
}

fn recloser_cb() -> recloser::Recloser {
    recloser::Recloser::custom()
        .error_rate(0.5)
        .closed_len(100)
        .half_open_len(10)
        .open_wait(Duration::from_secs(60))
        .build()
}

/// Polls a future that is expected to be ready at once (it is, for every service here).
#[inline]
fn poll_now<F: Future>(fut: F) -> F::Output {
    let mut fut = pin!(fut);
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return v;
        }
    }
}

#[derive(Clone, Copy)]
struct Ready;

impl Service<Request<()>> for Ready {
    type Response = Response<()>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Response<()>, Infallible>>;
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, _req: Request<()>) -> Self::Future {
        std::future::ready(Ok(Response::new(())))
    }
}

#[inline]
fn tower_call<S>(svc: &mut S)
where
    S: Service<Request<()>, Response = Response<()>>,
    S::Error: std::fmt::Debug,
{
    let mut cx = Context::from_waker(Waker::noop());
    while svc.poll_ready(&mut cx).is_pending() {}
    let res = poll_now(svc.call(Request::new(())));
    black_box(res.is_ok());
}

#[path = "util/cpuclock.rs"]
mod cpuclock;

/// Runs `op` `iters` times on this thread (see `cpuclock` for `BENCH_CLOCK=cpu`).
///
/// `op` is a generic parameter, not a `fn` pointer: an indirect call per iteration (with
/// its register saves) cost about as much as our whole closed-state call and, added to
/// every library alike, pulled every ratio towards 1.
fn one_thread<T, F: Fn(&mut T)>(iters: u64, st: &mut T, op: F) -> Duration {
    cpuclock::measure(|| {
        for _ in 0..iters {
            op(st);
        }
    })
}

/// Runs `op` on two threads at once, `iters` times each; the time per call per thread.
fn two_threads<T: Send + Clone, F: Fn(&mut T) + Copy + Send>(
    iters: u64,
    state: T,
    op: F,
) -> Duration {
    let barrier = Arc::new(Barrier::new(2));
    let times: Vec<Duration> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..2)
            .map(|_| {
                let barrier = barrier.clone();
                let mut st = state.clone();
                s.spawn(move || {
                    barrier.wait();
                    one_thread(iters, &mut st, op)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    times.into_iter().max().unwrap_or_default()
}

/// Like [`two_threads`] for a tower service, each thread driving it from its own
/// current-thread Tokio runtime (so a service whose lock returns `Pending` under
/// contention is parked and woken, not spun on).
fn two_threads_async<S>(iters: u64, svc: S) -> Duration
where
    S: Service<Request<()>, Response = Response<()>> + Clone + Send,
    S::Error: std::fmt::Debug,
{
    use tower::ServiceExt;
    let barrier = Arc::new(Barrier::new(2));
    let times: Vec<Duration> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..2)
            .map(|_| {
                let barrier = barrier.clone();
                let mut svc = svc.clone();
                s.spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .build()
                        .unwrap();
                    barrier.wait();
                    let start = Instant::now();
                    rt.block_on(async {
                        for _ in 0..iters {
                            let res = svc.ready().await.unwrap().call(Request::new(())).await;
                            black_box(res.is_ok());
                        }
                    });
                    start.elapsed()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    times.into_iter().max().unwrap_or_default()
}

/// A classifier the size of a byte (statuses >= 500 fail): shows how much of the tower
/// path is copying `Condition` into each response future (264 bytes until session 12, 32 now).
#[derive(Clone, Copy)]
struct Small;

impl Classify for Small {
    type Classifier = Small;
    fn classify_request<B>(&self, _req: &Request<B>) -> Small {
        Small
    }
}

impl Classifier for Small {
    fn classify_response<B>(self, res: &Response<B>) -> Outcome {
        if res.status().is_server_error() {
            Outcome::Failure(FailureKind::Status(res.status()))
        } else {
            Outcome::Success
        }
    }
    fn classify_error(self, _err: &(dyn std::error::Error + 'static)) -> Outcome {
        Outcome::Failure(FailureKind::Other)
    }
}

fn gate_ours(b: &mut Circuit) {
    let p = b.try_acquire().unwrap();
    b.complete(p, Outcome::Success, Duration::ZERO);
}

fn gate_failsafe<C: failsafe::CircuitBreaker>(c: &mut C) {
    black_box(c.call(|| Ok::<(), ()>(())).is_ok());
}

fn gate_recloser(r: &mut Arc<recloser::Recloser>) {
    black_box(r.call(|| Ok::<(), ()>(())).is_ok());
}

fn bench(c: &mut Criterion) {
    let ours = Circuit::new(ours_cfg()).unwrap();
    let fs = failsafe_cb();
    let rc = Arc::new(recloser_cb());

    let mut g = c.benchmark_group("circuit_breaker_closed/gate_1t");
    g.bench_function("tower-patterns", |bn| {
        let mut b = ours.clone();
        bn.iter(|| gate_ours(&mut b))
    });
    g.bench_function("tower-patterns-time-window", |bn| {
        let mut b = Circuit::new(ours_cfg().window(Window::Time(Duration::from_secs(10)))).unwrap();
        bn.iter(|| gate_ours(&mut b))
    });
    g.bench_function("failsafe", |bn| {
        let mut f = fs.clone();
        bn.iter(|| gate_failsafe(&mut f))
    });
    g.bench_function("recloser", |bn| {
        let mut r = rc.clone();
        bn.iter(|| gate_recloser(&mut r))
    });
    g.finish();

    let mut g = c.benchmark_group("circuit_breaker_closed/gate_2t");
    g.bench_function("tower-patterns", |bn| {
        bn.iter_custom(|n| two_threads(n, ours.clone(), gate_ours))
    });
    g.bench_function("failsafe", |bn| {
        bn.iter_custom(|n| two_threads(n, fs.clone(), gate_failsafe))
    });
    g.bench_function("recloser", |bn| {
        bn.iter_custom(|n| two_threads(n, rc.clone(), gate_recloser))
    });
    g.finish();

    let ours_svc = CircuitBreakerLayer::new(ours_cfg()).unwrap().layer(Ready);
    let tr_layer = tower_resilience_circuitbreaker::CircuitBreakerLayer::builder()
        .failure_rate_threshold(0.5)
        .sliding_window_size(100)
        .minimum_number_of_calls(100)
        .build()
        .unwrap();
    let tr_svc = tr_layer.layer(Ready);
    let ours_small = CircuitBreakerLayer::new(ours_cfg())
        .unwrap()
        .classify(Small)
        .layer(Ready);

    let mut g = c.benchmark_group("circuit_breaker_closed/tower_1t");
    g.bench_function("baseline", |bn| {
        let mut s = Ready;
        bn.iter(|| tower_call(&mut s))
    });
    g.bench_function("tower-patterns", |bn| {
        let mut s = ours_svc.clone();
        bn.iter(|| tower_call(&mut s))
    });
    g.bench_function("tower-resilience", |bn| {
        let mut s = tr_svc.clone();
        bn.iter(|| tower_call(&mut s))
    });
    g.bench_function("tower-patterns-small-classifier", |bn| {
        let mut s = ours_small.clone();
        bn.iter(|| tower_call(&mut s))
    });
    g.finish();

    let mut g = c.benchmark_group("circuit_breaker_closed/tower_2t");
    g.bench_function("baseline", |bn| {
        bn.iter_custom(|n| two_threads_async(n, Ready))
    });
    g.bench_function("tower-patterns", |bn| {
        bn.iter_custom(|n| two_threads_async(n, ours_svc.clone()))
    });
    g.bench_function("tower-resilience", |bn| {
        bn.iter_custom(|n| two_threads_async(n, tr_svc.clone()))
    });
    g.finish();
}

/// One breaker plus this thread's countdown: every `every`-th call fails (`every == 0`:
/// none), so each thread sees the same deterministic mix. A countdown, not `i % every`: a
/// 64-bit division costs about as much as the fastest breaker call and would flatten the
/// ratios.
#[derive(Clone)]
struct Mixed<B> {
    b: B,
    i: u64,
    every: u64,
}

impl<B> Mixed<B> {
    /// `b` failing one call in `every` (never when 0).
    fn new(b: B, every: u64) -> Self {
        Mixed { b, i: 0, every }
    }

    #[inline]
    fn next_fails(&mut self) -> bool {
        if self.every == 0 {
            return false;
        }
        self.i += 1;
        if self.i == self.every {
            self.i = 0;
            return true;
        }
        false
    }
}

fn mixed_ours(m: &mut Mixed<Circuit>) {
    let fail = m.next_fails();
    let p = m.b.try_acquire().unwrap();
    let outcome = if fail {
        Outcome::Failure(FailureKind::Other)
    } else {
        Outcome::Success
    };
    m.b.complete(p, outcome, Duration::ZERO);
}

fn mixed_recloser(m: &mut Mixed<Arc<recloser::Recloser>>) {
    let fail = m.next_fails();
    black_box(m.b.call(|| if fail { Err(()) } else { Ok(()) }).is_ok());
}

fn mixed_failsafe<C: failsafe::CircuitBreaker>(m: &mut Mixed<C>) {
    let fail = m.next_fails();
    black_box(m.b.call(|| if fail { Err(()) } else { Ok(()) }).is_ok());
}

/// Mixed outcomes (0 %, 2 %, 10 % failures, all below the 50 % threshold so nobody trips),
/// like-for-like windows: our count window against recloser's (a count ring), our time
/// window against failsafe's (a time window; recloser has none). `2t`: two threads on one
/// breaker, time per call per thread (the same unit as `1t`).
fn bench_mixed(c: &mut Criterion) {
    for (pct, every) in [(0u32, 0u64), (2, 50), (10, 10)] {
        for threads in [1u32, 2] {
            mixed_pair(
                c,
                &format!("circuit_breaker_mixed/count_{pct}pct_{threads}t"),
                threads,
                (
                    Mixed::new(Circuit::new(ours_cfg()).unwrap(), every),
                    mixed_ours,
                ),
                (
                    "recloser",
                    Mixed::new(Arc::new(recloser_cb()), every),
                    mixed_recloser,
                ),
            );
            mixed_pair(
                c,
                &format!("circuit_breaker_mixed/time_{pct}pct_{threads}t"),
                threads,
                (
                    Mixed::new(
                        Circuit::new(ours_cfg().window(Window::Time(Duration::from_secs(10))))
                            .unwrap(),
                        every,
                    ),
                    mixed_ours,
                ),
                ("failsafe", Mixed::new(failsafe_cb(), every), mixed_failsafe),
            );
        }
    }
}

/// One group of [`bench_mixed`]: ours and one peer, each driven by its own operation, on
/// one thread or on two threads sharing the breaker.
fn mixed_pair<O, P, FO, FP>(
    c: &mut Criterion,
    group: &str,
    threads: u32,
    (ours, op_ours): (O, FO),
    (peer_name, peer, op_peer): (&str, P, FP),
) where
    O: Clone + Send,
    P: Clone + Send,
    FO: Fn(&mut O) + Copy + Send,
    FP: Fn(&mut P) + Copy + Send,
{
    let mut g = c.benchmark_group(group);
    if threads == 1 {
        g.bench_function("tower-patterns", |bn| {
            let mut m = ours.clone();
            bn.iter_custom(|n| one_thread(n, &mut m, op_ours))
        });
        g.bench_function(peer_name, |bn| {
            let mut m = peer.clone();
            bn.iter_custom(|n| one_thread(n, &mut m, op_peer))
        });
    } else {
        g.bench_function("tower-patterns", |bn| {
            bn.iter_custom(|n| two_threads(n, ours.clone(), op_ours))
        });
        g.bench_function(peer_name, |bn| {
            bn.iter_custom(|n| two_threads(n, peer.clone(), op_peer))
        });
    }
    g.finish();
}

criterion_group!(benches, bench, bench_mixed);
criterion_main!(benches);
