//! Sticky load balancing: every request of a session goes to the instance that holds its
//! state in memory (seed 001, "stateful communication").
//!
//! ```text
//! cargo run --example sticky_sessions
//! ```
//!
//! Three instances keep a per-session visit counter in memory. Two browsers (alice, bob)
//! send requests through the balancing proxy; the proxy's signed `lb` cookie keeps each on
//! its instance, so the counter grows. Then alice's instance is killed: her next request is
//! redispatched to another instance and the cookie is rewritten to name it (her in-memory
//! state is lost, which is why the seed also describes sharing state in a database).

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{header, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use tower::ServiceBuilder;
use tower_patterns::balance::{self, Balance, ReplayLayer, StickyCookie};
use tower_patterns::body::ReplayBody;
use tower_patterns::proxy::{ErrorResponseLayer, Forward};
use tower_patterns::server::{spawn_local, LocalServer};
use tower_patterns::BoxError;

/// An instance with in-memory sessions: `sid` cookie -> visits.
async fn instance(name: &'static str) -> std::io::Result<LocalServer> {
    let sessions: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let svc = tower::service_fn(move |req: Request<Incoming>| {
        let sid = req
            .headers()
            .get(header::COOKIE)
            .and_then(|c| c.to_str().ok())
            .and_then(|c| c.split(';').find_map(|p| p.trim().strip_prefix("sid=")))
            .unwrap_or("anonymous")
            .to_string();
        let visits = {
            let mut s = sessions.lock().unwrap_or_else(|e| e.into_inner());
            let v = s.entry(sid.clone()).or_default();
            *v += 1;
            *v
        };
        async move {
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(format!(
                "{name}: session {sid}, visit {visits}"
            )))))
        }
    });
    spawn_local(svc).await
}

/// A browser: remembers the cookies it was given.
struct Browser {
    sid: &'static str,
    lb_cookie: Option<String>,
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let mut stops = HashMap::new();
    let mut endpoints = Vec::new();
    let mut fwd: Option<Forward<ReplayBody<Incoming>>> = None;
    for name in ["instance-1", "instance-2", "instance-3"] {
        let server = instance(name).await?;
        let url = server.url();
        let f = match &fwd {
            Some(f) => f.to(&url)?,
            None => Forward::new(&url)?,
        };
        fwd.get_or_insert_with(|| f.clone());
        endpoints.push((name, f));
        stops.insert(name, server);
    }
    // In production the secret comes from configuration, identical on every balancer.
    let cookie = StickyCookie::new("lb", b"example secret: use 32 random bytes!")?;
    let lb = Balance::builder().sticky(cookie).build_static(endpoints);
    let proxy = ServiceBuilder::new()
        .layer(ErrorResponseLayer)
        .layer(ReplayLayer::new(64 * 1024))
        .service(lb.clone());
    let addr = tower_patterns::server::spawn_local(proxy).await?.addr();
    println!("sticky proxy on http://{addr} over 3 instances (cookie `lb`, HMAC-signed)");

    let client = balance::client::http_client::<Full<Bytes>>();
    let mut browsers = [
        Browser {
            sid: "alice",
            lb_cookie: None,
        },
        Browser {
            sid: "bob",
            lb_cookie: None,
        },
    ];
    let visit = |b: &mut Browser| {
        let mut cookie = format!("sid={}", b.sid);
        if let Some(lb) = &b.lb_cookie {
            cookie.push_str("; ");
            cookie.push_str(lb);
        }
        let req = Request::get(format!("http://{addr}/"))
            .header(header::COOKIE, cookie)
            .body(Full::default());
        let client = client.clone();
        async move {
            let res = client.request(req?).await?;
            let set = res
                .headers()
                .get(header::SET_COOKIE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let body = res.into_body().collect().await?.to_bytes();
            Ok::<_, BoxError>((String::from_utf8_lossy(&body).to_string(), set))
        }
    };
    let mut alice_home = String::new();
    for round in 1..=3 {
        for b in browsers.iter_mut() {
            let (body, set) = visit(b).await?;
            let note = match &set {
                Some(s) => format!("   <- Set-Cookie: {}", s.split(';').next().unwrap_or("")),
                None => String::new(),
            };
            println!("round {round} {:<5} -> {body}{note}", b.sid);
            if let Some(s) = set {
                b.lb_cookie = s.split(';').next().map(str::to_string);
            }
            if b.sid == "alice" {
                alice_home = body.split(':').next().unwrap_or("").to_string();
            }
        }
    }

    println!("-- {alice_home} (alice's instance) is killed --");
    if let Some(server) = stops.remove(alice_home.as_str()) {
        server.shutdown().await?;
    }
    for round in 4..=5 {
        for b in browsers.iter_mut() {
            let (body, set) = visit(b).await?;
            let note = match &set {
                Some(s) => format!(
                    "   <- cookie rewritten: {}",
                    s.split(';').next().unwrap_or("")
                ),
                None => String::new(),
            };
            println!("round {round} {:<5} -> {body}{note}", b.sid);
            if let Some(s) = set {
                b.lb_cookie = s.split(';').next().map(str::to_string);
            }
        }
    }
    // A forged cookie cannot steer the proxy: it is ignored like a missing one.
    let mut eve = Browser {
        sid: "eve",
        lb_cookie: Some("lb=0000000000000001.00000000000000000000000000000000".into()),
    };
    let (body, set) = visit(&mut eve).await?;
    println!(
        "forged cookie -> {body} (ignored; a valid cookie was issued: {})",
        set.is_some()
    );
    for e in lb.endpoints() {
        println!(
            "  {:<11} {:?}: {} requests, {} failures",
            e.key, e.state, e.requests, e.failures
        );
    }
    Ok(())
}
