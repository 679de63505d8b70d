//! The int8-activation GEMM on AVX2 (`avx2gemm-i8`, opt-in): x quantized to int8 per block
//! of 32 values, the codes as u8, and `vpmaddubsw` integer dots, for CPUs without AVX-512
//! VNNI (Zen 2/3, Intel client cores). The driver is [`x86_gemm::gemm_codes`], shared with
//! `avx512gemm-i8`; this file is its instruction set ([`Avx2I8`]).
//!
//! **The dot.** `vpmaddubsw` multiplies 32 u8 codes by 32 s8 values of x and adds adjacent
//! pairs into 16 i16 lanes, saturating. A vector holds 8 columns × 4 codes of K (a dword
//! per column, as `vpdpbusd`'s layout), so each column's two i16 lanes carry its 4-code dot;
//! `vpmaddwd` by ones adds them into one i32 per column. With |x̂| ≤ 127 a pair sums to at
//! most `2·127·(2^bits − 1)`: 16 002 at 6 bits, below i16's 32 767, but 64 770 at 8 bits,
//! so 8-bit codes take x on ±63 (`2·63·255` = 32 130), half the steps of the other widths
//! (the error bound of [`x86_gemm::gemm_codes`] with `L` = 63). Up to 4 bits the i16 lanes
//! hold a whole block of 32 values (`8·2·127·15` = 30 480) and are widened once per block;
//! wider codes widen every step.
//!
//! **Tile.** 6 rows × 16 columns: 12 accumulators, two panel vectors, one broadcast of x and
//! one product in the 16 ymm registers. Panels of 512 values of K (8 KiB of codes, L1).
//!
//! [`x86_gemm::gemm_codes`]: super::x86_gemm::gemm_codes

use super::x86_avx2::{decode32, hsum8, transpose8};
use super::x86_gemm::{build_codes, CodesIsa, Panel, XTile, XBLOCK};
use super::Variant;
use crate::aligned::Line;
use crate::dtype::Float;
use std::arch::x86_64::*;

/// The opt-in variant (never chosen unless forced by name): results differ from the f32
/// path by up to the bound of [`x86_gemm::gemm_codes`](super::x86_gemm::gemm_codes), beyond the
/// conformance tolerance.
pub(crate) const QMM_T_GEMM_I8_AVX2: Variant = Variant {
    name: Avx2I8::NAME,
    supports: |k| {
        k.mode == crate::QuantMode::Affine
            && k.op == crate::registry::OpKind::QuantizedMatmul
            && k.flag
            && super::x86_avx2::available()
    },
    decode: None,
    build: build_codes::<Avx2I8>,
};

/// Columns per vector.
const LANES: usize = 8;
/// Column vectors per tile.
const CB: usize = 2;
/// Columns per tile.
const NC: usize = LANES * CB;
/// Rows of x per micro-kernel tile.
const R: usize = 6;
/// Values of K per panel.
const KC: usize = 512;

/// AVX2 `vpmaddubsw`: 6 rows × 16 columns.
pub(crate) struct Avx2I8;

impl Avx2I8 {
    /// The largest |x̂| of the int8 grid for codes of `bits` bits: 63 for 8-bit codes, whose
    /// `vpmaddubsw` pairs would saturate at 127, else 127.
    pub(crate) fn levels(bits: usize) -> f32 {
        if bits == 8 {
            63.0
        } else {
            127.0
        }
    }
}

impl CodesIsa for Avx2I8 {
    const NAME: &'static str = "avx2gemm-i8";
    const LANES: usize = LANES;
    const NC: usize = NC;
    const R: usize = R;
    const KC: usize = KC;
    const PANEL_BYTES: usize = 1;
    type X = i8;

    unsafe fn prepare_x<const BITS: usize>(
        src: &[f32],
        q: &mut [i8],
        d: &mut [f32],
        sums: &mut [f32],
        g: usize,
    ) {
        // SAFETY: the caller guarantees AVX2; `quantize_x` checks its slices.
        unsafe { quantize_x(src, q, d, sums, g, BITS, Self::levels(BITS)) }
    }

    unsafe fn widen_tile<S: Float>(
        src: &[S],
        groups: usize,
        c0: usize,
        cols: usize,
        out: &mut [f32],
    ) {
        // SAFETY: the caller guarantees AVX2 (with FMA and F16C, `available`); `widen_tile`
        // checks its slices.
        unsafe { super::x86_avx2::widen_tile(NC, src, groups, c0, cols, out) }
    }

    unsafe fn decode_panel<const BITS: usize>(src: &Panel<'_>, panel: &mut [Line]) {
        // SAFETY: the caller guarantees AVX2; `decode_panel` checks its slices.
        unsafe { decode_panel::<BITS>(src, panel) }
    }

