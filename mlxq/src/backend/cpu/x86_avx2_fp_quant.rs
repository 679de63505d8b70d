//! AVX2 quantize and dequantize for MLX's FP modes (mxfp4, mxfp8, nvfp4; x86-64 with AVX2, FMA
//! and F16C, chosen at run time where the AVX-512 kernels are not: the `avx2` variant),
//! bit-identical to [`fp::quantize_group`] and [`fp::dequantize_value`] and so to MLX, in both
//! flavours. The passes are [`x86_fp_quant`](super::x86_fp_quant)'s at half the width; what
//! AVX2 lacks (a 64-byte `vpermb`, masks, `vscalefps`, narrowing stores) is done otherwise.
//!
//! **Quantize.** Groups are taken 8 at a time (one per lane of an f32 vector), in three passes:
//! 1. **amax** from the bits of `|w|`, which as integers order as the magnitudes do: `vpmaxsd`
//!    over f32, `vpmaxuw` over f16 and bf16 as loaded (16 elements an instruction, nothing
//!    widened), then a transposing tree ([`reduce8`]) to one vector of the 8 groups' maxima.
//!    NaN's bits exceed every number's, so a group holding NaN gets a NaN amax: such groups,
//!    and those holding ±∞, are redone by the definition ([`fp_group`]), which skips NaN.
//! 2. **Scales**, 8 lanes at once, by the AVX-512 kernel's rules (its module docs): GPU
//!    `s = amax / max`, E8M0 rounded up or E4M3 nearest-even, the factor `1 / scale`; CPU nvfp4
//!    `T(amax / 6)`, its E4M3 code, and the code's value as the divisor (0 becomes +∞: the
//!    definition's `w / 0` is ±∞ or NaN, code 0, as `w / ∞ = ±0` is); CPU mx
//!    `e = ceil(log2 T(amax / max))` read from the bits, the factor `2^−e`. The lanes those
//!    rules do not cover (f32 scales a hair above a power of two, subnormal scales, exponents
//!    `T` cannot hold, an nvfp4 CPU scale saturating at 448) are redone by the definition, as
//!    is a task's last partial batch. So the definition runs, per group, only for: NaN or ±∞
//!    in the group (either flavour); on the CPU flavour, an f32 mx scale within 2¹³ ulps above
//!    a power of two (about 1 group in 1000 of random f32 data; never for bf16 or f16, whose
//!    scales have short mantissas), an amax below about 2⁻¹²³ (f32 subnormal scales), an
//!    nvfp4 amax of 2784 or more; and the last groups of a call that do not fill a batch of 8.
//! 3. **Codes**, 32 elements at a time: `x = w·factor` (GPU, CPU mx) or `T(w / divisor)` (CPU
//!    nvfp4, MLX's true division), then
//!    - E2M1: per element, the sum of the bins (of 2⁻² … 2³ by two mantissa bits, the AVX-512
//!      kernel's) that the magnitude lies in rounded down and rounded up ([`e2m1_index`]):
//!      even at a bin's start (where the ties are), odd inside it. The 32 sums narrow with
//!      saturation to bytes (below 0.25: 0) and read their magnitude codes from a 48-entry
//!      table (three `vpshufb`, two blends) made from the AVX-512 kernel's [`e2m1_table`], so
//!      each flavour's tie rule is still the scalar definition's. The sign bytes (GPU: the
//!      sign bit, with NaN taken as +∞, code 7; CPU: `x < −0.25`, so that magnitudes coding
//!      to 0 stay unsigned) narrow alongside and add 8. Pairs pack by `vpmaddubsw`
//!      (`c₀ + 16·c₁`) for elements in order, by a shift and OR for bf16's even and odd ones.
//!    - E4M3: MLX CPU's integer `ToFP8` in 8 lanes ([`e4m3`]), narrowed by saturating packs.
//!      x is never NaN here (those groups were redone), where alone the flavours differ.
//!
//!    Each chunk's 32 elements are 4 vectors ([`load4`]): in order for f32 and f16, and for
//!    bf16 the even and odd elements of each 16 (one 32-byte load, a shift and a mask, as
//!    `x86_quant`'s `load32` does with 64 bytes). The input is prefetched 4 KiB ahead into L2,
//!    line by line, as in the AVX-512 kernel (docs/perf.md, session 33).
//!
//! **Dequantize**, 16 elements at a time: E2M1 nibbles are split and interleaved into element
//! order, widened to dwords, and read by `vpermps` from the 8 magnitudes (the sign is bit 3,
//! moved to bit 31); E4M3 codes become f32 bits whose value times 2¹²⁰ is the element's
//! ([`e4m3_decode`]). Each group's scale comes from the AVX-512 kernel's table of 256 values
//! ([`scale_table`]); the f32 product is rounded once to the output dtype.

use super::dequantize::{DequantizeArgs, DequantizeFn};
use super::quantize::{fp_group, fp_mode, QuantizeArgs, QuantizeFn};
use super::x86_avx2::available;
use super::x86_columns::PrefetchTo;
use super::x86_fp_quant::{
    check_group, dequantize_tasks, e2m1_table, per_mode, quantize_tasks, scale_table, shape, BIN0,
};
use super::{KernelFn, Variant};
use crate::dtype::{DType, Float};
use crate::error::{Error, Result};
use crate::quant::{fp, Flavour, QuantMode};
use crate::registry::OpKind;
use std::arch::x86_64::*;

