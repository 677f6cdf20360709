//! Composition: one JSON answer built from several services (API composition,
//! orchestration, backend-for-frontend).
//!
//! A page or an app screen needs data from several services — the cart and the products
//! it lists, or a checkout that pays, empties the cart and updates the stock. Letting the
//! client call each one costs round trips and couples it to the service layout; doing it in
//! the gateway (PATTERNS §7) raises the question the client no longer sees: what to answer
//! when *some* of the calls fail.
//!
//! - A [`Part`] is one service called through its own
//!   [circuit breaker](crate::breaker), timeout, retries and fallback value.
//! - A [`Call`] is one request to a part (method, path, JSON body, headers, the caller's
//!   [`TraceContext`](crate::trace::TraceContext), an idempotency key for retries that
//!   must not act twice).
//! - A [`PartResult`] is what came back: the outcome (`ok`, `fallback`, `failed`,
//!   `skipped`), the upstream status, the attempts, the JSON body or the error.
//! - A [`Composite`] gathers the results into one JSON answer with a defined status.
//!
//! Concurrent calls are plain futures (`futures_util::future::join_all`, `tokio::join!`);
//! a sequence is plain `await`s — the orchestration stays ordinary Rust.
//!
//! | outcome of the parts | status of [`Composite::response`] |
//! |---|---|
//! | every part `ok` | 200 |
//! | some part `ok` or `fallback`, some not `ok` | 207 (partial; per-part status in the body) |
//! | no part `ok` or `fallback` | 502 |
//!
//! A part's call succeeds on a 2xx answer; 5xx, transport errors and timeouts are retried
//! up to [`Call::tries`] times (the same `Idempotency-Key` on each try); a 4xx is the
//! caller's problem and is not retried. A response body over [`Part::max_body`] is an error
//! (bounded memory whatever an upstream sends).
//!
//! `tests/compose_store.rs` and `examples/api_gateway/` rebuild the Node.js chapter's
//! store: the cart read composition and the checkout orchestration, with its outcome when
//! a step after the payment fails (see `docs/api_gateway.md`).

mod answer;
mod call;
mod part;

pub use answer::{Composite, Outcome, PartResult};
pub use call::{Call, IDEMPOTENCY_KEY};
pub use part::{Part, PartService, DEFAULT_MAX_BODY, DEFAULT_TIMEOUT};