    unsafe fn micro<const BITS: usize>(
        rows: usize,
        cbs: usize,
        x: &XTile<'_, i8>,
        panel: &[Line],
        sv: &[f32],
        bv: &[f32],
        c: &mut [f32],
    ) {
        macro_rules! go {
            ($w:literal; $($r:literal)*) => {
                match (rows, cbs) {
                    // SAFETY (every arm): the caller guarantees AVX2 and FMA; `micro` checks
                    // its slices.
                    $( ($r, 1) => unsafe { micro::<$r, 1, $w>(x, panel, sv, bv, c) },
                       ($r, _) => unsafe { micro::<$r, 2, $w>(x, panel, sv, bv, c) }, )*
                    _ => {}
                }
            };
        }
        if BITS <= 4 {
            go!(true; 1 2 3 4 5 6)
        } else {
            go!(false; 1 2 3 4 5 6)
        }
    }
}

/// Quantizes one row's K block of x for the int8 GEMM (shared by the int8 [`CodesIsa`] variants): block `b`
/// of 32 values becomes `q[32b..32b + 32]`, `x̂ = round(x/d)` (ties to even) clamped to
/// `±levels` in [`perm`] order for `bits`, with `d[b] = max|x|/levels` (0 and zero codes for
/// a block of zeros; NaN values skipped by the maximum and quantized to 0, as the exact group
/// sums still carry them); `sums[j]` is the f32 sum of group `j` (`g` values). Blocks past
/// `src.len()/32` are left alone. Does nothing if a slice is too short or `g` is not a
/// multiple of 32.
///
/// [`perm`]: super::x86_gemm::perm
///
/// # Safety
/// The CPU has AVX2.
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn quantize_x(
    src: &[f32],
    q: &mut [i8],
    d: &mut [f32],
    sums: &mut [f32],
    g: usize,
    bits: usize,
    levels: f32,
) {
    let nblk = src.len() / XBLOCK;
    if g == 0
        || !g.is_multiple_of(XBLOCK)
        || q.len() < nblk * XBLOCK
        || d.len() < nblk
        || sums.len() < src.len() / g
    {
        return;
    }
    let per_group = g / XBLOCK;
    let sign = _mm256_set1_ps(-0.0);
    let (hi, lo) = (_mm256_set1_ps(levels), _mm256_set1_ps(-levels));
    // After the two packs, dword `4h + j` holds elements `8j + 4h..8j + 4h + 4`.
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    // 4-bit: each lane's even bytes, then its odd ones (the qword permute joins the lanes).
    let split = _mm256_setr_epi8(
        0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15, 0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5,
        7, 9, 11, 13, 15,
    );
    let mut gsum = _mm256_setzero_ps();
    for b in 0..nblk {
        let mut v = [_mm256_setzero_ps(); 4];
        for (i, v) in v.iter_mut().enumerate() {
            // SAFETY: block b < nblk lies within `src`.
            *v = unsafe { _mm256_loadu_ps(src.as_ptr().add(b * XBLOCK + 8 * i)) };
        }
        gsum = _mm256_add_ps(
            gsum,
            _mm256_add_ps(_mm256_add_ps(v[0], v[1]), _mm256_add_ps(v[2], v[3])),
        );
        if (b + 1) % per_group == 0 {
            sums[b / per_group] = hsum8(gsum);
            gsum = _mm256_setzero_ps();
        }
        // `vmaxps` returns its second operand where either is NaN: NaN is skipped.
        let mut m = _mm256_setzero_ps();
        for &v in &v {
            m = _mm256_max_ps(_mm256_andnot_ps(sign, v), m);
        }
        let amax = hmax(m);
        let out = &mut q[b * XBLOCK..(b + 1) * XBLOCK];
        if amax <= 0.0 {
            out.fill(0);
            d[b] = 0.0;
            continue;
        }
        let inv = _mm256_set1_ps(levels / amax);
        let mut i = [_mm256_setzero_si256(); 4];
        for (i, &v) in i.iter_mut().zip(&v) {
            let t = _mm256_mul_ps(v, inv);
            // NaN (also ∞·0 when the block holds an infinity) to 0, then clamp and round.
            let t = _mm256_and_ps(t, _mm256_cmp_ps::<_CMP_ORD_Q>(t, t));
            *i = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(t, lo), hi));
        }
        let packed = _mm256_packs_epi16(
            _mm256_packs_epi32(i[0], i[1]),
            _mm256_packs_epi32(i[2], i[3]),
        );
        let mut r = _mm256_permutevar8x32_epi32(packed, order);
        if bits == 4 {
            r = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_shuffle_epi8(r, split));
        }
        // SAFETY: `out` is 32 writable bytes.
        unsafe { _mm256_storeu_si256(out.as_mut_ptr() as *mut __m256i, r) };
        d[b] = amax / levels;
    }
}

