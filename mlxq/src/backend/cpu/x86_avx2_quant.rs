//! Affine quantize on AVX2 and FMA (the `avx2` variant), bit-identical to
//! [`quantize_group`](crate::quant::affine::quantize_group) and so to MLX, in both flavours.
//!
//! Per group of 32, 64 or 128 values, 8 lanes at a time:
//! 1. Widen to f32 into an L1 scratch array, keeping lane-wise minima and maxima.
//!    `vminps v, mn` is `v < mn ? v : mn`, the scalar loop's strict comparison lane by lane
//!    (NaN never replaces), so the group's extremes are the scalar loop's values whatever
//!    the lane order, except for the sign of a zero extreme (of +0 and −0, the scalar loop
//!    keeps the first): groups whose minimum or maximum is zero, or not finite, are redone
//!    by `quantize_group` itself.
//! 2. Scale and bias by [`group_params`], the definition's own scalar code.
//! 3. Codes with MLX's true division, `round((w − b) / s)` (`vdivps` is exact IEEE, as the
//!    scalar `/`), rounded the flavour's way (ties to even by `vroundps`; away from zero as
//!    `trunc` plus one step where the dropped fraction is at least ½, exact), clamped to
//!    `[0, n]` (`vmaxps` against 0 first, so NaN becomes 0 as `NaN as u8` does), then
//!    narrowed to bytes and packed by [`pack8`].
//!
//! Division bounds the throughput (one `vdivps` per 8 values), which is still above this
//! class of machine's memory bandwidth per core: see docs/perf.md.

use super::quantize::{QuantizeArgs, QuantizeFn};
use super::x86_avx2::widen8;
use super::{cast, cast_mut};
use crate::dtype::{DType, Float};
use crate::error::{Error, Result};
use crate::quant::affine::{group_params, quantize_group};
use crate::quant::pack::{dispatch_bits, pack8};
use crate::quant::Flavour;
use rayon::prelude::*;
use std::arch::x86_64::*;

/// Largest group size.
const MAX_G: usize = 128;
/// Groups per parallel task.
const TASK_GROUPS: usize = 512;

/// Whether this kernel takes groups of `g` values.
pub(crate) fn supports_group(g: usize) -> bool {
    matches!(g, 32 | 64 | 128)
}

/// The quantize kernel for input dtype `dtype` and `bits`.
pub(crate) fn kernel(dtype: DType, bits: u32) -> Option<QuantizeFn> {
    crate::with_float_type!(dtype, T => {
        Some(dispatch_bits!(bits, B => quantize::<T, B> as QuantizeFn, _ => return None))
    }, _ => None)
}

const OP: &str = "quantize";

fn quantize<T: Float, const BITS: usize>(a: QuantizeArgs<'_>) -> Result<()> {
    let g = a.group_size;
    if !supports_group(g) {
        return Err(Error::invalid(
            OP,
            "group_size",
            "32, 64 or 128 (the avx2 quantize kernel)",
            g,
        ));
    }
    if !super::x86_avx2::available() {
        return Err(Error::unsupported(
            OP,
            "the avx2 kernels on a CPU without AVX2, FMA and F16C",
        ));
    }
    let w: &[T] = cast(OP, "w", a.w)?;
    let scales: &mut [T] = cast_mut(OP, "scales", a.scales)?;
    let biases: &mut [T] = cast_mut(OP, "biases", a.biases)?;
    let group_bytes = g / 8 * BITS;
    let flavour = a.flavour;
    let groups = scales.len().min(biases.len()).min(w.len() / g);
    let per_task = TASK_GROUPS * g;
    w[..groups * g]
        .par_chunks(per_task)
        .zip(a.packed.par_chunks_mut(TASK_GROUPS * group_bytes))
        .zip(
            scales[..groups]
                .par_chunks_mut(TASK_GROUPS)
                .zip(biases[..groups].par_chunks_mut(TASK_GROUPS)),
        )
        .for_each(|((w, packed), (s, b))| {
            // SAFETY: `available()` holds (checked above).
            unsafe { groups_avx2::<T, BITS>(w, g, flavour, packed, s, b) }
        });
    Ok(())
}

