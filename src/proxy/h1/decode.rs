//! A response body's framing undone, byte for byte as hyper's client does it (its
//! `proto::h1::decode`): `Content-Length`, chunked with extensions and trailers, and
//! close-delimited. Sans-I/O: it takes from the connection's read buffer and says when it
//! needs more, so `differential_tests.rs` can feed hyper and it the same bytes.

use bytes::{BufMut, Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue};

use super::error::Http1Error;
use super::head::{Framing, MAX_HEADERS};

/// Chunk-extension bytes a whole body may carry (hyper's limit: per body, not per chunk).
const EXTENSIONS_LIMIT: u64 = 16 * 1024;
/// Trailer bytes a body may carry (hyper's `TRAILER_LIMIT`).
const TRAILER_LIMIT: usize = 16 * 1024;

/// What one step of decoding gave.
#[derive(Debug)]
pub(crate) enum Decoded {
    /// Body bytes.
    Data(Bytes),
    /// The trailer fields; the body is complete.
    Trailers(HeaderMap),
    /// The body is complete.
    End,
    /// The buffer holds no further step: read more.
    NeedMore,
}

/// The decoder of one response body.
#[derive(Debug)]
pub(crate) struct Decoder {
    kind: Kind,
}

#[derive(Debug)]
enum Kind {
    Length(u64),
    Chunked(Chunked),
    Eof,
    Done,
}

#[derive(Debug, Default)]
struct Chunked {
    state: State,
    /// The current chunk's size, then what is left of it.
    size: u64,
    extensions: u64,
    trailers: Option<BytesMut>,
    trailer_lines: usize,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum State {
    #[default]
    Start,
    Size,
    SizeLws,
    Extension,
    SizeLf,
    Body,
    BodyCr,
    BodyLf,
    Trailer,
    TrailerLf,
    EndCr,
    EndLf,
}

impl Decoder {
    pub(crate) fn new(framing: Framing) -> Self {
        let kind = match framing {
            Framing::Empty | Framing::Length(0) => Kind::Done,
            Framing::Length(n) => Kind::Length(n),
            Framing::Chunked => Kind::Chunked(Chunked::default()),
            Framing::Eof => Kind::Eof,
        };
        Decoder { kind }
    }

    /// Whether the body is complete.
    pub(crate) fn is_done(&self) -> bool {
        matches!(self.kind, Kind::Done)
    }

    /// Bytes still to come when the length is known.
    pub(crate) fn remaining(&self) -> Option<u64> {
        match self.kind {
            Kind::Length(n) => Some(n),
            Kind::Done => Some(0),
            _ => None,
        }
    }

