//! The Redis-backed rate limiter against a real `redis-server` started by the test (a
//! free port, no persistence): two gateways share one limit; when Redis hangs (SIGSTOP) or
//! dies (SIGKILL) no request waits longer than the timeout, and the configured policy —
//! local limiter, fail open, fail closed — decides.

mod support;

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use support::{echo_backend, send};
use tower::ServiceBuilder;
use tower_patterns::proxy::ForwardBuilder;
use tower_patterns::ratelimit::{OnRedisFailure, Quota, RateLimitLayer, RedisLimiter, RouteKey};

struct Redis {
    child: Child,
    port: u16,
}

impl Redis {
    fn start() -> Redis {
        // redis-server needs an explicit port: take a free one from the kernel first.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .spawn()
            .expect("these tests need redis-server (apt-get install redis-server)");
        let deadline = Instant::now() + Duration::from_secs(10);
        // Ready when it accepts connections (bounded wait for the process to come up).
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "redis-server did not start on {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Redis { child, port }
    }
    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }
    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig}");
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.signal("-CONT");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn quota(burst: u32) -> Quota {
    Quota::with_period(Duration::from_secs(60))
        .unwrap()
        .allow_burst(NonZeroU32::new(burst).unwrap())
}

async fn gateway(limiter: RedisLimiter<std::sync::Arc<str>>) -> SocketAddr {
    let echo = echo_backend().await;
    let forward = ForwardBuilder::new(echo.url()).build::<Incoming>().unwrap();
    let svc = ServiceBuilder::new()
        .layer(RateLimitLayer::new(RouteKey::new("orders"), limiter).respond())
        .service(forward);
    tower_patterns::server::spawn_local(svc)
        .await
        .unwrap()
        .addr()
}

async fn get(gw: SocketAddr) -> (StatusCode, http::HeaderMap, Duration) {
    let started = Instant::now();
    let req = Request::get("/")
        .header("host", "gw.test")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let (status, headers, _) = send(gw, req).await;
    (status, headers, started.elapsed())
}

#[tokio::test]
async fn two_gateways_share_one_limit_through_redis() {
    let redis = Redis::start();
    let make = || {
        RedisLimiter::builder(&redis.url(), quota(3))
            .unwrap()
            .prefix("test-shared:")
            // Generous: this test is about sharing, not about the timeout.
            .timeout(Duration::from_secs(2))
            .build()
    };
    let (a, b) = (make(), make());
    let (la, lb) = (a.clone(), b.clone());
    let (ga, gb) = (gateway(a).await, gateway(b).await);
    // Three in all, whichever gateway they reach.
    assert_eq!(get(ga).await.0, StatusCode::OK);
    assert_eq!(get(gb).await.0, StatusCode::OK);
    assert_eq!(get(ga).await.0, StatusCode::OK);
    for gw in [gb, ga] {
        let (status, headers, _) = get(gw).await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
        let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
        assert!((50..=60).contains(&retry), "Retry-After {retry}");
    }
    // Decided by Redis, not by the local fallbacks (which never saw a request).
    assert!(!la.degraded() && !lb.degraded());
    assert!(la.local().is_empty() && lb.local().is_empty());
}

#[tokio::test]
async fn a_hung_or_dead_redis_never_holds_a_request_past_the_timeout() {
    let redis = Redis::start();
    let timeout = Duration::from_millis(100);
    // Slack for a loaded CI machine; a request without the timeout would hang for good.
    let bound = timeout + Duration::from_millis(600);
    let build = |prefix: &str, policy| {
        RedisLimiter::builder(&redis.url(), quota(100))
            .unwrap()
            .prefix(prefix)
            .timeout(timeout)
            .retry_after_failure(Duration::from_millis(300))
            .on_failure(policy)
            .local_quota(quota(2))
            .build()
    };
    let local = build("t-local:", OnRedisFailure::Local);
    let allow = build("t-allow:", OnRedisFailure::Allow);
    let deny = build("t-deny:", OnRedisFailure::Deny);
    let handle = local.clone();
    let (g_local, g_allow, g_deny) = (
        gateway(local).await,
        gateway(allow).await,
        gateway(deny).await,
    );
    for gw in [g_local, g_allow, g_deny] {
        assert_eq!(get(gw).await.0, StatusCode::OK);
    }

    // Hung: connections stay open, nothing answers.
    redis.signal("-STOP");
    let mut local_statuses = Vec::new();
    for _ in 0..4 {
        let (status, _, took) = get(g_local).await;
        assert!(took < bound, "waited {took:?}");
        local_statuses.push(status);
    }
    // The local fallback (burst 2) decided.
    assert_eq!(
        local_statuses,
        [
            StatusCode::OK,
            StatusCode::OK,
            StatusCode::TOO_MANY_REQUESTS,
            StatusCode::TOO_MANY_REQUESTS
        ]
    );
    assert!(handle.degraded() || !handle.local().is_empty());
    let (status, _, took) = get(g_allow).await;
    assert!(
        (status == StatusCode::OK) && took < bound,
        "{status} {took:?}"
    );
    let (status, headers, took) = get(g_deny).await;
    assert!(
        (status == StatusCode::SERVICE_UNAVAILABLE) && took < bound,
        "{status} {took:?}"
    );
    assert_eq!(headers["retry-after"], "1");

    // Back: after the failure window the shared limiter answers again.
    redis.signal("-CONT");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, _, _) = get(g_allow).await;
        assert_eq!(status, StatusCode::OK);
        if !handle.degraded() && get(g_local).await.0 == StatusCode::OK && !handle.degraded() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the Redis limiter did not come back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Dead: connection refused. Still bounded, still decided by the policy.
    redis.signal("-KILL");
    for _ in 0..3 {
        let (status, _, took) = get(g_deny).await;
        assert!(took < bound, "waited {took:?}");
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        let (status, _, took) = get(g_allow).await;
        assert!(took < bound, "waited {took:?}");
        assert_eq!(status, StatusCode::OK);
    }
}