/// The variant: quantize and dequantize in every FP mode, flavour and float dtype, on CPUs
/// with AVX2, FMA and F16C (listed after the AVX-512 kernels, which take these keys where
/// they run).
pub(crate) const FP_QUANT_AVX2: Variant = Variant {
    name: "avx2",
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
/// Groups per parallel quantize task (a multiple of 8).
const TASK_GROUPS: usize = 1024;
/// Groups per parallel dequantize task.
const DEQ_TASK_GROUPS: usize = 512;
/// Rounding of the f16 conversions (F16C's 3-bit immediate): nearest-even.
const RNE: i32 = _MM_FROUND_TO_NEAREST_INT;
/// Lane order of [`reduce8`]'s last level and of 8-lane narrowings: dwords 0, 4, 1, 5, ….
const INTERLEAVE: [i32; 8] = [0, 4, 1, 5, 2, 6, 3, 7];

/// The checks every kernel of this module starts with (the CPU's features, `mode`'s group
/// size); `mode`'s element bits and group size.
fn entry(op: &'static str, mode: QuantMode, group_size: usize) -> Result<(usize, usize)> {
    if !available() {
        return Err(Error::unsupported(
            op,
            "the avx2 kernels on a CPU without AVX2, FMA and F16C",
        ));
    }
    check_group(op, mode, group_size)
}

/// The quantize kernel for input dtype `dtype` in `mode`.
fn quantize_kernel(dtype: DType, mode: QuantMode) -> Option<QuantizeFn> {
    crate::with_float_type!(dtype, T => per_mode(mode, [
        quantize::<T, 1> as QuantizeFn,
        quantize::<T, 2>,
        quantize::<T, 3>,
    ]), _ => None)
}

/// The E2M1 table of pass 3 as three 16-entry `vpshufb` tables: entry `i` is the code of
/// [`e2m1_index`] `i`, the AVX-512 kernel's [`e2m1_table`] entry `i + 2` (index 40 and beyond,
/// 8 and above, that table's last entry, code 7).
fn e2m1_tables(flavour: Flavour) -> [[u8; 16]; 3] {
    let t = e2m1_table(flavour);
    std::array::from_fn(|k| std::array::from_fn(|i| t[(16 * k + i + 2).min(43)]))
}

/// The kernel: tasks of [`TASK_GROUPS`] groups in parallel.
fn quantize<T: Float, const MODE: u8>(a: QuantizeArgs<'_>) -> Result<()> {
    const OP: &str = "quantize";
    let shape = entry(OP, fp_mode(MODE), a.group_size)?;
    let flavour = a.flavour;
    let tables = e2m1_tables(flavour);
    quantize_tasks::<T>(OP, a, shape, TASK_GROUPS, |w, packed, scales| {
        // SAFETY: `available()` holds (checked above); `quantize_groups` checks that the
        // slices agree (they do by construction: equal numbers of groups per task).
        unsafe {
            match flavour {
                Flavour::Gpu => quantize_groups::<T, MODE, true>(w, packed, scales, &tables),
                Flavour::Cpu => quantize_groups::<T, MODE, false>(w, packed, scales, &tables),
            }
        }
    })
}

/// Quantizes the groups of one task, 8 at a time; the groups [`batch`] marks and a last
/// partial batch through the definition. Does nothing if the slice lengths disagree (they
/// never do; the check keeps the raw accesses in bounds).
///
/// # Safety
/// The CPU must support [`available`]'s features.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quantize_groups<T: Float, const MODE: u8, const GPU: bool>(
    w: &[T],
    packed: &mut [u8],
    scales: &mut [u8],
    tables: &[[u8; 16]; 3],
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
    // SAFETY: 16 bytes each.
    let t = tables.map(|t| unsafe {
        _mm256_broadcastsi128_si256(_mm_loadu_si128(t.as_ptr() as *const __m128i))
    });
    let full = groups / 8 * 8;
    for b0 in (0..full).step_by(8) {
        // SAFETY: groups b0..b0 + 8 lie within the slices (b0 + 8 ≤ full ≤ groups, and the
        // lengths were checked above); the CPU features are this function's contract.
        let mut redo = unsafe {
            batch::<T, MODE, GPU>(
                w.as_ptr().add(b0 * g),
                packed.as_mut_ptr().add(b0 * gb),
                scales.as_mut_ptr().add(b0),
                &t,
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

/// One batch of 8 groups: the three passes of the module docs, pass 3 over chunks of 32
/// elements (one mx group, or two nvfp4 groups) read by [`load4`]. Returns the groups (bit
/// `j` for group `j`) that the definition must redo.
///
/// # Safety
/// `w` must be valid for reading 8 groups, `packed` for writing their codes and `scales`
/// their 8 scale codes; the CPU must support [`available`]'s features.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn batch<T: Float, const MODE: u8, const GPU: bool>(
    w: *const T,
    packed: *mut u8,
    scales: *mut u8,
    t: &[__m256i; 3],
) -> u32 {
    let mode = fp_mode(MODE);
    let (bits, g) = shape(mode);
    let pairs = T::DTYPE == DType::BF16;
    // Pass 1: the groups' amax, lane j for group j.
    let mut m = [_mm256_setzero_si256(); 8];
    for (j, mj) in m.iter_mut().enumerate() {
        // SAFETY: group j's g elements lie within the batch (contract).
        *mj = unsafe { magnitude_max::<T>(w.add(j * g), g) };
    }
    let amax = amax_f32::<T>(reduce8(&m));
    // Pass 2: the scales.
    let (codes, factor, redo) = scales8::<T, MODE, GPU>(amax);
    let (mut c, mut f) = ([0u32; 8], [0f32; 8]);
    // SAFETY: `c` and `f` hold 8 lanes each; 8 scale codes are writable at `scales`.
    unsafe {
        _mm256_storeu_si256(c.as_mut_ptr() as *mut __m256i, codes);
        _mm256_storeu_ps(f.as_mut_ptr(), factor);
        for (j, &cj) in c.iter().enumerate() {
            *scales.add(j) = cj as u8;
        }
    }
    // Pass 3: the elements' codes, 4·bits bytes per chunk of 32.
    let chunk_bytes = 32 * std::mem::size_of::<T>();
    for ch in 0..g / 4 {
        // Vectors 0–1 hold the chunk's first 16 elements (in order, or bf16's even and odd
        // elements of them), 2–3 the next 16: for nvfp4, two groups.
        let (fa, fb) = if g == 32 {
            (f[ch], f[ch])
        } else {
            (f[2 * ch], f[2 * ch + 1])
        };
        let fv = [fa, fa, fb, fb].map(|v| _mm256_set1_ps(v));
        // The input PREFETCH_BYTES on, line by line: a task's stream crosses a page every
        // few batches, where the hardware prefetcher starts over.
        for l in (0..chunk_bytes).step_by(64) {
            let at = ch * chunk_bytes + l + PREFETCH_BYTES;
            PrefetchTo::L2.prefetch((w as *const u8).wrapping_add(at));
        }
        // SAFETY: chunk ch's 32 input elements and 4·bits output bytes lie within the batch
        // (contract).
        unsafe {
            let v = load4::<T>(w.add(32 * ch));
            let x: [__m256; 4] = std::array::from_fn(|i| {
                if GPU || mode != QuantMode::Nvfp4 {
                    _mm256_mul_ps(v[i], fv[i])
                } else {
                    to_dtype::<T, true>(_mm256_div_ps(v[i], fv[i]))
                }
            });
            let out = packed.add(4 * bits * ch);
            match (bits, pairs) {
                (8, true) => store_e4m3::<true>(x, out),
                (8, false) => store_e4m3::<false>(x, out),
                (_, true) => store_e2m1::<GPU, true>(x, t, out),
                (_, false) => store_e2m1::<GPU, false>(x, t, out),
            }
        }
    }
    redo
}

/// The larger of each dword lane's partial maxima of `|w|`'s bits over the `n` elements of
/// one group at `p` (`n` a multiple of 16): f32 bits for f32, the 16-bit bits for f16 and
/// bf16 (each dword's low half; the high half 0).
///
/// # Safety
/// `n` elements must be readable at `p`; the CPU must support [`available`]'s features.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn magnitude_max<T: Float>(p: *const T, n: usize) -> __m256i {
    let mut m = _mm256_setzero_si256();
    // SAFETY (both loops): the loads read elements i..i + 8 (or 16) < n (contract).
    if T::DTYPE == DType::F32 {
        let abs = _mm256_set1_epi32(0x7fff_ffff);
        for i in (0..n).step_by(8) {
            let v = unsafe { _mm256_loadu_si256(p.add(i) as *const __m256i) };
            m = _mm256_max_epi32(m, _mm256_and_si256(v, abs));
        }
        m
    } else {
        let abs = _mm256_set1_epi16(0x7fff);
        for i in (0..n).step_by(16) {
            let v = unsafe { _mm256_loadu_si256(p.add(i) as *const __m256i) };
            m = _mm256_max_epu16(m, _mm256_and_si256(v, abs));
        }
        // The larger half of each dword into its low half, the high half cleared.
        _mm256_and_si256(
            _mm256_max_epu16(m, _mm256_srli_epi32::<16>(m)),
            _mm256_set1_epi32(0xffff),
        )
    }
}

/// Lane `j` = the largest of the 8 dword lanes of `m[j]` (signed: every lane here is a
/// magnitude's bits, at most `0x7fff_ffff`): a tree of shuffles that halves the lanes per
/// group and doubles the groups per vector at each level.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn reduce8(m: &[__m256i; 8]) -> __m256i {
    // Level 1: 128-bit lane 0 of q[k] holds group 2k's four partial maxima, lane 1 2k + 1's.
    let q: [__m256i; 4] = std::array::from_fn(|k| {
        let (a, b) = (m[2 * k], m[2 * k + 1]);
        _mm256_max_epi32(
            _mm256_permute2x128_si256::<0x20>(a, b),
            _mm256_permute2x128_si256::<0x31>(a, b),
        )
    });
    // Level 2: lane 0 of r[k] holds groups 4k and 4k + 2 (two each), lane 1 4k + 1 and 4k + 3.
    let r: [__m256i; 2] = std::array::from_fn(|k| {
        let (a, b) = (q[2 * k], q[2 * k + 1]);
        _mm256_max_epi32(_mm256_unpacklo_epi64(a, b), _mm256_unpackhi_epi64(a, b))
    });
    // Level 3: groups 0, 2, 4, 6 in lane 0, 1, 3, 5, 7 in lane 1; then in order.
    let (a, b) = (_mm256_castsi256_ps(r[0]), _mm256_castsi256_ps(r[1]));
    let s = _mm256_max_epi32(
        _mm256_castps_si256(_mm256_shuffle_ps::<0x88>(a, b)),
        _mm256_castps_si256(_mm256_shuffle_ps::<0xDD>(a, b)),
    );
    // SAFETY: 8 i32.
    let order = unsafe { _mm256_loadu_si256(INTERLEAVE.as_ptr() as *const __m256i) };
    _mm256_permutevar8x32_epi32(s, order)
}

/// The amax of [`reduce8`]'s bits as f32 (exact; NaN stays NaN).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn amax_f32<T: Float>(m: __m256i) -> __m256 {
    match T::DTYPE {
        DType::F16 => _mm256_cvtph_ps(_mm_packus_epi32(
            _mm256_castsi256_si128(m),
            _mm256_extracti128_si256::<1>(m),
        )),
        DType::BF16 => _mm256_castsi256_ps(_mm256_slli_epi32::<16>(m)),
        _ => _mm256_castsi256_ps(m),
    }
}

