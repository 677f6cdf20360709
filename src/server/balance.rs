//! Evening out connections over the [`Workers`](super::Workers).
//!
//! The kernel spreads the connections of a `SO_REUSEPORT` group by a hash of their
//! addresses. Over many short connections that is even; over a few hundred long-lived
//! ones (a load balancer or CDN in front, a benchmark's keep-alive clients, h2 clients)
//! it is not: 55 against 74 of 129 connections was measured with two workers under wrk.
//! The busier worker then sets the tail latency while the other one idles, and the idle
//! one pays a park/unpark cycle for nearly every request it gets — with TLS, whose
//! requests cost more, this was the difference between one and two workers (issue 13).
//! HAProxy hands each accepted connection to its least-loaded thread for the same reason.
//!
//! Here the worker that accepted a connection keeps it if it holds no more connections
//! than the least-loaded other worker, and otherwise hands the raw TCP stream over to
//! that worker before a byte is read: the TLS handshake and every request run there. It
//! costs, per connection handed over, a channel send and one wake-up of the receiving
//! worker; nothing per request. A worker's load is what its connection cap counts (the
//! permits its connections hold) plus connections handed to it and not picked up yet.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::net::TcpStream;
use tokio::sync::mpsc::{self, UnboundedReceiver, UnboundedSender};
use tokio::sync::Semaphore;

/// A connection on its way to another worker (as a std stream: it leaves one runtime's
/// reactor and joins the other's).
type Handed = (std::net::TcpStream, SocketAddr);

/// One worker's end of the balancing: its connection cap (shared, so that the others can
/// read its load) and the channel other workers hand it connections through.
#[derive(Debug)]
pub(crate) struct Balance {
    me: usize,
    slots: Arc<[Slot]>,
    handed: UnboundedReceiver<Handed>,
}

#[derive(Debug)]
struct Slot {
    /// The worker's connection cap; every open connection holds a permit.
    permits: Arc<Semaphore>,
    cap: usize,
    /// Connections sent to the worker and not received yet.
    pending: AtomicUsize,
    send: UnboundedSender<Handed>,
}

impl Slot {
    fn load(&self) -> usize {
        let open = self.cap.saturating_sub(self.permits.available_permits());
        open.saturating_add(self.pending.load(Ordering::Acquire))
    }
}

impl Balance {
    /// One [`Balance`] per worker, each with a cap of `cap` connections.
    pub(crate) fn group(workers: usize, cap: usize) -> Vec<Balance> {
        let cap = cap.max(1);
        let (slots, receivers): (Vec<Slot>, Vec<_>) = (0..workers.max(1))
            .map(|_| {
                let (send, handed) = mpsc::unbounded_channel();
                let slot = Slot {
                    permits: Arc::new(Semaphore::new(cap)),
                    cap,
                    pending: AtomicUsize::new(0),
                    send,
                };
                (slot, handed)
            })
            .unzip();
        let slots: Arc<[Slot]> = slots.into();
        receivers
            .into_iter()
            .enumerate()
            .map(|(me, handed)| Balance {
                me,
                slots: slots.clone(),
                handed,
            })
            .collect()
    }

    /// This worker's connection cap, which its accept loop takes a permit of per
    /// connection.
    pub(crate) fn permits(&self) -> Arc<Semaphore> {
        self.slots[self.me].permits.clone()
    }

    /// Where a connection this worker just accepted (its permit already taken) is served:
    /// `Some` here, `None` when it was handed to a less-loaded worker (or lost because it
    /// could not leave this worker's reactor, which the kernel does not refuse in practice).
    pub(crate) fn route(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
    ) -> Option<(TcpStream, SocketAddr)> {
        // This worker's load counts the new connection; another worker's counts the
        // permit it holds while waiting for its next one: equal loads mean equal
        // connection counts.
        let mine = self.slots[self.me].load();
        let least = self
            .slots
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != self.me)
            .min_by_key(|(_, slot)| slot.load());
        let Some((_, to)) = least.filter(|(_, slot)| slot.load() < mine) else {
            return Some((stream, peer));
        };
        let std = match stream.into_std() {
            Ok(std) => std,
            Err(e) => {
                tracing::debug!(error = %e, %peer, "cannot hand a connection over; dropped");
                return None;
            }
        };
        to.pending.fetch_add(1, Ordering::AcqRel);
        match to.send.send((std, peer)) {
            Ok(()) => None,
            // The other worker has stopped: serve it here after all.
            Err(mpsc::error::SendError((std, peer))) => {
                to.pending.fetch_sub(1, Ordering::AcqRel);
                adopt(std, peer)
            }
        }
    }

    /// The next connection another worker handed over (never ends while this worker
    /// runs: it holds a sender to itself).
    pub(crate) async fn handed(&mut self) -> Option<(TcpStream, SocketAddr)> {
        loop {
            let (std, peer) = self.handed.recv().await?;
            self.slots[self.me].pending.fetch_sub(1, Ordering::AcqRel);
            if let Some(adopted) = adopt(std, peer) {
                return Some(adopted);
            }
        }
    }

    /// Stops receiving (other workers then serve what they accept themselves) and returns
    /// the connections already handed over, which are to be served rather than reset.
    pub(crate) fn close(&mut self) -> Vec<(TcpStream, SocketAddr)> {
        self.handed.close();
        let mut left = Vec::new();
        while let Ok((std, peer)) = self.handed.try_recv() {
            self.slots[self.me].pending.fetch_sub(1, Ordering::AcqRel);
            left.extend(adopt(std, peer));
        }
        left
    }
}

/// Registers a handed-over stream with this worker's reactor.
fn adopt(std: std::net::TcpStream, peer: SocketAddr) -> Option<(TcpStream, SocketAddr)> {
    match TcpStream::from_std(std) {
        Ok(stream) => Some((stream, peer)),
        Err(e) => {
            tracing::debug!(error = %e, %peer, "cannot adopt a handed-over connection");
            None
        }
    }
}

/// Waits for a handed-over connection, or forever without balancing.
pub(crate) async fn next_handed(balance: &mut Option<Balance>) -> Option<(TcpStream, SocketAddr)> {
    match balance {
        Some(balance) => balance.handed().await,
        None => std::future::pending().await,
    }
}
