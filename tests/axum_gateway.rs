//! Drives `examples/axum_gateway.rs` — the same gateway code, included here — over real
//! sockets: local routes, the balanced `/api`, the breaker's fallback, the content chain,
//! the download tee, tower-http's request id, all mounted with no adapter code.

#[path = "../examples/axum_gateway.rs"]
#[allow(dead_code)]
mod gateway;

use std::sync::atomic::Ordering;
use std::time::Duration;

use gateway::{fetch, gateway, serve, start_upstreams};
use tower_patterns::backup::BackupOutcome;
use tower_patterns::breaker::State;

#[tokio::test]
async fn the_gateway_mounts_every_pattern_in_axum() {
    let up = start_upstreams().await.unwrap();
    let dir = std::env::temp_dir().join(format!("axum-gateway-test-{}", std::process::id()));
    let (app, mut handles) = gateway(&up, dir.clone()).unwrap();
    let gw = serve(app).await.unwrap();

    assert_eq!(
        fetch(gw, "/").await.unwrap(),
        (http::StatusCode::OK, "gateway\n".into())
    );

    // Round robin over the two instances; ClientAddrLayer gave them X-Forwarded-For.
    let (s1, b1) = fetch(gw, "/api/users").await.unwrap();
    let (s2, b2) = fetch(gw, "/api/users").await.unwrap();
    assert_eq!((s1.as_u16(), s2.as_u16()), (200, 200));
    let mut seen = [b1, b2];
    seen.sort();
    assert_eq!(seen, ["api-a (for 127.0.0.1)\n", "api-b (for 127.0.0.1)\n"]);

    // Content chain: the primary has the logo; everything else comes from the storage on 404.
    assert_eq!(
        fetch(gw, "/static/logo.png").await.unwrap().1,
        "logo from primary\n"
    );
    assert_eq!(
        fetch(gw, "/static/old.png").await.unwrap().1,
        "/static/old.png from storage\n"
    );

    // The download is teed to the directory.
    let (status, body) = fetch(gw, "/downloads/report.pdf").await.unwrap();
    assert_eq!(
        (status.as_u16(), body.as_str()),
        (200, "contents of /downloads/report.pdf\n")
    );
    let event = tokio::time::timeout(Duration::from_secs(10), handles.backups.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(event.outcome, BackupOutcome::Committed { .. }),
        "{:?}",
        event.outcome
    );
    let copy = std::fs::read_to_string(dir.join("downloads/report.pdf")).unwrap();
    assert_eq!(copy, body);

    // The upstreams fail: 503s count for the breaker, which opens and lets its fallback answer.
    up.api_down.store(true, Ordering::SeqCst);
    let mut fallbacks = 0;
    for _ in 0..6 {
        let (status, body) = fetch(gw, "/api/users").await.unwrap();
        if body.starts_with("fallback: the api is resting") {
            assert_eq!(status, 200);
            fallbacks += 1;
        } else {
            assert_eq!(status, 503);
        }
    }
    assert_eq!(handles.breaker.state(), State::Open);
    assert!(fallbacks >= 2, "the fallback answered {fallbacks} times");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn tower_http_request_ids_reach_the_client() {
    let up = start_upstreams().await.unwrap();
    let dir = std::env::temp_dir().join(format!("axum-gateway-rid-{}", std::process::id()));
    let (app, _handles) = gateway(&up, dir.clone()).unwrap();
    let gw = serve(app).await.unwrap();
    let stream = tokio::net::TcpStream::connect(gw).await.unwrap();
    let (mut tx, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get("/api/x")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let res = tx.send_request(req).await.unwrap();
    assert_eq!(res.status(), 200);
    assert!(res.headers().contains_key("x-request-id"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// `route_layer` takes the `respond()` form too: an open circuit is a 503 page.
#[tokio::test]
async fn a_breaker_mounts_with_route_layer() {
    use tower_patterns::breaker::{CircuitBreakerConfig, CircuitBreakerLayer};
    let layer = CircuitBreakerLayer::new(CircuitBreakerConfig::new().name("local")).unwrap();
    let circuit = layer.breaker().clone();
    let app = axum::Router::new()
        .route("/local", axum::routing::get(|| async { "local\n" }))
        .route_layer(layer.respond());
    let gw = serve(app).await.unwrap();
    assert_eq!(fetch(gw, "/local").await.unwrap().1, "local\n");
    circuit.force_open();
    let (status, _) = fetch(gw, "/local").await.unwrap();
    assert_eq!(status, http::StatusCode::SERVICE_UNAVAILABLE);
}
