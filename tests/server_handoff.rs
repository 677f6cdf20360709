//! Restarts of `server::Workers` by passing the listening sockets (issue 12, HAProxy's
//! `-x`), over real sockets on 127.0.0.1 and a real unix socket: no failed request across a
//! restart under load, a connection queued before the restart is answered by the new
//! process, worker counts that differ, and peers that fail the exchange get typed errors
//! (wrong hello, wrong version, a path that is not a socket, wrong address, timeouts).
#![cfg(target_os = "linux")]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use tokio::sync::Semaphore;
use tower_patterns::server::{HandoffError, Inherited, Server, Workers, WorkersHandle};

mod workers_support;

use workers_support::{exchange_once, get_once, tagged, until, LOCAL};

const LIMIT: Duration = Duration::from_secs(10);

/// A fresh directory for the handoff socket (removed with the guard).
fn socket_dir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("handoff.sock");
    (dir, path)
}

/// [`Inherited::receive`] off the runtime (it blocks on the unix socket).
async fn receive(path: &Path, addr: SocketAddr) -> Result<Inherited, HandoffError> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || Inherited::receive(path, addr))
        .await
        .unwrap()
}

/// Waits (off the runtime) until `handle`'s workers have stopped, at most [`LIMIT`]:
/// after a handoff they stop by themselves, nobody calls `shutdown`.
async fn stops_by_itself(handle: WorkersHandle) {
    let joined = tokio::task::spawn_blocking(move || handle.join());
    tokio::time::timeout(LIMIT, joined)
        .await
        .expect("the old workers stopped by themselves after the handoff")
        .unwrap()
        .unwrap();
}

/// The instance being replaced: `workers` workers answering `old ...`, serving its
/// sockets on `path`.
fn old_instance(path: &Path, workers: usize) -> WorkersHandle {
    Workers::new(workers)
        .handoff_socket(path)
        .spawn(LOCAL.parse().unwrap(), |id| tagged("old", id))
        .unwrap()
}

/// The tag of the body `<tag> <worker> <thread>`.
fn tag(body: &str) -> String {
    body.split(' ').next().unwrap_or("").to_string()
}

#[tokio::test]
async fn a_restart_passing_the_sockets_fails_no_request_under_load() {
    let (_dir, path) = socket_dir();
    let old = old_instance(&path, 2);
    let addr = old.local_addr();
    let stop = Arc::new(AtomicBool::new(false));
    let served: Arc<Mutex<BTreeMap<String, usize>>> = Arc::default();
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let phase = Arc::new(AtomicUsize::new(0));
    // Four clients keep sending, each request on a fresh connection: connections are in
    // the accept queues at every moment of the restart.
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (stop, served, failures) = (stop.clone(), served.clone(), failures.clone());
        let phase = phase.clone();
        clients.push(tokio::spawn(async move {
            while !stop.load(SeqCst) {
                let at = phase.load(SeqCst);
                match get_once(addr, LIMIT).await {
                    Ok((200, body)) => *served.lock().unwrap().entry(tag(&body)).or_default() += 1,
                    Ok((status, body)) => failures
                        .lock()
                        .unwrap()
                        .push(format!("phase {at}: {status} {body}")),
                    Err(e) => failures.lock().unwrap().push(format!("phase {at}: {e}")),
                }
            }
        }));
    }
    let count = |tag: &str| served.lock().unwrap().get(tag).copied().unwrap_or(0);
    until("the old server to serve", LIMIT, || count("old") >= 100).await;

    // The new process receives the sockets, serves them, and the old one drains alone.
    let inherited = receive(&path, addr).await.unwrap();
    assert_eq!(inherited.sockets(), 2);
    let new = Workers::new(2)
        .inherit(inherited)
        .handoff_socket(&path)
        .spawn(addr, |id| tagged("new", id))
        .unwrap();
    phase.store(1, SeqCst);
    assert_eq!(new.local_addr(), addr);
    stops_by_itself(old).await;
    phase.store(2, SeqCst);
    let after = count("new");
    until("the new server to serve alone", LIMIT, || {
        count("new") >= after + 200
    })
    .await;

    // And once more: the new process hands the same sockets on through the same path.
    let newer = Workers::new(2)
        .inherit(receive(&path, addr).await.unwrap())
        .spawn(addr, |id| tagged("newer", id))
        .unwrap();
    phase.store(3, SeqCst);
    stops_by_itself(new).await;
    phase.store(4, SeqCst);
    until("the third server to serve alone", LIMIT, || {
        count("newer") >= 200
    })
    .await;
    stop.store(true, SeqCst);
    for c in clients {
        c.await.unwrap();
    }
    let failures = failures.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "{} failed: {failures:?}",
        failures.len()
    );
    newer.shutdown_and_wait().await.unwrap();
}

