//! Client-address features under `axum::serve` (issue 11 item 4): `X-Forwarded-For`,
//! client-IP hashing and `PURGE` from loopback, with `ClientAddrLayer` reading axum's
//! `ConnectInfo`, and a trusted-proxies setting deciding when an incoming
//! `X-Forwarded-For` is believed. Real sockets on 127.0.0.1.

use std::net::SocketAddr;

use axum::Router;
use bytes::Bytes;
use http::{HeaderValue, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower_patterns::cache::{purge_from_loopback, CacheLayer, MemoryStore};
use tower_patterns::client_addr::{ClientAddrLayer, TrustedProxies};
use tower_patterns::proxy::ForwardBuilder;
use tower_patterns::respond::respond;

/// An upstream that answers with the `X-Forwarded-For` it received (all lines).
async fn echo_upstream() -> SocketAddr {
    let app = Router::new().fallback(|headers: http::HeaderMap| async move {
        let lines: Vec<String> = headers
            .get_all("x-forwarded-for")
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect();
        lines.join(" | ")
    });
    serve(app).await
}

async fn serve(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
        .unwrap();
    });
    addr
}

/// A gateway proxying everything to `upstream`, mounted with no adapter code.
async fn gateway(upstream: SocketAddr, layer: ClientAddrLayer) -> SocketAddr {
    let forward = ForwardBuilder::new(format!("http://{upstream}"))
        .build::<axum::body::Body>()
        .unwrap();
    let app = Router::new()
        .fallback_service(respond(forward))
        .layer(layer);
    serve(app).await
}

async fn send(addr: SocketAddr, method: &str, path: &str, xff: &[&str]) -> (StatusCode, String) {
    let client: Client<HttpConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let mut req = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .body(Empty::new())
        .unwrap();
    for line in xff {
        req.headers_mut()
            .append("x-forwarded-for", HeaderValue::from_str(line).unwrap());
    }
    let res = tokio::time::timeout(std::time::Duration::from_secs(10), client.request(req))
        .await
        .expect("answered in time")
        .unwrap();
    let status = res.status();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn under_axum_serve_the_upstream_learns_the_client() {
    let up = echo_upstream().await;
    let gw = gateway(up, ClientAddrLayer::new()).await;
    let (status, seen) = send(gw, "GET", "/", &[]).await;
    assert_eq!(status, 200);
    assert_eq!(seen, "127.0.0.1");
}

#[tokio::test]
async fn an_untrusted_peers_forwarded_for_is_not_believed() {
    let up = echo_upstream().await;
    let gw = gateway(up, ClientAddrLayer::new()).await;
    let (_, seen) = send(gw, "GET", "/", &["6.6.6.6"]).await;
    assert_eq!(
        seen, "127.0.0.1",
        "a spoofed X-Forwarded-For must be dropped"
    );
}

#[tokio::test]
async fn a_trusted_peers_forwarded_for_lines_are_joined_not_truncated() {
    let up = echo_upstream().await;
    let trusted = ClientAddrLayer::new().trust(TrustedProxies::loopback());
    let gw = gateway(up, trusted).await;
    let (_, seen) = send(gw, "GET", "/", &["1.1.1.1", "2.2.2.2"]).await;
    assert_eq!(seen, "1.1.1.1, 2.2.2.2, 127.0.0.1");
}

#[tokio::test]
async fn forward_alone_joins_repeated_forwarded_for_lines() {
    // Our own server, no ClientAddrLayer: Forward itself must not keep only the first line.
    let up = echo_upstream().await;
    let forward = ForwardBuilder::new(format!("http://{up}"))
        .build::<hyper::body::Incoming>()
        .unwrap();
    let gw = tower_patterns::server::spawn_local(respond(forward))
        .await
        .unwrap()
        .addr();
    let (_, seen) = send(gw, "GET", "/", &["1.1.1.1", "2.2.2.2"]).await;
    assert_eq!(seen, "1.1.1.1, 2.2.2.2, 127.0.0.1");
}

async fn cached_gateway(layer: ClientAddrLayer) -> SocketAddr {
    let app = Router::new()
        .route("/page", axum::routing::get(|| async { "page" }))
        .layer(
            CacheLayer::builder(MemoryStore::new(1 << 20))
                .purge_allowed(purge_from_loopback)
                .build(),
        )
        .layer(layer);
    serve(app).await
}

#[tokio::test]
async fn purge_from_loopback_works_under_axum_serve() {
    let gw = cached_gateway(ClientAddrLayer::new()).await;
    let (status, _) = send(gw, "PURGE", "/page", &[]).await;
    assert_ne!(
        status,
        StatusCode::FORBIDDEN,
        "PURGE from 127.0.0.1 is allowed"
    );
}

#[tokio::test]
async fn purge_through_a_trusted_proxy_checks_the_real_client() {
    let gw = cached_gateway(ClientAddrLayer::new().trust(TrustedProxies::loopback())).await;
    // The loopback peer is a trusted proxy forwarding for a remote client: refused.
    let (status, _) = send(gw, "PURGE", "/page", &["6.6.6.6"]).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    // An unreadable element fails closed too.
    let (status, _) = send(gw, "PURGE", "/page", &["127.0.0.1, not-an-ip"]).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn under_hyper_utils_server_the_peer_is_given_per_connection() {
    use hyper_util::rt::TokioIo;
    use hyper_util::service::TowerToHyperService;
    use tower::Layer;
    let up = echo_upstream().await;
    let forward = ForwardBuilder::new(format!("http://{up}"))
        .build::<hyper::body::Incoming>()
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gw = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, peer)) = listener.accept().await else {
                return;
            };
            // hyper-util's server hands over no address: one layer per connection.
            let svc = ClientAddrLayer::new()
                .peer(peer)
                .layer(respond(forward.clone()));
            tokio::spawn(
                hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), TowerToHyperService::new(svc))
                    .into_owned(),
            );
        }
    });
    let (status, seen) = send(gw, "GET", "/", &["6.6.6.6"]).await;
    assert_eq!(status, 200);
    assert_eq!(seen, "127.0.0.1");
}