/// The largest of `v`'s lanes (none NaN).
#[inline]
#[target_feature(enable = "avx2")]
fn hmax(v: __m256) -> f32 {
    let s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)))
}

/// Decodes the codes of `src` into `panel` as u8: K step `s` (codes `4s..4s + 4`, [`perm`]
/// order) of column `8v + c` is dword `c` of the 32-byte vector `s·CB + v`; columns past
/// `cols` are zero. Does nothing if a slice is too short.
///
/// [`perm`]: super::x86_gemm::perm
///
/// # Safety
/// The CPU has AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
unsafe fn decode_panel<const BITS: usize>(src: &Panel<'_>, panel: &mut [Line]) {
    let last_col = src.col0 + src.cols;
    if !src.len.is_multiple_of(32)
        || src.cols > NC
        || src.packed.len() < last_col * src.row_bytes
        || src.byte0 + src.len / 8 * BITS > src.row_bytes
        || panel.len() * 64 < src.len * NC
    {
        return;
    }
    let pp = panel.as_mut_ptr() as *mut __m256i;
    for cb in 0..src.cols.div_ceil(LANES) {
        for ch in 0..src.len / 32 {
            let mut rows = [_mm256_setzero_si256(); 8];
            for (c, row) in rows.iter_mut().enumerate() {
                let col = src.col0 + cb * LANES + c;
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
                // SAFETY: vector (8·ch + q)·CB + cb < len/4·CB, 32 bytes each, inside the
                // panel's len·NC bytes (checked above); Lines keep it 32-byte aligned.
                unsafe { _mm256_store_si256(pp.add((8 * ch + q) * CB + cb), d) };
            }
        }
    }
}

