//! The sink side of a sink's channel: hands the chunks out one by one or a batch at a
//! time, and releases their bytes (to the buffer count, the budget and the stats) once the
//! sink asks for more.

use std::fmt;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use tokio::sync::mpsc;

use super::{Msg, Shared};
use crate::body::tee::AbortReason;

/// The sink side of one sink's channel: call [`Inlet::next`] until `End` or `Abort`.
pub struct Inlet {
    pub(in crate::body::tee) rx: mpsc::UnboundedReceiver<Msg>,
    pub(in crate::body::tee) shared: Arc<Shared>,
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
/// One message as [`Inlet::poll_receive`] hands it on: data (never an empty batch) or a
/// terminal event.
enum Received {
    One(Bytes),
    Many(Vec<Bytes>),
    End,
    Abort(AbortReason),
}

impl Inlet {
    pub(super) fn new(rx: mpsc::UnboundedReceiver<Msg>, shared: Arc<Shared>) -> Self {
        Inlet {
            rx,
            shared,
            held: 0,
            rest: Vec::new().into_iter(),
            finished: false,
        }
    }

    /// Waits for the next event. After `End` or `Abort`, returns `Abort(Dropped)` forever.
    ///
    /// A plain poll function behind the future (no `async` state machine): within a batch
    /// a call is an iterator step, which the sink pays for every chunk.
    // Not `Iterator::next`: it returns a future. The name predates this form (it was an
    // `async fn`, which clippy does not compare) and callers keep it.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> impl Future<Output = Next> + Send + '_ {
        std::future::poll_fn(move |cx| self.poll_next(cx))
    }

    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Next> {
        // Within a batch: no channel, no atomics.
        if let Some(b) = self.rest.next() {
            return Poll::Ready(Next::Data(b));
        }
        Poll::Ready(match ready!(self.poll_receive(cx)) {
            Received::One(b) => Next::Data(b),
            Received::Many(chunks) => {
                let mut chunks = chunks.into_iter();
                let first = chunks.next();
                self.rest = chunks;
                // `poll_receive` never hands out an empty batch.
                first.map_or(Next::Abort(AbortReason::Dropped), Next::Data)
            }
            Received::End => Next::End,
            Received::Abort(r) => Next::Abort(r),
        })
    }

    /// Like [`next`](Self::next), but hands out a whole batch of chunks at once
    /// ([`TeeBody::batched`](crate::body::tee::TeeBody::batched)): one call, and one write for a sink
    /// that takes several chunks (see
    /// [`SinkWriter::write_batch`](crate::backup::SinkWriter::write_batch)), per batch
    /// instead of per chunk. An unbatched chunk comes as a batch of one. Never empty.
    pub fn next_batch(&mut self) -> impl Future<Output = NextBatch> + Send + '_ {
        std::future::poll_fn(move |cx| self.poll_next_batch(cx))
    }

    fn poll_next_batch(&mut self, cx: &mut Context<'_>) -> Poll<NextBatch> {
        // What is left of a batch a `next` call started.
        if self.rest.len() != 0 {
            return Poll::Ready(NextBatch::Data(std::mem::take(&mut self.rest).collect()));
        }
        Poll::Ready(match ready!(self.poll_receive(cx)) {
            Received::One(b) => NextBatch::Data(vec![b]),
            Received::Many(chunks) => NextBatch::Data(chunks),
            Received::End => NextBatch::End,
            Received::Abort(r) => NextBatch::Abort(r),
        })
    }

    /// The next message off the channel, once the sink is done with the previous one (its
    /// bytes released). The terminal cases — end, abort, a closed channel, and an empty
    /// batch (the outlet never sends one, so it counts as broken) — finish the inlet, which
    /// then answers `Abort(Dropped)` forever. One place for both `next` and `next_batch`.
    fn poll_receive(&mut self, cx: &mut Context<'_>) -> Poll<Received> {
        // A no-op after the first poll of a wait (`held` is then 0).
        self.release_held();
        if self.finished {
            return Poll::Ready(Received::Abort(AbortReason::Dropped));
        }
        let terminal = match ready!(self.rx.poll_recv(cx)) {
            Some(Msg::Data(b)) => {
                self.held = b.len();
                return Poll::Ready(Received::One(b));
            }
            Some(Msg::Batch(chunks, len)) if !chunks.is_empty() => {
                self.held = len;
                return Poll::Ready(Received::Many(chunks));
            }
            Some(Msg::End) => Received::End,
            Some(Msg::Abort(r)) => Received::Abort(r),
            Some(Msg::Batch(..)) | None => Received::Abort(AbortReason::Dropped),
        };
        self.finished = true;
        Poll::Ready(terminal)
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
