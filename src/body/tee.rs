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
//! and their peak.
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

use std::fmt;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::sync::{mpsc, Notify};

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

/// A process-wide (or shared) cap on the background drains of [`DisconnectPolicy::Finish`].
///
/// Each client that leaves early would otherwise start its own drain of up to `max_bytes`
/// and `max_time`, with no limit on how many run at once: ten aborted requests pulled
/// 500 MB from an origin. A budget bounds the drains running at once and the bytes they
/// may pull together. A drain reserves what is left of its body when it starts (the rest
/// of `Content-Length`; without one it is charged chunk by chunk); a drain that does not
/// fit is not started, one that passes its share is stopped, and its copies end with
/// [`AbortReason::DrainLimit`]. The reservation is returned when the drain ends.
#[derive(Debug)]
pub struct DrainBudget {
    max_drains: usize,
    max_bytes: u64,
    active: AtomicUsize,
    bytes: AtomicU64,
}

impl DrainBudget {
    /// At most `max_drains` drains at once, pulling at most `max_bytes` together.
    pub fn new(max_drains: usize, max_bytes: u64) -> Arc<Self> {
        Arc::new(DrainBudget {
            max_drains,
            max_bytes,
            active: AtomicUsize::new(0),
            bytes: AtomicU64::new(0),
        })
    }

    /// The budget used when [`TeeOptions::drain_budget`] is `None`: 16 drains and 256 MiB
    /// for the whole process.
    pub fn global() -> &'static Arc<DrainBudget> {
        static GLOBAL: std::sync::OnceLock<Arc<DrainBudget>> = std::sync::OnceLock::new();
        GLOBAL.get_or_init(|| DrainBudget::new(16, 256 << 20))
    }

    /// Drains running now.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// Bytes pulled by the drains running now.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// A slot for one more drain with `reserve` bytes set aside, if both fit.
    fn try_start(self: &Arc<Self>, reserve: u64) -> Option<DrainPermit> {
        let max = self.max_drains;
        self.active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        // From here on, dropping the permit returns the slot (and what it charged).
        let mut permit = DrainPermit {
            budget: self.clone(),
            bytes: 0,
            reserved: 0,
        };
        permit.charge_global(reserve).then(|| {
            permit.reserved = reserve;
            permit
        })
    }
}

/// One running drain's share of a [`DrainBudget`]; returns it on drop.
struct DrainPermit {
    budget: Arc<DrainBudget>,
    /// Bytes charged to the budget (the reservation, plus what was pulled beyond it).
    bytes: u64,
    /// Bytes that may still be pulled without charging more.
    reserved: u64,
}

impl DrainPermit {
    /// Accounts `n` pulled bytes: from the reservation first, then from the budget.
    fn try_charge(&mut self, n: u64) -> bool {
        let from_reserve = n.min(self.reserved);
        self.reserved -= from_reserve;
        self.charge_global(n - from_reserve)
    }

    fn charge_global(&mut self, n: u64) -> bool {
        if n == 0 {
            return true;
        }
        let max = self.budget.max_bytes;
        let ok = self
            .budget
            .bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| {
                b.checked_add(n).filter(|t| *t <= max)
            })
            .is_ok();
        if ok {
            self.bytes += n;
        }
        ok
    }
}

impl Drop for DrainPermit {
    fn drop(&mut self) {
        self.budget.bytes.fetch_sub(self.bytes, Ordering::AcqRel);
        self.budget.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A byte budget shared by every copy queued for one sink (see [`outlet_in`]).
///
/// The per-copy buffer of [`outlet`] bounds one copy; a sink that stalls (its `begin`
/// hangs while an object store retries) collects one such buffer per response. The budget
/// bounds their sum: a chunk that would pass it aborts that copy with
/// [`AbortReason::BudgetExceeded`] (the client is not slowed). Bytes are charged when
/// queued and returned when the sink takes them; a sink that keeps chunks after taking
/// them (a buffered upload) may keep them charged too.
#[derive(Debug)]
pub struct ByteBudget {
    limit: u64,
    used: AtomicU64,
    peak: AtomicU64,
}

impl ByteBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: u64) -> Arc<Self> {
        Arc::new(ByteBudget {
            limit,
            used: AtomicU64::new(0),
            peak: AtomicU64::new(0),
        })
    }

    /// The limit.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Bytes charged now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// The most bytes ever charged at once (never above [`ByteBudget::limit`]).
    pub fn peak(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }

