//! Recording the answer of one try: what passive health and the endpoint's gate learn,
//! and when the endpoint stops counting the request as in flight.
//!
//! Split from `future.rs` (the state machine) and `attempt.rs` (what a request carries
//! between tries): every answered try goes through [`Attempt::settle`] exactly once,
//! whether it is returned, retried or deferred, so the bookkeeping cannot drift between
//! those paths.

use std::fmt;

use http::{Request, Response};
use tower_service::Service;

use super::attempt::Attempt;
use super::guard::{Deferred, InFlight};
use super::retry::CloneBody;
use super::service::MakeGate;
use crate::classify::{error_kind, Classifier, Classify, FailureKind, LateOutcomes, Outcome};
use crate::gate::Gate;
use crate::BoxError;

/// What [`Attempt::settle`] did with the answer.
pub(super) enum Settled {
    /// A gRPC answer whose status comes in its trailers: the outcome is recorded when the
    /// body ends (`classify::TrailersLayer` runs it). It is the answer: never retried.
    Deferred,
    /// Recorded now. `client_fault`: the failure was the client's (its body broke, the
    /// proxy's own resources ran out), neither charged to the endpoint nor retried.
    Recorded { client_fault: bool },
}

impl<K, S, M, C, B, RB> Attempt<K, S, M, C, B, Response<RB>>
where
    K: Clone + fmt::Debug + Send + Sync + 'static,
    S: Service<Request<B>, Response = Response<RB>> + Clone + Send + Sync + 'static,
    M: MakeGate<K>,
    C: Classify,
    B: CloneBody,
{
    /// Records the answer `res` of the try held by `guard`. Returns a guard on the same
    /// endpoint, no longer counted in flight (the caller still looks at the endpoint), and
    /// what was done.
    pub(super) fn settle(
        &mut self,
        mut guard: InFlight<K, S, M>,
        res: &mut Result<Response<RB>, BoxError>,
    ) -> (InFlight<K, S, M>, Settled) {
        // The outcome below resolves the trial, if this was one.
        let trial = std::mem::take(&mut guard.trial);
        // in_flight counts until the response head arrived, or for an upgraded
        // connection (WebSocket) until its tunnel closes: the tunnel holds the guard.
        let held = match &*res {
            Ok(r) if r.status() == http::StatusCode::SWITCHING_PROTOCOLS => {
                match r.extensions().get::<crate::proxy::Tunnel>() {
                    Some(t) => {
                        let held = InFlight {
                            ep: guard.ep.clone(),
                            trial: false,
                            counted: false,
                        };
                        t.hold(guard);
                        held
                    }
                    None => {
                        guard.answered();
                        guard
                    }
                }
            }
            _ => {
                guard.answered();
                guard
            }
        };
        let ep = &held.ep;
        // A client-caused failure says nothing about the endpoint: never charged to it,
        // never retried, whatever the configured classifier says.
        let client_fault = matches!(&*res, Err(e) if error_kind(&**e) == FailureKind::Client);
        let defer =
            matches!((&self.classifier, &*res), (Some(c), Ok(r)) if c.defers_to_trailers(r));
        if defer {
            if let (Some(c), Ok(r)) = (self.classifier.take(), res.as_mut()) {
                let deferred = Deferred {
                    ep: ep.clone(),
                    shared: self.shared.clone(),
                    trial,
                    permit: self.permit.take(),
                    started: self.started,
                    classifier: Some(c),
                };
                LateOutcomes::of(r).push(move |end| deferred.finish(end));
            }
            return (held, Settled::Deferred);
        }
        let outcome = match (self.classifier.take(), &*res) {
            _ if client_fault => Outcome::Ignored,
            (Some(c), Ok(r)) => c.classify_response(r),
            (Some(c), Err(e)) => c.classify_error(&**e),
            (None, _) => Outcome::Ignored,
        };
        if ep.record(outcome, trial, &self.shared.health, &self.shared.clock) {
            self.shared.try_eject(ep);
        }
        if let Some(p) = self.permit.take() {
            let elapsed = self.started.map(|t| t.elapsed()).unwrap_or_default();
            ep.gate.complete(p, outcome, elapsed);
        }
        (held, Settled::Recorded { client_fault })
    }
}
