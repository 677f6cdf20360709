//! Batched copies: every chunk still arrives, in order, and the bounds still hold.

use bytes::Bytes;
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};

use super::*;

type Item = Result<Frame<Bytes>, std::io::Error>;

/// A body of the given frames, then (if `fail`) an error.
fn body(
    chunks: Vec<Bytes>,
    fail: bool,
) -> StreamBody<futures_util::stream::Iter<std::vec::IntoIter<Item>>> {
    let mut items: Vec<Item> = chunks.into_iter().map(|c| Ok(Frame::data(c))).collect();
    if fail {
        items.push(Err(std::io::Error::other("upstream cut")));
    }
    StreamBody::new(futures_util::stream::iter(items))
}

fn chunks(n: usize, len: usize) -> Vec<Bytes> {
    (0..n).map(|i| Bytes::from(vec![i as u8; len])).collect()
}

async fn read_all(inlet: &mut Inlet) -> (Vec<u8>, Next) {
    let mut got = Vec::new();
    loop {
        match inlet.next().await {
            Next::Data(b) => got.extend_from_slice(&b),
            end => return (got, end),
        }
    }
}

async fn client(mut b: impl Body<Data = Bytes, Error = std::io::Error> + Unpin) -> (usize, bool) {
    let mut n = 0;
    while let Some(f) = b.frame().await {
        match f {
            Ok(f) => n += f.into_data().map_or(0, |d| d.len()),
            Err(_) => return (n, false),
        }
    }
    (n, true)
}

#[tokio::test]
async fn the_last_partial_batch_is_flushed_at_the_end() {
    // 1 MiB buffer: batches of 256 KiB; 10 x 1 KiB never fill one.
    let (out, mut inlet) = outlet(1 << 20);
    let data = chunks(10, 1024);
    let want: Vec<u8> = data.iter().flat_map(|c| c.to_vec()).collect();
    let tee = TeeBody::new(body(data, false), vec![out], &TeeOptions::default()).batched(true);
    let mut tee = std::pin::pin!(tee);
    // Mid-body, nothing has reached the sink yet: the chunks wait for the batch.
    let first = std::future::poll_fn(|cx| tee.as_mut().poll_frame(cx)).await;
    assert!(first.is_some());
    assert!(inlet.rx.is_empty(), "one chunk must not wake the sink");
    assert_eq!(inlet.shared.buffered.load(Ordering::SeqCst), 0);
    assert_eq!(client(tee).await, (9 * 1024, true));
    let (got, end) = read_all(&mut inlet).await;
    assert_eq!(end, Next::End);
    assert_eq!(got, want, "every chunk, in order");
}

#[tokio::test]
async fn full_batches_go_out_as_one_message_each() {
    // 64 KiB buffer: 16 KiB batches of 4 x 4 KiB.
    let (out, mut inlet) = outlet(64 << 10);
    let data = chunks(9, 4096);
    let want: Vec<u8> = data.iter().flat_map(|c| c.to_vec()).collect();
    let tee = TeeBody::new(body(data, false), vec![out], &TeeOptions::default()).batched(true);
    let mut tee = std::pin::pin!(tee);
    for _ in 0..4 {
        std::future::poll_fn(|cx| tee.as_mut().poll_frame(cx)).await;
    }
    // Each chunk is a fresh `Vec`: the full batch leaves with the next chunk (see
    // `Outlet::push_last`).
    assert!(
        inlet.rx.is_empty(),
        "a full batch of unique chunks waits for the next"
    );
    std::future::poll_fn(|cx| tee.as_mut().poll_frame(cx)).await;
    assert_eq!(inlet.rx.len(), 1, "four chunks, one message");
    assert_eq!(inlet.shared.buffered.load(Ordering::SeqCst), 16 << 10);
    client(tee).await;
    let (got, end) = read_all(&mut inlet).await;
    assert_eq!((got, end), (want, Next::End));
    assert_eq!(
        inlet.shared.buffered.load(Ordering::SeqCst),
        0,
        "all released"
    );
}

