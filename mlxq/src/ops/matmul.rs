//! `quantized_matmul`: `y = x · Wᵀ` (transpose) or `y = x · W`, MLX's shapes and dtypes.

use super::{
    broadcast_index, broadcast_shapes, matmul_out_dtype, matrix, require_nonzero, run_qmm, widen,
};
use crate::backend::cpu::{self, CpuKernel};
use crate::error::{Error, Result};
use crate::registry::{KernelKey, OpKind};
use crate::{Buffer, CommandEncoder, DType, QuantizedWeight};

const OP: &str = "quantized_matmul";

/// The problem after validation: everything the kernels need to know.
pub(crate) struct Plan {
    /// Dimension of x's rows (K).
    pub in_dim: usize,
    /// Dimension of the output rows (N).
    pub out_dim: usize,
    /// Rows per batch matrix (all rows when W is 2-D).
    pub m: usize,
    /// Broadcast batch shape (empty when W is 2-D).
    pub batch: Vec<usize>,
    /// x's batch shape.
    pub x_batch: Vec<usize>,
    /// The output dtype.
    pub out_dtype: DType,
}

impl Plan {
    /// The output's dimensions before its last (N), for x of shape `xs`: x's leading ones
    /// against a 2-D W, the broadcast batch and M against a batched W.
    fn out_lead<'a>(&'a self, xs: &'a [usize]) -> (&'a [usize], Option<usize>) {
        if self.batch.is_empty() {
            (&xs[..xs.len().saturating_sub(1)], None)
        } else {
            (&self.batch, Some(self.m))
        }
    }

    /// The output shape for x of shape `xs`.
    pub fn out_shape(&self, xs: &[usize]) -> Vec<usize> {
        let (lead, m) = self.out_lead(xs);
        lead.iter()
            .copied()
            .chain(m)
            .chain([self.out_dim])
            .collect()
    }

    /// Whether `shape` is [`Plan::out_shape`], compared without building it (a decode
    /// loop's `quantized_matmul_into` allocates nothing).
    pub fn is_out_shape(&self, xs: &[usize], shape: &[usize]) -> bool {
        let (lead, m) = self.out_lead(xs);
        shape.len() == lead.len() + usize::from(m.is_some()) + 1
            && shape.starts_with(lead)
            && shape[lead.len()..]
                .iter()
                .copied()
                .eq(m.into_iter().chain([self.out_dim]))
    }
}

pub(crate) fn plan(
    op: &'static str,
    x: &Buffer,
    w: &QuantizedWeight,
    transpose: bool,
) -> Result<Plan> {
    let out_dtype = matmul_out_dtype(op, x.dtype(), w)?;
    let (in_dim, out_dim) = if transpose {
        (w.cols(), w.rows())
    } else {
        (w.rows(), w.cols())
    };
    let xs = x.shape();
    if xs.last() != Some(&in_dim) {
        let what = if transpose {
            "K = W's columns"
        } else {
            "K = W's rows"
        };
        return Err(Error::shape(
            op,
            "x",
            format!("last dimension {in_dim} ({what})"),
            xs,
        ));
    }
    require_nonzero(op, "x", xs)?;
    let nd = xs.len();
    if w.batch_shape().is_empty() {
        return Ok(Plan {
            in_dim,
            out_dim,
            m: x.numel() / in_dim,
            batch: vec![],
            x_batch: vec![],
            out_dtype,
        });
    }
    if nd < 3 {
        // MLX silently uses W[0] here; a caller who does this almost certainly has a bug.
        return Err(Error::shape(
            op,
            "x",
            format!(
                "at least 3 dimensions [..batch, M, {in_dim}] against a batched W {:?}",
                w.shape()
            ),
            xs,
        ));
    }
    let x_batch = xs[..nd - 2].to_vec();
    let batch = broadcast_shapes(op, "x", w.batch_shape(), &x_batch)?;
    let m = xs[nd - 2];
    Ok(Plan {
        in_dim,
        out_dim,
        m,
        batch,
        x_batch,
        out_dtype,
    })
}

