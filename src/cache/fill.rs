//! The miss path: serving an origin response while filling the store (and feeding any
//! coalesced followers), refreshing an entry after a `304`, and the background request of
//! `stale-while-revalidate`.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body::Body;
use tokio::time::Instant;
use tower_service::Service;

use super::body::CacheBody;
use super::conditional;
use super::flight::Lead;
use super::future::Miss;
use super::layer::Config;
use super::policy;
use super::service::{from_entry, with_range, X_CACHE};
use super::store::CachedResponse;
use super::vary::{self, Vary};
use crate::body::tee::{outlet, DisconnectPolicy, Inlet, Next, TeeBody, TeeOptions};
use crate::fields::content_length;

/// Bytes a fill may trail the client by; the fill task only appends to a `Vec`, so this
/// is hit only if the runtime starves it.
const FILL_BUFFER: usize = 8 << 20;

/// How long a `stale-while-revalidate` refresh may take before it is given up.
const BACKGROUND_REFRESH_TIMEOUT: Duration = Duration::from_secs(60);

/// The background request of `stale-while-revalidate`: calls the origin, refreshes or
/// refills the entry, and reads the body so the fill completes. Bounded in time; a failure
/// leaves the stale entry as it was.
pub(crate) async fn background_refresh<S, ReqB, ResB>(
    mut svc: S,
    req: Request<ReqB>,
    mut miss: Miss,
) where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
    ResB: Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<crate::BoxError>,
{
    let key = miss.key.clone();
    let work = async move {
        // Errors are dropped at once (not held across an await: they need not be `Send`).
        let ready = tower::ServiceExt::ready(&mut svc).await.is_ok();
        if !ready {
            return None;
        }
        let res = svc.call(req).await.ok()?;
        let res = match miss.revalidate.take() {
            Some(old) if res.status() == StatusCode::NOT_MODIFIED => {
                refresh(res.headers(), old, miss)
            }
            _ => on_response(res, miss),
        };
        let mut body = std::pin::pin!(res.into_body());
        while let Some(Ok(_)) = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await {}
        Some(())
    };
    if tokio::time::timeout(BACKGROUND_REFRESH_TIMEOUT, work)
        .await
        .ok()
        .flatten()
        .is_none()
    {
        tracing::debug!(key, "stale-while-revalidate refresh failed or timed out");
    }
}

/// The origin answered our revalidation with `304`: the stored entry is refreshed (headers
/// merged, a new lifetime from them) without a body transfer, and served.
pub(crate) fn refresh<B>(
    not_modified: &HeaderMap,
    old: Arc<CachedResponse>,
    mut miss: Miss,
) -> Response<CacheBody<B>> {
    let cfg = &miss.cfg;
    let mut headers = conditional::merge_304(&old.headers, not_modified);
    let initial_age = policy::initial_age(not_modified);
    headers.remove(header::AGE);
    cfg.stats.revalidated.fetch_add(1, Ordering::Relaxed);
    // A `Vary` line appearing on a plain-key entry would turn it into a marker: not kept.
    let varies_now = miss.variant_of.is_none() && vary::parse(&headers) != Vary::None;
    let ttl = policy::lifetime(&headers, cfg.default_ttl).filter(|_| !varies_now);
    let Some(ttl) = ttl else {
        // Now uncacheable: this client still gets the validated copy, nobody else.
        cfg.store.remove(&miss.key);
        let entry = Arc::new(CachedResponse {
            headers,
            ..(*old).clone()
        });
        return from_entry(entry, miss.head, "REVALIDATED");
    };
    let entry = CachedResponse {
        status: old.status,
        headers,
        body: old.body.clone(),
        stored_at: Instant::now(),
        fresh_for: ttl,
        initial_age,
    };
    cfg.store.put(&miss.key, entry.clone());
    if let Some(lead) = miss.lead.take() {
        lead.stored();
    }
    tracing::debug!(key = miss.key, "cache entry revalidated");
    let entry = Arc::new(entry);
    let res = from_entry(entry.clone(), miss.head, "REVALIDATED");
    with_range(&miss.range, res, Some(&entry))
}

