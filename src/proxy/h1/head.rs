//! The request head we write and the response head we read, and how the response's body
//! is framed (RFC 9112 §6.3). The framing rules mirror hyper's client exactly (its
//! `role::Client::decoder`): `differential_tests.rs` runs both on the same bytes.

use std::mem::MaybeUninit;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Response, StatusCode, Version};

use super::error::Http1Error;

/// Header fields a response head may carry at most: hyper's default, so an upstream that
/// hyper refused is refused here too.
pub(crate) const MAX_HEADERS: usize = 100;

/// The most bytes a response head may take before its end is seen: hyper's client
/// default read-buffer limit (8 KiB + 100 × 4 KiB).
pub(crate) const MAX_HEAD_BYTES: usize = 8192 + 4096 * 100;

/// Where a field's name and value are in the head: name start and end, value start and
/// end.
pub(crate) type Span = (usize, usize, usize, usize);

/// How a response's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    /// No body (HEAD, 204, 304, `Content-Length: 0`).
    Empty,
    /// `Content-Length` bytes.
    Length(u64),
    /// `Transfer-Encoding: chunked`, possibly with trailers.
    Chunked,
    /// Until the upstream closes (no length, or a transfer coding other than chunked last).
    Eof,
}

/// A parsed response head.
pub(crate) struct Head {
    pub(crate) response: Response<()>,
    pub(crate) framing: Framing,
    /// Whether the connection may carry another exchange once this body is read.
    pub(crate) keep_alive: bool,
}

