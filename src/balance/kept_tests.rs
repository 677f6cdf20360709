//! Tests of the retry copy (`kept.rs`): what a retry sends is the request as it came,
//! what a spare box holds, and what the copy keeps of the server's read buffer.

use super::*;
use std::time::Duration;

/// A head with repeated and interleaved names, a sensitive value, a custom method, a
/// full URI and an extension: what a retry sends must be the same head.
fn original() -> Request<String> {
    let mut req = Request::builder()
        .method(Method::from_bytes(b"PURGE").unwrap())
        .uri("http://example.com:8080/a/b?x=1&y=2")
        .version(Version::HTTP_10)
        .header("x-a", "1")
        .header(header::HOST, "example.com")
        .header("x-a", "2")
        .header(header::COOKIE, "k=v")
        .header("x-b", "3")
        .header("x-a", "3")
        .extension(7u32)
        .body("body".to_string())
        .unwrap();
    let mut secret = HeaderValue::from_static("Bearer t");
    secret.set_sensitive(true);
    req.headers_mut().insert(header::AUTHORIZATION, secret);
    req
}

/// A request's header lines in the order they are written out (names by first value, the
/// values of one name in order): what the upstream sees.
fn pairs(r: &Request<String>) -> Vec<(header::HeaderName, header::HeaderValue)> {
    r.headers()
        .iter()
        .map(|(n, v)| (n.clone(), v.clone()))
        .collect()
}

#[test]
fn a_kept_copy_becomes_the_same_request() {
    let req = original();
    let copy = Kept::of(&req).unwrap().into_request().unwrap();
    assert_eq!(copy.method(), req.method());
    assert_eq!(copy.uri(), req.uri());
    assert_eq!(copy.version(), req.version());
    assert_eq!(copy.body(), req.body());
    assert_eq!(copy.extensions().get::<u32>(), Some(&7));
    // Same map, and the same order when written out (names by first value, values of
    // one name in order), which is what the upstream sees.
    assert_eq!(copy.headers(), req.headers());
    assert_eq!(pairs(&copy), pairs(&req));
    assert_eq!(
        copy.headers().get_all("x-a").iter().collect::<Vec<_>>(),
        ["1", "2", "3"]
    );
    assert!(copy.headers()[header::AUTHORIZATION].is_sensitive());
}

#[test]
fn the_servers_extensions_are_kept_as_values_and_come_back() {
    let peer = ClientAddr("127.0.0.1:4242".parse().unwrap());
    let limits = BodyLimits {
        max_bytes: Some(10),
        idle_timeout: Some(Duration::from_secs(3)),
    };
    let mut req = original();
    req.extensions_mut().clear();
    req.extensions_mut().insert(peer);
    req.extensions_mut().insert(limits);
    let kept = Kept::of(&req).unwrap();
    assert!(matches!(
        kept.head.get().extensions,
        KeptExtensions::Server { .. }
    ));
    let copy = kept.into_request().unwrap();
    assert_eq!(copy.extensions().len(), 2);
    assert_eq!(copy.extensions().get::<ClientAddr>(), Some(&peer));
    assert_eq!(copy.extensions().get::<BodyLimits>(), Some(&limits));
    // The peer alone, and nothing at all.
    req.extensions_mut().remove::<BodyLimits>();
    let copy = Kept::of(&req).unwrap().into_request().unwrap();
    assert_eq!(copy.extensions().len(), 1);
    assert_eq!(copy.extensions().get::<ClientAddr>(), Some(&peer));
    req.extensions_mut().clear();
    let copy = Kept::of(&req).unwrap().into_request().unwrap();
    assert!(copy.extensions().is_empty());
}

#[test]
fn any_other_extension_keeps_the_whole_map() {
    let peer = ClientAddr("127.0.0.1:4242".parse().unwrap());
    let mut req = original();
    req.extensions_mut().insert(peer);
    let kept = Kept::of(&req).unwrap();
    assert!(matches!(
        kept.head.get().extensions,
        KeptExtensions::Cloned(_)
    ));
    let copy = kept.into_request().unwrap();
    assert_eq!(copy.extensions().len(), 2);
    assert_eq!(copy.extensions().get::<ClientAddr>(), Some(&peer));
    assert_eq!(copy.extensions().get::<u32>(), Some(&7));
}

