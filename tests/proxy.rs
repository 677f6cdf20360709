//! `proxy::Forward` against real servers on 127.0.0.1.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use tower::{Service, ServiceExt};
use tower_patterns::classify::{Classifier, Classify, Condition, FailureKind, Outcome};
use tower_patterns::proxy::{
    error_response, error_status, ClientAddr, ErrorResponse, Forward, ForwardBodyError,
    ForwardBuilder, ForwardError, PROTECTED_FROM_CONNECTION,
};

use support::*;

type Body = Full<Bytes>;

async fn call(
    fwd: &mut Forward<Body>,
    req: Request<Body>,
) -> Result<(StatusCode, http::HeaderMap, Bytes), ForwardError> {
    let res = fwd.ready().await?.call(req).await?;
    let (parts, body) = res.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    Ok((parts.status, parts.headers, body))
}

#[tokio::test]
async fn forwards_method_path_query_and_body() {
    let be = echo_backend().await;
    let mut fwd = Forward::<Body>::new(&be.url()).unwrap();
    let req = Request::post("/a/b?x=1&y=2")
        .header("host", "front.example")
        .body(Full::new(Bytes::from("payload")))
        .unwrap();
    let (status, _, body) = call(&mut fwd, req).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    let text = String::from_utf8_lossy(&body);
    assert!(text.starts_with("POST /a/b?x=1&y=2\n"), "{text}");
    assert!(text.ends_with("\n\npayload"), "{text}");
    let h = echoed_headers(&body);
    assert_eq!(
        header(&h, "host"),
        Some("front.example"),
        "Host is preserved by default"
    );
}

#[tokio::test]
async fn joins_the_upstream_path_prefix() {
    let be = echo_backend().await;
    let mut fwd = Forward::<Body>::new(&format!("{}/base/", be.url())).unwrap();
    let (_, _, body) = call(
        &mut fwd,
        Request::get("/a?q=1").body(Body::default()).unwrap(),
    )
    .await
    .unwrap();
    assert!(body.starts_with(b"GET /base/a?q=1\n"), "{body:?}");
}

#[tokio::test]
async fn strips_hop_by_hop_request_headers() {
    let be = echo_backend().await;
    let mut fwd = Forward::<Body>::new(&be.url()).unwrap();
    let req = Request::get("/")
        .header("connection", "keep-alive, x-hop")
        .header("x-hop", "must not pass")
        .header("keep-alive", "timeout=5")
        .header("proxy-authorization", "Basic abc")
        .header("proxy-connection", "keep-alive")
        .header("te", "gzip")
        .header("upgrade", "websocket")
        .header("x-end-to-end", "passes")
        .body(Body::default())
        .unwrap();
    let (_, _, body) = call(&mut fwd, req).await.unwrap();
    let h = echoed_headers(&body);
    for gone in [
        "x-hop",
        "keep-alive",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "upgrade",
    ] {
        assert_eq!(header(&h, gone), None, "{gone} reached the upstream: {h:?}");
    }
    assert_eq!(header(&h, "x-end-to-end"), Some("passes"));

    // A client taking trailers (gRPC): Forward takes them too and says so on its own hop,
    // with `trailers` only (the client's other TE codings are the client's hop's).
    let req = Request::get("/")
        .header("te", "gzip, trailers")
        .body(Body::default())
        .unwrap();
    let (_, _, body) = call(&mut fwd, req).await.unwrap();
    assert_eq!(header(&echoed_headers(&body), "te"), Some("trailers"));
}