/// Holds every request until `gate` gets a permit; counts requests that arrived.
fn gated(
    gate: Arc<Semaphore>,
    arrived: Arc<AtomicUsize>,
) -> impl tower::Service<
    Request<Incoming>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl Send,
> + Clone
       + Send
       + 'static {
    tower::service_fn(move |_req: Request<Incoming>| {
        let (gate, arrived) = (gate.clone(), arrived.clone());
        async move {
            arrived.fetch_add(1, SeqCst);
            let _permit = gate.acquire().await;
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from("old held"))))
        }
    })
}

#[tokio::test]
async fn a_connection_queued_before_the_restart_is_answered_by_the_new_process() {
    let (_dir, path) = socket_dir();
    let gate = Arc::new(Semaphore::new(0));
    let arrived = Arc::new(AtomicUsize::new(0));
    let (g, a) = (gate.clone(), arrived.clone());
    // One connection at a time: while it is held, the old worker does not accept.
    let old = Workers::new(1)
        .server(Server::builder().max_connections(1))
        .handoff_socket(&path)
        .spawn(LOCAL.parse().unwrap(), move |_| gated(g.clone(), a.clone()))
        .unwrap();
    let addr = old.local_addr();
    let mut held = tokio::net::TcpStream::connect(addr).await.unwrap();
    let held_answer = tokio::spawn(async move { exchange_once(&mut held, LIMIT).await });
    until("the first request to be held", LIMIT, || {
        arrived.load(SeqCst) == 1
    })
    .await;
    // Completed by the kernel, waiting in the accept queue the old worker does not serve.
    let mut queued = tokio::net::TcpStream::connect(addr).await.unwrap();

    let new = Workers::new(1)
        .inherit(receive(&path, addr).await.unwrap())
        .spawn(addr, |id| tagged("new", id))
        .unwrap();
    let (status, body) = exchange_once(&mut queued, LIMIT).await.unwrap();
    assert_eq!((status, tag(&body).as_str()), (200, "new"), "{body}");
    assert_eq!(arrived.load(SeqCst), 1, "the old process never saw it");

    // The old process still finishes what it had in flight.
    gate.add_permits(1);
    let (status, body) = held_answer.await.unwrap().unwrap();
    assert_eq!((status, body.as_str()), (200, "old held"));
    stops_by_itself(old).await;
    new.shutdown_and_wait().await.unwrap();
}

/// `n` requests on fresh connections, all answered with `tag`; the other workers' tags
/// seen.
async fn all_answered_by(addr: SocketAddr, n: usize, want: &str) -> BTreeMap<String, usize> {
    let mut workers = BTreeMap::new();
    for _ in 0..n {
        let (status, body) = get_once(addr, LIMIT).await.unwrap();
        assert_eq!((status, tag(&body).as_str()), (200, want), "{body}");
        let worker = body.split(' ').nth(1).unwrap_or("").to_string();
        *workers.entry(worker).or_default() += 1;
    }
    workers
}

