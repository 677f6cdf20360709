//! Pick cost of the balancer's pickers vs tower's p2c and pingora-load-balancing.
//!
//! ```text
//! cargo bench -p tower-patterns-bench --bench balance -- --warm-up-time 1 --measurement-time 3
//! cargo bench -p tower-patterns-bench --bench balance --features pingora -- --warm-up-time 1 --measurement-time 3
//! ```
//!
//! - `select/*`: choosing an endpoint, nothing sent (`Balance::select` vs pingora's
//!   `LoadBalancer::select`), at 3, 100 and 1000 endpoints.
//! - `select_2threads/*`: the same from two threads at once (shared counters contend).
//!   Both `select` groups report one unit: time per pick *per thread* (each of the two
//!   threads makes every one of criterion's iterations), so equal figures mean perfect
//!   scaling and 2x means the two threads together pick no faster than one.
//! - `dispatch/*`: a whole `poll_ready` + `call` + completion through the balancer to an
//!   always-ready endpoint service: ours vs `tower::balance::p2c` (with pending-request load).
//!   `ours-rr` has retries on (the default: each dispatch copies the request head so it can
//!   be sent again); the `-noretry` variants do what tower's p2c does (no copy).
//! - `BENCH_CLOCK=cpu` times every group in thread CPU time (see `util/cpuclock.rs`), for
//!   a machine shared with other work.
//! - with `DISPATCH_RUN=<case>/<endpoints> DISPATCH_N=<n>` (e.g. `ours-rr/3`, and a filter
//!   matching no bench, e.g. `nothing`), `n` dispatches (default 100000) of that one case,
//!   then exit: a fixed workload for `valgrind --tool=callgrind
//!   --toggle-collect='*dispatch_loop*'`, whose instruction count divided by `n + 1000`
//!   (a warm-up of 1000 runs the same loop) is the load-independent cost per iteration,
//!   the request built by the loop included.

use std::convert::Infallible;
use std::future::{ready, Ready};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion};
use futures_util::FutureExt;
use http::{Request, Response};
use tower::{Service, ServiceExt};
use tower_patterns::balance::{Balance, HashKey, Picker, Retry};

const SIZES: [usize; 3] = [3, 100, 1000];

#[derive(Clone, Copy)]
struct Ok200;

impl Service<Request<String>> for Ok200 {
    type Response = Response<String>;
    type Error = Infallible;
    type Future = Ready<Result<Response<String>, Infallible>>;
    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn call(&mut self, _req: Request<String>) -> Self::Future {
        ready(Ok(Response::new(String::new())))
    }
}

fn ours(picker: Picker, n: usize) -> Balance<usize, Ok200> {
    Balance::builder()
        .picker(picker)
        .build_static((0..n).map(|i| (i, Ok200)))
}

fn hash_picker() -> Picker {
    Picker::ConsistentHash(HashKey::Header(http::HeaderName::from_static("x-user")))
}

fn requests() -> Vec<Request<String>> {
    (0..1024)
        .map(|i| {
            Request::get("/")
                .header("x-user", format!("user-{i}"))
                .body(String::new())
                .unwrap()
        })
        .collect()
}

fn pickers() -> Vec<(&'static str, Picker)> {
    vec![
        ("ours-rr", Picker::RoundRobin),
        ("ours-swrr", Picker::WeightedRoundRobin),
        ("ours-p2c", Picker::LeastPending),
        ("ours-hash", hash_picker()),
    ]
}

#[cfg(feature = "pingora")]
mod peer {
    use pingora_load_balancing::selection::{Consistent, Random, RoundRobin};
    use pingora_load_balancing::LoadBalancer;

    pub enum Lb {
        Rr(LoadBalancer<RoundRobin>),
        Random(LoadBalancer<Random>),
        Ketama(LoadBalancer<Consistent>),
    }

    impl Lb {
        pub fn select(&self, key: &[u8]) -> Option<std::net::SocketAddr> {
            let b = match self {
                Lb::Rr(l) => l.select(key, 256),
                Lb::Random(l) => l.select(key, 256),
                Lb::Ketama(l) => l.select(key, 256),
            }?;
            b.addr.as_inet().copied()
        }
    }

