//! The per-sink channel: [`Outlet`] (tee side) and [`Inlet`] (sink side), with the byte
//! accounting that bounds what a sink may fall behind.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use tokio::sync::{mpsc, Notify};

use super::{AbortReason, ByteBudget, TeeStats};

enum Msg {
    Data(Bytes),
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

/// The tee side of one sink's channel. Give it to [`TeeBody::new`](super::TeeBody::new).
pub struct Outlet {
    tx: Option<mpsc::UnboundedSender<Msg>>,
    pub(super) shared: Arc<Shared>,
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
        room: AtomicWaker::new(),
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
            if let Msg::Data(b) = msg {
                self.release(b.len());
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
    pub(super) fn try_send(&mut self, chunk: &Bytes, paced: bool) -> bool {
        if self.tx.is_none() {
            return false;
        }
        let len = chunk.len();
        let prev = self.shared.buffered.fetch_add(len, Ordering::AcqRel);
        if !paced && prev != 0 && prev + len > self.shared.limit {
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
    pub(super) async fn send_waiting(&mut self, chunk: &Bytes) -> bool {
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

    pub(super) fn end(&mut self) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(Msg::End);
        }
    }

    pub(super) fn abort(&mut self, reason: AbortReason) {
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
