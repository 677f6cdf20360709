//! The edge cache's disk tier (issue 15, "two tiers"): `TieredStore` = `MemoryStore` in
//! front of `DiskStore`. Over real sockets on 127.0.0.1: an entry survives a restart (a
//! new layer and store on the same folder answer without asking the origin); a torn or
//! corrupted file is a miss and is removed, never served; the disk stays within its byte
//! budget; `PURGE` reaches the disk too — by key, by prefix and by surrogate key, also
//! for entries only the disk holds (after a restart, or evicted from memory).

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{header, Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use tower::{service_fn, ServiceBuilder};
use tower_patterns::cache::{CacheLayer, DiskStore, MemoryStore, TieredStore};
use tower_patterns::proxy::ForwardBuilder;

const BODY_LEN: usize = 200 * 1024;

/// Each path's body: its name, then a pattern, `BODY_LEN` bytes in all.
fn body_of(path: &str) -> Bytes {
    let mut b = path.as_bytes().to_vec();
    b.extend((b.len()..BODY_LEN).map(|i| (i % 251) as u8));
    Bytes::from(b)
}

/// An origin of cacheable objects counting its requests.
async fn origin(count: Arc<AtomicU64>) -> SocketAddr {
    spawn_server(service_fn(move |req: Request<Incoming>| {
        let count = count.clone();
        async move {
            count.fetch_add(1, Ordering::SeqCst);
            let res = Response::builder()
                .header(header::CACHE_CONTROL, "public, max-age=3600")
                .header(header::ETAG, "\"v1\"");
            // `/vary`: one body per `Accept-Language`.
            let (res, body) = if req.uri().path() == "/vary" {
                let lang = req
                    .headers()
                    .get(header::ACCEPT_LANGUAGE)
                    .map(|v| v.as_bytes().to_vec())
                    .unwrap_or_default();
                let mut b = b"lang=".to_vec();
                b.extend(lang);
                (res.header(header::VARY, "accept-language"), Bytes::from(b))
            } else if let Some(tag) = req.uri().path().strip_prefix("/tag-") {
                // `/tag-red/1`: tagged `red` (a surrogate key) and `all`.
                let tag = tag.split('/').next().unwrap_or_default().to_owned();
                let res = res.header("surrogate-key", format!("{tag} all"));
                (res, body_of(req.uri().path()))
            } else {
                (res, body_of(req.uri().path()))
            };
            Ok::<_, Infallible>(res.body(Full::new(body)).unwrap())
        }
    }))
    .await
}

/// An edge process: a fresh memory tier and the disk tier in `dir`.
async fn edge(origin: SocketAddr, dir: &Path, disk_budget: u64) -> (SocketAddr, Arc<TieredStore>) {
    let disk = DiskStore::open(dir, disk_budget).unwrap();
    let store = Arc::new(TieredStore::new(MemoryStore::new(16 << 20), disk));
    let cache = CacheLayer::builder(store.clone())
        .purge_allowed(|_| true)
        .build();
    let fwd = ForwardBuilder::new(format!("http://{origin}"))
        .build::<Incoming>()
        .unwrap();
    let addr = spawn_server(ServiceBuilder::new().layer(cache).service(fwd)).await;
    (addr, store)
}

async fn until(what: &str, f: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// GET: (status, X-Cache, body).
async fn fetch(addr: SocketAddr, path: &str) -> (u16, String, Bytes) {
    let res = get(addr, path).await;
    let status = res.status().as_u16();
    let x = res
        .headers()
        .get("x-cache")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    (status, x, read_all(res).await.unwrap())
}

fn key(addr: SocketAddr, path: &str) -> String {
    format!("127.0.0.1:{}{path}", addr.port())
}

#[tokio::test]
async fn an_entry_survives_a_restart_without_an_origin_fetch() {
    let dir = tempfile::tempdir().unwrap();
    let count = Arc::new(AtomicU64::new(0));
    let origin = origin(count.clone()).await;

    let (first, store) = edge(origin, dir.path(), 64 << 20).await;
    let (status, x, body) = fetch(first, "/logo.png").await;
    assert_eq!((status, x.as_str()), (200, "MISS"));
    assert_eq!(body, body_of("/logo.png"));
    let k = key(first, "/logo.png");
    until("written to disk", || store.disk().contains(&k)).await;
    assert_eq!(count.load(Ordering::SeqCst), 1);

    // "Restart": a new store and layer on the same folder, with an empty memory tier. The
    // key holds the authority, so the new edge is asked with the old one's `Host`.
    let (second, store2) = edge(origin, dir.path(), 64 << 20).await;
    assert!(
        store2.disk().contains(&k),
        "the index was rebuilt from the folder"
    );
    assert!(!store2.memory().contains(&k));
    // 20 clients at once: every one a HIT, the file read once (concurrent loads share
    // the read; later ones find the promoted entry in memory).
    let host = format!("127.0.0.1:{}", first.port());
    let clients: Vec<_> = (0..20)
        .map(|_| {
            let host = host.clone();
            tokio::spawn(async move {
                let res = client()
                    .request(
                        Request::get(format!("http://{second}/logo.png"))
                            .header(header::HOST, host)
                            .body(http_body_util::Empty::new())
                            .unwrap(),
                    )
                    .await
                    .unwrap();
                assert_eq!(res.status(), 200);
                assert_eq!(res.headers()["x-cache"], "HIT");
                assert_eq!(res.headers()[header::ETAG], "\"v1\"");
                assert_eq!(read_all(res).await.unwrap(), body_of("/logo.png"));
            })
        })
        .collect();
    for c in clients {
        c.await.unwrap();
    }
    assert_eq!(
        count.load(Ordering::SeqCst),
        1,
        "the origin was asked again"
    );
    assert_eq!(store2.disk().stats().reads, 1);
    // Promoted: the next hit comes from memory.
    assert!(store2.memory().contains(&k));
}

#[tokio::test]
async fn a_corrupted_or_truncated_file_is_a_miss_and_is_removed() {
    let dir = tempfile::tempdir().unwrap();
    let count = Arc::new(AtomicU64::new(0));
    let origin = origin(count.clone()).await;
    let (addr, store) = edge(origin, dir.path(), 64 << 20).await;
    for p in ["/flipped", "/truncated"] {
        fetch(addr, p).await;
        let k = key(addr, p);
        until("written to disk", || store.disk().contains(&k)).await;
    }
    let flipped = store.disk().path_of(&key(addr, "/flipped"));
    let truncated = store.disk().path_of(&key(addr, "/truncated"));
    // One bit of the body flipped: the length still matches, only the checksum tells.
    let mut bytes = std::fs::read(&flipped).unwrap();
    let at = bytes.len() - 1000;
    bytes[at] ^= 0x01;
    std::fs::write(&flipped, &bytes).unwrap();
    // A torn write as a crash without the rename protocol would leave it.
    let len = std::fs::metadata(&truncated).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&truncated)
        .unwrap()
        .set_len(len / 2)
        .unwrap();

    // Restart: the truncated file is found at open (length check) and deleted.
    let (second, store2) = edge(origin, dir.path(), 64 << 20).await;
    assert!(!truncated.exists(), "a torn file stayed");
    assert!(!store2.disk().contains(&key(addr, "/truncated")));
    assert!(store2.disk().contains(&key(addr, "/flipped")));

    let host = format!("127.0.0.1:{}", addr.port());
    let before = count.load(Ordering::SeqCst);
    for p in ["/flipped", "/truncated"] {
        let res = client()
            .request(
                Request::get(format!("http://{second}{p}"))
                    .header(header::HOST, &host)
                    .body(http_body_util::Empty::new())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(
            res.headers()["x-cache"],
            "MISS",
            "{p} was served from a bad file"
        );
        assert_eq!(read_all(res).await.unwrap(), body_of(p));
    }
    assert_eq!(count.load(Ordering::SeqCst), before + 2);
    assert_eq!(
        store2.disk().stats().corrupt,
        1,
        "the checksum caught the flip"
    );
    // Both refilled with good files.
    for p in ["/flipped", "/truncated"] {
        let k = key(addr, p);
        until("rewritten", || store2.disk().contains(&k)).await;
    }
}

#[tokio::test]
async fn the_disk_stays_within_its_byte_budget() {
    let dir = tempfile::tempdir().unwrap();
    let count = Arc::new(AtomicU64::new(0));
    let origin = origin(count.clone()).await;
    // Room for four entries of ~200 KiB.
    let budget = 4 * (BODY_LEN as u64 + 1024);
    let (addr, store) = edge(origin, dir.path(), budget).await;
    for i in 0..12 {
        fetch(addr, &format!("/o{i}")).await;
        let k = key(addr, &format!("/o{i}"));
        until("written", || store.disk().contains(&k)).await;
        let s = store.disk().stats();
        assert!(s.used <= budget, "{s:?} over {budget}");
    }
    let s = store.disk().stats();
    assert_eq!(s.entries, 4);
    assert_eq!(s.evictions, 8);
    // The files themselves (evicted ones are deleted in the background).
    until("evicted files deleted", || {
        files_under(dir.path())
            .iter()
            .filter(|f| !f.starts_with("tmp"))
            .count()
            == 4
    })
    .await;
    let on_disk: u64 = walk(dir.path());
    assert!(on_disk <= budget, "{on_disk} bytes of files over {budget}");
    // The oldest were evicted; the newest are there.
    assert!(!store.disk().contains(&key(addr, "/o0")));
    assert!(store.disk().contains(&key(addr, "/o11")));
}

fn walk(dir: &Path) -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let m = e.metadata().unwrap();
        total += if m.is_dir() { walk(&e.path()) } else { m.len() };
    }
    total
}

