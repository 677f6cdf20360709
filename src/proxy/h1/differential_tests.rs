//! Differential test of the lean path's response reading against hyper's client (issue
//! 12: "any own parsing must be differential-fuzzed against hyper/httparse"). Thousands
//! of generated responses — valid, mutated byte by byte, cut short, with 1xx heads,
//! chunked bodies with extensions and trailers, conflicting lengths — go through both:
//! hyper's `client::conn::http1` over an in-memory pipe, and `parse_response` + `Decoder`
//! on the same bytes in the same pieces. Both must agree on the head (status, version,
//! fields, reason), the body bytes and the trailers, or both must refuse (at the same
//! stage: head or body).

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::HeaderMap;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::decode::{Decoded, Decoder};
use super::head::parse_response;

/// Field names and values, in order.
type Fields = Vec<(String, Vec<u8>)>;

/// The body bytes and the trailers, or `Err` when the body failed.
type BodyOutcome = Result<(Vec<u8>, Option<Fields>), ()>;

/// What a client made of a response.
#[derive(Debug, PartialEq)]
enum Outcome {
    /// The head was refused (or never completed).
    HeadError,
    Head {
        status: u16,
        version: http::Version,
        fields: Fields,
        reason: Option<Vec<u8>>,
        body: BodyOutcome,
    },
}

fn fields(map: &HeaderMap) -> Fields {
    map.iter()
        .map(|(n, v)| (n.as_str().to_string(), v.as_bytes().to_vec()))
        .collect()
}

/// hyper's client on `pieces`, written after the request arrived, then the end.
async fn hyper_reads(pieces: &[Vec<u8>], head_request: bool) -> Outcome {
    let (client, mut server) = tokio::io::duplex(1 << 20);
    let pieces = pieces.to_vec();
    let upstream = tokio::spawn(async move {
        let mut seen = Vec::new();
        let mut byte = [0u8; 1];
        while !seen.ends_with(b"\r\n\r\n") {
            match server.read(&mut byte).await {
                Ok(1) => seen.push(byte[0]),
                _ => return,
            }
        }
        for p in pieces {
            if server.write_all(&p).await.is_err() {
                return;
            }
            tokio::task::yield_now().await;
        }
        let _ = server.shutdown().await;
        // Hold the pipe until the client is done reading.
        let mut rest = Vec::new();
        let _ = server.read_to_end(&mut rest).await;
    });
    let Ok((mut tx, conn)) =
        hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(client)).await
    else {
        return Outcome::HeadError;
    };
    let driver = tokio::spawn(conn);
    let method = if head_request { "HEAD" } else { "GET" };
    let req = Request::builder()
        .method(method)
        .uri("/")
        .header("host", "up")
        .body(Empty::new());
    let Ok(req) = req else {
        return Outcome::HeadError;
    };
    let outcome = match tx.send_request(req).await {
        Err(_) => Outcome::HeadError,
        Ok(res) => {
            let (parts, body) = res.into_parts();
            let collected = body.collect().await.map(|c| {
                let trailers = c.trailers().map(fields);
                (c.to_bytes().to_vec(), trailers)
            });
            head_outcome(parts, collected.map_err(|_| ()))
        }
    };
    drop(tx);
    driver.abort();
    upstream.abort();
    outcome
}

