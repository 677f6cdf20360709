//! W3C trace context (`traceparent`, `tracestate`): the request's context, child ids, and
//! the hook through which every upstream call carries it (the ids and the strict parse
//! are in `ids.rs`).

use std::sync::{Mutex, PoisonError};

use http::uri::Authority;
use http::{Extensions, HeaderMap, HeaderName, HeaderValue};

use super::hex::hex_into;
use super::ids::{SpanId, TraceId, TraceParent};
use super::record::{FirstChild, Record};
use crate::fields::Seen;

/// `traceparent` (W3C Trace Context).
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
/// `tracestate` (W3C Trace Context).
pub const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
/// `x-request-id`.
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// `tracestate` may hold 32 list members of at most 256 bytes each; longer is dropped
/// rather than truncated (a cut entry would be corrupt).
const MAX_TRACESTATE: usize = 32 * 257;

/// A trace id from 16 random bytes; all zero (never, in practice) draws again.
fn trace_id_from(r: &[u8]) -> TraceId {
    match <[u8; 16]>::try_from(r) {
        Ok(id) if id != [0; 16] => TraceId(id),
        _ => TraceId::random(),
    }
}

/// `tracestate` is kept only when it is short enough and made of visible ASCII; otherwise
/// it is dropped (the W3C rule for a state we cannot vouch for).
fn valid_tracestate(v: &HeaderValue) -> bool {
    let b = v.as_bytes();
    !b.is_empty() && b.len() <= MAX_TRACESTATE && b.iter().all(|c| (0x20..0x7f).contains(c))
}

/// The request's trace fields, found in one pass over its fields (see `crate::fields`):
/// most requests carry none of the three, and three lookups of custom names cost more
/// than reading the names once (issue 14, session 17).
struct Fields<'a> {
    traceparent: Seen<'a>,
    tracestate: Seen<'a>,
    request_id: Seen<'a>,
}

impl<'a> Fields<'a> {
    fn scan(headers: &'a HeaderMap) -> Self {
        // Statics: a `const` custom name is built and dropped (a call through the `Bytes`
        // vtable) where it is used.
        static NAMES: [HeaderName; 3] = [TRACEPARENT, TRACESTATE, X_REQUEST_ID];
        let [traceparent, tracestate, request_id] =
            crate::fields::scan(headers, [&NAMES[0], &NAMES[1], &NAMES[2]]);
        Fields {
            traceparent,
            tracestate,
            request_id,
        }
    }
}

/// What the request's own headers say, read once.
struct Incoming {
    /// A valid, single `traceparent`.
    parent: Option<TraceParent>,
    /// The `tracestate` kept (only with a valid parent, and only if valid itself).
    tracestate: Option<HeaderValue>,
    /// A `tracestate` is there but not kept: the edge removes it.
    drop_tracestate: bool,
}

impl Incoming {
    fn read(f: &Fields<'_>) -> Self {
        // Two traceparent headers are as invalid as one malformed one.
        let parent = match f.traceparent {
            Seen {
                first: Some(v),
                count: 1,
            } => TraceParent::parse(v.as_bytes()),
            _ => None,
        };
        // `tracestate` is kept only with a valid parent; without one, only whether it is
        // there matters (it must then be removed).
        let tracestate = match parent {
            Some(_) => f.tracestate.first.filter(|v| valid_tracestate(v)).cloned(),
            None => None,
        };
        Incoming {
            parent,
            drop_tracestate: tracestate.is_none() && f.tracestate.first.is_some(),
            tracestate,
        }
    }

