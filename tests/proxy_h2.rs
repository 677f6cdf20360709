//! `Forward` speaking HTTP/2 (h2c prior knowledge) to upstreams on 127.0.0.1: multiplexing
//! over one connection, trailers both ways, stream resets, the header rules of RFC 9113 and
//! the timeouts.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tower::{Service, ServiceExt};
use tower_patterns::classify::{is_connect_error, FailureKind};
use tower_patterns::proxy::{ClientAddr, Forward, ForwardBuilder, ForwardError};

type BoxBody = http_body_util::combinators::UnsyncBoxBody<Bytes, Infallible>;

struct H2Server {
    addr: SocketAddr,
    tcp: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for H2Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An h2c (prior knowledge) hyper server counting its TCP connections.
async fn h2c_server(barrier: Arc<tokio::sync::Barrier>) -> H2Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let tcp = Arc::new(AtomicUsize::new(0));
    let count = tcp.clone();
    let task = tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            let barrier = barrier.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| answer(req, barrier.clone()));
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    H2Server { addr, tcp, task }
}

fn text(s: String) -> BoxBody {
    Full::new(Bytes::from(s)).boxed_unsync()
}

async fn answer(
    req: Request<Incoming>,
    barrier: Arc<tokio::sync::Barrier>,
) -> Result<Response<BoxBody>, Infallible> {
    let path = req.uri().path().to_string();
    match path.as_str() {
        "/barrier" => {
            // Answers only once all 64 requests are in flight at the same time.
            let _ = tokio::time::timeout(Duration::from_secs(20), barrier.wait()).await;
            Ok(Response::new(text(format!("{:?}", req.version()))))
        }
        "/hang" => std::future::pending().await,
        "/trailers" => {
            // Echoes the request's trailers as response trailers, after a data frame.
            let (_, body) = req.into_parts();
            let collected = body.collect().await.expect("request body");
            let mut trailers = collected.trailers().cloned().unwrap_or_default();
            trailers.insert("grpc-status", HeaderValue::from_static("0"));
            let data = collected.to_bytes();
            let frames = futures_util::stream::iter(vec![
                Ok::<_, Infallible>(Frame::data(data)),
                Ok(Frame::trailers(trailers)),
            ]);
            Ok(Response::new(StreamBody::new(frames).boxed_unsync()))
        }
        _ => {
            let mut lines = format!(
                "{:?} {} {}\n",
                req.version(),
                req.uri().scheme_str().unwrap_or("-"),
                req.uri().authority().map_or("-", |a| a.as_str())
            );
            for (k, v) in req.headers() {
                lines.push_str(&format!("{k}: {}\n", v.to_str().unwrap_or("?")));
            }
            Ok(Response::new(text(lines)))
        }
    }
}

fn h2_forward<B>(addr: SocketAddr) -> Forward<B>
where
    B: http_body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<tower_patterns::BoxError>,
{
    ForwardBuilder::new(format!("http://{addr}"))
        .http2_only(true)
        .build()
        .unwrap()
}

type Body = Full<Bytes>;

