//! Stable 64-bit hashing for endpoint ids, ring points and request keys.
//!
//! std's `DefaultHasher` is not guaranteed stable across Rust releases, and sticky cookies
//! and ring positions must survive a balancer restart or upgrade, so a fixed function is used:
//! FNV-1a over the bytes, then the splitmix64 finaliser for avalanche (FNV alone clusters
//! similar keys such as `127.0.0.1:8081` / `:8082` on a ring).

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// Hashes bytes to a well-mixed, stable 64-bit value (FNV-1a + splitmix64 finaliser).
#[inline]
pub fn hash_bytes(bytes: &[u8]) -> u64 {
    let mut h = FNV_OFFSET;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    mix(h)
}

/// The splitmix64 finaliser: a bijective mix with full avalanche.
#[inline]
pub(crate) fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A stable id for an endpoint key, from its `Debug` text.
pub(crate) fn key_id<K: std::fmt::Debug>(key: &K) -> u64 {
    hash_bytes(format!("{key:?}").as_bytes())
}

/// A cheap per-thread xorshift generator for power-of-two choices: no lock, no syscall.
pub(crate) fn fast_rand() -> u64 {
    use std::cell::Cell;
    thread_local! {
        static STATE: Cell<u64> = Cell::new({
            // Distinct per thread: the address of a thread-local plus the time.
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
            let local = 0u8;
            mix(t ^ (&local as *const u8 as u64)) | 1
        });
    }
    STATE.with(|s| {
        let mut x = s.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.set(x);
        x
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stable_values() {
        // Fixed forever: cookies and rings depend on it.
        assert_eq!(hash_bytes(b""), mix(FNV_OFFSET));
        assert_ne!(hash_bytes(b"a"), hash_bytes(b"b"));
        assert_eq!(key_id(&"x"), hash_bytes(b"\"x\""));
    }
}
