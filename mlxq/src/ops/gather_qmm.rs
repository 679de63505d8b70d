//! `gather_qmm`: `out[i] = x[lhs[i]] · W[rhs[i]]ᵀ` over broadcast index tensors (MoE).
//!
//! Pairs are grouped by expert (a counting sort, stable, so `sorted` input is already grouped
//! and costs one pass): each selected expert's weights are read once per call, with all rows
//! routed to it gathered into one matmul.

use super::embedding::read_indices;
use super::matmul::qmm_kernel;
use super::{
    broadcast_index, broadcast_shapes, matmul_out_dtype, matrix, require_nonzero, require_out,
    run_qmm, widen,
};
use crate::error::{checked_product, Error, Result};
use crate::{Buffer, CommandEncoder, QuantizedWeight};
use rayon::prelude::*;

const OP: &str = "gather_qmm";

thread_local! {
    /// An expert's gathered x rows and its output rows (f32 storage), per thread.
    static SCRATCH: std::cell::RefCell<(Vec<f32>, Vec<f32>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

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
    let _ = sorted; // grouping is stable, so sorted input needs no special path
    let p = plan(enc, x, w, lhs_indices, rhs_indices, transpose)?;
    let mut out = Buffer::uninit_on(enc.device(), p.out_dtype, &p.out_shape)?;
    run(enc, x, w, &p, &mut out)?;
    Ok(out)
}

/// [`gather_qmm`] into a caller-owned output of the right shape (`I + [M, N]`) and dtype, so
/// a Mixture-of-Experts decode step allocates no output per call and, on CUDA (indices on the
/// device), can be captured into a graph. (On the CPU it still makes a few small vectors a
/// call: the index values read, their order by expert, each expert's rows.) Every element of
/// `out` is written.
#[allow(clippy::too_many_arguments)]
pub fn gather_qmm_into(
    enc: &mut CommandEncoder,
    x: &Buffer,
    w: &QuantizedWeight,
    lhs_indices: Option<&Buffer>,
    rhs_indices: Option<&Buffer>,
    transpose: bool,
    sorted: bool,
    out: &mut Buffer,
) -> Result<()> {
    let _ = sorted; // grouping is stable, so sorted input needs no special path
    let p = plan(enc, x, w, lhs_indices, rhs_indices, transpose)?;
    require_out(OP, out, p.out_dtype, &p.out_shape)?;
    enc.check_location(OP, "out", out)?;
    run(enc, x, w, &p, out)
}

/// What [`gather_qmm`] makes of its arguments (on the host, the index values read).
struct Plan<'a> {
    /// The index tensors (the CUDA kernels read them on the device).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    lhs_indices: Option<&'a Buffer>,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    rhs_indices: Option<&'a Buffer>,
    transpose: bool,
    out_dtype: crate::DType,
    out_shape: Vec<usize>,
    index_shape: Vec<usize>,
    lhs_shape: Vec<usize>,
    rhs_shape: Vec<usize>,
    in_dim: usize,
    out_dim: usize,
    m: usize,
    /// Number of x matrices (bound of lhs values; the CUDA kernels check them).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    x_count: usize,
    /// The lhs and rhs index values, read on the host (CPU devices).
    host_indices: Option<(Vec<usize>, Vec<usize>)>,
}

fn plan<'a>(
    enc: &CommandEncoder,
    x: &Buffer,
    w: &QuantizedWeight,
    lhs_indices: Option<&'a Buffer>,
    rhs_indices: Option<&'a Buffer>,
    transpose: bool,
) -> Result<Plan<'a>> {
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
    // On the host the index values are read (and checked) here, before the shapes are
    // broadcast; on CUDA the kernels read them.
    let host_indices = if on_cuda(enc) {
        None
    } else {
        let w_count = w.batch_size();
        let lhs = match lhs_indices {
            Some(b) => {
                enc.check_location(OP, "lhs_indices", b)?;
                read_indices(OP, "lhs_indices", b, x_count)?
            }
            None => (0..x_count).collect(),
        };
        let rhs = match rhs_indices {
            Some(b) => {
                enc.check_location(OP, "rhs_indices", b)?;
                read_indices(OP, "rhs_indices", b, w_count)?
            }
            None => (0..w_count).collect(),
        };
        Some((lhs, rhs))
    };
    let lhs_shape = lhs_indices.map_or(x_batch, Buffer::shape).to_vec();
    let rhs_shape = rhs_indices.map_or(w.batch_shape(), Buffer::shape).to_vec();
    let index_shape = broadcast_shapes(OP, "rhs_indices", &lhs_shape, &rhs_shape)?;
    let mut out_shape = index_shape.clone();
    out_shape.extend([m, out_dim]);
    Ok(Plan {
        lhs_indices,
        rhs_indices,
        transpose,
        out_dtype,
        out_shape,
        index_shape,
        lhs_shape,
        rhs_shape,
        in_dim,
        out_dim,
        m,
        x_count,
        host_indices,
    })
}

