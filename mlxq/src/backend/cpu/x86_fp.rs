//! AVX-512 and AVX2 kernels for `y = x·Wᵀ` with MLX's FP modes (mxfp4, nvfp4, mxfp8): any
//! number of rows of x, f32 sums, run by the `avx512` and `avx2` variants through the decode
//! driver ([`x86_columns`](super::x86_columns)) the affine kernels share.
//!
//! Each 32-element chunk of a weight row is decoded once into f32 vectors of weights `v·s`
//! (the element times its group's scale) and used by every row of a block of rows of x (8 on
//! AVX-512, 4 on AVX2): one FMA per 16 (8) weights and row. The AVX2 twin ([`column_avx2`])
//! decodes the same way 8 lanes at a time, E2M1 from the 8 magnitudes plus the sign bit. The
//! products are exact in f32 (an E2M1 value has 2 significant bits, an E4M3 one 4, the scale
//! is a power of two or an E4M3 value), so the sums are the dequantized weights' dot products
//! with f32 accumulation, the error class of every other kernel.
//!
//! Decoding 32 elements:
//! - E2M1 (mxfp4, nvfp4): 16 bytes widened to 16 dwords (`vpmovzxbd`); `vpermps` reads the
//!   16-entry value table with each dword's low nibble (even elements), and again after a
//!   shift by 4 (odd elements). x is permuted once per call into the same order (as the
//!   affine 4-bit kernel does), so no shuffle of the weights is needed.
//! - E4M3 (mxfp8): 32 bytes sign-extended to words; `(w << 7) & 0xBF80` places sign,
//!   exponent and mantissa into an f16 whose value is the element's times 2⁻⁸, subnormals
//!   included (the exponent biases differ by 8); the codes `0x7f`/`0xff` are set to an f16
//!   NaN, as MLX reads them; `vcvtph2ps` widens 16 at a time. The 2⁸ is applied after the
//!   scale (`(v·2⁻⁸·s)·2⁸`), so no intermediate leaves the range the product has.
//!
//! Scales: a 256-entry table of a code's value as MLX's CPU matmul reads it
//! ([`fp::matmul_scale`]: in x's dtype), built once per call. A chunk is one mx group (one
//! broadcast scale) or two nvfp4 groups: in the permuted order lanes 0–7 of both vectors are
//! the first group's elements and lanes 8–15 the second's, so the scale vector is two
//! broadcast halves. A row of an odd number of nvfp4 groups ends in a half chunk, loaded
//! masked, against x rows padded with zeros to whole chunks.

use super::qmm::{QmmArgs, QmmFn};
use super::quantize::fp_mode;
use super::x86_columns::{run, Columns, PrefetchTo, Walk, MAX_COLS, MAX_ROWS, PREFETCH_AHEAD};
use crate::aligned::AlignedBytes;
use crate::dtype::Float;
use crate::error::{Error, Result};
use crate::quant::fp;
use crate::QuantMode;
use std::arch::x86_64::*;
use std::cell::RefCell;

const OP: &str = "quantized_matmul";
/// Bytes of x one row block may touch per K block (L1-resident beside the weights).
const X_BLOCK_BYTES: usize = 32 << 10;

thread_local! {
    /// Per-thread scratch for the permuted, padded x, reused across calls.
    static SCRATCH: RefCell<AlignedBytes> = const { RefCell::new(AlignedBytes::new()) };
}

/// Whether `k` is an FP mode's `quantized_matmul` (uint8 scales), which the `avx512` variant
/// runs here transposed and the `avx2` variant in both layouts.
pub(crate) fn fp_matmul_key(k: &crate::registry::KernelKey) -> bool {
    k.mode != QuantMode::Affine
        && k.op == crate::registry::OpKind::QuantizedMatmul
        && k.scales == crate::DType::U8
}

/// The AVX-512 kernel for an FP `mode` with x and the output of dtype `out` (`None` for
/// affine or a non-float dtype).
pub(crate) fn kernel(out: crate::DType, mode: QuantMode) -> Option<QmmFn> {
    kernel_on::<Avx512>(out, mode)
}

/// The same on AVX2, FMA and F16C (the `avx2` variant).
pub(crate) fn kernel_avx2(out: crate::DType, mode: QuantMode) -> Option<QmmFn> {
    kernel_on::<Avx2>(out, mode)
}