    /// Charges `n` bytes if they fit; `false` (nothing charged) otherwise.
    pub fn try_charge(&self, n: u64) -> bool {
        let limit = self.limit;
        match self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                u.checked_add(n).filter(|t| *t <= limit)
            }) {
            Ok(prev) => {
                self.peak.fetch_max(prev + n, Ordering::Relaxed);
                true
            }
            Err(_) => false,
        }
    }

    /// Returns `n` bytes charged before.
    pub fn release(&self, n: u64) {
        if n != 0 {
            self.used.fetch_sub(n, Ordering::AcqRel);
        }
    }
}

/// Counters of a tee (or of every tee sharing one `Arc`): cheap atomics, read with
/// [`TeeStats::snapshot`].
#[derive(Debug, Default)]
pub struct TeeStats {
    buffered: AtomicUsize,
    peak_buffered: AtomicUsize,
    overflows: AtomicU64,
    upstream_aborts: AtomicU64,
    length_mismatches: AtomicU64,
    client_gone_aborts: AtomicU64,
    drains_started: AtomicU64,
    drain_aborts: AtomicU64,
    drains_refused: AtomicU64,
    drained_bytes: AtomicU64,
    budget_aborts: AtomicU64,
}

/// A point-in-time copy of [`TeeStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TeeStatsSnapshot {
    /// Bytes currently queued for sinks (sent by the tee, not yet consumed).
    pub buffered: usize,
    /// Highest value `buffered` reached.
    pub peak_buffered: usize,
    /// Copies aborted because a sink fell behind.
    pub overflows: u64,
    /// Copies aborted because the upstream body failed.
    pub upstream_aborts: u64,
    /// Copies aborted because the length did not match `Content-Length`.
    pub length_mismatches: u64,
    /// Copies aborted because the client left (policy `Abort`).
    pub client_gone_aborts: u64,
    /// Background drains started after a client left (policy `Finish`).
    pub drains_started: u64,
    /// Background drains stopped by their byte/time cap or the [`DrainBudget`].
    pub drain_aborts: u64,
    /// Drains not started because the [`DrainBudget`] had no free slot (copies aborted).
    pub drains_refused: u64,
    /// Bytes read from upstreams by background drains.
    pub drained_bytes: u64,
    /// Copies aborted because their sink's [`ByteBudget`] was exhausted.
    pub budget_aborts: u64,
}

impl TeeStats {
    /// New zeroed counters.
    pub fn new() -> Arc<Self> {
        Arc::new(TeeStats::default())
    }

    /// Reads every counter.
    pub fn snapshot(&self) -> TeeStatsSnapshot {
        let r = Ordering::Relaxed;
        TeeStatsSnapshot {
            buffered: self.buffered.load(r),
            peak_buffered: self.peak_buffered.load(r),
            overflows: self.overflows.load(r),
            upstream_aborts: self.upstream_aborts.load(r),
            length_mismatches: self.length_mismatches.load(r),
            client_gone_aborts: self.client_gone_aborts.load(r),
            drains_started: self.drains_started.load(r),
            drain_aborts: self.drain_aborts.load(r),
            drains_refused: self.drains_refused.load(r),
            drained_bytes: self.drained_bytes.load(r),
            budget_aborts: self.budget_aborts.load(r),
        }
    }

    fn add_buffered(&self, n: usize) {
        let now = self.buffered.fetch_add(n, Ordering::Relaxed) + n;
        // A plain load first: the read-modify-write only happens on a new peak.
        if now > self.peak_buffered.load(Ordering::Relaxed) {
            self.peak_buffered.fetch_max(now, Ordering::Relaxed);
        }
    }

    /// Counts a copy aborted by its sink's [`ByteBudget`] outside the tee (bytes a writer
    /// kept after taking them).
    pub(crate) fn count_budget_abort(&self) {
        self.budget_aborts.fetch_add(1, Ordering::Relaxed);
    }

    fn sub_buffered(&self, n: usize) {
        self.buffered.fetch_sub(n, Ordering::Relaxed);
    }
}

enum Msg {
    Data(Bytes),
    End,
    Abort(AbortReason),
}

struct Shared {
    /// Bytes sent to this sink and not yet released by it.
    buffered: AtomicUsize,
    /// Wakes a draining tee when the sink released bytes or went away.
    released: Notify,
    /// Set when a drain may wait on `released`; until then releases skip the notify.
    draining: AtomicBool,
    limit: usize,
    /// The budget shared with the sink's other copies, if any.
    budget: Option<Arc<ByteBudget>>,
    /// Set once by the tee that takes the outlet.
    stats: std::sync::OnceLock<Arc<TeeStats>>,
}

