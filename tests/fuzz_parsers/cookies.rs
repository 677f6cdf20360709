//! Cookies sent by any client: the signed sticky cookie ([`StickyCookie`]) and the cookie
//! a [`HashKey::Cookie`] hashes.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body_util::Full;
use proptest::prelude::*;
use tower::ServiceExt;
use tower_patterns::balance::{Balance, HashKey, Picker, SameSite, StickyCookie};

use super::support::{config, junk_bytes};

fn cookie_name() -> impl Strategy<Value = String> {
    "[A-Za-z0-9_-]{1,12}"
}

fn secret() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 16..64)
}

/// Other cookies of the same site, as browsers send them: `name=value` pairs in one line,
/// values made of cookie-octets (RFC 6265 §4.1.1, no `;`, `,`, `"`, `\`, whitespace).
fn other_cookies(non_ascii: bool) -> impl Strategy<Value = Vec<Vec<u8>>> {
    let value = if non_ascii {
        // Raw UTF-8 (or Latin-1) in a value: not RFC 6265, but what applications set and
        // browsers send back unchanged.
        prop::collection::vec(
            prop_oneof![3 => prop::sample::select(b"abcXYZ019-_=.".to_vec()), 1 => 0x80u8..=0xff],
            0..12,
        )
        .boxed()
    } else {
        "[!#-+\\--:<-\\[\\]-~]{0,16}"
            .prop_map(String::into_bytes)
            .boxed()
    };
    prop::collection::vec(
        (other_name(), value).prop_map(|(n, v)| {
            let mut p = n.into_bytes();
            p.push(b'=');
            p.extend(v);
            p
        }),
        0..5,
    )
}

/// Names of other cookies, including ones that start or end like the names under test
/// (`srvx`, `xsrv`, `sid_old`): a prefix match is not a match.
fn other_name() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "[a-z][a-z0-9_]{0,8}",
        1 => "(srv|sid)[a-z0-9_]{1,3}",
        1 => "[a-z_]{1,3}(srv|sid)",
    ]
}

/// One `Cookie` line: `others_before; <pair>; others_after`.
fn cookie_line(before: &[Vec<u8>], pair: &[u8], after: &[Vec<u8>]) -> HeaderMap {
    let mut parts: Vec<&[u8]> = before.iter().map(Vec::as_slice).collect();
    parts.push(pair);
    parts.extend(after.iter().map(Vec::as_slice));
    let line = parts.join(&b"; "[..]);
    let mut h = HeaderMap::new();
    h.insert(
        "cookie",
        HeaderValue::from_bytes(&line).expect("cookie bytes are valid"),
    );
    h
}

proptest! {
    #![proptest_config(config(256))]

    /// Any name and secret: a typed error or a cookie; every accepted configuration writes
    /// a non-empty `Set-Cookie` starting with `name=<value>` whose value verifies back to
    /// the endpoint id (parse(format(x)) == x).
    #[test]
    fn config_and_round_trip(
        name in prop_oneof![cookie_name(), "\\PC{0,8}"],
        secret in prop::collection::vec(any::<u8>(), 0..48),
        path in prop::option::of("\\PC{0,12}"),
        domain in prop::option::of("\\PC{0,12}"),
        max_age in prop::option::of(any::<u64>()),
        flags in (any::<bool>(), any::<bool>(), prop::sample::select(vec![None, Some(SameSite::Strict), Some(SameSite::Lax), Some(SameSite::None)])),
        id in any::<u64>(),
    ) {
        let Ok(mut c) = StickyCookie::new(name.clone(), &secret) else {
            return Ok(());
        };
        if let Ok(p) = c.clone().path(path.as_deref()) {
            c = p;
        }
        if let Some(d) = &domain {
            if let Ok(with) = c.clone().domain(d) {
                c = with;
            }
        }
        if let Some(secs) = max_age {
            c = c.max_age(Duration::from_secs(secs));
        }
        c = c.secure(flags.0).http_only(flags.1).same_site(flags.2);

        let value = c.value_for(id);
        prop_assert_eq!(c.verify(&value), Some(id));
        let set = c.set_cookie_for(id);
        let set = set.to_str().map_err(|e| TestCaseError::fail(e.to_string()))?;
        let pair = format!("{name}={value}");
        prop_assert!(set.starts_with(&pair), "Set-Cookie {:?} for {:?}", set, pair);
        // What the browser sends back is read back to the same endpoint.
        let sent = set.split(';').next().unwrap_or_default();
        prop_assert_eq!(c.read(&cookie_line(&[], sent.as_bytes(), &[])), Some(id));
    }

    /// Arbitrary text as a cookie value: never a panic, never an endpoint (a forged value
    /// would need the 128-bit tag).
    #[test]
    fn arbitrary_values_are_refused(secret in secret(), raw in junk_bytes(80), s in "\\PC{0,60}") {
        let c = StickyCookie::new("srv", &secret).expect("valid");
        prop_assert_eq!(c.verify(&String::from_utf8_lossy(&raw)), None);
        prop_assert_eq!(c.verify(&s), None);
        if let Ok(v) = HeaderValue::from_bytes(&raw) {
            let mut h = HeaderMap::new();
            h.insert("cookie", v);
            prop_assert_eq!(c.read(&h), None);
        }
    }

    /// A valid value changed in one place names no other endpoint: refused, or (for a
    /// change that keeps the same hex meaning, such as the case of a digit) the same one.
    #[test]
    fn tampered_values_name_no_other_endpoint(
        secret in secret(),
        id in any::<u64>(),
        at in 0usize..49,
        with in any::<char>(),
        other_id in any::<u64>(),
    ) {
        let c = StickyCookie::new("srv", &secret).expect("valid");
        let mut v: Vec<char> = c.value_for(id).chars().collect();
        v[at] = with;
        let v: String = v.into_iter().collect();
        let got = c.verify(&v);
        prop_assert!(got.is_none() || got == Some(id), "{:?} verified as {:?}", v, got);
        // Another id's value is never accepted under this secret's tag for `id`.
        if other_id != id {
            let mut forged = c.value_for(other_id);
            forged.replace_range(17.., &c.value_for(id)[17..]);
            prop_assert_eq!(c.verify(&forged), None);
        }
    }

    /// The sticky cookie among other ASCII cookies of the site, anywhere in the line, is
    /// found.
    #[test]
    fn sticky_cookie_found_among_ascii_cookies(
        secret in secret(),
        id in any::<u64>(),
        before in other_cookies(false),
        after in other_cookies(false),
    ) {
        let c = StickyCookie::new("srv", &secret).expect("valid");
        let pair = format!("srv={}", c.value_for(id));
        prop_assume!(!before.iter().any(|p| p.starts_with(b"srv=")));
        prop_assert_eq!(c.read(&cookie_line(&before, pair.as_bytes(), &after)), Some(id));
    }

    /// `HashKey::Cookie` picks the same endpoint for the same cookie value whatever other
    /// ASCII cookies share the line.
    #[test]
    fn hash_cookie_ignores_other_ascii_cookies(
        value in "[A-Za-z0-9]{1,16}",
        before in other_cookies(false),
        after in other_cookies(false),
    ) {
        prop_assume!(!before.iter().any(|p| p.starts_with(b"sid=")));
        let pair = format!("sid={value}");
        let alone = hash_pick(cookie_line(&[], pair.as_bytes(), &[]));
        let among = hash_pick(cookie_line(&before, pair.as_bytes(), &after));
        prop_assert_eq!(alone, among);
    }
}

