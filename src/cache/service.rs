use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body::Body;
use tokio::time::Instant;
use tower_service::Service;

use super::body::CacheBody;
use super::conditional;
use super::fill::background_refresh;
use super::flight::{Role, Wait};
use super::future::{Miss, ResponseFuture};
use super::layer::{CacheLayer, Config, PurgeMode};
use super::policy;
use super::purge;
use super::range;
use super::sibling;
use super::store::{CachedResponse, StoreLoad};
use super::vary;
use crate::fields::content_length;

/// The `X-Cache` response header: `HIT`, `MISS`, `STALE`, or `COALESCED` (a miss that
/// streamed another request's origin response).
pub const X_CACHE: &str = "x-cache";

/// The service made by [`CacheLayer`].
#[derive(Clone)]
pub struct Cache<S> {
    inner: S,
    cfg: Arc<Config>,
}

impl<S: fmt::Debug> fmt::Debug for Cache<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cache")
            .field("inner", &self.inner)
            .field("cfg", &self.cfg)
            .finish()
    }
}

impl<S> Cache<S> {
    pub(crate) fn from_parts(inner: S, cfg: Arc<Config>) -> Self {
        Cache { inner, cfg }
    }

    /// Wraps `inner` with the configuration (and store) of `layer`.
    pub fn new(inner: S, layer: &CacheLayer) -> Self {
        Cache::from_parts(inner, layer.cfg.clone())
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

pub(crate) fn message<B>(status: StatusCode, text: &'static str) -> Response<CacheBody<B>> {
    let mut res = Response::new(CacheBody::bytes(Bytes::from_static(text.as_bytes())));
    *res.status_mut() = status;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    res
}

/// A response built from a stored entry, with `Age` and `X-Cache`.
pub(crate) fn from_entry<B>(
    entry: Arc<CachedResponse>,
    head: bool,
    label: &'static str,
) -> Response<CacheBody<B>> {
    let age = entry.age(Instant::now()).as_secs();
    let mut headers = entry.headers.clone();
    headers.insert(header::AGE, HeaderValue::from(age));
    crate::telemetry::cache(label);
    headers.insert(X_CACHE, HeaderValue::from_static(label));
    let body = if head {
        CacheBody::bytes(Bytes::new())
    } else {
        CacheBody::stored(entry.clone())
    };
    let mut res = Response::new(body);
    *res.status_mut() = entry.status;
    *res.headers_mut() = headers;
    res
}

impl<S, ReqB, ResB> Service<Request<ReqB>> for Cache<S>
where
    S: Service<Request<ReqB>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    ReqB: Send + 'static,
    ResB: Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<crate::BoxError>,
{
    type Response = Response<CacheBody<ResB>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResB, S, Request<ReqB>>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        self.call_with(req, Vec::new())
    }
}

/// Entries read from a store's slower tier for one request (its plain key, then perhaps
/// a variant key), so the request is looked at again with them at hand.
type Loaded = Vec<(String, Option<Arc<CachedResponse>>)>;

enum Lookup {
    Found(Option<Arc<CachedResponse>>),
    Slow(StoreLoad),
}

/// The entry under `key`: the store's fast tier, what this request already read from the
/// slow one, or a read of the slow one to wait for.
fn lookup(cfg: &Config, loaded: &Loaded, key: &str) -> Lookup {
    if let Some(e) = cfg.store.get(key) {
        return Lookup::Found(Some(e));
    }
    if let Some((_, e)) = loaded.iter().find(|(k, _)| k == key) {
        return Lookup::Found(e.clone());
    }
    match cfg.store.load(key) {
        Some(read) => Lookup::Slow(read),
        None => Lookup::Found(None),
    }
}

impl<S> Cache<S> {
    /// Waits for `read` from the slow tier (off the runtime's threads, see `Store::load`),
    /// then handles `req` again with the result at hand. Takes the service made ready for
    /// this call.
    fn after_load<ReqB, ResB>(
        &mut self,
        read: StoreLoad,
        key: String,
        mut loaded: Loaded,
        req: Request<ReqB>,
    ) -> ResponseFuture<S::Future, ResB, S, Request<ReqB>>
    where
        S: Service<Request<ReqB>, Response = Response<ResB>> + Clone + Send + 'static,
        S::Future: Send + 'static,
        ReqB: Send + 'static,
        ResB: Body<Data = Bytes> + Send + 'static,
        ResB::Error: Into<crate::BoxError>,
    {
        let clone = self.inner.clone();
        let mut next =
            Cache::from_parts(std::mem::replace(&mut self.inner, clone), self.cfg.clone());
        ResponseFuture::load(
            read,
            Box::new(move |entry| {
                loaded.push((key, entry));
                next.call_with(req, loaded)
            }),
        )
    }

