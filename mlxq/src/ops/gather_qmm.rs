//! `gather_qmm`: `out[i] = x[lhs[i]] · W[rhs[i]]ᵀ` over broadcast index tensors (MoE).
//!
//! Pairs are grouped by expert (a counting sort, stable, so `sorted` input is already grouped
//! and costs one pass): each selected expert's weights are read once per call, with all rows
//! routed to it gathered into one matmul.

use super::embedding::read_indices;
use super::matmul::qmm_kernel;
use super::{
    broadcast_index, broadcast_shapes, matmul_out_dtype, matrix, require_nonzero, run_qmm, widen,
};
use crate::dtype::Float;
use crate::error::{checked_product, Error, Result};
use crate::{Buffer, CommandEncoder, DType, QuantizedWeight};

const OP: &str = "gather_qmm";

/// Batched matmul with index gathers on both sides.
///
/// `x` is `[..xb, M, K]` (at least 2-D), `w` `[..wb, N, K]` (transpose) or `[..wb, K, N]`.
/// `lhs_indices` (default: every x batch, shaped as x's batch dims) index x's flattened batch,
/// `rhs_indices` (default: every expert, shaped as w's batch dims) index w's; both are
/// uint32/int32 and broadcast together to the index shape `I`. The output is `I + [M, N]` of
/// dtype `promote(x, scales)`. `sorted` says `rhs_indices` is sorted; results do not depend on
/// it. An index out of range is an error naming its position.
pub fn gather_qmm(
    enc: &mut CommandEncoder,
    x: &Buffer,
    w: &QuantizedWeight,
    lhs_indices: Option<&Buffer>,
    rhs_indices: Option<&Buffer>,
    transpose: bool,
    sorted: bool,
) -> Result<Buffer> {
    let _ = sorted; // grouping below is stable, so sorted input needs no special path
    enc.check_location(OP, "x", x)?;
    enc.check_location(OP, "w", w.packed())?;
    let out_dtype = matmul_out_dtype(OP, x.dtype(), w)?;
    let (in_dim, out_dim) = if transpose {
        (w.cols(), w.rows())
    } else {
        (w.rows(), w.cols())
    };
    let xs = x.shape();
    if xs.len() < 2 {
        return Err(Error::shape(
            OP,
            "x",
            format!("at least 2 dimensions [..batch, M, {in_dim}]"),
            xs,
        ));
    }
    if xs.last() != Some(&in_dim) {
        return Err(Error::shape(
            OP,
            "x",
            format!("last dimension {in_dim}"),
            xs,
        ));
    }
    require_nonzero(OP, "x", xs)?;
    let x_batch = &xs[..xs.len() - 2];
    let m = xs[xs.len() - 2];
    let x_count = checked_product(OP, "x batch", x_batch.iter().copied())?;
    let w_count = w.batch_size();

    let (lhs, lhs_shape) = match lhs_indices {
        Some(b) => {
            enc.check_location(OP, "lhs_indices", b)?;
            (
                read_indices(OP, "lhs_indices", b, x_count)?,
                b.shape().to_vec(),
            )
        }
        None => ((0..x_count).collect(), x_batch.to_vec()),
    };
    let (rhs, rhs_shape) = match rhs_indices {
        Some(b) => {
            enc.check_location(OP, "rhs_indices", b)?;
            (
                read_indices(OP, "rhs_indices", b, w_count)?,
                b.shape().to_vec(),
            )
        }
        None => ((0..w_count).collect(), w.batch_shape().to_vec()),
    };
    let index_shape = broadcast_shapes(OP, "rhs_indices", &lhs_shape, &rhs_shape)?;
    let pairs = checked_product(OP, "index count", index_shape.iter().copied())?;
    let mut out_shape = index_shape.clone();
    out_shape.extend([m, out_dim]);
    let mut out = Buffer::zeros(out_dtype, &out_shape)?;
    if pairs == 0 {
        return Ok(out);
    }

    // Counting sort of output positions by expert.
    let expert_of: Vec<usize> = (0..pairs)
        .map(|i| rhs[broadcast_index(&index_shape, &rhs_shape, i)])
        .collect();
    let mut starts = vec![0usize; w_count + 1];
    for &e in &expert_of {
        starts[e + 1] += 1;
    }
    for e in 0..w_count {
        starts[e + 1] += starts[e];
    }
    let mut order = vec![0usize; pairs];
    let mut fill = starts.clone();
    for (i, &e) in expert_of.iter().enumerate() {
        order[fill[e]] = i;
        fill[e] += 1;
    }

    let kernel = qmm_kernel(enc, x.dtype(), w, DType::F32, transpose)?;
    let xf = widen(OP, "x", x)?;
    let xm = m * in_dim;
    let mut xs_buf: Vec<f32> = Vec::new();
    let mut ys_buf: Vec<f32> = Vec::new();
    let out_bytes = out.bytes_mut()?;
    let row_bytes = m * out_dim * out_dtype.size();
    for e in 0..w_count {
        let members = &order[starts[e]..starts[e + 1]];
        if members.is_empty() {
            continue;
        }
        xs_buf.clear();
        for &i in members {
            let xi = lhs[broadcast_index(&index_shape, &lhs_shape, i)];
            xs_buf.extend_from_slice(&xf[xi * xm..(xi + 1) * xm]);
        }
        ys_buf.clear();
        ys_buf.resize(members.len() * m * out_dim, 0.0);
        run_qmm(
            &kernel,
            &xs_buf,
            members.len() * m,
            matrix(w, e),
            bytemuck::cast_slice_mut(&mut ys_buf),
        )?;
        for (&i, y) in members.iter().zip(ys_buf.chunks_exact(m * out_dim)) {
            store(
                out_dtype,
                y,
                &mut out_bytes[i * row_bytes..(i + 1) * row_bytes],
            )?;
        }
    }
    enc.record(&kernel.name);
    Ok(out)
}

/// Narrows f32 values into raw bytes of `dtype`.
fn store(dtype: DType, src: &[f32], dst: &mut [u8]) -> Result<()> {
    crate::with_float_type!(dtype, T => {
        for (d, &v) in dst.chunks_exact_mut(dtype.size()).zip(src) {
            d.copy_from_slice(bytemuck::bytes_of(&T::from_f32(v)));
        }
        Ok(())
    }, _ => Err(Error::dtype(OP, "out", "a float dtype", dtype)))
}
