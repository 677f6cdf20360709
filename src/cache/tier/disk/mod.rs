//! The disk tier: [`DiskStore`], entries in files that survive a restart.
//!
//! **The problem.** A memory cache starts empty after every deploy or crash, and the
//! origin takes the whole refill at once. A disk tier keeps what was fetched: a new
//! process on the same directory answers from it without asking the origin.
//!
//! **Format (our own; see `docs/edge_cache.md` for why not `foyer` or `cacache`).** One
//! file per key, named by the SHA-256 of the key, under a two-hex-digit fan-out folder:
//!
//! ```text
//! "TPCACHE1" | meta_len u32 | body_len u64 | sha256(meta ‖ body) | meta | body
//! meta = key_len u32, key, status u16, written_at_ms u64 (Unix), age_at_write_ms u64,
//!        fresh_for_ms u64, header_count u32, { name_len u16, name, value_len u32, value }*
//! ```
//!
//! **Crash safety.** A file is written under `tmp/`, `fsync`ed, then renamed into place
//! (and the folder `fsync`ed), so a reader sees either no file or a whole one. What the
//! rename cannot cover (a disk that loses or flips bytes, a file truncated by hand) the
//! checksum does: a file whose length, checksum or key does not match is a miss and is
//! deleted, never served.
//!
//! **Off the runtime.** Writes, reads and deletions run on tokio's blocking pool
//! (`spawn_blocking`); the index (key → file size, recency) is in memory, so a key the
//! disk does not hold costs no I/O. [`DiskStore::open`] scans the folder once, with
//! blocking I/O: call it before serving (or inside `spawn_blocking`).
//!
//! **Purge by prefix or tag.** The index also keeps each entry's status and its
//! `Surrogate-Key`/`Cache-Tag` lines (under a global byte bound,
//! [`DiskStore::max_tag_bytes`]), so [`DiskStore::remove_where`] — a prefix or
//! surrogate-key `PURGE` — decides from memory, without reading a file, also for the
//! entries only the disk holds.

use std::fmt;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::UNIX_EPOCH;

use futures_util::future::FutureExt;

use sha2::{Digest, Sha256};

use crate::cache::purge::index::TAG_HEADERS;
use crate::cache::store::CachedResponse;

mod format;
mod index;
mod purge;

use index::{Index, ReadFuture, Slot};
pub use purge::DEFAULT_MAX_TAG_BYTES;
use purge::{tag_cost, tag_lines};

use format::{corrupt, encode, encoded_len, hex, read_entry, read_index_meta};

/// Counters of a [`DiskStore`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiskStoreStats {
    /// Entries indexed.
    pub entries: usize,
    /// Bytes of the entry files.
    pub used: u64,
    /// Entries deleted to make room.
    pub evictions: u64,
    /// Files found torn or corrupt (deleted, treated as misses).
    pub corrupt: u64,
    /// Entries not written because the bytes waiting to be written were over
    /// [`DiskStore::max_pending`], or the write failed.
    pub write_skipped: u64,
    /// Files read (concurrent loads of one key share one read).
    pub reads: u64,
}

struct Inner {
    dir: PathBuf,
    budget: u64,
    max_entry: u64,
    max_pending: u64,
    max_tag_bytes: u64,
    index: Mutex<Index>,
    evictions: AtomicU64,
    corrupt: AtomicU64,
    write_skipped: AtomicU64,
    reads_made: AtomicU64,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Index> {
        // Every update leaves the index consistent before it can panic.
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn path(&self, key: &str) -> PathBuf {
        let hash = hex(&Sha256::digest(key.as_bytes()));
        self.dir.join(&hash[..2]).join(&hash)
    }
}

/// A byte-bounded store of cache entries on disk that survives a restart. Usually the
/// second tier behind a [`MemoryStore`](super::memory::MemoryStore) in a
/// [`TieredStore`](super::TieredStore).
///
/// One file per key (named by the key's SHA-256), carrying its length and a SHA-256 of
/// its content: written under `tmp/`, `fsync`ed and renamed into place, so a crash leaves
/// the old file, the new one or none; a torn or corrupted file is a miss and is deleted,
/// never served. Least recently used entries are evicted (files deleted) to stay within
/// the budget. Writes, reads and deletions run on tokio's blocking pool; the index is in
/// memory, so a key the disk does not hold costs no I/O. See `docs/edge_cache.md`,
/// "Tiers", for the format and why not `foyer` or `cacache`.
#[derive(Clone)]
pub struct DiskStore {
    inner: Arc<Inner>,
}

impl fmt::Debug for DiskStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DiskStore")
            .field("dir", &self.inner.dir)
            .field("budget", &self.inner.budget)
            .field("stats", &self.stats())
            .finish()
    }
}

