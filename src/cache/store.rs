//! Where cached responses live: the `Store` trait and a byte-budgeted LRU in memory.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode};
use tokio::time::Instant;

/// A stored response.
#[derive(Debug, Clone)]
pub struct CachedResponse {
    /// Status of the stored response.
    pub status: StatusCode,
    /// Its headers.
    pub headers: HeaderMap,
    /// Its body. A [`MemoryStore`] keeps it as one compact chunk (see
    /// [`CachedResponse::compact`]), shared with every hit.
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

    /// Memory cost of a [compacted](CachedResponse::compact) entry, allocator overhead
    /// included: the body, each header (name, value, its slot in the map and its own
    /// allocation) and a fixed part for the entry, its `Arc`, the header map and the
    /// store's index. Measured with a counting allocator (`tests/cache_memory.rs`); it
    /// errs on the high side, so a byte budget bounds the real memory.
    pub fn weight(&self) -> u64 {
        let headers: u64 = self
            .headers
            .iter()
            .map(|(n, v)| (n.as_str().len() + v.len()) as u64 + HEADER_OVERHEAD)
            .sum();
        self.body_len()
            .saturating_add(headers)
            .saturating_add(ENTRY_OVERHEAD)
    }

    /// The same entry in memory of its own: the body in one exact-size allocation and
    /// every header value copied.
    ///
    /// What arrives from hyper are slices of its read buffers (body chunks *and* header
    /// values): keeping one slice keeps the whole buffer alive, so 200,000 small entries
    /// under a 64 MiB budget held 1.12 GB. A copy costs one `memcpy` per fill and makes
    /// the byte budget bound the memory.
    pub fn compact(self) -> Self {
        let len = self.body.iter().map(Bytes::len).sum();
        let mut body = Vec::with_capacity(len);
        for c in &self.body {
            body.extend_from_slice(c);
        }
        let mut headers = HeaderMap::with_capacity(self.headers.len());
        for (name, value) in &self.headers {
            // `from_bytes` copies; a value that was valid stays valid.
            let mut copy =
                HeaderValue::from_bytes(value.as_bytes()).unwrap_or_else(|_| value.clone());
            copy.set_sensitive(value.is_sensitive());
            headers.append(name.clone(), copy);
        }
        let body = if len == 0 {
            Vec::new()
        } else {
            vec![Bytes::from(body)]
        };
        CachedResponse {
            body,
            headers,
            ..self
        }
    }
}

/// Bytes per stored header besides its name and value (see [`CachedResponse::weight`]).
const HEADER_OVERHEAD: u64 = 112;
/// Bytes per entry besides its body, headers and key (see [`CachedResponse::weight`]).
const ENTRY_OVERHEAD: u64 = 640;

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

    // --- Fleet purge (issue 15): purge by prefix and by surrogate key. ---

    /// Removes every entry for which `pred(key, entry)` is true and returns how many;
    /// `None` when the store cannot enumerate its entries. A prefix or surrogate-key
    /// `PURGE` needs it: on a store without it such a purge answers `501` rather than
    /// report success it did not achieve. Called rarely (a `PURGE`), so a full scan is
    /// acceptable.
    fn remove_where(&self, pred: &mut dyn FnMut(&str, &CachedResponse) -> bool) -> Option<u64> {
        let _ = pred;
        None
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
/// are evicted. Entries are stored [compacted](CachedResponse::compact) and weighed with
/// their overhead, so the budget bounds the real memory (within about 1.5×; measured by
/// `tests/cache_memory.rs`). One short critical section per call (a lookup and a recency
/// bump); a hit shares the stored body, no copy under the lock.
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
        let weight = entry.weight().saturating_add(key.len() as u64);
        if weight > self.max_entry || weight > self.budget {
            return false;
        }
        // Copied before taking the lock: the copy is the slow part.
        let entry = entry.compact();
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

    // --- Fleet purge (issue 15). ---
    fn remove_where(&self, pred: &mut dyn FnMut(&str, &CachedResponse) -> bool) -> Option<u64> {
        let mut lru = self.lock();
        let doomed: Vec<Arc<str>> = lru
            .map
            .iter()
            .filter(|(k, slot)| pred(k, &slot.entry))
            .map(|(k, _)| k.clone())
            .collect();
        for key in &doomed {
            lru.take(key);
        }
        Some(doomed.len() as u64)
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
    fn remove_where(&self, pred: &mut dyn FnMut(&str, &CachedResponse) -> bool) -> Option<u64> {
        (**self).remove_where(pred)
    }
}
