//! Backup tee: throughput against plain streaming of the same body, in one run, and the
//! peak heap while a 1 GiB body is teed (a counting global allocator).
//!
//! `cargo bench -p tower-patterns-bench --bench backup_tee -- --warm-up-time 1 --measurement-time 3`
//!
//! `tee_per_chunk/*` is meant for `BENCH_CLOCK=cpu` (see `util/cpuclock.rs`): the body,
//! the tee and the sink task all run on one current-thread runtime, so this thread's CPU
//! time is the whole cost of the stream on a shared machine; the tee's cost per chunk is
//! the difference to `plain` divided by the chunks. (`FsSink`'s writes run on blocking
//! threads and are not in that figure: they are the disk's cost, not the tee's.)
//!
//! `tee_1GiB` (not a criterion group: it also reads the peak heap and the thread's minor
//! page faults: a heap that glibc trims and grows again costs faults, which thread CPU time
//! includes) streams 1 GiB plain and
//! teed, alternating, five rounds per case, and prints the median ratio: 64 KiB chunks (the
//! headline) and 16 KiB chunks, each from a fresh `Vec` per chunk and from a read buffer
//! split like hyper's. `tee_loopback_64MiB` first prints the chunk sizes the tee sees
//! behind `Forward`; with `BENCH_CLOCK=cpu` it times the process's CPU (every thread:
//! origin, proxy and client are all in this process) instead of wall time.
//!
//! `tee_1GiB`, `fs_sink_rate` (`FsSink` alone, 1 GiB straight to its writer) and
//! `fs_client_speed` run when no filter is given or one names them.
//! `TEE_RUN=plain|hold|tee|pass|body` runs one `tee_1GiB` body once and exits (see
//! `fixed_run`): for callgrind, and for the experiments that take the tee apart (`hold`:
//! the chunks' lifetime alone; `pass`: the layer's wrapper alone; `body`: the tee without
//! the layer's sink driver).

use std::alloc::{GlobalAlloc, Layout, System};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use futures_util::future::BoxFuture;
use http::{header, Request, Response};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::Incoming;
use tower::{service_fn, ServiceBuilder, ServiceExt};
use tower_patterns::backup::{
    backfill, BackfillQueue, BackupOutcome, FsSink, FsyncPolicy, ObjectInfo, ObjectKey, Sink,
    SinkError, SinkWriter, TeeLayer,
};
use tower_patterns::body::tee::{outlet, Next, NextBatch, TeeBody, TeeOptions};
use tower_patterns::body::{boxed, BoxBody};
use tower_patterns::proxy::ForwardBuilder;

/// Counts live heap bytes and their peak.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            let now = LIVE.fetch_add(l.size(), Ordering::Relaxed) + l.size();
            new_peak(now);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) };
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let q = unsafe { System.realloc(p, l, new) };
        if !q.is_null() {
            if new > l.size() {
                let now = LIVE.fetch_add(new - l.size(), Ordering::Relaxed) + new - l.size();
                new_peak(now);
            } else {
                LIVE.fetch_sub(l.size() - new, Ordering::Relaxed);
            }
        }
        q
    }
}