/// Default bound of the bytes waiting to be written (see [`DiskStore::max_pending`]).
pub const DEFAULT_MAX_PENDING: u64 = 64 << 20;

impl DiskStore {
    /// Opens (or creates) a store in `dir` holding at most `budget` bytes of files; one
    /// entry may take at most a quarter of it. Indexes the entries already there (the
    /// least recently written evicted first if they are over the budget) and deletes
    /// unfinished writes. Blocking I/O: call it before serving.
    pub fn open(dir: impl AsRef<Path>, budget: u64) -> io::Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let tmp = dir.join("tmp");
        // Unfinished writes of a process that died: never renamed, never served.
        if tmp.exists() {
            fs::remove_dir_all(&tmp)?;
        }
        fs::create_dir_all(&tmp)?;
        let mut found = Vec::new();
        for sub in fs::read_dir(&dir)? {
            let sub = sub?;
            if sub.file_name() == "tmp" || !sub.file_type()?.is_dir() {
                continue;
            }
            for file in fs::read_dir(sub.path())? {
                let file = file?;
                let path = file.path();
                let meta = file.metadata()?;
                match read_index_meta(&path, |n| TAG_HEADERS.contains(&n.as_str())) {
                    Ok(m) => {
                        let mtime = meta.modified().unwrap_or(UNIX_EPOCH);
                        let tags = (!m.kept.is_empty()).then(|| m.kept.into_boxed_slice());
                        found.push((mtime, m.key, meta.len(), m.status, tags));
                    }
                    // Not ours or torn: it would never be served; free the space.
                    Err(_) => {
                        let _ = fs::remove_file(&path);
                    }
                }
            }
        }
        found.sort_by_key(|(mtime, ..)| *mtime);
        let store = DiskStore {
            inner: Arc::new(Inner {
                dir,
                budget,
                max_entry: budget / 4,
                max_pending: DEFAULT_MAX_PENDING,
                max_tag_bytes: DEFAULT_MAX_TAG_BYTES,
                index: Mutex::default(),
                evictions: AtomicU64::new(0),
                corrupt: AtomicU64::new(0),
                write_skipped: AtomicU64::new(0),
                reads_made: AtomicU64::new(0),
            }),
        };
        let mut victims = Vec::new();
        {
            let mut index = store.inner.lock();
            for (_, key, size, status, tags) in found {
                let cost = tag_cost(&tags);
                if cost > store.inner.max_tag_bytes {
                    victims.push(key);
                    continue;
                }
                index.insert(key, size, status, tags);
                evict(&store.inner, &mut index, 0, 0, &mut victims);
            }
        }
        for key in victims {
            let _ = fs::remove_file(store.inner.path(&key));
        }
        Ok(store)
    }

    /// The largest single entry file (default: a quarter of the budget, capped by it).
    /// Set it before sharing the store.
    pub fn max_entry(mut self, bytes: u64) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.max_entry = bytes.min(inner.budget);
        }
        self
    }

    /// The most bytes waiting to be written at once (default [`DEFAULT_MAX_PENDING`],
    /// 64 MiB): past it new entries stay in memory only, so a disk slower than the
    /// origin cannot make the writes queue without bound. Set it before sharing.
    pub fn max_pending(mut self, bytes: u64) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.max_pending = bytes;
        }
        self
    }

    /// The most bytes of `Surrogate-Key`/`Cache-Tag` lines the index keeps in memory
    /// for prefix and tag purges (default [`DEFAULT_MAX_TAG_BYTES`], 16 MiB): past it
    /// the least recently used entries are evicted, as for the byte budget, so every
    /// entry on disk stays purgeable by tag. Applies to entries indexed from now on (at
    /// [`open`](DiskStore::open) the default holds): set it before sharing.
    pub fn max_tag_bytes(mut self, bytes: u64) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.max_tag_bytes = bytes;
        }
        self
    }

    /// The largest entry accepted.
    pub fn max_entry_size(&self) -> u64 {
        self.inner.max_entry
    }

    /// Current counters.
    pub fn stats(&self) -> DiskStoreStats {
        let index = self.inner.lock();
        DiskStoreStats {
            entries: index.map.len(),
            used: index.used,
            evictions: self.inner.evictions.load(Ordering::Relaxed),
            corrupt: self.inner.corrupt.load(Ordering::Relaxed),
            write_skipped: self.inner.write_skipped.load(Ordering::Relaxed),
            reads: self.inner.reads_made.load(Ordering::Relaxed),
        }
    }

    /// Whether `key` is indexed (its file written).
    pub fn contains(&self, key: &str) -> bool {
        self.inner.lock().map.contains_key(key)
    }

    /// The file that holds (or would hold) `key`.
    pub fn path_of(&self, key: &str) -> PathBuf {
        self.inner.path(key)
    }

    /// Writes `entry` under `key` in the background (blocking pool). `false` if it is
    /// not written: too large, or too many bytes already waiting.
    pub fn put(&self, key: &str, entry: Arc<CachedResponse>) -> bool {
        // The length is known without encoding: the copy and the checksum are work for
        // the blocking pool, not for the runtime thread that finished the fill.
        let Some(size) = encoded_len(key, &entry) else {
            return false;
        };
        if size > self.inner.max_entry
            || tag_cost(&tag_lines(&entry.headers)) > self.inner.max_tag_bytes
        {
            return false;
        }
        let seq = {
            let mut index = self.inner.lock();
            if index.pending_bytes.saturating_add(size) > self.inner.max_pending {
                drop(index);
                self.inner.write_skipped.fetch_add(1, Ordering::Relaxed);
                return false;
            }
            index.seq += 1;
            let seq = index.seq;
            index.pending.insert(key.to_owned(), (seq, entry.clone()));
            index.pending_bytes += size;
            seq
        };
        let inner = self.inner.clone();
        let key = key.to_owned();
        blocking(move || write_entry(&inner, key, seq, size, &entry));
        true
    }

    /// Reads `key`'s entry on the blocking pool. `None` right away (no I/O) when it is
    /// not indexed; the future gives `None` when the file is gone or corrupt (then it is
    /// deleted).
    pub fn load(
        &self,
        key: &str,
    ) -> Option<impl std::future::Future<Output = Option<Arc<CachedResponse>>> + Send + 'static>
    {
        let mut index = self.inner.lock();
        if !index.map.contains_key(key) {
            return None;
        }
        index.touch(key);
        // Concurrent misses on one key share one read of its file.
        if let Some(read) = index.reads.get(key) {
            return Some(read.clone());
        }
        let inner = self.inner.clone();
        let owned = key.to_owned();
        let read: ReadFuture = Box::pin(async move {
            let key = owned;
            inner.reads_made.fetch_add(1, Ordering::Relaxed);
            let read = {
                let (inner, key) = (inner.clone(), key.clone());
                tokio::task::spawn_blocking(move || read_entry(&inner.path(&key), &key))
            };
            let out = match read.await {
                Ok(Ok(entry)) => Some(Arc::new(entry)),
                Ok(Err(e)) => {
                    if e.kind() != io::ErrorKind::NotFound {
                        inner.corrupt.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(key, error = %e, "disk cache entry unreadable; removed");
                    }
                    remove_entry(&inner, &key);
                    None
                }
                Err(_) => None,
            };
            inner.lock().reads.remove(&key);
            out
        });
        let read = read.shared();
        index.reads.insert(key.to_owned(), read.clone());
        Some(read)
    }

    /// Removes `key` (the file is deleted in the background); `true` if it was indexed
    /// or being written.
    pub fn remove(&self, key: &str) -> bool {
        let (was, pending) = {
            let mut index = self.inner.lock();
            let pending = index.pending.remove(key).is_some();
            (index.take(key).is_some(), pending)
        };
        if was {
            let path = self.inner.path(key);
            blocking(move || {
                let _ = fs::remove_file(path);
            });
        }
        was || pending
    }
}