#[test]
fn a_recycled_head_carries_nothing_of_the_request_before() {
    use crate::balance::spare;
    // The first copy on this (test) thread fills a head; dropping it keeps the box.
    let first = original();
    drop(Kept::of(&first).unwrap());
    let kept_before = spare::held();
    assert!(kept_before >= 1, "a dropped copy gives its head back");
    // The next copy reuses that box: only its own request's values come back out.
    let second = Request::post("/other")
        .header("x-only", "here")
        .body("2".to_string())
        .unwrap();
    let kept = Kept::of(&second).unwrap();
    assert_eq!(spare::held(), kept_before - 1, "the spare was taken");
    let copy = kept.into_request().unwrap();
    assert_eq!(copy.method(), Method::POST);
    assert_eq!(copy.uri(), "/other");
    assert_eq!(copy.version(), Version::HTTP_11);
    assert_eq!(copy.headers().len(), 1);
    assert_eq!(copy.headers()["x-only"], "here");
    assert!(copy.extensions().is_empty());
    assert_eq!(copy.body(), "2");
    // A spare holds no value of any request: its list is empty, its URI the default.
    drop(Kept::of(&first).unwrap());
    let head = spare::take().unwrap();
    assert!(head.headers.is_empty() && head.headers.capacity() >= 6);
    assert!(head.bytes.is_empty());
    assert_eq!((head.uri, head.target), (None, 0));
    assert!(matches!(
        head.extensions,
        KeptExtensions::Server {
            peer: None,
            limits: None
        }
    ));
}

#[test]
fn a_thread_keeps_a_bounded_number_of_small_spares() {
    use crate::balance::spare::{self, MAX_BYTES, MAX_LIST, SPARES};
    // The bound the module docs state: ~40 KiB a thread at most.
    let most = SPARES
        * (std::mem::size_of::<KeptHead>()
            + MAX_LIST * std::mem::size_of::<(HeaderName, KeptValue)>()
            + MAX_BYTES);
    assert!(most <= 40 * 1024, "{most} bytes of spares a thread");
    while spare::take().is_some() {}
    // More copies alive at once than the bound: only the bound is kept.
    let req = original();
    let copies: Vec<_> = (0..SPARES + 5).map(|_| Kept::of(&req).unwrap()).collect();
    drop(copies);
    assert_eq!(spare::held(), SPARES);
    // A head with a longer list than kept spares may hold is freed, not kept.
    while spare::take().is_some() {}
    let mut big = Request::new(String::new());
    for i in 0..=MAX_LIST {
        big.headers_mut().append(
            HeaderName::from_bytes(format!("x-{i}").as_bytes()).unwrap(),
            HeaderValue::from_static("v"),
        );
    }
    drop(Kept::of(&big).unwrap());
    assert_eq!(spare::held(), 0);
}

#[test]
fn spares_are_taken_newest_first_from_the_slot_then_the_stack() {
    use crate::balance::spare;
    while spare::take().is_some() {}
    let req = original();
    let copies: Vec<_> = (0..3).map(|_| Kept::of(&req).unwrap()).collect();
    let made: Vec<*const KeptHead> = copies.iter().map(|k| k.head.get() as *const _).collect();
    // Given back first to last: the last one sits in the slot, the two before on the
    // stack; none is dropped.
    drop(copies);
    assert_eq!(spare::held(), 3);
    let taken: Vec<Box<KeptHead>> = std::iter::from_fn(spare::take).collect();
    let taken: Vec<*const KeptHead> = taken.iter().map(|h| &**h as *const _).collect();
    assert_eq!(taken, [made[2], made[1], made[0]]);
    assert_eq!(spare::held(), 0);
}

#[test]
fn a_request_without_extensions_gets_none_from_a_recycled_head() {
    use crate::balance::spare;
    while spare::take().is_some() {}
    // A server request's copy: the client's address kept as a value, then recycled.
    let mut from_server = original();
    from_server.extensions_mut().clear();
    from_server
        .extensions_mut()
        .insert(ClientAddr("127.0.0.1:4242".parse().unwrap()));
    drop(Kept::of(&from_server).unwrap());
    assert_eq!(spare::held(), 1);
    // The same box for a request without extensions (their fill is skipped): the
    // address must not come back with it.
    let bare = Request::get("/").body(String::new()).unwrap();
    let copy = Kept::of(&bare).unwrap().into_request().unwrap();
    assert!(copy.extensions().is_empty());
}

