//! The per-sink channel: [`Outlet`] (tee side) and [`Inlet`] (sink side), with the byte
//! accounting that bounds what a sink may fall behind.
//!
//! Chunks are sent in batches. Sending each chunk on its own cost a channel push, a wake-up
//! of the sink's task, and four atomic read-modify-writes on each side (queued bytes, byte
//! budget, stats) per chunk: as much as the rest of the body's path. The outlet gathers
//! chunks until a batch threshold (a quarter of the buffer, at most 256 KiB) is crossed or
//! the body ends, and accounts and sends them as one message; the inlet hands the chunks
//! out one by one ([`Inlet::next`]) or as the whole batch ([`Inlet::next_batch`]) and
//! releases the batch once the sink asks for more. The bounds do
//! not loosen: gathered chunks count against the buffer when they are gathered, and the
//! byte budget is charged ahead in batch-sized credits (returned when the copy ends), so
//! the budget never holds less than what is really queued.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use tokio::sync::{mpsc, Notify};

use super::{AbortReason, ByteBudget, TeeStats};

pub(super) enum Msg {
    Data(Bytes),
    /// Several chunks, accounted together: their total length.
    Batch(Vec<Bytes>, usize),
    End,
    Abort(AbortReason),
}

pub(super) struct Shared {
    /// Bytes sent to this sink and not yet released by it.
    pub(super) buffered: AtomicUsize,
    /// Wakes a draining tee when the sink released bytes or went away.
    pub(super) released: Notify,
    /// Set when a drain may wait on `released` (or a paced tee on `room`); until then
    /// releases skip the wake-ups.
    pub(super) draining: AtomicBool,
    /// Wakes a paced tee ([`TeeOptions::paced`](super::TeeOptions::paced)) waiting for room.
    pub(super) room: AtomicWaker,
    pub(super) limit: usize,
    /// The budget shared with the sink's other copies, if any.
    pub(super) budget: Option<Arc<ByteBudget>>,
    /// Set once by the tee that takes the outlet.
    pub(super) stats: std::sync::OnceLock<Arc<TeeStats>>,
}

/// The most bytes gathered into one batch. Not larger: the chunks of a batch stay alive
/// until the sink has taken them, so the memory a streaming body touches grows with the
/// batch. At 1 MiB (two batches alive: 2 MiB, past this machine's 1 MiB L2 per core) the
/// 1 GiB bench of freshly written 64 KiB chunks fell from 0.88x to 0.79x of plain
/// streaming, although the per-batch work per chunk fell by a third; at 256 KiB the
/// chunks are still in cache when the sink drops them and the allocator hands them out
/// again.
pub(super) const MAX_BATCH: usize = 256 << 10;

/// The tee side of one sink's channel. Give it to [`TeeBody::new`](super::TeeBody::new).
pub struct Outlet {
    tx: Option<mpsc::UnboundedSender<Msg>>,
    pub(super) shared: Arc<Shared>,
    /// Chunks gathered for the next batch, and their length (counted against the buffer
    /// and charged to the budget, not yet in `shared.buffered`).
    pending: Vec<Bytes>,
    pending_len: usize,
    /// Send once `pending_len` reaches this; 0 sends every chunk on its own.
    batch: usize,
    /// Bytes charged to the byte budget ahead of use (see the module docs).
    credit: u64,
    /// An upper bound on `shared.buffered`: its value when this outlet last added to it
    /// (or read it), plus what it added since. Only the sink lowers the count, so while
    /// this bound leaves room the real count does too, and the per-chunk overflow check
    /// needs no read of a cache line the sink's thread writes.
    pub(super) queued_hint: usize,
}

/// The sink side of one sink's channel: call [`Inlet::next`] until `End` or `Abort`.
pub struct Inlet {
    pub(super) rx: mpsc::UnboundedReceiver<Msg>,
    pub(super) shared: Arc<Shared>,
    /// Length of the chunk or batch received last; released once it is handed out whole
    /// and the next one is asked for (the sink is done with it by then), or on drop.
    held: usize,
    /// The rest of the batch received last.
    rest: std::vec::IntoIter<Bytes>,
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

/// What [`Inlet::next_batch`] receives next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NextBatch {
    /// The next chunks of the body, in order (at least one).
    Data(Vec<Bytes>),
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
        room: AtomicWaker::new(),
        limit: buffer,
        budget,
        stats: std::sync::OnceLock::new(),
    });
    (
        Outlet {
            tx: Some(tx),
            shared: shared.clone(),
            pending: Vec::new(),
            pending_len: 0,
            batch: 0,
            credit: 0,
            queued_hint: 0,
        },
        Inlet {
            rx,
            shared,
            held: 0,
            rest: Vec::new().into_iter(),
            finished: false,
        },
    )
}

