//! Helpers shared by the discovery tests: real HTTP backends and a client.
#![allow(dead_code)]

#[cfg(feature = "etcd")]
pub mod etcd;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tower_patterns::discovery::Watcher;
use tower_patterns::proxy::{Forward, ForwardBuilder};
use tower_patterns::BoxError;

/// A running backend that answers `<name>` to every request.
pub struct Backend {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
}

impl Backend {
    pub async fn start(name: &str) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let body = Bytes::from(name.to_string());
        let svc = tower::service_fn(move |_req: Request<Incoming>| {
            let body = body.clone();
            async move { Ok::<_, Infallible>(Response::new(Full::new(body))) }
        });
        tokio::spawn(tower_patterns::server::serve_with_shutdown(
            listener,
            svc,
            async {
                let _ = rx.await;
            },
        ));
        Backend {
            addr,
            stop: Some(tx),
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop();
    }
}

pub type HttpClient = Client<HttpConnector, Empty<Bytes>>;

pub fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// GET `http://addr/path`, returning status and body text.
pub async fn get(client: &HttpClient, addr: SocketAddr, path: &str) -> (StatusCode, String) {
    let uri = format!("http://{addr}{path}");
    let res = client
        .request(Request::get(uri).body(Empty::new()).unwrap())
        .await
        .unwrap();
    let status = res.status();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// Safety net against a hang; not a timing assertion.
pub async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(Duration::from_secs(30), fut).await {
        Ok(v) => v,
        Err(_) => panic!("gave up waiting: {what}"),
    }
}

/// A forwarding template whose pool every endpoint shares.
pub fn forward() -> Forward<Incoming> {
    ForwardBuilder::new("http://127.0.0.1:1")
        .connect_timeout(Duration::from_secs(1))
        .build()
        .unwrap()
}

/// A request-level load balancer that follows `watcher`: tower's p2c over our Discover,
/// behind a Buffer so it is `Clone`.
pub type Balanced = tower::buffer::Buffer<
    Request<Incoming>,
    <tower::balance::p2c::Balance<
        tower::load::Constant<tower_patterns::discovery::ServiceDiscover<Forward<Incoming>>, usize>,
        Request<Incoming>,
    > as tower::Service<Request<Incoming>>>::Future,
>;

pub fn balanced(watcher: &Watcher) -> Balanced {
    // Each instance becomes a `Forward` sharing the template's connection pool.
    let discover = watcher.discover(forward());
    let balance = tower::balance::p2c::Balance::new(tower::load::Constant::new(discover, 1usize));
    tower::buffer::Buffer::new(balance, 1024)
}

/// Serves `svc` on a free port and returns the address.
pub async fn serve<S, B>(svc: S) -> SocketAddr
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
        .unwrap()
        .addr()
}

/// Polls `cond` until it holds (guarded by [`within`]).
pub async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    within(what, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}
