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
//!   at store time ([`index`]).
//! - **Fan-out**: with a [`Fleet`](super::Fleet), a client's `PURGE` is applied here and
//!   sent to every other instance the registry lists, each within the peer timeout,
//!   carrying `x-purge-origin` (the hop guard: a node never fans out a purge that has it)
//!   and the fleet's bearer token. The answer is JSON, node id → status.
//! - **Catch-up**: every node logs every purge it applied ([`log`]); a node that was away
//!   asks its peers for what it missed ([`CacheLayer::catch_up`](super::CacheLayer::catch_up)).

pub(crate) mod index;
pub(crate) mod log;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Limited};

use super::body::CacheBody;
use super::fleet::Fleet;
use super::layer::Config;
use super::service::message;
use index::TagIndex;
use log::PurgeLog;

/// Hop guard of a fanned-out purge: the purge's origin id (`<boot>-<seq>`). A node
/// applies such a purge once and never fans it out again.
pub const X_PURGE_ORIGIN: &str = "x-purge-origin";
/// Asks a node for its purge log after `<boot>-<seq>` (or `-`: all of it); see
/// [`CacheLayer::catch_up`](super::CacheLayer::catch_up).
pub const X_PURGE_LOG_SINCE: &str = "x-purge-log-since";

/// Largest catch-up answer read from a peer (a peer's log is bounded by its own byte
/// budget; this bounds what we buffer whatever the peer sends).
const MAX_PAGE_BYTES: usize = 32 << 20;
/// Largest origin id accepted in `x-purge-origin`.
const MAX_ORIGIN_LEN: usize = 64;

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
        let key = (cfg.key)(&parts);
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
    pub(crate) fleet: Option<Fleet>,
}

impl Purger {
    pub(crate) fn new(index: Arc<TagIndex>, log_bytes: usize, fleet: Option<Fleet>) -> Self {
        Purger {
            index,
            log: PurgeLog::new(log_bytes),
            cursors: Mutex::default(),
            fleet,
        }
    }
}

/// Removes what `target` names from the store; `None` when the store cannot do it (no
/// `Store::remove_where`).
pub(crate) fn apply(cfg: &Config, target: &Target) -> Option<u64> {
    let n = match target {
        Target::Key(k) => Some(u64::from(cfg.store.remove(k))),
        Target::Prefix(p) => cfg.store.remove_where(&mut |k, _| k.starts_with(p.as_str())),
        Target::Tags(t) => cfg.purger.index.purge(&*cfg.store, t),
    }?;
    cfg.stats.purges.fetch_add(n, Ordering::Relaxed);
    tracing::info!(target = %target.encode(), removed = n, "cache purge");
    Some(n)
}

