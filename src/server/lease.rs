//! A connection's claim on the server, for work that outlives the HTTP connection: an
//! upgraded (WebSocket) tunnel.
//!
//! Once hyper hands an upgraded connection over, its own connection future ends, and with
//! it everything the server tied to it: the `max_connections` permit and the drain's
//! wait. Without more, an open tunnel would count against no limit (a client could open
//! sockets past `max_connections`) and would outlive a graceful shutdown until its idle
//! timeout. The server puts a [`ConnectionLease`] in the extensions of every request that
//! asks for an upgrade; whoever runs the tunnel (`proxy::Forward` does) keeps it while the
//! tunnel is open. Holding it keeps the connection's permit, makes the drain wait for the
//! tunnel, and [`closing`](ConnectionLease::closing) says when the drain timeout is over
//! and the tunnel must end — nginx's `worker_shutdown_timeout`.

use std::fmt;
use std::sync::Arc;

use tokio::sync::{watch, OwnedSemaphorePermit};

/// The phase in which connections are closed (`serve::CLOSE`).
const CLOSE: u8 = 2;

/// Holds a server connection's slot (its `max_connections` permit) and the drain's wait
/// while alive; see the module docs. Cheap to clone: all clones share the one slot.
#[derive(Clone)]
pub struct ConnectionLease {
    inner: Arc<Inner>,
}

struct Inner {
    _permit: Option<OwnedSemaphorePermit>,
    /// The server's phase; a live receiver is what the drain waits for.
    phase: watch::Receiver<u8>,
}

impl ConnectionLease {
    pub(crate) fn new(permit: Option<OwnedSemaphorePermit>, phase: watch::Receiver<u8>) -> Self {
        ConnectionLease {
            inner: Arc::new(Inner {
                _permit: permit,
                phase,
            }),
        }
    }

    /// Resolves when the server closes its connections: the drain timeout passed after a
    /// shutdown began (or the server is gone). Work holding the lease should end then.
    pub async fn closing(&self) {
        let mut phase = self.inner.phase.clone();
        // An error means the server has returned: closing too.
        let _ = phase.wait_for(|p| *p >= CLOSE).await;
    }
}

impl fmt::Debug for ConnectionLease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectionLease")
            .field("phase", &*self.inner.phase.borrow())
            .finish()
    }
}
