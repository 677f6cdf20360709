//! What one request carries between its tries: the endpoint it is on, the copy kept for a
//! retry, the endpoints already tried, the queue wait, and the rules for a next try.
//!
//! Split from `future.rs`, which only drives the state machine. The common request (one
//! try, answered at once) touches the inline fields only; everything the failure, retry
//! and queue paths need lives in [`Cold`], boxed on first use, because the response future
//! is moved through every layer above the balancer and each inline byte is paid per move.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use http::{header, Request, Response};
use tokio::time::Instant;
use tower_service::Service;

use super::call::Call;
use super::error::BalanceError;
use super::guard::{InFlight, Permit};
use super::kept::Kept;
use super::pick::{Miss, Picked};
use super::picker::Picker;
use super::retry::CloneBody;
use super::service::{Ep, MakeGate, Shared, Snap};
use crate::classify::{is_connect_error, Classify};
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

pub(super) struct Attempt<K, S, M: MakeGate<K>, C: Classify, B, R> {
    pub(super) shared: Arc<Shared<K, S, M, C>>,
    pub(super) endpoint: Option<InFlight<K, S, M>>,
    pub(super) permit: Option<Permit<K, M>>,
    pub(super) classifier: Option<C::Classifier>,
    pub(super) started: Option<Instant>,
    first: Option<Instant>,
    /// The copy kept for the next try (retries on only). Its head (~200 bytes) is in a
    /// box recycled per thread (`spare.rs`): inline, it would be moved with every move of
    /// the future even when retries are off (+108 instructions a dispatch without retry
    /// in the dispatch bench, measured in session 16); only the body handle is inline.
    pub(super) replay: Option<Kept<B>>,
    pub(super) tries: u32,
    pub(super) key: Option<u64>,
    cookie_id: Option<u64>,
    /// The per-try timeout of the try just dispatched is not armed on the timer yet: it is
    /// armed only once the try is pending, so an answer ready at the first poll costs no
    /// clock read and no timer registration.
    pub(super) arm: bool,
    /// State of the failure, retry and queue paths, boxed so the common future stays small.
    pub(super) cold: Option<Box<Cold<B, R>>>,
}

pub(super) struct Cold<B, R> {
    /// Queued: the request to send once an endpoint is available, and the wait.
    pub(super) queued: Option<(Request<B>, Wait)>,
    queue_deadline: Option<Instant>,
    /// What to return if no endpoint turns up: the last result, or why none was picked.
    last: Option<Result<R, BalanceError>>,
    /// Endpoints this request already went to (never the same one twice).
    tried: Vec<u64>,
}

impl<K, S, M: MakeGate<K>, C: Classify, B, R> Attempt<K, S, M, C, B, R> {
    pub(super) fn new(
        shared: Arc<Shared<K, S, M, C>>,
        key: Option<u64>,
        cookie_id: Option<u64>,
    ) -> Self {
        Attempt {
            shared,
            endpoint: None,
            permit: None,
            classifier: None,
            started: None,
            first: None,
            replay: None,
            tries: 0,
            key,
            cookie_id,
            arm: false,
            cold: None,
        }
    }

    fn cold(&mut self) -> &mut Cold<B, R> {
        self.cold.get_or_insert_with(|| {
            Box::new(Cold {
                queued: None,
                queue_deadline: None,
                last: None,
                tried: Vec::new(),
            })
        })
    }

    pub(super) fn set_last(&mut self, r: Result<R, BalanceError>) {
        self.cold().last = Some(r);
    }

    pub(super) fn take_last(&mut self) -> Result<R, BalanceError> {
        self.cold
            .as_mut()
            .and_then(|c| c.last.take())
            .unwrap_or(Err(BalanceError::NoEndpoints))
    }

    /// The endpoints already tried, for the next pick.
    pub(super) fn tried(&self) -> &[u64] {
        self.cold.as_ref().map_or(&[], |c| &c.tried)
    }

