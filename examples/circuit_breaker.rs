//! Service A calls a flaky service B through a circuit breaker, over real local sockets.
//!
//! B goes down; A's calls fail until the breaker opens; then A's fallback answers at once
//! and B gets no traffic. While B stays down, each half-open probe fails and the open wait
//! grows (exponential backoff). B comes back; the next probes succeed and the breaker
//! closes. Every transition is printed with its time.
//!
//! `cargo run --example circuit_breaker` (finishes by itself in about 8 s)

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tower::{ServiceBuilder, ServiceExt};
use tower_patterns::breaker::{
    CircuitBreakerConfig, CircuitBreakerLayer, CircuitOpen, State, WaitStrategy, Window,
};
use tower_patterns::proxy::ForwardBuilder;
use tower_patterns::server;
use tower_patterns::BoxError;

type Body = Full<Bytes>;

/// Service B: answers "hello from B" until `stop` fires.
async fn start_b(addr: SocketAddr, hits: Arc<AtomicU32>) -> Result<oneshot::Sender<()>, BoxError> {
    let listener = TcpListener::bind(addr).await?;
    let (tx, rx) = oneshot::channel::<()>();
    let svc = tower::service_fn(move |_req: Request<hyper::body::Incoming>| {
        hits.fetch_add(1, Ordering::Relaxed);
        async { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from("hello from B")))) }
    });
    tokio::spawn(server::serve_with_shutdown(listener, svc, async {
        let _ = rx.await;
    }));
    Ok(tx)
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let t0 = Instant::now();
    let ts = move || format!("[{:>6.3}s]", t0.elapsed().as_secs_f64());

    // B on an ephemeral port; it will be stopped and restarted on the same port.
    let b_hits = Arc::new(AtomicU32::new(0));
    let b_addr = TcpListener::bind("127.0.0.1:0").await?.local_addr()?;
    let mut stop_b = Some(start_b(b_addr, b_hits.clone()).await?);

    // A: forwards to B through the breaker; the fallback answers while the circuit is open.
    let layer = CircuitBreakerLayer::new(
        CircuitBreakerConfig::new()
            .name("a->b")
            .window(Window::Count(6))
            .minimum_calls(6)
            .failure_rate_threshold(50.0)
            .wait_strategy(WaitStrategy::Exponential {
                initial: Duration::from_millis(600),
                multiplier: 2.0,
                max: Duration::from_secs(3),
                jitter: 0.1,
            })
            .automatic_half_open(true)
            .half_open_permits(2),
    )?
    .fallback_fn(
        |_req: Request<hyper::body::Incoming>, why: CircuitOpen| async move {
            let retry = why.remaining.map(|d| d.as_millis()).unwrap_or(0);
            Ok::<_, Infallible>(
                Response::builder()
                    .status(StatusCode::OK)
                    .header("x-served-by", "fallback")
                    // The fallback's own body type, whatever the upstream's is.
                    .body(Full::new(Bytes::from(format!(
                        "cached answer from A (B unavailable, circuit {}, retry in {retry} ms)",
                        why.state
                    ))))
                    .unwrap(),
            )
        },
    );
    let breaker = layer.breaker().clone();
    let forward = ForwardBuilder::new(format!("http://{b_addr}"))
        .connect_timeout(Duration::from_millis(500))
        .response_timeout(Duration::from_secs(2))
        .build::<hyper::body::Incoming>()?;
    // `respond()`: rejections without a fallback and upstream errors become 502/503/504
    // responses; no adapter between the layers.
    let a = ServiceBuilder::new()
        .layer(layer.respond())
        .service(forward);
    let a_listener = TcpListener::bind("127.0.0.1:0").await?;
    let a_addr = a_listener.local_addr()?;
    tokio::spawn(server::serve(a_listener, a));
    println!("{} A on {a_addr} calls B on {b_addr}", ts());

    // Print every transition as it happens.
    let mut rx = breaker.subscribe();
    let watcher = {
        let breaker = breaker.clone();
        tokio::spawn(async move {
            let mut last = Instant::now();
            let mut prev = State::Closed;
            while rx.changed().await.is_ok() {
                let state = *rx.borrow_and_update();
                let m = breaker.metrics();
                let detail = match state {
                    State::Open if prev == State::HalfOpen => format!(
                        "the probes failed, wait {} ms",
                        m.open_remaining.unwrap_or_default().as_millis()
                    ),
                    State::Open => format!(
                        "failure rate {:.0}% over {} calls, wait {} ms",
                        m.failure_rate.unwrap_or(0.0),
                        m.calls,
                        m.open_remaining.unwrap_or_default().as_millis()
                    ),
                    State::HalfOpen => {
                        format!("{} probes allowed", m.half_open_available.unwrap_or(0))
                    }
                    State::Closed => "the probes succeeded".to_string(),
                    _ => String::new(),
                };
                println!(
                    "{} TRANSITION -> {state:<9} (+{:>4} ms in previous state) {detail}",
                    ts(),
                    last.elapsed().as_millis()
                );
                last = Instant::now();
                prev = state;
            }
        })
    };

    // The client of A: one request every 100 ms; prints when the kind of answer changes.
    let client = ForwardBuilder::new(format!("http://{a_addr}")).build::<Body>()?;
    let mut last_kind = String::new();
    let mut run = 0u32;
    let mut b_down_at = None;
    for i in 0..80u32 {
        if i == 10 {
            println!(
                "{} B goes down (its listener closes: connections refused)",
                ts()
            );
            if let Some(stop) = stop_b.take() {
                let _ = stop.send(());
            }
            b_down_at = Some(b_hits.load(Ordering::Relaxed));
        }
        if i == 45 {
            stop_b = Some(start_b(b_addr, b_hits.clone()).await?);
            println!("{} B is back on {b_addr}", ts());
        }
        let res = client
            .clone()
            .oneshot(Request::get("/").body(Body::default())?)
            .await?;
        let status = res.status();
        let fallback = res.headers().contains_key("x-served-by");
        let body = res.into_body().collect().await?.to_bytes();
        let kind = if fallback {
            "200 from A's fallback".to_string()
        } else if status == StatusCode::OK {
            "200 from B".to_string()
        } else {
            format!("{} (A could not reach B)", status.as_u16())
        };
        if kind != last_kind {
            if run > 0 {
                println!("{}   ... {run} answers: {last_kind}", ts());
            }
            println!(
                "{} request {:>2}: {kind}: {}",
                ts(),
                i + 1,
                String::from_utf8_lossy(&body).trim()
            );
            last_kind = kind;
            run = 0;
        }
        run += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("{}   ... {run} answers: {last_kind}", ts());

    let m = breaker.metrics();
    println!(
        "{} done: state {}, {} calls answered by the fallback without touching B; B got {} requests after it went down (probes and after recovery)",
        ts(),
        m.state,
        m.not_permitted_calls,
        b_hits.load(Ordering::Relaxed) - b_down_at.unwrap_or(0)
    );
    watcher.abort();
    if let Some(stop) = stop_b {
        let _ = stop.send(());
    }
    Ok(())
}
