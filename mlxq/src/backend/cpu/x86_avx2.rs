//! AVX2 and FMA building blocks for CPUs without the AVX-512 kernels (Zen 2/3, Intel client
//! cores): a decode of 32 codes of any width into bytes, and the blocked GEMM's panel decode
//! and micro-kernel (the driver is [`x86_gemm`](super::x86_gemm)'s, shared with AVX-512).
//!
//! **Decode of 32 codes** ([`decode32`]): 8-bit codes are the bytes themselves; 4-bit codes
//! are the 16 bytes' low nibbles then their high nibbles (the order of every x86 kernel, x
//! being permuted to match); other widths take exactly `4·BITS` bytes (a dword-masked load,
//! so the last chunk of a row never reads past it) and, per 128-bit lane of 8 codes, a byte
//! shuffle puts each code's two bytes in a 16-bit word, a multiply by `2^(8 − shift)` moves
//! the code to the word's high byte, and a shift and mask keep it: 10 instructions for 32
//! codes, with neither BMI2 (`pdep` is microcoded on Zen 2) nor AVX-512's `vpmultishiftqb`.
//!
//! **GEMM** ([`Avx2Gemm`]): 16 ymm registers hold a 6-row × 16-column tile (12 accumulators,
//! two panel vectors, one broadcast of x), so a task owns 16 columns; panels of 512 values of
//! K; the panel is decoded 8 columns × 32 codes at a time through an 8×8 dword transpose.

use super::qmm::QmmArgs;
use super::x86_gemm::{GemmIsa, Panel};
use super::{DisjointOut, KernelFn, Variant};
use crate::dtype::Float;
use crate::error::Result;
use crate::quant::pack::dispatch_bits;
use std::arch::x86_64::*;

/// Whether this CPU has AVX2 and FMA.
pub(crate) fn available() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

/// 8 elements of `S` at `p`, widened to f32 (exactly: bf16 is the upper half of an f32).
///
/// # Safety
/// `p` points to 8 readable elements; the CPU has [`available`]'s features.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn widen8<S: crate::dtype::Element>(p: *const S) -> __m256 {
    // SAFETY: each load reads the 8 elements the caller vouches for.
    unsafe {
        match S::DTYPE {
            crate::DType::F16 => _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)),
            crate::DType::BF16 => _mm256_castsi256_ps(_mm256_slli_epi32::<16>(
                _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i)),
            )),
            _ => _mm256_loadu_ps(p as *const f32),
        }
    }
}

/// The variant: `quantized_matmul`, transpose, every affine width, any x dtype; fewer rows
/// than its hand-off run a decode kernel: `avx2i16` where it applies (bf16/f16 x and output,
/// below [`MIN_M_INT`] rows), else `avx2` (below [`MIN_M`]).
pub(crate) const QMM_T_GEMM_AVX2: Variant = Variant {
    name: "avx2gemm",
    supports: |k| {
        k.mode == crate::QuantMode::Affine
            && k.op == crate::registry::OpKind::QuantizedMatmul
            && k.flag
            && available()
    },
    decode: Some(|k| vec![handoff(k)]),
    build: |k| {
        let int = (super::x86_avx2_int::QMM_T_AVX2_INT.supports)(k);
        crate::with_float_type!(k.scales, S => crate::with_float_type!(k.output, O => {
            Some(KernelFn::Qmm(dispatch_bits!(k.bits, B => if int {
                qmm_t::<S, O, B, true> as super::qmm::QmmFn
            } else {
                qmm_t::<S, O, B, false> as super::qmm::QmmFn
            }, _ => return None)))
        }, _ => None), _ => None)
    },
};

/// Rows of x from which the GEMM beats the `avx2` decode kernel.
pub(crate) const MIN_M: usize = 6;
/// Rows of x from which the GEMM takes over from the `avx2i16` decode kernel (which was the
/// faster up to 20 rows on Zen 3, 4096², and 1.5× slower at 24: docs/perf.md, session 25).
pub(crate) const MIN_M_INT: usize = 17;

/// Below how many rows the GEMM hands `k`'s calls to which decode kernel.
fn handoff(k: &crate::registry::KernelKey) -> (usize, &'static str) {
    if (super::x86_avx2_int::QMM_T_AVX2_INT.supports)(k) {
        (MIN_M_INT, super::x86_avx2_int::QMM_T_AVX2_INT.name)
    } else {
        (MIN_M, super::x86::QMV_T_AVX2.name)
    }
}