/// Quantizes the groups of `w` (`g` values each) into `packed`, `scales` and `biases`; stops
/// at the shortest of them.
///
/// # Safety
/// The CPU has AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn groups_avx2<T: Float, const BITS: usize>(
    w: &[T],
    g: usize,
    flavour: Flavour,
    packed: &mut [u8],
    scales: &mut [T],
    biases: &mut [T],
) {
    let init_max = match flavour {
        Flavour::Cpu => f32::NEG_INFINITY,
        Flavour::Gpu => 0.0,
    };
    let mut vals = [0f32; MAX_G];
    let mut codes = [0u8; MAX_G];
    let group_bytes = g / 8 * BITS;
    let items = w
        .chunks_exact(g)
        .zip(packed.chunks_exact_mut(group_bytes))
        .zip(scales.iter_mut().zip(biases.iter_mut()));
    for ((src, out), (s, b)) in items {
        if g > MAX_G {
            return;
        }
        let (mut vmn, mut vmx) = (_mm256_set1_ps(f32::INFINITY), _mm256_set1_ps(init_max));
        for (c, v8) in vals[..g].chunks_exact_mut(8).enumerate() {
            // SAFETY: 8c + 8 ≤ g = src.len(), and v8 holds 8 floats.
            unsafe {
                let v = widen8(src.as_ptr().add(8 * c));
                _mm256_storeu_ps(v8.as_mut_ptr(), v);
                vmn = _mm256_min_ps(v, vmn);
                vmx = _mm256_max_ps(v, vmx);
            }
        }
        let (mn, mx) = (hmin(vmn), hmax(vmx));
        let (scale, bias) = if mn == 0.0 || mx == 0.0 || !mn.is_finite() || !mx.is_finite() {
            let r = quantize_group(&vals[..g], BITS as u32, flavour, &mut codes[..g]);
            for (c, o) in codes[..g].chunks_exact(8).zip(out.chunks_exact_mut(BITS)) {
                let c: &[u8; 8] = c.try_into().unwrap_or(&[0; 8]);
                pack8::<BITS>(c, o);
            }
            r
        } else {
            let (scale, bias) = group_params(mn, mx, BITS as u32, flavour);
            // SAFETY: `available()` holds (the caller's contract).
            unsafe {
                match flavour {
                    Flavour::Cpu => codes_avx2::<BITS, true>(&vals[..g], scale, bias, out),
                    Flavour::Gpu => codes_avx2::<BITS, false>(&vals[..g], scale, bias, out),
                }
            }
            (scale, bias)
        };
        *s = T::from_f32(scale);
        *b = T::from_f32(bias);
    }
}

