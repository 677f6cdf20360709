use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use http::{header, Request, Response};
use pin_project_lite::pin_project;
use tokio::time::Instant;
use tower_service::Service;

use super::call::Call;
use super::error::BalanceError;
use super::error::TryTimeout;
use super::guard::{Deferred, InFlight, Permit};
use super::pick::{Miss, Picked, Picker};
use super::retry::{clone_request, CloneBody};
use super::service::{Ep, MakeGate, Shared, Snap};
use crate::classify::is_connect_error;
use crate::classify::{error_kind, Classifier, Classify, FailureKind, LateOutcomes, Outcome};
use crate::gate::Gate;
use crate::BoxError;

/// Re-pick at least this often while queued (ejections expire and gates reopen silently).
const QUEUE_STEP: Duration = Duration::from_millis(20);

/// `false` for [`NoGate`](crate::gate::NoGate), which ignores the elapsed time; a constant
/// after monomorphisation.
fn gate_is_timed<K, M: MakeGate<K>>() -> bool {
    std::any::TypeId::of::<M::Gate>() != std::any::TypeId::of::<crate::gate::NoGate>()
}

/// `now + d`, or a far future (about 30 years, as tokio's own) when that overflows: a
/// configured duration never panics.
pub(crate) fn deadline_after(now: Instant, d: Duration) -> Instant {
    now.checked_add(d)
        .unwrap_or_else(|| now + Duration::from_secs(86_400 * 365 * 30))
}

type Wait = Pin<Box<dyn Future<Output = ()> + Send>>;

struct Attempt<K, S, M: MakeGate<K>, C: Classify, B, R> {
    shared: Arc<Shared<K, S, M, C>>,
    endpoint: Option<InFlight<K, S, M>>,
    permit: Option<Permit<K, M>>,
    classifier: Option<C::Classifier>,
    started: Option<Instant>,
    first: Option<Instant>,
    /// The copy kept for the next try (retries on only). Boxed: a request is ~250 bytes,
    /// and a field that size would be moved with every move of the future even when
    /// retries are off; the retry path already allocates for the copied headers.
    replay: Option<Box<Request<B>>>,
    tries: u32,
    tried: Vec<u64>,
    key: Option<u64>,
    cookie_id: Option<u64>,
    method_ok: bool,
    /// Per-try timeout of the try just dispatched, not yet armed on the timer: armed only
    /// once the try is pending, so an answer ready at the first poll costs no clock read
    /// and no timer registration.
    arm: Option<Duration>,
    /// State of the failure and queue paths, boxed so the common future stays small
    /// (it is moved through every layer of the stack).
    cold: Option<Box<Cold<B, R>>>,
}

struct Cold<B, R> {
    /// Queued: the request to send once an endpoint is available, and the wait.
    queued: Option<(Request<B>, Wait)>,
    queue_deadline: Option<Instant>,
    /// What to return if no endpoint turns up: the last result, or why none was picked.
    last: Option<Result<R, BalanceError>>,
}

impl<K, S, M: MakeGate<K>, C: Classify, B, R> Attempt<K, S, M, C, B, R> {
    fn cold(&mut self) -> &mut Cold<B, R> {
        self.cold.get_or_insert_with(|| {
            Box::new(Cold {
                queued: None,
                queue_deadline: None,
                last: None,
            })
        })
    }

    fn set_last(&mut self, r: Result<R, BalanceError>) {
        self.cold().last = Some(r);
    }

    fn take_last(&mut self) -> Result<R, BalanceError> {
        self.cold
            .as_mut()
            .and_then(|c| c.last.take())
            .unwrap_or(Err(BalanceError::NoEndpoints))
    }
}

pin_project! {
    /// Response future of [`Balance`](super::Balance).
    pub struct ResponseFuture<K, S, M, C, B>
    where
        S: Service<Request<B>>,
        M: MakeGate<K>,
        C: Classify,
    {
        #[pin]
        inner: Option<Call<S, Request<B>>>,
        // The per-try timeout; one timer per request, reset for each try.
        #[pin]
        timer: Option<tokio::time::Sleep>,
        st: Attempt<K, S, M, C, B, S::Response>,
        done: bool,
    }
}

impl<K, S, M, C, B> fmt::Debug for ResponseFuture<K, S, M, C, B>
where
    S: Service<Request<B>>,
    M: MakeGate<K>,
    C: Classify,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("tries", &self.st.tries)
            .finish_non_exhaustive()
    }
}

pub(crate) fn miss_error(m: Miss) -> BalanceError {
    if m.total == 0 {
        BalanceError::NoEndpoints
    } else {
        BalanceError::Unavailable {
            total: m.total,
            ejected: m.ejected,
            refused: m.refused,
        }
    }
}