/// Raises `PEAK` to `now`. A plain load first: `fetch_max` is a locked compare-exchange
/// on every call, and the tee allocates more often than plain streaming (a `Bytes`
/// promotion per chunk, a vector per batch), so an unconditional one charged the tee
/// ~1.5 extra locked instructions per chunk that are the bench's, not the tee's.
#[inline]
fn new_peak(now: usize) {
    if now > PEAK.load(Ordering::Relaxed) {
        PEAK.fetch_max(now, Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

#[path = "util/cpuclock.rs"]
mod cpuclock;

const CHUNK: usize = 64 * 1024;
const BODY: usize = 64 << 20;

/// `total` bytes in fresh 64 KiB chunks, yielding to the scheduler between chunks as a
/// socket read would (so sink tasks get to run on a current-thread runtime).
fn generated(total: usize, fresh: bool) -> BoxBody {
    generated_in(total, CHUNK, fresh)
}

/// [`generated`] with `chunk`-byte chunks.
fn generated_in(total: usize, chunk: usize, fresh: bool) -> BoxBody {
    let shared = Bytes::from(vec![7u8; chunk]);
    let stream = futures_util::stream::unfold(0usize, move |off| {
        let shared = shared.clone();
        async move {
            if off >= total {
                return None;
            }
            tokio::task::yield_now().await;
            let n = (total - off).min(chunk);
            let chunk = if fresh {
                Bytes::from(vec![7u8; n])
            } else {
                shared.slice(..n)
            };
            Some((Ok::<_, Infallible>(Frame::data(chunk)), off + n))
        }
    });
    boxed(StreamBody::new(stream))
}

/// `total` bytes in `chunk`-byte chunks split off one read buffer, as hyper's HTTP/1
/// decoder hands them out: the buffer is reserved, filled ("read from the socket") and the
/// chunk split off and frozen. While nothing else holds the last chunk the next `reserve`
/// reuses the buffer; a chunk still held (by a sink's queue) makes it allocate a new one,
/// which is a real cost of teeing behind hyper. A clone is one reference-count increment
/// (no promotion of a `Vec`-backed `Bytes`).
fn read_buffer_chunks(total: usize, chunk: usize) -> BoxBody {
    use bytes::BufMut;
    let stream = futures_util::stream::unfold(
        (0usize, bytes::BytesMut::new()),
        move |(off, mut buf)| async move {
            if off >= total {
                return None;
            }
            tokio::task::yield_now().await;
            let n = (total - off).min(chunk);
            buf.reserve(n);
            buf.put_bytes(7, n);
            let data = buf.split_to(n).freeze();
            Some((Ok::<_, Infallible>(Frame::data(data)), (off + n, buf)))
        },
    );
    boxed(StreamBody::new(stream))
}

/// Whether a non-criterion part of this bench runs: with no filter on the command line, or
/// when a filter (or one of its `|` alternatives) is part of `name`.
fn wanted(name: &str) -> bool {
    let mut filters = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a.starts_with("--") && !a.contains('=') {
            // Options with a value (criterion's `--warm-up-time 1` and the like).
            let flag = matches!(
                a.as_str(),
                "--bench"
                    | "--test"
                    | "--list"
                    | "--noplot"
                    | "--quiet"
                    | "--verbose"
                    | "--exact"
                    | "--discard-baseline"
            );
            if !flag {
                args.next();
            }
        } else if !a.starts_with("--") {
            filters.push(a);
        }
    }
    // Criterion reads a filter as a regex: `a|b` names both.
    filters.is_empty()
        || filters
            .iter()
            .flat_map(|f| f.split('|'))
            .any(|f| name.contains(f))
}

/// CPU time of the whole process so far (every thread), for the loopback group.
#[allow(unsafe_code)]
fn process_cpu() -> std::time::Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_PROCESS_CPUTIME_ID)");
    std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

async fn drain<B: Body + Unpin>(mut body: B) -> usize
where
    B::Error: std::fmt::Debug,
{
    let mut n = 0;
    while let Some(f) = body.frame().await {
        if let Ok(d) = f.unwrap().into_data() {
            n += bytes::Buf::remaining(&d);
        }
    }
    n
}

/// [`drain`], or with `copy` a client that reads every byte as a socket write does: each
/// chunk is copied into one reused buffer (the kernel's copy into the socket buffer), so
/// both plain and tee pay for touching the data once more.
async fn consume<B: Body<Data = Bytes> + Unpin>(mut body: B, copy: bool) -> usize
where
    B::Error: std::fmt::Debug,
{
    if !copy {
        return drain(body).await;
    }
    let mut out = vec![0u8; 64 << 10];
    let mut n = 0;
    while let Some(f) = body.frame().await {
        if let Ok(d) = f.unwrap().into_data() {
            for part in d.chunks(out.len()) {
                out[..part.len()].copy_from_slice(part);
                std::hint::black_box(&mut out);
            }
            n += d.len();
        }
    }
    n
}

/// Like [`drain`], keeping the last `hold` chunks alive (released oldest first).
async fn drain_holding<B: Body<Data = Bytes> + Unpin>(mut body: B, hold: usize) -> usize
where
    B::Error: std::fmt::Debug,
{
    let mut kept = std::collections::VecDeque::with_capacity(hold + 1);
    let mut n = 0;
    while let Some(f) = body.frame().await {
        if let Ok(d) = f.unwrap().into_data() {
            n += d.len();
            kept.push_back(d);
            if kept.len() > hold {
                kept.pop_front();
            }
        }
    }
    n
}

/// A sink that drops every chunk: measures the tee, not a disk.
#[derive(Clone)]
struct NullSink;
struct NullWriter;

impl Sink for NullSink {
    fn name(&self) -> &str {
        "null"
    }
    fn begin<'a>(
        &'a self,
        _: &'a ObjectInfo,
    ) -> BoxFuture<'a, Result<Box<dyn SinkWriter>, SinkError>> {
        Box::pin(async { Ok(Box::new(NullWriter) as Box<dyn SinkWriter>) })
    }
}

impl SinkWriter for NullWriter {
    fn write(&mut self, _: Bytes) -> BoxFuture<'_, Result<(), SinkError>> {
        Box::pin(async { Ok(()) })
    }
    // Takes a batch at once, as `FsSink` and `MemorySink` do.
    fn write_batch(&mut self, _: Vec<Bytes>) -> BoxFuture<'_, Result<(), SinkError>> {
        Box::pin(async { Ok(()) })
    }
    fn commit(self: Box<Self>) -> BoxFuture<'static, Result<(), SinkError>> {
        Box::pin(async { Ok(()) })
    }
    fn abort(self: Box<Self>) -> BoxFuture<'static, ()> {
        Box::pin(async {})
    }
}

fn in_process(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut g = c.benchmark_group("tee_in_process_64MiB");
    g.throughput(Throughput::Bytes(BODY as u64));
    g.sample_size(10);
    g.bench_function("plain", |b| {
        b.to_async(&rt)
            .iter(|| async { drain(generated(BODY, false)).await })
    });
    for sinks in [1usize, 2] {
        g.bench_with_input(BenchmarkId::new("tee", sinks), &sinks, |b, &sinks| {
            b.to_async(&rt).iter(|| async move {
                let mut outlets = Vec::new();
                let mut tasks = Vec::new();
                for _ in 0..sinks {
                    let (o, mut inlet) = outlet(4 << 20);
                    outlets.push(o);
                    tasks.push(tokio::spawn(async move {
                        loop {
                            match inlet.next().await {
                                Next::Data(_) => {}
                                Next::End => return true,
                                Next::Abort(_) => return false,
                            }
                        }
                    }));
                }
                let body = TeeBody::new(generated(BODY, false), outlets, &TeeOptions::default())
                    .batched(true);
                let n = drain(body).await;
                for t in tasks {
                    assert!(t.await.unwrap(), "a sink was aborted");
                }
                n
            })
        });
    }
    g.finish();
}

/// Runs `n` bodies to completion on `rt` and returns the time taken (thread CPU time with
/// `BENCH_CLOCK=cpu`).
fn timed<F, Fut>(rt: &tokio::runtime::Runtime, n: u64, mut f: F) -> std::time::Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = usize>,
{
    cpuclock::measure(|| {
        rt.block_on(async {
            for _ in 0..n {
                std::hint::black_box(f().await);
            }
        })
    })
}