    fn call_with<ReqB, ResB>(
        &mut self,
        req: Request<ReqB>,
        loaded: Loaded,
    ) -> ResponseFuture<S::Future, ResB, S, Request<ReqB>>
    where
        S: Service<Request<ReqB>, Response = Response<ResB>> + Clone + Send + 'static,
        S::Future: Send + 'static,
        ReqB: Send + 'static,
        ResB: Body<Data = Bytes> + Send + 'static,
        ResB::Error: Into<crate::BoxError>,
    {
        let cfg = &self.cfg;
        let method = req.method();
        let is_get = method == Method::GET;
        let is_head = method == Method::HEAD;
        if method.as_str() == "PURGE" && !matches!(cfg.purge, PurgeMode::PassThrough) {
            let (parts, _) = req.into_parts();
            match &cfg.purge {
                PurgeMode::Rules(rules) if rules.iter().all(|r| r(&parts)) => {}
                PurgeMode::Rules(_) => {
                    return ResponseFuture::ready(message(
                        StatusCode::FORBIDDEN,
                        "purge not allowed\n",
                    ));
                }
                _ => {
                    let mut res = message(StatusCode::METHOD_NOT_ALLOWED, "purge not enabled\n");
                    res.headers_mut()
                        .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
                    return ResponseFuture::ready(res);
                }
            }
            // Key, prefix or surrogate key; fanned out to the fleet (see `purge`).
            return purge::handle(cfg, &parts);
        }
        if !(is_get || is_head) {
            cfg.stats.bypass.fetch_add(1, Ordering::Relaxed);
            return ResponseFuture::pass(self.inner.call(req));
        }
        let (mut parts, body) = req.into_parts();
        let base = (cfg.key)(&parts);
        // A request with credentials is never answered from the cache and never joins
        // another request's fetch; its response is stored only if it says it may be
        // shared (RFC 9111 §3.5).
        let authorized = parts.headers.contains_key(header::AUTHORIZATION);
        let fill = cfg.fill && is_get && !policy::request_no_store(&parts.headers);
        let mut stale = None;
        let mut revalidate = None;
        let no_cache = authorized || policy::request_no_cache(&parts.headers);
        // A `Vary` marker under the plain key names the headers that pick the variant.
        let mut found = None;
        if !authorized {
            match lookup(cfg, &loaded, &base) {
                Lookup::Found(e) => found = e,
                Lookup::Slow(read) => {
                    let req = Request::from_parts(parts, body);
                    return self.after_load(read, base, loaded, req);
                }
            }
        }
        let mut key = base.clone();
        let mut variant_of = None;
        if let Some(marker) = found.take_if(|e| vary::is_marker(e)) {
            if let vary::Vary::Names(names) = vary::parse(&marker.headers) {
                let generation = vary::generation(&marker);
                key = vary::variant_key(&base, generation, &names, &parts.headers);
                match lookup(cfg, &loaded, &key) {
                    Lookup::Found(e) => found = e,
                    Lookup::Slow(read) => {
                        let req = Request::from_parts(parts, body);
                        return self.after_load(read, key, loaded, req);
                    }
                }
                variant_of = Some((names, generation));
            }
        }
        // A sibling's lookup (or a client's `only-if-cached`): a fresh entry or `504`,
        // never the origin — a sibling request is never forwarded (the hop guard).
        if sibling::only_if_cached(&parts.headers) {
            let hit = found.filter(|e| !authorized && !no_cache && e.is_fresh(Instant::now()));
            return ResponseFuture::ready(match hit {
                Some(entry) => {
                    cfg.stats.hits.fetch_add(1, Ordering::Relaxed);
                    answer(entry, &parts.headers, is_head, "HIT")
                }
                None => message(StatusCode::GATEWAY_TIMEOUT, "not cached\n"),
            });
        }
        if let Some(entry) = found.filter(|_| !authorized) {
            let now = Instant::now();
            if entry.is_fresh(now) && !no_cache {
                cfg.stats.hits.fetch_add(1, Ordering::Relaxed);
                return ResponseFuture::ready(answer(entry, &parts.headers, is_head, "HIT"));
            }
            let must_revalidate = policy::must_revalidate(&entry.headers);
            let swr = policy::stale_while_revalidate(&entry.headers);
            if fill
                && !no_cache
                && !must_revalidate
                && entry.age(now) < entry.fresh_for.saturating_add(swr)
            {
                // stale-while-revalidate: this client gets the stale copy now; one
                // request in the background (this one, without the client's own
                // conditions) refreshes the entry.
                cfg.stats.stale.fetch_add(1, Ordering::Relaxed);
                let res = answer(entry.clone(), &parts.headers, is_head, "STALE");
                if let Role::Lead(lead) = cfg.flights.join(&key) {
                    for name in [
                        header::RANGE,
                        header::IF_RANGE,
                        header::IF_NONE_MATCH,
                        header::IF_MODIFIED_SINCE,
                        header::IF_MATCH,
                        header::IF_UNMODIFIED_SINCE,
                    ] {
                        parts.headers.remove(name);
                    }
                    let validated = conditional::has_validator(&entry.headers);
                    if validated {
                        conditional::add_validators(&mut parts.headers, &entry.headers);
                    }
                    let miss = Miss {
                        range: HeaderMap::new(),
                        req_headers: parts.headers.clone(),
                        key: key.clone(),
                        base: base.clone(),
                        variant_of,
                        authorized: false,
                        fill: true,
                        head: false,
                        stale: None,
                        revalidate: validated.then_some(entry),
                        lead: Some(lead),
                        cfg: cfg.clone(),
                    };
                    let clone = self.inner.clone();
                    let svc = std::mem::replace(&mut self.inner, clone);
                    let req = Request::from_parts(parts, body);
                    tokio::spawn(background_refresh(svc, req, miss));
                }
                return ResponseFuture::ready(res);
            }
            if !must_revalidate
                && entry.age(now) < entry.fresh_for.saturating_add(cfg.stale_if_error)
            {
                stale = Some(entry.clone());
            }
            // Ask the origin whether our copy is still good, unless the client brought
            // conditions of its own (then its request goes through as it is).
            if fill
                && conditional::has_validator(&entry.headers)
                && !conditional::has_conditionals(&parts.headers)
            {
                conditional::add_validators(&mut parts.headers, &entry.headers);
                revalidate = Some(entry);
            }
        }
        // A range is answered from the whole object, which is what the origin is asked
        // for (and what is stored); see `range`.
        let mut range = HeaderMap::new();
        if fill {
            for name in [header::RANGE, header::IF_RANGE] {
                if let Some(v) = parts.headers.remove(&name) {
                    range.insert(name, v);
                }
            }
        }
        let mut miss = Miss {
            range,
            key,
            base,
            variant_of,
            req_headers: if fill {
                parts.headers.clone()
            } else {
                HeaderMap::new()
            },
            authorized,
            fill,
            head: is_head,
            stale,
            revalidate,
            lead: None,
            cfg: cfg.clone(),
        };
        if let (true, false, Some(lock_timeout)) = (fill, authorized, cfg.coalesce) {
            match cfg.flights.join(&miss.key) {
                Role::Follow(flight) => {
                    cfg.stats.coalesced.fetch_add(1, Ordering::Relaxed);
                    // The follower may still have to call the origin (released, or lock
                    // timeout): it takes the service made ready for this call.
                    let clone = self.inner.clone();
                    let svc = std::mem::replace(&mut self.inner, clone);
                    let wait = Wait::new(flight, lock_timeout);
                    return ResponseFuture::follow(
                        wait,
                        svc,
                        Request::from_parts(parts, body),
                        miss,
                    );
                }
                Role::Lead(lead) => {
                    // A flight that just finished stored its entry before leaving the map.
                    // (Not when this request must reach the origin anyway, and never once
                    // our own validators were added to its headers.)
                    let recheck = !no_cache && miss.revalidate.is_none();
                    if let Some(entry) = fresh(cfg.store.get(&miss.key)).filter(|_| recheck) {
                        cfg.stats.hits.fetch_add(1, Ordering::Relaxed);
                        return ResponseFuture::ready(answer(
                            entry,
                            &parts.headers,
                            is_head,
                            "HIT",
                        ));
                    }
                    miss.lead = Some(lead);
                }
            }
        }
        cfg.stats.misses.fetch_add(1, Ordering::Relaxed);
        ResponseFuture::miss(self.inner.call(Request::from_parts(parts, body)), miss)
    }
}

/// A response from a stored entry for a request with `headers`: `304` when the client's
/// own conditions match (RFC 9110 §13.2.2), else the entry.
pub(crate) fn answer<B>(
    entry: Arc<CachedResponse>,
    headers: &HeaderMap,
    head: bool,
    label: &'static str,
) -> Response<CacheBody<B>> {
    if !conditional::not_modified(headers, &entry.headers) {
        if head {
            return from_entry(entry, head, label);
        }
        let res = from_entry(entry.clone(), head, label);
        return range::apply(headers, res, Some(entry.body_len()), Some(&entry));
    }
    let age = entry.age(Instant::now()).as_secs();
    let mut res = Response::new(CacheBody::bytes(Bytes::new()));
    *res.status_mut() = StatusCode::NOT_MODIFIED;
    *res.headers_mut() = conditional::not_modified_headers(&entry.headers);
    res.headers_mut()
        .insert(header::AGE, HeaderValue::from(age));
    crate::telemetry::cache(label);
    res.headers_mut()
        .insert(X_CACHE, HeaderValue::from_static(label));
    res
}

/// Applies the client's `Range` (kept in `miss.range`) to a response on the miss path.
pub(crate) fn with_range<B>(
    range: &HeaderMap,
    res: Response<CacheBody<B>>,
    entry: Option<&CachedResponse>,
) -> Response<CacheBody<B>> {
    if range.is_empty() {
        return res;
    }
    let len = match entry {
        Some(e) => Some(e.body_len()),
        None => content_length(res.headers()),
    };
    range::apply(range, res, len, entry)
}

fn fresh(entry: Option<Arc<CachedResponse>>) -> Option<Arc<CachedResponse>> {
    entry.filter(|e| e.is_fresh(Instant::now()))
}
