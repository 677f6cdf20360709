//! `Connection` lines from a client or an origin: the fixed hop-by-hop set always goes.
#![no_main]

use http::{HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;
use tower_patterns::proxy::strip_hop_by_hop;

fuzz_target!(|data: &[u8]| {
    let mut h = HeaderMap::new();
    for line in data.split(|b| *b == b'\n') {
        if let Ok(v) = HeaderValue::from_bytes(line) {
            h.append("connection", v.clone());
            h.append("te", v.clone());
            h.append("x-end-to-end", v);
        }
    }
    strip_hop_by_hop(&mut h);
    assert!(!h.contains_key("connection") && !h.contains_key("te"));
});