#[tokio::test]
async fn an_error_mid_batch_aborts_the_copy_and_returns_the_budget() {
    let budget = ByteBudget::new(8 << 20);
    let (out, mut inlet) = outlet_in(1 << 20, budget.clone());
    let tee = TeeBody::new(
        body(chunks(5, 1024), true),
        vec![out],
        &TeeOptions::default(),
    )
    .batched(true);
    assert_eq!(
        client(tee).await,
        (5 * 1024, false),
        "the client gets the error"
    );
    let (got, end) = read_all(&mut inlet).await;
    assert!(got.is_empty(), "the partial batch is dropped, not sent");
    assert_eq!(end, Next::Abort(AbortReason::Upstream));
    assert_eq!(
        budget.used(),
        0,
        "gathered bytes and unused credit returned"
    );
}

#[tokio::test]
async fn the_budget_credit_is_returned_when_the_copy_ends() {
    let budget = ByteBudget::new(8 << 20);
    let (out, mut inlet) = outlet_in(1 << 20, budget.clone());
    let tee = TeeBody::new(
        body(chunks(3, 1000), false),
        vec![out],
        &TeeOptions::default(),
    )
    .batched(true);
    client(tee).await;
    assert!(
        budget.used() >= 3000,
        "queued bytes stay charged until the sink takes them"
    );
    let (got, end) = read_all(&mut inlet).await;
    assert_eq!((got.len(), end), (3000, Next::End));
    drop(inlet);
    assert_eq!(budget.used(), 0);
}

#[tokio::test]
async fn near_the_budget_limit_only_the_chunk_is_charged() {
    // The credit would ask for 256 KiB; the budget has 10 KiB: chunks still fit exactly.
    let budget = ByteBudget::new(10 * 1024);
    let (out, mut inlet) = outlet_in(1 << 20, budget.clone());
    let tee = TeeBody::new(
        body(chunks(2, 4096), false),
        vec![out],
        &TeeOptions::default(),
    )
    .batched(true);
    client(tee).await;
    let (got, end) = read_all(&mut inlet).await;
    assert_eq!((got.len(), end), (8192, Next::End), "two chunks fit");
    drop(inlet);
    assert_eq!(budget.used(), 0);

    // A third does not: the copy is aborted (what it gathered is dropped with it).
    let (out, mut inlet) = outlet_in(1 << 20, budget.clone());
    let tee = TeeBody::new(
        body(chunks(3, 4096), false),
        vec![out],
        &TeeOptions::default(),
    )
    .batched(true);
    client(tee).await;
    let (_, end) = read_all(&mut inlet).await;
    assert_eq!(
        end,
        Next::Abort(AbortReason::BudgetExceeded { limit: 10 * 1024 })
    );
    assert!(budget.peak() <= 10 * 1024);
    drop(inlet);
    assert_eq!(budget.used(), 0);
}

#[tokio::test]
async fn a_stalled_sink_still_bounds_memory() {
    // The sink never reads. Many copies share one budget; each has a 64 KiB buffer.
    const BUFFER: usize = 64 << 10;
    let budget = ByteBudget::new(200 << 10);
    let stats = TeeStats::new();
    let mut inlets = Vec::new();
    let mut reasons = Vec::new();
    for _ in 0..8 {
        let (out, inlet) = outlet_in(BUFFER, budget.clone());
        inlets.push(inlet);
        let opts = TeeOptions {
            stats: Some(stats.clone()),
            ..TeeOptions::default()
        };
        // 1 MiB in 4 KiB chunks: far past the buffer.
        let tee = TeeBody::new(body(chunks(256, 4096), false), vec![out], &opts).batched(true);
        assert_eq!(
            client(tee).await,
            (1 << 20, true),
            "the client is never held back"
        );
        assert!(budget.used() <= budget.limit());
    }
    for inlet in &mut inlets {
        let (got, end) = read_all(inlet).await;
        assert!(got.len() <= BUFFER, "at most the buffer reached the sink");
        reasons.push(end);
    }
    assert!(reasons.iter().all(|r| matches!(
        r,
        Next::Abort(AbortReason::Overflow { .. } | AbortReason::BudgetExceeded { .. })
    )));
    assert!(
        reasons
            .iter()
            .any(|r| matches!(r, Next::Abort(AbortReason::BudgetExceeded { .. }))),
        "the shared budget stopped some copies: {reasons:?}"
    );
    assert!(budget.peak() <= 200 << 10);
    assert!(stats.snapshot().peak_buffered <= 200 << 10);
    drop(inlets);
    assert_eq!(budget.used(), 0);
}

