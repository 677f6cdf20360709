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

use std::path::Path;

use super::certs::{certified_key, load_files, lock, sni_name, stamp, Stamp};
use super::{ServerTls, ServerTlsError};

/// Several certificates by SNI name (see the module docs).
impl ServerTls {
    /// Serves `cert_pem`/`key_pem` to clients asking for `name` by SNI: an exact name
    /// (`api.example.com`, case-insensitive) or a wildcard over one label
    /// (`*.example.com`). Exact names win over wildcards; a name matching neither gets
    /// the default certificate (or, with [`sni_only`](Self::sni_only), a failed
    /// handshake). Checked like the default pair; a name given twice keeps the last.
    pub fn sni_pem(
        self,
        name: &str,
        cert_pem: &[u8],
        key_pem: &[u8],
    ) -> Result<Self, ServerTlsError> {
        let sni = sni_name(name)?;
        let memory = Path::new("(in memory)");
        let certified = certified_key(cert_pem, memory, key_pem, memory, &self.shared.provider)?;
        self.add_sni(sni, SniSource::Memory(Arc::new(certified)))
    }

    /// Like [`sni_pem`](Self::sni_pem), from PEM files that [`reload`](Self::reload) and
    /// [`watch_files`](Self::watch_files) re-read with the default pair.
    pub fn sni_pem_files(
        self,
        name: &str,
        cert: impl AsRef<Path>,
        key: impl AsRef<Path>,
    ) -> Result<Self, ServerTlsError> {
        let sni = sni_name(name)?;
        let (cert, key) = (cert.as_ref().to_path_buf(), key.as_ref().to_path_buf());
        // Checked now: a broken pair is a start-up error, not a later handshake failure.
        load_files(&cert, &key, &self.shared.provider)?;
        self.add_sni(sni, SniSource::Files(cert, key))
    }

    fn add_sni(self, name: SniName, source: SniSource) -> Result<Self, ServerTlsError> {
        {
            let mut sni = lock(&self.shared.sni);
            sni.retain(|(n, _)| *n != name);
            sni.push((name, source));
        }
        let table = self.sni_table()?;
        self.shared.resolver.sni.store(Arc::new(table));
        *lock(&self.shared.sni_stamps) = self.sni_file_stamps();
        Ok(self)
    }

    /// The SNI table read afresh (files re-read, bytes kept); all or nothing.
    pub(super) fn sni_table(&self) -> Result<SniTable, ServerTlsError> {
        let mut table = SniTable::default();
        for (name, source) in lock(&self.shared.sni).iter() {
            let key = match source {
                SniSource::Memory(k) => k.clone(),
                SniSource::Files(cert, key) => {
                    Arc::new(load_files(cert, key, &self.shared.provider)?)
                }
            };
            table.insert(name, key);
        }
        Ok(table)
    }

    pub(super) fn sni_file_stamps(&self) -> Vec<Option<Stamp>> {
        lock(&self.shared.sni)
            .iter()
            .filter_map(|(_, s)| match s {
                SniSource::Files(cert, key) => Some([stamp(cert), stamp(key)]),
                SniSource::Memory(_) => None,
            })
            .flatten()
            .collect()
    }
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