#[tokio::test]
async fn purge_removes_the_entry_from_disk_too() {
    let dir = tempfile::tempdir().unwrap();
    let count = Arc::new(AtomicU64::new(0));
    let origin = origin(count.clone()).await;
    let (addr, store) = edge(origin, dir.path(), 64 << 20).await;
    fetch(addr, "/gone").await;
    let k = key(addr, "/gone");
    until("written", || store.disk().contains(&k)).await;
    let file = store.disk().path_of(&k);
    let res = client()
        .request(
            Request::builder()
                .method("PURGE")
                .uri(format!("http://{addr}/gone"))
                .body(http_body_util::Empty::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert!(!store.disk().contains(&k));
    until("file deleted", || !file.exists()).await;
    // A restarted edge does not bring it back.
    let (_second, store2) = edge(origin, dir.path(), 64 << 20).await;
    assert!(!store2.disk().contains(&k));
    let (_, x, _) = fetch(addr, "/gone").await;
    assert_eq!(x, "MISS");
}

#[tokio::test]
async fn vary_variants_come_back_from_disk_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let count = Arc::new(AtomicU64::new(0));
    let origin = origin(count.clone()).await;
    let (first, store) = edge(origin, dir.path(), 64 << 20).await;
    let host = format!("127.0.0.1:{}", first.port());
    let ask = |edge: SocketAddr, lang: &'static str| {
        let host = host.clone();
        async move {
            let res = client()
                .request(
                    Request::get(format!("http://{edge}/vary"))
                        .header(header::HOST, host)
                        .header(header::ACCEPT_LANGUAGE, lang)
                        .body(http_body_util::Empty::new())
                        .unwrap(),
                )
                .await
                .unwrap();
            let x = res.headers()["x-cache"].to_str().unwrap().to_owned();
            (x, read_all(res).await.unwrap())
        }
    };
    for lang in ["de", "fr"] {
        let (x, body) = ask(first, lang).await;
        assert_eq!(x, "MISS");
        assert_eq!(body, format!("lang={lang}"));
    }
    // The marker under the plain key and both variants.
    until("written", || store.disk().stats().entries == 3).await;
    let (second, _store2) = edge(origin, dir.path(), 64 << 20).await;
    // Two reads from disk for each (the marker, then the variant), each the right body.
    for lang in ["fr", "de"] {
        let (x, body) = ask(second, lang).await;
        assert_eq!(x, "HIT", "{lang}");
        assert_eq!(body, format!("lang={lang}"));
    }
    assert_eq!(count.load(Ordering::SeqCst), 2);
}

