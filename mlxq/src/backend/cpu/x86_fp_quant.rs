//! AVX-512 quantize and dequantize for MLX's FP modes (mxfp4, mxfp8, nvfp4; x86-64 with
//! AVX-512 F/BW/DQ/VL/VBMI, chosen at run time), bit-identical to [`fp::quantize_group`] and
//! [`fp::dequantize_value`] and so to MLX, in both flavours.
//!
//! **Quantize.** Groups are taken 16 at a time (one per lane of an f32 vector), in three passes:
//! 1. **amax.** Each group's `|w|` vectors are folded with `vmaxps` (which returns the
//!    accumulator where the element is NaN: NaN is skipped, as the definition's strict `>`
//!    does), and [`reduce16`] turns the 16 vectors into one vector of the 16 groups' maxima.
//! 2. **Scales, 16 lanes at once**, with the definition's own IEEE operations:
//!    - GPU: `s = amax / max`; E8M0 rounds up (exponent + 1 where the mantissa is not 0),
//!      E4M3 nearest-even (the same integer rounding as the elements); the factor is
//!      `1 / scale`.
//!    - CPU nvfp4: `s = T(amax / 6)`, its E4M3 code, and its value as the divisor.
//!    - CPU mx: `s = T(amax / max)` and `e = ceil(log2 s)`, read from the bits of `s`: its
//!      exponent, plus 1 where the mantissa is not 0. That is the definition's
//!      `s.log2().ceil()` wherever the mantissa is 0 (log2 of a power of two is exact) or at
//!      least 2⁻¹⁰ of the value (log2 then lies 1.4·10⁻³ above an integer, far beyond its
//!      error); bf16 and f16 scales are always so. The factor is `2^−e`: `w / T(2^e)` is
//!      `w·2^−e` exactly, and rounding that to `T` changes no code (it is exact unless the
//!      value is below `T`'s normal range, where every code is 0 or a signed zero).
//!
//!    Lanes outside these rules (an f32 scale just above a power of two, subnormal or
//!    non-finite scales, exponents whose power of two `T` cannot hold, an nvfp4 scale that
//!    saturates at 448) are marked and their
//!    groups redone by the definition itself ([`fp_group`]), as is a task's last partial
//!    batch.
//! 3. **Codes.** `x = w·factor` (GPU, CPU mx) or `T(w / divisor)` (CPU nvfp4, a true
//!    division as MLX's), then:
//!    - E2M1: the magnitude's f32 bits name a bin of 2⁻² … 2³ with 2 mantissa bits (every
//!      rounding threshold, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5 and 5, starts a bin), and one
//!      `vpermb` reads the code from a 64-byte table indexed by the bin and by whether the
//!      value is the bin's start (a tie) or inside it. The table is filled from the scalar
//!      definitions ([`fp::e2m1_from_f32_gpu`], [`fp::e2m1_from_f32_cpu`]), so it carries
//!      each flavour's tie rule. Signs: the GPU keeps the sign bit (NaN is +6, code 7); the
//!      CPU adds it only to non-zero magnitudes, and NaN and ±∞ are code 0.
//!    - E4M3: MLX CPU's integer rounding (`ToFP8`) in 16 lanes: saturation at 464,
//!      subnormals by an f32 addition of 2¹⁴, normals by adding the bias and the rounding
//!      increment to the bits; the GPU differs only in NaN (`0x7f`).
//!
//!    The passes read 32 elements at a time with `x86_quant`'s `load32`: bf16 as one 64-byte
//!    load split into even and odd elements (a shift and a mask), whose codes pack with one OR
//!    and one narrowing; f32 and f16 in order, packed two per byte by a 64-bit shift and
//!    `vpmovqb` (4 bits) or stored by `vpmovdb` (8 bits).
//!
//! **Dequantize**, 16 elements at a time (one group, or half of one): E2M1 nibbles are split,
//! interleaved back into element order and read from the value table by `vpermps`; an E4M3
//! code's bits become an f32's (`mag << 20`, the sign at bit 31) whose value times 2¹²⁰ is
//! the element's, subnormals included, and `0x7f`/`0xff` NaN. Each group's scale comes from a
//! 256-entry table of its code's value, made once per call as the flavour reads it (CPU:
//! rounded to the output dtype first); the f32 product is rounded to the output dtype, as
//! the definition does.

use super::dequantize::{DequantizeArgs, DequantizeFn};
use super::quantize::{fp_group, fp_mode, QuantizeArgs, QuantizeFn};
use super::x86_columns::PrefetchTo;
use super::x86_quant::{
    abs, available, check_len, even_odd, load32, missing_features, reduce16, store16, to_dtype,
};
use super::{cast, cast_mut, KernelFn, Variant};
use crate::dtype::{DType, Float};
use crate::error::{Error, Result};
use crate::quant::{fp, Flavour, QuantMode};
use crate::registry::OpKind;
use rayon::prelude::*;
use std::arch::x86_64::*;