/// The GEMM, or for few rows the decode kernel [`handoff`] names (`INT`: `avx2i16`).
fn qmm_t<S: Float, O: Float, const BITS: usize, const INT: bool>(a: QmmArgs<'_>) -> Result<()> {
    if INT && a.m < MIN_M_INT {
        return super::x86_avx2_int::qmm_t::<S, O, BITS>(a);
    }
    if !INT && a.m < MIN_M {
        return super::x86::qmv_t_avx2::<S, O, BITS>(a);
    }
    // SAFETY: this variant is only chosen where `available()` holds.
    unsafe { super::x86_gemm::gemm_t::<Avx2Gemm, S, O, BITS>(a) }
}

/// Per-lane byte-shuffle indices and multipliers for the 16 codes `base_code..base_code +
/// 16` of a `BITS`-bit chunk whose source bytes start at byte `base_byte` of both lanes.
const fn spread<const BITS: usize>(base_code: usize, base_byte: usize) -> ([u8; 32], [u16; 16]) {
    let mut idx = [0x80u8; 32];
    let mut mul = [0u16; 16];
    let mut w = 0;
    while w < 16 {
        let bit = (base_code + w) * BITS;
        let (byte, shift) = (bit / 8 - base_byte, bit % 8);
        idx[2 * w] = byte as u8;
        if shift + BITS > 8 {
            idx[2 * w + 1] = byte as u8 + 1;
        }
        mul[w] = 1 << (8 - shift);
        w += 1;
    }
    (idx, mul)
}

/// Whether the second 16 codes of a 32-code chunk take their bytes from byte 8 on (else
/// from byte 0): their `2·BITS` bytes must lie in one 16-byte lane.
const fn high_base(bits: usize) -> usize {
    if bits >= 5 {
        8
    } else {
        0
    }
}

/// A `vpmaskmovd` mask of the first `n` dwords.
const fn first_dwords(n: usize) -> [i32; 8] {
    let mut m = [0; 8];
    let mut i = 0;
    while i < n && i < 8 {
        m[i] = -1;
        i += 1;
    }
    m
}

/// 32 codes starting at `p`, one per byte: 4-bit codes as the 16 low nibbles then the 16
/// high nibbles, every other width in order.
///
/// # Safety
/// `p` points to `4·BITS` readable bytes; the CPU has AVX2.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn decode32<const BITS: usize>(p: *const u8) -> __m256i {
    // SAFETY (all loads): the caller guarantees 4·BITS readable bytes at `p`, and each load
    // reads exactly that many.
    match BITS {
        8 => unsafe { _mm256_loadu_si256(p as *const __m256i) },
        4 => {
            let b = unsafe { _mm_loadu_si128(p as *const __m128i) };
            let v = _mm256_broadcastsi128_si256(b);
            let v = _mm256_srlv_epi32(v, _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4));
            _mm256_and_si256(v, _mm256_set1_epi8(0x0f))
        }
        _ => {
            // The first BITS dwords (4·BITS bytes).
            let dwords: [i32; 8] = const { first_dwords(BITS) };
            let mask = unsafe { _mm256_loadu_si256(dwords.as_ptr() as *const __m256i) };
            let raw = unsafe { _mm256_maskload_epi32(p as *const i32, mask) };
            let lo_src = _mm256_permute2x128_si256::<0x00>(raw, raw);
            let hi_src = if high_base(BITS) == 8 {
                _mm256_permutevar8x32_epi32(raw, _mm256_setr_epi32(2, 3, 4, 5, 2, 3, 4, 5))
            } else {
                lo_src
            };
            // Both lanes of a source hold the same 16 bytes, so one index table serves both.
            let (ia, ma) = const { spread::<BITS>(0, 0) };
            let (ib, mb) = const { spread::<BITS>(16, high_base(BITS)) };
            let field = |src: __m256i, idx: [u8; 32], mul: [u16; 16]| unsafe {
                let idx = _mm256_loadu_si256(idx.as_ptr() as *const __m256i);
                let mul = _mm256_loadu_si256(mul.as_ptr() as *const __m256i);
                let words = _mm256_mullo_epi16(_mm256_shuffle_epi8(src, idx), mul);
                _mm256_and_si256(
                    _mm256_srli_epi16::<8>(words),
                    _mm256_set1_epi16((1 << BITS) - 1),
                )
            };
            let (a, b) = (field(lo_src, ia, ma), field(hi_src, ib, mb));
            // packus interleaves the lanes: [a0 b0 | a1 b1] → [a0 a1 b0 b1].
            _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packus_epi16(a, b))
        }
    }
}

