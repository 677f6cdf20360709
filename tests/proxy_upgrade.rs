//! WebSocket and other HTTP/1.1 upgrades tunnelled through `Forward` and `Balance`, over
//! real sockets: tungstenite echo servers behind our server on 127.0.0.1.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tower::ServiceBuilder;
use tower_patterns::balance::{Balance, PassiveHealth, Picker, StickyCookie};
use tower_patterns::proxy::{ErrorResponseLayer, Forward, ForwardBody, ForwardBuilder};

type Ws = WebSocketStream<TcpStream>;

/// A WebSocket echo server answering `name:text` for every text message.
struct Echo {
    url: String,
    accepted: Arc<AtomicUsize>,
}

async fn echo_server(name: &'static str) -> Echo {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let count = count.clone();
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                count.fetch_add(1, SeqCst);
                // Ends on close or on a protocol error (garbage from the client).
                while let Some(Ok(msg)) = ws.next().await {
                    if let Message::Text(t) = msg {
                        if ws.send(Message::text(format!("{name}:{t}"))).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    Echo { url, accepted }
}

/// Serves `fwd` (or a balancer) on a free port, errors mapped to statuses.
async fn serve<S>(svc: S) -> SocketAddr
where
    S: tower::Service<Request<Incoming>, Response = Response<ForwardBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: std::error::Error + Send + Sync + 'static,
{
    let svc = ServiceBuilder::new().layer(ErrorResponseLayer).service(svc);
    tower_patterns::server::spawn_local(svc)
        .await
        .unwrap()
        .addr()
}

/// Opens a WebSocket to `addr` through the proxy, with an optional `Cookie`.
async fn ws_connect(addr: SocketAddr, cookie: Option<&str>) -> (Ws, HeaderMap) {
    let mut req = format!("ws://{addr}/chat").into_client_request().unwrap();
    if let Some(c) = cookie {
        req.headers_mut().insert("cookie", c.parse().unwrap());
    }
    let stream = TcpStream::connect(addr).await.unwrap();
    let (ws, res) = tokio_tungstenite::client_async(req, stream).await.unwrap();
    assert_eq!(res.status(), StatusCode::SWITCHING_PROTOCOLS);
    (ws, res.headers().clone())
}

async fn echo(ws: &mut Ws, text: &str) -> String {
    ws.send(Message::text(text)).await.unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("echo within 5 s")
        .expect("stream open")
        .unwrap();
    reply.into_text().unwrap().to_string()
}

/// Waits (bounded) until `cond` holds; the tunnel closes on another task.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn websocket_echo_through_forward() {
    let up = echo_server("a").await;
    let proxy = serve(Forward::<Incoming>::new(&up.url).unwrap()).await;
    let (mut ws, _) = ws_connect(proxy, None).await;
    for i in 0..3 {
        assert_eq!(echo(&mut ws, &format!("m{i}")).await, format!("a:m{i}"));
    }
    // A binary frame of 64 KiB passes unchanged in both directions (bytes, not lines).
    let big = vec![7u8; 64 * 1024];
    ws.send(Message::binary(big.clone())).await.unwrap();
    ws.send(Message::text("after")).await.unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap().into_text().unwrap(),
        "a:after"
    );
    ws.close(None).await.unwrap();
    assert_eq!(up.accepted.load(SeqCst), 1);
}

fn cookie_of(headers: &HeaderMap) -> String {
    let set = headers
        .get("set-cookie")
        .expect("Set-Cookie on the 101")
        .to_str()
        .unwrap();
    set.split(';').next().unwrap().to_string()
}

