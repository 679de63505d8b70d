//! MLX's affine quantizer for one group, in both flavours: the definition every faster path
//! (and every backend) must reproduce bit for bit.
//!
//! All arithmetic is f32, as in MLX. The returned scale and bias are the *unrounded* f32
//! values the codes were chosen with; callers store them rounded to the weight's dtype.

use super::Flavour;

/// MLX's floor on the scale: `1e-7` as f32.
pub const EPS: f32 = 1e-7;

/// Rounds to an integer the way `flavour` does: ties to even (CPU `rint`) or away from zero
/// (GPU `round`).
#[inline(always)]
pub fn round(v: f32, flavour: Flavour) -> f32 {
    match flavour {
        Flavour::Cpu => v.round_ties_even(),
        Flavour::Gpu => v.round(),
    }
}

/// Quantizes one group `w` to `bits`-wide codes written to `codes` (same length as `w`).
/// Returns `(scale, bias)` in f32 before rounding to the storage dtype.
#[inline(always)]
pub fn quantize_group(w: &[f32], bits: u32, flavour: Flavour, codes: &mut [u8]) -> (f32, f32) {
    let n = ((1u32 << bits) - 1) as f32;
    // The GPU kernels start the max at 0, i.e. take max(0, max(w)); the CPU the true max.
    let init_max = match flavour {
        Flavour::Cpu => f32::NEG_INFINITY,
        Flavour::Gpu => 0.0,
    };
    // Strict comparisons, as MLX's CPU loop (`std::min`, `std::max`): NaN is skipped, and of
    // equal values the first stays, so the sign of a zero min (1-bit's bias) is defined, which
    // `f32::min` leaves to the compiler.
    let (mut mn, mut mx) = (f32::INFINITY, init_max);
    for &v in w {
        if v < mn {
            mn = v;
        }
        if v > mx {
            mx = v;
        }
    }
    let (scale, bias) = group_params(mn, mx, bits, flavour);
    for (c, &v) in codes.iter_mut().zip(w) {
        // A true division with the unrounded scale and bias, as MLX does.
        *c = round((v - bias) / scale, flavour).clamp(0.0, n) as u8;
    }
    (scale, bias)
}

/// The scale and bias of a group whose minimum is `mn` and maximum `mx`, found as
/// [`quantize_group`] finds them (its definition: faster paths that find the extremes their
/// own way share it).
#[inline(always)]
pub fn group_params(mn: f32, mx: f32, bits: u32, flavour: Flavour) -> (f32, f32) {
    let n = ((1u32 << bits) - 1) as f32;
    if bits == 1 {
        ((mx - mn).max(EPS), mn)
    } else {
        let s = ((mx - mn) / n).max(EPS);
        // Anchor the grid at the extreme of larger magnitude; code 0 decodes to it exactly.
        let (edge, s) = if mn.abs() > mx.abs() {
            (mn, s)
        } else {
            (mx, -s)
        };
        let q0 = round(edge / s, flavour);
        if q0 != 0.0 {
            (edge / q0, edge)
        } else {
            (s, 0.0)
        }
    }
}

/// Dequantizes one code with a stored scale and bias, rounding to `T` as `flavour` does:
/// CPU `T(T(q·s) + b)`, GPU `T(fma(q, s, b))` computed in f32.
#[inline(always)]
pub fn dequantize_value<T: crate::dtype::Float>(q: u8, scale: T, bias: T, flavour: Flavour) -> T {
    let (q, s, b) = (f32::from(q), scale.to_f32(), bias.to_f32());
    match flavour {
        Flavour::Cpu => T::from_f32(T::from_f32(q * s).to_f32() + b),
        Flavour::Gpu => T::from_f32(q.mul_add(s, b)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Worked examples from the format survey (verified there against mx.quantize on CPU).
    #[test]
    fn survey_examples() {
        let mut c = [0u8; 32];
        let (s, b) = quantize_group(&[0.0; 32], 1, Flavour::Cpu, &mut c);
        assert_eq!((s, b), (EPS, 0.0));
        let (s, b) = quantize_group(&[2.0; 32], 4, Flavour::Cpu, &mut c);
        assert_eq!((s, b), (-EPS, 2.0));
        let w: Vec<f32> = (0..32)
            .map(|i| if i % 2 == 0 { -1.0 } else { 0.5 })
            .collect();
        let (s, b) = quantize_group(&w, 1, Flavour::Cpu, &mut c);
        assert_eq!((s, b), (1.5, -1.0));
        assert!(c.iter().enumerate().all(|(i, &q)| q == (i % 2) as u8));
    }

    /// `[-3, -1 × 31]` at 4 bits: the flavours differ (survey §1.3).
    #[test]
    fn flavours_differ_on_negative_groups() {
        let mut w = [-1.0f32; 32];
        w[0] = -3.0;
        let mut c = [0u8; 32];
        let (s, b) = quantize_group(&w, 4, Flavour::Cpu, &mut c);
        assert_eq!(b, -3.0);
        assert!((s - 3.0 / 22.0).abs() < 1e-7, "{s}");
        let (s, b) = quantize_group(&w, 4, Flavour::Gpu, &mut c);
        assert_eq!((s, b), (0.2, -3.0));
        assert_eq!(c[1], 10);
        assert!((dequantize_value(c[1], s, b, Flavour::Gpu) + 1.0).abs() < 1e-6);
    }
}