/// The tee side of one sink's channel. Give it to [`TeeBody::new`].
pub struct Outlet {
    tx: Option<mpsc::UnboundedSender<Msg>>,
    shared: Arc<Shared>,
}

/// The sink side of one sink's channel: call [`Inlet::next`] until `End` or `Abort`.
pub struct Inlet {
    rx: mpsc::UnboundedReceiver<Msg>,
    shared: Arc<Shared>,
    /// Length of the chunk handed out last; released at the next call (the sink is done
    /// with it by then) or on drop.
    held: usize,
    finished: bool,
}

/// What the sink receives next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// The next chunk of the body.
    Data(Bytes),
    /// The whole body arrived and its length was right: commit.
    End,
    /// The copy is abandoned: discard everything written so far.
    Abort(AbortReason),
}

/// A channel for one sink whose queue may hold at most `buffer` bytes (one chunk larger than
/// the buffer is let through when the queue is empty, so tiny buffers still work).
pub fn outlet(buffer: usize) -> (Outlet, Inlet) {
    make_outlet(buffer, None)
}

/// Like [`outlet`], and every queued byte is also charged to `budget`, shared with the
/// other copies to the same sink: a chunk that does not fit aborts this copy.
pub fn outlet_in(buffer: usize, budget: Arc<ByteBudget>) -> (Outlet, Inlet) {
    make_outlet(buffer, Some(budget))
}

fn make_outlet(buffer: usize, budget: Option<Arc<ByteBudget>>) -> (Outlet, Inlet) {
    let (tx, rx) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        buffered: AtomicUsize::new(0),
        released: Notify::new(),
        draining: AtomicBool::new(false),
        limit: buffer,
        budget,
        stats: std::sync::OnceLock::new(),
    });
    (
        Outlet {
            tx: Some(tx),
            shared: shared.clone(),
        },
        Inlet {
            rx,
            shared,
            held: 0,
            finished: false,
        },
    )
}

impl Inlet {
    /// Waits for the next event. After `End` or `Abort`, returns `Abort(Dropped)` forever.
    pub async fn next(&mut self) -> Next {
        self.release_held();
        if self.finished {
            return Next::Abort(AbortReason::Dropped);
        }
        match self.rx.recv().await {
            Some(Msg::Data(b)) => {
                self.held = b.len();
                Next::Data(b)
            }
            Some(Msg::End) => {
                self.finished = true;
                Next::End
            }
            Some(Msg::Abort(r)) => {
                self.finished = true;
                Next::Abort(r)
            }
            None => {
                self.finished = true;
                Next::Abort(AbortReason::Dropped)
            }
        }
    }

    fn release(&self, n: usize) {
        if n == 0 {
            return;
        }
        self.shared.buffered.fetch_sub(n, Ordering::SeqCst);
        if let Some(b) = &self.shared.budget {
            b.release(n as u64);
        }
        if let Some(s) = self.shared.stats.get() {
            s.sub_buffered(n);
        }
        if self.shared.draining.load(Ordering::SeqCst) {
            self.shared.released.notify_one();
        }
    }

    fn release_held(&mut self) {
        let n = std::mem::take(&mut self.held);
        self.release(n);
    }
}

impl Drop for Inlet {
    fn drop(&mut self) {
        self.release_held();
        // Closing first makes every later send fail, so the queue can be emptied for good.
        self.rx.close();
        while let Ok(msg) = self.rx.try_recv() {
            if let Msg::Data(b) = msg {
                self.release(b.len());
            }
        }
        self.shared.released.notify_one();
    }
}

impl fmt::Debug for Inlet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Inlet")
            .field("limit", &self.shared.limit)
            .finish()
    }
}

impl fmt::Debug for Outlet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Outlet")
            .field("limit", &self.shared.limit)
            .field("open", &self.tx.is_some())
            .finish()
    }
}

impl Outlet {
    fn is_open(&self) -> bool {
        self.tx.as_ref().is_some_and(|tx| !tx.is_closed())
    }

    /// Queues `chunk` without waiting. Returns `false` if the copy was abandoned.
    fn try_send(&mut self, chunk: &Bytes) -> bool {
        if self.tx.is_none() {
            return false;
        }
        let len = chunk.len();
        let prev = self.shared.buffered.fetch_add(len, Ordering::AcqRel);
        if prev != 0 && prev + len > self.shared.limit {
            self.shared.buffered.fetch_sub(len, Ordering::AcqRel);
            if let Some(s) = self.shared.stats.get() {
                s.overflows.fetch_add(1, Ordering::Relaxed);
            }
            tracing::warn!(
                limit = self.shared.limit,
                "backup copy aborted: sink fell behind its buffer"
            );
            self.abort(AbortReason::Overflow {
                limit: self.shared.limit,
            });
            return false;
        }
        if !self.charge_budget(len) {
            self.shared.buffered.fetch_sub(len, Ordering::AcqRel);
            return false;
        }
        self.push(chunk)
    }

