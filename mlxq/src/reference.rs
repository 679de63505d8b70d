//! The oracle: slow, obviously correct f64 implementations, written without any of the
//! kernels' machinery (codes come from the bit-by-bit [`read_code`]
//! reader). Every kernel on every backend is tested against these.

use crate::error::{Error, Result};
use crate::quant::pack::read_code;
use crate::{Buffer, QuantMode, QuantizedWeight};

/// Scales or biases as f64.
fn floats(b: &Buffer) -> Result<Vec<f64>> {
    Ok(b.to_f32_vec()?.into_iter().map(f64::from).collect())
}

/// The dequantized weight in f64, shape `w.shape()`, from the stored scales (and biases).
///
/// Affine: `s·q + b`. The FP modes: `scale · value`, decoded here from the formats' bit
/// layouts: E2M1 elements (sign, 2 exponent bits of bias 1, 1 mantissa bit) or E4M3FN (sign,
/// 4 exponent bits of bias 7, 3 mantissa bits; `0x7f`/`0xff` NaN), E8M0 scales `2^(s − 127)`
/// (mxfp4, mxfp8) or E4M3FN scales (nvfp4). Exact in f64 (an E8M0 code 255 is 2^128 here,
/// where f32 kernels see infinity).
pub fn dequantize_f64(w: &QuantizedWeight) -> Result<Vec<f64>> {
    let spec = w.spec();
    let scales = match spec.mode() {
        QuantMode::Affine => floats(w.scales())?,
        mode => w
            .scales()
            .to_vec::<u8>()?
            .into_iter()
            .map(|c| fp_scale(mode, c))
            .collect(),
    };
    let biases = match spec.mode() {
        QuantMode::Affine => {
            Some(floats(w.biases().ok_or_else(|| {
                Error::unsupported("reference", "affine without biases")
            })?)?)
        }
        _ => None,
    };
    let (rows, cols) = (w.batch_size() * w.rows(), w.cols());
    let g = spec.group_size() as usize;
    let row_bytes = cols * spec.bits() as usize / 8;
    let packed = w.packed().bytes();
    let mut out = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        let row = &packed[r * row_bytes..(r + 1) * row_bytes];
        for c in 0..cols {
            let q = read_code(spec.bits(), row, c).ok_or_else(|| {
                Error::unsupported("reference", "a packed row shorter than its shape")
            })?;
            let gi = r * (cols / g) + c / g;
            out.push(match (spec.mode(), &biases) {
                (QuantMode::Affine, Some(b)) => scales[gi] * f64::from(q) + b[gi],
                (QuantMode::Mxfp4 | QuantMode::Nvfp4, _) => {
                    minifloat(u32::from(q), 2, 1) * scales[gi]
                }
                (QuantMode::Mxfp8, _) => e4m3(u32::from(q)) * scales[gi],
                (QuantMode::Affine, None) => {
                    return Err(Error::unsupported("reference", "affine without biases"))
                }
            });
        }
    }
    Ok(out)
}

/// The value of a sign/exponent/mantissa code with `e` exponent bits (bias `2^(e−1) − 1`) and
/// `m` mantissa bits, every code a finite number (E2M1; E4M3FN but for its NaN, see [`e4m3`]).
fn minifloat(code: u32, e: u32, m: u32) -> f64 {
    let bias = (1i32 << (e - 1)) - 1;
    let exp = ((code >> m) & ((1 << e) - 1)) as i32;
    let man = f64::from(code & ((1 << m) - 1)) / f64::from(1u32 << m);
    let mag = if exp == 0 {
        man * 2f64.powi(1 - bias)
    } else {
        (1.0 + man) * 2f64.powi(exp - bias)
    };
    if code >> (e + m) & 1 == 1 {
        -mag
    } else {
        mag
    }
}

/// E4M3FN: [`minifloat`] with 4 exponent and 3 mantissa bits, `0x7f`/`0xff` NaN.
fn e4m3(code: u32) -> f64 {
    if code & 0x7f == 0x7f {
        f64::NAN
    } else {
        minifloat(code, 4, 3)
    }
}

/// An FP mode's group scale from its stored code: E4M3FN (nvfp4) or E8M0 `2^(code − 127)`.
fn fp_scale(mode: QuantMode, code: u8) -> f64 {
    if mode == QuantMode::Nvfp4 {
        e4m3(u32::from(code))
    } else {
        2f64.powi(i32::from(code) - 127)
    }
}

