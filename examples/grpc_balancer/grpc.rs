//! The gRPC pieces of the `grpc_balancer` example, shared with `tests/grpc_balancer.rs`:
//! hand-written prost messages (no protoc, no build script), a tonic server whose `Say`
//! answers `UNAVAILABLE` on demand, h2c serving and an h2c `Forward`.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;

use http::uri::PathAndQuery;
use http::{Request, Response};
use hyper::body::Incoming;
use tower_patterns::proxy::{Forward, ForwardBuilder, ForwardError};
use tower_patterns::BoxError;

#[derive(Clone, PartialEq, prost::Message)]
pub struct EchoRequest {
    #[prost(string, tag = "1")]
    pub message: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct EchoReply {
    #[prost(string, tag = "1")]
    pub message: String,
}

pub const SAY: &str = "/echo.Echo/Say";

/// The unary `Say` method: `name: message`, or `UNAVAILABLE` while `down` is set.
#[derive(Clone)]
pub struct Say {
    name: &'static str,
    down: Arc<AtomicBool>,
}

pub type UnaryFuture =
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
pub async fn serve_h2c<S, B>(svc: S) -> SocketAddr
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
pub async fn grpc_server(name: &'static str, down: Arc<AtomicBool>) -> SocketAddr {
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
pub fn h2c(addr: SocketAddr) -> Result<Forward<Incoming>, ForwardError> {
    ForwardBuilder::new(format!("http://{addr}"))
        .http2_only(true)
        .build()
}

pub async fn say(
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
