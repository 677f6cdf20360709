//! `Condition` text: parsed or refused, and what parses prints back to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tower_patterns::classify::Condition;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(c) = text.parse::<Condition>() {
        let printed = c.to_string();
        let back: Condition = printed.parse().expect("the canonical text parses");
        assert_eq!(back, c, "{text:?} -> {printed:?}");
    }
});
