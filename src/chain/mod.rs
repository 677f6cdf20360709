//! Content chain: STON's virtual-host link as a tower layer.
//!
//! Content that is physically spread over several stores is hard to use. The content chain
//! makes its location transparent without migrating storage or changing code: an edge
//! fronts the main storage, and each virtual host may *link* to another one. `foo.com`
//! answers what it has; what it answers with `404 Not Found` is served by `bar.com`, which
//! may fetch it from an outside origin (STON `<VhostLink Condition="404">bar.com</VhostLink>`).
//!
//! Two ways to build one:
//!
//! - **typed**: [`LinkLayer`] wraps a service with the next link; layers stack with
//!   [`ServiceBuilder`](tower::ServiceBuilder) under a [`ChainLayer`] (the edge: loop
//!   guard, body buffering, error statuses, report header). No boxing when all links have
//!   the same response type (e.g. several [`Forward`](crate::proxy::Forward)s).
//! - **named**: [`LinkTable`], virtual hosts routed by `Host`, each with at most one link to
//!   another host by name, validated when built: a missing target, a self link and a cycle
//!   of any length are refused with a [`LinkConfigError`] naming the hosts.
//!
//! ```
//! use std::convert::Infallible;
//! use bytes::Bytes;
//! use http::{Request, Response, StatusCode};
//! use http_body_util::{BodyExt, Empty, Full};
//! use tower::ServiceExt;
//! use tower_patterns::body::ReplayBody;
//! use tower_patterns::chain::{ChainHops, ChainLayer, LinkTable};
//!
//! type Req = Request<ReplayBody<Empty<Bytes>>>;
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! // foo.com: the storage, has only /a.txt.
//! let storage = tower::service_fn(|req: Req| async move {
//!     let (status, body) = match req.uri().path() {
//!         "/a.txt" => (StatusCode::OK, "a from storage"),
//!         _ => (StatusCode::NOT_FOUND, "not here"),
//!     };
//!     Ok::<_, Infallible>(Response::builder().status(status).body(Full::new(Bytes::from(body))).unwrap())
//! });
//! // bar.com: the outside origin, has everything.
//! let origin = tower::service_fn(|req: Req| async move {
//!     let body = format!("{} from origin", req.uri().path());
//!     Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body))))
//! });
//!
//! let table = LinkTable::builder()
//!     .vhost("foo.com", storage)
//!     .vhost("bar.com", origin)
//!     .link("foo.com", "404".parse().unwrap(), "bar.com")
//!     .chain(ChainLayer::new().report_header(http::HeaderName::from_static("x-content-chain")))
//!     .build()
//!     .expect("a valid table");
//!
//! let req = Request::get("/b.txt").header("host", "FOO.com:8080").body(Empty::new()).unwrap();
//! let res = table.clone().oneshot(req).await.unwrap();
//! assert_eq!(res.headers()["x-content-chain"], "foo.com+bar.com");
//! assert_eq!(res.extensions().get::<ChainHops>().unwrap().last().name(), "bar.com");
//! let body = res.into_body().collect().await.unwrap().to_bytes();
//! assert_eq!(body, "/b.txt from origin");
//!
//! // A self link is refused when the table is built.
//! let err = LinkTable::<Empty<Bytes>>::builder()
//!     .vhost("foo.com", tower::service_fn(|_: Req| async {
//!         Ok::<_, Infallible>(Response::new(Empty::<Bytes>::new()))
//!     }))
//!     .link("foo.com", "404".parse().unwrap(), "foo.com")
//!     .build()
//!     .unwrap_err();
//! assert_eq!(err.to_string(), "virtual host \"foo.com\" links to itself");
//! # });
//! ```
//!
//! # Semantics
//!
//! | situation | behaviour |
//! |---|---|
//! | the link's [`Condition`](crate::classify::Condition) (`404`, `403,404`, `4xx`, `5xx`, `fail`, combined: `5xx,fail`) matches the answer | the request is sent to the next link; the skipped response is discarded |
//! | it does not match | that answer is returned, unchanged; later links are not consulted |
//! | the last link's answer matches its own condition but there is no further link | returned unchanged (status, headers, body) |
//! | `fail` and the link errors (refused, reset, timeout) | next link; if none, `502`/`504` from [`ChainLayer`] |
//! | request body within the replay limit | buffered once, resent to each link |
//! | request body over the replay limit | streamed to the first link only; **no hop**: its answer is returned as it is, [`ChainHops::stopped`] = [`StopReason::BodyOverLimit`] |
//! | non-idempotent method (POST, PATCH, ...) | hops only with [`LinkLayer::non_idempotent`] / [`LinkTableBuilder::non_idempotent`], or when connecting to the link failed (the request never left); else [`StopReason::NonIdempotent`] |
//! | request arrives with hop header (`x-chain-hops`) above [`ChainLayer::max_hops`] | `508 Loop Detected`, nothing forwarded |
//! | hop header missing / not a number / several values | 0 / ignored / the largest; every request sent carries `arrived + links tried` |
//! | skipped response body | short (known length ≤ 64 KiB): read to the end in the background so its connection is reused; else dropped at once |
//! | trail | [`ChainHops`] response extension (also in [`ChainError`]), optional report header `foo.com+bar.com`, one `tracing` debug event per hop |
//! | [`LinkTable`]: unknown `Host` | `421 Misdirected Request` (or the default host); no `Host` at all: `400` |
//! | [`LinkTable`]: absolute-form target (`GET http://b.com/x`) | routed by its authority, `Host` ignored (RFC 9112 §3.2.2) |
//! | [`LinkTable`]: several `Host` lines, or an unreadable one | `400`, even with a default host |
//!
//! See `docs/content_chain.md` for the STON configuration mapping.

mod chain_future;
mod error;
mod future;
mod hops;
mod layer;
mod service;
mod table;
mod table_builder;

pub use chain_future::ChainFuture;
pub use error::{ChainError, LinkConfigError};
pub use future::LinkFuture;
pub use hops::{ChainHops, Hop, HopResult, LinkName, StopReason};
pub use layer::{ChainLayer, LinkLayer};
pub use service::{Chain, ChainBody, Link};

pub use table::{LinkService, LinkTable, LinkTableBuilder, TableFuture};