async fn get(fwd: &mut Forward<Body>, req: Request<Body>) -> Result<String, ForwardError> {
    let res = fwd.ready().await?.call(req).await?;
    assert_eq!(res.status(), StatusCode::OK);
    let body = res.into_body().collect().await.expect("body").to_bytes();
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// `n` GETs of `path` sent at once, each through its own clone of `fwd`; their results.
async fn get_all(fwd: &Forward<Body>, n: usize, path: &str) -> Vec<Result<String, ForwardError>> {
    let calls = (0..n).map(|_| {
        let mut fwd = fwd.clone();
        let req = Request::get(path).body(Body::default()).unwrap();
        async move { get(&mut fwd, req).await }
    });
    futures_util::future::join_all(calls).await
}

#[tokio::test]
async fn sixty_four_concurrent_requests_share_one_connection() {
    let srv = h2c_server(Arc::new(tokio::sync::Barrier::new(64))).await;
    let fwd: Forward<Body> = h2_forward(srv.addr);
    let results = tokio::time::timeout(Duration::from_secs(30), get_all(&fwd, 64, "/barrier"))
        .await
        .expect("all 64 answered");
    for r in results {
        assert_eq!(r.unwrap(), "HTTP/2.0");
    }
    assert_eq!(srv.tcp.load(Ordering::SeqCst), 1, "one TCP connection");
}

/// A raw h2 server that answers one request per connection, then closes it gracefully
/// (`GOAWAY` with `NO_ERROR`); reports each closed connection.
async fn one_request_per_connection() -> (
    SocketAddr,
    Arc<AtomicUsize>,
    tokio::sync::mpsc::UnboundedReceiver<()>,
    tokio::task::JoinHandle<()>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let tcp = Arc::new(AtomicUsize::new(0));
    let count = tcp.clone();
    let (closed_tx, closed) = tokio::sync::mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            let closed_tx = closed_tx.clone();
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(s).await else {
                    return;
                };
                if let Some(Ok((_req, mut respond))) = conn.accept().await {
                    let res = Response::new(());
                    if let Ok(mut stream) = respond.send_response(res, false) {
                        let _ = stream.send_data(Bytes::from_static(b"one"), true);
                    }
                    conn.graceful_shutdown();
                }
                while let Some(Ok(_)) = conn.accept().await {}
                let _ = closed_tx.send(());
            });
        }
    });
    (addr, tcp, closed, task)
}

#[tokio::test]
async fn a_connection_closed_by_goaway_is_replaced() {
    let (addr, tcp, mut closed, _task) = one_request_per_connection().await;
    let mut fwd: Forward<Body> = h2_forward(addr);
    let mut failures = Vec::new();
    for _ in 0..3 {
        match get(&mut fwd, Request::get("/").body(Body::default()).unwrap()).await {
            Ok(body) => assert_eq!(body, "one"),
            // Sent while the GOAWAY was on its way: refused, so safe to send again.
            Err(e) => {
                assert!(is_connect_error(&e), "{e:?}");
                failures.push(e);
            }
        }
        tokio::time::timeout(Duration::from_secs(10), closed.recv())
            .await
            .expect("the upstream closed its connection");
    }
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(
        tcp.load(Ordering::SeqCst),
        3,
        "a fresh connection after each GOAWAY"
    );
}

#[tokio::test]
async fn headers_follow_the_http2_rules() {
    let srv = h2c_server(Arc::new(tokio::sync::Barrier::new(1))).await;
    let mut fwd: Forward<Body> = h2_forward(srv.addr);
    let mut req = Request::get("/")
        .header("host", "front.example")
        .header("connection", "keep-alive, x-hop")
        .header("x-hop", "1")
        .header("keep-alive", "timeout=5")
        .header("upgrade", "websocket")
        .header("te", "trailers")
        .header("proxy-connection", "keep-alive")
        .header("x-end-to-end", "passes")
        .body(Body::default())
        .unwrap();
    req.extensions_mut()
        .insert(ClientAddr("10.0.0.7:5000".parse().unwrap()));
    let seen = get(&mut fwd, req).await.unwrap();
    let mut lines = seen.lines();
    assert_eq!(
        lines.next(),
        Some("HTTP/2.0 http front.example"),
        "Host became :authority: {seen}"
    );
    let headers: Vec<&str> = lines.collect();
    for gone in [
        "connection:",
        "x-hop:",
        "keep-alive:",
        "upgrade:",
        "proxy-connection:",
        "host:",
        "transfer-encoding:",
    ] {
        assert!(
            !headers.iter().any(|h| h.starts_with(gone)),
            "{gone} reached the h2 upstream: {seen}"
        );
    }
    for kept in [
        "te: trailers",
        "x-end-to-end: passes",
        "x-forwarded-for: 10.0.0.7",
        "x-forwarded-host: front.example",
        "x-forwarded-proto: http",
    ] {
        assert!(headers.contains(&kept), "{kept} missing: {seen}");
    }
}

#[tokio::test]
async fn te_other_than_trailers_does_not_reach_an_h2_upstream() {
    let srv = h2c_server(Arc::new(tokio::sync::Barrier::new(1))).await;
    let mut fwd: Forward<Body> = h2_forward(srv.addr);
    let req = Request::get("/")
        .header("te", "gzip")
        .body(Body::default())
        .unwrap();
    let seen = get(&mut fwd, req).await.unwrap();
    assert!(!seen.contains("\nte:"), "{seen}");
}

