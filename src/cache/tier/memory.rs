//! The memory tier: [`MemoryStore`], a byte-budgeted cache on `moka`.
//!
//! **The problem.** A hand-written LRU lets one scan of cold objects (a crawler, a
//! backup job) push every hot object out, and serialises every hit on one lock. `moka`
//! is a concurrent cache with TinyLFU admission (a new object gets in only if it is
//! asked for more often than the one it would push out) and per-entry expiry.
//!
//! **What moka does not give, and how it is added here.** moka applies inserts and
//! evictions in batches ("pending tasks"), so its weighted size can run past
//! `max_capacity` until the next batch. This store keeps its own count of the bytes it
//! holds (added on insert, subtracted by moka's eviction listener for every removal) and,
//! when an insert takes the count over the budget, runs moka's pending tasks at once
//! until the count is back under it. So after every `put` returns, the entries the store
//! holds weigh at most the budget, as with the old LRU (`tests/cache_memory.rs`).

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use moka::notification::RemovalCause;
use moka::sync::Cache;
use moka::Expiry;
use tokio::time::Instant;

use crate::cache::store::{CachedResponse, Store};

/// Counters of a [`MemoryStore`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryStoreStats {
    /// Entries held.
    pub entries: usize,
    /// Bytes accounted (see [`CachedResponse::weight`]).
    pub used: u64,
    /// Entries evicted to make room (or refused by TinyLFU admission) or expired.
    pub evictions: u64,
}

/// Bytes moka keeps per entry besides our own (its node, the access-order and timer
/// queues, the frequency sketch's share). Measured with `tests/cache_memory.rs`'s
/// counting allocator; added to every entry's weight so the budget still bounds memory.
const MOKA_OVERHEAD: u64 = 128;

/// How long past its freshness an entry without validators is kept by default (see
/// [`MemoryStore::stale_grace`]).
pub const DEFAULT_STALE_GRACE: Duration = Duration::from_secs(3600);

#[derive(Clone)]
struct Slot {
    entry: Arc<CachedResponse>,
    weight: u64,
}

/// Counters shared with moka's eviction listener.
#[derive(Default)]
struct Counts {
    used: AtomicU64,
    entries: AtomicU64,
    evictions: AtomicU64,
}

/// Per-entry lifetime in moka: until `stale_grace` after the entry stops being fresh —
/// or no time limit for an entry the origin can revalidate (`ETag`/`Last-Modified`),
/// which stays useful after expiry and leaves only by eviction.
struct Lifetime {
    grace: Duration,
}

impl Lifetime {
    fn of(&self, slot: &Slot) -> Option<Duration> {
        let e = &slot.entry;
        if crate::cache::conditional::has_validator(&e.headers) {
            return None;
        }
        let left = e.fresh_for.saturating_sub(e.age(Instant::now()));
        Some(left.saturating_add(self.grace))
    }
}

impl Expiry<Arc<str>, Slot> for Lifetime {
    fn expire_after_create(
        &self,
        _key: &Arc<str>,
        value: &Slot,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        self.of(value)
    }

    fn expire_after_update(
        &self,
        _key: &Arc<str>,
        value: &Slot,
        _updated_at: std::time::Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        self.of(value)
    }
}

