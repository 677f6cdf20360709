//! The TLS listener over real sockets on 127.0.0.1 (issue 13), with certificates made by
//! the test (rcgen, a test CA): HTTP/1.1 over TLS, HTTP/2 chosen by ALPN, typed start-up
//! errors for missing files, empty chains and mismatched keys, certificate reload (by call
//! and by watching the files) that new connections see while open ones keep theirs, a
//! failed reload keeping the old certificate, the handshake timeout cutting a stalled
//! client without holding up others, and the per-core `Workers` sharing one reloadable
//! certificate.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tower_patterns::server::{Server, WorkerId, Workers};
use tower_patterns::tls::{ServerTls, ServerTlsError};

/// Every test's bound on anything it waits for.
const LIMIT: Duration = Duration::from_secs(10);

/// A test CA issuing `localhost` certificates.
struct Ca {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

/// A leaf certificate and its key, in PEM and DER.
struct Leaf {
    cert_pem: String,
    key_pem: String,
    der: CertificateDer<'static>,
}

impl Ca {
    fn new() -> Ca {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "tower-patterns test CA");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Ca { cert, key }
    }

    /// A `localhost` certificate with this serial number.
    fn leaf(&self, serial: u64) -> Leaf {
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params.serial_number = Some(rcgen::SerialNumber::from(serial));
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().clone(),
        }
    }

    fn client_config(&self, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.cert.der().clone()).unwrap();
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        // Every connection a full handshake: a resumed session reports the certificate it
        // was first made with, which would hide what a reload serves to new clients.
        config.resumption = rustls::client::Resumption::disabled();
        Arc::new(config)
    }
}

/// Writes `leaf` as `cert.pem` and `key.pem` in `dir` (replacing them by rename, as
/// certificate tools do, so a reader never sees half a file).
fn write_files(dir: &Path, leaf: &Leaf) -> (PathBuf, PathBuf) {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    for (path, text) in [(&cert, &leaf.cert_pem), (&key, &leaf.key_pem)] {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }
    (cert, key)
}

/// Answers `<version> <path>`.
fn echo_version() -> impl tower::Service<
    Request<Incoming>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl Send,
> + Clone
       + Send
       + 'static {
    tower::service_fn(|req: Request<Incoming>| async move {
        let body = format!("{:?} {}", req.version(), req.uri().path());
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body))))
    })
}

/// A TLS server on a free port of 127.0.0.1, and a way to stop it.
struct TlsServer {
    addr: SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl TlsServer {
    async fn start(tls: ServerTls) -> TlsServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(Server::builder().serve_with_acceptor(
            listener,
            tls,
            echo_version(),
            async {
                let _ = stopped.await;
            },
        ));
        TlsServer { addr, stop, task }
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(LIMIT, self.task)
            .await
            .expect("stopped in time")
            .unwrap()
            .unwrap();
    }
}

async fn connect(addr: SocketAddr, config: Arc<rustls::ClientConfig>) -> TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    tokio::time::timeout(
        LIMIT,
        tokio_rustls::TlsConnector::from(config).connect(name, tcp),
    )
    .await
    .expect("handshake in time")
    .expect("handshake")
}

fn served_cert(tls: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    tls.get_ref().1.peer_certificates().expect("a certificate")[0].clone()
}

fn get(path: &str) -> Request<Empty<Bytes>> {
    Request::builder()
        .uri(format!("https://localhost{path}"))
        .header(http::header::HOST, "localhost")
        .body(Empty::new())
        .unwrap()
}

