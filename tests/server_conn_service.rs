//! How the server calls the service (issue 12): one instance per connection, not a clone
//! of the whole stack per request, while a service that is not ready at once still gets
//! its readiness waited for with the request's own waker. Raw keep-alive clients on
//! 127.0.0.1.

use std::convert::Infallible;
use std::future::{ready, Ready};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower_patterns::server::spawn_local;
use tower_service::Service;

mod support;

/// Answers `200 ok`; counts its clones and its `poll_ready` calls. With `pending_every`
/// set, every such call (odd-numbered, over all clones) answers `Pending` first, waking
/// the caller at once: a service that is not ready when asked.
#[derive(Clone)]
struct Counting {
    clones: Arc<AtomicUsize>,
    polls: Arc<AtomicUsize>,
    pending_every_other: bool,
}

impl Counting {
    fn new(pending_every_other: bool) -> Self {
        Counting {
            clones: Arc::new(AtomicUsize::new(0)),
            polls: Arc::new(AtomicUsize::new(0)),
            pending_every_other,
        }
    }
}

/// A clone counter that counts: `#[derive(Clone)]` on `Counting` clones the `Arc`s, this
/// wrapper records the clone itself.
struct Svc(Counting);

impl Clone for Svc {
    fn clone(&self) -> Self {
        self.0.clones.fetch_add(1, Ordering::Relaxed);
        Svc(self.0.clone())
    }
}

impl Service<Request<Incoming>> for Svc {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        let n = self.0.polls.fetch_add(1, Ordering::Relaxed);
        if self.0.pending_every_other && n % 2 == 0 {
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _req: Request<Incoming>) -> Self::Future {
        ready(Ok(Response::new(Full::new(Bytes::from_static(b"ok")))))
    }
}

/// Sends `n` requests on one keep-alive connection, each answered before the next.
async fn keep_alive_requests(addr: std::net::SocketAddr, n: usize) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut buf = vec![0u8; 4096];
    for i in 0..n {
        s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        // The whole answer (head and the two-byte body) before the next request.
        let mut got = Vec::new();
        while !(got.ends_with(b"\r\n\r\nok")) {
            let r = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
                .await
                .unwrap_or_else(|_| panic!("request {i}: no answer within 10 s"))
                .unwrap();
            assert!(r > 0, "request {i}: connection closed");
            got.extend_from_slice(&buf[..r]);
        }
        assert!(
            got.starts_with(b"HTTP/1.1 200"),
            "{:?}",
            String::from_utf8_lossy(&got)
        );
    }
}

#[tokio::test]
async fn a_ready_service_is_not_cloned_per_request() {
    let svc = Counting::new(false);
    let server = spawn_local(Svc(svc.clone())).await.unwrap();
    keep_alive_requests(server.addr(), 20).await;
    // The server keeps one instance per connection (and may clone once while setting up
    // the listener); hyper-util's adapter cloned the stack for every request (20 more).
    let clones = svc.clones.load(Ordering::Relaxed);
    assert!(
        clones <= 3,
        "{clones} clones for 20 requests on one connection"
    );
    assert!(
        svc.polls.load(Ordering::Relaxed) >= 20,
        "every request asked poll_ready"
    );
}

#[tokio::test]
async fn a_service_not_ready_at_once_still_answers_every_request() {
    let svc = Counting::new(true);
    let server = spawn_local(Svc(svc.clone())).await.unwrap();
    keep_alive_requests(server.addr(), 20).await;
    // Each request found the connection's instance not ready and waited on a clone.
    assert!(svc.clones.load(Ordering::Relaxed) >= 20);
}