    /// The context, with the ids this request needs drawn in one call of the thread's
    /// generator (each call is a thread-local access and a reference count): the span id
    /// always, a trace id without a valid parent, a request id without a kept one.
    /// `edge`: the context is the edge layer's own, for the request whose headers it
    /// fixes (see `TraceContext::edge_headers`).
    fn context(self, sampled: bool, kept_id: Option<HeaderValue>, edge: bool) -> TraceContext {
        let mut r = [0u8; 48];
        let need =
            16 + 16 * usize::from(self.parent.is_none()) + 16 * usize::from(kept_id.is_none());
        // Word by word: `fill_bytes`'s general copy loop cost more than the words.
        let mut rng = rand::rng();
        for w in r[..need].chunks_exact_mut(8) {
            w.copy_from_slice(&rand::RngCore::next_u64(&mut rng).to_le_bytes());
        }
        let (span, rest) = r.split_at(8);
        let (child, rest) = rest.split_at(8);
        let (trace_id, parent_id, flags, rest) = match self.parent {
            Some(p) => (p.trace_id, Some(p.parent_id), p.flags, rest),
            None => (
                trace_id_from(&rest[..16]),
                None,
                u8::from(sampled),
                &rest[16..],
            ),
        };
        let span_id = span_id_from(span);
        let first_child = span_id_from(child);
        // One buffer: a new request id's 32 digits (none for a kept id), then the first
        // upstream call's `traceparent`. One allocation holding count and bytes
        // (`from_owner`); both values are slices of it, and the clones for the upstream
        // request, the access log and the answer share it (a copied `Vec` would allocate
        // again on the first clone).
        let mut b = [0u8; 32 + TRACEPARENT_LEN];
        let (id, tp) = b.split_at_mut(32);
        if kept_id.is_none() {
            hex_into(id, &rest[..16]);
        }
        tp.copy_from_slice(&traceparent_bytes(&trace_id, first_child, flags));
        let shared = bytes::Bytes::from_owner(b);
        // Only hex digits and dashes: always valid header values.
        let value = |range| {
            HeaderValue::from_maybe_shared(shared.slice(range))
                .unwrap_or(HeaderValue::from_static("0"))
        };
        let first_traceparent = value(32..32 + TRACEPARENT_LEN);
        let request_id = kept_id.unwrap_or_else(|| value(0..32));
        TraceContext {
            trace_id,
            span_id,
            parent_id,
            flags,
            tracestate: self.tracestate,
            request_id,
            calls: Mutex::new(Record::Own {
                attempts: 0,
                upstream: None,
            }),
            first: FirstChild {
                span: first_child,
                traceparent: first_traceparent,
                written_for: (trace_id, flags),
            },
            edge_headers: edge,
        }
    }
}

/// A span id from 8 random bytes; all zero (never, in practice) draws again.
fn span_id_from(r: &[u8]) -> SpanId {
    match <[u8; 8]>::try_from(r) {
        Ok(id) if id != [0; 8] => SpanId(id),
        _ => SpanId::random(),
    }
}

/// Length of a version-00 `traceparent`.
const TRACEPARENT_LEN: usize = 55;

/// The `traceparent` of `trace` with parent `span`: a fixed template, no formatter (a
/// fixed-size array, so every digit's place is known when this is compiled).
#[inline]
fn traceparent_bytes(trace: &TraceId, span: SpanId, flags: u8) -> [u8; TRACEPARENT_LEN] {
    let mut b = *b"00-00000000000000000000000000000000-0000000000000000-00";
    hex_into(&mut b[3..35], &trace.0);
    hex_into(&mut b[36..52], &span.0);
    hex_into(&mut b[53..55], &[flags]);
    b
}

/// A request id is kept when it is 1 to 128 visible ASCII bytes.
fn valid_request_id(v: &HeaderValue) -> bool {
    let b = v.as_bytes();
    !b.is_empty() && b.len() <= 128 && b.iter().all(|c| (0x21..0x7f).contains(c))
}

/// The trace context of one request, in its extensions; [`RequestTraceLayer`](super::RequestTraceLayer)
/// puts it there, and [`Forward`](crate::proxy::Forward) sends a child of it on every
/// upstream call (each retry attempt and chain hop gets its own span id).
#[derive(Debug)]
pub struct TraceContext {
    /// The trace this request belongs to.
    pub trace_id: TraceId,
    /// The gateway's own span for this request.
    pub span_id: SpanId,
    /// The caller's span, when the request came with a valid `traceparent`.
    pub parent_id: Option<SpanId>,
    /// Trace flags sent on (bit 0: sampled).
    pub flags: u8,
    /// The caller's `tracestate`, passed on unchanged.
    pub tracestate: Option<HeaderValue>,
    /// The request id (`x-request-id`) sent upstream and answered.
    pub request_id: HeaderValue,
    /// What the request's upstream calls did (see `Record`): this context's own until it
    /// is cloned, then one record for every copy.
    calls: Mutex<Record>,
    /// The first upstream call's child, made with the context (see `FirstChild`).
    first: FirstChild,
    /// Set only on the context the edge layer puts into the request whose headers it
    /// fixed (`tracestate` kept or removed, `x-request-id` kept or set): `inject` then
    /// need not look both up again on every upstream call (two header-map probes per
    /// request). A clone is `false` (see `Clone`): a retry's copy or a composition's new
    /// request is checked as before.
    pub(crate) edge_headers: bool,
}

impl Clone for TraceContext {
    fn clone(&self) -> Self {
        TraceContext {
            trace_id: self.trace_id,
            span_id: self.span_id,
            parent_id: self.parent_id,
            flags: self.flags,
            tracestate: self.tracestate.clone(),
            request_id: self.request_id.clone(),
            // The first clone turns this context's record into the shared one.
            calls: Mutex::new(self.record().share()),
            first: self.first.clone(),
            // A clone may travel in a request whose headers the edge did not fix.
            edge_headers: false,
        }
    }
}