#[tokio::test]
async fn more_workers_add_sockets_to_the_inherited_group() {
    let (_dir, path) = socket_dir();
    let old = old_instance(&path, 2);
    let addr = old.local_addr();
    let new = Workers::new(3)
        .inherit(receive(&path, addr).await.unwrap())
        .balance_connections(false)
        .spawn(addr, |id| tagged("new", id))
        .unwrap();
    assert_eq!(new.workers(), 3);
    stops_by_itself(old).await;
    // Three sockets in the group, spread by the kernel's hash: with 120 connections each
    // gets some unless one is left out ((2/3)^120 ~ 1e-21).
    let workers = all_answered_by(addr, 120, "new").await;
    assert_eq!(workers.len(), 3, "{workers:?}");
    new.shutdown_and_wait().await.unwrap();
}

#[tokio::test]
async fn fewer_workers_still_serve_every_inherited_socket() {
    let (_dir, path) = socket_dir();
    let old = old_instance(&path, 3);
    let addr = old.local_addr();
    let inherited = receive(&path, addr).await.unwrap();
    assert_eq!(inherited.sockets(), 3);
    let new = Workers::new(1)
        .inherit(inherited)
        .spawn(addr, |id| tagged("new", id))
        .unwrap();
    assert_eq!(new.workers(), 1);
    stops_by_itself(old).await;
    // The kernel keeps hashing over all three sockets: a socket nobody accepted from
    // would leave about a third of these connections unanswered.
    all_answered_by(addr, 120, "new").await;
    new.shutdown_and_wait().await.unwrap();
}

#[tokio::test]
async fn a_path_that_is_not_a_socket_is_refused_on_both_sides() {
    let (_dir, path) = socket_dir();
    std::fs::write(&path, b"not a socket").unwrap();
    let e = Inherited::receive(&path, "127.0.0.1:1".parse().unwrap()).unwrap_err();
    assert!(
        matches!(&e, HandoffError::NotASocket(p) if *p == path),
        "{e:?}"
    );
    let e = Workers::new(1)
        .handoff_socket(&path)
        .spawn(LOCAL.parse().unwrap(), |id| tagged("x", id))
        .unwrap_err();
    let inner = e.get_ref().and_then(|e| e.downcast_ref::<HandoffError>());
    assert!(matches!(inner, Some(HandoffError::NotASocket(_))), "{e:?}");
    assert_eq!(std::fs::read(&path).unwrap(), b"not a socket", "left alone");
}

#[tokio::test]
async fn no_peer_means_a_first_start() {
    let (_dir, path) = socket_dir();
    let addr = "127.0.0.1:1".parse().unwrap();
    let e = Inherited::receive(&path, addr).unwrap_err();
    assert!(matches!(e, HandoffError::NoPeer { .. }), "{e:?}");
    // A socket file left by a process that is gone.
    drop(UnixListener::bind(&path).unwrap());
    let e = Inherited::receive(&path, addr).unwrap_err();
    assert!(matches!(e, HandoffError::NoPeer { .. }), "{e:?}");
}

#[tokio::test]
async fn the_handoff_socket_is_private_and_removed_on_shutdown() {
    use std::os::unix::fs::PermissionsExt;
    let (_dir, path) = socket_dir();
    let old = old_instance(&path, 1);
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    old.shutdown_and_wait().await.unwrap();
    assert!(!path.exists(), "removed with the server it belonged to");
}

/// A unix socket at `path` that answers each connection with `reply` (after reading 8
/// bytes), or says nothing with `None`, on a thread.
fn fake_peer(path: &Path, reply: Option<Vec<u8>>) -> std::thread::JoinHandle<()> {
    let listener = UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut hello = [0u8; 8];
        let _ = s.read_exact(&mut hello);
        match reply {
            Some(reply) => {
                let _ = s.write_all(&reply);
            }
            // Silent until the client gives up and closes.
            None => {
                let _ = s.read(&mut [0u8; 1]);
            }
        }
    })
}

#[tokio::test]
async fn a_peer_that_is_not_a_handoff_server_is_a_typed_error() {
    let (_dir, path) = socket_dir();
    let peer = fake_peer(&path, Some(b"HTTP/1.1 400 Bad Request\r\n\r\n".to_vec()));
    let e = Inherited::receive(&path, "127.0.0.1:1".parse().unwrap()).unwrap_err();
    assert!(matches!(e, HandoffError::WrongPeer), "{e:?}");
    peer.join().unwrap();
}

