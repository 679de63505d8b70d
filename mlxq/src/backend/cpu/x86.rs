//! AVX-512 kernels (x86-64 with AVX-512 F/BW/VL/VBMI, chosen at run time).
//!
//! **Decode (`qmv_t`)**: `y = x·Wᵀ` for a block of up to [`ROWS`] rows of x at a time. Each
//! 32-code chunk of a weight row is decoded once into two f32 vectors and used by every row
//! of the block; the scale is applied once per group (`acc += s·Σ x·q`) and the bias through
//! the precomputed Σx (`+ b·Σx`), so the inner loop is one FMA per 16 weights per row.
//!
//! Decoding 32 codes, by width:
//! - 8-bit: two `vpmovzxbd` of 16 bytes; codes arrive in element order.
//! - 4-bit: one `vpmovzxbd` of 16 bytes, then `& 0xF` (even elements) and `>> 4` (odd
//!   elements). Instead of shuffling codes back into order, x is permuted once per call
//!   into the same even/odd order: the permutation is free for the weights, which dominate.
//! - every other width: the 32 codes are 4 chunks of `BITS` bytes; `vpermb` moves chunk `c`
//!   into qword `c`, and `vpmultishiftqb` pulls code `j` of each chunk from bit `j·BITS` into
//!   byte `j`, masked to `BITS` bits: element order, any width, three instructions.
//!
//! The same decode runs on CPUs with AVX2 and FMA but no AVX-512 (the `avx2` variant, every
//! width): 8 codes per `vpmovzxbd` of 8 bytes (4- and 8-bit codes straight from W, other
//! widths from [`x86_avx2::decode32`](super::x86_avx2::decode32)'s bytes), four 8-wide FMAs
//! per 32-code chunk and row, the same permuted x; only [`column`]'s SIMD differs ([`Isa`]).
//!
//! Results equal the generic kernel's up to f32 summation order.

use super::qmm::QmmArgs;
use super::x86_columns::{
    prefetch_groups, prefetch_w, run, Columns, PrefetchTo, Walk, MAX_COLS, MAX_ROWS,
};
use super::Rows;
use crate::aligned::AlignedBytes;
use crate::dtype::Float;
use crate::error::Result;
use std::arch::x86_64::*;
use std::cell::RefCell;

/// The decode variant: `quantized_matmul` with transpose, every affine width and the FP
/// modes ([`x86_fp`](super::x86_fp), whose uint8 scales it requires).
pub(crate) const QMV_T: super::Variant = super::Variant {
    name: "avx512",
    supports: |k| {
        let matmul_t = k.op == crate::registry::OpKind::QuantizedMatmul && k.flag;
        let mode_ok = k.mode == crate::QuantMode::Affine || super::x86_fp::fp_matmul_key(k);
        matmul_t && mode_ok && available()
    },
    decode: None,
    build: |k| {
        if k.mode == crate::QuantMode::Affine {
            super::qmm::avx512(k.scales, k.output, k.bits).map(super::KernelFn::Qmm)
        } else {
            super::x86_fp::kernel(k.output, k.mode).map(super::KernelFn::Qmm)
        }
    },
};