    /// One step from `buf`. `eof`: the upstream has closed, nothing more will come.
    pub(crate) fn decode(&mut self, buf: &mut BytesMut, eof: bool) -> Result<Decoded, Http1Error> {
        match &mut self.kind {
            Kind::Done => Ok(Decoded::End),
            Kind::Length(left) => {
                if buf.is_empty() {
                    return match eof {
                        true => Err(Http1Error::Incomplete),
                        false => Ok(Decoded::NeedMore),
                    };
                }
                let n = usize::try_from(*left).map_or(buf.len(), |l| l.min(buf.len()));
                *left -= n as u64;
                if *left == 0 {
                    self.kind = Kind::Done;
                }
                Ok(Decoded::Data(buf.split_to(n).freeze()))
            }
            Kind::Eof => {
                if !buf.is_empty() {
                    return Ok(Decoded::Data(buf.split().freeze()));
                }
                if eof {
                    self.kind = Kind::Done;
                    return Ok(Decoded::End);
                }
                Ok(Decoded::NeedMore)
            }
            Kind::Chunked(c) => {
                let step = c.step(buf, eof)?;
                if matches!(step, Decoded::End | Decoded::Trailers(_)) {
                    self.kind = Kind::Done;
                }
                Ok(step)
            }
        }
    }
}

impl Chunked {
    fn step(&mut self, buf: &mut BytesMut, eof: bool) -> Result<Decoded, Http1Error> {
        use State::*;
        loop {
            if self.state == Body {
                if buf.is_empty() {
                    return more(eof);
                }
                let n = usize::try_from(self.size).map_or(buf.len(), |s| s.min(buf.len()));
                self.size -= n as u64;
                if self.size == 0 {
                    self.state = BodyCr;
                }
                return Ok(Decoded::Data(buf.split_to(n).freeze()));
            }
            let Some(&b) = buf.first() else {
                return more(eof);
            };
            let _ = buf.split_to(1);
            self.state = match (self.state, b) {
                (Start | Size, b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F') => {
                    let digit = u64::from(match b {
                        b'0'..=b'9' => b - b'0',
                        b'a'..=b'f' => b - b'a' + 10,
                        _ => b - b'A' + 10,
                    });
                    self.size = self
                        .size
                        .checked_mul(16)
                        .and_then(|s| s.checked_add(digit))
                        .ok_or(Http1Error::Chunked("chunk size overflows"))?;
                    Size
                }
                (Start, _) => return Err(Http1Error::Chunked("missing chunk size digit")),
                (Size | SizeLws, b'\t' | b' ') => SizeLws,
                (Size | SizeLws, b';') => Extension,
                (Size | SizeLws, b'\r') => SizeLf,
                (Size | SizeLws, _) => return Err(Http1Error::Chunked("invalid chunk size line")),
                (Extension, b'\r') => SizeLf,
                (Extension, b'\n') => {
                    return Err(Http1Error::Chunked("chunk extension contains a newline"))
                }
                (Extension, _) => {
                    self.extensions += 1;
                    if self.extensions >= EXTENSIONS_LIMIT {
                        return Err(Http1Error::Chunked("chunk extensions over the limit"));
                    }
                    Extension
                }
                (SizeLf, b'\n') if self.size == 0 => EndCr,
                (SizeLf, b'\n') => Body,
                (SizeLf, _) => return Err(Http1Error::Chunked("chunk size line without LF")),
                (BodyCr, b'\r') => BodyLf,
                (BodyCr, _) => return Err(Http1Error::Chunked("chunk data without CR")),
                (BodyLf, b'\n') => Start,
                (BodyLf, _) => return Err(Http1Error::Chunked("chunk data without LF")),
                (EndCr, b'\r') => {
                    self.keep(b)?;
                    EndLf
                }
                (EndCr, _) => {
                    match &mut self.trailers {
                        // The first byte starts the buffer unchecked, as in hyper.
                        None => {
                            let mut t = BytesMut::with_capacity(64);
                            t.put_u8(b);
                            self.trailers = Some(t);
                        }
                        Some(_) => self.keep(b)?,
                    }
                    Trailer
                }
                (Trailer, b'\r') => {
                    self.keep(b)?;
                    TrailerLf
                }
                (Trailer, _) => {
                    self.keep(b)?;
                    Trailer
                }
                (TrailerLf, b'\n') => {
                    if self.trailer_lines >= MAX_HEADERS {
                        return Err(Http1Error::Chunked("too many trailer fields"));
                    }
                    self.trailer_lines += 1;
                    self.keep(b)?;
                    EndCr
                }
                (TrailerLf, _) => return Err(Http1Error::Chunked("trailer line without LF")),
                (EndLf, b'\n') => {
                    self.keep(b)?;
                    return match self.trailers.take() {
                        Some(t) => Ok(Decoded::Trailers(trailers(&t, self.trailer_lines)?)),
                        None => Ok(Decoded::End),
                    };
                }
                (EndLf, _) => return Err(Http1Error::Chunked("last chunk without LF")),
                (Body, _) => Body,
            };
        }
    }

