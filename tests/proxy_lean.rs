//! The lean HTTP/1 upstream path (`proxy::h1`: bodiless requests to `http://` upstreams)
//! against raw upstreams on 127.0.0.1 that send exact bytes: streaming, trailers,
//! connection reuse and when a connection must not be reused, a pooled connection the
//! upstream closed, and a client that stops reading.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body::Body as _;
use http_body_util::{BodyExt, Full};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tower::{Service, ServiceExt};
use tower_patterns::proxy::{Forward, ForwardBody, ForwardBodyError, ForwardError, Http1Error};

type Body = Full<Bytes>;

/// Reads one request head; `false` when the client closed first.
async fn read_head(s: &mut TcpStream) -> bool {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte).await {
            Ok(1) => head.push(byte[0]),
            _ => return false,
        }
    }
    true
}

/// An upstream answering every request on every connection with `response(n)` (`n`: the
/// request's number on its connection), then closing when `close_after` says so. Counts
/// connections; reports each close on `closed`.
struct Upstream {
    url: String,
    connections: Arc<AtomicUsize>,
    closed: mpsc::UnboundedReceiver<()>,
}

async fn upstream(
    response: impl Fn(usize) -> Vec<u8> + Send + Sync + 'static,
    close_after: Option<usize>,
) -> Upstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let connections = Arc::new(AtomicUsize::new(0));
    let (tx, closed) = mpsc::unbounded_channel();
    let response = Arc::new(response);
    let count = connections.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            let (response, tx) = (response.clone(), tx.clone());
            tokio::spawn(async move {
                let mut n = 0;
                while read_head(&mut s).await {
                    if s.write_all(&response(n)).await.is_err() {
                        break;
                    }
                    n += 1;
                    if close_after == Some(n) {
                        break;
                    }
                }
                let _ = s.shutdown().await;
                drop(s);
                let _ = tx.send(());
            });
        }
    });
    Upstream {
        url,
        connections,
        closed,
    }
}

async fn get(
    fwd: &mut Forward<Body>,
    method: &str,
) -> Result<http::Response<ForwardBody>, ForwardError> {
    let req = Request::builder()
        .method(method)
        .uri("/")
        .header("te", "trailers")
        .body(Body::default())
        .expect("request");
    fwd.ready().await?.call(req).await
}

#[tokio::test]
async fn a_large_body_streams_whole_and_the_connection_is_reused() {
    const LEN: usize = 8 << 20;
    let up = upstream(
        |_| {
            let mut r = format!("HTTP/1.1 200 OK\r\ncontent-length: {LEN}\r\n\r\n").into_bytes();
            r.extend((0..LEN).map(|i| (i % 251) as u8));
            r
        },
        None,
    )
    .await;
    let mut fwd = Forward::<Body>::new(&up.url).expect("forward");
    for _ in 0..2 {
        let res = get(&mut fwd, "GET").await.expect("response");
        assert_eq!(res.body().size_hint().exact(), Some(LEN as u64));
        let body = res.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(body.len(), LEN);
        assert!(body.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8));
    }
    assert_eq!(
        up.connections.load(Ordering::SeqCst),
        1,
        "one keep-alive connection"
    );
}

