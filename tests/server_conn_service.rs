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