    pub(super) fn mark_tried(&mut self, id: u64) {
        self.cold().tried.push(id);
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
// Inline: it returns a pick, a cookie id and a key, copied out of a call for every
// request (~40 instructions with the call's own, dispatch bench).
#[allow(clippy::type_complexity)]
#[inline]
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

impl<K, S, M, C, B, RB> Attempt<K, S, M, C, B, Response<RB>>
where
    K: Clone + fmt::Debug,
    S: Service<Request<B>, Response = Response<RB>> + Clone,
    M: MakeGate<K>,
    C: Classify,
    B: CloneBody,
{
    /// Sends `req` to the picked endpoint: counts it in flight, keeps a copy when another
    /// try could follow, and starts the endpoint's call.
    pub(super) fn dispatch(
        &mut self,
        snap: &Snap<K, S, M>,
        picked: Picked<Permit<K, M>>,
        req: Request<B>,
        local: Option<&mut S>,
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
        // Copy only when another try could follow: tries left, and somewhere to send it
        // (an untried endpoint now, or a queue to wait in for one). The copy is the
        // largest part of the balancer's own cost per request (~1.8k instructions to
        // make and drop for a proxied GET, most of it the extensions the server put in,
        // then the header list; see `Kept`); a single-endpoint route never needs it.
        self.replay = if self.tries < self.shared.retry.tries && self.can_go_elsewhere(snap, ep.id)
        {
            Kept::of(&req)
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
        self.arm = self.shared.try_timeout.is_some();
        self.endpoint = Some(InFlight {
            ep,
            trial,
            counted: true,
        });
        // The balancer instance's own clone when it has one (`local.rs`): no clone per try,
        // and the service's per-instance state (`Forward`'s last `X-Forwarded-For`) kept.
        // The call last: the future is built in place of the return value, not moved.
        let service = || snap.endpoints[index].service.clone();
        match local {
            Some(svc) => Call::start_on(svc, service, req),
            None => Call::start(service(), req),
        }
    }

    /// Whether a try on endpoint `current` could be followed by one elsewhere: another
    /// endpoint of `snap` not tried yet, or a queue to wait for one to join. Endpoints that
    /// join later without a queue are not waited for: such a request is not copied, so a
    /// failure on the only endpoint is answered as it is.
    fn can_go_elsewhere(&self, snap: &Snap<K, S, M>, current: u64) -> bool {
        if self.shared.queue_timeout.is_some() {
            return true;
        }
        let tried = self.tried();
        // The first try (nothing tried yet): any second endpoint will do, no scan.
        if tried.is_empty() {
            return snap.endpoints.len() > 1;
        }
        snap.endpoints
            .iter()
            .any(|e| e.id != current && !tried.contains(&e.id))
    }

    /// Still within [`Retry::timeout`](super::Retry::timeout) of the first try.
    pub(super) fn within_timeout(&self) -> bool {
        match (self.shared.retry.timeout, self.first) {
            (Some(t), Some(first)) => first.elapsed() < t,
            _ => true,
        }
    }

    /// Whether the answer `res` of a try asks for another: only with a kept copy of the
    /// request (no copy, no retry classification and no shared-state reference), never
    /// for a client-caused failure, a connect error for any method, anything else
    /// matching [`Retry::on`](super::Retry::on) for an allowed method.
    // Inline: for the common answer (no copy, or an answered head under a condition of
    // errors only) it is a check or two, less than the call.
    #[inline]
    pub(super) fn wants_retry(
        &self,
        res: &Result<Response<RB>, BoxError>,
        client_fault: bool,
    ) -> bool {
        let Some(copy) = self.replay.as_ref() else {
            return false;
        };
        let on = &self.shared.retry.on;
        match res {
            // Retry's default names errors only: an answered head is then never retried,
            // and is not classified at all.
            Ok(r) => {
                self.shared.retry_heads
                    && on.classify_head(r.status(), r.headers()).is_failure()
                    && self.may_resend(copy)
            }
            Err(_) if client_fault => false,
            Err(e) => {
                is_connect_error(&**e)
                    || (on.classify_error_ref(&**e).is_failure() && self.may_resend(copy))
            }
        }
    }

    /// Whether a request an upstream has seen may be sent to another: an allowed method,
    /// and not an upgrade (WebSocket), which only a connect failure (nothing sent) moves.
    /// Both are looked up here, on the kept copy (its method, headers and `OnUpgrade` are
    /// the request's), so the common answered request never pays for them (the method
    /// was checked at every request's start before: ~12 instructions, dispatch bench).
    /// A copy exists only with tries left (`Retry::tries` > 1).
    fn may_resend(&self, copy: &Kept<B>) -> bool {
        self.shared.retry.method_allows(copy.method()) && !copy.is_upgrade()
    }

    /// Parks `req` until the set changes or a step passes, if a queue timeout allows it.
    /// Returns `false` (and drops `req`) when it does not.
    pub(super) fn queue(&mut self, req: Request<B>) -> bool {
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
    #[inline(always)]
    pub(super) fn finish(
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
