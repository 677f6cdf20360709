//! The old process's side of a socket handoff: a private unix socket that hands the
//! workers' listening sockets to the next process, then shuts the workers down.

use std::io::{self, IoSlice, Read, Write};
use std::mem::MaybeUninit;
use std::net::TcpListener;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
use tokio::sync::watch;

use super::{hello, parse_hello, same_user, HandoffError, CHUNK, TOOK, VERSION};
use crate::server::accept::AcceptBackoff;
use crate::server::workers::Phase;

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
        let mut backoff = AcceptBackoff::new(Duration::from_millis(100));
        let handed = loop {
            let peer = tokio::select! {
                biased;
                _ = stopped.wait_for(|p| *p != Phase::Running) => break false,
                accepted = listener.accept() => accepted,
            };
            let peer = match peer.and_then(|(s, _)| s.into_std()) {
                Ok(p) => {
                    backoff.on_success();
                    p
                }
                Err(e) => {
                    // Out of descriptors, say: retrying at once would spin.
                    let (pause, _) = backoff.on_error(&e);
                    tokio::select! {
                        biased;
                        _ = stopped.wait_for(|p| *p != Phase::Running) => break false,
                        () = tokio::time::sleep(pause) => {}
                    }
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

/// Replaces a steering program an earlier [`take_over`](crate::server::Workers::take_over) may
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
