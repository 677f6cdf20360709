//! nginx `upstream` in Rust: a reverse proxy balancing round robin over four local instances.
//!
//! ```text
//! cargo run --release --example reverse_proxy              # demo: prints who answered, exits
//! cargo run --release --example reverse_proxy -- --serve --listen 127.0.0.1:8080 \
//!     --backends http://127.0.0.1:8081,http://127.0.0.1:8082   # runs until killed (benchmarks)
//! ```
//!
//! Flags: `--listen ADDR` (default 127.0.0.1:0), `--backends URL,URL,..` (default: four
//! instances started in-process), `--serve` (run until killed), `--threads N` (tokio
//! workers, default: CPUs), `--no-retry` (tries = 1: no request copy per request),
//! `--direct` (with `--serve`: the first backend through `Forward` alone, no balancer — the
//! baseline that shows what the balancer costs).
//!
//! `--workers N` (with `--serve` and `--backends`): thread-per-core instead of one tokio
//! runtime — N threads, each with its own current-thread runtime, `SO_REUSEPORT` listener,
//! upstream connection pool and balancer ([`server::Workers`]; like N nginx worker
//! processes with an upstream `zone`: each worker round-robins on its own, passive health
//! is shared through one [`SharedHealth`], so a dead backend is ejected by all workers at
//! its first failure and tried once, not once per worker). `SIGTERM`/Ctrl-C
//! drains every worker. `--handoff PATH` (Linux): restart without a failed request by
//! passing the listening sockets — start every instance with the same `--handoff PATH`
//! and `--listen`; a new instance takes the sockets of the one serving PATH (if any),
//! which then drains and exits by itself, and serves PATH for the next restart.
//! `--take-over N`: for setups that cannot pass sockets, bind next to a running instance
//! with N workers on the same `--listen` port and take its new connections (start the new
//! one, then `SIGTERM` the old one; see `Workers::take_over` for its window).
//! `--no-balance`: leave the spreading of connections over the workers to the kernel's
//! hash (by default a worker hands a new connection to a less-loaded one; see
//! `Workers::balance_connections`).
//!
//! `--gateway` (with `--serve`; needs `--features metrics,auth,rate-limit`): the API
//! gateway of issue 14 in front of `Forward` (`--direct`) or the balancer, with or without
//! `--workers`: a route rate limit (GCRA, `--rate-limit N` requests per second with a burst
//! of N, default 1,000,000: high, for benchmarks; beyond it `429` + `Retry-After`), an API
//! key (`x-api-key`, scope `proxy`; the key from `--api-key KEY` or the environment
//! variable `GATEWAY_API_KEY`, otherwise one is generated and printed at start-up; `401`
//! without it), `RequestTraceLayer` (`traceparent` and `x-request-id` reach the backend),
//! `MetricsLayer` with the Prometheus recorder (`GET /metrics`, with the key; scrapes are
//! not counted as proxied requests), a `BulkheadLayer` (`--bulkhead N` calls at once,
//! default 1024, `503` beyond) and a circuit breaker. One instance of each is shared by all
//! workers. The access-log events go to stderr when `RUST_LOG` is set (e.g.
//! `RUST_LOG=tower_patterns::access=info`). `scripts/bench-proxy.sh` with `GATEWAY=1`
//! measures its CPU per request against `--direct` alone.
//!
//! ```text
//! cargo run --release --features metrics,auth,rate-limit --example reverse_proxy -- \
//!     --serve --direct --gateway --api-key secret-key --listen 127.0.0.1:8080 \
//!     --backends http://127.0.0.1:8081
//! curl -i http://127.0.0.1:8080/                                  # 401
//! curl -i -H 'x-api-key: secret-key' http://127.0.0.1:8080/        # proxied
//! curl -H 'x-api-key: secret-key' http://127.0.0.1:8080/metrics    # Prometheus text
//! ```
//!
//! `--tls-cert PEM --tls-key PEM` (with `--serve`; needs `--features tls`): HTTPS on
//! `--listen` instead of plain HTTP — ALPN offers `h2` and `http/1.1`, plain-text h2c
//! prior knowledge is served too without TLS. The files are checked at start-up (a missing
//! file or a key that does not match the certificate stops it with a clear error) and
//! re-read when they change (checked every 30 s), without a restart: new connections get
//! the new certificate. The environment variables `TLS_CERT`/`TLS_KEY` do the same.
//!
//! ```text
//! openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 \
//!     -subj /CN=localhost -keyout key.pem -out cert.pem
//! cargo run --release --features tls --example reverse_proxy -- --serve --workers 2 \
//!     --listen 127.0.0.1:8443 --backends http://127.0.0.1:8081 --tls-cert cert.pem --tls-key key.pem
//! curl -k https://127.0.0.1:8443/
//! ```
//!
//! [`server::Workers`]: tower_patterns::server::Workers
//! [`SharedHealth`]: tower_patterns::balance::SharedHealth
//!
//! The seed's nginx configuration, and what this example builds instead:
//! ```text
//! upstream nodejs_design_patterns_app {          Balance::builder()               (round robin)
//!   server 127.0.0.1:8081; ... (four)              .build_static([(name, Forward::to(url)), ..])
//! }
//! location / { proxy_pass http://...; }        server::serve(listener, Replay(balance))
//! ```

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use tower::{Layer, ServiceBuilder};
use tower_patterns::balance::Replay;
use tower_patterns::balance::{self, Balance, ReplayLayer, Retry, SharedHealth};
use tower_patterns::body::ReplayBody;
use tower_patterns::proxy::{
    ErrorResponse, ErrorResponseBody, ErrorResponseLayer, Forward, ForwardBuilder,
};
use tower_patterns::server::Workers;
use tower_patterns::BoxError;

