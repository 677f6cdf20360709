//! Rate limiting per key: over real sockets (429 + Retry-After, keys per client address
//! behind a trusted proxy, per verified identity stacked after `auth`), and under tokio's
//! paused time (Retry-After counts down, buckets refill, idle keys are evicted, the key
//! table stays bounded).

mod support;

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use support::{echo_backend, send};
use tower::{ServiceBuilder, ServiceExt};
use tower_patterns::client_addr::{ClientAddr, ClientAddrLayer, TrustedProxies};
use tower_patterns::proxy::ForwardBuilder;
use tower_patterns::ratelimit::{
    ClientIpKey, Decision, FnKey, LocalLimiter, Quota, RateLimitLayer, RateLimited, RouteKey,
    TokioClock,
};

fn nz(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n).unwrap()
}

async fn get(
    gw: SocketAddr,
    xff: Option<&str>,
    extra: &[(&str, &str)],
) -> (StatusCode, http::HeaderMap) {
    let mut req = Request::get("/x").header("host", "gw.test");
    if let Some(x) = xff {
        req = req.header("x-forwarded-for", x);
    }
    for (k, v) in extra {
        req = req.header(*k, *v);
    }
    let (status, headers, _) = send(gw, req.body(Full::new(Bytes::new())).unwrap()).await;
    (status, headers)
}

#[tokio::test]
async fn over_the_limit_is_429_with_retry_after_per_client_behind_a_trusted_proxy() {
    let echo = echo_backend().await;
    let forward = ForwardBuilder::new(echo.url()).build::<Incoming>().unwrap();
    // Three at once, then one a minute, per client.
    let quota = Quota::with_period(Duration::from_secs(60))
        .unwrap()
        .allow_burst(nz(3));
    let limit = RateLimitLayer::new(ClientIpKey::new(), LocalLimiter::new(quota));
    let limiter = limit.limiter().clone();
    let svc = ServiceBuilder::new()
        .layer(ClientAddrLayer::new().trust("127.0.0.1/32".parse::<TrustedProxies>().unwrap()))
        .layer(limit.respond())
        .service(forward);
    let gw = tower_patterns::server::spawn_local(svc)
        .await
        .unwrap()
        .addr();

    for i in 0..3 {
        assert_eq!(
            get(gw, Some("203.0.113.7"), &[]).await.0,
            StatusCode::OK,
            "request {i}"
        );
    }
    let (status, headers) = get(gw, Some("203.0.113.7"), &[]).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((50..=60).contains(&retry), "Retry-After {retry}");
    // Another client (as the trusted proxy says) has its own bucket; the proxy itself too.
    assert_eq!(get(gw, Some("203.0.113.8"), &[]).await.0, StatusCode::OK);
    assert_eq!(get(gw, None, &[]).await.0, StatusCode::OK);
    // IPv6 clients count per /64: changing the host bits does not buy a new bucket.
    for i in 0..3 {
        let ip = format!("2001:db8:1:2::{i}");
        assert_eq!(get(gw, Some(&ip), &[]).await.0, StatusCode::OK);
    }
    assert_eq!(
        get(gw, Some("2001:db8:1:2:ffff::1"), &[]).await.0,
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(
        get(gw, Some("2001:db8:1:3::1"), &[]).await.0,
        StatusCode::OK
    );
    assert_eq!(limiter.len(), 5);
}

/// An in-process service under the paused clock: the limiter's `TokioClock` moves only
/// when the test advances it.
fn paused_service(
    limiter: LocalLimiter<IpAddr, TokioClock>,
) -> impl tower::Service<
    Request<()>,
    Response = Response<tower_patterns::respond::ErrorResponseBody<Full<Bytes>>>,
    Error = Infallible,
> + Clone {
    ServiceBuilder::new()
        .layer(RateLimitLayer::new(ClientIpKey::new(), limiter))
        .service_fn(|_req: Request<()>| async {
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from("ok"))))
        })
}

fn from(ip: &str) -> Request<()> {
    let mut req = Request::new(());
    req.extensions_mut()
        .insert(ClientAddr(SocketAddr::new(ip.parse().unwrap(), 40000)));
    req
}

