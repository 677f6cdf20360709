//! Heap allocations per request on the balanced HTTP/1 path (issue 12): a budget, as
//! `tests/proxy_alloc.rs` keeps one for bare `Forward`.
//!
//! `reverse_proxy --serve` runs `Replay` + `Balance` (round robin over two `Forward`s,
//! default retry) in front of two upstreams. A `GET` there may be retried on the other
//! upstream after it was sent, so the balancer keeps a copy of its head; that copy is the
//! balancer's own allocations per request. This test proxies keep-alive requests over real
//! sockets on 127.0.0.1 through that stack and counts the allocations made on the proxy's
//! own thread only (backends and client run on other threads): exact and load-independent.
//! A second test checks what the copy must still carry: a `GET` retried after the first
//! upstream read it and hung up reaches the second with the client's `X-Forwarded-For`
//! (the server's `ClientAddr` extension, kept in the copy).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tower::Layer;
use tower_patterns::balance::{Balance, ReplayLayer, Retry};
use tower_patterns::body::ReplayBody;
use tower_patterns::proxy::{ErrorResponseLayer, ForwardBuilder};

mod common;

struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    // `const`: reading it never allocates, so the allocator may use it.
    static COUNTED: Cell<bool> = const { Cell::new(false) };
    // A count of this thread's own allocations, apart from `ALLOCS` (which other tests'
    // proxy threads add to while they run in parallel).
    static COUNT_HERE: Cell<bool> = const { Cell::new(false) };
    static HERE: Cell<u64> = const { Cell::new(0) };
}

fn count_alloc() {
    if COUNTED.with(Cell::get) {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
    }
    if COUNT_HERE.with(Cell::get) {
        HERE.with(|h| h.set(h.get() + 1));
    }
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count_alloc();
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count_alloc();
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Bare `Forward`'s budget (`tests/proxy_alloc.rs`: 8) plus the balancer's own: the
/// kept copy of the head (its box and its header list). The `X-Forwarded-For` value is
/// reused as under bare `Forward`: a balancer instance (one per connection) calls its own
/// clone of each endpoint's `Forward` (`balance::local`), whose last-value cache hits.
/// Before that, each try called a fresh clone from the shared snapshot and the value was
/// made again: two allocations (the copy, and the promotion of that `Bytes` to shared when
/// the cache kept a clone), 12 in all. The server's extensions (the client's address) are
/// copied as plain values, not as a second extension map (that was 3 more: the map, its
/// table, the value; 17 in all before session 15).
const BUDGET_PER_REQUEST: u64 = 10;
/// Allocations in the measured window that do not recur per request.
const ONE_OFF: u64 = 50;

/// A keep-alive backend answering every request head with the `X-Forwarded-For` it
/// received (so the test sees the proxy's work reached it); with `hang_up`, it reads one
/// head and closes the connection without an answer instead.
async fn backend(listener: TcpListener, hang_up: bool, heads: Arc<AtomicU64>) {
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
async fn spawn_backend(hang_up: bool) -> (String, Arc<AtomicU64>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let heads = Arc::new(AtomicU64::new(0));
    tokio::spawn(backend(l, hang_up, heads.clone()));
    (url, heads)
}

/// `reverse_proxy --serve`'s stack for one worker over `backends`, served on its own
/// thread with a current-thread runtime; only that thread's allocations are counted.
fn spawn_balanced_proxy(backends: Vec<String>) -> std::net::SocketAddr {
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    std_listener.set_nonblocking(true).unwrap();
    let proxy_addr = std_listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            COUNTED.with(|c| c.set(true));
            let listener = TcpListener::from_std(std_listener).unwrap();
            let endpoints = backends.iter().map(|url| {
                let fwd = ForwardBuilder::new(url.as_str())
                    .build::<ReplayBody<hyper::body::Incoming>>()
                    .unwrap();
                (url.clone(), fwd)
            });
            let lb = Balance::builder()
                .retry(Retry::default())
                .try_timeout(None)
                .build_static(endpoints);
            let svc = ErrorResponseLayer.layer(ReplayLayer::new(64 * 1024).layer(lb));
            let _ = tower_patterns::server::serve(listener, svc).await;
        });
    });
    proxy_addr
}

/// `n` requests, one at a time, spread over `conns`; each answered 200 with the
/// `X-Forwarded-For` the backend saw.
async fn requests(conns: &mut [TcpStream], req: &[u8], n: usize) {
    for i in 0..n {
        let c = &mut conns[i % conns.len()];
        c.write_all(req).await.unwrap();
        let (head, body) = common::read_raw_response(c).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert_eq!(body, b"127.0.0.1", "the backend saw X-Forwarded-For");
    }
}