#[tokio::test]
async fn websocket_through_the_balancer_sticks_and_counts_in_flight_while_open() {
    let a = echo_server("a").await;
    let b = echo_server("b").await;
    let fwd = Forward::<Incoming>::new(&a.url).unwrap();
    let lb = Balance::builder()
        .picker(Picker::RoundRobin)
        .health(PassiveHealth::disabled())
        .sticky(StickyCookie::new("lb", b"secret-of-the-test").unwrap())
        .build_static([("a", fwd.clone()), ("b", fwd.to(&b.url).unwrap())]);
    let proxy = serve(lb.clone()).await;

    let (mut first, headers) = ws_connect(proxy, None).await;
    let pinned = echo(&mut first, "x").await[..1].to_string();
    let cookie = cookie_of(&headers);
    // Without the cookie, round robin sends the next socket to the other endpoint ...
    let (mut other, _) = ws_connect(proxy, None).await;
    assert_ne!(echo(&mut other, "x").await[..1], pinned);
    // ... with it, every socket goes to the pinned one.
    let mut sockets = Vec::new();
    for i in 0..4 {
        let (mut ws, h) = ws_connect(proxy, Some(&cookie)).await;
        assert!(
            h.get("set-cookie").is_none(),
            "valid cookie is not rewritten"
        );
        assert_eq!(
            echo(&mut ws, &format!("{i}")).await,
            format!("{pinned}:{i}")
        );
        sockets.push(ws);
    }
    let in_flight = |key: &str| {
        lb.endpoints()
            .into_iter()
            .find(|e| e.key == key)
            .unwrap()
            .in_flight
    };
    let unpinned = if pinned == "a" { "b" } else { "a" };
    // Open tunnels count as in flight: 1 + 4 on the pinned endpoint, 1 on the other.
    assert_eq!(in_flight(&pinned), 5);
    assert_eq!(in_flight(unpinned), 1);
    for mut ws in sockets {
        ws.close(None).await.unwrap();
        // Read the close reply so the close handshake completes.
        while let Some(Ok(_)) = ws.next().await {}
    }
    drop(first);
    eventually("pinned tunnels released", || in_flight(&pinned) == 0).await;
    assert_eq!(in_flight(unpinned), 1, "the other socket is still open");
    drop(other);
    eventually("other tunnel released", || in_flight(unpinned) == 0).await;
}

#[tokio::test]
async fn an_idle_tunnel_is_closed_after_the_idle_timeout() {
    let up = echo_server("a").await;
    let idle = Duration::from_millis(300);
    let fwd: Forward<Incoming> = ForwardBuilder::new(&up.url)
        .upgrade_idle_timeout(idle)
        .build()
        .unwrap();
    let proxy = serve(fwd).await;
    let (mut ws, _) = ws_connect(proxy, None).await;
    assert_eq!(echo(&mut ws, "hi").await, "a:hi");
    let quiet_from = tokio::time::Instant::now();
    // Nothing is sent: the proxy closes the tunnel, the client sees the stream end
    // (without a close frame: the proxy drops the TCP connection).
    let end = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("tunnel closed by the idle timeout");
    assert!(!matches!(end, Some(Ok(Message::Text(_)))), "{end:?}");
    assert!(quiet_from.elapsed() >= idle);
}

/// Records the `Upgrade` header it received and refuses with 426.
async fn refusing_server(seen: Arc<Mutex<Vec<Option<String>>>>) -> String {
    let svc = tower::service_fn(move |req: Request<Incoming>| {
        let seen = seen.clone();
        async move {
            let up = req
                .headers()
                .get("upgrade")
                .map(|v| v.to_str().unwrap().to_string());
            seen.lock().unwrap().push(up);
            let res = Response::builder()
                .status(StatusCode::UPGRADE_REQUIRED)
                .header("x-reason", "use v2")
                .body(Full::new(Bytes::from("upgrade to v2 first")))
                .unwrap();
            Ok::<_, Infallible>(res)
        }
    });
    let s = tower_patterns::server::spawn_local(svc).await.unwrap();
    format!("http://{}", s.addr())
}

async fn raw_request(addr: SocketAddr, req: Request<Empty<Bytes>>) -> Response<Bytes> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut tx, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let res = tx.send_request(req).await.unwrap();
    let (parts, body) = res.into_parts();
    Response::from_parts(parts, body.collect().await.unwrap().to_bytes())
}

