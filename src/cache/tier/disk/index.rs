//! The disk tier's in-memory index: key → file size, recency, and what a purge selects by
//! (status, tag lines), plus the writes and reads in flight. Every decision that can be made
//! without I/O (is the key on disk, what to evict, what a purge matches) is made here, under
//! one lock held for map operations only, never across I/O.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use futures_util::future::Shared;
use http::StatusCode;

use super::purge::{tag_cost, TagLines};
use crate::cache::store::CachedResponse;

pub(super) struct Slot {
    pub(super) size: u64,
    pub(super) tick: u64,
    /// What a purge may select by besides the key (see [`Slot::view`]).
    pub(super) status: StatusCode,
    pub(super) tags: TagLines,
}

#[derive(Default)]
pub(super) struct Index {
    pub(super) map: HashMap<String, Slot>,
    /// Recency: smallest tick = least recently used.
    pub(super) order: BTreeMap<u64, String>,
    pub(super) tick: u64,
    pub(super) used: u64,
    /// Bytes of the slots' tag lines (bounded by `max_tag_bytes`).
    pub(super) tag_bytes: u64,
    /// Writes in flight: key → the sequence number of the newest and its entry (so a
    /// purge can judge it); a write whose number is no longer here (replaced or removed
    /// meanwhile) is dropped.
    pub(super) pending: HashMap<String, (u64, Arc<CachedResponse>)>,
    pub(super) pending_bytes: u64,
    pub(super) seq: u64,
    /// Reads in flight, shared by concurrent loads of one key.
    pub(super) reads: HashMap<String, Shared<ReadFuture>>,
}

pub(super) type ReadFuture = Pin<Box<dyn Future<Output = Option<Arc<CachedResponse>>> + Send>>;

impl Index {
    pub(super) fn take(&mut self, key: &str) -> Option<Slot> {
        let slot = self.map.remove(key)?;
        self.order.remove(&slot.tick);
        self.used -= slot.size;
        self.tag_bytes -= tag_cost(&slot.tags);
        Some(slot)
    }

    pub(super) fn touch(&mut self, key: &str) {
        self.tick += 1;
        let tick = self.tick;
        if let Some(slot) = self.map.get_mut(key) {
            let old = std::mem::replace(&mut slot.tick, tick);
            if let Some(k) = self.order.remove(&old) {
                self.order.insert(tick, k);
            }
        }
    }

    pub(super) fn insert(&mut self, key: String, size: u64, status: StatusCode, tags: TagLines) {
        self.take(&key);
        self.tick += 1;
        self.order.insert(self.tick, key.clone());
        self.used += size;
        self.tag_bytes += tag_cost(&tags);
        self.map.insert(
            key,
            Slot {
                size,
                tick: self.tick,
                status,
                tags,
            },
        );
    }
}
