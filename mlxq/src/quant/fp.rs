//! MLX's floating-point modes (mxfp4, mxfp8, nvfp4) for one group, in both flavours: the
//! definition the CPU kernels run and every other path must reproduce bit for bit.
//!
//! Elements are E2M1 (4-bit: sign, 2 exponent bits, 1 mantissa bit; the values
//! [`FP4_LUT`]) or E4M3FN (8-bit, max 448, `0x7f`/`0xff` NaN); groups of 32 share an E8M0 scale
//! (`2^(code − 127)`, mxfp*) and groups of 16 an E4M3 scale (nvfp4). No biases.
//!
//! MLX computes them two ways (see `docs/perf.md`, session 22):
//! - [`Flavour::Cpu`]: `fp_quantize`'s fallback in `mlx/ops.cpp`, a graph of ordinary ops run
//!   in the input dtype `T` (each op rounds to `T`): scale `T(max|w| / 6 or 448)`; mx scales
//!   `e = ceil(log2 scale)` in f32 (0 for a zero scale), elements `T(w / T(2^e))`; nvfp4 scales
//!   `ToFP8(scale)`, elements `T(w / scale8)`; E2M1 codes are `argmin |x − LUT[j]|` (the first
//!   index on ties, so ties go toward the smaller magnitude and every zero to code 0); E4M3
//!   codes `ToFP8` (`mlx/backend/cpu/unary_ops.h`: nearest-even, saturating at ±448, NaN to
//!   `0x7e`). Dequantize: `O(lut · O(2^(s − 127)))` in the output dtype `O`, E4M3 `0x7f`
//!   NaN (as the 0.32.4 wheel gives; the source's `FromFP8` reads 480).
//! - [`Flavour::Gpu`]: `mlx/backend/cuda/quantized/fp_quantize.cuh` (cutlass conversions):
//!   scale `max|w| / 6 or 448` in f32; E8M0 rounds up (`2^ceil(log2)`, a zero scale is code
//!   0), E4M3 scales nearest-even; elements `w · (1 / scale)` in f32, converted nearest-even
//!   with saturation. Dequantize: `O(value · scale)` in f32, rounded once; `0x7f` is NaN, an
//!   E8M0 `0xff` NaN.

use super::{Flavour, QuantMode};
use crate::dtype::Float;

/// The E2M1 values by code (MLX's LUT).
pub const FP4_LUT: [f32; 16] = [
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
];

/// E4M3FN max finite value.
pub const E4M3_MAX: f32 = 448.0;
/// E2M1 max value.
pub const E2M1_MAX: f32 = 6.0;

/// Rounds `v` to `T` and back.
#[inline(always)]
fn rt<T: Float>(v: f32) -> f32 {
    T::from_f32(v).to_f32()
}

/// MLX CPU's `ToFP8` (`detail::ToFP8`): f32 → E4M3FN, nearest-even, |x| ≥ 464 (inf and NaN
/// included) saturating to ±448.
#[inline(always)]
pub fn e4m3_from_f32_cpu(x: f32) -> u8 {
    let bits = x.to_bits();
    let sign = ((bits >> 24) & 0x80) as u8;
    let f = bits & 0x7fff_ffff;
    let r = if f >= 543 << 21 {
        0x7e
    } else if f < 121 << 23 {
        // Subnormal range: add 2^14 so the f32 addition rounds to a multiple of 2^-9.
        let denorm = f32::from_bits(141 << 23);
        (f32::from_bits(f) + denorm)
            .to_bits()
            .wrapping_sub(141 << 23) as u8
    } else {
        let mant_odd = (f >> 20) & 1;
        let hi = f
            .wrapping_add(((7u32.wrapping_sub(127)) << 23).wrapping_add(0x7ffff))
            .wrapping_add(mant_odd);
        (hi >> 20) as u8
    };
    r | sign
}

