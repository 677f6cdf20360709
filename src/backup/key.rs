//! Object keys: derived from requests, validated before any sink sees them.

use std::fmt;
use std::sync::Arc;

use super::error::KeyError;

/// The first key segment no object may use: [`FsSink`](super::FsSink) writes its
/// temporary files there, outside the key namespace.
pub const RESERVED_DIR: &str = ".tmp";

/// A validated, relative object key such as `img/logo.png`.
///
/// Guarantees: not empty, at most 1024 bytes, no leading `/` or `\` or drive letter, no
/// `..`, `.` or empty segment, no backslash, NUL or control character, not under
/// [`RESERVED_DIR`]. A key is therefore safe to join under a directory or bucket prefix.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey(Arc<str>);

impl ObjectKey {
    /// Validates `key`.
    pub fn new(key: &str) -> Result<Self, KeyError> {
        validate(key)?;
        Ok(ObjectKey(Arc::from(key)))
    }

    /// Derives the default key from a URI path: percent-decoded, one leading `/` removed
    /// (`/img/a%20b.png` → `img/a b.png`). The query is not part of the key.
    pub fn from_path(path: &str) -> Result<Self, KeyError> {
        let decoded = percent_decode(path)?;
        let rel = decoded.strip_prefix('/').unwrap_or(&decoded);
        ObjectKey::new(rel)
    }

    /// The key as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The segments of the key.
    pub fn segments(&self) -> impl Iterator<Item = &str> {
        self.0.split('/')
    }
}

impl fmt::Debug for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for ObjectKey {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

fn validate(key: &str) -> Result<(), KeyError> {
    if key.is_empty() {
        return Err(KeyError::Empty);
    }
    if key.len() > 1024 {
        return Err(KeyError::TooLong);
    }
    let b = key.as_bytes();
    if b[0] == b'/' || b[0] == b'\\' || (b.len() >= 2 && b[1] == b':' && b[0].is_ascii_alphabetic())
    {
        return Err(KeyError::Absolute);
    }
    if let Some(c) = key.chars().find(|c| *c == '\\' || c.is_control()) {
        return Err(KeyError::ForbiddenChar(c));
    }
    for seg in key.split('/') {
        match seg {
            ".." => return Err(KeyError::ParentSegment),
            "" | "." => return Err(KeyError::EmptySegment),
            _ => {}
        }
    }
    // Any case: on a case-insensitive file system `.TMP` is the same directory.
    let first = key.split('/').next().unwrap_or(key);
    if first.eq_ignore_ascii_case(RESERVED_DIR) {
        return Err(KeyError::Reserved);
    }
    Ok(())
}

fn percent_decode(s: &str) -> Result<String, KeyError> {
    if !s.contains('%') {
        return Ok(s.to_owned());
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = |c: u8| (c as char).to_digit(16);
            let (Some(h), Some(l)) = (
                b.get(i + 1).copied().and_then(hex),
                b.get(i + 2).copied().and_then(hex),
            ) else {
                return Err(KeyError::BadEncoding);
            };
            out.push((h * 16 + l) as u8);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| KeyError::BadEncoding)
}

/// Names the object a request's response is stored under.
///
/// Return `None` to skip the backup of this request. Whatever is returned is validated
/// with [`ObjectKey::new`], so a rule cannot produce a path that escapes the storage.
pub trait NameRule: Send + Sync + 'static {
    /// The key for this request.
    fn key(&self, req: &http::request::Parts) -> Option<Result<ObjectKey, KeyError>>;
}

/// The default rule: the request path ([`ObjectKey::from_path`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct PathKey;

impl NameRule for PathKey {
    fn key(&self, req: &http::request::Parts) -> Option<Result<ObjectKey, KeyError>> {
        Some(ObjectKey::from_path(req.uri.path()))
    }
}

/// A rule from a closure returning the key as a string (validated afterwards), e.g. one
/// that prefixes the `Host`, the document's "naming rule" for linking outside services.
#[derive(Clone)]
pub struct FnKey<F>(pub F);

impl<F> fmt::Debug for FnKey<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FnKey")
    }
}

impl<F> NameRule for FnKey<F>
where
    F: Fn(&http::request::Parts) -> Option<String> + Send + Sync + 'static,
{
    fn key(&self, req: &http::request::Parts) -> Option<Result<ObjectKey, KeyError>> {
        (self.0)(req).map(|k| ObjectKey::new(&k))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation() {
        assert_eq!(
            ObjectKey::from_path("/a/b.txt").unwrap().as_str(),
            "a/b.txt"
        );
        assert_eq!(ObjectKey::from_path("/a%20b").unwrap().as_str(), "a b");
        assert_eq!(ObjectKey::from_path("/"), Err(KeyError::Empty));
        assert_eq!(
            ObjectKey::from_path("/a/../b"),
            Err(KeyError::ParentSegment)
        );
        assert_eq!(
            ObjectKey::from_path("/a/%2e%2e/b"),
            Err(KeyError::ParentSegment)
        );
        assert_eq!(
            ObjectKey::from_path("//etc/passwd"),
            Err(KeyError::Absolute)
        );
        assert_eq!(ObjectKey::from_path("/%2fetc"), Err(KeyError::Absolute));
        assert_eq!(ObjectKey::new("C:x"), Err(KeyError::Absolute));
        assert_eq!(ObjectKey::new("a\\b"), Err(KeyError::ForbiddenChar('\\')));
        assert_eq!(ObjectKey::new("a\0b"), Err(KeyError::ForbiddenChar('\0')));
        assert_eq!(ObjectKey::new("a//b"), Err(KeyError::EmptySegment));
        assert_eq!(ObjectKey::new("a/./b"), Err(KeyError::EmptySegment));
        assert_eq!(ObjectKey::new("a/"), Err(KeyError::EmptySegment));
        assert_eq!(ObjectKey::from_path("/%zz"), Err(KeyError::BadEncoding));
        assert_eq!(ObjectKey::from_path("/%ff"), Err(KeyError::BadEncoding));
        assert_eq!(ObjectKey::new(&"a".repeat(1025)), Err(KeyError::TooLong));
        assert_eq!(ObjectKey::new(".tmp/x"), Err(KeyError::Reserved));
        assert_eq!(ObjectKey::new(".TMP"), Err(KeyError::Reserved));
        assert_eq!(ObjectKey::from_path("/%2eTmp/x"), Err(KeyError::Reserved));
        assert!(ObjectKey::new("a/.tmp/x").is_ok());
        assert!(ObjectKey::new(".tmpfile").is_ok());
    }
}