    /// Adds a byte to the trailers being collected (if any), within the limit.
    fn keep(&mut self, b: u8) -> Result<(), Http1Error> {
        if let Some(t) = &mut self.trailers {
            t.put_u8(b);
            if t.len() >= TRAILER_LIMIT {
                return Err(Http1Error::Chunked("trailers over the limit"));
            }
        }
        Ok(())
    }
}

fn more(eof: bool) -> Result<Decoded, Http1Error> {
    match eof {
        true => Err(Http1Error::Incomplete),
        false => Ok(Decoded::NeedMore),
    }
}

/// The collected trailer section as fields.
fn trailers(section: &[u8], lines: usize) -> Result<HeaderMap, Http1Error> {
    let mut fields = vec![httparse::EMPTY_HEADER; lines];
    match httparse::parse_headers(section, &mut fields) {
        Ok(httparse::Status::Complete((_, fields))) => {
            let mut map = HeaderMap::with_capacity(fields.len());
            for f in fields.iter() {
                let name =
                    HeaderName::from_bytes(f.name.as_bytes()).map_err(|_| Http1Error::Trailers)?;
                let value = HeaderValue::from_bytes(f.value).map_err(|_| Http1Error::Trailers)?;
                map.append(name, value);
            }
            Ok(map)
        }
        _ => Err(Http1Error::Trailers),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes `input` fed in pieces of `step` bytes; the body, the trailers, or the error.
    fn run(
        framing: Framing,
        input: &[u8],
        step: usize,
    ) -> Result<(Vec<u8>, Option<HeaderMap>), String> {
        let mut d = Decoder::new(framing);
        let mut buf = BytesMut::new();
        let mut fed = 0;
        let mut body = Vec::new();
        loop {
            let eof = fed == input.len();
            match d.decode(&mut buf, eof).map_err(|e| e.to_string())? {
                Decoded::Data(b) => body.extend_from_slice(&b),
                Decoded::Trailers(t) => return Ok((body, Some(t))),
                Decoded::End => return Ok((body, None)),
                Decoded::NeedMore => {
                    let end = (fed + step).min(input.len());
                    buf.extend_from_slice(&input[fed..end]);
                    fed = end;
                }
            }
        }
    }

    #[test]
    fn chunked_bodies_decode_in_any_split() {
        let input = b"5;ext=1\r\nhello\r\n1 \t\r\n \r\n0\r\nx-a: 1\r\nx-b: 2\r\n\r\n";
        for step in [1, 2, 3, 7, input.len()] {
            let (body, trailers) = run(Framing::Chunked, input, step).unwrap_or_default();
            assert_eq!(body, b"hello ", "step {step}");
            let trailers = trailers.unwrap_or_default();
            assert_eq!(trailers.get("x-b").map(|v| v.as_bytes()), Some(&b"2"[..]));
        }
        assert_eq!(
            run(Framing::Chunked, b"A\r\n0123456789\r\n0\r\n\r\n", 4).ok(),
            Some((b"0123456789".to_vec(), None))
        );
    }

    #[test]
    fn malformed_or_cut_chunked_bodies_are_errors() {
        for bad in [
            &b"z\r\n"[..],
            b"5\nhello\r\n0\r\n\r\n",
            b"5;a\nb\r\nhello\r\n0\r\n\r\n",
            b"5\r\nhelloX\r\n0\r\n\r\n",
            b"5\r\nhello\r\n0\r\n\r",
            b"5\r\nhel",
            b"ffffffffffffffffff\r\n",
            b"1 1\r\n",
        ] {
            assert!(
                run(Framing::Chunked, bad, 1).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let mut long = b"1;".to_vec();
        long.extend(std::iter::repeat_n(b'a', EXTENSIONS_LIMIT as usize));
        assert!(run(Framing::Chunked, &long, 4096).is_err());
        let mut big = b"0\r\n".to_vec();
        for i in 0..2000 {
            big.extend_from_slice(format!("x-{i}: 1234567\r\n").as_bytes());
        }
        assert!(
            run(Framing::Chunked, &big, 4096).is_err(),
            "trailers past 16 KiB"
        );
    }

    #[test]
    fn length_and_eof_bodies_stop_where_they_should() {
        let mut d = Decoder::new(Framing::Length(3));
        let mut buf = BytesMut::from(&b"abcdef"[..]);
        assert!(matches!(d.decode(&mut buf, false), Ok(Decoded::Data(b)) if b == "abc"));
        assert!(d.is_done());
        assert_eq!(&buf[..], b"def", "the next message's bytes stay");
        assert!(run(Framing::Length(5), b"abc", 1).is_err());
        assert_eq!(
            run(Framing::Eof, b"abc", 2).ok(),
            Some((b"abc".to_vec(), None))
        );
    }
}