    /// Charges `len` bytes to the sink's shared budget; on failure aborts this copy.
    fn charge_budget(&mut self, len: usize) -> bool {
        let Some(b) = &self.shared.budget else {
            return true;
        };
        if b.try_charge(len as u64) {
            return true;
        }
        let limit = b.limit();
        if let Some(s) = self.shared.stats.get() {
            s.budget_aborts.fetch_add(1, Ordering::Relaxed);
        }
        tracing::warn!(
            limit,
            "backup copy aborted: the sink's byte budget is exhausted"
        );
        self.abort(AbortReason::BudgetExceeded { limit });
        false
    }

    /// Queues `chunk`, waiting while the sink's buffer is full (drain mode only).
    async fn send_waiting(&mut self, chunk: &Bytes) -> bool {
        let len = chunk.len();
        // Set before reading the count, so a release after the read always notifies.
        self.shared.draining.store(true, Ordering::SeqCst);
        loop {
            if !self.is_open() {
                self.tx = None;
                return false;
            }
            let cur = self.shared.buffered.load(Ordering::SeqCst);
            if cur == 0 || cur + len <= self.shared.limit {
                break;
            }
            self.shared.released.notified().await;
        }
        // The shared budget is not waited for: other copies may hold it for long.
        if !self.charge_budget(len) {
            return false;
        }
        self.shared.buffered.fetch_add(len, Ordering::AcqRel);
        self.push(chunk)
    }

    /// Sends a chunk whose bytes were already added to `shared.buffered`. The global
    /// count goes up before the send so the sink can never subtract first.
    fn push(&mut self, chunk: &Bytes) -> bool {
        let len = chunk.len();
        let stats = self.shared.stats.get();
        if let Some(s) = stats {
            s.add_buffered(len);
        }
        if self
            .tx
            .as_ref()
            .is_some_and(|tx| tx.clone_send(chunk.clone()))
        {
            return true;
        }
        // The sink went away (it reports its own error).
        if let Some(s) = stats {
            s.sub_buffered(len);
        }
        if let Some(b) = &self.shared.budget {
            b.release(len as u64);
        }
        self.shared.buffered.fetch_sub(len, Ordering::AcqRel);
        self.tx = None;
        false
    }

    fn end(&mut self) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(Msg::End);
        }
    }

    fn abort(&mut self, reason: AbortReason) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(Msg::Abort(reason));
        }
    }
}

trait SendExt {
    fn clone_send(&self, b: Bytes) -> bool;
}

impl SendExt for mpsc::UnboundedSender<Msg> {
    #[inline]
    fn clone_send(&self, b: Bytes) -> bool {
        self.send(Msg::Data(b)).is_ok()
    }
}

type DrainFn<B> = fn(Pin<Box<B>>, Drain);

/// State handed to the background task that finishes the copies after a disconnect.
struct Drain {
    outlets: Vec<Outlet>,
    seen: u64,
    expected: Option<u64>,
    policy: DisconnectPolicy,
    stats: Arc<TeeStats>,
    budget: Arc<DrainBudget>,
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
            drain: spawn_drain::<B>,
        }
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
            drain: spawn_drain::<B>,
        }
    }
}