/// How [`tee_discard`]'s sink task takes the copy.
#[derive(Clone, Copy, Debug)]
enum DiscardMode {
    /// Batched tee, chunk by chunk (`Inlet::next`): the `tee_per_chunk` headline since
    /// session 12.
    Next,
    /// Batched tee, a batch at a time (`Inlet::next_batch`), as `TeeLayer` takes it.
    Batch,
    /// Unbatched tee (one channel message per chunk), chunk by chunk: the design before
    /// session 12's batching, as a same-session stand-in for the original figure.
    Unbatched,
}

/// One `size`-byte body in `chunk`-byte chunks teed to one sink task that discards
/// (16 MiB buffer): the tee and its channel alone.
async fn tee_discard(size: usize, chunk: usize, mode: DiscardMode) -> usize {
    let (o, mut inlet) = outlet(16 << 20);
    let sink = tokio::spawn(async move {
        loop {
            if let DiscardMode::Batch = mode {
                match inlet.next_batch().await {
                    NextBatch::Data(_) => {}
                    NextBatch::End => return true,
                    NextBatch::Abort(_) => return false,
                }
            } else {
                match inlet.next().await {
                    Next::Data(_) => {}
                    Next::End => return true,
                    Next::Abort(_) => return false,
                }
            }
        }
    });
    let body = TeeBody::new(
        generated_in(size, chunk, false),
        vec![o],
        &TeeOptions::default(),
    )
    // Batched, as `TeeLayer` sends its copies (but for the stand-in for the original).
    .batched(!matches!(mode, DiscardMode::Unbatched));
    let n = drain(body).await;
    assert!(sink.await.unwrap(), "the copy was aborted");
    n
}

