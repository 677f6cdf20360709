//! Telling HTTP/2 prior knowledge from HTTP/1.1 on a connection nobody negotiated.
//!
//! An h2c client (`curl --http2-prior-knowledge`, gRPC without TLS, a proxy's h2 pool)
//! opens with the 24-byte connection preface; an HTTP/1.1 client with a request line. The
//! first bytes decide, and are then handed back to whichever protocol serves the
//! connection ([`Prefixed`]). hyper-util's `auto` builder does the same but reads without
//! a deadline: a client that connects and stays silent (or trickles the preface one byte
//! at a time) would hold its connection forever, so this one is bounded by the caller.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// The HTTP/2 connection preface (RFC 9113, section 3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// First read's buffer: large enough that a usual HTTP/1.1 request head arrives whole, so
/// the sniffing read is the read hyper would have made anyway (no extra syscall).
const SNIFF_BUF: usize = 2048;

/// Reads until the bytes are known to be (or not be) the HTTP/2 preface. Returns whether
/// they are, with everything read; `None` when the client closed before sending anything.
pub(crate) async fn sniff<I: AsyncRead + Unpin>(io: &mut I) -> io::Result<Option<(bool, Bytes)>> {
    let mut buf = BytesMut::with_capacity(SNIFF_BUF);
    loop {
        if io.read_buf(&mut buf).await? == 0 {
            if buf.is_empty() {
                return Ok(None);
            }
            // A truncated preface or a short HTTP/1 head: HTTP/1 answers it (400) or ends.
            return Ok(Some((false, buf.freeze())));
        }
        let n = buf.len().min(PREFACE.len());
        if buf[..n] != PREFACE[..n] {
            return Ok(Some((false, buf.freeze())));
        }
        if n == PREFACE.len() {
            return Ok(Some((true, buf.freeze())));
        }
    }
}

/// An IO whose first reads return `prefix` (bytes already read while sniffing).
#[derive(Debug)]
pub(crate) struct Prefixed<I> {
    prefix: Bytes,
    io: I,
}

impl<I> Prefixed<I> {
    pub(crate) fn new(prefix: Bytes, io: I) -> Self {
        Prefixed { prefix, io }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Prefixed<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            if self.prefix.is_empty() {
                // Free the sniffing buffer now rather than with the connection.
                self.prefix = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Prefixed<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn preface_in_pieces_is_h2_and_a_request_line_is_h1() {
        let (mut client, mut server) = tokio::io::duplex(64);
        let sniffed = tokio::spawn(async move { sniff(&mut server).await });
        for chunk in PREFACE.chunks(5) {
            client.write_all(chunk).await.unwrap();
        }
        let (h2, bytes) = sniffed.await.unwrap().unwrap().unwrap();
        assert!(h2);
        assert_eq!(&bytes[..], &PREFACE[..]);

        let (mut client, mut server) = tokio::io::duplex(64);
        client.write_all(b"PRX").await.unwrap();
        let (h2, bytes) = sniff(&mut server).await.unwrap().unwrap();
        assert!(!h2, "differs from the preface at the third byte");
        let mut replayed = Prefixed::new(bytes, server);
        client.write_all(b" / HTTP/1.1").await.unwrap();
        drop(client);
        let mut all = Vec::new();
        replayed.read_to_end(&mut all).await.unwrap();
        assert_eq!(
            all, b"PRX / HTTP/1.1",
            "sniffed bytes come first, then the rest"
        );
    }

    #[tokio::test]
    async fn closed_before_any_byte_is_none() {
        let (client, mut server) = tokio::io::duplex(64);
        drop(client);
        assert!(sniff(&mut server).await.unwrap().is_none());
    }
}