/// Applies many purges at once (a catch-up): exact keys one by one, every prefix and tag
/// in a single pass over the store — a node back from a long absence may have thousands
/// to apply, and one scan each would hold the store's lock thousands of times.
fn apply_batch(cfg: &Config, targets: &[&Target]) {
    let mut prefixes: Vec<&str> = Vec::new();
    let mut tags: Vec<String> = Vec::new();
    let mut n = 0u64;
    for t in targets {
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

fn local_answer<B>(target: &Target, removed: Option<u64>) -> Response<CacheBody<B>> {
    match (target, removed) {
        (_, None) => message(
            StatusCode::NOT_IMPLEMENTED,
            "this store cannot purge by prefix or surrogate key\n",
        ),
        (Target::Key(_), Some(0)) => message(StatusCode::NOT_FOUND, "not cached\n"),
        (Target::Key(_), Some(_)) => message(StatusCode::OK, "purged\n"),
        (_, Some(n)) => text(StatusCode::OK, format!("purged {n}\n"), "text/plain; charset=utf-8"),
    }
}

fn text<B>(status: StatusCode, body: String, ctype: &'static str) -> Response<CacheBody<B>> {
    let mut res = Response::new(CacheBody::bytes(Bytes::from(body)));
    *res.status_mut() = status;
    res.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
    res
}

/// What [`handle`] decided.
pub(crate) enum Handled<B> {
    Now(Response<CacheBody<B>>),
    Later(std::pin::Pin<Box<dyn std::future::Future<Output = Response<CacheBody<B>>> + Send>>),
}

/// An authorised `PURGE`: a catch-up request, a purge fanned out to us, or a client's
/// purge (fanned out when a fleet is configured).
pub(crate) fn handle<B: Send + 'static>(cfg: &Arc<Config>, parts: &http::request::Parts) -> Handled<B> {
    let p = &cfg.purger;
    if let Some(since) = parts.headers.get(X_PURGE_LOG_SINCE) {
        return Handled::Now(match parse_since(since.as_bytes()) {
            Some(since) => text(StatusCode::OK, p.log.page(since), "text/plain; charset=utf-8"),
            None => message(StatusCode::BAD_REQUEST, "bad x-purge-log-since\n"),
        });
    }
    let target = match Target::of(parts, cfg) {
        Ok(t) => t,
        Err(why) => return Handled::Now(message(StatusCode::BAD_REQUEST, why)),
    };
    if let Some(origin) = parts.headers.get(X_PURGE_ORIGIN) {
        let o = origin.as_bytes();
        let Some(origin) = std::str::from_utf8(o)
            .ok()
            .filter(|o| !o.is_empty() && o.len() <= MAX_ORIGIN_LEN)
            .filter(|o| o.bytes().all(|b| b.is_ascii_graphic()))
        else {
            return Handled::Now(message(StatusCode::BAD_REQUEST, "bad x-purge-origin\n"));
        };
        if !p.log.record_remote(origin, &target) {
            return Handled::Now(message(StatusCode::OK, "already applied\n"));
        }
        return Handled::Now(local_answer(&target, apply(cfg, &target)));
    }
    let origin = p.log.record_local(&target);
    let removed = apply(cfg, &target);
    let Some(fleet) = p.fleet.clone() else {
        return Handled::Now(local_answer(&target, removed));
    };
    if removed.is_none() {
        return Handled::Now(local_answer(&target, removed));
    }
    // What the peers need to compute the same target: path, authority, tag headers.
    let mut req = Request::builder()
        .method(Method::from_bytes(b"PURGE").unwrap_or(Method::DELETE))
        .uri(parts.uri.path_and_query().map_or("/", |p| p.as_str()));
    if let Some(host) = parts
        .uri
        .authority()
        .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        .or_else(|| parts.headers.get(header::HOST).cloned())
    {
        req = req.header(header::HOST, host);
    }
    for name in index::TAG_HEADERS {
        for v in parts.headers.get_all(name) {
            req = req.header(name, v.clone());
        }
    }
    let own = local_answer::<B>(&target, removed).status();
    Handled::Later(Box::pin(async move {
        // A node that just started may not have heard from the registry yet.
        fleet.synced(fleet.inner.peer_timeout).await;
        let peers = fleet.peers();
        let sends = peers.iter().map(|peer| {
            let mut r = req_clone(&req);
            if let Some(b) = fleet.bearer() {
                r.headers_mut().insert(header::AUTHORIZATION, b);
            }
            if let Ok(o) = HeaderValue::from_str(&origin) {
                r.headers_mut().insert(X_PURGE_ORIGIN, o);
            }
            let fleet = fleet.clone();
            async move {
                let t = fleet.inner.peer_timeout;
                (peer.id.clone(), fleet.send(peer, r, t).await.map(|r| r.status()))
            }
        });
        let results = futures_util::future::join_all(sends).await;
        let mut all = true;
        let mut json = format!(
            "{{\"origin\":{},\"nodes\":{{{}:{{\"status\":{}}}",
            json_str(&origin),
            json_str(fleet.self_id()),
            own.as_u16()
        );
        for (id, r) in results {
            json.push(',');
            json.push_str(&json_str(&id));
            match r {
                Ok(s) => {
                    all &= s == StatusCode::OK || s == StatusCode::NOT_FOUND;
                    json.push_str(&format!(":{{\"status\":{}}}", s.as_u16()));
                }
                Err(e) => {
                    all = false;
                    tracing::warn!(peer = id, error = %e, "fleet purge: peer did not answer; it catches up from the log");
                    json.push_str(&format!(":{{\"error\":{}}}", json_str(&e.to_string())));
                }
            }
        }
        json.push_str("}}\n");
        // 202: logged here; a node that did not confirm catches up from the log.
        let status = if all { StatusCode::OK } else { StatusCode::ACCEPTED };
        text(status, json, "application/json")
    }))
}

fn req_clone(r: &http::request::Builder) -> Request<Empty<Bytes>> {
    let mut out = Request::new(Empty::new());
    *out.method_mut() = r.method_ref().cloned().unwrap_or_default();
    if let Some(u) = r.uri_ref() {
        *out.uri_mut() = u.clone();
    }
    if let Some(h) = r.headers_ref() {
        *out.headers_mut() = h.clone();
    }
    out
}

/// A JSON string literal.
fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// `-` (from the start) or `<boot hex>-<seq>`.
fn parse_since(v: &[u8]) -> Option<Option<(u64, u64)>> {
    let v = std::str::from_utf8(v).ok()?.trim();
    if v == "-" {
        return Some(None);
    }
    let (boot, seq) = v.split_once('-')?;
    Some(Some((u64::from_str_radix(boot, 16).ok()?, seq.parse().ok()?)))
}

/// What one [`CacheLayer::catch_up`](super::CacheLayer::catch_up) did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CatchUp {
    /// Peers the registry listed.
    pub peers: usize,
    /// Peers whose log was read.
    pub answered: usize,
    /// Purges applied here for the first time.
    pub applied: u64,
    /// A peer had dropped records this node never saw, so the store was emptied (fail
    /// closed: an origin fetch instead of a purged object).
    pub cleared: bool,
}