/// The sum of `v`'s 8 lanes, `((v0 + v4) + (v2 + v6)) + ((v1 + v5) + (v3 + v7))`.
#[inline]
#[target_feature(enable = "avx")]
pub(crate) fn hsum8(v: __m256) -> f32 {
    let h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps::<0b01>(h, h)))
}

/// Transposes an 8×8 matrix of dwords in place (`r[i]` lane `j` ↔ `r[j]` lane `i`).
#[inline]
#[target_feature(enable = "avx2")]
pub(crate) fn transpose8(r: &mut [__m256i; 8]) {
    let mut t = [_mm256_setzero_si256(); 8];
    for i in 0..4 {
        t[2 * i] = _mm256_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    let mut u = [_mm256_setzero_si256(); 8];
    for h in 0..2 {
        let b = 4 * h;
        u[b] = _mm256_unpacklo_epi64(t[b], t[b + 2]);
        u[b + 1] = _mm256_unpackhi_epi64(t[b], t[b + 2]);
        u[b + 2] = _mm256_unpacklo_epi64(t[b + 1], t[b + 3]);
        u[b + 3] = _mm256_unpackhi_epi64(t[b + 1], t[b + 3]);
    }
    // u[4h + e], 128-bit lane L: element 4L + e of rows 4h..4h + 4.
    for e in 0..4 {
        r[e] = _mm256_permute2x128_si256::<0x20>(u[e], u[4 + e]);
        r[4 + e] = _mm256_permute2x128_si256::<0x31>(u[e], u[4 + e]);
    }
}

/// `out[j·nc + c] = src[(c0 + c)·groups + j]` widened to f32 for every group `j` and the
/// tile's `cols` columns, zero past them (`nc` a multiple of 8): a tile's scales or biases,
/// 8 columns × 8 groups per transpose (the groups past the last whole 8 one at a time). The
/// AVX2 GEMMs' `widen_tile`. Does nothing if a slice is too short.
///
/// # Safety
/// The CPU has [`available`]'s features.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn widen_tile<S: Float>(
    nc: usize,
    src: &[S],
    groups: usize,
    c0: usize,
    cols: usize,
    out: &mut [f32],
) {
    if !nc.is_multiple_of(8)
        || cols > nc
        || out.len() < groups * nc
        || src.len() < (c0 + cols) * groups
    {
        return;
    }
    let whole = groups / 8 * 8;
    for cb in (0..nc).step_by(8) {
        for j0 in (0..whole).step_by(8) {
            let mut rows = [_mm256_setzero_si256(); 8];
            for (c, row) in rows.iter_mut().enumerate() {
                let col = cb + c;
                if col < cols {
                    // SAFETY: groups j0..j0 + 8 ≤ groups of column c0 + col lie inside `src`
                    // (checked above).
                    *row = _mm256_castps_si256(unsafe {
                        widen8(src.as_ptr().add((c0 + col) * groups + j0))
                    });
                }
            }
            transpose8(&mut rows);
            for (j, v) in rows.iter().enumerate() {
                // SAFETY: (j0 + j)·nc + cb + 8 ≤ groups·nc (checked above).
                unsafe {
                    _mm256_storeu_si256(
                        out.as_mut_ptr().add((j0 + j) * nc + cb) as *mut __m256i,
                        *v,
                    )
                };
            }
        }
    }
    for j in whole..groups {
        for c in 0..nc {
            out[j * nc + c] = if c < cols {
                src[(c0 + c) * groups + j].to_f32()
            } else {
                0.0
            };
        }
    }
}

