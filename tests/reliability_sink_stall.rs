//! Reliability scenario (c) of issue 10: a backup sink stalls under load.
//!
//! Two sinks stall for the whole test while 16 keep-alive clients download 100 KB objects
//! through the tee: one whose `begin` never returns (an unreachable S3 while
//! `object_store` retries the connection), one whose `commit` never returns while its
//! writer keeps every chunk (a single-`PUT` upload retrying). Before the per-sink budget,
//! every response queued its copy behind the stalled sink: 4,000 × 100 KB held 400 MB.
//!
//! The operator run stalled for 30 s; this test stalls for its whole run (a few
//! seconds). That is enough: each sink reaches its budget and its pending-copy cap within
//! the first few dozen responses, and from then on every new copy is skipped or aborted
//! at once, so a longer stall only repeats the same steady state (the RSS check below
//! compares the end with the state just after that point).

mod common;

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use futures_util::future::BoxFuture;
use http::{header, Request, Response};
use http_body_util::Empty;
use hyper::body::Incoming;
use tower::{service_fn, ServiceBuilder};
use tower_patterns::backup::{ObjectInfo, Sink, SinkError, SinkWriter, TeeLayer};
use tower_patterns::proxy::ForwardBuilder;

const OBJECT: u64 = 100 * 1024;
const BUDGET: u64 = 2 << 20;
const MAX_PENDING: usize = 64;
const CLIENTS: usize = 16;

/// `begin` never returns.
struct HangingBegin;

impl Sink for HangingBegin {
    fn name(&self) -> &str {
        "hanging-begin"
    }
    fn begin<'a>(
        &'a self,
        _info: &'a ObjectInfo,
    ) -> BoxFuture<'a, Result<Box<dyn SinkWriter>, SinkError>> {
        Box::pin(std::future::pending())
    }
}

/// Keeps every chunk, like a buffered upload, and its `commit` never returns.
struct HangingCommit;

struct Holding(Vec<Bytes>);

impl Sink for HangingCommit {
    fn name(&self) -> &str {
        "hanging-commit"
    }
    fn begin<'a>(
        &'a self,
        _info: &'a ObjectInfo,
    ) -> BoxFuture<'a, Result<Box<dyn SinkWriter>, SinkError>> {
        let w: Box<dyn SinkWriter> = Box::new(Holding(Vec::new()));
        Box::pin(async move { Ok(w) })
    }
}

impl SinkWriter for Holding {
    fn write(&mut self, chunk: Bytes) -> BoxFuture<'_, Result<(), SinkError>> {
        self.0.push(chunk);
        Box::pin(async { Ok(()) })
    }
    fn commit(self: Box<Self>) -> BoxFuture<'static, Result<(), SinkError>> {
        Box::pin(async move {
            let _kept = self; // held until the PUT "succeeds": never
            std::future::pending().await
        })
    }
    fn abort(self: Box<Self>) -> BoxFuture<'static, ()> {
        Box::pin(async {})
    }
    fn held_bytes(&self) -> u64 {
        self.0.iter().map(|c| c.len() as u64).sum()
    }
}

/// Resident set size of this test process, from `/proc/self/statm`.
fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

/// `rounds` requests per client, all clients at once; returns the slowest request.
async fn load(
    edge: std::net::SocketAddr,
    rounds: usize,
    tag: &str,
    budgets: &TeeLayer,
    peak_seen: &Arc<Mutex<Vec<u64>>>,
) -> Duration {
    let client = client();
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let client = client.clone();
        let tag = tag.to_owned();
        let layer = budgets.clone();
        let peak_seen = peak_seen.clone();
        tasks.push(tokio::spawn(async move {
            let mut slowest = Duration::ZERO;
            for i in 0..rounds {
                let started = Instant::now();
                let res = client
                    .request(
                        Request::get(format!("http://{edge}/obj/{tag}-{c}-{i}"))
                            .body(Empty::<Bytes>::new())
                            .unwrap(),
                    )
                    .await
                    .unwrap();
                assert_eq!(res.status(), 200);
                let body = read_all(res).await.unwrap();
                slowest = slowest.max(started.elapsed());
                // Every client gets the full, right body.
                assert_eq!(body.len() as u64, OBJECT);
                let mut check = PatternCheck::default();
                check.feed(&body);
                assert!(check.ok, "wrong bytes");
                // Sample the tee's own accounting while the load runs.
                let mut seen = peak_seen.lock().unwrap();
                for (i, (_, used, limit)) in layer.sink_budgets().into_iter().enumerate() {
                    assert!(used <= limit, "sink {i} holds {used} > {limit} bytes");
                    seen[i] = seen[i].max(used);
                }
            }
            slowest
        }));
    }
    let mut slowest = Duration::ZERO;
    for t in tasks {
        slowest = slowest.max(t.await.unwrap());
    }
    slowest
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_sinks_keep_memory_flat_and_clients_unaffected() {
    let origin = spawn_server(service_fn(|_req: Request<Incoming>| async {
        Ok::<_, Infallible>(
            Response::builder()
                .header(header::CONTENT_LENGTH, OBJECT)
                .body(pattern_body(OBJECT))
                .unwrap(),
        )
    }))
    .await;
    let layer = TeeLayer::builder()
        .sink(HangingBegin)
        .sink(HangingCommit)
        .buffer(1 << 20)
        .sink_budget(BUDGET)
        .max_pending_copies(MAX_PENDING)
        .build();
    let stats = layer.stats().clone();
    let fwd = ForwardBuilder::new(format!("http://{origin}"))
        .build::<Incoming>()
        .unwrap();
    let edge = spawn_server(ServiceBuilder::new().layer(layer.clone()).service(fwd)).await;
    let peak_seen = Arc::new(Mutex::new(vec![0u64; 2]));

    // Warm-up: both sinks reach their limits (and the process its working set).
    let warm = load(edge, 8, "warm", &layer, &peak_seen).await;
    let rss_warm = rss_bytes();
    let snap_warm = stats.snapshot();
    // The stall goes on under load: 16 × 250 more responses (4,000 × 100 KB, as in the issue).
    let slowest = load(edge, 250, "load", &layer, &peak_seen).await;
    let rss_end = rss_bytes();
    let snap = stats.snapshot();

    // The tee's accounting never passed a sink's budget...
    for (i, peak) in layer.sink_budget_peaks().into_iter().enumerate() {
        assert!(peak <= BUDGET, "sink {i}: peak {peak} > {BUDGET}");
        assert!(peak > 0, "sink {i} never held anything");
    }
    assert!(peak_seen.lock().unwrap().iter().all(|p| *p <= BUDGET));
    // ...new copies were refused and counted rather than queued...
    assert!(snap.skipped > snap_warm.skipped, "{snap:?}");
    assert!(snap.tee.budget_aborts > 0, "{snap:?}");
    // ...memory stayed flat (the bodies of the measured phase were 400 MB)...
    let growth = rss_end.saturating_sub(rss_warm);
    assert!(
        growth < 16 << 20,
        "RSS grew by {} MiB during the stall",
        growth >> 20
    );
    // ...and no client waited for a sink (generous bound for a loaded CI box; a request
    // that waited for a stalled sink would never finish).
    assert!(
        slowest < Duration::from_secs(5),
        "slowest request {slowest:?}"
    );
    eprintln!(
        "warm-up slowest {warm:?}, load slowest {slowest:?}, RSS growth {} KiB, skipped {}, budget aborts {}",
        growth >> 10,
        snap.skipped,
        snap.tee.budget_aborts
    );
}