impl<B> TeeBody<B> {
    /// Number of sinks still receiving a copy.
    pub fn active_sinks(&self) -> usize {
        self.outlets.iter().filter(|o| o.tx.is_some()).count()
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

fn check_len(expected: Option<u64>, seen: u64) -> Result<(), AbortReason> {
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

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let res = std::task::ready!(inner.as_mut().poll_frame(cx));
        match res {
            Some(Ok(frame)) => {
                // hyper stops polling once a body says it ended, so finish here too.
                let ended = inner.is_end_stream();
                if let Some(data) = frame.data_ref() {
                    this.seen += data.len() as u64;
                    if !this.outlets.is_empty() {
                        if let Some(e) = this.expected.filter(|e| this.seen > *e) {
                            this.stats.length_mismatches.fetch_add(1, Ordering::Relaxed);
                            this.abort_all(AbortReason::TooLong { expected: e });
                        } else {
                            this.outlets.retain_mut(|o| o.try_send(data));
                        }
                    }
                }
                if ended {
                    this.inner = None;
                    this.finish();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => {
                if !this.outlets.is_empty() {
                    this.stats.upstream_aborts.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!("backup copies aborted: upstream body failed");
                }
                this.inner = None;
                this.abort_all(AbortReason::Upstream);
                Poll::Ready(Some(Err(e)))
            }
            None => {
                this.inner = None;
                this.finish();
                Poll::Ready(None)
            }
        }
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

/// Runs when the client dropped the body before its end (generic, so it knows `B: Body`).
fn spawn_drain<B>(body: Pin<Box<B>>, mut d: Drain)
where
    B: Body<Data = Bytes> + Send + 'static,
{
    if body.is_end_stream() {
        d.finish();
        return;
    }
    match d.policy {
        DisconnectPolicy::Finish { max_bytes, .. }
            if tokio::runtime::Handle::try_current().is_ok() =>
        {
            // What is left of a body of known length is reserved up front, so drains
            // that cannot all finish are not started. A rest beyond the per-drain cap
            // would be stopped anyway: reserving it fails the same way.
            let rest = d.expected.map_or(0, |e| e.saturating_sub(d.seen));
            let permit = (rest <= max_bytes)
                .then(|| d.budget.try_start(rest))
                .flatten();
            let Some(permit) = permit else {
                d.stats.drains_refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    received = d.seen,
                    "client left and the drain budget is full; backup copies aborted"
                );
                return d.abort(AbortReason::DrainLimit);
            };
            d.stats.drains_started.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(
                received = d.seen,
                "client left; finishing backup copies in the background"
            );
            tokio::spawn(run_drain(body, d, permit));
        }
        _ => {
            d.stats.client_gone_aborts.fetch_add(1, Ordering::Relaxed);
            tracing::info!(received = d.seen, "client left; backup copies aborted");
            d.abort(AbortReason::ClientGone);
        }
    }
}

impl Drain {
    fn finish(&mut self) {
        match check_len(self.expected, self.seen) {
            Ok(()) => self.outlets.iter_mut().for_each(Outlet::end),
            Err(r) => {
                self.stats.length_mismatches.fetch_add(1, Ordering::Relaxed);
                self.abort(r);
            }
        }
    }

    fn abort(&mut self, reason: AbortReason) {
        for o in &mut self.outlets {
            o.abort(reason.clone());
        }
    }
}

async fn run_drain<B>(mut body: Pin<Box<B>>, mut d: Drain, mut permit: DrainPermit)
where
    B: Body<Data = Bytes> + Send + 'static,
{
    let DisconnectPolicy::Finish {
        max_bytes,
        max_time,
    } = d.policy
    else {
        return d.abort(AbortReason::ClientGone);
    };
    let now = tokio::time::Instant::now();
    // A configured `Duration::MAX` means "no practical limit", not a panic.
    let deadline = now
        .checked_add(max_time)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 86_400));
    let start = d.seen;
    let reason = loop {
        if d.outlets.iter().all(|o| !o.is_open()) {
            return;
        }
        let frame = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx));
        // The error is dropped at once: only its occurrence matters here.
        let frame = match tokio::time::timeout_at(deadline, frame).await {
            Ok(f) => f.map(|r| r.map_err(drop)),
            Err(_) => break AbortReason::DrainLimit,
        };
        match frame {
            Some(Ok(frame)) => {
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                let n = data.len() as u64;
                d.seen += n;
                d.stats.drained_bytes.fetch_add(n, Ordering::Relaxed);
                if d.seen - start > max_bytes || !permit.try_charge(n) {
                    break AbortReason::DrainLimit;
                }
                if let Some(e) = d.expected.filter(|e| d.seen > *e) {
                    break AbortReason::TooLong { expected: e };
                }
                let sends = async {
                    for o in &mut d.outlets {
                        o.send_waiting(&data).await;
                    }
                };
                if tokio::time::timeout_at(deadline, sends).await.is_err() {
                    break AbortReason::DrainLimit;
                }
            }
            Some(Err(_)) => break AbortReason::Upstream,
            None => match check_len(d.expected, d.seen) {
                Ok(()) => {
                    d.outlets.iter_mut().for_each(Outlet::end);
                    tracing::debug!(bytes = d.seen, "background drain finished");
                    return;
                }
                Err(r) => break r,
            },
        }
    };
    match reason {
        AbortReason::DrainLimit => d.stats.drain_aborts.fetch_add(1, Ordering::Relaxed),
        AbortReason::Upstream => d.stats.upstream_aborts.fetch_add(1, Ordering::Relaxed),
        _ => d.stats.length_mismatches.fetch_add(1, Ordering::Relaxed),
    };
    tracing::warn!(%reason, "background drain aborted the backup copies");
    d.abort(reason);
}
