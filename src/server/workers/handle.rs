//! What runs after [`Workers::spawn`](super::Workers::spawn): the handle that stops and
//! joins the workers, and the phase they are told through.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::watch;

use crate::server::serve::Queued;

/// Whether the workers serve, and why they stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    Running,
    /// [`WorkersHandle::shutdown`]: stop accepting, serve what the queues hold, drain.
    Drain,
    /// The sockets serve in the next process now: stop accepting and drain, leaving the
    /// queues to it.
    HandedOver,
}

impl Phase {
    /// Moves on from `Running` only: the first reason to stop is the one that holds.
    pub(crate) fn stop(stop: &watch::Sender<Phase>, why: Phase) {
        stop.send_if_modified(|p| {
            let first = *p == Phase::Running;
            if first {
                *p = why;
            }
            first
        });
    }
}

/// Completes when the handle signals shutdown; a dropped handle leaves workers serving.
pub(super) async fn shutdown_signal(mut stopped: watch::Receiver<Phase>) -> Queued {
    let phase = stopped.wait_for(|p| *p != Phase::Running).await.map(|p| *p);
    match phase {
        Ok(Phase::HandedOver) => Queued::Leave,
        Ok(_) => Queued::Serve,
        Err(_) => std::future::pending().await,
    }
}

/// Running [`Workers`](super::Workers): their address, a shutdown signal, and their threads.
#[derive(Debug)]
pub struct WorkersHandle {
    pub(super) addr: SocketAddr,
    /// Shared with the handoff thread, which shuts the workers down after a handoff.
    pub(super) stop: Arc<watch::Sender<Phase>>,
    pub(super) threads: Vec<std::thread::JoinHandle<io::Result<()>>>,
    #[cfg(target_os = "linux")]
    pub(super) handoff: Option<std::thread::JoinHandle<()>>,
}

impl WorkersHandle {
    /// The address every worker listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// How many workers run.
    pub fn workers(&self) -> usize {
        self.threads.len()
    }

    /// Completes once the workers are told to stop: by [`shutdown`](Self::shutdown), or
    /// by a socket handoff to the next process
    /// ([`Workers::handoff_socket`](super::Workers::handoff_socket)). A process waiting
    /// for `SIGTERM` waits for this too, then [`join`](Self::join)s.
    pub async fn stopping(&self) {
        let mut phase = self.stop.subscribe();
        // The handle holds the sender: the channel cannot close while this waits.
        let _ = phase.wait_for(|p| *p != Phase::Running).await;
    }

    /// Tells every worker to stop accepting and drain (non-blocking; see
    /// [`join`](Self::join) to wait).
    pub fn shutdown(&self) {
        // The signal holds even when no worker is waiting on it yet.
        Phase::stop(&self.stop, Phase::Drain);
    }

    /// Waits (blocking the thread) until every worker has stopped; the first error of a
    /// worker, if any.
    pub fn join(self) -> io::Result<()> {
        let WorkersHandle {
            stop,
            threads,
            #[cfg(target_os = "linux")]
            handoff,
            ..
        } = self;
        let mut result = Ok(());
        for t in threads {
            let r = t
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("a worker thread panicked")));
            if result.is_ok() {
                result = r;
            }
        }
        // The workers are gone (stopped, or failed): so is what the handoff would pass.
        #[cfg(target_os = "linux")]
        if let Some(handoff) = handoff {
            Phase::stop(&stop, Phase::Drain);
            let _ = handoff.join();
        }
        drop(stop);
        result
    }

    /// [`shutdown`](Self::shutdown), then waits for every worker without blocking the
    /// calling async task.
    pub async fn shutdown_and_wait(self) -> io::Result<()> {
        self.shutdown();
        tokio::task::spawn_blocking(move || self.join())
            .await
            .map_err(io::Error::other)?
    }
}
