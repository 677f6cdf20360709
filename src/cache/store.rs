//! Where cached responses live: the `Store` trait and a byte-budgeted LRU in memory.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use tokio::time::Instant;

/// A stored response.
#[derive(Debug, Clone)]
pub struct CachedResponse {
    /// Status of the stored response.
    pub status: StatusCode,
    /// Its headers.
    pub headers: HeaderMap,
    /// Its body, as the chunks that arrived (shared with every hit, never copied).
    pub body: Vec<Bytes>,
    /// When the response was received (tokio time, so tests can pause it).
    pub stored_at: Instant,
    /// How long it stays fresh after `stored_at`.
    pub fresh_for: Duration,
    /// The upstream's `Age` when it arrived.
    pub initial_age: Duration,
}

impl CachedResponse {
    /// The value of the `Age` header at `now`.
    pub fn age(&self, now: Instant) -> Duration {
        // Saturating: `initial_age` and `fresh_for` are public fields a caller may fill
        // with anything, and an origin's `Age` must never panic the cache.
        self.initial_age
            .saturating_add(now.saturating_duration_since(self.stored_at))
    }

    /// Whether the entry may be served without asking upstream at `now`.
    pub fn is_fresh(&self, now: Instant) -> bool {
        self.age(now) < self.fresh_for
    }

    /// Body length.
    pub fn body_len(&self) -> u64 {
        self.body.iter().map(|c| c.len() as u64).sum()
    }

    /// Approximate memory cost: body, headers, and a fixed overhead.
    pub fn weight(&self) -> u64 {
        let headers: usize = self
            .headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len() + 32)
            .sum();
        self.body_len() + headers as u64 + 128
    }
}

/// Storage for the edge cache. Implementations must be cheap to call: the layer calls
/// `get` on every cacheable request.
pub trait Store: Send + Sync + 'static {
    /// The entry under `key`, fresh or not; the layer decides what to do with its age.
    fn get(&self, key: &str) -> Option<Arc<CachedResponse>>;
    /// Stores `entry`, replacing any previous one. Returns `false` if it was refused (for
    /// example larger than the store allows).
    fn put(&self, key: &str, entry: CachedResponse) -> bool;
    /// Removes the entry; `true` if there was one.
    fn remove(&self, key: &str) -> bool;
    /// The largest body the store accepts: a fill stops copying past it (default: no
    /// limit).
    fn max_entry_size(&self) -> u64 {
        u64::MAX
    }
}

/// Counters of a [`MemoryStore`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryStoreStats {
    /// Entries held.
    pub entries: usize,
    /// Bytes accounted (see [`CachedResponse::weight`]).
    pub used: u64,
    /// Entries evicted to make room.
    pub evictions: u64,
}

struct Slot {
    entry: Arc<CachedResponse>,
    tick: u64,
    weight: u64,
}

#[derive(Default)]
struct Lru {
    map: HashMap<Arc<str>, Slot>,
    /// Recency order: smallest tick = least recently used.
    order: BTreeMap<u64, Arc<str>>,
    tick: u64,
    used: u64,
}

impl Lru {
    fn take(&mut self, key: &str) -> Option<Slot> {
        let slot = self.map.remove(key)?;
        self.order.remove(&slot.tick);
        self.used -= slot.weight;
        Some(slot)
    }
}

/// An in-memory [`Store`] with a byte budget: when full, the least recently used entries
/// are evicted. One short critical section per call (a lookup and a recency bump); bodies
/// are shared, never copied, so a hit costs no body copy under the lock.
pub struct MemoryStore {
    lru: Mutex<Lru>,
    budget: u64,
    max_entry: u64,
    evictions: AtomicU64,
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryStore")
            .field("budget", &self.budget)
            .field("max_entry", &self.max_entry)
            .field("stats", &self.stats())
            .finish()
    }
}

impl MemoryStore {
    /// A store of at most `budget` bytes; one entry may take at most a quarter of it.
    pub fn new(budget: u64) -> Self {
        MemoryStore {
            lru: Mutex::default(),
            budget,
            max_entry: budget / 4,
            evictions: AtomicU64::new(0),
        }
    }

    /// The largest single entry (default: a quarter of the budget, capped by it).
    pub fn max_entry(mut self, bytes: u64) -> Self {
        self.max_entry = bytes.min(self.budget);
        self
    }

    /// Current counters.
    pub fn stats(&self) -> MemoryStoreStats {
        let lru = self.lock();
        MemoryStoreStats {
            entries: lru.map.len(),
            used: lru.used,
            evictions: self.evictions.load(Ordering::Relaxed),
        }
    }

    /// Whether `key` is present (fresh or not), without touching its recency.
    pub fn contains(&self, key: &str) -> bool {
        self.lock().map.contains_key(key)
    }

    fn lock(&self) -> MutexGuard<'_, Lru> {
        // Every update leaves the maps consistent before it can panic.
        self.lru.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Store for MemoryStore {
    fn get(&self, key: &str) -> Option<Arc<CachedResponse>> {
        let mut lru = self.lock();
        lru.tick += 1;
        let tick = lru.tick;
        let slot = lru.map.get_mut(key)?;
        let old = std::mem::replace(&mut slot.tick, tick);
        let entry = slot.entry.clone();
        if let Some(k) = lru.order.remove(&old) {
            lru.order.insert(tick, k);
        }
        Some(entry)
    }

    fn put(&self, key: &str, entry: CachedResponse) -> bool {
        let weight = entry.weight() + key.len() as u64;
        if weight > self.max_entry || weight > self.budget {
            return false;
        }
        let mut lru = self.lock();
        lru.take(key);
        while lru.used + weight > self.budget {
            let Some((_, victim)) = lru.order.pop_first() else {
                break;
            };
            if let Some(slot) = lru.map.remove(&victim) {
                lru.used -= slot.weight;
                self.evictions.fetch_add(1, Ordering::Relaxed);
            }
        }
        lru.tick += 1;
        let tick = lru.tick;
        let key: Arc<str> = Arc::from(key);
        lru.order.insert(tick, key.clone());
        lru.used += weight;
        lru.map.insert(
            key,
            Slot {
                entry: Arc::new(entry),
                tick,
                weight,
            },
        );
        true
    }

    fn remove(&self, key: &str) -> bool {
        self.lock().take(key).is_some()
    }

    fn max_entry_size(&self) -> u64 {
        self.max_entry
    }
}

impl<S: Store + ?Sized> Store for Arc<S> {
    fn get(&self, key: &str) -> Option<Arc<CachedResponse>> {
        (**self).get(key)
    }
    fn put(&self, key: &str, entry: CachedResponse) -> bool {
        (**self).put(key, entry)
    }
    fn remove(&self, key: &str) -> bool {
        (**self).remove(key)
    }
    fn max_entry_size(&self) -> u64 {
        (**self).max_entry_size()
    }
}
