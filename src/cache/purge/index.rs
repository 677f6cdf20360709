//! The surrogate-key index: which keys carry which `Surrogate-Key`/`Cache-Tag`, recorded
//! as entries are stored, so a tag purge touches only the tagged entries instead of
//! scanning the whole store under its lock.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

use http::HeaderMap;

use super::super::store::{CachedResponse, Store};

/// Response headers whose values are surrogate keys (Fastly's `Surrogate-Key`,
/// space-separated; Cloudflare's `Cache-Tag`, comma-separated). Both are read; either
/// separator is accepted in both.
pub(crate) const TAG_HEADERS: [&str; 2] = ["surrogate-key", "cache-tag"];

/// Most tags read from one response: a header naming thousands of tags must not make one
/// entry cost the whole index.
const MAX_TAGS_PER_ENTRY: usize = 64;
/// Bytes one (tag, key) pair costs in the index beyond the two strings: the hash-set slot,
/// the `Arc` and the map's share.
const PAIR_OVERHEAD: usize = 64;
/// Default bound of the index (see [`TagIndex`]).
pub(crate) const DEFAULT_INDEX_BYTES: usize = 16 << 20;

/// The tags of `headers`, each as visible ASCII (`%XX` for any other byte, and for `%`),
/// so tags are compared as the bytes that were sent and a non-UTF-8 tag still matches
/// the same bytes in a `PURGE`.
pub(crate) fn tags(headers: &HeaderMap) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for name in TAG_HEADERS {
        for line in headers.get_all(name) {
            for t in line
                .as_bytes()
                .split(|b| matches!(b, b' ' | b',' | b'\t'))
                .filter(|t| !t.is_empty())
            {
                if out.len() == MAX_TAGS_PER_ENTRY {
                    return out;
                }
                let t = escape(t);
                if !out.contains(&t) {
                    out.push(t);
                }
            }
        }
    }
    out
}

/// Visible ASCII except `%` kept, every other byte `%XX`.
pub(crate) fn escape(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len());
    for &b in bytes {
        if b.is_ascii_graphic() && b != b'%' {
            s.push(b as char);
        } else {
            s.push_str(&format!("%{b:02X}"));
        }
    }
    s
}

#[derive(Default)]
struct Index {
    by_tag: HashMap<Box<str>, HashSet<Arc<str>>>,
    bytes: usize,
    /// `false` once a pair did not fit: a tag purge must then scan the store (and the
    /// scan rebuilds the index).
    complete: bool,
}

/// The bounded tag index over a store. It may name keys whose entry is gone or was
/// replaced (evictions are not reported to it): every key it names is checked against
/// the stored entry's own tags before removal, so a stale pair costs a lookup, never a
/// wrong purge. When the pairs would pass `max_bytes` it stops indexing and tag purges
/// fall back to a full scan, which rebuilds the index when the live pairs fit again.
pub(crate) struct TagIndex {
    index: Mutex<Index>,
    max_bytes: usize,
}

impl fmt::Debug for TagIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let i = self.lock();
        f.debug_struct("TagIndex")
            .field("tags", &i.by_tag.len())
            .field("bytes", &i.bytes)
            .field("complete", &i.complete)
            .finish()
    }
}