/// Pass 2 for 8 groups' `amax` (lane `j` for group `j`): the scale codes (one per dword),
/// the factor (GPU, CPU mx) or divisor (CPU nvfp4) of pass 3, and the lanes the definition
/// must redo (bit `j` for lane `j`).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn scales8<T: Float, const MODE: u8, const GPU: bool>(amax: __m256) -> (__m256i, __m256, u32) {
    let mode = fp_mode(MODE);
    let mask = |v: __m256i| _mm256_movemask_ps(_mm256_castsi256_ps(v)) as u32;
    // NaN (a group holding NaN) and ∞.
    let not_finite = mask(_mm256_cmpgt_epi32(
        _mm256_castps_si256(amax),
        _mm256_set1_epi32(0x7f7f_ffff),
    ));
    let max = if mode == QuantMode::Mxfp8 {
        fp::E4M3_MAX
    } else {
        fp::E2M1_MAX
    };
    let s = _mm256_div_ps(amax, _mm256_set1_ps(max));
    let one = _mm256_set1_ps(1.0);
    if GPU {
        let (c, value) = if mode == QuantMode::Nvfp4 {
            let c = e4m3(s);
            (c, e4m3_decode(c))
        } else {
            let c = e8m0_up(s);
            (c, e8m0_value(c))
        };
        return (c, _mm256_div_ps(one, value), not_finite);
    }
    let s = to_dtype::<T, true>(s);
    if mode == QuantMode::Nvfp4 {
        let c = e4m3(s);
        // A saturated scale (s ≥ 464, 448 after rounding) leaves |x| unbounded, where the
        // definition's argmin ties every candidate: those groups are redone.
        let saturated =
            _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_NLT_UQ>(s, _mm256_set1_ps(464.0))) as u32;
        let d = e4m3_decode(c);
        let d = _mm256_blendv_ps(
            d,
            _mm256_set1_ps(f32::INFINITY),
            _mm256_cmp_ps::<_CMP_EQ_OQ>(d, _mm256_setzero_ps()),
        );
        return (c, d, not_finite | saturated);
    }
    // mx on the CPU: e = ceil(log2 s) from the bits of s (s ≥ +0): the exponent, plus 1
    // where the mantissa is not 0.
    let bits = _mm256_castps_si256(s);
    let zero = _mm256_setzero_si256();
    let exp = _mm256_srli_epi32::<23>(bits);
    let mant = _mm256_and_si256(bits, _mm256_set1_epi32(0x7f_ffff));
    let exact = _mm256_cmpeq_epi32(mant, zero);
    let e = _mm256_add_epi32(_mm256_sub_epi32(exp, _mm256_set1_epi32(126)), exact);
    let e = _mm256_andnot_si256(_mm256_cmpeq_epi32(bits, zero), e);
    // Where `T(2^e)` is exact and 2^−e a normal f32: f16 holds 2^-24 … 2^15; f32 and bf16
    // scales give e ≤ 126 (a normal s has e ≥ -126).
    let e_max = if T::DTYPE == DType::F16 { 15 } else { 126 };
    let redo = _mm256_or_si256(
        _mm256_or_si256(
            _mm256_andnot_si256(exact, _mm256_cmpeq_epi32(exp, zero)),
            _mm256_cmpeq_epi32(exp, _mm256_set1_epi32(255)),
        ),
        _mm256_or_si256(
            _mm256_andnot_si256(exact, _mm256_cmpgt_epi32(_mm256_set1_epi32(1 << 13), mant)),
            _mm256_cmpgt_epi32(e, _mm256_set1_epi32(e_max)),
        ),
    );
    let code = _mm256_and_si256(
        _mm256_add_epi32(e, _mm256_set1_epi32(127)),
        _mm256_set1_epi32(0xff),
    );
    let factor = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_sub_epi32(
        _mm256_set1_epi32(127),
        e,
    )));
    (code, factor, not_finite | mask(redo))
}