#[path = "common/flags.rs"]
mod flags;
#[cfg(all(feature = "metrics", feature = "auth", feature = "rate-limit"))]
#[path = "common/gateway.rs"]
mod gateway;
#[cfg(all(feature = "metrics", feature = "auth", feature = "rate-limit"))]
#[path = "common/prometheus.rs"]
mod prometheus;
#[path = "common/proxy_args.rs"]
mod proxy_args;
#[path = "common/workers.rs"]
mod workers;
use proxy_args::{parse_args, Args, GatewayConfig};

/// `--gateway` in a build without the features its layers need.
#[cfg(not(all(feature = "metrics", feature = "auth", feature = "rate-limit")))]
mod gateway {
    use tower_patterns::proxy::ErrorResponse;
    use tower_patterns::BoxError;

    pub struct Gateway;

    impl Gateway {
        pub fn new(_cfg: &super::GatewayConfig) -> Result<Self, BoxError> {
            Err("--gateway: built without its features (--features metrics,auth,rate-limit)".into())
        }

        /// Never called: `new` fails.
        pub fn wrap<S>(&self, upstream: S) -> ErrorResponse<S> {
            ErrorResponse::new(upstream)
        }
    }
}

/// The TLS listener of `--tls-cert`/`--tls-key`, watching its files for renewals.
#[cfg(feature = "tls")]
fn tls_acceptor(
    files: &(String, String),
) -> Result<
    (
        tower_patterns::tls::ServerTls,
        tower_patterns::tls::FileWatch,
    ),
    BoxError,
> {
    let tls = tower_patterns::tls::ServerTls::from_pem_files(&files.0, &files.1)?;
    let watch = tls.watch_files(std::time::Duration::from_secs(30));
    Ok((tls, watch))
}

#[cfg(not(feature = "tls"))]
fn tls_acceptor(
    _files: &(String, String),
) -> Result<(tower_patterns::server::PlainTcp, ()), BoxError> {
    Err("--tls-cert/--tls-key: built without the `tls` feature (--features tls)".into())
}

