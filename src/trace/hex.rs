//! Lower-case hex for the trace ids. Every gateway request parses a `traceparent` (55
//! bytes, 52 of them hex digits): its 32-digit trace id and 16-digit parent id are
//! checked and decoded eight digits per 64-bit word, without a table load or a branch
//! per digit (about 650 instructions per request with the per-digit table before, the
//! largest part of the trace layer's own parsing). The W3C grammar (`HEXDIGLC`) refuses
//! upper case, and so does everything here.

/// Each byte of a word: `n`.
const fn splat(n: u8) -> u64 {
    u64::from_ne_bytes([n; 8])
}

/// Each byte of a word: `0x80`.
const HIGH: u64 = splat(0x80);

/// Decodes 8 lower-case hex digits (`w`, little-endian: the first digit in the low byte)
/// into 4 bytes; `None` if any is not one.
#[inline]
fn decode_word(w: u64) -> Option<[u8; 4]> {
    // With every byte below 0x80 (checked), adding at most 0x50 to a byte never carries
    // into the next one: each comparison below is the top bit of its own byte.
    let ascii = w & HIGH == 0;
    // `0`..=`9`: at least 0x30 and not at least 0x3a.
    let digit = w.wrapping_add(splat(0x80 - 0x30)) & !w.wrapping_add(splat(0x80 - 0x3a)) & HIGH;
    // `a`..=`f`: at least 0x61 and not at least 0x67.
    let alpha = w.wrapping_add(splat(0x80 - 0x61)) & !w.wrapping_add(splat(0x80 - 0x67)) & HIGH;
    if !ascii || digit | alpha != HIGH {
        return None;
    }
    // `0`..`9` are 0x30..0x39, `a`..`f` 0x61..0x66: the low nibble, plus 9 for a letter.
    let nibbles = (w & splat(0x0f)) + (alpha >> 7) * 9;
    // Each pair of digits (first, second) becomes one byte, in the pair's low byte.
    let pairs = ((nibbles << 4) | (nibbles >> 8)) & 0x00ff_00ff_00ff_00ff;
    Some([
        pairs as u8,
        (pairs >> 16) as u8,
        (pairs >> 32) as u8,
        (pairs >> 48) as u8,
    ])
}

/// The value of each lower-case hex digit, `0xff` for every other byte: one table load per
/// digit for the short fields (version, flags) and the tail of a value.
const HEX_VALUE: [u8; 256] = {
    let mut t = [0xff; 256];
    let mut i = 0;
    while i < 10 {
        t[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        t[b'a' as usize + i] = 10 + i as u8;
        i += 1;
    }
    t
};

/// Decodes exactly `2 * N` lower-case hex digits.
pub(crate) fn hex<const N: usize>(s: &[u8]) -> Option<[u8; N]> {
    if s.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    let mut outs = out.chunks_exact_mut(4);
    let mut words = s.chunks_exact(8);
    for (o, w) in (&mut outs).zip(&mut words) {
        let w: [u8; 8] = w.try_into().ok()?;
        o.copy_from_slice(&decode_word(u64::from_le_bytes(w))?);
    }
    // Any invalid digit sets the high bits; checked once at the end.
    let mut bad = 0u8;
    for (o, pair) in outs
        .into_remainder()
        .iter_mut()
        .zip(words.remainder().chunks_exact(2))
    {
        let (hi, lo) = (
            HEX_VALUE[usize::from(pair[0])],
            HEX_VALUE[usize::from(pair[1])],
        );
        bad |= hi | lo;
        *o = hi << 4 | (lo & 0xf);
    }
    (bad & 0xf0 == 0).then_some(out)
}

/// The two lower-case hex digits of every byte value (512 bytes).
const HEX_PAIRS: [[u8; 2]; 256] = {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut t = [[0u8; 2]; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = [HEX[i >> 4], HEX[i & 0xf]];
        i += 1;
    }
    t
};

/// Writes `bytes` as lower-case hex into `out` (twice as long): one table load and one
/// two-byte store per byte. A request writes 41 bytes as hex (its request id, the first
/// call's `traceparent`); a load per *digit* (with its shift or mask) cost about 11
/// instructions per byte, this about half (measured with callgrind, session 15); the
/// word arithmetic of [`hex`] cost more than either.
pub(crate) fn hex_into(out: &mut [u8], bytes: &[u8]) {
    for (pair, &b) in out.chunks_exact_mut(2).zip(bytes) {
        pair.copy_from_slice(&HEX_PAIRS[usize::from(b)]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference: one digit at a time.
    fn slow(s: &[u8]) -> Option<Vec<u8>> {
        let digit = |c: u8| match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        };
        s.chunks(2)
            .map(|p| Some(digit(p[0])? << 4 | digit(*p.get(1)?)?))
            .collect()
    }

    #[test]
    fn every_byte_in_every_place_decodes_as_one_digit_at_a_time() {
        for place in 0..8 {
            for c in 0..=255u8 {
                // One word.
                let mut s = *b"0123abcd";
                s[place] = c;
                assert_eq!(hex::<4>(&s).map(Vec::from), slow(&s), "{place} {c}");
                // Words and a tail: the second word, and the tail pair.
                let mut long = *b"00112233445566778899aabbccddeeff0a";
                long[8 + place] = c;
                assert_eq!(hex::<17>(&long).map(Vec::from), slow(&long), "{place} {c}");
                let mut long = *b"00112233445566778899aabbccddeeff0a";
                long[32 + place % 2] = c;
                assert_eq!(hex::<17>(&long).map(Vec::from), slow(&long), "{place} {c}");
            }
        }
        // Every byte value round-trips through the encoder, in every place of a word.
        for v in 0..=255u8 {
            let bytes = [v, v.wrapping_add(1), v ^ 0xff, v.rotate_left(4)];
            let mut s = [0u8; 8];
            hex_into(&mut s, &bytes);
            assert_eq!(hex::<4>(&s), Some(bytes));
            let want: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            assert_eq!(&s, want.as_bytes());
        }
    }

    #[test]
    fn lengths_must_match() {
        assert_eq!(hex::<2>(b"00ff"), Some([0, 0xff]));
        assert_eq!(hex::<2>(b"00f"), None);
        assert_eq!(hex::<4>(b"0011223"), None);
        assert_eq!(hex::<4>(b"001122334"), None);
        assert_eq!(hex::<1>(b"F0"), None);
    }
}
