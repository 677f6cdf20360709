//! The `X-Forwarded-For`/`-Proto`/`-Host` headers a [`Forward`](super::Forward) adds, written
//! without allocating more than the one value that must be new (issue 12's profile put
//! them at 4.5k instructions a request before): constant header names, the client IP
//! formatted on the stack, and that one reused for the next request from the same client
//! ([`ForwardedFor`]).

use http::header::{HeaderName, HeaderValue};
use http::uri::Scheme;
use http::{HeaderMap, Uri};
use std::net::IpAddr;

use super::builder::Options;
use super::headers::Seen;
use crate::client_addr::{joined_forwarded_for, ClientAddr};

// `HeaderName`s, not `&str`s: a custom name given as `&str` is parsed and copied into a
// fresh allocation on every insert (three per request, issue 12's profile).
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// The `X-Forwarded-For` value last written by one `Forward` and the client it names.
///
/// The server calls one `Forward` per connection for all its requests (`server`'s
/// `ConnService`), and a connection's requests all come from one client: the value made
/// for the first is shared (a reference count) by the next ones instead of being
/// formatted and allocated again (issue 12: one allocation, a copy and a free a request).
/// A `Forward` serving many clients (behind a balancer, say) just makes a new one when the
/// client changes, as before.
#[derive(Clone, Debug, Default)]
pub(super) struct ForwardedFor(Option<(IpAddr, HeaderValue)>);

impl ForwardedFor {
    /// The value naming `ip` alone.
    fn value(&mut self, ip: IpAddr) -> Option<HeaderValue> {
        if let Some((last, v)) = &self.0 {
            if *last == ip {
                return Some(v.clone());
            }
        }
        let mut text = IpText::default();
        text.write(ip);
        let v = HeaderValue::from_bytes(text.as_bytes()).ok()?;
        self.0 = Some((ip, v.clone()));
        Some(v)
    }
}

/// Sets the `X-Forwarded-*` headers of a request going to the upstream; `seen` is what
/// `Forward::call`'s scan of its fields found (`Host`, an incoming `X-Forwarded-For`).
pub(super) fn set_forwarded(
    opts: &Options,
    last: &mut ForwardedFor,
    headers: &mut HeaderMap,
    client: Option<ClientAddr>,
    uri: &Uri,
    seen: &Seen,
) {
    if let Some(ClientAddr(addr)) = client {
        // Every line of a repeated header counts: reading only the first would drop the
        // hops the others name (RFC 9110 §5.3 combines them with ", ").
        let joined = match seen.forwarded_for {
            true => joined_forwarded_for(headers),
            false => None,
        };
        let value = match joined {
            Some(mut v) if opts.append_forwarded_for => {
                let mut ip = IpText::default();
                ip.write(addr.ip());
                v.extend_from_slice(b", ");
                v.extend_from_slice(ip.as_bytes());
                // The joined line becomes the value without another copy.
                HeaderValue::from_maybe_shared(bytes::Bytes::from(v)).ok()
            }
            _ => last.value(addr.ip()),
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
    use super::{ForwardedFor, IpText};
    use std::net::IpAddr;

    #[test]
    fn the_reused_value_always_names_the_current_client() {
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "2001:db8::1".parse().unwrap();
        let mut last = ForwardedFor::default();
        for ip in [a, a, b, a, b, b] {
            assert_eq!(last.value(ip).unwrap(), ip.to_string().as_str());
        }
    }

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
