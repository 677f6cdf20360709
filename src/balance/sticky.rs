//! Sticky sessions by a signed cookie that names an endpoint id.

use std::fmt;
use std::time::Duration;

use hmac::{Hmac, Mac};
use http::{HeaderMap, HeaderValue};
use sha2::Sha256;

use super::error::StickyError;
use super::picker::cookie_value;

type HmacSha256 = Hmac<Sha256>;

/// Bytes of the HMAC-SHA256 tag kept in the cookie (128 bits).
const TAG_LEN: usize = 16;
/// `<16 hex id>.<32 hex tag>`
const VALUE_LEN: usize = 16 + 1 + 2 * TAG_LEN;

/// The cookie's `SameSite` attribute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SameSite {
    /// `SameSite=Strict`
    Strict,
    /// `SameSite=Lax` (the default)
    Lax,
    /// `SameSite=None` (browsers require `Secure` with it)
    None,
}

/// Sticky sessions by cookie (HAProxy `cookie SRV insert`, nginx-plus `sticky cookie`).
///
/// The cookie value is `<endpoint id>.<HMAC-SHA256 tag>`: it names the endpoint by its
/// stable id (a hash of its discovery key), never by address, and is signed with the
/// operator's secret, so a client can neither forge a value nor choose an endpoint.
///
/// | cookie in the request | result |
/// |---|---|
/// | none | picked by the balancer's [`Picker`](super::Picker); `Set-Cookie` names it |
/// | valid, endpoint present and available | that endpoint; no `Set-Cookie` |
/// | valid, endpoint gone, ejected, gate closed or failed (retry) | picked again and the cookie rewritten (HAProxy `option redispatch`) |
/// | tampered, forged, malformed, or signed with another secret | ignored, as if absent |
#[derive(Clone)]
pub struct StickyCookie {
    name: String,
    mac: HmacSha256,
    path: Option<String>,
    domain: Option<String>,
    max_age: Option<Duration>,
    secure: bool,
    http_only: bool,
    same_site: Option<SameSite>,
}

impl fmt::Debug for StickyCookie {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StickyCookie")
            .field("name", &self.name)
            .field("path", &self.path)
            .field("domain", &self.domain)
            .field("max_age", &self.max_age)
            .field("secure", &self.secure)
            .field("http_only", &self.http_only)
            .field("same_site", &self.same_site)
            .finish_non_exhaustive()
    }
}

fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn is_attr_value(s: &str) -> bool {
    s.bytes()
        .all(|b| (0x21..0x7f).contains(&b) && b != b';' && b != b',')
}

impl StickyCookie {
    /// A session cookie called `name`, signed with `secret` (use at least 32 random bytes,
    /// the same on every balancer instance so they agree). Defaults: `Path=/`, `HttpOnly`,
    /// `SameSite=Lax`, no `Max-Age` (a browser-session cookie), not `Secure`.
    pub fn new(name: impl Into<String>, secret: impl AsRef<[u8]>) -> Result<Self, StickyError> {
        let name = name.into();
        if !is_token(&name) {
            return Err(StickyError::InvalidName(name));
        }
        let secret = secret.as_ref();
        if secret.len() < 16 {
            return Err(StickyError::ShortSecret(secret.len()));
        }
        let mac = HmacSha256::new_from_slice(secret).map_err(|_| StickyError::ShortSecret(0))?;
        Ok(StickyCookie {
            name,
            mac,
            path: Some("/".into()),
            domain: None,
            max_age: None,
            secure: false,
            http_only: true,
            same_site: Some(SameSite::Lax),
        })
    }

    /// `Path` attribute (`None` to omit).
    pub fn path(mut self, path: Option<&str>) -> Result<Self, StickyError> {
        if let Some(p) = path {
            if !is_attr_value(p) {
                return Err(StickyError::InvalidAttribute("path"));
            }
        }
        self.path = path.map(str::to_string);
        Ok(self)
    }

    /// `Domain` attribute.
    pub fn domain(mut self, domain: &str) -> Result<Self, StickyError> {
        if !is_attr_value(domain) || domain.is_empty() {
            return Err(StickyError::InvalidAttribute("domain"));
        }
        self.domain = Some(domain.to_string());
        Ok(self)
    }

    /// `Max-Age` attribute (whole seconds); without it the cookie lasts the browser session.
    pub fn max_age(mut self, age: Duration) -> Self {
        self.max_age = Some(age);
        self
    }

    /// `Secure` attribute.
    pub fn secure(mut self, yes: bool) -> Self {
        self.secure = yes;
        self
    }

    /// `HttpOnly` attribute (default on).
    pub fn http_only(mut self, yes: bool) -> Self {
        self.http_only = yes;
        self
    }