#[tokio::test]
async fn a_refused_upgrade_is_passed_through_and_a_non_upgrade_loses_the_header() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let url = refusing_server(seen.clone()).await;
    let proxy = serve(Forward::<Incoming>::new(&url).unwrap()).await;
    let upgrade = |method: &str, connection: &str| {
        Request::builder()
            .method(method)
            .uri("/ws")
            .header("host", "example")
            .header("connection", connection)
            .header("upgrade", "websocket")
            .header("sec-websocket-version", "13")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
            .body(Empty::new())
            .unwrap()
    };
    let res = raw_request(proxy, upgrade("GET", "Upgrade")).await;
    assert_eq!(res.status(), StatusCode::UPGRADE_REQUIRED);
    assert_eq!(res.headers()["x-reason"], "use v2");
    assert_eq!(res.body(), "upgrade to v2 first");
    // Not upgrades: no `Connection: upgrade`, or a websocket POST. `Upgrade` is stripped.
    let res = raw_request(proxy, upgrade("GET", "keep-alive")).await;
    assert_eq!(res.status(), StatusCode::UPGRADE_REQUIRED);
    let res = raw_request(proxy, upgrade("POST", "upgrade")).await;
    assert_eq!(res.status(), StatusCode::UPGRADE_REQUIRED);
    assert_eq!(
        *seen.lock().unwrap(),
        vec![Some("websocket".to_string()), None, None]
    );
}