/// A concurrency limit of one, shared by two connections: the second connection's request
/// finds its instance not ready and queues for the permit. When the first request ends,
/// the permit must reach the second request. Had the connection's own instance stayed
/// queued (asked with a waker that does nothing) while a clone queued behind it, the
/// permit would go to that instance, which nobody polls again, and the request would
/// hang.
#[tokio::test]
async fn a_request_queued_at_a_concurrency_limit_gets_the_permit_when_it_frees() {
    let started = Arc::new(tokio::sync::Notify::new());
    let gate = Arc::new(tokio::sync::Notify::new());
    let (s, g) = (started.clone(), gate.clone());
    let handler = tower::service_fn(move |req: Request<Incoming>| {
        let (s, g) = (s.clone(), g.clone());
        async move {
            if req.uri().path() == "/slow" {
                s.notify_one();
                g.notified().await;
            }
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
        }
    });
    let not_ready = Arc::new(tokio::sync::Notify::new());
    let svc = Observed {
        inner: tower::ServiceBuilder::new()
            .concurrency_limit(1)
            .service(handler),
        not_ready: not_ready.clone(),
    };
    let server = spawn_local(svc).await.unwrap();

    let mut a = tokio::net::TcpStream::connect(server.addr()).await.unwrap();
    a.write_all(b"GET /slow HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), started.notified())
        .await
        .expect("the slow request holds the permit");
    let mut b = tokio::net::TcpStream::connect(server.addr()).await.unwrap();
    b.write_all(b"GET /fast HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    // The server has read the second request and found the limit taken.
    tokio::time::timeout(Duration::from_secs(10), not_ready.notified())
        .await
        .expect("the second request waits for the permit");
    gate.notify_one();
    let mut buf = [0u8; 1024];
    for (name, conn) in [("first", &mut a), ("second", &mut b)] {
        let n = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("the {name} request got no answer"))
            .unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{name}");
    }
}

/// Signals each `poll_ready` that answers `Pending`.
#[derive(Clone)]
struct Observed<S> {
    inner: S,
    not_ready: Arc<tokio::sync::Notify>,
}

impl<S: Service<Request<Incoming>>> Service<Request<Incoming>> for Observed<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        let r = self.inner.poll_ready(cx);
        if r.is_pending() {
            self.not_ready.notify_one();
        }
        r
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        self.inner.call(req)
    }
}

/// Records the port of each request's `ClientAddr`, then calls the inner service.
#[derive(Clone)]
struct RecordPeer<S> {
    inner: S,
    ports: Arc<std::sync::Mutex<Vec<u16>>>,
}

impl<S: Service<Request<Incoming>>> Service<Request<Incoming>> for RecordPeer<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        let port = req
            .extensions()
            .get::<tower_patterns::client_addr::ClientAddr>()
            .map_or(0, |a| a.0.port());
        if let Ok(mut ports) = self.ports.lock() {
            ports.push(port);
        }
        self.inner.call(req)
    }
}

/// The server reuses the extension map `Forward` hands back after each request (issue
/// 12): with two connections taking turns on one thread, every request must still carry
/// its own connection's peer, never the previous request's.
#[tokio::test]
async fn each_request_carries_its_own_peer_while_the_extension_map_is_reused() {
    let be = support::echo_backend().await;
    let ports = Arc::new(std::sync::Mutex::new(Vec::new()));
    let svc = RecordPeer {
        inner: tower_patterns::proxy::ErrorResponse::new(
            tower_patterns::proxy::Forward::<Incoming>::new(&be.url()).unwrap(),
        ),
        ports: ports.clone(),
    };
    let server = spawn_local(svc).await.unwrap();
    let mut conns = [
        tokio::net::TcpStream::connect(server.addr()).await.unwrap(),
        tokio::net::TcpStream::connect(server.addr()).await.unwrap(),
    ];
    for i in 0..20 {
        let c = &mut conns[i % 2];
        let own = c.local_addr().unwrap().port();
        c.write_all(b"GET /peer HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(10), read_answer(c))
            .await
            .expect("an answer");
        assert!(answer.starts_with("http/1.1 200"), "{answer}");
        assert!(
            answer.contains("x-forwarded-for: 127.0.0.1"),
            "the backend saw X-Forwarded-For: {answer}"
        );
        let last = ports.lock().unwrap().last().copied();
        assert_eq!(last, Some(own), "request {i}");
    }
}

/// One whole response (head and `content-length` body), lowercased.
async fn read_answer(c: &mut tokio::net::TcpStream) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .expect("a content-length");
            if got.len() >= end + 4 + len {
                return String::from_utf8_lossy(&got).to_ascii_lowercase();
            }
        }
        let n = c.read(&mut buf).await.unwrap();
        assert!(n > 0, "connection closed mid-answer");
        got.extend_from_slice(&buf[..n]);
    }
}