impl Inlet {
    /// Waits for the next event. After `End` or `Abort`, returns `Abort(Dropped)` forever.
    pub async fn next(&mut self) -> Next {
        // Within a batch: no channel, no atomics.
        if let Some(b) = self.rest.next() {
            return Next::Data(b);
        }
        self.release_held();
        if self.finished {
            return Next::Abort(AbortReason::Dropped);
        }
        match self.rx.recv().await {
            Some(Msg::Data(b)) => {
                self.held = b.len();
                Next::Data(b)
            }
            Some(Msg::Batch(chunks, len)) => {
                self.held = len;
                self.rest = chunks.into_iter();
                match self.rest.next() {
                    Some(b) => Next::Data(b),
                    // The outlet never sends an empty batch; treat one as broken.
                    None => {
                        self.finished = true;
                        Next::Abort(AbortReason::Dropped)
                    }
                }
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

    /// Like [`next`](Self::next), but hands out a whole batch of chunks at once
    /// ([`TeeBody::batched`](super::TeeBody::batched)): one call, and one write for a sink
    /// that takes several chunks (see
    /// [`SinkWriter::write_batch`](crate::backup::SinkWriter::write_batch)), per batch
    /// instead of per chunk. An unbatched chunk comes as a batch of one. Never empty.
    pub async fn next_batch(&mut self) -> NextBatch {
        // What is left of a batch a `next` call started.
        if self.rest.len() != 0 {
            return NextBatch::Data(std::mem::take(&mut self.rest).collect());
        }
        self.release_held();
        if self.finished {
            return NextBatch::Abort(AbortReason::Dropped);
        }
        match self.rx.recv().await {
            Some(Msg::Data(b)) => {
                self.held = b.len();
                NextBatch::Data(vec![b])
            }
            Some(Msg::Batch(chunks, len)) if !chunks.is_empty() => {
                self.held = len;
                NextBatch::Data(chunks)
            }
            Some(Msg::End) => {
                self.finished = true;
                NextBatch::End
            }
            Some(Msg::Abort(r)) => {
                self.finished = true;
                NextBatch::Abort(r)
            }
            // The outlet never sends an empty batch; treat one as broken.
            Some(Msg::Batch(..)) | None => {
                self.finished = true;
                NextBatch::Abort(AbortReason::Dropped)
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
            self.shared.room.wake();
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
            match msg {
                Msg::Data(b) => self.release(b.len()),
                Msg::Batch(_, len) => self.release(len),
                Msg::End | Msg::Abort(_) => {}
            }
        }
        self.shared.released.notify_one();
        self.shared.room.wake();
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
    /// Whether this copy is still being sent to (not ended, aborted or dropped).
    pub(super) fn is_active(&self) -> bool {
        self.tx.is_some()
    }

    pub(super) fn is_open(&self) -> bool {
        self.tx.as_ref().is_some_and(|tx| !tx.is_closed())
    }

    /// Gathers chunks into batches of up to a quarter of the buffer (at most
    /// [`MAX_BATCH`]); `false` sends every chunk on its own. A quarter leaves the sink
    /// three quarters of its buffer to fall behind by before the copy overflows.
    pub(super) fn set_batching(&mut self, on: bool) {
        self.batch = if on {
            (self.shared.limit / 4).min(MAX_BATCH)
        } else {
            0
        };
    }

    /// Paced mode: whether the sink has room for another chunk (at most half its buffer
    /// queued); otherwise registers `cx` to be woken when it releases bytes or goes away.
    /// A paced tee queues at most half the buffer plus one chunk, so it never overflows.
    pub(super) fn poll_room(&self, cx: &mut std::task::Context<'_>) -> bool {
        let sh = &self.shared;
        let roomy = || sh.buffered.load(Ordering::SeqCst) <= sh.limit / 2 || !self.is_open();
        if roomy() {
            return true;
        }
        sh.room.register(cx.waker());
        // Set before the second read, so a release after it always wakes us.
        sh.draining.store(true, Ordering::SeqCst);
        roomy()
    }

    /// Queues `chunk` without waiting. Returns `false` if the copy was abandoned. `paced`:
    /// the caller waited for room ([`poll_room`](Self::poll_room)), so the buffer limit is
    /// not checked again (the byte budget still is).
    #[inline]
    pub(super) fn try_send(&mut self, chunk: &Bytes, paced: bool) -> bool {
        if self.tx.is_none() {
            return false;
        }
        let len = chunk.len();
        // What the sink has not released yet plus what waits here: first the bound kept
        // here, and only when that leaves no room the count itself (the sink may have
        // released since).
        if !paced && self.over_limit(self.queued_hint, len) {
            self.queued_hint = self.shared.buffered.load(Ordering::Acquire);
        }
        if !paced && self.over_limit(self.queued_hint, len) {
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
            return false;
        }
        self.pending.push(chunk.clone());
        self.pending_len += len;
        if self.pending_len >= self.batch {
            return self.flush();
        }
        true
    }

    /// Whether `len` more bytes pass the buffer with `buffered` bytes unreleased (one
    /// chunk is let through into an empty queue).
    #[inline]
    fn over_limit(&self, buffered: usize, len: usize) -> bool {
        let queued = buffered.saturating_add(self.pending_len);
        queued != 0 && queued.saturating_add(len) > self.shared.limit
    }

    /// Takes `len` bytes from the credit charged to the sink's byte budget, charging a
    /// batch's worth more when it runs out; on failure aborts this copy.
    fn charge_budget(&mut self, len: usize) -> bool {
        let Some(b) = &self.shared.budget else {
            return true;
        };
        let len = len as u64;
        if let Some(left) = self.credit.checked_sub(len) {
            self.credit = left;
            return true;
        }
        let need = len - self.credit;
        // Ahead by up to one batch; near the limit, only what this chunk needs.
        let ahead = need.max(self.batch as u64);
        if ahead > need && b.try_charge(ahead) {
            self.credit = ahead - need;
            return true;
        }
        if b.try_charge(need) {
            self.credit = 0;
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
    pub(super) async fn send_waiting(&mut self, chunk: &Bytes) -> bool {
        let len = chunk.len();
        // Whatever the tee gathered goes first, in order.
        if !self.flush() {
            return false;
        }
        // Set before reading the count, so a release after the read always notifies.
        self.shared.draining.store(true, Ordering::SeqCst);
        loop {
            if !self.is_open() {
                self.discard();
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
        self.pending.push(chunk.clone());
        self.pending_len += len;
        self.flush()
    }

    /// Sends the gathered chunks as one message: one addition to each count, one wake-up
    /// of the sink. The counts go up before the send so the sink can never subtract
    /// first. Returns `false` if the copy was abandoned.
    pub(super) fn flush(&mut self) -> bool {
        if self.tx.is_none() {
            self.discard();
            return false;
        }
        let len = self.pending_len;
        if len == 0 && self.pending.is_empty() {
            return true;
        }
        // The count before this batch is fresh: the bound starts over from it.
        self.queued_hint = self
            .shared
            .buffered
            .fetch_add(len, Ordering::AcqRel)
            .saturating_add(len);
        let stats = self.shared.stats.get();
        if let Some(s) = stats {
            s.add_buffered(len);
        }
        self.pending_len = 0;
        let msg = if self.pending.len() == 1 {
            // One chunk needs no vector; keep the allocation for the next batch.
            match self.pending.pop() {
                Some(b) => Msg::Data(b),
                None => return true,
            }
        } else {
            let cap = self.pending.capacity();
            Msg::Batch(
                std::mem::replace(&mut self.pending, Vec::with_capacity(cap)),
                len,
            )
        };
        if self.tx.as_ref().is_some_and(|tx| tx.send(msg).is_ok()) {
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
        self.queued_hint = self.queued_hint.saturating_sub(len);
        self.tx = None;
        self.discard();
        false
    }

    /// Drops what was gathered and returns it, and the unused credit, to the budget.
    fn discard(&mut self) {
        let n = std::mem::take(&mut self.pending_len) as u64 + std::mem::take(&mut self.credit);
        self.pending.clear();
        if let Some(b) = &self.shared.budget {
            b.release(n);
        }
    }

    pub(super) fn end(&mut self) {
        if self.flush() {
            if let Some(tx) = self.tx.take() {
                let _ = tx.send(Msg::End);
            }
        }
        self.discard();
    }

    pub(super) fn abort(&mut self, reason: AbortReason) {
        self.discard();
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(Msg::Abort(reason));
        }
    }
}

impl Drop for Outlet {
    fn drop(&mut self) {
        // Dropped without `end`: the sink sees `Dropped`; the budget gets its bytes back.
        self.discard();
    }
}