fn kernel_on<I: Isa>(out: crate::DType, mode: QuantMode) -> Option<QmmFn> {
    crate::with_float_type!(out, X => Some(match mode {
        QuantMode::Affine => return None,
        QuantMode::Mxfp4 => qmm_t::<I, X, 1> as QmmFn,
        QuantMode::Mxfp8 => qmm_t::<I, X, 2> as QmmFn,
        QuantMode::Nvfp4 => qmm_t::<I, X, 3> as QmmFn,
    }), _ => None)
}

/// The SIMD of one output column's slice: AVX-512 ([`column`]) or AVX2 ([`column_avx2`]).
trait Isa: Sync + 'static {
    /// Rows of x sharing one decoded chunk.
    const ROWS: usize;
    /// [`column`] on this instruction set.
    ///
    /// # Safety
    /// The CPU supports the instruction set (the variant that runs it checked).
    unsafe fn column<const MODE: u8, const R: usize>(a: &Column<'_>, acc: &mut [f32; MAX_ROWS]);
}

struct Avx512;
struct Avx2;

impl Isa for Avx512 {
    const ROWS: usize = 8;
    unsafe fn column<const MODE: u8, const R: usize>(a: &Column<'_>, acc: &mut [f32; MAX_ROWS]) {
        // SAFETY: the caller's contract.
        unsafe { column::<MODE, R>(a, acc) }
    }
}

impl Isa for Avx2 {
    // 16 ymm registers: 4 rows of two sums beside a chunk's four weight vectors.
    const ROWS: usize = 4;
    unsafe fn column<const MODE: u8, const R: usize>(a: &Column<'_>, acc: &mut [f32; MAX_ROWS]) {
        // SAFETY: the caller's contract.
        unsafe { column_avx2::<MODE, R>(a, acc) }
    }
}

/// Bits per element of mode `MODE` (see [`fp_mode`]).
const fn bits(mode: u8) -> usize {
    if matches!(fp_mode(mode), QuantMode::Mxfp8) {
        8
    } else {
        4
    }
}

fn qmm_t<I: Isa, X: Float, const MODE: u8>(a: QmmArgs<'_>) -> Result<()> {
    let mode = fp_mode(MODE);
    let a = a.operands::<u8, X>(OP, true, false)?;
    let (m, n, k, g) = (a.m, a.rows, a.cols, a.w.g);
    // The mode's only group size (`QuantizedWeight` holds no other): the chunk walk and its
    // unchecked scale reads rely on it.
    let (_, want_g) = crate::QuantSpec::fp_defaults(mode);
    if g != want_g as usize {
        return Err(Error::invalid(
            OP,
            "group_size",
            format!("{want_g} ({mode})"),
            g,
        ));
    }
    let bits = bits(MODE);
    // Rows of x padded to whole chunks (an odd number of nvfp4 groups ends in a half chunk).
    let kp = k.next_multiple_of(32);
    let mut walk = Walk::new(m, n, k, g, I::ROWS, 4, X_BLOCK_BYTES);
    if g < 32 {
        // K blocks of whole chunks.
        walk = walk.in_superblocks(32 / g);
    }
    let mut xp = SCRATCH.with(|s| std::mem::take(&mut *s.borrow_mut()));
    let xpv = xp.clear_to_zeroed_elems::<f32>(m * kp);
    // Rows of x and of the copy (`max(1)`: a weight's K is never 0, and chunks of 0 panic).
    let rows =
        a.x.chunks_exact(k.max(1))
            .zip(xpv.chunks_exact_mut(kp.max(1)));
    for (src, dst) in rows {
        for (s32, d32) in src.chunks(32).zip(dst.chunks_exact_mut(32)) {
            for (i, &v) in s32.iter().enumerate() {
                // The decode's order (E2M1: even elements, then odd; E4M3: as stored).
                d32[super::x86::permuted(bits, i)] = v;
            }
        }
    }
    let scale_lut: [f32; 256] = std::array::from_fn(|c| fp::matmul_scale::<X>(c as u8, mode));
    let kernel = Kernel::<I, MODE> {
        packed: a.w.packed,
        scales: a.w.scales,
        row_bytes: a.w.row_bytes,
        groups: a.w.groups,
        g,
        xp: xp.elems(),
        kp,
        scale_lut: &scale_lut,
        prefetch: if m <= I::ROWS {
            PrefetchTo::stream(m)
        } else {
            PrefetchTo::L1
        },
        isa: std::marker::PhantomData,
    };
    // SAFETY: the variant that builds this kernel (`avx512`, `avx2`) is chosen only where its
    // instruction set is available.
    unsafe { run(&kernel, walk, a.out) };
    SCRATCH.with(|s| *s.borrow_mut() = xp);
    Ok(())
}

