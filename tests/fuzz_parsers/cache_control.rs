//! `Cache-Control`, `Age`, `Expires` and `Date` from an origin, through the public surface:
//! [`StoreSink::begin`] (stored or not, synchronously) and the [`CacheLayer`] (stored, then
//! served from the store).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use http::{HeaderMap, HeaderValue, StatusCode};
use http_body_util::{BodyExt, Full};
use proptest::prelude::*;
use tower::{service_fn, Service, ServiceBuilder, ServiceExt};
use tower_patterns::backup::{ObjectInfo, ObjectKey, Sink};
use tower_patterns::cache::{CacheLayer, MemoryStore, StoreSink};

use super::support::{config, header_value_bytes, number_text};

/// Would a shared cache store a 200 with these headers? (`default_ttl` 60 s, so a response
/// whose directives cannot be read at all would be stored unless the parser fails closed.)
fn storable(headers: HeaderMap) -> bool {
    let sink =
        StoreSink::new(Arc::new(MemoryStore::new(1 << 20))).default_ttl(Duration::from_secs(60));
    let info = ObjectInfo {
        key: ObjectKey::new("k").expect("valid key"),
        status: StatusCode::OK,
        headers,
        content_length: None,
        authority: None,
    };
    sink.begin(&info)
        .now_or_never()
        .expect("StoreSink::begin does not wait")
        .is_ok()
}

fn value(bytes: &[u8]) -> Option<HeaderValue> {
    HeaderValue::from_bytes(bytes).ok()
}

/// Text around a directive: anything a header value may hold except `,` (which would make
/// it another list member, tested on its own) and `"` (a quoted string may legitimately
/// hide a comma-separated word, e.g. `foo="a, private"`).
fn junk() -> impl Strategy<Value = Vec<u8>> {
    header_value_bytes(40).prop_map(|mut v| {
        v.retain(|b| *b != b',' && *b != b'"');
        v
    })
}

/// ASCII-only junk, as above.
fn ascii_junk() -> impl Strategy<Value = Vec<u8>> {
    junk().prop_map(|mut v| {
        v.retain(u8::is_ascii);
        v
    })
}

/// A directive list mixing real directives (forbidding or not, any case) with junk members.
fn directive_list() -> impl Strategy<Value = Vec<u8>> {
    let member = prop_oneof![
        2 => prop::sample::select(vec![
            "private", "No-Store", "no-cache", "public", "max-age=60", "s-maxage=0",
            "must-revalidate", "max-age=18446744073709551616", "private=\"x\"", "",
        ])
        .prop_map(|s| s.as_bytes().to_vec()),
        1 => junk(),
    ];
    prop::collection::vec(member, 1..6).prop_map(|ms| ms.join(&b", "[..]))
}

/// A forbidding directive as an origin may spell it.
fn forbidding() -> impl Strategy<Value = String> {
    (
        prop::sample::select(vec!["private", "no-store", "no-cache"]),
        any::<bool>(),
        prop::sample::select(vec!["", " ", "\t", "  "]),
        prop::sample::select(vec!["", "=\"set-cookie\"", "=x"]),
    )
        .prop_map(|(d, upper, ws, arg)| {
            let d = if upper {
                d.to_ascii_uppercase()
            } else {
                d.to_string()
            };
            format!("{ws}{d}{arg}{ws}")
        })
}

/// `junk1, <directive>, junk2` as one value, plus `max-age=60` on another line so the
/// response would be stored without the directive.
fn with_directive(before: &[u8], d: &str, after: &[u8], split: bool) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.append("cache-control", HeaderValue::from_static("max-age=60"));
    let mut v = before.to_vec();
    v.extend_from_slice(b",");
    v.extend_from_slice(d.as_bytes());
    v.extend_from_slice(b",");
    v.extend_from_slice(after);
    if split {
        // The same list over two header lines is the same list (RFC 9110 §5.3).
        h.append("cache-control", value(before).expect("valid bytes"));
        let mut rest = d.as_bytes().to_vec();
        rest.extend_from_slice(b",");
        rest.extend_from_slice(after);
        h.append("cache-control", value(&rest).expect("valid bytes"));
    } else {
        h.append("cache-control", value(&v).expect("valid bytes"));
    }
    h
}

