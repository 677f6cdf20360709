//! Helpers of the `server::Workers` tests (`server_workers.rs`, `server_handoff.rs`): a
//! service that says who answered, one request per fresh connection, and polling.
#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower_patterns::server::WorkerId;

pub const LOCAL: &str = "127.0.0.1:0";

/// Answers `<tag> <worker index> <thread name>`.
pub fn tagged(
    tag: &'static str,
    id: WorkerId,
) -> impl tower::Service<
    Request<Incoming>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl Send,
> + Clone
       + Send
       + 'static {
    let thread = std::thread::current().name().unwrap_or("?").to_string();
    let body = Bytes::from(format!("{tag} {} {thread}", id.index()));
    tower::service_fn(move |_req: Request<Incoming>| {
        let body = body.clone();
        async move { Ok::<_, Infallible>(Response::new(Full::new(body))) }
    })
}

/// Sends one request on `s` (`connection: close`) and reads the answer: the status and
/// body, or why it failed. Bounded by `limit`.
pub async fn exchange_once(
    s: &mut tokio::net::TcpStream,
    limit: Duration,
) -> Result<(u16, String), String> {
    let exchange = async {
        s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf)
            .await
            .map_err(|e| format!("read: {e}"))?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let status = text
            .get(9..12)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("no status line in {text:?}"))?;
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Ok((status, body))
    };
    tokio::time::timeout(limit, exchange)
        .await
        .map_err(|_| "timed out".to_string())?
}

/// One request on a fresh connection (`connection: close`): the status and body, or why
/// it failed. Bounded by `limit`.
pub async fn get_once(addr: SocketAddr, limit: Duration) -> Result<(u16, String), String> {
    let connect = tokio::time::timeout(limit, tokio::net::TcpStream::connect(addr));
    let mut s = connect
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| format!("connect: {e}"))?;
    exchange_once(&mut s, limit).await
}

/// Polls `cond` every 10 ms until it holds; panics with `what` after `limit`.
pub async fn until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