/// The lean path's parser and decoder on the same pieces.
fn lean_reads(pieces: &[Vec<u8>], head_request: bool) -> Outcome {
    let mut buf = BytesMut::new();
    let mut next = pieces.iter();
    let mut spans = Vec::new();
    let head = loop {
        match parse_response(&mut buf, head_request, &mut spans, &mut HeaderMap::new()) {
            Ok(Some(head)) => break head,
            Ok(None) => match next.next() {
                Some(p) => buf.extend_from_slice(p),
                None => return Outcome::HeadError,
            },
            Err(_) => return Outcome::HeadError,
        }
    };
    let mut decoder = Decoder::new(head.framing);
    let mut body = Vec::new();
    let mut eof = false;
    let result = loop {
        match decoder.decode(&mut buf, eof) {
            Ok(Decoded::Data(b)) => body.extend_from_slice(&b),
            Ok(Decoded::Trailers(t)) => break Ok((body, Some(fields(&t)))),
            Ok(Decoded::End) => break Ok((body, None)),
            Ok(Decoded::NeedMore) => match next.next() {
                Some(p) => buf.extend_from_slice(p),
                None => eof = true,
            },
            Err(_) => break Err(()),
        }
    };
    head_outcome(head.response.into_parts().0, result)
}

/// The comparable part of a response head, with what became of its body.
fn head_outcome(parts: http::response::Parts, body: BodyOutcome) -> Outcome {
    Outcome::Head {
        status: parts.status.as_u16(),
        version: parts.version,
        fields: fields(&parts.headers),
        reason: parts
            .extensions
            .get::<hyper::ext::ReasonPhrase>()
            .map(|r| r.as_bytes().to_vec()),
        body,
    }
}

fn pick<'a>(rng: &mut StdRng, items: &[&'a [u8]]) -> &'a [u8] {
    items[rng.random_range(0..items.len())]
}

