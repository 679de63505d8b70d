//! The operations, one per file. Each validates what its own arguments add to an already
//! validated [`QuantizedWeight`], picks a kernel from the device's
//! registry and records it on the encoder.

mod dequantize;
mod embedding;
mod gather_qmm;
mod matmul;
mod quantize;

#[cfg(feature = "cuda")]
pub(crate) use dequantize::output_dtype as dequantize_dtype;
pub use dequantize::{dequantize, dequantize_into, DequantizeOptions};
pub use embedding::embedding;
pub use gather_qmm::{gather_qmm, gather_qmm_into};
pub use matmul::{quantized_matmul, quantized_matmul_into};
pub use quantize::{quantize, quantize_into};

use crate::backend::cpu::{CpuKernel, MatrixRef};
use crate::error::{Error, Result};
use crate::{Buffer, DType, QuantizedWeight};
use std::cell::RefCell;

/// Checks that `b` has a float dtype.
pub(crate) fn require_float(op: &'static str, param: &'static str, b: &Buffer) -> Result<()> {
    if b.dtype().is_float() {
        Ok(())
    } else {
        Err(Error::dtype(
            op,
            param,
            "float32, float16 or bfloat16",
            b.dtype(),
        ))
    }
}

/// Checks a caller-owned output (`*_into` ops) against the dtype and shape the op makes.
pub(crate) fn require_out(
    op: &'static str,
    out: &Buffer,
    dtype: DType,
    shape: &[usize],
) -> Result<()> {
    if out.dtype() != dtype {
        return Err(Error::dtype(op, "out", dtype.name(), out.dtype()));
    }
    if out.shape() != shape {
        return Err(Error::shape(op, "out", format!("{shape:?}"), out.shape()));
    }
    Ok(())
}

/// Rejects any zero dimension, naming it.
pub(crate) fn require_nonzero(
    op: &'static str,
    param: &'static str,
    shape: &[usize],
) -> Result<()> {
    if shape.contains(&0) {
        return Err(Error::shape(op, param, "no zero dimension", shape));
    }
    Ok(())
}

thread_local! {
    /// The f32 copy of x that [`widen`] hands out, kept between calls so a decode step does
    /// not allocate once warm (taken while in use: a nested call allocates its own).
    static WIDE: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// A float buffer's elements as f32 (see [`widen`]); derefs to the slice.
pub(crate) enum Widened<'a> {
    /// The buffer itself (already f32 and aligned).
    Borrowed(&'a [f32]),
    /// A converted copy in this thread's scratch, which it goes back to when dropped.
    Scratch(Vec<f32>),
}

impl std::ops::Deref for Widened<'_> {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        match self {
            Widened::Borrowed(s) => s,
            Widened::Scratch(v) => v,
        }
    }
}

impl Drop for Widened<'_> {
    fn drop(&mut self) {
        if let Widened::Scratch(v) = self {
            let v = std::mem::take(v);
            // The longer buffer stays (a nested call may have put one back meanwhile).
            WIDE.with(|w| {
                if let Ok(mut w) = w.try_borrow_mut() {
                    if v.capacity() > w.capacity() {
                        *w = v;
                    }
                }
            });
        }
    }
}

/// The elements of a float buffer as f32: borrowed when already f32 and aligned, otherwise
/// widened into a per-thread scratch vector reused from call to call.
pub(crate) fn widen<'a>(
    op: &'static str,
    param: &'static str,
    b: &'a Buffer,
) -> Result<Widened<'a>> {
    require_float(op, param, b)?;
    // The dtype first: `as_slice`'s error for another dtype is built (allocated) to be
    // dropped, once per call of a decode loop.
    if b.dtype() == DType::F32 {
        if let Ok(s) = b.as_slice::<f32>() {
            return Ok(Widened::Borrowed(s));
        }
    }
    let mut v = WIDE.with(|w| {
        w.try_borrow_mut()
            .map(|mut w| std::mem::take(&mut *w))
            .unwrap_or_default()
    });
    v.clear();
    let bytes = b.bytes();
    crate::with_float_type!(b.dtype(), T => {
        let size = std::mem::size_of::<T>();
        // Read unaligned: a mapped view need not be aligned for T.
        v.extend(
            bytes
                .chunks_exact(size)
                .map(|c| crate::dtype::Float::to_f32(bytemuck::pod_read_unaligned::<T>(c))),
        );
    }, _ => return Err(Error::dtype(op, param, "a float dtype", b.dtype())));
    if v.len() != b.numel() {
        return Err(Error::invalid(
            op,
            param,
            format!("{} elements in host memory", b.numel()),
            format!("{} readable here", v.len()),
        ));
    }
    Ok(Widened::Scratch(v))
}

