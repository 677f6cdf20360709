//! Backup keys: a request path (any client) → [`ObjectKey`] → a file under [`FsSink`]'s root.

use std::path::{Component, Path};

use bytes::Bytes;
use http::StatusCode;
use proptest::prelude::*;
use tower_patterns::backup::{FsSink, NameRule, ObjectInfo, ObjectKey, PathKey, Sink};

use super::support::{config, junk_bytes};

/// The key's guarantees (see [`ObjectKey`]), checked on the accepted string and on the
/// file it maps to.
fn check_key(key: &ObjectKey) -> Result<(), TestCaseError> {
    let s = key.as_str();
    prop_assert!(!s.is_empty() && s.len() <= 1024, "{:?}", s);
    prop_assert!(!s.starts_with('/') && !s.starts_with('\\'), "{:?}", s);
    prop_assert!(
        !s.contains('\\') && !s.chars().any(char::is_control),
        "{:?}",
        s
    );
    let b = s.as_bytes();
    prop_assert!(
        !(b.len() >= 2 && b[1] == b':' && b[0].is_ascii_alphabetic()),
        "{:?}",
        s
    );
    for seg in key.segments() {
        prop_assert!(!matches!(seg, "" | "." | ".."), "{:?}", s);
    }
    // Joined under a root, every component is a plain name: nothing climbs out, nothing
    // is absolute, and the file is strictly below the root.
    let root = Path::new("/srv/backup");
    let sink = FsSink::new(root);
    let p = sink.path_of(key);
    prop_assert!(p.starts_with(root) && p != root, "{:?} -> {:?}", s, p);
    let rel = p.strip_prefix(root).expect("starts with root");
    prop_assert!(
        rel.components().all(|c| matches!(c, Component::Normal(_))),
        "{:?} -> {:?}",
        s,
        p
    );
    prop_assert_eq!(rel.components().count(), key.segments().count());
    Ok(())
}

/// Percent-encodes everything but unreserved characters and `/`.
fn encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Path segments with the traversal spellings a client may try.
fn segment() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[a-zA-Z0-9_.-]{1,10}",
        1 => prop::sample::select(vec![
            "..", ".", "", "%2e%2e", "%2E%2e", ".%2e", "%2e.", "%2e", "%2f", "%2F..", "%5c", "..%5c..",
            "%00", "%0a", "C:", "c%3a", "%c3%a9", "%ff", "%", "%2", "%zz", "\\", "..\\..",
            "\u{00e9}", "\u{202e}", ".hidden", "a.tmp", "%2e%2e%2f%2e%2e",
        ])
        .prop_map(String::from),
        1 => "\\PC{1,6}",
    ]
}

proptest! {
    #![proptest_config(config(1024))]

    /// Any string as a key: a typed error, or a key that keeps every guarantee.
    #[test]
    fn any_string_is_refused_or_safe(s in prop_oneof!["\\PC{0,40}", "[a-z./\\\\:%]{0,40}"], raw in junk_bytes(64)) {
        for s in [s, String::from_utf8_lossy(&raw).into_owned()] {
            if let Ok(k) = ObjectKey::new(&s) {
                prop_assert_eq!(k.as_str(), s.as_str());
                check_key(&k)?;
            }
        }
    }

    /// Any request path, percent-escapes and traversal spellings included: a typed error or
    /// a safe key; through a real request URI and the default [`PathKey`] rule as well.
    #[test]
    fn any_request_path_is_refused_or_safe(
        segs in prop::collection::vec(segment(), 0..8),
        leading in prop::sample::select(vec!["/", "//", "", "/./", "/../"]),
    ) {
        let path = format!("{leading}{}", segs.join("/"));
        if let Ok(k) = ObjectKey::from_path(&path) {
            check_key(&k)?;
        }
        if let Ok(uri) = format!("http://h{}{path}", if path.starts_with('/') { "" } else { "/" }).parse::<http::Uri>() {
            let (parts, ()) = http::Request::get(uri).body(()).expect("request").into_parts();
            if let Some(Ok(k)) = PathKey.key(&parts) {
                check_key(&k)?;
            }
        }
    }

    /// Very long keys: refused past 1024 bytes, whatever the characters.
    #[test]
    fn long_keys_are_bounded(seg in "[a-z\u{00e9}\u{1f600}]{1,40}", n in 1usize..200) {
        let s = vec![seg; n].join("/");
        match ObjectKey::new(&s) {
            Ok(k) => { prop_assert!(s.len() <= 1024); check_key(&k)?; }
            Err(e) => prop_assert!(s.len() > 1024, "{:?}: {}", s, e),
        }
    }

    /// A key percent-encoded into a path decodes back to itself (parse(format(x)) == x).
    #[test]
    fn encoded_keys_round_trip(segs in prop::collection::vec("[a-zA-Z0-9 _.~\u{00e9}\u{4e2d}%+?#-]{1,12}", 1..5)) {
        let s = segs.join("/");
        if let Ok(k) = ObjectKey::new(&s) {
            let back = ObjectKey::from_path(&format!("/{}", encode(&s)));
            prop_assert_eq!(back, Ok(k));
        }
    }
}

proptest! {
    #![proptest_config(config(48))]

    /// While a copy is in progress, no file under the sink's root other than the objects
    /// themselves can be named by a key: a request for a temporary file's name must not be
    /// able to replace (or later be replaced by) someone else's backup (issue 10, item 8).
    #[test]
    fn temporary_files_are_outside_the_key_namespace(segs in prop::collection::vec("[a-z0-9.]{1,8}", 1..3)) {
        let Ok(key) = ObjectKey::new(&segs.join("/")) else { return Ok(()) };
        let dir = tempfile::tempdir().expect("tempdir");
        let sink = FsSink::new(dir.path());
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let clash = rt.block_on(async {
            let info = ObjectInfo { key: key.clone(), status: StatusCode::OK, headers: Default::default(), content_length: None, authority: None };
            let mut w = sink.begin(&info).await.expect("begin");
            w.write(Bytes::from_static(b"partial")).await.expect("write");
            let clash = files_named_by_a_key(&sink, dir.path(), &key);
            w.abort().await;
            clash
        });
        prop_assert!(clash.is_empty(), "in-progress copy of {:?} is reachable as key(s) {:?}", key, clash);
    }
}

/// Every file under `root`, except `own`'s object, whose relative path is a valid key that
/// maps back to that very file.
fn files_named_by_a_key(sink: &FsSink, root: &Path, own: &ObjectKey) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read_dir").flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            let rel = p.strip_prefix(root).expect("under root");
            let Some(s) = rel
                .to_str()
                .map(|s| s.replace(std::path::MAIN_SEPARATOR, "/"))
            else {
                continue;
            };
            if let Ok(k) = ObjectKey::new(&s) {
                if &k != own && sink.path_of(&k) == p {
                    out.push(s);
                }
            }
        }
    }
    out
}
