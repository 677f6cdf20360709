//! The M2 backup pipe (seed 000) with an edge cache (seed 004), all on 127.0.0.1.
//!
//! ```text
//! client ─▶ edge: CacheLayer ─▶ storage first ──404──▶ TeeLayer ─▶ outside origin
//!                     ▲              (a dir over HTTP)      │
//!                     └──── cache fill ◀── tee ── FsSink ◀──┘ (backup into the dir)
//! ```
//!
//! "Storage first, outside on 404" is the content chain (`chain::LinkLayer`, STON's
//! `<VhostLink Condition="404">`): the backup pipe is configured like a link.
//!
//! Run: `cargo run --example backup_pipe`
//!
//! With a real outside origin instead of the local one (HTTPS needs the `tls` feature;
//! certificates are verified against the webpki roots):
//! `ORIGIN_URL=https://www.rust-lang.org ORIGIN_PATH=/static/images/rust-logo-blk.svg
//! cargo run --example backup_pipe --features tls` — steps 0–3 then use `ORIGIN_PATH`
//! (default `/robots.txt`), and the back-fill steps, which need the local catalogue, are
//! skipped. `ORIGIN_CA=ca.pem` trusts that CA instead (a private origin).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use tower::{service_fn, ServiceBuilder, ServiceExt};
use tower_patterns::backup::{backfill, BackupOutcome, FsSink, TeeLayer};
use tower_patterns::body::{boxed, ReplayBody};
use tower_patterns::cache::{CacheLayer, MemoryStore, Store};
use tower_patterns::chain::{ChainLayer, LinkLayer};
use tower_patterns::proxy::{ErrorResponseLayer, ForwardBody, ForwardBuilder};
use tower_patterns::server::spawn_local;
use tower_patterns::BoxError;

const VIDEO_SIZE: usize = 3 << 20;

/// The main storage: files of a directory over HTTP, 404 when missing.
async fn storage_server(root: PathBuf) -> std::io::Result<SocketAddr> {
    spawn_local(service_fn(move |req: Request<Incoming>| {
        let root = root.clone();
        async move {
            let key = req.uri().path().trim_start_matches('/').to_owned();
            // Only plain relative keys; the tee wrote them, the same rules apply.
            let ok = tower_patterns::backup::ObjectKey::new(&key).is_ok();
            let res = match (ok, tokio::fs::read(root.join(&key)).await) {
                (true, Ok(data)) => Response::builder()
                    .header("x-served-by", "storage")
                    .header(header::CACHE_CONTROL, "max-age=300")
                    .body(Full::new(Bytes::from(data))),
                _ => Response::builder()
                    .status(StatusCode::NOT_FOUND)
                    .header("x-served-by", "storage")
                    .body(Full::new(Bytes::from_static(b"not in storage\n"))),
            };
            Ok::<_, Infallible>(res.unwrap())
        }
    }))
    .await
    .map(|server| server.addr())
}

/// The outside origin: a catalogue the storage does not have yet.
async fn outside_server(hits: Arc<AtomicU64>) -> std::io::Result<SocketAddr> {
    spawn_local(service_fn(move |req: Request<Incoming>| {
        let hits = hits.clone();
        async move {
            hits.fetch_add(1, Ordering::SeqCst);
            let body = match req.uri().path() {
                "/video/intro.mp4" => Some(Bytes::from(vec![7u8; VIDEO_SIZE])),
                p @ ("/docs/a.txt" | "/docs/b.txt" | "/docs/c.txt" | "/img/logo.png") => {
                    Some(Bytes::from(format!("outside content of {p}\n")))
                }
                _ => None,
            };
            let res = match body {
                Some(b) => Response::builder()
                    .header("x-served-by", "outside")
                    .header(header::CACHE_CONTROL, "max-age=300")
                    .body(Full::new(b)),
                None => Response::builder()
                    .status(StatusCode::NOT_FOUND)
                    .body(Full::new(Bytes::new())),
            };
            Ok::<_, Infallible>(res.unwrap())
        }
    }))
    .await
    .map(|server| server.addr())
}