    pub fn all(n: usize) -> Vec<(&'static str, Lb)> {
        let addrs: Vec<String> = (0..n)
            .map(|i| format!("127.0.0.1:{}", 10_000 + i))
            .collect();
        vec![
            (
                "pingora-rr",
                Lb::Rr(LoadBalancer::try_from_iter(&addrs).unwrap()),
            ),
            (
                "pingora-random",
                Lb::Random(LoadBalancer::try_from_iter(&addrs).unwrap()),
            ),
            (
                "pingora-ketama",
                Lb::Ketama(LoadBalancer::try_from_iter(&addrs).unwrap()),
            ),
        ]
    }
}

fn select(c: &mut Criterion) {
    let reqs = requests();
    let mut g = c.benchmark_group("select");
    for n in SIZES {
        for (name, picker) in pickers() {
            let lb = ours(picker, n);
            g.bench_with_input(BenchmarkId::new(name, n), &n, |b, _| {
                b.iter_custom(|iters| {
                    cpuclock::measure(|| {
                        for i in 0..iters as usize {
                            black_box(lb.select(&reqs[i & 1023]).unwrap());
                        }
                    })
                })
            });
        }
        #[cfg(feature = "pingora")]
        for (name, lb) in peer::all(n) {
            let keys: Vec<String> = (0..1024).map(|i| format!("user-{i}")).collect();
            g.bench_with_input(BenchmarkId::new(name, n), &n, |b, _| {
                b.iter_custom(|iters| {
                    cpuclock::measure(|| {
                        for i in 0..iters as usize {
                            black_box(lb.select(keys[i & 1023].as_bytes()).unwrap());
                        }
                    })
                })
            });
        }
    }
    g.finish();
}

#[path = "util/cpuclock.rs"]
mod cpuclock;

/// Runs `op` `iters` times on each of two threads at once; returns the wall time (with
/// `BENCH_CLOCK=cpu`: the larger of the two threads' CPU times, see `util/cpuclock.rs`).
/// Criterion divides by `iters`: the figure is time per operation per thread, the unit
/// of the one-thread groups (it was split in halves before, which halved the figure).
fn two_threads<F: Fn(usize) + Sync>(iters: u64, op: &F) -> Duration {
    let per_thread = iters.max(1) as usize;
    if cpuclock::cpu_clock() {
        return std::thread::scope(|s| {
            let hs: Vec<_> = (0..2)
                .map(|t| {
                    s.spawn(move || {
                        cpuclock::measure(|| {
                            for i in 0..per_thread {
                                op(i.wrapping_mul(2) + t);
                            }
                        })
                    })
                })
                .collect();
            hs.into_iter()
                .map(|h| h.join().unwrap())
                .max()
                .unwrap_or_default()
        });
    }
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..2 {
            s.spawn(move || {
                for i in 0..per_thread {
                    op(i.wrapping_mul(2) + t);
                }
            });
        }
    });
    start.elapsed()
}

fn select_2threads(c: &mut Criterion) {
    let reqs = Arc::new(requests());
    let mut g = c.benchmark_group("select_2threads");
    for n in SIZES {
        for (name, picker) in pickers() {
            let lb = ours(picker, n);
            let reqs = reqs.clone();
            let op = move |i: usize| {
                black_box(lb.select(&reqs[i & 1023]).unwrap());
            };
            g.bench_with_input(BenchmarkId::new(name, n), &n, |b, _| {
                b.iter_custom(|iters| two_threads(iters, &op))
            });
        }
        #[cfg(feature = "pingora")]
        for (name, lb) in peer::all(n) {
            let keys: Vec<String> = (0..1024).map(|i| format!("user-{i}")).collect();
            let op = move |i: usize| {
                black_box(lb.select(keys[i & 1023].as_bytes()).unwrap());
            };
            g.bench_with_input(BenchmarkId::new(name, n), &n, |b, _| {
                b.iter_custom(|iters| two_threads(iters, &op))
            });
        }
    }
    g.finish();
}

