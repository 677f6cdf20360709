//! Instances read from a registry (anyone who can write to etcd or Consul writes these) and
//! the version selector clients ask with.

use bytes::Bytes;
use http_body_util::Full;
use proptest::prelude::*;
use tower_patterns::discovery::{Instance, Selector};
use tower_patterns::proxy::Forward;

use super::support::config;

fn field() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[a-z0-9-]{1,12}",
        1 => prop::sample::select(vec![
            "", "a/b", "a b", "a%2f", "a?b", "a#b", "\u{0}", "é", "a\nb", "..", "[", "]",
        ]).prop_map(String::from),
        1 => "\\PC{0,20}",
        1 => "[a-z]{250,260}",
    ]
}

fn address() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "[a-z0-9.-]{1,20}",
        2 => any::<std::net::Ipv4Addr>().prop_map(|a| a.to_string()),
        2 => any::<std::net::Ipv6Addr>().prop_map(|a| a.to_string()),
        1 => any::<std::net::Ipv6Addr>().prop_map(|a| format!("[{a}]")),
        2 => prop::sample::select(vec![
            "", "host:80", "[::1", "::1]", "[::1]:80", "a b", "user@host", "h/p", "h?q", "h#f",
            "é.com", "[v1.x]", "[]", ":", "::", "[::ffff:1.2.3.4]", "1.2.3.4:5", "%", "a%20b",
        ]).prop_map(String::from),
        1 => "\\PC{0,24}",
    ]
}

proptest! {
    #![proptest_config(config(1024))]

    /// Any instance a registry may hold: `validate` answers with a typed error or accepts
    /// an instance whose `http_uri` is a valid upstream for `Forward`, with the instance's
    /// port, and whose service and id are safe as key and path segments.
    #[test]
    fn validated_instances_make_valid_upstreams(
        service in field(),
        id in field(),
        address in address(),
        port in prop_oneof![Just(0u16), Just(u16::MAX), any::<u16>()],
    ) {
        let inst = Instance::new(service, id, address, port);
        let _ = inst.to_string();
        if inst.validate().is_err() {
            return Ok(());
        }
        for v in [&inst.service, &inst.id] {
            prop_assert!(!v.is_empty() && !v.contains(['/', '?', '#', '%']), "{:?}", v);
            prop_assert!(!v.chars().any(|c| c.is_control() || c.is_whitespace()), "{:?}", v);
        }
        let uri: http::Uri = inst.http_uri().parse().map_err(|e| TestCaseError::fail(format!("{inst}: {e}")))?;
        prop_assert_eq!(uri.port_u16(), Some(port));
        prop_assert!(uri.host().is_some_and(|h| !h.is_empty()), "{}", uri);
        prop_assert!(Forward::<Full<Bytes>>::new(&inst.http_uri()).is_ok(), "{}", inst.http_uri());
    }

    /// A version constraint matches exactly the versions whose dot-separated components
    /// start with the constraint's (a leading `v` ignored on both sides); never a panic.
    #[test]
    fn version_constraints_match_whole_components(
        want in prop::collection::vec("[0-9]{1,2}", 0..4),
        have in prop::collection::vec("[0-9]{1,2}", 0..5),
        vw in any::<bool>(),
        vh in any::<bool>(),
        junk in "\\PC{0,12}",
    ) {
        let w = format!("{}{}", if vw { "v" } else { "" }, want.join("."));
        let h = format!("{}{}", if vh { "v" } else { "" }, have.join("."));
        let inst = Instance::new("api", "a1", "127.0.0.1", 80).with_version(h.clone());
        let expected = want.is_empty() || (want.len() <= have.len() && have[..want.len()] == want[..]);
        prop_assert_eq!(Selector::any().version(w.clone()).matches(&inst), expected, "{:?} vs {:?}", w, h);
        // Arbitrary text on either side: an answer, never a panic.
        let _ = Selector::any().version(junk.clone()).matches(&inst);
        let odd = Instance::new("api", "a1", "127.0.0.1", 80).with_version(junk);
        let _ = Selector::any().version(w).matches(&odd);
    }
}