/// The AVX2 variant (CPUs without the AVX-512 kernels): the decode kernel for
/// `quantized_matmul` with transpose, every width, and the FP modes' (`x86_fp`; their
/// `transpose = false` the portable kernel compiled for AVX2); `quantized_matmul` without transpose
/// ([`x86_avx2_qvm`](super::x86_avx2_qvm)); quantize in groups of 32, 64 and 128
/// and dequantize ([`x86_avx2_quant`](super::x86_avx2_quant)); the portable kernels of every other affine op
/// compiled for AVX2 and FMA ([`Avx2Fma`](super::Avx2Fma)). The FP modes' quantize and
/// dequantize are another variant of the same name,
/// [`x86_avx2_fp_quant`](super::x86_avx2_fp_quant).
pub(crate) const QMV_T_AVX2: super::Variant = super::Variant {
    name: "avx2",
    supports: |k| {
        let mode_ok = k.mode == crate::QuantMode::Affine || super::x86_fp::fp_matmul_key(k);
        mode_ok && super::x86_avx2::available()
    },
    decode: None,
    build: |k| {
        if k.mode != crate::QuantMode::Affine {
            // The FP modes' matmul: `x86_fp` transposed, the portable kernel otherwise.
            if k.flag {
                super::x86_fp::kernel_avx2(k.output, k.mode).map(super::KernelFn::Qmm)
            } else {
                super::portable::<super::Avx2Fma>(k)
            }
        } else if k.op == crate::registry::OpKind::QuantizedMatmul && k.flag {
            super::qmm::avx2(k.scales, k.output, k.bits).map(super::KernelFn::Qmm)
        } else if k.op == crate::registry::OpKind::QuantizedMatmul {
            super::x86_avx2_qvm::kernel(k.scales, k.output, k.bits).map(super::KernelFn::Qmm)
        } else if k.op == crate::registry::OpKind::Quantize
            && super::x86_avx2_quant::supports_group(k.group_size as usize)
        {
            super::x86_avx2_quant::kernel(k.input, k.bits).map(super::KernelFn::Quantize)
        } else if k.op == crate::registry::OpKind::Dequantize
            && super::x86_avx2_quant::supports_group(k.group_size as usize)
        {
            super::x86_avx2_quant::dequantize_kernel(k.scales, k.output, k.bits)
                .map(super::KernelFn::Dequantize)
        } else {
            super::portable::<super::Avx2Fma>(k)
        }
    },
};

/// Rows of x sharing one decoded chunk (AVX-512).
pub(crate) const ROWS: usize = 8;
/// Bytes of x one row block may touch per K block (L1-resident beside the weights).
const X_BLOCK_BYTES: usize = 32 << 10;

/// Whether this CPU can run the kernels of this module.
pub(crate) fn available() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512vbmi")
}

/// The `mask`ed of 16 consecutive scales (or biases) at `p`, widened exactly to f32 (other
/// lanes 0): the one conversion every AVX-512 kernel uses for its per-group factors.
///
/// # Safety
/// The masked elements at `p` are readable; the CPU supports AVX-512 F, BW and VL.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(crate) unsafe fn widen16<S: crate::dtype::Element>(p: *const S, mask: __mmask16) -> __m512 {
    // SAFETY: masked loads touch only the elements the mask names (caller: readable).
    unsafe {
        match S::DTYPE {
            crate::DType::F16 => _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, p as *const i16)),
            // bf16: the upper half of an f32.
            crate::DType::BF16 => _mm512_castsi512_ps(_mm512_slli_epi32::<16>(
                _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, p as *const i16)),
            )),
            _ => _mm512_maskz_loadu_ps(mask, p as *const f32),
        }
    }
}

/// The mask of the first `n` (≤ 16) lanes.
#[inline]
pub(crate) fn mask16(n: usize) -> __mmask16 {
    ((1u32 << n.min(16)) - 1) as u16
}

thread_local! {
    /// Per-thread scratch for the permuted x and its group sums, reused across calls.
    static SCRATCH: RefCell<(AlignedBytes, Vec<f32>)> = const { RefCell::new((AlignedBytes::new(), Vec::new())) };
}

/// Position, within its 32-element chunk, that element `i` of x moves to for `BITS` (also
/// the order of [`x86_fp`](super::x86_fp)'s E2M1 decode).
#[inline(always)]
pub(crate) fn permuted(bits: usize, i: usize) -> usize {
    if bits == 4 {
        // Even elements first (low nibbles), then odd (high nibbles).
        (i % 2) * 16 + i / 2
    } else {
        i
    }
}