/// E8M0 codes of finite `s ≥ +0` rounded up ([`fp::e8m0_from_f32_gpu`]): the exponent, plus 1
/// where the mantissa is not 0 (unless the exponent is 254, which saturates, or a subnormal at
/// most 2⁻¹²⁷).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn e8m0_up(s: __m256) -> __m256i {
    let bits = _mm256_castps_si256(s);
    let exp = _mm256_srli_epi32::<23>(bits);
    let mant = _mm256_and_si256(bits, _mm256_set1_epi32(0x7f_ffff));
    let zero = _mm256_setzero_si256();
    let keep = _mm256_or_si256(
        _mm256_or_si256(
            _mm256_cmpeq_epi32(mant, zero),
            _mm256_cmpeq_epi32(exp, _mm256_set1_epi32(0xfe)),
        ),
        _mm256_andnot_si256(
            _mm256_cmpgt_epi32(mant, _mm256_set1_epi32(0x40_0000)),
            _mm256_cmpeq_epi32(exp, zero),
        ),
    );
    _mm256_add_epi32(exp, _mm256_andnot_si256(keep, _mm256_set1_epi32(1)))
}

/// The GPU's value of E8M0 codes below `0xff` (all [`e8m0_up`] makes): `2^(c − 127)`, code 0
/// the subnormal 2⁻¹²⁷.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn e8m0_value(c: __m256i) -> __m256 {
    let v = _mm256_blendv_epi8(
        _mm256_slli_epi32::<23>(c),
        _mm256_set1_epi32(0x40_0000),
        _mm256_cmpeq_epi32(c, _mm256_setzero_si256()),
    );
    _mm256_castsi256_ps(v)
}

/// E4M3 codes of `x`, not NaN (one per dword): MLX CPU's `ToFP8` ([`fp::e4m3_from_f32_cpu`]),
/// nearest-even, saturating at ±448, which for every number is also the GPU's
/// ([`fp::e4m3_from_f32_gpu`]). Normal range: the bias difference, the rounding increment and
/// the odd bit added to the bits; a result past `0x7e` is exactly a saturating one (the
/// definition's 464 rounds to 448 either way), so one `vpminsd` saturates. Subnormal range:
/// adding 2¹⁴ rounds to a multiple of 2⁻⁹.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn e4m3(x: __m256) -> __m256i {
    let bits = _mm256_castps_si256(x);
    let sign = _mm256_and_si256(_mm256_srli_epi32::<24>(bits), _mm256_set1_epi32(0x80));
    let f = _mm256_and_si256(bits, _mm256_set1_epi32(0x7fff_ffff));
    let odd = _mm256_and_si256(_mm256_srli_epi32::<20>(f), _mm256_set1_epi32(1));
    let bias = ((7u32.wrapping_sub(127)) << 23).wrapping_add(0x7ffff) as i32;
    let normal = _mm256_srli_epi32::<20>(_mm256_add_epi32(
        _mm256_add_epi32(f, _mm256_set1_epi32(bias)),
        odd,
    ));
    let denorm = _mm256_set1_epi32(141 << 23);
    let sub = _mm256_sub_epi32(
        _mm256_castps_si256(_mm256_add_ps(
            _mm256_castsi256_ps(f),
            _mm256_castsi256_ps(denorm),
        )),
        denorm,
    );
    let r = _mm256_blendv_epi8(
        normal,
        sub,
        _mm256_cmpgt_epi32(_mm256_set1_epi32(121 << 23), f),
    );
    _mm256_or_si256(_mm256_min_epi32(r, _mm256_set1_epi32(0x7e)), sign)
}

