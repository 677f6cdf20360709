//! API keys: a configured set, found by a keyed hash, confirmed in constant time.

use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher, RandomState};
use std::sync::Arc;

use bytes::Bytes;
use http::HeaderValue;
use subtle::ConstantTimeEq;

use super::error::AuthConfigError;
use super::identity::{AuthMethod, Identity, IdentityInner, Requirements};

#[derive(Clone)]
struct Entry {
    /// The key itself: confirmed byte for byte (in constant time) once the keyed hash
    /// picked this entry as the candidate.
    key: Box<[u8]>,
    /// The identity of this key, made once: each request gets a clone (one reference
    /// count). Its identity header values are made once too (`None` when the name or a
    /// scope cannot be a header value; such a key is refused per request as before).
    identity: Identity,
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
/// With up to 8 keys, the presented key is compared with every one of them in constant
/// time (no early exit on the first wrong byte, nor on a match), so the answer time does
/// not reveal how much of a key was right: about 30 instructions a key. With more, it is
/// looked up by a hash keyed with a random per-process secret (std's SipHash
/// `RandomState`: a client cannot choose keys that collide with a configured one, nor
/// learn anything from where they land), which picks the one candidate, compared the same
/// way: a few hundred instructions. An HMAC-SHA256 of the presented key (what this type
/// did first) cost about seven thousand without SHA instructions in the CPU.
///
/// The keys are held in memory (as a JWT HS256 secret is); `Debug` prints the names only.
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
    /// The keyed hash (random per `ApiKeys`) of the lookup.
    hasher: RandomState,
    /// Keyed hash of a key → the entries with that hash, in configuration order (more
    /// than one only for a key configured twice or a 64-bit collision).
    index: HashMap<u64, Vec<usize>, BuildHasherDefault<Prehashed>>,
    entries: Vec<Entry>,
}

