//! Tests of the upgrade path: which requests count as upgrades, the headers kept, the
//! tunnel's byte counts, idle timeout and end reasons. Kept beside `upgrade.rs` so that file
//! holds only the tunnel it documents.

use super::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(*k, HeaderValue::from_static(v));
    }
    h
}

#[test]
fn only_a_real_upgrade_request_is_one() {
    let ws = headers(&[
        ("connection", "keep-alive, Upgrade"),
        ("upgrade", "websocket"),
    ]);
    assert!(requested(&Method::GET, Version::HTTP_11, &ws));
    assert!(
        !requested(&Method::POST, Version::HTTP_11, &ws),
        "websocket needs GET"
    );
    assert!(!requested(&Method::GET, Version::HTTP_2, &ws));
    assert!(!requested(&Method::GET, Version::HTTP_10, &ws));
    let other = headers(&[("connection", "upgrade"), ("upgrade", "foo/1")]);
    assert!(requested(&Method::POST, Version::HTTP_11, &other));
    let no_conn = headers(&[("upgrade", "websocket")]);
    assert!(!requested(&Method::GET, Version::HTTP_11, &no_conn));
    let two = headers(&[
        ("connection", "upgrade"),
        ("upgrade", "websocket"),
        ("upgrade", "h2c"),
    ]);
    assert!(!requested(&Method::GET, Version::HTTP_11, &two));
    let empty = headers(&[("connection", "upgrade"), ("upgrade", " ")]);
    assert!(!requested(&Method::GET, Version::HTTP_11, &empty));
}

#[test]
fn upgrade_headers_survive_stripping_for_an_upgrade_only() {
    let mut h = headers(&[
        ("connection", "Upgrade, x-hop"),
        ("upgrade", "websocket"),
        ("x-hop", "1"),
        ("keep-alive", "5"),
        ("sec-websocket-key", "k"),
    ]);
    strip_keeping_upgrade(&mut h);
    assert_eq!(h["upgrade"], "websocket");
    assert_eq!(h["connection"], "upgrade");
    assert!(!h.contains_key("x-hop") && !h.contains_key("keep-alive"));
    assert_eq!(h["sec-websocket-key"], "k");
}

#[test]
fn a_guard_held_after_close_is_dropped_at_once() {
    let t = Tunnel::new();
    let g = Arc::new(());
    t.hold(g.clone());
    assert_eq!(Arc::strong_count(&g), 2);
    t.close();
    assert!(t.is_closed());
    assert_eq!(Arc::strong_count(&g), 1);
    t.hold(g.clone());
    assert_eq!(Arc::strong_count(&g), 1);
}

#[tokio::test(start_paused = true)]
async fn idle_timeout_closes_both_sides_and_traffic_keeps_it_open() {
    let (client, mut client_peer) = tokio::io::duplex(64);
    let (upstream, mut upstream_peer) = tokio::io::duplex(64);
    let start = Instant::now();
    let tunnel = tokio::spawn(join(client, upstream, Some(Duration::from_secs(10))));
    // A byte every 9 s keeps it alive past 10 s.
    let mut b = [0u8; 1];
    for i in 0..3u8 {
        tokio::time::sleep(Duration::from_secs(9)).await;
        client_peer.write_all(&[i]).await.unwrap();
        upstream_peer.read_exact(&mut b).await.unwrap();
        assert_eq!(b[0], i);
    }
    upstream_peer.write_all(b"xy").await.unwrap();
    let mut two = [0u8; 2];
    client_peer.read_exact(&mut two).await.unwrap();
    let end = tunnel.await.unwrap();
    assert_eq!(end.reason, EndReason::Idle(Duration::from_secs(10)));
    assert_eq!((end.client_to_upstream, end.upstream_to_client), (3, 2));
    assert_eq!(start.elapsed(), Duration::from_secs(37));
    // Both sides closed: the peers read EOF.
    assert_eq!(client_peer.read(&mut b).await.unwrap(), 0);
    assert_eq!(upstream_peer.read(&mut b).await.unwrap(), 0);
}

#[tokio::test]
async fn both_sides_closing_ends_the_tunnel() {
    let (client, mut client_peer) = tokio::io::duplex(64);
    let (upstream, mut upstream_peer) = tokio::io::duplex(64);
    let tunnel = tokio::spawn(join(client, upstream, None));
    client_peer.write_all(b"abc").await.unwrap();
    client_peer.shutdown().await.unwrap();
    let mut got = Vec::new();
    upstream_peer.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"abc");
    upstream_peer.shutdown().await.unwrap();
    let end = tunnel.await.unwrap();
    assert_eq!(end.reason, EndReason::Closed);
    assert_eq!((end.client_to_upstream, end.upstream_to_client), (3, 0));
}