/// `out[r·n + c0 + c] = O(acc[r·nc + c])` for `r < m`, `c < cols`: a GEMM tile's rows
/// rounded to the output dtype 8 at a time ([`store8`]: `half`'s nearest-even, NaN kept),
/// the rest one at a time. Rows that `acc` or `out` do not hold are skipped.
///
/// [`store8`]: super::x86_avx2_fp_quant::store8
///
/// # Safety
/// The CPU has [`available`]'s features; as [`DisjointOut::write`] for every index written.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn write_tile<O: Float>(
    acc: &[f32],
    nc: usize,
    m: usize,
    cols: usize,
    out: &DisjointOut<O>,
    n: usize,
    c0: usize,
) {
    for r in 0..m {
        let Some(row) = acc.get(r * nc..r * nc + cols) else {
            return;
        };
        // SAFETY: the caller's contract.
        let Some(p) = (unsafe { out.range_ptr(r * n + c0, cols) }) else {
            continue;
        };
        let mut c = 0;
        while c + 8 <= cols {
            // SAFETY: elements c..c + 8 of `row` and of the run at `p` (`cols` long).
            unsafe {
                super::x86_avx2_fp_quant::store8::<O, true>(
                    p.add(c),
                    _mm256_loadu_ps(row.as_ptr().add(c)),
                )
            };
            c += 8;
        }
        for (i, &v) in row.iter().enumerate().skip(c) {
            // SAFETY: i < cols, inside the run at `p`.
            unsafe { p.add(i).write(O::from_f32(v)) };
        }
    }
}

/// The AVX2 instruction set for [`x86_gemm`](super::x86_gemm)'s blocked GEMM.
pub(crate) struct Avx2Gemm;

impl GemmIsa for Avx2Gemm {
    const NAME: &'static str = "avx2gemm";
    const LANES: usize = 8;
    const CB: usize = 2;
    const R: usize = 6;
    const CHUNK: usize = 32;
    // 512 values of K per panel (33 KiB, L2): the f32 output tile is read and written once
    // per panel, which at K = 128 evicted the panel from L1 and halved M = 512 (session 13,
    // docs/perf.md).
    const KC: usize = 512;

    unsafe fn widen_tile<S: Float>(
        src: &[S],
        groups: usize,
        c0: usize,
        cols: usize,
        out: &mut [f32],
    ) {
        // SAFETY: the caller guarantees AVX2, FMA and F16C; `widen_tile` checks its slices.
        unsafe { widen_tile(Self::NC, src, groups, c0, cols, out) }
    }

    unsafe fn decode_panel<const BITS: usize>(src: &Panel<'_>, sv: &[f32], panel: &mut [f32]) {
        // SAFETY: the caller guarantees AVX2 and FMA; `decode_panel` checks its slices.
        unsafe { decode_panel::<BITS>(src, sv, panel) }
    }

    unsafe fn micro(
        rows: usize,
        cbs: usize,
        kp: usize,
        x: &[f32],
        xs: usize,
        panel: &[f32],
        c: &mut [f32],
        first: bool,
    ) {
        macro_rules! go {
            ($($r:literal)*) => {
                match (rows, cbs) {
                    // SAFETY (every arm): the caller guarantees AVX2 and FMA; `micro` checks
                    // its slices.
                    $( ($r, 1) => unsafe { micro::<$r, 1>(kp, x, xs, panel, c, first) },
                       ($r, _) => unsafe { micro::<$r, 2>(kp, x, xs, panel, c, first) }, )*
                    _ => {}
                }
            };
        }
        go!(1 2 3 4 5 6);
    }
}

const NC: usize = Avx2Gemm::LANES * Avx2Gemm::CB;

