//! AVX-512 BF16 kernel for `y = x·Wᵀ` when x is bf16 (MLX models' usual activation dtype).
//!
//! A bf16 x times an integer code `q ≤ 255` is exact in f32 (8-bit × 8-bit significands),
//! and `vdpbf16ps` sums such products in f32: the same arithmetic as the f32 path, at twice
//! the multiply-adds per instruction and without converting codes to f32. Codes become bf16
//! exactly, 32 at a time:
//! - 4-bit: 16 packed bytes are broadcast into both halves of 32 word lanes, shifted by 0
//!   (low half) or 4 (high half) with `vpsrlvw`, and looked up in a bf16 table with `vpermw`,
//!   which reads only the low 5 index bits, so the table's second half repeats the first and
//!   no mask is needed. Lanes hold the even elements, then the odd ones; x is permuted to
//!   match once per call.
//! - 8-bit: widened to f32 and packed to bf16 with `vcvtne2ps2bf16` (exact: q has ≤ 8 bits).
//! - 1, 2, 3, 5, 6-bit: `vpermb` + `vpmultishiftqb` put code `i` in byte `i`; widened to
//!   words and looked up in a table of bf16(i mod 2^BITS) (`vpermi2w` for 6-bit's 64 codes).
//!
//! Work is split into tasks over output columns (cores finish together) and, for large M,
//! into blocks of K so the rows of x a column visits stay in L1.

use super::qmm::QmmArgs;
use super::x86_columns::{
    prefetch_groups, prefetch_w, run, Columns, PrefetchTo, Rows, Walk, MAX_COLS, MAX_ROWS,
};
use super::{cast, cast_mut, Variant};
use crate::aligned::AlignedBytes;
use crate::dtype::Float;
use crate::error::Result;
use half::bf16;
use std::arch::x86_64::*;
use std::cell::RefCell;

/// The variant: `quantized_matmul`, transpose, bf16 x, every affine width.
pub(crate) const QMM_T_BF16: Variant = Variant {
    name: "avx512bf16",
    supports: |k| {
        k.mode == crate::QuantMode::Affine
            && k.op == crate::registry::OpKind::QuantizedMatmul
            && k.flag
            && k.input == crate::DType::BF16
            && available()
    },
    decode: None,
    build: |k| {
        use crate::quant::pack::dispatch_bits;
        crate::with_float_type!(k.scales, S => crate::with_float_type!(k.output, O => {
            Some(dispatch_bits!(k.bits, B => super::KernelFn::Qmm(qmm_t::<S, O, B>), _ => return None))
        }, _ => None), _ => None)
    },
};

/// Whether this CPU can run the kernels of this module.
pub(crate) fn available() -> bool {
    super::x86::available() && is_x86_feature_detected!("avx512bf16")
}

/// Rows of x sharing one decoded chunk.
const ROWS: usize = 8;
/// Bytes of x one row block may touch per K block: 16 KiB stay in L1 beside the weights
/// streaming through (8 rows × 1024 bf16 values).
const X_BLOCK_BYTES: usize = 16 << 10;

thread_local! {
    /// Per-thread scratch: x as permuted bf16 and its group sums; reused across calls.
    static SCRATCH: RefCell<(AlignedBytes, Vec<f32>)> = const { RefCell::new((AlignedBytes::new(), Vec::new())) };
}

/// Position within its 32-element chunk that element `i` moves to for `BITS` (4-bit lanes
/// hold even elements, then odd ones).
#[inline(always)]
fn permuted(bits: usize, i: usize) -> usize {
    if bits == 4 {
        (i % 2) * 16 + i / 2
    } else {
        i
    }
}

/// Constant vectors one decode needs, built once per column run.
#[derive(Clone, Copy)]
struct Tables {
    /// bf16(i mod 2^BITS) for i in 0..32 (and 32..64 for 6-bit).
    lut_lo: __m512i,
    lut_hi: __m512i,
    /// `vpermb` indices and `vpmultishiftqb` controls (non-4/8-bit widths).
    spread: __m512i,
    ctl: __m512i,
    /// Per-lane word shifts for 4-bit: 0 for the low 16 lanes, 4 for the high 16.
    shifts: __m512i,
}

