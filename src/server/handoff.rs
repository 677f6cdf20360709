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

use std::fmt;
use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use tokio::sync::watch;

use super::workers::Phase;

/// How long each step of a handoff waits for the peer by default.
pub const HANDOFF_TIMEOUT: Duration = Duration::from_secs(5);

const MAGIC: &[u8; 4] = b"TPHO";
const VERSION: u16 = 1;
const TOOK: &[u8; 4] = b"TOOK";
/// Sockets per message: the kernel takes at most 253 descriptors in one (`SCM_MAX_FD`).
pub(crate) const CHUNK: usize = 64;
/// More sockets than any sane worker count: a bound on what a peer can make us hold.
const MAX_SOCKETS: u32 = 4096;

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

/// Listening sockets received from a running process, to serve with
/// [`Workers::inherit`](super::Workers::inherit).
///
/// Until they serve, the old process keeps serving them too; dropping this without
/// spawning leaves the old process as it was.
pub struct Inherited {
    pub(crate) listeners: Vec<TcpListener>,
    addr: SocketAddr,
    peer: UnixStream,
}

impl fmt::Debug for Inherited {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Inherited")
            .field("addr", &self.addr)
            .field("sockets", &self.listeners.len())
            .finish()
    }
}

impl Inherited {
    /// Asks the process serving `path` for its listening sockets, which must listen on
    /// `addr` (port 0: any port, the same for all), with [`HANDOFF_TIMEOUT`] per step.
    ///
    /// [`HandoffError::NoPeer`] means nothing serves the path: start with fresh sockets.
    pub fn receive(path: impl AsRef<Path>, addr: SocketAddr) -> Result<Self, HandoffError> {
        Self::receive_timeout(path, addr, HANDOFF_TIMEOUT)
    }

    /// [`receive`](Self::receive) with `timeout` per step instead of the default.
    pub fn receive_timeout(
        path: impl AsRef<Path>,
        addr: SocketAddr,
        timeout: Duration,
    ) -> Result<Self, HandoffError> {
        let path = path.as_ref();
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if !meta.file_type().is_socket() {
                return Err(HandoffError::NotASocket(path.to_path_buf()));
            }
        }
        let mut peer = UnixStream::connect(path).map_err(|source| match source.kind() {
            io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => HandoffError::NoPeer {
                path: path.to_path_buf(),
                source,
            },
            _ => HandoffError::Io(source),
        })?;
        peer.set_read_timeout(Some(timeout))?;
        peer.set_write_timeout(Some(timeout))?;
        same_user(&peer)?;
        let io = |e| HandoffError::from_io(e, timeout);
        peer.write_all(&hello()).map_err(io)?;
        let mut head = [0u8; 12];
        peer.read_exact(&mut head).map_err(io)?;
        let theirs = parse_hello(&head[..8])?;
        if theirs != VERSION {
            return Err(HandoffError::Version {
                ours: VERSION,
                theirs,
            });
        }
        let announced = u32::from_be_bytes([head[8], head[9], head[10], head[11]]);
        if announced == 0 || announced > MAX_SOCKETS {
            return Err(HandoffError::BadCount(announced));
        }
        let fds = receive_fds(&peer, announced).map_err(io)?;
        if fds.len() != announced as usize {
            return Err(HandoffError::Incomplete {
                announced,
                received: fds.len(),
            });
        }
        let mut listeners = Vec::with_capacity(fds.len());
        let mut bound: Option<SocketAddr> = None;
        for fd in fds {
            let listener = tcp_listener(fd)?;
            let got = listener.local_addr()?;
            let port_ok = if addr.port() == 0 {
                bound.is_none_or(|b| b.port() == got.port())
            } else {
                got.port() == addr.port()
            };
            if got.ip() != addr.ip() || !port_ok {
                return Err(HandoffError::AddressMismatch { wanted: addr, got });
            }
            bound = Some(got);
            listeners.push(listener);
        }
        Ok(Inherited {
            addr: bound.unwrap_or(addr),
            listeners,
            peer,
        })
    }

    /// The address the received sockets listen on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// How many sockets were received (the old process's worker count, or more).
    pub fn sockets(&self) -> usize {
        self.listeners.len()
    }

    /// The sockets, and the connection to tell the old process once they serve.
    pub(crate) fn into_parts(self) -> (Vec<TcpListener>, Took) {
        (self.listeners, Took(self.peer))
    }
}

