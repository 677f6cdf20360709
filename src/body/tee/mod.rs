//! A response body that streams to the client and copies every chunk to one or more sinks.
//!
//! The backup pipe splits one download into several pipes: the client, a storage backup and
//! a cache. [`TeeBody`] is that split. The client side is the body itself: it yields the
//! upstream's frames as they arrive, never waiting for a sink. Each sink gets an [`Outlet`]
//! (tee side) / [`Inlet`] (sink side) pair created by [`outlet`]:
//!
//! | situation | client | that sink's copy |
//! |---|---|---|
//! | sink keeps up | streams | receives every chunk (a [`Bytes`] clone, no copy), then [`Next::End`] |
//! | sink falls behind by more than its byte buffer | streams | [`Next::Abort`]`(`[`AbortReason::Overflow`]`)` |
//! | sink fails (drops its [`Inlet`]) | streams | gone; the tee stops sending to it |
//! | upstream body errors | gets the error | [`AbortReason::Upstream`] |
//! | body ends short of / past `Content-Length` | streams what came | [`AbortReason::Truncated`] / [`AbortReason::TooLong`] |
//! | client drops the body early, [`DisconnectPolicy::Abort`] | — | [`AbortReason::ClientGone`] |
//! | client drops the body early, [`DisconnectPolicy::Finish`] (default) | — | a spawned task keeps pulling the upstream (within a byte and time cap), waiting for the sinks instead of overflowing them; over its byte/time cap or the global [`DrainBudget`] (concurrent drains and their bytes): [`AbortReason::DrainLimit`] |
//! | every copy to one sink together passes its [`ByteBudget`] ([`outlet_in`]) | streams | [`AbortReason::BudgetExceeded`] |
//!
//! A sink commits only on [`Next::End`], which the tee sends only when the whole body
//! arrived and its length matched `Content-Length` (when there was one). Memory per sink is
//! bounded by its buffer plus one chunk; [`TeeStats`] tracks the bytes held across sinks
//! and their peak (counted when a batch is handed over).
//!
//! With [`TeeBody::batched`] (what the backup layer uses) chunks reach a sink in batches
//! of up to a quarter of its buffer (at most 256 KiB), which [`Inlet::next_batch`] hands
//! out whole: a per-chunk channel send and sink wake-up cost as much as the rest of the
//! body's path, and a copy stored only at its end gains nothing from seeing each chunk at
//! once.
//!
//! ```
//! use bytes::Bytes;
//! use http_body_util::{BodyExt, Full};
//! use tower_patterns::body::tee::{outlet, Next, TeeBody, TeeOptions};
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let (out, mut inlet) = outlet(1 << 20);
//! let body = TeeBody::new(Full::new(Bytes::from("hello")), vec![out], &TeeOptions::default());
//! let copy = tokio::spawn(async move {
//!     let mut got = Vec::new();
//!     loop {
//!         match inlet.next().await {
//!             Next::Data(b) => got.extend_from_slice(&b),
//!             Next::End => return Some(got),
//!             Next::Abort(_) => return None,
//!         }
//!     }
//! });
//! assert_eq!(body.collect().await.unwrap().to_bytes(), "hello");
//! assert_eq!(copy.await.unwrap().as_deref(), Some(&b"hello"[..]));
//! # });
//! ```

mod budget;
mod channel;
mod drain;
mod stats;
#[cfg(test)]
mod tests;

use std::fmt;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

pub use budget::{ByteBudget, DrainBudget};
pub use channel::{outlet, outlet_in, Inlet, Next, NextBatch, Outlet};
pub use stats::{TeeStats, TeeStatsSnapshot};

use drain::{spawn_drain, Drain, DrainFn};

/// Why a sink's copy was abandoned. The sink must discard what it wrote.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AbortReason {
    /// The sink fell behind the client by more than its buffer.
    #[error("sink fell behind by more than its {limit}-byte buffer")]
    Overflow {
        /// The configured buffer.
        limit: usize,
    },
    /// The upstream body failed.
    #[error("upstream body failed")]
    Upstream,
    /// The body ended before `Content-Length` bytes arrived.
    #[error("body truncated: {received} of {expected} bytes")]
    Truncated {
        /// `Content-Length`.
        expected: u64,
        /// Bytes that arrived.
        received: u64,
    },
    /// The body went on past `Content-Length`.
    #[error("body longer than its Content-Length of {expected} bytes")]
    TooLong {
        /// `Content-Length`.
        expected: u64,
    },
    /// The client went away and the policy is [`DisconnectPolicy::Abort`] (or no runtime
    /// was available to finish the copy).
    #[error("client disconnected")]
    ClientGone,
    /// The client went away and finishing the copy would pass the byte or time cap of
    /// [`DisconnectPolicy::Finish`].
    #[error("client disconnected and the rest exceeded the drain cap")]
    DrainLimit,
    /// The tee was dropped without saying why (for example a runtime shutting down).
    #[error("tee dropped")]
    Dropped,
    /// Queueing the chunk would pass the byte budget shared by every copy to this sink
    /// (see [`ByteBudget`]): a stalled sink must not grow memory without bound.
    #[error("sink's global {limit}-byte budget exhausted")]
    BudgetExceeded {
        /// The budget.
        limit: u64,
    },
}

