//! HTTP/1 upstream connections driven by the request's own task (issue 12, session 16),
//! over real sockets on 127.0.0.1. The states that only exist there: a connection handed
//! to a task of its own when the response head is in but the body is not (a large
//! response, a large upload), and an exchange dropped while it drives the connection.
//! Each test also holds for connections spawned at once (`TOWER_PATTERNS_H1_IN_TASK=0`).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tower::{Service, ServiceExt};
use tower_patterns::proxy::{Forward, ForwardBuilder};

type Body = Full<Bytes>;

fn pattern(i: usize) -> u8 {
    (i % 251) as u8
}

/// Connections the backend holds open, and a wake-up whenever one closes.
#[derive(Clone, Default)]
struct Open {
    n: Arc<AtomicUsize>,
    closed: Arc<Notify>,
    /// Connections accepted in all.
    accepted: Arc<AtomicUsize>,
    /// Closes a connection held after `/then-close`.
    close_now: Arc<Notify>,
}

impl Open {
    async fn wait_zero(&self) {
        let wait = async {
            loop {
                let closed = self.closed.notified();
                if self.n.load(Ordering::SeqCst) == 0 {
                    return;
                }
                closed.await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), wait)
            .await
            .expect("the upstream connection was left open");
    }
}

/// Reads one request head (and its `content-length` body, summed); `None` at EOF.
async fn read_request(s: &mut TcpStream) -> Option<(String, u64, u64)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_string();
    let path = head.split(' ').nth(1).unwrap_or("").to_string();
    let len: u64 = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    let mut got = 0u64;
    let mut sum = 0u64;
    let mut take = |bytes: &[u8], got: &mut u64| {
        for &b in bytes {
            sum = sum.wrapping_mul(31).wrapping_add(u64::from(b));
        }
        *got += bytes.len() as u64;
    };
    take(&buf[end..], &mut got);
    while got < len {
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => take(&chunk[..n], &mut got),
        }
    }
    Some((path, got, sum))
}

/// `/big/N`: N pattern bytes; `/then-close`: a keep-alive answer, then the connection
/// closed on `close_now`; `/hold`: 1 MiB announced, 64 KiB sent, then nothing until
/// the proxy closes; anything else: the request body's length and checksum.
async fn backend() -> (SocketAddr, Open) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let open = Open::default();
    let o = open.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            o.n.fetch_add(1, Ordering::SeqCst);
            o.accepted.fetch_add(1, Ordering::SeqCst);
            let o = o.clone();
            tokio::spawn(async move {
                while let Some((path, len, sum)) = read_request(&mut s).await {
                    if let Some(n) = path.strip_prefix("/big/") {
                        let n: usize = n.parse().unwrap();
                        let body: Vec<u8> = (0..n).map(pattern).collect();
                        let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {n}\r\n\r\n");
                        if s.write_all(head.as_bytes()).await.is_err()
                            || s.write_all(&body).await.is_err()
                        {
                            break;
                        }
                    } else if path == "/then-close" {
                        // Answered with keep-alive, closed only when the test says so.
                        let close_now = o.close_now.notified();
                        let res = "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        let _ = s.write_all(res.as_bytes()).await;
                        close_now.await;
                        break;
                    } else if path == "/hold" {
                        let head = "HTTP/1.1 200 OK\r\ncontent-length: 1048576\r\n\r\n";
                        let _ = s.write_all(head.as_bytes()).await;
                        let _ = s.write_all(&[7u8; 65536]).await;
                        // Held until the proxy side closes the connection.
                        let mut rest = [0u8; 1024];
                        while matches!(s.read(&mut rest).await, Ok(n) if n > 0) {}
                        break;
                    } else {
                        let body = format!("{len} {sum}");
                        let res = format!(
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        if s.write_all(res.as_bytes()).await.is_err() {
                            break;
                        }
                    }
                }
                o.n.fetch_sub(1, Ordering::SeqCst);
                o.closed.notify_waiters();
            });
        }
    });
    (addr, open)
}

fn forward(addr: SocketAddr) -> Forward<Body> {
    ForwardBuilder::new(format!("http://{addr}"))
        .build::<Body>()
        .unwrap()
}

