//! The upstream of the loopback benches (`proxy`, `gateway`): a hyper server answering
//! `200 ok` to everything, on the bench's own runtime so its CPU is counted with the rest
//! of the request. [`backend`] speaks HTTP/1.1 only; [`auto_backend`] also h2c prior
//! knowledge on the same port (for the h2 upstream bench).

use std::convert::Infallible;
use std::future::Future;

use bytes::Bytes;
use http::Response;
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};

/// What every connection is asked: `200 ok`.
fn ok() -> impl hyper::service::Service<
    http::Request<hyper::body::Incoming>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send,
> + Clone {
    hyper::service::service_fn(|_r| async {
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
    })
}

/// Binds a loopback listener on `rt` and serves each accepted connection with `conn`.
fn serve<F, Fut>(rt: &tokio::runtime::Runtime, conn: F) -> std::net::SocketAddr
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (s, _) = listener.accept().await.unwrap();
                tokio::spawn(conn(s));
            }
        });
        addr
    })
}

/// Starts the HTTP/1.1 backend on `rt` and returns its address.
pub fn backend(rt: &tokio::runtime::Runtime) -> std::net::SocketAddr {
    serve(rt, |s| async move {
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(s), ok())
            .await;
    })
}

/// Starts a backend answering HTTP/1.1 and h2c prior knowledge on one port (hyper's auto
/// server) on `rt` and returns its address.
#[allow(dead_code)] // only the proxy bench has an h2 upstream
pub fn auto_backend(rt: &tokio::runtime::Runtime) -> std::net::SocketAddr {
    serve(rt, |s| async move {
        let _ = s.set_nodelay(true);
        let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
            .serve_connection(TokioIo::new(s), ok())
            .await;
    })
}