#[tokio::test]
async fn chunked_bodies_bring_their_trailers_and_head_answers_have_no_body() {
    let up = upstream(
        |n| match n {
            0 => b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: grpc-status\r\n\r\n\
                   5;x=y\r\nhello\r\n6\r\n world\r\n0\r\ngrpc-status: 0\r\n\r\n"
                .to_vec(),
            _ => b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n".to_vec(),
        },
        None,
    )
    .await;
    let mut fwd = Forward::<Body>::new(&up.url).expect("forward");
    let res = get(&mut fwd, "GET").await.expect("response");
    let collected = res.into_body().collect().await.expect("body");
    let trailers = collected.trailers().cloned().unwrap_or_default();
    assert_eq!(collected.to_bytes(), "hello world");
    assert_eq!(
        trailers.get("grpc-status").map(|v| v.as_bytes()),
        Some(&b"0"[..])
    );
    // A HEAD answer's Content-Length announces no body on the wire.
    let res = get(&mut fwd, "HEAD").await.expect("response");
    assert_eq!(
        res.headers().get("content-length").map(|v| v.as_bytes()),
        Some(&b"9"[..])
    );
    assert!(res.body().is_end_stream());
    let res = get(&mut fwd, "HEAD")
        .await
        .expect("the connection is still in step");
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(up.connections.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_connection_out_of_step_or_closing_is_not_reused() {
    // Bytes past the response's end, a close-delimited body, `Connection: close`, and
    // HTTP/1.0 without keep-alive: each leaves its connection unusable.
    for response in [
        &b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokEXTRA"[..],
        b"HTTP/1.1 200 OK\r\n\r\nuntil-close",
        b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok",
        b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok",
    ] {
        let eof = !response.windows(14).any(|w| w == b"content-length");
        let up = upstream(move |_| response.to_vec(), eof.then_some(1)).await;
        let mut fwd = Forward::<Body>::new(&up.url).expect("forward");
        for _ in 0..2 {
            let res = get(&mut fwd, "GET").await.expect("response");
            let body = res.into_body().collect().await.expect("body").to_bytes();
            assert!(body.starts_with(b"ok") || body == "until-close", "{body:?}");
        }
        assert_eq!(
            up.connections.load(Ordering::SeqCst),
            2,
            "{:?}",
            String::from_utf8_lossy(response)
        );
    }
}

#[tokio::test]
async fn a_pooled_connection_the_upstream_closed_is_replaced() {
    // The upstream closes each connection right after its first answer, without saying
    // so: the next request finds the pooled connection closed and goes out on a new one.
    let mut up = upstream(
        |_| b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec(),
        Some(1),
    )
    .await;
    let mut fwd = Forward::<Body>::new(&up.url).expect("forward");
    for i in 1..=5 {
        let res = get(&mut fwd, "GET").await.expect("answered");
        assert_eq!(
            res.into_body().collect().await.expect("body").to_bytes(),
            "ok"
        );
        // The upstream has closed this connection before the next request is sent.
        tokio::time::timeout(Duration::from_secs(5), up.closed.recv())
            .await
            .expect("closed");
        assert_eq!(up.connections.load(Ordering::SeqCst), i);
    }
}

#[tokio::test]
async fn a_client_that_stops_reading_closes_the_upstream_connection() {
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.expect("accept");
        read_head(&mut s).await;
        let head = b"HTTP/1.1 200 OK\r\ncontent-length: 100000000\r\n\r\n";
        let _ = s.write_all(head).await;
        let chunk = vec![b'x'; 64 * 1024];
        // Writes until the proxy's side is gone.
        while s.write_all(&chunk).await.is_ok() {}
        let _ = seen_tx.send(());
    });
    let mut fwd = Forward::<Body>::new(&url).expect("forward");
    let mut body = get(&mut fwd, "GET").await.expect("response").into_body();
    let first = body.frame().await.expect("a frame").expect("data");
    assert!(first.is_data());
    drop(body);
    tokio::time::timeout(Duration::from_secs(10), seen.recv())
        .await
        .expect("the upstream saw its connection closed");
}

#[tokio::test]
async fn malformed_answers_are_transport_errors_naming_the_http1_fault() {
    for (response, check) in [
        (
            &b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\nx"[..],
            (|e: &Http1Error| matches!(e, Http1Error::ContentLength)) as fn(&Http1Error) -> bool,
        ),
        (b"HTTP/1.1 2000 OK\r\n\r\n", |e| {
            matches!(e, Http1Error::Parse(_))
        }),
        (b"HTTP/1.1 200 OK\r\ncontent-le", |e| {
            matches!(e, Http1Error::Incomplete)
        }),
    ] {
        let up = upstream(move |_| response.to_vec(), Some(1)).await;
        let mut fwd = Forward::<Body>::new(&up.url).expect("forward");
        let err = get(&mut fwd, "GET").await.expect_err("refused");
        assert_eq!(err.status(), StatusCode::BAD_GATEWAY);
        let ForwardError::Transport { source, .. } = &err else {
            panic!("{err:?}");
        };
        let fault = source.downcast_ref::<Http1Error>().expect("an Http1Error");
        assert!(check(fault), "{fault:?}");
    }
    // A chunked body cut by a malformed size line fails as the body's error.
    let up = upstream(
        |_| b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\nzz\r\n".to_vec(),
        Some(1),
    )
    .await;
    let mut fwd = Forward::<Body>::new(&up.url).expect("forward");
    let res = get(&mut fwd, "GET").await.expect("head");
    let err = res.into_body().collect().await.expect_err("cut");
    assert!(
        matches!(err, ForwardBodyError::Http1(Http1Error::Chunked(_))),
        "{err:?}"
    );
}
