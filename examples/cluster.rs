//! A cluster: one worker process per CPU behind a balancer, with crash recovery and a
//! zero-downtime rolling restart (seed 001: cluster, resilience, zero-downtime restart).
//!
//! ```text
//! cargo run --release --example cluster                          # 10 s load, random crashes
//! cargo run --release --example cluster -- --rolling-restart-at 4 # plus a rolling restart
//! kill -USR2 <supervisor pid>                                    # rolling restart by hand
//! ```
//!
//! Flags: `--duration SECS` (10), `--concurrency N` (200 clients, as `siege -c200 -t10s`),
//! `--workers N` (default: CPUs), `--rolling-restart-at SECS` (the supervisor sends itself
//! SIGUSR2 then), `--no-crash` (workers do not crash), `--proxy-workers N` (the balancer in
//! front runs thread-per-core on [`server::Workers`]: N threads, each with its own
//! listener, connection pool and balancer, all following one membership
//! ([`discover::Broadcast`]) and sharing passive health ([`SharedHealth`]); default: one
//! multi-thread runtime as before; `--workers` keeps meaning the app's worker processes).
//!
//! [`discover::Broadcast`]: tower_patterns::balance::discover::Broadcast
//! [`SharedHealth`]: tower_patterns::balance::SharedHealth
//!
//! [`server::Workers`]: tower_patterns::server::Workers
//!
//! | Node.js `cluster` (seed) | here |
//! |---|---|
//! | `cluster.fork()` per CPU | the supervisor re-executes its own binary with `--worker`; each worker binds an ephemeral port and prints it |
//! | master shares the listening socket | the supervisor runs a [`Balance`] of `Forward`s, one per worker, fed through a channel `Discover` |
//! | `setTimeout(() => { throw new Error('Ooops') }, ceil(random*3) s)` | each worker exits with status 1 after 1, 2 or 3 s |
//! | `cluster.on('exit')`: fork a new worker if it crashed | the supervisor removes it from the balancer and starts a new one |
//! | `SIGUSR2`: restart workers one at a time, the next when the new one is `listening` | the new worker is started first and added once its `/health` answers; then the old one is removed from the balancer and drained (its stdin is closed, it stops accepting, finishes in-flight requests, exits 0) |
//! | `siege -c200 -t10s` | 200 client tasks for 10 s; prints transactions, availability, failed transactions |
//!
//! Availability comes from the balancer: a request that hits a crashed worker (refused,
//! or reset mid-request) is retried on the next worker (GET is idempotent); a request that
//! finds no worker at all (both restarting) waits up to 2 s for one (`queue_timeout`).

use std::collections::HashMap;
use std::convert::Infallible;
use std::hash::{BuildHasher, Hasher};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::{ChildStdin, Command};
use tower::ServiceBuilder;
use tower_patterns::balance::discover::{self, Broadcast, DiscoverSender};
use tower_patterns::balance::{
    self, Balance, BalanceBuilder, PassiveHealth, ReplayLayer, Retry, SharedHealth,
};
use tower_patterns::body::ReplayBody;
use tower_patterns::proxy::{ErrorResponseLayer, Forward, ForwardBody, ForwardBuilder};
use tower_patterns::server::Workers;
use tower_patterns::BoxError;

fn random_u64() -> u64 {
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
}

// ---------------------------------------------------------------- worker

/// The seed's `app.js`: answers with its pid, crashes at random, drains on request.
async fn worker(crash: bool) -> Result<(), BoxError> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let pid = std::process::id();
    println!("PORT {port}");
    let body = Bytes::from(format!("Hello from worker {pid}\n"));
    let svc = tower::service_fn(move |req: Request<Incoming>| {
        let body = if req.uri().path() == "/health" {
            Bytes::from_static(b"ok\n")
        } else {
            body.clone()
        };
        async move { Ok::<_, Infallible>(Response::new(Full::new(body))) }
    });
    if crash {
        // setTimeout(() => { throw new Error('Ooops') }, Math.ceil(Math.random() * 3) * 1000)
        let secs = 1 + random_u64() % 3;
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(secs)).await;
            eprintln!("worker {pid}: Error: Ooops");
            std::process::exit(1);
        });
    }
    // The supervisor closes our stdin to ask for a graceful stop (no signal handling needed,
    // and a worker never outlives its supervisor).
    let drain = async {
        let mut stdin = tokio::io::stdin();
        let mut buf = [0u8; 64];
        while let Ok(n) = stdin.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    };
    tower_patterns::server::serve_with_shutdown(listener, svc, drain).await?;
    Ok(())
}

