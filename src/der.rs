//! The one DER primitive the crate needs in two places (JWT public keys in `auth`, client
//! certificate subjects in `tls`): reading a tag-length-value element. Both callers only
//! walk a few fixed structures, so a full ASN.1 crate would be more than they use.

/// One DER element: tag, contents, what follows. `None` for a truncated element or a
/// length form DER does not allow here (indefinite, or more than four length bytes).
pub(crate) fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}
