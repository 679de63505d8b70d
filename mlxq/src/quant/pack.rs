//! The packing rule, one for every width: a packed row is a little-endian bit stream in which
//! element `i` occupies bits `[i·b, (i+1)·b)`, least significant bit first, with no padding.
//!
//! Eight consecutive elements therefore occupy exactly `b` bytes, for every `b` in 1..=8, and
//! every group (32, 64 or 128 elements) is a whole number of such 8-element chunks. All fast
//! paths work chunk by chunk: load `b` bytes into a `u64`, shift out eight codes.
//! [`read_code`] is the slow, obviously-correct reader the fast paths are tested against.

/// Code `i` of a packed bit stream of `bits`-wide elements (the reference reader).
/// Returns `None` when element `i` lies past the end of `bytes`.
pub fn read_code(bits: u32, bytes: &[u8], i: usize) -> Option<u8> {
    let start = i.checked_mul(bits as usize)?;
    let mut v = 0u32;
    for j in 0..bits as usize {
        let bit = start + j;
        let byte = *bytes.get(bit / 8)?;
        v |= u32::from((byte >> (bit % 8)) & 1) << j;
    }
    Some(v as u8)
}

/// Reads the `BITS` bytes of one 8-element chunk as a little-endian integer.
#[inline(always)]
fn load_chunk<const BITS: usize>(bytes: &[u8]) -> u64 {
    let mut buf = [0u8; 8];
    buf[..BITS].copy_from_slice(&bytes[..BITS]);
    u64::from_le_bytes(buf)
}

/// Decodes the eight codes of one chunk (`bytes` holds at least `BITS` bytes).
#[inline(always)]
pub fn unpack8<const BITS: usize>(bytes: &[u8]) -> [u8; 8] {
    let v = load_chunk::<BITS>(bytes);
    let mask = (1u64 << BITS) - 1;
    std::array::from_fn(|j| ((v >> (j * BITS)) & mask) as u8)
}

/// Encodes eight codes (each `< 2^BITS`) into the `BITS` bytes of one chunk.
#[inline(always)]
pub fn pack8<const BITS: usize>(codes: &[u8; 8], out: &mut [u8]) {
    let mut v = 0u64;
    for (j, &c) in codes.iter().enumerate() {
        v |= u64::from(c) << (j * BITS);
    }
    out[..BITS].copy_from_slice(&v.to_le_bytes()[..BITS]);
}

fn unpack_row_impl<const BITS: usize>(bytes: &[u8], codes: &mut [u8]) {
    for (chunk, out) in bytes.chunks_exact(BITS).zip(codes.chunks_exact_mut(8)) {
        out.copy_from_slice(&unpack8::<BITS>(chunk));
    }
}

fn pack_row_impl<const BITS: usize>(codes: &[u8], bytes: &mut [u8]) {
    for (c, out) in codes.chunks_exact(8).zip(bytes.chunks_exact_mut(BITS)) {
        let c: &[u8; 8] = c.try_into().unwrap_or(&[0; 8]);
        pack8::<BITS>(c, out);
    }
}

/// Evaluates `$body` with the constant `$b: usize` bound to a runtime bit width MLX supports
/// (1, 2, 3, 4, 5, 6, 8), or evaluates `$other`. Runtime bits → const generics, in one place.
macro_rules! dispatch_bits {
    ($bits:expr, $b:ident => $body:expr, _ => $other:expr) => {
        match $bits {
            1 => {
                const $b: usize = 1;
                $body
            }
            2 => {
                const $b: usize = 2;
                $body
            }
            3 => {
                const $b: usize = 3;
                $body
            }
            4 => {
                const $b: usize = 4;
                $body
            }
            5 => {
                const $b: usize = 5;
                $body
            }
            6 => {
                const $b: usize = 6;
                $body
            }
            8 => {
                const $b: usize = 8;
                $body
            }
            _ => $other,
        }
    };
}
pub(crate) use dispatch_bits;

