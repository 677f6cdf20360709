//! A GET retried after its first endpoint saw it and failed reaches the next endpoint with
//! the same head: the balancer keeps a copy of the head (not a `Request`, see
//! `balance::kept::Kept`) and rebuilds the request from it only for the retry. Real
//! sockets on 127.0.0.1: a client, `server::serve` (which puts the peer address in the
//! request's extensions: `Forward` writes it as `X-Forwarded-For`), the replay layer and
//! the balancer over two `Forward`s to raw TCP endpoints that record what they received.

mod common;

use std::time::Duration;

use http::Response;
use hyper::body::Incoming;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tower::{Layer, ServiceExt};
use tower_patterns::balance::{Balance, PassiveHealth, Picker, ReplayLayer};
use tower_patterns::body::ReplayBody;
use tower_patterns::proxy::{Forward, ForwardBody};

/// Every test step is bounded: a hang fails the test instead of stalling it.
const STEP: Duration = Duration::from_secs(10);

/// Reads one request head (up to the blank line) from `conn`.
async fn read_head(conn: &mut TcpStream) -> Option<String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = conn.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    String::from_utf8(buf).ok()
}

/// An endpoint that records every request head it reads; `answer` says whether it then
/// answers `200` or closes the connection without a response (a failure after the
/// request was sent).
async fn recording_endpoint(answer: bool) -> (String, mpsc::UnboundedReceiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                while let Some(head) = read_head(&mut conn).await {
                    let _ = tx.send(head);
                    if !answer {
                        return; // dropped: closed with the request unanswered
                    }
                    let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                    if conn.write_all(ok).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (url, rx)
}

/// The value of header `x-req` in a raw head.
fn req_id(head: &str) -> &str {
    head.lines()
        .find_map(|l| l.strip_prefix("x-req: "))
        .expect("x-req")
}

/// `server::serve` over the replay layer and a round-robin balancer of two `Forward`s,
/// `failing` first: every other request is retried on `answering`. Returns its address.
async fn serve_retrying(failing: &str, answering: &str) -> std::net::SocketAddr {
    let fwd = Forward::<ReplayBody<Incoming>>::new(failing).unwrap();
    let lb = Balance::builder()
        .picker(Picker::RoundRobin)
        .health(PassiveHealth::disabled())
        .build_static([
            ("failing", fwd.clone()),
            ("answering", fwd.to(answering).unwrap()),
        ]);
    let proxy = ReplayLayer::new(64 * 1024)
        .layer(lb)
        .map_response(|r: Response<ForwardBody>| r.map(tower_patterns::body::boxed))
        .map_err(tower_patterns::BoxError::from);
    let proxy = tower_patterns::respond::ErrorResponseLayer.layer(proxy);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(tower_patterns::server::serve(listener, proxy));
    addr
}

/// A failing and an answering recording endpoint behind [`serve_retrying`], and a client
/// connection to it; the endpoints' received heads, failing one first.
async fn retrying_setup() -> (
    TcpStream,
    mpsc::UnboundedReceiver<String>,
    mpsc::UnboundedReceiver<String>,
) {
    let (failing, failing_heads) = recording_endpoint(false).await;
    let (answering, answering_heads) = recording_endpoint(true).await;
    let addr = serve_retrying(&failing, &answering).await;
    let conn = tokio::time::timeout(STEP, TcpStream::connect(addr))
        .await
        .unwrap()
        .unwrap();
    (conn, failing_heads, answering_heads)
}

/// Sends `req` on `conn` and expects the answering endpoint's `200 ok`.
async fn send_expecting_ok(conn: &mut TcpStream, req: &str) {
    conn.write_all(req.as_bytes()).await.unwrap();
    let (head, body) = tokio::time::timeout(STEP, common::read_raw_response(conn))
        .await
        .expect("an answer");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(body, b"ok");
}

#[tokio::test]
async fn a_get_retried_after_it_was_sent_reaches_the_next_endpoint_with_the_same_head() {
    let (mut conn, mut failing_heads, mut answering_heads) = retrying_setup().await;
    // Round robin over two: one of two requests goes to the failing endpoint first.
    for i in 0..2 {
        // Repeated and interleaved names, a cookie, a query: all must survive the copy.
        let req = format!(
            "GET /p/a%20b?q=1&r=2 HTTP/1.1\r\nHost: front.example\r\nX-A: 1\r\n\
             Cookie: c=1\r\nX-A: 2\r\nX-B: b\r\nX-A: 3\r\nx-req: {i}\r\n\r\n"
        );
        send_expecting_ok(&mut conn, &req).await;
    }

    let failed = tokio::time::timeout(STEP, failing_heads.recv())
        .await
        .unwrap()
        .expect("the failing endpoint saw one request");
    let mut answered = Vec::new();
    for _ in 0..2 {
        answered.push(
            tokio::time::timeout(STEP, answering_heads.recv())
                .await
                .unwrap()
                .unwrap(),
        );
    }
    let retried = answered
        .iter()
        .find(|h| req_id(h) == req_id(&failed))
        .expect("the failed request was retried on the answering endpoint");
    // Byte for byte the head the first endpoint saw: method, target, header order and
    // repeated values, and the X-Forwarded-For that `Forward` writes from the peer
    // address the server put in the request's extensions (a copy without them would
    // lack it).
    assert_eq!(retried, &failed);
    assert!(
        failed.starts_with("GET /p/a%20b?q=1&r=2 HTTP/1.1\r\n"),
        "{failed}"
    );
    let names: Vec<&str> = failed
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| if n == "x-a" { v.trim() } else { n })
        .collect();
    assert!(
        names.windows(3).any(|w| w == ["1", "2", "3"]),
        "X-A values in order: {failed}"
    );
    assert!(
        failed
            .to_ascii_lowercase()
            .contains("x-forwarded-for: 127.0.0.1"),
        "{failed}"
    );
}

