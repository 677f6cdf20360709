//! The tee side of a sink's channel: bounds what the sink may fall behind (its buffer and
//! the shared byte budget) and gathers chunks into batches, on the client's path.

use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::mpsc;

use super::{Msg, Shared, MAX_BATCH};
use crate::body::tee::AbortReason;

/// The tee side of one sink's channel. Give it to [`TeeBody::new`](crate::body::tee::TeeBody::new).
pub struct Outlet {
    tx: Option<mpsc::UnboundedSender<Msg>>,
    pub(in crate::body::tee) shared: Arc<Shared>,
    /// Chunks gathered for the next batch, and their length (counted against the buffer
    /// and charged to the budget, not yet in `shared.buffered`).
    pending: Vec<Bytes>,
    pending_len: usize,
    /// Send once `pending_len` reaches this; 0 sends every chunk on its own.
    batch: usize,
    /// A full batch waits in `pending` for the next chunk (see
    /// [`push_last`](Self::push_last)).
    held: bool,
    /// Bytes charged to the byte budget ahead of use (see the module docs).
    credit: u64,
    /// `shared.limit` and whether `shared.budget` is set, kept here: the per-chunk checks
    /// then read only this outlet, not the shared block behind a pointer.
    limit: usize,
    has_budget: bool,
    /// An upper bound on `shared.buffered`: its value when this outlet last added to it
    /// (or read it), plus what it added since. Only the sink lowers the count, so while
    /// this bound leaves room the real count does too, and the per-chunk overflow check
    /// needs no read of a cache line the sink's thread writes.
    pub(in crate::body::tee) queued_hint: usize,
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
    pub(super) fn new(tx: mpsc::UnboundedSender<Msg>, shared: Arc<Shared>) -> Self {
        Outlet {
            tx: Some(tx),
            limit: shared.limit,
            has_budget: shared.budget.is_some(),
            shared,
            pending: Vec::new(),
            pending_len: 0,
            batch: 0,
            held: false,
            credit: 0,
            queued_hint: 0,
        }
    }

    /// Whether this copy is still being sent to (not ended, aborted or dropped).
    pub(in crate::body::tee) fn is_active(&self) -> bool {
        self.tx.is_some()
    }

    pub(in crate::body::tee) fn is_open(&self) -> bool {
        self.tx.as_ref().is_some_and(|tx| !tx.is_closed())
    }

    /// Gathers chunks into batches of up to a quarter of the buffer (at most
    /// [`MAX_BATCH`]); `false` sends every chunk on its own. A quarter leaves the sink
    /// three quarters of its buffer to fall behind by before the copy overflows.
    pub(in crate::body::tee) fn set_batching(&mut self, on: bool) {
        self.batch = if on {
            (self.shared.limit / 4).min(MAX_BATCH)
        } else {
            0
        };
    }

