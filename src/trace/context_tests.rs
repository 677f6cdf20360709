//! Tests of the trace context (`context.rs`): parsing, the ids drawn, the headers
//! written for the upstream and fixed at the edge.

use super::*;

const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

#[test]
fn new_ids_are_fresh_per_request() {
    let a = TraceContext::from_headers(&HeaderMap::new(), true);
    let b = TraceContext::from_headers(&HeaderMap::new(), true);
    assert_ne!(a.trace_id, b.trace_id);
    assert_ne!(a.span_id, b.span_id);
    assert_ne!(a.request_id, b.request_id);
    assert_eq!(a.request_id.len(), 32);
    // The request id is not the trace id: both are drawn, not derived from each other.
    assert_ne!(a.request_id.as_bytes(), a.trace_id.to_string().as_bytes());
}

#[test]
fn malformed_parent_starts_a_new_trace_and_drops_tracestate() {
    let mut h = HeaderMap::new();
    h.insert(
        TRACEPARENT,
        HeaderValue::from_static("00-zz-00f067aa0ba902b7-01"),
    );
    h.insert(TRACESTATE, HeaderValue::from_static("a=b"));
    let cx = TraceContext::from_headers(&h, true);
    assert_eq!(cx.parent_id, None);
    assert_eq!(cx.tracestate, None);
    assert_ne!(cx.trace_id.0, [0; 16]);

    h.insert(TRACEPARENT, HeaderValue::from_static(VALID));
    let cx = TraceContext::from_headers(&h, true);
    assert_eq!(cx.trace_id.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(cx.tracestate.as_ref().unwrap(), "a=b");
    // Two traceparent headers: invalid.
    h.append(TRACEPARENT, HeaderValue::from_static(VALID));
    assert_eq!(TraceContext::from_headers(&h, true).parent_id, None);
}

#[test]
fn each_injection_is_a_new_child_of_the_same_trace() {
    let cx = TraceContext::from_headers(&HeaderMap::new(), true);
    let mut a = HeaderMap::new();
    let mut b = HeaderMap::new();
    let sa = cx.inject(&mut a, &Authority::from_static("127.0.0.1:1"));
    let sb = cx.inject(&mut b, &Authority::from_static("127.0.0.1:2"));
    assert_ne!(sa, sb);
    let pa = TraceParent::parse(a[TRACEPARENT].as_bytes()).unwrap();
    let pb = TraceParent::parse(b[TRACEPARENT].as_bytes()).unwrap();
    assert_eq!(pa.trace_id, cx.trace_id);
    assert_eq!(pb.trace_id, cx.trace_id);
    assert_eq!(cx.attempts(), 2);
    assert_eq!(cx.upstream().unwrap().as_str(), "127.0.0.1:2");
    assert_eq!(a[X_REQUEST_ID], cx.request_id);
}

#[test]
fn the_first_call_shares_the_request_ids_allocation_and_later_calls_are_new_children() {
    let cx = TraceContext::from_headers(&HeaderMap::new(), true);
    let up = Authority::from_static("127.0.0.1:1");
    let mut first = HeaderMap::new();
    let s1 = cx.inject(&mut first, &up);
    let mut second = HeaderMap::new();
    let s2 = cx.inject(&mut second, &up);
    // Each call is its own child span of the trace, neither the gateway's own span.
    let p1 = TraceParent::parse(first[TRACEPARENT].as_bytes()).unwrap();
    let p2 = TraceParent::parse(second[TRACEPARENT].as_bytes()).unwrap();
    assert_eq!((p1.parent_id, p2.parent_id), (s1, s2));
    assert_eq!((p1.trace_id, p2.trace_id), (cx.trace_id, cx.trace_id));
    assert_eq!((p1.flags, p2.flags), (1, 1));
    assert!(s1 != s2 && s1 != cx.span_id && s2 != cx.span_id);
    // The first call's `traceparent` was written at the edge into the request id's
    // buffer (one allocation for both): it starts where the request id ends.
    let id_end = cx.request_id.as_bytes().as_ptr_range().end;
    assert_eq!(first[TRACEPARENT].as_bytes().as_ptr(), id_end);
    // A kept request id: the first `traceparent` is still made at the edge, and right.
    let mut h = HeaderMap::new();
    h.insert(X_REQUEST_ID, HeaderValue::from_static("req-1"));
    h.insert(TRACEPARENT, HeaderValue::from_static(VALID));
    let cx = TraceContext::from_headers(&h, true);
    let mut out = HeaderMap::new();
    let s = cx.inject(&mut out, &up);
    let p = TraceParent::parse(out[TRACEPARENT].as_bytes()).unwrap();
    assert_eq!(p.trace_id.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!((p.parent_id, p.flags), (s, 1));
    assert_eq!(out[X_REQUEST_ID], "req-1");
    // A layer in between changed the public flags (a sampling decision) before the
    // first call: its `traceparent` says so.
    let mut cx = TraceContext::from_headers(&HeaderMap::new(), true);
    cx.flags = 0;
    let mut out = HeaderMap::new();
    let s = cx.inject(&mut out, &up);
    let p = TraceParent::parse(out[TRACEPARENT].as_bytes()).unwrap();
    assert_eq!((p.trace_id, p.parent_id, p.flags), (cx.trace_id, s, 0));
}

#[test]
fn the_edge_fixes_the_request_id_and_tracestate_in_place() {
    // Absent: set, and the context is the edge's.
    let mut h = HeaderMap::new();
    let cx = TraceContext::at_edge(&mut h, true);
    assert!(cx.edge_headers);
    assert_eq!(h.get_all(X_REQUEST_ID).iter().count(), 1);
    assert_eq!(h[X_REQUEST_ID], cx.request_id);
    // Refused (too long), sent twice: replaced by one new id.
    let mut h = HeaderMap::new();
    h.append(X_REQUEST_ID, HeaderValue::from_bytes(&[b'a'; 129]).unwrap());
    h.append(X_REQUEST_ID, HeaderValue::from_static("second"));
    let cx = TraceContext::at_edge(&mut h, true);
    assert_eq!(h.get_all(X_REQUEST_ID).iter().count(), 1);
    assert_eq!(h[X_REQUEST_ID], cx.request_id);
    assert_eq!(cx.request_id.len(), 32);
    // Valid: kept as sent.
    let mut h = HeaderMap::new();
    h.insert(X_REQUEST_ID, HeaderValue::from_static("req-1"));
    h.insert(TRACESTATE, HeaderValue::from_static("a=b"));
    let cx = TraceContext::at_edge(&mut h, true);
    assert_eq!(cx.request_id, "req-1");
    assert_eq!(h[X_REQUEST_ID], "req-1");
    // No valid parent: its tracestate is removed.
    assert!(!h.contains_key(TRACESTATE));
    assert_eq!(cx.tracestate, None);
    // A valid parent keeps it.
    let mut h = HeaderMap::new();
    h.insert(TRACEPARENT, HeaderValue::from_static(VALID));
    h.insert(TRACESTATE, HeaderValue::from_static("a=b"));
    let cx = TraceContext::at_edge(&mut h, true);
    assert_eq!(h[TRACESTATE], "a=b");
    assert_eq!(cx.tracestate.as_ref().unwrap(), "a=b");
}

#[test]
fn the_edge_reads_each_field_among_others_and_repeated_as_a_lookup_would() {
    let other = |h: &mut HeaderMap| {
        h.append("host", HeaderValue::from_static("gw"));
        h.append("x-request-idx", HeaderValue::from_static("not-the-id"));
        h.append("tracestatx", HeaderValue::from_static("x=y"));
        h.append("accept", HeaderValue::from_static("*/*"));
    };
    // Two parents among other fields: a new trace, its tracestate removed; a valid
    // request id sent twice is kept with both values.
    let mut h = HeaderMap::new();
    other(&mut h);
    h.append(TRACEPARENT, HeaderValue::from_static(VALID));
    h.append(X_REQUEST_ID, HeaderValue::from_static("req-1"));
    h.append(TRACESTATE, HeaderValue::from_static("a=b"));
    h.append(TRACEPARENT, HeaderValue::from_static(VALID));
    h.append(X_REQUEST_ID, HeaderValue::from_static("req-2"));
    let cx = TraceContext::at_edge(&mut h, true);
    assert_eq!(cx.parent_id, None);
    assert_ne!(cx.trace_id.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
    assert!(!h.contains_key(TRACESTATE));
    assert_eq!(cx.request_id, "req-1");
    let ids: Vec<_> = h.get_all(X_REQUEST_ID).iter().collect();
    assert_eq!(ids, ["req-1", "req-2"]);
    assert_eq!(h["x-request-idx"], "not-the-id");
    assert_eq!(h["tracestatx"], "x=y");
    // One valid parent after other fields: continued; the first tracestate is the
    // one kept, a refused first request id is replaced by one new id.
    let mut h = HeaderMap::new();
    h.append(X_REQUEST_ID, HeaderValue::from_static(""));
    other(&mut h);
    h.append(TRACESTATE, HeaderValue::from_static("a=b"));
    h.append(TRACESTATE, HeaderValue::from_static("c=d"));
    h.append(X_REQUEST_ID, HeaderValue::from_static("req-2"));
    h.append(TRACEPARENT, HeaderValue::from_static(VALID));
    let cx = TraceContext::at_edge(&mut h, true);
    assert_eq!(cx.trace_id.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(cx.tracestate.as_ref().unwrap(), "a=b");
    assert_eq!(cx.request_id.len(), 32);
    assert_eq!(h.get_all(X_REQUEST_ID).iter().count(), 1);
    assert_eq!(h[X_REQUEST_ID], cx.request_id);
    // A first tracestate that is refused drops the state, all of it.
    let mut h = HeaderMap::new();
    h.append(TRACEPARENT, HeaderValue::from_static(VALID));
    h.append(TRACESTATE, HeaderValue::from_bytes(&[0x80]).unwrap());
    h.append(TRACESTATE, HeaderValue::from_static("c=d"));
    let cx = TraceContext::at_edge(&mut h, true);
    assert_eq!(cx.tracestate, None);
    assert!(!h.contains_key(TRACESTATE));
    // `from_headers` reads the same way and changes nothing.
    let mut h = HeaderMap::new();
    other(&mut h);
    h.append(TRACEPARENT, HeaderValue::from_static(VALID));
    h.append(TRACESTATE, HeaderValue::from_static("a=b"));
    h.append(X_REQUEST_ID, HeaderValue::from_static("req-3"));
    let cx = TraceContext::from_headers(&h, true);
    assert_eq!(cx.parent_id.unwrap().to_string(), "00f067aa0ba902b7");
    assert_eq!(cx.tracestate.as_ref().unwrap(), "a=b");
    assert_eq!(cx.request_id, "req-3");
}

#[test]
fn a_clone_injects_the_request_id_and_tracestate_the_edge_did_not_write() {
    let mut edge = HeaderMap::new();
    edge.insert(TRACEPARENT, HeaderValue::from_static(VALID));
    edge.insert(TRACESTATE, HeaderValue::from_static("a=b"));
    let cx = TraceContext::at_edge(&mut edge, true);
    let up = Authority::from_static("127.0.0.1:1");
    // The edge's own request: already right, nothing added twice.
    cx.inject(&mut edge, &up);
    assert_eq!(edge.get_all(X_REQUEST_ID).iter().count(), 1);
    assert_eq!(edge.get_all(TRACESTATE).iter().count(), 1);
    // A clone (a composition's new request, a retry's copy) is not the edge's: a
    // request without the headers gets them.
    let copy = cx.clone();
    assert!(!copy.edge_headers);
    let mut fresh = HeaderMap::new();
    copy.inject(&mut fresh, &up);
    assert_eq!(fresh[X_REQUEST_ID], cx.request_id);
    assert_eq!(fresh[TRACESTATE], "a=b");
}