impl TraceContext {
    /// Reads the context from the request headers: a valid `traceparent` continues that
    /// trace, anything else (absent, malformed, unreadable) starts a new one; `tracestate`
    /// is kept only with a valid `traceparent`. The request id is kept when it is 1 to 128
    /// visible ASCII bytes, otherwise a new one is made.
    pub fn from_headers(headers: &HeaderMap, sampled: bool) -> Self {
        let f = Fields::scan(headers);
        let kept_id = f.request_id.first.filter(|v| valid_request_id(v)).cloned();
        Incoming::read(&f).context(sampled, kept_id, false)
    }

    /// [`from_headers`](Self::from_headers) at the edge, fixing the headers on the way:
    /// a `tracestate` not kept is removed, an absent or refused request id is set (one
    /// `insert`, which replaces every value the client sent). The fields are read in one
    /// pass (see `Fields`): a request that carries none of them pays one hash lookup here,
    /// the id's insert, where it paid three. The context is marked as the one whose request
    /// headers are right already (see `edge_headers`).
    pub(crate) fn at_edge(headers: &mut HeaderMap, sampled: bool) -> Self {
        let f = Fields::scan(headers);
        let incoming = Incoming::read(&f);
        let drop_tracestate = incoming.drop_tracestate;
        // The first value decides, as `get` answers: kept, the others stay with it.
        let kept_id = f.request_id.first.filter(|v| valid_request_id(v)).cloned();
        let set_id = kept_id.is_none();
        // One call making the context, returned as it is: built in the caller's place
        // (no copy of the ~240-byte context per match arm and for the mark).
        let cx = incoming.context(sampled, kept_id, true);
        if set_id {
            headers.insert(X_REQUEST_ID, cx.request_id.clone());
        }
        if drop_tracestate {
            headers.remove(TRACESTATE);
        }
        cx
    }

    /// The `traceparent` value naming `span` as the parent.
    pub fn traceparent(&self, span: SpanId) -> HeaderValue {
        let b = traceparent_bytes(&self.trace_id, span, self.flags);
        // Only hex digits and dashes: always a valid header value.
        HeaderValue::from_bytes(&b).unwrap_or(HeaderValue::from_static(""))
    }

    /// The record of the upstream calls; a poisoned lock still holds a whole record (no
    /// code under it panics but a failed allocation).
    fn record(&self) -> std::sync::MutexGuard<'_, Record> {
        self.calls.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// How many upstream calls this request made so far (retries and chain hops count).
    pub fn attempts(&self) -> u32 {
        self.record().attempts()
    }

    /// The endpoint (`host:port`) of the latest upstream call.
    pub fn upstream(&self) -> Option<Authority> {
        self.record().upstream()
    }

    /// Writes the trace headers for one upstream call with a new child span id, and
    /// records the call. Returns the child span id.
    pub fn inject(&self, headers: &mut HeaderMap, upstream: &Authority) -> SpanId {
        // The first call of the request (of any copy of its context) takes the child
        // made with the context, unless the trace id or flags were changed since; every
        // later call draws its own.
        let first = self.record().call(upstream);
        let (child, value) = if first && self.first.written_for == (self.trace_id, self.flags) {
            (self.first.span, self.first.traceparent.clone())
        } else {
            let child = SpanId::random();
            (child, self.traceparent(child))
        };
        headers.insert(TRACEPARENT, value);
        // The edge layer already left its request's own `tracestate` and `x-request-id`
        // right (kept, replaced or removed); any other request carrying the context (a
        // composition's call, a retry's copy: clones, not marked) gets them here.
        if !self.edge_headers {
            if let Some(s) = &self.tracestate {
                if !headers.contains_key(TRACESTATE) {
                    headers.insert(TRACESTATE, s.clone());
                }
            }
            if !headers.contains_key(X_REQUEST_ID) {
                headers.insert(X_REQUEST_ID, self.request_id.clone());
            }
        }
        tracing::debug!(
            target: "tower_patterns::trace",
            trace_id = %self.trace_id,
            span_id = %child,
            upstream = upstream.as_str(),
            "upstream call"
        );
        child
    }
}

/// The hook of [`Forward`](crate::proxy::Forward): when the request carries a
/// [`TraceContext`], its headers get a child `traceparent` for this call (a no-op
/// otherwise: a bare proxy passes the client's headers through).
#[inline]
pub(crate) fn on_upstream_call(headers: &mut HeaderMap, ext: &Extensions, upstream: &Authority) {
    if let Some(cx) = ext.get::<TraceContext>() {
        cx.inject(headers, upstream);
    }
}

#[cfg(test)]
#[path = "context_tests.rs"]
mod tests;
