//! `gather_qmm`: `out[i] = x[lhs[i]] · W[rhs[i]]ᵀ` over broadcast index tensors (MoE).
//!
//! Pairs are grouped by expert (a counting sort, stable, so `sorted` input is already grouped
//! and costs one pass): each selected expert's weights are read once per call, with all rows
//! routed to it gathered into one matmul.

use super::embedding::read_indices_into;
use super::matmul::qmm_kernel;
use super::{
    broadcast_index, broadcast_shapes_into, matmul_out_dtype, matrix, require_nonzero, require_out,
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
    /// The calling thread's shapes and index lists, kept from call to call.
    static LISTS: std::cell::RefCell<Lists> = std::cell::RefCell::new(Lists::default());
}

/// A call's shapes and index lists. Kept per calling thread (taken for the length of a call)
/// so that a warm call allocates none of them.
#[derive(Default)]
struct Lists {
    shapes: Shapes,
    sort: Sort,
}

/// The broadcast shapes of a call, and the index values read on the host (CPU devices).
#[derive(Default)]
struct Shapes {
    index: Vec<usize>,
    lhs: Vec<usize>,
    rhs: Vec<usize>,
    out: Vec<usize>,
    lhs_values: Vec<usize>,
    rhs_values: Vec<usize>,
}

/// The pairs grouped by expert (CPU devices): `order[starts[e]..starts[e + 1]]` are expert
/// `e`'s pairs in their original order, `used` the experts with at least one.
#[derive(Default)]
struct Sort {
    starts: Vec<usize>,
    order: Vec<usize>,
    used: Vec<usize>,
}

/// Runs `f` with the calling thread's lists (taken out of the thread-local for the call).
fn with_lists<R>(f: impl FnOnce(&mut Lists) -> R) -> R {
    let mut lists = LISTS.with(|l| {
        l.try_borrow_mut()
            .map(|mut l| std::mem::take(&mut *l))
            .unwrap_or_default()
    });
    let r = f(&mut lists);
    LISTS.with(|l| {
        if let Ok(mut l) = l.try_borrow_mut() {
            *l = lists;
        }
    });
    r
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
    with_lists(|l| {
        let p = plan(
            enc,
            x,
            w,
            lhs_indices,
            rhs_indices,
            transpose,
            &mut l.shapes,
        )?;
        let mut out = Buffer::uninit_on(enc.device(), p.out_dtype, &l.shapes.out)?;
        run(enc, x, w, &p, l, &mut out)?;
        Ok(out)
    })
}

/// [`gather_qmm`] into a caller-owned output of the right shape (`I + [M, N]`) and dtype, so
/// a Mixture-of-Experts decode step allocates nothing per call once warm: the index lists and
/// shapes are kept per calling thread, and on CUDA (indices on the device) the step can be
/// captured into a graph. Every element of `out` is written.
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
    with_lists(|l| {
        let p = plan(
            enc,
            x,
            w,
            lhs_indices,
            rhs_indices,
            transpose,
            &mut l.shapes,
        )?;
        require_out(OP, out, p.out_dtype, &l.shapes.out)?;
        enc.check_location(OP, "out", out)?;
        run(enc, x, w, &p, l, out)
    })
}

/// What [`gather_qmm`] makes of its arguments (the shapes and host index values are in
/// [`Shapes`]).
struct Plan<'a> {
    /// The index tensors (the CUDA kernels read them on the device).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    lhs_indices: Option<&'a Buffer>,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    rhs_indices: Option<&'a Buffer>,
    transpose: bool,
    out_dtype: crate::DType,
    in_dim: usize,
    out_dim: usize,
    m: usize,
    /// Number of x matrices (bound of lhs values; the CUDA kernels check them).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    x_count: usize,
}