proptest! {
    #![proptest_config(config(512))]

    /// Any bytes in `Cache-Control`, `Age`, `Expires`, `Date`: deciding never panics, and
    /// a list with a forbidding member is not stored.
    #[test]
    fn arbitrary_headers_never_panic(
        cc in prop::collection::vec(prop_oneof![header_value_bytes(64), directive_list()], 0..3),
        age in prop::option::of(header_value_bytes(24)),
        expires in prop::option::of(header_value_bytes(40)),
        date in prop::option::of(header_value_bytes(40)),
        num in number_text(),
    ) {
        let mut h = HeaderMap::new();
        let mut forbidden = false;
        for v in cc.iter().filter_map(|v| value(v)) {
            // A member that is exactly a forbidding directive, in a line without quotes
            // (which could hide it in a quoted string) and, until the byte parser lands,
            // without non-ASCII bytes (see the ignored property below).
            let b = v.as_bytes();
            forbidden |= b.is_ascii() && !b.contains(&b'"') && b.split(|c| *c == b',').any(|m| {
                let m = m.trim_ascii();
                ["private", "no-store", "no-cache"].iter().any(|d| m.eq_ignore_ascii_case(d.as_bytes()))
            });
            h.append("cache-control", v);
        }
        if let Some(v) = value(format!("max-age={num}, s-maxage={num}").as_bytes()) {
            h.append("cache-control", v);
        }
        for (name, v) in [("age", age), ("expires", expires), ("date", date)] {
            if let Some(v) = v.as_deref().and_then(value) {
                h.insert(name, v);
            }
        }
        let stored = storable(h);
        prop_assert!(!(forbidden && stored), "a forbidding directive was stored");
    }

    /// `private`, `no-store` or `no-cache` anywhere in the list (any case, surrounded by
    /// ASCII junk, on one line or split over two) is never stored.
    #[test]
    fn forbidding_directive_with_ascii_junk_is_never_stored(
        before in ascii_junk(),
        d in forbidding(),
        after in ascii_junk(),
        split in any::<bool>(),
    ) {
        prop_assert!(!storable(with_directive(&before, &d, &after, split)));
    }

    /// An `Expires` that is not a valid date means "already expired" (RFC 9111 §5.3): never
    /// stored, even with a default lifetime; one at or before `Date` is not stored either,
    /// one after it is.
    #[test]
    fn expires_relative_to_date(
        date in 0u64..4_000_000_000,
        delta in -1_000_000i64..1_000_000,
        junk in header_value_bytes(30),
    ) {
        let at = |s: u64| std::time::UNIX_EPOCH + Duration::from_secs(s);
        let mut h = HeaderMap::new();
        h.insert("date", value(httpdate::fmt_http_date(at(date)).as_bytes()).expect("date"));
        let exp = date.saturating_add_signed(delta);
        h.insert("expires", value(httpdate::fmt_http_date(at(exp)).as_bytes()).expect("date"));
        prop_assert_eq!(storable(h.clone()), exp > date);

        if httpdate::parse_http_date(&String::from_utf8_lossy(&junk)).is_err() {
            if let Some(v) = value(&junk) {
                h.insert("expires", v);
                prop_assert!(!storable(h));
            }
        }
    }
}