#[target_feature(enable = "avx512f,avx512bw")]
fn tables<const BITS: usize>() -> Tables {
    let mask = (1usize << BITS) - 1;
    let lut: [u16; 64] = std::array::from_fn(|i| bf16::from_f32((i & mask) as f32).to_bits());
    let spread: [u8; 64] = std::array::from_fn(|i| ((i / 8) * BITS + i % 8).min(63) as u8);
    let ctl: [u8; 64] = std::array::from_fn(|i| ((i % 8) * BITS) as u8);
    let shifts: [u16; 32] = std::array::from_fn(|i| if i < 16 { 0 } else { 4 });
    // SAFETY: each load reads exactly the 64 bytes of its array.
    unsafe {
        Tables {
            lut_lo: _mm512_loadu_si512(lut.as_ptr() as *const __m512i),
            lut_hi: _mm512_loadu_si512(lut.as_ptr().add(32) as *const __m512i),
            spread: _mm512_loadu_si512(spread.as_ptr() as *const __m512i),
            ctl: _mm512_loadu_si512(ctl.as_ptr() as *const __m512i),
            shifts: _mm512_loadu_si512(shifts.as_ptr() as *const __m512i),
        }
    }
}

/// 32 codes at `p` as 32 bf16 lanes (order: see module docs).
///
/// # Safety
/// `p` points to `4·BITS` readable bytes; the CPU supports [`available`]'s features.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx512bf16")]
unsafe fn decode32<const BITS: usize>(p: *const u8, t: &Tables) -> __m512i {
    // SAFETY: the caller guarantees 4·BITS readable bytes at `p` and the CPU features.
    unsafe {
        match BITS {
            4 => {
                let bytes = _mm256_broadcastsi128_si256(_mm_loadu_si128(p as *const __m128i));
                let words = _mm512_srlv_epi16(_mm512_cvtepu8_epi16(bytes), t.shifts);
                _mm512_permutexvar_epi16(words, t.lut_lo)
            }
            8 => {
                let a =
                    _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(p as *const __m128i)));
                let b = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(
                    p.add(16) as *const __m128i
                )));
                // Packs b into the high half and a into the low half: element order. Both
                // vector types are 64 plain bytes, so the transmute is a reinterpretation.
                std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(b, a))
            }
            _ => {
                let mask: __mmask64 = (1u64 << (4 * BITS)) - 1;
                let raw = _mm512_maskz_loadu_epi8(mask, p as *const i8);
                let fields =
                    _mm512_multishift_epi64_epi8(t.ctl, _mm512_permutexvar_epi8(t.spread, raw));
                let words = _mm512_cvtepu8_epi16(_mm512_castsi512_si256(fields));
                if BITS == 6 {
                    // 64 codes: index bit 5 picks the second table; bits 6.. are masked off.
                    let idx = _mm512_and_si512(words, _mm512_set1_epi16(63));
                    _mm512_permutex2var_epi16(t.lut_lo, idx, t.lut_hi)
                } else {
                    // The table repeats with period 2^BITS over 32 entries: garbage above
                    // bit BITS but below bit 5 maps to the same code; vpermw ignores bits 5...
                    let idx =
                        _mm512_and_si512(words, _mm512_set1_epi16(((1u32 << BITS) - 1) as i16));
                    _mm512_permutexvar_epi16(idx, t.lut_lo)
                }
            }
        }
    }
}

/// The kernel.
pub(crate) fn qmm_t<S: Float, O: Float, const BITS: usize>(a: QmmArgs<'_>) -> Result<()> {
    const OP: &str = "quantized_matmul";
    let w = a.w;
    let scales: &[S] = cast(OP, "scales", w.scales)?;
    let biases: &[S] = cast(OP, "biases", w.biases)?;
    let out: &mut [O] = cast_mut(OP, "out", a.out)?;
    let (m, n, k, g) = (a.m, w.rows, w.cols, w.group_size);
    // Blocks of K such that the rows of x a column visits stay in L1.
    let walk = Walk::new(m, n, k, g, ROWS, 2, X_BLOCK_BYTES);
    // Taken out of the thread-local rather than borrowed across the parallel loop: a nested
    // call on this thread (gather_qmm runs experts concurrently) finds it empty and allocates
    // its own, instead of finding it borrowed.
    let (mut xp, mut xsum) = SCRATCH.with(|s| std::mem::take(&mut *s.borrow_mut()));
    // Cache-line aligned: each row's chunks are read as whole lines.
    let xpv = xp.clear_to_zeroed_elems::<bf16>(m * k);
    for (src, dst) in a.x.chunks_exact(32).zip(xpv.chunks_exact_mut(32)) {
        for (i, &v) in src.iter().enumerate() {
            // Exact: x came from bf16.
            dst[permuted(BITS, i)] = bf16::from_f32(v);
        }
    }
    xsum.clear();
    xsum.extend(a.x.chunks_exact(g).map(|c| c.iter().sum::<f32>()));
    let kernel = Kernel::<S, BITS> {
        w: Rows::new(&w, scales, biases),
        xp: xp.elems(),
        xsum: &xsum,
        k,
        // SAFETY: this variant is only chosen where `available` holds.
        tables: unsafe { tables::<BITS>() },
    };
    // SAFETY: as for `tables`.
    unsafe { run(&kernel, walk, out) };
    SCRATCH.with(|s| *s.borrow_mut() = (xp, xsum));
    Ok(())
}