/// The variant: quantize and dequantize in every FP mode, flavour and float dtype.
pub(crate) const FP_QUANT: Variant = Variant {
    name: "avx512",
    supports: |k| {
        k.mode != QuantMode::Affine
            && matches!(k.op, OpKind::Quantize | OpKind::Dequantize)
            && k.group_size as usize == shape(k.mode).1
            && available()
    },
    decode: None,
    build: |k| match k.op {
        OpKind::Quantize => quantize_kernel(k.input, k.mode).map(KernelFn::Quantize),
        OpKind::Dequantize => {
            (k.scales == DType::U8).then_some(())?;
            dequantize_kernel(k.output, k.mode).map(KernelFn::Dequantize)
        }
        OpKind::QuantizedMatmul => None,
    },
};

/// How far ahead of pass 3 the input is prefetched (into L2).
const PREFETCH_BYTES: usize = 4096;

/// Groups per parallel task (a multiple of 16).
const TASK_GROUPS: usize = 1024;

/// Element bits and group size of an FP mode.
pub(crate) const fn shape(mode: QuantMode) -> (usize, usize) {
    let (bits, g) = crate::QuantSpec::fp_defaults(mode);
    (bits as usize, g as usize)
}

/// The kernel of `mode` among the kernels instantiated for its `MODE` constants 1, 2, 3
/// ([`fp_mode`]: mxfp4, mxfp8, nvfp4); none for affine.
pub(crate) fn per_mode<F>(mode: QuantMode, [mxfp4, mxfp8, nvfp4]: [F; 3]) -> Option<F> {
    match mode {
        QuantMode::Affine => None,
        QuantMode::Mxfp4 => Some(mxfp4),
        QuantMode::Mxfp8 => Some(mxfp8),
        QuantMode::Nvfp4 => Some(nvfp4),
    }
}

/// The kernel for input dtype `dtype` in `mode`.
fn quantize_kernel(dtype: DType, mode: QuantMode) -> Option<QuantizeFn> {
    crate::with_float_type!(dtype, T => per_mode(mode, [
        quantize::<T, 1> as QuantizeFn,
        quantize::<T, 2>,
        quantize::<T, 3>,
    ]), _ => None)
}

/// The 64-byte E2M1 table of pass 3: entry `2 + 2i` is the code of the start of bin `i`
/// (`2⁻² + i` steps of 2 mantissa bits; bin 20 is 8 and beyond), `3 + 2i` that of its inside;
/// entries 0 and 1 (below 0.25) and past 43 are 0.
pub(crate) fn e2m1_table(flavour: Flavour) -> [u8; 64] {
    let code = |x: f32| match flavour {
        Flavour::Gpu => fp::e2m1_from_f32_gpu(x),
        Flavour::Cpu => fp::e2m1_from_f32_cpu(x),
    };
    let mut t = [0u8; 64];
    for i in 0..=20u32 {
        let start = BIN0 + (i << 21);
        t[2 + 2 * i as usize] = code(f32::from_bits(start));
        t[3 + 2 * i as usize] = code(f32::from_bits(start + 1));
    }
    t
}

/// The bits of 0.25, where bin 0 starts.
pub(crate) const BIN0: u32 = 0x3E80_0000;

/// The checks every kernel of this module starts with (the CPU's features, `mode`'s group
/// size); `mode`'s element bits and group size.
fn entry(op: &'static str, mode: QuantMode, group_size: usize) -> Result<(usize, usize)> {
    if !available() {
        return Err(missing_features(op));
    }
    check_group(op, mode, group_size)
}

/// `mode`'s element bits and group size, or an error naming `group_size` if it is not the
/// mode's (the check every FP quantize and dequantize kernel starts with, after its CPU's
/// features).
pub(crate) fn check_group(
    op: &'static str,
    mode: QuantMode,
    group_size: usize,
) -> Result<(usize, usize)> {
    let (bits, g) = shape(mode);
    if group_size != g {
        return Err(Error::invalid(op, "group_size", g.to_string(), group_size));
    }
    Ok((bits, g))
}