#[tokio::test]
async fn a_4mib_buffer_sends_64kib_chunks_4_to_a_batch() {
    // The batch stays at 256 KiB however large the buffer: its chunks are alive until the
    // sink takes them, and a larger batch no longer fits the cache (see `MAX_BATCH`).
    let (out, mut inlet) = outlet(4 << 20);
    let data = chunks(9, 64 << 10);
    let want: Vec<u8> = data.iter().flat_map(|c| c.to_vec()).collect();
    let tee = TeeBody::new(body(data, false), vec![out], &TeeOptions::default()).batched(true);
    let mut tee = std::pin::pin!(tee);
    for _ in 0..4 {
        std::future::poll_fn(|cx| tee.as_mut().poll_frame(cx)).await;
    }
    assert!(
        inlet.rx.is_empty(),
        "4 x 64 KiB (fresh `Vec`s) stay gathered"
    );
    std::future::poll_fn(|cx| tee.as_mut().poll_frame(cx)).await;
    assert_eq!(inlet.rx.len(), 1, "the 5th chunk sends the batch of four");
    assert_eq!(inlet.shared.buffered.load(Ordering::SeqCst), 256 << 10);
    client(tee).await;
    let NextBatch::Data(first) = inlet.next_batch().await else {
        panic!("a batch first")
    };
    assert_eq!(first.len(), 4, "one batch, handed out whole");
    let (rest, end) = read_all(&mut inlet).await;
    assert_eq!(end, Next::End);
    let got: Vec<u8> = first.iter().flat_map(|c| c.to_vec()).chain(rest).collect();
    assert_eq!(got, want, "every chunk, in order");
}

#[tokio::test]
async fn a_batch_of_shared_chunks_leaves_with_its_last_chunk() {
    // 64 KiB buffer: 16 KiB batches. Chunks split off one read buffer, as hyper hands
    // them out: the buffer still holds each one, so the batch need not wait.
    let (out, mut inlet) = outlet(64 << 10);
    let mut buf = bytes::BytesMut::with_capacity(9 * 4096);
    let data: Vec<Bytes> = (0..9u8)
        .map(|i| {
            buf.extend_from_slice(&[i; 4096]);
            buf.split_to(4096).freeze()
        })
        .collect();
    assert!(!data[3].is_unique(), "shared with the read buffer");
    let want: Vec<u8> = data.iter().flat_map(|c| c.to_vec()).collect();
    let tee = TeeBody::new(body(data, false), vec![out], &TeeOptions::default()).batched(true);
    let mut tee = std::pin::pin!(tee);
    for _ in 0..3 {
        std::future::poll_fn(|cx| tee.as_mut().poll_frame(cx)).await;
    }
    assert!(inlet.rx.is_empty(), "3 x 4 KiB stay gathered");
    std::future::poll_fn(|cx| tee.as_mut().poll_frame(cx)).await;
    assert_eq!(inlet.rx.len(), 1, "the 4th chunk sends the batch");
    assert_eq!(inlet.shared.buffered.load(Ordering::SeqCst), 16 << 10);
    client(tee).await;
    let (got, end) = read_all(&mut inlet).await;
    assert_eq!((got, end), (want, Next::End));
}

