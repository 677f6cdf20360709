//! API keys: a configured set, kept only as keyed digests, compared in constant time.

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use hmac::{Hmac, Mac};
use http::HeaderValue;
use sha2::Sha256;
use subtle::ConstantTimeEq;

use super::error::AuthConfigError;

type Digest = [u8; 32];

/// What [`ApiKeys::find`] answers: name, scopes, identity header values.
pub(crate) type Found = (Arc<str>, Arc<[String]>, Option<IdentityValues>);

#[derive(Clone)]
struct Entry {
    digest: Digest,
    name: Arc<str>,
    scopes: Arc<[String]>,
    /// The identity header values of this key, made once: each request sends clones
    /// (a reference count, no allocation). `None` when the name or a scope cannot be a
    /// header value; such a key is refused per request as before.
    values: Option<IdentityValues>,
}

/// The subject and space-separated scopes of an API key, as header values.
#[derive(Clone, Debug)]
pub(crate) struct IdentityValues {
    pub(crate) subject: HeaderValue,
    pub(crate) scopes: HeaderValue,
}

impl IdentityValues {
    fn new(subject: &str, scopes: &[String]) -> Option<Self> {
        // One shared allocation each (`from_owner`), so clones never copy.
        let value = |s: String| HeaderValue::from_maybe_shared(Bytes::from_owner(s)).ok();
        Some(IdentityValues {
            subject: value(subject.to_owned())?,
            scopes: value(scopes.join(" "))?,
        })
    }
}

/// The API keys a gateway accepts, each with the name it authenticates as (the
/// [`Identity`](super::Identity) subject) and its scopes.
///
/// The keys themselves are not kept: only an HMAC-SHA256 of each under a random per-process
/// key, so a memory dump or a debug print shows no usable key. A presented key is hashed
/// the same way and compared with *every* configured digest in constant time (no early
/// exit), so the answer time does not reveal how much of a key was right.
///
/// ```
/// use tower_patterns::auth::ApiKeys;
/// let keys = ApiKeys::new()
///     .key("billing-batch", "k-7f3a9c...", ["invoices:read"])?
///     .key("ops", "k-01b2...", ["invoices:read", "invoices:write"])?;
/// assert_eq!(keys.len(), 2);
/// # Ok::<_, tower_patterns::auth::AuthConfigError>(())
/// ```
#[derive(Clone)]
pub struct ApiKeys {
    /// HMAC-SHA256 keyed with the per-process random key: the key schedule (two
    /// compression rounds) is done once here, each lookup clones it.
    mac: Hmac<Sha256>,
    entries: Vec<Entry>,
}

impl Default for ApiKeys {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Names only: the digests are not secrets, but nothing about a key is useful here.
        f.debug_struct("ApiKeys")
            .field(
                "names",
                &self.entries.iter().map(|e| &*e.name).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl ApiKeys {
    /// An empty set, with a fresh random hashing key.
    pub fn new() -> Self {
        let secret: Digest = rand::random();
        // HMAC accepts keys of any length: `new_from_slice` cannot fail for it.
        let mac = <Hmac<Sha256> as Mac>::new_from_slice(&secret)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        ApiKeys {
            mac,
            entries: Vec::new(),
        }
    }

    /// Adds `key`, authenticating as `name` with `scopes`. The key must be visible ASCII
    /// (what a header can carry) and not empty.
    pub fn key<I, S>(mut self, name: &str, key: &str, scopes: I) -> Result<Self, AuthConfigError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        if key.is_empty() || !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(AuthConfigError::ApiKey(name.to_owned()));
        }
        let digest = self.digest(key.as_bytes());
        let scopes: Arc<[String]> = scopes.into_iter().map(Into::into).collect();
        self.entries.push(Entry {
            digest,
            name: name.into(),
            values: IdentityValues::new(name, &scopes),
            scopes,
        });
        Ok(self)
    }

    /// Number of configured keys.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// `true` when no key is configured.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn digest(&self, key: &[u8]) -> Digest {
        let mut mac = self.mac.clone();
        mac.update(key);
        mac.finalize().into_bytes().into()
    }

    /// The name, scopes and identity header values of `presented`, if it is one of the
    /// keys.
    pub(crate) fn find(&self, presented: &[u8]) -> Option<Found> {
        let digest = self.digest(presented);
        let mut found: Option<&Entry> = None;
        for e in &self.entries {
            // Every entry is compared; which one matched is only remembered.
            if bool::from(e.digest.ct_eq(&digest)) {
                found = Some(e);
            }
        }
        found.map(|e| (e.name.clone(), e.scopes.clone(), e.values.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_only_configured_keys_and_rejects_bad_ones() {
        let keys = ApiKeys::new()
            .key("a", "secret-a", ["r"])
            .unwrap()
            .key("b", "secret-b", ["r", "w"])
            .unwrap();
        let (name, _, values) = keys.find(b"secret-b").unwrap();
        assert_eq!(&*name, "b");
        let values = values.unwrap();
        assert_eq!(
            (values.subject.as_bytes(), values.scopes.as_bytes()),
            (&b"b"[..], &b"r w"[..])
        );
        // A name that cannot be a header value: no cached values (refused per request).
        let odd = ApiKeys::new().key("a\nb", "k", ["r"]).unwrap();
        assert!(odd.find(b"k").unwrap().2.is_none());
        assert!(keys.find(b"secret-").is_none());
        assert!(keys.find(b"").is_none());
        assert!(ApiKeys::new().key("x", "has space", ["r"]).is_err());
        assert!(!format!("{keys:?}").contains("secret"));
    }
}
