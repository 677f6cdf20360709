//! The immutable per-membership snapshot the pickers run on, and the picking itself.
//!
//! A [`Snapshot`] is built once per membership change (off the request path) and swapped in
//! atomically. Everything a picker needs per request is precomputed in it: the smooth
//! weighted round-robin schedule, the hash ring, the id index for sticky cookies. The only
//! mutable state on the pick path is atomics.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use super::endpoint::{Admission, Clock, Endpoint};
use super::hash::{fast_rand, mix};
use super::picker::Picker;
use crate::gate::Gate;
use crate::stripe::{bump, default_cells, my_cell, total_cells, Padded};

/// Why no endpoint could be picked.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Miss {
    pub(crate) total: usize,
    pub(crate) ejected: usize,
    pub(crate) refused: usize,
}

/// An admitted endpoint: its index in the snapshot, its gate permit, and whether this
/// request holds the endpoint's single trial after an ejection (see
/// [`Endpoint::admission`]); a trial must be reported or released.
pub(crate) struct Picked<P> {
    pub(crate) index: usize,
    pub(crate) permit: P,
    pub(crate) trial: bool,
}

/// Upper bound on `schedule length x endpoints` work when building an SWRR schedule.
const SWRR_BUILD_BUDGET: u64 = 20_000_000;
/// Ring points per unit of weight (ketama uses 160).
const RING_POINTS: u32 = 160;
/// Weights above this are clamped for the ring only.
const RING_MAX_WEIGHT: u32 = 100;

pub(crate) struct Snapshot<K, S, G> {
    pub(crate) endpoints: Vec<Arc<Endpoint<K, S, G>>>,
    by_id: HashMap<u64, usize>,
    /// Round-robin positions, one per thread (see [`crate::stripe`]): one shared counter
    /// made every pick a contended read-modify-write, so two threads picked no faster than
    /// one. Each thread walks the rotation on its own, all from position 0 (as each nginx
    /// worker does); over many requests every endpoint still gets its share.
    rr: Box<[Padded]>,
    rr_exclusive: usize,
    /// SWRR schedule: endpoint indices in nginx order for one period.
    schedule: Vec<u32>,
    /// Ketama ring: (point, endpoint index), sorted by point.
    ring: Vec<(u64, u32)>,
}

impl<K, S, G> fmt::Debug for Snapshot<K, S, G> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Snapshot")
            .field("endpoints", &self.endpoints.len())
            .finish()
    }
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// nginx's smooth weighted round robin, run for one period. Dividing all weights by their
/// gcd leaves every comparison (and so the sequence) unchanged, and keeps the period short.
pub(crate) fn swrr_schedule(weights: &[u32]) -> Vec<u32> {
    if weights.is_empty() {
        return Vec::new();
    }
    let g = weights.iter().fold(0u64, |g, w| gcd(g, u64::from(*w)));
    let mut w: Vec<i64> = weights
        .iter()
        .map(|x| (u64::from(*x) / g.max(1)) as i64)
        .collect();
    let n = w.len() as u64;
    let mut total: u64 = w.iter().map(|x| *x as u64).sum();
    if total.saturating_mul(n) > SWRR_BUILD_BUDGET {
        // Too long a period to precompute: scale weights down proportionally. The order
        // stays smooth, the ratios become approximate (documented).
        let cap = (SWRR_BUILD_BUDGET / n).max(n);
        for x in &mut w {
            *x = ((*x as u64 * cap) / total).max(1) as i64;
        }
        total = w.iter().map(|x| *x as u64).sum();
    }
    let total_i = total as i64;
    let mut current = vec![0i64; w.len()];
    let mut out = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0usize;
        for i in 0..w.len() {
            current[i] += w[i];
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total_i;
        out.push(best as u32);
    }
    out
}

pub(crate) fn build_ring(ids: &[(u64, u32)]) -> Vec<(u64, u32)> {
    let mut ring = Vec::new();
    for (idx, (id, weight)) in ids.iter().enumerate() {
        let points = RING_POINTS * (*weight).clamp(1, RING_MAX_WEIGHT);
        for p in 0..points {
            ring.push((mix(id ^ mix(u64::from(p) + 1)), idx as u32));
        }
    }
    ring.sort_unstable();
    ring
}

/// In-flight requests below which round robin never skips an endpoint for load (see
/// `Snapshot::overloaded`): light load keeps the pick at one relaxed load.
const BOUNDED_LOAD_MIN: usize = 4;

impl<K, S, G: Gate> Snapshot<K, S, G> {
    pub(crate) fn new(endpoints: Vec<Arc<Endpoint<K, S, G>>>, picker: &Picker) -> Self {
        let by_id = endpoints
            .iter()
            .enumerate()
            .map(|(i, e)| (e.id, i))
            .collect();
        let schedule = match picker {
            Picker::WeightedRoundRobin => {
                swrr_schedule(&endpoints.iter().map(|e| e.weight).collect::<Vec<_>>())
            }
            _ => Vec::new(),
        };
        let ring = match picker {
            Picker::ConsistentHash(_) => build_ring(
                &endpoints
                    .iter()
                    .map(|e| (e.id, e.weight))
                    .collect::<Vec<_>>(),
            ),
            _ => Vec::new(),
        };
        Snapshot {
            endpoints,
            by_id,
            rr: (0..total_cells(default_cells()))
                .map(|_| Padded::default())
                .collect(),
            rr_exclusive: default_cells(),
            schedule,
            ring,
        }
    }