    /// `SameSite` attribute (`None` to omit).
    pub fn same_site(mut self, s: Option<SameSite>) -> Self {
        self.same_site = s;
        self
    }

    /// The cookie name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn tag(&self, id: u64) -> [u8; 32] {
        let mut mac = self.mac.clone();
        mac.update(self.name.as_bytes());
        mac.update(&[0]);
        mac.update(&id.to_be_bytes());
        mac.finalize().into_bytes().into()
    }

    /// The signed cookie value for endpoint `id`.
    pub fn value_for(&self, id: u64) -> String {
        let tag = self.tag(id);
        let mut s = String::with_capacity(VALUE_LEN);
        s.push_str(&format!("{id:016x}."));
        for b in &tag[..TAG_LEN] {
            s.push_str(&format!("{b:02x}"));
        }
        s
    }

    /// The full `Set-Cookie` header value for endpoint `id`.
    pub fn set_cookie_for(&self, id: u64) -> HeaderValue {
        let mut s = format!("{}={}", self.name, self.value_for(id));
        if let Some(p) = &self.path {
            s.push_str("; Path=");
            s.push_str(p);
        }
        if let Some(d) = &self.domain {
            s.push_str("; Domain=");
            s.push_str(d);
        }
        if let Some(a) = self.max_age {
            s.push_str(&format!("; Max-Age={}", a.as_secs()));
        }
        if self.secure {
            s.push_str("; Secure");
        }
        if self.http_only {
            s.push_str("; HttpOnly");
        }
        match self.same_site {
            Some(SameSite::Strict) => s.push_str("; SameSite=Strict"),
            Some(SameSite::Lax) => s.push_str("; SameSite=Lax"),
            Some(SameSite::None) => s.push_str("; SameSite=None"),
            None => {}
        }
        // Every part was validated (token name, hex value, checked attributes).
        HeaderValue::from_str(&s).unwrap_or_else(|_| HeaderValue::from_static(""))
    }

    /// The endpoint id named by a valid cookie in `headers`; `None` when absent or when the
    /// value is malformed or its signature does not verify. The `Cookie` headers are read
    /// as bytes: other cookies with non-ASCII values do not hide this one.
    pub fn read(&self, headers: &HeaderMap) -> Option<u64> {
        self.verify_bytes(cookie_value(headers, &self.name)?)
    }

    /// Verifies one cookie value (constant-time tag comparison).
    pub fn verify(&self, value: &str) -> Option<u64> {
        self.verify_bytes(value.as_bytes())
    }

    /// [`verify`](Self::verify) on raw bytes (a cookie value need not be UTF-8).
    pub fn verify_bytes(&self, v: &[u8]) -> Option<u64> {
        if v.len() != VALUE_LEN || v[16] != b'.' {
            return None;
        }
        let id = u64::from_be_bytes(hex_decode::<8>(&v[..16])?);
        let tag = hex_decode::<TAG_LEN>(&v[17..])?;
        let mut mac = self.mac.clone();
        mac.update(self.name.as_bytes());
        mac.update(&[0]);
        mac.update(&id.to_be_bytes());
        mac.verify_truncated_left(&tag).ok()?;
        Some(id)
    }
}

/// Lower- or upper-case hex of exactly `2 * N` bytes.
fn hex_decode<const N: usize>(hex: &[u8]) -> Option<[u8; N]> {
    fn nibble(b: u8) -> Option<u8> {
        match b {
            b'0'..=b'9' => Some(b - b'0'),
            b'a'..=b'f' => Some(b - b'a' + 10),
            b'A'..=b'F' => Some(b - b'A' + 10),
            _ => None,
        }
    }
    if hex.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (o, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
        *o = (nibble(pair[0])? << 4) | nibble(pair[1])?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_tamper() {
        let c = StickyCookie::new("srv", [7u8; 32]).unwrap();
        let v = c.value_for(42);
        assert_eq!(c.verify(&v), Some(42));
        let mut bad = v.clone().into_bytes();
        bad[3] ^= 1;
        assert_eq!(c.verify(std::str::from_utf8(&bad).unwrap()), None);
        let other = StickyCookie::new("srv", [8u8; 32]).unwrap();
        assert_eq!(other.verify(&v), None);
        assert_eq!(c.verify("0000000000000001.00"), None);
        assert_eq!(c.verify("é"), None);
        let h = c.set_cookie_for(42);
        assert!(h.to_str().unwrap().starts_with(&format!("srv={v}; Path=/")));
        assert!(StickyCookie::new("bad name", [0u8; 32]).is_err());
        assert!(StickyCookie::new("ok", [0u8; 4]).is_err());
    }
}
