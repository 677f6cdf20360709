//! Request coalescing (nginx `proxy_cache_lock`, Varnish request collapsing).
//!
//! **The problem.** When a popular object expires, or a cold edge starts, a thousand
//! concurrent requests for it all miss; without coalescing each one goes to the origin,
//! the "thundering herd" that takes origins down exactly when the cache should shield them.
//!
//! The first miss for a key *leads*: it registers a [`Flight`] and goes to the origin. Later
//! misses for the same key *follow*: they wait (up to the lock timeout) for the leader's
//! response head, then stream the body chunk by chunk as the leader's fill receives it. The
//! chunks are the ones the fill keeps for the store anyway (shared `Bytes`), so following
//! costs no memory of its own: the buffer is bounded by the store's entry limit.
//!
//! | leader's outcome | followers |
//! |---|---|
//! | cacheable response | get its head at once and stream the same body (`X-Cache: COALESCED`) |
//! | not cacheable, an error, served stale, leader dropped before the head | *released*: each goes to the origin itself, at once |
//! | body fails or is cut mid-way (fill aborted) | their bodies end with an error, never a clean end: a truncated body is never presented as complete |
//! | no head within the lock timeout | that follower goes to the origin itself, and does not store (as nginx) |

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use tokio::time::Sleep;

use super::body::CacheBodyError;

/// Where a flight is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// The leader is waiting for the origin's head.
    Pending,
    /// The response is shared; the body is arriving.
    Streaming,
    /// The whole body arrived (and its length matched).
    Done,
    /// The body failed after followers may have started on it.
    Failed,
    /// The leader's response is not shared: followers go to the origin.
    Released,
    /// The leader refreshed the stored entry (a `304`): followers read the store.
    Stored,
}

struct FlightState {
    phase: Phase,
    status: StatusCode,
    headers: HeaderMap,
    chunks: Vec<Bytes>,
    wakers: HashMap<u64, Waker>,
    next_id: u64,
}

/// One origin request that concurrent misses for the same key share.
pub(crate) struct Flight {
    state: Mutex<FlightState>,
}

impl Flight {
    fn lock(&self) -> MutexGuard<'_, FlightState> {
        // Every update leaves the state consistent before anything can panic.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn register(&self) -> u64 {
        let mut s = self.lock();
        s.next_id += 1;
        s.next_id
    }

    fn unregister(&self, id: u64) {
        self.lock().wakers.remove(&id);
    }

    fn update(&self, f: impl FnOnce(&mut FlightState)) {
        let wakers: Vec<Waker> = {
            let mut s = self.lock();
            f(&mut s);
            s.wakers.drain().map(|(_, w)| w).collect()
        };
        // Woken outside the lock: a woken task may poll (and lock) at once.
        for w in wakers {
            w.wake();
        }
    }
}

/// The flights in progress, by cache key.
#[derive(Default)]
pub(crate) struct Flights {
    map: Mutex<HashMap<String, Arc<Flight>>>,
}

/// What a miss does: lead a new flight or follow the one in progress.
pub(crate) enum Role {
    Lead(Lead),
    Follow(Arc<Flight>),
}

impl Flights {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Arc<Flight>>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn join(self: &Arc<Self>, key: &str) -> Role {
        let mut map = self.lock();
        if let Some(f) = map.get(key) {
            return Role::Follow(f.clone());
        }
        let flight = Arc::new(Flight {
            state: Mutex::new(FlightState {
                phase: Phase::Pending,
                status: StatusCode::OK,
                headers: HeaderMap::new(),
                chunks: Vec::new(),
                wakers: HashMap::new(),
                next_id: 0,
            }),
        });
        map.insert(key.to_owned(), flight.clone());
        Role::Lead(Lead {
            flights: self.clone(),
            key: key.to_owned(),
            flight,
        })
    }

    /// Flights in progress (for tests and stats).
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }
}

/// The leader's handle. Dropping it without [`Lead::finish`] releases the followers:
/// before the head they go to the origin, after it their bodies fail.
pub(crate) struct Lead {
    flights: Arc<Flights>,
    key: String,
    flight: Arc<Flight>,
}

impl Lead {
    /// The response will be shared: followers get this head now.
    pub(crate) fn share(&self, status: StatusCode, headers: HeaderMap) {
        self.flight.update(|s| {
            s.status = status;
            s.headers = headers;
            s.phase = Phase::Streaming;
        });
    }