/// The first pick of a request: its sticky endpoint if valid and available, else the
/// picker's choice. Also returns the cookie's endpoint id and the request's hash key.
#[allow(clippy::type_complexity)]
pub(crate) fn first_pick<K, S, M, C, B>(
    shared: &Shared<K, S, M, C>,
    snap: &Snap<K, S, M>,
    req: &Request<B>,
) -> (Result<Picked<Permit<K, M>>, Miss>, Option<u64>, Option<u64>)
where
    K: fmt::Debug,
    M: MakeGate<K>,
{
    let cookie_id = shared.sticky.as_ref().and_then(|c| c.read(req.headers()));
    let key = match &shared.picker {
        Picker::ConsistentHash(k) => k.hash(req),
        _ => None,
    };
    let sticky = cookie_id
        .and_then(|id| snap.index_of(id))
        .and_then(|i| snap.admit(i, &shared.clock, &[]));
    let picked = match sticky {
        Some(p) => Ok(p),
        None => snap.pick(&shared.picker, key, &shared.clock, &[]),
    };
    (picked, cookie_id, key)
}

impl<K, S, M, C, B, RB> ResponseFuture<K, S, M, C, B>
where
    K: Clone + fmt::Debug,
    S: Service<Request<B>, Response = Response<RB>> + Clone,
    S::Error: Into<BoxError>,
    M: MakeGate<K>,
    C: Classify,
    B: CloneBody,
{
    pub(crate) fn start(shared: Arc<Shared<K, S, M, C>>, req: Request<B>) -> Self {
        let snap = shared.snapshot.load();
        let (picked, cookie_id, key) = first_pick(&shared, &snap, &req);
        // An upgrade (WebSocket) is never replayed once an upstream has seen it: only a
        // connect failure (nothing sent) moves it to another endpoint. Asked only when a
        // second try is possible at all (the upgrade check looks up headers).
        let method_ok = shared.retry.tries > 1
            && shared.retry.method_allows(req.method())
            && !crate::proxy::is_upgrade_request(&req);
        let mut st = Attempt {
            started: None,
            first: None,
            endpoint: None,
            permit: None,
            classifier: None,
            replay: None,
            tries: 0,
            tried: Vec::new(),
            key,
            cookie_id,
            method_ok,
            arm: None,
            cold: None,
            // Moved, not cloned: one reference-count round trip per request is enough.
            shared,
        };
        let inner = match picked {
            Ok(p) => Some(st.dispatch(&snap, p, req)),
            Err(m) => {
                st.set_last(Err(miss_error(m)));
                st.queue(req);
                None
            }
        };
        ResponseFuture {
            inner,
            timer: None,
            st,
            done: false,
        }
    }
}

impl<K, S, M, C, B, RB> Attempt<K, S, M, C, B, Response<RB>>
where
    K: Clone + fmt::Debug,
    S: Service<Request<B>, Response = Response<RB>> + Clone,
    M: MakeGate<K>,
    C: Classify,
    B: CloneBody,
{
    fn dispatch(
        &mut self,
        snap: &Snap<K, S, M>,
        picked: Picked<Permit<K, M>>,
        req: Request<B>,
    ) -> Call<S, Request<B>> {
        let Picked {
            index,
            permit,
            trial,
        } = picked;
        let ep = snap.endpoints[index].clone();
        ep.in_flight.fetch_add(1, Relaxed);
        ep.requests.fetch_add(1, Relaxed);
        self.tries += 1;
        // Copy only when another try could follow: no copy (no allocation) with tries = 1.
        self.replay = if self.tries < self.shared.retry.tries {
            clone_request(&req).map(Box::new)
        } else {
            None
        };
        self.classifier = Some(self.shared.classify.classify_request(&req));
        self.permit = Some(permit);
        // The clock is read here only for a gate that uses the elapsed time or a retry
        // timeout; the per-try timeout reads it when the try first turns out pending.
        let timed = self.shared.retry.timeout.is_some();
        self.started = None;
        if gate_is_timed::<K, M>() || timed {
            let now = Instant::now();
            self.started = Some(now);
            if self.first.is_none() && timed {
                self.first = Some(now);
            }
        }
        self.arm = self.shared.try_timeout;
        let svc = ep.service.clone();
        self.endpoint = Some(InFlight {
            ep,
            trial,
            counted: true,
        });
        Call::start(svc, req)
    }

    fn within_timeout(&self) -> bool {
        match (self.shared.retry.timeout, self.first) {
            (Some(t), Some(first)) => first.elapsed() < t,
            _ => true,
        }
    }

    /// Parks `req` until the set changes or a step passes, if a queue timeout allows it.
    /// Returns `false` (and drops `req`) when it does not.
    fn queue(&mut self, req: Request<B>) -> bool {
        let Some(timeout) = self.shared.queue_timeout else {
            return false;
        };
        let now = Instant::now();
        let deadline = *self
            .cold()
            .queue_deadline
            .get_or_insert_with(|| deadline_after(now, timeout));
        if now >= deadline {
            return false;
        }
        let mut members = self.shared.members.subscribe();
        let sleep = tokio::time::sleep_until(deadline.min(deadline_after(now, QUEUE_STEP)));
        let wait: Wait = Box::pin(async move {
            tokio::select! {
                _ = members.changed() => {}
                () = sleep => {}
            }
        });
        self.cold().queued = Some((req, wait));
        true
    }

    /// Applies the sticky cookie to a final response. Inlined: the response is moved in
    /// and out, a copy of its whole head per call otherwise.
    #[inline]
    fn finish(
        &self,
        ep: &Ep<K, S, M>,
        res: Result<Response<RB>, BoxError>,
    ) -> Result<Response<RB>, BalanceError> {
        match res {
            Ok(mut r) => {
                if self.cookie_id != Some(ep.id) {
                    if let Some(c) = &ep.cookie {
                        r.headers_mut().append(header::SET_COOKIE, c.clone());
                    }
                }
                Ok(r)
            }
            Err(source) => Err(BalanceError::Upstream {
                tries: self.tries,
                source,
            }),
        }
    }
}