fn main() -> Result<(), BoxError> {
    let args = parse_args()?;
    if std::env::var_os("RUST_LOG").is_some() {
        // The access log of `--gateway` (target `tower_patterns::access`) and the rest.
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
    if let Some(gw) = args.gateway.as_ref().filter(|gw| gw.generated_key) {
        println!(
            "gateway API key (generated; send it in x-api-key): {}",
            gw.api_key
        );
    }
    if let Some(workers) = args.workers {
        if !args.serve || args.backends.is_empty() {
            return Err("--workers needs --serve and --backends".into());
        }
        return serve_per_core(&args, workers);
    }
    tower_patterns::server::runtime(args.threads)?.block_on(run(args))
}

/// `X-Forwarded-Proto: https` behind our TLS listener (an HTTP/1.1 request line does not
/// carry the scheme); otherwise `Forward`'s default.
fn behind(builder: ForwardBuilder, proto: &'static str) -> ForwardBuilder {
    if proto == "https" {
        builder.forwarded_proto(proto)
    } else {
        builder
    }
}

const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// `--direct`: the first backend through `Forward` alone (no replay layer either: the
/// single-upstream baseline, like `reverse_proxy_min`).
fn direct_forward(url: &str, proto: &'static str) -> Result<Forward<Incoming>, BoxError> {
    Ok(behind(ForwardBuilder::new(url), proto)
        .connect_timeout(CONNECT_TIMEOUT)
        .build::<Incoming>()?)
}

/// The balanced upstream of one worker: its own `Forward`s (so its own keep-alive pool, on
/// its own thread) behind its own balancer, requests buffered for a retry. `health` is
/// shared by every worker's balancer; the backend list is static and the same in every
/// worker, so no membership feed is needed.
fn balanced(
    health: &SharedHealth<String>,
    backends: &[String],
    retry: bool,
    proto: &'static str,
) -> Result<Replay<Lb>, BoxError> {
    // One head timeout per try, not two: `Forward`'s own response timeout set to the
    // balancer's per-try default, and the balancer's timer off. A timeout is still a
    // failure that health counts and retry acts on; each timer costs ~650 instructions
    // per request (registration in Tokio's timer wheel and its removal).
    let first = behind(ForwardBuilder::new(backends[0].as_str()), proto)
        .connect_timeout(CONNECT_TIMEOUT)
        .response_timeout(balance::DEFAULT_TRY_TIMEOUT)
        .build::<ReplayBody<Incoming>>()?;
    let mut endpoints = Vec::new();
    for url in backends {
        endpoints.push((url.clone(), first.to(url)?));
    }
    let retry = if retry {
        Retry::default()
    } else {
        Retry::never()
    };
    let lb = Balance::builder()
        .retry(retry)
        .try_timeout(None)
        .shared_health(health)
        .build_static(endpoints);
    Ok(ReplayLayer::new(64 * 1024).layer(lb))
}

const VALIDATED: &str = "validated before the workers started";

/// `--workers N`: thread-per-core serving until SIGTERM/Ctrl-C, then a drain.
fn serve_per_core(args: &Args, workers: usize) -> Result<(), BoxError> {
    // Built once here so a bad URL is an error before any worker starts; the workers'
    // own builds of the same URLs then cannot fail.
    let proto = if args.tls.is_some() { "https" } else { "http" };
    let health = SharedHealth::new();
    direct_forward(&args.backends[0], proto)?;
    balanced(&health, &args.backends, args.retry, proto)?;
    let (backends, retry) = (args.backends.clone(), args.retry);
    // One closure per shape, each monomorphised: the bare baselines carry no branch for
    // the gateway, and the gateway's stack is its own type.
    match (&args.gateway, args.direct) {
        (None, true) => spawn_workers(args, workers, move |_| {
            ErrorResponse::new(direct_forward(&backends[0], proto).expect(VALIDATED))
        }),
        (None, false) => spawn_workers(args, workers, move |_| {
            ErrorResponse::new(balanced(&health, &backends, retry, proto).expect(VALIDATED))
        }),
        (Some(cfg), true) => {
            let gw = gateway::Gateway::new(cfg)?;
            spawn_workers(args, workers, move |_| {
                gw.wrap(direct_forward(&backends[0], proto).expect(VALIDATED))
            })
        }
        (Some(cfg), false) => {
            let gw = gateway::Gateway::new(cfg)?;
            spawn_workers(args, workers, move |_| {
                gw.wrap(balanced(&health, &backends, retry, proto).expect(VALIDATED))
            })
        }
    }
}

/// A proxy stack as the servers take it (`server::serve`, `Workers::spawn`): one clone per
/// connection, moved to the connection's task.
trait Stack<B>:
    tower::Service<
        Request<Incoming>,
        Response = Response<B>,
        Future: Send + 'static,
        Error: Into<BoxError>,
    > + Clone
    + Send
    + 'static
{
}

impl<S, B> Stack<B> for S
where
    S: tower::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
{
}

/// The body of a [`Stack`]'s answers.
trait Reply: http_body::Body<Data: Send, Error: Into<BoxError>> + Send + 'static {}

impl<B: http_body::Body<Data: Send, Error: Into<BoxError>> + Send + 'static> Reply for B {}

/// Starts the workers with `make` building each one's stack, then serves until stopped.
fn spawn_workers<F, S, B>(args: &Args, workers: usize, make: F) -> Result<(), BoxError>
where
    F: Fn(tower_patterns::server::WorkerId) -> S + Send + Sync + 'static,
    S: Stack<B>,
    B: Reply,
{
    let mut builder = Workers::new(workers).balance_connections(args.balance);
    if let Some(previous) = args.take_over {
        builder = builder.take_over(previous);
    }
    #[cfg(target_os = "linux")]
    if let Some(path) = &args.handoff {
        use tower_patterns::server::{HandoffError, Inherited};
        match Inherited::receive(path, args.listen) {
            Ok(inherited) => {
                println!(
                    "took over {} listening sockets on {} from the running instance",
                    inherited.sockets(),
                    inherited.local_addr()
                );
                builder = builder.inherit(inherited);
            }
            // Nobody serves the path: a first start, on fresh sockets.
            Err(HandoffError::NoPeer { .. }) => {}
            Err(e) => return Err(format!("--handoff {}: {e}", path.display()).into()),
        }
        builder = builder.handoff_socket(path);
    }
    let (handle, _watch) = match &args.tls {
        None => (builder.spawn(args.listen, make)?, None),
        Some(files) => {
            let (tls, watch) = tls_acceptor(files)?;
            (builder.acceptor(tls).spawn(args.listen, make)?, Some(watch))
        }
    };
    println!(
        "reverse proxy on {}://{} -> {} backends, {workers} workers{}{}",
        if args.tls.is_some() { "https" } else { "http" },
        handle.local_addr(),
        args.backends.len(),
        if args.direct {
            " (Forward alone)"
        } else {
            ", round robin"
        },
        if args.gateway.is_some() {
            ", API gateway stack"
        } else {
            ""
        }
    );
    workers::serve_until_stopped(handle)
}

/// Serves `svc` on `listener` until killed, over TLS with `--tls-cert`/`--tls-key`.
async fn serve_until_killed<S, B>(
    listener: tokio::net::TcpListener,
    tls: &Option<(String, String)>,
    svc: S,
) -> Result<(), BoxError>
where
    S: Stack<B>,
    B: Reply,
{
    match tls {
        None => tower_patterns::server::serve(listener, svc).await?,
        Some(files) => {
            let (tls, _watch) = tls_acceptor(files)?;
            tower_patterns::server::Server::builder()
                .serve_with_acceptor(listener, tls, svc, std::future::pending())
                .await?
        }
    }
    Ok(())
}

/// One instance of the application: answers which instance it is.
async fn instance(n: usize, hits: Arc<AtomicUsize>) -> std::io::Result<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let body = Bytes::from(format!("Hello from instance {n} ({addr})\n"));
    let svc = tower::service_fn(move |_req: Request<Incoming>| {
        hits.fetch_add(1, Relaxed);
        let body = body.clone();
        async move { Ok::<_, Infallible>(Response::new(Full::new(body))) }
    });
    tokio::spawn(tower_patterns::server::serve(listener, svc));
    Ok(format!("http://{addr}"))
}