/// Writes `req`'s request line and fields into `out` (cleared first), as hyper's client
/// does for a request without a body: origin-form target, `HTTP/1.1`, the fields in the
/// map's order, lower-case names. `Transfer-Encoding` is not written (there is no body to
/// frame; hyper removes it too). A `Content-Length` is written as `0`, whatever it
/// claimed: the body sent is empty, and a length the body does not have would leave the
/// upstream reading the next request on the connection as this one's body (hyper writes
/// the claimed value).
pub(crate) fn encode_request(req: &http::request::Parts, out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(req.method.as_str().as_bytes());
    out.push(b' ');
    let target = req.uri.path_and_query().map_or("/", |pq| pq.as_str());
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut length = false;
    for (name, value) in &req.headers {
        if name == header::TRANSFER_ENCODING {
            continue;
        }
        if name == header::CONTENT_LENGTH {
            length = true;
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if length {
        out.extend_from_slice(b"content-length: 0\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// Parses one response head (to a `HEAD` request when `head_request`) from the front of
/// `buf`, skipping informational (1xx but 101) heads. `Ok(None)`: not complete yet (read
/// more); the head's bytes are taken out of `buf` only once a final head is complete, and
/// its field values share one allocation with them.
///
/// `spans` is scratch space for the fields' offsets, kept by the connection so that no
/// head pays for a zeroed array of `MAX_HEADERS` entries.
///
/// `fields` becomes the response's header map: pass the request's, cleared, and its
/// allocation serves the answer (as hyper's client does).
pub(crate) fn parse_response(
    buf: &mut BytesMut,
    head_request: bool,
    spans: &mut Vec<Span>,
    fields: &mut HeaderMap,
) -> Result<Option<Head>, Http1Error> {
    loop {
        let mut parsed = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut res = httparse::Response::new(&mut []);
        let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut res,
            buf,
            &mut parsed,
        ) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD_BYTES => {
                return Err(Http1Error::HeadTooLarge)
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(e) => return Err(Http1Error::Parse(e)),
        };
        let code = res.code.ok_or(Http1Error::Parse(httparse::Error::Status))?;
        let status = StatusCode::from_u16(code).map_err(|_| Http1Error::Status(code))?;
        let version = match res.version {
            Some(1) => Version::HTTP_11,
            _ => Version::HTTP_10,
        };
        if status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS {
            // 100 Continue, 103 Early Hints: not the answer; the final head follows.
            let _ = buf.split_to(len);
            if buf.is_empty() {
                return Ok(None);
            }
            continue;
        }
        // Offsets, so the fields can be cut out of the frozen head below.
        spans.clear();
        let count = res.headers.len();
        let base = buf.as_ptr() as usize;
        for field in res.headers.iter() {
            let name = field.name.as_ptr() as usize - base;
            let value = field.value.as_ptr() as usize - base;
            spans.push((
                name,
                name + field.name.len(),
                value,
                value + field.value.len(),
            ));
        }
        let reason = res.reason.filter(|r| Some(*r) != status.canonical_reason());
        let reason = reason.map(|r| Bytes::copy_from_slice(r.as_bytes()));
        let head = buf.split_to(len).freeze();
        let mut headers = std::mem::take(fields);
        headers.clear();
        headers.reserve(count);
        let mut keep_alive = version == Version::HTTP_11;
        let mut saw_close = false;
        // What framing needs, read in this one pass over the fields rather than looked up
        // in the map afterwards.
        let mut chunked_last = None;
        let mut length = Length::Absent;
        for &(n0, n1, v0, v1) in spans.iter() {
            let name = HeaderName::from_bytes(&head[n0..n1]).map_err(|_| Http1Error::FieldName)?;
            let value = HeaderValue::from_maybe_shared(head.slice(v0..v1))
                .map_err(|_| Http1Error::FieldValue)?;
            if name == header::TRANSFER_ENCODING {
                // Only the last line's last coding counts.
                chunked_last = Some(last_token_is(value.as_bytes(), b"chunked"));
            } else if name == header::CONTENT_LENGTH {
                length = length.and_line(value.as_bytes());
            } else if name == header::CONNECTION {
                // Once any line asks to close, a later `keep-alive` does not undo it.
                if saw_close || list_has(value.as_bytes(), b"close") {
                    saw_close = true;
                    keep_alive = false;
                } else if !keep_alive {
                    keep_alive = list_has(value.as_bytes(), b"keep-alive");
                }
            }
            headers.append(name, value);
        }
        let framing = framing(status, version, head_request, chunked_last, length)?;
        let mut response = Response::new(());
        *response.status_mut() = status;
        *response.version_mut() = version;
        *response.headers_mut() = headers;
        if let Some(reason) = reason {
            if let Ok(reason) = hyper::ext::ReasonPhrase::try_from(reason) {
                response.extensions_mut().insert(reason);
            }
        }
        // A 101 answers an upgrade; this client never asks for one, and the connection is
        // no longer HTTP after it.
        let keep_alive = keep_alive && status != StatusCode::SWITCHING_PROTOCOLS;
        let keep_alive = keep_alive && framing != Framing::Eof;
        return Ok(Some(Head {
            response,
            framing,
            keep_alive,
        }));
    }
}

/// The `Content-Length` lines of a head, as the field loop reads them.
#[derive(Clone, Copy)]
enum Length {
    Absent,
    /// Every value so far is this number.
    Valid(u64),
    /// A value is not a decimal number, or two values differ (RFC 9110 §8.6).
    Invalid,
}

impl Length {
    /// Adds one line: each of its comma-separated values must be the same number as
    /// every value before it.
    fn and_line(self, line: &[u8]) -> Length {
        let Some(text) = visible_ascii(line) else {
            return Length::Invalid;
        };
        let mut seen = match self {
            Length::Invalid => return Length::Invalid,
            Length::Absent => None,
            Length::Valid(n) => Some(n),
        };
        for part in text.split(|&b| b == b',') {
            match digits(part.trim_ascii()) {
                Some(n) if seen.is_none_or(|l| l == n) => seen = Some(n),
                _ => return Length::Invalid,
            }
        }
        seen.map_or(Length::Invalid, Length::Valid)
    }
}

/// RFC 9112 §6.3, in hyper's order. `chunked_last`: whether the last `Transfer-Encoding`
/// line ends in `chunked` (`None`: no such line).
fn framing(
    status: StatusCode,
    version: Version,
    head_request: bool,
    chunked_last: Option<bool>,
    length: Length,
) -> Result<Framing, Http1Error> {
    if matches!(status.as_u16(), 101 | 204 | 304) || head_request {
        return Ok(Framing::Empty);
    }
    if let Some(chunked) = chunked_last {
        if version == Version::HTTP_10 {
            return Err(Http1Error::TransferEncodingInHttp10);
        }
        return Ok(if chunked {
            Framing::Chunked
        } else {
            Framing::Eof
        });
    }
    match length {
        Length::Absent => Ok(Framing::Eof),
        Length::Valid(0) => Ok(Framing::Empty),
        // hyper's `DecodedLength` keeps the two largest values as markers.
        Length::Valid(n) if n <= u64::MAX - 2 => Ok(Framing::Length(n)),
        _ => Err(Http1Error::ContentLength),
    }
}

/// The bytes of a value `HeaderValue::to_str` accepts (visible ASCII and tab), else `None`:
/// hyper reads lists only through `to_str`.
fn visible_ascii(v: &[u8]) -> Option<&[u8]> {
    v.iter()
        .all(|&b| b == b'\t' || (0x20..0x7f).contains(&b))
        .then_some(v)
}

/// Decimal digits only, without overflow.
fn digits(v: &[u8]) -> Option<u64> {
    if v.is_empty() {
        return None;
    }
    v.iter().try_fold(0u64, |n, &b| match b {
        b'0'..=b'9' => n.checked_mul(10)?.checked_add(u64::from(b - b'0')),
        _ => None,
    })
}

/// Whether a comma-separated list (as `to_str` reads it) names `token`.
fn list_has(v: &[u8], token: &[u8]) -> bool {
    visible_ascii(v).is_some_and(|v| {
        v.split(|&b| b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
    })
}

/// Whether a comma-separated list's last item is `token`.
fn last_token_is(v: &[u8], token: &[u8]) -> bool {
    visible_ascii(v).is_some_and(|v| {
        v.rsplit(|&b| b == b',')
            .next()
            .is_some_and(|t| t.trim_ascii().eq_ignore_ascii_case(token))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{Method, Request};

    fn parse(text: &str, method: Method) -> Result<Option<Head>, Http1Error> {
        parse_response(
            &mut BytesMut::from(text),
            method == Method::HEAD,
            &mut Vec::new(),
            &mut HeaderMap::new(),
        )
    }

    #[test]
    fn framing_follows_rfc_9112_in_hypers_order() {
        let f = |t: &str| parse(t, Method::GET).map(|h| h.map(|h| (h.framing, h.keep_alive)));
        assert_eq!(
            f("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n").ok(),
            Some(Some((Framing::Length(5), true)))
        );
        assert_eq!(
            f("HTTP/1.1 200 OK\r\ncontent-length: 5, 5\r\ncontent-length: 5\r\n\r\n").ok(),
            Some(Some((Framing::Length(5), true)))
        );
        assert!(matches!(
            f("HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\n"),
            Err(Http1Error::ContentLength)
        ));
        assert!(matches!(
            f("HTTP/1.1 200 OK\r\ncontent-length: +5\r\n\r\n"),
            Err(Http1Error::ContentLength)
        ));
        // Transfer-Encoding wins over Content-Length; chunked must be last.
        assert_eq!(
            f("HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\ncontent-length: 3\r\n\r\n")
                .ok(),
            Some(Some((Framing::Chunked, true)))
        );
        assert_eq!(
            f("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked, gzip\r\n\r\n").ok(),
            Some(Some((Framing::Eof, false)))
        );
        assert!(matches!(
            f("HTTP/1.0 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"),
            Err(Http1Error::TransferEncodingInHttp10)
        ));
        assert_eq!(
            f("HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\n").ok(),
            Some(Some((Framing::Length(2), false)))
        );
        assert_eq!(
            f("HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 2\r\n\r\n").ok(),
            Some(Some((Framing::Length(2), true)))
        );
        assert_eq!(
            f("HTTP/1.1 200 OK\r\nconnection: close\r\nconnection: keep-alive\r\ncontent-length: 2\r\n\r\n")
                .ok(),
            Some(Some((Framing::Length(2), false)))
        );
        assert_eq!(
            f("HTTP/1.1 304 Not Modified\r\ncontent-length: 9\r\n\r\n").ok(),
            Some(Some((Framing::Empty, true)))
        );
        let head = parse("HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n", Method::HEAD);
        assert_eq!(head.ok().flatten().map(|h| h.framing), Some(Framing::Empty));
    }

    #[test]
    fn informational_heads_are_skipped_and_partial_heads_wait() {
        let mut buf = BytesMut::from(
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 0\r\n\r\n",
        );
        let head = parse_response(&mut buf, false, &mut Vec::new(), &mut HeaderMap::new())
            .ok()
            .flatten();
        assert_eq!(head.map(|h| h.response.status()), Some(StatusCode::CREATED));
        assert!(buf.is_empty());
        let mut buf = BytesMut::from("HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 2");
        assert!(matches!(
            parse_response(&mut buf, false, &mut Vec::new(), &mut HeaderMap::new()),
            Ok(None)
        ));
        assert_eq!(&buf[..], b"HTTP/1.1 2");
        let mut buf = BytesMut::from("HTTP/1.1 200 OK\r\nserver: x\r\n");
        assert!(matches!(
            parse_response(&mut buf, false, &mut Vec::new(), &mut HeaderMap::new()),
            Ok(None)
        ));
        assert_eq!(buf.len(), 28, "a partial head stays in the buffer");
    }

    #[test]
    fn an_endless_head_is_refused_at_the_limit() {
        let mut text = String::from("HTTP/1.1 200 OK\r\nx: ");
        text.push_str(&"a".repeat(MAX_HEAD_BYTES));
        assert!(matches!(
            parse(&text, Method::GET),
            Err(Http1Error::HeadTooLarge)
        ));
        let many: String = (0..=MAX_HEADERS).map(|i| format!("x{i}: 1\r\n")).collect();
        let text = format!("HTTP/1.1 200 OK\r\n{many}\r\n");
        assert!(matches!(
            parse(&text, Method::GET),
            Err(Http1Error::Parse(_))
        ));
    }

    #[test]
    fn a_non_canonical_reason_is_kept_for_the_client() {
        let head = parse(
            "HTTP/1.1 200 Fine\r\ncontent-length: 0\r\n\r\n",
            Method::GET,
        );
        let head = head.ok().flatten().map(|h| h.response);
        let reason = head
            .as_ref()
            .and_then(|r| r.extensions().get::<hyper::ext::ReasonPhrase>());
        assert_eq!(reason.map(|r| r.as_bytes()), Some(&b"Fine"[..]));
    }

    #[test]
    fn a_claimed_length_is_written_as_the_empty_body_it_has() {
        let req = Request::post("/")
            .header("content-length", "5")
            .header("x-a", "b")
            .body(());
        let mut out = Vec::new();
        if let Ok(req) = req {
            encode_request(&req.into_parts().0, &mut out);
        }
        assert_eq!(
            out,
            b"POST / HTTP/1.1\r\nx-a: b\r\ncontent-length: 0\r\n\r\n".to_vec()
        );
    }

    #[test]
    fn the_request_head_is_origin_form_without_transfer_encoding() {
        let req = Request::get("/a?b=1")
            .header("host", "up")
            .header("transfer-encoding", "chunked")
            .header("x-forwarded-for", "1.2.3.4")
            .body(())
            .map_err(|e| e.to_string());
        let mut out = Vec::new();
        if let Ok(req) = req {
            encode_request(&req.into_parts().0, &mut out);
        }
        assert_eq!(
            out,
            b"GET /a?b=1 HTTP/1.1\r\nhost: up\r\nx-forwarded-for: 1.2.3.4\r\n\r\n".to_vec()
        );
    }
}