/// An FP quantize call's driver: checks that `a`'s input (of `T`), packed codes and scale
/// codes hold the same number of groups of `shape` (element bits, group size), then runs
/// `task` on every run of `task_groups` groups (the last may be shorter) in parallel, with
/// that run's input, packed codes and scale codes.
pub(crate) fn quantize_tasks<T: Float>(
    op: &'static str,
    a: QuantizeArgs<'_>,
    (bits, g): (usize, usize),
    task_groups: usize,
    task: impl Fn(&[T], &mut [u8], &mut [u8]) + Sync + Send,
) -> Result<()> {
    let w: &[T] = cast(op, "w", a.w)?;
    let groups = a.scales.len();
    let gb = g * bits / 8;
    check_len(op, "w", groups * g, w.len())?;
    check_len(op, "packed", groups * gb, a.packed.len())?;
    w.par_chunks(task_groups * g)
        .zip(a.packed.par_chunks_mut(task_groups * gb))
        .zip(a.scales.par_chunks_mut(task_groups))
        .for_each(|((w, packed), scales)| task(w, packed, scales));
    Ok(())
}

/// The kernel: tasks of [`TASK_GROUPS`] groups in parallel.
fn quantize<T: Float, const MODE: u8>(a: QuantizeArgs<'_>) -> Result<()> {
    const OP: &str = "quantize";
    let shape = entry(OP, fp_mode(MODE), a.group_size)?;
    let flavour = a.flavour;
    let table = e2m1_table(flavour);
    quantize_tasks::<T>(OP, a, shape, TASK_GROUPS, |w, packed, scales| {
        // SAFETY: `available()` holds (checked above); `quantize_groups` checks that the
        // slices agree (they do by construction: equal numbers of groups per chunk).
        unsafe {
            match flavour {
                Flavour::Gpu => quantize_groups::<T, MODE, true>(w, packed, scales, &table),
                Flavour::Cpu => quantize_groups::<T, MODE, false>(w, packed, scales, &table),
            }
        }
    })
}

/// Quantizes the groups of one task, 16 at a time; the marked groups and a last partial batch
/// through the definition. Does nothing if the slice lengths disagree (they never do; the
/// check keeps the raw accesses in bounds).
///
/// # Safety
/// The CPU must support [`available`]'s features.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vbmi")]
unsafe fn quantize_groups<T: Float, const MODE: u8, const GPU: bool>(
    w: &[T],
    packed: &mut [u8],
    scales: &mut [u8],
    table: &[u8; 64],
) {
    let mode = fp_mode(MODE);
    let (bits, g) = shape(mode);
    let gb = g * bits / 8;
    let groups = scales.len();
    if w.len() != groups * g || packed.len() != groups * gb {
        return;
    }
    let flavour = if GPU { Flavour::Gpu } else { Flavour::Cpu };
    let by_definition = |j: usize, packed: &mut [u8], scales: &mut [u8]| {
        scales[j] = fp_group(
            &w[j * g..(j + 1) * g],
            mode,
            flavour,
            &mut packed[j * gb..(j + 1) * gb],
        );
    };
    // SAFETY: 64 bytes.
    let table = unsafe { _mm512_loadu_si512(table.as_ptr() as *const __m512i) };
    let full = groups / 16 * 16;
    for b0 in (0..full).step_by(16) {
        // SAFETY: groups b0..b0 + 16 lie within the slices (b0 + 16 ≤ full ≤ groups, and
        // the lengths were checked above); the CPU features are this function's contract.
        let mut redo = unsafe {
            batch::<T, MODE, GPU>(
                w.as_ptr().add(b0 * g),
                packed.as_mut_ptr().add(b0 * gb),
                scales.as_mut_ptr().add(b0),
                table,
            )
        };
        while redo != 0 {
            by_definition(b0 + redo.trailing_zeros() as usize, packed, scales);
            redo &= redo - 1;
        }
    }
    for j in full..groups {
        by_definition(j, packed, scales);
    }
}

