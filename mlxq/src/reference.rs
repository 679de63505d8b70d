//! The oracle: slow, obviously correct f64 implementations, written without any of the
//! kernels' machinery (codes come from the bit-by-bit [`read_code`](crate::quant::pack::read_code)
//! reader). Every kernel on every backend is tested against these.

use crate::error::{Error, Result};
use crate::quant::pack::read_code;
use crate::{Buffer, QuantizedWeight};

/// Scales or biases as f64.
fn floats(b: &Buffer) -> Result<Vec<f64>> {
    Ok(b.to_f32_vec()?.into_iter().map(f64::from).collect())
}

/// The dequantized weight `s·q + b` in f64, shape `w.shape()`, from the stored scales and biases.
pub fn dequantize_f64(w: &QuantizedWeight) -> Result<Vec<f64>> {
    let spec = w.spec();
    if !spec.has_biases() {
        return Err(Error::unsupported(
            "reference::dequantize_f64",
            format!("mode {}", spec.mode()),
        ));
    }
    let scales = floats(w.scales())?;
    let biases = floats(
        w.biases()
            .ok_or_else(|| Error::unsupported("reference", "affine without biases"))?,
    )?;
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
            out.push(scales[gi] * f64::from(q) + biases[gi]);
        }
    }
    Ok(out)
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
        for j in 0..n {
            let mut acc = 0f64;
            for i in 0..k {
                let wv = if transpose {
                    wd[j * cols + i]
                } else {
                    wd[i * cols + j]
                };
                acc += x[r * k + i] * wv;
            }
            y[r * n + j] = acc;
        }
    }
    y
}

/// The normwise relative error `max|got − want| / max|want|` (0 when both are all zero).
/// Normwise, because elementwise relative error is meaningless where a sum cancels to ~0.
pub fn max_rel_err(got: &[f64], want: &[f64]) -> f64 {
    let scale = want.iter().fold(0f64, |a, v| a.max(v.abs()));
    let err = got
        .iter()
        .zip(want)
        .fold(0f64, |a, (g, w)| a.max((g - w).abs()));
    if scale == 0.0 {
        err
    } else {
        err / scale
    }
}