#[tokio::test]
async fn trailers_pass_both_ways_and_bodies_stream() {
    let srv = h2c_server(Arc::new(tokio::sync::Barrier::new(1))).await;
    let mut fwd: Forward<BoxBody> = h2_forward(srv.addr);
    let mut req_trailers = HeaderMap::new();
    req_trailers.insert("x-checksum", HeaderValue::from_static("abc"));
    let frames = futures_util::stream::iter(vec![
        Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"hello "))),
        Ok(Frame::data(Bytes::from_static(b"h2"))),
        Ok(Frame::trailers(req_trailers)),
    ]);
    let req = Request::post("/trailers")
        .header("te", "trailers")
        .body(StreamBody::new(frames).boxed_unsync())
        .unwrap();
    let res = fwd.ready().await.unwrap().call(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let collected = res.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned().expect("response trailers");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(
        trailers["x-checksum"], "abc",
        "request trailers reached the upstream"
    );
    assert_eq!(collected.to_bytes(), "hello h2");
}

#[tokio::test]
async fn a_silent_h2_upstream_is_a_response_timeout() {
    let srv = h2c_server(Arc::new(tokio::sync::Barrier::new(1))).await;
    let mut fwd: Forward<Body> = ForwardBuilder::new(format!("http://{}", srv.addr))
        .http2_only(true)
        .response_timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let e = get(
        &mut fwd,
        Request::get("/hang").body(Body::default()).unwrap(),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, ForwardError::ResponseTimeout { .. }), "{e:?}");
    assert_eq!(e.status(), StatusCode::GATEWAY_TIMEOUT);
    // The connection is still good for the next request.
    get(&mut fwd, Request::get("/").body(Body::default()).unwrap())
        .await
        .unwrap();
    assert_eq!(srv.tcp.load(Ordering::SeqCst), 1);
}

/// A raw h2 server that resets every stream with `reason`.
async fn resetting_server(reason: h2::Reason) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(s).await else {
                    return;
                };
                while let Some(Ok((_req, mut respond))) = conn.accept().await {
                    respond.send_reset(reason);
                }
            });
        }
    });
    (addr, task)
}

#[tokio::test]
async fn a_reset_stream_is_a_typed_502() {
    let (addr, _task) = resetting_server(h2::Reason::INTERNAL_ERROR).await;
    let mut fwd: Forward<Body> = h2_forward(addr);
    let e = get(&mut fwd, Request::post("/").body(Body::from("x")).unwrap())
        .await
        .unwrap_err();
    assert!(
        matches!(e, ForwardError::StreamReset { code: 0x2, .. }),
        "{e:?}"
    );
    assert_eq!(e.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(e.kind(), FailureKind::Transport);
    assert!(!e.is_refused_stream());
    assert!(!is_connect_error(&e), "the upstream may have processed it");
}

#[tokio::test]
async fn refused_stream_counts_as_never_sent() {
    let (addr, _task) = resetting_server(h2::Reason::REFUSED_STREAM).await;
    let mut fwd: Forward<Body> = h2_forward(addr);
    let e = get(&mut fwd, Request::post("/").body(Body::from("x")).unwrap())
        .await
        .unwrap_err();
    assert!(
        matches!(e, ForwardError::StreamReset { code: 0x7, .. }),
        "{e:?}"
    );
    assert!(e.is_refused_stream());
    assert_eq!(e.status(), StatusCode::BAD_GATEWAY);
    assert!(
        is_connect_error(&e),
        "REFUSED_STREAM: not processed, safe to send again (RFC 9113 §8.7)"
    );
}

#[tokio::test]
async fn an_unreachable_h2_upstream_fails_every_waiting_request_alike() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let fwd: Forward<Body> = h2_forward(addr);
    for r in get_all(&fwd, 8, "/").await {
        let e = r.unwrap_err();
        assert!(matches!(e, ForwardError::Connect { .. }), "{e:?}");
        assert!(is_connect_error(&e));
    }
}

