//! What a request holds on its endpoint while it is in flight, so that every way a
//! request can end (answered, failed, cancelled, a gRPC body dropped before its trailers)
//! gives back what it took: the in-flight count and, after an ejection, the endpoint's
//! single trial. Split from `future.rs`, whose state machine only creates and ends them.

use std::fmt;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use tokio::time::Instant;

use super::service::{Ep, MakeGate, Shared};
use crate::classify::{Classifier, Classify, StreamEnd};
use crate::gate::Gate;

pub(super) type Permit<K, M> = <<M as MakeGate<K>>::Gate as Gate>::Permit;

/// Holds an endpoint while a request is in flight to it; the count drops with it, so a
/// cancelled request is not counted forever. Also holds the endpoint's single trial after
/// an ejection, if this request got it: dropped without an outcome (cancelled), the trial
/// is handed back, or the endpoint would stay out of rotation for good.
pub(super) struct InFlight<K, S, M: MakeGate<K>> {
    pub(super) ep: Arc<Ep<K, S, M>>,
    pub(super) trial: bool,
    /// Still counted in the endpoint's `in_flight`.
    pub(super) counted: bool,
}

impl<K, S, M: MakeGate<K>> InFlight<K, S, M> {
    /// The response head arrived: no longer in flight. The guard keeps the endpoint (no
    /// second reference-count round trip just to look at it while recording the outcome).
    #[inline]
    pub(super) fn answered(&mut self) {
        if std::mem::take(&mut self.counted) {
            self.ep.in_flight.fetch_sub(1, Relaxed);
        }
    }
}

impl<K, S, M: MakeGate<K>> Drop for InFlight<K, S, M> {
    fn drop(&mut self) {
        self.answered();
        if self.trial {
            self.ep.release_trial();
        }
    }
}

/// An outcome waiting for the end of a gRPC response body. Dropped unfinished (the body
/// was not read to its end), it records nothing and hands a trial back, as a cancelled
/// request does.
pub(super) struct Deferred<K, S, M: MakeGate<K>, C: Classify> {
    pub(super) ep: Arc<Ep<K, S, M>>,
    pub(super) shared: Arc<Shared<K, S, M, C>>,
    pub(super) trial: bool,
    pub(super) permit: Option<Permit<K, M>>,
    pub(super) started: Option<Instant>,
    pub(super) classifier: Option<C::Classifier>,
}

impl<K: fmt::Debug, S, M: MakeGate<K>, C: Classify> Deferred<K, S, M, C> {
    pub(super) fn finish(mut self, end: StreamEnd<'_>) {
        let Some(c) = self.classifier.take() else {
            return;
        };
        let outcome = c.classify_end(end);
        let trial = std::mem::take(&mut self.trial);
        if self
            .ep
            .record(outcome, trial, &self.shared.health, &self.shared.clock)
        {
            self.shared.try_eject(&self.ep);
        }
        if let Some(p) = self.permit.take() {
            let elapsed = self.started.map(|t| t.elapsed()).unwrap_or_default();
            self.ep.gate.complete(p, outcome, elapsed);
        }
    }
}

impl<K, S, M: MakeGate<K>, C: Classify> Drop for Deferred<K, S, M, C> {
    fn drop(&mut self) {
        if self.trial {
            self.ep.release_trial();
        }
    }
}
