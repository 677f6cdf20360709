//! An edge cache in front of one origin, served thread-per-core: what
//! `scripts/bench-cache.sh` measures against nginx `proxy_cache`.
//!
//! ```text
//! cargo run --release --example cache_server -- --listen 127.0.0.1:8080 \
//!     --origin http://127.0.0.1:8081 [--workers N] [--memory BYTES] [--disk DIR] \
//!     [--no-coalescing]
//! ```
//!
//! One [`CacheLayer`] (one store, one table of origin fetches in flight) is shared by all
//! workers, so coalescing works across them; each worker has its own runtime and
//! upstream connection pool ([`Workers`]). `--disk DIR` (feature `disk-cache`) puts the
//! disk tier behind the memory tier. Prints `X-Cache` counters on SIGTERM/Ctrl-C.

use std::net::SocketAddr;

use hyper::body::Incoming;
use tower::ServiceBuilder;
use tower_patterns::cache::{CacheLayer, MemoryStore, Store};
use tower_patterns::proxy::ForwardBuilder;
use tower_patterns::respond::ErrorResponseLayer;
use tower_patterns::server::Workers;
use tower_patterns::BoxError;

#[path = "common/flags.rs"]
mod flags;
#[path = "common/workers.rs"]
mod workers;
use flags::Flags;

struct Args {
    listen: SocketAddr,
    origin: String,
    workers: usize,
    memory: u64,
    disk: Option<String>,
    coalescing: bool,
}

fn parse() -> Result<Args, BoxError> {
    let mut args = Args {
        listen: "127.0.0.1:8080".parse()?,
        origin: String::new(),
        workers: 1,
        memory: 256 << 20,
        disk: None,
        coalescing: true,
    };
    let mut flags = Flags::from_env();
    while let Some(a) = flags.next_flag() {
        match a.as_str() {
            "--listen" => args.listen = flags.parse(&a)?,
            "--origin" => args.origin = flags.value(&a)?,
            "--workers" => args.workers = flags.parse(&a)?,
            "--memory" => args.memory = flags.parse(&a)?,
            "--disk" => args.disk = Some(flags.value(&a)?),
            "--no-coalescing" => args.coalescing = false,
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    if args.origin.is_empty() {
        return Err("--origin URL is required".into());
    }
    Ok(args)
}

fn store(args: &Args) -> Result<Box<dyn Store>, BoxError> {
    let memory = MemoryStore::new(args.memory);
    match &args.disk {
        #[cfg(feature = "disk-cache")]
        Some(dir) => {
            let disk = tower_patterns::cache::DiskStore::open(dir, 1 << 30)?;
            Ok(Box::new(tower_patterns::cache::TieredStore::new(
                memory, disk,
            )))
        }
        #[cfg(not(feature = "disk-cache"))]
        Some(_) => Err("--disk needs the disk-cache feature".into()),
        None => Ok(Box::new(memory)),
    }
}

fn main() -> Result<(), BoxError> {
    let args = parse()?;
    let mut builder = CacheLayer::builder(store(&args)?);
    if !args.coalescing {
        builder = builder.no_coalescing();
    }
    let cache = builder.build();
    let origin = args.origin.clone();
    // Checked once so the workers' own builds cannot fail.
    ForwardBuilder::new(origin.clone()).build::<Incoming>()?;
    let layer = cache.clone();
    let handle = Workers::new(args.workers).spawn(args.listen, move |_id| {
        let fwd = ForwardBuilder::new(origin.clone())
            .build::<Incoming>()
            .expect("validated before the workers started");
        ServiceBuilder::new()
            .layer(ErrorResponseLayer)
            .layer(layer.clone())
            .service(fwd)
    })?;
    println!(
        "edge cache on http://{} -> {}, {} workers",
        handle.local_addr(),
        args.origin,
        args.workers
    );
    workers::serve_until_stopped(handle)?;
    println!("{:?}", cache.stats().snapshot());
    Ok(())
}