/// One batch of 16 groups: the three passes of the module docs, over chunks of 32 elements
/// (one mx group, or two nvfp4 groups) read by [`load32`]: in order (elements 0–15, 16–31)
/// or, for bf16 ([`even_odd`]), as even and odd elements, whose codes then pack with one
/// narrowing. Returns the groups (bit `j` for group `j`) that the definition must redo.
///
/// # Safety
/// `w` must be valid for reading 16 groups, `packed` for writing their codes and `scales`
/// their 16 scale codes; the CPU must support [`available`]'s features.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vbmi")]
unsafe fn batch<T: Float, const MODE: u8, const GPU: bool>(
    w: *const T,
    packed: *mut u8,
    scales: *mut u8,
    table: __m512i,
) -> u16 {
    let mode = fp_mode(MODE);
    let (bits, g) = shape(mode);
    let pairs = even_odd::<T>();
    let chunk_bytes = 32 * std::mem::size_of::<T>();
    let zero = _mm512_setzero_ps();
    // Pass 1: the groups' amax, lane j for group j. `|x|` first: where it is NaN, `vmaxps`
    // returns the other operand.
    let mut m = [zero; 16];
    for c in 0..g / 2 {
        // SAFETY: chunk c's 32 elements lie within the batch's 16·g (contract).
        let (x, y) = unsafe { load32::<T>(w.add(32 * c)) };
        let (x, y) = (_mm512_max_ps(abs(x), zero), _mm512_max_ps(abs(y), zero));
        if g == 32 {
            m[c] = _mm512_max_ps(x, y);
        } else if pairs {
            // Lanes 0–7 are group 2c's, 8–15 group 2c + 1's (amax ≥ 0: zeros are neutral).
            let a = _mm512_max_ps(x, y);
            (m[2 * c], m[2 * c + 1]) = (
                _mm512_maskz_mov_ps(0x00ff, a),
                _mm512_maskz_mov_ps(0xff00, a),
            );
        } else {
            (m[2 * c], m[2 * c + 1]) = (x, y);
        }
    }
    let amax = reduce16::<true>(&m);
    // Pass 2: the scales.
    let (codes, factor, redo) = scales16::<T, MODE, GPU>(amax);
    let mut f = [0f32; 16];
    // SAFETY: 16 scale codes writable at `scales` (contract); `f` holds 16 f32.
    unsafe {
        _mm_storeu_si128(scales as *mut __m128i, _mm512_cvtepi32_epi8(codes));
        _mm512_storeu_ps(f.as_mut_ptr(), factor);
    }
    // Pass 3: the elements' codes, 4·bits bytes per chunk.
    for c in 0..g / 2 {
        let (fx, fy) = if g == 32 {
            (_mm512_set1_ps(f[c]), _mm512_set1_ps(f[c]))
        } else if pairs {
            let b = _mm512_mask_blend_ps(
                0xff00,
                _mm512_set1_ps(f[2 * c]),
                _mm512_set1_ps(f[2 * c + 1]),
            );
            (b, b)
        } else {
            (_mm512_set1_ps(f[2 * c]), _mm512_set1_ps(f[2 * c + 1]))
        };
        // The input PREFETCH_BYTES on, line by line: the streams cross a page every 2–8
        // batches, where the hardware prefetcher starts over.
        for l in (0..chunk_bytes).step_by(64) {
            let at = c * chunk_bytes + l + PREFETCH_BYTES;
            PrefetchTo::L2.prefetch((w as *const u8).wrapping_add(at));
        }
        // SAFETY: chunk c's 32 input elements and 4·bits output bytes lie within the batch
        // (contract).
        unsafe {
            let (x, y) = load32::<T>(w.add(32 * c));
            let (x, y) = if GPU || mode != QuantMode::Nvfp4 {
                (_mm512_mul_ps(x, fx), _mm512_mul_ps(y, fy))
            } else {
                (
                    to_dtype::<T>(_mm512_div_ps(x, fx)),
                    to_dtype::<T>(_mm512_div_ps(y, fy)),
                )
            };
            let out = packed.add(4 * bits * c);
            match (bits, pairs) {
                (8, true) => {
                    let c = _mm512_or_si512(e4m3::<GPU>(x), _mm512_slli_epi32::<8>(e4m3::<GPU>(y)));
                    _mm256_storeu_si256(out as *mut __m256i, _mm512_cvtepi32_epi16(c));
                }
                (8, false) => {
                    _mm_storeu_si128(out as *mut __m128i, _mm512_cvtepi32_epi8(e4m3::<GPU>(x)));
                    _mm_storeu_si128(
                        out.add(16) as *mut __m128i,
                        _mm512_cvtepi32_epi8(e4m3::<GPU>(y)),
                    );
                }
                (_, true) => {
                    let c = _mm512_or_si512(
                        e2m1::<GPU>(x, table),
                        _mm512_slli_epi32::<4>(e2m1::<GPU>(y, table)),
                    );
                    _mm_storeu_si128(out as *mut __m128i, _mm512_cvtepi32_epi8(c));
                }
                (_, false) => {
                    for (h, v) in [x, y].into_iter().enumerate() {
                        let c = e2m1::<GPU>(v, table);
                        // Element 2i + 1 (the high dword of qword i) into bits 4–7 of 2i.
                        let pair = _mm512_or_si512(c, _mm512_srli_epi64::<28>(c));
                        _mm_storel_epi64(
                            out.add(8 * h) as *mut __m128i,
                            _mm512_cvtepi64_epi8(pair),
                        );
                    }
                }
            }
        }
    }
    redo
}

