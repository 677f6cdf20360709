//! The response future of one link ([`LinkFuture`]): calls the link's service, classifies
//! the answer against the link's condition and, when it matches, drains the first answer and
//! hops to the next host with the replayed request. The hop rules (loop guard, replay limits,
//! non-idempotent methods) live here because they decide per answer.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use http::{Request, Response};
use http_body::Body;
use pin_project_lite::pin_project;
use tower::util::Oneshot;
use tower_service::Service;

use super::error::ChainError;
use super::hops::{ChainHops, Hop, HopResult, StopReason};
use super::service::{bump_hops, LinkPolicy};
use crate::body::discard;
use crate::body::ReplayBody;
use crate::classify::is_connect_error;
use crate::classify::{error_kind, Classifier, Classify, Outcome};
use crate::error::polled_after_completion;
use crate::BoxError;

type Req<B> = Request<ReplayBody<B>>;

pin_project! {
    /// Response future of [`Link`](super::Link).
    pub struct LinkFuture<F, N, C, B>
    where
        N: Service<Request<ReplayBody<B>>>,
        C: Classify,
    {
        #[pin]
        state: State<F, N, C::Classifier, B>,
        policy: Arc<LinkPolicy<C>>,
        idempotent: bool,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F, N, K, B>
    where
        N: Service<Request<ReplayBody<B>>>,
    {
        Primary {
            #[pin]
            fut: F,
            classifier: Option<K>,
            spare: Option<Request<ReplayBody<B>>>,
            next: Arc<N>,
        },
        // Boxed: only hops pay for it, and the common future stays small.
        Next {
            fut: Pin<Box<Oneshot<N, Request<ReplayBody<B>>>>>,
            hops: Option<ChainHops>,
        },
        Done,
    }
}

impl<F, N, C, B> LinkFuture<F, N, C, B>
where
    N: Service<Req<B>>,
    C: Classify,
{
    pub(crate) fn new(
        fut: F,
        classifier: C::Classifier,
        spare: Option<Req<B>>,
        idempotent: bool,
        next: Arc<N>,
        policy: Arc<LinkPolicy<C>>,
    ) -> Self {
        LinkFuture {
            state: State::Primary {
                fut,
                classifier: Some(classifier),
                spare,
                next,
            },
            policy,
            idempotent,
        }
    }
}

impl<F, N, C, B> fmt::Debug for LinkFuture<F, N, C, B>
where
    N: Service<Req<B>>,
    C: Classify,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("LinkFuture")
    }
}

/// What to do with the primary's answer.
enum Step<RB, B> {
    Return(Result<Response<RB>, ChainError>),
    Hop(Req<B>, ChainHops),
}

impl<F, N, C, B, RB, E> Future for LinkFuture<F, N, C, B>
where
    F: Future<Output = Result<Response<RB>, E>>,
    E: Into<BoxError>,
    N: Service<Req<B>, Response = Response<RB>> + Clone,
    N::Error: Into<BoxError>,
    C: Classify,
    RB: Body + Send + 'static,
{
    type Output = Result<Response<RB>, ChainError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Primary {
                    fut,
                    classifier,
                    spare,
                    next,
                } => {
                    let result = ready!(fut.poll(cx));
                    let step = match classifier.take() {
                        Some(classifier) => after_primary(
                            result,
                            classifier,
                            spare.take(),
                            *this.idempotent,
                            this.policy,
                        ),
                        // The classifier is taken exactly once, here, and the state moves on.
                        None => polled_after_completion("chain::LinkFuture"),
                    };
                    match step {
                        Step::Return(out) => {
                            this.state.set(State::Done);
                            return Poll::Ready(out);
                        }
                        Step::Hop(req, hops) => {
                            let svc = N::clone(next);
                            this.state.set(State::Next {
                                fut: Box::pin(Oneshot::new(svc, req)),
                                hops: Some(hops),
                            });
                        }
                    }
                }
                StateProj::Next { fut, hops } => {
                    let result = ready!(fut.as_mut().poll(cx));
                    let out = match hops.take() {
                        Some(prev) => after_next(prev, result, this.policy),
                        None => polled_after_completion("chain::LinkFuture"),
                    };
                    this.state.set(State::Done);
                    return Poll::Ready(out);
                }
                StateProj::Done => polled_after_completion("chain::LinkFuture"),
            }
        }
    }
}

fn primary_hops<C>(policy: &LinkPolicy<C>, result: HopResult) -> ChainHops {
    ChainHops::new(Hop::new(policy.primary_name.clone(), result))
}

/// Why the request cannot go to the next link, if it cannot.
fn hop_blocker<B>(
    spare: &Option<Req<B>>,
    idempotent: bool,
    never_sent: bool,
    non_idempotent: bool,
) -> Option<StopReason> {
    if spare.is_none() {
        Some(StopReason::BodyOverLimit)
    } else if !crate::classify::may_send_again(idempotent, non_idempotent, never_sent) {
        Some(StopReason::NonIdempotent)
    } else {
        None
    }
}