/// The codes of one group (`vals`, a multiple of 32 values) with scale `scale` and bias
/// `bias`, rounded ties-to-even (`EVEN`, the CPU flavour) or away from zero, packed into `out`
/// (`BITS` bytes per 8 codes; writes what fits).
///
/// 32 codes at a time: four vectors of 8 dwords narrowed by two saturating packs and one
/// dword permute into 32 bytes in order; 8-bit stores them, 4-bit merges byte pairs with
/// `vpmaddubsw` (`c₀ + 16·c₁`) and packs again, every other width goes through [`pack8`].
///
/// # Safety
/// The CPU has AVX2, FMA and F16C.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn codes_avx2<const BITS: usize, const EVEN: bool>(
    vals: &[f32],
    scale: f32,
    bias: f32,
    out: &mut [u8],
) {
    let n = ((1u32 << BITS) - 1) as f32;
    let (vs, vb, vn) = (
        _mm256_set1_ps(scale),
        _mm256_set1_ps(bias),
        _mm256_set1_ps(n),
    );
    let flavour = if EVEN { Flavour::Cpu } else { Flavour::Gpu };
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (v32, o) in vals.chunks_exact(32).zip(out.chunks_exact_mut(4 * BITS)) {
        let code = |i: usize| {
            // SAFETY: 8i + 8 ≤ 32 = v32.len().
            let v = unsafe { _mm256_loadu_ps(v32.as_ptr().add(8 * i)) };
            let q = _mm256_div_ps(_mm256_sub_ps(v, vb), vs);
            let q = _mm256_min_ps(_mm256_max_ps(round(q, flavour), _mm256_setzero_ps()), vn);
            _mm256_cvttps_epi32(q)
        };
        let (c0, c1, c2, c3) = (code(0), code(1), code(2), code(3));
        let words = (_mm256_packus_epi32(c0, c1), _mm256_packus_epi32(c2, c3));
        let bytes = _mm256_permutevar8x32_epi32(_mm256_packus_epi16(words.0, words.1), order);
        match BITS {
            // SAFETY (both stores): o holds 4·BITS bytes.
            8 => unsafe { _mm256_storeu_si256(o.as_mut_ptr() as *mut __m256i, bytes) },
            4 => {
                let pairs = _mm256_maddubs_epi16(bytes, _mm256_set1_epi16(0x1001));
                let packed = _mm256_packus_epi16(pairs, pairs);
                let packed = _mm256_permute4x64_epi64::<0b1000>(packed);
                unsafe {
                    _mm_storeu_si128(
                        o.as_mut_ptr() as *mut __m128i,
                        _mm256_castsi256_si128(packed),
                    )
                };
            }
            _ => {
                let mut c = [0u8; 32];
                // SAFETY: c holds 32 bytes.
                unsafe { _mm256_storeu_si256(c.as_mut_ptr() as *mut __m256i, bytes) };
                for (c, o) in c.chunks_exact(8).zip(o.chunks_exact_mut(BITS)) {
                    let c: &[u8; 8] = c.try_into().unwrap_or(&[0; 8]);
                    pack8::<BITS>(c, o);
                }
            }
        }
    }
}

/// Rounds each lane to an integer as `flavour` does ([`round`](crate::quant::affine::round)):
/// ties to even, or away from zero (`trunc(q)`, plus `±1` where `|q − trunc(q)| ≥ ½`; the
/// difference is exact).
#[inline]
#[target_feature(enable = "avx2,fma")]
fn round(q: __m256, flavour: Flavour) -> __m256 {
    match flavour {
        Flavour::Cpu => _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(q),
        Flavour::Gpu => {
            let t = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(q);
            let sign = _mm256_set1_ps(-0.0);
            let frac = _mm256_andnot_ps(sign, _mm256_sub_ps(q, t));
            let half = _mm256_cmp_ps::<_CMP_GE_OQ>(frac, _mm256_set1_ps(0.5));
            // ±1 with q's sign where the fraction reaches ½, else 0.
            let step = _mm256_and_ps(
                half,
                _mm256_or_ps(_mm256_and_ps(q, sign), _mm256_set1_ps(1.0)),
            );
            _mm256_add_ps(t, step)
        }
    }
}

/// The least of the 8 lanes (none is NaN).
#[inline]
#[target_feature(enable = "avx2")]
fn hmin(v: __m256) -> f32 {
    let h = _mm_min_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let h = _mm_min_ps(h, _mm_movehl_ps(h, h));
    _mm_cvtss_f32(_mm_min_ss(h, _mm_shuffle_ps::<0b01>(h, h)))
}

/// The greatest of the 8 lanes (none is NaN).
#[inline]
#[target_feature(enable = "avx2")]
fn hmax(v: __m256) -> f32 {
    let h = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    _mm_cvtss_f32(_mm_max_ss(h, _mm_shuffle_ps::<0b01>(h, h)))
}
