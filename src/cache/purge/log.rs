//! The purge log: every purge a node applied, numbered, so a node that was down (or cut
//! off) catches up from its peers when it is back.
//!
//! Why a log and not "remember purges for max-TTL and check them on every lookup": an
//! origin may send lifetimes up to 68 years (and `stale-if-error` on top), so a
//! TTL-bounded memory is unbounded in practice, and a per-lookup check costs every hit.
//! The log is bounded by bytes instead, costs nothing on the request path, and a node
//! that finds a gap (its peer dropped records it never saw) empties its store: it fails
//! closed, an extra origin fetch instead of a purged object served.
//!
//! Every node keeps every purge it applied (its own and its peers'), so any one peer that
//! is up can tell a returning node what it missed. Records carry their origin's id
//! (`<boot>-<seq>`, the boot id random per process) so a purge reaching a node twice —
//! by fan-out and again by catch-up — is applied once.
//!
//! Wire format of a catch-up answer (`text/plain`, one record a line):
//! `tower-patterns-purge-log 1 <boot hex> <dropped up to> <last in page> <last seq>` then
//! `<seq> <origin> k|p|t <escaped argument(s)>` (key, prefix, or space-separated tags;
//! bytes outside visible ASCII, `%` and space as `%XX`). A page holds at most
//! [`PAGE_BYTES`] (and at least one record): the asker reads pages until `last in page`
//! reaches `last seq`, so neither side ever buffers a whole log for one request.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use super::Target;

/// First line of a catch-up answer.
const MAGIC: &str = "tower-patterns-purge-log 1";
/// Per-record bytes besides its strings (deque slot, `Arc`, set entry).
const RECORD_OVERHEAD: usize = 96;
/// Most bytes of records in one catch-up page (one record more if a single one is larger).
pub(crate) const PAGE_BYTES: usize = 1 << 20;
/// Default byte bound of the log.
pub(crate) const DEFAULT_LOG_BYTES: usize = 8 << 20;

#[derive(Debug, Clone)]
struct Record {
    seq: u64,
    origin: Arc<str>,
    target: Target,
}

impl Record {
    fn cost(&self) -> usize {
        self.origin.len() + self.target.len() + RECORD_OVERHEAD
    }
}

#[derive(Debug, Default)]
struct Inner {
    last: u64,
    records: VecDeque<Record>,
    seen: HashSet<Arc<str>>,
    bytes: usize,
    /// The highest sequence number dropped to stay in bounds (0: none).
    dropped: u64,
}

/// See the [module docs](self).
#[derive(Debug)]
pub(crate) struct PurgeLog {
    boot: u64,
    max_bytes: usize,
    inner: Mutex<Inner>,
}

/// What a peer's log answer holds.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Page {
    pub(crate) boot: u64,
    pub(crate) dropped: u64,
    /// Sequence number of the page's last record (where the asker's cursor moves).
    pub(crate) until: u64,
    pub(crate) last: u64,
    pub(crate) records: Vec<(Arc<str>, Target)>,
}

