//! Helpers shared by the integration tests: real servers on 127.0.0.1, generated bodies,
//! test sinks implementing the public `Sink` trait, and a raw HTTP/1.1 response reader.
#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::{Request, Response};
use http_body::Frame;
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::{broadcast, watch};
use tower_patterns::backup::{BackupEvent, ObjectInfo, Sink, SinkError, SinkWriter};
use tower_patterns::body::{boxed, BoxBody};
use tower_patterns::BoxError;

pub const CHUNK: usize = 64 * 1024;

/// Starts `svc` on an ephemeral port.
pub async fn spawn_server<S, B>(svc: S) -> SocketAddr
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

/// The byte at `offset` of a pattern body: constant per 64 KiB block.
pub fn pattern_byte(offset: u64) -> u8 {
    ((offset / CHUNK as u64) % 251) as u8
}

/// A body of `total` pattern bytes, generated chunk by chunk (never held whole).
pub fn pattern_body(total: u64) -> BoxBody {
    let stream = futures_util::stream::unfold(0u64, move |off| async move {
        if off >= total {
            return None;
        }
        let n = (total - off).min(CHUNK as u64) as usize;
        let chunk = Bytes::from(vec![pattern_byte(off); n]);
        Some((Ok::<_, Infallible>(Frame::data(chunk)), off + n as u64))
    });
    boxed(StreamBody::new(stream))
}

/// Checks a received chunk at `offset` against the pattern (memset + memcmp per block, so
/// hundreds of MiB check quickly even unoptimised).
pub struct PatternCheck {
    pub offset: u64,
    pub ok: bool,
    scratch: Vec<u8>,
}

impl Default for PatternCheck {
    fn default() -> Self {
        PatternCheck {
            offset: 0,
            ok: true,
            scratch: vec![0; CHUNK],
        }
    }
}

impl PatternCheck {
    pub fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let in_block = (self.offset % CHUNK as u64) as usize;
            let n = (CHUNK - in_block).min(data.len());
            let want = &mut self.scratch[..n];
            want.fill(pattern_byte(self.offset));
            if data[..n] != want[..] {
                self.ok = false;
            }
            self.offset += n as u64;
            data = &data[n..];
        }
    }
}

/// A pooled HTTP/1.1 client.
pub fn client() -> Client<HttpConnector, Empty<Bytes>> {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

pub async fn get(addr: SocketAddr, path: &str) -> Response<Incoming> {
    client()
        .request(
            Request::get(format!("http://{addr}{path}"))
                .body(Empty::new())
                .unwrap(),
        )
        .await
        .unwrap()
}

/// GETs `path` from a proxy in front of an upstream that cuts its body short, and checks
/// that the client sees the failure: in the body after a `200` head, or, when the whole
/// cut body was read with the upstream's head and failed before the proxy's server
/// flushed anything (the lean HTTP/1 upstream path reads that fast), as a connection
/// closed without an answer. Either way never a complete-looking response.
pub async fn get_expecting_truncation(addr: SocketAddr, path: &str) {
    let req = Request::get(format!("http://{addr}{path}"))
        .body(Empty::new())
        .unwrap();
    match client().request(req).await {
        Ok(res) => {
            assert_eq!(res.status(), 200);
            assert!(
                read_all(res).await.is_err(),
                "{path}: the client must see the truncation"
            );
        }
        Err(e) => assert!(!e.is_connect(), "{path}: the proxy was reached: {e}"),
    }
}

pub async fn read_all(res: Response<Incoming>) -> Result<Bytes, hyper::Error> {
    Ok(res.into_body().collect().await?.to_bytes())
}

/// A response read whole.
pub struct Got {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Got {
    /// The header's value, `""` when absent.
    pub fn h(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .map(|v| v.to_str().expect("a visible-ASCII header value"))
            .unwrap_or_default()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// `method http://addr{path}` with extra headers, through [`client`], read whole.
pub async fn send_whole(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Got {
    let mut req = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let res = client()
        .request(req.body(Empty::<Bytes>::new()).unwrap())
        .await
        .unwrap();
    let (parts, body) = res.into_parts();
    Got {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

/// Backup events, kept until asked for (events of several sinks/keys arrive in any order).
pub struct Events {
    rx: broadcast::Receiver<BackupEvent>,
    pending: Vec<BackupEvent>,
}

impl Events {
    pub fn new(rx: broadcast::Receiver<BackupEvent>) -> Self {
        Events {
            rx,
            pending: Vec::new(),
        }
    }

    /// Waits (at most 60 s, a hang guard) for the event of `sink` about `key`.
    pub async fn wait(&mut self, key: &str, sink: &str) -> BackupEvent {
        let matches = |ev: &BackupEvent| ev.key.as_str() == key && &*ev.sink == sink;
        if let Some(i) = self.pending.iter().position(matches) {
            return self.pending.remove(i);
        }
        tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                let ev = self.rx.recv().await.unwrap();
                if matches(&ev) {
                    return ev;
                }
                self.pending.push(ev);
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no backup event for {key} from {sink} within 60 s"))
    }
}

/// A sink that checks the pattern and counts bytes, storing nothing.
#[derive(Clone, Default)]
pub struct CountingSink {
    pub committed_bytes: Arc<AtomicU64>,
    pub pattern_ok: Arc<AtomicBool>,
}

struct CountingWriter {
    sink: CountingSink,
    check: PatternCheck,
}

impl Sink for CountingSink {
    fn name(&self) -> &str {
        "counting"
    }
    fn begin<'a>(
        &'a self,
        _info: &'a ObjectInfo,
    ) -> BoxFuture<'a, Result<Box<dyn SinkWriter>, SinkError>> {
        let w: Box<dyn SinkWriter> = Box::new(CountingWriter {
            sink: self.clone(),
            check: PatternCheck::default(),
        });
        Box::pin(async move { Ok(w) })
    }
}

impl SinkWriter for CountingWriter {
    fn write(&mut self, chunk: Bytes) -> BoxFuture<'_, Result<(), SinkError>> {
        self.check.feed(&chunk);
        Box::pin(async { Ok(()) })
    }
    fn commit(self: Box<Self>) -> BoxFuture<'static, Result<(), SinkError>> {
        self.sink
            .committed_bytes
            .store(self.check.offset, Ordering::SeqCst);
        self.sink.pattern_ok.store(self.check.ok, Ordering::SeqCst);
        Box::pin(async { Ok(()) })
    }
    fn abort(self: Box<Self>) -> BoxFuture<'static, ()> {
        Box::pin(async {})
    }
}

/// A sink whose writes wait until the gate opens: the slowest possible disk.
#[derive(Clone)]
pub struct StalledSink {
    pub gate: watch::Receiver<bool>,
}

struct StalledWriter {
    gate: watch::Receiver<bool>,
}

impl Sink for StalledSink {
    fn name(&self) -> &str {
        "stalled"
    }
    fn begin<'a>(
        &'a self,
        _info: &'a ObjectInfo,
    ) -> BoxFuture<'a, Result<Box<dyn SinkWriter>, SinkError>> {
        let w: Box<dyn SinkWriter> = Box::new(StalledWriter {
            gate: self.gate.clone(),
        });
        Box::pin(async move { Ok(w) })
    }
}

