//! `server` limits against raw clients on 127.0.0.1: slow bodies, oversized bodies and
//! heads, and the connection cap (issue 10, item 10).

mod support;

use std::convert::Infallible;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use tower_patterns::proxy::{ErrorResponse, Forward};
use tower_patterns::server::{Server, ServerConfig};

use support::*;

fn proxy_to(url: &str) -> ErrorResponse<Forward<Incoming>> {
    ErrorResponse::new(Forward::<Incoming>::new(url).unwrap())
}

#[test]
fn defaults_bound_every_resource() {
    let c = ServerConfig::default();
    assert_eq!(c.body_timeout, Some(Duration::from_secs(30)));
    assert_eq!(c.max_body_bytes, Some(16 * 1024 * 1024));
    assert_eq!(c.max_header_bytes, 64 * 1024);
    assert_eq!(c.max_connections, 10_000);
    assert_eq!(c.header_read_timeout, Duration::from_secs(30));
    assert_eq!(c.drain_timeout, Duration::from_secs(30));
}

#[tokio::test]
async fn a_stalled_request_body_is_cut_with_408() {
    let be = echo_backend().await;
    let front = Server::builder()
        .body_timeout(Some(Duration::from_millis(300)))
        .spawn_local(proxy_to(&be.url()))
        .await
        .unwrap();
    let start = Instant::now();
    // Ten bytes announced, one sent, then silence.
    let mut s = raw_request(
        front.addr(),
        b"POST /up HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\n\r\na",
    )
    .await;
    let head = read_head(&mut s, Duration::from_secs(10))
        .await
        .expect("an answer, not a connection held open");
    assert!(head.starts_with("HTTP/1.1 408"), "{head}");
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(5),
        "{took:?}"
    );
}

#[tokio::test]
async fn a_declared_200_mb_body_is_refused_with_413_before_reading_it() {
    let be = echo_backend().await;
    let front = Server::builder()
        .spawn_local(proxy_to(&be.url()))
        .await
        .unwrap();
    let mut s = raw_request(
        front.addr(),
        b"POST /up HTTP/1.1\r\nhost: x\r\ncontent-length: 209715200\r\n\r\n",
    )
    .await;
    let head = read_head(&mut s, Duration::from_secs(10)).await.unwrap();
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("connection: close"),
        "{head}"
    );
    assert_eq!(be.connections(), 0, "nothing was forwarded");
}

/// A chunked POST of four 512-byte chunks (2 KiB, past a 1 KiB limit), whole.
fn chunked_upload_of_2_kib() -> Vec<u8> {
    let mut req = b"POST /up HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..4 {
        req.extend_from_slice(b"200\r\n");
        req.extend_from_slice(&[b'z'; 512]);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    req
}

#[tokio::test]
async fn a_chunked_body_growing_past_the_limit_is_413() {
    let be = echo_backend().await;
    let front = Server::builder()
        .max_body_bytes(Some(1024))
        .spawn_local(proxy_to(&be.url()))
        .await
        .unwrap();
    let mut s = raw_request(front.addr(), &chunked_upload_of_2_kib()).await;
    let head = read_head(&mut s, Duration::from_secs(10)).await.unwrap();
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
}

#[tokio::test]
async fn a_giant_header_or_too_many_headers_are_refused_with_431() {
    let be = echo_backend().await;
    let front = Server::builder()
        .spawn_local(proxy_to(&be.url()))
        .await
        .unwrap();
    let mut big = b"GET / HTTP/1.1\r\nhost: x\r\nx-big: ".to_vec();
    big.extend(std::iter::repeat_n(b'a', 100 * 1024));
    big.extend_from_slice(b"\r\n\r\n");
    let mut s = raw_request(front.addr(), &big).await;
    let head = read_head(&mut s, Duration::from_secs(10)).await.unwrap();
    assert!(head.starts_with("HTTP/1.1 431"), "{head}");

    let mut many = b"GET / HTTP/1.1\r\nhost: x\r\n".to_vec();
    for i in 0..200 {
        many.extend_from_slice(format!("x-h{i}: v\r\n").as_bytes());
    }
    many.extend_from_slice(b"\r\n");
    let mut s = raw_request(front.addr(), &many).await;
    let head = read_head(&mut s, Duration::from_secs(10)).await.unwrap();
    assert!(head.starts_with("HTTP/1.1 431"), "{head}");
    assert_eq!(be.connections(), 0);
}

