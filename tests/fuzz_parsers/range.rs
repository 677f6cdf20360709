//! `Range` headers from clients, through the public parser [`parse_range`] and through the
//! [`CacheLayer`] answering them from a stored entry: never a panic, every range inside the
//! body, a `206` body exactly the bytes its `Content-Range` names.

use bytes::Bytes;
use futures_util::FutureExt;
use http::{header, HeaderValue};
use http_body_util::{BodyExt, Full};
use proptest::prelude::*;
use tower::{service_fn, Service, ServiceBuilder, ServiceExt};
use tower_patterns::cache::{parse_range, CacheLayer, MemoryStore, Ranges, MAX_RANGES};

use super::support::{config, header_value_bytes, junk_bytes, number_text};

/// Range-shaped text: `bytes=` then specs built from numbers near the edges, dashes,
/// commas and spaces, sometimes with junk in between.
fn range_like() -> impl Strategy<Value = Vec<u8>> {
    let spec = (
        prop::option::of(number_text()),
        prop::option::of(number_text()),
        any::<bool>(),
    )
        .prop_map(|(a, b, dash)| {
            let mut s = a.unwrap_or_default();
            if dash {
                s.push('-');
            }
            s.push_str(&b.unwrap_or_default());
            s
        });
    (
        prop::sample::select(vec!["bytes=", "BYTES =", "bytes", "items=", ""]),
        prop::collection::vec(spec, 0..20),
        prop::sample::select(vec![",", ", ", " ,", ",,"]),
    )
        .prop_map(|(unit, specs, sep)| format!("{unit}{}", specs.join(sep)).into_bytes())
}

fn check(value: &[u8], len: u64) {
    match parse_range(value, len) {
        Ranges::Satisfiable(rs) => {
            assert!(!rs.is_empty() && rs.len() <= MAX_RANGES);
            for (a, b) in rs {
                assert!(a <= b && b < len, "({a}, {b}) outside {len} for {value:?}");
            }
        }
        Ranges::Unsatisfiable | Ranges::Ignore => {}
    }
}

proptest! {
    #![proptest_config(config(1024))]

    /// Any bytes against any length: never panics, satisfiable ranges lie in the body.
    #[test]
    fn any_bytes_never_panic(value in junk_bytes(200), len in any::<u64>()) {
        check(&value, len);
        check(&value, len % 4096);
    }

    /// Range-shaped input, numbers near `u64::MAX` included.
    #[test]
    fn range_like_values_stay_in_bounds(value in range_like(), len in prop_oneof![
        Just(0u64), Just(1u64), 0u64..10_000, Just(u64::MAX), Just(u64::MAX - 1)
    ]) {
        check(&value, len);
    }
}

proptest! {
    #![proptest_config(config(256))]

    /// Through the cache: a stored 300-byte object asked for with any `Range`: a 206
    /// carries exactly the bytes its `Content-Range` names (or multipart), a 416 nothing,
    /// anything else the full object.
    #[test]
    fn cache_answers_any_range_consistently(value in prop_oneof![range_like(), header_value_bytes(80)]) {
        let Ok(range) = HeaderValue::from_bytes(&value) else { return Ok(()) };
        let object: Vec<u8> = (0..300u32).map(|i| (i % 251) as u8).collect();
        let origin_body = Bytes::from(object.clone());
        let origin = service_fn(move |_req: http::Request<()>| {
            let body = origin_body.clone();
            async move {
                let res = http::Response::builder()
                    .header(header::CACHE_CONTROL, "max-age=60")
                    .body(Full::new(body))
                    .expect("valid response");
                Ok::<_, std::convert::Infallible>(res)
            }
        });
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(async {
            let cache = CacheLayer::new(MemoryStore::new(1 << 20));
            let mut svc = ServiceBuilder::new().layer(cache.clone()).service(origin);
            let first = svc.ready().await.expect("ready")
                .call(http::Request::get("/o").body(()).expect("request")).await.expect("miss");
            first.into_body().collect().await.expect("body");
            tokio::task::yield_now().await;
            let req = http::Request::get("/o").header(header::RANGE, range).body(()).expect("request");
            let res = svc.ready().await.expect("ready").call(req).await.expect("hit");
            let status = res.status().as_u16();
            let content_range = res.headers().get(header::CONTENT_RANGE).cloned();
            let multipart = res.headers().get(header::CONTENT_TYPE)
                .is_some_and(|v| v.as_bytes().starts_with(b"multipart/byteranges"));
            let body = res.into_body().collect().now_or_never()
                .expect("stored bodies are ready").expect("body").to_bytes();
            match status {
                200 => assert_eq!(&body[..], &object[..]),
                416 => assert!(body.is_empty()),
                206 if multipart => assert!(!body.is_empty()),
                206 => {
                    let cr = content_range.expect("Content-Range on a 206");
                    let cr = cr.to_str().expect("ASCII");
                    let (span, total) = cr.strip_prefix("bytes ").and_then(|s| s.split_once('/')).expect("form");
                    assert_eq!(total, "300");
                    let (a, b) = span.split_once('-').expect("a-b");
                    let (a, b): (usize, usize) = (a.parse().expect("a"), b.parse().expect("b"));
                    assert_eq!(&body[..], &object[a..=b]);
                }
                s => panic!("unexpected status {s}"),
            }
        });
    }
}