/// Everything one call's columns read: W's codes and scale codes, x permuted and padded
/// (rows `kp` apart), the scales' values by code.
struct Kernel<'a, I, const MODE: u8> {
    packed: &'a [u8],
    scales: &'a [u8],
    row_bytes: usize,
    groups: usize,
    g: usize,
    xp: &'a [f32],
    kp: usize,
    scale_lut: &'a [f32; 256],
    prefetch: PrefetchTo,
    isa: std::marker::PhantomData<I>,
}

impl<I: Isa, const MODE: u8> Columns for Kernel<'_, I, MODE> {
    const ROWS: usize = I::ROWS;
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
        let (g, groups) = (self.g, self.groups);
        let per = g / 8 * bits(MODE);
        let (p0, s0) = (col * self.row_bytes, col * groups);
        let (Some(packed), Some(scales), Some(xp)) = (
            self.packed.get(p0 + g0 * per..p0 + g1 * per),
            self.scales.get(s0 + g0..s0 + g1),
            self.xp.get(row0 * self.kp + g0 * g..),
        ) else {
            return;
        };
        let c = Column {
            packed,
            scales,
            xp,
            kp: self.kp,
            g,
            row_bytes: self.row_bytes,
            scale_lut: self.scale_lut,
            prefetch: self.prefetch,
        };
        // SAFETY: the caller guarantees the CPU features; `column` checks the slices.
        unsafe { I::column::<MODE, R>(&c, &mut acc[0]) }
    }
}

/// One output column's slice of K for `R` rows of x: its codes and scale codes (a whole
/// number of chunks, but for a last half chunk of nvfp4), and from the slice's first element
/// on, the rows of permuted x (`kp` apart).
struct Column<'a> {
    packed: &'a [u8],
    scales: &'a [u8],
    xp: &'a [f32],
    kp: usize,
    g: usize,
    row_bytes: usize,
    scale_lut: &'a [f32; 256],
    prefetch: PrefetchTo,
}

/// Where a chunk lies in [`Column::walk`]: an even or odd chunk of its line of codes, or a last
/// half chunk (the first 16 elements only: the last group of an odd number of nvfp4 groups).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Part {
    Even,
    Odd,
    Half,
}

impl Column<'_> {
    /// The walk both column kernels make over the slice's chunks of `bits`-wide codes for `R`
    /// rows of x: `f(ch, part)` for every chunk in order, a cache line of codes at a time
    /// (4 E2M1 chunks, 2 E4M3) with one prefetch of W per line and one of the scale codes per
    /// 16 lines. Prefetches run [`PREFETCH_AHEAD`] bytes ahead along the stream of W (as
    /// `prefetch_w`, with its divisions made once per column): within this slice, then into
    /// the next row's; a slice shorter than the distance as many slices on as it spans.
    /// Returns false, calling nothing, where the slices are shorter than [`Column`] promises
    /// (they never are); `f` may rely on the chunk's bytes (8 for a half chunk) and its 32
    /// elements of each row of x lying within the slices.
    #[inline(always)]
    fn walk<const R: usize>(&self, bits: usize, mut f: impl FnMut(usize, Part)) -> bool {
        let len = self.scales.len() * self.g;
        let chunk_bytes = 4 * bits;
        // Chunks per line of codes: a constant of the mode.
        let per_line = 64 / chunk_bytes;
        let full_chunks = len / 32;
        let bytes = len / 8 * bits;
        if self.packed.len() < bytes || self.xp.len() < (R - 1) * self.kp + len.div_ceil(32) * 32 {
            return false;
        }
        let (pp, sp) = (self.packed.as_ptr(), self.scales.as_ptr());
        let (ahead, stride) = (PREFETCH_AHEAD, self.row_bytes);
        let (near, far, near_until) = if bytes < ahead {
            let skip = ahead.div_ceil(bytes.max(1)) * stride;
            (skip, skip, 0)
        } else {
            (ahead, stride + ahead - bytes, bytes - ahead)
        };
        let groups_per_chunk = 32 / self.g;
        let scales_ahead = ahead / chunk_bytes * groups_per_chunk;
        let lines = full_chunks / per_line;
        for l in 0..lines {
            let off = l * 64;
            let skip = if off < near_until { near } else { far };
            self.prefetch.prefetch(pp.wrapping_add(off + skip));
            if l % 16 == 0 {
                // The scale codes (1/16 or 1/32 of the codes' bytes), as far ahead.
                let j = l * per_line * groups_per_chunk + scales_ahead;
                self.prefetch.prefetch(sp.wrapping_add(j));
            }
            for i in 0..per_line {
                let part = if i % 2 == 1 { Part::Odd } else { Part::Even };
                f(l * per_line + i, part);
            }
        }
        for ch in lines * per_line..full_chunks {
            f(ch, Part::Even);
        }
        if !len.is_multiple_of(32) {
            f(full_chunks, Part::Half);
        }
        true
    }

    /// The scales of chunk `ch`'s groups: its group (mx) or its two (nvfp4; the second 0
    /// for a half chunk, which has one).
    #[inline(always)]
    fn chunk_scales(&self, ch: usize, part: Part) -> (f32, f32) {
        let lut = self.scale_lut;
        let at = |j: usize| {
            debug_assert!(j < self.scales.len());
            // SAFETY: a chunk [`Column::walk`] passes holds groups `ch·32/g` (and, with
            // groups of 16 and not a half chunk, the next), all < `scales.len()`.
            lut[usize::from(unsafe { *self.scales.as_ptr().add(j) })]
        };
        if self.g == 32 {
            (at(ch), 0.0)
        } else if part == Part::Half {
            (at(2 * ch), 0.0)
        } else {
            (at(2 * ch), at(2 * ch + 1))
        }
    }
}