/// Decodes 32 codes starting at `p` into two f32 vectors (order: see module docs).
/// `spread` and `ctl` are [`spread_index`] and [`shift_control`] for `BITS`.
///
/// # Safety
/// `p` must point to `4·BITS` readable bytes; the CPU must support [`available`]'s features.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi")]
unsafe fn decode32<const BITS: usize>(
    p: *const u8,
    spread: __m512i,
    ctl: __m512i,
) -> (__m512, __m512) {
    // SAFETY: the caller guarantees 4·BITS readable bytes at `p` and the CPU features.
    unsafe {
        match BITS {
            8 => {
                let a = _mm512_cvtepu8_epi32(_mm_loadu_si128(p as *const __m128i));
                let b = _mm512_cvtepu8_epi32(_mm_loadu_si128(p.add(16) as *const __m128i));
                (_mm512_cvtepi32_ps(a), _mm512_cvtepi32_ps(b))
            }
            4 => {
                let v = _mm512_cvtepu8_epi32(_mm_loadu_si128(p as *const __m128i));
                let lo = _mm512_and_si512(v, _mm512_set1_epi32(0xF));
                let hi = _mm512_srli_epi32::<4>(v);
                (_mm512_cvtepi32_ps(lo), _mm512_cvtepi32_ps(hi))
            }
            _ => {
                // Load exactly 4·BITS bytes (masked: never reads past the chunk).
                let mask: __mmask64 = (1u64 << (4 * BITS)) - 1;
                let raw = _mm512_maskz_loadu_epi8(mask, p as *const i8);
                let spread = _mm512_permutexvar_epi8(spread, raw);
                let fields = _mm512_multishift_epi64_epi8(ctl, spread);
                let codes = _mm512_and_si512(fields, _mm512_set1_epi8(((1u32 << BITS) - 1) as i8));
                let lo = _mm512_castsi512_si128(codes);
                let hi = _mm512_extracti32x4_epi32::<1>(codes);
                (
                    _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo)),
                    _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi)),
                )
            }
        }
    }
}

/// `vpermb` indices: byte `t` of qword `c` takes source byte `c·BITS + t`.
#[inline]
#[target_feature(enable = "avx512f")]
fn spread_index<const BITS: usize>() -> __m512i {
    let idx: [u8; 64] = std::array::from_fn(|i| ((i / 8) * BITS + i % 8).min(63) as u8);
    // SAFETY: reads exactly the 64 bytes of `idx`.
    unsafe { _mm512_loadu_si512(idx.as_ptr() as *const __m512i) }
}

/// `vpmultishiftqb` control: byte `j` of each qword starts at bit `j·BITS`.
#[inline]
#[target_feature(enable = "avx512f")]
fn shift_control<const BITS: usize>() -> __m512i {
    let ctl: [u8; 64] = std::array::from_fn(|i| ((i % 8) * BITS) as u8);
    // SAFETY: reads exactly the 64 bytes of `ctl`.
    unsafe { _mm512_loadu_si512(ctl.as_ptr() as *const __m512i) }
}

/// The decode kernel, `transpose = true`.
pub(crate) fn qmv_t<S: Float, O: Float, const BITS: usize>(a: QmmArgs<'_>) -> Result<()> {
    qmv_t_on::<Avx512, S, O, BITS>(a)
}

/// The decode kernel on AVX2 and FMA (4- and 8-bit codes).
pub(crate) fn qmv_t_avx2<S: Float, O: Float, const BITS: usize>(a: QmmArgs<'_>) -> Result<()> {
    qmv_t_on::<Avx2, S, O, BITS>(a)
}

/// The SIMD of one output column's slice (see [`Columns::columns`]): AVX-512 or AVX2.
trait Isa: Sync + 'static {
    /// Rows of x sharing one decoded chunk.
    const ROWS: usize;
    /// Output columns one call takes when it has a single row of x (they share its loads).
    const COLS: usize;

    /// [`column`] on this instruction set, for the `cols.len()` (≤ [`Isa::COLS`]) columns
    /// `cols` (sharing x): `acc[c]` gets column `c`'s sums.
    ///
    /// # Safety
    /// The CPU must support the instruction set (the variant that runs it checked).
    unsafe fn column<S: Float, const BITS: usize, const R: usize>(
        cols: &[Column<'_, S>],
        acc: &mut [[f32; MAX_ROWS]; MAX_COLS],
    );
}

