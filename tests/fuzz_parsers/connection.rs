//! `Connection` header lists and hop-by-hop stripping ([`strip_hop_by_hop`]), fed by any
//! client and any origin.

use std::collections::BTreeSet;

use http::{HeaderMap, HeaderName, HeaderValue};
use proptest::prelude::*;
use tower_patterns::proxy::strip_hop_by_hop;

use super::support::{config, header_value_bytes};

/// Always removed, whatever `Connection` says (RFC 9110 §7.6.1 and the legacy ones).
/// `Trailer` is end to end (RFC 9110 §6.6.2): not here.
const FIXED: [&str; 8] = [
    "connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "transfer-encoding",
    "upgrade",
    "keep-alive",
    "proxy-connection",
];

/// End-to-end headers a proxy must keep when nobody names them. The names a client may put
/// in `Connection` are drawn from `x-*` only: which standard headers are protected from a
/// client's `Connection` is a policy of its own, tested with the proxy.
fn extension_name() -> impl Strategy<Value = String> {
    "x-[a-z0-9]{1,3}"
}

/// One list member of `Connection` as a client may write it.
#[derive(Debug, Clone)]
enum Member {
    /// A name from the pool, in any case.
    Name(String, bool),
    /// `close`, `keep-alive`, `upgrade`, ...
    Keyword(&'static str),
    /// ASCII junk with no comma: a non-name (spaces, `@`), or an empty member.
    Junk(String),
    /// Bytes outside ASCII (obs-text), which HTTP allows in a field value.
    NonAscii(Vec<u8>),
}

fn member(non_ascii: bool) -> impl Strategy<Value = Member> {
    let base = prop_oneof![
        5 => (extension_name(), any::<bool>()).prop_map(|(n, up)| Member::Name(n, up)),
        1 => prop::sample::select(vec!["close", "keep-alive", "Keep-Alive", "upgrade", "te", "CLOSE"])
            .prop_map(Member::Keyword),
        2 => "[ -+\\--~]{0,12}".prop_map(Member::Junk),
    ];
    if non_ascii {
        prop_oneof![
            4 => base,
            1 => prop::collection::vec(0x80u8..=0xff, 1..4).prop_map(Member::NonAscii),
        ]
        .boxed()
    } else {
        base.boxed()
    }
}

impl Member {
    fn bytes(&self) -> Vec<u8> {
        match self {
            Member::Name(n, true) => n.to_ascii_uppercase().into_bytes(),
            Member::Name(n, false) => n.clone().into_bytes(),
            Member::Keyword(k) => k.as_bytes().to_vec(),
            Member::Junk(j) => j.clone().into_bytes(),
            Member::NonAscii(b) => b.clone(),
        }
    }
}

/// The headers and `Connection` lines of one message, plus the names it lists.
fn message(non_ascii: bool) -> impl Strategy<Value = (HeaderMap, BTreeSet<String>)> {
    (
        prop::collection::btree_set(extension_name(), 0..8),
        prop::collection::vec(
            prop::collection::vec(
                (
                    member(non_ascii),
                    prop::sample::select(vec![",", ", ", " , ", ",\t", ",,"]),
                ),
                0..6,
            ),
            1..3,
        ),
        prop::collection::vec(prop::sample::select(FIXED.to_vec()), 0..4),
    )
        .prop_map(|(present, lines, fixed)| {
            let mut h = HeaderMap::new();
            for n in &present {
                h.append(
                    HeaderName::from_bytes(n.as_bytes()).expect("x- name"),
                    HeaderValue::from_static("v1"),
                );
                h.append(
                    HeaderName::from_bytes(n.as_bytes()).expect("x- name"),
                    HeaderValue::from_static("v2"),
                );
            }
            for n in fixed {
                h.append(n, HeaderValue::from_static("1"));
            }
            let mut listed = BTreeSet::new();
            for line in lines {
                let mut v = Vec::new();
                for (i, (m, sep)) in line.iter().enumerate() {
                    if i > 0 {
                        v.extend_from_slice(sep.as_bytes());
                    }
                    v.extend_from_slice(&m.bytes());
                    // What a correct reader of the member sees: the trimmed token, in lower
                    // case, when it is a header name.
                    let token = String::from_utf8_lossy(&m.bytes())
                        .trim_matches([' ', '\t'])
                        .to_ascii_lowercase();
                    if HeaderName::from_bytes(token.as_bytes()).is_ok() {
                        listed.insert(token);
                    }
                }
                if let Ok(v) = HeaderValue::from_bytes(&v) {
                    h.append("connection", v);
                }
            }
            (h, listed)
        })
}

fn check(mut h: HeaderMap, listed: &BTreeSet<String>) -> Result<(), TestCaseError> {
    let before = h.clone();
    strip_hop_by_hop(&mut h);
    for f in FIXED {
        prop_assert!(!h.contains_key(f), "{} kept", f);
    }
    for name in before.keys() {
        let n = name.as_str();
        if FIXED.contains(&n) {
            continue;
        }
        if listed.contains(n) {
            prop_assert!(
                !h.contains_key(name),
                "{} is named in Connection but was kept",
                n
            );
        } else {
            // Not named: kept with every value, in order.
            let was: Vec<_> = before.get_all(name).iter().collect();
            let now: Vec<_> = h.get_all(name).iter().collect();
            prop_assert_eq!(was, now, "{} not named in Connection", n);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(512))]

    /// Arbitrary header-value bytes in `Connection` (and other headers): never a panic, and
    /// the fixed hop-by-hop set is always gone.
    #[test]
    fn arbitrary_connection_values_never_panic(
        lines in prop::collection::vec(header_value_bytes(80), 0..4),
        others in prop::collection::vec(header_value_bytes(16), 0..4),
    ) {
        let mut h = HeaderMap::new();
        for l in &lines {
            if let Ok(v) = HeaderValue::from_bytes(l) {
                h.append("connection", v);
            }
        }
        for (i, o) in others.iter().enumerate() {
            if let Ok(v) = HeaderValue::from_bytes(o) {
                h.append(FIXED[i % FIXED.len()], v.clone());
                h.append("x-other", v);
            }
        }
        strip_hop_by_hop(&mut h);
        for f in FIXED {
            prop_assert!(!h.contains_key(f));
        }
    }

    /// ASCII lists: every header named in `Connection` is removed, every other end-to-end
    /// header is kept with all its values.
    #[test]
    fn named_headers_are_stripped_others_kept((h, listed) in message(false)) {
        check(h, &listed)?;
    }
}

proptest! {
    #![proptest_config(config(512))]

    /// The same when a member of the list holds bytes outside ASCII: the other members
    /// must still be honoured.
    #[test]
    fn named_headers_are_stripped_despite_non_ascii((h, listed) in message(true)) {
        check(h, &listed)?;
    }
}

/// Minimal failing input of [`named_headers_are_stripped_despite_non_ascii`].
#[test]
fn regression_non_ascii_member_hides_x_a() {
    let mut h = HeaderMap::new();
    h.insert(
        "connection",
        HeaderValue::from_bytes(b"\x80, x-a").expect("obs-text"),
    );
    h.insert("x-a", HeaderValue::from_static("secret"));
    strip_hop_by_hop(&mut h);
    assert!(!h.contains_key("x-a"));
}
