//! API keys: a configured set, kept only as keyed digests, compared in constant time.

use std::fmt;
use std::sync::Arc;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use super::error::AuthConfigError;

type Digest = [u8; 32];

#[derive(Clone)]
struct Entry {
    digest: Digest,
    name: Arc<str>,
    scopes: Arc<[String]>,
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
    secret: Arc<Digest>,
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
        ApiKeys {
            secret: Arc::new(secret),
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
        self.entries.push(Entry {
            digest,
            name: name.into(),
            scopes: scopes.into_iter().map(Into::into).collect(),
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
        // HMAC accepts keys of any length: `new_from_slice` cannot fail for it.
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.secret[..])
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        mac.update(key);
        mac.finalize().into_bytes().into()
    }

    /// The name and scopes of `presented`, if it is one of the keys.
    pub(crate) fn find(&self, presented: &[u8]) -> Option<(Arc<str>, Arc<[String]>)> {
        let digest = self.digest(presented);
        let mut found: Option<&Entry> = None;
        for e in &self.entries {
            // Every entry is compared; which one matched is only remembered.
            if bool::from(e.digest.ct_eq(&digest)) {
                found = Some(e);
            }
        }
        found.map(|e| (e.name.clone(), e.scopes.clone()))
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
        assert_eq!(&*keys.find(b"secret-b").unwrap().0, "b");
        assert!(keys.find(b"secret-").is_none());
        assert!(keys.find(b"").is_none());
        assert!(ApiKeys::new().key("x", "has space", ["r"]).is_err());
        assert!(!format!("{keys:?}").contains("secret"));
    }
}