/// `y = x · Wᵀ` (transpose) or `x · W` for one matrix: `x` is `m × in_dim` row-major f64,
/// `wd` the `rows × cols` dequantized matrix. Returns `m × out_dim` in f64.
pub fn matmul_f64(
    x: &[f64],
    m: usize,
    wd: &[f64],
    rows: usize,
    cols: usize,
    transpose: bool,
) -> Vec<f64> {
    let (k, n) = if transpose {
        (cols, rows)
    } else {
        (rows, cols)
    };
    let mut y = vec![0f64; m * n];
    for r in 0..m {
        let xr = &x[r * k..(r + 1) * k];
        let yr = &mut y[r * n..(r + 1) * n];
        if transpose {
            for (j, yv) in yr.iter_mut().enumerate() {
                let wr = &wd[j * cols..(j + 1) * cols];
                *yv = xr.iter().zip(wr).fold(0f64, |acc, (a, b)| acc + a * b);
            }
        } else {
            // Row by row of W [K, N], so that W is read in order: each output element still
            // adds its K products in order of i, as the dot product above.
            for (i, &xv) in xr.iter().enumerate() {
                let wr = &wd[i * cols..(i + 1) * cols];
                for (yv, &wv) in yr.iter_mut().zip(wr) {
                    *yv += xv * wv;
                }
            }
        }
    }
    y
}

/// The absolute difference `|got − want|` of one element, or infinity where it cannot be
/// measured (a NaN against a number, an infinity against anything but the same infinity);
/// 0 where the two agree exactly (the same infinity, or NaN against NaN). Never NaN.
pub fn abs_err(got: f64, want: f64) -> f64 {
    if got == want || (got.is_nan() && want.is_nan()) {
        return 0.0;
    }
    let d = (got - want).abs();
    if d.is_finite() {
        d
    } else {
        f64::INFINITY
    }
}

/// The largest [`abs_err`] of the pairs, or infinity where the slices' lengths differ, so
/// that no comparison passes by accident.
pub fn max_abs_err(got: &[f64], want: &[f64]) -> f64 {
    if got.len() != want.len() {
        return f64::INFINITY;
    }
    got.iter()
        .zip(want)
        .fold(0f64, |err, (&g, &w)| err.max(abs_err(g, w)))
}

/// The normwise relative error `max|got − want| / max|want|` (0 when both are all zero).
/// Normwise, because elementwise relative error is meaningless where a sum cancels to ~0.
/// Infinite where [`max_abs_err`] is; `max|want|` is taken over the finite references.
pub fn max_rel_err(got: &[f64], want: &[f64]) -> f64 {
    let err = max_abs_err(got, want);
    let scale = want
        .iter()
        .filter(|w| w.is_finite())
        .fold(0f64, |a, w| a.max(w.abs()));
    if scale == 0.0 {
        err
    } else {
        err / scale
    }
}

#[cfg(test)]
mod tests {
    use super::max_rel_err;

    #[test]
    fn max_rel_err_is_normwise() {
        let want = [2.0, -4.0, 0.0];
        assert_eq!(max_rel_err(&want, &want), 0.0);
        assert_eq!(max_rel_err(&[2.0, -4.0, 0.5], &want), 0.5 / 4.0);
        assert_eq!(max_rel_err(&[0.0, 1e-3], &[0.0, 0.0]), 1e-3);
        assert_eq!(max_rel_err(&[], &[]), 0.0);
    }

    #[test]
    fn max_rel_err_counts_what_it_cannot_measure_as_infinite() {
        let want = [1.0, 2.0, 3.0];
        // An unwritten (NaN) output, wherever it is.
        for i in 0..3 {
            let mut got = want;
            got[i] = f64::NAN;
            assert_eq!(max_rel_err(&got, &want), f64::INFINITY, "NaN at {i}");
        }
        // An infinity against a number, and a number against an infinity.
        assert_eq!(
            max_rel_err(&[1.0, f64::INFINITY, 3.0], &want),
            f64::INFINITY
        );
        assert_eq!(
            max_rel_err(&want, &[1.0, f64::NEG_INFINITY, 3.0]),
            f64::INFINITY
        );
        assert_eq!(
            max_rel_err(&[1.0, f64::INFINITY], &[1.0, f64::NEG_INFINITY]),
            f64::INFINITY
        );
        // A short or long output.
        assert_eq!(max_rel_err(&want[..2], &want), f64::INFINITY);
        assert_eq!(max_rel_err(&[1.0, 2.0, 3.0, 4.0], &want), f64::INFINITY);
        // Exact agreement on non-finite values adds nothing; the scale is the finite part's.
        let special = [f64::NAN, f64::INFINITY, -8.0];
        assert_eq!(
            max_rel_err(&[f64::NAN, f64::INFINITY, -7.0], &special),
            1.0 / 8.0
        );
    }
}