/// Pass 2 for 16 groups' `amax` (lane `j` for group `j`): the scale codes (one per dword),
/// the factor (GPU, CPU mx) or divisor (CPU nvfp4) of pass 3, and the lanes the definition
/// must redo.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vbmi")]
fn scales16<T: Float, const MODE: u8, const GPU: bool>(amax: __m512) -> (__m512i, __m512, u16) {
    let mode = fp_mode(MODE);
    let max = if mode == QuantMode::Mxfp8 {
        fp::E4M3_MAX
    } else {
        fp::E2M1_MAX
    };
    let s = _mm512_div_ps(amax, _mm512_set1_ps(max));
    let one = _mm512_set1_ps(1.0);
    if GPU {
        let (c, value) = if mode == QuantMode::Nvfp4 {
            let c = e4m3::<true>(s);
            (c, e4m3_decode(c))
        } else {
            let c = e8m0_up(s);
            (c, e8m0_value(c))
        };
        return (c, _mm512_div_ps(one, value), 0);
    }
    let s = to_dtype::<T>(s);
    if mode == QuantMode::Nvfp4 {
        let c = e4m3::<false>(s);
        // A saturated scale (s ≥ 464, 448 after rounding) leaves |x| unbounded, where the
        // definition's argmin ties every candidate: those groups are redone.
        let redo = _mm512_cmp_ps_mask::<_CMP_NLT_UQ>(s, _mm512_set1_ps(464.0));
        return (c, e4m3_decode(c), redo);
    }
    // mx on the CPU: e = ceil(log2 s) from the bits of s (s ≥ +0).
    let bits = _mm512_castps_si512(s);
    let exp = _mm512_srli_epi32::<23>(bits);
    let mant = _mm512_and_si512(bits, _mm512_set1_epi32(0x7f_ffff));
    let inexact = _mm512_test_epi32_mask(mant, mant);
    let e = _mm512_sub_epi32(exp, _mm512_set1_epi32(127));
    let e = _mm512_mask_add_epi32(e, inexact, e, _mm512_set1_epi32(1));
    let zero = _mm512_cmpeq_epi32_mask(bits, _mm512_setzero_si512());
    let e = _mm512_maskz_mov_epi32(!zero, e);
    // Where `T(2^e)` is exact: f16 holds 2^-24 … 2^15; f32 and bf16 2^-126 … 2^127 here
    // (a normal s has e ≥ -126).
    let e_max = if T::DTYPE == DType::F16 { 15 } else { 127 };
    let redo = (_mm512_cmpeq_epi32_mask(exp, _mm512_setzero_si512()) & inexact)
        | _mm512_cmpeq_epi32_mask(exp, _mm512_set1_epi32(255))
        | (_mm512_cmplt_epi32_mask(mant, _mm512_set1_epi32(1 << 13)) & inexact)
        | _mm512_cmpgt_epi32_mask(e, _mm512_set1_epi32(e_max));
    let code = _mm512_and_si512(
        _mm512_add_epi32(e, _mm512_set1_epi32(127)),
        _mm512_set1_epi32(0xff),
    );
    let factor = _mm512_scalef_ps(
        one,
        _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_setzero_si512(), e)),
    );
    (code, factor, redo)
}

/// E8M0 codes of `s ≥ +0` rounded up ([`fp::e8m0_from_f32_gpu`]): the exponent, plus 1 where
/// the mantissa is not 0 (unless the exponent is 254, which saturates, or a subnormal at most
/// 2⁻¹²⁷); ∞ and NaN are `0xff`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vbmi")]
fn e8m0_up(s: __m512) -> __m512i {
    let bits = _mm512_castps_si512(s);
    let exp = _mm512_srli_epi32::<23>(bits);
    let mant = _mm512_and_si512(bits, _mm512_set1_epi32(0x7f_ffff));
    let up = _mm512_test_epi32_mask(mant, mant)
        & !_mm512_cmpeq_epi32_mask(exp, _mm512_set1_epi32(0xfe))
        & !(_mm512_cmpeq_epi32_mask(exp, _mm512_setzero_si512())
            & _mm512_cmple_epi32_mask(mant, _mm512_set1_epi32(0x40_0000)));
    let c = _mm512_mask_add_epi32(exp, up, exp, _mm512_set1_epi32(1));
    let special = _mm512_fpclass_ps_mask::<0x99>(s);
    _mm512_mask_mov_epi32(c, special, _mm512_set1_epi32(0xff))
}

/// The GPU's value of E8M0 codes: `2^(c − 127)`, code 0 the subnormal 2⁻¹²⁷, `0xff` NaN.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vbmi")]
fn e8m0_value(c: __m512i) -> __m512 {
    let v = _mm512_slli_epi32::<23>(c);
    let v = _mm512_mask_mov_epi32(
        v,
        _mm512_cmpeq_epi32_mask(c, _mm512_setzero_si512()),
        _mm512_set1_epi32(0x40_0000),
    );
    let v = _mm512_mask_mov_epi32(
        v,
        _mm512_cmpeq_epi32_mask(c, _mm512_set1_epi32(0xff)),
        _mm512_set1_epi32(0x7fc0_0000),
    );
    _mm512_castsi512_ps(v)
}

