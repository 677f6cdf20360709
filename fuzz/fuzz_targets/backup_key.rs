//! A request path from a client becomes a backup key: refused, or safe under the root.
#![no_main]

use std::path::{Component, Path};

use libfuzzer_sys::fuzz_target;
use tower_patterns::backup::{FsSink, ObjectKey};

fuzz_target!(|data: &[u8]| {
    let Ok(path) = std::str::from_utf8(data) else {
        return;
    };
    for key in [ObjectKey::from_path(path), ObjectKey::new(path)]
        .into_iter()
        .flatten()
    {
        let s = key.as_str();
        assert!(
            !s.is_empty() && s.len() <= 1024 && !s.starts_with('/'),
            "{s:?}"
        );
        assert!(
            key.segments().all(|g| !matches!(g, "" | "." | "..")),
            "{s:?}"
        );
        let root = Path::new("/srv/backup");
        let p = FsSink::new(root).path_of(&key);
        let rel = p.strip_prefix(root).expect("under the root");
        assert!(
            rel.components().all(|c| matches!(c, Component::Normal(_))),
            "{s:?} -> {p:?}"
        );
    }
});