/// `c[RR][NC] += Σ_blocks s·d·Σ(q·x̂) + Σ_groups b·Σx` over one K block, for the first `C`
/// column vectors. Per block of 32 values of K: eight steps of `vpmaddubsw` into `RR × C`
/// accumulators (i16 through the block when `W16`, else widened to i32 every step), then
/// one read-modify-write of the f32 tile in L1. Does nothing if a slice is shorter than
/// that needs.
///
/// # Safety
/// The CPU has AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
unsafe fn micro<const RR: usize, const C: usize, const W16: bool>(
    x: &XTile<'_, i8>,
    panel: &[Line],
    sv: &[f32],
    bv: &[f32],
    c: &mut [f32],
) {
    let (nblk, ngrp, ds) = (x.len / XBLOCK, x.len / x.g, KC / XBLOCK);
    if x.g == 0
        || x.q.len() < (RR - 1) * KC + x.len
        || x.d.len() < (RR - 1) * ds + nblk
        || x.sums.len() < (RR - 1) * ds + ngrp
        || panel.len() * 64 < x.len * NC
        || sv.len() < ngrp * NC
        || bv.len() < ngrp * NC
        || c.len() < RR * NC
    {
        return;
    }
    let (xp, cp) = (x.q.as_ptr(), c.as_mut_ptr());
    let per_group = x.g / XBLOCK;
    let (pp, dp, sp) = (
        panel.as_ptr() as *const __m256i,
        x.d.as_ptr(),
        x.sums.as_ptr(),
    );
    let (svp, bvp) = (sv.as_ptr(), bv.as_ptr());
    let ones = _mm256_set1_epi16(1);
    for blk in 0..nblk {
        let mut dot = [[_mm256_setzero_si256(); C]; RR];
        for q in 0..XBLOCK / 4 {
            let s = blk * XBLOCK / 4 + q;
            // SAFETY: panel vector s·CB + v < len/4·CB and x bytes 4s..4s + 4 < len of row
            // r < RR (checked above).
            unsafe {
                let mut w = [_mm256_setzero_si256(); C];
                for (v, w) in w.iter_mut().enumerate() {
                    *w = _mm256_load_si256(pp.add(s * CB + v));
                }
                for (r, row) in dot.iter_mut().enumerate() {
                    let xb = (xp.add(r * KC + 4 * s) as *const i32).read_unaligned();
                    let xb = _mm256_set1_epi32(xb);
                    for (d, &w) in row.iter_mut().zip(&w) {
                        let p = _mm256_maddubs_epi16(w, xb);
                        *d = if W16 {
                            _mm256_add_epi16(*d, p)
                        } else {
                            _mm256_add_epi32(*d, _mm256_madd_epi16(p, ones))
                        };
                    }
                }
            }
        }
        let j = blk / per_group;
        let last = (blk + 1) % per_group == 0;
        // SAFETY: group j < ngrp of NC scales/biases; x scale blk < nblk and group sum
        // j < ngrp of each row r < RR; tile entries r·NC + v·8 + 8 ≤ RR·NC (checked above).
        unsafe {
            for (r, drow) in dot.iter().enumerate() {
                let d = _mm256_set1_ps(*dp.add(r * ds + blk));
                let sum = _mm256_set1_ps(*sp.add(r * ds + j));
                for (v, &dd) in drow.iter().enumerate() {
                    let i = if W16 { _mm256_madd_epi16(dd, ones) } else { dd };
                    let at = cp.add(r * NC + v * LANES);
                    let s = _mm256_loadu_ps(svp.add(j * NC + v * LANES));
                    let mut a = _mm256_loadu_ps(at);
                    a = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(i), s), d, a);
                    if last {
                        let b = _mm256_loadu_ps(bvp.add(j * NC + v * LANES));
                        a = _mm256_fmadd_ps(b, sum, a);
                    }
                    _mm256_storeu_ps(at, a);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::x86_gemm::perm;

    /// The definition `quantize_x` vectorises, one block at a time: `x̂ = round(x·(L/amax))`
    /// (ties to even) clamped to ±L in [`perm`] order, NaN to 0; returns `d = amax/L`.
    fn quantize_block(v: &[f32], q: &mut [i8], bits: usize, levels: f32) -> f32 {
        let amax = v.iter().fold(0f32, |m, x| m.max(x.abs()));
        if amax <= 0.0 {
            q.fill(0);
            return 0.0;
        }
        let inv = levels / amax;
        let r: Vec<i8> = v
            .iter()
            .map(|&f| (f * inv).round_ties_even().clamp(-levels, levels) as i8)
            .collect();
        for (p, q) in q.iter_mut().enumerate() {
            *q = r[perm(bits, p)];
        }
        amax / levels
    }

    /// `quantize_x` against the scalar definition: codes and block scales bit for bit, group
    /// sums to f32 rounding, on random rows with zero blocks, NaN, ±∞, subnormals and exact
    /// ties (`x·L/amax` at k + ½), every width's order, groups 32/64/128, L 127 and 63.
    #[test]
    fn quantize_x_matches_the_scalar_definition() {
        if !is_x86_feature_detected!("avx2") {
            eprintln!("skipped: this CPU lacks AVX2");
            return;
        }
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for case in 0..200 {
            let g = [32, 64, 128][case % 3];
            let bits = [1, 2, 3, 4, 5, 6, 8][case % 7];
            let levels = if case % 5 == 0 { 63.0 } else { 127.0 };
            let len = g * (1 + case % 4);
            let mut x: Vec<f32> = (0..len)
                .map(|_| ((next() >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 8.0)
                .collect();
            for blk in x.chunks_exact_mut(XBLOCK) {
                match next() % 8 {
                    0 => blk.fill(0.0),
                    1 => blk[(next() % 32) as usize] = f32::NAN,
                    2 => blk[(next() % 32) as usize] = f32::INFINITY,
                    3 => blk.iter_mut().for_each(|v| *v *= 1e-41),
                    4 => {
                        // amax = L, so x·L/amax = x: halves tie.
                        blk[0] = -levels;
                        for v in &mut blk[1..] {
                            *v = (next() % 255) as f32 / 2.0 - 63.5;
                        }
                    }
                    _ => {}
                }
            }
            let nblk = len / XBLOCK;
            let (mut q, mut d, mut s) = (
                vec![7i8; nblk * XBLOCK],
                vec![7f32; nblk],
                vec![7f32; len / g],
            );
            // SAFETY: AVX2 checked above.
            unsafe { quantize_x(&x, &mut q, &mut d, &mut s, g, bits, levels) };
            for b in 0..nblk {
                let mut want = [0i8; XBLOCK];
                let dw = quantize_block(&x[b * XBLOCK..(b + 1) * XBLOCK], &mut want, bits, levels);
                assert_eq!(
                    &q[b * XBLOCK..(b + 1) * XBLOCK],
                    &want,
                    "case {case} block {b}"
                );
                assert_eq!(d[b].to_bits(), dw.to_bits(), "case {case} block {b}");
            }
            for (j, grp) in x.chunks_exact(g).enumerate() {
                let want: f64 = grp.iter().map(|&v| v as f64).sum();
                let mag: f64 = grp.iter().map(|&v| (v as f64).abs()).sum();
                let got = s[j] as f64;
                assert!(
                    got == want
                        || (got - want).abs() <= 1e-6 * mag
                        || (got.is_nan() && want.is_nan()),
                    "case {case} group {j}: {got} against {want}"
                );
            }
        }
    }
}
