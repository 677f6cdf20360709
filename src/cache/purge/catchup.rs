//! Catch-up: read every peer's purge log past our cursor and apply what we missed.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty, Limited};

use super::super::fleet::Fleet;
use super::super::layer::Config;
use super::{apply_batch, log, Target, MAX_PAGE_BYTES, X_PURGE_LOG_SINCE};
use crate::discovery::Instance;

/// What one [`CacheLayer::catch_up`](crate::cache::CacheLayer::catch_up) did.
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
///
/// One peer at a time, one page at a time, one catch-up at a time per layer: what is
/// buffered (one page, at most `MAX_PAGE_BYTES`) stays bounded however many peers and
/// purges there are.
pub(crate) async fn catch_up(cfg: &Arc<Config>) -> CatchUp {
    let mut out = CatchUp::default();
    let Some(fleet) = cfg.purger.fleet.clone() else {
        return out;
    };
    let _one_at_a_time = cfg.purger.catching_up.lock().await;
    fleet.synced(fleet.inner.peer_timeout).await;
    let peers = fleet.peers();
    out.peers = peers.len();
    for peer in &peers {
        let mut since = cfg
            .purger
            .cursors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&peer.id)
            .copied();
        let mut read_any = false;
        // Page by page until the peer's last record; each page moves the cursor, so a
        // peer that stops answering half-way is resumed there next time.
        while let Some(page) = read_page(&fleet, peer, since).await {
            read_any = true;
            let seen = match since {
                Some((boot, seq)) if boot == page.boot => seq,
                _ => 0,
            };
            if page.dropped > seen && !out.cleared {
                tracing::warn!(
                    peer = peer.id,
                    "purge catch-up: the peer's log no longer reaches back far enough; emptying the store"
                );
                if cfg.store.remove_where(&mut |_, _| true).is_none() {
                    tracing::error!("purge catch-up: the store cannot be emptied (no remove_where); it may serve purged objects");
                }
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
            let next = (page.boot, page.until.max(seen));
            cfg.purger
                .cursors
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(peer.id.clone(), next);
            // Done, or a page that did not advance (a misbehaving peer): stop.
            if page.until >= page.last || since == Some(next) {
                break;
            }
            since = Some(next);
        }
        if read_any {
            out.answered += 1;
        } else {
            tracing::warn!(peer = peer.id, "purge catch-up: no readable log from peer");
        }
    }
    out
}

/// `PURGE /` with `x-purge-log-since`: the peer's log past `since`, within the peer
/// timeout (head and body each) and `MAX_PAGE_BYTES`.
async fn read_page(fleet: &Fleet, peer: &Instance, since: Option<(u64, u64)>) -> Option<log::Page> {
    let mut r = Request::new(Empty::<Bytes>::new());
    *r.method_mut() = Method::from_bytes(b"PURGE").unwrap_or(Method::DELETE);
    *r.uri_mut() = http::Uri::from_static("/");
    let s = match since {
        Some((b, s)) => format!("{b:016x}-{s}"),
        None => "-".into(),
    };
    r.headers_mut()
        .insert(X_PURGE_LOG_SINCE, HeaderValue::from_str(&s).ok()?);
    if let Some(b) = fleet.bearer() {
        r.headers_mut().insert(header::AUTHORIZATION, b);
    }
    let t = fleet.inner.peer_timeout;
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