#[tokio::test]
async fn another_protocol_version_is_a_typed_error() {
    let (_dir, path) = socket_dir();
    let peer = fake_peer(
        &path,
        Some(b"TPHO\x00\x02\x00\x00\x00\x00\x00\x01".to_vec()),
    );
    let e = Inherited::receive(&path, "127.0.0.1:1".parse().unwrap()).unwrap_err();
    assert!(
        matches!(e, HandoffError::Version { ours: 1, theirs: 2 }),
        "{e:?}"
    );
    peer.join().unwrap();
}

#[tokio::test]
async fn a_silent_peer_times_out() {
    let (_dir, path) = socket_dir();
    let peer = fake_peer(&path, None);
    let limit = Duration::from_millis(200);
    let started = Instant::now();
    let e = Inherited::receive_timeout(&path, "127.0.0.1:1".parse().unwrap(), limit).unwrap_err();
    assert!(matches!(e, HandoffError::Timeout(t) if t == limit), "{e:?}");
    assert!(started.elapsed() < LIMIT);
    peer.join().unwrap();
}

#[tokio::test]
async fn the_old_process_refuses_bad_peers_and_keeps_serving() {
    let (_dir, path) = socket_dir();
    let old = Workers::new(1)
        .handoff_socket(&path)
        .handoff_timeout(Duration::from_millis(200))
        .spawn(LOCAL.parse().unwrap(), |id| tagged("old", id))
        .unwrap();
    let addr = old.local_addr();
    // A wrong hello: closed without a byte in reply.
    let mut wrong = UnixStream::connect(&path).unwrap();
    wrong.set_read_timeout(Some(LIMIT)).unwrap();
    // Exactly a hello's length: nothing left unread, so the close reads as an end.
    wrong.write_all(b"GET / HT").unwrap();
    let mut rest = Vec::new();
    wrong.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "{rest:?}");
    // Another version: the server's hello, then nothing.
    let mut other = UnixStream::connect(&path).unwrap();
    other.set_read_timeout(Some(LIMIT)).unwrap();
    other.write_all(b"TPHO\x00\x02\x00\x00").unwrap();
    let mut reply = Vec::new();
    other.read_to_end(&mut reply).unwrap();
    assert_eq!(&reply[..8], b"TPHO\x00\x01\x00\x00");
    assert_eq!(reply.len(), 12, "the hello and the count, no socket");
    // A peer that says nothing is given up after the server's timeout.
    let silent = UnixStream::connect(&path).unwrap();
    // A peer asking for another address gets a typed error; the old process still
    // serves alone.
    let wrong_port = SocketAddr::new(addr.ip(), addr.port().wrapping_add(1).max(1));
    let e = receive(&path, wrong_port).await.unwrap_err();
    assert!(
        matches!(e, HandoffError::AddressMismatch { wanted, got } if wanted == wrong_port && got == addr),
        "{e:?}"
    );
    drop(silent);
    let (status, body) = get_once(addr, LIMIT).await.unwrap();
    assert_eq!((status, tag(&body).as_str()), (200, "old"));

    // A well-formed handoff still works, and `spawn` checks its own address too.
    let inherited = receive(&path, addr).await.unwrap();
    let e = Workers::new(1)
        .inherit(inherited)
        .spawn(wrong_port, |id| tagged("new", id))
        .unwrap_err();
    let inner = e.get_ref().and_then(|e| e.downcast_ref::<HandoffError>());
    assert!(
        matches!(inner, Some(HandoffError::AddressMismatch { .. })),
        "{e:?}"
    );
    let (status, body) = get_once(addr, LIMIT).await.unwrap();
    assert_eq!((status, tag(&body).as_str()), (200, "old"), "still serving");
    old.shutdown_and_wait().await.unwrap();
}
