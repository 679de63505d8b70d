//! Quantized embedding lookup: gather rows of a quantized table, then dequantize them
//! (MLX's `QuantizedEmbedding`; equal to dequantizing the table and gathering).

use super::dequantize::{dequantize_kernel, DequantizeOptions};
use super::{matrix, require_nonzero};
use crate::backend::cpu::dequantize::DequantizeArgs;
use crate::error::{Error, Result};
use crate::{Buffer, CommandEncoder, QuantizedWeight};

const OP: &str = "embedding";

/// Reads the signed or unsigned 32-bit `ids` as indices below `bound`, naming the first bad one.
pub(crate) fn read_indices(
    op: &'static str,
    param: &'static str,
    ids: &Buffer,
    bound: usize,
) -> Result<Vec<usize>> {
    let mut out = Vec::with_capacity(ids.numel());
    read_indices_into(op, param, ids, bound, &mut out)?;
    Ok(out)
}

/// [`read_indices`] into `out` (cleared first), so a caller that keeps `out` allocates nothing.
pub(crate) fn read_indices_into(
    op: &'static str,
    param: &'static str,
    ids: &Buffer,
    bound: usize,
    out: &mut Vec<usize>,
) -> Result<()> {
    ids.require_host(op)?;
    let signed = match ids.dtype() {
        crate::DType::U32 => false,
        crate::DType::I32 => true,
        d => return Err(Error::dtype(op, param, "uint32 or int32", d)),
    };
    out.clear();
    // Read unaligned: a mapped view need not be aligned for 32-bit values.
    for (position, raw) in ids.bytes().chunks_exact(4).enumerate() {
        let index = if signed {
            i64::from(bytemuck::pod_read_unaligned::<i32>(raw))
        } else {
            i64::from(bytemuck::pod_read_unaligned::<u32>(raw))
        };
        let i =
            usize::try_from(index)
                .ok()
                .filter(|&i| i < bound)
                .ok_or(Error::IndexOutOfRange {
                    op,
                    param,
                    position,
                    index,
                    bound,
                })?;
        out.push(i);
    }
    Ok(())
}

/// Looks up rows `ids` (uint32/int32, any shape) of the 2-D quantized table `w` (`[vocab, dim]`)
/// and returns them dequantized: shape `ids.shape() + [dim]`.
pub fn embedding(
    enc: &mut CommandEncoder,
    w: &QuantizedWeight,
    ids: &Buffer,
    opts: DequantizeOptions,
) -> Result<Buffer> {
    enc.check_location(OP, "ids", ids)?;
    if !w.batch_shape().is_empty() {
        return Err(Error::shape(OP, "w", "a 2-D table [vocab, dim]", w.shape()));
    }
    require_nonzero(OP, "ids", ids.shape())?;
    let rows = read_indices(OP, "ids", ids, w.rows())?;
    let (kernel, f, out_dtype) = dequantize_kernel(enc, w, opts)?;
    let dim = w.cols();
    let mut shape = ids.shape().to_vec();
    shape.push(dim);
    let mut out = Buffer::zeros(out_dtype, &shape)?;
    let row_out = dim * out_dtype.size();
    let table = matrix(w, 0);
    let (pb, sb) = (table.row_bytes(), table.groups() * w.scales_dtype().size());
    for (dst, &r) in out.bytes_mut()?.chunks_exact_mut(row_out).zip(&rows) {
        let row = crate::backend::cpu::MatrixRef {
            packed: &table.packed[r * pb..(r + 1) * pb],
            scales: &table.scales[r * sb..(r + 1) * sb],
            biases: table.biases.get(r * sb..(r + 1) * sb).unwrap_or(&[]),
            rows: 1,
            ..table
        };
        f(DequantizeArgs {
            w: row,
            flavour: opts.flavour,
            out: dst,
        })?;
    }
    enc.record(&kernel.name);
    Ok(out)
}
