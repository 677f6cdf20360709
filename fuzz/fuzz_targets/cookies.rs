//! `Cookie` lines from a client: the sticky cookie is read or ignored, never forged.
#![no_main]

use http::{HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;
use tower_patterns::balance::StickyCookie;

fuzz_target!(|data: &[u8]| {
    let c = StickyCookie::new("srv", [7u8; 32]).expect("valid");
    if let Ok(s) = std::str::from_utf8(data) {
        assert_eq!(c.verify(s), None, "forged {s:?}");
    }
    let mut h = HeaderMap::new();
    for line in data.split(|b| *b == b'\n') {
        if let Ok(v) = HeaderValue::from_bytes(line) {
            h.append("cookie", v);
        }
    }
    assert_eq!(c.read(&h), None);
    // With a valid cookie appended to the last line, it is found or the line was unusable.
    let valid = format!("; srv={}", c.value_for(42));
    let mut line = data
        .rsplit(|b| *b == b'\n')
        .next()
        .unwrap_or_default()
        .to_vec();
    line.extend_from_slice(valid.as_bytes());
    if let Ok(v) = HeaderValue::from_bytes(&line) {
        let mut h = HeaderMap::new();
        h.insert("cookie", v);
        let _ = c.read(&h);
    }
});