/// Decodes the 32 E2M1 elements of the 16 bytes at `p` (the first 8 only where `half`) into
/// their values, even elements then odd (see the module docs).
///
/// # Safety
/// 16 bytes (8 where `half`) are readable at `p`; the CPU supports AVX-512 F, BW and VL.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn decode_e2m1(p: *const u8, half: bool, lut: __m512) -> (__m512, __m512) {
    // SAFETY: the caller's contract; the masked load reads only the bytes it names.
    let raw = unsafe {
        if half {
            _mm_maskz_loadu_epi8(0xff, p as *const i8)
        } else {
            _mm_loadu_si128(p as *const __m128i)
        }
    };
    let v = _mm512_cvtepu8_epi32(raw);
    // `vpermps` reads each index's low 4 bits: the low nibble, then the high one.
    (
        _mm512_permutexvar_ps(v, lut),
        _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(v), lut),
    )
}

/// Decodes the 32 E4M3 elements of the 32 bytes at `p` into their values times 2⁻⁸, in
/// order, `0x7f`/`0xff` as NaN (see the module docs).
///
/// # Safety
/// 32 bytes are readable at `p`; the CPU supports AVX-512 F, BW and VL.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn decode_e4m3(p: *const u8) -> (__m512, __m512) {
    // SAFETY: the caller's contract.
    let w = _mm512_cvtepi8_epi16(unsafe { _mm256_loadu_si256(p as *const __m256i) });
    // Sign-extended: bits 15..7 the sign, 6..0 exponent and mantissa. Shifted by 7: bit 15
    // the sign, 13..7 exponent and mantissa; bit 14 (a copy of the sign) cleared.
    let h = _mm512_and_si512(
        _mm512_slli_epi16::<7>(w),
        _mm512_set1_epi16(0xBF80u16 as i16),
    );
    let seven = _mm512_set1_epi16(0x7f);
    let nan = _mm512_cmpeq_epi16_mask(_mm512_and_si512(w, seven), seven);
    let h = _mm512_mask_mov_epi16(h, nan, _mm512_set1_epi16(0x7e00));
    (
        _mm512_cvtph_ps(_mm512_castsi512_si256(h)),
        _mm512_cvtph_ps(_mm512_extracti64x4_epi64::<1>(h)),
    )
}