#[tokio::test]
async fn a_held_batch_whose_sink_left_returns_the_budget() {
    // 64 KiB buffer: 16 KiB batches; four fresh 4 KiB chunks fill one, held for the next.
    let budget = ByteBudget::new(8 << 20);
    let (mut out, inlet) = outlet_in(64 << 10, budget.clone());
    out.set_batching(true);
    for c in chunks(4, 4096) {
        assert!(out.try_send(&c, false));
    }
    assert!(inlet.rx.is_empty(), "held");
    drop(inlet);
    assert!(
        !out.try_send(&chunks(1, 4096)[0], false),
        "the sink is gone: the copy ends"
    );
    assert_eq!(
        budget.used(),
        0,
        "the held batch and the new chunk returned"
    );
}

#[tokio::test]
async fn next_batch_picks_up_where_next_stopped_and_releases_per_batch() {
    // 64 KiB buffer: 16 KiB batches of 4 x 4 KiB.
    let (out, mut inlet) = outlet(64 << 10);
    let tee = TeeBody::new(
        body(chunks(9, 4096), false),
        vec![out],
        &TeeOptions::default(),
    )
    .batched(true);
    client(tee).await;
    assert!(matches!(inlet.next().await, Next::Data(_)));
    assert_eq!(
        inlet.next_batch().await,
        NextBatch::Data(chunks(4, 4096)[1..].to_vec()),
        "the rest of the first batch"
    );
    assert_eq!(inlet.shared.buffered.load(Ordering::SeqCst), 36 << 10);
    assert_eq!(
        inlet.next_batch().await,
        NextBatch::Data(vec![
            Bytes::from(vec![4u8; 4096]),
            Bytes::from(vec![5u8; 4096]),
            Bytes::from(vec![6u8; 4096]),
            Bytes::from(vec![7u8; 4096])
        ])
    );
    assert_eq!(
        inlet.shared.buffered.load(Ordering::SeqCst),
        20 << 10,
        "the first batch is released once the second is asked for"
    );
    assert_eq!(
        inlet.next_batch().await,
        NextBatch::Data(vec![Bytes::from(vec![8u8; 4096])])
    );
    assert_eq!(inlet.next_batch().await, NextBatch::End);
    assert_eq!(inlet.shared.buffered.load(Ordering::SeqCst), 0);
    assert_eq!(
        inlet.next_batch().await,
        NextBatch::Abort(AbortReason::Dropped)
    );
}

#[tokio::test]
async fn the_queued_bound_rereads_the_count_after_the_sink_released() {
    // 32 KiB buffer, unbatched: the outlet's bound says 24 KiB queued after six chunks.
    let (mut out, mut inlet) = outlet(32 << 10);
    let c = Bytes::from(vec![1u8; 4096]);
    for _ in 0..6 {
        assert!(out.try_send(&c, false));
    }
    assert_eq!(out.queued_hint, 24 << 10);
    for _ in 0..6 {
        assert!(matches!(inlet.next().await, Next::Data(_)));
    }
    // The sink released five chunks (the sixth is held until it asks again). The bound
    // is stale (24 KiB) and would refuse a 12 KiB chunk; the real count (4 KiB) does not.
    let big = Bytes::from(vec![2u8; 12 << 10]);
    assert_eq!(
        out.queued_hint,
        24 << 10,
        "no read while the bound leaves room"
    );
    assert!(out.try_send(&big, false), "re-read, not a false overflow");
    assert_eq!(out.queued_hint, 16 << 10);
    // A real overflow is still one: 16 KiB queued + 20 KiB > 32 KiB.
    assert!(!out.try_send(&Bytes::from(vec![3u8; 20 << 10]), false));
    assert!(matches!(inlet.next().await, Next::Data(_)));
    assert_eq!(
        inlet.next().await,
        Next::Abort(AbortReason::Overflow { limit: 32 << 10 })
    );
}
