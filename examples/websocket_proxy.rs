//! WebSocket through the balancing reverse proxy: the upgrade is tunnelled, a sticky cookie
//! keeps a browser's sockets on one instance, and each open socket counts as load.
//!
//! ```text
//! cargo run --example websocket_proxy
//! ```
//!
//! Two echo instances (tungstenite) sit behind a `Balance` of `Forward`s. The first socket
//! gets the proxy's signed `lb` cookie on its `101`; three more sockets sent with that
//! cookie land on the same instance, and the balancer shows four tunnels in flight there
//! until they close. A silent tunnel would be closed after
//! `ForwardBuilder::upgrade_idle_timeout` (60 s by default).

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use hyper::body::Incoming;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tower::ServiceBuilder;
use tower_patterns::balance::{Balance, StickyCookie};
use tower_patterns::proxy::{ErrorResponseLayer, ForwardBuilder};
use tower_patterns::BoxError;

/// An echo instance answering `name: text`.
async fn echo_instance(name: &'static str) -> std::io::Result<String> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                while let Some(Ok(msg)) = ws.next().await {
                    if let Message::Text(t) = msg {
                        if ws
                            .send(Message::text(format!("{name}: {t}")))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                }
            });
        }
    });
    Ok(url)
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let a = echo_instance("instance-a").await?;
    let b = echo_instance("instance-b").await?;
    let fwd = ForwardBuilder::new(&a)
        .upgrade_idle_timeout(Duration::from_secs(60))
        .build::<Incoming>()?;
    let lb = Balance::builder()
        .sticky(StickyCookie::new("lb", b"change me: 32 random bytes")?)
        .build_static([("a", fwd.clone()), ("b", fwd.to(&b)?)]);
    let svc = ServiceBuilder::new()
        .layer(ErrorResponseLayer)
        .service(lb.clone());
    let proxy = tower_patterns::server::spawn_local(svc).await?;
    let addr = proxy.addr();
    println!("proxy on ws://{addr}/chat");

    let open = |cookie: Option<String>| async move {
        let mut req = format!("ws://{addr}/chat").into_client_request()?;
        if let Some(c) = cookie {
            req.headers_mut().insert("cookie", c.parse()?);
        }
        let stream = TcpStream::connect(addr).await?;
        let (ws, res) = tokio_tungstenite::client_async(req, stream).await?;
        let cookie = res
            .headers()
            .get("set-cookie")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .map(str::to_string);
        Ok::<_, BoxError>((ws, cookie))
    };

    let (first, cookie) = open(None).await?;
    let cookie = cookie.ok_or("no sticky cookie on the 101")?;
    println!("first socket pinned with cookie {cookie}");
    let mut sockets = vec![first];
    for _ in 0..3 {
        sockets.push(open(Some(cookie.clone())).await?.0);
    }
    for (i, ws) in sockets.iter_mut().enumerate() {
        ws.send(Message::text(format!("hello from socket {i}")))
            .await?;
        if let Some(reply) = ws.next().await {
            println!("  {}", reply?.into_text()?);
        }
    }
    for e in lb.endpoints() {
        println!("endpoint {}: {} tunnel(s) in flight", e.key, e.in_flight);
    }
    for mut ws in sockets {
        ws.close(None).await?;
        while let Some(Ok(_)) = ws.next().await {}
    }
    proxy.shutdown().await?;
    Ok(())
}