impl PurgeLog {
    pub(crate) fn new(max_bytes: usize) -> Self {
        PurgeLog {
            boot: rand::random::<u64>() | 1,
            max_bytes,
            inner: Mutex::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every update leaves the log consistent before it can panic.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// This process's boot id.
    #[cfg(test)]
    pub(crate) fn boot(&self) -> u64 {
        self.boot
    }

    /// Appends a purge received from a client here; returns its origin id.
    pub(crate) fn record_local(&self, target: &Target) -> Arc<str> {
        let mut i = self.lock();
        let origin: Arc<str> = format!("{:016x}-{}", self.boot, i.last + 1).into();
        self.push(&mut i, origin.clone(), target.clone());
        origin
    }

    /// Appends a purge another node originated; `false` if it was applied before.
    pub(crate) fn record_remote(&self, origin: &str, target: &Target) -> bool {
        let mut i = self.lock();
        if i.seen.contains(origin) {
            return false;
        }
        self.push(&mut i, origin.into(), target.clone());
        true
    }

    fn push(&self, i: &mut Inner, origin: Arc<str>, target: Target) {
        i.last += 1;
        let rec = Record {
            seq: i.last,
            origin,
            target,
        };
        i.bytes += rec.cost();
        i.seen.insert(rec.origin.clone());
        i.records.push_back(rec);
        while i.bytes > self.max_bytes {
            let Some(old) = i.records.pop_front() else {
                break;
            };
            i.bytes -= old.cost();
            i.seen.remove(&old.origin);
            i.dropped = old.seq;
        }
    }

    /// The catch-up answer for a peer that saw this log up to `since` (`(boot, seq)`;
    /// another boot or none: from the start).
    pub(crate) fn page(&self, since: Option<(u64, u64)>) -> String {
        let from = match since {
            Some((boot, seq)) if boot == self.boot => seq,
            _ => 0,
        };
        let i = self.lock();
        let mut body = String::new();
        let mut until = from.max(i.dropped).min(i.last);
        // Records are in sequence order: skip to the first one past `from`.
        let start = i.records.partition_point(|r| r.seq <= from);
        for r in i.records.range(start..) {
            if !body.is_empty() && body.len() >= PAGE_BYTES {
                break;
            }
            body.push_str(&format!("{} {} {}\n", r.seq, r.origin, r.target.encode()));
            until = r.seq;
        }
        format!(
            "{MAGIC} {:016x} {} {until} {}\n{body}",
            self.boot, i.dropped, i.last
        )
    }
}

/// Reads a catch-up answer; `None` if it is not one.
pub(crate) fn parse_page(text: &str) -> Option<Page> {
    let mut lines = text.lines();
    let head = lines.next()?.strip_prefix(MAGIC)?;
    let mut h = head.split_ascii_whitespace();
    let boot = u64::from_str_radix(h.next()?, 16).ok()?;
    let dropped = h.next()?.parse().ok()?;
    let until = h.next()?.parse().ok()?;
    let last = h.next()?.parse().ok()?;
    let mut records = Vec::new();
    for line in lines.filter(|l| !l.is_empty()) {
        let mut f = line.splitn(3, ' ');
        let _seq: u64 = f.next()?.parse().ok()?;
        let origin = f.next()?;
        if origin.is_empty() || !origin.bytes().all(|b| b.is_ascii_graphic()) {
            return None;
        }
        let target = Target::decode(f.next()?)?;
        records.push((Arc::from(origin), target));
    }
    Some(Page {
        boot,
        dropped,
        until,
        last,
        records,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_round_trips_and_dedups() {
        let log = PurgeLog::new(DEFAULT_LOG_BYTES);
        let a = log.record_local(&Target::Key("h/a b".into()));
        assert!(log.record_remote("00ff-3", &Target::Tags(vec!["x".into(), "y".into()])));
        assert!(!log.record_remote("00ff-3", &Target::Key("ignored".into())));
        log.record_local(&Target::Prefix("h/img/".into()));
        let page = parse_page(&log.page(None)).unwrap();
        assert_eq!(page.boot, log.boot());
        assert_eq!((page.dropped, page.until, page.last), (0, 3, 3));
        assert_eq!(page.records[0], (a, Target::Key("h/a b".into())));
        assert_eq!(page.records[2].1, Target::Prefix("h/img/".into()));
        let later = parse_page(&log.page(Some((log.boot(), 2)))).unwrap();
        assert_eq!(later.records.len(), 1);
        // Another boot id: everything.
        assert_eq!(
            parse_page(&log.page(Some((7, 2)))).unwrap().records.len(),
            3
        );
    }

    #[test]
    fn the_log_is_bounded_and_says_what_it_dropped() {
        let log = PurgeLog::new(4 * (RECORD_OVERHEAD + 40));
        for n in 0..100 {
            log.record_local(&Target::Key(format!("h/{n}")));
        }
        let page = parse_page(&log.page(None)).unwrap();
        assert!(page.records.len() <= 4);
        assert_eq!((page.until, page.last), (100, 100));
        assert_eq!(page.dropped, 100 - page.records.len() as u64);
    }

    #[test]
    fn pages_are_bounded_and_resume_where_they_stopped() {
        let log = PurgeLog::new(64 << 20);
        let key = "k".repeat(100_000);
        for _ in 0..25 {
            log.record_local(&Target::Key(key.clone()));
        }
        let mut since = None;
        let mut seen = 0;
        for _ in 0..10 {
            let text = log.page(since);
            assert!(text.len() <= PAGE_BYTES + 200_000, "{}", text.len());
            let page = parse_page(&text).unwrap();
            seen += page.records.len();
            since = Some((page.boot, page.until));
            if page.until == page.last {
                break;
            }
        }
        assert_eq!(seen, 25);
        // Up to date: an empty page that says so.
        let page = parse_page(&log.page(since)).unwrap();
        assert_eq!((page.records.len(), page.until, page.last), (0, 25, 25));
    }

    #[test]
    fn garbage_is_not_a_page() {
        for bad in [
            "",
            "hello",
            "tower-patterns-purge-log 1 zz 0 0 0",
            "tower-patterns-purge-log 1 1 0 1",
            "tower-patterns-purge-log 1 1 0 1 1\n1 o q x",
            "tower-patterns-purge-log 1 1 0 1 1\nx o k a",
        ] {
            assert!(parse_page(bad).is_none(), "{bad:?}");
        }
    }
}