fn dispatch(c: &mut Criterion) {
    use tower::balance::p2c;
    use tower::discover::ServiceList;
    use tower::load::{CompleteOnResponse, PendingRequestsDiscover};

    // The balancer's per-try timeout (default 10 s) needs a Tokio timer when a try is
    // pending: run inside a runtime, as a server does.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _rt = rt.enter();
    let mut g = c.benchmark_group("dispatch");
    for n in SIZES {
        for (name, picker, retry) in [
            ("ours-rr", Picker::RoundRobin, Retry::default()),
            ("ours-rr-noretry", Picker::RoundRobin, Retry::never()),
            ("ours-p2c-noretry", Picker::LeastPending, Retry::never()),
        ] {
            let mut lb = Balance::builder()
                .picker(picker)
                .retry(retry)
                .build_static((0..n).map(|i| (i, Ok200)));
            fixed_run(&format!("{name}/{n}"), &mut lb);
            g.bench_with_input(BenchmarkId::new(name, n), &n, |b, _| {
                b.iter_custom(|iters| {
                    cpuclock::measure(|| {
                        for _ in 0..iters {
                            let req = Request::get("/").body(String::new()).unwrap();
                            let fut = lb.ready().now_or_never().unwrap().unwrap().call(req);
                            black_box(fut.now_or_never().unwrap().unwrap());
                        }
                    })
                })
            });
        }
        // Baseline: the same request and response without any balancer.
        let mut direct = Ok200;
        g.bench_with_input(BenchmarkId::new("no-balancer", n), &n, |b, _| {
            b.iter_custom(|iters| {
                cpuclock::measure(|| {
                    for _ in 0..iters {
                        let req = Request::get("/").body(String::new()).unwrap();
                        let fut = direct.ready().now_or_never().unwrap().unwrap().call(req);
                        black_box(fut.now_or_never().unwrap().unwrap());
                    }
                })
            })
        });
        let list = ServiceList::new((0..n).map(|_| Ok200).collect::<Vec<_>>());
        let mut tp = p2c::Balance::new(PendingRequestsDiscover::new(
            list,
            CompleteOnResponse::default(),
        ));
        // The first poll_ready takes the endpoints from the discover stream.
        let _ = tp.ready().now_or_never();
        fixed_run(&format!("tower-p2c/{n}"), &mut tp);
        g.bench_with_input(BenchmarkId::new("tower-p2c", n), &n, |b, _| {
            b.iter_custom(|iters| {
                cpuclock::measure(|| {
                    for _ in 0..iters {
                        let req = Request::get("/").body(String::new()).unwrap();
                        let fut = tp.ready().now_or_never().unwrap().unwrap().call(req);
                        black_box(fut.now_or_never().unwrap().unwrap());
                    }
                })
            })
        });
    }
    g.finish();
}

/// With `DISPATCH_RUN=name`, runs `DISPATCH_N` dispatches of `svc` and exits the process.
fn fixed_run<S>(name: &str, svc: &mut S)
where
    S: Service<Request<String>, Response = Response<String>>,
    S::Error: std::fmt::Debug,
{
    let Some(n) = cpuclock::fixed_run("DISPATCH_RUN", "DISPATCH_N", name, 100_000) else {
        return;
    };
    dispatch_loop(svc, 1000);
    dispatch_loop(svc, n);
    std::process::exit(0);
}

/// The loop body of `dispatch/*`, out of line so callgrind can count it alone.
#[inline(never)]
fn dispatch_loop<S>(svc: &mut S, n: u64)
where
    S: Service<Request<String>, Response = Response<String>>,
    S::Error: std::fmt::Debug,
{
    for _ in 0..n {
        let req = Request::get("/").body(String::new()).unwrap();
        let fut = svc.ready().now_or_never().unwrap().unwrap().call(req);
        black_box(fut.now_or_never().unwrap().unwrap());
    }
}

criterion_group!(benches, select, select_2threads, dispatch);
criterion_main!(benches);
