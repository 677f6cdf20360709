//! What the cache stores ([`CachedResponse`]) and where ([`Store`]); the tiers that
//! implement it are in `tier/`.

use std::sync::Arc;
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
    /// Its body. A [`MemoryStore`](super::MemoryStore) keeps it as one compact chunk (see
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
    ///
    /// A store with a slower tier may show `pred` a partial entry for what only that tier
    /// holds (`TieredStore`, feature `disk-cache`: status and `Surrogate-Key`/`Cache-Tag`
    /// lines, no body), rather than read every file.
    fn remove_where(&self, pred: &mut dyn FnMut(&str, &CachedResponse) -> bool) -> Option<u64> {
        let _ = pred;
        None
    }

    /// Removes `key` if `pred` holds for its entry; `true` if it did. A store with a
    /// slower tier judges the copy there too (a tag purge through the tag index must
    /// reach an entry evicted from memory but still on disk). Default: `get`, then
    /// `remove`.
    fn remove_if(&self, key: &str, pred: &mut dyn FnMut(&CachedResponse) -> bool) -> bool {
        self.get(key).is_some_and(|e| pred(&e)) && self.remove(key)
    }

    /// For a store with a slower tier (a disk): called after `get` missed, a future that
    /// reads `key` from that tier off the runtime's threads (and promotes it to the fast
    /// one). `None` (the default) when no slower tier holds `key`: deciding that must
    /// cost no I/O, since the layer asks on every miss.
    fn load(&self, key: &str) -> Option<StoreLoad> {
        let _ = key;
        None
    }
}

/// A read from a store's slower tier (see [`Store::load`]).
pub type StoreLoad =
    std::pin::Pin<Box<dyn std::future::Future<Output = Option<Arc<CachedResponse>>> + Send>>;

/// `Arc<S>` and `Box<S>` are stores when `S` is: every method forwards, so a new trait
/// method is added to both at once.
macro_rules! forward_store {
    ($($ptr:ident),*) => {$(
        impl<S: Store + ?Sized> Store for $ptr<S> {
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
            fn load(&self, key: &str) -> Option<StoreLoad> {
                (**self).load(key)
            }
            fn remove_where(&self, pred: &mut dyn FnMut(&str, &CachedResponse) -> bool) -> Option<u64> {
                (**self).remove_where(pred)
            }
            fn remove_if(&self, key: &str, pred: &mut dyn FnMut(&CachedResponse) -> bool) -> bool {
                (**self).remove_if(key, pred)
            }
        }
    )*};
}

forward_store!(Arc, Box);