impl TagIndex {
    /// Starts *incomplete*: the store may already hold entries this index never saw (a
    /// disk tier after a restart, a store shared with an earlier layer), so the first
    /// tag purge scans the store and builds the index from what it finds.
    pub(crate) fn new(max_bytes: usize) -> Self {
        TagIndex {
            index: Mutex::new(Index::default()),
            max_bytes,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Index> {
        // Every update leaves the maps consistent before it can panic.
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records that `key` now holds an entry with `tags`.
    pub(crate) fn add(&self, key: &str, tags: &[String]) {
        if tags.is_empty() {
            return;
        }
        let mut i = self.lock();
        if !i.complete {
            // The next tag purge scans (and rebuilds); nothing to keep until then.
            return;
        }
        let key: Arc<str> = Arc::from(key);
        for t in tags {
            let cost = t.len() + key.len() + PAIR_OVERHEAD;
            if i.bytes.saturating_add(cost) > self.max_bytes {
                // Out of room: forget everything (bounded memory) and scan from now on.
                *i = Index::default();
                return;
            }
            if i.by_tag
                .entry(t.as_str().into())
                .or_default()
                .insert(key.clone())
            {
                i.bytes += cost;
            }
        }
    }

    /// Removes every entry of `store` tagged with one of `purge`; `None` when the index
    /// is incomplete and the store cannot be scanned.
    pub(crate) fn purge(&self, store: &dyn Store, purge: &[String]) -> Option<u64> {
        let mut i = self.lock();
        if i.complete {
            let mut keys: HashSet<Arc<str>> = HashSet::new();
            for t in purge {
                if let Some(set) = i.by_tag.remove(t.as_str()) {
                    i.bytes = i.bytes.saturating_sub(
                        set.iter()
                            .map(|k| k.len() + t.len() + PAIR_OVERHEAD)
                            .sum::<usize>(),
                    );
                    keys.extend(set);
                }
            }
            drop(i);
            let mut n = 0;
            for key in keys {
                // `remove_if`, not `get` then `remove`: a tiered store's disk may hold the
                // entry that memory no longer does.
                let tagged =
                    &mut |e: &CachedResponse| tags(&e.headers).iter().any(|t| purge.contains(t));
                if store.remove_if(&key, tagged) {
                    n += 1;
                }
            }
            return Some(n);
        }
        // Scan: remove the tagged entries and collect the others' pairs to rebuild the
        // index (held locked so no `add` interleaves with the rebuild).
        let mut rebuilt = Index {
            complete: true,
            ..Index::default()
        };
        let max = self.max_bytes;
        let removed = store.remove_where(&mut |key, entry| {
            let t = tags(&entry.headers);
            if t.iter().any(|t| purge.contains(t)) {
                return true;
            }
            if rebuilt.complete {
                let key: Arc<str> = Arc::from(key);
                for tag in t {
                    let cost = tag.len() + key.len() + PAIR_OVERHEAD;
                    if rebuilt.bytes.saturating_add(cost) > max {
                        rebuilt = Index::default();
                        break;
                    }
                    rebuilt.bytes += cost;
                    rebuilt
                        .by_tag
                        .entry(tag.into())
                        .or_default()
                        .insert(key.clone());
                }
            }
            false
        })?;
        *i = rebuilt;
        Some(removed)
    }

    /// Forgets every pair (after the store was emptied).
    pub(crate) fn clear(&self) {
        *self.lock() = Index {
            complete: true,
            ..Index::default()
        };
    }
}

/// The layer's store wrapped so every stored entry's tags reach the index.
pub(crate) struct Indexed {
    pub(crate) inner: Arc<dyn Store>,
    pub(crate) index: Arc<TagIndex>,
}

impl Store for Indexed {
    fn get(&self, key: &str) -> Option<Arc<CachedResponse>> {
        self.inner.get(key)
    }
    fn put(&self, key: &str, entry: CachedResponse) -> bool {
        let t = tags(&entry.headers);
        let stored = self.inner.put(key, entry);
        if stored {
            self.index.add(key, &t);
        }
        stored
    }
    fn remove(&self, key: &str) -> bool {
        self.inner.remove(key)
    }
    fn max_entry_size(&self) -> u64 {
        self.inner.max_entry_size()
    }
    fn remove_where(&self, pred: &mut dyn FnMut(&str, &CachedResponse) -> bool) -> Option<u64> {
        self.inner.remove_where(pred)
    }
    fn remove_if(&self, key: &str, pred: &mut dyn FnMut(&CachedResponse) -> bool) -> bool {
        self.inner.remove_if(key, pred)
    }
    fn load(&self, key: &str) -> Option<super::super::store::StoreLoad> {
        self.inner.load(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::MemoryStore;
    use http::{HeaderValue, StatusCode};
    use std::time::Duration;

    fn entry(tags: &[u8]) -> CachedResponse {
        let mut headers = HeaderMap::new();
        headers.insert("surrogate-key", HeaderValue::from_bytes(tags).unwrap());
        CachedResponse {
            status: StatusCode::OK,
            headers,
            body: vec![bytes::Bytes::from_static(b"x")],
            stored_at: tokio::time::Instant::now(),
            fresh_for: Duration::from_secs(60),
            initial_age: Duration::ZERO,
        }
    }

    #[test]
    fn tags_are_split_escaped_and_bounded() {
        let mut h = HeaderMap::new();
        h.insert("surrogate-key", HeaderValue::from_static("a  b,c"));
        h.append(
            "cache-tag",
            HeaderValue::from_bytes(b"caf\xc3\xa9,a").unwrap(),
        );
        assert_eq!(tags(&h), ["a", "b", "c", "caf%C3%A9"]);
        let many = (0..500)
            .map(|i| format!("t{i}"))
            .collect::<Vec<_>>()
            .join(" ");
        h.insert("surrogate-key", HeaderValue::from_str(&many).unwrap());
        assert_eq!(tags(&h).len(), MAX_TAGS_PER_ENTRY);
    }

    #[tokio::test]
    async fn index_overflow_falls_back_to_a_scan_that_rebuilds_it() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new(64 << 20));
        // Room for about two pairs.
        let index = Arc::new(TagIndex::new(2 * (PAIR_OVERHEAD + 8)));
        index.clear(); // known empty store: complete
        let s = Indexed {
            inner: store.clone(),
            index: index.clone(),
        };
        assert!(s.put("k1", entry(b"a")));
        assert!(s.put("k2", entry(b"b")));
        assert!(s.put("k3", entry(b"a")));
        assert!(!index.lock().complete, "third pair overflowed the bound");
        assert_eq!(index.purge(&s, &["a".into()]), Some(2));
        assert!(s.get("k2").is_some());
        assert!(index.lock().complete, "the scan rebuilt the index");
        assert_eq!(index.purge(&s, &["b".into()]), Some(1));
        assert!(s.get("k2").is_none());
    }

    #[tokio::test]
    async fn a_replaced_entry_is_not_purged_by_its_old_tag() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new(64 << 20));
        let index = Arc::new(TagIndex::new(DEFAULT_INDEX_BYTES));
        let s = Indexed {
            inner: store.clone(),
            index: index.clone(),
        };
        // An entry stored before the index existed is found by the first purge's scan.
        store.put("before", entry(b"old"));
        assert_eq!(index.purge(&s, &["old".into()]), Some(1));
        assert!(index.lock().complete);
        s.put("k", entry(b"old"));
        s.put("k", entry(b"new"));
        assert_eq!(index.purge(&s, &["old".into()]), Some(0));
        assert!(s.get("k").is_some());
    }
}