/// Whether `enc` runs on a CUDA device.
fn on_cuda(enc: &CommandEncoder) -> bool {
    #[cfg(feature = "cuda")]
    {
        enc.device().cuda_state().is_ok()
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = enc;
        false
    }
}

fn run(
    enc: &mut CommandEncoder,
    x: &Buffer,
    w: &QuantizedWeight,
    p: &Plan<'_>,
    out: &mut Buffer,
) -> Result<()> {
    enc.check_location(OP, "x", x)?;
    enc.check_location(OP, "w", w.packed())?;
    let (in_dim, out_dim, m, transpose) = (p.in_dim, p.out_dim, p.m, p.transpose);
    let out_dtype = p.out_dtype;
    let w_count = w.batch_size();
    if out.numel() == 0 {
        return Ok(());
    }
    #[cfg(feature = "cuda")]
    if on_cuda(enc) {
        // Indices stay on the device: the kernel resolves them (an out-of-range one is
        // reported by the next `commit_and_wait`).
        let job = crate::backend::cuda::launch::MatmulJob {
            batch: &p.index_shape,
            lhs_shape: &p.lhs_shape,
            rhs_shape: &p.rhs_shape,
            lhs: p.lhs_indices,
            rhs: p.rhs_indices,
            x_count: p.x_count,
            m,
            transpose,
        };
        return crate::backend::cuda::launch::qmm(enc, OP, x, w, out, &job);
    }

    let (lhs, rhs) = p.host_indices.as_ref().ok_or_else(|| {
        Error::unsupported(OP, "index values not read on this device".to_string())
    })?;
    let (index_shape, lhs_shape, rhs_shape) = (&p.index_shape, &p.lhs_shape, &p.rhs_shape);
    let pairs = checked_product(OP, "index count", index_shape.iter().copied())?;

    // Counting sort of output positions by expert.
    let expert_of: Vec<usize> = (0..pairs)
        .map(|i| rhs[broadcast_index(index_shape, rhs_shape, i)])
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

    // The kernel writes the output dtype directly (a bf16 output takes the integer-dot
    // kernel, an f32 one would not), into per-expert rows that are then copied into place.
    let kernel = qmm_kernel(enc, x.dtype(), w, out_dtype, transpose)?;
    let xf = widen(OP, "x", x)?;
    let xm = m * in_dim;
    let row_bytes = m * out_dim * out_dtype.size();
    // Experts run concurrently (each kernel is itself parallel over its columns), so a
    // decode step's k small matmuls share the cores instead of queueing one after another.
    // Each expert's job owns its pairs' output rows (every pair belongs to one expert) and
    // writes them from the kernel's contiguous rows.
    let used: Vec<usize> = (0..w_count)
        .filter(|&e| starts[e + 1] > starts[e])
        .collect();
    let out_bytes = out.bytes_mut()?;
    let mut rows: Vec<Option<&mut [u8]>> =
        out_bytes.chunks_exact_mut(row_bytes).map(Some).collect();
    let jobs: Vec<(usize, Vec<&mut [u8]>)> = used
        .iter()
        .map(|&e| {
            let own = order[starts[e]..starts[e + 1]]
                .iter()
                .filter_map(|&i| rows[i].take())
                .collect();
            (e, own)
        })
        .collect();
    jobs.into_par_iter()
        .map(|(e, own)| {
            // Per-thread scratch, reused from call to call (taken for the length of this job;
            // a job that runs nested on the same thread meanwhile makes its own).
            let (mut xs, mut ys) = SCRATCH.with(|s| std::mem::take(&mut *s.borrow_mut()));
            let members = &order[starts[e]..starts[e + 1]];
            xs.clear();
            for &i in members {
                let xi = lhs[broadcast_index(index_shape, lhs_shape, i)];
                xs.extend_from_slice(&xf[xi * xm..(xi + 1) * xm]);
            }
            // f32 storage keeps the bytes aligned for any output dtype.
            let bytes = members.len() * row_bytes;
            ys.clear();
            ys.resize(bytes.div_ceil(4), 0.0);
            let done = run_qmm(
                &kernel,
                &xs,
                members.len() * m,
                matrix(w, e),
                &mut bytemuck::cast_slice_mut(&mut ys)[..bytes],
            );
            if done.is_ok() {
                let ys: &[u8] = bytemuck::cast_slice(&ys);
                for (dst, y) in own.into_iter().zip(ys.chunks_exact(row_bytes)) {
                    dst.copy_from_slice(y);
                }
            }
            SCRATCH.with(|s| *s.borrow_mut() = (xs, ys));
            done
        })
        .collect::<Result<()>>()?;
    // The largest expert's call names the kernel (fewer rows may take a decode kernel).
    let most = used.iter().map(|&e| starts[e + 1] - starts[e]).max();
    enc.record(kernel.name_for_rows(most.unwrap_or(0) * m));
    Ok(())
}