/// The server thread's copies come from recycled boxes after its first request: their
/// target and header values are copied bytes (and a value past the box's buffer is kept
/// as it is), rebuilt only for the retry. Every request here is retried (round robin
/// over two, the failing endpoint first each time): the first from a fresh copy, the
/// others from recycled ones, each must reach the answering endpoint byte for byte.
#[tokio::test]
async fn retries_from_recycled_copies_send_the_same_head() {
    let (mut conn, mut failing_heads, mut answering_heads) = retrying_setup().await;
    // Longer than a recycled copy's 512-byte buffer: kept as a value, beside copied ones.
    let long = "v".repeat(700);
    for i in 0..4 {
        let req = format!(
            "GET /r/{i}/x%2Fy?q={i}&s=%20 HTTP/1.1\r\nHost: front.example\r\nX-A: 1\r\n\
             Cookie: c={i}\r\nX-Long: {long}\r\nX-A: 2\r\nUser-Agent: t/{i}\r\nx-req: {i}\r\n\r\n"
        );
        send_expecting_ok(&mut conn, &req).await;
    }
    for i in 0..4 {
        let failed = tokio::time::timeout(STEP, failing_heads.recv())
            .await
            .unwrap()
            .expect("every request went to the failing endpoint first");
        let retried = tokio::time::timeout(STEP, answering_heads.recv())
            .await
            .unwrap()
            .expect("and was retried on the answering one");
        assert_eq!(req_id(&failed), i.to_string());
        assert_eq!(retried, failed, "request {i}");
        let target = format!("GET /r/{i}/x%2Fy?q={i}&s=%20 HTTP/1.1\r\n");
        assert!(failed.starts_with(&target), "{failed}");
        assert!(failed.contains(&format!("x-long: {long}\r\n")), "{failed}");
        assert!(
            failed.contains(&format!("user-agent: t/{i}\r\n")),
            "{failed}"
        );
    }
}