proptest! {
    #![proptest_config(config(128))]

    /// `Age` and `max-age` as large as an origin may send them, a configured
    /// `stale_if_error` as large as a config file may hold, any time between two requests:
    /// the response is served, stored or not, and served again without a panic. An entry
    /// whose `Age` plus the time since has reached its `max-age` is stale (not a `HIT`);
    /// one well within it is a `HIT`.
    #[test]
    fn huge_age_and_max_age_never_panic(
        age in number_text(),
        max_age in number_text(),
        gap in prop_oneof![0u64..3, 0u64..1_000_000],
        stale in prop::option::of(prop_oneof![0u64..100, Just(u64::MAX)]),
    ) {
        let (first, second) = twice(&format!("max-age={max_age}"), &age, gap, stale);
        prop_assert_eq!(first.as_str(), "MISS");
        // Only plain digits (RFC 9111 delta-seconds) have a meaning every parser agrees on.
        let digits = |s: &str| {
            (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .then(|| s.parse::<u64>().ok())
                .flatten()
        };
        if let (Some(a), Some(m)) = (digits(&age), digits(&max_age)) {
            if a.saturating_add(gap) >= m {
                prop_assert_ne!(second.as_str(), "HIT", "Age {} + {} s >= max-age {}", a, gap, m);
            } else if m <= 1 << 31 {
                prop_assert_eq!(second.as_str(), "HIT", "Age {} + {} s < max-age {}", a, gap, m);
            }
        }
    }
}

/// Minimal failing input of [`huge_age_and_max_age_never_panic`].
#[test]
fn regression_age_u64_max() {
    let (first, second) = twice("max-age=60", &u64::MAX.to_string(), 1, None);
    assert_eq!(first, "MISS");
    assert_ne!(second, "HIT");
}

/// Minimal failing input of [`huge_age_and_max_age_never_panic`] on the `stale_if_error`
/// path (a configured duration).
#[test]
fn regression_stale_if_error_u64_max() {
    let (_, second) = twice("max-age=60", "0", 61, Some(u64::MAX));
    assert_eq!(second, "MISS");
}

/// The same with a non-ASCII byte next to the directive (issue 10, item 9).
#[test]
fn regression_private_next_to_non_ascii_byte() {
    assert!(!storable(with_directive(b"a\xe9", "private", b"", false)));
}

proptest! {
    #![proptest_config(config(512))]

    /// As above with any bytes a header value may hold, non-ASCII included: a directive
    /// list that cannot be read must fail closed.
    #[test]
    fn forbidding_directive_with_any_junk_is_never_stored(
        before in junk(),
        d in forbidding(),
        after in junk(),
        split in any::<bool>(),
    ) {
        prop_assert!(!storable(with_directive(&before, &d, &after, split)));
    }
}

/// Sends `GET /a` twice, `gap` seconds apart (paused tokio time), through a [`CacheLayer`]
/// (with `stale_if_error` seconds, if given) over an origin answering with
/// `Cache-Control: <cc>` and `Age: <age>`; returns both `X-Cache` values.
fn twice(cc: &str, age: &str, gap: u64, stale: Option<u64>) -> (String, String) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("runtime");
    let cc = cc.to_string();
    let age = age.to_string();
    rt.block_on(async move {
        let mut cache = CacheLayer::builder(MemoryStore::new(1 << 20));
        if let Some(secs) = stale {
            cache = cache.stale_if_error(Duration::from_secs(secs));
        }
        let cache = cache.build();
        let origin = service_fn(move |_req: http::Request<Full<Bytes>>| {
            let mut res = http::Response::new(Full::new(Bytes::from_static(b"hello")));
            if let Some(v) = value(cc.as_bytes()) {
                res.headers_mut().insert("cache-control", v);
            }
            if let Some(v) = value(age.as_bytes()) {
                res.headers_mut().insert("age", v);
            }
            async move { Ok::<_, std::convert::Infallible>(res) }
        });
        let mut svc = ServiceBuilder::new().layer(cache.clone()).service(origin);
        let mut labels = Vec::new();
        for i in 0..2 {
            if i == 1 {
                tokio::time::advance(Duration::from_secs(gap)).await;
            }
            let req = http::Request::get("http://fuzz.test/a")
                .body(Full::default())
                .expect("request");
            let res = svc
                .ready()
                .await
                .expect("ready")
                .call(req)
                .await
                .expect("response");
            assert_eq!(res.status(), StatusCode::OK);
            let label = res
                .headers()
                .get("x-cache")
                .map(|v| v.to_str().unwrap_or("?").to_string());
            let body = res.into_body().collect().await.expect("body").to_bytes();
            assert_eq!(&body[..], b"hello");
            labels.push(label.unwrap_or_default());
            // Let the background fill finish: it is a task on this same thread, so a few
            // yields are enough; stop early once it has stored or given up.
            for _ in 0..64 {
                let s = cache.stats().snapshot();
                if s.fills + s.fills_aborted > 0 {
                    break;
                }
                tokio::task::yield_now().await;
            }
        }
        (labels.remove(0), labels.remove(0))
    })
}
