//! The client side: how [`Forward`](crate::proxy::Forward) verifies an `https://` upstream.

use std::fmt;
use std::sync::Arc;

use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Why a [`ClientTls`] could not be built from the given certificates.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientTlsError {
    /// A PEM input could not be parsed.
    #[error("the PEM {what} cannot be read")]
    Pem {
        /// Which input (`"CA bundle"`, `"client certificate"`, `"client key"`).
        what: &'static str,
        /// The parser's error.
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    /// A PEM input holds no certificate (or key) at all.
    #[error("the PEM {what} holds no {what}")]
    Empty {
        /// Which input.
        what: &'static str,
    },
    /// A CA certificate was refused as a trust anchor.
    #[error("a CA certificate cannot be used as a trust anchor")]
    BadCa(#[source] rustls::Error),
    /// rustls refused the configuration (e.g. a client key that does not fit its certificate).
    #[error("the TLS client configuration was refused")]
    Config(#[source] rustls::Error),
}

/// The TLS client configuration of a [`Forward`](crate::proxy::Forward): whom to trust,
/// and which certificate to show.
///
/// Cheap to clone (one `Arc<rustls::ClientConfig>`). The default
/// ([`ClientTls::webpki_roots`]) verifies upstreams against the Mozilla roots shipped in
/// `webpki-roots`. Verification is never switched off: a certificate that does not verify
/// fails the connect with [`ForwardError::Tls`](crate::proxy::ForwardError::Tls) (502).
///
/// ALPN is chosen by the `Forward` from its [`Protocol`](crate::proxy::Protocol), not here.
///
/// ```no_run
/// # fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use tower_patterns::tls::ClientTls;
/// let ca = std::fs::read("ca.pem")?;
/// let tls = ClientTls::builder().ca_pem(&ca)?.build()?;
/// let fwd = tower_patterns::proxy::ForwardBuilder::new("https://origin.internal:8443")
///     .tls(tls)
///     .build::<http_body_util::Empty<bytes::Bytes>>()?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct ClientTls {
    config: Arc<ClientConfig>,
}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientTls")
            .field(
                "client_auth",
                &self.config.client_auth_cert_resolver.has_certs(),
            )
            .finish_non_exhaustive()
    }
}

impl ClientTls {
    /// Verifies against the webpki (Mozilla) roots, no client certificate.
    pub fn webpki_roots() -> Self {
        // The builder without inputs cannot fail: the ring provider supports the default
        // protocol versions, and there is no key to check.
        match ClientTls::builder().build() {
            Ok(tls) => tls,
            Err(e) => unreachable!("default TLS client configuration refused: {e}"),
        }
    }

    /// A builder, starting from the webpki roots.
    pub fn builder() -> ClientTlsBuilder {
        ClientTlsBuilder {
            webpki_roots: true,
            custom: RootCertStore::empty(),
            client_auth: None,
        }
    }

    /// Uses a rustls configuration as given (its `alpn_protocols` are replaced by the
    /// `Forward`'s [`Protocol`](crate::proxy::Protocol)); for verifiers or providers the
    /// builder does not offer.
    pub fn from_config(config: Arc<ClientConfig>) -> Self {
        ClientTls { config }
    }

    /// The rustls configuration.
    pub fn config(&self) -> &Arc<ClientConfig> {
        &self.config
    }

    /// The same configuration (and the same session store, so resumption keeps working)
    /// offering `alpn` instead.
    pub(crate) fn with_alpn(&self, alpn: &[&[u8]]) -> Arc<ClientConfig> {
        let mut config = ClientConfig::clone(&self.config);
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }
}

/// Builds a [`ClientTls`].
pub struct ClientTlsBuilder {
    webpki_roots: bool,
    custom: RootCertStore,
    client_auth: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
}

impl fmt::Debug for ClientTlsBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientTlsBuilder")
            .field("webpki_roots", &self.webpki_roots)
            .field("custom_roots", &self.custom.len())
            .field("client_auth", &self.client_auth.is_some())
            .finish()
    }
}

impl ClientTlsBuilder {
    /// Trusts the CA certificates of a PEM bundle *instead of* the webpki roots (a
    /// private PKI should not also accept every public CA); call
    /// [`webpki_roots`](Self::webpki_roots)`(true)` afterwards to trust both.
    pub fn ca_pem(mut self, pem: &[u8]) -> Result<Self, ClientTlsError> {
        let mut added = 0usize;
        for cert in CertificateDer::pem_slice_iter(pem) {
            let cert = cert.map_err(|source| ClientTlsError::Pem {
                what: "CA bundle",
                source,
            })?;
            self.custom.add(cert).map_err(ClientTlsError::BadCa)?;
            added += 1;
        }
        if added == 0 {
            return Err(ClientTlsError::Empty { what: "CA bundle" });
        }
        self.webpki_roots = false;
        Ok(self)
    }

    /// Whether the webpki (Mozilla) roots are trusted (default `true`; `false` after
    /// [`ca_pem`](Self::ca_pem)).
    pub fn webpki_roots(mut self, yes: bool) -> Self {
        self.webpki_roots = yes;
        self
    }

    /// Shows this certificate chain (leaf first) and its private key (PKCS#8, PKCS#1 or
    /// SEC1 PEM) to an upstream that asks for one (mutual TLS).
    pub fn client_cert_pem(
        mut self,
        chain_pem: &[u8],
        key_pem: &[u8],
    ) -> Result<Self, ClientTlsError> {
        let chain = CertificateDer::pem_slice_iter(chain_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| ClientTlsError::Pem {
                what: "client certificate",
                source,
            })?;
        if chain.is_empty() {
            return Err(ClientTlsError::Empty {
                what: "client certificate",
            });
        }
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|source| match source {
            rustls_pki_types::pem::Error::NoItemsFound => {
                ClientTlsError::Empty { what: "client key" }
            }
            source => ClientTlsError::Pem {
                what: "client key",
                source,
            },
        })?;
        self.client_auth = Some((chain, key));
        Ok(self)
    }

    /// The configuration; fails when the client key does not fit its certificate or no
    /// root is trusted at all.
    pub fn build(self) -> Result<ClientTls, ClientTlsError> {
        let mut roots = self.custom;
        if self.webpki_roots {
            roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        }
        if roots.is_empty() {
            return Err(ClientTlsError::Empty { what: "CA bundle" });
        }
        // An explicit provider: the process-wide default is ambiguous when another crate
        // of the program enables aws-lc-rs as well.
        let builder =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .map_err(ClientTlsError::Config)?
                .with_root_certificates(roots);
        let config = match self.client_auth {
            None => builder.with_no_client_auth(),
            Some((chain, key)) => builder
                .with_client_auth_cert(chain, key)
                .map_err(ClientTlsError::Config)?,
        };
        Ok(ClientTls {
            config: Arc::new(config),
        })
    }
}
