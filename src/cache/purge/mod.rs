//! Fleet purge: `PURGE` by key, prefix or surrogate key, fanned out to every edge node,
//! with a purge log so a node that was down catches up.
//!
//! **The problem.** New content must replace the old one *everywhere* at once: a
//! `PURGE` that reaches one edge node leaves every other node serving the old object, a
//! release touches hundreds of URLs (`/images/*`, everything tagged `product-42`), and a
//! node that was down or cut off during the purge comes back with the old object still
//! stored (a disk tier survives a restart).
//!
//! - **Targets**: `PURGE /a` removes one key; `PURGE /images/*` (a key ending in `*`)
//!   every key with that prefix (its `Vary` variants too); `PURGE /` with
//!   `Surrogate-Key: a b` (or `Cache-Tag: a,b`) every entry stored with one of those tags
//!   in its response's `Surrogate-Key`/`Cache-Tag` — found through a bounded index built
//!   at store time.
//! - **Fan-out**: with a [`Fleet`], a client's `PURGE` is applied here and sent to
//!   every other instance the registry lists, each within the peer timeout,
//!   carrying `x-purge-origin` (the hop guard: a node never fans out a purge that has it)
//!   and the fleet's bearer token. The answer is JSON, node id → status.
//! - **Catch-up**: every node logs every purge it applied (`purge/log.rs` says why a
//!   log and not a TTL-bounded memory); a node that was away asks its peers for what it
//!   missed ([`CacheLayer::catch_up`](super::CacheLayer::catch_up)).

mod auth;
mod catchup;
mod handle;
pub(crate) mod index;
pub(crate) mod log;

pub use catchup::CatchUp;
pub(crate) use catchup::{catch_up, catch_up_every};
pub(crate) use handle::handle;

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Duration;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use tokio::time::Instant;

use super::fleet::Fleet;
use super::layer::Config;
use index::TagIndex;
use log::PurgeLog;

/// Hop guard of a fanned-out purge: the purge's origin id (`<boot>-<seq>`). A node
/// applies such a purge once and never fans it out again.
pub const X_PURGE_ORIGIN: &str = "x-purge-origin";
/// Asks a node for its purge log after `<boot>-<seq>` (or `-`: all of it); see
/// [`CacheLayer::catch_up`](super::CacheLayer::catch_up).
pub const X_PURGE_LOG_SINCE: &str = "x-purge-log-since";

/// Largest catch-up page read from a peer: a page holds about `log::PAGE_BYTES` (one
/// record more at most, and a record is bounded by the request-line limit); this bounds
/// what we buffer whatever the peer sends.
pub(super) const MAX_PAGE_BYTES: usize = 4 << 20;
/// Largest origin id accepted in `x-purge-origin`.
pub(super) const MAX_ORIGIN_LEN: usize = 64;

/// What a purge removes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Target {
    /// One key (as the key function makes it).
    Key(String),
    /// Every key starting with this.
    Prefix(String),
    /// Every entry carrying one of these surrogate keys ([`index::escape`]d).
    Tags(Vec<String>),
}

impl Target {
    pub(crate) fn len(&self) -> usize {
        match self {
            Target::Key(s) | Target::Prefix(s) => s.len(),
            Target::Tags(t) => t.iter().map(|t| t.len() + 1).sum(),
        }
    }

    /// `k <key>`, `p <prefix>` or `t <tag> <tag>...`, escaped (see [`log`]).
    pub(crate) fn encode(&self) -> String {
        match self {
            Target::Key(k) => format!("k {}", wire_escape(k)),
            Target::Prefix(p) => format!("p {}", wire_escape(p)),
            Target::Tags(t) => {
                let t: Vec<String> = t.iter().map(|t| wire_escape(t)).collect();
                format!("t {}", t.join(" "))
            }
        }
    }

    pub(crate) fn decode(s: &str) -> Option<Target> {
        let (kind, rest) = s.split_once(' ').unwrap_or((s, ""));
        match kind {
            "k" => Some(Target::Key(wire_unescape(rest)?)),
            "p" => Some(Target::Prefix(wire_unescape(rest)?)),
            "t" => {
                let tags = rest
                    .split(' ')
                    .filter(|t| !t.is_empty())
                    .map(wire_unescape)
                    .collect::<Option<Vec<_>>>()?;
                (!tags.is_empty()).then_some(Target::Tags(tags))
            }
            _ => None,
        }
    }