/// Values of E4M3 codes (one per dword), `0x7f`/`0xff` NaN ([`fp::e4m3_to_f32`]): the code's
/// magnitude bits at bit 20 of an f32 and its sign at bit 31 make the value times 2⁻¹²⁰ (an
/// exponent field of 0 being f32's subnormal, as it is E4M3's), so one exact multiply
/// finishes it.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn e4m3_decode(c: __m256i) -> __m256 {
    let mag = _mm256_and_si256(c, _mm256_set1_epi32(0x7f));
    let sign = _mm256_slli_epi32::<24>(_mm256_and_si256(c, _mm256_set1_epi32(0x80)));
    let v = _mm256_mul_ps(
        _mm256_castsi256_ps(_mm256_or_si256(_mm256_slli_epi32::<20>(mag), sign)),
        _mm256_set1_ps(f32::from_bits((120 + 127) << 23)),
    );
    _mm256_blendv_ps(
        v,
        _mm256_set1_ps(f32::NAN),
        _mm256_castsi256_ps(_mm256_cmpeq_epi32(mag, _mm256_set1_epi32(0x7f))),
    )
}

/// `v` rounded to bf16 (`half`'s nearest-even: `+ 0x7fff + lsb`, then the high half; NaN kept
/// NaN with the quiet bit set), as f32 bits whose low half is to be dropped. Without `NAN` the
/// caller vouches that no lane is NaN (±∞ round to themselves either way) and the NaN blend is
/// skipped.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn bf16_round<const NAN: bool>(v: __m256) -> __m256i {
    let x = _mm256_castps_si256(v);
    let lsb = _mm256_and_si256(_mm256_srli_epi32::<16>(x), _mm256_set1_epi32(1));
    let r = _mm256_add_epi32(x, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
    if !NAN {
        return r;
    }
    let nan = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_UNORD_Q>(v, v));
    _mm256_blendv_epi8(r, _mm256_or_si256(x, _mm256_set1_epi32(0x0040_0000)), nan)
}

/// `v` rounded to `T` and widened back (exact for f32). Without `NAN`, no lane may be NaN
/// ([`bf16_round`]).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn to_dtype<T: Float, const NAN: bool>(v: __m256) -> __m256 {
    match T::DTYPE {
        DType::F16 => _mm256_cvtph_ps(_mm256_cvtps_ph::<RNE>(v)),
        DType::BF16 => _mm256_castsi256_ps(_mm256_and_si256(
            bf16_round::<NAN>(v),
            _mm256_set1_epi32(0xffff_0000u32 as i32),
        )),
        _ => v,
    }
}

/// Loads 32 elements of `T` at `p`, widened exactly to f32, as 4 vectors: elements 0–7, 8–15,
/// 16–23, 24–31, or for bf16 the even and the odd elements of 0–15, then of 16–31 (bf16 is
/// the high half of an f32: the even element is a dword's low half).
///
/// # Safety
/// 32 elements must be readable at `p`; the CPU must support [`available`]'s features.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load4<T: Float>(p: *const T) -> [__m256; 4] {
    // SAFETY: 32 elements readable at `p` (contract); the casts match T's dtype.
    unsafe {
        match T::DTYPE {
            DType::F16 => std::array::from_fn(|i| {
                _mm256_cvtph_ps(_mm_loadu_si128((p as *const __m128i).add(i)))
            }),
            DType::BF16 => {
                let hi = _mm256_set1_epi32(0xffff_0000u32 as i32);
                let x = _mm256_loadu_si256(p as *const __m256i);
                let y = _mm256_loadu_si256((p as *const __m256i).add(1));
                [
                    _mm256_slli_epi32::<16>(x),
                    _mm256_and_si256(x, hi),
                    _mm256_slli_epi32::<16>(y),
                    _mm256_and_si256(y, hi),
                ]
                .map(|v| _mm256_castsi256_ps(v))
            }
            _ => std::array::from_fn(|i| _mm256_loadu_ps((p as *const f32).add(8 * i))),
        }
    }
}

/// E2M1 index of each lane of `x` (module docs): `⌊b⌋ + ⌈b⌉` for `b` the position of `|x|`
/// among the bins of [`e2m1_table`] (bin `i` starts at `BIN0 + i·2²¹` in f32 bits); below
/// 0.25 negative, ∞ and NaN large.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn e2m1_index(x: __m256) -> __m256i {
    let a = _mm256_and_si256(_mm256_castps_si256(x), _mm256_set1_epi32(0x7fff_ffff));
    let down = _mm256_srai_epi32::<21>(_mm256_sub_epi32(a, _mm256_set1_epi32(BIN0 as i32)));
    let up = _mm256_srai_epi32::<21>(_mm256_add_epi32(
        a,
        _mm256_set1_epi32(0x1f_ffff - BIN0 as i32),
    ));
    _mm256_add_epi32(down, up)
}