/// The matmul kernel for `w` with x widened to f32 and output `out`.
pub(crate) fn qmm_kernel(
    enc: &CommandEncoder,
    x: DType,
    w: &QuantizedWeight,
    out: DType,
    transpose: bool,
) -> Result<CpuKernel> {
    let spec = w.spec();
    let key = KernelKey {
        op: OpKind::QuantizedMatmul,
        mode: spec.mode(),
        bits: spec.bits(),
        group_size: spec.group_size(),
        input: x,
        scales: w.scales_dtype(),
        output: out,
        flag: transpose,
        variant: crate::registry::AUTO,
    };
    cpu::kernel(enc.device(), key)
}

/// `y = x · Wᵀ` when `transpose` (W `[..., N, K]`), else `y = x · W` (W `[..., K, N]`).
///
/// x is `[..., K]` (any leading dims against a 2-D W; `[..batch, M, K]` against a batched W,
/// whose batch dims broadcast with x's). Output `[..., N]` of dtype `promote(x, scales)`;
/// accumulation is f32.
pub fn quantized_matmul(
    enc: &mut CommandEncoder,
    x: &Buffer,
    w: &QuantizedWeight,
    transpose: bool,
) -> Result<Buffer> {
    let p = plan(OP, x, w, transpose)?;
    let mut out = Buffer::uninit_on(enc.device(), p.out_dtype, &p.out_shape(x.shape()))?;
    execute(enc, x, w, transpose, &p, &mut out)?;
    Ok(out)
}

/// [`quantized_matmul`] into a caller-owned output of the right shape and dtype, so a decode
/// loop allocates nothing per call.
pub fn quantized_matmul_into(
    enc: &mut CommandEncoder,
    x: &Buffer,
    w: &QuantizedWeight,
    transpose: bool,
    out: &mut Buffer,
) -> Result<()> {
    let p = plan(OP, x, w, transpose)?;
    if out.dtype() != p.out_dtype || !p.is_out_shape(x.shape(), out.shape()) {
        // The error path builds the expected shape to name it.
        super::require_out(OP, out, p.out_dtype, &p.out_shape(x.shape()))?;
    }
    execute(enc, x, w, transpose, &p, out)
}

fn execute(
    enc: &mut CommandEncoder,
    x: &Buffer,
    w: &QuantizedWeight,
    transpose: bool,
    p: &Plan,
    out: &mut Buffer,
) -> Result<()> {
    enc.check_location(OP, "x", x)?;
    enc.check_location(OP, "w", w.packed())?;
    enc.check_location(OP, "out", out)?;
    #[cfg(feature = "cuda")]
    if enc.device().cuda_state().is_ok() {
        let job = crate::backend::cuda::launch::MatmulJob {
            batch: &p.batch,
            lhs_shape: &p.x_batch,
            rhs_shape: w.batch_shape(),
            lhs: None,
            rhs: None,
            x_count: p.x_batch.iter().product(),
            m: p.m,
            transpose,
        };
        return crate::backend::cuda::launch::qmm(enc, OP, x, w, out, &job);
    }
    let kernel = qmm_kernel(enc, x.dtype(), w, p.out_dtype, transpose)?;
    let xf = widen(OP, "x", x)?;
    let out_bytes = out.bytes_mut()?;
    let (xm, om) = (p.m * p.in_dim, p.m * p.out_dim * p.out_dtype.size());
    if p.batch.is_empty() {
        run_qmm(&kernel, &xf, p.m, matrix(w, 0), out_bytes)?;
    } else {
        for (b, dst) in out_bytes.chunks_exact_mut(om).enumerate() {
            let xi = broadcast_index(&p.batch, &p.x_batch, b);
            let wi = broadcast_index(&p.batch, w.batch_shape(), b);
            run_qmm(
                &kernel,
                &xf[xi * xm..(xi + 1) * xm],
                p.m,
                matrix(w, wi),
                dst,
            )?;
        }
    }
    enc.record(kernel.name_for_rows(p.m));
    Ok(())
}