/// cutlass's `float_e4m3_t(float)` with saturation (`cvt.rn.satfinite.e4m3x2.f32`): nearest-
/// even, finite values beyond 448 (and infinities) to ±448, NaN to `0x7f`.
#[inline(always)]
pub fn e4m3_from_f32_gpu(x: f32) -> u8 {
    if x.is_nan() {
        return 0x7f;
    }
    let sign = if x.is_sign_negative() { 0x80 } else { 0 };
    let a = x.abs();
    let r = if a >= 464.0 {
        0x7e
    } else {
        e4m3_from_f32_cpu(a)
    };
    r | sign
}

/// E4M3 code → f32: `0x7f`/`0xff` decode as NaN in both flavours. (MLX's CPU source reads
/// them as ±480 in `FromFP8`, but its 0.32.4 wheel gives NaN for them in `dequantize` and in
/// the matmuls, elements and nvfp4 scales alike, measured over all 256 codes; neither
/// flavour's quantize ever writes them.)
#[inline(always)]
pub fn e4m3_to_f32(c: u8) -> f32 {
    let mag = c & 0x7f;
    if mag == 0x7f {
        return f32::NAN;
    }
    let e = i32::from(mag >> 3);
    let m = f32::from(mag & 7);
    let v = if e == 0 {
        m * (1.0 / 512.0)
    } else {
        (1.0 + m / 8.0) * pow2(e - 7)
    };
    if c & 0x80 != 0 {
        -v
    } else {
        v
    }
}

/// `2^e` as f32, correctly rounded (0 below the subnormals, infinity above the range).
#[inline(always)]
pub fn pow2(e: i32) -> f32 {
    (2f64).powi(e.clamp(-1100, 1100)) as f32
}

/// cutlass's `float_ue8m0_t(float)` (`cvt.rp.satfinite.ue8m0x2.f32`): the exponent of `x`
/// rounded up; 0 (and anything ≤ 2^-127) is code 0, values past 2^127 saturate to `0xfe`,
/// NaN and infinity are `0xff`.
#[inline(always)]
pub fn e8m0_from_f32_gpu(x: f32) -> u8 {
    if !x.is_finite() {
        return 0xff;
    }
    let bits = x.to_bits() & 0x7fff_ffff;
    let exp = (bits >> 23) as u8;
    let mant = bits & 0x7f_ffff;
    if mant > 0 && exp != 0xfe && !(exp == 0 && mant <= 0x40_0000) {
        exp + 1
    } else {
        exp
    }
}

/// E2M1 code of `x` the way MLX's CPU picks it: `argmin_j |x − LUT[j]|` with the distances
/// computed by `dist` (which rounds as MLX's subtraction does), the first index on ties and
/// when the first distance is NaN.
#[inline(always)]
fn e2m1_argmin(x: f32, dist: impl Fn(f32, f32) -> f32) -> u8 {
    let mut best = dist(x, FP4_LUT[0]);
    let mut idx = 0u8;
    for (j, &l) in FP4_LUT.iter().enumerate().skip(1) {
        let d = dist(x, l);
        if d < best {
            best = d;
            idx = j as u8;
        }
    }
    idx
}

/// E2M1 code of `x` as MLX's CPU quantize picks it from f32 distances (nvfp4's rule; mx's
/// distances in the input dtype pick the same codes for every `x` its scales can produce:
/// nearest magnitude, ties to the smaller, NaN, ±∞ and every magnitude ≤ 0.25 to code 0).
#[inline(always)]
pub fn e2m1_from_f32_cpu(x: f32) -> u8 {
    e2m1_argmin(x, |x, l| (x - l).abs())
}