/// Where each lane of `x` gets E2M1's sign bit (all ones) or not (0): GPU the sign bit, NaN
/// read as +∞ (`vminps` returns its second operand for NaN); CPU where `x < −0.25`, the
/// negative values whose magnitude code is not 0.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn e2m1_sign<const GPU: bool>(x: __m256) -> __m256i {
    if GPU {
        let x = _mm256_min_ps(x, _mm256_set1_ps(f32::INFINITY));
        _mm256_srai_epi32::<31>(_mm256_castps_si256(x))
    } else {
        _mm256_castps_si256(_mm256_cmp_ps::<_CMP_LT_OQ>(x, _mm256_set1_ps(-0.25)))
    }
}

/// The magnitude codes of 32 E2M1 indices (bytes, saturated at 0 and 255) from the tables of
/// [`e2m1_tables`]: bit 4 of the index picks the second table over the first, bit 5 the
/// third (indices clamped to 47).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn e2m1_lookup(i: __m256i, t: &[__m256i; 3]) -> __m256i {
    let i = _mm256_min_epu8(i, _mm256_set1_epi8(47));
    let (a, b, c) = (
        _mm256_shuffle_epi8(t[0], i),
        _mm256_shuffle_epi8(t[1], i),
        _mm256_shuffle_epi8(t[2], i),
    );
    let ab = _mm256_blendv_epi8(a, b, _mm256_slli_epi16::<3>(i));
    _mm256_blendv_epi8(ab, c, _mm256_slli_epi16::<2>(i))
}

/// Stores the E2M1 codes of one chunk's 32 values `x` ([`load4`]'s vectors: in order, or with
/// `PAIRS` bf16's even and odd elements) as 16 bytes at `out`, element `2i` in the low nibble
/// of byte `i`.
///
/// # Safety
/// 16 bytes must be writable at `out`; the CPU must support [`available`]'s features.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn store_e2m1<const GPU: bool, const PAIRS: bool>(
    x: [__m256; 4],
    t: &[__m256i; 3],
    out: *mut u8,
) {
    let idx = x.map(|v| e2m1_index(v));
    let sign = x.map(|v| e2m1_sign::<GPU>(v));
    // In order, 128-bit lane 0 of the bytes holds elements 0–3, 8–11, 16–19, 24–27 and lane
    // 1 the others; with PAIRS, lane 0 holds even elements 0–6 and 16–22, then the odd
    // elements beside them, lane 1 the rest.
    let [a, b, c, d] = if PAIRS { [0, 2, 1, 3] } else { [0, 1, 2, 3] };
    let narrow = |v: [__m256i; 4], signed: bool| {
        let (lo, hi) = (
            _mm256_packs_epi32(v[a], v[b]),
            _mm256_packs_epi32(v[c], v[d]),
        );
        if signed {
            _mm256_packs_epi16(lo, hi)
        } else {
            _mm256_packus_epi16(lo, hi)
        }
    };
    let codes = _mm256_or_si256(
        e2m1_lookup(narrow(idx, false), t),
        _mm256_and_si256(narrow(sign, true), _mm256_set1_epi8(8)),
    );
    let bytes = if PAIRS {
        // Each lane's odd elements (bytes 8–15) into the high nibbles of its even ones.
        let p = _mm256_or_si256(codes, _mm256_slli_epi16::<4>(_mm256_srli_si256::<8>(codes)));
        _mm_unpacklo_epi32(_mm256_castsi256_si128(p), _mm256_extracti128_si256::<1>(p))
    } else {
        // Adjacent bytes are consecutive elements: c₀ + 16·c₁ per word, then the 16-bit
        // pairs of the two lanes interleaved back into order.
        let w = _mm256_maddubs_epi16(codes, _mm256_set1_epi16(0x1001));
        let p = _mm256_packus_epi16(w, w);
        _mm_unpacklo_epi16(_mm256_castsi256_si128(p), _mm256_extracti128_si256::<1>(p))
    };
    // SAFETY: 16 bytes writable at `out` (contract).
    unsafe { _mm_storeu_si128(out as *mut __m128i, bytes) };
}

/// Stores the E4M3 codes of one chunk's 32 values `x` ([`load4`]'s vectors: in order, or
/// with `PAIRS` bf16's even and odd elements) as 32 bytes at `out`, in element order.
///
/// # Safety
/// 32 bytes must be writable at `out`; the CPU must support [`available`]'s features.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn store_e4m3<const PAIRS: bool>(x: [__m256; 4], out: *mut u8) {
    let c = x.map(|v| e4m3(v));
    let bytes = if PAIRS {
        // Even and odd codes side by side in each dword's low 16 bits; narrowed, 64-bit
        // lanes 0, 2, 1, 3 are in order.
        let w0 = _mm256_or_si256(c[0], _mm256_slli_epi32::<8>(c[1]));
        let w1 = _mm256_or_si256(c[2], _mm256_slli_epi32::<8>(c[3]));
        _mm256_permute4x64_epi64::<0xD8>(_mm256_packus_epi32(w0, w1))
    } else {
        let p = _mm256_packus_epi16(
            _mm256_packus_epi32(c[0], c[1]),
            _mm256_packus_epi32(c[2], c[3]),
        );
        // SAFETY: 8 i32.
        let order = unsafe { _mm256_loadu_si256(INTERLEAVE.as_ptr() as *const __m256i) };
        _mm256_permutevar8x32_epi32(p, order)
    };
    // SAFETY: 32 bytes writable at `out` (contract).
    unsafe { _mm256_storeu_si256(out as *mut __m256i, bytes) };
}

// ---------------------------------------------------------------------------------------------
// Dequantize.

