//! The int8-activation GEMM on AVX2 (`avx2gemm-i8`, opt-in): x quantized to int8 per block
//! of 32 values, the codes as u8, and `vpmaddubsw` integer dots, for CPUs without AVX-512
//! VNNI (Zen 2/3, Intel client cores). The driver is [`x86_gemm::gemm_i8`], shared with
//! `avx512gemm-i8`; this file is its instruction set ([`Avx2I8`]).
//!
//! **The dot.** `vpmaddubsw` multiplies 32 u8 codes by 32 s8 values of x and adds adjacent
//! pairs into 16 i16 lanes, saturating. A vector holds 8 columns × 4 codes of K (a dword
//! per column, as `vpdpbusd`'s layout), so each column's two i16 lanes carry its 4-code dot;
//! `vpmaddwd` by ones adds them into one i32 per column. With |x̂| ≤ 127 a pair sums to at
//! most `2·127·(2^bits − 1)`: 16 002 at 6 bits, below i16's 32 767, but 64 770 at 8 bits,
//! so 8-bit codes take x on ±63 (`2·63·255` = 32 130), half the steps of the other widths
//! (the error bound of [`x86_gemm::gemm_i8`] with `L` = 63). Up to 4 bits the i16 lanes
//! hold a whole block of 32 values (`8·2·127·15` = 30 480) and are widened once per block;
//! wider codes widen every step.
//!
//! **Tile.** 6 rows × 16 columns: 12 accumulators, two panel vectors, one broadcast of x and
//! one product in the 16 ymm registers. Panels of 512 values of K (8 KiB of codes, L1).
//!
//! [`x86_gemm::gemm_i8`]: super::x86_gemm::gemm_i8

use super::x86_avx2::{decode32, transpose8};
use super::x86_gemm::{build_i8, I8Isa, Panel, XTile, XBLOCK};
use super::Variant;
use crate::aligned::Line;
use crate::dtype::Float;
use std::arch::x86_64::*;

/// The opt-in variant (never chosen unless forced by name): results differ from the f32
/// path by up to the bound of [`x86_gemm::gemm_i8`](super::x86_gemm::gemm_i8), beyond the
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
    build: build_i8::<Avx2I8>,
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

impl I8Isa for Avx2I8 {
    const NAME: &'static str = "avx2gemm-i8";
    const LANES: usize = LANES;
    const NC: usize = NC;
    const R: usize = R;
    const KC: usize = KC;

    fn levels(bits: usize) -> f32 {
        if bits == 8 {
            63.0
        } else {
            127.0
        }
    }

    unsafe fn widen_tile<S: Float>(
        src: &[S],
        groups: usize,
        c0: usize,
        cols: usize,
        out: &mut [f32],
    ) {
        super::x86_gemm::widen_tile_scalar(NC, src, groups, c0, cols, out);
    }

    unsafe fn decode_panel<const BITS: usize>(src: &Panel<'_>, panel: &mut [Line]) {
        // SAFETY: the caller guarantees AVX2; `decode_panel` checks its slices.
        unsafe { decode_panel::<BITS>(src, panel) }
    }

    unsafe fn micro<const BITS: usize>(
        rows: usize,
        cbs: usize,
        x: &XTile<'_>,
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
    x: &XTile<'_>,
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