struct Avx512;
struct Avx2;

impl Isa for Avx512 {
    const ROWS: usize = ROWS;
    const COLS: usize = 1;
    unsafe fn column<S: Float, const BITS: usize, const R: usize>(
        cols: &[Column<'_, S>],
        acc: &mut [[f32; MAX_ROWS]; MAX_COLS],
    ) {
        if let Some(a) = cols.first() {
            // SAFETY: the caller's contract.
            unsafe { column::<S, BITS, R>(a, &mut acc[0]) }
        }
    }
}

impl Isa for Avx2 {
    // 16 ymm registers: 4 rows of accumulators beside 4 decoded vectors, or one row against
    // two columns (each x load feeds both).
    const ROWS: usize = 4;
    const COLS: usize = 2;
    unsafe fn column<S: Float, const BITS: usize, const R: usize>(
        cols: &[Column<'_, S>],
        acc: &mut [[f32; MAX_ROWS]; MAX_COLS],
    ) {
        // SAFETY (both): the caller's contract.
        match cols {
            // R spelled 1: the two-column body is compiled once, not for every R.
            [a, b] if R == 1 => unsafe { column_avx2::<S, BITS, 1, 2>([a, b], acc) },
            _ => {
                for (a, acc) in cols.iter().zip(acc.iter_mut()) {
                    let mut one = [[0f32; MAX_ROWS]; MAX_COLS];
                    unsafe { column_avx2::<S, BITS, R, 1>([a], &mut one) };
                    *acc = one[0];
                }
            }
        }
    }
}

fn qmv_t_on<I: Isa, S: Float, O: Float, const BITS: usize>(a: QmmArgs<'_>) -> Result<()> {
    const OP: &str = "quantized_matmul";
    let a = a.operands::<S, O>(OP, true, true)?;
    let (m, n, k, g) = (a.m, a.rows, a.cols, a.w.g);
    let walk = Walk::new(m, n, k, g, I::ROWS, 4, X_BLOCK_BYTES);
    // Taken out of the thread-local rather than borrowed across the parallel loop: a nested
    // call on this thread (gather_qmm runs experts concurrently) finds it empty and allocates
    // its own, instead of finding it borrowed.
    let (mut xp, mut xsum) = SCRATCH.with(|s| std::mem::take(&mut *s.borrow_mut()));
    // Cache-line aligned: each row's chunks are read as whole lines.
    let xpv = xp.clear_to_zeroed_elems::<f32>(m * k);
    for (src, dst) in a.x.chunks_exact(32).zip(xpv.chunks_exact_mut(32)) {
        for (i, &v) in src.iter().enumerate() {
            dst[permuted(BITS, i)] = v;
        }
    }
    xsum.clear();
    xsum.extend(a.x.chunks_exact(g).map(|c| c.iter().sum::<f32>()));
    let kernel = Kernel::<I, S, BITS> {
        w: a.w,
        xp: xp.elems(),
        xsum: &xsum,
        k,
        isa: std::marker::PhantomData,
    };
    // SAFETY: this kernel is only chosen where its instruction set is available (`available`
    // for AVX-512, AVX2 and FMA for `avx2`).
    unsafe { run(&kernel, walk, a.out) };
    SCRATCH.with(|s| *s.borrow_mut() = (xp, xsum));
    Ok(())
}

/// Everything one call's columns read: W, and x permuted (`m·k`) with its group sums
/// (`m·groups`).
struct Kernel<'a, I, S, const BITS: usize> {
    w: Rows<'a, S>,
    xp: &'a [f32],
    xsum: &'a [f32],
    k: usize,
    isa: std::marker::PhantomData<I>,
}

impl<I: Isa, S: Float, const BITS: usize> Columns for Kernel<'_, I, S, BITS> {
    const ROWS: usize = I::ROWS;
    const COLS: usize = I::COLS;

