//! Recycled storage for the retry copy's head ([`KeptHead`](super::kept::KeptHead)).
//!
//! With retries on and a second endpoint to go to, every request keeps a copy of its head
//! (`kept.rs`), and almost none is ever used. Its box and its header list were two heap
//! allocations and two frees per proxied request, about a third of what the copy costs
//! (issue 12: ~1.1k instructions per request for the copy on the two-upstream process
//! path, the balancer's whole cost over bare `Forward` ~3.2k). The copy's lifetime is one
//! request, so the same few boxes serve every request of a thread: a dropped copy gives
//! its emptied box (header list capacity included) back to a small per-thread stack, and
//! the next copy on that thread takes it instead of allocating.
//!
//! Bounds: at most [`SPARES`] boxes per thread, each with a header list of at most
//! [`MAX_LIST`] entries' capacity (a larger list is freed, not kept) and a buffer of
//! [`MAX_BYTES`] for the copied value bytes, so a thread holds at most ~40 KiB here however
//! many requests passed. A box is emptied *before* it is kept:
//! no spare holds a request's values (its header bytes share the server's read buffer,
//! which must be released with the request).

use std::cell::{Cell, RefCell};

use super::kept::KeptHead;

/// Boxes kept per thread: about the requests one thread has in flight at once with a
/// copy each (`wrk -c16` on one worker: 16).
pub(crate) const SPARES: usize = 16;
/// Header list capacity (entries) a kept box may hold on to. (32 before session 18; 24
/// leaves room for the value buffer within the same ~40 KiB a thread. A browser sends
/// 10-20 fields; a longer head's copy allocates its box and list, as every copy did
/// before session 16.)
pub(crate) const MAX_LIST: usize = 24;
/// The buffer a recycled box copies the target and header values into (`kept.rs`);
/// values past it are kept as they are.
pub(crate) const MAX_BYTES: usize = 512;

thread_local! {
    // The most recently given box, taken first: one request in flight at a time per
    // thread (a keep-alive connection's requests one after another) gives and takes only
    // here, a `Cell` swap, where the stack below costs a `RefCell` borrow and a `Vec`
    // push or pop each way (~30 instructions a copy, dispatch bench).
    static LAST: Cell<Option<Box<KeptHead>>> = const { Cell::new(None) };
    // Boxes, not values: what is recycled is the allocation a `Kept` points to (the
    // response future holds a pointer, not the ~220-byte head). Holds at most
    // `SPARES - 1`: with `LAST`, `SPARES` a thread.
    #[allow(clippy::vec_box)]
    static POOL: RefCell<Vec<Box<KeptHead>>> = const { RefCell::new(Vec::new()) };
}

/// An empty head to fill, from this thread's spares when there is one.
#[inline]
pub(crate) fn take() -> Option<Box<KeptHead>> {
    // `try_with`: during thread teardown the spares are gone; allocate then.
    if let Some(head) = LAST.try_with(Cell::take).ok().flatten() {
        return Some(head);
    }
    take_pooled()
}

#[inline(never)]
fn take_pooled() -> Option<Box<KeptHead>> {
    POOL.try_with(|p| p.try_borrow_mut().ok()?.pop())
        .ok()
        .flatten()
}

/// Keeps `head`, already emptied by the caller, for a later [`take`] on this thread, if
/// there is room and its list and buffer are not too large; drops it otherwise.
#[inline]
pub(crate) fn give(head: Box<KeptHead>) {
    if head.headers_capacity() > MAX_LIST || head.bytes_capacity() > MAX_BYTES {
        return;
    }
    // The newest box goes to `LAST`; one already there moves to the stack.
    match LAST.try_with(|l| l.replace(Some(head))) {
        Ok(None) => {}
        Ok(Some(older)) => give_pooled(older),
        // No spares any more (thread teardown): the box was dropped with the closure.
        Err(_) => {}
    }
}

#[inline(never)]
fn give_pooled(head: Box<KeptHead>) {
    // Dropped outside the borrow when there is no room (or no pool any more).
    let _rest = POOL.try_with(|p| {
        let mut pool = p.try_borrow_mut().ok()?;
        if pool.len() < SPARES - 1 {
            pool.push(head);
            None
        } else {
            Some(head)
        }
    });
}

/// Spares held by this thread now (tests).
#[cfg(test)]
pub(crate) fn held() -> usize {
    let last = LAST.with(|l| {
        let head = l.take();
        let n = usize::from(head.is_some());
        l.set(head);
        n
    });
    last + POOL.with(|p| p.borrow().len())
}
