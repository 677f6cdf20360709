//! The certificate side of [`ServerTls`](super::ServerTls), shared with the SNI table
//! (`sni.rs`) and client-certificate verification (`client_cert.rs`): loading and checking
//! PEM chains and keys, the file stamps a reload compares, the rustls configuration, and
//! the lock-free resolver handshakes read. Split from `server.rs`, which keeps the public
//! type, its reload and its `Accept` implementation.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::{ArcSwap, ArcSwapOption};
use rustls::crypto::CryptoProvider;
use rustls::server::danger::ClientCertVerifier;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::server::ServerTlsError;
use super::sni::{SniName, SniTable};

/// What tells a changed file: modification time, size and (Unix) inode, which a
/// replacement by rename changes even within one timestamp tick.
pub(super) type Stamp = (SystemTime, u64, u64);
pub(super) type Stamps = (Option<Stamp>, Option<Stamp>);

/// `path`'s [`Stamp`] (`None` while it is missing, e.g. mid-rename).
pub(super) fn stamp(path: &Path) -> Option<Stamp> {
    let meta = std::fs::metadata(path).ok()?;
    #[cfg(unix)]
    let inode = std::os::unix::fs::MetadataExt::ino(&meta);
    #[cfg(not(unix))]
    let inode = 0;
    Some((meta.modified().ok()?, meta.len(), inode))
}

/// The stamps and SNI sources stay usable after a panic elsewhere (plain values).
pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub(super) fn sni_name(name: &str) -> Result<SniName, ServerTlsError> {
    SniName::parse(name).ok_or_else(|| ServerTlsError::InvalidName {
        name: name.to_string(),
    })
}

/// The rustls configuration: the resolver, ALPN h2/http1.1, tickets, and client
/// certificate verification when asked for.
pub(super) fn server_config(
    resolver: &Arc<Resolver>,
    provider: &Arc<CryptoProvider>,
    verifier: Option<Arc<dyn ClientCertVerifier>>,
) -> Result<rustls::ServerConfig, ServerTlsError> {
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let builder = match verifier {
        Some(v) => builder.with_client_cert_verifier(v),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(resolver.clone());
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    // Stateless resumption (TLS 1.3 tickets, rotated keys) besides the default
    // in-memory session cache: a returning client skips the key exchange's signature.
    config.ticketer = rustls::crypto::ring::Ticketer::new()?;
    Ok(config)
}

pub(super) fn load_files(
    cert: &Path,
    key: &Path,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, ServerTlsError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| ServerTlsError::Read {
            path: path.to_path_buf(),
            source,
        })
    };
    let (cert_pem, key_pem) = (read(cert)?, read(key)?);
    certified_key(&cert_pem, cert, &key_pem, key, provider)
}

/// Parses and checks a chain and key: at least one certificate, a key the provider can
/// sign with, and the key being the leaf certificate's.
pub(super) fn certified_key(
    cert_pem: &[u8],
    cert_path: &Path,
    key_pem: &[u8],
    key_path: &Path,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, ServerTlsError> {
    use rustls_pki_types::pem::Error as PemError;
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| ServerTlsError::Pem {
            path: cert_path.to_path_buf(),
            source,
        })?;
    if chain.is_empty() {
        return Err(ServerTlsError::NoCertificate {
            path: cert_path.to_path_buf(),
        });
    }
    let key = match PrivateKeyDer::from_pem_slice(key_pem) {
        Ok(key) => key,
        Err(PemError::NoItemsFound) => {
            return Err(ServerTlsError::NoKey {
                path: key_path.to_path_buf(),
            })
        }
        Err(source) => {
            return Err(ServerTlsError::Pem {
                path: key_path.to_path_buf(),
                source,
            })
        }
    };
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(|source| ServerTlsError::Key {
            path: key_path.to_path_buf(),
            source,
        })?;
    let certified = CertifiedKey::new(chain, signing);
    match certified.keys_match() {
        // ring's keys all expose their public key; `Unknown` would be a provider that
        // cannot tell, which is no evidence of a mismatch.
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {
            Ok(certified)
        }
        Err(rustls::Error::InconsistentKeys(_)) => Err(ServerTlsError::KeyMismatch {
            cert: cert_path.to_path_buf(),
            key: key_path.to_path_buf(),
        }),
        Err(source) => Err(ServerTlsError::Certificate {
            path: cert_path.to_path_buf(),
            source,
        }),
    }
}

/// Hands every handshake the current certificate; a reload swaps it atomically, without a
/// lock on the handshake path.
#[derive(Debug)]
pub(super) struct Resolver {
    /// The default certificate (`None`: [`ServerTls::sni_only`]).
    pub(super) current: ArcSwapOption<CertifiedKey>,
    /// Certificates by SNI name; empty unless configured.
    pub(super) sni: ArcSwap<SniTable>,
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let sni = self.sni.load();
        if !sni.is_empty() {
            if let Some(k) = hello.server_name().and_then(|n| sni.lookup(n)) {
                return Some(k);
            }
        }
        self.current.load_full()
    }
}
