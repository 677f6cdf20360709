//! governor's keyed state with a bound on the number of keys.

use std::hash::Hash;
use std::sync::atomic::{AtomicUsize, Ordering};

use dashmap::DashMap;
use governor::nanos::Nanos;
use governor::state::keyed::ShrinkableKeyedStateStore;
use governor::state::{InMemoryState, NotKeyed, StateStore};

/// governor's `DashMapStateStore`, plus a maximum number of keys.
///
/// A client that invents keys (addresses from a large IPv6 range, random subjects from a
/// compromised signer) must not grow the table without end. Once `max` keys are held, a
/// *new* key is counted against one shared overflow bucket instead of getting its own:
/// memory stays bounded, the keys already known keep their own limits, and the newcomers
/// are limited together (neither let through unlimited nor locked out for good). Idle keys
/// are evicted by `retain_recent` (see [`LocalLimiter`](super::LocalLimiter)), which makes
/// room again.
pub(crate) struct BoundedStore<K: Hash + Eq> {
    map: DashMap<K, InMemoryState>,
    /// Approximate (racy by a few under contention; `max` is then exceeded by at most the
    /// number of threads inserting at once).
    len: AtomicUsize,
    max: usize,
    overflow: InMemoryState,
}

impl<K: Hash + Eq + Clone> BoundedStore<K> {
    pub(crate) fn new(max: usize) -> Self {
        BoundedStore {
            map: DashMap::new(),
            len: AtomicUsize::new(0),
            max,
            overflow: InMemoryState::default(),
        }
    }
}

/// The theoretical arrival time stored in `state`, read without changing it (governor's
/// own reader is private: an `Err` from the closure leaves the state as it is).
fn tat(state: &InMemoryState) -> Option<Nanos> {
    match state.measure_and_replace(&NotKeyed::NonKey, Err::<((), Nanos), _>) {
        Err(t) => t,
        Ok(()) => None,
    }
}

impl<K: Hash + Eq + Clone> StateStore for BoundedStore<K> {
    type Key = K;

    fn measure_and_replace<T, F, E>(&self, key: &K, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        if let Some(v) = self.map.get(key) {
            return v.measure_and_replace(&NotKeyed::NonKey, f);
        }
        if self.len.load(Ordering::Relaxed) >= self.max {
            return self.overflow.measure_and_replace(&NotKeyed::NonKey, f);
        }
        let entry = self.map.entry(key.clone()).or_insert_with(|| {
            self.len.fetch_add(1, Ordering::Relaxed);
            InMemoryState::default()
        });
        entry.measure_and_replace(&NotKeyed::NonKey, f)
    }
}

impl<K: Hash + Eq + Clone> ShrinkableKeyedStateStore<K> for BoundedStore<K> {
    fn retain_recent(&self, drop_below: Nanos) {
        // A key whose arrival time is at or before `drop_below` is indistinguishable from
        // a fresh one: dropping it changes no decision.
        self.map.retain(|_, v| {
            let keep = tat(v).is_some_and(|t| t > drop_below);
            if !keep {
                self.len.fetch_sub(1, Ordering::Relaxed);
            }
            keep
        });
    }

    fn shrink_to_fit(&self) {
        self.map.shrink_to_fit();
    }

    fn len(&self) -> usize {
        self.map.len()
    }

    fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}