/// An in-memory [`Store`] with a byte budget, on `moka` (TinyLFU admission, LRU
/// eviction, per-entry expiry). Entries are stored [compacted](CachedResponse::compact)
/// and weighed with their overhead, so the budget bounds the real memory (within about
/// 1.5×; measured by `tests/cache_memory.rs`). A hit is a lock-free lookup that shares
/// the stored body, no copy.
///
/// An entry leaves when evicted for room, when refused by admission (a one-off object
/// does not push out a popular one), or `stale_grace` after it stops being fresh (never
/// by time if it has a validator: it can still be revalidated with a `304`).
///
/// moka evicts in batches, so its own size can pass its capacity between them; this store
/// counts the bytes it holds and, when a `put` takes the count over the budget, has moka
/// evict at once: after every `put` returns the entries weigh at most the budget.
///
/// Clones are handles to the same cache.
#[derive(Clone)]
pub struct MemoryStore {
    cache: Cache<Arc<str>, Slot>,
    counts: Arc<Counts>,
    budget: u64,
    max_entry: u64,
    grace: Duration,
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
        Self::build(budget, budget / 4, DEFAULT_STALE_GRACE)
    }

    fn build(budget: u64, max_entry: u64, grace: Duration) -> Self {
        let counts = Arc::new(Counts::default());
        let listener = counts.clone();
        let cache = Cache::builder()
            .max_capacity(budget)
            // moka weighs in u32: `max_entry` is capped below so no weight saturates.
            .weigher(|_k: &Arc<str>, v: &Slot| u32::try_from(v.weight).unwrap_or(u32::MAX))
            .expire_after(Lifetime { grace })
            .eviction_listener(move |_k, v: Slot, cause| {
                listener.used.fetch_sub(v.weight, Ordering::AcqRel);
                listener.entries.fetch_sub(1, Ordering::AcqRel);
                if matches!(cause, RemovalCause::Size | RemovalCause::Expired) {
                    listener.evictions.fetch_add(1, Ordering::Relaxed);
                }
            })
            .build();
        MemoryStore {
            cache,
            counts,
            budget,
            max_entry: max_entry.min(budget).min(u64::from(u32::MAX)),
            grace,
        }
    }

    /// The largest single entry (default: a quarter of the budget, capped by it and by
    /// 4 GiB, moka's largest weight).
    pub fn max_entry(self, bytes: u64) -> Self {
        Self::build(self.budget, bytes, self.grace)
    }

    /// How long past its freshness an entry without `ETag`/`Last-Modified` stays
    /// (default [`DEFAULT_STALE_GRACE`], one hour): long enough for the layer's
    /// `stale_if_error`/`stale-while-revalidate` windows; past it the entry is dead weight.
    pub fn stale_grace(self, grace: Duration) -> Self {
        Self::build(self.budget, self.max_entry, grace)
    }

    /// Current counters.
    pub fn stats(&self) -> MemoryStoreStats {
        MemoryStoreStats {
            entries: usize::try_from(self.counts.entries.load(Ordering::Acquire))
                .unwrap_or(usize::MAX),
            used: self.counts.used.load(Ordering::Acquire),
            evictions: self.counts.evictions.load(Ordering::Relaxed),
        }
    }

    /// Whether `key` is present (fresh or not), without touching its recency.
    pub fn contains(&self, key: &str) -> bool {
        self.cache.contains_key(key)
    }

    /// Applies moka's pending inserts, evictions and expiries now (they otherwise run
    /// in batches on later calls).
    pub fn sync(&self) {
        self.cache.run_pending_tasks();
    }
}

impl MemoryStore {
    /// The weight of `entry` under `key`, or `None` when it is over the entry limit.
    fn weigh(&self, key: &str, entry: &CachedResponse) -> Option<u64> {
        let weight = entry
            .weight()
            .saturating_add(key.len() as u64)
            .saturating_add(MOKA_OVERHEAD);
        (weight <= self.max_entry && weight <= self.budget).then_some(weight)
    }

    /// Stores an entry already [compacted](CachedResponse::compact) (the tiered store
    /// shares one copy between memory and the disk write).
    pub(crate) fn put_compact(&self, key: &str, entry: Arc<CachedResponse>) -> bool {
        let Some(weight) = self.weigh(key, &entry) else {
            return false;
        };
        let slot = Slot { entry, weight };
        self.counts.used.fetch_add(weight, Ordering::AcqRel);
        self.counts.entries.fetch_add(1, Ordering::AcqRel);
        self.cache.insert(Arc::from(key), slot);
        // The global bound: moka evicts in batches, so bring the count back under the
        // budget before returning. Each round applies every pending write and evicts
        // until moka's own size is within `max_capacity`; a few rounds cover inserts
        // other threads made meanwhile (their own `put` finishes the job).
        for _ in 0..4 {
            if self.counts.used.load(Ordering::Acquire) <= self.budget {
                break;
            }
            self.cache.run_pending_tasks();
        }
        true
    }
}

impl Store for MemoryStore {
    fn get(&self, key: &str) -> Option<Arc<CachedResponse>> {
        self.cache.get(key).map(|s| s.entry)
    }

