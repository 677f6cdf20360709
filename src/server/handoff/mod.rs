//! Restarts without a reset connection: the old process passes its listening sockets to
//! the new one (HAProxy's `-x`, Envoy's hot restart).
//!
//! A restart that binds new sockets next to the old ones ([`Workers::take_over`]) must get
//! every new connection away from the old sockets before they close, because closing a
//! listener resets the connections completed in its accept queue; steering them leaves a
//! window while the old sockets close one by one. Passing the sockets closes none: the
//! old process sends them over a unix socket (`SCM_RIGHTS`), the new one accepts from the
//! very same kernel sockets — the same accept queues — and the old one then stops
//! accepting and drains its in-flight requests. A connection waiting in a queue at any
//! moment is in a queue the new process serves. No `sysctl`, no BPF.
//!
//! The exchange (version 1), on a `SOCK_STREAM` unix socket; every wait is bounded by a
//! timeout ([`HANDOFF_TIMEOUT`] by default):
//! 1. new → old: `TPHO`, the protocol version (u16, big-endian), two zero bytes.
//! 2. old → new: the same hello with its own version, then the number of sockets (u32).
//!    If the versions differ the old side stops here and keeps serving.
//! 3. old → new: one byte per chunk of at most [`CHUNK`] sockets, carrying them.
//! 4. new → old, once its workers accept from the sockets: `TOOK`. The old process then
//!    shuts its workers down ([`WorkersHandle::shutdown`]).
//!
//! Both sides check that the peer runs as the same user (`SO_PEERCRED`), the socket
//! file is created `0600`, and a path that exists but is not a socket is refused.
//!
//! [`Workers::take_over`]: super::Workers::take_over
//! [`WorkersHandle::shutdown`]: super::WorkersHandle::shutdown

mod receive;
mod send;

pub use receive::Inherited;
pub(crate) use receive::Took;
pub(crate) use send::{steer_by_hash, HandoffServer};

use std::io;
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

/// How long each step of a handoff waits for the peer by default.
pub const HANDOFF_TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) const MAGIC: &[u8; 4] = b"TPHO";
pub(crate) const VERSION: u16 = 1;
pub(crate) const TOOK: &[u8; 4] = b"TOOK";
/// Sockets per message: the kernel takes at most 253 descriptors in one (`SCM_MAX_FD`).
pub(crate) const CHUNK: usize = 64;
/// More sockets than any sane worker count: a bound on what a peer can make us hold.
pub(crate) const MAX_SOCKETS: u32 = 4096;

/// Why a handoff failed. The new process gets it from [`Inherited::receive`]; the old
/// one logs it and keeps serving.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HandoffError {
    /// Nothing listens at the path (no file, or a socket left by a process that is gone):
    /// a first start, which binds fresh sockets.
    #[error("no process hands sockets over at {}: {source}", path.display())]
    NoPeer {
        /// The handoff path.
        path: PathBuf,
        /// What connecting returned.
        #[source]
        source: io::Error,
    },
    /// The path exists and is not a unix socket: refused rather than replaced.
    #[error("{} exists and is not a unix socket", .0.display())]
    NotASocket(PathBuf),
    /// The peer does not speak this protocol (wrong hello, or it closed before answering).
    #[error("the peer does not speak the socket handoff protocol")]
    WrongPeer,
    /// The peer speaks another version of the protocol.
    #[error("the peer speaks handoff protocol version {theirs}, this process {ours}")]
    Version {
        /// This process's version.
        ours: u16,
        /// The peer's.
        theirs: u16,
    },
    /// The peer runs as another user.
    #[error("the peer runs as uid {theirs}, this process as uid {ours}")]
    Credentials {
        /// This process's effective uid.
        ours: u32,
        /// The peer's.
        theirs: u32,
    },
    /// A received socket is bound elsewhere than the address this process serves.
    #[error("the received sockets listen on {got}, not on {wanted}")]
    AddressMismatch {
        /// The address this process was asked to serve.
        wanted: SocketAddr,
        /// Where a received socket listens.
        got: SocketAddr,
    },
    /// A received descriptor is not a listening TCP socket.
    #[error("a received descriptor is not a listening TCP socket")]
    NotAListener,
    /// The peer announced more sockets than it sent (or than fit the message).
    #[error("the peer announced {announced} sockets and sent {received}")]
    Incomplete {
        /// How many the hello announced.
        announced: u32,
        /// How many arrived.
        received: usize,
    },
    /// The peer announced no socket, or more than this side takes.
    #[error("the peer announced {0} sockets")]
    BadCount(u32),
    /// The peer did not answer within the timeout.
    #[error("the peer did not answer within {0:?}")]
    Timeout(Duration),
    /// Another I/O error.
    #[error("socket handoff: {0}")]
    Io(#[from] io::Error),
}

impl HandoffError {
    /// Reads a timed-out socket read or write as [`HandoffError::Timeout`].
    fn from_io(e: io::Error, timeout: Duration) -> Self {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => HandoffError::Timeout(timeout),
            io::ErrorKind::UnexpectedEof => HandoffError::WrongPeer,
            _ => HandoffError::Io(e),
        }
    }
}

impl From<HandoffError> for io::Error {
    fn from(e: HandoffError) -> Self {
        match e {
            HandoffError::Io(e) => e,
            e => io::Error::other(e),
        }
    }
}

pub(crate) fn hello() -> [u8; 8] {
    let v = VERSION.to_be_bytes();
    [MAGIC[0], MAGIC[1], MAGIC[2], MAGIC[3], v[0], v[1], 0, 0]
}

/// The peer's version, if `b` is a hello.
pub(crate) fn parse_hello(b: &[u8]) -> Result<u16, HandoffError> {
    match b {
        [m0, m1, m2, m3, v0, v1, 0, 0] if [*m0, *m1, *m2, *m3] == *MAGIC => {
            Ok(u16::from_be_bytes([*v0, *v1]))
        }
        _ => Err(HandoffError::WrongPeer),
    }
}

/// Refuses a peer that runs as another user: it could hand us sockets of its choosing,
/// or take ours.
pub(crate) fn same_user(peer: &UnixStream) -> Result<(), HandoffError> {
    let theirs = rustix::net::sockopt::socket_peercred(peer)
        .map_err(io::Error::from)?
        .uid
        .as_raw();
    let ours = rustix::process::geteuid().as_raw();
    if theirs == ours {
        Ok(())
    } else {
        Err(HandoffError::Credentials { ours, theirs })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hello_is_the_magic_a_version_and_two_zero_bytes() {
        assert_eq!(parse_hello(&hello()).unwrap(), VERSION);
        assert!(matches!(
            parse_hello(b"TPHO\x00\x01\x00\x01"),
            Err(HandoffError::WrongPeer)
        ));
        assert!(matches!(
            parse_hello(b"GET / HT"),
            Err(HandoffError::WrongPeer)
        ));
        assert!(matches!(parse_hello(b"TPHO"), Err(HandoffError::WrongPeer)));
    }
}
