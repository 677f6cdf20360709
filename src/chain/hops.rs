//! The record of which links a request went through.

use std::fmt;
use std::sync::Arc;

use http::StatusCode;

use crate::classify::FailureKind;

/// The name of a link as it appears in the trail (a virtual-host name in a
/// [`LinkTable`](super::LinkTable)). Cloning is a reference-count increment.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LinkName(Arc<str>);

impl LinkName {
    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<&str> for LinkName {
    fn from(s: &str) -> Self {
        LinkName(Arc::from(s))
    }
}

impl From<String> for LinkName {
    fn from(s: String) -> Self {
        LinkName(Arc::from(s))
    }
}

impl fmt::Debug for LinkName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for LinkName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl PartialEq<str> for LinkName {
    fn eq(&self, other: &str) -> bool {
        &*self.0 == other
    }
}

impl PartialEq<&str> for LinkName {
    fn eq(&self, other: &&str) -> bool {
        &*self.0 == *other
    }
}

/// How one link answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HopResult {
    /// The link answered with this status.
    Status(StatusCode),
    /// The link failed without a response.
    Error(FailureKind),
}

impl fmt::Display for HopResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HopResult::Status(s) => write!(f, "{}", s.as_u16()),
            HopResult::Error(k) => write!(f, "{k}"),
        }
    }
}

/// One link tried for a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hop {
    name: LinkName,
    result: HopResult,
}

impl Hop {
    pub(crate) fn new(name: LinkName, result: HopResult) -> Self {
        Hop { name, result }
    }

    /// The link's name.
    pub fn name(&self) -> &LinkName {
        &self.name
    }

    /// How it answered.
    pub fn result(&self) -> HopResult {
        self.result
    }
}

/// Why the chain stopped at a link although its condition asked to go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StopReason {
    /// The request body was larger than the replay limit, so it could not be sent again.
    BodyOverLimit,
    /// The method is not idempotent (POST, PATCH, ...) and the link was not configured with
    /// [`non_idempotent`](super::LinkLayer::non_idempotent); the request had already
    /// reached the link.
    NonIdempotent,
}

impl StopReason {
    /// A short token, used in the report header (`; stopped=<token>`).
    pub fn token(&self) -> &'static str {
        match self {
            StopReason::BodyOverLimit => "body-over-limit",
            StopReason::NonIdempotent => "non-idempotent",
        }
    }
}

impl fmt::Display for StopReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StopReason::BodyOverLimit => "request body over the replay limit",
            StopReason::NonIdempotent => "non-idempotent method",
        })
    }
}

/// The links a request went through, in order: a response extension set by the chain (and
/// carried by [`ChainError`](super::ChainError)). Displays as STON logs it,
/// `foo.com+bar.com`.
///
/// The last hop is the one whose response (or error) was returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainHops {
    // The first hop inline: the common case (the first link answers) allocates nothing.
    first: Hop,
    rest: Vec<Hop>,
    stopped: Option<StopReason>,
    /// A link decided this result is final; an enclosing `Link` must not hop on it.
    pub(crate) settled: bool,
}

impl ChainHops {
    pub(crate) fn new(first: Hop) -> Self {
        ChainHops {
            first,
            rest: Vec::new(),
            stopped: None,
            settled: false,
        }
    }

    /// Appends the hops of `later`; its stop reason and settledness win.
    pub(crate) fn append(&mut self, later: ChainHops) {
        self.rest.reserve(1 + later.rest.len());
        self.rest.push(later.first);
        self.rest.extend(later.rest);
        self.stopped = later.stopped;
        self.settled = later.settled;
    }

    pub(crate) fn stop(&mut self, reason: StopReason) {
        self.stopped = Some(reason);
    }

    /// The hops, first to last.
    pub fn iter(&self) -> impl Iterator<Item = &Hop> + '_ {
        std::iter::once(&self.first).chain(self.rest.iter())
    }

    /// The number of links tried (at least 1).
    pub fn len(&self) -> usize {
        1 + self.rest.len()
    }

    /// Always `false`: a trail has at least one hop. Present for API symmetry with `len`.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The link whose answer was returned.
    pub fn last(&self) -> &Hop {
        self.rest.last().unwrap_or(&self.first)
    }

    /// The names of the links tried, first to last.
    pub fn names(&self) -> Vec<&str> {
        self.iter().map(|h| h.name.as_str()).collect()
    }

    /// Set when the last link's condition asked to go on but the chain could not.
    pub fn stopped(&self) -> Option<StopReason> {
        self.stopped
    }

    /// The value of the report header: `foo.com+bar.com`, followed by
    /// `; stopped=<token>` when the chain could not follow a link.
    pub fn header_value(&self) -> String {
        let mut s = self.to_string();
        if let Some(r) = self.stopped {
            s.push_str("; stopped=");
            s.push_str(r.token());
        }
        s
    }
}

impl fmt::Display for ChainHops {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.first.name.as_str())?;
        for h in &self.rest {
            write!(f, "+{}", h.name)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hop(name: &str, code: u16) -> Hop {
        Hop::new(
            name.into(),
            HopResult::Status(StatusCode::from_u16(code).unwrap()),
        )
    }

    #[test]
    fn display_and_append() {
        let mut a = ChainHops::new(hop("foo.com", 404));
        assert_eq!(a.to_string(), "foo.com");
        assert_eq!(a.last().name(), "foo.com");
        let mut b = ChainHops::new(hop("bar.com", 404));
        b.append(ChainHops::new(hop("baz.com", 200)));
        b.settled = true;
        a.append(b);
        assert_eq!(a.to_string(), "foo.com+bar.com+baz.com");
        assert_eq!(a.names(), ["foo.com", "bar.com", "baz.com"]);
        assert_eq!(a.len(), 3);
        assert!(a.settled);
        assert_eq!(a.last().result(), HopResult::Status(StatusCode::OK));
        a.stop(StopReason::BodyOverLimit);
        assert_eq!(
            a.header_value(),
            "foo.com+bar.com+baz.com; stopped=body-over-limit"
        );
        assert_eq!(a.iter().count(), 3);
    }
}