/// What happens to the sinks when the client drops the body before its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DisconnectPolicy {
    /// Abort every sink's copy at once.
    Abort,
    /// Keep pulling the upstream in a spawned task so the copies complete, as long as the
    /// remaining body is at most `max_bytes` and arrives within `max_time`; otherwise abort.
    /// With no client to protect, the task waits for slow sinks instead of overflowing them.
    Finish {
        /// Bytes that may still be read after the disconnect.
        max_bytes: u64,
        /// Time allowed for the rest of the body after the disconnect.
        max_time: Duration,
    },
}

impl Default for DisconnectPolicy {
    /// `Finish` with 256 MiB / 60 s: the download someone started is worth completing.
    fn default() -> Self {
        DisconnectPolicy::Finish {
            max_bytes: 256 << 20,
            max_time: Duration::from_secs(60),
        }
    }
}

/// Options shared by the outlets of one [`TeeBody`].
#[derive(Debug, Clone, Default)]
pub struct TeeOptions {
    /// `Content-Length` of the response, if any: a copy commits only if it matches.
    pub expected_len: Option<u64>,
    /// Client-disconnect behaviour.
    pub on_disconnect: DisconnectPolicy,
    /// Counters to update (a fresh, unshared set when `None`).
    pub stats: Option<Arc<TeeStats>>,
    /// The cap on background drains this tee may join ([`DrainBudget::global`] when
    /// `None`).
    pub drain_budget: Option<Arc<DrainBudget>>,
}

/// The body returned to the client: the upstream's frames, copied to the outlets. See the
/// [module docs](self).
pub struct TeeBody<B> {
    inner: Option<Pin<Box<B>>>,
    outlets: Vec<Outlet>,
    seen: u64,
    expected: Option<u64>,
    policy: DisconnectPolicy,
    stats: Arc<TeeStats>,
    drain_budget: Option<Arc<DrainBudget>>,
    paced: bool,
    /// Spawns the drain; a fn pointer made where `B: Send + 'static` is known, so `Drop`
    /// needs no bounds.
    drain: DrainFn<B>,
}

impl<B> fmt::Debug for TeeBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TeeBody")
            .field("outlets", &self.outlets.len())
            .field("seen", &self.seen)
            .field("expected", &self.expected)
            .finish()
    }
}

impl<B> TeeBody<B>
where
    B: Body<Data = Bytes> + Send + 'static,
{
    /// Tees `body` into `outlets`.
    pub fn new(body: B, outlets: Vec<Outlet>, opts: &TeeOptions) -> Self {
        let stats = opts.stats.clone().unwrap_or_default();
        for o in &outlets {
            let _ = o.shared.stats.set(stats.clone());
        }
        TeeBody {
            inner: Some(Box::pin(body)),
            outlets,
            seen: 0,
            expected: opts.expected_len,
            policy: opts.on_disconnect,
            stats,
            drain_budget: opts.drain_budget.clone(),
            paced: false,
            drain: spawn_drain::<B>,
        }
    }

    /// Reads the upstream no faster than the slowest sink writes: before each frame the
    /// tee waits until every sink has at most half its buffer queued, so no copy
    /// overflows. The reader then waits for the sinks: for back-fill fetches (see
    /// [`backfill`](crate::backup::backfill())), never for real clients.
    pub fn paced(mut self, paced: bool) -> Self {
        self.paced = paced;
        if paced {
            for o in &mut self.outlets {
                o.set_batching(false);
            }
        }
        self
    }

    /// Sends the copies in batches (off by default): chunks are gathered per sink until a
    /// quarter of its buffer (at most 256 KiB) or the end of the body, then accounted and
    /// handed to the sink at once, one wake-up instead of one per chunk. (A full batch whose
    /// last chunk nothing else holds, a fresh allocation, leaves with the next chunk: freed
    /// at once with the newest allocation, it would make glibc trim the heap.) Memory stays
    /// bounded by the same buffer and budget. For copies that are only stored at the end
    /// (backups); not for a reader that must see each chunk as it arrives. Ignored when
    /// [`paced`](Self::paced): a paced tee waits for the sink after every chunk.
    pub fn batched(mut self, on: bool) -> Self {
        let on = on && !self.paced;
        for o in &mut self.outlets {
            o.set_batching(on);
        }
        self
    }

    /// A body that only streams (no sink): what a layer returns for a response it does
    /// not copy.
    pub fn passthrough(body: B) -> Self {
        TeeBody {
            inner: Some(Box::pin(body)),
            outlets: Vec::new(),
            seen: 0,
            expected: None,
            policy: DisconnectPolicy::Abort,
            stats: Arc::default(),
            drain_budget: None,
            paced: false,
            drain: spawn_drain::<B>,
        }
    }
}

