use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::HeaderValue;
use http::Response;
use http_body::Body;
use pin_project_lite::pin_project;
use tower_service::Service;

use super::body::CacheBody;
use super::fill::{on_response, refresh};
use super::flight::{Joined, Lead, Wait};
use super::layer::Config;
use super::service::{from_entry, with_range, X_CACHE};
use super::store::{CachedResponse, StoreLoad};
use crate::body::tee::TeeBody;

pub(crate) struct Miss {
    /// The client's `Range`/`If-Range`, taken off the origin request (empty if none).
    pub(crate) range: http::HeaderMap,
    /// The key looked up: the plain key, or a variant key when a `Vary` marker was found.
    pub(crate) key: String,
    /// The plain key (without variant).
    pub(crate) base: String,
    /// The `Vary` names and generation of the marker found under `base`, if any.
    pub(crate) variant_of: Option<(Vec<http::HeaderName>, u64)>,
    /// The request's headers, to pick the variant a `Vary` response names (when filling).
    pub(crate) req_headers: http::HeaderMap,
    /// The request carried `Authorization`: stored only if the response allows it.
    pub(crate) authorized: bool,
    /// The request allows storing (GET, no `no-store`).
    pub(crate) fill: bool,
    pub(crate) head: bool,
    /// An expired entry still inside the stale-if-error window.
    pub(crate) stale: Option<Arc<CachedResponse>>,
    /// A stale entry being revalidated (the request carries its validators).
    pub(crate) revalidate: Option<Arc<CachedResponse>>,
    /// This miss leads a coalesced flight: followers wait on it.
    pub(crate) lead: Option<Lead>,
    pub(crate) cfg: Arc<Config>,
}

/// What a request does once its entry was read from the slow tier.
pub(crate) type Then<F, B, S, R> =
    Box<dyn FnOnce(Option<Arc<CachedResponse>>) -> ResponseFuture<F, B, S, R> + Send>;

