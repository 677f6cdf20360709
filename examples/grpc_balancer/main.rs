//! gRPC through the balancer: a tonic client → this crate's balancer (round robin, one circuit
//! breaker per endpoint, gRPC status read from trailers) → two tonic servers.
//!
//! ```text
//! cargo run --example grpc_balancer
//! ```
//!
//! Both servers answer at first. Then server `b` starts answering `UNAVAILABLE` — HTTP `200`
//! with `grpc-status: 14`, which only a gRPC-aware classifier (`grpc:5xx`) sees as a failure:
//! three in a row open `b`'s breaker, and every further call goes to `a`.
//!
//! The stack, outermost first: `classify::TrailersLayer` (records outcomes that only the
//! trailers tell), `ErrorResponseLayer`, `Balance` whose endpoint gates are `breaker::Circuit`s.
//! The upstream hop is `Forward` over h2c (`ForwardBuilder::http2_only`); the proxy and the
//! tonic servers are served by the crate's server (h2c beside HTTP/1.1 on one port).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use tower::ServiceBuilder;
use tower_patterns::balance::{Balance, PassiveHealth, Picker};
use tower_patterns::breaker::{Circuit, CircuitBreakerConfig};
use tower_patterns::classify::{Condition, TrailersLayer};
use tower_patterns::proxy::ErrorResponseLayer;
use tower_patterns::BoxError;

mod grpc;

use grpc::{grpc_server, h2c, say, serve_h2c};

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let down_b = Arc::new(AtomicBool::new(false));
    let a = grpc_server("a", Arc::default()).await;
    let b = grpc_server("b", down_b.clone()).await;

    let cfg = CircuitBreakerConfig::new()
        .consecutive_failures(3)
        .no_failure_rate()
        .wait_in_open(Duration::from_secs(30));
    let circuits: Arc<HashMap<&'static str, Circuit>> = Arc::new(
        [
            ("a", Circuit::new(cfg.clone().name("a"))?),
            ("b", Circuit::new(cfg.name("b"))?),
        ]
        .into_iter()
        .collect(),
    );
    let gates = circuits.clone();
    let lb = Balance::builder()
        .picker(Picker::RoundRobin)
        .health(PassiveHealth::disabled())
        .classify("fail,grpc:5xx".parse::<Condition>()?)
        .gates(move |k: &&'static str| gates[*k].clone())
        .build_static([("a", h2c(a)?), ("b", h2c(b)?)]);
    let proxy = serve_h2c(
        ServiceBuilder::new()
            .layer(TrailersLayer)
            .layer(ErrorResponseLayer)
            .service(lb.clone()),
    )
    .await;
    println!("balancer on http://{proxy} (h2c) in front of {a} and {b}");

    let channel = tonic::transport::Channel::from_shared(format!("http://{proxy}"))?
        .connect()
        .await?;
    let mut client = tonic::client::Grpc::new(channel);
    for round in ["healthy", "b answers UNAVAILABLE", "b's breaker is open"] {
        if round == "b answers UNAVAILABLE" {
            down_b.store(true, SeqCst);
        }
        println!("-- {round}");
        for i in 0..6 {
            match say(&mut client, &format!("call {i}")).await {
                Ok(reply) => println!("  ok    {reply}"),
                Err(status) => println!("  error {:?}: {}", status.code(), status.message()),
            }
        }
        for name in ["a", "b"] {
            println!("  breaker {name}: {:?}", circuits[name].state());
        }
    }
    Ok(())
}
