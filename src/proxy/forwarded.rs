//! The `X-Forwarded-For`/`-Proto`/`-Host` headers a [`Forward`](super::Forward) adds, written
//! without allocating more than the one value that must be new (issue 12's profile put
//! them at 4.5k instructions a request before): constant header names, the client IP
//! formatted on the stack.

use http::header::{HeaderName, HeaderValue};
use http::uri::Scheme;
use http::{HeaderMap, Uri};

use super::builder::Options;
use super::headers::Seen;
use crate::client_addr::{joined_forwarded_for, ClientAddr};

// `HeaderName`s, not `&str`s: a custom name given as `&str` is parsed and copied into a
// fresh allocation on every insert (three per request, issue 12's profile).
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Sets the `X-Forwarded-*` headers of a request going to the upstream; `seen` is what
/// `Forward::call`'s scan of its fields found (`Host`, an incoming `X-Forwarded-For`).
pub(super) fn set_forwarded(
    opts: &Options,
    headers: &mut HeaderMap,
    client: Option<ClientAddr>,
    uri: &Uri,
    seen: &Seen,
) {
    if let Some(ClientAddr(addr)) = client {
        let mut ip = IpText::default();
        ip.write(addr.ip());
        // Every line of a repeated header counts: reading only the first would drop the
        // hops the others name (RFC 9110 §5.3 combines them with ", ").
        let joined = match seen.forwarded_for {
            true => joined_forwarded_for(headers),
            false => None,
        };
        let value = match joined {
            Some(mut v) if opts.append_forwarded_for => {
                v.extend_from_slice(b", ");
                v.extend_from_slice(ip.as_bytes());
                // The joined line becomes the value without another copy.
                HeaderValue::from_maybe_shared(bytes::Bytes::from(v)).ok()
            }
            _ => HeaderValue::from_bytes(ip.as_bytes()).ok(),
        };
        if let Some(v) = value {
            headers.insert(X_FORWARDED_FOR, v);
        }
    } else if !opts.append_forwarded_for {
        headers.remove(X_FORWARDED_FOR);
    }
    let proto = match (&opts.forwarded_proto, uri.scheme()) {
        (Some(p), _) => p.clone(),
        (None, Some(s)) if *s == Scheme::HTTPS => HeaderValue::from_static("https"),
        _ => HeaderValue::from_static("http"),
    };
    headers.insert(X_FORWARDED_PROTO, proto);
    let host = match &seen.host {
        Some(h) => Some(h.clone()),
        None => uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok()),
    };
    if let Some(h) = host {
        headers.insert(X_FORWARDED_HOST, h);
    }
}

/// An IP address as text on the stack: `IpAddr::to_string` went through the formatting
/// machinery into a `String` that was then copied again into the header value, once per
/// request. The longest IPv6 text (an IPv4-mapped address) is 45 bytes.
struct IpText {
    buf: [u8; 48],
    len: usize,
}

impl Default for IpText {
    fn default() -> Self {
        IpText {
            buf: [0; 48],
            len: 0,
        }
    }
}

impl IpText {
    fn write(&mut self, ip: std::net::IpAddr) {
        match ip {
            std::net::IpAddr::V4(v4) => {
                for (i, octet) in v4.octets().into_iter().enumerate() {
                    if i > 0 {
                        self.push(b'.');
                    }
                    if octet >= 100 {
                        self.push(b'0' + octet / 100);
                    }
                    if octet >= 10 {
                        self.push(b'0' + octet / 10 % 10);
                    }
                    self.push(b'0' + octet % 10);
                }
            }
            // Rare enough on a proxy's hot path to keep std's canonical (RFC 5952) form.
            std::net::IpAddr::V6(v6) => {
                use std::fmt::Write as _;
                let _ = write!(self, "{v6}");
            }
        }
    }

    fn push(&mut self, b: u8) {
        if let Some(slot) = self.buf.get_mut(self.len) {
            *slot = b;
            self.len += 1;
        }
    }

    fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl std::fmt::Write for IpText {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let end = self.len.checked_add(s.len()).ok_or(std::fmt::Error)?;
        self.buf
            .get_mut(self.len..end)
            .ok_or(std::fmt::Error)?
            .copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::IpText;
    use std::net::IpAddr;

    #[test]
    fn ip_text_matches_std_display() {
        for ip in [
            "0.0.0.0",
            "127.0.0.1",
            "10.20.100.255",
            "9.99.199.200",
            "::1",
            "2001:db8::8a2e:370:7334",
            "::ffff:255.255.255.255",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            let mut t = IpText::default();
            t.write(ip);
            assert_eq!(t.as_bytes(), ip.to_string().as_bytes());
        }
    }
}
