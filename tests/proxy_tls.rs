//! `Forward` to `https://` upstreams (rustls) over real sockets on 127.0.0.1, with
//! certificates made by the test: verification, SNI, mTLS, pooling, session resumption and
//! HTTP/2 chosen by ALPN.

mod tls_support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use rustls::CertificateError;
use tower::{Service, ServiceExt};
use tower_patterns::classify::{is_connect_error, Condition, FailureKind, Outcome};
use tower_patterns::proxy::{error_status, Forward, ForwardBuilder, ForwardError, Protocol};
use tower_patterns::tls::ClientTls;

use tls_support::*;

type Body = Full<Bytes>;

const H1: &[&[u8]] = &[b"http/1.1"];

fn trusting(ca: &Ca) -> ClientTls {
    ClientTls::builder()
        .ca_pem(ca.pem().as_bytes())
        .unwrap()
        .build()
        .unwrap()
}

async fn get(fwd: &mut Forward<Body>, path: &str) -> Result<(StatusCode, String), ForwardError> {
    let req = Request::get(path).body(Body::default()).unwrap();
    let res = fwd.ready().await?.call(req).await?;
    let status = res.status();
    let body = res.into_body().collect().await.expect("body").to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// The `rustls::Error` in `e`'s source chain.
fn rustls_cause(e: &ForwardError) -> Option<&rustls::Error> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = cur {
        if let Some(r) = s.downcast_ref::<rustls::Error>() {
            return Some(r);
        }
        // `io::Error::source` skips what it wraps.
        if let Some(r) = s
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|i| i.downcast_ref::<rustls::Error>())
        {
            return Some(r);
        }
        cur = s.source();
    }
    None
}

/// A TLS failure: 502, a transport failure of the upstream (balancer and breaker count
/// it), never sent (a POST may go elsewhere), with the rustls cause.
fn assert_tls_failure(e: &ForwardError) -> &rustls::Error {
    assert!(matches!(e, ForwardError::Tls { .. }), "{e:?}");
    assert_eq!(e.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(error_status(e), StatusCode::BAD_GATEWAY);
    assert_eq!(e.kind(), FailureKind::Transport);
    assert!(
        is_connect_error(e),
        "a refused handshake never sent the request"
    );
    // What the balancer's passive health and the breaker see: a failure of the upstream.
    let cond: Condition = "5xx,fail".parse().unwrap();
    assert_eq!(
        cond.classify_error_ref(e),
        Outcome::Failure(FailureKind::Transport)
    );
    rustls_cause(e).unwrap_or_else(|| panic!("no rustls cause in {e:?}"))
}

#[tokio::test]
async fn good_certificate_from_the_test_ca_is_answered_with_sni() {
    let ca = Ca::new("test CA");
    let srv = tls_server(server_config(
        &ca.server(&["localhost"], Validity::Now),
        None,
        H1,
    ))
    .await;
    let mut fwd: Forward<Body> =
        ForwardBuilder::new(format!("https://localhost:{}", srv.addr.port()))
            .tls(trusting(&ca))
            .build()
            .unwrap();
    let (status, body) = get(&mut fwd, "/hello").await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert!(body.starts_with("HTTP/1.1 /hello localhost:"), "{body}");
    assert_eq!(
        srv.counts.sni.lock().unwrap().as_slice(),
        &[Some("localhost".to_string())]
    );
}

#[tokio::test]
async fn an_ip_upstream_sends_no_sni_and_verifies_the_ip_san() {
    let ca = Ca::new("test CA");
    let srv = tls_server(server_config(
        &ca.server(&["127.0.0.1"], Validity::Now),
        None,
        H1,
    ))
    .await;
    let mut fwd: Forward<Body> = ForwardBuilder::new(format!("https://{}", srv.addr))
        .tls(trusting(&ca))
        .build()
        .unwrap();
    let (status, _) = get(&mut fwd, "/").await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(srv.counts.sni.lock().unwrap().as_slice(), &[None]);

    // The same certificate does not cover another name for the same address.
    let ca2 = Ca::new("test CA 2");
    let srv2 = tls_server(server_config(
        &ca2.server(&["127.0.0.2"], Validity::Now),
        None,
        H1,
    ))
    .await;
    let mut fwd: Forward<Body> = ForwardBuilder::new(format!("https://{}", srv2.addr))
        .tls(trusting(&ca2))
        .build()
        .unwrap();
    let e = get(&mut fwd, "/").await.unwrap_err();
    let cause = assert_tls_failure(&e);
    assert!(
        matches!(
            cause,
            rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. }
            )
        ),
        "{cause:?}"
    );
}

#[tokio::test]
async fn wrong_host_is_a_typed_502() {
    let ca = Ca::new("test CA");
    let srv = tls_server(server_config(
        &ca.server(&["other.example"], Validity::Now),
        None,
        H1,
    ))
    .await;
    let mut fwd: Forward<Body> =
        ForwardBuilder::new(format!("https://localhost:{}", srv.addr.port()))
            .tls(trusting(&ca))
            .build()
            .unwrap();
    let e = get(&mut fwd, "/").await.unwrap_err();
    let cause = assert_tls_failure(&e);
    assert!(
        matches!(
            cause,
            rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. }
            )
        ),
        "{cause:?}"
    );
}