#[test]
fn a_body_that_cannot_be_copied_gives_no_copy() {
    let req = Request::new(crate::body::BoxBody::default());
    assert!(Kept::of(&req).is_none());
}

#[test]
fn an_upgrade_is_recognised_only_with_its_headers() {
    assert!(!Kept::of(&original()).unwrap().is_upgrade());
    // Upgrade headers but no hyper `OnUpgrade` (not from a server connection): the
    // proxy would not tunnel it, so neither does the check.
    let req = Request::get("/ws")
        .header(header::UPGRADE, "websocket")
        .header(header::CONNECTION, "upgrade")
        .body(String::new())
        .unwrap();
    assert!(!Kept::of(&req).unwrap().is_upgrade());
}

/// A copy in a recycled box (the common case): its target and values copied.
fn recycled_copy<B: CloneBody>(req: &Request<B>) -> Kept<B> {
    drop(Kept::of(req).unwrap());
    let kept = Kept::of(req).unwrap();
    assert!(kept.head.get().bytes.capacity() > 0, "a recycled box");
    kept
}

#[test]
fn a_recycled_copy_copies_the_bytes_and_gives_the_same_request() {
    let mut req = original();
    for uri in [
        "/a/b?x=1&y=2",
        "*",
        "/",
        "//two/slashes",
        "http://example.com:8080/a?b",
    ] {
        *req.uri_mut() = uri.parse().unwrap();
        let kept = recycled_copy(&req);
        let h = kept.head.get();
        // Origin form is copied as bytes; the absolute form is kept as a `Uri`.
        assert_eq!(h.uri.is_none(), !uri.starts_with("http"), "{uri}");
        assert!(h
            .headers
            .iter()
            .all(|(_, v)| matches!(v, KeptValue::Copied { .. })));
        let copy = kept.into_request().unwrap();
        assert_eq!(copy.uri(), req.uri());
        assert_eq!(copy.uri().to_string(), uri);
        assert_eq!(copy.method(), req.method());
        assert_eq!(copy.version(), req.version());
        assert_eq!(copy.headers(), req.headers());
        assert_eq!(pairs(&copy), pairs(&req));
        assert!(copy.headers()[header::AUTHORIZATION].is_sensitive());
        assert!(!copy.headers()[header::COOKIE].is_sensitive());
    }
}

#[test]
fn a_copy_holds_nothing_of_the_server_read_buffer() {
    // A parsed request's target and values share one buffer (the connection's read
    // buffer); the copy must not keep it alive until the response.
    let buffer = bytes::Bytes::from(b"/path?q=1 some-value".to_vec());
    let mut req = Request::new(String::new());
    *req.uri_mut() = Uri::from_maybe_shared(buffer.slice(..9)).unwrap();
    req.headers_mut().insert(
        "x-v",
        HeaderValue::from_maybe_shared(buffer.slice(10..)).unwrap(),
    );
    let kept = recycled_copy(&req);
    drop(req);
    assert!(
        buffer.is_unique(),
        "the copy keeps a reference to the buffer"
    );
    let copy = kept.into_request().unwrap();
    assert_eq!(copy.uri(), "/path?q=1");
    assert_eq!(copy.headers()["x-v"], "some-value");
}

#[test]
fn values_past_the_buffer_are_kept_as_they_are() {
    use crate::balance::spare::MAX_BYTES;
    let long = "v".repeat(MAX_BYTES);
    let mut req = original();
    req.headers_mut()
        .insert("x-long", HeaderValue::from_str(&long).unwrap());
    req.headers_mut()
        .append("x-a", HeaderValue::from_static("4"));
    let kept = recycled_copy(&req);
    let shared = kept
        .head
        .get()
        .headers
        .iter()
        .filter(|(_, v)| matches!(v, KeptValue::Shared(_)))
        .count();
    assert_eq!(shared, 1, "only the long value is past the buffer");
    let copy = kept.into_request().unwrap();
    assert_eq!(copy.headers(), req.headers());
    assert_eq!(copy.headers()["x-long"], long.as_str());
    assert_eq!(
        copy.headers().get_all("x-a").iter().collect::<Vec<_>>(),
        ["1", "2", "3", "4"]
    );
}