/// cutlass's `float_e2m1_t(float)` (`cvt.rn.satfinite.e2m1x2.f32`): nearest-even, saturating
/// at ±6; NaN to `+6` (code 7, whatever its sign bit: the GPU's NaN is positive), as MLX's
/// CUDA fixtures show for nvfp4's all-zero groups (`0 · (1/0)`).
#[inline(always)]
pub fn e2m1_from_f32_gpu(x: f32) -> u8 {
    if x.is_nan() {
        return 7;
    }
    let sign = if x.is_sign_negative() { 8 } else { 0 };
    let a = x.abs();
    // Midpoints between consecutive magnitudes; on a tie the even code (mantissa bit 0) wins.
    let code = if a <= 0.25 {
        0
    } else if a < 0.75 {
        1
    } else if a <= 1.25 {
        2
    } else if a < 1.75 {
        3
    } else if a <= 2.5 {
        4
    } else if a < 3.5 {
        5
    } else if a <= 5.0 {
        6
    } else {
        7
    };
    code | sign
}

/// Decoded value of element code `c` (E2M1 when `bits` is 4, else E4M3).
#[inline(always)]
pub fn element_value(c: u8, bits: u32) -> f32 {
    if bits == 4 {
        FP4_LUT[usize::from(c & 15)]
    } else {
        e4m3_to_f32(c)
    }
}

/// Decoded scale of a group: `2^(s − 127)` (E8M0) or the E4M3 value (nvfp4), in f32 (GPU:
/// `0xff` E8M0 is NaN; CPU: 2^128 = infinity).
#[inline(always)]
pub fn scale_value(s: u8, mode: QuantMode, flavour: Flavour) -> f32 {
    match mode {
        QuantMode::Nvfp4 => e4m3_to_f32(s),
        _ => {
            if s == 0xff && flavour == Flavour::Gpu {
                f32::NAN
            } else {
                pow2(i32::from(s) - 127)
            }
        }
    }
}

/// Quantizes one group `w` (values of dtype `T`, widened exactly) of an FP `mode` (mxfp4: 32,
/// mxfp8: 32, nvfp4: 16 values) into element codes (one per value, unpacked) and returns the
/// scale code. `mode` must not be affine (which returns 0 and leaves `codes` as they are).
#[inline(always)]
pub fn quantize_group<T: Float>(
    w: &[f32],
    mode: QuantMode,
    flavour: Flavour,
    codes: &mut [u8],
) -> u8 {
    let bits = match mode {
        QuantMode::Affine => return 0,
        QuantMode::Mxfp8 => 8,
        QuantMode::Mxfp4 | QuantMode::Nvfp4 => 4,
    };
    let maxval = if bits == 4 { E2M1_MAX } else { E4M3_MAX };
    // Strict comparison: NaN is skipped, as in the CUDA kernel's fmaxf.
    let mut amax = 0f32;
    for &v in w {
        if v.abs() > amax {
            amax = v.abs();
        }
    }
    match flavour {
        Flavour::Gpu => {
            let s = amax / maxval;
            let (code, sv) = if mode == QuantMode::Nvfp4 {
                let c = e4m3_from_f32_gpu(s);
                (c, e4m3_to_f32(c))
            } else {
                let c = e8m0_from_f32_gpu(s);
                (c, scale_value(c, mode, Flavour::Gpu))
            };
            let inv = 1.0 / sv;
            for (c, &v) in codes.iter_mut().zip(w) {
                let x = v * inv;
                *c = if bits == 4 {
                    e2m1_from_f32_gpu(x)
                } else {
                    e4m3_from_f32_gpu(x)
                };
            }
            code
        }
        Flavour::Cpu => {
            let s = rt::<T>(amax / maxval);
            let (code, div, in_t) = if mode == QuantMode::Nvfp4 {
                let c = e4m3_from_f32_cpu(s);
                // The scale decoded into T (exact), the quotient in T, then widened to f32 by
                // the multiply with the f32 encode scale 1.
                (c, e4m3_to_f32(c), false)
            } else {
                let e = if s == 0.0 {
                    0
                } else {
                    // `ceil(log2 s)` of the f32 log2 (saturating cast; MLX's int cast of a
                    // non-finite value is undefined).
                    s.log2().ceil() as i32
                };
                (e.wrapping_add(127) as u8, rt::<T>(pow2(e)), true)
            };
            for (c, &v) in codes.iter_mut().zip(w) {
                let x = rt::<T>(v / div);
                *c = if bits == 8 {
                    e4m3_from_f32_cpu(x)
                } else if in_t {
                    e2m1_argmin(x, |x, l| rt::<T>(x - l).abs())
                } else {
                    e2m1_argmin(x, |x, l| (x - l).abs())
                };
            }
            code
        }
    }
}

