//! `body::replay`: bodies below, at and above the limit, streamed and declared.

mod support;

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use futures_util::stream;
use http::{HeaderMap, Request};
use http_body::Frame;
use http_body_util::{BodyExt, Full, StreamBody};
use tower::{Service, ServiceExt};
use tower_patterns::body::replay::{buffer_request, try_clone_request, NotReplayable};
use tower_patterns::body::ReplayBody;
use tower_patterns::proxy::Forward;

type Chunks = StreamBody<stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>>;

/// A streamed body (no declared length) of `n` chunks of `size` bytes.
fn chunked(n: usize, size: usize) -> Chunks {
    let frames: Vec<_> = (0..n)
        .map(|i| Ok(Frame::data(Bytes::from(vec![b'a' + (i % 26) as u8; size]))))
        .collect();
    StreamBody::new(stream::iter(frames))
}

fn expected(n: usize, size: usize) -> Vec<u8> {
    (0..n)
        .flat_map(|i| vec![b'a' + (i % 26) as u8; size])
        .collect()
}

async fn collect<B: http_body::Body>(b: B) -> Bytes
where
    B::Error: std::fmt::Debug,
{
    b.collect().await.unwrap().to_bytes()
}

#[tokio::test]
async fn below_the_limit_is_replayable() {
    let body = ReplayBody::buffer(chunked(3, 10), 100).await.unwrap();
    assert!(body.is_replayable());
    let copies: Vec<_> = (0..3).map(|_| body.try_clone().unwrap()).collect();
    for c in copies {
        assert_eq!(collect(c).await, expected(3, 10));
    }
    assert_eq!(collect(body).await, expected(3, 10));
}

#[tokio::test]
async fn exactly_at_the_limit_is_replayable() {
    let body = ReplayBody::buffer(chunked(4, 25), 100).await.unwrap();
    assert!(body.is_replayable());
    assert_eq!(http_body::Body::size_hint(&body).exact(), Some(100));
    assert_eq!(collect(body.try_clone().unwrap()).await, expected(4, 25));
}

#[tokio::test]
async fn one_byte_over_is_sent_once_and_whole() {
    let body = ReplayBody::buffer(chunked(101, 1), 100).await.unwrap();
    assert!(!body.is_replayable());
    assert!(body.try_clone().is_none());
    // Never truncated: the prefix that was read plus the rest of the stream.
    assert_eq!(collect(body).await, expected(101, 1));
}

#[tokio::test]
async fn far_over_the_limit_streams_without_holding_it_all() {
    // 64 chunks of 64 KiB (4 MiB) against a 100 KiB limit: the buffer stops after the
    // chunk that crosses the limit, so at most limit + one chunk is held.
    let pulled = Arc::new(AtomicUsize::new(0));
    let p = pulled.clone();
    let frames = stream::iter((0..64).map(move |i| {
        p.fetch_add(1, Ordering::SeqCst);
        Ok::<_, Infallible>(Frame::data(Bytes::from(vec![i as u8; 64 * 1024])))
    }));
    let body = ReplayBody::buffer(StreamBody::new(frames), 100 * 1024)
        .await
        .unwrap();
    assert!(!body.is_replayable());
    assert_eq!(
        pulled.load(Ordering::SeqCst),
        2,
        "read stops once the limit is crossed"
    );
    let all = collect(body).await;
    assert_eq!(all.len(), 64 * 64 * 1024);
    assert!(all
        .chunks(64 * 1024)
        .enumerate()
        .all(|(i, c)| c.iter().all(|b| *b == i as u8)));
}

#[tokio::test]
async fn a_declared_length_over_the_limit_is_not_read_up_front() {
    let body = Full::new(Bytes::from(vec![7u8; 1000]));
    let body = ReplayBody::buffer(body, 999).await.unwrap();
    assert!(!body.is_replayable());
    assert_eq!(http_body::Body::size_hint(&body).exact(), Some(1000));
    assert_eq!(collect(body).await.len(), 1000);
}

#[tokio::test]
async fn empty_and_trailers_survive_replay() {
    let empty = ReplayBody::buffer(Full::new(Bytes::new()), 0)
        .await
        .unwrap();
    assert!(empty.is_replayable());
    assert!(http_body::Body::is_end_stream(&empty));

    let mut trailers = HeaderMap::new();
    trailers.insert("x-checksum", "abc".parse().unwrap());
    let frames = vec![
        Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"data"))),
        Ok(Frame::trailers(trailers.clone())),
    ];
    let body = ReplayBody::buffer(StreamBody::new(stream::iter(frames)), 10)
        .await
        .unwrap();
    for b in [body.try_clone().unwrap(), body] {
        let c = b.collect().await.unwrap();
        assert_eq!(c.trailers(), Some(&trailers));
        assert_eq!(c.to_bytes(), "data");
    }
}

#[tokio::test]
async fn a_failing_body_is_an_error_not_a_short_body() {
    let frames = vec![
        Ok(Frame::data(Bytes::from_static(b"abc"))),
        Err(std::io::Error::other("client went away")),
    ];
    let err = ReplayBody::buffer(StreamBody::new(stream::iter(frames)), 100)
        .await
        .unwrap_err();
    assert!(std::error::Error::source(&err)
        .unwrap()
        .to_string()
        .contains("went away"));

    // Past the limit the error surfaces while streaming, not as a silent end.
    let frames = vec![
        Ok(Frame::data(Bytes::from_static(b"abcdef"))),
        Err(std::io::Error::other("cut")),
    ];
    let body = ReplayBody::buffer(StreamBody::new(stream::iter(frames)), 3)
        .await
        .unwrap();
    assert!(body.collect().await.is_err());
}

#[tokio::test]
async fn requests_replay_to_a_real_upstream() {
    let be = support::echo_backend().await;
    let req = Request::put("/doc")
        .header("x-id", "7")
        .body(chunked(5, 7))
        .unwrap();
    let req = buffer_request(req, 1024).await.unwrap();
    assert!(req.extensions().get::<NotReplayable>().is_none());
    let mut fwd = Forward::<ReplayBody<Chunks>>::new(&be.url()).unwrap();
    let mut echoes = Vec::new();
    for _ in 0..2 {
        let copy = try_clone_request(&req).unwrap();
        let res = fwd.ready().await.unwrap().call(copy).await.unwrap();
        echoes.push(collect(res.into_body()).await);
    }
    let res = fwd.ready().await.unwrap().call(req).await.unwrap();
    echoes.push(collect(res.into_body()).await);
    let want = expected(5, 7);
    for e in &echoes {
        assert!(e.starts_with(b"PUT /doc\n"));
        assert!(e.ends_with(&want), "body replayed whole");
        assert_eq!(
            support::header(&support::echoed_headers(e), "x-id"),
            Some("7")
        );
    }

    let big = buffer_request(Request::post("/").body(chunked(3, 600)).unwrap(), 1024)
        .await
        .unwrap();
    assert!(big.extensions().get::<NotReplayable>().is_some());
    assert!(try_clone_request(&big).is_none());
}