    fn put(&self, key: &str, entry: CachedResponse) -> bool {
        if self.weigh(key, &entry).is_none() {
            return false;
        }
        // Copied before it is shared: the copy is the slow part.
        self.put_compact(key, Arc::new(entry.compact()))
    }

    fn remove(&self, key: &str) -> bool {
        self.cache.remove(key).is_some()
    }

    fn max_entry_size(&self) -> u64 {
        self.max_entry
    }

    // --- Fleet purge (issue 15): prefix and surrogate-key purges scan the entries. ---
    fn remove_where(&self, pred: &mut dyn FnMut(&str, &CachedResponse) -> bool) -> Option<u64> {
        let doomed: Vec<Arc<str>> = self
            .cache
            .iter()
            .filter(|(k, slot)| pred(k, &slot.entry))
            .map(|(k, _)| Arc::clone(&*k))
            .collect();
        let n = doomed.iter().filter(|k| self.remove(k)).count();
        Some(n as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http::{HeaderMap, StatusCode};

    fn entry(len: usize) -> CachedResponse {
        CachedResponse {
            status: StatusCode::OK,
            headers: HeaderMap::new(),
            body: vec![Bytes::from(vec![b'x'; len])],
            stored_at: Instant::now(),
            fresh_for: Duration::from_secs(60),
            initial_age: Duration::ZERO,
        }
    }

    /// moka evicts in batches; the store's own bound must hold after every `put` (one
    /// thread) and once concurrent writers are done (several).
    #[test]
    fn the_byte_budget_holds_after_every_put() {
        let budget = 1 << 20;
        let store = MemoryStore::new(budget);
        for i in 0..2_000 {
            assert!(store.put(&format!("k{i}"), entry(1 + (i * 37) % 60_000)));
            let used = store.stats().used;
            assert!(used <= budget, "after put {i}: {used} > {budget}");
        }
        assert!(store.stats().evictions > 0);
        let store = Arc::new(MemoryStore::new(budget));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let store = store.clone();
                std::thread::spawn(move || {
                    for i in 0..1_000 {
                        store.put(&format!("t{t}-{i}"), entry(1 + (i * 53) % 60_000));
                        // In flight at most: the other writers' entries, one each.
                        assert!(store.stats().used <= budget + 4 * store.max_entry);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let s = store.stats();
        assert!(s.used <= budget, "{s:?}");
        // The counters agree with moka once its pending work is applied.
        store.sync();
        let s = store.stats();
        assert_eq!(s.entries as u64, store.cache.entry_count());
        assert_eq!(s.used, store.cache.weighted_size());
    }

    #[test]
    fn over_the_entry_limit_is_refused_and_remove_releases_bytes() {
        let store = MemoryStore::new(1 << 20);
        assert!(!store.put("big", entry(300_000)));
        assert!(store.put("a", entry(1_000)));
        assert!(store.stats().used > 1_000);
        assert!(store.remove("a"));
        assert_eq!(
            store.stats(),
            MemoryStoreStats {
                entries: 0,
                used: 0,
                evictions: 0
            }
        );
    }

    #[test]
    fn lifetime_is_freshness_plus_grace_unless_revalidatable() {
        let life = Lifetime {
            grace: Duration::from_secs(100),
        };
        let mut e = entry(10);
        e.initial_age = Duration::from_secs(20);
        let slot = |e: CachedResponse| Slot {
            entry: Arc::new(e),
            weight: 1,
        };
        let ttl = life.of(&slot(e.clone())).unwrap();
        // 60 s fresh, 20 s old: 40 s left, plus the grace.
        assert!(ttl <= Duration::from_secs(140) && ttl > Duration::from_secs(139));
        // An absurd lifetime saturates instead of overflowing.
        e.fresh_for = Duration::MAX;
        assert_eq!(life.of(&slot(e.clone())), Some(Duration::MAX));
        // With a validator: no time limit (a 304 can refresh it).
        e.headers
            .insert(http::header::ETAG, http::HeaderValue::from_static("\"v\""));
        assert_eq!(life.of(&slot(e)), None);
    }
}