#[tokio::test]
async fn a_large_body_streams_through_http2_flow_control_both_ways() {
    let srv = h2c_server(Arc::new(tokio::sync::Barrier::new(1))).await;
    let mut fwd: Forward<Body> = h2_forward(srv.addr);
    // 8 MiB: far past the default 64 KiB stream and connection windows.
    let payload: Vec<u8> = (0..8 << 20).map(|i: u32| (i % 251) as u8).collect();
    let req = Request::post("/trailers")
        .body(Body::from(payload.clone()))
        .unwrap();
    let res = fwd.ready().await.unwrap().call(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body.len(), payload.len());
    assert!(body == payload, "echoed bytes differ");
}

/// A raw h2 server that takes one request and then stops reading its connection: no
/// answer, not even to `PING`, but the socket stays open (a peer that vanished).
async fn frozen_server() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            let Ok(mut conn) = h2::server::handshake(s).await else {
                continue;
            };
            if let Some(Ok(req)) = conn.accept().await {
                held.push((conn, req));
            }
        }
    });
    (addr, task)
}

#[tokio::test]
async fn keep_alive_pings_close_a_frozen_h2_connection() {
    let (addr, _task) = frozen_server().await;
    let mut fwd: Forward<Body> = ForwardBuilder::new(format!("http://{addr}"))
        .http2_only(true)
        .http2_keep_alive(Duration::from_millis(100), Duration::from_millis(200))
        .response_timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let started = tokio::time::Instant::now();
    let e = get(&mut fwd, Request::get("/").body(Body::default()).unwrap())
        .await
        .unwrap_err();
    assert!(matches!(e, ForwardError::Transport { .. }), "{e:?}");
    assert_eq!(e.status(), StatusCode::BAD_GATEWAY);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "closed by the missing PING answer, not the 30 s response timeout"
    );
}

