//! Tests of the HTTP/2 frame scan: stream counting from hand-built frames, both directions.
//! Kept beside `h2wire.rs` so that file holds only the counting it documents.

use super::*;

fn frame(kind: u8, flags: u8, id: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&id.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

#[test]
fn streams_count_from_headers_to_both_end_streams_byte_by_byte() {
    let streams = Streams::new(Arc::new(Notify::new()));
    let mut c = Counted::new(tokio::io::empty(), streams.clone());
    let mut out = vec![0u8; PREFACE_LEN];
    out.extend(frame(SETTINGS, 0, 0, &[]));
    out.extend(frame(HEADERS, END_STREAM, 1, b"hpack"));
    out.extend(frame(HEADERS, 0, 3, b"hpack"));
    // Written one byte at a time: the scan keeps its place across writes.
    for b in &out {
        c.on_written(std::slice::from_ref(b));
    }
    assert_eq!(streams.load(), 2);
    let mut settings = Vec::new();
    settings.extend_from_slice(&SETTINGS_MAX_CONCURRENT_STREAMS.to_be_bytes());
    settings.extend_from_slice(&4u32.to_be_bytes());
    let mut inp = frame(SETTINGS, 0, 0, &settings);
    inp.extend(frame(HEADERS, 0, 1, b"x"));
    inp.extend(frame(DATA, END_STREAM, 1, b"body"));
    inp.extend(frame(RST_STREAM, 0, 3, &[0, 0, 0, 8]));
    c.on_read(&inp);
    assert!(streams.settled.load(Ordering::Relaxed));
    assert_eq!(streams.peer_max.load(Ordering::Relaxed), 4);
    assert_eq!(streams.load(), 0);
    // Trailers on a closed stream open nothing.
    c.on_written(&frame(HEADERS, END_STREAM, 1, b"t"));
    assert_eq!(streams.load(), 0);
}

#[test]
fn reservations_respect_both_limits_and_do_not_double_count() {
    let streams = Streams::new(Arc::new(Notify::new()));
    let mut c = Counted::new(tokio::io::empty(), streams.clone());
    let a = streams.try_reserve(2).expect("first");
    let _b = streams.try_reserve(2).expect("second");
    assert!(streams.try_reserve(2).is_none());
    // The reserved requests' streams open: still two in use, not four.
    let mut out = vec![0u8; PREFACE_LEN];
    out.extend(frame(HEADERS, END_STREAM, 1, b""));
    out.extend(frame(HEADERS, END_STREAM, 3, b""));
    c.on_written(&out);
    assert_eq!(streams.load(), 2);
    // Answered, body still coming, exchange done for hyper: the stream still counts.
    c.on_read(&frame(HEADERS, 0, 1, b""));
    drop(a);
    assert_eq!(streams.load(), 2);
    c.on_read(&frame(DATA, END_STREAM, 1, b""));
    assert_eq!(streams.load(), 1);
    // A GOAWAY drops the streams it will not process.
    c.on_read(&frame(GOAWAY, 0, 0, &[0, 0, 0, 1, 0, 0, 0, 0]));
    assert_eq!(streams.load(), 1, "the second request is still pending");
}