type Lb = Balance<String, tower_patterns::proxy::Forward<ReplayBody<Incoming>>>;
type ProxyBody = ErrorResponseBody<tower_patterns::proxy::ForwardBody>;

/// The proxy stack. Buffer bodies so requests can go to the next instance; map errors to
/// 502/503/504 without boxing the body.
fn proxy_service(
    lb: Lb,
) -> impl tower::Service<
    Request<Incoming>,
    Response = Response<ProxyBody>,
    Error = Infallible,
    Future = impl Send,
> + Clone
       + Send
       + 'static {
    ServiceBuilder::new()
        .layer(ErrorResponseLayer)
        .layer(ReplayLayer::new(64 * 1024))
        .service(lb)
}

async fn run(args: Args) -> Result<(), BoxError> {
    // The application instances (the seed's four `forever start app.js` on 8081..8084).
    let mut hits = Vec::new();
    let backends = if args.backends.is_empty() {
        let mut urls = Vec::new();
        for n in 1..=4 {
            let h = Arc::new(AtomicUsize::new(0));
            urls.push(instance(n, h.clone()).await?);
            hits.push(h);
        }
        urls
    } else {
        args.backends.clone()
    };

    // One Forward per endpoint, all sharing one keep-alive pool.
    // Behind our own TLS listener the client's scheme is https (an HTTP/1.1 request line
    // does not say so).
    let proto = if args.tls.is_some() { "https" } else { "http" };
    // One head timeout per try, as in `balanced`: Forward's, the balancer's timer off.
    let first = behind(ForwardBuilder::new(backends[0].as_str()), proto)
        .connect_timeout(CONNECT_TIMEOUT)
        .response_timeout(balance::DEFAULT_TRY_TIMEOUT)
        .build::<ReplayBody<Incoming>>()?;
    let mut endpoints = Vec::new();
    for url in &backends {
        endpoints.push((url.clone(), first.to(url)?));
    }
    let retry = if args.retry {
        Retry::default()
    } else {
        Retry::never()
    };
    let lb = Balance::builder()
        .retry(retry)
        .try_timeout(None)
        .build_static(endpoints);

    let proxy = proxy_service(lb.clone());

    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    let addr = listener.local_addr()?;
    if args.serve {
        println!(
            "reverse proxy on {proto}://{addr} -> {} instances, {}{}",
            backends.len(),
            if args.direct {
                "the first through Forward alone"
            } else {
                "round robin"
            },
            if args.gateway.is_some() {
                ", API gateway stack"
            } else {
                ""
            }
        );
        return match (&args.gateway, args.direct) {
            // Baseline for benchmarks: the first backend through Forward alone, no balancer.
            (None, true) => {
                let direct = ErrorResponse::new(direct_forward(&backends[0], proto)?);
                serve_until_killed(listener, &args.tls, direct).await
            }
            (None, false) => serve_until_killed(listener, &args.tls, proxy).await,
            (Some(cfg), true) => {
                let gw = gateway::Gateway::new(cfg)?;
                let upstream = direct_forward(&backends[0], proto)?;
                serve_until_killed(listener, &args.tls, gw.wrap(upstream)).await
            }
            (Some(cfg), false) => {
                let gw = gateway::Gateway::new(cfg)?;
                let upstream = ReplayLayer::new(64 * 1024).layer(lb.clone());
                serve_until_killed(listener, &args.tls, gw.wrap(upstream)).await
            }
        };
    }
    println!(
        "reverse proxy on http://{addr} -> {} instances, round robin",
        backends.len()
    );
    tokio::spawn(tower_patterns::server::serve(listener, proxy));

    let client = balance::client::http_client::<Full<Bytes>>();
    let get = |client: &hyper_util::client::legacy::Client<_, Full<Bytes>>| {
        let req = Request::get(format!("http://{addr}/"))
            .body(Full::default())
            .map_err(BoxError::from);
        let client = client.clone();
        async move {
            let res = client.request(req?).await?;
            let status = res.status();
            let body = res.into_body().collect().await?.to_bytes();
            Ok::<_, BoxError>((status, String::from_utf8_lossy(&body).trim().to_string()))
        }
    };
    for i in 1..=8 {
        let (status, body) = get(&client).await?;
        println!("request {i}: {status} {body}");
    }
    if !hits.is_empty() {
        // Take instance 3 away by pointing its endpoint at a closed port: requests that
        // pick it are retried on the next instance (connect error, nothing was sent).
        println!("-- instance 3 goes down (connection refused) --");
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let dead = format!("http://{}", closed.local_addr()?);
        drop(closed);
        let lb2 = Balance::builder().build_static(
            backends
                .iter()
                .enumerate()
                .map(|(i, u)| {
                    let url = if i == 2 { dead.as_str() } else { u.as_str() };
                    first.to(url).map(|f| (url.to_string(), f))
                })
                .collect::<Result<Vec<_>, _>>()?,
        );
        let proxy2 = proxy_service(lb2.clone());
        let l2 = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr2 = l2.local_addr()?;
        tokio::spawn(tower_patterns::server::serve(l2, proxy2));
        for i in 1..=8 {
            let req = Request::get(format!("http://{addr2}/")).body(Full::default())?;
            let res = client.request(req).await?;
            let status = res.status();
            let body = res.into_body().collect().await?.to_bytes();
            println!(
                "request {i}: {status} {}",
                String::from_utf8_lossy(&body).trim()
            );
        }
        for e in lb2.endpoints() {
            println!(
                "  endpoint {:<24} state {:?} requests {} failures {}",
                e.key, e.state, e.requests, e.failures
            );
        }
        let counts: Vec<usize> = hits.iter().map(|h| h.load(Relaxed)).collect();
        println!("requests served per instance: {counts:?}");
    }
    let _ = lb;
    Ok(())
}
