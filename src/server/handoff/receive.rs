//! The new process's side of a socket handoff: ask, receive the sockets, check them, and
//! confirm once they serve.

use std::fmt;
use std::io::{self, IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags};

use super::{
    hello, parse_hello, same_user, HandoffError, CHUNK, HANDOFF_TIMEOUT, MAX_SOCKETS, TOOK, VERSION,
};

/// Listening sockets received from a running process, to serve with
/// [`Workers::inherit`](crate::server::Workers::inherit).
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_listening_tcp_sockets_are_taken() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let connected = std::net::TcpStream::connect(addr).unwrap();
        let e = tcp_listener(OwnedFd::from(connected)).unwrap_err();
        assert!(matches!(e, HandoffError::NotAListener), "{e:?}");
        let (unix, _other) = UnixStream::pair().unwrap();
        let e = tcp_listener(OwnedFd::from(unix)).unwrap_err();
        assert!(matches!(e, HandoffError::NotAListener), "{e:?}");
        let taken = tcp_listener(OwnedFd::from(listener)).unwrap();
        assert_eq!(taken.local_addr().unwrap(), addr);
    }
}