/// Decodes `codes.len()` codes (a multiple of 8) from `bytes` (`codes.len()·bits/8` bytes).
/// Returns `false`, touching nothing, if the lengths disagree or `bits` is not one of 1..=6, 8.
pub fn unpack_row(bits: u32, bytes: &[u8], codes: &mut [u8]) -> bool {
    if !codes.len().is_multiple_of(8) || bytes.len() != codes.len() / 8 * bits as usize {
        return false;
    }
    dispatch_bits!(bits, B => unpack_row_impl::<B>(bytes, codes), _ => return false);
    true
}

/// Encodes `codes` (a multiple of 8, each `< 2^bits`) into `bytes` (`codes.len()·bits/8`).
/// Returns `false`, touching nothing, if the lengths disagree or `bits` is not one of 1..=6, 8.
pub fn pack_row(bits: u32, codes: &[u8], bytes: &mut [u8]) -> bool {
    if !codes.len().is_multiple_of(8) || bytes.len() != codes.len() / 8 * bits as usize {
        return false;
    }
    dispatch_bits!(bits, B => pack_row_impl::<B>(codes, bytes), _ => return false);
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Hex words of MLX's own packing of q_i = i mod 2^b, q_1 = max (mlx-format-survey §1.4).
    #[test]
    fn matches_mlx_table() {
        let cases: [(u32, &[u32]); 7] = [
            (1, &[0xaaaaaaaa]),
            (2, &[0xe4e4e4ec, 0xe4e4e4e4]),
            (3, &[0x88fac6b8, 0xc688fac6, 0xfac688fa]),
            (4, &[0x765432f0, 0xfedcba98, 0x76543210, 0xfedcba98]),
            (
                5,
                &[0x8a418be0, 0xc5a92839, 0xca307b9a, 0x38bdab49, 0xffbbcdeb],
            ),
            (6, &[0x440c2fc0, 0xa2481c61, 0x3ce34c2c]),
            (8, &[0x0302ff00, 0x07060504]),
        ];
        for (bits, words) in cases {
            let max = (1u32 << bits) - 1;
            let codes: Vec<u8> = (0..32u32)
                .map(|i| if i == 1 { max } else { i & max } as u8)
                .collect();
            let mut bytes = vec![0u8; 32 * bits as usize / 8];
            assert!(pack_row(bits, &codes, &mut bytes));
            let got: Vec<u32> = bytes
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .take(words.len())
                .collect();
            assert_eq!(got, words, "bits {bits}");
        }
    }

    #[test]
    fn rejects_bad_lengths() {
        assert!(pack_row(4, &[0; 8], &mut [0u8; 4]));
        assert!(!pack_row(4, &[0; 8], &mut [0u8; 3]));
        assert!(!pack_row(7, &[0; 8], &mut [0u8; 7]));
        assert!(!pack_row(9, &[0; 8], &mut [0u8; 9]));
        assert!(!unpack_row(4, &[0; 4], &mut [0u8; 7]));
        assert_eq!(read_code(4, &[0x21], 2), None);
    }

    proptest! {
        #[test]
        fn pack_unpack_round_trip(bits in prop::sample::select(vec![1u32, 2, 3, 4, 5, 6, 8]), seed in proptest::collection::vec(any::<u8>(), 8..256)) {
            let n = seed.len() / 8 * 8;
            let codes: Vec<u8> = seed[..n].iter().map(|c| c & ((1u16 << bits) - 1) as u8).collect();
            let mut bytes = vec![0u8; n * bits as usize / 8];
            prop_assert!(pack_row(bits, &codes, &mut bytes));
            for (i, &c) in codes.iter().enumerate() {
                prop_assert_eq!(read_code(bits, &bytes, i), Some(c));
            }
            let mut back = vec![0u8; n];
            prop_assert!(unpack_row(bits, &bytes, &mut back));
            prop_assert_eq!(back, codes);
        }
    }
}
