//! HTTPS on the server side: a proxy facing browsers must terminate TLS, pick h2 or
//! HTTP/1.1 by ALPN, and renew certificates without a restart — [`ServerTls`] (whose docs
//! hold the details; this module is private).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls_pki_types::CertificateDer;
use tokio::net::TcpStream;

use super::certs::{
    certified_key, load_files, lock, server_config, stamp, Resolver, Stamp, Stamps,
};
use super::client_cert::ClientCertificate;
use super::sni::{SniName, SniSource, SniTable};
use crate::server::{Accept, Protocol};

/// Default bound on a TLS handshake (nginx: `client_header_timeout`, 60 s, covers it;
/// HAProxy: `timeout client`).
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a certificate could not be loaded (at start-up or on reload).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerTlsError {
    /// A PEM file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The PEM data is malformed.
    #[error("malformed PEM in {path}: {source}")]
    Pem {
        /// The file (or `(in memory)`).
        path: PathBuf,
        /// Why.
        source: rustls_pki_types::pem::Error,
    },
    /// The certificate file holds no certificate.
    #[error("no certificate in {path}")]
    NoCertificate {
        /// The file (or `(in memory)`).
        path: PathBuf,
    },
    /// The key file holds no private key.
    #[error("no private key in {path}")]
    NoKey {
        /// The file (or `(in memory)`).
        path: PathBuf,
    },
    /// The private key is of a kind the crypto provider cannot sign with.
    #[error("unsupported private key in {path}: {source}")]
    Key {
        /// The file (or `(in memory)`).
        path: PathBuf,
        /// Why.
        source: rustls::Error,
    },
    /// The first certificate of the chain cannot be parsed.
    #[error("invalid certificate in {path}: {source}")]
    Certificate {
        /// The file (or `(in memory)`).
        path: PathBuf,
        /// Why.
        source: rustls::Error,
    },
    /// The private key is not the one of the (first) certificate.
    #[error("the private key in {key} does not match the certificate in {cert}")]
    KeyMismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
    /// A name given to [`ServerTls::sni_pem`] or [`ServerTls::sni_pem_files`] is no DNS
    /// name nor a `*.` wildcard over one label.
    #[error("invalid SNI name {name:?}")]
    InvalidName {
        /// The name as given.
        name: String,
    },
    /// The client CA bundle cannot verify client certificates (no usable certificate in it).
    #[error("client CA bundle: {0}")]
    ClientCa(#[from] rustls::server::VerifierBuilderError),
    /// [`ServerTls::reload`] on a configuration not made from files.
    #[error("nothing to reload: the certificate was not loaded from files")]
    NotFromFiles,
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// TLS termination for [`Server`](crate::server::Server) and the per-core
/// [`Workers`](crate::server::Workers): a proxy that faces browsers or other companies'
/// clients must speak HTTPS, pick HTTP/2 or HTTP/1.1 by ALPN, and renew its certificate
/// (every 60–90 days with ACME) without dropping connections or restarting.
///
/// [`ServerTls`] is an [`Accept`]: the handshake runs in the connection's own task under a
/// timeout (a client that stalls it holds one connection slot for at most that long, never
/// the accept loop), and the negotiated ALPN protocol chooses h2 or HTTP/1.1 serving. The
/// certificate is read from PEM files and checked at start-up (missing file, no
/// certificate, no key, a key that does not match the certificate: a typed
/// [`ServerTlsError`]); [`ServerTls::reload`] or [`ServerTls::watch_files`] swap it for new
/// handshakes while connections already open keep theirs. A failed reload keeps the old
/// certificate. Clones share the certificate, so one reload reaches every worker.
///
/// ```no_run
/// use tower_patterns::server::Workers;
/// use tower_patterns::tls::ServerTls;
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let tls = ServerTls::from_pem_files("cert.pem", "key.pem")?;
/// let _watch = tls.watch_files(std::time::Duration::from_secs(30));
/// let handle = Workers::new(2).acceptor(tls).spawn("0.0.0.0:443".parse()?, |_id| {
///     tower::service_fn(|_req: http::Request<hyper::body::Incoming>| async {
///         Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(
///             bytes::Bytes::from("hi"),
///         )))
///     })
/// })?;
/// handle.join()?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct ServerTls {
    pub(super) acceptor: tokio_rustls::TlsAcceptor,
    pub(super) shared: Arc<Shared>,
    handshake_timeout: Duration,
    /// Client certificates are verified (mTLS): requests carry a [`ClientCertificate`].
    pub(super) client_auth: bool,
}

/// What clones share: the served certificate and where it comes from.
pub(super) struct Shared {
    pub(super) resolver: Arc<Resolver>,
    pub(super) provider: Arc<CryptoProvider>,
    files: Option<(PathBuf, PathBuf)>,
    /// The SNI certificates by name, in the order given (see [`ServerTls::sni_pem`]).
    pub(super) sni: Mutex<Vec<(SniName, SniSource)>>,
    /// The SNI files' stamps at the last load, in `sni` order (files only).
    pub(super) sni_stamps: Mutex<Vec<Option<Stamp>>>,
    /// The files' stamps taken just before the last load attempt (before reading, so a
    /// change during the read is seen as a change at the next check, never missed).
    stamps: Mutex<Stamps>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("files", &self.shared.files)
            .field("handshake_timeout", &self.handshake_timeout)
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    /// Loads the certificate chain (leaf first) and its private key (PKCS#8, PKCS#1 or
    /// SEC1) from PEM files, and checks that they belong together.
    pub fn from_pem_files(
        cert: impl AsRef<Path>,
        key: impl AsRef<Path>,
    ) -> Result<ServerTls, ServerTlsError> {
        let (cert, key) = (cert.as_ref().to_path_buf(), key.as_ref().to_path_buf());
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let stamps = (stamp(&cert), stamp(&key));
        let certified = load_files(&cert, &key, &provider)?;
        ServerTls::build(Some(certified), provider, Some((cert, key)), stamps)
    }

    /// Like [`from_pem_files`](Self::from_pem_files), from PEM bytes (no
    /// [`reload`](Self::reload); [`replace_pem`](Self::replace_pem) instead).
    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<ServerTls, ServerTlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let memory = Path::new("(in memory)");
        let certified = certified_key(cert_pem, memory, key_pem, memory, &provider)?;
        ServerTls::build(Some(certified), provider, None, (None, None))
    }

    /// No default certificate: only names added with [`sni_pem`](Self::sni_pem) or
    /// [`sni_pem_files`](Self::sni_pem_files) are served, and a client asking for another
    /// name (or for none) fails the handshake (nginx's `ssl_reject_handshake on` in a
    /// default server).
    pub fn sni_only() -> Result<ServerTls, ServerTlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        ServerTls::build(None, provider, None, (None, None))
    }

    fn build(
        certified: Option<CertifiedKey>,
        provider: Arc<CryptoProvider>,
        files: Option<(PathBuf, PathBuf)>,
        stamps: Stamps,
    ) -> Result<ServerTls, ServerTlsError> {
        let resolver = Arc::new(Resolver {
            current: ArcSwapOption::from(certified.map(Arc::new)),
            sni: ArcSwap::from_pointee(SniTable::default()),
        });
        let config = server_config(&resolver, &provider, None)?;
        Ok(ServerTls {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            shared: Arc::new(Shared {
                resolver,
                provider,
                files,
                sni: Mutex::new(Vec::new()),
                sni_stamps: Mutex::new(Vec::new()),
                stamps: Mutex::new(stamps),
            }),
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            client_auth: false,
        })
    }

    /// How long a client may take to complete the handshake (default 10 s).
    pub fn handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = timeout;
        self
    }

    /// Re-reads the PEM files and serves the new certificate to new handshakes;
    /// connections already open keep theirs (and so do sessions a client resumes: they
    /// were authenticated with the old one). On error the old certificate stays.
    ///
    /// The SNI certificates from files ([`sni_pem_files`](Self::sni_pem_files)) are
    /// re-read too; all files are read and checked before anything is swapped, so a
    /// broken pair anywhere keeps every old certificate.
    pub fn reload(&self) -> Result<(), ServerTlsError> {
        let sni_files = !self.sni_file_stamps().is_empty();
        if self.shared.files.is_none() && !sni_files {
            return Err(ServerTlsError::NotFromFiles);
        }
        if let Some((cert, key)) = &self.shared.files {
            *lock(&self.shared.stamps) = (stamp(cert), stamp(key));
        }
        *lock(&self.shared.sni_stamps) = self.sni_file_stamps();
        let certified = match &self.shared.files {
            Some((cert, key)) => Some(load_files(cert, key, &self.shared.provider)?),
            None => None,
        };
        let table = self.sni_table()?;
        if let Some(certified) = certified {
            self.shared
                .resolver
                .current
                .store(Some(Arc::new(certified)));
        }
        self.shared.resolver.sni.store(Arc::new(table));
        tracing::info!(files = ?self.shared.files, sni = sni_files, "TLS certificates reloaded");
        Ok(())
    }

    /// Serves a new certificate and key from PEM bytes (see [`reload`](Self::reload)).
    pub fn replace_pem(&self, cert_pem: &[u8], key_pem: &[u8]) -> Result<(), ServerTlsError> {
        let memory = Path::new("(in memory)");
        let certified = certified_key(cert_pem, memory, key_pem, memory, &self.shared.provider)?;
        self.shared
            .resolver
            .current
            .store(Some(Arc::new(certified)));
        Ok(())
    }

    /// Checks the PEM files every `every` on a background thread and
    /// [`reload`](Self::reload)s when either changed (modification time or size; symbolic
    /// links followed, as certbot's `live/` directory uses). A failed reload is logged,
    /// keeps the old certificate, and is retried at the next change. Stops when the
    /// returned handle is dropped. Without files (made by [`from_pem`](Self::from_pem)),
    /// the thread ends at once.
    pub fn watch_files(&self, every: Duration) -> FileWatch {
        let (stop, stopped) = mpsc::channel::<()>();
        let tls = self.clone();
        let spawned = std::thread::Builder::new()
            .name("tls-cert-watch".into())
            .spawn(move || {
                let files = tls.shared.files.clone();
                if files.is_none() && tls.sni_file_stamps().is_empty() {
                    return;
                }
                // `recv_timeout` is the pause, and returns at once when the handle drops.
                while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(every) {
                    // Compared with the stamps of the last load (by anyone), taken before
                    // it read the files: a change since then is never missed.
                    let same = files.as_ref().is_none_or(|(cert, key)| {
                        (stamp(cert), stamp(key)) == *lock(&tls.shared.stamps)
                    });
                    if same && tls.sni_file_stamps() == *lock(&tls.shared.sni_stamps) {
                        continue;
                    }
                    if let Err(e) = tls.reload() {
                        tracing::warn!(error = %e, "TLS certificate reload failed; keeping the old one");
                    }
                }
            });
        if let Err(e) = &spawned {
            tracing::warn!(error = %e, "cannot start the TLS certificate watch");
        }
        FileWatch {
            _stop: stop,
            thread: spawned.ok(),
        }
    }

    /// The default certificate chain served to new handshakes (leaf first); empty with
    /// [`sni_only`](Self::sni_only).
    pub fn certificate_chain(&self) -> Vec<CertificateDer<'static>> {
        self.shared
            .resolver
            .current
            .load()
            .as_ref()
            .map_or_else(Vec::new, |c| c.cert.clone())
    }
}