/// Dequantizes one element code with its group's scale code into `O`, as `flavour` rounds:
/// CPU `O(O(value) · O(scale))` (each factor rounded to `O`, then the product); GPU the f32
/// product rounded once.
#[inline(always)]
pub fn dequantize_value<O: Float>(c: u8, s: u8, mode: QuantMode, flavour: Flavour) -> O {
    let bits = if mode == QuantMode::Mxfp8 { 8 } else { 4 };
    let v = element_value(c, bits);
    let sv = scale_value(s, mode, flavour);
    match flavour {
        Flavour::Cpu => O::from_f32(rt::<O>(v) * rt::<O>(sv)),
        Flavour::Gpu => O::from_f32(v * sv),
    }
}

/// E4M3FN values by code as MLX 0.32.4's CPU quantized matmul reads them: `0x7f`/`0xff` are
/// NaN (measured with the wheel: elements and nvfp4 scales of those codes give NaN outputs,
/// though the `FromFP8` of the MLX source read here would give ±480). A table, so that the
/// matmul's group decode is one load per element.
const E4M3_MATMUL: [f32; 256] = {
    let mut t = [0f32; 256];
    let mut c = 0;
    while c < 256 {
        let (e, m) = ((c >> 3) & 15, (c & 7) as u32);
        let v = if e == 15 && m == 7 {
            f32::NAN
        } else if e == 0 {
            m as f32 * (1.0 / 512.0)
        } else {
            // (1 + m/8) · 2^(e − 7): the f32 with exponent e − 7 + 127 and mantissa m << 20.
            f32::from_bits((((e as u32) + 120) << 23) | (m << 20))
        };
        t[c] = if c & 0x80 != 0 { -v } else { v };
        c += 1;
    }
    t
};

/// Decodes one group of packed element codes (element `i` at bits `bits·i` of `packed`, `bits`
/// 4 or 8) into their values, unscaled, as MLX's CPU quantized matmul reads them: E2M1 through
/// [`FP4_LUT`], E4M3FN with `0x7f`/`0xff` NaN. Every value is exact in f32, f16 and bf16, so
/// MLX's cast to the matmul's dtype changes none. Fills `min(values.len(), elements in
/// packed)` values.
#[inline(always)]
pub fn decode_group(packed: &[u8], bits: u32, values: &mut [f32]) {
    if bits == 8 {
        for (v, &c) in values.iter_mut().zip(packed) {
            *v = E4M3_MATMUL[usize::from(c)];
        }
    } else {
        for (v2, &b) in values.chunks_exact_mut(2).zip(packed) {
            v2[0] = FP4_LUT[usize::from(b & 15)];
            v2[1] = FP4_LUT[usize::from(b >> 4)];
        }
    }
}