/// One chunk's weights `v·s` (lanes as the module docs order them), the chunk at `p` being
/// `full` (32 elements) or the 16 of a last nvfp4 group; `sa` and `sb` its groups' scales
/// (`sb` unused where a chunk is one group).
///
/// # Safety
/// The chunk's bytes are readable at `p`; the CPU supports AVX-512 F, BW and VL.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn weights<const MODE: u8>(
    p: *const u8,
    full: bool,
    sa: f32,
    sb: f32,
    lut: __m512,
) -> (__m512, __m512) {
    // SAFETY: the caller's contract.
    unsafe {
        if bits(MODE) == 8 {
            let (lo, hi) = decode_e4m3(p);
            let s = _mm512_set1_ps(sa);
            // (v·2⁻⁸·s)·2⁸: exact, and finite wherever v·s is.
            let two8 = _mm512_set1_ps(256.0);
            (
                _mm512_mul_ps(_mm512_mul_ps(lo, s), two8),
                _mm512_mul_ps(_mm512_mul_ps(hi, s), two8),
            )
        } else {
            let (lo, hi) = decode_e2m1(p, !full, lut);
            let s = if matches!(fp_mode(MODE), QuantMode::Nvfp4) {
                // Two broadcast halves (`vinsertf64x4`: AVX-512 F, where `vinsertf32x8`
                // would need DQ).
                let a = _mm512_castps_pd(_mm512_set1_ps(sa));
                let b = _mm256_set1_ps(sb);
                _mm512_castpd_ps(_mm512_insertf64x4::<1>(a, _mm256_castps_pd(b)))
            } else {
                _mm512_set1_ps(sa)
            };
            (_mm512_mul_ps(lo, s), _mm512_mul_ps(hi, s))
        }
    }
}

/// Adds one chunk's weights times the `R` rows of x at `px` (rows `kp` apart) to `sums`.
///
/// # Safety
/// 32 floats are readable at each row's `px`; the CPU supports AVX-512 F.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn fma_rows<const R: usize>(
    (lo, hi): (__m512, __m512),
    px: *const f32,
    kp: usize,
    sums: &mut [[__m512; 2]; R],
) {
    for (r, s) in sums.iter_mut().enumerate() {
        // SAFETY: the caller's contract.
        unsafe {
            let x = px.add(r * kp);
            s[0] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(x), s[0]);
            s[1] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(x.add(16)), s[1]);
        }
    }
}

/// One output column's slice of K for `R` rows of x into `acc[..R]`. Writes nothing if the
/// slices are shorter than [`Column`] promises (they never are; the check keeps the raw loads
/// in bounds).
///
/// The chunks go a cache line of codes at a time (4 E2M1 chunks, 2 E4M3), with one prefetch
/// per line; one row of x keeps two sets of sums (alternate chunks), so no FMA waits on the
/// one before.
///
/// # Safety
/// The CPU must support AVX-512 F, BW and VL.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn column<const MODE: u8, const R: usize>(a: &Column<'_>, acc: &mut [f32; MAX_ROWS]) {
    let bits = bits(MODE);
    let (kp, chunk_bytes) = (a.kp, 4 * bits);
    // SAFETY: reads exactly the 16 values of the table.
    let lut = unsafe { _mm512_loadu_ps(fp::FP4_LUT.as_ptr()) };
    let (pp, xp) = (a.packed.as_ptr(), a.xp.as_ptr());
    let zero = _mm512_setzero_ps();
    let (mut s0, mut s1) = ([[zero; 2]; R], [[zero; 2]; R]);
    let walked = a.walk::<R>(bits, |ch, part| {
        let (sa, sb) = a.chunk_scales(ch, part);
        let sums = if R == 1 && part == Part::Odd {
            &mut s1
        } else {
            &mut s0
        };
        // SAFETY: `walk` checked that the chunk's bytes and its 32 elements of each row of x
        // lie within the slices.
        unsafe {
            let p = pp.add(ch * chunk_bytes);
            let w = weights::<MODE>(p, part != Part::Half, sa, sb, lut);
            fma_rows::<R>(w, xp.add(ch * 32), kp, sums);
        }
    });
    if !walked {
        return;
    }
    for r in 0..R {
        let v = _mm512_add_ps(
            _mm512_add_ps(s0[r][0], s0[r][1]),
            _mm512_add_ps(s1[r][0], s1[r][1]),
        );
        acc[r] = _mm512_reduce_add_ps(v);
    }
}

