//! HTTP/2 serving over real sockets on 127.0.0.1 (issue 13): HTTP/1.1 and h2c prior
//! knowledge on the same port, many streams on one connection, the stream limit, a drain
//! that sends GOAWAY while in-flight streams finish, the header read timeout for a client
//! that never finishes the preface, and the same on the per-core `Workers`.

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tower_patterns::proxy::ClientAddr;
use tower_patterns::server::{Server, WorkerId, Workers};

/// Every test's bound on anything it waits for.
const LIMIT: Duration = Duration::from_secs(10);

/// Answers `<version> <path>`.
fn echo_version() -> impl tower::Service<
    Request<Incoming>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl Send,
> + Clone
       + Send
       + 'static {
    tower::service_fn(|req: Request<Incoming>| async move {
        let body = format!("{:?} {}", req.version(), req.uri().path());
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body))))
    })
}

async fn h2c(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<Empty<Bytes>> {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .expect("h2c handshake");
    tokio::spawn(conn);
    send
}

fn get(path: &str) -> Request<Empty<Bytes>> {
    Request::builder()
        .uri(format!("http://localhost{path}"))
        .body(Empty::new())
        .expect("request")
}

async fn body_text(res: Response<Incoming>) -> String {
    let bytes = res.into_body().collect().await.expect("body").to_bytes();
    String::from_utf8_lossy(&bytes).into_owned()
}

#[tokio::test]
async fn h1_and_h2c_prior_knowledge_share_a_port() {
    let server = Server::builder().spawn_local(echo_version()).await.unwrap();

    let mut h2 = h2c(server.addr()).await;
    let res = tokio::time::timeout(LIMIT, h2.send_request(get("/two")))
        .await
        .expect("in time")
        .expect("h2 answer");
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.version(), http::Version::HTTP_2);
    assert_eq!(body_text(res).await, "HTTP/2.0 /two");

    let mut tcp = tokio::net::TcpStream::connect(server.addr()).await.unwrap();
    tcp.write_all(b"GET /one HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(LIMIT, tcp.read_to_end(&mut raw))
        .await
        .expect("in time")
        .unwrap();
    let raw = String::from_utf8_lossy(&raw);
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
    assert!(raw.ends_with("HTTP/1.1 /one"), "{raw}");

    server.shutdown().await.unwrap();
}

/// In flight now, the most at once, and the client ports seen.
#[derive(Default)]
struct Streams {
    now: AtomicUsize,
    max: AtomicUsize,
    peers: Mutex<BTreeSet<SocketAddr>>,
}

#[tokio::test]
async fn many_streams_run_at_once_on_one_connection() {
    const N: usize = 32;
    let streams = Arc::new(Streams::default());
    let (count_tx, count_rx) = watch::channel(0usize);
    let count_tx = Arc::new(count_tx);
    let svc = {
        let streams = streams.clone();
        tower::service_fn(move |req: Request<Incoming>| {
            let streams = streams.clone();
            let count_tx = count_tx.clone();
            let mut all_in = count_rx.clone();
            async move {
                if let Some(ClientAddr(peer)) = req.extensions().get::<ClientAddr>().copied() {
                    streams.peers.lock().unwrap().insert(peer);
                }
                count_tx.send_modify(|n| *n += 1);
                // Each answer waits until all N are in flight: only multiplexing gets here.
                let _ = all_in.wait_for(|n| *n >= N).await;
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
            }
        })
    };
    let server = Server::builder().spawn_local(svc).await.unwrap();
    let h2 = h2c(server.addr()).await;
    let requests = (0..N).map(|i| {
        let mut h2 = h2.clone();
        async move { h2.send_request(get(&format!("/{i}"))).await }
    });
    let answers = tokio::time::timeout(LIMIT, futures_util::future::join_all(requests))
        .await
        .expect("all N answered: they were in flight together");
    for res in answers {
        assert_eq!(res.expect("answer").status(), StatusCode::OK);
    }
    assert_eq!(streams.peers.lock().unwrap().len(), 1, "one connection");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_stream_limit_holds_and_queued_requests_still_get_answers() {
    const LIMIT_STREAMS: u32 = 4;
    const N: usize = 24;
    let streams = Arc::new(Streams::default());
    let svc = {
        let streams = streams.clone();
        tower::service_fn(move |_req: Request<Incoming>| {
            let streams = streams.clone();
            async move {
                let now = streams.now.fetch_add(1, SeqCst) + 1;
                streams.max.fetch_max(now, SeqCst);
                // Give the other streams of the connection turns to arrive meanwhile.
                for _ in 0..20 {
                    tokio::task::yield_now().await;
                }
                streams.now.fetch_sub(1, SeqCst);
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
            }
        })
    };
    let server = Server::builder()
        .h2_max_concurrent_streams(LIMIT_STREAMS)
        .spawn_local(svc)
        .await
        .unwrap();
    let mut h2 = h2c(server.addr()).await;
    // One exchange first, so the client has the server's SETTINGS (a client that opens
    // streams before knowing the limit gets REFUSED_STREAM for the extra ones).
    let first = tokio::time::timeout(LIMIT, h2.send_request(get("/"))).await;
    assert_eq!(
        first.expect("in time").expect("answer").status(),
        StatusCode::OK
    );
    let requests = (0..N).map(|_| {
        let mut h2 = h2.clone();
        async move { h2.send_request(get("/")).await }
    });
    let answers = tokio::time::timeout(LIMIT, futures_util::future::join_all(requests))
        .await
        .expect("in time");
    for res in answers {
        assert_eq!(res.expect("answer").status(), StatusCode::OK);
    }
    let max = streams.max.load(SeqCst);
    assert!(max <= LIMIT_STREAMS as usize, "{max} streams at once");
    assert!(max > 1, "streams did run concurrently ({max})");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn drain_sends_goaway_and_the_stream_in_flight_finishes() {
    let (release_tx, release_rx) = watch::channel(false);
    let (arrived_tx, mut arrived_rx) = watch::channel(false);
    let arrived_tx = Arc::new(arrived_tx);
    let svc = tower::service_fn(move |req: Request<Incoming>| {
        let mut release = release_rx.clone();
        let arrived = arrived_tx.clone();
        async move {
            if req.uri().path() == "/slow" {
                arrived.send_replace(true);
                let _ = release.wait_for(|r| *r).await;
            }
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"done"))))
        }
    });
    let server = Server::builder().spawn_local(svc).await.unwrap();
    let addr = server.addr();
    // The h2 crate itself, to see the GOAWAY frame as such.
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (h2, conn) = h2::client::handshake(tcp).await.expect("h2c handshake");
    tokio::spawn(conn);
    let raw_get = |path: &str| {
        Request::builder()
            .uri(format!("http://localhost{path}"))
            .body(())
            .expect("request")
    };
    let slow = tokio::spawn({
        let mut h2 = h2.clone().ready().await.expect("ready");
        let req = raw_get("/slow");
        async move {
            let (res, _) = h2.send_request(req, true)?;
            let res = res.await?;
            let status = res.status();
            let mut body = res.into_body();
            let mut bytes = Vec::new();
            while let Some(chunk) = body.data().await {
                let chunk = chunk?;
                let _ = body.flow_control().release_capacity(chunk.len());
                bytes.extend_from_slice(&chunk);
            }
            Ok::<_, h2::Error>((status, bytes))
        }
    });
    tokio::time::timeout(LIMIT, arrived_rx.wait_for(|a| *a))
        .await
        .expect("slow request arrived")
        .unwrap();
    let stopped = tokio::spawn(server.shutdown());

    // New streams on the connection are refused once the GOAWAY arrives (before it, they
    // are still served).
    let refused = tokio::time::timeout(LIMIT, async {
        loop {
            let sent = async {
                let mut h2 = h2.clone().ready().await?;
                let (res, _) = h2.send_request(raw_get("/fast"), true)?;
                res.await
            };
            match sent.await {
                Ok(res) => assert_eq!(res.status(), StatusCode::OK),
                Err(e) => break e,
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("refused after the drain started");
    assert!(
        refused.is_go_away() || refused.reason() == Some(h2::Reason::REFUSED_STREAM),
        "refused by GOAWAY: {refused:?}"
    );
    // The listener is closed, the in-flight stream still running.
    assert!(!slow.is_finished());
    release_tx.send_replace(true);
    let (status, body) = tokio::time::timeout(LIMIT, slow)
        .await
        .expect("in time")
        .unwrap()
        .expect("in-flight stream finished");
    assert_eq!(status, StatusCode::OK);
    assert_eq!(&body[..], b"done");
    tokio::time::timeout(LIMIT, stopped)
        .await
        .expect("drained in time")
        .unwrap()
        .unwrap();
}

/// A client that opens a connection and never sends a request, or stops halfway through the
/// HTTP/2 preface, is closed at the header read timeout (the preface is read with a bound).
#[tokio::test]
async fn a_silent_or_half_preface_client_is_closed_at_the_header_read_timeout() {
    let server = Server::builder()
        .header_read_timeout(Duration::from_millis(300))
        .spawn_local(echo_version())
        .await
        .unwrap();
    for sent in [&b""[..], b"PRI * HTTP/2.0\r\n"] {
        let mut tcp = tokio::net::TcpStream::connect(server.addr()).await.unwrap();
        tcp.write_all(sent).await.unwrap();
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(LIMIT, tcp.read_to_end(&mut rest)).await;
        assert!(
            closed.is_ok(),
            "closed by the server after sending {sent:?}"
        );
    }
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn http2_off_serves_http1_only() {
    let server = Server::builder()
        .http2(false)
        .spawn_local(echo_version())
        .await
        .unwrap();
    let tcp = tokio::net::TcpStream::connect(server.addr()).await.unwrap();
    let h2 = async {
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await?;
        tokio::spawn(conn);
        send.send_request(get("/")).await
    };
    let res = tokio::time::timeout(LIMIT, h2).await.expect("in time");
    assert!(res.is_err(), "the preface is no HTTP/1.1 request: {res:?}");
    server.shutdown().await.unwrap();
}

#[test]
fn workers_serve_h2c() {
    let handle = Workers::new(2)
        .spawn("127.0.0.1:0".parse().unwrap(), |_id: WorkerId| {
            echo_version()
        })
        .unwrap();
    let addr = handle.local_addr();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        for _ in 0..4 {
            let mut h2 = h2c(addr).await;
            let res = tokio::time::timeout(LIMIT, h2.send_request(get("/w")))
                .await
                .expect("in time")
                .expect("answer");
            assert_eq!(body_text(res).await, "HTTP/2.0 /w");
        }
    });
    // The clients' connections close with their runtime (a client that keeps one open
    // without answering the GOAWAY's ping would hold the drain up to its timeout).
    drop(rt);
    handle.shutdown();
    handle.join().unwrap();
}

/// hyper gives HTTP/2 connections no idle timeout: the server closes one (GOAWAY) once a
/// whole header read timeout passes without a new stream, as HTTP/1 keep-alive is.
#[tokio::test]
async fn an_idle_h2_connection_is_closed_after_the_header_read_timeout() {
    let server = Server::builder()
        .header_read_timeout(Duration::from_millis(200))
        .spawn_local(echo_version())
        .await
        .unwrap();
    let tcp = tokio::net::TcpStream::connect(server.addr()).await.unwrap();
    let (mut send, conn) = h2::client::handshake(tcp).await.expect("h2c handshake");
    let conn = tokio::spawn(conn);
    let req = Request::builder()
        .uri("http://localhost/")
        .body(())
        .unwrap();
    let (res, _) = send.send_request(req, true).unwrap();
    assert_eq!(res.await.unwrap().status(), StatusCode::OK);
    // Nothing more is sent: the server ends the connection (the client task completes).
    let ended = tokio::time::timeout(LIMIT, conn).await;
    assert!(ended.is_ok(), "idle connection closed by the server");
    server.shutdown().await.unwrap();
}