impl<K, S, M, C, B, RB> Future for ResponseFuture<K, S, M, C, B>
where
    K: Clone + fmt::Debug + Send + Sync + 'static,
    S: Service<Request<B>, Response = Response<RB>> + Clone + Send + Sync + 'static,
    S::Error: Into<BoxError>,
    M: MakeGate<K>,
    C: Classify,
    B: CloneBody,
    RB: http_body::Body + Send + 'static,
{
    type Output = Result<Response<RB>, BalanceError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if self.done {
            crate::error::polled_after_completion("balance::ResponseFuture");
        }
        let out = self.as_mut().poll_attempt(cx);
        if out.is_ready() {
            *self.project().done = true;
        }
        out
    }
}

impl<K, S, M, C, B, RB> ResponseFuture<K, S, M, C, B>
where
    K: Clone + fmt::Debug + Send + Sync + 'static,
    S: Service<Request<B>, Response = Response<RB>> + Clone + Send + Sync + 'static,
    S::Error: Into<BoxError>,
    M: MakeGate<K>,
    C: Classify,
    B: CloneBody,
    RB: http_body::Body + Send + 'static,
{
    fn poll_attempt(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Response<RB>, BalanceError>> {
        let mut this = self.project();
        loop {
            // Queued: wait for the set to change, then pick again.
            if let Some((_, wait)) = this.st.cold.as_mut().and_then(|c| c.queued.as_mut()) {
                ready!(wait.as_mut().poll(cx));
                let st = &mut *this.st;
                let Some((req, _)) = st.cold.as_mut().and_then(|c| c.queued.take()) else {
                    continue;
                };
                let shared = st.shared.clone();
                let snap = shared.snapshot.load();
                match snap.pick(&shared.picker, st.key, &shared.clock, &st.tried) {
                    Ok(p) => {
                        let fut = st.dispatch(&snap, p, req);
                        this.inner.set(Some(fut));
                    }
                    Err(m) => {
                        if st.tries == 0 {
                            st.set_last(Err(miss_error(m)));
                        }
                        if !st.queue(req) {
                            let last = st.take_last();
                            return Poll::Ready(last);
                        }
                        continue;
                    }
                }
            }

            let mut res: Result<Response<RB>, BoxError> = match this.inner.as_mut().as_pin_mut() {
                Some(fut) => match fut.poll(cx) {
                    Poll::Ready(r) => {
                        this.st.arm = None;
                        r.map_err(Into::into)
                    }
                    Poll::Pending => {
                        if let Some(after) = this.st.arm.take() {
                            let base = this.st.started.unwrap_or_else(Instant::now);
                            let deadline = deadline_after(base, after);
                            match this.timer.as_mut().as_pin_mut() {
                                Some(t) => t.reset(deadline),
                                None => this.timer.set(Some(tokio::time::sleep_until(deadline))),
                            }
                        }
                        // A hung endpoint (accepts, never answers) gives no outcome by
                        // itself: the per-try timeout turns it into a timeout failure that
                        // health counts and retry acts on. The timer is armed at every
                        // dispatch when a timeout is set.
                        let fired = this
                            .timer
                            .as_mut()
                            .as_pin_mut()
                            .is_some_and(|t| t.poll(cx).is_ready());
                        if !fired {
                            return Poll::Pending;
                        }
                        let after = this.st.shared.try_timeout.unwrap_or_default();
                        Err(Box::new(TryTimeout::new(after)))
                    }
                },
                None => {
                    return Poll::Ready(this.st.take_last());
                }
            };
            this.inner.set(None);
            let st = &mut *this.st;
            let Some(mut guard) = st.endpoint.take() else {
                return Poll::Ready(Err(BalanceError::NoEndpoints));
            };
            // The outcome below resolves the trial, if this was one.
            let trial = std::mem::take(&mut guard.trial);
            // in_flight counts until the response head arrived, or for an upgraded
            // connection (WebSocket) until its tunnel closes: the tunnel holds the guard.
            let ep_held;
            let ep = match &res {
                Ok(r)
                    if r.status() == http::StatusCode::SWITCHING_PROTOCOLS
                        && r.extensions().get::<crate::proxy::Tunnel>().is_some() =>
                {
                    ep_held = guard.ep.clone();
                    if let Some(t) = r.extensions().get::<crate::proxy::Tunnel>() {
                        t.hold(guard);
                    }
                    &ep_held
                }
                _ => {
                    guard.answered();
                    &guard.ep
                }
            };
            // A client-caused failure (its body broke, the proxy's own resources ran out)
            // says nothing about the endpoint: never charged to it, never retried,
            // whatever the configured classifier says.
            let client_fault = matches!(&res, Err(e) if error_kind(&**e) == FailureKind::Client);
            // A gRPC answer whose status comes in the trailers: health and the gate learn
            // the outcome when the body ends (`classify::TrailersLayer` runs it). Such a
            // response is already the answer: never retried.
            let defer =
                matches!((&st.classifier, &res), (Some(c), Ok(r)) if c.defers_to_trailers(r));
            if defer {
                if let (Some(c), Ok(r)) = (st.classifier.take(), res.as_mut()) {
                    let deferred = Deferred {
                        ep: ep.clone(),
                        shared: st.shared.clone(),
                        trial,
                        permit: st.permit.take(),
                        started: st.started,
                        classifier: Some(c),
                    };
                    LateOutcomes::of(r).push(move |end| deferred.finish(end));
                }
                st.replay = None;
                return Poll::Ready(st.finish(ep, res));
            }
            let outcome = match (st.classifier.take(), &res) {
                _ if client_fault => Outcome::Ignored,
                (Some(c), Ok(r)) => c.classify_response(r),
                (Some(c), Err(e)) => c.classify_error(&**e),
                (None, _) => Outcome::Ignored,
            };
            if ep.record(outcome, trial, &st.shared.health, &st.shared.clock) {
                st.shared.try_eject(ep);
            }
            if let Some(p) = st.permit.take() {
                let elapsed = st.started.map(|t| t.elapsed()).unwrap_or_default();
                ep.gate.complete(p, outcome, elapsed);
            }

            // Without a kept copy of the request no retry is possible: skip the retry
            // classification (and the shared-state reference) altogether.
            let wanted = st.replay.is_some()
                && match &res {
                    Ok(r) => {
                        st.method_ok
                            && st
                                .shared
                                .retry
                                .on
                                .classify_head(r.status(), r.headers())
                                .is_failure()
                    }
                    Err(_) if client_fault => false,
                    Err(e) => {
                        is_connect_error(&**e)
                            || (st.method_ok
                                && st.shared.retry.on.classify_error_ref(&**e).is_failure())
                    }
                };
            if wanted && st.within_timeout() {
                let shared = st.shared.clone();
                st.tried.push(ep.id);
                let snap = shared.snapshot.load();
                let picked = snap.pick(&shared.picker, st.key, &shared.clock, &st.tried);
                if let Some(req) = st.replay.take().map(|r| *r) {
                    match picked {
                        Ok(p) => {
                            crate::telemetry::retry();
                            tracing::debug!(
                                from = ?ep.key,
                                to = ?snap.endpoints[p.index].key,
                                try_no = st.tries + 1,
                                "retrying on the next endpoint"
                            );
                            // The failed answer is not returned: discarded the one way the
                            // crate does it, keeping a short body's connection.
                            if let Ok(r) = res {
                                crate::body::discard(
                                    r.into_body(),
                                    crate::body::DISCARD_LIMIT,
                                    crate::body::DISCARD_TIMEOUT,
                                );
                            }
                            let fut = st.dispatch(&snap, p, req);
                            this.inner.set(Some(fut));
                            continue;
                        }
                        Err(_) => {
                            // Nobody left to try now; with a queue, wait for the set to change.
                            let done = st.finish(ep, res);
                            st.set_last(done);
                            if st.queue(req) {
                                continue;
                            }
                            let last = st.take_last();
                            return Poll::Ready(last);
                        }
                    }
                }
            }
            st.replay = None;
            return Poll::Ready(st.finish(ep, res));
        }
    }
}