/// The dequantize kernel for output dtype `out` in `mode`.
fn dequantize_kernel(out: DType, mode: QuantMode) -> Option<DequantizeFn> {
    crate::with_float_type!(out, O => per_mode(mode, [
        dequantize::<O, 1> as DequantizeFn,
        dequantize::<O, 2>,
        dequantize::<O, 3>,
    ]), _ => None)
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
#[target_feature(enable = "avx2,fma,f16c")]
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
    // SAFETY: the first 8 of 16 f32: the non-negative values.
    let lut = unsafe { _mm256_loadu_ps(fp::FP4_LUT.as_ptr()) };
    let (pp, po) = (packed.as_ptr(), out.as_mut_ptr());
    for (i, &s) in
        (0..groups * g / 16).zip(scales.iter().flat_map(|s| std::iter::repeat_n(s, g / 16)))
    {
        let s = _mm256_set1_ps(table[usize::from(s)]);
        // SAFETY: step i's codes (16·bits/8 bytes at 16·bits/8·i) and outputs (16 at 16i)
        // lie within `packed` and `out` (lengths checked above).
        unsafe {
            let (lo, hi) = if bits == 4 {
                let b = _mm_loadl_epi64(pp.add(8 * i) as *const __m128i);
                let low = _mm_set1_epi8(0x0f);
                let nibbles = _mm_unpacklo_epi8(
                    _mm_and_si128(b, low),
                    _mm_and_si128(_mm_srli_epi16::<4>(b), low),
                );
                (
                    e2m1_decode(_mm256_cvtepu8_epi32(nibbles), lut),
                    e2m1_decode(_mm256_cvtepu8_epi32(_mm_srli_si128::<8>(nibbles)), lut),
                )
            } else {
                let b = _mm_loadu_si128(pp.add(16 * i) as *const __m128i);
                (
                    e4m3_decode(_mm256_cvtepu8_epi32(b)),
                    e4m3_decode(_mm256_cvtepu8_epi32(_mm_srli_si128::<8>(b))),
                )
            };
            store16::<O, true>(po.add(16 * i), _mm256_mul_ps(lo, s), _mm256_mul_ps(hi, s));
        }
    }
}

/// Values of E2M1 codes (0–15, one per dword): the magnitude from `lut` (the 8 non-negative
/// values; `vpermps` reads the low 3 bits), the sign from bit 3.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn e2m1_decode(c: __m256i, lut: __m256) -> __m256 {
    let sign = _mm256_and_si256(_mm256_slli_epi32::<28>(c), _mm256_set1_epi32(i32::MIN));
    _mm256_or_ps(_mm256_permutevar8x32_ps(lut, c), _mm256_castsi256_ps(sign))
}

/// Stores 16 values (`lo` then `hi`) rounded to `O` (nearest-even, as `O::from_f32`) at `p`.
/// Without `NAN` the caller vouches that no value is NaN ([`bf16_round`]).
///
/// # Safety
/// 16 elements of `O` must be writable at `p`; the CPU must support [`available`]'s features.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn store16<O: Float, const NAN: bool>(p: *mut O, lo: __m256, hi: __m256) {
    // SAFETY: 16 elements writable at `p` (contract).
    unsafe {
        match O::DTYPE {
            DType::F16 => {
                _mm_storeu_si128(p as *mut __m128i, _mm256_cvtps_ph::<RNE>(lo));
                _mm_storeu_si128((p as *mut __m128i).add(1), _mm256_cvtps_ph::<RNE>(hi));
            }
            DType::BF16 => {
                let (a, b) = (
                    _mm256_srli_epi32::<16>(bf16_round::<NAN>(lo)),
                    _mm256_srli_epi32::<16>(bf16_round::<NAN>(hi)),
                );
                _mm256_storeu_si256(
                    p as *mut __m256i,
                    _mm256_permute4x64_epi64::<0xD8>(_mm256_packus_epi32(a, b)),
                );
            }
            _ => {
                _mm256_storeu_ps(p as *mut f32, lo);
                _mm256_storeu_ps((p as *mut f32).add(8), hi);
            }
        }
    }
}

