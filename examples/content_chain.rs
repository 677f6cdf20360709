//! Content chain (STON virtual-host link), end to end on 127.0.0.1.
//!
//! - "storage" (`foo.com`) has a few files;
//! - "external origin" (`bar.com`) has everything;
//! - the chain fronts both: `<Vhost Name="foo.com"><VhostLink Condition="404">bar.com</VhostLink>`.
//!
//! The example asks the chain for a file that storage has and for one only the origin has,
//! prints who served each and the hops, then shows the three configurations STON refuses.
//!
//! Run: `cargo run --example content_chain`
//!
//! With a real external origin for `bar.com` (HTTPS needs the `tls` feature; certificates
//! are verified against the webpki roots):
//! `ORIGIN_URL=https://www.rust-lang.org ORIGIN_PATH=/robots.txt cargo run --example
//! content_chain --features tls` — the second request then asks for `ORIGIN_PATH`.
//! `ORIGIN_CA=ca.pem` trusts that CA instead (a private origin).

use std::convert::Infallible;

use bytes::Bytes;
use http::{HeaderName, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;
use tower_patterns::body::ReplayBody;
use tower_patterns::chain::{ChainLayer, LinkTable};
use tower_patterns::proxy::{Forward, ForwardBuilder};

/// Starts a file server named `name` holding `files`; 404 for anything else.
async fn file_server(
    name: &'static str,
    files: &'static [(&'static str, &'static str)],
) -> std::io::Result<String> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let svc = tower::service_fn(move |req: Request<Incoming>| async move {
        let found = files.iter().find(|(p, _)| *p == req.uri().path());
        let (status, body) = match found {
            Some((_, content)) => (StatusCode::OK, *content),
            None => (StatusCode::NOT_FOUND, "not found"),
        };
        let mut res = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
        *res.status_mut() = status;
        res.headers_mut()
            .insert("x-served-by", http::HeaderValue::from_static(name));
        Ok::<_, Infallible>(res)
    });
    tokio::spawn(tower_patterns::server::serve(listener, svc));
    Ok(url)
}

type Link = Forward<ReplayBody<Incoming>>;

fn refused(table: Result<LinkTable<Incoming>, tower_patterns::chain::LinkConfigError>) -> String {
    match table {
        Ok(_) => "accepted (unexpected)".to_string(),
        Err(e) => format!("refused: {e}"),
    }
}

/// The builder for the outside origin; with the `tls` feature, `ORIGIN_CA` (a PEM file)
/// names the CA to trust instead of the webpki roots (a private origin).
fn origin_builder(url: &str) -> Result<ForwardBuilder, tower_patterns::BoxError> {
    let builder = ForwardBuilder::new(url);
    #[cfg(feature = "tls")]
    if let Ok(path) = std::env::var("ORIGIN_CA") {
        let pem = std::fs::read(path)?;
        let tls = tower_patterns::tls::ClientTls::builder()
            .ca_pem(&pem)?
            .build()?;
        return Ok(builder.tls(tls));
    }
    Ok(builder)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), tower_patterns::BoxError> {
    let storage = file_server(
        "storage",
        &[("/logo.png", "<logo bytes>"), ("/index.html", "<html>")],
    )
    .await?;
    let external = std::env::var("ORIGIN_URL").ok();
    let origin = match &external {
        Some(url) => url.trim_end_matches('/').to_string(),
        None => {
            file_server(
                "external-origin",
                &[
                    ("/logo.png", "<old logo>"),
                    ("/videos/intro.mp4", "<video bytes>"),
                ],
            )
            .await?
        }
    };
    let origin_path = match &external {
        Some(_) => std::env::var("ORIGIN_PATH").unwrap_or_else(|_| "/robots.txt".into()),
        None => "/videos/intro.mp4".into(),
    };
    println!("storage (foo.com) on {storage}, external origin (bar.com) on {origin}");

    let report = HeaderName::from_static("x-content-chain");
    let table = LinkTable::builder()
        .vhost(
            "foo.com",
            ForwardBuilder::new(&storage).build::<ReplayBody<Incoming>>()?,
        )
        .vhost(
            "bar.com",
            // A real origin routes by its own name, not the client's `foo.com`.
            origin_builder(&origin)?
                .preserve_host(external.is_none())
                .build::<ReplayBody<Incoming>>()?,
        )
        .link("foo.com", "404".parse()?, "bar.com")
        .chain(ChainLayer::new().report_header(report.clone()))
        .build()?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let edge = listener.local_addr()?;
    tokio::spawn(tower_patterns::server::serve(listener, table));
    println!("content chain on http://{edge}: foo.com -(404)-> bar.com\n");

    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    for path in ["/logo.png", origin_path.as_str(), "/missing.txt"] {
        let req = Request::get(format!("http://{edge}{path}"))
            .header("host", "foo.com")
            .body(Empty::new())?;
        let res = client.request(req).await?;
        let status = res.status();
        let served_by = header(&res, "x-served-by");
        let hops = header(&res, report.as_str());
        let body = res.into_body().collect().await?.to_bytes();
        println!(
            "GET foo.com{path:<18} -> {:<14} served by {served_by:<16} hops {hops:<16} body {:?}",
            status.to_string(),
            // A real origin's page can be long: the first 60 characters tell who answered.
            String::from_utf8_lossy(&body)
                .chars()
                .take(60)
                .collect::<String>()
        );
    }

    println!("\nconfigurations STON refuses:");
    // Any service will do: the table is refused before it serves anything.
    let ok = |_host: &str| -> Result<Link, tower_patterns::BoxError> {
        Ok(ForwardBuilder::new(&storage).build()?)
    };
    let missing = LinkTable::builder()
        .vhost("foo.com", ok("foo.com")?)
        .link("foo.com", "404".parse()?, "nowhere.com")
        .build();
    println!("  foo.com -> ?                    {}", refused(missing));
    let self_link = LinkTable::builder()
        .vhost("foo.com", ok("foo.com")?)
        .link("foo.com", "404".parse()?, "foo.com")
        .build();
    println!("  foo.com -> foo.com              {}", refused(self_link));
    let recursive = LinkTable::builder()
        .vhost("foo.com", ok("foo.com")?)
        .vhost("bar.com", ok("bar.com")?)
        .link("foo.com", "404".parse()?, "bar.com")
        .link("bar.com", "5xx,fail".parse()?, "foo.com")
        .build();
    println!("  foo.com -> bar.com -> foo.com   {}", refused(recursive));
    Ok(())
}

fn header<B>(res: &Response<B>, name: &str) -> String {
    res.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_string()
}