#[tokio::test]
async fn expired_certificate_is_a_typed_502() {
    let ca = Ca::new("test CA");
    let srv = tls_server(server_config(
        &ca.server(&["localhost"], Validity::Expired),
        None,
        H1,
    ))
    .await;
    let mut fwd: Forward<Body> =
        ForwardBuilder::new(format!("https://localhost:{}", srv.addr.port()))
            .tls(trusting(&ca))
            .build()
            .unwrap();
    let e = get(&mut fwd, "/").await.unwrap_err();
    let cause = assert_tls_failure(&e);
    assert!(
        matches!(
            cause,
            rustls::Error::InvalidCertificate(
                CertificateError::Expired | CertificateError::ExpiredContext { .. }
            )
        ),
        "{cause:?}"
    );
}

#[tokio::test]
async fn self_signed_without_its_ca_is_a_typed_502_by_default() {
    let srv = tls_server(server_config(&self_signed(&["localhost"]), None, H1)).await;
    // No `.tls(..)`: the default verifies against the webpki roots.
    let mut fwd: Forward<Body> =
        Forward::new(&format!("https://localhost:{}", srv.addr.port())).unwrap();
    let e = get(&mut fwd, "/").await.unwrap_err();
    let cause = assert_tls_failure(&e);
    assert!(
        matches!(
            cause,
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)
        ),
        "{cause:?}"
    );
    assert_eq!(srv.counts.full.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn mtls_without_a_client_certificate_fails_and_with_one_succeeds() {
    let ca = Ca::new("server CA");
    let client_ca = Ca::new("client CA");
    let srv = tls_server(server_config(
        &ca.server(&["localhost"], Validity::Now),
        Some(&client_ca),
        H1,
    ))
    .await;
    let url = format!("https://localhost:{}", srv.addr.port());

    let mut anonymous: Forward<Body> = ForwardBuilder::new(&url)
        .tls(trusting(&ca))
        .build()
        .unwrap();
    let e = get(&mut anonymous, "/").await.unwrap_err();
    let cause = assert_tls_failure(&e);
    assert!(
        matches!(
            cause,
            rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRequired)
        ),
        "{cause:?}"
    );

    let client = client_ca.client("proxy.internal");
    let tls = ClientTls::builder()
        .ca_pem(ca.pem().as_bytes())
        .unwrap()
        .client_cert_pem(client.cert_pem().as_bytes(), client.key_pem().as_bytes())
        .unwrap()
        .build()
        .unwrap();
    let mut fwd: Forward<Body> = ForwardBuilder::new(&url).tls(tls).build().unwrap();
    let (status, _) = get(&mut fwd, "/").await.unwrap();
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn keep_alive_reuses_one_tls_connection() {
    let ca = Ca::new("test CA");
    let srv = tls_server(server_config(
        &ca.server(&["localhost"], Validity::Now),
        None,
        H1,
    ))
    .await;
    let mut fwd: Forward<Body> =
        ForwardBuilder::new(format!("https://localhost:{}", srv.addr.port()))
            .tls(trusting(&ca))
            .build()
            .unwrap();
    for i in 0..20 {
        let (status, body) = get(&mut fwd, &format!("/{i}")).await.unwrap();
        assert_eq!(status, StatusCode::OK);
        assert!(body.starts_with(&format!("HTTP/1.1 /{i} ")), "{body}");
    }
    assert_eq!(srv.tcp(), 1, "20 requests over one pooled TLS connection");
    assert_eq!(srv.counts.full.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn new_connections_resume_the_tls_session() {
    let ca = Ca::new("test CA");
    let srv = tls_server(server_config(
        &ca.server(&["localhost"], Validity::Now),
        None,
        H1,
    ))
    .await;
    // No idle connection kept: every request opens a new one.
    let mut fwd: Forward<Body> =
        ForwardBuilder::new(format!("https://localhost:{}", srv.addr.port()))
            .tls(trusting(&ca))
            .pool_max_idle_per_host(0)
            .build()
            .unwrap();
    for _ in 0..4 {
        let (status, _) = get(&mut fwd, "/").await.unwrap();
        assert_eq!(status, StatusCode::OK);
    }
    // A `Forward::to` sibling shares the client configuration and its session cache.
    let mut sibling = fwd
        .to(&format!("https://localhost:{}/base", srv.addr.port()))
        .unwrap();
    let (status, body) = get(&mut sibling, "/x").await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert!(body.starts_with("HTTP/1.1 /base/x "), "{body}");
    assert_eq!(srv.tcp(), 5);
    assert_eq!(
        srv.counts.full.load(Ordering::SeqCst),
        1,
        "one full handshake"
    );
    assert_eq!(srv.counts.resumed.load(Ordering::SeqCst), 4, "then resumed");
}

#[tokio::test]
async fn alpn_picks_http2_and_multiplexes_over_one_connection() {
    let ca = Ca::new("test CA");
    let srv = tls_server(server_config(
        &ca.server(&["localhost"], Validity::Now),
        None,
        &[b"h2", b"http/1.1"],
    ))
    .await;
    let fwd: Forward<Body> = ForwardBuilder::new(format!("https://localhost:{}", srv.addr.port()))
        .tls(trusting(&ca))
        .build()
        .unwrap();
    let calls = (0..32).map(|i| {
        let mut fwd = fwd.clone();
        async move { get(&mut fwd, &format!("/{i}")).await }
    });
    let results = futures_util::future::join_all(calls).await;
    for (i, r) in results.into_iter().enumerate() {
        let (status, body) = r.unwrap();
        assert_eq!(status, StatusCode::OK);
        assert!(
            body.starts_with(&format!("HTTP/2.0 /{i} localhost:")),
            "{body}"
        );
    }
    assert_eq!(srv.tcp(), 1, "32 concurrent requests, one h2 connection");
    assert_eq!(
        srv.counts.alpn.lock().unwrap().as_slice(),
        &[Some(b"h2".to_vec())]
    );
}

#[tokio::test]
async fn alpn_falls_back_to_http1_when_the_upstream_offers_only_that() {
    let ca = Ca::new("test CA");
    let srv = tls_server(server_config(
        &ca.server(&["localhost"], Validity::Now),
        None,
        H1,
    ))
    .await;
    let fwd: Forward<Body> = ForwardBuilder::new(format!("https://localhost:{}", srv.addr.port()))
        .tls(trusting(&ca))
        .build()
        .unwrap();
    let calls = (0..8).map(|i| {
        let mut fwd = fwd.clone();
        async move { get(&mut fwd, &format!("/{i}")).await }
    });
    for r in futures_util::future::join_all(calls).await {
        let (status, body) = r.unwrap();
        assert_eq!(status, StatusCode::OK);
        assert!(body.starts_with("HTTP/1.1 "), "{body}");
    }
    // Sequential requests afterwards reuse the pooled HTTP/1.1 connections.
    let before = srv.tcp();
    let mut one = fwd.clone();
    for _ in 0..5 {
        get(&mut one, "/").await.unwrap();
    }
    assert_eq!(srv.tcp(), before);
}

#[tokio::test]
async fn protocol_http1_offers_only_http1() {
    let ca = Ca::new("test CA");
    let srv = tls_server(server_config(
        &ca.server(&["localhost"], Validity::Now),
        None,
        &[b"h2", b"http/1.1"],
    ))
    .await;
    let mut fwd: Forward<Body> =
        ForwardBuilder::new(format!("https://localhost:{}", srv.addr.port()))
            .tls(trusting(&ca))
            .protocol(Protocol::Http1)
            .build()
            .unwrap();
    let (_, body) = get(&mut fwd, "/").await.unwrap();
    assert!(body.starts_with("HTTP/1.1 "), "{body}");
}

#[tokio::test]
async fn a_plaintext_server_behind_https_is_a_tls_error_not_a_fallback() {
    let (addr, _task) = plaintext_server().await;
    let mut fwd: Forward<Body> = ForwardBuilder::new(format!("https://{addr}"))
        .connect_timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let e = get(&mut fwd, "/").await.unwrap_err();
    assert!(matches!(e, ForwardError::Tls { .. }), "{e:?}");
    assert_eq!(e.status(), StatusCode::BAD_GATEWAY);
}

/// An HTTP/1.1 server without TLS: it answers the ClientHello with a 400.
async fn plaintext_server() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
                    .await;
            });
        }
    });
    (addr, task)
}

#[test]
fn client_tls_rejects_bad_pem() {
    use tower_patterns::tls::ClientTlsError;
    let e = ClientTls::builder().ca_pem(b"not a pem").unwrap_err();
    assert!(matches!(e, ClientTlsError::Empty { .. }), "{e:?}");
    let ca = Ca::new("test CA");
    let other = Ca::new("other").client("x");
    let mismatched = ca.client("y");
    let e = ClientTls::builder()
        .client_cert_pem(mismatched.cert_pem().as_bytes(), other.key_pem().as_bytes())
        .unwrap()
        .build()
        .unwrap_err();
    assert!(matches!(e, ClientTlsError::Config(_)), "{e:?}");
}

#[tokio::test]
async fn a_tls_upstream_that_accepts_and_stalls_is_a_connect_timeout() {
    // Accepts TCP connections and never answers the ClientHello.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let _task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    let mut fwd: Forward<Body> = ForwardBuilder::new(format!("https://{addr}"))
        .connect_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let e = get(&mut fwd, "/").await.unwrap_err();
    assert!(matches!(e, ForwardError::ConnectTimeout { .. }), "{e:?}");
    assert_eq!(e.status(), StatusCode::GATEWAY_TIMEOUT);
    assert!(is_connect_error(&e));
}
