//! Real local servers for the integration tests.
#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// A backend that echoes the request line, headers and body, and counts connections.
pub struct Echo {
    pub addr: SocketAddr,
    pub connections: Arc<AtomicUsize>,
}

impl Echo {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

async fn echo(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_string();
    if let Some(code) = path.strip_prefix("/status/") {
        let code = code.parse::<u16>().unwrap_or(500);
        let mut res = Response::new(Full::new(Bytes::from(format!("status {code}"))));
        *res.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return Ok(res);
    }
    if path == "/never" {
        std::future::pending::<()>().await;
    }
    if path == "/hop-headers" {
        let res = Response::builder()
            .header("connection", "x-private")
            .header("keep-alive", "timeout=5")
            .header("x-private", "secret")
            .header("proxy-authenticate", "Basic")
            .header("x-end-to-end", "kept")
            .body(Full::new(Bytes::from_static(b"hop")))
            .unwrap();
        return Ok(res);
    }
    let mut out = format!("{} {}\n", req.method(), req.uri());
    for (k, v) in req.headers() {
        out.push_str(&format!("{}: {}\n", k, v.to_str().unwrap_or("?")));
    }
    let body = req
        .into_body()
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    out.push('\n');
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(&body);
    Ok(Response::new(Full::new(Bytes::from(bytes))))
}

/// Starts an echo backend on 127.0.0.1:0.
pub async fn echo_backend() -> Echo {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let count = connections.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), hyper::service::service_fn(echo))
                    .await;
            });
        }
    });
    Echo { addr, connections }
}

/// A port with nothing listening on it.
pub async fn closed_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    addr
}

/// What a [`silent_backend`] does once it has read a request head.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Silence {
    /// Closes the connection without answering: a failure after the request was sent.
    HangUp,
    /// Keeps the connection open and reads on, never answering: a hung backend.
    Hang,
}

/// A server that never answers; counts the request heads it read.
pub async fn silent_backend(kind: Silence) -> (SocketAddr, Arc<AtomicUsize>) {
    use tokio::io::AsyncReadExt;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let heads = Arc::new(AtomicUsize::new(0));
    let h = heads.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let h = h.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut seen = Vec::new();
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    seen.extend_from_slice(&buf[..n]);
                    while let Some(p) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                        h.fetch_add(1, Ordering::SeqCst);
                        seen.drain(..p + 4);
                        if kind == Silence::HangUp {
                            return;
                        }
                    }
                }
            });
        }
    });
    (addr, heads)
}

/// [`silent_backend`] as a base URL.
pub async fn silent_url(kind: Silence) -> (String, Arc<AtomicUsize>) {
    let (addr, heads) = silent_backend(kind).await;
    (format!("http://{addr}"), heads)
}

/// A server that reads a request and closes the connection without answering.
pub async fn hang_up_backend() -> SocketAddr {
    silent_backend(Silence::HangUp).await.0
}

/// Sends a request with a plain hyper client and returns status, headers and body.
pub async fn send(
    addr: SocketAddr,
    req: Request<Full<Bytes>>,
) -> (StatusCode, http::HeaderMap, Bytes) {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let res = tx.send_request(req).await.unwrap();
    let (parts, body) = res.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    (parts.status, parts.headers, body)
}

/// Lines of an echo body as (lower-case header name, value) pairs.
pub fn echoed_headers(body: &[u8]) -> Vec<(String, String)> {
    let text = String::from_utf8_lossy(body);
    text.lines()
        .skip(1)
        .take_while(|l| !l.is_empty())
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

pub fn header<'a>(h: &'a [(String, String)], name: &str) -> Option<&'a str> {
    h.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

/// A raw HTTP/1.1 server that answers one request per connection and then closes it
/// without saying `Connection: close`, like an upstream whose keep-alive timeout is zero.
pub async fn one_shot_backend() -> (SocketAddr, Arc<AtomicUsize>) {
    canned_backend(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await
}

/// A raw server that reads one request head per connection, writes `response` as it is
/// (any bytes, valid HTTP or not) and closes; counts the connections.
pub async fn canned_backend(response: &'static [u8]) -> (SocketAddr, Arc<AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let c = count.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                continue;
            };
            c.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let _ = s.write_all(response).await;
                let _ = s.shutdown().await;
            });
        }
    });
    (addr, count)
}

/// Reads a response head (up to the blank line, or EOF) from a raw connection, bounded
/// by `limit`; `None` when nothing complete arrived in time.
pub async fn read_head(
    s: &mut tokio::net::TcpStream,
    limit: std::time::Duration,
) -> Option<String> {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let read = async {
        let mut chunk = [0u8; 4096];
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    };
    tokio::time::timeout(limit, read).await.ok()?;
    Some(String::from_utf8_lossy(&buf).into_owned())
}

/// Opens a raw connection to `addr` and writes `bytes` (a hand-made request).
pub async fn raw_request(addr: SocketAddr, bytes: &[u8]) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    s
}