/// Runs `f` on tokio's blocking pool, or here when there is no runtime (a store used
/// from plain threads or a synchronous test).
fn blocking(f: impl FnOnce() + Send + 'static) {
    match tokio::runtime::Handle::try_current() {
        Ok(rt) => {
            rt.spawn_blocking(f);
        }
        Err(_) => f(),
    }
}

/// Evicts least recently used entries until `extra` more bytes of files and `extra_tags`
/// more bytes of tag lines fit; their keys go to `victims` (the files are deleted outside
/// the lock).
fn evict(inner: &Inner, index: &mut Index, extra: u64, extra_tags: u64, victims: &mut Vec<String>) {
    while index.used.saturating_add(extra) > inner.budget
        || index.tag_bytes.saturating_add(extra_tags) > inner.max_tag_bytes
    {
        let Some((_, key)) = index.order.pop_first() else {
            break;
        };
        if let Some(slot) = index.map.remove(&key) {
            index.used -= slot.size;
            index.tag_bytes -= tag_cost(&slot.tags);
            inner.evictions.fetch_add(1, Ordering::Relaxed);
            victims.push(key);
        }
    }
}

fn remove_entry(inner: &Inner, key: &str) {
    inner.lock().take(key);
    let _ = fs::remove_file(inner.path(key));
}

