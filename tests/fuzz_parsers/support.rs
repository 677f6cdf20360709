//! Shared strategies and the bounded configuration.

use proptest::prelude::*;
use proptest::test_runner::Config;

/// The configuration of one property: `default_cases` cases, or `PROPTEST_CASES` when set
/// (so a long local or nightly run needs no code change). Failures are not persisted to
/// files: a property that once failed gets an explicit regression test next to it.
pub fn config(default_cases: u32) -> Config {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default_cases);
    Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    }
}

/// Arbitrary bytes, biased toward the shapes that break header parsers: empty, long,
/// separators, quotes, non-ASCII and control bytes.
pub fn junk_bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    let byte = prop_oneof![
        4 => any::<u8>(),
        2 => prop::sample::select(b",;=\" \t:./%!\\".to_vec()),
        1 => 0x80u8..=0xff,
    ];
    prop::collection::vec(byte, 0..max)
}

/// Bytes that a `HeaderValue` accepts (visible ASCII, SP, HTAB, obs-text 0x80-0xff).
pub fn header_value_bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    let byte = prop_oneof![
        6 => 0x20u8..0x7f,
        2 => prop::sample::select(b",;= \t\"".to_vec()),
        1 => Just(b'\t'),
        2 => 0x80u8..=0xff,
    ];
    prop::collection::vec(byte, 0..max)
}

/// Decimal numbers as an origin or a config file might write them: small, near `u64::MAX`,
/// past it, signed, with junk.
pub fn number_text() -> impl Strategy<Value = String> {
    prop_oneof![
        (0u64..100_000).prop_map(|n| n.to_string()),
        (u64::MAX - 1000..=u64::MAX).prop_map(|n| n.to_string()),
        any::<u64>().prop_map(|n| n.to_string()),
        Just("18446744073709551616".to_string()),
        Just("99999999999999999999999999".to_string()),
        (0u64..100).prop_map(|n| format!("-{n}")),
        (0u64..100).prop_map(|n| format!("+{n}")),
        (0u64..100).prop_map(|n| format!("\"{n}\"")),
        "[0-9a-z. ]{0,12}",
    ]
}