#[tokio::test]
async fn strips_hop_by_hop_response_headers() {
    let be = echo_backend().await;
    let mut fwd = Forward::<Body>::new(&be.url()).unwrap();
    let (_, headers, body) = call(
        &mut fwd,
        Request::get("/hop-headers").body(Body::default()).unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(body, "hop");
    for gone in [
        "connection",
        "keep-alive",
        "x-private",
        "proxy-authenticate",
    ] {
        assert!(
            !headers.contains_key(gone),
            "{gone} reached the client: {headers:?}"
        );
    }
    assert_eq!(headers["x-end-to-end"], "kept");
}

fn with_client(mut req: Request<Body>, ip: &str) -> Request<Body> {
    let addr: SocketAddr = format!("{ip}:40000").parse().unwrap();
    req.extensions_mut().insert(ClientAddr(addr));
    req
}

#[tokio::test]
async fn sets_x_forwarded_headers() {
    let be = echo_backend().await;
    let mut fwd = Forward::<Body>::new(&be.url()).unwrap();
    let req = with_client(
        Request::get("/")
            .header("host", "shop.example")
            .body(Body::default())
            .unwrap(),
        "10.1.2.3",
    );
    let (_, _, body) = call(&mut fwd, req).await.unwrap();
    let h = echoed_headers(&body);
    assert_eq!(header(&h, "x-forwarded-for"), Some("10.1.2.3"));
    assert_eq!(header(&h, "x-forwarded-proto"), Some("http"));
    assert_eq!(header(&h, "x-forwarded-host"), Some("shop.example"));

    // Appends to what an earlier proxy set, like $proxy_add_x_forwarded_for.
    let req = with_client(
        Request::get("/")
            .header("x-forwarded-for", "192.0.2.7")
            .body(Body::default())
            .unwrap(),
        "10.1.2.3",
    );
    let (_, _, body) = call(&mut fwd, req).await.unwrap();
    let h = echoed_headers(&body);
    assert_eq!(header(&h, "x-forwarded-for"), Some("192.0.2.7, 10.1.2.3"));
}

#[tokio::test]
async fn edge_mode_replaces_client_supplied_forwarded_for() {
    let be = echo_backend().await;
    let mut fwd: Forward<Body> = ForwardBuilder::new(be.url())
        .append_forwarded_for(false)
        .forwarded_proto("https")
        .preserve_host(false)
        .build()
        .unwrap();
    let req = with_client(
        Request::get("/")
            .header("host", "shop.example")
            .header("x-forwarded-for", "1.2.3.4")
            .body(Body::default())
            .unwrap(),
        "10.9.9.9",
    );
    let (_, _, body) = call(&mut fwd, req).await.unwrap();
    let h = echoed_headers(&body);
    assert_eq!(header(&h, "x-forwarded-for"), Some("10.9.9.9"));
    assert_eq!(header(&h, "x-forwarded-proto"), Some("https"));
    assert_eq!(header(&h, "host"), Some(be.addr.to_string().as_str()));
    assert_eq!(header(&h, "x-forwarded-host"), Some("shop.example"));

    // Without a known client address a spoofed value is dropped, not passed on.
    let req = Request::get("/")
        .header("x-forwarded-for", "1.2.3.4")
        .body(Body::default())
        .unwrap();
    let (_, _, body) = call(&mut fwd, req).await.unwrap();
    assert_eq!(header(&echoed_headers(&body), "x-forwarded-for"), None);
}

#[tokio::test]
async fn the_client_cannot_choose_the_upstream() {
    let be = echo_backend().await;
    let other = echo_backend().await;
    let mut fwd = Forward::<Body>::new(&be.url()).unwrap();
    // An absolute-form URI naming another server is still sent to the configured upstream.
    let req = Request::get(format!("{}/x", other.url()))
        .body(Body::default())
        .unwrap();
    let (status, _, _) = call(&mut fwd, req).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(be.connections(), 1);
    assert_eq!(other.connections(), 0);
}

#[tokio::test]
async fn reuses_pooled_connections() {
    let be = echo_backend().await;
    let mut fwd = Forward::<Body>::new(&be.url()).unwrap();
    for i in 0..20 {
        let (status, _, _) = call(
            &mut fwd,
            Request::get(format!("/{i}")).body(Body::default()).unwrap(),
        )
        .await
        .unwrap();
        assert_eq!(status, StatusCode::OK);
    }
    assert_eq!(
        be.connections(),
        1,
        "sequential requests share one keep-alive connection"
    );
    // Forward::to shares the same pool for another upstream.
    let be2 = echo_backend().await;
    let mut fwd2 = fwd.to(&be2.url()).unwrap();
    call(&mut fwd2, Request::get("/").body(Body::default()).unwrap())
        .await
        .unwrap();
    assert_eq!(be2.connections(), 1);
}

#[tokio::test]
async fn upstream_statuses_pass_through_unchanged() {
    let be = echo_backend().await;
    let mut fwd = Forward::<Body>::new(&be.url()).unwrap();
    let (status, _, body) = call(
        &mut fwd,
        Request::get("/status/404").body(Body::default()).unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body, "status 404");
}

#[tokio::test]
async fn refused_connection_is_a_typed_transport_error() {
    let port = closed_port().await;
    let mut fwd = Forward::<Body>::new(&format!("http://{port}")).unwrap();
    let err = call(&mut fwd, Request::get("/").body(Body::default()).unwrap())
        .await
        .unwrap_err();
    assert!(matches!(err, ForwardError::Connect { .. }), "{err:?}");
    assert!(err.is_connect());
    assert_eq!(err.kind(), FailureKind::Transport);
    assert_eq!(err.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(error_status(&err), StatusCode::BAD_GATEWAY);
    assert_eq!(error_response(&err).status(), StatusCode::BAD_GATEWAY);
    let cond: Condition = "transport".parse().unwrap();
    let req = Request::new(());
    assert_eq!(
        cond.classify_request(&req).classify_error(&err),
        Outcome::Failure(FailureKind::Transport)
    );
    // The message names the upstream but a 502 page does not.
    assert!(err.to_string().contains(&port.to_string()));
    let page = error_response(&err)
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes();
    assert!(!String::from_utf8_lossy(&page).contains(&port.to_string()));
}

#[tokio::test]
async fn a_hang_up_after_the_request_is_a_transport_error() {
    let addr = hang_up_backend().await;
    let mut fwd = Forward::<Body>::new(&format!("http://{addr}")).unwrap();
    let err = call(&mut fwd, Request::get("/").body(Body::default()).unwrap())
        .await
        .unwrap_err();
    assert!(matches!(err, ForwardError::Transport { .. }), "{err:?}");
    assert!(
        !err.is_connect(),
        "the request was sent: not safe to resend a POST"
    );
    assert_eq!(err.status(), StatusCode::BAD_GATEWAY);
}

/// An upstream that announces ten body bytes, sends three and closes: reading the
/// `ForwardBody` fails with a `ForwardBodyError` whose `source()` says why, so a chain
/// walker (`classify::error_kind`) calls it a transport failure, as it did when the body
/// was hyper's `Incoming`. A `GET` goes the lean HTTP/1 path (`Http1`, the source
/// `Http1Error::Incomplete`), a `POST` with a body hyper's client (`Upstream`, hyper's error).
#[tokio::test]
async fn a_body_cut_short_is_a_forward_body_error_on_either_path() {
    use tower_patterns::proxy::Http1Error;
    let (addr, _) = canned_backend(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc").await;
    let mut fwd = Forward::<Body>::new(&format!("http://{addr}")).unwrap();
    for post in [false, true] {
        let req = match post {
            true => Request::post("/").body(Body::from("up")).unwrap(),
            false => Request::get("/").body(Body::default()).unwrap(),
        };
        let res = fwd.ready().await.unwrap().call(req).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        let err = res.into_body().collect().await.unwrap_err();
        let source = std::error::Error::source(&err).expect("a source");
        match post {
            true => {
                assert!(matches!(err, ForwardBodyError::Upstream(_)), "{err:?}");
                let hyper_err = source
                    .downcast_ref::<hyper::Error>()
                    .expect("hyper's error is the source");
                assert_eq!(
                    tower_patterns::classify::error_kind(hyper_err),
                    FailureKind::Transport
                );
            }
            false => {
                assert!(matches!(err, ForwardBodyError::Http1(_)), "{err:?}");
                assert!(
                    matches!(source.downcast_ref(), Some(Http1Error::Incomplete)),
                    "{source:?}"
                );
            }
        }
        assert_eq!(
            tower_patterns::classify::error_kind(&err),
            FailureKind::Transport
        );
        // Boxed, as the layers above `Forward` carry it, the chain is the same.
        let boxed: tower_patterns::BoxError = err.into();
        assert_eq!(
            tower_patterns::classify::error_kind(&*boxed),
            FailureKind::Transport
        );
    }
}

#[tokio::test]
async fn response_timeout_is_a_typed_timeout() {
    let be = echo_backend().await;
    let mut fwd: Forward<Body> = ForwardBuilder::new(be.url())
        .response_timeout(Duration::from_millis(100))
        .build()
        .unwrap();
    // The backend never answers /never, so only the timeout can end the call.
    let err = call(
        &mut fwd,
        Request::get("/never").body(Body::default()).unwrap(),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, ForwardError::ResponseTimeout { .. }),
        "{err:?}"
    );
    assert_eq!(err.kind(), FailureKind::Timeout);
    assert_eq!(error_status(&err), StatusCode::GATEWAY_TIMEOUT);
    let cond: Condition = "timeout".parse().unwrap();
    assert!(cond.classify_error_ref(&err).is_failure());
    // A fast path on the same Forward still works.
    let (status, _, _) = call(&mut fwd, Request::get("/").body(Body::default()).unwrap())
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn connect_timeout_when_the_accept_queue_is_full() {
    // A listener that never accepts, with its backlog filled, drops further SYNs: the
    // connect attempt hangs until the connect timeout.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = sock.listen(1).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..4 {
        if let Ok(Ok(s)) = tokio::time::timeout(
            Duration::from_millis(200),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        {
            fillers.push(s);
        }
    }
    let mut fwd: Forward<Body> = ForwardBuilder::new(format!("http://{addr}"))
        .connect_timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let err = call(&mut fwd, Request::get("/").body(Body::default()).unwrap())
        .await
        .unwrap_err();
    assert!(
        matches!(err, ForwardError::ConnectTimeout { .. }),
        "{err:?}"
    );
    assert!(err.is_connect());
    assert_eq!(err.status(), StatusCode::GATEWAY_TIMEOUT);
    drop(listener);
}

#[test]
fn invalid_upstreams_are_refused() {
    // Without the `tls` feature an https:// upstream is refused, never spoken to in
    // plaintext (with it: tests/proxy_tls.rs).
    #[cfg(not(feature = "tls"))]
    {
        let err = Forward::<Body>::new("https://127.0.0.1:1").unwrap_err();
        assert!(err.to_string().contains("need the `tls` feature"), "{err}");
    }
    for (uri, why) in [
        ("ftp://127.0.0.1:1", "only http:// and https://"),
        ("/just/a/path", "missing scheme"),
        ("http://127.0.0.1:1/?q=1", "query"),
        ("http://user:pw@127.0.0.1:1", "credentials"),
        ("not a uri", "not a URI"),
    ] {
        let err = Forward::<Body>::new(uri).unwrap_err();
        assert!(
            matches!(err, ForwardError::InvalidUpstream { .. }),
            "{uri}: {err:?}"
        );
        assert!(err.to_string().contains(why), "{uri}: {err}");
    }
}

#[tokio::test]
async fn end_to_end_through_a_front_server() {
    // The reverse-proxy shape: client -> server::serve -> Forward -> backend, with
    // upstream failures answered as 502 instead of a dropped connection.
    let be = echo_backend().await;
    let dead = closed_port().await;
    for (upstream, want) in [
        (be.url(), StatusCode::OK),
        (format!("http://{dead}"), StatusCode::BAD_GATEWAY),
    ] {
        let fwd = Forward::<hyper::body::Incoming>::new(&upstream).unwrap();
        let svc = ErrorResponse::new(fwd);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let front = listener.local_addr().unwrap();
        tokio::spawn(tower_patterns::server::serve(listener, svc));
        let (status, _, body) = send(
            front,
            Request::get("/hello")
                .header("host", "x")
                .body(Body::default())
                .unwrap(),
        )
        .await;
        assert_eq!(status, want);
        if want == StatusCode::OK {
            let h = echoed_headers(&body);
            // The front server recorded the real peer address.
            assert_eq!(header(&h, "x-forwarded-for"), Some("127.0.0.1"));
        }
    }
}

#[tokio::test]
async fn upstream_closing_after_each_response_is_handled() {
    let (addr, conns) = one_shot_backend().await;
    let mut fwd = Forward::<Body>::new(&format!("http://{addr}")).unwrap();
    for _ in 0..5 {
        let (status, _, body) = call(&mut fwd, Request::get("/").body(Body::default()).unwrap())
            .await
            .unwrap();
        assert_eq!((status, body.as_ref()), (StatusCode::OK, &b"ok"[..]));
    }
    assert_eq!(conns.load(std::sync::atomic::Ordering::SeqCst), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_each_get_a_connection() {
    let be = echo_backend().await;
    let fwd = Forward::<Body>::new(&be.url()).unwrap();
    let mut tasks = Vec::new();
    for i in 0..64 {
        let mut fwd = fwd.clone();
        tasks.push(tokio::spawn(async move {
            let req = Request::get(format!("/r{i}"))
                .body(Body::default())
                .unwrap();
            let (status, _, body) = call(&mut fwd, req).await.unwrap();
            assert_eq!(status, StatusCode::OK);
            assert!(body.starts_with(format!("GET /r{i}\n").as_bytes()));
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let n = be.connections();
    assert!((1..=64).contains(&n), "{n} connections for 64 requests");
    // Afterwards the pool is warm: sequential requests open nothing new.
    let mut fwd = fwd;
    for _ in 0..10 {
        call(&mut fwd, Request::get("/").body(Body::default()).unwrap())
            .await
            .unwrap();
    }
    assert_eq!(be.connections(), n);
}

#[tokio::test]
async fn idle_connections_expire() {
    let be = echo_backend().await;
    let mut fwd: Forward<Body> = ForwardBuilder::new(be.url())
        .pool_idle_timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    call(&mut fwd, Request::get("/").body(Body::default()).unwrap())
        .await
        .unwrap();
    call(&mut fwd, Request::get("/").body(Body::default()).unwrap())
        .await
        .unwrap();
    assert_eq!(be.connections(), 1);
    tokio::time::pause();
    tokio::time::advance(Duration::from_secs(31)).await;
    tokio::time::resume();
    call(&mut fwd, Request::get("/").body(Body::default()).unwrap())
        .await
        .unwrap();
    assert_eq!(be.connections(), 2, "the expired connection was not reused");
}

#[tokio::test]
async fn max_idle_zero_disables_reuse() {
    let be = echo_backend().await;
    let mut fwd: Forward<Body> = ForwardBuilder::new(be.url())
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    for _ in 0..3 {
        call(&mut fwd, Request::get("/").body(Body::default()).unwrap())
            .await
            .unwrap();
    }
    assert_eq!(be.connections(), 3);
}

#[test]
fn one_status_mapping_for_every_error_of_the_crate() {
    use tower_patterns::balance::BalanceError;
    use tower_patterns::breaker::{CircuitOpen, State};
    let unavailable = BalanceError::Unavailable {
        total: 2,
        ejected: 2,
        refused: 0,
    };
    assert_eq!(error_status(&unavailable), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        error_status(&BalanceError::NoEndpoints),
        StatusCode::BAD_GATEWAY
    );
    let timed_out = BalanceError::Upstream {
        tries: 3,
        source: Box::new(ForwardError::ConnectTimeout {
            upstream: "127.0.0.1:1".into(),
        }),
    };
    assert_eq!(error_status(&timed_out), StatusCode::GATEWAY_TIMEOUT);
    let open = CircuitOpen {
        state: State::Open,
        remaining: Some(Duration::from_secs(1)),
    };
    assert_eq!(error_status(&open), StatusCode::SERVICE_UNAVAILABLE);
    // Wrapped in a BoxError it is still found.
    let boxed: tower_patterns::BoxError = Box::new(unavailable);
    assert_eq!(
        error_response(&*boxed).status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
}

#[tokio::test]
async fn spawn_local_keeps_serving_when_the_handle_is_dropped_and_stops_on_shutdown() {
    let be = echo_backend().await;
    let front = tower_patterns::server::spawn_local(ErrorResponse::new(
        Forward::<hyper::body::Incoming>::new(&be.url()).unwrap(),
    ))
    .await
    .unwrap();
    let addr = front.addr();
    let kept = tower_patterns::server::spawn_local(ErrorResponse::new(
        Forward::<hyper::body::Incoming>::new(&be.url()).unwrap(),
    ))
    .await
    .unwrap()
    .addr();
    // The handle of `kept` is gone: it still answers.
    let (status, _, _) = send(
        kept,
        Request::get("/")
            .header("host", "x")
            .body(Body::default())
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    front.shutdown().await.unwrap();
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

// ---- issue 10: defaults that bound a hung upstream (item 1) ----

#[tokio::test]
async fn a_hung_upstream_is_cut_by_the_default_response_timeout() {
    let be = echo_backend().await;
    let mut fwd = Forward::<Body>::new(&be.url()).unwrap();
    assert_eq!(fwd.response_timeout(), Some(Duration::from_secs(60)));
    assert_eq!(fwd.connect_timeout(), Some(Duration::from_secs(5)));
    // A pooled connection first, so the timed request needs no connect: paused time
    // cannot drive a socket handshake, but it can drive a timer on a silent connection.
    call(&mut fwd, Request::get("/").body(Body::default()).unwrap())
        .await
        .unwrap();
    tokio::time::pause();
    let start = tokio::time::Instant::now();
    // The backend accepts /never and never answers; without a default nothing ends it.
    let outcome = tokio::time::timeout(
        Duration::from_secs(600),
        call(
            &mut fwd,
            Request::get("/never").body(Body::default()).unwrap(),
        ),
    )
    .await
    .expect("a hung upstream must not hold the request for ever");
    let err = outcome.unwrap_err();
    assert!(
        matches!(err, ForwardError::ResponseTimeout { after, .. } if after == Duration::from_secs(60)),
        "{err:?}"
    );
    // Timers have millisecond granularity.
    let took = start.elapsed();
    assert!(
        took >= Duration::from_secs(60) && took < Duration::from_secs(61),
        "{took:?}"
    );
    assert_eq!(error_status(&err), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(err.kind(), FailureKind::Timeout);
}

/// A pooled connection keeps its response timer armed between exchanges at an earlier
/// exchange's deadline (issue 12: one timer-wheel entry per connection, not two per
/// request); a later exchange must still get its whole timeout, counted from its own start.
#[tokio::test]
async fn a_pooled_connection_times_out_from_the_current_request_not_an_earlier_one() {
    let be = echo_backend().await;
    let mut fwd = ForwardBuilder::new(be.url())
        .response_timeout(Duration::from_secs(10))
        .build::<Body>()
        .unwrap();
    // The first request connects; the second goes over the pooled connection and arms
    // its timer at (its start + 10 s).
    for _ in 0..2 {
        call(&mut fwd, Request::get("/").body(Body::default()).unwrap())
            .await
            .unwrap();
    }
    tokio::time::pause();
    tokio::time::advance(Duration::from_secs(6)).await;
    let start = tokio::time::Instant::now();
    let err = tokio::time::timeout(
        Duration::from_secs(600),
        call(
            &mut fwd,
            Request::get("/never").body(Body::default()).unwrap(),
        ),
    )
    .await
    .expect("the response timeout ends a hung exchange")
    .unwrap_err();
    assert!(
        matches!(err, ForwardError::ResponseTimeout { after, .. } if after == Duration::from_secs(10)),
        "{err:?}"
    );
    // Not 4 s (the previous exchange's deadline), the whole 10 s.
    let took = start.elapsed();
    assert!(
        took >= Duration::from_secs(10) && took < Duration::from_secs(11),
        "{took:?}"
    );
}

#[test]
fn the_default_timeouts_can_be_disabled_explicitly() {
    let fwd: Forward<Body> = ForwardBuilder::new("http://127.0.0.1:1")
        .without_connect_timeout()
        .without_response_timeout()
        .without_client_body_timeout()
        .build()
        .unwrap();
    assert_eq!(fwd.connect_timeout(), None);
    assert_eq!(fwd.response_timeout(), None);
    assert_eq!(fwd.client_body_timeout(), None);
}

#[tokio::test]
async fn a_slow_upload_that_keeps_moving_is_not_a_response_timeout() {
    // The response timeout restarts whenever the upstream takes a body chunk: an upload
    // longer than the timeout is fine as long as it moves.
    type Chunks = http_body_util::StreamBody<
        futures_util::stream::BoxStream<'static, Result<http_body::Frame<Bytes>, std::io::Error>>,
    >;
    let be = echo_backend().await;
    let mut fwd: Forward<Chunks> = ForwardBuilder::new(be.url())
        .response_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let chunks = futures_util::stream::unfold(0u32, |i| async move {
        if i == 6 {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        Some((Ok(http_body::Frame::data(Bytes::from("x"))), i + 1))
    });
    let body = http_body_util::StreamBody::new(futures_util::StreamExt::boxed(chunks));
    let req = Request::post("/up").body(body).unwrap();
    let res = fwd.ready().await.unwrap().call(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let text = res.into_body().collect().await.unwrap().to_bytes();
    assert!(text.ends_with(b"\n\nxxxxxx"), "{text:?}");
}

// ---- issue 10: the client's faults are not the upstream's (item 7) ----

type Recorded = tokio::sync::mpsc::UnboundedReceiver<(FailureKind, Outcome, StatusCode)>;

/// A front server whose service records the kind, the `fail` classification and the
/// status of every Forward error before answering with the error response.
async fn recording_front(upstream: &str) -> (SocketAddr, Recorded) {
    use http_body_util::Either;
    let fwd = Forward::<hyper::body::Incoming>::new(upstream).unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let svc = tower::service_fn(move |req: Request<hyper::body::Incoming>| {
        let mut fwd = fwd.clone();
        let tx = tx.clone();
        async move {
            match fwd.ready().await?.call(req).await {
                Ok(res) => Ok::<_, ForwardError>(res.map(Either::Left)),
                Err(e) => {
                    let fail: Condition = "fail".parse().unwrap();
                    let _ = tx.send((e.kind(), fail.classify_error_ref(&e), e.status()));
                    Ok(error_response(&e).map(Either::Right))
                }
            }
        }
    });
    let server = tower_patterns::server::spawn_local(svc).await.unwrap();
    (server.addr(), rx)
}

#[tokio::test]
async fn a_malformed_chunked_upload_is_a_400_not_an_upstream_failure() {
    let be = echo_backend().await;
    let (front, mut recorded) = recording_front(&be.url()).await;
    let mut s = raw_request(
        front,
        b"POST /up HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\nZZ\r\n",
    )
    .await;
    let head = read_head(&mut s, Duration::from_secs(10)).await.unwrap();
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    let (kind, outcome, status) = recorded.recv().await.unwrap();
    assert_eq!(kind, FailureKind::Client);
    assert_eq!(outcome, Outcome::Ignored, "never charged to the upstream");
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn an_aborted_upload_is_the_clients_fault_not_the_upstreams() {
    let be = echo_backend().await;
    let (front, mut recorded) = recording_front(&be.url()).await;
    let s = raw_request(
        front,
        b"POST /up HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\nabc",
    )
    .await;
    // Hang up once the upload is under way upstream (the backend accepted the forward),
    // so the abort happens mid-body.
    tokio::time::timeout(Duration::from_secs(10), async {
        while be.connections() == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the request was forwarded");
    drop(s);
    let (kind, outcome, status) = tokio::time::timeout(Duration::from_secs(10), recorded.recv())
        .await
        .expect("the aborted upload ends the forward")
        .unwrap();
    assert_eq!(
        kind,
        FailureKind::Client,
        "not a transport failure of the upstream"
    );
    assert_eq!(outcome, Outcome::Ignored);
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

// ---- issue 10: request hygiene (low items) ----

#[tokio::test]
async fn connection_cannot_strip_authorization_or_tracing_headers() {
    let be = echo_backend().await;
    let mut fwd = Forward::<Body>::new(&be.url()).unwrap();
    let req = Request::get("/")
        .header("host", "front")
        .header(
            "connection",
            http::HeaderValue::from_bytes(
                b"authorization, x-request-id, traceparent, caf\xe9, x-private",
            )
            .unwrap(),
        )
        .header("authorization", "Bearer t")
        .header("x-request-id", "r1")
        .header("traceparent", "00-1-2-01")
        .header("x-private", "hop")
        .body(Body::default())
        .unwrap();
    let (_, _, body) = call(&mut fwd, req).await.unwrap();
    let h = echoed_headers(&body);
    assert_eq!(header(&h, "authorization"), Some("Bearer t"));
    assert_eq!(header(&h, "x-request-id"), Some("r1"));
    assert_eq!(header(&h, "traceparent"), Some("00-1-2-01"));
    assert_eq!(
        header(&h, "x-private"),
        None,
        "stripped despite the non-ASCII token"
    );
    assert!(PROTECTED_FROM_CONNECTION.contains(&"authorization"));
}

#[tokio::test]
async fn two_host_headers_or_a_host_disagreeing_with_the_target_are_400() {
    let be = echo_backend().await;
    let mut fwd = Forward::<Body>::new(&be.url()).unwrap();
    let two = Request::get("/")
        .header("host", "a.example")
        .header("host", "b.example")
        .body(Body::default())
        .unwrap();
    let err = call(&mut fwd, two).await.unwrap_err();
    assert!(matches!(err, ForwardError::BadRequest { .. }), "{err:?}");
    assert_eq!(error_status(&err), StatusCode::BAD_REQUEST);
    assert_eq!(err.kind(), FailureKind::Client);
    let absolute = Request::get("http://a.example/x")
        .header("host", "b.example")
        .body(Body::default())
        .unwrap();
    let err = call(&mut fwd, absolute).await.unwrap_err();
    assert!(matches!(err, ForwardError::BadRequest { .. }), "{err:?}");
    // Agreeing absolute form is fine (case-insensitive).
    let agreeing = Request::get("http://A.example/x")
        .header("host", "a.example")
        .body(Body::default())
        .unwrap();
    assert_eq!(call(&mut fwd, agreeing).await.unwrap().0, StatusCode::OK);
    assert_eq!(
        be.connections(),
        1,
        "only the agreeing request was forwarded"
    );
}

#[tokio::test]
async fn connect_is_refused_with_501_and_not_forwarded() {
    let be = echo_backend().await;
    let (front, mut recorded) = recording_front(&be.url()).await;
    let mut s = raw_request(
        front,
        b"CONNECT internal.example:22 HTTP/1.1\r\nhost: internal.example:22\r\n\r\n",
    )
    .await;
    let head = read_head(&mut s, Duration::from_secs(10)).await.unwrap();
    assert!(head.starts_with("HTTP/1.1 501"), "{head}");
    let (kind, _, _) = recorded.recv().await.unwrap();
    assert_eq!(kind, FailureKind::Client);
    assert_eq!(be.connections(), 0, "nothing reached the upstream");
}

#[tokio::test]
async fn malformed_uploads_past_the_replay_limit_do_not_eject_a_healthy_backend() {
    // Issue 10: three bad uploads used to eject a healthy backend (max_fails reached on
    // "transport errors" that were the client's). Behind a balancer with max_fails=1, a
    // replay limit smaller than the body, and one endpoint: the uploads get 400 and the
    // endpoint keeps serving.
    use tower::ServiceBuilder;
    use tower_patterns::balance::{Balance, PassiveHealth, ReplayLayer};
    use tower_patterns::body::ReplayBody;
    use tower_patterns::proxy::ErrorResponseLayer;
    let be = echo_backend().await;
    let fwd = Forward::<ReplayBody<hyper::body::Incoming>>::new(&be.url()).unwrap();
    let lb = Balance::builder()
        .health(PassiveHealth::new(1, Duration::from_secs(60)))
        .build_static(vec![(be.url(), fwd)]);
    let svc = ServiceBuilder::new()
        .layer(ErrorResponseLayer)
        .layer(ReplayLayer::new(16))
        .service(lb);
    let front = tower_patterns::server::spawn_local(svc).await.unwrap();
    for _ in 0..3 {
        let mut s = raw_request(
            front.addr(),
            b"POST /up HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n\
              28\r\n0123456789012345678901234567890123456789\r\nZZ\r\n",
        )
        .await;
        let head = read_head(&mut s, Duration::from_secs(10)).await.unwrap();
        assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    }
    let (status, _, _) = send(
        front.addr(),
        Request::get("/")
            .header("host", "x")
            .body(Body::default())
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "the healthy backend was ejected");
}