    /// This thread's next round-robin position.
    #[inline]
    fn next_rr(&self) -> usize {
        let (i, exclusive) = my_cell(self.rr_exclusive);
        bump(&self.rr[i].0, 1, exclusive).wrapping_sub(1) as usize
    }

    pub(crate) fn index_of(&self, id: u64) -> Option<usize> {
        self.by_id.get(&id).copied()
    }

    /// Tries to admit endpoint `i`: not already tried, not ejected, gate open. May take
    /// the endpoint's single trial (then `trial` is set).
    #[inline]
    pub(crate) fn admit(&self, i: usize, clock: &Clock, tried: &[u64]) -> Option<Picked<G::Permit>>
    where
        K: fmt::Debug,
    {
        let e = &self.endpoints[i];
        if !tried.is_empty() && tried.contains(&e.id) {
            return None;
        }
        let trial = match e.admission(clock) {
            Admission::Open => false,
            Admission::Closed => return None,
            Admission::Trial => true,
        };
        match e.gate.try_acquire() {
            Some(permit) => Some(Picked {
                index: i,
                permit,
                trial,
            }),
            None => {
                if trial {
                    e.release_trial();
                }
                None
            }
        }
    }

    /// Picks with `picker`; `key` is the request's hash for consistent hashing.
    pub(crate) fn pick(
        &self,
        picker: &Picker,
        key: Option<u64>,
        clock: &Clock,
        tried: &[u64],
    ) -> Result<Picked<G::Permit>, Miss>
    where
        K: fmt::Debug,
    {
        let n = self.endpoints.len();
        if n == 0 {
            return Err(Miss::default());
        }
        match picker {
            Picker::RoundRobin => {}
            Picker::WeightedRoundRobin => {
                let len = self.schedule.len();
                if len > 0 {
                    // An unavailable endpoint's turn is consumed (a fresh position is
                    // drawn), not handed to its neighbour in the schedule: the survivors
                    // keep their relative shares (issue 10, item 15). Bounded, then a scan.
                    for _ in 0..len.min(64) {
                        let pos = self.next_rr();
                        let i = self.schedule[pos % len] as usize;
                        if let Some(p) = self.admit(i, clock, tried) {
                            return Ok(p);
                        }
                    }
                }
                return self.scan(fast_rand() as usize, clock, tried);
            }
            Picker::LeastPending => {
                if n == 1 {
                    return self.scan(0, clock, tried);
                }
                let r = fast_rand();
                let a = (r as usize) % n;
                let mut b = ((r >> 32) as usize) % (n - 1);
                if b >= a {
                    b += 1;
                }
                let (ea, eb) = (&self.endpoints[a], &self.endpoints[b]);
                // Compare in_flight/weight without division.
                let la = ea.in_flight.load(Relaxed) as u64 * u64::from(eb.weight);
                let lb = eb.in_flight.load(Relaxed) as u64 * u64::from(ea.weight);
                let (first, second) = if lb < la { (b, a) } else { (a, b) };
                if let Some(p) = self.admit(first, clock, tried) {
                    return Ok(p);
                }
                if let Some(p) = self.admit(second, clock, tried) {
                    return Ok(p);
                }
                return self.scan(r.rotate_left(17) as usize, clock, tried);
            }
            Picker::ConsistentHash(_) => {
                if let Some(h) = key {
                    if !self.ring.is_empty() {
                        return self.ring_pick(h, clock, tried);
                    }
                }
            }
        }
        self.round_robin(clock, tried)
    }

    /// Round robin over the endpoints that are available now. A skipped endpoint's turn is
    /// consumed by drawing the next position, instead of walking on to its neighbour:
    /// walking would give the neighbour of an ejected endpoint two turns out of three
    /// (~50 % with one of three ejected), where nginx splits evenly among the survivors.
    /// At most `n` draws, then a scan that also counts why nothing was available.
    fn round_robin(&self, clock: &Clock, tried: &[u64]) -> Result<Picked<G::Permit>, Miss>
    where
        K: fmt::Debug,
    {
        let n = self.endpoints.len();
        let mut start = 0;
        for k in 0..n {
            let pos = self.next_rr();
            if k == 0 {
                start = pos;
            }
            if self.overloaded(pos % n) {
                continue;
            }
            if let Some(p) = self.admit(pos % n, clock, tried) {
                return Ok(p);
            }
        }
        // Every draw refused or overloaded: the scan ignores load, so an overloaded
        // endpoint still serves when it is the only one left.
        self.scan(start, clock, tried)
    }