/// Decodes the codes of `src` into `panel` rows `0..len` (`[K-step][NC]`, scaled by `sv`,
/// `[group][NC]`); columns past `cols` become zero. Does nothing if a slice is too short.
///
/// # Safety
/// The CPU has AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
unsafe fn decode_panel<const BITS: usize>(src: &Panel<'_>, sv: &[f32], panel: &mut [f32]) {
    let last_col = src.col0 + src.cols;
    if !src.len.is_multiple_of(32)
        || src.cols > NC
        || src.packed.len() < last_col * src.row_bytes
        || src.byte0 + src.len / 8 * BITS > src.row_bytes
        || sv.len() < src.len / src.g * NC
        || panel.len() < src.len * NC
    {
        return;
    }
    let ff = _mm256_set1_epi32(0xff);
    for cb in 0..src.cols.div_ceil(8) {
        for ch in 0..src.len / 32 {
            let mut rows = [_mm256_setzero_si256(); 8];
            for (c, row) in rows.iter_mut().enumerate() {
                let col = src.col0 + cb * 8 + c;
                if col < last_col {
                    let at = col * src.row_bytes + src.byte0 + ch * 4 * BITS;
                    // SAFETY: the chunk's 4·BITS bytes lie within column `col`'s row of the
                    // block (`byte0 + len/8·BITS ≤ row_bytes`, `col < packed.len()/row_bytes`).
                    *row = unsafe { decode32::<BITS>(src.packed.as_ptr().add(at)) };
                }
            }
            transpose8(&mut rows);
            // rows[q] lane c = positions 4q..4q + 4 of column c, one byte each.
            for (q, &d) in rows.iter().enumerate() {
                let p0 = ch * 32 + 4 * q;
                // SAFETY: group p0/g < len/g, each NC wide (checked above).
                let s = unsafe { _mm256_loadu_ps(sv.as_ptr().add(p0 / src.g * NC + cb * 8)) };
                let v = [
                    _mm256_and_si256(d, ff),
                    _mm256_and_si256(_mm256_srli_epi32::<8>(d), ff),
                    _mm256_and_si256(_mm256_srli_epi32::<16>(d), ff),
                    _mm256_srli_epi32::<24>(d),
                ];
                for (i, v) in v.into_iter().enumerate() {
                    let f = _mm256_mul_ps(_mm256_cvtepi32_ps(v), s);
                    // SAFETY: row p0 + i < len, NC wide (checked above).
                    unsafe { _mm256_storeu_ps(panel.as_mut_ptr().add((p0 + i) * NC + cb * 8), f) };
                }
            }
        }
    }
}