/// `method path` sent to `addr` as if to the edge whose key authority is `host`:
/// (status, X-Cache, body).
async fn send_as(
    addr: SocketAddr,
    host: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String, Bytes) {
    let mut req = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .header(header::HOST, host);
    for (n, v) in headers {
        req = req.header(*n, *v);
    }
    let res = client()
        .request(req.body(http_body_util::Empty::new()).unwrap())
        .await
        .unwrap();
    let status = res.status().as_u16();
    let x = res
        .headers()
        .get("x-cache")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    (status, x, read_all(res).await.unwrap())
}

/// Prefix and surrogate-key purges on a tiered store reach the entries only the disk
/// holds (here: after a restart, memory empty). Before, `TieredStore` could not
/// enumerate its entries and such a purge answered `501`; and once the tag index was
/// built, a tag purge looked its keys up in memory only and left disk-only entries to be
/// served again.
#[tokio::test]
async fn prefix_and_tag_purges_reach_entries_only_the_disk_holds() {
    let dir = tempfile::tempdir().unwrap();
    let count = Arc::new(AtomicU64::new(0));
    let origin = origin(count.clone()).await;
    let (first, store) = edge(origin, dir.path(), 64 << 20).await;
    let paths = [
        "/img/a",
        "/img/b",
        "/imgs",
        "/tag-red/1",
        "/tag-red/2",
        "/tag-blue/1",
        "/tag-green/1",
    ];
    for p in paths {
        assert_eq!(fetch(first, p).await.1, "MISS");
    }
    for p in paths {
        let k = key(first, p);
        until("written to disk", || store.disk().contains(&k)).await;
    }
    let host = format!("127.0.0.1:{}", first.port());
    // Restart: every entry is on disk only; `/img/b` is read back (memory and disk).
    let (addr, store) = edge(origin, dir.path(), 64 << 20).await;
    assert_eq!(send_as(addr, &host, "GET", "/img/b", &[]).await.1, "HIT");
    assert!(store.memory().contains(&key(first, "/img/b")));
    let files: Vec<_> = ["/img/a", "/img/b", "/tag-red/1"]
        .iter()
        .map(|p| store.disk().path_of(&key(first, p)))
        .collect();
    let before = count.load(Ordering::SeqCst);

    let (s, _, body) = send_as(addr, &host, "PURGE", "/img/*", &[]).await;
    assert_eq!(
        (s, String::from_utf8_lossy(&body)),
        (200, "purged 2\n".into())
    );
    // The first tag purge scans the store (the tag index starts incomplete) ...
    let (s, _, body) = send_as(addr, &host, "PURGE", "/", &[("surrogate-key", "red")]).await;
    assert_eq!(
        (s, String::from_utf8_lossy(&body)),
        (200, "purged 2\n".into())
    );
    // ... the next ones go through the index it built, which names disk-only keys.
    let (s, _, body) = send_as(addr, &host, "PURGE", "/", &[("cache-tag", "blue")]).await;
    assert_eq!(
        (s, String::from_utf8_lossy(&body)),
        (200, "purged 1\n".into())
    );
    for f in &files {
        until("file deleted", || !f.exists()).await;
    }
    for p in [
        "/img/a",
        "/img/b",
        "/tag-red/1",
        "/tag-red/2",
        "/tag-blue/1",
    ] {
        assert!(!store.disk().contains(&key(first, p)), "{p} still on disk");
    }
    // A third process on the folder does not bring them back; the rest is still there.
    let (third, _store3) = edge(origin, dir.path(), 64 << 20).await;
    for p in ["/imgs", "/tag-green/1"] {
        assert_eq!(send_as(third, &host, "GET", p, &[]).await.1, "HIT", "{p}");
    }
    assert_eq!(
        count.load(Ordering::SeqCst),
        before,
        "kept entries were refetched"
    );
    for p in [
        "/img/a",
        "/img/b",
        "/tag-red/1",
        "/tag-red/2",
        "/tag-blue/1",
    ] {
        assert_eq!(send_as(third, &host, "GET", p, &[]).await.1, "MISS", "{p}");
    }
    assert_eq!(count.load(Ordering::SeqCst), before + 5);
}