/// E4M3 codes of `x` (one per dword): MLX CPU's `ToFP8` ([`fp::e4m3_from_f32_cpu`]),
/// nearest-even, saturating at ±448; with `GPU`, NaN is `0x7f` ([`fp::e4m3_from_f32_gpu`]).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vbmi")]
fn e4m3<const GPU: bool>(x: __m512) -> __m512i {
    let bits = _mm512_castps_si512(x);
    let sign = _mm512_and_si512(_mm512_srli_epi32::<24>(bits), _mm512_set1_epi32(0x80));
    let f = _mm512_and_si512(bits, _mm512_set1_epi32(0x7fff_ffff));
    // Normal range: add the bias difference, the rounding increment and the odd bit.
    let odd = _mm512_and_si512(_mm512_srli_epi32::<20>(f), _mm512_set1_epi32(1));
    let bias = ((7u32.wrapping_sub(127)) << 23).wrapping_add(0x7ffff) as i32;
    let normal = _mm512_srli_epi32::<20>(_mm512_add_epi32(
        _mm512_add_epi32(f, _mm512_set1_epi32(bias)),
        odd,
    ));
    // Subnormal range: adding 2^14 rounds to a multiple of 2^-9.
    let denorm = _mm512_set1_epi32(141 << 23);
    let sub = _mm512_sub_epi32(
        _mm512_castps_si512(_mm512_add_ps(
            _mm512_castsi512_ps(f),
            _mm512_castsi512_ps(denorm),
        )),
        denorm,
    );
    let r = _mm512_mask_blend_epi32(
        _mm512_cmplt_epu32_mask(f, _mm512_set1_epi32(121 << 23)),
        normal,
        sub,
    );
    let r = _mm512_mask_mov_epi32(
        r,
        _mm512_cmpge_epu32_mask(f, _mm512_set1_epi32(543 << 21)),
        _mm512_set1_epi32(0x7e),
    );
    let r = _mm512_and_si512(_mm512_or_si512(r, sign), _mm512_set1_epi32(0xff));
    if GPU {
        _mm512_mask_mov_epi32(
            r,
            _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(x, x),
            _mm512_set1_epi32(0x7f),
        )
    } else {
        r
    }
}

/// E2M1 codes of `x` (one per dword) through the bin table of [`e2m1_table`] (module docs).
/// The CPU's codes are the definition's for |x| < 2²², which holds in pass 3 (|x| ≤ 9: the
/// scale is at least about amax/9 wherever it did not saturate), and for ±∞ and NaN.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vbmi")]
fn e2m1<const GPU: bool>(x: __m512, table: __m512i) -> __m512i {
    let bits = _mm512_castps_si512(x);
    let a = _mm512_and_si512(bits, _mm512_set1_epi32(0x7fff_ffff));
    let bin = _mm512_srai_epi32::<21>(_mm512_sub_epi32(a, _mm512_set1_epi32(BIN0 as i32)));
    let bin = _mm512_min_epi32(
        _mm512_max_epi32(bin, _mm512_set1_epi32(-1)),
        _mm512_set1_epi32(20),
    );
    let inside = _mm512_test_epi32_mask(a, _mm512_set1_epi32(0x1f_ffff));
    let idx = _mm512_add_epi32(_mm512_add_epi32(bin, bin), _mm512_set1_epi32(2));
    let idx = _mm512_mask_add_epi32(idx, inside, idx, _mm512_set1_epi32(1));
    // Bytes 1–3 of each index are 0, and so is table entry 0: one code per dword.
    let mag = _mm512_permutexvar_epi8(idx, table);
    let eight = _mm512_set1_epi32(8);
    let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(x, x);
    if GPU {
        // The sign bit, except on NaN (+6 whatever its sign).
        let neg = _mm512_movepi32_mask(bits) & !nan;
        _mm512_mask_or_epi32(mag, neg, mag, eight)
    } else {
        // Non-zero magnitudes only (a magnitude above 0.25); NaN and ±∞ are code 0.
        let neg = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, _mm512_set1_ps(-0.25));
        let mag = _mm512_mask_or_epi32(mag, neg, mag, eight);
        _mm512_maskz_mov_epi32(!_mm512_fpclass_ps_mask::<0x99>(x), mag)
    }
}

// ---------------------------------------------------------------------------------------------
// Dequantize.

