//! gRPC status through the balancer and the circuit breaker, over real sockets: a gRPC-
//! shaped upstream (HTTP `200`, `content-type: application/grpc`, `grpc-status` in the
//! trailers or, trailers-only, in the head) behind `Forward`, `Balance` with passive
//! health, a `CircuitBreaker` and `classify::TrailersLayer`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::Incoming;
use tokio::net::TcpStream;
use tower::ServiceBuilder;
use tower_patterns::balance::{Balance, PassiveHealth};
use tower_patterns::body::{boxed, BoxBody};
use tower_patterns::breaker::{CircuitBreakerConfig, CircuitBreakerLayer, State};
use tower_patterns::classify::{Condition, TrailersLayer};
use tower_patterns::proxy::{ErrorResponseLayer, Forward};
use tower_patterns::BoxError;

/// `/ok`: status 0 in the trailers; `/unavailable`: 14 in the trailers;
/// `/trailers-only`: 14 in the head and no body.
async fn grpc_upstream() -> String {
    let svc = tower::service_fn(|req: Request<Incoming>| async move {
        let status = match req.uri().path() {
            "/ok" => "0",
            "/unavailable" => "14",
            _ => {
                let res = Response::builder()
                    .header("content-type", "application/grpc")
                    .header("grpc-status", "14")
                    .body(boxed(Empty::<Bytes>::new()))
                    .unwrap();
                return Ok::<_, Infallible>(res);
            }
        };
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", status.parse().unwrap());
        trailers.insert("grpc-message", "from upstream".parse().unwrap());
        let frames = futures_util::stream::iter(vec![
            Ok::<_, BoxError>(Frame::data(Bytes::from_static(b"\0\0\0\0\x02hi"))),
            Ok(Frame::trailers(trailers)),
        ]);
        let body: BoxBody = boxed(StreamBody::new(frames));
        // Over HTTP/1.1 trailers go out only when declared (gRPC itself runs on h2).
        Ok(Response::builder()
            .header("content-type", "application/grpc")
            .header("trailer", "grpc-status, grpc-message")
            .body(body)
            .unwrap())
    });
    let s = tower_patterns::server::spawn_local(svc).await.unwrap();
    format!("http://{}", s.addr())
}

/// One request over a fresh HTTP/1.1 connection, as a gRPC client asks: `TE: trailers`.
async fn call(addr: SocketAddr, path: &str) -> (StatusCode, Bytes, Option<HeaderMap>) {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut tx, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = Request::post(path)
        .header("host", "grpc.test")
        .header("te", "trailers")
        .header("content-type", "application/grpc")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let res = tx.send_request(req).await.unwrap();
    let status = res.status();
    let collected = res.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned();
    (status, collected.to_bytes(), trailers)
}

#[tokio::test]
async fn grpc_unavailable_in_trailers_trips_the_breaker_and_counts_for_health() {
    let upstream = grpc_upstream().await;
    let cond: Condition = "5xx,fail,grpc:unavailable".parse().unwrap();
    let fwd = Forward::<Incoming>::new(&upstream).unwrap();
    let lb = Balance::builder()
        .health(PassiveHealth::new(100, Duration::from_secs(10)))
        .classify(cond.clone())
        .build_static([("only", fwd)]);
    let breaker = CircuitBreakerLayer::new(
        CircuitBreakerConfig::new()
            .name("grpc")
            .consecutive_failures(3)
            .wait_in_open(Duration::from_secs(60)),
    )
    .unwrap()
    .classify(cond);
    let circuit = breaker.breaker().clone();
    let svc = ServiceBuilder::new()
        .layer(TrailersLayer)
        .layer(ErrorResponseLayer)
        .layer(breaker)
        .service(lb.clone());
    let proxy = tower_patterns::server::spawn_local(svc)
        .await
        .unwrap()
        .addr();
    let failures = || lb.endpoints()[0].failures;

    // Status 0 in the trailers: successes; the trailers reach the client.
    for _ in 0..3 {
        let (status, body, trailers) = call(proxy, "/ok").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body.as_ref(), b"\0\0\0\0\x02hi");
        assert_eq!(
            trailers.expect("trailers passed through")["grpc-status"],
            "0"
        );
    }
    assert_eq!(failures(), 0);
    assert_eq!(circuit.state(), State::Closed);

    // Status 14 in the trailers: HTTP 200, yet three failures open the breaker.
    for i in 1..=3u64 {
        let (status, _, trailers) = call(proxy, "/unavailable").await;
        assert_eq!(status, StatusCode::OK);
        let trailers = trailers.expect("trailers passed through");
        assert_eq!(trailers["grpc-status"], "14");
        assert_eq!(trailers["grpc-message"], "from upstream");
        // The outcome is recorded when the body ends, before the client has it all.
        assert_eq!(failures(), i, "passive health counted the gRPC failure");
    }
    assert_eq!(circuit.state(), State::Open);
    let (status, _, _) = call(proxy, "/ok").await;
    assert_eq!(
        status,
        StatusCode::SERVICE_UNAVAILABLE,
        "open breaker refuses"
    );
}

#[tokio::test]
async fn a_trailers_only_grpc_error_is_classified_from_the_head() {
    let upstream = grpc_upstream().await;
    let cond: Condition = "grpc:5xx".parse().unwrap();
    let fwd = Forward::<Incoming>::new(&upstream).unwrap();
    let lb = Balance::builder()
        .health(PassiveHealth::new(100, Duration::from_secs(10)))
        .classify(cond)
        .build_static([("only", fwd)]);
    // No TrailersLayer needed: the status is in the head.
    let svc = ServiceBuilder::new()
        .layer(ErrorResponseLayer)
        .service(lb.clone());
    let proxy = tower_patterns::server::spawn_local(svc)
        .await
        .unwrap()
        .addr();
    for i in 1..=2u64 {
        let (status, body, _) = call(proxy, "/trailers-only").await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.is_empty());
        assert_eq!(lb.endpoints()[0].failures, i);
    }
}