/// A group's scale code `s` as MLX's CPU quantized matmul reads it (`dequantize_scale` in
/// `mlx/backend/cpu/quantized.cpp`), in the dtype `T` of x, widened to f32: nvfp4's E4M3 value
/// (`0x7f`/`0xff` NaN, as [`decode_group`]); otherwise E8M0 `2^(s − 127)` (built as a
/// bfloat16: code 0 is the subnormal 2^-127, 255 infinity). Rounding to `T` only matters for
/// f16, which flushes exponents below −24 to 0 and takes those above 15 to infinity, as MLX
/// 0.32.4 does (measured).
#[inline(always)]
pub fn matmul_scale<T: Float>(s: u8, mode: QuantMode) -> f32 {
    let v = match mode {
        QuantMode::Nvfp4 => E4M3_MATMUL[usize::from(s)],
        _ => pow2(i32::from(s) - 127),
    };
    rt::<T>(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e4m3_round_trip_and_saturation() {
        for c in 0u8..=255 {
            if c & 0x7f == 0x7f {
                continue;
            }
            let v = e4m3_to_f32(c);
            assert_eq!(e4m3_from_f32_cpu(v), c, "{c:#x} {v}");
            assert_eq!(e4m3_from_f32_gpu(v), c, "{c:#x} {v}");
        }
        assert_eq!(e4m3_from_f32_cpu(1000.0), 0x7e);
        assert_eq!(e4m3_from_f32_cpu(-f32::INFINITY), 0xfe);
        assert_eq!(e4m3_from_f32_gpu(f32::NAN), 0x7f);
        assert!(e4m3_to_f32(0x7f).is_nan() && e4m3_to_f32(0xff).is_nan());
        // 2^-10 is halfway between 0 and the smallest subnormal 2^-9: ties to even (0).
        assert_eq!(e4m3_from_f32_cpu(2f32.powi(-10)), 0);
        assert_eq!(e4m3_from_f32_cpu(3.0 * 2f32.powi(-10)), 2);
    }

    #[test]
    fn e8m0_rounds_up() {
        assert_eq!(e8m0_from_f32_gpu(0.0), 0);
        assert_eq!(e8m0_from_f32_gpu(1.0), 127);
        assert_eq!(e8m0_from_f32_gpu(1.0001), 128);
        assert_eq!(e8m0_from_f32_gpu(0.75), 127);
        assert_eq!(e8m0_from_f32_gpu(f32::INFINITY), 255);
    }

    #[test]
    fn e2m1_ties_differ_between_flavours() {
        let cpu = e2m1_from_f32_cpu;
        // CPU: first index (smaller magnitude); GPU: even code.
        assert_eq!((cpu(0.75), e2m1_from_f32_gpu(0.75)), (1, 2));
        assert_eq!((cpu(1.75), e2m1_from_f32_gpu(1.75)), (3, 4));
        assert_eq!((cpu(3.5), e2m1_from_f32_gpu(3.5)), (5, 6));
        assert_eq!((cpu(5.0), e2m1_from_f32_gpu(5.0)), (6, 6));
        assert_eq!((cpu(-0.1), e2m1_from_f32_gpu(-0.1)), (0, 8));
        assert_eq!((cpu(-9.0), e2m1_from_f32_gpu(-9.0)), (15, 15));
    }

    #[test]
    fn matmul_decode_reads_codes_as_mlx_cpu() {
        for c in 0u8..=255 {
            let mut v = [0f32; 1];
            decode_group(&[c], 8, &mut v);
            let want = e4m3_to_f32(c);
            assert!(v[0].to_bits() == want.to_bits() || v[0].is_nan() && want.is_nan());
        }
        let mut v = [0f32; 4];
        decode_group(&[0x71, 0xf8], 4, &mut v);
        assert_eq!(v, [0.5, 6.0, -0.0, -6.0]);
        assert_eq!(matmul_scale::<f32>(0, QuantMode::Mxfp4), 2f32.powi(-127));
        assert_eq!(matmul_scale::<f32>(255, QuantMode::Mxfp8), f32::INFINITY);
        assert_eq!(matmul_scale::<f32>(130, QuantMode::Mxfp4), 8.0);
        assert_eq!(matmul_scale::<half::f16>(127 - 25, QuantMode::Mxfp4), 0.0);
        assert_eq!(
            matmul_scale::<half::f16>(127 - 24, QuantMode::Mxfp4),
            2f32.powi(-24)
        );
        assert_eq!(
            matmul_scale::<half::f16>(127 + 16, QuantMode::Mxfp4),
            f32::INFINITY
        );
        assert_eq!(
            matmul_scale::<half::bf16>(0, QuantMode::Mxfp4),
            2f32.powi(-127)
        );
        assert_eq!(matmul_scale::<f32>(0x7e, QuantMode::Nvfp4), 448.0);
        assert!(matmul_scale::<f32>(0x7f, QuantMode::Nvfp4).is_nan());
    }
}