/// Groups per parallel dequantize task.
const DEQ_TASK_GROUPS: usize = 512;

/// The dequantize kernel for output dtype `out` in `mode`.
fn dequantize_kernel(out: DType, mode: QuantMode) -> Option<DequantizeFn> {
    crate::with_float_type!(out, O => per_mode(mode, [
        dequantize::<O, 1> as DequantizeFn,
        dequantize::<O, 2>,
        dequantize::<O, 3>,
    ]), _ => None)
}

/// Each scale code's value as `flavour` multiplies an element by it when dequantizing to
/// `O` in `mode`: [`fp::scale_value`], rounded to `O` first on the CPU flavour.
pub(crate) fn scale_table<O: Float>(mode: QuantMode, flavour: Flavour) -> [f32; 256] {
    std::array::from_fn(|c| {
        let v = fp::scale_value(c as u8, mode, flavour);
        match flavour {
            Flavour::Cpu => O::from_f32(v).to_f32(),
            Flavour::Gpu => v,
        }
    })
}

/// An FP dequantize call's driver: checks that `a`'s output (of `O`) and packed codes hold as
/// many groups of `shape` (element bits, group size) as there are scale codes, then runs
/// `task` on every run of `task_groups` groups (the last may be shorter) in parallel, with
/// that run's packed codes, scale codes and output.
pub(crate) fn dequantize_tasks<O: Float>(
    op: &'static str,
    a: DequantizeArgs<'_>,
    (bits, g): (usize, usize),
    task_groups: usize,
    task: impl Fn(&[u8], &[u8], &mut [O]) + Sync + Send,
) -> Result<()> {
    let out: &mut [O] = cast_mut(op, "out", a.out)?;
    let (packed, scales) = (a.w.packed, a.w.scales);
    let groups = scales.len();
    let gb = g * bits / 8;
    check_len(op, "out", groups * g, out.len())?;
    check_len(op, "packed", groups * gb, packed.len())?;
    out.par_chunks_mut(task_groups * g)
        .zip(packed.par_chunks(task_groups * gb))
        .zip(scales.par_chunks(task_groups))
        .for_each(|((out, packed), scales)| task(packed, scales, out));
    Ok(())
}

/// The dequantize kernel: tasks of [`DEQ_TASK_GROUPS`] groups in parallel.
fn dequantize<O: Float, const MODE: u8>(a: DequantizeArgs<'_>) -> Result<()> {
    const OP: &str = "dequantize";
    let mode = fp_mode(MODE);
    let shape = entry(OP, mode, a.w.group_size)?;
    let table = scale_table::<O>(mode, a.flavour);
    dequantize_tasks::<O>(OP, a, shape, DEQ_TASK_GROUPS, |packed, scales, out| {
        // SAFETY: `available()` holds (checked above); `dequantize_groups` checks lengths.
        unsafe { dequantize_groups::<O, MODE>(packed, scales, &table, out) };
    })
}

/// Dequantizes whole groups, 16 elements at a time. Does nothing if the lengths disagree.
///
/// # Safety
/// The CPU must support [`available`]'s features.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vbmi")]
unsafe fn dequantize_groups<O: Float, const MODE: u8>(
    packed: &[u8],
    scales: &[u8],
    table: &[f32; 256],
    out: &mut [O],
) {
    let (bits, g) = shape(fp_mode(MODE));
    let groups = scales.len();
    if out.len() != groups * g || packed.len() != groups * g * bits / 8 {
        return;
    }
    // SAFETY: 16 f32.
    let lut = unsafe { _mm512_loadu_ps(fp::FP4_LUT.as_ptr()) };
    let (pp, po) = (packed.as_ptr(), out.as_mut_ptr());
    for (i, &s) in
        (0..groups * g / 16).zip(scales.iter().flat_map(|s| std::iter::repeat_n(s, g / 16)))
    {
        let s = _mm512_set1_ps(table[usize::from(s)]);
        // SAFETY: vector i's codes (16·bits/8 bytes at 16·bits/8·i) and outputs (16 at 16i)
        // lie within `packed` and `out` (lengths checked above).
        unsafe {
            let v = if bits == 4 {
                let b = _mm_loadl_epi64(pp.add(8 * i) as *const __m128i);
                let low = _mm_set1_epi8(0x0f);
                let nibbles = _mm_unpacklo_epi8(
                    _mm_and_si128(b, low),
                    _mm_and_si128(_mm_srli_epi16::<4>(b), low),
                );
                _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(nibbles), lut)
            } else {
                e4m3_decode(_mm512_cvtepu8_epi32(_mm_loadu_si128(
                    pp.add(16 * i) as *const __m128i
                )))
            };
            store16::<O>(po.add(16 * i), 0xffff, _mm512_mul_ps(v, s));
        }
    }
}