#[tokio::test]
async fn a_large_response_through_an_in_task_connection_is_byte_identical() {
    let (addr, open) = backend().await;
    let mut fwd = forward(addr);
    const N: usize = 8 << 20;
    for _ in 0..3 {
        let req = Request::get(format!("/big/{N}"))
            .body(Body::default())
            .unwrap();
        let res = fwd.ready().await.unwrap().call(req).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        let body = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body.len(), N);
        assert!(body.iter().enumerate().all(|(i, &b)| b == pattern(i)));
    }
    // The connection finished each body in its own task and came back for the next.
    assert_eq!(open.n.load(Ordering::SeqCst), 1);
    // Small answers after large ones on the same pooled connection.
    for _ in 0..3 {
        let req = Request::get("/big/10").body(Body::default()).unwrap();
        let res = fwd.ready().await.unwrap().call(req).await.unwrap();
        let body = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body.len(), 10);
    }
    assert_eq!(open.n.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn an_upload_larger_than_the_socket_buffers_arrives_whole() {
    let (addr, _) = backend().await;
    let mut fwd = forward(addr);
    const N: usize = 16 << 20;
    let data: Vec<u8> = (0..N).map(pattern).collect();
    let mut sum = 0u64;
    for &b in &data {
        sum = sum.wrapping_mul(31).wrapping_add(u64::from(b));
    }
    for _ in 0..2 {
        let req = Request::post("/upload")
            .body(Body::new(Bytes::from(data.clone())))
            .unwrap();
        let res = fwd.ready().await.unwrap().call(req).await.unwrap();
        let body = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, format!("{N} {sum}").as_bytes());
    }
}

#[tokio::test]
async fn a_client_gone_mid_response_leaves_no_upstream_connection() {
    let (addr, open) = backend().await;
    let mut fwd = forward(addr);
    let req = Request::get("/hold").body(Body::default()).unwrap();
    let res = fwd.ready().await.unwrap().call(req).await.unwrap();
    let mut body = res.into_body();
    let first = body.frame().await.unwrap().unwrap();
    assert!(first.data_ref().is_some_and(|d| !d.is_empty()));
    assert_eq!(open.n.load(Ordering::SeqCst), 1);
    // The client goes away with the body unread: the connection's task ends and closes it.
    drop(body);
    open.wait_zero().await;
}

#[tokio::test]
async fn an_exchange_dropped_before_the_head_closes_its_connection() {
    let (addr, open) = backend().await;
    let mut fwd = forward(addr);
    // A pooled connection first, so the next exchange drives it itself.
    let req = Request::get("/big/10").body(Body::default()).unwrap();
    let res = fwd.ready().await.unwrap().call(req).await.unwrap();
    res.into_body().collect().await.unwrap();
    // Polled once: the request goes out, the backend (a task on this same thread) cannot
    // have answered yet, so the exchange is dropped while it holds the connection.
    let req = Request::post("/upload").body(Body::from("x")).unwrap();
    let mut fut = Box::pin(fwd.ready().await.unwrap().call(req));
    let polled = futures_poll_once(fut.as_mut()).await;
    assert!(polled, "the exchange answered before it was dropped");
    drop(fut);
    open.wait_zero().await;
}

/// Polls `fut` once; whether it was still pending.
async fn futures_poll_once<F: std::future::Future + ?Sized>(fut: std::pin::Pin<&mut F>) -> bool {
    let mut fut = Some(fut);
    std::future::poll_fn(move |cx| {
        let f = fut.take().unwrap();
        std::task::Poll::Ready(f.poll(cx).is_pending())
    })
    .await
}

/// A `Forward` shared by two runtimes (one per worker thread, say): a connection left idle
/// by the first keeps its socket registered with that runtime's reactor. Once that
/// runtime is gone the connection fails at its next use, before the request is written,
/// and the request goes out on a fresh connection from the second runtime.
#[test]
fn a_connection_pooled_by_a_runtime_that_is_gone_is_replaced() {
    let rt = |name| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .thread_name(name)
            .build()
            .unwrap()
    };
    let backend_rt = rt("backend");
    let (addr, open) = backend_rt.block_on(backend());
    // Detached: the backend serves until the test process ends.
    std::thread::spawn(move || backend_rt.block_on(std::future::pending::<()>()));
    let get = |mut fwd: Forward<Body>| async move {
        let req = Request::get("/big/10").body(Body::default()).unwrap();
        let res = fwd.ready().await.unwrap().call(req).await.unwrap();
        res.into_body().collect().await.unwrap().to_bytes().len()
    };
    let first = rt("first");
    let fwd = first.block_on(async { forward(addr) });
    assert_eq!(first.block_on(get(fwd.clone())), 10);
    drop(first);
    let second = rt("second");
    assert_eq!(second.block_on(get(fwd.clone())), 10);
    assert_eq!(second.block_on(get(fwd)), 10);
    // The first runtime's connection was replaced once, then reused.
    assert!(open.n.load(Ordering::SeqCst) <= 2);
}

#[tokio::test]
async fn an_idle_connection_the_upstream_closed_is_not_used() {
    let (addr, open) = backend().await;
    let mut fwd = forward(addr);
    let req = Request::get("/then-close").body(Body::default()).unwrap();
    let res = fwd.ready().await.unwrap().call(req).await.unwrap();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"ok");
    // The connection is idle in the pool now; the upstream closes it.
    open.close_now.notify_waiters();
    open.wait_zero().await;
    // The next request finds it closed before writing and goes out on a new one.
    let req = Request::get("/big/10").body(Body::default()).unwrap();
    let res = fwd.ready().await.unwrap().call(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body.len(), 10);
    assert_eq!(open.accepted.load(Ordering::SeqCst), 2);
}