#[tokio::test]
async fn at_the_connection_limit_the_next_client_waits_until_one_closes() {
    let svc = tower::service_fn(|_req: Request<Incoming>| async {
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
    });
    let front = Server::builder()
        .max_connections(2)
        .spawn_local(svc)
        .await
        .unwrap();
    let get = b"GET / HTTP/1.1\r\nhost: x\r\n\r\n";
    let mut first = raw_request(front.addr(), get).await;
    let mut second = raw_request(front.addr(), get).await;
    for s in [&mut first, &mut second] {
        let head = read_head(s, Duration::from_secs(10)).await.unwrap();
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    }
    // Both keep their connection open; the third client is left in the backlog.
    let mut third = raw_request(front.addr(), get).await;
    assert_eq!(
        read_head(&mut third, Duration::from_millis(300)).await,
        None,
        "served beyond the limit"
    );
    drop(first);
    let head = read_head(&mut third, Duration::from_secs(10))
        .await
        .expect("served once a connection closed");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    drop(second);
}

/// The README's balanced stack: bodies are buffered by a replay layer before any
/// upstream is involved, so the server's limits must hold while buffering too.
fn replaying_proxy_to(
    url: &str,
) -> ErrorResponse<
    tower_patterns::balance::Replay<Forward<tower_patterns::body::ReplayBody<Incoming>>>,
> {
    use tower::Layer;
    let fwd = Forward::new(url).unwrap();
    ErrorResponse::new(tower_patterns::balance::ReplayLayer::new(64 * 1024).layer(fwd))
}

#[tokio::test]
async fn a_stalled_body_is_cut_with_408_while_a_replay_layer_buffers_it() {
    let be = echo_backend().await;
    let front = Server::builder()
        .body_timeout(Some(Duration::from_millis(300)))
        .spawn_local(replaying_proxy_to(&be.url()))
        .await
        .unwrap();
    let start = Instant::now();
    let mut s = raw_request(
        front.addr(),
        b"POST /up HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\n\r\na",
    )
    .await;
    let head = read_head(&mut s, Duration::from_secs(10))
        .await
        .expect("an answer, not a connection held open");
    assert!(head.starts_with("HTTP/1.1 408"), "{head}");
    assert!(start.elapsed() < Duration::from_secs(5));
    assert_eq!(be.connections(), 0, "the upstream was never involved");
}

#[tokio::test]
async fn a_body_over_the_limit_is_413_while_a_replay_layer_buffers_it() {
    let be = echo_backend().await;
    let front = Server::builder()
        .max_body_bytes(Some(1024))
        .spawn_local(replaying_proxy_to(&be.url()))
        .await
        .unwrap();
    let mut s = raw_request(front.addr(), &chunked_upload_of_2_kib()).await;
    let head = read_head(&mut s, Duration::from_secs(10)).await.unwrap();
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
    assert_eq!(be.connections(), 0);
}

#[tokio::test]
async fn a_malformed_body_is_400_while_a_replay_layer_buffers_it() {
    let be = echo_backend().await;
    let front = Server::builder()
        .spawn_local(replaying_proxy_to(&be.url()))
        .await
        .unwrap();
    let mut s = raw_request(
        front.addr(),
        b"POST /up HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\nZZ\r\n",
    )
    .await;
    let head = read_head(&mut s, Duration::from_secs(10)).await.unwrap();
    assert!(head.starts_with("HTTP/1.1 400"), "was 502: {head}");
    assert_eq!(be.connections(), 0);
}

/// The header read timeout counts from when each head is awaited, also on a kept-alive
/// connection whose earlier head armed the same timer (issue 12: the heads of a
/// connection share one timer-wheel entry, moved only when it fires early).
#[tokio::test]
async fn a_stalled_head_on_a_kept_alive_connection_is_cut_at_its_own_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let svc = tower::service_fn(|_req: Request<Incoming>| async {
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
    });
    let front = Server::builder()
        .header_read_timeout(Duration::from_secs(5))
        .spawn_local(svc)
        .await
        .unwrap();
    let req = b"GET / HTTP/1.1\r\nhost: x\r\n\r\n";
    let mut s = raw_request(front.addr(), req).await;
    let head = read_head(&mut s, Duration::from_secs(10)).await.unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    // The second head is awaited from now on (its deadline in 5 s); it comes 3 s later.
    tokio::time::pause();
    tokio::time::advance(Duration::from_secs(3)).await;
    s.write_all(req).await.unwrap();
    let head = read_head(&mut s, Duration::from_secs(10)).await.unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    // The third head never ends: cut 5 s after it was first awaited, not 2 s (the
    // second head's deadline, still registered).
    let start = tokio::time::Instant::now();
    s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n").await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), s.read_to_end(&mut rest))
        .await
        .expect("the connection is closed, not held open")
        .unwrap();
    let took = start.elapsed();
    assert!(
        took >= Duration::from_secs(5) && took < Duration::from_secs(6),
        "{took:?}"
    );
}