/// Tells the old process that this one serves its sockets now.
#[derive(Debug)]
pub(crate) struct Took(UnixStream);

impl Took {
    pub(crate) fn confirm(mut self) {
        if let Err(e) = self.0.write_all(TOOK) {
            // It still serves the sockets too; nothing is lost, the operator stops it.
            tracing::warn!(error = %e, "could not tell the old process that its sockets serve here");
        }
    }
}

fn hello() -> [u8; 8] {
    let v = VERSION.to_be_bytes();
    [MAGIC[0], MAGIC[1], MAGIC[2], MAGIC[3], v[0], v[1], 0, 0]
}

/// The peer's version, if `b` is a hello.
fn parse_hello(b: &[u8]) -> Result<u16, HandoffError> {
    match b {
        [m0, m1, m2, m3, v0, v1, 0, 0] if [*m0, *m1, *m2, *m3] == *MAGIC => {
            Ok(u16::from_be_bytes([*v0, *v1]))
        }
        _ => Err(HandoffError::WrongPeer),
    }
}

/// Refuses a peer that runs as another user: it could hand us sockets of its choosing,
/// or take ours.
fn same_user(peer: &UnixStream) -> Result<(), HandoffError> {
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

/// Receives up to `announced` descriptors, [`CHUNK`] per message; stops early if the
/// peer closes or a message arrives without its descriptors.
fn receive_fds(peer: &UnixStream, announced: u32) -> io::Result<Vec<OwnedFd>> {
    let mut fds = Vec::new();
    while fds.len() < announced as usize {
        let mut byte = [0u8; 1];
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(CHUNK))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        // CLOEXEC: the sockets must not leak into a program this process starts.
        let msg = rustix::net::recvmsg(
            peer,
            &mut [IoSliceMut::new(&mut byte)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        )?;
        let before = fds.len();
        for message in control.drain() {
            if let RecvAncillaryMessage::ScmRights(received) = message {
                fds.extend(received);
            }
        }
        if msg.bytes == 0 || fds.len() == before || msg.flags.contains(ReturnFlags::CTRUNC) {
            break;
        }
    }
    Ok(fds)
}

/// A received descriptor as a non-blocking listening TCP socket.
fn tcp_listener(fd: OwnedFd) -> Result<TcpListener, HandoffError> {
    let socket = socket2::Socket::from(fd);
    let tcp = socket.r#type().ok() == Some(socket2::Type::STREAM)
        && socket.is_listener().unwrap_or(false)
        && socket
            .local_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .is_some();
    if !tcp {
        return Err(HandoffError::NotAListener);
    }
    // The flag is shared with the old process's descriptor, which set it already; set
    // here too, since the runtime needs it and nothing else guarantees it.
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// The old process's side: a unix socket that hands the workers' listening sockets to
/// the next process and then shuts the workers down.
#[derive(Debug)]
pub(crate) struct HandoffServer {
    listener: UnixListener,
    path: PathBuf,
    /// The socket file's identity, so that this process removes only its own file.
    file: (u64, u64),
    timeout: Duration,
}

impl HandoffServer {
    /// Binds `path` (mode `0600`), replacing a socket file there (one left by the process
    /// being replaced, or a dead one); refuses a path that is something else.
    pub(crate) fn bind(path: &Path, timeout: Duration) -> Result<Self, HandoffError> {
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if !meta.file_type().is_socket() {
                return Err(HandoffError::NotASocket(path.to_path_buf()));
            }
        }
        let name = path.file_name().ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, "handoff path has no file name")
        })?;
        // Bound under a temporary name, restricted, then renamed over the path: the path
        // never names a socket others may connect to, nor goes missing in between.
        let mut tmp = name.to_os_string();
        tmp.push(format!(".{}.tmp", std::process::id()));
        let tmp = path.with_file_name(tmp);
        let _ = std::fs::remove_file(&tmp);
        let listener = UnixListener::bind(&tmp)?;
        let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
            .and_then(|()| std::fs::rename(&tmp, path))
            .and_then(|()| std::fs::symlink_metadata(path));
        let meta = match placed {
            Ok(meta) => meta,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e.into());
            }
        };
        listener.set_nonblocking(true)?;
        Ok(HandoffServer {
            listener,
            path: path.to_path_buf(),
            file: (meta.dev(), meta.ino()),
            timeout,
        })
    }

    /// Serves handoffs on a thread of its own until one succeeds (then sets `stop`) or
    /// `stop` is set; hands out `sockets`, duplicates of the workers' listeners.
    pub(crate) fn spawn(
        self,
        sockets: Vec<OwnedFd>,
        stop: Arc<watch::Sender<Phase>>,
    ) -> io::Result<std::thread::JoinHandle<()>> {
        std::thread::Builder::new()
            .name("handoff".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        tracing::warn!(error = %e, "socket handoff not served");
                        return;
                    }
                };
                rt.block_on(self.serve(sockets, stop));
            })
    }

    async fn serve(self, sockets: Vec<OwnedFd>, stop: Arc<watch::Sender<Phase>>) {
        let mut stopped = stop.subscribe();
        let listener = match tokio::net::UnixListener::from_std(self.listener) {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "socket handoff not served");
                return;
            }
        };
        let handed = loop {
            let peer = tokio::select! {
                biased;
                _ = stopped.wait_for(|p| *p != Phase::Running) => break false,
                accepted = listener.accept() => accepted,
            };
            let peer = match peer.and_then(|(s, _)| s.into_std()) {
                Ok(p) => p,
                Err(e) => {
                    tracing::debug!(error = %e, "socket handoff: accept failed");
                    continue;
                }
            };
            // One peer at a time, each step bounded by the timeout: blocking this thread
            // holds up nothing else.
            match hand_over(peer, &sockets, self.timeout) {
                Ok(()) => {
                    tracing::info!(path = %self.path.display(), "listening sockets handed over; draining");
                    Phase::stop(&stop, Phase::HandedOver);
                    break true;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "socket handoff refused or failed; still serving")
                }
            }
        };
        // After a handoff the path belongs to the successor (it binds its own there);
        // otherwise remove the file if it is still this process's.
        if !handed {
            let ours = std::fs::symlink_metadata(&self.path)
                .is_ok_and(|m| (m.dev(), m.ino()) == self.file);
            if ours {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

/// One handoff to `peer`: hello, sockets, and its confirmation that it serves them.
fn hand_over(
    mut peer: UnixStream,
    sockets: &[OwnedFd],
    timeout: Duration,
) -> Result<(), HandoffError> {
    peer.set_nonblocking(false)?;
    peer.set_read_timeout(Some(timeout))?;
    peer.set_write_timeout(Some(timeout))?;
    same_user(&peer)?;
    let io = |e| HandoffError::from_io(e, timeout);
    let mut theirs = [0u8; 8];
    peer.read_exact(&mut theirs).map_err(io)?;
    let version = parse_hello(&theirs)?;
    let count = u32::try_from(sockets.len()).unwrap_or(u32::MAX);
    let mut head = [0u8; 12];
    head[..8].copy_from_slice(&hello());
    head[8..].copy_from_slice(&count.to_be_bytes());
    peer.write_all(&head).map_err(io)?;
    if version != VERSION {
        return Err(HandoffError::Version {
            ours: VERSION,
            theirs: version,
        });
    }
    for chunk in sockets.chunks(CHUNK) {
        let fds: Vec<_> = chunk.iter().map(AsFd::as_fd).collect();
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(CHUNK))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
            return Err(io::Error::other("handoff control buffer too small").into());
        }
        let sent = rustix::net::sendmsg(
            &peer,
            &[IoSlice::new(b"F")],
            &mut control,
            SendFlags::NOSIGNAL,
        )
        .map_err(|e| io(e.into()))?;
        if sent != 1 {
            return Err(HandoffError::Io(io::ErrorKind::WriteZero.into()));
        }
    }
    let mut took = [0u8; 4];
    peer.read_exact(&mut took).map_err(io)?;
    if took != *TOOK {
        return Err(HandoffError::WrongPeer);
    }
    Ok(())
}

/// Replaces a steering program an earlier [`take_over`](super::Workers::take_over) may
/// have left on the group with one that returns no socket, which makes the kernel use
/// its hash: sockets this process adds to an inherited group get their share.
pub(crate) fn steer_by_hash(socket: &TcpListener) -> io::Result<()> {
    use nix::sys::socket::{setsockopt, sockopt::AttachReusePortCbpf};
    const BPF_RET_K: u16 = 0x06;
    let mut program = [libc::sock_filter {
        code: BPF_RET_K,
        jt: 0,
        jf: 0,
        k: u32::MAX,
    }];
    let fprog = libc::sock_fprog {
        len: 1,
        filter: program.as_mut_ptr(),
    };
    setsockopt(socket, AttachReusePortCbpf, &fprog).map_err(io::Error::from)
}
