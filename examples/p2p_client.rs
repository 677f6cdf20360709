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
use tower_patterns::BoxError;

/// The seed's `app.js`: answers with its own identity.
async fn server(name: &'static str) -> std::io::Result<(String, tokio::sync::oneshot::Sender<()>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let svc = tower::service_fn(move |_req: Request<Incoming>| async move {
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(format!(
            "Hello from {name} ({addr})"
        )))))
    });
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(tower_patterns::server::serve_with_shutdown(
        listener,
        svc,
        async {
            let _ = rx.await;
        },
    ));
    Ok((format!("http://{addr}"), tx))
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let (s1, _stop1) = server("server 1").await?;
    let (s2, stop2) = server("server 2").await?;
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
    let _ = stop2.send(());
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
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