#[tokio::test]
async fn an_http1_client_through_the_front_server_to_an_h2_upstream() {
    // client (HTTP/1.1, keep-alive) -> server::serve -> Forward (h2c) -> hyper h2 server.
    let srv = h2c_server(Arc::new(tokio::sync::Barrier::new(1))).await;
    let fwd: Forward<Incoming> = h2_forward(srv.addr);
    let svc = tower_patterns::proxy::ErrorResponse::new(fwd);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let front = listener.local_addr().unwrap();
    tokio::spawn(tower_patterns::server::serve(listener, svc));
    let client =
        hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http::<Body>();
    for i in 0..5 {
        let req = Request::get(format!("http://{front}/{i}"))
            .header("host", "shop.example")
            .body(Body::default())
            .unwrap();
        let res = client.request(req).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(res.version(), http::Version::HTTP_11);
        let body = res.into_body().collect().await.unwrap().to_bytes();
        let text = String::from_utf8_lossy(&body);
        assert!(text.starts_with("HTTP/2.0 http shop.example\n"), "{text}");
        assert!(text.contains("x-forwarded-for: 127.0.0.1\n"), "{text}");
    }
    assert_eq!(srv.tcp.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn an_h2_connection_idle_past_the_pool_idle_timeout_is_replaced() {
    let srv = h2c_server(Arc::new(tokio::sync::Barrier::new(1))).await;
    // No timers of ours run while the clock is paused, so it moves only when told.
    let mut fwd: Forward<Body> = ForwardBuilder::new(format!("http://{}", srv.addr))
        .http2_only(true)
        .pool_idle_timeout(Duration::from_secs(90))
        .without_response_timeout()
        .without_connect_timeout()
        .build()
        .unwrap();
    tokio::time::pause();
    let req = || Request::get("/").body(Body::default()).unwrap();
    get(&mut fwd, req()).await.unwrap();
    tokio::time::advance(Duration::from_secs(60)).await;
    get(&mut fwd, req()).await.unwrap();
    assert_eq!(srv.tcp.load(Ordering::SeqCst), 1, "60 s idle: kept");
    tokio::time::advance(Duration::from_secs(91)).await;
    get(&mut fwd, req()).await.unwrap();
    assert_eq!(srv.tcp.load(Ordering::SeqCst), 2, "91 s idle: replaced");
}

/// An h2c server that allows `max_streams` concurrent streams per connection; `/together`
/// answers only once `together` requests are open at the same time (across all its
/// connections), else after 5 s with `alone`. Counts its TCP connections.
async fn stream_limited_server(max_streams: u32, together: usize) -> H2Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let tcp = Arc::new(AtomicUsize::new(0));
    let count = tcp.clone();
    let barrier = Arc::new(tokio::sync::Barrier::new(together));
    let task = tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            let barrier = barrier.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let barrier = barrier.clone();
                    async move {
                        let body = match req.uri().path() {
                            "/together" => {
                                match tokio::time::timeout(Duration::from_secs(5), barrier.wait())
                                    .await
                                {
                                    Ok(_) => "together",
                                    Err(_) => "alone",
                                }
                            }
                            "/hang" => std::future::pending().await,
                            _ => "ok",
                        };
                        Ok::<_, Infallible>(Response::new(text(body.to_string())))
                    }
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .max_concurrent_streams(max_streams)
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    H2Server { addr, tcp, task }
}

#[tokio::test]
async fn requests_past_the_stream_limit_open_more_connections() {
    // The upstream allows 4 streams per connection; 16 requests must all be open at once
    // for any to be answered `together`, which needs at least 4 connections.
    let srv = stream_limited_server(4, 16).await;
    let fwd: Forward<Body> = h2_forward(srv.addr);
    let results = tokio::time::timeout(Duration::from_secs(30), get_all(&fwd, 16, "/together"))
        .await
        .expect("all 16 answered");
    for r in results {
        assert_eq!(r.unwrap(), "together");
    }
    let conns = srv.tcp.load(Ordering::SeqCst);
    assert!((4..=16).contains(&conns), "{conns} connections");
}

#[tokio::test]
async fn our_own_stream_limit_applies_below_the_upstreams() {
    // The upstream allows 100 streams; we allow 2 per connection: 6 requests need 3.
    let srv = stream_limited_server(100, 6).await;
    let fwd: Forward<Body> = ForwardBuilder::new(format!("http://{}", srv.addr))
        .http2_only(true)
        .http2_max_streams_per_connection(2)
        .build()
        .unwrap();
    for r in get_all(&fwd, 6, "/together").await {
        assert_eq!(r.unwrap(), "together");
    }
    assert_eq!(srv.tcp.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn a_full_pool_waits_then_fails_with_a_typed_503() {
    // 1 connection of 2 streams: two hanging requests fill it, the third waits for the
    // acquire timeout and fails as the pool's own limit (not the upstream's fault).
    let srv = stream_limited_server(2, 1).await;
    let fwd: Forward<Body> = ForwardBuilder::new(format!("http://{}", srv.addr))
        .http2_only(true)
        .http2_max_connections(1)
        .pool_acquire_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let hang = |fwd: &Forward<Body>| {
        let mut fwd = fwd.clone();
        tokio::spawn(async move {
            let req = Request::get("/hang").body(Body::default()).unwrap();
            let _ = fwd.ready().await.unwrap().call(req).await;
        })
    };
    let (a, b) = (hang(&fwd), hang(&fwd));
    // Both hanging streams are open on the server before the third request.
    let mut probe = fwd.clone();
    let err = loop {
        let req = Request::get("/").body(Body::default()).unwrap();
        match probe.ready().await.unwrap().call(req).await {
            Ok(_) => tokio::task::yield_now().await,
            Err(e) => break e,
        }
    };
    assert!(matches!(err, ForwardError::PoolTimeout { .. }), "{err:?}");
    assert_eq!(err.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(err.kind(), FailureKind::Client);
    assert_eq!(srv.tcp.load(Ordering::SeqCst), 1);
    // A freed stream lets the next request through.
    a.abort();
    b.abort();
    let mut fwd2 = fwd.clone();
    let ok = tokio::time::timeout(
        Duration::from_secs(10),
        get(&mut fwd2, Request::get("/").body(Body::default()).unwrap()),
    )
    .await
    .expect("answered once a stream is free");
    assert_eq!(ok.unwrap(), "ok");
}