async fn text(res: Response<Incoming>) -> String {
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// An HTTP/1.1 client over `tls` (kept open: a keep-alive connection).
async fn h1(tls: TlsStream<TcpStream>) -> hyper::client::conn::http1::SendRequest<Empty<Bytes>> {
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    send
}

#[tokio::test]
async fn http1_over_tls() {
    let ca = Ca::new();
    let leaf = ca.leaf(1);
    let tls = ServerTls::from_pem(leaf.cert_pem.as_bytes(), leaf.key_pem.as_bytes()).unwrap();
    let server = TlsServer::start(tls).await;
    let stream = connect(server.addr, ca.client_config(&[b"http/1.1"])).await;
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    assert_eq!(served_cert(&stream), leaf.der);
    let mut send = h1(stream).await;
    let res = send.send_request(get("/one")).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(text(res).await, "HTTP/1.1 /one");
    drop(send);
    server.stop().await;
}

#[tokio::test]
async fn http2_is_chosen_by_alpn() {
    let ca = Ca::new();
    let leaf = ca.leaf(1);
    let tls = ServerTls::from_pem(leaf.cert_pem.as_bytes(), leaf.key_pem.as_bytes()).unwrap();
    let server = TlsServer::start(tls).await;
    let stream = connect(server.addr, ca.client_config(&[b"h2", b"http/1.1"])).await;
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    // Several streams on the one TLS connection.
    let requests = (0..8).map(|i| {
        let mut send = send.clone();
        async move { text(send.send_request(get(&format!("/{i}"))).await.unwrap()).await }
    });
    let bodies = tokio::time::timeout(LIMIT, futures_util::future::join_all(requests))
        .await
        .expect("in time");
    for (i, body) in bodies.into_iter().enumerate() {
        assert_eq!(body, format!("HTTP/2.0 /{i}"));
    }
    drop(send);
    server.stop().await;
}

#[test]
fn start_up_errors_are_typed() {
    let ca = Ca::new();
    let (one, two) = (ca.leaf(1), ca.leaf(2));
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = write_files(dir.path(), &one);

    let missing = dir.path().join("missing.pem");
    match ServerTls::from_pem_files(&missing, &key) {
        Err(ServerTlsError::Read { path, source }) => {
            assert_eq!(path, missing);
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        }
        other => panic!("missing certificate file: {other:?}"),
    }
    match ServerTls::from_pem_files(&cert, &missing) {
        Err(ServerTlsError::Read { path, .. }) => assert_eq!(path, missing),
        other => panic!("missing key file: {other:?}"),
    }

    // The key of another certificate.
    let other_key = dir.path().join("other-key.pem");
    std::fs::write(&other_key, &two.key_pem).unwrap();
    match ServerTls::from_pem_files(&cert, &other_key) {
        Err(e @ ServerTlsError::KeyMismatch { .. }) => {
            assert!(e.to_string().contains("does not match"), "{e}");
        }
        other => panic!("mismatched key: {other:?}"),
    }

    // A certificate file without a certificate, a key file without a key.
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "").unwrap();
    assert!(matches!(
        ServerTls::from_pem_files(&empty, &key),
        Err(ServerTlsError::NoCertificate { .. })
    ));
    assert!(matches!(
        ServerTls::from_pem_files(&cert, &cert),
        Err(ServerTlsError::NoKey { .. })
    ));

    // The good pair loads.
    let tls = ServerTls::from_pem_files(&cert, &key).unwrap();
    assert_eq!(tls.certificate_chain(), vec![one.der]);
}

#[tokio::test]
async fn reload_serves_the_new_certificate_to_new_connections_only() {
    let ca = Ca::new();
    let (one, two, three) = (ca.leaf(1), ca.leaf(2), ca.leaf(3));
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = write_files(dir.path(), &one);
    let tls = ServerTls::from_pem_files(&cert, &key).unwrap();
    let server = TlsServer::start(tls.clone()).await;
    let client = ca.client_config(&[b"http/1.1"]);

    let old = connect(server.addr, client.clone()).await;
    assert_eq!(served_cert(&old), one.der);
    let mut old = h1(old).await;
    assert_eq!(
        old.send_request(get("/a")).await.unwrap().status(),
        StatusCode::OK
    );

    write_files(dir.path(), &two);
    tls.reload().unwrap();
    let new = connect(server.addr, client.clone()).await;
    assert_eq!(
        served_cert(&new),
        two.der,
        "a new connection sees the new certificate"
    );
    // The connection opened before the reload keeps serving.
    let res = old.send_request(get("/b")).await.unwrap();
    assert_eq!(text(res).await, "HTTP/1.1 /b");

    // A bad reload (the new certificate with the wrong key) keeps the current one.
    std::fs::write(&cert, &three.cert_pem).unwrap();
    assert!(matches!(
        tls.reload(),
        Err(ServerTlsError::KeyMismatch { .. })
    ));
    std::fs::remove_file(&key).unwrap();
    assert!(matches!(tls.reload(), Err(ServerTlsError::Read { .. })));
    let after = connect(server.addr, client).await;
    assert_eq!(
        served_cert(&after),
        two.der,
        "the failed reloads changed nothing"
    );

    drop(old);
    server.stop().await;
}