fn write_entry(inner: &Inner, key: String, seq: u64, size: u64, entry: &CachedResponse) {
    let bytes = encode(&key, entry).unwrap_or_default();
    let path = inner.path(&key);
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("entry");
    let tmp = inner.dir.join("tmp").join(format!("{name}.{seq}"));
    let parent = path.parent().unwrap_or(Path::new(".")).to_path_buf();
    let mut written = if bytes.len() as u64 == size {
        write_tmp(&tmp, &bytes).and_then(|()| fs::create_dir_all(&parent))
    } else {
        Err(corrupt("encoded length differs from the computed one"))
    };
    let tags = tag_lines(&entry.headers);
    let tags_size = tag_cost(&tags);
    let mut victims = Vec::new();
    let renamed = {
        let mut index = inner.lock();
        index.pending_bytes = index.pending_bytes.saturating_sub(size);
        // Only the newest write of a key that was not removed meanwhile goes in; the
        // rename happens under the lock so two writes of one key cannot land out of order.
        let current = index.pending.get(&key).map(|p| p.0) == Some(seq);
        if current {
            index.pending.remove(&key);
        }
        if written.is_ok() && current {
            written = fs::rename(&tmp, &path);
            if written.is_ok() {
                index.take(&key);
                evict(inner, &mut index, size, tags_size, &mut victims);
                index.insert(key.clone(), size, entry.status, tags);
            }
        }
        written.is_ok() && current
    };
    if renamed {
        // Makes the rename itself durable (best effort: not every platform opens folders).
        if let Ok(d) = File::open(&parent) {
            let _ = d.sync_all();
        }
    } else {
        if let Err(e) = &written {
            inner.write_skipped.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(key, error = %e, "disk cache write failed");
        }
        let _ = fs::remove_file(&tmp);
    }
    for victim in victims {
        let _ = fs::remove_file(inner.path(&victim));
    }
}

/// The first half of a crash-safe write: the whole file under `tmp/`, `fsync`ed. The
/// rename into place follows; after a crash the path holds the old file, the new one,
/// or nothing — never a part.
fn write_tmp(tmp: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut f = File::create(tmp)?;
    f.write_all(bytes)?;
    f.sync_all()
}