/// Sends a WebSocket handshake by hand and returns the socket after the `101`.
async fn raw_upgrade(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(
        b"GET /chat HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut byte).await.unwrap(), 1, "head ended early");
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    s
}

#[tokio::test]
async fn garbage_after_the_upgrade_kills_only_its_own_tunnel() {
    let up = echo_server("a").await;
    let proxy = serve(Forward::<Incoming>::new(&up.url).unwrap()).await;
    let (mut good, _) = ws_connect(proxy, None).await;
    assert_eq!(echo(&mut good, "before").await, "a:before");

    let mut bad = raw_upgrade(proxy).await;
    // Not a WebSocket frame: reserved bits set, an absurd length.
    bad.write_all(&[0xff; 64]).await.unwrap();
    let mut rest = Vec::new();
    // The upstream gives up on the protocol; the tunnel closes the client's side.
    // (EOF or a reset: either is a close; the timeout is what would fail.)
    let _closed = tokio::time::timeout(Duration::from_secs(5), bad.read_to_end(&mut rest))
        .await
        .expect("bad tunnel closed");

    // The other tunnel and new ones keep working.
    assert_eq!(echo(&mut good, "after").await, "a:after");
    let (mut fresh, _) = ws_connect(proxy, None).await;
    assert_eq!(echo(&mut fresh, "new").await, "a:new");
}

#[cfg(feature = "tls")]
mod tls_support;

/// `wss://` behind the proxy: the tunnel to an `https://` upstream goes over TLS, verified
/// against the test CA, and offers only `http/1.1` by ALPN (an upstream that would pick h2
/// could not be upgraded), while plain requests to the same upstream still get h2.
#[cfg(feature = "tls")]
mod over_tls {
    use super::tls_support::{server_config, Ca, Validity};
    use super::*;
    use tokio_rustls::TlsAcceptor;
    use tower_patterns::tls::ClientTls;

    #[tokio::test]
    async fn websocket_echo_through_forward_to_an_https_upstream() {
        let ca = Ca::new("ws test CA");
        let leaf = ca.server(&["localhost"], Validity::Now);
        // The upstream prefers h2 when offered it, as most TLS servers do.
        let acceptor =
            TlsAcceptor::from(Arc::new(server_config(&leaf, None, &[b"h2", b"http/1.1"])));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let alpn = Arc::new(Mutex::new(Vec::new()));
        let seen = alpn.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let seen = seen.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let proto = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
                    seen.lock().unwrap().push(proto);
                    let Ok(mut ws) = tokio_tungstenite::accept_async(tls).await else {
                        return;
                    };
                    while let Some(Ok(Message::Text(t))) = ws.next().await {
                        if ws.send(Message::text(format!("tls:{t}"))).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        let tls = ClientTls::builder()
            .ca_pem(ca.pem().as_bytes())
            .unwrap()
            .build()
            .unwrap();
        let fwd = ForwardBuilder::new(format!("https://localhost:{port}"))
            .tls(tls)
            .build()
            .unwrap();
        let proxy = serve(fwd).await;
        let (mut ws, _) = ws_connect(proxy, None).await;
        assert_eq!(echo(&mut ws, "hello").await, "tls:hello");
        ws.close(None).await.unwrap();
        assert_eq!(
            alpn.lock().unwrap().as_slice(),
            &[Some(b"http/1.1".to_vec())],
            "the tunnel's connection offered http/1.1 only"
        );
    }
}

/// Our server with `max_connections` and `drain_timeout`, serving `Forward` to `up`; the
/// returned sender starts a graceful shutdown, the handle ends when the server returned.
async fn limited_front(
    up: &str,
    max_connections: usize,
    drain: Duration,
) -> (
    SocketAddr,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<std::io::Result<()>>,
) {
    let fwd = Forward::<Incoming>::new(up).unwrap();
    let svc = ServiceBuilder::new().layer(ErrorResponseLayer).service(fwd);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tower_patterns::server::Server::builder()
        .max_connections(max_connections)
        .drain_timeout(drain);
    let task = tokio::spawn(server.serve_with_shutdown(listener, svc, async {
        let _ = stopped.await;
    }));
    (addr, stop, task)
}

/// An HTTP/1.1 GET on an open connection; the status line's code.
async fn get_on(stream: &mut TcpStream) -> u16 {
    stream
        .write_all(b"GET /x HTTP/1.1\r\nhost: t\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = stream.read(&mut buf).await.unwrap();
    let head = String::from_utf8_lossy(&buf[..n]);
    head.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn an_open_tunnel_keeps_its_connection_slot() {
    let up = echo_server("a").await;
    let (addr, _stop, _task) = limited_front(&up.url, 2, Duration::from_secs(5)).await;
    let (mut ws, _) = ws_connect(addr, None).await;
    assert_eq!(echo(&mut ws, "hi").await, "a:hi");
    // The second slot: a keep-alive connection answered (the echo server answers a plain
    // GET with 400, which is fine: it was served).
    let mut second = TcpStream::connect(addr).await.unwrap();
    assert_ne!(get_on(&mut second).await, 0);
    // The third waits: both slots are taken, one of them by the tunnel.
    let mut third = TcpStream::connect(addr).await.unwrap();
    let waiting = tokio::time::timeout(Duration::from_millis(500), get_on(&mut third)).await;
    assert!(
        waiting.is_err(),
        "the third connection was served while a tunnel was open"
    );
    // Closing the tunnel frees its slot: the third is served.
    ws.close(None).await.unwrap();
    drop(ws);
    let mut third = third;
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), third.read(&mut buf))
        .await
        .expect("served once the tunnel closed")
        .unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 "));
    drop(second);
}

#[tokio::test]
async fn a_drain_closes_open_tunnels_at_the_drain_timeout() {
    let up = echo_server("a").await;
    let drain = Duration::from_millis(400);
    let (addr, stop, task) = limited_front(&up.url, 16, drain).await;
    let (mut ws, _) = ws_connect(addr, None).await;
    assert_eq!(echo(&mut ws, "hi").await, "a:hi");
    let started = tokio::time::Instant::now();
    stop.send(()).unwrap();
    // During the drain the tunnel still works (nginx keeps WebSockets until
    // worker_shutdown_timeout)...
    assert_eq!(echo(&mut ws, "still").await, "a:still");
    // ...and the server returns once the drain timeout passed, not at the tunnel's idle
    // timeout (60 s).
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("the server returned within the drain timeout")
        .unwrap()
        .unwrap();
    assert!(
        started.elapsed() >= drain,
        "returned before the drain timeout"
    );
    // The tunnel was closed: the client sees the end of the stream.
    let end = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => break,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(end.is_ok(), "the tunnel stayed open after the drain");
}
