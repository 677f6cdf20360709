//! What a prefix or surrogate-key `PURGE` needs from the disk tier: each entry's status
//! and `Surrogate-Key`/`Cache-Tag` lines kept in the index (under a global byte bound),
//! so [`DiskStore::remove_where`] decides without reading a file — a tiered store's purge
//! must reach what only the disk holds (after a restart, or evicted from memory).

use std::fs;

use http::{HeaderMap, HeaderName, HeaderValue};

use super::{blocking, DiskStore, Slot};
use crate::cache::purge::index::TAG_HEADERS;
use crate::cache::store::CachedResponse;

/// An entry's `Surrogate-Key`/`Cache-Tag` header lines (`None`: it has none, the usual
/// case, at no cost).
pub(super) type TagLines = Option<Box<[(HeaderName, HeaderValue)]>>;

/// Bytes one kept tag line costs in the index beyond its name and value.
const TAG_LINE_OVERHEAD: u64 = 64;

/// Default bound of the tag lines the index keeps (see [`DiskStore::max_tag_bytes`]).
pub const DEFAULT_MAX_TAG_BYTES: u64 = 16 << 20;

pub(super) fn tag_lines(headers: &HeaderMap) -> TagLines {
    let lines: Vec<_> = TAG_HEADERS
        .iter()
        .flat_map(|n| headers.get_all(*n).iter().map(move |v| (n, v)))
        // Copied: a value sliced from hyper's read buffer would keep the whole buffer.
        .map(|(n, v)| {
            let copy = HeaderValue::from_bytes(v.as_bytes()).unwrap_or_else(|_| v.clone());
            (HeaderName::from_static(n), copy)
        })
        .collect();
    (!lines.is_empty()).then(|| lines.into_boxed_slice())
}

pub(super) fn tag_cost(tags: &TagLines) -> u64 {
    tags.iter()
        .flat_map(|t| t.iter())
        .map(|(n, v)| (n.as_str().len() + v.len()) as u64 + TAG_LINE_OVERHEAD)
        .sum()
}

impl Slot {
    /// The entry as a purge predicate sees it without reading the file: its status and
    /// tag lines, no body, no other header.
    pub(super) fn view(&self) -> CachedResponse {
        let mut headers = HeaderMap::new();
        for (n, v) in self.tags.iter().flat_map(|t| t.iter()) {
            headers.append(n.clone(), v.clone());
        }
        CachedResponse {
            status: self.status,
            headers,
            body: Vec::new(),
            stored_at: tokio::time::Instant::now(),
            fresh_for: std::time::Duration::ZERO,
            initial_age: std::time::Duration::ZERO,
        }
    }
}

impl DiskStore {
    // --- Purge by prefix and surrogate key (issue 15, fleet purge on a tiered store). ---

    /// Removes every entry for which `pred(key, entry)` is true and returns how many.
    /// Decided from the index, without reading a file: `entry` carries the status and
    /// the `Surrogate-Key`/`Cache-Tag` lines only (no body, no other header). A write
    /// in flight is judged on its whole entry and cancelled if it matches. The files
    /// are deleted in the background.
    pub fn remove_where(&self, pred: &mut dyn FnMut(&str, &CachedResponse) -> bool) -> u64 {
        self.remove_where_keys(pred).len() as u64
    }

    /// [`remove_where`](DiskStore::remove_where), giving the keys removed.
    pub(crate) fn remove_where_keys(
        &self,
        pred: &mut dyn FnMut(&str, &CachedResponse) -> bool,
    ) -> Vec<String> {
        let mut removed = Vec::new();
        let mut files = Vec::new();
        {
            let mut index = self.inner.lock();
            let cancelled: Vec<String> = index
                .pending
                .iter()
                .filter(|(k, (_, e))| pred(k, e))
                .map(|(k, _)| k.clone())
                .collect();
            for k in &cancelled {
                index.pending.remove(k);
            }
            let doomed: Vec<String> = index
                .map
                .iter()
                .filter(|(k, slot)| pred(k, &slot.view()))
                .map(|(k, _)| k.clone())
                .collect();
            for k in doomed {
                if index.take(&k).is_some() {
                    files.push(self.inner.path(&k));
                    removed.push(k);
                }
            }
            for k in cancelled {
                if !removed.contains(&k) {
                    removed.push(k);
                }
            }
        }
        if !files.is_empty() {
            blocking(move || {
                for f in files {
                    let _ = fs::remove_file(f);
                }
            });
        }
        removed
    }