impl Default for ApiKeys {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Names only: never a key.
        f.debug_struct("ApiKeys")
            .field(
                "names",
                &self
                    .entries
                    .iter()
                    .map(|e| e.identity.subject())
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl ApiKeys {
    /// An empty set, with a fresh random hashing key.
    pub fn new() -> Self {
        ApiKeys {
            hasher: RandomState::new(),
            index: HashMap::default(),
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
        let hash = self.hasher.hash_one(key.as_bytes());
        self.index.entry(hash).or_default().push(self.entries.len());
        let scopes: Arc<[String]> = scopes.into_iter().map(Into::into).collect();
        self.entries.push(Entry {
            key: key.as_bytes().into(),
            identity: Identity::new(IdentityInner {
                subject: name.into(),
                values: IdentityValues::new(name, &scopes),
                scopes,
                method: AuthMethod::ApiKey,
                claims: None,
                granted: None,
            }),
        });
        Ok(self)
    }

    /// A copy whose identities (and their header values) are new allocations of the same
    /// content: the same keys, names, scopes and lookup, nothing shared with `self` but
    /// the hashing key (see [`Authenticator::per_service`](super::Authenticator)). Each
    /// identity also knows whether it meets `require`, the requirements of the service
    /// the copy is for (an API key has no claims, and its scopes never change).
    pub(crate) fn per_service(&self, require: &Requirements) -> ApiKeys {
        let entries = self
            .entries
            .iter()
            .map(|e| {
                let id = &e.identity.0;
                let scopes: Arc<[String]> = id.scopes.iter().cloned().collect();
                Entry {
                    key: e.key.clone(),
                    identity: Identity::new(IdentityInner {
                        subject: Arc::from(&*id.subject),
                        values: id
                            .values
                            .as_ref()
                            .and_then(|_| IdentityValues::new(&id.subject, &scopes)),
                        granted: Some(require.met_by_parts(&scopes, |_| None)),
                        scopes,
                        method: id.method,
                        claims: id.claims.clone(),
                    }),
                }
            })
            .collect();
        ApiKeys {
            hasher: self.hasher.clone(),
            index: self.index.clone(),
            entries,
        }
    }

    /// Number of configured keys.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// `true` when no key is configured.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The identity of `presented` (name, scopes, identity header values), if it is one
    /// of the keys.
    pub(crate) fn find(&self, presented: &[u8]) -> Option<Identity> {
        // A few keys (a gateway's usual handful): every one is compared, in constant
        // time, with no keyed hash first. The SipHash of a 20-byte key and the index probe
        // cost about 450 instructions per request, the compare about 30 a key; the time
        // depends only on how many keys there are and which have the presented length
        // (a key's length is not its secret), never on the keys' bytes.
        if self.entries.len() <= LINEAR_MAX {
            return pick(self.entries.iter(), presented);
        }
        let candidates = self.index.get(&self.hasher.hash_one(presented))?;
        pick(
            candidates.iter().filter_map(|&i| self.entries.get(i)),
            presented,
        )
    }
}

/// Up to this many keys, [`ApiKeys::find`] compares the presented key with each of them
/// instead of looking it up by its keyed hash (cheaper below about 12 keys of 20 bytes).
const LINEAR_MAX: usize = 8;

/// The identity of the last of `entries` equal to `presented`. Every entry is compared in
/// full (no early exit on a match); for a key configured twice the last one wins.
fn pick<'a>(entries: impl Iterator<Item = &'a Entry>, presented: &[u8]) -> Option<Identity> {
    let mut found: Option<&Entry> = None;
    for e in entries {
        if ct_eq(&e.key, presented) {
            found = Some(e);
        }
    }
    found.map(|e| e.identity.clone())
}

/// The index's keys are already keyed SipHash outputs: hashing them again would only
/// cost a second SipHash per lookup.
#[derive(Default)]
struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is used (the key is a `u64`); anything else is folded in.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// `a == b` without an early exit on the first wrong byte: the bytes are folded 8 at a
/// time (the tail one at a time) into one difference word, kept opaque to the optimiser
/// each step so it cannot stop at a non-zero word, compared with `subtle` once at the
/// end. `subtle`'s own slice compare does the same per byte with a volatile read each,
/// ten times the instructions for a 40-byte key; a padded copy of every chunk into a
/// word (what this did before) cost about 70 instructions a word in `memcpy`. Lengths
/// differ early: a key's length is not its secret.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let word = |c: &[u8]| c.first_chunk::<8>().map_or(0, |w| u64::from_ne_bytes(*w));
    let (aw, bw) = (a.chunks_exact(8), b.chunks_exact(8));
    let (at, bt) = (aw.remainder(), bw.remainder());
    let mut diff = 0u64;
    for (x, y) in aw.zip(bw) {
        diff = std::hint::black_box(diff | (word(x) ^ word(y)));
    }
    for (x, y) in at.iter().zip(bt) {
        diff = std::hint::black_box(diff | u64::from(x ^ y));
    }
    bool::from(diff.ct_eq(&0))
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
        let id = keys.find(b"secret-b").unwrap();
        assert_eq!(id.subject(), "b");
        assert_eq!(id.scopes(), ["r", "w"]);
        assert_eq!(id.method(), AuthMethod::ApiKey);
        let values = id.0.values.as_ref().unwrap();
        assert_eq!(
            (values.subject.as_bytes(), values.scopes.as_bytes()),
            (&b"b"[..], &b"r w"[..])
        );
        // A name that cannot be a header value: no cached values (refused per request).
        let odd = ApiKeys::new().key("a\nb", "k", ["r"]).unwrap();
        assert!(odd.find(b"k").unwrap().0.values.is_none());
        assert!(keys.find(b"secret-").is_none());
        assert!(keys.find(b"").is_none());
        assert!(ApiKeys::new().key("x", "has space", ["r"]).is_err());
        assert!(!format!("{keys:?}").contains("secret"));
        // A key configured twice: the later entry wins (as the digest scan did).
        let twice = ApiKeys::new()
            .key("first", "same", ["r"])
            .unwrap()
            .key("second", "same", ["w"])
            .unwrap();
        assert_eq!(twice.find(b"same").unwrap().subject(), "second");
        // Same length, one byte off, at the start and at the end: not found.
        assert!(keys.find(b"xecret-b").is_none());
        assert!(keys.find(b"secret-c").is_none());
        // Both lookups (a compare with each of a few keys; the keyed hash beyond
        // `LINEAR_MAX`) find the same keys, refuse the same near misses, and let the
        // later of two equal keys win.
        for n in [1, LINEAR_MAX, LINEAR_MAX + 1, 40] {
            let mut many = ApiKeys::new();
            for i in 0..n {
                many = many
                    .key(&format!("n{i}"), &format!("key-{i:04}"), ["r"])
                    .unwrap();
            }
            many = many.key("dup", "key-0000", ["w"]).unwrap();
            for i in 1..n {
                let id = many.find(format!("key-{i:04}").as_bytes()).unwrap();
                assert_eq!(id.subject(), format!("n{i}"), "{n} keys");
            }
            assert_eq!(many.find(b"key-0000").unwrap().subject(), "dup", "{n} keys");
            assert!(many.find(b"key-9999").is_none(), "{n} keys");
            assert!(many.find(b"key-000").is_none(), "{n} keys");
            let copy = many.per_service(&Requirements::default());
            assert!(copy.find(b"key-0000").is_some(), "{n} keys");
        }
        // The compare itself, on every length around a word and every byte position.
        for len in 0..=17usize {
            let a: Vec<u8> = (0..len as u8).collect();
            assert!(ct_eq(&a, &a.clone()));
            for i in 0..len {
                let mut b = a.clone();
                b[i] ^= 0x80;
                assert!(!ct_eq(&a, &b), "{len} {i}");
            }
            assert!(!ct_eq(&a, &[a.as_slice(), b"x"].concat()));
        }
    }
}