#[tokio::test]
async fn balanced_path_stays_within_its_allocation_budget() {
    let backends = vec![spawn_backend(false).await.0, spawn_backend(false).await.0];
    let proxy_addr = spawn_balanced_proxy(backends);
    let mut conns = Vec::new();
    for _ in 0..4 {
        conns.push(TcpStream::connect(proxy_addr).await.unwrap());
    }
    let req = format!("GET /alloc HTTP/1.1\r\nhost: {proxy_addr}\r\nuser-agent: t\r\n\r\n");
    // Warm-up: connections accepted, both upstream pools hold their connection, hyper's
    // buffers have their steady size.
    requests(&mut conns, req.as_bytes(), 200).await;
    let before = ALLOCS.load(Ordering::Relaxed);
    const N: u64 = 2000;
    requests(&mut conns, req.as_bytes(), N as usize).await;
    let allocs = ALLOCS.load(Ordering::Relaxed) - before;
    let per_request = allocs as f64 / N as f64;
    println!("balanced proxy allocations: {allocs} for {N} requests ({per_request:.3} a request)");
    assert!(
        allocs <= BUDGET_PER_REQUEST * N + ONE_OFF,
        "{per_request:.2} allocations per request, budget {BUDGET_PER_REQUEST}"
    );
}

#[tokio::test]
async fn a_get_retried_after_it_was_sent_still_carries_the_client_address() {
    // Round robin from the first endpoint: every other request lands on the one that
    // reads the head and hangs up (sent, then failed), and is retried on the other.
    let (hangs_up, sent_to_first) = spawn_backend(true).await;
    let (answers, _) = spawn_backend(false).await;
    let proxy_addr = spawn_balanced_proxy(vec![hangs_up, answers]);
    let mut conn = TcpStream::connect(proxy_addr).await.unwrap();
    let req = format!("GET /retried HTTP/1.1\r\nhost: {proxy_addr}\r\n\r\n");
    // Passive health ejects the failing endpoint after a few failures; before that, at
    // least one request went to it first and was retried.
    requests(std::slice::from_mut(&mut conn), req.as_bytes(), 4).await;
    assert!(
        sent_to_first.load(Ordering::Relaxed) >= 1,
        "a request was sent to the endpoint that hangs up, and then retried"
    );
}

/// Starts counting this thread's own allocations (`HERE`); returns the count so far.
fn count_from_here() -> u64 {
    COUNT_HERE.with(|c| c.set(true));
    HERE.with(Cell::get)
}

/// This thread's allocations since `start`; stops counting.
fn counted_since(start: u64) -> u64 {
    let n = HERE.with(Cell::get) - start;
    COUNT_HERE.with(|c| c.set(false));
    n
}

#[tokio::test]
async fn a_balancer_cloned_per_request_pays_nothing_for_per_instance_clones() {
    use http::{Request, Response};
    use http_body_util::Full;
    use tower::{Service, ServiceExt};
    type Req = Request<Full<bytes::Bytes>>;
    // An endpoint whose clone and answer allocate nothing, so only the balancer counts.
    let endpoint = tower::service_fn(|_req: Req| async {
        Ok::<_, std::convert::Infallible>(Response::new(String::new()))
    });
    let lb = Balance::builder().build_static([("a", endpoint), ("b", endpoint)]);
    let get = || {
        Request::get("/")
            .body(Full::new(bytes::Bytes::new()))
            .unwrap()
    };
    const N: u64 = 200;
    // One long-lived instance (the server's: one per connection), warmed up first.
    let mut kept = lb.clone();
    for _ in 0..4 {
        kept.ready().await.unwrap().call(get()).await.unwrap();
    }
    let start = count_from_here();
    for _ in 0..N {
        kept.ready().await.unwrap().call(get()).await.unwrap();
    }
    let long_lived = counted_since(start);
    // A clone per request, as axum's `Router` and `oneshot` on a clone call it: such an
    // instance is called once, so keeping clones of its endpoints (a list to allocate)
    // would only cost it; it must allocate no more than the long-lived instance does.
    let start = count_from_here();
    for _ in 0..N {
        lb.clone().oneshot(get()).await.unwrap();
    }
    let per_request = counted_since(start);
    println!(
        "allocations for {N} requests: long-lived {long_lived}, clone per request {per_request}"
    );
    assert!(
        per_request <= long_lived + 2,
        "a clone per request allocated {per_request} for {N} requests, a long-lived instance {long_lived}"
    );
}
