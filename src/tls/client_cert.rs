//! The verified client certificate of a TLS connection (mTLS), for the service: a gateway
//! forwards who called (nginx's `$ssl_client_s_dn`, Envoy's `x-forwarded-client-cert`).
//!
//! The subject is rendered as an RFC 4514 string from the certificate's DER by a small
//! reader of its own (the crate has no X.509 parser; rustls verified the certificate and
//! keeps only the DER). A subject it cannot read fails the connection rather than reach
//! the service without one (fail closed).

use std::fmt::Write as _;
use std::sync::Arc;

use rustls_pki_types::CertificateDer;

/// The client certificate a [`ServerTls`](super::ServerTls) listener verified, in the
/// extensions of every request on that connection (absent when the client sent none,
/// which only [`optional_client_cert`](super::ServerTls::optional_client_cert) allows).
#[derive(Debug, Clone)]
pub struct ClientCertificate {
    subject: Arc<str>,
    chain: Arc<[CertificateDer<'static>]>,
}

impl ClientCertificate {
    /// From the chain the client sent (leaf first); `None` when the leaf's subject cannot
    /// be read.
    pub(crate) fn from_chain(chain: &[CertificateDer<'_>]) -> Option<ClientCertificate> {
        let leaf = chain.first()?;
        let subject = subject_string(leaf.as_ref())?;
        Some(ClientCertificate {
            subject: subject.into(),
            chain: chain.iter().map(|c| c.clone().into_owned()).collect(),
        })
    }

    /// The subject's distinguished name as an RFC 4514 string, most specific first, e.g.
    /// `CN=svc-a,O=Example\, Inc.` (the format of nginx's `$ssl_client_s_dn`).
    pub fn subject(&self) -> &str {
        &self.subject
    }

    /// The leaf certificate (DER).
    pub fn leaf(&self) -> &CertificateDer<'static> {
        &self.chain[0]
    }

    /// The chain as the client sent it, leaf first (DER).
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }
}

use std::path::Path;

use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;

use super::certs::server_config;
use super::{ServerTls, ServerTlsError};
use crate::der::tlv;

/// Client certificates (mTLS) on the listener.
impl ServerTls {
    /// Requires a client certificate issued by a CA of `ca_pem` (one or more PEM
    /// certificates): a client without one, or with one that does not verify (another
    /// CA, expired, not for client authentication), fails the handshake. The verified
    /// certificate reaches the service as a [`ClientCertificate`] request extension.
    /// nginx: `ssl_verify_client on` + `ssl_client_certificate`.
    pub fn require_client_cert(self, ca_pem: &[u8]) -> Result<Self, ServerTlsError> {
        self.client_cert(ca_pem, true)
    }

    /// Like [`require_client_cert`](Self::require_client_cert), but a client may send no
    /// certificate (its requests then carry no [`ClientCertificate`]); one it sends must
    /// verify. nginx: `ssl_verify_client optional`.
    pub fn optional_client_cert(self, ca_pem: &[u8]) -> Result<Self, ServerTlsError> {
        self.client_cert(ca_pem, false)
    }

    fn client_cert(mut self, ca_pem: &[u8], required: bool) -> Result<Self, ServerTlsError> {
        let path = Path::new("(client CA)");
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(ca_pem) {
            let cert = cert.map_err(|source| ServerTlsError::Pem {
                path: path.to_path_buf(),
                source,
            })?;
            roots
                .add(cert)
                .map_err(|source| ServerTlsError::Certificate {
                    path: path.to_path_buf(),
                    source,
                })?;
        }
        if roots.is_empty() {
            return Err(ServerTlsError::NoCertificate {
                path: path.to_path_buf(),
            });
        }
        let builder = WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            self.shared.provider.clone(),
        );
        let verifier = match required {
            true => builder.build()?,
            false => builder.allow_unauthenticated().build()?,
        };
        let config = server_config(&self.shared.resolver, &self.shared.provider, Some(verifier))?;
        self.acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        self.client_auth = true;
        Ok(self)
    }
}
const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const OID: u8 = 0x06;