// ---------------------------------------------------------------- supervisor

struct Options {
    duration: Duration,
    concurrency: usize,
    workers: usize,
    rolling_restart_at: Option<Duration>,
    crash: bool,
    proxy_workers: Option<usize>,
}

type Fwd = Forward<ReplayBody<Incoming>>;
type Lb = Balance<u64, Fwd>;

/// Where membership changes go: the one balancer, or a [`Broadcast`] of worker URLs that
/// every per-core proxy worker follows (each makes its own `Forward` from the URL, so its
/// connections stay on its thread).
enum Members {
    One {
        tx: DiscoverSender<u64, Fwd>,
        forward: Fwd,
    },
    PerWorker(Broadcast<u64, String>),
}

impl Members {
    fn insert(&self, key: u64, url: &str) -> Result<(), BoxError> {
        match self {
            Members::One { tx, forward } => {
                let _ = tx.insert(key, forward.to(url)?);
            }
            Members::PerWorker(members) => members.insert(key, url.to_string()),
        }
        Ok(())
    }

    fn remove(&self, key: u64) {
        match self {
            Members::One { tx, .. } => {
                let _ = tx.remove(key);
            }
            Members::PerWorker(members) => {
                members.remove(&key);
            }
        }
    }
}

fn balancer() -> BalanceBuilder<u64> {
    Balance::builder()
        .retry(Retry::default().tries(4))
        .health(PassiveHealth::new(1, Duration::from_secs(2)))
        .queue_timeout(Duration::from_secs(2))
}

fn forward() -> Result<Fwd, BoxError> {
    Ok(ForwardBuilder::new("http://127.0.0.1:1")
        .connect_timeout(Duration::from_secs(1))
        .build::<ReplayBody<Incoming>>()?)
}

/// One per-core proxy worker: its own balancer and pool, following `members`, with
/// passive health shared with the other workers (a crashed app worker is ejected by all
/// proxy workers at its first failure, and tried again once, not once per proxy worker).
fn proxy_worker(
    members: &Broadcast<u64, String>,
    health: &SharedHealth<u64>,
    lbs: &Mutex<Vec<Lb>>,
) -> Result<
    impl tower::Service<
            Request<Incoming>,
            Response = Response<tower_patterns::proxy::ErrorResponseBody<ForwardBody>>,
            Error = Infallible,
            Future = impl Send,
        > + Clone
        + Send
        + 'static,
    BoxError,
> {
    let forward = forward()?;
    let disc = members.subscribe_map(move |key, url: &String| match forward.to(url) {
        Ok(f) => Some(f),
        Err(e) => {
            eprintln!("worker {key} at {url}: {e}");
            None
        }
    });
    let lb = balancer().shared_health(health).spawn(disc)?;
    lbs.lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(lb.clone());
    Ok(ServiceBuilder::new()
        .layer(ErrorResponseLayer)
        .layer(ReplayLayer::new(64 * 1024))
        .service(lb))
}

struct WorkerInfo {
    pid: u32,
    stdin: Option<ChildStdin>,
    retiring: bool,
}

struct Supervisor {
    exe: std::path::PathBuf,
    crash: bool,
    next_serial: AtomicU64,
    workers: Mutex<HashMap<u64, WorkerInfo>>,
    members: Members,
    health: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        Full<Bytes>,
    >,
    exits: tokio::sync::mpsc::UnboundedSender<(u64, std::process::ExitStatus)>,
    crashes: AtomicU64,
    stopping: AtomicBool,
}