#[tokio::test]
async fn watched_files_are_reloaded_when_they_change() {
    let ca = Ca::new();
    let (one, two) = (ca.leaf(1), ca.leaf(2));
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = write_files(dir.path(), &one);
    let tls = ServerTls::from_pem_files(&cert, &key).unwrap();
    let watch = tls.watch_files(Duration::from_millis(20));
    assert!(watch.is_running());
    let server = TlsServer::start(tls).await;
    let client = ca.client_config(&[b"http/1.1"]);
    assert_eq!(
        served_cert(&connect(server.addr, client.clone()).await),
        one.der
    );

    write_files(dir.path(), &two);
    // New connections until one sees the new certificate (the watch polls every 20 ms).
    tokio::time::timeout(LIMIT, async {
        while served_cert(&connect(server.addr, client.clone()).await) != two.der {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the watch reloaded the changed files");
    drop(watch);
    server.stop().await;
}

#[tokio::test]
async fn a_stalled_handshake_is_cut_at_the_timeout_without_blocking_others() {
    let ca = Ca::new();
    let leaf = ca.leaf(1);
    let tls = ServerTls::from_pem(leaf.cert_pem.as_bytes(), leaf.key_pem.as_bytes())
        .unwrap()
        .handshake_timeout(Duration::from_millis(300));
    let server = TlsServer::start(tls).await;

    // Connects and never says hello; another sends half a ClientHello record header.
    let mut silent = TcpStream::connect(server.addr).await.unwrap();
    let mut half = TcpStream::connect(server.addr).await.unwrap();
    half.write_all(&[0x16, 0x03, 0x01]).await.unwrap();

    // Meanwhile a well-behaved client is served at once.
    let stream = connect(server.addr, ca.client_config(&[b"http/1.1"])).await;
    let mut send = h1(stream).await;
    let res = send.send_request(get("/ok")).await.unwrap();
    assert_eq!(text(res).await, "HTTP/1.1 /ok");
    assert!(
        !silent_is_closed(&mut silent).await,
        "still within the timeout"
    );

    for stalled in [&mut silent, &mut half] {
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(LIMIT, stalled.read_to_end(&mut rest)).await;
        assert!(closed.is_ok(), "cut at the handshake timeout");
    }
    drop(send);
    server.stop().await;
}

/// Whether the server already closed `s` (a non-blocking check).
async fn silent_is_closed(s: &mut TcpStream) -> bool {
    let mut byte = [0u8; 1];
    matches!(
        tokio::time::timeout(Duration::ZERO, s.peek(&mut byte)).await,
        Ok(Ok(0) | Err(_))
    )
}

#[test]
fn workers_share_one_reloadable_certificate() {
    let ca = Ca::new();
    let (one, two) = (ca.leaf(1), ca.leaf(2));
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = write_files(dir.path(), &one);
    let tls = ServerTls::from_pem_files(&cert, &key).unwrap();
    let handle = Workers::new(2)
        .acceptor(tls.clone())
        .spawn("127.0.0.1:0".parse().unwrap(), |_id: WorkerId| {
            echo_version()
        })
        .unwrap();
    let addr = handle.local_addr();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = ca.client_config(&[b"h2", b"http/1.1"]);
    let round = |expected: CertificateDer<'static>| {
        let client = client.clone();
        async move {
            // Enough connections that both workers' sockets get some.
            for _ in 0..8 {
                let stream = connect(addr, client.clone()).await;
                assert_eq!(served_cert(&stream), expected);
                let (mut send, conn) = hyper::client::conn::http2::handshake(
                    TokioExecutor::new(),
                    TokioIo::new(stream),
                )
                .await
                .unwrap();
                let conn = tokio::spawn(conn);
                let res = send.send_request(get("/w")).await.unwrap();
                assert_eq!(text(res).await, "HTTP/2.0 /w");
                drop(send);
                let _ = tokio::time::timeout(LIMIT, conn).await;
            }
        }
    };
    rt.block_on(round(one.der.clone()));
    write_files(dir.path(), &two);
    tls.reload().unwrap();
    rt.block_on(round(two.der.clone()));
    drop(rt);
    handle.shutdown();
    handle.join().unwrap();
}

/// TLS connections handed from one worker to a less-loaded one (issue 13: the kernel's
/// hash left 55 against 74 of 129 connections) complete their handshake and are served
/// there: 40 kept-alive connections, opened one after the other, find the two workers
/// within one connection of each other at every step (a hash alone: about one chance in
/// a million).
#[tokio::test]
async fn tls_connections_are_spread_evenly_over_the_workers() {
    let ca = Ca::new();
    let leaf = ca.leaf(1);
    let tls = ServerTls::from_pem(leaf.cert_pem.as_bytes(), leaf.key_pem.as_bytes()).unwrap();
    let handle = Workers::new(2)
        .acceptor(tls)
        .spawn("127.0.0.1:0".parse().unwrap(), |id: WorkerId| {
            let body = Bytes::from(id.index().to_string());
            tower::service_fn(move |_req: Request<Incoming>| {
                let body = body.clone();
                async move { Ok::<_, Infallible>(Response::new(Full::new(body))) }
            })
        })
        .unwrap();
    let addr = handle.local_addr();
    let client = ca.client_config(&[b"http/1.1"]);
    let mut open = Vec::new();
    let mut per_worker = [0usize; 2];
    for i in 0..40 {
        let mut send = h1(connect(addr, client.clone()).await).await;
        let res = tokio::time::timeout(LIMIT, send.send_request(get("/")))
            .await
            .expect("answered in time")
            .unwrap();
        let worker: usize = text(res).await.parse().expect("a worker index");
        per_worker[worker] += 1;
        assert!(
            per_worker[0].abs_diff(per_worker[1]) <= 1,
            "after {} connections the workers hold {per_worker:?}",
            i + 1
        );
        open.push(send);
    }
    drop(open);
    tokio::time::timeout(LIMIT, handle.shutdown_and_wait())
        .await
        .expect("stopped in time")
        .unwrap();
}