    /// What a `PURGE` request asks for: the tags of its `Surrogate-Key`/`Cache-Tag`, else
    /// its key, a prefix when the key ends in `*`.
    fn of(parts: &http::request::Parts, cfg: &Config) -> Result<Target, &'static str> {
        if index::TAG_HEADERS
            .iter()
            .any(|h| parts.headers.contains_key(*h))
        {
            let tags = index::tags(&parts.headers);
            if tags.is_empty() {
                return Err("empty surrogate key\n");
            }
            return Ok(Target::Tags(tags));
        }
        let key = (cfg.key)(parts);
        Ok(match key.strip_suffix('*') {
            Some(prefix) => Target::Prefix(prefix.to_owned()),
            None => Target::Key(key),
        })
    }
}

/// Bytes outside visible ASCII, `%` and space as `%XX`.
fn wire_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_graphic() && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn wire_unescape(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The fleet-purge state of one cache layer.
#[derive(Debug)]
pub(crate) struct Purger {
    pub(crate) index: Arc<TagIndex>,
    pub(crate) log: PurgeLog,
    /// Per peer id: the (boot, seq) of its log we have read up to.
    cursors: Mutex<HashMap<String, (u64, u64)>>,
    /// Held by a running catch-up (one at a time).
    catching_up: tokio::sync::Mutex<()>,
    /// The purges applied here in the last [`RECENT_WINDOW`] (at most [`RECENT_MAX`]),
    /// with when: a sibling's copy older than a matching one is refused.
    recent: Mutex<VecDeque<(Instant, Target)>>,
    pub(crate) fleet: Option<Fleet>,
}

impl Purger {
    pub(crate) fn new(index: Arc<TagIndex>, log_bytes: usize, fleet: Option<Fleet>) -> Self {
        Purger {
            index,
            log: PurgeLog::new(log_bytes),
            cursors: Mutex::default(),
            catching_up: tokio::sync::Mutex::new(()),
            recent: Mutex::default(),
            fleet,
        }
    }
}

/// How long a purge is remembered to judge sibling answers: the time every peer has to
/// apply it (fan-out takes at most the peer timeout; a node back from an outage should
/// catch up before it serves).
pub(crate) const RECENT_WINDOW: Duration = Duration::from_secs(60);
/// At most this many recent purges are remembered (a burst beyond it: the oldest go).
const RECENT_MAX: usize = 4096;

impl Purger {
    fn remember(&self, target: &Target) {
        let now = Instant::now();
        let mut r = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        while r
            .front()
            .is_some_and(|(t, _)| now.saturating_duration_since(*t) > RECENT_WINDOW)
            || r.len() >= RECENT_MAX
        {
            r.pop_front();
        }
        r.push_back((now, target.clone()));
    }

    /// Whether a copy of `key` with response `headers`, which a sibling says is `age`
    /// old, may predate a purge applied here: then it must not be taken — the sibling
    /// may not have applied that purge yet, and storing its copy would undo it.
    pub(crate) fn sibling_copy_is_purged(
        &self,
        key: &str,
        headers: &http::HeaderMap,
        age: Option<Duration>,
    ) -> bool {
        let r = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        if r.is_empty() {
            return false;
        }
        // `Age` counts whole seconds: the copy may be up to a second older than it says.
        // Unreadable: as old as can be.
        let stored =
            age.and_then(|a| Instant::now().checked_sub(a.saturating_add(Duration::from_secs(1))));
        let tags = index::tags(headers);
        r.iter().any(|(at, target)| {
            stored.is_none_or(|s| s <= *at)
                && match target {
                    Target::Key(k) => k == key,
                    Target::Prefix(p) => key.starts_with(p.as_str()),
                    Target::Tags(t) => t.iter().any(|t| tags.contains(t)),
                }
        })
    }
}

/// Removes what `target` names from the store; `None` when the store cannot do it (no
/// `Store::remove_where`).
pub(crate) fn apply(cfg: &Config, target: &Target) -> Option<u64> {
    cfg.purger.remember(target);
    let n = match target {
        Target::Key(k) => Some(u64::from(cfg.store.remove(k))),
        Target::Prefix(p) => cfg
            .store
            .remove_where(&mut |k, _| k.starts_with(p.as_str())),
        Target::Tags(t) => cfg.purger.index.purge(&*cfg.store, t),
    }?;
    cfg.stats.purges.fetch_add(n, Ordering::Relaxed);
    tracing::info!(target = %target.encode(), removed = n, "cache purge");
    Some(n)
}

/// Applies many purges at once (a catch-up): exact keys one by one, every prefix and tag
/// in a single pass over the store — a node back from a long absence may have thousands
/// to apply, and one scan each would hold the store's lock thousands of times.
pub(super) fn apply_batch(cfg: &Config, targets: &[&Target]) {
    let mut prefixes: Vec<&str> = Vec::new();
    let mut tags: Vec<String> = Vec::new();
    let mut n = 0u64;
    for t in targets {
        cfg.purger.remember(t);
        match t {
            Target::Key(k) => n += u64::from(cfg.store.remove(k)),
            Target::Prefix(p) => prefixes.push(p),
            Target::Tags(t) => tags.extend(t.iter().cloned()),
        }
    }
    if prefixes.is_empty() && !tags.is_empty() {
        n += cfg.purger.index.purge(&*cfg.store, &tags).unwrap_or(0);
    } else if !prefixes.is_empty() {
        let tags: HashSet<&str> = tags.iter().map(String::as_str).collect();
        let scanned = cfg.store.remove_where(&mut |key, entry| {
            prefixes.iter().any(|p| key.starts_with(p))
                || (!tags.is_empty()
                    && index::tags(&entry.headers)
                        .iter()
                        .any(|t| tags.contains(t.as_str())))
        });
        n += scanned.unwrap_or_else(|| {
            tracing::error!("purge catch-up: the store cannot purge by prefix or tag");
            0
        });
    }
    cfg.stats.purges.fetch_add(n, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_sibling_copy_older_than_a_recent_purge_is_refused() {
        let p = Purger::new(Arc::new(TagIndex::new(1 << 20)), 1 << 20, None);
        let h = http::HeaderMap::new();
        let secs = |n| Some(Duration::from_secs(n));
        assert!(
            !p.sibling_copy_is_purged("h/a", &h, secs(0)),
            "no purge yet"
        );
        tokio::time::advance(Duration::from_secs(10)).await;
        p.remember(&Target::Key("h/a".into()));
        p.remember(&Target::Prefix("h/img/".into()));
        p.remember(&Target::Tags(vec!["t1".into()]));
        tokio::time::advance(Duration::from_secs(5)).await;
        // Stored 6 s ago (5 + the second `Age` may hide): before the purge.
        assert!(p.sibling_copy_is_purged("h/a", &h, secs(5)));
        assert!(p.sibling_copy_is_purged("h/img/x", &h, secs(9)));
        assert!(
            p.sibling_copy_is_purged("h/a", &h, None),
            "unknown age: old"
        );
        // Stored after the purge, or another key: taken.
        assert!(!p.sibling_copy_is_purged("h/a", &h, secs(3)));
        assert!(!p.sibling_copy_is_purged("h/b", &h, secs(9)));
        let mut tagged = http::HeaderMap::new();
        tagged.insert("cache-tag", http::HeaderValue::from_static("t0,t1"));
        assert!(p.sibling_copy_is_purged("h/b", &tagged, secs(9)));
        // Past the window the purge is forgotten (every peer has applied it by then).
        tokio::time::advance(RECENT_WINDOW).await;
        p.remember(&Target::Key("h/other".into()));
        assert!(!p.sibling_copy_is_purged("h/a", &h, secs(100)));
    }

    #[test]
    fn targets_round_trip_on_the_wire() {
        for t in [
            Target::Key("h/a b%c\u{e9}".into()),
            Target::Prefix("h/img/".into()),
            Target::Tags(vec!["a".into(), "caf%C3%A9".into()]),
        ] {
            assert_eq!(Target::decode(&t.encode()), Some(t));
        }
        for bad in ["", "x y", "k %zz", "k %c3", "t "] {
            assert_eq!(Target::decode(bad), None, "{bad:?}");
        }
    }
}