fn plan<'a>(
    enc: &CommandEncoder,
    x: &Buffer,
    w: &QuantizedWeight,
    lhs_indices: Option<&'a Buffer>,
    rhs_indices: Option<&'a Buffer>,
    transpose: bool,
    s: &mut Shapes,
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
    if !on_cuda(enc) {
        let w_count = w.batch_size();
        match lhs_indices {
            Some(b) => {
                enc.check_location(OP, "lhs_indices", b)?;
                read_indices_into(OP, "lhs_indices", b, x_count, &mut s.lhs_values)?;
            }
            None => {
                s.lhs_values.clear();
                s.lhs_values.extend(0..x_count);
            }
        }
        match rhs_indices {
            Some(b) => {
                enc.check_location(OP, "rhs_indices", b)?;
                read_indices_into(OP, "rhs_indices", b, w_count, &mut s.rhs_values)?;
            }
            None => {
                s.rhs_values.clear();
                s.rhs_values.extend(0..w_count);
            }
        }
    }
    s.lhs.clear();
    s.lhs
        .extend_from_slice(lhs_indices.map_or(x_batch, Buffer::shape));
    s.rhs.clear();
    s.rhs
        .extend_from_slice(rhs_indices.map_or(w.batch_shape(), Buffer::shape));
    broadcast_shapes_into(OP, "rhs_indices", &s.lhs, &s.rhs, &mut s.index)?;
    s.out.clear();
    s.out.extend_from_slice(&s.index);
    s.out.extend([m, out_dim]);
    Ok(Plan {
        lhs_indices,
        rhs_indices,
        transpose,
        out_dtype,
        in_dim,
        out_dim,
        m,
        x_count,
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

/// The output's rows, shared by the experts' jobs: each row belongs to one pair and each pair
/// to one expert, so no two jobs write the same row.
struct OutRows {
    ptr: *mut u8,
    row_bytes: usize,
    rows: usize,
}

// SAFETY: the rows are plain bytes; `row`'s contract keeps each written by one thread.
unsafe impl Sync for OutRows {}

impl OutRows {
    /// Row `i` of the output (`None` past the last).
    ///
    /// # Safety
    /// No other reference to row `i` may be alive while the returned one is.
    #[allow(clippy::mut_from_ref)]
    unsafe fn row(&self, i: usize) -> Option<&mut [u8]> {
        // SAFETY: `i < rows`, so the row lies within the output's `rows * row_bytes` bytes,
        // which outlive `self`; exclusive by the caller's contract.
        (i < self.rows).then(|| unsafe {
            std::slice::from_raw_parts_mut(self.ptr.add(i * self.row_bytes), self.row_bytes)
        })
    }
}

fn run(
    enc: &mut CommandEncoder,
    x: &Buffer,
    w: &QuantizedWeight,
    p: &Plan<'_>,
    lists: &mut Lists,
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
    let s = &lists.shapes;
    #[cfg(feature = "cuda")]
    if on_cuda(enc) {
        // Indices stay on the device: the kernel resolves them (an out-of-range one is
        // reported by the next `commit_and_wait`).
        let job = crate::backend::cuda::launch::MatmulJob {
            batch: &s.index,
            lhs_shape: &s.lhs,
            rhs_shape: &s.rhs,
            lhs: p.lhs_indices,
            rhs: p.rhs_indices,
            x_count: p.x_count,
            m,
            transpose,
        };
        return crate::backend::cuda::launch::qmm(enc, OP, x, w, out, &job);
    }

    // Not on CUDA (returned above), so `plan` read the index values.
    let (lhs, rhs) = (&s.lhs_values, &s.rhs_values);
    let pairs = checked_product(OP, "index count", s.index.iter().copied())?;

    // Counting sort of the pairs by expert: count, prefix sums, then place each pair at its
    // expert's cursor (which leaves starts[e] at expert e's end; shifted back after).
    let Sort {
        starts,
        order,
        used,
    } = &mut lists.sort;
    let expert = |i: usize| rhs[broadcast_index(&s.index, &s.rhs, i)];
    starts.clear();
    starts.resize(w_count + 1, 0);
    for i in 0..pairs {
        starts[expert(i) + 1] += 1;
    }
    for e in 0..w_count {
        starts[e + 1] += starts[e];
    }
    order.clear();
    order.resize(pairs, 0);
    for i in 0..pairs {
        let e = expert(i);
        order[starts[e]] = i;
        starts[e] += 1;
    }
    starts.copy_within(0..w_count, 1);
    starts[0] = 0;
    used.clear();
    used.extend((0..w_count).filter(|&e| starts[e + 1] > starts[e]));
    let (starts, order) = (&*starts, &*order);

    // The kernel writes the output dtype directly (a bf16 output takes the integer-dot
    // kernel, an f32 one would not), into per-expert rows that are then copied into place.
    let kernel = qmm_kernel(enc, x.dtype(), w, out_dtype, transpose)?;
    let xf = widen(OP, "x", x)?;
    let xm = m * in_dim;
    let row_bytes = m * out_dim * out_dtype.size();
    let out_bytes = out.bytes_mut()?;
    let rows = OutRows {
        ptr: out_bytes.as_mut_ptr(),
        row_bytes,
        rows: out_bytes.len() / row_bytes,
    };
    // Experts run concurrently (each kernel is itself parallel over its columns), so a
    // decode step's k small matmuls share the cores instead of queueing one after another.
    // Each expert's job writes its pairs' output rows from the kernel's contiguous rows.
    used.par_iter()
        .map(|&e| {
            // Per-thread scratch, reused from call to call (taken for the length of this job;
            // a job that runs nested on the same thread meanwhile makes its own).
            let (mut xs, mut ys) = SCRATCH.with(|s| std::mem::take(&mut *s.borrow_mut()));
            let members = &order[starts[e]..starts[e + 1]];
            xs.clear();
            for &i in members {
                let xi = lhs[broadcast_index(&s.index, &s.lhs, i)];
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
                for (&i, y) in members.iter().zip(ys.chunks_exact(row_bytes)) {
                    // SAFETY: pair i is one of this expert's members, and `order` lists each
                    // pair once, so no other job holds row i.
                    if let Some(dst) = unsafe { rows.row(i) } {
                        dst.copy_from_slice(y);
                    }
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