#[tokio::test(start_paused = true)]
async fn retry_after_counts_down_and_the_bucket_refills_under_paused_time() {
    // Two at once, then one per 10 s.
    let quota = Quota::with_period(Duration::from_secs(10))
        .unwrap()
        .allow_burst(nz(2));
    let limiter = LocalLimiter::builder(quota)
        .clock(TokioClock::new())
        .build();
    let svc = paused_service(limiter);
    let status = |res: &Response<_>| res.status();
    for _ in 0..2 {
        let res = svc.clone().oneshot(from("198.51.100.1")).await.unwrap();
        assert_eq!(status(&res), StatusCode::OK);
    }
    let res = svc.clone().oneshot(from("198.51.100.1")).await.unwrap();
    assert_eq!(status(&res), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(res.headers()["retry-after"], "10");
    assert_eq!(
        res.extensions().get::<RateLimited>(),
        Some(&RateLimited::Exceeded {
            retry_after: Duration::from_secs(10)
        })
    );

    tokio::time::advance(Duration::from_millis(9_500)).await;
    let res = svc.clone().oneshot(from("198.51.100.1")).await.unwrap();
    assert_eq!(status(&res), StatusCode::TOO_MANY_REQUESTS);
    // 0.5 s left: rounded up, never 0.
    assert_eq!(res.headers()["retry-after"], "1");

    tokio::time::advance(Duration::from_millis(500)).await;
    let res = svc.clone().oneshot(from("198.51.100.1")).await.unwrap();
    assert_eq!(status(&res), StatusCode::OK);
    // Only one cell came back in 10 s.
    let res = svc.clone().oneshot(from("198.51.100.1")).await.unwrap();
    assert_eq!(status(&res), StatusCode::TOO_MANY_REQUESTS);
}

#[tokio::test(start_paused = true)]
async fn the_key_table_is_bounded_and_idle_keys_are_evicted() {
    // One request per 10 s each, at most 100 keys with their own state.
    let quota = Quota::with_period(Duration::from_secs(10)).unwrap();
    let limiter = LocalLimiter::builder(quota)
        .clock(TokioClock::new())
        .max_keys(100)
        .evict_every(Some(Duration::from_secs(30)))
        .build();
    let svc = paused_service(limiter.clone());
    for i in 0..100u32 {
        let ip = format!("10.0.{}.{}", i / 250, i % 250);
        let res = svc.clone().oneshot(from(&ip)).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
    }
    assert_eq!(limiter.len(), 100);
    // 1 000 more clients: the table does not grow; the newcomers share one bucket, so the
    // first of them passes and the rest wait (the known keys keep their own buckets).
    let mut passed = 0;
    for i in 0..1000u32 {
        let ip = format!("10.1.{}.{}", i / 250, i % 250);
        if svc.clone().oneshot(from(&ip)).await.unwrap().status() == StatusCode::OK {
            passed += 1;
        }
    }
    assert_eq!((passed, limiter.len()), (1, 100));

    // Not idle yet after 5 s: nothing evicted by hand.
    tokio::time::advance(Duration::from_secs(5)).await;
    assert_eq!(limiter.evict_idle(), 100);
    // The eviction task (every 30 s) empties the table once every bucket is full again.
    tokio::time::sleep(Duration::from_secs(31)).await;
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    assert_eq!(limiter.len(), 0);
    let res = svc.clone().oneshot(from("10.2.0.1")).await.unwrap();
    assert_eq!((res.status(), limiter.len()), (StatusCode::OK, 1));
}

#[tokio::test(start_paused = true)]
async fn requests_without_a_key_share_one_bucket_and_a_route_key_is_one_bucket() {
    let quota = Quota::with_period(Duration::from_secs(10)).unwrap();
    let limiter = LocalLimiter::builder(quota)
        .clock(TokioClock::new())
        .build();
    let svc = paused_service(limiter);
    // No ClientAddr at all: the shared "no key" bucket.
    assert_eq!(
        svc.clone()
            .oneshot(Request::new(()))
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    assert_eq!(
        svc.clone()
            .oneshot(Request::new(()))
            .await
            .unwrap()
            .status(),
        StatusCode::TOO_MANY_REQUESTS
    );

    let route = ServiceBuilder::new()
        .layer(RateLimitLayer::new(
            RouteKey::new("checkout"),
            LocalLimiter::builder(quota)
                .clock(TokioClock::new())
                .build(),
        ))
        .service_fn(|_req: Request<()>| async {
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
        });
    assert_eq!(
        route
            .clone()
            .oneshot(from("10.0.0.1"))
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    assert_eq!(
        route
            .clone()
            .oneshot(from("10.0.0.2"))
            .await
            .unwrap()
            .status(),
        StatusCode::TOO_MANY_REQUESTS
    );

    // FnKey: any key from headers/extensions (here a tenant set by an earlier layer).
    #[derive(Clone)]
    struct Tenant(&'static str);
    let tenant = ServiceBuilder::new()
        .layer(RateLimitLayer::new(
            FnKey(|_h: &http::HeaderMap, e: &http::Extensions| e.get::<Tenant>().map(|t| t.0)),
            LocalLimiter::builder(quota)
                .clock(TokioClock::new())
                .build(),
        ))
        .service_fn(|_req: Request<()>| async {
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
        });
    let with = |t| {
        let mut r = Request::new(());
        r.extensions_mut().insert(Tenant(t));
        r
    };
    assert_eq!(
        tenant.clone().oneshot(with("a")).await.unwrap().status(),
        StatusCode::OK
    );
    assert_eq!(
        tenant.clone().oneshot(with("b")).await.unwrap().status(),
        StatusCode::OK
    );
    assert_eq!(
        tenant.clone().oneshot(with("a")).await.unwrap().status(),
        StatusCode::TOO_MANY_REQUESTS
    );
}

#[cfg(feature = "auth")]
#[tokio::test]
async fn stacked_after_auth_each_identity_has_its_own_bucket() {
    use tower_patterns::auth::{ApiKeys, AuthConfig};
    use tower_patterns::ratelimit::IdentityKey;

    let echo = echo_backend().await;
    let forward = ForwardBuilder::new(echo.url()).build::<Incoming>().unwrap();
    let auth = AuthConfig::new()
        .api_keys(
            ApiKeys::new()
                .key("alice", "k-alice", ["r"])
                .unwrap()
                .key("bob", "k-bob", ["r"])
                .unwrap(),
        )
        .build()
        .unwrap();
    let quota = Quota::with_period(Duration::from_secs(60))
        .unwrap()
        .allow_burst(nz(2));
    let svc = ServiceBuilder::new()
        .layer(auth.layer().respond())
        .layer(RateLimitLayer::new(IdentityKey, LocalLimiter::new(quota)))
        .service(forward);
    let gw = tower_patterns::server::spawn_local(svc)
        .await
        .unwrap()
        .addr();
    for _ in 0..2 {
        assert_eq!(
            get(gw, None, &[("x-api-key", "k-alice")]).await.0,
            StatusCode::OK
        );
    }
    assert_eq!(
        get(gw, None, &[("x-api-key", "k-alice")]).await.0,
        StatusCode::TOO_MANY_REQUESTS
    );
    // Same client address, another identity: its own bucket.
    assert_eq!(
        get(gw, None, &[("x-api-key", "k-bob")]).await.0,
        StatusCode::OK
    );
    // Refused by auth before the limiter: no bucket spent.
    assert_eq!(
        get(gw, None, &[("x-api-key", "nope")]).await.0,
        StatusCode::UNAUTHORIZED
    );
}

/// A route's bucket is resolved when its layer is built (`RouteKey` is a fixed key): every
/// layer of that name on one limiter counts into it, another name has its own, and it is
/// never the overflow bucket of a full key table, which client-made keys can drain.
#[tokio::test(start_paused = true)]
async fn a_route_bucket_is_its_own_even_when_the_key_table_is_full() {
    let quota = Quota::with_period(Duration::from_secs(60))
        .unwrap()
        .allow_burst(nz(2));
    let limiter = LocalLimiter::builder(quota)
        .clock(TokioClock::new())
        .max_keys(1)
        .build::<std::sync::Arc<str>>();
    // Client-made keys fill the table (one key) and drain the overflow bucket.
    let key = |k: &str| Some(std::sync::Arc::<str>::from(k));
    assert_eq!(limiter.decide(key("tenant-a").as_ref()), Decision::Allow);
    for _ in 0..2 {
        assert_eq!(limiter.decide(key("tenant-b").as_ref()), Decision::Allow);
    }
    assert!(matches!(
        limiter.decide(key("tenant-c").as_ref()),
        Decision::Deny { .. }
    ));
    let route = |name: &str| {
        ServiceBuilder::new()
            .layer(RateLimitLayer::new(RouteKey::new(name), limiter.clone()))
            .service_fn(|_req: Request<()>| async {
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
            })
    };
    async fn status<S, B>(svc: &S) -> StatusCode
    where
        S: tower::Service<Request<()>, Response = Response<B>, Error = Infallible> + Clone,
    {
        svc.clone()
            .oneshot(Request::new(()))
            .await
            .unwrap()
            .status()
    }
    let (first, second, other) = (route("checkout"), route("checkout"), route("search"));
    // Two layers of one name share its burst of two; the third request is refused.
    assert_eq!(status(&first).await, StatusCode::OK);
    assert_eq!(status(&second).await, StatusCode::OK);
    assert_eq!(status(&first).await, StatusCode::TOO_MANY_REQUESTS);
    // Another route's bucket is its own.
    assert_eq!(status(&other).await, StatusCode::OK);
    // The routes take no place in the key table; it still holds the one client key.
    assert_eq!(limiter.len(), 1);
    // A minute later the route's bucket has room for one more.
    tokio::time::advance(Duration::from_secs(60)).await;
    assert_eq!(status(&second).await, StatusCode::OK);
    assert_eq!(status(&first).await, StatusCode::TOO_MANY_REQUESTS);
}
