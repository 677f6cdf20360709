//! Several certificates on one listener, chosen by the name the client asks for (SNI):
//! one proxy fronting `api.example.com`, `*.shop.example.com` and a default, as nginx
//! does with one `server` block per `server_name`.
//!
//! rustls' own `ResolvesServerCertUsingSni` knows exact names only and cannot be swapped
//! on reload, so the table here is an immutable map behind the same `ArcSwap` as the
//! default certificate: a lookup is one atomic load and a hash probe, a reload one store.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use rustls::sign::CertifiedKey;

/// A name certificates are chosen by: exact (`api.example.com`) or a wildcard over one
/// label (`*.example.com`, which matches `a.example.com`, not `a.b.example.com` nor
/// `example.com`, as RFC 6125 §6.4.3 matches certificates).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum SniName {
    Exact(String),
    /// The suffix after `*.`.
    Wildcard(String),
}

impl SniName {
    /// Lower-cased; `None` for an empty name, a bare `*`, or a `*` anywhere but a whole
    /// first label.
    pub(crate) fn parse(name: &str) -> Option<SniName> {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        let valid = |s: &str| {
            !s.is_empty()
                && !s.contains('*')
                && s.split('.').all(|l| {
                    !l.is_empty()
                        && l.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                })
        };
        match name.strip_prefix("*.") {
            Some(suffix) if valid(suffix) => Some(SniName::Wildcard(suffix.to_string())),
            Some(_) => None,
            None if valid(&name) => Some(SniName::Exact(name)),
            None => None,
        }
    }
}

/// The certificates by name, replaced whole on reload.
#[derive(Debug, Default)]
pub(crate) struct SniTable {
    exact: HashMap<String, Arc<CertifiedKey>>,
    wildcard: HashMap<String, Arc<CertifiedKey>>,
}

impl SniTable {
    pub(crate) fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.wildcard.is_empty()
    }

    pub(crate) fn insert(&mut self, name: &SniName, key: Arc<CertifiedKey>) {
        match name {
            SniName::Exact(n) => self.exact.insert(n.clone(), key),
            SniName::Wildcard(s) => self.wildcard.insert(s.clone(), key),
        };
    }

    /// The certificate for `server_name` (as rustls gives it: a DNS name), exact names
    /// first, then a wildcard over its first label.
    pub(crate) fn lookup(&self, server_name: &str) -> Option<Arc<CertifiedKey>> {
        // rustls hands names over as sent; compare case-insensitively without allocating
        // when they are lower case already (the usual case).
        let lowered;
        let name = if server_name.bytes().any(|b| b.is_ascii_uppercase()) {
            lowered = server_name.to_ascii_lowercase();
            lowered.as_str()
        } else {
            server_name
        };
        let name = name.trim_end_matches('.');
        if let Some(k) = self.exact.get(name) {
            return Some(k.clone());
        }
        let (_, suffix) = name.split_once('.')?;
        self.wildcard.get(suffix).cloned()
    }
}

/// Where an SNI certificate comes from: files are re-read on reload, bytes are kept.
#[derive(Debug, Clone)]
pub(crate) enum SniSource {
    Files(PathBuf, PathBuf),
    Memory(Arc<CertifiedKey>),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_lower_cased_and_wildcards_cover_one_label() {
        assert_eq!(
            SniName::parse("API.Example.com."),
            Some(SniName::Exact("api.example.com".into()))
        );
        assert_eq!(
            SniName::parse("*.Example.com"),
            Some(SniName::Wildcard("example.com".into()))
        );
        for bad in ["", "*", "*.", "a.*.com", "x*.example.com", "a..b", "a b"] {
            assert_eq!(SniName::parse(bad), None, "{bad:?}");
        }
    }
}