    /// A body for the leader's own client that follows the flight like any follower, so
    /// the origin download is paced by the origin, not by the leader's client.
    pub(crate) fn follow(&self) -> FlightBody {
        FlightBody {
            id: self.flight.register(),
            flight: self.flight.clone(),
            next: 0,
        }
    }

    pub(crate) fn push(&self, chunk: Bytes) {
        self.flight.update(|s| s.chunks.push(chunk));
    }

    /// The entry was refreshed in the store without a body (revalidation): followers
    /// answer from the store.
    pub(crate) fn stored(self) {
        self.flight.update(|s| s.phase = Phase::Stored);
    }

    /// The whole body arrived. Call after storing the entry, so that a request that no
    /// longer finds the flight finds the entry.
    pub(crate) fn finish(self) {
        self.flight.update(|s| s.phase = Phase::Done);
        // Drop runs next and only unregisters (the phase is final).
    }
}

impl Drop for Lead {
    fn drop(&mut self) {
        {
            let mut map = self.flights.lock();
            if map
                .get(&self.key)
                .is_some_and(|f| Arc::ptr_eq(f, &self.flight))
            {
                map.remove(&self.key);
            }
        }
        self.flight.update(|s| {
            s.phase = match s.phase {
                Phase::Pending => Phase::Released,
                Phase::Streaming => Phase::Failed,
                p => p,
            };
        });
    }
}

/// What a follower's wait for the head ended with.
pub(crate) enum Joined {
    /// The shared response: its head and a body following the fill.
    Head(StatusCode, HeaderMap, FlightBody),
    /// Go to the origin; `fill`: whether the follower may store what it gets.
    Origin { fill: bool },
    /// The entry in the store was refreshed: answer from it.
    Stored,
}

/// A follower waiting for the leader's head, up to the lock timeout.
pub(crate) struct Wait {
    flight: Arc<Flight>,
    id: u64,
    timeout: Pin<Box<Sleep>>,
}

impl Wait {
    pub(crate) fn new(flight: Arc<Flight>, lock_timeout: std::time::Duration) -> Self {
        let id = flight.register();
        Wait {
            flight,
            id,
            timeout: Box::pin(tokio::time::sleep(lock_timeout)),
        }
    }

    pub(crate) fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Joined> {
        {
            let mut s = self.flight.lock();
            match s.phase {
                Phase::Pending => {
                    s.wakers.insert(self.id, cx.waker().clone());
                }
                Phase::Released => return Poll::Ready(Joined::Origin { fill: true }),
                Phase::Stored => return Poll::Ready(Joined::Stored),
                Phase::Streaming | Phase::Done | Phase::Failed => {
                    let head = (s.status, s.headers.clone());
                    drop(s);
                    let body = FlightBody {
                        id: self.flight.register(),
                        flight: self.flight.clone(),
                        next: 0,
                    };
                    return Poll::Ready(Joined::Head(head.0, head.1, body));
                }
            }
        }
        if self.timeout.as_mut().poll(cx).is_ready() {
            self.flight.unregister(self.id);
            tracing::debug!("cache lock timeout: going to the origin");
            return Poll::Ready(Joined::Origin { fill: false });
        }
        Poll::Pending
    }
}

impl Drop for Wait {
    fn drop(&mut self) {
        self.flight.unregister(self.id);
    }
}

/// A follower's body: the fill's chunks as they arrive.
pub(crate) struct FlightBody {
    flight: Arc<Flight>,
    id: u64,
    next: usize,
}

impl FlightBody {
    pub(crate) fn poll_chunk(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, CacheBodyError>>> {
        let mut s = self.flight.lock();
        if let Some(c) = s.chunks.get(self.next) {
            let c = c.clone();
            self.next += 1;
            return Poll::Ready(Some(Ok(c)));
        }
        match s.phase {
            Phase::Done => Poll::Ready(None),
            // Pending/Released cannot follow a head; anything but Done is a failure.
            Phase::Failed | Phase::Released | Phase::Pending | Phase::Stored => {
                Poll::Ready(Some(Err(CacheBodyError::FillFailed)))
            }
            Phase::Streaming => {
                s.wakers.insert(self.id, cx.waker().clone());
                Poll::Pending
            }
        }
    }

    pub(crate) fn is_end(&self) -> bool {
        let s = self.flight.lock();
        s.phase == Phase::Done && self.next >= s.chunks.len()
    }
}

impl Drop for FlightBody {
    fn drop(&mut self) {
        self.flight.unregister(self.id);
    }
}
