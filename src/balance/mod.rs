//! Load balancing over a dynamic set of endpoints: round robin, smooth weighted round
//! robin, least pending (power of two choices), consistent hashing, sticky cookies, passive
//! health, and retry on the next endpoint.
//!
//! The problem (seed 001): one instance of a service is a single point of failure and a
//! throughput ceiling. Replicate it (a cluster of workers, or independent instances on
//! different ports), then spread the requests over the replicas — in a reverse proxy in front
//! of them (nginx `upstream`), or in the client itself (peer-to-peer, the seed's
//! `balancedRequest`). Replicas come and go (crashes, restarts, autoscaling, a registry), so
//! the set is dynamic; some sessions keep state in one replica, so some requests must
//! *stick*; a replica that fails must be avoided for a while and a request it failed must go
//! to another.
//!
//! [`Balance`] is a [`tower::Service`] over a set of endpoint services fed by a
//! [`tower::discover::Discover`] (or a static list). Each endpoint is any service — a
//! [`Forward`](crate::proxy::Forward) for a reverse proxy (all sharing one connection pool
//! through `Forward::to`), an [`client::Origin`] for a client, or your own.
//!
//! ```
//! use bytes::Bytes;
//! use http_body_util::Full;
//! use tower::ServiceExt;
//! use tower_patterns::balance::{Balance, PassiveHealth, Picker, Retry};
//! use tower_patterns::proxy::Forward;
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! // Two instances: one answers, the other's port is closed.
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
//! let live = format!("http://{}", listener.local_addr().unwrap());
//! tokio::spawn(tower_patterns::server::serve(listener, tower::service_fn(|_req| async {
//!     Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::from("hi"))))
//! })));
//! let dead = "http://127.0.0.1:1";
//!
//! let first = Forward::<Full<Bytes>>::new(dead).unwrap();
//! let lb = Balance::builder()
//!     .picker(Picker::RoundRobin)                 // nginx upstream default
//!     .health(PassiveHealth::default())           // max_fails=1 fail_timeout=10s
//!     .retry(Retry::default())                    // proxy_next_upstream error timeout
//!     .build_static([("dead", first.clone()), ("live", first.to(&live).unwrap())]);
//!
//! // The refused connection is retried on "live"; "dead" is ejected for 10 s.
//! for _ in 0..4 {
//!     let res = lb.clone().oneshot(http::Request::get("/").body(Full::default()).unwrap()).await.unwrap();
//!     assert_eq!(res.status(), 200);
//! }
//! assert!(lb.endpoints().iter().any(|e| e.key == "dead" && e.failures == 1));
//! # });
//! ```
//!
//! # Semantics
//!
//! | situation | behaviour |
//! |---|---|
//! | membership change from the `Discover` | a new immutable snapshot is built off the request path and swapped in atomically ([`arc_swap`]); endpoints that stay keep their counters and health |
//! | picking | no lock: the snapshot is loaded, counters are atomics; see [`Picker`]; an unavailable endpoint's turn is split evenly among the others |
//! | endpoint ejected or its [`Gate`](crate::gate::Gate) refuses | skipped; the picker moves on |
//! | empty set | [`BalanceError::NoEndpoints`] → **502** (as the seed's registry balancer and nginx) |
//! | endpoints exist, none available | [`BalanceError::Unavailable`] → **503** (as HAProxy and Envoy) |
//! | ... with [`queue_timeout`](BalanceBuilder::queue_timeout) | the request waits up to the timeout for an endpoint, re-picking on every set change |
//! | sticky cookie valid and its endpoint available | that endpoint, no `Set-Cookie` |
//! | sticky cookie missing, forged or tampered | ignored; picked normally and `Set-Cookie` names the endpoint |
//! | sticky endpoint gone, ejected, refused, or failed and retried | picked again, cookie rewritten (HAProxy `option redispatch`) |
//! | response or error classified as failure ([`BalanceBuilder::classify`]) | counted by passive health: `max_fails` within `fail_timeout` eject for `fail_timeout`, then exactly one trial request (success restores, failure re-ejects) |
//! | no response head within the [per-try timeout](BalanceBuilder::try_timeout) (default 10 s) | the try is cancelled and counts as a timeout failure ([`TryTimeout`]); retried under the rules below; **504** if no try answers |
//! | client-caused failure ([`FailureKind::Client`](crate::classify::FailureKind::Client): its body broke, local EMFILE) | neither counted nor retried; **400** (408/413 past body limits; 503 for local resources) |
//! | connect error (nothing sent) | retried on another endpoint, any method, if the body can be copied ([`CloneBody`]) |
//! | other failure matching [`Retry::on`] | retried for idempotent methods only (unless [`Retry::non_idempotent`]) |
//! | retries | bounded by [`Retry::tries`] and [`Retry::timeout`]; never the same endpoint twice per request |
//! | request cancelled | in-flight count and gate permit released, no outcome recorded |
//!
//! Observability: [`Balance::endpoints`] returns each endpoint's [`EndpointStatus`] (state,
//! in flight, requests, failures); `tracing` logs `endpoint ejected` (warn), `endpoint
//! restored on probation` (info, its trial request), `endpoint restored` (info),
//! membership changes (info) and retries (debug).
mod attempt;
mod builder;
mod call;
pub mod client;
pub mod discover;
mod driver;
mod endpoint;
mod error;
mod future;
mod guard;
mod hash;
mod kept;
mod local;
mod outcome;
mod pick;
mod picker;
mod replay;
mod retry;
mod service;
mod shared;
mod spare;
mod sticky;

pub use crate::classify::is_connect_error;
// Kept at their old paths so existing imports compile; they live in the neutral modules.
pub use crate::error::error_status;
pub use crate::respond::error_response;
pub use driver::Driver;
pub use endpoint::{EndpointState, EndpointStatus, PassiveHealth};
pub use error::{BalanceError, BuildError, StickyError, TryTimeout};
pub use future::ResponseFuture;
pub use hash::hash_bytes;
pub use picker::{HashKey, Picker};
// The ketama ring, shared with the edge cache's sibling lookup (one ring in the crate).
pub use builder::{BalanceBuilder, Built, DEFAULT_TRY_TIMEOUT};
pub(crate) use pick::build_ring;
pub use replay::{Replay, ReplayFuture, ReplayLayer};
pub use retry::{CloneBody, Retry};
pub use service::{Balance, MakeGate, NoGates};
pub use shared::SharedHealth;
pub use sticky::{SameSite, StickyCookie};