/// Serves an upstream response on a miss, storing it when it is cacheable.
pub(crate) fn on_response<B>(res: Response<B>, miss: Miss) -> Response<CacheBody<B>>
where
    B: Body<Data = Bytes> + Send + 'static,
{
    let (mut parts, body) = res.into_parts();
    let mut miss = miss;
    let cfg = &miss.cfg;
    let vary = vary::parse(&parts.headers);
    let ttl = if miss.fill
        && policy::cacheable_status(parts.status)
        && vary != Vary::Uncacheable
        && (!miss.authorized || policy::shareable_with_authorization(&parts.headers))
    {
        policy::lifetime(&parts.headers, cfg.default_ttl)
    } else {
        None
    };
    // Where it is stored: under a variant key (and a marker under the plain key) when the
    // response varies.
    // The marker's generation is kept while the names stay the same; a new marker (first
    // fill, after a purge, other names) gets a new one.
    let known = miss.variant_of.as_ref();
    let (key, marker) = match &vary {
        Vary::Names(names) => {
            let generation = match known {
                Some((n, g)) if n == names => *g,
                _ => rand::random::<u64>(),
            };
            let key = vary::variant_key(&miss.base, generation, names, &miss.req_headers);
            (key, Some((names.clone(), generation)))
        }
        _ => (miss.base.clone(), None),
    };
    if marker.is_some() && marker.as_ref() != known {
        // The followers joined under another key or set of names: they may want another
        // variant, so they ask the origin themselves.
        miss.lead = None;
    }
    let len = content_length(&parts.headers);
    let max = cfg.store.max_entry_size();
    crate::telemetry::cache("MISS");
    parts
        .headers
        .insert(X_CACHE, HeaderValue::from_static("MISS"));
    let (Some(ttl), true, Ok(_)) = (
        ttl,
        len.is_none_or(|l| l <= max),
        tokio::runtime::Handle::try_current(),
    ) else {
        return Response::from_parts(parts, CacheBody::live(TeeBody::passthrough(body)));
    };
    let mut headers = parts.headers.clone();
    headers.remove(X_CACHE);
    if let Some(lead) = &miss.lead {
        // Followers get the head now, with the origin's `Age` as it came.
        lead.share(parts.status, headers.clone());
    }
    let initial_age = policy::initial_age(&headers);
    headers.remove(header::AGE);
    // With a length known (and within the entry limit), a coalesced fill is driven by a
    // task of its own and the leader's client follows the flight like the others: a
    // client that reads slowly (or not at all) cannot stall everyone who joined it.
    let leader_body = match (&miss.lead, len) {
        (Some(lead), Some(_)) => Some(lead.follow()),
        _ => None,
    };
    let (out, inlet) = outlet(FILL_BUFFER);
    let pending = Pending {
        key,
        marker: marker.map(|(names, generation)| (miss.base.clone(), names, generation)),
        status: parts.status,
        headers,
        stored_at: Instant::now(),
        fresh_for: ttl,
        initial_age,
        cfg: miss.cfg.clone(),
        lead: miss.lead,
    };
    tokio::spawn(fill(pending, inlet, max));
    if let Some(leader_body) = leader_body {
        let opts = TeeOptions {
            expected_len: len,
            // Dropped by `drive` only on an idle origin: abort, the fill is incomplete.
            on_disconnect: DisconnectPolicy::Abort,
            stats: Some(cfg.stats.tee.clone()),
            drain_budget: None,
        };
        tokio::spawn(drive(TeeBody::new(body, vec![out], &opts)));
        return Response::from_parts(parts, CacheBody::flight(leader_body));
    }
    let opts = TeeOptions {
        expected_len: len,
        on_disconnect: DisconnectPolicy::Finish {
            max_bytes: max,
            max_time: Duration::from_secs(60),
        },
        stats: Some(cfg.stats.tee.clone()),
        drain_budget: None,
    };
    Response::from_parts(parts, CacheBody::live(TeeBody::new(body, vec![out], &opts)))
}

/// How long a driven fill waits for the origin's next chunk before giving up.
const FILL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Reads a coalesced fill's origin body to its end (the tee copies it to the fill task);
/// gives up after [`FILL_IDLE_TIMEOUT`] without a chunk.
async fn drive<B>(tee: TeeBody<B>)
where
    B: Body<Data = Bytes> + Send + 'static,
{
    let mut tee = std::pin::pin!(tee);
    loop {
        let next = std::future::poll_fn(|cx| tee.as_mut().poll_frame(cx));
        let more = match tokio::time::timeout(FILL_IDLE_TIMEOUT, next).await {
            Ok(Some(Ok(_))) => true,
            // End, or an upstream error: the tee already ended or aborted the fill.
            Ok(None) | Ok(Some(Err(_))) => return,
            Err(_) => {
                tracing::debug!("coalesced fill: origin idle; abandoned");
                return;
            }
        };
        // A body that is always ready (the lean HTTP/1 path reading a fast origin) would
        // otherwise run this loop through the whole body before the fill task spawned
        // beside it on this thread gets a turn, and overflow the fill's buffer: one
        // frame, then the fill's turn.
        if more {
            tokio::task::yield_now().await;
        }
    }
}

struct Pending {
    key: String,
    /// The plain key, the `Vary` names and the generation, for the marker stored after
    /// the variant.
    marker: Option<(String, Vec<http::HeaderName>, u64)>,
    status: StatusCode,
    headers: HeaderMap,
    stored_at: Instant,
    fresh_for: Duration,
    initial_age: Duration,
    cfg: Arc<Config>,
    /// Followers of this fill: they get each chunk; dropping it without `finish`
    /// (every early return below) fails their bodies.
    lead: Option<Lead>,
}

async fn fill(p: Pending, mut inlet: Inlet, max: u64) {
    let stats = &p.cfg.stats;
    let mut body = Vec::new();
    let mut len = 0u64;
    loop {
        match inlet.next().await {
            Next::Data(chunk) => {
                len += chunk.len() as u64;
                if len > max {
                    stats.fills_aborted.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(key = p.key, max, "cache fill abandoned: entry too large");
                    return;
                }
                if let Some(lead) = &p.lead {
                    lead.push(chunk.clone());
                }
                body.push(chunk);
            }
            Next::End => break,
            Next::Abort(reason) => {
                stats.fills_aborted.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(key = p.key, %reason, "cache fill aborted");
                return;
            }
        }
    }
    drop(inlet);
    let entry = CachedResponse {
        status: p.status,
        headers: p.headers,
        body,
        stored_at: p.stored_at,
        fresh_for: p.fresh_for,
        initial_age: p.initial_age,
    };
    if p.cfg.store.put(&p.key, entry) {
        if let Some((base, names, generation)) = &p.marker {
            p.cfg
                .store
                .put(base, vary::marker(names, *generation, p.fresh_for));
        }
        stats.fills.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(key = p.key, bytes = len, "cache filled");
    } else {
        stats.fills_aborted.fetch_add(1, Ordering::Relaxed);
    }
    // After the store: a request that no longer finds the flight finds the entry. The
    // body was complete either way, so followers end cleanly.
    if let Some(lead) = p.lead {
        lead.finish();
    }
}