/// Stores the 8 values of `v` rounded to `O` (nearest-even, as `O::from_f32`) at `p`.
/// Without `NAN` the caller vouches that no value is NaN ([`bf16_round`]).
///
/// # Safety
/// 8 elements of `O` must be writable at `p`; the CPU must support [`available`]'s features.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn store8<O: Float, const NAN: bool>(p: *mut O, v: __m256) {
    // SAFETY: 8 elements writable at `p` (contract).
    unsafe {
        match O::DTYPE {
            DType::F16 => _mm_storeu_si128(p as *mut __m128i, _mm256_cvtps_ph::<RNE>(v)),
            DType::BF16 => {
                let a = _mm256_srli_epi32::<16>(bf16_round::<NAN>(v));
                let w = _mm256_permute4x64_epi64::<0xD8>(_mm256_packus_epi32(a, a));
                _mm_storeu_si128(p as *mut __m128i, _mm256_castsi256_si128(w));
            }
            _ => _mm256_storeu_ps(p as *mut f32, v),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::MatrixRef;

    /// Magnitudes every table entry and bin edge of pass 3 turns on (each bin's start and its
    /// neighbours), powers of two over f32's range with several mantissas, ±0, ±∞, NaN; and
    /// each negated.
    fn sweep() -> Vec<f32> {
        let mut xs = vec![0.0f32, f32::INFINITY, f32::NAN, f32::MIN_POSITIVE, 1e-45];
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
        // E4M3's ties (halfway between codes) and their neighbours.
        for c in 0u8..0x7e {
            let mid = (fp::e4m3_to_f32(c) + fp::e4m3_to_f32(c + 1)) / 2.0;
            for d in [-1i32, 0, 1] {
                xs.push(f32::from_bits(mid.to_bits().wrapping_add_signed(d)));
            }
        }
        let neg: Vec<f32> = xs.iter().map(|x| -x).collect();
        xs.extend(neg);
        xs
    }

    /// Pass 3's E2M1 and E4M3 codes, through both layouts and both packings, equal the scalar
    /// definitions element by element, over [`sweep`]: all of it on the GPU flavour (E4M3
    /// but NaN, which never reaches pass 3), and on the CPU flavour the finite values below
    /// 64 (pass 3 sees |x| ≤ 9 there; beyond 2²² f32 distances tie every candidate of the
    /// definition's argmin).
    #[test]
    fn element_codes_match_the_definitions() {
        if !available() {
            eprintln!("skipped: no AVX2/FMA/F16C here");
            return;
        }
        let xs = sweep();
        for flavour in [Flavour::Cpu, Flavour::Gpu] {
            let gpu = flavour == Flavour::Gpu;
            let tables = e2m1_tables(flavour);
            for chunk in xs.chunks(32) {
                let mut v = [0f32; 32];
                v[..chunk.len()].copy_from_slice(chunk);
                for x in &mut v {
                    if !gpu && (x.is_nan() || x.abs() >= 64.0) {
                        *x = 0.0;
                    }
                }
                let e4 = |x: f32| {
                    if gpu {
                        fp::e4m3_from_f32_gpu(x)
                    } else {
                        fp::e4m3_from_f32_cpu(x)
                    }
                };
                let e2 = |x: f32| {
                    if gpu {
                        fp::e2m1_from_f32_gpu(x)
                    } else {
                        fp::e2m1_from_f32_cpu(x)
                    }
                };
                for pairs in [false, true] {
                    // The 4 vectors as `load4` makes them.
                    let lanes: [[f32; 8]; 4] = std::array::from_fn(|k| {
                        std::array::from_fn(|i| {
                            if pairs {
                                v[16 * (k / 2) + 2 * i + k % 2]
                            } else {
                                v[8 * k + i]
                            }
                        })
                    });
                    let (mut c4, mut c8) = ([0u8; 16], [0u8; 32]);
                    // SAFETY: features checked above; the arrays hold what the stores write.
                    unsafe {
                        let t = tables.map(|t| {
                            _mm256_broadcastsi128_si256(_mm_loadu_si128(
                                t.as_ptr() as *const __m128i
                            ))
                        });
                        let x = lanes.map(|l| _mm256_loadu_ps(l.as_ptr()));
                        match (gpu, pairs) {
                            (true, true) => store_e2m1::<true, true>(x, &t, c4.as_mut_ptr()),
                            (true, false) => store_e2m1::<true, false>(x, &t, c4.as_mut_ptr()),
                            (false, true) => store_e2m1::<false, true>(x, &t, c4.as_mut_ptr()),
                            (false, false) => store_e2m1::<false, false>(x, &t, c4.as_mut_ptr()),
                        }
                        let y = lanes.map(|l| {
                            _mm256_loadu_ps(l.map(|x| if x.is_nan() { 0.0 } else { x }).as_ptr())
                        });
                        if pairs {
                            store_e4m3::<true>(y, c8.as_mut_ptr());
                        } else {
                            store_e4m3::<false>(y, c8.as_mut_ptr());
                        }
                    }
                    for (i, &x) in v.iter().enumerate() {
                        let got4 = (c4[i / 2] >> (4 * (i % 2))) & 15;
                        assert_eq!(
                            got4,
                            e2(x),
                            "{flavour:?} pairs {pairs}: e2m1 of {x:e} ({:#x})",
                            x.to_bits()
                        );
                        if !x.is_nan() {
                            assert_eq!(
                                c8[i],
                                e4(x),
                                "{flavour:?} pairs {pairs}: e4m3 of {x:e} ({:#x})",
                                x.to_bits()
                            );
                        }
                    }
                }
            }
        }
    }

    /// The dequantize kernel writes every element of an output poisoned beforehand (all-ones
    /// bytes) with [`fp::dequantize_value`]'s value (any NaN for a NaN), for every mode,
    /// output dtype and flavour, every element code and every scale code, over groups in
    /// several tasks and a short last one.
    #[test]
    fn dequantize_matches_the_definition_into_a_poisoned_output() {
        if !available() {
            eprintln!("skipped: no AVX2/FMA/F16C here");
            return;
        }
        fn check<O: Float, const MODE: u8>(flavour: Flavour) {
            let mode = fp_mode(MODE);
            let (bits, g) = shape(mode);
            let groups = 3 * DEQ_TASK_GROUPS + 37;
            let packed: Vec<u8> = (0..groups * g * bits / 8)
                .map(|i| (i as u32).wrapping_mul(2_654_435_761).rotate_right(13) as u8)
                .collect();
            let scales: Vec<u8> = (0..groups).map(|j| (j * 7 % 256) as u8).collect();
            // All-ones bytes, in words so that the bytes are aligned for `O`.
            let mut words = vec![u32::MAX; groups * g * std::mem::size_of::<O>() / 4];
            let out: &mut [u8] = bytemuck::cast_slice_mut(&mut words);
            let w = MatrixRef {
                packed: &packed,
                scales: &scales,
                biases: &[],
                rows: groups,
                cols: g,
                group_size: g,
                bits: bits as u32,
            };
            let r = dequantize::<O, MODE>(DequantizeArgs { w, flavour, out });
            assert!(r.is_ok(), "{r:?}");
            let got: &[O] = bytemuck::cast_slice(&words);
            for (i, o) in got.iter().enumerate() {
                let c = if bits == 8 {
                    packed[i]
                } else {
                    (packed[i / 2] >> (4 * (i % 2))) & 15
                };
                let want: O = fp::dequantize_value(c, scales[i / g], mode, flavour);
                let (a, b) = (want.to_f32(), o.to_f32());
                assert!(
                    a.to_bits() == b.to_bits() || a.is_nan() && b.is_nan(),
                    "{mode} {flavour:?} {}: element {i} (code {c}, scale {}): want {a:e} got {b:e}",
                    O::DTYPE,
                    scales[i / g]
                );
            }
        }
        for flavour in [Flavour::Cpu, Flavour::Gpu] {
            check::<f32, 1>(flavour);
            check::<f32, 2>(flavour);
            check::<f32, 3>(flavour);
            check::<half::f16, 1>(flavour);
            check::<half::f16, 2>(flavour);
            check::<half::f16, 3>(flavour);
            check::<half::bf16, 1>(flavour);
            check::<half::bf16, 2>(flavour);
            check::<half::bf16, 3>(flavour);
        }
    }
}
