//! `ObjectStoreSink` against a real S3 server: `s3s-fs`, started here on a free port with a
//! temporary directory. Install it with
//! `cargo install --locked s3s-fs@0.14.1 --features binary` (or point `S3S_FS` at it).

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{header, Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};

use tokio::net::TcpStream;
use tower::{service_fn, ServiceBuilder};
use tower_patterns::backup::{BackupOutcome, ObjectStoreSink, TeeLayer};
use tower_patterns::body::boxed;
use tower_patterns::body::tee::AbortReason;
use tower_patterns::proxy::ForwardBuilder;

fn s3s_fs_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("S3S_FS") {
        return PathBuf::from(p);
    }
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("s3s-fs"))
                .collect()
        })
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("HOME") {
        candidates.push(PathBuf::from(home).join(".cargo/bin/s3s-fs"));
    }
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "s3s-fs not found (PATH, ~/.cargo/bin, $S3S_FS): install it with \
             `cargo install --locked s3s-fs@0.14.1 --features binary`"
            )
        })
}

struct S3 {
    _child: tokio::process::Child,
    _dir: tempfile::TempDir,
    store: Arc<dyn ObjectStore>,
}

async fn start_s3() -> S3 {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("backup")).unwrap();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let child = tokio::process::Command::new(s3s_fs_binary())
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--access-key", "AK", "--secret-key", "SK"])
        .arg(dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("failed to start s3s-fs");
    // Ready when it accepts connections (usually within 50 ms).
    let mut ready = false;
    for _ in 0..200 {
        if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(ready, "s3s-fs did not start listening on port {port}");
    let store = AmazonS3Builder::new()
        .with_endpoint(format!("http://127.0.0.1:{port}"))
        .with_allow_http(true)
        .with_virtual_hosted_style_request(false)
        .with_region("us-east-1")
        .with_bucket_name("backup")
        .with_access_key_id("AK")
        .with_secret_access_key("SK")
        .build()
        .unwrap();
    S3 {
        _child: child,
        _dir: dir,
        store: Arc::new(store),
    }
}

async fn origin() -> SocketAddr {
    spawn_server(service_fn(|req: Request<Incoming>| async move {
        let path = req.uri().path().to_owned();
        let res = if let Some(n) = path.strip_prefix("/big/") {
            let n: u64 = n.parse().unwrap();
            Response::builder()
                .header(header::CONTENT_LENGTH, n)
                .body(pattern_body(n))
                .unwrap()
        } else {
            Response::new(boxed(Full::new(Bytes::from(format!("content of {path}")))))
        };
        Ok::<_, Infallible>(res)
    }))
    .await
}

async fn edge(origin: SocketAddr, layer: TeeLayer) -> SocketAddr {
    let fwd = ForwardBuilder::new(format!("http://{origin}"))
        .build::<Incoming>()
        .unwrap();
    spawn_server(ServiceBuilder::new().layer(layer).service(fwd)).await
}

#[tokio::test]
async fn object_store_sink_against_s3s_fs() {
    let s3 = start_s3().await;
    let sink = ObjectStoreSink::new(s3.store.clone())
        .prefix("edge")
        .unwrap()
        .part_size(5 << 20);
    // The loopback origin is faster than any upload: give the sink room for the body.
    let layer = TeeLayer::builder().sink(sink).buffer(32 << 20).build();
    let mut events = Events::new(layer.subscribe());
    let edge = edge(origin().await, layer.clone()).await;

    // Small, known length: one PUT.
    let body = read_all(get(edge, "/docs/small.txt").await).await.unwrap();
    let ev = events.wait("docs/small.txt", "object-store").await;
    assert!(
        matches!(ev.outcome, BackupOutcome::Committed { .. }),
        "{:?}",
        ev.outcome
    );
    let stored = s3
        .store
        .get(&Path::from("edge/docs/small.txt"))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(stored, body);

    // 12 MiB: a multipart upload of three 5 MiB parts, streamed.
    let size: u64 = 12 << 20;
    let key = format!("big/{size}");
    let body = read_all(get(edge, &format!("/{key}")).await).await.unwrap();
    assert_eq!(body.len() as u64, size);
    let ev = events.wait(&key, "object-store").await;
    assert!(
        matches!(ev.outcome, BackupOutcome::Committed { bytes } if bytes == size),
        "{:?}",
        ev.outcome
    );
    let stored = s3
        .store
        .get(&Path::from(format!("edge/{key}")))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let mut check = PatternCheck::default();
    check.feed(&stored);
    assert_eq!(check.offset, size);
    assert!(check.ok);
    assert_eq!(layer.stats().snapshot().committed, 2);
}

#[tokio::test]
async fn object_store_sink_never_stores_a_truncated_body() {
    let s3 = start_s3().await;
    // A buffer larger than what is sent: the abort must come from the truncation, not
    // from the sink falling behind the loopback origin.
    let layer = TeeLayer::builder()
        .sink(ObjectStoreSink::new(s3.store.clone()).part_size(5 << 20))
        .buffer(64 << 20)
        .build();
    let mut events = Events::new(layer.subscribe());
    // Small (single PUT path) and large (multipart path, two parts already uploaded).
    for (declared, sent, key) in [
        (100_000u64, 50_000usize, "small.bin"),
        (20 << 20, 12 << 20, "large.bin"),
    ] {
        let edge = edge(truncating_origin(declared, sent).await, layer.clone()).await;
        get_expecting_truncation(edge, &format!("/{key}")).await;
        let ev = events.wait(key, "object-store").await;
        assert!(
            matches!(ev.outcome, BackupOutcome::Aborted(AbortReason::Upstream)),
            "{key}: {:?}",
            ev.outcome
        );
        let err = s3.store.head(&Path::from(key)).await.unwrap_err();
        assert!(
            matches!(err, object_store::Error::NotFound { .. }),
            "{key}: {err}"
        );
    }
}

#[tokio::test]
async fn object_store_sink_if_absent_keeps_the_first_copy() {
    let s3 = start_s3().await;
    s3.store
        .put(
            &Path::from("page.html"),
            Bytes::from_static(b"already here").into(),
        )
        .await
        .unwrap();
    let layer = TeeLayer::new(ObjectStoreSink::new(s3.store.clone()).if_absent(true));
    let mut events = Events::new(layer.subscribe());
    let edge = edge(origin().await, layer).await;
    read_all(get(edge, "/page.html").await).await.unwrap();
    let ev = events.wait("page.html", "object-store").await;
    assert!(
        matches!(ev.outcome, BackupOutcome::Committed { .. }),
        "{:?}",
        ev.outcome
    );
    let stored = s3
        .store
        .get(&Path::from("page.html"))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(stored, "already here");
}

/// Issue 10 item 4: an S3 endpoint that accepts connections and never answers (what a
/// black-holed S3 does while `object_store` waits and retries). Small objects are single
/// `PUT`s whose writer keeps every chunk until the `PUT` succeeds: those bytes count in the
/// sink's budget (`SinkWriter::held_bytes`), so copies past it are aborted instead of
/// piling up, and every client still gets its whole body.
#[tokio::test]
async fn object_store_sink_with_a_hung_s3_holds_at_most_its_budget() {
    const OBJECT: u64 = 100 * 1024;
    const BUDGET: u64 = 2 << 20;
    // Accepts and keeps every connection, never reads or answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    let store = AmazonS3Builder::new()
        .with_endpoint(format!("http://127.0.0.1:{port}"))
        .with_allow_http(true)
        .with_virtual_hosted_style_request(false)
        .with_region("us-east-1")
        .with_bucket_name("backup")
        .with_access_key_id("AK")
        .with_secret_access_key("SK")
        .build()
        .unwrap();
    let layer = TeeLayer::builder()
        .sink(ObjectStoreSink::new(Arc::new(store)))
        .sink_budget(BUDGET)
        .build();
    let stats = layer.stats().clone();
    let edge = edge(origin().await, layer.clone()).await;

    let mut clients = Vec::new();
    for c in 0..8 {
        clients.push(tokio::spawn(async move {
            for i in 0..20 {
                let res = get(edge, &format!("/big/{OBJECT}?{c}-{i}")).await;
                let body = read_all(res).await.unwrap();
                assert_eq!(body.len() as u64, OBJECT);
            }
        }));
    }
    for c in clients {
        c.await.unwrap();
    }
    // All 160 copies started; the hung PUTs hold at most the budget, the rest are aborted
    // (their sink tasks may still be catching up: bounded wait).
    for _ in 0..5000 {
        if stats.snapshot().tee.budget_aborts >= 130 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let peak = layer.sink_budget_peaks()[0];
    assert!(peak <= BUDGET, "held {peak} > {BUDGET}");
    assert!(
        peak >= BUDGET - OBJECT,
        "the hung PUTs should fill the budget: {peak}"
    );
    let snap = stats.snapshot();
    assert_eq!(snap.committed, 0);
    assert!(snap.tee.budget_aborts >= 130, "{snap:?}");
}
