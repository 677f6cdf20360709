//! The file format of [`DiskStore`](super::DiskStore): encoding, and reading back with
//! every length, the checksum and the key checked (a torn or corrupted file is an error,
//! never an entry).

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use crate::cache::store::CachedResponse;

const MAGIC: &[u8; 8] = b"TPCACHE1";
/// Magic, meta length, body length, checksum.
const PREFIX: usize = 8 + 4 + 8 + 32;
/// The largest metadata section read (key and headers): more is a corrupt file.
const MAX_META: u32 = 1 << 20;

pub(super) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The length of `encode`'s output, without encoding (`None` if a field is too long for
/// the format).
pub(super) fn encoded_len(key: &str, e: &CachedResponse) -> Option<u64> {
    let mut meta = 4 + key.len() + 2 + 8 + 8 + 8 + 4;
    for (name, value) in &e.headers {
        meta += 2 + name.as_str().len() + 4 + value.len();
    }
    if u32::try_from(meta).ok()? > MAX_META {
        return None;
    }
    Some((PREFIX + meta) as u64 + e.body_len())
}

pub(super) fn encode(key: &str, e: &CachedResponse) -> Option<Vec<u8>> {
    let mut meta = Vec::with_capacity(256);
    meta.extend_from_slice(&u32::try_from(key.len()).ok()?.to_le_bytes());
    meta.extend_from_slice(key.as_bytes());
    meta.extend_from_slice(&e.status.as_u16().to_le_bytes());
    let now_ms = millis(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default(),
    );
    meta.extend_from_slice(&now_ms.to_le_bytes());
    meta.extend_from_slice(&millis(e.age(Instant::now())).to_le_bytes());
    meta.extend_from_slice(&millis(e.fresh_for).to_le_bytes());
    meta.extend_from_slice(&u32::try_from(e.headers.len()).ok()?.to_le_bytes());
    for (name, value) in &e.headers {
        meta.extend_from_slice(&u16::try_from(name.as_str().len()).ok()?.to_le_bytes());
        meta.extend_from_slice(name.as_str().as_bytes());
        meta.extend_from_slice(&u32::try_from(value.len()).ok()?.to_le_bytes());
        meta.extend_from_slice(value.as_bytes());
    }
    let meta_len = u32::try_from(meta.len()).ok().filter(|&l| l <= MAX_META)?;
    let body_len = e.body_len();
    let mut sha = Sha256::new();
    sha.update(&meta);
    for c in &e.body {
        sha.update(c);
    }
    let mut out = Vec::with_capacity(PREFIX + meta.len() + usize::try_from(body_len).ok()?);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&meta_len.to_le_bytes());
    out.extend_from_slice(&body_len.to_le_bytes());
    out.extend_from_slice(&sha.finalize());
    out.extend_from_slice(&meta);
    for c in &e.body {
        out.extend_from_slice(c);
    }
    Some(out)
}

pub(super) fn corrupt(why: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why)
}

