//! What a request's upstream calls did (attempts, the latest endpoint), kept with its
//! trace context, and the first call's child span made with the context.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use http::uri::Authority;
use http::HeaderValue;

use super::ids::{SpanId, TraceId};

/// What the upstream calls of one request did, shared by every copy of its context
/// (request extensions are cloned per retry, the access log keeps one).
#[derive(Debug)]
pub(crate) struct Calls {
    attempts: AtomicU32,
    /// The endpoint of the latest attempt (`host:port`, from configuration; cloning it is
    /// a reference count, not an allocation).
    upstream: Mutex<Option<Authority>>,
}

/// A context's record of its request's upstream calls: its own until the context is
/// first cloned, shared with every copy from then on. Most requests' context is never
/// cloned (no access-log subscriber, no retry copy): a record shared from the start was
/// one allocation and free a request for nobody (issue 14, session 17). The one lock
/// keeps a clone and a call on another thread from both taking the first child.
#[derive(Debug)]
pub(crate) enum Record {
    Own {
        attempts: u32,
        upstream: Option<Authority>,
    },
    Shared(Arc<Calls>),
}

impl Record {
    /// A copy's record: this one, shared (made shared from its counts the first time).
    pub(crate) fn share(&mut self) -> Record {
        match self {
            Record::Shared(calls) => Record::Shared(calls.clone()),
            Record::Own { attempts, upstream } => {
                let calls = Arc::new(Calls {
                    attempts: AtomicU32::new(*attempts),
                    upstream: Mutex::new(upstream.take()),
                });
                *self = Record::Shared(calls.clone());
                Record::Shared(calls)
            }
        }
    }

    /// Counts one call to `upstream`; true for the request's first.
    pub(crate) fn call(&mut self, upstream: &Authority) -> bool {
        let set = |u: &mut Option<Authority>| {
            if u.as_ref() != Some(upstream) {
                *u = Some(upstream.clone());
            }
        };
        match self {
            Record::Own { attempts, upstream } => {
                *attempts = attempts.saturating_add(1);
                set(upstream);
                *attempts == 1
            }
            Record::Shared(calls) => {
                let first = calls.attempts.fetch_add(1, Ordering::Relaxed) == 0;
                set(&mut calls
                    .upstream
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner));
                first
            }
        }
    }

    pub(crate) fn attempts(&self) -> u32 {
        match self {
            Record::Own { attempts, .. } => *attempts,
            Record::Shared(calls) => calls.attempts.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn upstream(&self) -> Option<Authority> {
        match self {
            Record::Own { upstream, .. } => upstream.clone(),
            Record::Shared(calls) => calls
                .upstream
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        }
    }
}

/// The first upstream call's child span and its `traceparent`, made with the context: the
/// value shares the request id's buffer (one allocation for both, where the request id
/// and each call's `traceparent` were one each). Later calls (retries, chain hops) draw
/// and write their own.
#[derive(Clone, Debug)]
pub(crate) struct FirstChild {
    pub(crate) span: SpanId,
    pub(crate) traceparent: HeaderValue,
    /// The trace id and flags `traceparent` was written with: the context's fields are
    /// public, and a layer in between may change them (a sampling decision); the value is
    /// used only while they still match.
    pub(crate) written_for: (TraceId, u8),
}

#[cfg(test)]
mod tests {
    use http::HeaderMap;

    use crate::trace::TraceContext;

    fn up(s: &'static str) -> http::uri::Authority {
        http::uri::Authority::from_static(s)
    }

    #[test]
    fn copies_share_one_record_whether_cloned_before_or_after_a_call() {
        // Cloned after the first call: the copy sees it, and its own call is a retry (a
        // new child), not a second use of the first child.
        let cx = TraceContext::from_headers(&HeaderMap::new(), true);
        let first = cx.inject(&mut HeaderMap::new(), &up("a:1"));
        let copy = cx.clone();
        assert_eq!((copy.attempts(), copy.upstream()), (1, Some(up("a:1"))));
        let second = copy.inject(&mut HeaderMap::new(), &up("b:2"));
        assert_ne!(first, second);
        // The original sees the copy's call: one record.
        assert_eq!((cx.attempts(), cx.upstream()), (2, Some(up("b:2"))));
        let third = cx.clone().clone();
        assert_eq!(third.attempts(), 2);

        // Cloned before any call (the access log's copy): the first call of either takes
        // the first child, once.
        let cx = TraceContext::from_headers(&HeaderMap::new(), true);
        let log = cx.clone();
        assert_eq!((log.attempts(), log.upstream()), (0, None));
        let (mut h1, mut h2) = (HeaderMap::new(), HeaderMap::new());
        let a = cx.inject(&mut h1, &up("a:1"));
        let b = log.inject(&mut h2, &up("a:1"));
        assert_ne!(a, b);
        assert_ne!(h1.get("traceparent"), h2.get("traceparent"));
        assert_eq!(log.attempts(), 2);
        assert_eq!(cx.attempts(), 2);
    }

    #[test]
    fn an_uncloned_context_counts_its_own_calls() {
        let cx = TraceContext::from_headers(&HeaderMap::new(), true);
        assert_eq!((cx.attempts(), cx.upstream()), (0, None));
        let a = cx.inject(&mut HeaderMap::new(), &up("a:1"));
        let b = cx.inject(&mut HeaderMap::new(), &up("a:1"));
        assert_ne!(a, b);
        assert_eq!((cx.attempts(), cx.upstream()), (2, Some(up("a:1"))));
    }
}