    /// Paced mode: whether the sink has room for another chunk (at most half its buffer
    /// queued); otherwise registers `cx` to be woken when it releases bytes or goes away.
    /// A paced tee queues at most half the buffer plus one chunk, so it never overflows.
    pub(in crate::body::tee) fn poll_room(&self, cx: &mut std::task::Context<'_>) -> bool {
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
    ///
    /// This runs for every chunk on the client's path, so the usual case is kept to a few
    /// instructions inline (open, room by the local bound, no budget or enough credit: a
    /// clone and a push); everything else is in [`try_send_slow`](Self::try_send_slow).
    #[inline]
    pub(in crate::body::tee) fn try_send(&mut self, chunk: &Bytes, paced: bool) -> bool {
        let len = chunk.len();
        let fits = paced || !self.over_limit(self.queued_hint, len);
        if fits && self.tx.is_some() && self.take_credit(len) {
            return self.push(chunk, len);
        }
        self.try_send_slow(chunk, paced)
    }

    /// Gathers `chunk` (its bytes already charged) and sends the batch it completes;
    /// `false` if the copy was abandoned.
    #[inline]
    fn push(&mut self, chunk: &Bytes, len: usize) -> bool {
        if self.pending_len + len < self.batch {
            self.gather(chunk, len);
            return true;
        }
        self.push_last(chunk, len)
    }

    /// [`push`](Self::push) for a chunk that completes a batch (every chunk, unbatched),
    /// or the first one after a held batch.
    ///
    /// A batch whose last chunk is unique (no other handle: the source made it for this
    /// frame alone, a fresh `Vec`) waits for the next chunk instead of leaving with it.
    /// That chunk is the source's newest allocation, at the top of the heap, and a sink that
    /// drops the whole batch at once (the next time the client's task yields) hands glibc
    /// a run of freed blocks that merges with the top past its trim threshold: glibc gives
    /// the pages back and the next chunks fault them in again (`tee_1GiB`, 64 KiB chunks
    /// of a fresh `Vec`, glibc's trim threshold pinned at its 128 KiB default: 8 page
    /// faults per chunk, 0.05x of plain streaming; in a fresh process 1,100 per GiB,
    /// 0.76x). Once the next chunk is allocated above it, the freed run is reused where it
    /// lies. A chunk split off a read buffer (hyper's) is not unique: that buffer stays
    /// alive until the next read anyway, and holding its batch too only moved glibc onto
    /// slower paths (3 points less in `tee_1GiB`), so it leaves at once as before.
    fn push_last(&mut self, chunk: &Bytes, len: usize) -> bool {
        if self.held && !self.flush() {
            // The copy is gone; this chunk's bytes were charged too.
            if let Some(b) = &self.shared.budget {
                b.release(len as u64);
            }
            return false;
        }
        if self.pending_len + len < self.batch {
            self.gather(chunk, len);
            return true;
        }
        // Asked before the clone in `gather` makes it shared.
        let hold = self.batch != 0 && chunk.is_unique();
        self.gather(chunk, len);
        if hold {
            self.held = true;
            return true;
        }
        self.flush()
    }

    /// Adds `chunk` (`len` bytes, already charged) to the batch being gathered.
    #[inline]
    fn gather(&mut self, chunk: &Bytes, len: usize) {
        self.pending.push(chunk.clone());
        self.pending_len += len;
    }

    /// Covers `len` bytes from the credit already charged to the byte budget (always, with
    /// no budget); `false` when a new charge is needed.
    #[inline]
    fn take_credit(&mut self, len: usize) -> bool {
        if !self.has_budget {
            return true;
        }
        match self.credit.checked_sub(len as u64) {
            Some(left) => {
                self.credit = left;
                true
            }
            None => false,
        }
    }

    /// [`try_send`](Self::try_send) when the fast path does not apply: the copy is closed,
    /// the local bound leaves no room (the sink may have released since), or the budget
    /// needs a new charge.
    #[cold]
    #[inline(never)]
    fn try_send_slow(&mut self, chunk: &Bytes, paced: bool) -> bool {
        if self.tx.is_none() {
            return false;
        }
        let len = chunk.len();
        // What the sink has not released yet plus what waits here: first the bound kept
        // here, and only when that leaves no room the count itself.
        if !paced && self.over_limit(self.queued_hint, len) {
            self.queued_hint = self.shared.buffered.load(Ordering::Acquire);
        }
        if !paced && self.over_limit(self.queued_hint, len) {
            if let Some(s) = self.shared.stats.get() {
                s.overflows.fetch_add(1, Ordering::Relaxed);
            }
            tracing::warn!(
                limit = self.limit,
                "backup copy aborted: sink fell behind its buffer"
            );
            self.abort(AbortReason::Overflow { limit: self.limit });
            return false;
        }
        if !self.charge_budget(len) {
            return false;
        }
        self.push(chunk, len)
    }

    /// Whether `len` more bytes pass the buffer with `buffered` bytes unreleased (one
    /// chunk is let through into an empty queue).
    #[inline]
    fn over_limit(&self, buffered: usize, len: usize) -> bool {
        let queued = buffered.saturating_add(self.pending_len);
        queued != 0 && queued.saturating_add(len) > self.limit
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
    pub(in crate::body::tee) async fn send_waiting(&mut self, chunk: &Bytes) -> bool {
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
        self.gather(chunk, len);
        self.flush()
    }

    /// Sends the gathered chunks as one message: one addition to each count, one wake-up
    /// of the sink. The counts go up before the send so the sink can never subtract
    /// first. Returns `false` if the copy was abandoned.
    pub(in crate::body::tee) fn flush(&mut self) -> bool {
        if self.tx.is_none() {
            self.discard();
            return false;
        }
        self.held = false;
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
        self.held = false;
        if let Some(b) = &self.shared.budget {
            b.release(n);
        }
    }

    pub(in crate::body::tee) fn end(&mut self) {
        if self.flush() {
            if let Some(tx) = self.tx.take() {
                let _ = tx.send(Msg::End);
            }
        }
        self.discard();
    }

    pub(in crate::body::tee) fn abort(&mut self, reason: AbortReason) {
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