/// Reads every peer's log past our cursor and applies what we have not applied yet.
pub(crate) async fn catch_up(cfg: &Arc<Config>) -> CatchUp {
    let mut out = CatchUp::default();
    let Some(fleet) = cfg.purger.fleet.clone() else {
        return out;
    };
    fleet.synced(fleet.inner.peer_timeout).await;
    let peers = fleet.peers();
    out.peers = peers.len();
    let reads = peers.iter().map(|peer| {
        let since = cfg
            .purger
            .cursors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&peer.id)
            .copied();
        let fleet = fleet.clone();
        async move {
            let mut r = Request::new(Empty::<Bytes>::new());
            *r.method_mut() = Method::from_bytes(b"PURGE").unwrap_or(Method::DELETE);
            *r.uri_mut() = http::Uri::from_static("/");
            let s = match since {
                Some((b, s)) => format!("{b:016x}-{s}"),
                None => "-".into(),
            };
            if let Ok(v) = HeaderValue::from_str(&s) {
                r.headers_mut().insert(X_PURGE_LOG_SINCE, v);
            }
            if let Some(b) = fleet.bearer() {
                r.headers_mut().insert(header::AUTHORIZATION, b);
            }
            let t = fleet.inner.peer_timeout;
            let page = async {
                let res = fleet.send(peer, r, t).await.ok()?;
                if res.status() != StatusCode::OK {
                    return None;
                }
                let body = tokio::time::timeout(t, Limited::new(res.into_body(), MAX_PAGE_BYTES).collect())
                    .await
                    .ok()?
                    .ok()?
                    .to_bytes();
                log::parse_page(std::str::from_utf8(&body).ok()?)
            }
            .await;
            if page.is_none() {
                tracing::warn!(peer = peer.id, "purge catch-up: no readable log from peer");
            }
            (peer.id.clone(), since, page)
        }
    });
    for (id, since, page) in futures_util::future::join_all(reads).await {
        let Some(page) = page else { continue };
        out.answered += 1;
        let seen = match since {
            Some((boot, seq)) if boot == page.boot => seq,
            _ => 0,
        };
        if page.dropped > seen && !out.cleared {
            tracing::warn!(peer = id, "purge catch-up: the peer's log no longer reaches back far enough; emptying the store");
            cfg.store.remove_where(&mut |_, _| true);
            cfg.purger.index.clear();
            out.cleared = true;
        }
        let new: Vec<&Target> = page
            .records
            .iter()
            .filter(|(origin, target)| cfg.purger.log.record_remote(origin, target))
            .map(|(_, t)| t)
            .collect();
        out.applied += new.len() as u64;
        apply_batch(cfg, &new);
        cfg.purger
            .cursors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, (page.boot, page.last));
    }
    out
}

/// Runs [`catch_up`] now and then every `every`.
pub(crate) async fn catch_up_every(cfg: Arc<Config>, every: Duration) {
    let every = every.max(Duration::from_millis(100));
    loop {
        let r = catch_up(&cfg).await;
        if r.applied > 0 || r.cleared {
            tracing::info!(applied = r.applied, cleared = r.cleared, "purge catch-up");
        }
        tokio::time::sleep(every).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn since_and_json() {
        assert_eq!(parse_since(b"-"), Some(None));
        assert_eq!(parse_since(b"ff-12"), Some(Some((255, 12))));
        assert_eq!(parse_since(b"ff"), None);
        assert_eq!(parse_since(b"\xff-1"), None);
        assert_eq!(json_str("a\"b\\\n"), "\"a\\\"b\\\\\\u000a\"");
    }
}
