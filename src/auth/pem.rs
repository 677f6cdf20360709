//! Public keys from PEM, without jsonwebtoken's `use_pem` feature.
//!
//! That feature pulls `simple_asn1`, whose current release needs a `time` that needs Rust
//! 1.88 (our MSRV is 1.85). Public keys need very little of ASN.1: a PEM block is base64 of
//! DER, a `PUBLIC KEY` is `SEQUENCE { SEQUENCE { OID, params }, BIT STRING key }`, and the
//! key inside is what ring verifies with (PKCS#1 for RSA, the uncompressed point for EC).

use crate::der::tlv;
use base64::Engine;

const RSA_ENCRYPTION: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
const EC_PUBLIC_KEY: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
const PRIME256V1: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

/// Which key a PEM block must hold.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Rsa,
    EcP256,
}

/// The DER ring verifies with, from a PEM `PUBLIC KEY` (SPKI) — or, for RSA, also
/// `RSA PUBLIC KEY` (PKCS#1).
pub(crate) fn public_key(pem: &[u8], kind: Kind) -> Result<Vec<u8>, &'static str> {
    let text = std::str::from_utf8(pem).map_err(|_| "PEM is not text")?;
    let (label, der) = decode(text)?;
    match (label, kind) {
        ("RSA PUBLIC KEY", Kind::Rsa) => Ok(der),
        ("PUBLIC KEY", _) => {
            let (oid, params, key) = spki(&der).ok_or("malformed SubjectPublicKeyInfo")?;
            match kind {
                Kind::Rsa if oid == RSA_ENCRYPTION => Ok(key.to_vec()),
                Kind::EcP256 if oid == EC_PUBLIC_KEY && params == Some(PRIME256V1) => {
                    Ok(key.to_vec())
                }
                _ => Err("the key is not of the algorithm's type"),
            }
        }
        _ => Err("expected a PUBLIC KEY PEM block"),
    }
}

/// The label and DER of the first PEM block.
fn decode(text: &str) -> Result<(&str, Vec<u8>), &'static str> {
    let start = text.find("-----BEGIN ").ok_or("no PEM block")?;
    let rest = &text[start + 11..];
    let label_end = rest.find("-----").ok_or("no PEM block")?;
    let label = &rest[..label_end];
    let body = &rest[label_end + 5..];
    let end = body.find("-----END ").ok_or("unterminated PEM block")?;
    let b64: String = body[..end]
        .chars()
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    let der = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|_| "PEM body is not base64")?;
    Ok((label, der))
}
/// The parts of a SubjectPublicKeyInfo: algorithm OID, curve OID if any, key bits.
type Spki<'a> = (&'a [u8], Option<&'a [u8]>, &'a [u8]);

/// The [`Spki`] parts of `der`.
fn spki(der: &[u8]) -> Option<Spki<'_>> {
    let (0x30, spki, _) = tlv(der)? else {
        return None;
    };
    let (0x30, alg, rest) = tlv(spki)? else {
        return None;
    };
    let (0x03, bits, _) = tlv(rest)? else {
        return None;
    };
    let (0x06, oid, params) = tlv(alg)? else {
        return None;
    };
    let curve = match tlv(params) {
        Some((0x06, c, _)) => Some(c),
        _ => None,
    };
    // A BIT STRING starts with its count of unused bits: 0 for a key.
    let (0, key) = bits.split_first()? else {
        return None;
    };
    Some((oid, curve, key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for input in [
            &b""[..],
            b"-----BEGIN PUBLIC KEY-----",
            b"-----BEGIN PUBLIC KEY-----\n!!\n-----END PUBLIC KEY-----",
            b"-----BEGIN PUBLIC KEY-----\nMAA=\n-----END PUBLIC KEY-----",
            b"-----BEGIN PUBLIC KEY-----\nMIQAAAAA\n-----END PUBLIC KEY-----",
            b"\xff\xfe",
        ] {
            assert!(public_key(input, Kind::Rsa).is_err());
            assert!(public_key(input, Kind::EcP256).is_err());
        }
    }
}
