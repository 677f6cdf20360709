//! Small vectored writes sent as one plain write: `send` instead of `writev`.
//!
//! hyper writes a message as a vector (head, then body chunks) whenever the IO says it
//! supports vectored writes, as a TCP stream does. For the small messages a proxy mostly
//! moves (a request head of ~130 bytes, a response head and a short body), `writev` costs
//! more in the kernel than the copy it saves in user space: the VFS path (`vfs_writev`:
//! the iovec array copied in and checked, file-position locking, write notification)
//! around the same socket send. A profile under wrk put that path at ~2.5 % of the proxy's
//! CPU; HAProxy and nginx send such messages with one `send`. Here a vector of up to
//! [`COALESCE_MAX`] bytes is copied into one stack buffer and written with a single
//! `poll_write` (a socket `send`); a single slice goes straight to `poll_write`; anything
//! larger stays vectored, as hyper asked.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Largest vector copied into one buffer: a typical head plus a short body; small enough
/// that zeroing and filling the stack buffer costs less than the `writev` path.
pub(crate) const COALESCE_MAX: usize = 2048;

/// The smaller of the two stack buffers.
const SMALL: usize = 512;

/// Writes `bufs` (at most `N` bytes in all) as one buffer. The bytes written are a prefix
/// of the concatenation either way, so the count means the same to the caller as a
/// vectored write's.
fn write_joined<I: AsyncWrite, const N: usize>(
    io: Pin<&mut I>,
    cx: &mut Context<'_>,
    bufs: &[IoSlice<'_>],
) -> Poll<io::Result<usize>> {
    let mut joined = [0u8; N];
    let mut len = 0;
    for b in bufs {
        let Some(dst) = joined.get_mut(len..len + b.len()) else {
            // Larger than the caller measured: cannot happen; send what fits.
            break;
        };
        dst.copy_from_slice(b);
        len += b.len();
    }
    io.poll_write(cx, &joined[..len])
}

/// An IO whose small vectored writes are one plain write (see the module docs).
#[derive(Debug)]
pub(crate) struct SmallWrites<I> {
    io: I,
}

impl<I> SmallWrites<I> {
    pub(crate) fn new(io: I) -> Self {
        SmallWrites { io }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for SmallWrites<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for SmallWrites<I> {
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
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let mut non_empty = bufs.iter().filter(|b| !b.is_empty());
        let (first, second) = (non_empty.next(), non_empty.next());
        match (first, second) {
            (None, _) => Poll::Ready(Ok(0)),
            (Some(only), None) => Pin::new(&mut self.io).poll_write(cx, only),
            (Some(_), Some(_)) => {
                let total = bufs.iter().fold(0usize, |n, b| n.saturating_add(b.len()));
                let io = Pin::new(&mut self.io);
                // Two sizes of stack buffer: zeroing it is the copy's fixed cost, and most
                // heads with a short body fit the small one.
                if total <= SMALL {
                    write_joined::<_, SMALL>(io, cx, bufs)
                } else if total <= COALESCE_MAX {
                    write_joined::<_, COALESCE_MAX>(io, cx, bufs)
                } else {
                    io.poll_write_vectored(cx, bufs)
                }
            }
        }
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
    use tokio::io::AsyncReadExt;

    /// Vectors of any shape arrive whole and in order: in either stack buffer (joined),
    /// above the bound (vectored), a single slice and empty slices.
    #[tokio::test]
    async fn every_shape_of_vector_arrives_whole_and_in_order() {
        let mid = vec![5u8; SMALL + 1];
        let big = vec![7u8; COALESCE_MAX];
        let cases: Vec<Vec<&[u8]>> = vec![
            vec![b"head\r\n\r\n", b"body"],
            vec![b"", b"only", b""],
            vec![b"a", b"", b"b", b"c"],
            vec![b"x", &mid],
            vec![b"x", &big],
            vec![&big],
            vec![],
        ];
        for case in cases {
            let expected: Vec<u8> = case.concat();
            let (a, mut b) = tokio::io::duplex(64 * 1024);
            let mut w = SmallWrites::new(a);
            let mut off = 0;
            while off < expected.len() {
                // Re-slice what is left, as hyper does after a partial write.
                let rest = &expected[off..];
                let slices: Vec<IoSlice<'_>> = if off == 0 {
                    case.iter().map(|s| IoSlice::new(s)).collect()
                } else {
                    vec![IoSlice::new(rest)]
                };
                let n =
                    std::future::poll_fn(|cx| Pin::new(&mut w).poll_write_vectored(cx, &slices))
                        .await
                        .unwrap();
                assert!(n > 0);
                off += n;
            }
            drop(w);
            let mut got = Vec::new();
            b.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, expected);
        }
    }
}