pin_project! {
    #[project = StateProj]
    enum State<F, B, S, R> {
        Ready { res: Option<Response<CacheBody<B>>> },
        Inner { #[pin] fut: F, miss: Option<Miss> },
        // A follower of another request's origin fetch; `svc`/`req` make its own
        // request if it is released or times out.
        Follow { wait: Wait, svc: Option<S>, req: Option<R>, miss: Option<Miss> },
        // Released follower: waiting for `svc` to be ready.
        Call { svc: Option<S>, req: Option<R>, miss: Option<Miss> },
        // Reading the entry from the store's slow tier; `then` handles the request again.
        Load { read: StoreLoad, then: Option<Then<F, B, S, R>> },
        // An answer the layer computes itself asynchronously (a fleet `PURGE`).
        Boxed { fut: Pin<Box<dyn Future<Output = Response<CacheBody<B>>> + Send>> },
    }
}

pin_project! {
    /// Response future of [`Cache`](super::Cache).
    pub struct ResponseFuture<F, B, S, R> {
        #[pin]
        state: State<F, B, S, R>,
    }
}

impl<F, B, S, R> ResponseFuture<F, B, S, R> {
    pub(crate) fn ready(res: Response<CacheBody<B>>) -> Self {
        ResponseFuture {
            state: State::Ready { res: Some(res) },
        }
    }

    pub(crate) fn boxed(
        fut: impl Future<Output = Response<CacheBody<B>>> + Send + 'static,
    ) -> Self {
        ResponseFuture {
            state: State::Boxed { fut: Box::pin(fut) },
        }
    }

    pub(crate) fn pass(fut: F) -> Self {
        ResponseFuture {
            state: State::Inner { fut, miss: None },
        }
    }

    pub(crate) fn miss(fut: F, miss: Miss) -> Self {
        ResponseFuture {
            state: State::Inner {
                fut,
                miss: Some(miss),
            },
        }
    }

    pub(crate) fn load(read: StoreLoad, then: Then<F, B, S, R>) -> Self {
        ResponseFuture {
            state: State::Load {
                read,
                then: Some(then),
            },
        }
    }

    pub(crate) fn follow(wait: Wait, svc: S, req: R, miss: Miss) -> Self {
        ResponseFuture {
            state: State::Follow {
                wait,
                svc: Some(svc),
                req: Some(req),
                miss: Some(miss),
            },
        }
    }
}

fn upstream_failed(s: http::StatusCode) -> bool {
    matches!(s.as_u16(), 500 | 502 | 503 | 504)
}

impl<F, B, S, R, E> Future for ResponseFuture<F, B, S, R>
where
    F: Future<Output = Result<Response<B>, E>>,
    S: Service<R, Future = F, Response = Response<B>, Error = E>,
    B: Body<Data = Bytes> + Send + 'static,
{
    type Output = Result<Response<CacheBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.project().state;
        loop {
            match state.as_mut().project() {
                StateProj::Ready { res } => {
                    return match res.take() {
                        Some(r) => Poll::Ready(Ok(r)),
                        // Pending here would hang the caller forever without a waker.
                        None => crate::error::polled_after_completion("cache::ResponseFuture"),
                    };
                }
                StateProj::Boxed { fut } => {
                    return fut.as_mut().poll(cx).map(Ok);
                }
                StateProj::Follow {
                    wait,
                    svc,
                    req,
                    miss,
                } => match std::task::ready!(wait.poll(cx)) {
                    Joined::Head(status, mut headers, body) => {
                        crate::telemetry::cache("COALESCED");
                        headers.insert(X_CACHE, HeaderValue::from_static("COALESCED"));
                        let mut res = Response::new(CacheBody::flight(body));
                        *res.status_mut() = status;
                        *res.headers_mut() = headers;
                        let range = miss.as_ref().map(|m| &m.range);
                        return Poll::Ready(Ok(match range {
                            Some(r) => with_range(r, res, None),
                            None => res,
                        }));
                    }
                    Joined::Stored => {
                        // The leader refreshed the entry (a 304): serve it if it is fresh.
                        let m = miss.take();
                        let hit = m.as_ref().and_then(|m| {
                            let e = m.cfg.store.get(&m.key)?;
                            e.is_fresh(tokio::time::Instant::now())
                                .then_some((e, m.head))
                        });
                        if let (Some((entry, head)), Some(m)) = (hit, m.as_ref()) {
                            let res = from_entry(entry.clone(), head, "REVALIDATED");
                            return Poll::Ready(Ok(with_range(&m.range, res, Some(&entry))));
                        }
                        let (svc, req) = (svc.take(), req.take());
                        state.set(State::Call { svc, req, miss: m });
                    }
                    Joined::Origin { fill } => {
                        let mut m = miss.take();
                        if let Some(m) = m.as_mut() {
                            m.fill &= fill;
                            let stats = &m.cfg.stats;
                            if fill {
                                stats.misses.fetch_add(1, Ordering::Relaxed);
                            } else {
                                stats.lock_timeouts.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        let (svc, req) = (svc.take(), req.take());
                        state.set(State::Call { svc, req, miss: m });
                    }
                },
                StateProj::Load { read, then } => {
                    let entry = std::task::ready!(read.as_mut().poll(cx));
                    let Some(then) = then.take() else {
                        crate::error::polled_after_completion("cache::ResponseFuture");
                    };
                    state.set(then(entry).state);
                }
                StateProj::Call { svc, req, miss } => {
                    let (Some(s), Some(_)) = (svc.as_mut(), req.as_ref()) else {
                        crate::error::polled_after_completion("cache::ResponseFuture");
                    };
                    if let Err(e) = std::task::ready!(s.poll_ready(cx)) {
                        return Poll::Ready(Err(e));
                    }
                    let (Some(mut s), Some(r)) = (svc.take(), req.take()) else {
                        crate::error::polled_after_completion("cache::ResponseFuture");
                    };
                    let fut = s.call(r);
                    let miss = miss.take();
                    state.set(State::Inner { fut, miss });
                }
                StateProj::Inner { fut, miss } => {
                    let out = std::task::ready!(fut.poll(cx));
                    let Some(mut m) = miss.take() else {
                        return Poll::Ready(
                            out.map(|r| r.map(|b| CacheBody::live(TeeBody::passthrough(b)))),
                        );
                    };
                    let failed = match &out {
                        Ok(r) => upstream_failed(r.status()),
                        Err(_) => true,
                    };
                    if let (true, Some(entry)) = (failed, m.stale.take()) {
                        m.cfg.stats.stale.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(key = m.key, "upstream failed; serving stale entry");
                        // Dropping `m` releases any followers: they try the origin themselves.
                        let res = from_entry(entry.clone(), m.head, "STALE");
                        return Poll::Ready(Ok(with_range(&m.range, res, Some(&entry))));
                    }
                    if let Ok(r) = &out {
                        if r.status() == http::StatusCode::NOT_MODIFIED {
                            if let Some(old) = m.revalidate.take() {
                                return Poll::Ready(Ok(refresh(r.headers(), old, m)));
                            }
                        }
                    }
                    let range = std::mem::take(&mut m.range);
                    return Poll::Ready(out.map(|r| with_range(&range, on_response(r, m), None)));
                }
            }
        }
    }
}
