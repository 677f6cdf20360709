//! The status part of a [`Condition`](super::Condition): whole classes as bits, exact
//! statuses as a short sorted list.
//!
//! A classifier is copied into every request's response future (the balancer, the breaker,
//! the metrics layer each hold one per request), so its size is paid on every move of
//! that future. Two 900-bit sets (fail and ignore) made a condition 264 bytes, although
//! nearly every real condition is a class or two (`5xx`) plus at most a few exact statuses
//! (`404`, `!503`). Here a class is one bit, up to [`INLINE`] exact statuses sit inline,
//! and only a longer list goes behind an `Arc` (shared by clones, one reference-count
//! round trip per copy): the whole set is 24 bytes and stays exact for any set of statuses.

use std::sync::Arc;

/// Marks an *ignored* status in the list (statuses are 100..=999, far below this bit), so
/// fail and ignore entries share one sorted list: fail entries first, ignore entries after.
const IGNORE: u16 = 0x8000;

/// Exact statuses held without an allocation. Four covers `404,5xx,!503`-style conditions
/// with room to spare and fills the 8 bytes beside the `Arc` pointer's niche.
pub(super) const INLINE: usize = 4;

/// The exact entries: sorted ascending, no duplicates; inline while they fit (unused
/// slots are 0, never a status), shared otherwise. Canonical, so `==` is set equality.
#[derive(Clone, PartialEq, Eq)]
enum Exact {
    Inline([u16; INLINE]),
    Shared(Arc<[u16]>),
}

/// Failure classes, exact failure statuses and ignored statuses.
#[derive(Clone, PartialEq, Eq)]
pub(super) struct Statuses {
    /// Bit `c` (1..=9): every status `c00..=c99` is a failure.
    classes: u16,
    exact: Exact,
}

impl Default for Statuses {
    fn default() -> Self {
        Statuses {
            classes: 0,
            exact: Exact::Inline([0; INLINE]),
        }
    }
}

/// How one status is listed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Listed {
    /// Ignored (wins over a failure).
    Ignored,
    /// A failure (its class or the exact status).
    Failure,
    /// Neither.
    No,
}

fn class_of(code: u16) -> u16 {
    code / 100
}

impl Statuses {
    fn entries(&self) -> &[u16] {
        match &self.exact {
            Exact::Inline(a) => {
                let n = a.iter().take_while(|c| **c != 0).count();
                &a[..n]
            }
            Exact::Shared(v) => v,
        }
    }

    /// How `code` is listed. The common conditions (classes only) answer from one bit.
    #[inline]
    pub(super) fn lookup(&self, code: u16) -> Listed {
        let (fail, ignore) = match &self.exact {
            Exact::Inline(a) => {
                if a[0] == 0 {
                    (false, false)
                } else {
                    (a.contains(&code), a.contains(&(code | IGNORE)))
                }
            }
            Exact::Shared(v) => (
                v.binary_search(&code).is_ok(),
                v.binary_search(&(code | IGNORE)).is_ok(),
            ),
        };
        if ignore {
            Listed::Ignored
        } else if fail || (code < 1000 && self.classes & (1 << class_of(code)) != 0) {
            Listed::Failure
        } else {
            Listed::No
        }
    }

    /// Rebuilds the canonical form from `classes` and any list of entries: fail entries
    /// under a failing class are dropped (the class says it), and a class whose 100
    /// statuses are all listed becomes its bit, so equal sets compare equal however they
    /// were built.
    fn canonical(mut classes: u16, mut entries: Vec<u16>) -> Self {
        entries.sort_unstable();
        entries.dedup();
        for class in 1..=9u16 {
            if classes & (1 << class) != 0 {
                continue;
            }
            let in_class = entries
                .iter()
                .filter(|e| **e & IGNORE == 0 && class_of(**e) == class)
                .count();
            if in_class == 100 {
                classes |= 1 << class;
            }
        }
        entries.retain(|e| *e & IGNORE != 0 || classes & (1 << class_of(*e)) == 0);
        let exact = if entries.len() <= INLINE {
            let mut a = [0; INLINE];
            a[..entries.len()].copy_from_slice(&entries);
            Exact::Inline(a)
        } else {
            Exact::Shared(entries.into())
        };
        Statuses { classes, exact }
    }

    fn with(&self, extra: impl IntoIterator<Item = u16>) -> Self {
        let mut entries = self.entries().to_vec();
        entries.extend(extra);
        Self::canonical(self.classes, entries)
    }

    /// `code` (100..=999) is a failure.
    pub(super) fn insert_fail(&mut self, code: u16) {
        if self.lookup_fail(code) {
            return;
        }
        *self = self.with([code]);
    }

    /// `code` (100..=999) is ignored.
    pub(super) fn insert_ignore(&mut self, code: u16) {
        if self.lookup(code) == Listed::Ignored {
            return;
        }
        *self = self.with([code | IGNORE]);
    }

    /// Every status of `class` (1..=9) is a failure.
    pub(super) fn insert_class(&mut self, class: u16) {
        if (1..=9).contains(&class) && self.classes & (1 << class) == 0 {
            *self = Self::canonical(self.classes | 1 << class, self.entries().to_vec());
        }
    }

    /// The union of both sets.
    pub(super) fn union(&self, other: &Statuses) -> Self {
        let mut entries = self.entries().to_vec();
        entries.extend_from_slice(other.entries());
        Self::canonical(self.classes | other.classes, entries)
    }

    fn lookup_fail(&self, code: u16) -> bool {
        (code < 1000 && self.classes & (1 << class_of(code)) != 0) || self.entries().contains(&code)
    }