/// Values of E4M3 codes (one per dword), `0x7f`/`0xff` NaN ([`fp::e4m3_to_f32`]): the
/// code's magnitude bits at bit 20 of an f32 and its sign at bit 31 make the value times
/// 2⁻¹²⁰ (an exponent field of 0 being f32's subnormal, as it is E4M3's), so one exact
/// multiply finishes it.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vbmi")]
fn e4m3_decode(c: __m512i) -> __m512 {
    let mag = _mm512_and_si512(c, _mm512_set1_epi32(0x7f));
    let sign = _mm512_slli_epi32::<24>(_mm512_and_si512(c, _mm512_set1_epi32(0x80)));
    let v = _mm512_mul_ps(
        _mm512_castsi512_ps(_mm512_or_si512(_mm512_slli_epi32::<20>(mag), sign)),
        _mm512_set1_ps(f32::from_bits((120 + 127) << 23)),
    );
    _mm512_mask_mov_ps(
        v,
        _mm512_cmpeq_epi32_mask(mag, _mm512_set1_epi32(0x7f)),
        _mm512_set1_ps(f32::NAN),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The assumption of the CPU mx scale: log2 of a power of two is exact in f32, so its
    /// ceiling is the exponent.
    #[test]
    fn log2_of_powers_of_two_is_exact() {
        for k in -149..=127 {
            let s = fp::pow2(k);
            assert_eq!(s.log2().ceil() as i32, k, "2^{k}");
        }
    }

    /// Every f32 E2M1 and E4M3 conversion of pass 3 equals its scalar definition, over a
    /// sweep of magnitudes (every bin edge and its neighbours, tiny, huge, ±0, ±∞, NaN).
    #[test]
    fn element_codes_match_the_definitions() {
        if !available() {
            eprintln!("skipped: no AVX-512 F/BW/DQ/VL/VBMI here");
            return;
        }
        let mut xs = vec![
            0.0f32,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -f32::NAN,
        ];
        for i in 0..=24u32 {
            let start = BIN0 - (2 << 21) + (i << 21);
            for d in [-2i32, -1, 0, 1, 2] {
                xs.push(f32::from_bits(start.wrapping_add_signed(d)));
            }
        }
        for e in -150..=130 {
            for m in [1.0f32, 1.0625, 1.5, 1.9375] {
                xs.push(m * 2f32.powi(e));
            }
        }
        let neg: Vec<f32> = xs.iter().map(|x| -x).collect();
        xs.extend(neg);
        for flavour in [Flavour::Cpu, Flavour::Gpu] {
            let table = e2m1_table(flavour);
            for chunk in xs.chunks(16) {
                let mut v = [0f32; 16];
                v[..chunk.len()].copy_from_slice(chunk);
                let (mut c4, mut c8) = ([0u32; 16], [0u32; 16]);
                // SAFETY: AVX-512 checked above; every array holds 16 lanes.
                unsafe {
                    let x = _mm512_loadu_ps(v.as_ptr());
                    let t = _mm512_loadu_si512(table.as_ptr() as *const __m512i);
                    let (a, b) = match flavour {
                        Flavour::Gpu => (e2m1::<true>(x, t), e4m3::<true>(x)),
                        Flavour::Cpu => (e2m1::<false>(x, t), e4m3::<false>(x)),
                    };
                    _mm512_storeu_si512(c4.as_mut_ptr() as *mut __m512i, a);
                    _mm512_storeu_si512(c8.as_mut_ptr() as *mut __m512i, b);
                }
                for (i, &x) in v.iter().enumerate() {
                    let (w4, w8) = match flavour {
                        Flavour::Gpu => (fp::e2m1_from_f32_gpu(x), fp::e4m3_from_f32_gpu(x)),
                        Flavour::Cpu => (fp::e2m1_from_f32_cpu(x), fp::e4m3_from_f32_cpu(x)),
                    };
                    // The CPU's argmin ties every candidate once f32 distances lose the
                    // LUT's values (|x| ≳ 2^22: code 0); pass 3 never sees |x| > 9.
                    let far = flavour == Flavour::Cpu && x.abs() > 64.0 && x.is_finite();
                    assert!(
                        far || c4[i] == u32::from(w4),
                        "{flavour:?} e2m1 of {x:e} ({:#x}): {} against {w4}",
                        x.to_bits(),
                        c4[i]
                    );
                    assert_eq!(
                        c8[i],
                        u32::from(w8),
                        "{flavour:?} e4m3 of {x:e} ({:#x})",
                        x.to_bits()
                    );
                }
            }
        }
    }
}