/// The builder for the outside origin; with the `tls` feature, `ORIGIN_CA` (a PEM file)
/// names the CA to trust instead of the webpki roots (a private origin).
fn origin_builder(url: &str) -> Result<ForwardBuilder, BoxError> {
    let builder = ForwardBuilder::new(url);
    #[cfg(feature = "tls")]
    if let Ok(path) = std::env::var("ORIGIN_CA") {
        let pem = std::fs::read(path)?;
        let tls = tower_patterns::tls::ClientTls::builder()
            .ca_pem(&pem)?
            .build()?;
        return Ok(builder.tls(tls));
    }
    Ok(builder)
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let dir = tempfile::tempdir()?;
    let root = dir.path().to_path_buf();
    std::fs::write(root.join("index.html"), "home page, already in storage\n")?;
    let outside_hits = Arc::new(AtomicU64::new(0));
    let storage = storage_server(root.clone()).await?;
    // A real origin from the environment, or the local catalogue.
    let external = std::env::var("ORIGIN_URL").ok();
    let outside = match &external {
        Some(url) => url.trim_end_matches('/').to_string(),
        None => format!("http://{}", outside_server(outside_hits.clone()).await?),
    };
    let video: String = match &external {
        Some(_) => std::env::var("ORIGIN_PATH").unwrap_or_else(|_| "/robots.txt".into()),
        None => "/video/intro.mp4".into(),
    };
    println!("storage  http://{storage}  (dir {})", root.display());
    println!("outside  {outside}");

    // The backup pipe: what comes from outside is copied into the storage directory.
    let tee = TeeLayer::builder()
        .sink(FsSink::new(&root))
        .buffer(8 << 20)
        .build();
    let mut backups = tee.subscribe();
    let to_storage =
        ForwardBuilder::new(format!("http://{storage}")).build::<ReplayBody<Incoming>>()?;
    // The outside origin gets its own name as `Host` (a CDN or S3 routes by it), not the
    // edge's address the client used.
    let to_outside = ServiceBuilder::new()
        .map_response(|res: Response<_>| res.map(boxed))
        .layer(tee.clone())
        .service(
            origin_builder(&outside)?
                .preserve_host(false)
                .build::<ReplayBody<Incoming>>()?,
        );

    // Storage first; on 404 the outside link, through the tee (the content chain).
    let chain = ServiceBuilder::new()
        .layer(ErrorResponseLayer)
        .layer(ChainLayer::new())
        .layer(LinkLayer::new("404".parse()?, to_outside).names("storage", "outside"))
        .map_response(|res: Response<ForwardBody>| res.map(boxed))
        .service(to_storage);
    // PURGE is refused unless configured: here, with a token header.
    let cache = CacheLayer::builder(MemoryStore::new(64 << 20))
        .purge_token(
            http::HeaderName::from_static("x-purge-token"),
            "example-token",
        )
        .build();
    let edge = spawn_local(ServiceBuilder::new().layer(cache.clone()).service(chain))
        .await?
        .addr();
    println!("edge     http://{edge}\n");
    // Cache keys hold the authority the client asked for (here the edge's address).
    let key = |path: &str| format!("{edge}{path}");

    let client = ForwardBuilder::new(format!("http://{edge}")).build::<Empty<Bytes>>()?;
    let fetch = |path: &str| {
        let client = client.clone();
        let path = path.to_string();
        async move {
            let res = client
                .oneshot(Request::get(path.as_str()).body(Empty::new())?)
                .await?;
            let (status, h) = (res.status(), res.headers().clone());
            let len = res.into_body().collect().await?.to_bytes().len();
            let get = |n: &str| {
                h.get(n)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("-")
                    .to_owned()
            };
            println!(
                "  GET {path:<18} -> {} {:>8} bytes  served-by={:<8} x-cache={:<5} age={}",
                status.as_u16(),
                len,
                get("x-served-by"),
                get("x-cache"),
                get("age")
            );
            Ok::<_, BoxError>(())
        }
    };
    println!("0. content already in storage is served by storage");
    fetch("/index.html").await?;

    println!(
        "1. first request for outside content: streamed from outside, teed into storage and cache"
    );
    fetch(&video).await?;
    let video_key = video.trim_start_matches('/');
    match wait_backup(&mut backups, video_key).await? {
        BackupOutcome::Committed { bytes } => println!(
            "  backup committed: {} ({bytes} bytes), peak buffered {} bytes",
            root.join(video_key).display(),
            tee.stats().snapshot().tee.peak_buffered
        ),
        other => println!("  backup not committed: {other:?}"),
    }
    let cached = cache.store().get(&key(&video)).is_some();
    println!("  in edge cache: {cached}");

    println!("2. PURGE the edge cache, then the second request is served from storage");
    let purge = client
        .clone()
        .oneshot(
            Request::builder()
                .method("PURGE")
                .uri(video.as_str())
                .header("x-purge-token", "example-token")
                .body(Empty::new())?,
        )
        .await?;
    println!("  PURGE {video} -> {}", purge.status().as_u16());
    let before = outside_hits.load(Ordering::SeqCst);
    fetch(&video).await?;
    println!(
        "  outside requests during step 2: {}",
        outside_hits.load(Ordering::SeqCst) - before
    );

    println!("3. and the third from the edge cache");
    for _ in 0..100 {
        if cache.store().get(&key(&video)).is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    fetch(&video).await?;
    if external.is_some() {
        // The back-fill below asks for the local catalogue's keys.
        return Ok(());
    }

    println!("4. back-fill what nobody asked for yet (concurrency 2)");
    let keys = [
        "docs/a.txt",
        "docs/b.txt",
        "docs/c.txt",
        "img/logo.png",
        "docs/gone.txt",
    ];
    let report = backfill(client.clone(), keys, 2).await;
    println!("  report: {report}");
    for key in &report.done {
        println!("    done   {key}");
    }
    for (key, err) in &report.failed {
        println!("    failed {key}: {err}");
    }
    let mut pending: Vec<String> = report.done.iter().map(|k| k.to_string()).collect();
    while !pending.is_empty() {
        let ev = tokio::time::timeout(Duration::from_secs(30), backups.recv()).await??;
        pending.retain(|k| k != ev.key.as_str());
        println!("    backup {}: {:?}", ev.key, ev.outcome);
    }
    let mut files: Vec<String> = Vec::new();
    for entry in walk(&root) {
        files.push(entry.strip_prefix(&root)?.display().to_string());
    }
    files.sort();
    println!("  storage now holds: {}", files.join(", "));

    println!("5. back-filled keys are now in storage (purged from the cache to show it)");
    cache.purge(&key("/docs/b.txt"));
    let before = outside_hits.load(Ordering::SeqCst);
    fetch("/docs/b.txt").await?;
    println!(
        "  outside requests during step 5: {}",
        outside_hits.load(Ordering::SeqCst) - before
    );
    let s = tee.stats().snapshot();
    let c = cache.stats().snapshot();
    println!(
        "\nbackup: {} committed ({} bytes), {} aborted, {} sink errors; cache: {} hits, {} misses, {} fills, {} purges",
        s.committed, s.committed_bytes, s.aborted, s.sink_errors, c.hits, c.misses, c.fills, c.purges
    );
    Ok(())
}

/// Waits for the backup outcome of `key`.
async fn wait_backup(
    rx: &mut tokio::sync::broadcast::Receiver<tower_patterns::backup::BackupEvent>,
    key: &str,
) -> Result<BackupOutcome, BoxError> {
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(30), rx.recv()).await??;
        if ev.key.as_str() == key {
            return Ok(ev.outcome);
        }
    }
}

fn walk(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}