    unsafe fn columns<const R: usize>(
        &self,
        col: usize,
        count: usize,
        g0: usize,
        g1: usize,
        row0: usize,
        acc: &mut [[f32; MAX_ROWS]; MAX_COLS],
    ) {
        let (g, groups) = (self.w.g, self.w.groups);
        let (Some(xp), Some(xsum)) = (
            self.xp.get(row0 * self.k + g0 * g..),
            self.xsum.get(row0 * groups + g0..),
        ) else {
            return;
        };
        let column = |c: usize| {
            let (packed, scales, biases) = self.w.row(col + c, g0, g1, BITS)?;
            Some(Column {
                packed,
                scales,
                biases,
                xp,
                xsum,
                k: self.k,
                groups,
                g,
                row_bytes: self.w.row_bytes,
            })
        };
        let (Some(a), b) = (column(0), (count > 1).then(|| column(1)).flatten()) else {
            return;
        };
        let cols = match b {
            Some(b) => [a, b],
            None => {
                // SAFETY: the caller guarantees the CPU features; `column` checks the slices.
                unsafe { I::column::<S, BITS, R>(std::slice::from_ref(&a), acc) };
                return;
            }
        };
        // SAFETY: as above.
        unsafe { I::column::<S, BITS, R>(&cols, acc) }
    }
}

/// One output column's slice of K for `R` rows of x: its packed codes, scales and biases
/// (`scales.len()` groups), and from the slice's first element on, the rows of permuted x
/// (`k` apart) and of their group sums (`groups` apart).
struct Column<'a, S> {
    packed: &'a [u8],
    scales: &'a [S],
    biases: &'a [S],
    xp: &'a [f32],
    xsum: &'a [f32],
    k: usize,
    groups: usize,
    g: usize,
    /// Bytes from one weight row to the next.
    row_bytes: usize,
}

impl<S> Column<'_, S> {
    /// Whether the slices hold what [`Column`] promises for `R` rows of `BITS`-bit codes
    /// (they always do; the column kernels check it to keep their raw loads in bounds).
    fn in_bounds<const BITS: usize, const R: usize>(&self) -> bool {
        let groups = self.scales.len();
        let len = groups * self.g;
        self.packed.len() >= len / 32 * 4 * BITS
            && self.xp.len() >= (R - 1) * self.k + len
            && self.xsum.len() >= (R - 1) * self.groups + groups
            && self.biases.len() >= groups
    }
}

/// One output column's slice of K for `R` rows of x. Writes nothing if the slices are
/// shorter than [`Column`] promises (they never are; the check keeps the raw loads in bounds).
///
/// # Safety
/// The CPU must support [`available`]'s features.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi")]
unsafe fn column<S: Float, const BITS: usize, const R: usize>(
    a: &Column<'_, S>,
    acc: &mut [f32; MAX_ROWS],
) {
    let (k, g) = (a.k, a.g);
    let groups = a.scales.len();
    let len = groups * g;
    let chunk_bytes = 4 * BITS;
    if !a.in_bounds::<BITS, R>() {
        return;
    }
    let (spread, ctl) = (spread_index::<BITS>(), shift_control::<BITS>());
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
        let s = _mm512_set1_ps(a.scales[j].to_f32());
        let b = a.biases[j].to_f32();
        let mut dots = [_mm512_setzero_ps(); R];
        for c in 0..g / 32 {
            let e = j * g + c * 32;
            // SAFETY: chunk e/32 < len/32, each `chunk_bytes` long, lies within `packed`, and
            // r·k + e + 32 ≤ (R − 1)·k + len ≤ xp.len() (both checked above).
            unsafe {
                let (lo, hi) = decode32::<BITS>(pp.add(e / 32 * chunk_bytes), spread, ctl);
                for (r, d) in dots.iter_mut().enumerate() {
                    let px = xp.add(r * k + e);
                    *d = _mm512_fmadd_ps(lo, _mm512_loadu_ps(px), *d);
                    *d = _mm512_fmadd_ps(hi, _mm512_loadu_ps(px.add(16)), *d);
                }
            }
        }
        for r in 0..R {
            vacc[r] = _mm512_fmadd_ps(dots[r], s, vacc[r]);
            bacc[r] += b * a.xsum[r * a.groups + j];
        }
    }
    for r in 0..R {
        acc[r] = _mm512_reduce_add_ps(vacc[r]) + bacc[r];
    }
}