    /// `true` when no status is a failure (ignored statuses alone match nothing).
    pub(super) fn no_failures(&self) -> bool {
        self.classes == 0 && self.entries().first().is_none_or(|e| e & IGNORE != 0)
    }

    /// The failing classes, ascending.
    pub(super) fn classes(&self) -> impl Iterator<Item = u16> + '_ {
        (1..=9u16).filter(|c| self.classes & (1 << c) != 0)
    }

    /// The exact failure statuses outside the failing classes, ascending.
    pub(super) fn exact_failures(&self) -> impl Iterator<Item = u16> + '_ {
        self.entries().iter().copied().filter(|e| e & IGNORE == 0)
    }

    /// The ignored statuses, ascending.
    pub(super) fn ignored(&self) -> impl Iterator<Item = u16> + '_ {
        self.entries()
            .iter()
            .filter(|e| **e & IGNORE != 0)
            .map(|e| e & !IGNORE)
    }

    #[cfg(test)]
    fn is_inline(&self) -> bool {
        matches!(self.exact, Exact::Inline(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fails(codes: &[u16]) -> Statuses {
        let mut s = Statuses::default();
        for c in codes {
            s.insert_fail(*c);
        }
        s
    }

    #[test]
    fn empty_lists_nothing() {
        let s = Statuses::default();
        assert!(s.no_failures());
        for code in [100, 200, 404, 500, 999] {
            assert_eq!(s.lookup(code), Listed::No);
        }
    }

    #[test]
    fn a_class_is_one_bit_and_exact() {
        let mut s = Statuses::default();
        s.insert_class(5);
        assert!(s.is_inline() && s.entries().is_empty());
        assert_eq!(s.lookup(500), Listed::Failure);
        assert_eq!(s.lookup(599), Listed::Failure);
        assert_eq!(s.lookup(499), Listed::No);
        assert_eq!(s.lookup(600), Listed::No);
        // Out-of-range classes change nothing.
        let before = s.clone();
        s.insert_class(0);
        s.insert_class(10);
        assert!(s == before);
    }

    #[test]
    fn exact_statuses_in_and_out_of_a_class() {
        // An exact status inside a failing class is the class's already: not listed twice,
        // in either order.
        let mut a = Statuses::default();
        a.insert_fail(503);
        a.insert_class(5);
        let mut b = Statuses::default();
        b.insert_class(5);
        b.insert_fail(503);
        assert!(a == b && a.entries().is_empty());
        // Outside the class it is its own entry.
        a.insert_fail(404);
        assert_eq!(a.lookup(404), Listed::Failure);
        assert_eq!(a.lookup(403), Listed::No);
        assert_eq!(a.exact_failures().collect::<Vec<_>>(), [404]);
    }

    #[test]
    fn ignore_wins_over_a_class_and_an_exact_status() {
        let mut s = Statuses::default();
        s.insert_class(5);
        s.insert_fail(404);
        s.insert_ignore(503);
        s.insert_ignore(404);
        assert_eq!(s.lookup(503), Listed::Ignored);
        assert_eq!(s.lookup(404), Listed::Ignored);
        assert_eq!(s.lookup(502), Listed::Failure);
        assert_eq!(s.ignored().collect::<Vec<_>>(), [404, 503]);
        // Ignoring alone is no failure.
        let mut only = Statuses::default();
        only.insert_ignore(503);
        assert!(only.no_failures());
    }

    #[test]
    fn long_lists_are_shared_and_stay_exact() {
        let codes: Vec<u16> = (400..=499).step_by(3).chain([999, 100]).collect();
        let s = fails(&codes);
        assert!(!s.is_inline());
        for code in 100..1000 {
            let want = if codes.contains(&code) {
                Listed::Failure
            } else {
                Listed::No
            };
            assert_eq!(s.lookup(code), want, "{code}");
        }
        // Insertion order does not matter: the canonical forms are equal.
        let rev: Vec<u16> = codes.iter().rev().copied().collect();
        assert!(fails(&rev) == s);
        // A clone shares the list.
        let c = s.clone();
        assert!(c == s);
    }

    #[test]
    fn the_inline_limit_is_exact_on_both_sides() {
        let four = fails(&[401, 402, 403, 404]);
        assert!(four.is_inline());
        let five = fails(&[401, 402, 403, 404, 405]);
        assert!(!five.is_inline());
        for code in 400..410 {
            assert_eq!(
                five.lookup(code) == Listed::Failure,
                (401..=405).contains(&code),
                "{code}"
            );
        }
    }

    #[test]
    fn a_whole_class_listed_status_by_status_is_the_class() {
        let all: Vec<u16> = (400..500).collect();
        let s = fails(&all);
        let mut class = Statuses::default();
        class.insert_class(4);
        assert!(s == class);
        assert_eq!(s.classes().collect::<Vec<_>>(), [4]);
    }

    #[test]
    fn union_is_canonical() {
        let mut a = fails(&[404, 502]);
        a.insert_ignore(503);
        let mut b = Statuses::default();
        b.insert_class(5);
        let u = a.union(&b);
        assert_eq!(u.exact_failures().collect::<Vec<_>>(), [404]);
        assert_eq!(u.lookup(503), Listed::Ignored);
        assert_eq!(u.lookup(502), Listed::Failure);
        assert!(u == b.union(&a));
    }

    #[test]
    fn the_set_is_small() {
        assert!(std::mem::size_of::<Statuses>() <= 24);
    }
}