/// Everything one call's columns read.
struct Kernel<'a, S, const BITS: usize> {
    w: Rows<'a, S>,
    xp: &'a [bf16],
    xsum: &'a [f32],
    k: usize,
    tables: Tables,
}

impl<S: Float, const BITS: usize> Columns for Kernel<'_, S, BITS> {
    const ROWS: usize = ROWS;
    const COLS: usize = 1;

    unsafe fn columns<const R: usize>(
        &self,
        col: usize,
        _count: usize,
        g0: usize,
        g1: usize,
        row0: usize,
        acc: &mut [[f32; MAX_ROWS]; MAX_COLS],
    ) {
        let g = self.w.g;
        let Some((packed, scales, biases)) = self.w.row(col, g0, g1, BITS) else {
            return;
        };
        let args = Column {
            packed,
            scales,
            biases,
            xp: self.xp,
            xsum: self.xsum,
            row0,
            k: self.k,
            k0: g0 * g,
            g,
            tables: &self.tables,
            row_bytes: self.w.row_bytes,
        };
        // SAFETY: the caller guarantees the CPU features; `column` checks the slices.
        unsafe { column::<S, BITS, R>(&args, &mut acc[0]) }
    }
}

/// One column's slice of K (`k0..k0 + scales.len()·g`) for rows `row0..row0 + R` of x.
struct Column<'a, S> {
    packed: &'a [u8],
    scales: &'a [S],
    biases: &'a [S],
    /// All of x (permuted bf16, `m·k`) and its group sums (`m·k/g`).
    xp: &'a [bf16],
    xsum: &'a [f32],
    row0: usize,
    k: usize,
    k0: usize,
    g: usize,
    /// Decode constants, built once per call.
    tables: &'a Tables,
    /// Bytes from one weight row to the next.
    row_bytes: usize,
}

/// `acc[r] = Σ over this K slice of x[row0 + r]·ŵ`, for `R` rows.
///
/// # Safety
/// The CPU must support [`available`]'s features.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx512bf16")]
unsafe fn column<S: Float, const BITS: usize, const R: usize>(
    a: &Column<'_, S>,
    acc: &mut [f32; MAX_ROWS],
) {
    let (k, g) = (a.k, a.g);
    let groups = a.scales.len();
    let len = groups * g;
    let (gk0, gtotal) = (a.k0 / g, k / g);
    if a.biases.len() < groups
        || a.packed.len() < len / 8 * BITS
        || a.xp.len() < (a.row0 + R) * k
        || a.xsum.len() < (a.row0 + R) * gtotal
        || a.k0 + len > k
    {
        return;
    }
    let t = a.tables;
    let mut vacc = [_mm512_setzero_ps(); R];
    let mut bacc = [0f32; R];
    let (pp, xp) = (a.packed.as_ptr(), a.xp.as_ptr());
    for j in 0..groups {
        // The next slice of the stream is the next row of W.
        prefetch_w(
            pp,
            j * g / 8 * BITS,
            len / 8 * BITS,
            a.row_bytes,
            1,
            PrefetchTo::L1,
        );
        if R <= 4 && j % 16 == 0 {
            let bytes = len / 8 * BITS;
            prefetch_groups(a.scales, a.biases, j, bytes, a.row_bytes, 1, PrefetchTo::L1);
        }
        let mut dots = [_mm512_setzero_ps(); R];
        for c in 0..g / 32 {
            let e = j * g + c * 32;
            // SAFETY: chunk e/32 of this slice lies within `packed` (len/8·BITS bytes), and
            // x row (row0 + r) at k0 + e + 32 ≤ k lies within `xp` (both checked above).
            unsafe {
                let codes = decode32::<BITS>(pp.add(e / 32 * 4 * BITS), t);
                let codes: __m512bh = std::mem::transmute(codes);
                for (r, d) in dots.iter_mut().enumerate() {
                    let px = xp.add((a.row0 + r) * k + a.k0 + e) as *const __m512i;
                    let xv: __m512bh = std::mem::transmute(_mm512_loadu_si512(px));
                    *d = _mm512_dpbf16_ps(*d, codes, xv);
                }
            }
        }
        let s = _mm512_set1_ps(a.scales[j].to_f32());
        let b = a.biases[j].to_f32();
        for r in 0..R {
            vacc[r] = _mm512_fmadd_ps(dots[r], s, vacc[r]);
            bacc[r] += b * a.xsum[(a.row0 + r) * gtotal + gk0 + j];
        }
    }
    for r in 0..R {
        acc[r] = _mm512_reduce_add_ps(vacc[r]) + bacc[r];
    }
}