    /// Round robin with bounded load (the idea of Mirrokni et al.'s consistent hashing
    /// with bounded loads, factor 2): an endpoint holding more requests in flight than
    /// twice the mean of the others, plus one, loses its turn. A backend that accepts
    /// requests and never answers (SIGSTOP, deadlock, GC pause) collects in-flight requests
    /// until its per-try timeout fires; without this bound, closed-loop keep-alive clients
    /// all end up waiting on it and throughput drops to zero for that whole timeout. With
    /// balanced load nothing is skipped, so the rotation stays plain round robin. Below
    /// `BOUNDED_LOAD_MIN` requests in flight the check costs one relaxed load.
    #[inline]
    fn overloaded(&self, i: usize) -> bool {
        let n = self.endpoints.len();
        let mine = self.endpoints[i].in_flight.load(Relaxed);
        if mine < BOUNDED_LOAD_MIN || n < 2 {
            return false;
        }
        let total: usize = self
            .endpoints
            .iter()
            .map(|e| e.in_flight.load(Relaxed))
            .fold(0usize, usize::saturating_add);
        let others = total.saturating_sub(mine);
        // mine > 2 * others / (n - 1) + 1, without division.
        mine.saturating_mul(n - 1) > others.saturating_mul(2).saturating_add(n - 1)
    }

    /// Walks the ring clockwise from `h` to the first admissible endpoint.
    fn ring_pick(&self, h: u64, clock: &Clock, tried: &[u64]) -> Result<Picked<G::Permit>, Miss>
    where
        K: fmt::Debug,
    {
        let len = self.ring.len();
        let start = self.ring.partition_point(|p| p.0 < h);
        let mut last = usize::MAX;
        let mut seen = 0usize;
        for step in 0..len {
            let i = self.ring[(start + step) % len].1 as usize;
            if i == last {
                continue;
            }
            last = i;
            if let Some(p) = self.admit(i, clock, tried) {
                return Ok(p);
            }
            seen += 1;
            if seen > 2 * self.endpoints.len() {
                break;
            }
        }
        self.scan(start, clock, tried)
    }

    /// Every endpoint once from `start`; counts why each was refused.
    pub(crate) fn scan(
        &self,
        start: usize,
        clock: &Clock,
        tried: &[u64],
    ) -> Result<Picked<G::Permit>, Miss>
    where
        K: fmt::Debug,
    {
        let n = self.endpoints.len();
        let mut miss = Miss {
            total: n,
            ..Miss::default()
        };
        for k in 0..n {
            let i = (start.wrapping_add(k)) % n;
            let e = &self.endpoints[i];
            if tried.contains(&e.id) {
                continue;
            }
            let trial = match e.admission(clock) {
                Admission::Open => false,
                Admission::Closed => {
                    miss.ejected += 1;
                    continue;
                }
                Admission::Trial => true,
            };
            match e.gate.try_acquire() {
                Some(permit) => {
                    return Ok(Picked {
                        index: i,
                        permit,
                        trial,
                    })
                }
                None => {
                    if trial {
                        e.release_trial();
                    }
                    miss.refused += 1
                }
            }
        }
        Err(miss)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn swrr_matches_nginx() {
        let s = swrr_schedule(&[5, 1, 1]);
        let names: String = s.iter().map(|i| (b'a' + *i as u8) as char).collect();
        assert_eq!(names, "aabacaa");
        // Scaling weights keeps the sequence.
        assert_eq!(swrr_schedule(&[10, 2, 2]), s);
        assert_eq!(swrr_schedule(&[1, 1]), vec![0, 1]);
    }

    #[test]
    fn huge_weights_are_scaled() {
        let s = swrr_schedule(&[u32::MAX, 1, 7]);
        assert!(!s.is_empty() && s.len() <= 20_000_000);
    }

    #[test]
    fn bounded_load_skips_only_an_endpoint_far_above_the_others() {
        use crate::gate::NoGate;
        let eps: Vec<_> = (0..3u64)
            .map(|i| Arc::new(Endpoint::new(i, i, 1, (), NoGate, None)))
            .collect();
        let snap = Snapshot::new(eps.clone(), &Picker::RoundRobin);
        let set = |loads: [usize; 3]| {
            for (e, l) in eps.iter().zip(loads) {
                e.in_flight.store(l, Relaxed);
            }
        };
        // Light load: never skipped, whatever the spread.
        set([3, 0, 0]);
        assert!(!snap.overloaded(0));
        // Balanced load: round robin stays plain.
        set([40, 40, 40]);
        assert!(!(0..3).any(|i| snap.overloaded(i)));
        // A hung endpoint collecting requests: skipped past 2x the others' mean + 1.
        set([5, 3, 2]); // 5 <= 2 * 2.5 + 1
        assert!(!snap.overloaded(0));
        set([7, 3, 2]); // 7 > 2 * 2.5 + 1
        assert!(snap.overloaded(0));
        assert!(!snap.overloaded(1));
        // Extreme counts saturate instead of overflowing.
        set([usize::MAX, usize::MAX, 1]);
        let _ = snap.overloaded(0);
    }
}
