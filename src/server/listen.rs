//! Listening sockets and what an accepted connection becomes.
//!
//! Per-core workers each need their own listening socket on the same port, so the kernel
//! spreads new connections over them without a shared accept lock: `SO_REUSEPORT`, which
//! std and tokio cannot set before `bind` — hence `socket2`. The same option lets a new
//! process bind the port while the old one still serves, for restarts without downtime.
//!
//! [`Accept`] is the extension point for TLS (and, with it, HTTP/2 by ALPN): it turns an
//! accepted TCP stream into the byte stream HTTP is spoken over, and says which HTTP
//! version was agreed on it ([`Protocol`]).

use std::future::{ready, Future, Ready};
use std::io;
use std::net::SocketAddr;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// Turns an accepted TCP connection into the stream the server speaks HTTP over.
///
/// [`PlainTcp`] is the identity. A TLS acceptor returns its TLS stream after the
/// handshake; the future runs in the connection's own task, so a slow handshake never
/// holds up the accept loop, and it stays under the connection cap and the drain of a
/// shutdown like any connection. After the handshake, [`protocol`](Self::protocol) tells
/// the server which HTTP version to speak (TLS: the ALPN result).
pub trait Accept: Send + Sync + 'static {
    /// The stream HTTP is spoken over.
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// The handshake, if any.
    type Future: Future<Output = io::Result<Self::Io>> + Send + 'static;

    /// Starts serving `stream`, accepted from `peer`.
    fn accept(&self, stream: TcpStream, peer: SocketAddr) -> Self::Future;

    /// Which HTTP version to serve on `io`, known once [`accept`](Self::accept) is done.
    /// The default, [`Protocol::Detect`], reads the first bytes: the HTTP/2 connection
    /// preface means h2 (h2c "prior knowledge" on plain TCP), anything else HTTP/1.1.
    fn protocol(&self, _io: &Self::Io) -> Protocol {
        Protocol::Detect
    }

    /// Extensions added to every request of the connection, e.g. the verified TLS client
    /// certificate (`tls::ClientCertificate`). An error closes the connection before any
    /// request is served: what identifies the client must not be silently missing.
    /// Default: none.
    fn request_extensions(&self, _io: &Self::Io) -> io::Result<Option<http::Extensions>> {
        Ok(None)
    }
}

/// The HTTP version a connection is served with, as agreed by its [`Accept`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Protocol {
    /// HTTP/1.1 (or 1.0), with upgrades (`Upgrade: websocket`).
    Http1,
    /// HTTP/2 (TLS ALPN `h2`).
    Http2,
    /// Not agreed beforehand: the client's first bytes decide (the HTTP/2 preface, or
    /// HTTP/1.1). Bounded by the header read timeout like a request head.
    Detect,
}

/// Plain TCP: HTTP/1.1 on the accepted stream as it is.
#[derive(Debug, Clone, Copy, Default)]
pub struct PlainTcp;

impl Accept for PlainTcp {
    type Io = TcpStream;
    type Future = Ready<io::Result<TcpStream>>;

    fn accept(&self, stream: TcpStream, _peer: SocketAddr) -> Self::Future {
        ready(Ok(stream))
    }
}

/// A non-blocking listener on `addr` with `SO_REUSEPORT` (and `SO_REUSEADDR`), so other
/// sockets — this process's other workers, or the next process — can bind it too.
pub(crate) fn reuseport_listener(
    addr: SocketAddr,
    backlog: i32,
) -> io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    #[cfg(unix)]
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog)?;
    Ok(socket.into())
}

/// Steers new connections of a `SO_REUSEPORT` group to its newest `ours` sockets, bound
/// after the `previous` ones of the process being replaced.
///
/// Without it the kernel keeps hashing new connections to the old process's sockets up
/// to the moment they close, and closing a listener resets the connections completed in
/// its accept queue: a restart would fail a few requests. The classic BPF program picks
/// index `previous + random % ours` in the group (sockets are indexed in bind order).
/// Once the old sockets are closed the group shrinks and, with `previous >= ours`, that
/// index is past its end, for which the kernel falls back to its usual hash: the program
/// then costs nothing and needs no removal.
#[cfg(target_os = "linux")]
pub(crate) fn steer_to_newest(
    socket: &std::net::TcpListener,
    previous: u32,
    ours: u32,
) -> io::Result<()> {
    use nix::sys::socket::{setsockopt, sockopt::AttachReusePortCbpf};
    // Classic BPF opcodes (linux/filter.h): A = random; A %= ours; A += previous; return A.
    const BPF_LD_W_ABS: u16 = 0x20;
    const BPF_ALU_MOD_K: u16 = 0x04 | 0x90;
    const BPF_ALU_ADD_K: u16 = 0x04;
    const BPF_RET_A: u16 = 0x06 | 0x10;
    // SKF_AD_OFF + SKF_AD_RANDOM is negative; cBPF takes it as the u32 bit pattern.
    let random = (libc::SKF_AD_OFF + libc::SKF_AD_RANDOM) as u32;
    let ins = |code, k| libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    };
    let mut program = [
        ins(BPF_LD_W_ABS, random),
        ins(BPF_ALU_MOD_K, ours.max(1)),
        ins(BPF_ALU_ADD_K, previous),
        ins(BPF_RET_A, 0),
    ];
    let fprog = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_mut_ptr(),
    };
    // The kernel copies the program during the call; `program` outlives it.
    setsockopt(socket, AttachReusePortCbpf, &fprog).map_err(io::Error::from)
}

/// Not available here: a take-over binds alongside the old process without steering.
#[cfg(not(target_os = "linux"))]
pub(crate) fn steer_to_newest(
    _socket: &std::net::TcpListener,
    _previous: u32,
    _ours: u32,
) -> io::Result<()> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "steering a SO_REUSEPORT group needs Linux",
    ))
}