/// `c[RR][..8·C] (+)= x[RR][..kp] · panel[kp][..8·C]` (rows of `c` and of the panel NC
/// apart); `c` starts from zero when `first`. Does nothing if a slice is shorter than that
/// needs.
///
/// # Safety
/// The CPU has AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
unsafe fn micro<const RR: usize, const C: usize>(
    kp: usize,
    x: &[f32],
    xs: usize,
    panel: &[f32],
    c: &mut [f32],
    first: bool,
) {
    if kp == 0
        || x.len() < (RR - 1) * xs + kp
        || panel.len() < (kp - 1) * NC + 8 * C
        || c.len() < (RR - 1) * NC + 8 * C
    {
        return;
    }
    let (xp, pp, cp) = (x.as_ptr(), panel.as_ptr(), c.as_mut_ptr());
    let mut acc = [[_mm256_setzero_ps(); C]; RR];
    if !first {
        for (r, row) in acc.iter_mut().enumerate() {
            for (v, a) in row.iter_mut().enumerate() {
                // SAFETY: (r·NC + v·8 + 8) ≤ (RR − 1)·NC + 8·C ≤ c.len() (checked above).
                *a = unsafe { _mm256_loadu_ps(cp.add(r * NC + v * 8)) };
            }
        }
    }
    for s in 0..kp {
        // SAFETY: s·NC + 8·C ≤ (kp − 1)·NC + 8·C ≤ panel.len(), r·xs + s < x.len() (checked).
        unsafe {
            let mut wv = [_mm256_setzero_ps(); C];
            for (v, wv) in wv.iter_mut().enumerate() {
                *wv = _mm256_loadu_ps(pp.add(s * NC + v * 8));
            }
            for (r, row) in acc.iter_mut().enumerate() {
                let xv = _mm256_broadcast_ss(&*xp.add(r * xs + s));
                for (a, &wv) in row.iter_mut().zip(&wv) {
                    *a = _mm256_fmadd_ps(xv, wv, *a);
                }
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        for (v, &a) in row.iter().enumerate() {
            // SAFETY: as for the loads.
            unsafe { _mm256_storeu_ps(cp.add(r * NC + v * 8), a) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::pack::{dispatch_bits, pack8};

    /// `widen_tile` against its definition (bit for bit) and `write_tile` against
    /// `Float::from_f32` (bit for bit, NaN as NaN), bf16/f16/f32, group counts off the 8 ×
    /// 8 transpose, partial tiles, ties to even, ±∞ and NaN; the output around the tile
    /// stays untouched.
    #[test]
    fn tile_widen_and_write_match_the_scalar_definitions() {
        if !available() {
            eprintln!("skipped: this CPU lacks AVX2, FMA or F16C");
            return;
        }
        fn check<T: Float>() {
            let mut state = 0x853c_49e6_748f_ea9bu64;
            let mut next = move || {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state
            };
            let value = |next: &mut dyn FnMut() -> u64| match next() % 16 {
                0 => f32::NAN,
                // A NaN whose payload is all in the low half: rounding it as a number to bf16
                // gives ∞.
                15 => f32::from_bits(0xff80_0001),
                1 => f32::INFINITY,
                2 => -f32::INFINITY,
                // A bf16 tie: the low half exactly 0x8000.
                3 => f32::from_bits(((next() as u32) & 0xffff_0000) | 0x8000),
                _ => ((next() >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 1e3,
            };
            for (groups, cols, n) in [
                (64, 16, 40),
                (3, 16, 16),
                (9, 5, 21),
                (66, 11, 11),
                (1, 16, 33),
            ] {
                const NC: usize = 16;
                let c0 = n - cols;
                let src: Vec<T> = (0..n * groups)
                    .map(|_| T::from_f32(value(&mut next)))
                    .collect();
                let mut out = vec![7f32; groups * NC];
                // SAFETY: features checked above.
                unsafe { widen_tile(NC, &src, groups, c0, cols, &mut out) };
                for j in 0..groups {
                    for c in 0..NC {
                        let want = if c < cols {
                            src[(c0 + c) * groups + j].to_f32()
                        } else {
                            0.0
                        };
                        assert_eq!(
                            out[j * NC + c].to_bits(),
                            want.to_bits(),
                            "widen {groups} {cols} {j} {c}"
                        );
                    }
                }
                let m = 7;
                let acc: Vec<f32> = (0..m * NC).map(|_| value(&mut next)).collect();
                let mut y = vec![T::from_f32(-2.0); m * n];
                let writer = DisjointOut::new(&mut y);
                // SAFETY: features checked above; one thread writes.
                unsafe { write_tile(&acc, NC, m, cols, &writer, n, c0) };
                for r in 0..m {
                    for c in 0..n {
                        let got = y[r * n + c].to_f32();
                        if c < c0 {
                            assert_eq!(got, -2.0, "write touched {r} {c}");
                            continue;
                        }
                        let want = T::from_f32(acc[r * NC + c - c0]);
                        let same = bytemuck::bytes_of(&y[r * n + c]) == bytemuck::bytes_of(&want)
                            || (got.is_nan() && want.to_f32().is_nan());
                        assert!(
                            same,
                            "write {groups} {cols} row {r} col {c}: {got} against {}",
                            want.to_f32()
                        );
                    }
                }
            }
        }
        check::<half::bf16>();
        check::<half::f16>();
        check::<f32>();
    }

    /// `decode32` against the packing definition, every width, random codes.
    #[test]
    fn decode32_matches_the_packing() {
        if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")) {
            eprintln!("skipped: this CPU lacks AVX2 or FMA");
            return;
        }
        fn check<const BITS: usize>() {
            let mut state = 0x2545_f491_4f6c_dd1du64 ^ BITS as u64;
            for _ in 0..64 {
                let codes: [u8; 32] = std::array::from_fn(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    (state % (1 << BITS)) as u8
                });
                let mut packed = vec![0u8; 4 * BITS];
                for (c, out) in codes.chunks_exact(8).zip(packed.chunks_exact_mut(BITS)) {
                    pack8::<BITS>(c.try_into().unwrap(), out);
                }
                // SAFETY: AVX2 checked above; `packed` holds exactly 4·BITS bytes.
                let got: [u8; 32] =
                    unsafe { std::mem::transmute(decode32::<BITS>(packed.as_ptr())) };
                let want: [u8; 32] = std::array::from_fn(|p| {
                    codes[if BITS == 4 { (p % 16) * 2 + p / 16 } else { p }]
                });
                assert_eq!(got, want, "{BITS}-bit");
            }
        }
        for bits in [1u32, 2, 3, 4, 5, 6, 8] {
            dispatch_bits!(bits, B => check::<B>(), _ => unreachable!());
        }
    }
}