fn after_primary<RB, E, B, C>(
    result: Result<Response<RB>, E>,
    classifier: C::Classifier,
    spare: Option<Req<B>>,
    idempotent: bool,
    policy: &LinkPolicy<C>,
) -> Step<RB, B>
where
    E: Into<BoxError>,
    C: Classify,
    RB: Body + Send + 'static,
{
    match result {
        Ok(mut res) => {
            // A primary that is itself a chain reports its own trail.
            let mut hops = match res.extensions_mut().remove::<ChainHops>() {
                Some(h) => h,
                None => primary_hops(policy, HopResult::Status(res.status())),
            };
            if hops.settled {
                res.extensions_mut().insert(hops);
                return Step::Return(Ok(res));
            }
            let kind = match classifier.classify_response(&res) {
                Outcome::Failure(kind) => kind,
                Outcome::Success | Outcome::Ignored => {
                    hops.settled = true;
                    res.extensions_mut().insert(hops);
                    return Step::Return(Ok(res));
                }
            };
            match (
                hop_blocker(&spare, idempotent, false, policy.non_idempotent),
                spare,
            ) {
                (None, Some(mut req)) => {
                    trace_hop(&hops, policy, &kind);
                    discard(res.into_body(), policy.drain_limit, policy.drain_timeout);
                    bump_hops(&mut req, hops.len());
                    Step::Hop(req, hops)
                }
                (reason, _) => {
                    let reason = reason.unwrap_or(StopReason::BodyOverLimit);
                    trace_stop(&hops, policy, &kind, reason);
                    hops.stop(reason);
                    hops.settled = true;
                    res.extensions_mut().insert(hops);
                    Step::Return(Ok(res))
                }
            }
        }
        Err(e) => {
            let e: BoxError = e.into();
            let (mut hops, source) = match e.downcast::<ChainError>() {
                Ok(ce) => ce.into_parts(),
                Err(e) => (primary_hops(policy, HopResult::Error(error_kind(&*e))), e),
            };
            if hops.settled {
                return Step::Return(Err(ChainError::new(hops, source)));
            }
            let kind = match classifier.classify_error(&*source) {
                Outcome::Failure(kind) => kind,
                Outcome::Success | Outcome::Ignored => {
                    hops.settled = true;
                    return Step::Return(Err(ChainError::new(hops, source)));
                }
            };
            let never_sent = is_connect_error(&*source);
            match (
                hop_blocker(&spare, idempotent, never_sent, policy.non_idempotent),
                spare,
            ) {
                (None, Some(mut req)) => {
                    trace_hop(&hops, policy, &kind);
                    bump_hops(&mut req, hops.len());
                    Step::Hop(req, hops)
                }
                (reason, _) => {
                    let reason = reason.unwrap_or(StopReason::BodyOverLimit);
                    trace_stop(&hops, policy, &kind, reason);
                    hops.stop(reason);
                    hops.settled = true;
                    Step::Return(Err(ChainError::new(hops, source)))
                }
            }
        }
    }
}

fn after_next<RB, E, C>(
    mut prev: ChainHops,
    result: Result<Response<RB>, E>,
    policy: &LinkPolicy<C>,
) -> Result<Response<RB>, ChainError>
where
    E: Into<BoxError>,
{
    match result {
        Ok(mut res) => {
            let later = match res.extensions_mut().remove::<ChainHops>() {
                Some(h) => h,
                None => ChainHops::new(Hop::new(
                    policy.next_name.clone(),
                    HopResult::Status(res.status()),
                )),
            };
            prev.append(later);
            res.extensions_mut().insert(prev);
            Ok(res)
        }
        Err(e) => {
            let e: BoxError = e.into();
            let (later, source) = match e.downcast::<ChainError>() {
                Ok(ce) => ce.into_parts(),
                Err(e) => (
                    ChainHops::new(Hop::new(
                        policy.next_name.clone(),
                        HopResult::Error(error_kind(&*e)),
                    )),
                    e,
                ),
            };
            prev.append(later);
            Err(ChainError::new(prev, source))
        }
    }
}

fn trace_hop<C>(hops: &ChainHops, policy: &LinkPolicy<C>, kind: &crate::classify::FailureKind) {
    crate::telemetry::chain_hop();
    tracing::debug!(
        target: "tower_patterns::chain",
        from = %hops.last().name(),
        to = %policy.next_name,
        reason = %kind,
        "content chain hop"
    );
}

fn trace_stop<C>(
    hops: &ChainHops,
    policy: &LinkPolicy<C>,
    kind: &crate::classify::FailureKind,
    stop: StopReason,
) {
    tracing::debug!(
        target: "tower_patterns::chain",
        at = %hops.last().name(),
        to = %policy.next_name,
        reason = %kind,
        stopped = %stop,
        "content chain cannot hop, returning this link's answer"
    );
}
