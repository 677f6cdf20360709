//! Forwarding a request to an upstream: the leaf service of every proxy pattern.
//!
//! A reverse proxy must pass a request on without letting the client steer it: the upstream
//! address comes from configuration only, connection-level (hop-by-hop) headers are not
//! passed through, and the upstream learns who the real client was through
//! `X-Forwarded-For/Proto/Host`. When the upstream is down or slow, the caller gets a typed
//! [`ForwardError`] that [`classify`](crate::classify) recognises and that maps to
//! `502 Bad Gateway` / `504 Gateway Timeout`.
//!
//! [`Forward`] does this over its own keep-alive HTTP/1.1 connection pool per upstream, or
//! one multiplexed HTTP/2 connection ([`Protocol`]), and a balancer holding one `Forward`
//! per endpoint (made with [`Forward::to`]) shares one set of pools. A request without a
//! body to an `http://` upstream (most proxied traffic: `GET`, `HEAD`) takes a lean
//! HTTP/1.1 path written and read in the request's own task: the head goes out in one
//! `send`, the answer is parsed with `httparse` (hyper's parser) and framed by the same
//! rules as hyper's client, against which it is differential-tested; a body that came
//! with the head is handed over whole and the connection goes back at once. It costs
//! about a third fewer instructions than hyper's client connection with its spawned task
//! and channels (`docs/BENCHMARKS.md`). Requests with a body, `https://` and HTTP/2
//! upstreams and upgrades use hyper's client connection API (no task spawned per
//! request). A malformed answer on the lean path is [`ForwardError::Transport`] with an
//! [`Http1Error`] as its source. `https://` upstreams need the `tls` feature
//! (rustls; see `tls::ClientTls`): certificates are always verified, a failure is
//! [`ForwardError::Tls`] (502), never a plaintext fallback. Details: `docs/protocols.md`.
//!
//! A response's body is a [`ForwardBody`]: an `http_body::Body<Data = Bytes>` whose error is
//! [`ForwardBodyError`]. It is this crate's own type rather than hyper's `Incoming` (which
//! has no public constructor), so the lean HTTP/1.1 path can produce it too;
//! `ForwardBody::from(incoming)` wraps hyper's.
//!
//! | behaviour | nginx equivalent |
//! |---|---|
//! | request path appended to the upstream's path prefix | `proxy_pass http://up/prefix` |
//! | hop-by-hop headers removed both ways (RFC 9110 §7.6.1, and any named in `Connection`) | default |
//! | `X-Forwarded-For` appended with the client address ([`ClientAddr`]) | `$proxy_add_x_forwarded_for` |
//! | `X-Forwarded-Proto`, `X-Forwarded-Host` set | `$scheme`, `$host` |
//! | `Host` kept as the client sent it (or rewritten: [`ForwardBuilder::preserve_host`]) | `proxy_set_header Host $host` |
//! | connect timeout, default 5 s → [`ForwardError::ConnectTimeout`] (504) | `proxy_connect_timeout` (60 s) |
//! | response-header timeout, default 60 s, restarted while the upstream takes body chunks → [`ForwardError::ResponseTimeout`] (504) | `proxy_read_timeout` / `proxy_send_timeout` (60 s) |
//! | refused / reset → [`ForwardError::Connect`] / [`ForwardError::Transport`] (502) | `502` |
//! | certificate does not verify / client certificate refused → [`ForwardError::Tls`] (502, never sent) | `proxy_ssl_verify on` |
//! | HTTP/2 stream reset → [`ForwardError::StreamReset`] (502; `REFUSED_STREAM` never sent) | `502` |
//! | client body idle (default 30 s, or [`BodyLimits`] from the server) → [`ForwardError::ClientBodyTimeout`] (408) | `client_body_timeout` |
//! | client body over [`BodyLimits::max_bytes`] → [`ForwardError::ClientBodyTooLarge`] (413) | `client_max_body_size` |
//! | aborted or malformed client body → [`ForwardError::ClientBody`] (400) | `400` / `499` |
//! | proxy out of fds/memory on connect → [`ForwardError::LocalResource`] (503) | — |
//! | two `Host` headers, or `Host` ≠ absolute-form target → [`ForwardError::BadRequest`] (400) | `400` |
//! | `CONNECT` → [`ForwardError::MethodNotSupported`] (501) | `405` (nginx); 501 here: RFC 9110 §15.6.2 "method not supported", no `Allow` list to keep |
//! | a client naming [`PROTECTED_FROM_CONNECTION`] headers in `Connection` | kept (nginx ignores `Connection` names altogether) |
//! | WebSocket / HTTP/1.1 upgrade (`Connection: upgrade` + `Upgrade`) → tunnelled on a connection of its own, idle timeout 60 s ([`ForwardBuilder::upgrade_idle_timeout`]), [`Tunnel`] in the `101`'s extensions | `proxy_set_header Upgrade $http_upgrade` + `Connection "upgrade"` |
//! | trailers passed to the client; `TE: trailers` sent when the client sent it; `Trailer` kept (end to end) | `grpc_pass` |
//!
//! Every timeout has a default and can be disabled explicitly
//! ([`ForwardBuilder::without_response_timeout`] etc.). The client's faults, `CONNECT`,
//! bad `Host` and local resource exhaustion are [`FailureKind::Client`]: classified
//! [`Outcome::Ignored`], so passive health, the breaker and retries never charge them to
//! a healthy upstream.
//!
//! [`FailureKind::Client`]: crate::classify::FailureKind::Client
//! [`Outcome::Ignored`]: crate::classify::Outcome::Ignored
//!
//! ```no_run
//! use tower::{Service, ServiceExt};
//! use tower_patterns::proxy::{Forward, ForwardBuilder};
//!
//! # async fn run() -> Result<(), tower_patterns::BoxError> {
//! let mut fwd: Forward<http_body_util::Empty<bytes::Bytes>> =
//!     ForwardBuilder::new("http://127.0.0.1:8080")
//!         .connect_timeout(std::time::Duration::from_secs(1))
//!         .build()?;
//! let req = http::Request::get("/hello").body(http_body_util::Empty::new())?;
//! let res = fwd.ready().await?.call(req).await?;
//! println!("{}", res.status());
//! # Ok(()) }
//! ```

pub(crate) mod body;
mod builder;
mod connect;
mod error;
mod forwarded;
mod future;
mod h1;
mod h2;
mod h2pool;
mod h2wire;
pub(crate) mod headers;
mod pool;
mod response_body;
mod service;
mod upgrade;
mod upstream;

pub use body::BodyLimits;
pub use connect::Protocol;
pub use error::ForwardError;
pub use future::ResponseFuture;
pub use h1::Http1Error;
pub use headers::{strip_hop_by_hop, PROTECTED_FROM_CONNECTION};
pub use response_body::{ForwardBody, ForwardBodyError};
// Kept at their old paths so existing imports compile; they live in the neutral modules.
pub use crate::client_addr::ClientAddr;
pub use crate::error::error_status;
pub use crate::respond::{
    error_response, status_response, ErrorResponse, ErrorResponseBody, ErrorResponseFuture,
    ErrorResponseLayer,
};
pub use builder::ForwardBuilder;
pub use service::Forward;
pub(crate) use upgrade::is_upgrade_request;
pub use upgrade::Tunnel;
pub use upstream::Upstream;
