//! Counting heap allocations per request (issue 12's budgets, `tests/proxy_alloc.rs` and
//! `tests/balance_alloc.rs`): a counting global allocator, an `X-Forwarded-For`-echoing
//! keep-alive backend, a proxy served on a thread of its own whose allocations are the
//! ones counted, and the request loop. Declaring this module makes [`Counting`] the test
//! binary's global allocator.
#![allow(dead_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Allocations (and reallocations) on counted threads ([`serve_counted`]).
pub static ALLOCS: AtomicU64 = AtomicU64::new(0);
/// Of those, the ones larger than [`LARGE`].
pub static LARGE_ALLOCS: AtomicU64 = AtomicU64::new(0);

/// glibc's per-thread cache serves requests up to 1032 bytes in a few instructions; a
/// larger one goes through its bins (~300-500 instructions under callgrind, issue 12).
pub const LARGE: usize = 1024;

thread_local! {
    // `const`: reading them never allocates, so the allocator may use them.
    static COUNTED: Cell<bool> = const { Cell::new(false) };
    // A count of this thread's own allocations, apart from `ALLOCS` (which a proxy
    // thread of another test adds to while tests run in parallel).
    static COUNT_HERE: Cell<bool> = const { Cell::new(false) };
    static HERE: Cell<u64> = const { Cell::new(0) };
}

pub struct Counting;

fn count(size: usize) {
    if COUNTED.with(Cell::get) {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        if size > LARGE {
            LARGE_ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
    }
    if COUNT_HERE.with(Cell::get) {
        HERE.with(|h| h.set(h.get() + 1));
    }
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size);
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Starts counting this thread's own allocations; returns the count so far.
pub fn count_from_here() -> u64 {
    COUNT_HERE.with(|c| c.set(true));
    HERE.with(Cell::get)
}

/// This thread's allocations since `start` ([`count_from_here`]); stops counting.
pub fn counted_since(start: u64) -> u64 {
    let n = HERE.with(Cell::get) - start;
    COUNT_HERE.with(|c| c.set(false));
    n
}

/// A keep-alive backend answering every request head with the `X-Forwarded-For` it
/// received (so the test sees the proxy's work reached it); with `hang_up`, it reads one
/// head and closes the connection without an answer instead. `heads` counts the heads read.
pub async fn backend(listener: TcpListener, hang_up: bool, heads: Arc<AtomicU64>) {
    loop {
        let (mut conn, _) = listener.accept().await.expect("accept");
        let heads = heads.clone();
        tokio::spawn(async move {
            let mut buf = Vec::new();
            loop {
                let mut chunk = [0u8; 4096];
                let n = match conn.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                buf.extend_from_slice(&chunk[..n]);
                while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    heads.fetch_add(1, Ordering::Relaxed);
                    if hang_up {
                        return;
                    }
                    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                    let xff = head
                        .lines()
                        .find_map(|l| l.strip_prefix("x-forwarded-for:"))
                        .map(str::trim)
                        .unwrap_or("none")
                        .to_owned();
                    buf.drain(..end + 4);
                    let res = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\ncontent-type: text/plain\r\n\r\n{xff}",
                        xff.len()
                    );
                    if conn.write_all(res.as_bytes()).await.is_err() {
                        return;
                    }
                }
            }
        });
    }
}

/// A [`backend`]'s URL and the number of request heads it has read.
pub async fn spawn_backend(hang_up: bool) -> (String, Arc<AtomicU64>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let heads = Arc::new(AtomicU64::new(0));
    tokio::spawn(backend(l, hang_up, heads.clone()));
    (url, heads)
}

/// Runs `serve` on a listener of its own, on a thread of its own with a current-thread
/// runtime, as one worker of `server::Workers` runs it; only that thread's allocations are
/// counted in [`ALLOCS`]. Returns the listener's address.
pub fn serve_counted<F, Fut>(serve: F) -> SocketAddr
where
    F: FnOnce(TcpListener) -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    std_listener.set_nonblocking(true).unwrap();
    let addr = std_listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            COUNTED.with(|c| c.set(true));
            serve(TcpListener::from_std(std_listener).unwrap()).await;
        });
    });
    addr
}

/// `n` requests, one at a time, spread over `conns`; each answered 200 with the
/// `X-Forwarded-For` the backend saw.
pub async fn requests(conns: &mut [TcpStream], req: &[u8], n: usize) {
    for i in 0..n {
        let c = &mut conns[i % conns.len()];
        c.write_all(req).await.unwrap();
        let (head, body) = crate::common::read_raw_response(c).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert_eq!(body, b"127.0.0.1", "the backend saw X-Forwarded-For");
    }
}

/// The counted allocations of `n` requests over `conns`, after a warm-up of 200 (the
/// connections accepted, the upstream pools holding their connections, hyper's buffers at
/// their steady size): all of them, and those larger than [`LARGE`].
pub async fn measure(conns: &mut [TcpStream], req: &[u8], n: u64) -> (u64, u64) {
    requests(conns, req, 200).await;
    let before = ALLOCS.load(Ordering::Relaxed);
    let large_before = LARGE_ALLOCS.load(Ordering::Relaxed);
    requests(conns, req, n as usize).await;
    (
        ALLOCS.load(Ordering::Relaxed) - before,
        LARGE_ALLOCS.load(Ordering::Relaxed) - large_before,
    )
}

/// Requests counted by [`assert_budget`].
pub const N: u64 = 2000;
/// Allocations in the measured window that do not recur per request (a table growing
/// once in the window).
pub const ONE_OFF: u64 = 50;

/// Sends [`N`] requests of `req` over `conns` after [`measure`]'s warm-up and asserts at
/// most `budget` allocations a request; prints the figure under `label`. Returns the
/// count of those larger than [`LARGE`], for a test with a budget for them too.
pub async fn assert_budget(label: &str, conns: &mut [TcpStream], req: &[u8], budget: u64) -> u64 {
    let (allocs, large) = measure(conns, req, N).await;
    let per_request = allocs as f64 / N as f64;
    println!("{label} allocations: {allocs} for {N} requests ({per_request:.3} a request)");
    assert!(
        allocs <= budget * N + ONE_OFF,
        "{label}: {per_request:.2} allocations per request, budget {budget}"
    );
    large
}

/// `n` connections to `addr`.
pub async fn connect(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut conns = Vec::new();
    for _ in 0..n {
        conns.push(TcpStream::connect(addr).await.unwrap());
    }
    conns
}

/// Allocations on this thread per request of `svc` over an in-process service (no server:
/// as under axum's or hyper's own), the service cloned per request as those servers do;
/// `N_IN_PROCESS` requests made by `request` before counting starts, after a warm-up of 20
/// (the thread's RNG, its breaker handle, any lazily built state).
pub async fn per_request_in_process<S>(svc: S, request: fn() -> http::Request<()>) -> u64
where
    S: tower::Service<http::Request<()>, Response = http::Response<()>> + Clone,
    S::Error: std::fmt::Debug,
{
    use tower::ServiceExt;
    let reqs: Vec<_> = (0..N_IN_PROCESS + 20).map(|_| request()).collect();
    let mut reqs = reqs.into_iter();
    for req in reqs.by_ref().take(20) {
        svc.clone().oneshot(req).await.unwrap();
    }
    let start = count_from_here();
    for req in reqs {
        let res = svc.clone().oneshot(req).await.unwrap();
        drop(res);
    }
    counted_since(start) / N_IN_PROCESS
}

/// Requests counted by [`per_request_in_process`].
pub const N_IN_PROCESS: u64 = 200;