/// [`column`] on AVX2 and FMA, for `C` (1 or 2) columns sharing x: a 32-code chunk is four
/// `vpmovzxbd` of 8 codes (8-bit, and other widths after
/// [`decode32`](super::x86_avx2::decode32)) or two of 8 bytes split into low and high nibbles
/// (4-bit, x permuted as for AVX-512), each against 8 elements of x, each load of x used by
/// every column; one row keeps 2 independent sums per column so the FMA chain does not wait on
/// itself. Groups go in blocks of 8: their scales and biases are widened 8 at a time, each
/// group's scale taken from that vector by one permute, and the bias term of all 8 is one FMA
/// against the rows' Σx, so the work outside the inner loop is a few instructions per group.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C ([`x86_avx2::available`](super::x86_avx2::available)).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn column_avx2<S: Float, const BITS: usize, const R: usize, const C: usize>(
    cols: [&Column<'_, S>; C],
    acc: &mut [[f32; MAX_ROWS]; MAX_COLS],
) {
    use super::x86_avx2::widen8;
    let a = cols[0];
    let (k, g) = (a.k, a.g);
    let groups = a.scales.len();
    let chunk_bytes = 4 * BITS;
    let group_bytes = g / 8 * BITS;
    if C > MAX_COLS
        || !cols
            .iter()
            .all(|c| c.scales.len() == groups && c.in_bounds::<BITS, R>())
    {
        return;
    }
    // Independent sums per row and column: 2 for one row, else 1.
    let ways = if R == 1 { 2 } else { 1 };
    let mut vacc = [[_mm256_setzero_ps(); R]; C];
    let xp = a.xp.as_ptr();
    for j0 in (0..groups).step_by(8) {
        let nb = (groups - j0).min(8);
        let mut sv = [_mm256_setzero_ps(); C];
        for (c, col) in cols.iter().enumerate() {
            for o in (0..nb * group_bytes).step_by(64) {
                prefetch_w(
                    col.packed.as_ptr(),
                    j0 * group_bytes + o,
                    groups * group_bytes,
                    col.row_bytes,
                    1,
                    PrefetchTo::L1,
                );
            }
            if R <= 4 {
                let (s, b) = (col.scales, col.biases);
                let bytes = groups * group_bytes;
                prefetch_groups(s, b, j0, bytes, col.row_bytes, 1, PrefetchTo::L1);
            }
            // SAFETY: j0 + 8 ≤ groups = scales.len() ≤ biases.len() when nb is 8, and row r's
            // sums r·groups_row + j0 + 8 ≤ xsum.len() (checked by `in_bounds`); shorter
            // blocks go through zero-padded copies.
            let bv = unsafe {
                if nb == 8 {
                    sv[c] = widen8(col.scales.as_ptr().add(j0));
                    widen8(col.biases.as_ptr().add(j0))
                } else {
                    let mut sb = [S::from_f32(0.0); 8];
                    let mut bb = [S::from_f32(0.0); 8];
                    sb[..nb].copy_from_slice(&col.scales[j0..j0 + nb]);
                    bb[..nb].copy_from_slice(&col.biases[j0..j0 + nb]);
                    sv[c] = widen8(sb.as_ptr());
                    widen8(bb.as_ptr())
                }
            };
            for (r, v) in vacc[c].iter_mut().enumerate() {
                let at = r * a.groups + j0;
                // SAFETY: as above.
                let xs = unsafe {
                    if nb == 8 {
                        _mm256_loadu_ps(a.xsum.as_ptr().add(at))
                    } else {
                        let mut xb = [0f32; 8];
                        xb[..nb].copy_from_slice(&a.xsum[at..at + nb]);
                        _mm256_loadu_ps(xb.as_ptr())
                    }
                };
                // The bias term shares the accumulator: its lanes are summed at the end.
                *v = _mm256_fmadd_ps(bv, xs, *v);
            }
        }
        for jj in 0..nb {
            let j = j0 + jj;
            let pick = _mm256_set1_epi32(jj as i32);
            let mut dots = [[[_mm256_setzero_ps(); 2]; R]; C];
            for ch in 0..g / 32 {
                let e = j * g + ch * 32;
                // SAFETY: chunk e/32 < groups·g/32, each `chunk_bytes` long, lies within each
                // column's `packed`, and r·k + e + 32 ≤ (R − 1)·k + groups·g ≤ xp.len() (both
                // checked above).
                unsafe {
                    let q = cols.map(|col| {
                        let p = col.packed.as_ptr().add(e / 32 * chunk_bytes);
                        if !matches!(BITS, 4 | 8) {
                            // One byte per code (x86_avx2::decode32), widened 8 at a time.
                            let v = super::x86_avx2::decode32::<BITS>(p);
                            let (lo, hi) =
                                (_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
                            let f = |b: __m128i| _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b));
                            [
                                f(lo),
                                f(_mm_srli_si128::<8>(lo)),
                                f(hi),
                                f(_mm_srli_si128::<8>(hi)),
                            ]
                        } else if BITS == 8 {
                            let at = |o: usize| _mm_loadl_epi64(p.add(o) as *const __m128i);
                            [
                                _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(at(0))),
                                _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(at(8))),
                                _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(at(16))),
                                _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(at(24))),
                            ]
                        } else {
                            let at = |o: usize| {
                                _mm256_cvtepu8_epi32(_mm_loadl_epi64(p.add(o) as *const __m128i))
                            };
                            let (v0, v1) = (at(0), at(8));
                            let m = _mm256_set1_epi32(0xF);
                            [
                                _mm256_cvtepi32_ps(_mm256_and_si256(v0, m)),
                                _mm256_cvtepi32_ps(_mm256_and_si256(v1, m)),
                                _mm256_cvtepi32_ps(_mm256_srli_epi32::<4>(v0)),
                                _mm256_cvtepi32_ps(_mm256_srli_epi32::<4>(v1)),
                            ]
                        }
                    });
                    // dots is indexed [column][row]: by two loop variables.
                    #[allow(clippy::needless_range_loop)]
                    for r in 0..R {
                        let px = xp.add(r * k + e);
                        for i in 0..4 {
                            let xv = _mm256_loadu_ps(px.add(8 * i));
                            for c in 0..C {
                                let d = &mut dots[c][r][i % ways];
                                *d = _mm256_fmadd_ps(q[c][i], xv, *d);
                            }
                        }
                    }
                }
            }
            for c in 0..C {
                let s = _mm256_permutevar8x32_ps(sv[c], pick);
                for (v, d) in vacc[c].iter_mut().zip(&dots[c]) {
                    *v = _mm256_fmadd_ps(_mm256_add_ps(d[0], d[1]), s, *v);
                }
            }
        }
    }
    for (acc, vacc) in acc.iter_mut().zip(&vacc) {
        for (o, &v) in acc.iter_mut().zip(vacc) {
            *o = super::x86_avx2::hsum8(v);
        }
    }
}