/// A cursor over the metadata section; every read is bounds-checked.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> io::Result<&'a [u8]> {
        if self.0.len() < n {
            return Err(corrupt("metadata cut short"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u16(&mut self) -> io::Result<u16> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> io::Result<u32> {
        let mut a = [0; 4];
        a.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(a))
    }
    fn u64(&mut self) -> io::Result<u64> {
        let mut a = [0; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
    fn len32(&mut self) -> io::Result<usize> {
        usize::try_from(self.u32()?).map_err(|_| corrupt("length"))
    }
}

/// The prefix of a file: (meta length, body length, checksum).
fn read_prefix(f: &mut File) -> io::Result<(u32, u64, [u8; 32])> {
    let mut p = [0u8; PREFIX];
    f.read_exact(&mut p)
        .map_err(|_| corrupt("file cut short"))?;
    if &p[..8] != MAGIC {
        return Err(corrupt("not a cache entry"));
    }
    let meta_len = u32::from_le_bytes([p[8], p[9], p[10], p[11]]);
    let mut b = [0; 8];
    b.copy_from_slice(&p[12..20]);
    let mut sum = [0; 32];
    sum.copy_from_slice(&p[20..52]);
    if meta_len > MAX_META {
        return Err(corrupt("metadata too long"));
    }
    Ok((meta_len, u64::from_le_bytes(b), sum))
}

fn read_meta(f: &mut File, meta_len: u32) -> io::Result<Vec<u8>> {
    let len = usize::try_from(meta_len).map_err(|_| corrupt("length"))?;
    let mut meta = vec![0; len];
    f.read_exact(&mut meta)
        .map_err(|_| corrupt("file cut short"))?;
    Ok(meta)
}

/// What the index keeps of a file at open.
pub(super) struct IndexMeta {
    pub(super) key: String,
    pub(super) status: StatusCode,
    /// The header lines a purge selects by.
    pub(super) kept: Vec<(HeaderName, HeaderValue)>,
}

/// Reads a file's [`IndexMeta`] (`keep` says which header names to keep); the checksum is
/// checked on read.
pub(super) fn read_index_meta(
    path: &Path,
    keep: impl Fn(&HeaderName) -> bool,
) -> io::Result<IndexMeta> {
    let mut f = File::open(path)?;
    let (meta_len, body_len, _) = read_prefix(&mut f)?;
    let expected = (PREFIX as u64)
        .saturating_add(u64::from(meta_len))
        .saturating_add(body_len);
    if f.metadata()?.len() != expected {
        return Err(corrupt("length does not match"));
    }
    let meta = read_meta(&mut f, meta_len)?;
    let mut c = Cursor(&meta);
    let n = c.len32()?;
    let key = String::from_utf8(c.take(n)?.to_vec()).map_err(|_| corrupt("key"))?;
    let status = StatusCode::from_u16(c.u16()?).map_err(|_| corrupt("status"))?;
    c.take(8 + 8 + 8)?; // written at, age at write, fresh for
    let count = c.u32()?;
    let mut kept = Vec::new();
    for _ in 0..count {
        let n = usize::from(c.u16()?);
        let name = HeaderName::from_bytes(c.take(n)?).map_err(|_| corrupt("header name"))?;
        let n = c.len32()?;
        let value = c.take(n)?;
        if keep(&name) {
            let value = HeaderValue::from_bytes(value).map_err(|_| corrupt("header value"))?;
            kept.push((name, value));
        }
    }
    Ok(IndexMeta { key, status, kept })
}

/// Reads and checks a whole entry: the length, the checksum and the key must match.
pub(super) fn read_entry(path: &Path, key: &str) -> io::Result<CachedResponse> {
    let mut f = File::open(path)?;
    let (meta_len, body_len, sum) = read_prefix(&mut f)?;
    let expected = (PREFIX as u64)
        .saturating_add(u64::from(meta_len))
        .saturating_add(body_len);
    if f.metadata()?.len() != expected {
        return Err(corrupt("length does not match"));
    }
    let meta = read_meta(&mut f, meta_len)?;
    let body_len = usize::try_from(body_len).map_err(|_| corrupt("length"))?;
    let mut body = vec![0; body_len];
    f.read_exact(&mut body)
        .map_err(|_| corrupt("file cut short"))?;
    let mut sha = Sha256::new();
    sha.update(&meta);
    sha.update(&body);
    if sha.finalize().as_slice() != sum {
        return Err(corrupt("checksum does not match"));
    }
    let mut c = Cursor(&meta);
    let n = c.len32()?;
    if c.take(n)? != key.as_bytes() {
        // Another key with the same hash prefix cannot happen with SHA-256; a file
        // copied or renamed by hand can.
        return Err(corrupt("key does not match"));
    }
    let status = StatusCode::from_u16(c.u16()?).map_err(|_| corrupt("status"))?;
    let written_at = UNIX_EPOCH + Duration::from_millis(c.u64()?);
    let age_at_write = Duration::from_millis(c.u64()?);
    let fresh_for = Duration::from_millis(c.u64()?);
    let count = c.u32()?;
    let mut headers = HeaderMap::new();
    for _ in 0..count {
        let n = usize::from(c.u16()?);
        let name = HeaderName::from_bytes(c.take(n)?).map_err(|_| corrupt("header name"))?;
        let n = c.len32()?;
        let value = HeaderValue::from_bytes(c.take(n)?).map_err(|_| corrupt("header value"))?;
        headers.append(name, value);
    }
    // Time on disk counts as age; a clock that went back counts as none.
    let on_disk = SystemTime::now()
        .duration_since(written_at)
        .unwrap_or_default();
    Ok(CachedResponse {
        status,
        headers,
        body: if body.is_empty() {
            Vec::new()
        } else {
            vec![Bytes::from(body)]
        },
        stored_at: Instant::now(),
        fresh_for,
        initial_age: age_at_write.saturating_add(on_disk),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn entry(body: &'static str) -> CachedResponse {
        let mut headers = HeaderMap::new();
        headers.insert("etag", HeaderValue::from_static("\"v1\""));
        CachedResponse {
            status: StatusCode::OK,
            headers,
            body: vec![Bytes::from_static(body.as_bytes())],
            stored_at: Instant::now(),
            fresh_for: Duration::from_secs(60),
            initial_age: Duration::from_secs(5),
        }
    }

    #[test]
    fn round_trip_and_every_truncation_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("e");
        let e = entry("hello world");
        let bytes = encode("k", &e).unwrap();
        assert_eq!(Some(bytes.len() as u64), encoded_len("k", &e));
        fs::write(&path, &bytes).unwrap();
        let back = read_entry(&path, "k").unwrap();
        assert_eq!(back.body, vec![Bytes::from_static(b"hello world")]);
        assert_eq!(back.headers["etag"], "\"v1\"");
        assert_eq!(back.fresh_for, Duration::from_secs(60));
        assert!(back.initial_age >= Duration::from_secs(5));
        assert_eq!(
            read_entry(&path, "other").unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
        for cut in 0..bytes.len() {
            fs::write(&path, &bytes[..cut]).unwrap();
            assert!(read_entry(&path, "k").is_err(), "cut at {cut} was accepted");
        }
        for flip in [PREFIX, PREFIX + 10, bytes.len() - 1] {
            let mut b = bytes.clone();
            b[flip] ^= 0x40;
            fs::write(&path, &b).unwrap();
            assert!(
                read_entry(&path, "k").is_err(),
                "flip at {flip} was accepted"
            );
        }
    }
}
