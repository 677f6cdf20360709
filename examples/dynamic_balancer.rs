//! Seed 001's "dynamic load balancing with http-proxy and a service registry", in Rust.
//!
//! A gateway routes `/api` to `api-service` and everything else to `webapp-service`,
//! looks the live instances up in a registry, answers `502 Bad Gateway` when a service has
//! none, and picks round robin among them. Instances register themselves when they start
//! (on a free port) and deregister when they stop; the gateway follows without a restart.
//!
//! ```text
//! cargo run --example dynamic_balancer                        # embedded registry
//! cargo run --example dynamic_balancer --features etcd -- --registry etcd://127.0.0.1:2379
//! cargo run --example dynamic_balancer --features consul -- --registry consul://127.0.0.1:8500
//! ```
//! It finishes by itself; Ctrl-C (SIGINT) or SIGTERM stops it early and deregisters the
//! instances first, as the seed's instances do.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tower::Layer;
use tower_patterns::balance::{Balance, ReplayLayer};
use tower_patterns::body::ReplayBody;
use tower_patterns::discovery::{
    shutdown_signal, Instance, MemoryRegistry, Registration, Registry, Watcher,
};
use tower_patterns::proxy::{Forward, ForwardBuilder};
use tower_patterns::route::{Backend, PathRouter, RouteTable};
use tower_patterns::BoxError;

/// One balancer per service: round robin over the registry's instances (our `balance`
/// module fed by the watcher's `Discover`), with request bodies buffered so a refused
/// connection can be retried on the next instance.
type Balanced = tower_patterns::balance::Replay<Balance<String, Forward<ReplayBody<Incoming>>>>;

/// One instance of a service: an HTTP server on a free port that registered itself.
struct RunningInstance {
    registration: Registration,
    stop: oneshot::Sender<()>,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
}

async fn start_instance(
    registry: &Arc<dyn Registry>,
    service: &str,
) -> Result<RunningInstance, BoxError> {
    // The seed's `portfinder.getPort`: let the OS pick a free port.
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let id = format!("{service}-{port}");
    let answer = Bytes::from(format!("{service} response from {id}"));
    let svc = tower::service_fn(move |_req: Request<Incoming>| {
        let answer = answer.clone();
        async move { Ok::<_, Infallible>(Response::new(Full::new(answer))) }
    });
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(tower_patterns::server::serve_with_shutdown(
        listener,
        svc,
        async {
            let _ = stopped.await;
        },
    ));
    let instance = Instance::new(service, &id, "127.0.0.1", port).with_tag(service);
    let registration =
        Registration::new(registry.clone(), instance, Duration::from_secs(5)).await?;
    println!("  started {service} ({id}) on port {port}, registered");
    Ok(RunningInstance {
        registration,
        stop,
        server,
    })
}

impl RunningInstance {
    /// What the seed does on exit/SIGINT: deregister, then stop serving.
    async fn stop(self) -> Result<(), BoxError> {
        let id = self.registration.instance().id.clone();
        self.registration.deregister().await?;
        let _ = self.stop.send(());
        self.server.await??;
        println!("  stopped {id}, deregistered");
        Ok(())
    }
}

async fn connect(arg: Option<&str>) -> Result<Arc<dyn Registry>, BoxError> {
    match arg {
        None | Some("memory") => Ok(Arc::new(MemoryRegistry::new())),
        #[cfg(feature = "etcd")]
        Some(url) if url.starts_with("etcd://") => {
            let endpoint = format!("http://{}", &url["etcd://".len()..]);
            Ok(Arc::new(
                tower_patterns::discovery::EtcdRegistry::builder([endpoint])
                    .prefix("/dynamic-balancer-example")
                    .connect()
                    .await?,
            ))
        }
        #[cfg(feature = "consul")]
        Some(url) if url.starts_with("consul://") => {
            let address = format!("http://{}", &url["consul://".len()..]);
            Ok(Arc::new(tower_patterns::discovery::ConsulRegistry::new(
                address,
            )?))
        }
        Some(other) => Err(format!(
            "unsupported registry `{other}` (use memory, etcd://host:port with --features etcd, \
             or consul://host:port with --features consul)"
        )
        .into()),
    }
}

async fn get(addr: std::net::SocketAddr, path: &str) -> Result<String, BoxError> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let res = client
        .request(Request::get(format!("http://{addr}{path}")).body(Empty::new())?)
        .await?;
    let status = res.status();
    let body = res.into_body().collect().await?.to_bytes();
    Ok(format!(
        "{} | {}",
        status.as_u16(),
        String::from_utf8_lossy(&body).trim_end()
    ))
}

async fn wait_for(router: &PathRouter<Balanced>, service: &str, n: usize) {
    if let Some(w) = router.backend(service).and_then(|b| b.watcher()) {
        w.wait_until(|s| s.len() == n).await;
    }
}

async fn run(registry: Arc<dyn Registry>) -> Result<(), BoxError> {
    // The gateway: one round-robin balancer per service, each fed by the registry.
    let template: Forward<ReplayBody<Incoming>> = ForwardBuilder::new("http://127.0.0.1:1")
        .connect_timeout(Duration::from_secs(1))
        .build()?;
    let router = RouteTable::new()
        .route("/api", "api-service")
        .route("/", "webapp-service")
        .build(|service, selector| {
            // The seed looks instances up by tag: require the service's own tag too.
            let watcher = Watcher::new(&registry, service, selector.clone().tag(service));
            // Each instance becomes a `Forward` to it, sharing the template's pool.
            let discover = watcher.discover(template.clone());
            let (balance, driver) = Balance::builder().build(discover);
            tokio::spawn(driver);
            Backend::new(ReplayLayer::new(64 * 1024).layer(balance), watcher)
        })?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(tower_patterns::server::serve(listener, router.clone()));
    println!("load balancer on http://{addr}  (/api -> api-service, / -> webapp-service)\n");

    println!("1. no instance is running yet:");
    println!("  GET /api -> {}\n", get(addr, "/api").await?);

    println!("2. start two api-service instances and one webapp-service instance:");
    let api1 = start_instance(&registry, "api-service").await?;
    let api2 = start_instance(&registry, "api-service").await?;
    let web = start_instance(&registry, "webapp-service").await?;
    wait_for(&router, "api-service", 2).await;
    wait_for(&router, "webapp-service", 1).await;
    println!();

    println!("3. round robin over the api-service instances:");
    for _ in 0..4 {
        println!("  GET /api -> {}", get(addr, "/api").await?);
    }
    println!("  GET /    -> {}\n", get(addr, "/").await?);

    println!("4. stop one api-service instance (it deregisters itself):");
    api1.stop().await?;
    wait_for(&router, "api-service", 1).await;
    for _ in 0..3 {
        println!("  GET /api -> {}", get(addr, "/api").await?);
    }
    println!("  the balancer was not restarted\n");

    println!("5. stop the rest:");
    api2.stop().await?;
    web.stop().await?;
    wait_for(&router, "api-service", 0).await;
    println!("  GET /api -> {}", get(addr, "/api").await?);
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args: Vec<String> = std::env::args().collect();
    let registry_arg = args
        .iter()
        .position(|a| a == "--registry")
        .and_then(|i| args.get(i + 1))
        .map(String::as_str);
    let registry = connect(registry_arg).await?;
    println!("registry: {}", registry_arg.unwrap_or("memory (embedded)"));
    tokio::select! {
        r = run(registry) => r,
        () = shutdown_signal() => {
            // The registrations are dropped with `run`, which deregisters them.
            println!("signal received: deregistering and exiting");
            Ok(())
        }
    }
}