impl<B> TeeBody<B> {
    /// Number of sinks still receiving a copy.
    pub fn active_sinks(&self) -> usize {
        self.outlets.iter().filter(|o| o.is_active()).count()
    }

    /// Copies one data chunk to the outlets (there is at least one).
    #[inline]
    fn send(&mut self, data: &Bytes) {
        if self.expected.is_some_and(|e| self.seen > e) {
            return self.too_long();
        }
        let paced = self.paced;
        // One sink (the usual case) without `retain_mut`'s bookkeeping.
        if let [o] = self.outlets.as_mut_slice() {
            if !o.try_send(data, paced) {
                self.outlets.clear();
            }
        } else {
            self.outlets.retain_mut(|o| o.try_send(data, paced));
        }
    }

    #[cold]
    #[inline(never)]
    fn too_long(&mut self) {
        if let Some(e) = self.expected {
            self.stats.length_mismatches.fetch_add(1, Ordering::Relaxed);
            self.abort_all(AbortReason::TooLong { expected: e });
        }
    }

    /// The inner body failed (`failed`) or ended (`None`, also after it was finished).
    #[cold]
    #[inline(never)]
    fn ended(&mut self, failed: bool) {
        self.inner = None;
        if !failed {
            return self.finish();
        }
        if !self.outlets.is_empty() {
            self.stats.upstream_aborts.fetch_add(1, Ordering::Relaxed);
            tracing::warn!("backup copies aborted: upstream body failed");
        }
        self.abort_all(AbortReason::Upstream);
    }

    fn abort_all(&mut self, reason: AbortReason) {
        for o in &mut self.outlets {
            o.abort(reason.clone());
        }
        self.outlets.clear();
    }

    fn finish(&mut self) {
        match check_len(self.expected, self.seen) {
            Ok(()) => {
                for o in &mut self.outlets {
                    o.end();
                }
                self.outlets.clear();
            }
            Err(reason) => {
                if !self.outlets.is_empty() {
                    self.stats.length_mismatches.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%reason, "backup copies aborted");
                }
                self.abort_all(reason);
            }
        }
    }
}

pub(super) fn check_len(expected: Option<u64>, seen: u64) -> Result<(), AbortReason> {
    match expected {
        Some(e) if seen < e => Err(AbortReason::Truncated {
            expected: e,
            received: seen,
        }),
        Some(e) if seen > e => Err(AbortReason::TooLong { expected: e }),
        _ => Ok(()),
    }
}

impl<B> Body for TeeBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    // The inner result is inspected by reference and returned as it came, not taken
    // apart and rebuilt: a `Frame` is ~100 bytes (its trailers variant holds a
    // `HeaderMap`), and moving it out and back in cost ~25 instructions per chunk. The
    // rare cases (error, end, a copy that ran too long) are out of line.
    #[inline]
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        // One result, built in one place and returned on every path.
        let res = match this.inner.as_mut() {
            Some(_) if this.paced && !this.outlets.iter().all(|o| o.poll_room(cx)) => Poll::Pending,
            Some(inner) => inner.as_mut().poll_frame(cx),
            None => Poll::Ready(None),
        };
        // The body is polled about twice per chunk (a socket read is pending first);
        // answering `Pending` as itself skips copying the whole result.
        if res.is_pending() {
            return Poll::Pending;
        }
        if let Poll::Ready(Some(Ok(frame))) = &res {
            if let Some(data) = frame.data_ref() {
                this.seen += data.len() as u64;
                if !this.outlets.is_empty() {
                    this.send(data);
                }
            }
            // hyper stops polling once a body says it ended, so finish here too (not
            // needed once no sink is left: finishing then has nothing to do).
            if !this.outlets.is_empty() && this.inner.as_ref().is_some_and(|b| b.is_end_stream()) {
                this.inner = None;
                this.finish();
            }
        } else if let Poll::Ready(end) = &res {
            this.ended(end.is_some());
        }
        res
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Some(b) => b.size_hint(),
            None => SizeHint::with_exact(0),
        }
    }
}

impl<B> Drop for TeeBody<B> {
    fn drop(&mut self) {
        if self.outlets.is_empty() {
            return;
        }
        let Some(inner) = self.inner.take() else {
            self.finish();
            return;
        };
        let drain = Drain {
            outlets: std::mem::take(&mut self.outlets),
            seen: self.seen,
            expected: self.expected,
            policy: self.policy,
            stats: self.stats.clone(),
            budget: self
                .drain_budget
                .clone()
                .unwrap_or_else(|| DrainBudget::global().clone()),
        };
        (self.drain)(inner, drain);
    }
}