/// A chunked body, valid, with random chunk sizes, extensions and trailers.
fn chunked(rng: &mut StdRng) -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..rng.random_range(0..4) {
        let n: usize = rng.random_range(1..40);
        let size = match rng.random_range(0..3) {
            0 => format!("{n:x}"),
            1 => format!("{n:X}"),
            _ => format!("0{n:x}"),
        };
        out.extend_from_slice(size.as_bytes());
        if rng.random_bool(0.3) {
            out.extend_from_slice(pick(rng, &[&b";a=b"[..], b" ;x", b"\t;q=\"1\""]));
        }
        out.extend_from_slice(b"\r\n");
        out.extend((0..n).map(|i| b'a' + (i % 26) as u8));
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n");
    for _ in 0..rng.random_range(0..3) {
        out.extend_from_slice(pick(
            rng,
            &[
                &b"x-t: 1\r\n"[..],
                b"grpc-status: 0\r\n",
                b"x-u:v\r\n",
                b"x-t: 1\rx",
                b"x-t: 1\n",
            ],
        ));
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// One generated response.
fn response(rng: &mut StdRng) -> Vec<u8> {
    let mut out = Vec::new();
    if rng.random_bool(0.1) {
        out.extend_from_slice(pick(
            rng,
            &[
                &b"HTTP/1.1 100 Continue\r\n\r\n"[..],
                b"HTTP/1.1 103 Early Hints\r\nlink: </s.css>\r\n\r\n",
                b"\r\n",
            ],
        ));
    }
    out.extend_from_slice(pick(
        rng,
        &[
            &b"HTTP/1.1 200 OK"[..],
            b"HTTP/1.1 200 OK",
            b"HTTP/1.0 200 OK",
            b"HTTP/1.1 204 No Content",
            b"HTTP/1.1 304 Not Modified",
            b"HTTP/1.1 404 Not Found",
            b"HTTP/1.1 200 Fine",
            b"HTTP/1.1 502 ",
            b"HTTP/1.1 999 Odd",
            b"HTTP/1.1 20 OK",
            b"HTTP/2 200 OK",
            b"HTTP/1.1 200",
        ],
    ));
    out.extend_from_slice(b"\r\n");
    let mut framing = None;
    for _ in 0..rng.random_range(0..6) {
        let line = pick(
            rng,
            &[
                &b"content-length: 5"[..],
                b"Content-Length: 5",
                b"content-length: 5, 5",
                b"content-length: 5,6",
                b"content-length: +5",
                b"content-length:  5 ",
                b"content-length: 0",
                b"content-length: 99999999999999999999",
                b"content-length: 18446744073709551614",
                b"transfer-encoding: chunked",
                b"Transfer-Encoding: gzip, chunked",
                b"transfer-encoding: chunked, gzip",
                b"transfer-encoding: CHUNKED",
                b"transfer-encoding: chunked\t",
                b"connection: close",
                b"connection: keep-alive",
                b"server: nginx",
                b"x-a: b",
                b"x-a:c",
                b"x-obs: caf\xc3\xa9",
                b"bad header",
                b"x : y",
                b" folded",
                b"x-ctl: a\x01b",
                b"x-del: a\x7fb",
            ],
        );
        if line.starts_with(b"transfer") {
            framing = Some(true);
        } else if line.starts_with(b"content") || line.starts_with(b"Content") {
            framing.get_or_insert(false);
        }
        out.extend_from_slice(line);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    let body_len = match framing {
        Some(true) if rng.random_bool(0.8) => {
            let body = chunked(rng);
            out.extend_from_slice(&body);
            body.len()
        }
        _ => {
            let n: u8 = rng.random_range(0..12);
            out.extend((0..n).map(|i| b'A' + i));
            usize::from(n)
        }
    };
    // Mutations: bytes changed (half of them in the body, where the chunked framing is),
    // the stream cut short, bytes after the message.
    let body_at = out.len() - body_len;
    for _ in 0..rng.random_range(0..3) {
        let i = match rng.random_bool(0.5) && body_len > 0 {
            true => rng.random_range(body_at..out.len()),
            false => rng.random_range(0..out.len()),
        };
        let set = b"\r\n \t:;0fG\x7f\x80\x00";
        out[i] = set[rng.random_range(0..set.len())];
    }
    if rng.random_bool(0.15) {
        out.truncate(rng.random_range(0..out.len()));
    }
    if rng.random_bool(0.1) {
        out.extend_from_slice(b"HTTP/1.1 200 OK\r\n\r\n");
    }
    out
}

/// `bytes` cut into 1-4 random pieces.
fn pieces(rng: &mut StdRng, bytes: &[u8]) -> Vec<Vec<u8>> {
    let mut cuts: Vec<usize> = (0..rng.random_range(0..4))
        .map(|_| rng.random_range(0..=bytes.len()))
        .collect();
    cuts.sort_unstable();
    let mut out = Vec::new();
    let mut at = 0;
    for c in cuts.into_iter().chain([bytes.len()]) {
        if c > at {
            out.push(bytes[at..c].to_vec());
            at = c;
        }
    }
    out
}

#[test]
fn the_lean_reader_agrees_with_hypers_client() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let seed = std::env::var("H1_DIFF_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x1e4_2020_u64);
    let cases: usize = std::env::var("H1_DIFF_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4000);
    let mut rng = StdRng::seed_from_u64(seed);
    let (mut bodies, mut refused) = (0, 0);
    for case in 0..cases {
        let bytes = response(&mut rng);
        let pieces = pieces(&mut rng, &bytes);
        let head_request = rng.random_bool(0.1);
        let theirs = rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(5), hyper_reads(&pieces, head_request)).await
        });
        let Ok(theirs) = theirs else {
            panic!(
                "hyper hung on case {case}: {:?}",
                String::from_utf8_lossy(&bytes)
            );
        };
        let ours = lean_reads(&pieces, head_request);
        assert_eq!(
            ours,
            theirs,
            "case {case} (seed {seed}, HEAD {head_request}): {:?} in pieces {:?}",
            String::from_utf8_lossy(&bytes),
            pieces.iter().map(Vec::len).collect::<Vec<_>>()
        );
        match ours {
            Outcome::Head { body: Ok(_), .. } => bodies += 1,
            _ => refused += 1,
        }
    }
    // The generator must exercise both sides of the comparison.
    assert!(
        bodies > cases / 5 && refused > cases / 10,
        "{bodies} read, {refused} refused"
    );
}
