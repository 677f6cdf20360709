//! Per-endpoint admission: the contract between the balancer and the circuit breaker.
//!
//! A balancer should not pick an endpoint whose circuit is open (linkerd2's failure
//! accrual): the call would be rejected anyway, and another endpoint could have served it.
//! A [`Gate`] answers, per call, "may this endpoint take a call now?" and is told how the
//! call ended. The balancer holds one gate per endpoint; the circuit breaker implements
//! [`Gate`]. [`NoGate`] admits everything and costs nothing.

use std::time::Duration;

use crate::classify::Outcome;

/// Admission for one endpoint.
pub trait Gate: Send + Sync + 'static {
    /// Proof of admission, held while the call runs. Dropping it without
    /// [`complete`](Gate::complete) (the call was cancelled) must release it without
    /// counting an outcome.
    type Permit: Send + 'static;

    /// Asks to send one call; `None` means the endpoint must not be picked now.
    fn try_acquire(&self) -> Option<Self::Permit>;

    /// Reports how the admitted call ended and how long it took.
    fn complete(&self, permit: Self::Permit, outcome: Outcome, elapsed: Duration);
}

/// A gate that always admits and records nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoGate;

impl Gate for NoGate {
    type Permit = ();
    #[inline]
    fn try_acquire(&self) -> Option<()> {
        Some(())
    }
    #[inline]
    fn complete(&self, _permit: (), _outcome: Outcome, _elapsed: Duration) {}
}