/// The tee's cost per chunk: 4 MiB bodies in 8 KiB and 64 KiB chunks, streamed plain,
/// teed to a sink task that discards (the tee and channel alone), and teed through
/// `TeeLayer` to a real `FsSink` on disk (no fsync; every copy must commit).
fn per_chunk(c: &mut Criterion) {
    fixed_run();
    const SIZE: usize = 4 << 20;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = std::env::temp_dir().join(format!("tee-bench-chunk-{}", std::process::id()));
    let fs_layer = TeeLayer::builder()
        .sink(FsSink::new(&dir).fsync(FsyncPolicy::Never))
        .buffer(16 << 20)
        .build();
    let mut g = c.benchmark_group("tee_per_chunk");
    g.sample_size(10);
    for chunk in [8usize << 10, 64 << 10] {
        let chunks = (SIZE / chunk) as u64;
        // Per element = per chunk.
        g.throughput(Throughput::Elements(chunks));
        let kib = chunk >> 10;
        g.bench_function(format!("plain/{kib}KiB"), |b| {
            b.iter_custom(|n| timed(&rt, n, || drain(generated_in(SIZE, chunk, false))))
        });
        g.bench_function(format!("tee_discard/{kib}KiB"), |b| {
            b.iter_custom(|n| timed(&rt, n, || tee_discard(SIZE, chunk, DiscardMode::Next)))
        });
        g.bench_function(format!("tee_batch/{kib}KiB"), |b| {
            b.iter_custom(|n| timed(&rt, n, || tee_discard(SIZE, chunk, DiscardMode::Batch)))
        });
        g.bench_function(format!("tee_unbatched/{kib}KiB"), |b| {
            b.iter_custom(|n| timed(&rt, n, || tee_discard(SIZE, chunk, DiscardMode::Unbatched)))
        });
        let mut key = 0u64;
        let events = tokio::sync::Mutex::new(fs_layer.subscribe());
        g.bench_function(format!("tee_fs/{kib}KiB"), |b| {
            b.iter_custom(|n| {
                timed(&rt, n, || {
                    key += 1;
                    let path = format!("/o/{}", key % 8);
                    let layer = fs_layer.clone();
                    let events = &events;
                    async move {
                        let origin = service_fn(move |_req: Request<()>| async move {
                            sized(SIZE, generated_in(SIZE, chunk, false))
                        });
                        let svc = ServiceBuilder::new().layer(layer).service(origin);
                        let res = svc
                            .oneshot(Request::get(path).body(()).unwrap())
                            .await
                            .unwrap();
                        let n = drain(res.into_body()).await;
                        // Each iteration is one whole copy: wait until it is stored.
                        let ev = events.lock().await.recv().await.unwrap();
                        assert!(
                            matches!(ev.outcome, BackupOutcome::Committed { .. }),
                            "{:?}",
                            ev.outcome
                        );
                        n
                    }
                })
            })
        });
    }
    g.finish();
    let s = fs_layer.stats().snapshot();
    println!(
        "per-chunk fs sink: {} copies started, {} committed, {} overflowed",
        s.started, s.committed, s.tee.overflows
    );
    assert_eq!(
        s.tee.overflows, 0,
        "an FsSink copy overflowed: the figure is not a full copy"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The origins' answer: `body` with its length declared up front, as a file server sends it.
fn sized(len: usize, body: BoxBody) -> Result<Response<BoxBody>, Infallible> {
    Ok(Response::builder()
        .header(header::CONTENT_LENGTH, len)
        .body(body)
        .expect("a valid response head"))
}

async fn spawn<S, B>(svc: S) -> SocketAddr
where
    S: tower::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<tower_patterns::BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<tower_patterns::BoxError>,
{
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    tokio::spawn(tower_patterns::server::serve(l, svc));
    a
}

fn loopback(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = std::env::temp_dir().join(format!("tee-bench-fs-{}", std::process::id()));
    let (plain, teed, layer, fs_teed, fs_layer) = rt.block_on(async {
        let origin = spawn(service_fn(|_req: Request<Incoming>| async {
            sized(BODY, generated(BODY, false))
        }))
        .await;
        let fwd = ForwardBuilder::new(format!("http://{origin}"))
            .build::<Incoming>()
            .unwrap();
        let plain = spawn(fwd.clone()).await;
        let layer = TeeLayer::builder().sink(NullSink).buffer(4 << 20).build();
        let teed = spawn(
            ServiceBuilder::new()
                .layer(layer.clone())
                .service(fwd.clone()),
        )
        .await;
        // A real disk sink with the defaults (4 MiB buffer), no fsync: does the backup keep
        // up with the client?
        let fs_layer = TeeLayer::builder()
            .sink(FsSink::new(&dir).fsync(FsyncPolicy::Never))
            .buffer(4 << 20)
            .build();
        let fs_teed = spawn(
            ServiceBuilder::new()
                .layer(fs_layer.clone())
                .service(fwd.clone()),
        )
        .await;
        // Which chunks does the tee see behind `Forward`? One request through a proxy that
        // records the sizes of the upstream body's frames (not part of the timed cases).
        let sizes = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let rec = sizes.clone();
        let probe = spawn(service_fn(move |req: Request<Incoming>| {
            let (fwd, rec) = (fwd.clone(), rec.clone());
            async move {
                let res = fwd.oneshot(req).await?;
                Ok::<_, tower_patterns::BoxError>(res.map(move |b| {
                    b.map_frame(move |f| {
                        if let Some(d) = f.data_ref() {
                            rec.lock().unwrap().push(d.len());
                        }
                        f
                    })
                }))
            }
        }))
        .await;
        let res = ForwardBuilder::new(format!("http://{probe}"))
            .build::<Empty<Bytes>>()
            .unwrap()
            .oneshot(Request::get("/x").body(Empty::new()).unwrap())
            .await
            .unwrap();
        assert_eq!(drain(res.into_body()).await, BODY);
        let mut v = std::mem::take(&mut *sizes.lock().unwrap());
        v.sort_unstable();
        let pct = |p: usize| v[(v.len() - 1) * p / 100] >> 10;
        println!(
            "chunks the tee sees behind Forward over loopback (64 MiB): {} chunks, mean {} KiB, \
             p10 {} / median {} / p90 {} / max {} KiB",
            v.len(),
            (BODY / v.len().max(1)) >> 10,
            pct(10),
            pct(50),
            pct(90),
            pct(100)
        );
        (plain, teed, layer, fs_teed, fs_layer)
    });
    let client = rt.block_on(async {
        ForwardBuilder::new("http://127.0.0.1:1")
            .build::<Empty<Bytes>>()
            .unwrap()
    });
    let mut g = c.benchmark_group("tee_loopback_64MiB");
    g.throughput(Throughput::Bytes(BODY as u64));
    g.sample_size(10);
    for (name, addr) in [
        ("plain_proxy", plain),
        ("tee_proxy", teed),
        ("tee_fs_proxy", fs_teed),
    ] {
        let client = client.to(&format!("http://{addr}")).unwrap();
        let get = move || {
            let client = client.clone();
            async move {
                let res = client
                    .oneshot(Request::get("/x").body(Empty::new()).unwrap())
                    .await
                    .unwrap();
                drain(res.into_body()).await
            }
        };
        g.bench_function(name, |b| {
            if cpuclock::cpu_clock() {
                // CPU of every thread: what the proxy (and its origin and client) spent.
                b.iter_custom(|n| {
                    let t0 = process_cpu();
                    rt.block_on(async {
                        for _ in 0..n {
                            std::hint::black_box(get().await);
                        }
                    });
                    process_cpu().saturating_sub(t0)
                })
            } else {
                b.to_async(&rt).iter(&get)
            }
        });
    }
    g.finish();
    for (name, layer) in [("null sink", &layer), ("fs sink", &fs_layer)] {
        let s = layer.stats().snapshot();
        println!(
            "loopback tee, {name}: {} copies started, {} committed, {} overflowed, peak buffered {} KiB",
            s.started,
            s.committed,
            s.tee.overflows,
            s.tee.peak_buffered >> 10
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `total` bytes in 64 KiB chunks cycling through `pool` (distinct contents, so a chunk
/// stored out of place is caught), no allocation per chunk: as fast as a client can go.
fn cycled(total: usize, pool: std::sync::Arc<Vec<Bytes>>) -> BoxBody {
    let stream = futures_util::stream::unfold(0usize, move |off| {
        let pool = pool.clone();
        async move {
            if off >= total {
                return None;
            }
            tokio::task::yield_now().await;
            let i = off / CHUNK;
            let n = (total - off).min(CHUNK);
            let chunk = pool[i % pool.len()].slice(..n);
            Some((Ok::<_, Infallible>(Frame::data(chunk)), off + n))
        }
    });
    boxed(StreamBody::new(stream))
}

/// 17 distinct 64 KiB chunks (a prime count, so no whole-buffer shift looks right): the
/// bodies of the `FsSink` cases, checked byte for byte once stored.
fn chunk_pool() -> std::sync::Arc<Vec<Bytes>> {
    std::sync::Arc::new(
        (0..17u8)
            .map(|i| {
                Bytes::from(
                    (0..CHUNK)
                        .map(|j| (j as u8) ^ i.wrapping_mul(29))
                        .collect::<Vec<_>>(),
                )
            })
            .collect(),
    )
}

/// Checks that `path` holds `size` bytes of `pool`'s chunks in order.
fn check_stored(path: &std::path::Path, size: usize, pool: &[Bytes]) {
    let data = std::fs::read(path).unwrap();
    assert_eq!(data.len(), size, "stored size");
    for (i, c) in data.chunks(CHUNK).enumerate() {
        assert!(c == &pool[i % pool.len()][..c.len()], "chunk {i} differs");
    }
}

/// What `fs_sink_rate` and `fs_client_speed` share: a two-worker runtime, the chunk pool,
/// the directory (`FS_SPEED_DIR`, default the temp dir; one per process and case) and the
/// rounds (`FS_SPEED_RUNS`, default 1).
fn fs_speed_setup(
    tag: &str,
) -> (
    tokio::runtime::Runtime,
    std::sync::Arc<Vec<Bytes>>,
    std::path::PathBuf,
    usize,
) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = std::env::var_os("FS_SPEED_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
        .join(format!("tee-bench-{tag}-{}", std::process::id()));
    let runs = std::env::var("FS_SPEED_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    (rt, chunk_pool(), dir, runs)
}

/// Issue 12: `FsSink`'s own rate, no client and no network: a 1 GiB copy handed straight
/// to its writer in the tee's 256 KiB batches as fast as it takes them, on this machine's
/// disk (the temp dir, or `FS_SPEED_DIR`), for write sizes, writes in flight and fsync
/// policies. Prints GB/s (wall: the disk is the point), process CPU per GiB, and the
/// share of the time the writer waited for its writes (`write_batch` returns only once
/// fewer than the maximum are in flight: near 100 % means the writes are the limit, not
/// the feeding) and the longest single wait (what a live copy must survive: a 4 MiB
/// buffer is 1.7 ms of a 2.5 GB/s client). Runs when no filter is given or one names `fs_sink_rate`;
/// `FS_SPEED_RUNS` rounds (default 1). Each stored file is checked byte for byte.
fn fs_sink_rate(_c: &mut Criterion) {
    const SIZE: usize = 1 << 30;
    if !wanted("fs_sink_rate") {
        return;
    }
    let (rt, pool, dir, runs) = fs_speed_setup("rate");
    let configs: Vec<(usize, usize, FsyncPolicy)> = std::env::var("FS_RATE_CONFIGS")
        .ok()
        .map(|v| {
            // `KiB:in_flight:never|file,...`
            v.split(',')
                .map(|c| {
                    let f: Vec<&str> = c.split(':').collect();
                    let fsync = if f[2] == "file" {
                        FsyncPolicy::File
                    } else {
                        FsyncPolicy::Never
                    };
                    (
                        f[0].parse::<usize>().unwrap() << 10,
                        f[1].parse().unwrap(),
                        fsync,
                    )
                })
                .collect()
        })
        .unwrap_or_else(|| {
            let mut v = Vec::new();
            for fsync in [FsyncPolicy::Never, FsyncPolicy::File] {
                for (buffer, in_flight) in [(1usize << 20, 2usize), (1 << 20, 4), (4 << 20, 2)] {
                    v.push((buffer, in_flight, fsync));
                }
            }
            v
        });
    rt.block_on(async {
        for run in 0..runs {
            for (i, &(buffer, in_flight, fsync)) in configs.iter().enumerate() {
                // A new file each time: a rename over an existing file makes ext4
                // (`auto_da_alloc`) write the new file's data out at the rename, which
                // is the filesystem's cost of replacing an object, not the sink's rate.
                let name = format!("rate-{run}-{i}");
                let sink = FsSink::new(&dir)
                    .fsync(fsync)
                    .write_buffer(buffer)
                    .writes_in_flight(in_flight);
                let info = ObjectInfo {
                    key: ObjectKey::from_path(&format!("/{name}")).unwrap(),
                    status: http::StatusCode::OK,
                    headers: http::HeaderMap::new(),
                    content_length: Some(SIZE as u64),
                    authority: None,
                };
                let (t0, c0) = (std::time::Instant::now(), process_cpu());
                let mut w = sink.begin(&info).await.unwrap();
                let per_batch = 4;
                let (mut waited, mut longest) = (std::time::Duration::ZERO, std::time::Duration::ZERO);
                for b in 0..SIZE / CHUNK / per_batch {
                    let batch = (0..per_batch)
                        .map(|i| pool[(b * per_batch + i) % pool.len()].clone())
                        .collect();
                    let t = std::time::Instant::now();
                    w.write_batch(batch).await.unwrap();
                    waited += t.elapsed();
                    longest = longest.max(t.elapsed());
                }
                let t = std::time::Instant::now();
                w.commit().await.unwrap();
                let commit = t.elapsed();
                let (secs, cpu) = (t0.elapsed().as_secs_f64(), process_cpu() - c0);
                check_stored(&dir.join(&name), SIZE, &pool);
                let _ = std::fs::remove_file(dir.join(&name));
                println!(
                    "fs_sink_rate run {run} into {}: {} KiB writes, {in_flight} in flight, fsync {fsync:?}: \
                     {:.2} GB/s wall (writes before the commit {:.2} GB/s), {:.2} CPU-s per GiB (process), \
                     waited on writes {:.0} % of the time, longest wait {:.1} ms, commit {:.0} ms",
                    dir.display(),
                    buffer >> 10,
                    SIZE as f64 / 1e9 / secs,
                    SIZE as f64 / 1e9 / (secs - commit.as_secs_f64()),
                    cpu.as_secs_f64() * (1u64 << 30) as f64 / SIZE as f64,
                    100.0 * waited.as_secs_f64() / secs,
                    longest.as_secs_f64() * 1e3,
                    commit.as_secs_f64() * 1e3,
                );
            }
        }
    });
    let _ = std::fs::remove_dir_all(&dir);
}

/// Issue 12: does `FsSink` keep up with a fast client? (Its own rate, no client:
/// [`fs_sink_rate`].) 1 GiB through `TeeLayer` + `FsSink` (defaults: 4 MiB buffer, 1 MiB writes, 2 in flight, fsync
/// per file) to an in-process client that only passes chunk references on (~800 GB/s, no
/// real client: this case always overflows and checks the back-fill hand-off), then over
/// a loopback proxy (the ~2.5 GB/s client of the issue). A copy that overflows must be handed to
/// back-fill and then stored by the paced re-fetch. Each stored file is checked byte
/// for byte. Prints the client's and the sink's MB/s (wall time: disk speed is the point)
/// and the most bytes the copy had queued.
///
/// `FS_SPEED_DIR` picks the directory (default: the temp dir; `/dev/shm` takes the disk
/// out, leaving the sink's own pipeline), `FS_SPEED_RUNS` the rounds (default 1),
/// `FS_SPEED_IN_FLIGHT` / `FS_SPEED_WRITE_KIB` the sink's writes in flight and write size.
fn fs_client_speed(_c: &mut Criterion) {
    const SIZE: usize = 1 << 30;
    if !wanted("fs_client_speed") {
        return;
    }
    let (rt, pool, dir, runs) = fs_speed_setup("speed");
    let check = |path: &std::path::Path| check_stored(path, SIZE, &pool);
    rt.block_on(async {
        let queue = BackfillQueue::new(16);
        // `FS_SPEED_IN_FLIGHT` / `FS_SPEED_WRITE_KIB`: the sink's writes in flight and
        // write size (default: `FsSink`'s defaults).
        let mut sink = FsSink::new(&dir);
        if let Some(n) = std::env::var("FS_SPEED_IN_FLIGHT").ok().and_then(|v| v.parse().ok()) {
            sink = sink.writes_in_flight(n);
        }
        if let Some(k) = std::env::var("FS_SPEED_WRITE_KIB").ok().and_then(|v| v.parse::<usize>().ok()) {
            sink = sink.write_buffer(k << 10);
        }
        let layer = TeeLayer::builder()
            .sink(sink)
            .backfill_queue(queue.clone())
            .build();
        let p = pool.clone();
        let origin = service_fn(move |_req: Request<Empty<Bytes>>| {
            let p = p.clone();
            async move {
                sized(SIZE, cycled(SIZE, p))
            }
        });
        let svc = ServiceBuilder::new().layer(layer.clone()).service(origin.clone());
        // The loopback client: origin and proxy on sockets, the same layer.
        let p = pool.clone();
        let net_origin = spawn(service_fn(move |_req: Request<Incoming>| {
            let p = p.clone();
            async move {
                sized(SIZE, cycled(SIZE, p))
            }
        }))
        .await;
        let fwd = ForwardBuilder::new(format!("http://{net_origin}"))
            .build::<Incoming>()
            .unwrap();
        let edge = spawn(ServiceBuilder::new().layer(layer.clone()).service(fwd)).await;
        let client = ForwardBuilder::new(format!("http://{edge}"))
            .build::<Empty<Bytes>>()
            .unwrap();
        let mut events = layer.subscribe();
        let modes = [("in-process", "/speed/mem"), ("loopback", "/speed/net")];
        for (run, (mode, path)) in (0..runs).flat_map(|r| modes.map(|m| (r, m))) {
            let start = std::time::Instant::now();
            let req = Request::get(path).body(Empty::new()).unwrap();
            let res = if mode == "in-process" {
                svc.clone().oneshot(req).await.unwrap().map(boxed)
            } else {
                client.clone().oneshot(req).await.unwrap().map(boxed)
            };
            let n = drain(res.into_body()).await;
            let client_secs = start.elapsed().as_secs_f64();
            assert_eq!(n, SIZE);
            let ev = events.recv().await.unwrap();
            let sink_secs = start.elapsed().as_secs_f64();
            let mb = SIZE as f64 / 1e6;
            let file = dir.join(path.trim_start_matches('/'));
            match ev.outcome {
                BackupOutcome::Committed { .. } => {
                    check(&file);
                    println!(
                        "FsSink at client speed, run {run}, {mode}: client {:.0} MB/s, copy committed at {:.0} MB/s, byte-identical",
                        mb / client_secs,
                        mb / sink_secs
                    );
                }
                BackupOutcome::Aborted(reason) => {
                    let keys = queue.take_all();
                    assert_eq!(keys.len(), 1, "an overflowed copy must be handed to back-fill");
                    let t = std::time::Instant::now();
                    let report = backfill(svc.clone(), keys, 1).await;
                    assert_eq!(report.done.len(), 1, "{report}");
                    let ev = events.recv().await.unwrap();
                    assert!(
                        matches!(ev.outcome, BackupOutcome::Committed { .. }),
                        "{:?}",
                        ev.outcome
                    );
                    check(&file);
                    println!(
                        "FsSink at client speed, run {run}, {mode}: client {:.0} MB/s, copy lost ({reason}) and \
                         handed to back-fill; the paced re-fetch stored it at {:.0} MB/s, byte-identical",
                        mb / client_secs,
                        mb / t.elapsed().as_secs_f64()
                    );
                }
                other => panic!("{mode}: {other:?}"),
            }
        }
        let s = layer.stats().snapshot();
        println!(
            "FsSink at client speed, {}: {} copies committed, {} overflowed, peak queued {} KiB of the 4096 KiB buffer",
            dir.display(),
            s.committed,
            s.tee.overflows,
            s.tee.peak_buffered >> 10
        );
    });
    let _ = std::fs::remove_dir_all(&dir);
}

/// Where the chunks of the 1 GiB body come from.
#[derive(Clone, Copy, Debug)]
enum Source {
    /// A fresh `Vec` per chunk (the first clone promotes it: one allocation).
    FreshVec,
    /// Split off one read buffer, as hyper does ([`read_buffer_chunks`]).
    ReadBuffer,
}

/// With `TEE_RUN=plain|hold|tee|pass|body` (and `TEE_CASE=0..3`, the `tee_1GiB` case: 64 KiB fresh,
/// 64 KiB read buffer, 16 KiB fresh, 16 KiB read buffer; `TEE_MIB`, default 1024), streams
/// that one body once and exits: a fixed workload for `valgrind --tool=callgrind`, whose
/// instruction counts at two sizes, subtracted, are the per-MiB cost of each side.
fn fixed_run() {
    let Ok(mode) = std::env::var("TEE_RUN") else {
        return;
    };
    let env = |k: &str, d: usize| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    // `TEE_RUN=chunk_plain|chunk_next|chunk_batch|chunk_unbatched` (`TEE_CHUNK_KIB`,
    // default 8; `TEE_N` bodies of 4 MiB, default 32): the `tee_per_chunk` workloads, for
    // callgrind's instruction counts per chunk (two `TEE_N`, subtracted).
    if let Some(case) = mode.strip_prefix("chunk_") {
        const SIZE: usize = 4 << 20;
        let chunk = env("TEE_CHUNK_KIB", 8) << 10;
        let n = env("TEE_N", 32);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let mode = match case {
            "plain" => None,
            "next" => Some(DiscardMode::Next),
            "batch" => Some(DiscardMode::Batch),
            "unbatched" => Some(DiscardMode::Unbatched),
            other => panic!("TEE_RUN=chunk_{other}: not a case"),
        };
        let took = cpuclock::measure(|| {
            rt.block_on(async {
                for _ in 0..n {
                    let got = match mode {
                        None => drain(generated_in(SIZE, chunk, false)).await,
                        Some(m) => tee_discard(SIZE, chunk, m).await,
                    };
                    assert_eq!(got, SIZE);
                }
            })
        });
        println!(
            "TEE_RUN={mode:?}: {n} x 4 MiB in {} KiB chunks: {:.1} ns per chunk",
            chunk >> 10,
            took.as_nanos() as f64 / (n * SIZE / chunk) as f64
        );
        std::process::exit(0);
    }
    let (chunk, src) = [
        (64 << 10, Source::FreshVec),
        (64 << 10, Source::ReadBuffer),
        (16 << 10, Source::FreshVec),
        (16 << 10, Source::ReadBuffer),
    ][env("TEE_CASE", 0).min(3)];
    let total = env("TEE_MIB", 1024) << 20;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // `hold`: plain, but the consumer keeps the last `TEE_HOLD` chunks (default 4) alive,
    // as a sink's batch does: the chunks' lifetime without the tee's code. `pass`: through
    // `TeeLayer`, whose predicate declines the copy (the wrapper alone). `body`: a
    // `TeeBody` to one discarding sink task, no layer (the tee without the layer's driver).
    let run = match mode.as_str() {
        "plain" => Run::Plain,
        "hold" => Run::Hold(env("TEE_HOLD", 4)),
        "tee" => Run::Tee,
        "pass" => Run::Pass,
        "body" => Run::Body,
        other => panic!("TEE_RUN={other}: not a case"),
    };
    let (peak, secs, faults) = stream_once(&rt, run, chunk, src, total);
    println!(
        "TEE_RUN={mode}: {} MiB in {} KiB chunks, {src:?}: {:.2} ms, peak heap {} KiB, \
         {faults} minor page faults ({:.2} per chunk)",
        total >> 20,
        chunk >> 10,
        secs * 1e3,
        peak >> 10,
        faults as f64 / (total / chunk) as f64
    );
    std::process::exit(0);
}

/// Minor page faults of this thread so far: a chunk the allocator takes from fresh (or
/// trimmed and regrown) heap costs its pages' faults, which thread CPU time includes.
#[allow(unsafe_code)]
fn minor_faults() -> i64 {
    // SAFETY: all-zero is a valid `rusage` (integers and timevals).
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid, writable rusage for the duration of the call.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) };
    assert_eq!(rc, 0, "getrusage(RUSAGE_THREAD)");
    ru.ru_minflt
}

/// What [`stream_once`] puts between the origin and the consumer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Run {
    /// Nothing.
    Plain,
    /// Nothing, but the consumer keeps the last n chunks alive.
    Hold(usize),
    /// `TeeLayer` with one discarding sink (the `tee_1GiB` case).
    Tee,
    /// `TeeLayer` whose predicate declines the copy: the pass-through wrapper alone.
    Pass,
    /// `TeeBody` (batched, no byte budget) to one discarding sink task, no layer.
    Body,
}

/// Streams `total` bytes once as `run` says, one discarding sink (4 MiB buffer) when it
/// tees; returns the peak heap over the run, its time (thread CPU with `BENCH_CLOCK=cpu`)
/// and this thread's minor page faults during it.
fn stream_once(
    rt: &tokio::runtime::Runtime,
    run: Run,
    chunk: usize,
    src: Source,
    total: usize,
) -> (usize, f64, i64) {
    const BUFFER: usize = 4 << 20;
    let tee = run == Run::Tee;
    // `TEE_CLIENT_COPY=1`: the client reads each chunk's bytes (see `consume`).
    let copy = std::env::var("TEE_CLIENT_COPY").is_ok_and(|v| v == "1");
    let mut out = None;
    let faults = minor_faults();
    let took = cpuclock::measure(|| {
        out = Some(rt.block_on(async move {
            let layer = TeeLayer::builder()
                .sink(NullSink)
                .buffer(BUFFER)
                .predicate(move |_| run != Run::Pass)
                .build();
            let origin = service_fn(move |_req: Request<()>| async move {
                let body = match src {
                    Source::FreshVec => generated_in(total, chunk, true),
                    Source::ReadBuffer => read_buffer_chunks(total, chunk),
                };
                sized(total, body)
            });
            let base = LIVE.load(Ordering::Relaxed);
            PEAK.store(base, Ordering::Relaxed);
            let n = match run {
                Run::Tee | Run::Pass => {
                    let svc = ServiceBuilder::new().layer(layer.clone()).service(origin);
                    let res = svc.oneshot(Request::get("/big").body(()).unwrap()).await;
                    consume(res.unwrap().into_body(), copy).await
                }
                Run::Body => {
                    let body = origin.oneshot(Request::new(())).await.unwrap().into_body();
                    let (o, mut inlet) = outlet(BUFFER);
                    let sink = tokio::spawn(async move {
                        loop {
                            match inlet.next_batch().await {
                                NextBatch::Data(_) => {}
                                NextBatch::End => return true,
                                NextBatch::Abort(_) => return false,
                            }
                        }
                    });
                    let body = TeeBody::new(body, vec![o], &TeeOptions::default()).batched(true);
                    let n = consume(body, copy).await;
                    assert!(sink.await.unwrap(), "the copy was aborted");
                    n
                }
                Run::Plain | Run::Hold(0) => {
                    let res = origin.oneshot(Request::new(())).await;
                    consume(res.unwrap().into_body(), copy).await
                }
                Run::Hold(hold) => {
                    let body = origin.oneshot(Request::new(())).await.unwrap().into_body();
                    drain_holding(body, hold).await
                }
            };
            assert_eq!(n, total);
            for _ in 0..1000 {
                if !tee || layer.stats().snapshot().committed == 1 {
                    break;
                }
                tokio::task::yield_now().await;
            }
            let peak = PEAK.load(Ordering::Relaxed) - base;
            (peak, layer.stats().snapshot())
        }))
    });
    let (peak, stats) = out.unwrap();
    if tee {
        assert_eq!(
            (stats.committed, stats.tee.overflows),
            (1, 0),
            "the copy must be whole"
        );
    }
    (peak, took.as_secs_f64(), minor_faults() - faults)
}

/// `tee_1GiB`: 1 GiB streamed plain and through `TeeLayer` with one discarding sink,
/// alternating (the order rotated each round), five rounds per case; the median ratio of
/// the throughputs, their range, and the peak heap (a counting allocator).
fn tee_1gib(_c: &mut Criterion) {
    const GIB: usize = 1 << 30;
    const BUFFER: usize = 4 << 20;
    const ROUNDS: usize = 5;
    if !wanted("tee_1GiB") {
        return;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let run = |tee: bool, chunk: usize, src: Source| {
        let run = if tee { Run::Tee } else { Run::Plain };
        stream_once(&rt, run, chunk, src, GIB)
    };
    let clock = if cpuclock::cpu_clock() {
        "thread CPU"
    } else {
        "wall"
    };
    for (chunk, src) in [
        (64 << 10, Source::FreshVec),
        (64 << 10, Source::ReadBuffer),
        (16 << 10, Source::FreshVec),
        (16 << 10, Source::ReadBuffer),
    ] {
        let (mut ratios, mut plain, mut teed) = (Vec::new(), Vec::new(), Vec::new());
        let (mut plain_peak, mut tee_peak) = (0, 0);
        let (mut plain_faults, mut tee_faults) = (0, 0);
        for round in 0..ROUNDS {
            let mut pair = [(false, 0usize, 0f64, 0i64), (true, 0, 0.0, 0)];
            if round % 2 == 1 {
                pair.swap(0, 1);
            }
            for p in &mut pair {
                (p.1, p.2, p.3) = run(p.0, chunk, src);
            }
            pair.sort_by_key(|p| p.0);
            let [(_, pp, ps, pf), (_, tp, ts, tf)] = pair;
            plain_peak = plain_peak.max(pp);
            tee_peak = tee_peak.max(tp);
            plain_faults += pf;
            tee_faults += tf;
            ratios.push(ps / ts);
            plain.push(1024.0 / ps);
            teed.push(1024.0 / ts);
        }
        let median = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let (lo, hi) = (
            ratios.iter().copied().fold(f64::MAX, f64::min),
            ratios.iter().copied().fold(0.0, f64::max),
        );
        println!(
            "tee_1GiB {} KiB chunks, {src:?} ({clock} time, {ROUNDS} rounds, buffer {} KiB): \
             plain {:.0} MiB/s, tee {:.0} MiB/s (medians); ratio median {:.3} [{lo:.3}-{hi:.3}]; \
             peak heap plain {} KiB, tee {} KiB; minor page faults per 1 GiB (mean) plain {}, tee {}",
            chunk >> 10,
            BUFFER >> 10,
            median(&mut plain),
            median(&mut teed),
            median(&mut ratios),
            plain_peak >> 10,
            tee_peak >> 10,
            plain_faults / ROUNDS as i64,
            tee_faults / ROUNDS as i64,
        );
        assert!(
            tee_peak < 4 * BUFFER + (16 << 20),
            "peak heap {tee_peak} is not bounded by the buffers"
        );
    }
}

criterion_group!(
    benches,
    per_chunk,
    in_process,
    loopback,
    tee_1gib,
    fs_sink_rate,
    fs_client_speed
);
criterion_main!(benches);