/// [`weights`] on AVX2, FMA and F16C: one chunk's weights `v·s` as four vectors of 8, in
/// x's order (E2M1: the even elements of the chunk's two halves, then the odd ones; E4M3:
/// as stored). E2M1 values come from the 8 magnitudes by `vpermps` (the low 3 bits of each
/// dword) with the sign bit moved into place; E4M3 from the same f16 placement as AVX-512.
///
/// # Safety
/// The chunk's bytes are readable at `p` (8 of them where not `full`); the CPU supports
/// AVX2, FMA and F16C.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn weights_avx2<const MODE: u8>(p: *const u8, full: bool, sa: f32, sb: f32) -> [__m256; 4] {
    let (a, b) = (_mm256_set1_ps(sa), _mm256_set1_ps(sb));
    // SAFETY: the caller's contract (each load reads the bytes it names).
    unsafe {
        if bits(MODE) == 8 {
            let two8 = _mm256_set1_ps(256.0);
            let f16s = |q: *const u8| {
                let w = _mm256_cvtepi8_epi16(_mm_loadu_si128(q as *const __m128i));
                let h = _mm256_and_si256(
                    _mm256_slli_epi16::<7>(w),
                    _mm256_set1_epi16(0xBF80u16 as i16),
                );
                let seven = _mm256_set1_epi16(0x7f);
                let nan = _mm256_cmpeq_epi16(_mm256_and_si256(w, seven), seven);
                let h = _mm256_blendv_epi8(h, _mm256_set1_epi16(0x7e00), nan);
                (
                    _mm256_cvtph_ps(_mm256_castsi256_si128(h)),
                    _mm256_cvtph_ps(_mm256_extracti128_si256::<1>(h)),
                )
            };
            let ((w0, w1), (w2, w3)) = (f16s(p), f16s(p.add(16)));
            [w0, w1, w2, w3].map(|w| _mm256_mul_ps(_mm256_mul_ps(w, a), two8))
        } else {
            let mag = _mm256_setr_ps(0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0);
            let sign = _mm256_set1_epi32(i32::MIN);
            // The E2M1 value of each dword's low nibble.
            let e2m1 = |v: __m256i| {
                let m = _mm256_permutevar8x32_ps(mag, v);
                let s = _mm256_and_si256(_mm256_slli_epi32::<28>(v), sign);
                _mm256_xor_ps(m, _mm256_castsi256_ps(s))
            };
            let v0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(p as *const __m128i));
            let v1 = if full {
                _mm256_cvtepu8_epi32(_mm_loadl_epi64(p.add(8) as *const __m128i))
            } else {
                _mm256_setzero_si256()
            };
            // nvfp4: the chunk's halves are its two groups; mx: one group.
            let b = if matches!(fp_mode(MODE), QuantMode::Nvfp4) {
                b
            } else {
                a
            };
            [
                _mm256_mul_ps(e2m1(v0), a),
                _mm256_mul_ps(e2m1(v1), b),
                _mm256_mul_ps(e2m1(_mm256_srli_epi32::<4>(v0)), a),
                _mm256_mul_ps(e2m1(_mm256_srli_epi32::<4>(v1)), b),
            ]
        }
    }
}

/// [`column`] on AVX2, FMA and F16C: the same walk over lines and chunks, 8-wide.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn column_avx2<const MODE: u8, const R: usize>(a: &Column<'_>, acc: &mut [f32; MAX_ROWS]) {
    let bits = bits(MODE);
    let (kp, chunk_bytes) = (a.kp, 4 * bits);
    let (pp, xp) = (a.packed.as_ptr(), a.xp.as_ptr());
    let zero = _mm256_setzero_ps();
    let (mut s0, mut s1) = ([[zero; 2]; R], [[zero; 2]; R]);
    let walked = a.walk::<R>(bits, |ch, part| {
        let (sa, sb) = a.chunk_scales(ch, part);
        let sums = if R == 1 && part == Part::Odd {
            &mut s1
        } else {
            &mut s0
        };
        // SAFETY: `walk` checked that the chunk's bytes and its 32 elements of each row of x
        // lie within the slices.
        unsafe {
            let p = pp.add(ch * chunk_bytes);
            let w = weights_avx2::<MODE>(p, part != Part::Half, sa, sb);
            for (r, s) in sums.iter_mut().enumerate() {
                let x = xp.add(r * kp + ch * 32);
                s[0] = _mm256_fmadd_ps(w[0], _mm256_loadu_ps(x), s[0]);
                s[1] = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(x.add(8)), s[1]);
                s[0] = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(x.add(16)), s[0]);
                s[1] = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(x.add(24)), s[1]);
            }
        }
    });
    if !walked {
        return;
    }
    for r in 0..R {
        let v = _mm256_add_ps(
            _mm256_add_ps(s0[r][0], s0[r][1]),
            _mm256_add_ps(s1[r][0], s1[r][1]),
        );
        acc[r] = super::x86_avx2::hsum8(v);
    }
}