    /// Removes `key` if `pred` holds for its copy here (judged as in
    /// [`remove_where`](DiskStore::remove_where)); `true` if removed.
    pub(crate) fn remove_if(
        &self,
        key: &str,
        pred: &mut dyn FnMut(&CachedResponse) -> bool,
    ) -> bool {
        let (pending, file) = {
            let mut index = self.inner.lock();
            let pending = index.pending.get(key).is_some_and(|(_, e)| pred(e))
                && index.pending.remove(key).is_some();
            let indexed = index.map.get(key).is_some_and(|slot| pred(&slot.view()));
            let file = indexed && index.take(key).is_some();
            (pending, file)
        };
        if file {
            let path = self.inner.path(key);
            blocking(move || {
                let _ = fs::remove_file(path);
            });
        }
        pending || file
    }
}

#[cfg(test)]
mod tests {
    use super::super::write_entry;
    use super::*;
    use bytes::Bytes;
    use http::StatusCode;
    use std::sync::Arc;
    use std::time::Duration;

    fn entry(tags: &str) -> CachedResponse {
        let mut headers = HeaderMap::new();
        headers.insert("etag", HeaderValue::from_static("\"v1\""));
        if !tags.is_empty() {
            headers.insert("surrogate-key", HeaderValue::from_str(tags).unwrap());
        }
        CachedResponse {
            status: StatusCode::OK,
            headers,
            body: vec![Bytes::from_static(b"body")],
            stored_at: tokio::time::Instant::now(),
            fresh_for: Duration::from_secs(60),
            initial_age: Duration::ZERO,
        }
    }

    fn tagged(tag: &'static str) -> impl FnMut(&str, &CachedResponse) -> bool {
        move |_, e| {
            e.headers.get_all("surrogate-key").iter().any(|v| {
                v.as_bytes()
                    .split(|b| *b == b' ')
                    .any(|t| t == tag.as_bytes())
            })
        }
    }

    // No runtime here: `put` writes in place, so every step is deterministic.
    #[test]
    fn tags_are_judged_from_the_index_and_read_back_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let store = DiskStore::open(dir.path(), 1 << 20).unwrap();
        assert!(store.put("a", Arc::new(entry("red all"))));
        assert!(store.put("b", Arc::new(entry("blue all"))));
        assert!(store.put("c", Arc::new(entry(""))));
        let removed = store.remove_where_keys(&mut |_, e| {
            assert!(
                e.body.is_empty() && e.headers.get("etag").is_none(),
                "a view"
            );
            assert_eq!(e.status, StatusCode::OK);
            tagged("red")("", e)
        });
        assert_eq!(removed, ["a"]);
        assert!(!store.path_of("a").exists());
        drop(store);
        let store = DiskStore::open(dir.path(), 1 << 20).unwrap();
        assert!(store.contains("b") && store.contains("c"));
        assert_eq!(store.remove_where(&mut tagged("all")), 1);
        assert!(!store.contains("b") && !store.path_of("b").exists());
        assert!(!store.remove_if("c", &mut |_| false));
        assert!(store.remove_if("c", &mut |_| true));
        assert_eq!(store.stats().entries, 0);
    }

    #[test]
    fn a_matching_write_in_flight_is_cancelled() {
        let dir = tempfile::tempdir().unwrap();
        let store = DiskStore::open(dir.path(), 1 << 20).unwrap();
        let e = Arc::new(entry("red"));
        let size = super::super::encoded_len("k", &e).unwrap();
        // What `put` does before handing the write to the blocking pool.
        let seq = {
            let mut index = store.inner.lock();
            index.seq += 1;
            let seq = index.seq;
            index.pending.insert("k".into(), (seq, e.clone()));
            index.pending_bytes += size;
            seq
        };
        assert_eq!(store.remove_where(&mut tagged("blue")), 0);
        assert_eq!(store.remove_where(&mut tagged("red")), 1);
        // The write lands after the purge: dropped, not renamed into place.
        write_entry(&store.inner, "k".into(), seq, size, &e);
        assert!(!store.contains("k"));
        assert!(!store.path_of("k").exists());
        assert_eq!(store.inner.lock().pending_bytes, 0);
    }

    #[test]
    fn the_tag_lines_kept_stay_within_their_bound() {
        let dir = tempfile::tempdir().unwrap();
        let line = |t: &str| ("surrogate-key".len() + t.len()) as u64 + TAG_LINE_OVERHEAD;
        let bound = 2 * line("t-0000");
        let store = DiskStore::open(dir.path(), 1 << 20)
            .unwrap()
            .max_tag_bytes(bound);
        for i in 0..10 {
            assert!(store.put(&format!("k{i}"), Arc::new(entry(&format!("t-{i:04}")))));
            assert!(store.inner.lock().tag_bytes <= bound);
        }
        // The least recently used went to make room; untagged entries cost nothing.
        assert!(store.contains("k9") && store.contains("k8") && !store.contains("k7"));
        assert!(store.put("plain", Arc::new(entry(""))));
        assert!(store.contains("k9") && store.contains("plain"));
        // One entry whose tags alone pass the bound stays off the disk.
        assert!(!store.put("huge", Arc::new(entry(&"x".repeat(bound as usize)))));
        assert!(store.contains("k9"));
    }
}
