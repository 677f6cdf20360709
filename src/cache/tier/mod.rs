//! Storage tiers behind the [`Store`](super::Store) trait: [`MemoryStore`] (moka) and,
//! with the `disk-cache` feature, [`DiskStore`] behind it in a [`TieredStore`].
//!
//! **The problem.** Memory is fast but small and empty after every restart; a disk is
//! large and keeps its content across restarts but is slow and blocks. The tiered store
//! answers hits from memory, looks a memory miss up on disk (off the runtime's threads)
//! and promotes what it finds, and writes every new entry to both.

pub(crate) mod memory;

#[cfg(feature = "disk-cache")]
pub(crate) mod disk;

#[cfg(feature = "disk-cache")]
pub use tiered::TieredStore;

#[cfg(feature = "disk-cache")]
mod tiered {
    use std::collections::HashSet;
    use std::sync::Arc;

    use super::disk::DiskStore;
    use super::memory::MemoryStore;
    use crate::cache::store::{CachedResponse, Store, StoreLoad};

    /// Memory in front of disk: hit → memory; memory miss → disk (read on the blocking
    /// pool, checked, promoted to memory); a fill → both (the disk write in the
    /// background). `remove` (and so `PURGE`) removes from both; so do prefix and tag
    /// purges (`remove_where`), judging what only the disk holds from its index (status
    /// and tag lines) without reading a file.
    #[derive(Debug)]
    pub struct TieredStore {
        memory: MemoryStore,
        disk: DiskStore,
    }

    impl TieredStore {
        /// `memory` in front of `disk`.
        pub fn new(memory: MemoryStore, disk: DiskStore) -> Self {
            TieredStore { memory, disk }
        }

        /// The memory tier.
        pub fn memory(&self) -> &MemoryStore {
            &self.memory
        }

        /// The disk tier.
        pub fn disk(&self) -> &DiskStore {
            &self.disk
        }
    }

    impl Store for TieredStore {
        fn get(&self, key: &str) -> Option<Arc<CachedResponse>> {
            self.memory.get(key)
        }

        fn put(&self, key: &str, entry: CachedResponse) -> bool {
            // One compact copy, shared by the memory tier and the pending disk write.
            let entry = Arc::new(entry.compact());
            let in_memory = self.memory.put_compact(key, entry.clone());
            let on_disk = self.disk.put(key, entry);
            in_memory || on_disk
        }

        fn remove(&self, key: &str) -> bool {
            let m = self.memory.remove(key);
            let d = self.disk.remove(key);
            m || d
        }

        fn max_entry_size(&self) -> u64 {
            self.memory.max_entry_size().max(self.disk.max_entry_size())
        }

        // --- Fleet purge (issue 15): prefix and surrogate-key purges reach both tiers. ---

        fn remove_where(&self, pred: &mut dyn FnMut(&str, &CachedResponse) -> bool) -> Option<u64> {
            // Memory first, on whole entries; a key removed there goes from disk too (its
            // disk copy is the same entry or an older one). Every other disk copy is
            // judged on its own: it may be older than memory's and carry another tag.
            let mut removed: HashSet<String> = HashSet::new();
            self.memory.remove_where(&mut |k, e| {
                let hit = pred(k, e);
                if hit {
                    removed.insert(k.to_owned());
                }
                hit
            })?;
            let on_disk = self
                .disk
                .remove_where_keys(&mut |k, e| removed.contains(k) || pred(k, e));
            removed.extend(on_disk);
            Some(removed.len() as u64)
        }

        fn remove_if(&self, key: &str, pred: &mut dyn FnMut(&CachedResponse) -> bool) -> bool {
            let in_memory = self.memory.get(key).is_some_and(|e| pred(&e));
            if in_memory {
                self.memory.remove(key);
                self.disk.remove(key);
                return true;
            }
            self.disk.remove_if(key, pred)
        }

        fn load(&self, key: &str) -> Option<StoreLoad> {
            let read = self.disk.load(key)?;
            let (memory, disk) = (self.memory.clone(), self.disk.clone());
            let key = key.to_owned();
            Some(Box::pin(async move {
                let entry = read.await?;
                // Promoted: the next hit is a memory hit. (An entry over the memory
                // tier's limit is served from this read only.) Not if it was purged
                // while the file was read: memory must not bring it back.
                if disk.contains(&key) && !memory.contains(&key) {
                    memory.put_compact(&key, entry.clone());
                }
                Some(entry)
            }))
        }
    }
}
