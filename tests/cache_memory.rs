//! Issue 10 item 3: the cache's byte budget bounds its memory.
//!
//! Stored chunks used to be slices of hyper's read buffers, so each small entry kept a
//! whole buffer alive while the budget counted only its length: `MemoryStore::new(64 MiB)`
//! reached 1.12 GB RSS with 200,000 small entries. Here a real origin serves many small
//! cacheable objects through `Forward` + `CacheLayer`; a counting global allocator (this
//! test binary only) measures the live heap, which must stay within 1.5× the budget plus
//! the baseline measured before the first entry was stored.
//!
//! Scale: 16 MiB budget and 30,000 objects by default (about 2.6 times what the budget
//! holds, so eviction runs for most of the test), to stay fast on a loaded 2-core box;
//! `CACHE_MEMORY_OBJECTS=200000` runs the count.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use common::spawn_server;
use http::{header, Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use tower::{service_fn, Service, ServiceBuilder, ServiceExt};
use tower_patterns::cache::{CacheLayer, MemoryStore};
use tower_patterns::proxy::ForwardBuilder;

/// Counts live heap bytes and their peak.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn add(n: usize) {
    let now = LIVE.fetch_add(n, Ordering::Relaxed) + n;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            add(layout.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(layout);
        if !p.is_null() {
            add(layout.size());
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = System.realloc(ptr, layout, new_size);
        if !p.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
            add(new_size);
        }
        p
    }
}

/// A `/proc/self/status` field in KiB (`VmRSS:` now, `VmHWM:` the peak so far).
fn proc_status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("field in /proc/self/status")
}

#[global_allocator]
static ALLOC: Counting = Counting;

const BUDGET: u64 = 16 << 20;
const CONCURRENCY: usize = 16;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budget_bounds_the_heap_with_many_small_entries() {
    let objects: usize = std::env::var("CACHE_MEMORY_OBJECTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30_000);
    // Small objects with typical headers; `/warm/*` is not cacheable.
    let origin = spawn_server(service_fn(|req: Request<Incoming>| async move {
        let path = req.uri().path().to_owned();
        let cc = if path.starts_with("/warm/") {
            "no-store"
        } else {
            "public, max-age=3600"
        };
        Ok::<_, Infallible>(
            Response::builder()
                .header(header::CACHE_CONTROL, cc)
                .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
                .header(header::ETAG, "\"0123456789abcdef\"")
                .body(Full::new(Bytes::from(format!(
                    "{path} {}",
                    "x".repeat(100)
                ))))
                .unwrap(),
        )
    }))
    .await;
    let store = Arc::new(MemoryStore::new(BUDGET));
    let fwd = ForwardBuilder::new(format!("http://{origin}"))
        .build::<Empty<Bytes>>()
        .unwrap();
    let svc = ServiceBuilder::new()
        .layer(CacheLayer::new(store.clone()))
        .service(fwd);

    let run = |prefix: &'static str, count: usize| {
        let svc = svc.clone();
        async move {
            let mut tasks = Vec::new();
            for t in 0..CONCURRENCY {
                let mut svc = svc.clone();
                tasks.push(tokio::spawn(async move {
                    for i in (t..count).step_by(CONCURRENCY) {
                        let req = Request::get(format!("/{prefix}/{i}"))
                            .header(header::HOST, "origin.test")
                            .body(Empty::<Bytes>::new())
                            .unwrap();
                        let res = svc.ready().await.unwrap().call(req).await.unwrap();
                        assert_eq!(res.status(), 200);
                        let body = res.into_body().collect().await.unwrap().to_bytes();
                        assert!(body.starts_with(format!("/{prefix}/{i} ").as_bytes()));
                    }
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
        }
    };

    // Warm up the connections and the runtime with uncacheable responses, then measure.
    run("warm", 2_000).await;
    assert_eq!(store.stats().entries, 0);
    let baseline = LIVE.load(Ordering::Relaxed);
    PEAK.store(baseline, Ordering::Relaxed);
    let rss_baseline = proc_status_kib("VmRSS:");

    run("obj", objects).await;
    // Let the last fills land (bounded).
    for _ in 0..1000 {
        tokio::task::yield_now().await;
    }
    let stats = store.stats();
    // Resident memory too (what the operator saw: 1.12 GB RSS for a 64 MiB budget):
    // the process's peak RSS over its RSS after the warm-up, allocator overhead included.
    let rss_peak_over = proc_status_kib("VmHWM:").saturating_sub(rss_baseline);
    eprintln!(
        "peak RSS over baseline: {rss_peak_over} KiB (budget {} KiB)",
        BUDGET >> 10
    );
    // 1.5× the budget plus 8 MiB for the runtime's in-flight buffers and allocator slack.
    assert!(
        rss_peak_over <= (BUDGET * 3 / 2 + (8 << 20)) >> 10,
        "peak RSS {rss_peak_over} KiB over baseline for a {} KiB budget",
        BUDGET >> 10
    );
    let live = LIVE.load(Ordering::Relaxed);
    let peak = PEAK.load(Ordering::Relaxed);
    let over = |b: usize| b.saturating_sub(baseline) as u64;
    eprintln!(
        "{objects} objects: {} entries, {} evictions, accounted {} KiB; heap over baseline: \
         now {} KiB, peak {} KiB (budget {} KiB); real bytes per entry ~{}, weight per entry ~{}",
        stats.entries,
        stats.evictions,
        stats.used >> 10,
        over(live) >> 10,
        over(peak) >> 10,
        BUDGET >> 10,
        over(live) / stats.entries.max(1) as u64,
        stats.used / stats.entries.max(1) as u64,
    );
    assert!(
        stats.evictions > 0,
        "the test must fill the budget: {stats:?}"
    );
    assert!(stats.used <= BUDGET);
    // 1.5× the budget over the baseline, plus 2 MiB for what is in flight at the peak
    // (16 requests, the store's index growing).
    let bound = BUDGET * 3 / 2 + (2 << 20);
    assert!(
        over(peak) <= bound,
        "peak heap {} KiB over baseline > {} KiB",
        over(peak) >> 10,
        bound >> 10
    );
    assert!(over(live) <= bound);
}