/// The subject of a DER certificate as RFC 4514.
pub(crate) fn subject_string(cert: &[u8]) -> Option<String> {
    let (tag, certificate, _) = tlv(cert)?;
    if tag != SEQUENCE {
        return None;
    }
    let (tag, tbs, _) = tlv(certificate)?;
    if tag != SEQUENCE {
        return None;
    }
    let mut rest = tbs;
    // version [0] EXPLICIT (optional), serialNumber, signature, issuer, validity, subject.
    let (tag, _, after) = tlv(rest)?;
    if tag == 0xa0 {
        rest = after;
    }
    for _ in 0..4 {
        rest = tlv(rest)?.2;
    }
    let (tag, name, _) = tlv(rest)?;
    if tag != SEQUENCE {
        return None;
    }
    name_string(name)
}

/// An RDNSequence's contents as RFC 4514: RDNs last to first, multi-valued ones joined
/// by `+`.
fn name_string(mut name: &[u8]) -> Option<String> {
    let mut rdns = Vec::new();
    while !name.is_empty() {
        let (tag, set, rest) = tlv(name)?;
        if tag != SET {
            return None;
        }
        name = rest;
        let mut parts = Vec::new();
        let mut set = set;
        while !set.is_empty() {
            let (tag, atv, rest) = tlv(set)?;
            if tag != SEQUENCE {
                return None;
            }
            set = rest;
            let (tag, oid, value) = tlv(atv)?;
            if tag != OID {
                return None;
            }
            let (vtag, text, _) = tlv(value)?;
            let mut part = attribute_name(oid)?;
            part.push('=');
            match vtag {
                // UTF8String, PrintableString, IA5String: text.
                0x0c | 0x13 | 0x16 => escape_into(&mut part, std::str::from_utf8(text).ok()?),
                // Anything else: `#` and the hex of the whole element (RFC 4514 §2.4).
                _ => {
                    part.push('#');
                    let whole = value.len() - tlv(value)?.2.len();
                    for b in &value[..whole] {
                        let _ = write!(part, "{b:02x}");
                    }
                }
            }
            parts.push(part);
        }
        rdns.push(parts.join("+"));
    }
    rdns.reverse();
    Some(rdns.join(","))
}

/// The short name RFC 4514 §3 gives an attribute type, else its dotted OID.
fn attribute_name(oid: &[u8]) -> Option<String> {
    let short = match oid {
        [0x55, 0x04, 0x03] => "CN",
        [0x55, 0x04, 0x07] => "L",
        [0x55, 0x04, 0x08] => "ST",
        [0x55, 0x04, 0x0a] => "O",
        [0x55, 0x04, 0x0b] => "OU",
        [0x55, 0x04, 0x06] => "C",
        [0x55, 0x04, 0x09] => "STREET",
        [0x09, 0x92, 0x26, 0x89, 0x93, 0xf2, 0x2c, 0x64, 0x01, 0x19] => "DC",
        [0x09, 0x92, 0x26, 0x89, 0x93, 0xf2, 0x2c, 0x64, 0x01, 0x01] => "UID",
        _ => return dotted(oid),
    };
    Some(short.to_string())
}

fn dotted(oid: &[u8]) -> Option<String> {
    let (&first, rest) = oid.split_first()?;
    let mut out = format!("{}.{}", first / 40, first % 40);
    let mut acc: u64 = 0;
    for &b in rest {
        acc = acc.checked_mul(128)?.checked_add(u64::from(b & 0x7f))?;
        if b & 0x80 == 0 {
            let _ = write!(out, ".{acc}");
            acc = 0;
        }
    }
    Some(out)
}

/// Appends `value` escaped as RFC 4514 §2.4 asks.
fn escape_into(out: &mut String, value: &str) {
    let last = value.chars().count().saturating_sub(1);
    for (i, c) in value.chars().enumerate() {
        match c {
            '"' | '+' | ',' | ';' | '<' | '>' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            '#' if i == 0 => out.push_str("\\#"),
            ' ' if i == 0 || i == last => out.push_str("\\ "),
            '\0' => out.push_str("\\00"),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_has_no_subject() {
        assert_eq!(subject_string(b""), None);
        assert_eq!(subject_string(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]), None);
        assert_eq!(subject_string(&[0x30, 0x03, 0x30, 0x01]), None);
    }

    #[test]
    fn escaping_and_dotted_oids() {
        let mut s = String::new();
        escape_into(&mut s, " #a,b+c ");
        assert_eq!(s, "\\ #a\\,b\\+c\\ ");
        // 1.2.840.113549.1.9.1 (emailAddress)
        assert_eq!(
            dotted(&[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x09, 0x01]).unwrap(),
            "1.2.840.113549.1.9.1"
        );
    }
}