impl Supervisor {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, WorkerInfo>> {
        self.workers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts a worker, waits for its port and a healthy `/health`, adds it to the balancer.
    async fn start_worker(self: &Arc<Self>) -> Result<u32, BoxError> {
        let serial = self.next_serial.fetch_add(1, Relaxed);
        let mut cmd = Command::new(&self.exe);
        cmd.arg("--worker");
        if !self.crash {
            cmd.arg("--no-crash");
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()?;
        let pid = child.id().unwrap_or(0);
        let stdout = child.stdout.take().ok_or("worker stdout")?;
        let mut line = String::new();
        let mut reader = BufReader::new(stdout);
        tokio::time::timeout(Duration::from_secs(5), reader.read_line(&mut line)).await??;
        let port: u16 = line
            .trim()
            .strip_prefix("PORT ")
            .ok_or_else(|| format!("worker said {line:?}"))?
            .parse()?;
        let url = format!("http://127.0.0.1:{port}");
        // Health check before it takes traffic.
        let mut healthy = false;
        for _ in 0..100 {
            let req = Request::get(format!("{url}/health")).body(Full::default())?;
            if let Ok(Ok(res)) =
                tokio::time::timeout(Duration::from_secs(1), self.health.request(req)).await
            {
                if res.status() == StatusCode::OK {
                    healthy = true;
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if !healthy {
            return Err(format!("worker {pid} never became healthy").into());
        }
        self.lock().insert(
            serial,
            WorkerInfo {
                pid,
                stdin: child.stdin.take(),
                retiring: false,
            },
        );
        self.members.insert(serial, &url)?;
        let exits = self.exits.clone();
        tokio::spawn(async move {
            let _keep_stdout_open = reader;
            if let Ok(status) = child.wait().await {
                let _ = exits.send((serial, status));
            }
        });
        println!("Started worker {pid} on port {port}");
        Ok(pid)
    }

    /// Keeps starting until one worker is up (a new worker may itself crash at once).
    async fn replace(self: &Arc<Self>) {
        for _ in 0..10 {
            match self.start_worker().await {
                Ok(_) => return,
                Err(e) => eprintln!("could not start a worker: {e}"),
            }
        }
    }

    fn on_exit(self: &Arc<Self>, serial: u64, status: std::process::ExitStatus) {
        self.members.remove(serial);
        let info = self.lock().remove(&serial);
        let Some(info) = info else { return };
        if info.retiring || self.stopping.load(Relaxed) {
            println!("Worker {} drained and exited ({status})", info.pid);
        } else {
            self.crashes.fetch_add(1, Relaxed);
            println!(
                "Worker {} crashed ({status}). Starting a new worker",
                info.pid
            );
            let me = self.clone();
            tokio::spawn(async move { me.replace().await });
        }
    }

    /// SIGUSR2: replace the workers one at a time, each only after the previous new one
    /// is healthy; drain the old one after it left the balancer.
    async fn rolling_restart(self: Arc<Self>) -> usize {
        println!("Restarting workers");
        let serials: Vec<u64> = {
            let mut s: Vec<u64> = self
                .lock()
                .iter()
                .filter(|(_, w)| !w.retiring)
                .map(|(k, _)| *k)
                .collect();
            s.sort_unstable();
            s
        };
        let mut replaced = 0;
        for serial in serials {
            let Some(old_pid) = self.lock().get(&serial).map(|w| w.pid) else {
                continue; // crashed meanwhile and already replaced
            };
            println!("Stopping worker: {old_pid}");
            if let Err(e) = self.start_worker().await {
                eprintln!("rolling restart: new worker failed: {e}; keeping {old_pid}");
                continue;
            }
            self.members.remove(serial);
            if let Some(w) = self.lock().get_mut(&serial) {
                w.retiring = true;
                w.stdin = None; // EOF: the worker drains and exits
            }
            replaced += 1;
        }
        println!("Rolling restart complete: {replaced} workers replaced");
        replaced
    }

    fn stop_all(&self) {
        self.stopping.store(true, Relaxed);
        for w in self.lock().values_mut() {
            w.retiring = true;
            w.stdin = None;
        }
    }
}

#[derive(Default)]
struct Stats {
    ok: AtomicU64,
    failed: AtomicU64,
    bytes: AtomicU64,
    micros: AtomicU64,
    longest_micros: AtomicU64,
}

async fn load(addr: std::net::SocketAddr, concurrency: usize, duration: Duration) -> Arc<Stats> {
    let stats = Arc::new(Stats::default());
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.set_nodelay(true);
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_max_idle_per_host(concurrency)
        .build::<_, Full<Bytes>>(http);
    let deadline = tokio::time::Instant::now() + duration;
    let uri: http::Uri = match format!("http://{addr}/").parse() {
        Ok(u) => u,
        Err(_) => return stats,
    };
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (client, stats, uri) = (client.clone(), stats.clone(), uri.clone());
        tasks.push(tokio::spawn(async move {
            while tokio::time::Instant::now() < deadline {
                let start = std::time::Instant::now();
                let Ok(req) = Request::get(uri.clone()).body(Full::default()) else {
                    break;
                };
                let ok = match client.request(req).await {
                    Ok(res) => {
                        let status = res.status();
                        match res.into_body().collect().await {
                            Ok(b) => {
                                stats.bytes.fetch_add(b.to_bytes().len() as u64, Relaxed);
                                status.is_success()
                            }
                            Err(_) => false,
                        }
                    }
                    Err(_) => false,
                };
                let us = start.elapsed().as_micros() as u64;
                stats.micros.fetch_add(us, Relaxed);
                stats.longest_micros.fetch_max(us, Relaxed);
                if ok {
                    stats.ok.fetch_add(1, Relaxed);
                } else {
                    stats.failed.fetch_add(1, Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    stats
}

fn parse_options() -> Result<Options, String> {
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    let mut o = Options {
        duration: Duration::from_secs(10),
        concurrency: 200,
        workers: cpus,
        rolling_restart_at: None,
        crash: true,
        proxy_workers: None,
    };
    let mut it = std::env::args().skip(1);
    let num = |v: Option<String>, flag: &str| -> Result<f64, String> {
        let v = v.ok_or(format!("{flag} needs a number"))?;
        v.parse::<f64>().map_err(|e| format!("{flag} {v}: {e}"))
    };
    while let Some(a) = it.next() {
        match a.as_str() {
            "--duration" => o.duration = Duration::from_secs_f64(num(it.next(), &a)?.max(0.1)),
            "--concurrency" => o.concurrency = num(it.next(), &a)?.max(1.0) as usize,
            "--workers" => o.workers = num(it.next(), &a)?.max(1.0) as usize,
            "--rolling-restart-at" => {
                o.rolling_restart_at = Some(Duration::from_secs_f64(num(it.next(), &a)?.max(0.0)))
            }
            "--no-crash" => o.crash = false,
            "--proxy-workers" => o.proxy_workers = Some(num(it.next(), &a)?.max(1.0) as usize),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(o)
}

async fn supervise(o: Options) -> Result<(), BoxError> {
    // The balancers whose endpoint stats are printed at the end.
    let lbs: Arc<Mutex<Vec<Lb>>> = Arc::default();
    let mut per_core = None;
    let proxy_addr: std::net::SocketAddr;
    let members = match o.proxy_workers {
        None => {
            let (tx, disc) = discover::channel();
            let lb = balancer().spawn(disc)?;
            lbs.lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(lb.clone());
            let proxy = ServiceBuilder::new()
                .layer(ErrorResponseLayer)
                .layer(ReplayLayer::new(64 * 1024))
                .service(lb);
            let server = tower_patterns::server::spawn_local(proxy).await?;
            proxy_addr = server.addr();
            Members::One {
                tx,
                forward: forward()?,
            }
        }
        Some(n) => {
            // One membership feed and one health table for all proxy workers.
            let members = Broadcast::new();
            let health = SharedHealth::new();
            let (lbs2, members2) = (lbs.clone(), members.clone());
            let handle = Workers::new(n).spawn(
                "127.0.0.1:0".parse()?,
                move |_: tower_patterns::server::WorkerId| {
                    proxy_worker(&members2, &health, &lbs2)
                        .expect("a balancer and a pool for this worker")
                },
            )?;
            proxy_addr = handle.local_addr();
            per_core = Some(handle);
            Members::PerWorker(members)
        }
    };
    let (exit_tx, mut exit_rx) = tokio::sync::mpsc::unbounded_channel();
    let sup = Arc::new(Supervisor {
        exe: std::env::current_exe()?,
        crash: o.crash,
        next_serial: AtomicU64::new(0),
        workers: Mutex::new(HashMap::new()),
        members,
        health: balance::client::http_client(),
        exits: exit_tx,
        crashes: AtomicU64::new(0),
        stopping: AtomicBool::new(false),
    });
    println!("Clustering to {} cpus", o.workers);
    for _ in 0..o.workers {
        sup.start_worker().await?;
    }

    let addr = proxy_addr;
    println!(
        "Balancer on http://{addr}{}; supervisor pid {} (kill -USR2 it for a rolling restart)",
        o.proxy_workers
            .map(|n| format!(" ({n} per-core proxy workers)"))
            .unwrap_or_default(),
        std::process::id()
    );
    println!(
        "Load: {} concurrent clients for {:?}",
        o.concurrency, o.duration
    );

    let mut usr2 = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined2())?;
    if let Some(at) = o.rolling_restart_at {
        let pid = std::process::id().to_string();
        tokio::spawn(async move {
            tokio::time::sleep(at).await;
            println!("-- sending SIGUSR2 to {pid} --");
            let _ = Command::new("kill").args(["-USR2", &pid]).status().await;
        });
    }
    let load = tokio::spawn(load(addr, o.concurrency, o.duration));
    tokio::pin!(load);
    let mut restarts = Vec::new();
    let stats = loop {
        tokio::select! {
            Some((serial, status)) = exit_rx.recv() => sup.on_exit(serial, status),
            Some(()) = usr2.recv() => restarts.push(tokio::spawn(sup.clone().rolling_restart())),
            res = &mut load => break res?,
        }
    };
    let mut replaced = 0;
    for r in restarts {
        replaced += r.await.unwrap_or(0);
    }
    sup.stop_all();

    let ok = stats.ok.load(Relaxed);
    let failed = stats.failed.load(Relaxed);
    let total = ok + failed;
    let secs = o.duration.as_secs_f64();
    let avg = stats.micros.load(Relaxed) as f64 / total.max(1) as f64 / 1e6;
    println!();
    println!("Transactions:              {total:>10} hits");
    println!(
        "Availability:              {:>10.2} %",
        if total == 0 {
            0.0
        } else {
            ok as f64 * 100.0 / total as f64
        }
    );
    println!("Elapsed time:              {secs:>10.2} secs");
    println!(
        "Data transferred:          {:>10.2} MB",
        stats.bytes.load(Relaxed) as f64 / 1e6
    );
    println!("Response time:             {avg:>10.4} secs");
    println!(
        "Transaction rate:          {:>10.2} trans/sec",
        total as f64 / secs
    );
    println!("Successful transactions:   {ok:>10}");
    println!("Failed transactions:       {failed:>10}");
    println!(
        "Longest transaction:       {:>10.2} secs",
        stats.longest_micros.load(Relaxed) as f64 / 1e6
    );
    println!(
        "Worker crashes:            {:>10} (each replaced)",
        sup.crashes.load(Relaxed)
    );
    println!("Workers rolled (SIGUSR2):  {replaced:>10}");
    for (i, lb) in lbs
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .enumerate()
    {
        if o.proxy_workers.is_some() {
            println!("  proxy worker {i}:");
        }
        for e in lb.endpoints() {
            println!(
                "  worker #{:<3} {:?}: {} requests, {} failures",
                e.key, e.state, e.requests, e.failures
            );
        }
    }
    // Let the drained workers exit before we do (kill_on_drop covers the rest).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while !sup.lock().is_empty() && tokio::time::Instant::now() < deadline {
        tokio::select! {
            Some((serial, status)) = exit_rx.recv() => sup.on_exit(serial, status),
            () = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }
    if let Some(handle) = per_core {
        handle.shutdown_and_wait().await?;
    }
    Ok(())
}

fn main() -> Result<(), BoxError> {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--worker") {
        let crash = !args.iter().any(|a| a == "--no-crash");
        // One thread per worker: the seed's single-threaded Node process.
        return tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(worker(crash));
    }
    let o = parse_options()?;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(supervise(o))
}