/// Stops [`ServerTls::watch_files`]' thread when dropped.
#[derive(Debug)]
pub struct FileWatch {
    _stop: mpsc::Sender<()>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FileWatch {
    /// Whether the watch thread runs.
    pub fn is_running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }
}

impl Accept for ServerTls {
    type Io = tokio_rustls::server::TlsStream<TcpStream>;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Io>> + Send>>;

    fn accept(&self, stream: TcpStream, _peer: SocketAddr) -> Self::Future {
        let handshake = self.acceptor.accept(stream);
        let timeout = self.handshake_timeout;
        Box::pin(async move {
            match tokio::time::timeout(timeout, handshake).await {
                Ok(done) => done,
                Err(_) => Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "TLS handshake timed out",
                )),
            }
        })
    }

    fn request_extensions(&self, io: &Self::Io) -> io::Result<Option<http::Extensions>> {
        if !self.client_auth {
            return Ok(None);
        }
        let Some(chain) = io.get_ref().1.peer_certificates() else {
            // Optional client certificates: an anonymous client.
            return Ok(None);
        };
        // Verified by rustls; a subject we cannot read closes the connection rather
        // than let the request through as if nobody had authenticated.
        let cert = ClientCertificate::from_chain(chain).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "unreadable client certificate subject",
            )
        })?;
        let mut ext = http::Extensions::new();
        ext.insert(cert);
        Ok(Some(ext))
    }

    fn protocol(&self, io: &Self::Io) -> Protocol {
        match io.get_ref().1.alpn_protocol() {
            Some(b"h2") => Protocol::Http2,
            Some(_) => Protocol::Http1,
            // No ALPN: the client's first bytes decide, as on plain TCP.
            None => Protocol::Detect,
        }
    }
}
