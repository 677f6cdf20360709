//! Request tracing at the edge: W3C trace context, request ids, one access-log event per
//! request.
//!
//! A request that crosses a gateway, a balancer that retries and a content chain that hops
//! touches several upstreams; without a shared id nobody can put their logs together
//! (PATTERNS §7: "carry a tracing id through every call"). [`RequestTraceLayer`] sits at
//! the edge and:
//!
//! - reads `traceparent` / `tracestate` strictly ([`TraceParent::parse`]): a valid one
//!   continues the caller's trace, anything else starts a new trace (and drops
//!   `tracestate`, which belongs to the refused parent);
//! - keeps a sane `x-request-id` (1–128 visible ASCII bytes) or makes one, sends it
//!   upstream and answers it;
//! - puts a [`TraceContext`] in the request extensions. [`Forward`](crate::proxy::Forward)
//!   turns it into a **child** `traceparent` on every upstream call, so each balancer retry
//!   attempt and each chain hop is its own span of the same trace, and records the call
//!   (attempt count, endpoint). Code inside the gateway reads the context from the
//!   extensions: the request's `traceparent` header stays the caller's until `Forward`
//!   writes the child (one header write per upstream call, none at the edge);
//! - emits one `tracing` event per request, target `tower_patterns::access`, level info,
//!   with `method`, `route` (the configured name, never the raw path), `status`,
//!   `upstream` (`host:port` of the last call or `-`), `attempts`, `duration_ms`,
//!   `trace_id`, `request_id`. A request the client abandoned is logged with status 499.
//!
//! It stacks with tower-http (`TraceLayer` for spans, `SetRequestIdLayer` if you prefer its
//! ids: put it outside and this layer keeps the id) and with axum (`.respond()`).

mod context;
mod future;
mod hex;
mod ids;
mod layer;
mod record;
mod service;

pub(crate) use context::on_upstream_call;
pub use context::{TraceContext, TRACEPARENT, TRACESTATE, X_REQUEST_ID};
pub use future::ResponseFuture;
pub use ids::{SpanId, TraceId, TraceParent};
pub use layer::RequestTraceLayer;
pub use service::RequestTrace;
