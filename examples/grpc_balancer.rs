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
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use http::uri::PathAndQuery;
use http::{Request, Response};
use hyper::body::Incoming;
use tower::ServiceBuilder;
use tower_patterns::balance::{Balance, PassiveHealth, Picker};
use tower_patterns::breaker::{Circuit, CircuitBreakerConfig};
use tower_patterns::classify::{Condition, TrailersLayer};
use tower_patterns::proxy::{ErrorResponseLayer, Forward, ForwardBuilder, ForwardError};
use tower_patterns::BoxError;

#[derive(Clone, PartialEq, prost::Message)]
struct EchoRequest {
    #[prost(string, tag = "1")]
    message: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct EchoReply {
    #[prost(string, tag = "1")]
    message: String,
}

const SAY: &str = "/echo.Echo/Say";

/// The unary `Say` method: `name: message`, or `UNAVAILABLE` while `down` is set.
#[derive(Clone)]
struct Say {
    name: &'static str,
    down: Arc<AtomicBool>,
}

type UnaryFuture =
    Pin<Box<dyn Future<Output = Result<tonic::Response<EchoReply>, tonic::Status>> + Send>>;

impl tonic::server::UnaryService<EchoRequest> for Say {
    type Response = EchoReply;
    type Future = UnaryFuture;

    fn call(&mut self, req: tonic::Request<EchoRequest>) -> Self::Future {
        let reply = if self.down.load(SeqCst) {
            Err(tonic::Status::unavailable("draining"))
        } else {
            Ok(tonic::Response::new(EchoReply {
                message: format!("{}: {}", self.name, req.into_inner().message),
            }))
        };
        Box::pin(std::future::ready(reply))
    }
}

/// Serves `svc` with the crate's server on a free port of 127.0.0.1: HTTP/1.1 and h2c
/// (prior knowledge, what a tonic client speaks) on the same port.
async fn serve_h2c<S, B>(svc: S) -> SocketAddr
where
    S: tower::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    tower_patterns::server::spawn_local(svc)
        .await
        .expect("bind 127.0.0.1")
        .addr()
}

/// A tonic server with the `Say` method.
async fn grpc_server(name: &'static str, down: Arc<AtomicBool>) -> SocketAddr {
    let svc = tower::service_fn(move |req: Request<Incoming>| {
        let say = Say {
            name,
            down: down.clone(),
        };
        async move {
            let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default());
            Ok::<_, Infallible>(grpc.unary(say, req).await)
        }
    });
    serve_h2c(svc).await
}

/// `Forward` speaking HTTP/2 with prior knowledge (h2c) to a gRPC server: every call
/// multiplexed over one connection.
fn h2c(addr: SocketAddr) -> Result<Forward<Incoming>, ForwardError> {
    ForwardBuilder::new(format!("http://{addr}"))
        .http2_only(true)
        .build()
}

async fn say(
    client: &mut tonic::client::Grpc<tonic::transport::Channel>,
    message: &str,
) -> Result<String, tonic::Status> {
    client
        .ready()
        .await
        .map_err(|e| tonic::Status::unknown(e.to_string()))?;
    let req = tonic::Request::new(EchoRequest {
        message: message.to_string(),
    });
    let res: tonic::Response<EchoReply> = client
        .unary(
            req,
            PathAndQuery::from_static(SAY),
            tonic_prost::ProstCodec::default(),
        )
        .await?;
    Ok(res.into_inner().message)
}

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