impl SinkWriter for StalledWriter {
    fn write(&mut self, _chunk: Bytes) -> BoxFuture<'_, Result<(), SinkError>> {
        Box::pin(async move {
            let _ = self.gate.wait_for(|open| *open).await;
            Ok(())
        })
    }
    fn commit(self: Box<Self>) -> BoxFuture<'static, Result<(), SinkError>> {
        Box::pin(async { Ok(()) })
    }
    fn abort(self: Box<Self>) -> BoxFuture<'static, ()> {
        Box::pin(async {})
    }
}

/// A sink that fails once more than `fail_after` bytes were written.
#[derive(Clone)]
pub struct FailingSink {
    pub fail_after: u64,
    pub aborted: Arc<AtomicBool>,
}

struct FailingWriter {
    fail_after: u64,
    written: u64,
    aborted: Arc<AtomicBool>,
}

impl Sink for FailingSink {
    fn name(&self) -> &str {
        "failing"
    }
    fn begin<'a>(
        &'a self,
        _info: &'a ObjectInfo,
    ) -> BoxFuture<'a, Result<Box<dyn SinkWriter>, SinkError>> {
        let w: Box<dyn SinkWriter> = Box::new(FailingWriter {
            fail_after: self.fail_after,
            written: 0,
            aborted: self.aborted.clone(),
        });
        Box::pin(async move { Ok(w) })
    }
}

impl SinkWriter for FailingWriter {
    fn write(&mut self, chunk: Bytes) -> BoxFuture<'_, Result<(), SinkError>> {
        self.written += chunk.len() as u64;
        let fail = self.written > self.fail_after;
        Box::pin(async move {
            if fail {
                Err(SinkError::Io(std::io::Error::other("disk full")))
            } else {
                Ok(())
            }
        })
    }
    fn commit(self: Box<Self>) -> BoxFuture<'static, Result<(), SinkError>> {
        Box::pin(async { Ok(()) })
    }
    fn abort(self: Box<Self>) -> BoxFuture<'static, ()> {
        self.aborted.store(true, Ordering::SeqCst);
        Box::pin(async {})
    }
}

/// Every file under `dir`, relative, sorted (temporary files included).
pub fn files_under(dir: &std::path::Path) -> Vec<String> {
    fn walk(base: &std::path::Path, dir: &std::path::Path, out: &mut Vec<String>) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(base, &p, out);
            } else {
                out.push(p.strip_prefix(base).unwrap().to_string_lossy().into_owned());
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// Promises `declared` bytes, sends `sent`, closes.
pub async fn truncating_origin(declared: u64, sent: usize) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = s.read(&mut buf).await.unwrap();
                    if n == 0 {
                        return;
                    }
                    got.extend_from_slice(&buf[..n]);
                }
                let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {declared}\r\n\r\n");
                s.write_all(head.as_bytes()).await.unwrap();
                let _ = s.write_all(&vec![b'x'; sent]).await;
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

/// Reads one HTTP/1.1 response with a `Content-Length` body from a kept-alive raw
/// connection (for tests that speak HTTP by hand, below any client library): its head
/// (status line and headers) and its body.
pub async fn read_raw_response(conn: &mut tokio::net::TcpStream) -> (String, Vec<u8>) {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = std::str::from_utf8(&buf[..end])
                .expect("ASCII head")
                .to_owned();
            let len: usize = head
                .lines()
                .find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse().ok())?
                })
                .expect("content-length");
            while buf.len() < end + 4 + len {
                let n = conn.read(&mut chunk).await.expect("read body");
                assert!(n > 0, "closed mid-body after {head:?}");
                buf.extend_from_slice(&chunk[..n]);
            }
            return (head, buf[end + 4..end + 4 + len].to_vec());
        }
        let n = conn.read(&mut chunk).await.expect("read head");
        assert!(
            n > 0,
            "closed before a whole response: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    }
}
