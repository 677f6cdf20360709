//! The per-sink channel: [`Outlet`] (tee side) and [`Inlet`] (sink side), with the byte
//! accounting that bounds what a sink may fall behind.
//!
//! Chunks are sent in batches. Sending each chunk on its own cost a channel push, a wake-up
//! of the sink's task, and four atomic read-modify-writes on each side (queued bytes, byte
//! budget, stats) per chunk: as much as the rest of the body's path. The outlet gathers
//! chunks until a batch threshold (a quarter of the buffer, at most 256 KiB) is crossed or
//! the body ends (a batch of fresh chunks waits for the next one, see `Outlet::push_last`),
//! and accounts and sends them as one message; the inlet hands the chunks
//! out one by one ([`Inlet::next`]) or as the whole batch ([`Inlet::next_batch`]) and
//! releases the batch once the sink asks for more. The bounds do
//! not loosen: gathered chunks count against the buffer when they are gathered, and the
//! byte budget is charged ahead in batch-sized credits (returned when the copy ends), so
//! the budget never holds less than what is really queued.
//!
//! The two ends live in their own files because they run in different places and are
//! tuned apart: [`Outlet`] (`outlet.rs`) is on the client's path for every chunk (the
//! buffer bound, the budget credit, the batching), [`Inlet`] (`inlet.rs`) on the sink's
//! task (handing out chunks, releasing their bytes). This file holds only what both share:
//! the message, the counts and the constructor.

mod inlet;
mod outlet;

use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::Arc;

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use tokio::sync::{mpsc, Notify};

use super::{AbortReason, ByteBudget, TeeStats};

pub use inlet::{Inlet, Next, NextBatch};
pub use outlet::Outlet;

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
    /// Wakes a paced tee ([`TeeBody::paced`](super::TeeBody::paced)) waiting for room.
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
/// A channel for one sink whose queue may hold at most `buffer` bytes (one chunk larger than
/// the buffer is let through when the queue is empty, so tiny buffers still work).
pub fn outlet(buffer: usize) -> (Outlet, Inlet) {
    make_outlet(buffer, None)
}

/// Like [`outlet()`], and every queued byte is also charged to `budget`, shared with the
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
    (Outlet::new(tx, shared.clone()), Inlet::new(rx, shared))
}