/// Raw bytes of matrix `index` of `w`'s flattened batch (no checks: `w` is validated and the
/// caller bounds `index`).
pub(crate) fn matrix(w: &QuantizedWeight, index: usize) -> MatrixRef<'_> {
    let (rows, cols) = (w.rows(), w.cols());
    let spec = w.spec();
    let pbytes = rows * (cols / 8 * spec.bits() as usize);
    let sbytes = rows * w.groups_per_row() * w.scales_dtype().size();
    fn at(b: &[u8], index: usize, n: usize) -> &[u8] {
        &b[index * n..(index + 1) * n]
    }
    MatrixRef {
        packed: at(w.packed().bytes(), index, pbytes),
        scales: at(w.scales().bytes(), index, sbytes),
        biases: w.biases().map_or(&[][..], |b| at(b.bytes(), index, sbytes)),
        rows,
        cols,
        group_size: spec.group_size() as usize,
        bits: spec.bits(),
    }
}

/// Numpy broadcasting of two shapes, or an error naming `param`.
pub(crate) fn broadcast_shapes(
    op: &'static str,
    param: &'static str,
    a: &[usize],
    b: &[usize],
) -> Result<Vec<usize>> {
    let mut out = Vec::new();
    broadcast_shapes_into(op, param, a, b, &mut out)?;
    Ok(out)
}

/// [`broadcast_shapes`] into `out` (its contents replaced), so a caller that keeps `out`
/// allocates nothing.
pub(crate) fn broadcast_shapes_into(
    op: &'static str,
    param: &'static str,
    a: &[usize],
    b: &[usize],
    out: &mut Vec<usize>,
) -> Result<()> {
    let n = a.len().max(b.len());
    out.clear();
    for i in 0..n {
        let da = if i + a.len() >= n {
            a[i + a.len() - n]
        } else {
            1
        };
        let db = if i + b.len() >= n {
            b[i + b.len() - n]
        } else {
            1
        };
        out.push(match (da, db) {
            (x, y) if x == y => x,
            (1, y) => y,
            (x, 1) => x,
            _ => {
                return Err(Error::shape(
                    op,
                    param,
                    format!("a shape that broadcasts with {a:?}"),
                    b,
                ))
            }
        });
    }
    Ok(())
}

/// Flat index into a tensor of `shape` for the multi-index of flat position `i` in the
/// broadcast shape `full` (dims of size 1 in `shape` repeat).
pub(crate) fn broadcast_index(full: &[usize], shape: &[usize], mut i: usize) -> usize {
    let mut idx = 0;
    let mut stride = 1;
    for d in (0..full.len()).rev() {
        let coord = i % full[d];
        i /= full[d];
        let sd = d as isize - (full.len() - shape.len()) as isize;
        if sd >= 0 {
            let len = shape[sd as usize];
            if len != 1 {
                idx += coord * stride;
            }
            stride *= len;
        }
    }
    idx
}

/// Runs a matmul kernel on `m` rows of f32 `x` against one matrix, into `out` bytes.
pub(crate) fn run_qmm(
    kernel: &CpuKernel,
    x: &[f32],
    m: usize,
    w: MatrixRef<'_>,
    out: &mut [u8],
) -> Result<()> {
    match kernel.func {
        crate::backend::cpu::KernelFn::Qmm(f) => {
            f(crate::backend::cpu::qmm::QmmArgs { x, m, w, out })
        }
        _ => Err(Error::unsupported(
            "quantized_matmul",
            format!("kernel {} for a matmul", kernel.name),
        )),
    }
}

/// The output dtype of a matmul: MLX's `promote(x, scales)` for affine, x's dtype for the FP
/// modes (whose scales are uint8).
pub(crate) fn matmul_out_dtype(op: &'static str, x: DType, w: &QuantizedWeight) -> Result<DType> {
    if !x.is_float() {
        return Err(Error::dtype(op, "x", "float32, float16 or bfloat16", x));
    }
    Ok(if w.spec().has_biases() {
        x.promote(w.scales_dtype()).unwrap_or(x)
    } else {
        x
    })
}
