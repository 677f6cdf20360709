//! tonic through the balancer with a circuit breaker per endpoint, over real sockets: a
//! tonic client → h2c proxy (`TrailersLayer` + `Balance` gated by `Circuit`s) → two tonic
//! servers. A server answering `UNAVAILABLE` trips its endpoint's breaker (the HTTP status
//! is `200`: only the gRPC status says it failed), and calls keep succeeding on the other.
//!
//! The upstream hop is `Forward` over h2c (`http2_only`); the proxy and the tonic servers
//! are served by the crate's server (h2c beside HTTP/1.1).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use tonic::Code;
use tower::ServiceBuilder;
use tower_patterns::balance::{Balance, PassiveHealth, Picker};
use tower_patterns::breaker::{Circuit, CircuitBreakerConfig, State};
use tower_patterns::classify::{Condition, TrailersLayer};
use tower_patterns::proxy::ErrorResponseLayer;

#[path = "../examples/grpc_balancer/grpc.rs"]
mod grpc;

use grpc::{grpc_server, h2c, say, serve_h2c};

#[tokio::test]
async fn tonic_echo_through_the_balancer_and_unavailable_trips_the_breaker() {
    let down_b = Arc::new(AtomicBool::new(false));
    let a = grpc_server("a", Arc::default()).await;
    let b = grpc_server("b", down_b.clone()).await;

    let cfg = CircuitBreakerConfig::new()
        .consecutive_failures(3)
        .no_failure_rate()
        .wait_in_open(Duration::from_secs(60));
    let circuits: Arc<HashMap<&'static str, Circuit>> = Arc::new(
        [
            ("a", Circuit::new(cfg.clone().name("a")).unwrap()),
            ("b", Circuit::new(cfg.name("b")).unwrap()),
        ]
        .into_iter()
        .collect(),
    );
    let gates = circuits.clone();
    let cond: Condition = "fail,grpc:5xx".parse().unwrap();
    let lb = Balance::builder()
        .picker(Picker::RoundRobin)
        .health(PassiveHealth::disabled())
        .classify(cond)
        .gates(move |k: &&'static str| gates[*k].clone())
        .build_static([("a", h2c(a).unwrap()), ("b", h2c(b).unwrap())]);
    let proxy = serve_h2c(
        ServiceBuilder::new()
            .layer(TrailersLayer)
            .layer(ErrorResponseLayer)
            .service(lb.clone()),
    )
    .await;

    let channel = tonic::transport::Channel::from_shared(format!("http://{proxy}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = tonic::client::Grpc::new(channel);

    // Both answer; replies carry grpc-status 0 in the trailers, through the proxy.
    let mut seen = Vec::new();
    for i in 0..4 {
        let reply = say(&mut client, &format!("m{i}")).await.unwrap();
        seen.push(reply[..1].to_string());
    }
    seen.sort();
    assert_eq!(seen, ["a", "a", "b", "b"]);
    assert_eq!(circuits["a"].state(), State::Closed);
    assert_eq!(circuits["b"].state(), State::Closed);

    // b answers UNAVAILABLE (HTTP 200): three in a row open its breaker.
    down_b.store(true, SeqCst);
    let mut unavailable = 0;
    for i in 0..6 {
        match say(&mut client, &format!("n{i}")).await {
            Ok(reply) => assert!(reply.starts_with("a: "), "{reply}"),
            Err(status) => {
                assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                unavailable += 1;
            }
        }
    }
    assert_eq!(unavailable, 3);
    assert_eq!(circuits["b"].state(), State::Open);
    assert_eq!(circuits["a"].state(), State::Closed);

    // With b's breaker open, every call goes to a.
    for i in 0..6 {
        let reply = say(&mut client, &format!("o{i}")).await.unwrap();
        assert_eq!(reply, format!("a: o{i}"));
    }
    let b_requests = lb
        .endpoints()
        .into_iter()
        .find(|e| e.key == "b")
        .unwrap()
        .requests;
    assert_eq!(
        b_requests,
        2 + 3,
        "no call reached b after its breaker opened"
    );
}

/// The content chain with a gRPC condition: a primary answering `UNAVAILABLE` (a
/// trailers-only response: `grpc-status` in the head, HTTP `200`) hands the call to the
/// next link, and the tonic client gets the next link's answer. gRPC calls are `POST`s:
/// the link must be allowed to resend them (`non_idempotent`), which suits `UNAVAILABLE`
/// (gRPC: the call was not processed) but not every status.
#[tokio::test]
async fn tonic_through_the_content_chain_hops_on_unavailable() {
    use tower_patterns::body::ReplayBody;
    use tower_patterns::chain::{ChainLayer, LinkLayer};
    use tower_patterns::proxy::ForwardBuilder;

    let primary = grpc_server("primary", Arc::new(AtomicBool::new(true))).await;
    let next = grpc_server("next", Arc::default()).await;
    let h2c = |addr: std::net::SocketAddr| {
        ForwardBuilder::new(format!("http://{addr}"))
            .http2_only(true)
            .build::<ReplayBody<hyper::body::Incoming>>()
            .unwrap()
    };
    let unavailable: Condition = "grpc:unavailable".parse().unwrap();
    let proxy = serve_h2c(
        ServiceBuilder::new()
            .layer(ErrorResponseLayer)
            .layer(ChainLayer::new())
            .layer(LinkLayer::new(unavailable, h2c(next)).non_idempotent(true))
            .service(h2c(primary)),
    )
    .await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{proxy}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = tonic::client::Grpc::new(channel);
    for i in 0..3 {
        assert_eq!(
            say(&mut client, &format!("m{i}")).await.unwrap(),
            format!("next: m{i}")
        );
    }
}
