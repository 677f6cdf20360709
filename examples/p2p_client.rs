//! Peer-to-peer load balancing: the client rotates over the servers itself (the seed's
//! `balancedRequest.js`), with no proxy in between.
//!
//! ```text
//! cargo run --example p2p_client
//! ```
//!
//! Starts two servers (the seed's 9081/9082, here on free ports), sends eleven requests
//! through the balanced client as the seed's `client.js` does, then stops one server and
//! shows the client skipping it (connect error: retried on the other server, then ejected).

use std::convert::Infallible;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use tower::ServiceExt;
use tower_patterns::balance::{client, Balance};
use tower_patterns::server::{spawn_local, LocalServer};
use tower_patterns::BoxError;

/// The seed's `app.js`: answers with its own identity.
async fn server(name: &'static str) -> std::io::Result<LocalServer> {
    let svc = tower::service_fn(move |req: Request<Incoming>| async move {
        let addr = req.headers().get("host").cloned();
        let addr = addr.as_ref().and_then(|h| h.to_str().ok()).unwrap_or("?");
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(format!(
            "Hello from {name} ({addr})"
        )))))
    });
    spawn_local(svc).await
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let server1 = server("server 1").await?;
    let server2 = server("server 2").await?;
    let (s1, s2) = (server1.url(), server2.url());
    println!("servers: {s1} {s2}");

    // balancedRequest: one pooled hyper client, rotating over the servers.
    let request = client::balanced::<Empty<Bytes>, _, _>(Balance::builder(), [&s1, &s2])?;

    // client.js: for (let i = 10; i >= 0; i--) request({method: 'GET', path: '/'}, ...)
    let mut pending = Vec::new();
    for i in (0..=10).rev() {
        let req = Request::get("/").body(Empty::new())?;
        let fut = request.clone().oneshot(req);
        pending.push(tokio::spawn(async move {
            let res = fut.await?;
            let body = res.into_body().collect().await?.to_bytes();
            Ok::<_, BoxError>(format!("[{i:>2}] {}", String::from_utf8_lossy(&body)))
        }));
    }
    for p in pending {
        println!("{}", p.await??);
    }

    println!("-- server 2 stops --");
    server2.shutdown().await?;
    for i in 0..4 {
        let req = Request::get("/").body(Empty::new())?;
        let res = request.clone().oneshot(req).await?;
        let body = res.into_body().collect().await?.to_bytes();
        println!("[{i:>2}] {}", String::from_utf8_lossy(&body));
    }
    for e in request.endpoints() {
        println!(
            "  {:<24} {:?}: {} requests, {} failures",
            e.key, e.state, e.requests, e.failures
        );
    }
    Ok(())
}