proptest! {
    #![proptest_config(config(256))]

    /// The same with raw non-ASCII bytes in another cookie's value (issue 10, item 14).
    #[test]
    fn sticky_cookie_found_among_non_ascii_cookies(
        secret in secret(),
        id in any::<u64>(),
        before in other_cookies(true),
        after in other_cookies(true),
    ) {
        let c = StickyCookie::new("srv", &secret).expect("valid");
        let pair = format!("srv={}", c.value_for(id));
        prop_assume!(!before.iter().any(|p| p.starts_with(b"srv=")));
        prop_assert_eq!(c.read(&cookie_line(&before, pair.as_bytes(), &after)), Some(id));
    }

    /// `HashKey::Cookie` with raw non-ASCII bytes in another cookie's value.
    #[test]
    fn hash_cookie_ignores_other_non_ascii_cookies(
        value in "[A-Za-z0-9]{1,16}",
        before in other_cookies(true),
        after in other_cookies(true),
    ) {
        prop_assume!(!before.iter().any(|p| p.starts_with(b"sid=")));
        let pair = format!("sid={value}");
        let alone = hash_pick(cookie_line(&[], pair.as_bytes(), &[]));
        let among = hash_pick(cookie_line(&before, pair.as_bytes(), &after));
        prop_assert_eq!(alone, among);
    }
}

/// Minimal failing input of [`sticky_cookie_found_among_non_ascii_cookies`].
#[test]
fn regression_non_ascii_cookie_hides_sticky_cookie() {
    let c = StickyCookie::new("srv", [7u8; 32]).expect("valid");
    let pair = format!("srv={}", c.value_for(42));
    assert_eq!(
        c.read(&cookie_line(&[b"a=\x80".to_vec()], pair.as_bytes(), &[])),
        Some(42)
    );
}

/// Which of eight endpoints a consistent-hash balancer keyed by cookie `sid` picks for a
/// request with these headers. Without the cookie the hash balancer falls back to another
/// policy, so a lost cookie shows up as a different (or varying) endpoint.
fn hash_pick(headers: HeaderMap) -> String {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let named = |name: String| {
            tower::service_fn(move |_req: Request<Full<Bytes>>| {
                let name = name.clone();
                async move { Ok::<_, Infallible>(Response::new(name)) }
            })
        };
        let lb = Balance::builder()
            .picker(Picker::ConsistentHash(HashKey::Cookie("sid".into())))
            .build_static((0..8).map(|i| (i, named(format!("e{i}")))));
        let mut picks = Vec::new();
        // Twice: a request whose cookie was lost is spread by the fallback, so it is
        // unlikely to land on the same endpoint on both tries *and* match the plain one.
        for _ in 0..2 {
            let mut req = Request::get("/").body(Full::default()).expect("request");
            *req.headers_mut() = headers.clone();
            let res = lb.clone().oneshot(req).await.expect("an endpoint answers");
            picks.push(res.into_body());
        }
        picks.join("+")
    })
}
