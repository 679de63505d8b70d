//! MLX's FP modes (mxfp4, mxfp8, nvfp4) on CUDA: quantize, dequantize and the quantized matmul
//! (`kernels/fp.cu`), reached from [`super::launch`]'s entry points when a weight's mode is
//! not affine. quantize and dequantize are bit for bit those of `quant::fp` in either flavour;
//! the matmul decodes each group's elements, applies the scale as MLX's CPU matmul reads it
//! (rounded to x's dtype) and accumulates in f32, for both layouts of W and any batch (the
//! index tensors of `gather_qmm` included). Its kernels run on the CUDA cores, a warp per row
//! (or 8 columns) of W: correct everywhere, not tuned like the affine decode. Prefill and the
//! many-token gather take the affine path's wgmma tiles instead where they serve the call
//! (`launch::qmm`, the `fp_tiles` module: qmm_wg.cu with `FPM`).

use super::launch::{aligned, cfg, finish, grid_x, ptr, Batch, MatmulJob};
use super::{driver, CudaDevice};
use crate::error::{Error, Result};
use crate::quant::{Flavour, QuantMode};
use crate::registry::{KernelKey, OpKind, AUTO};
use crate::{Buffer, CommandEncoder, DType, QuantizedWeight};
use cudarc::driver::PushKernelArg;

/// Threads per block of the one-thread-per-group kernels.
const GROUP_THREADS: u32 = 256;
/// Warps per block of the matmul kernels (`FP_WARPS` in fp.cu).
const MATMUL_WARPS: u64 = 4;

/// The `-D` defines every fp.cu module takes: the mode, the element width and the group size.
pub(super) fn fp_defines(k: &KernelKey) -> Vec<String> {
    let mode = match k.mode {
        QuantMode::Mxfp4 => 1,
        QuantMode::Mxfp8 => 2,
        _ => 3,
    };
    vec![
        format!("-DMODE={mode}"),
        format!("-DBITS={}", k.bits),
        format!("-DGROUP={}", k.group_size),
    ]
}

/// Quantizes `w` into `out` (validated by `ops::quantize_into`: shape, spec, a `uint8` scale
/// per group, no biases) with fp.cu's `fp_quantize`, one thread per group.
pub(super) fn quantize(
    enc: &mut CommandEncoder,
    dev: &CudaDevice,
    w: &Buffer,
    flavour: Flavour,
    out: &QuantizedWeight,
) -> Result<()> {
    const OP: &str = "quantize";
    let spec = out.spec();
    let key = KernelKey {
        op: OpKind::Quantize,
        mode: spec.mode(),
        bits: spec.bits(),
        group_size: spec.group_size(),
        input: w.dtype(),
        scales: DType::U8,
        output: DType::U32,
        flag: flavour == Flavour::Gpu,
        variant: AUTO,
    };
    let k = dev.kernel(key)?;
    let (packed, scales) = (out.packed(), out.scales());
    let groups = (w.numel() / spec.group_size() as usize) as u64;
    if scales.numel() as u64 != groups {
        return Err(Error::invalid(
            OP,
            "out",
            format!("{groups} scales"),
            scales.numel(),
        ));
    }
    let (pw, pp, ps) = (
        ptr(OP, "w", w)?,
        aligned(OP, "packed", packed, ptr(OP, "packed", packed)?, 16)?,
        ptr(OP, "scales", scales)?,
    );
    // SAFETY: thread g < groups reads inputs g·GROUP.. of w (groups·GROUP = w.numel()), writes
    // packed bytes g·GB.. (groups·GB = packed's bytes: `out` has w's shape and the spec) and
    // scale g.
    unsafe {
        per_item(
            enc,
            dev,
            &k,
            OP,
            "fp_quantize",
            [pw, pp, ps],
            groups,
            [w, packed, scales],
        )
    }
}

/// Launches fp.cu's `entry` of `k`, one thread per item (a group for quantize, 16 bytes of
/// output for dequantize), with the pointers `args` and the item count, keeps `bufs` alive until the
/// encoder's work completes and records the kernel.
///
/// # Safety
/// `entry` takes three pointers and a `u64` count, and for that count reads and writes only
/// inside the buffers `args` point into, which are `bufs`.
#[allow(clippy::too_many_arguments)]
unsafe fn per_item(
    enc: &mut CommandEncoder,
    dev: &CudaDevice,
    k: &super::CudaKernel,
    op: &'static str,
    entry: &str,
    args: [u64; 3],
    items: u64,
    bufs: [&Buffer; 3],
) -> Result<()> {
    // SAFETY: the caller's contract.
    unsafe {
        dev.stream()
            .launch_builder(k.func_named(entry)?)
            .arg(&args[0])
            .arg(&args[1])
            .arg(&args[2])
            .arg(&items)
            .launch(cfg(
                (grid_x(op, items.div_ceil(u64::from(GROUP_THREADS)))?, 1, 1),
                GROUP_THREADS,
                op,
            )?)
    }
    .map_err(driver(op))?;
    for b in bufs {
        enc.retain(b);
    }
    enc.record(&k.name);
    Ok(())
}

/// Dequantizes all of `w` into the caller's `out` of the float `out_dtype` (`ops` resolved
/// it and checked `out`'s dtype, shape and device) in `flavour`, with fp.cu's
/// `fp_dequantize`, one thread per 16 bytes of output.
pub(super) fn dequantize_into(
    enc: &mut CommandEncoder,
    dev: &CudaDevice,
    w: &QuantizedWeight,
    flavour: Flavour,
    out_dtype: DType,
    out: &mut Buffer,
) -> Result<()> {
    const OP: &str = "dequantize";
    let k = dev.kernel(KernelKey::dequantize(w, out_dtype, flavour))?;
    enc.check_location(OP, "scales", w.scales())?;
    enc.check_location(OP, "out", out)?;
    let out: &Buffer = out;
    // One thread per 16 bytes of output: groups are 16 or 32 elements, whole 8s.
    let items = (out.numel() / (16 / out_dtype.size())) as u64;
    let (pp, ps, po) = (
        aligned(OP, "packed", w.packed(), ptr(OP, "packed", w.packed())?, 16)?,
        ptr(OP, "scales", w.scales())?,
        ptr(OP, "out", out)?,
    );
    let bufs = [w.packed(), w.scales(), out];
    // SAFETY: thread t < items writes the n = 16 / size outputs t·n..t·n + n of `out`
    // (items·n elements) and reads the BITS packed bytes of their chunk of 8 and its group's
    // scale (w was validated with these sizes).
    unsafe { per_item(enc, dev, &k, OP, "fp_dequantize", [pp, ps, po], items, bufs)? };
    Ok(())
}

/// `out = x · W(ᵀ)` over the job's batch `bt` (`entries` of them) for an FP-mode `w`, with
/// fp.cu's `fp_qmv_t_*` (W `[N, K]`) or `fp_qmv_n_*` (W `[K, N]`). The output is x's dtype
/// (`ops` checked it).
#[allow(clippy::too_many_arguments)]
pub(super) fn qmm(
    enc: &mut CommandEncoder,
    dev: &CudaDevice,
    op: &'static str,
    x: &Buffer,
    w: &QuantizedWeight,
    out: &Buffer,
    job: &MatmulJob<'_>,
    bt: Batch,
    entries: u64,
) -> Result<()> {
    let spec = w.spec();
    let key = KernelKey {
        op: OpKind::QuantizedMatmul,
        mode: spec.mode(),
        bits: spec.bits(),
        group_size: spec.group_size(),
        input: x.dtype(),
        scales: w.scales_dtype(),
        output: out.dtype(),
        flag: job.transpose,
        variant: AUTO,
    };
    let k = dev.kernel(key)?;
    enc.check_location(op, "scales", w.scales())?;
    let (rows, cols) = (w.rows() as u64, w.cols() as u64);
    let (kdim, ndim) = if job.transpose {
        (cols, rows)
    } else {
        (rows, cols)
    };
    let m = job.m as u64;
    let m32 = u32::try_from(m).map_err(|_| Error::SizeOverflow { op, what: "rows" })?;
    let px = aligned(op, "x", x, ptr(op, "x", x)?, 16)?;
    let pw = aligned(op, "w", w.packed(), ptr(op, "w", w.packed())?, 16)?;
    let (ps, po) = (ptr(op, "scales", w.scales())?, ptr(op, "out", out)?);
    let x_stride = m * kdim;
    let out_stride = m * ndim;
    let w_stride = rows * cols * u64::from(spec.bits()) / 8; // bytes
    let s_stride = rows * cols / u64::from(spec.group_size());
    let gy = entries.clamp(1, 65535) as u32;
    let (entry, units) = if job.transpose {
        let e = match m {
            1 => "fp_qmv_t_1",
            2..=4 => "fp_qmv_t_4",
            _ => "fp_qmv_t_8",
        };
        (e, ndim)
    } else {
        (if m == 1 { "fp_qmv_n_1" } else { "fp_qmv_n_4" }, ndim / 8)
    };
    let gx = grid_x(op, units.div_ceil(MATMUL_WARPS))?;
    // SAFETY: block (bx, e) reads x rows of matrix xi < x_count and W rows (or columns) < N of
    // matrix wi < w_count (out-of-range indices are caught by `resolve`, whose entries are
    // written as NaN), with their scales, and writes rows < M of output entry e < entries:
    // all inside the buffers `finish` keeps alive. The arguments match the entry's
    // parameters in order and type.
    unsafe {
        dev.stream()
            .launch_builder(k.func_named(entry)?)
            .arg(&px)
            .arg(&pw)
            .arg(&ps)
            .arg(&po)
            .arg(&m32)
            .arg(&ndim)
            .arg(&kdim)
            .arg(&x_stride)
            .arg(&w_stride)
            .arg(&s_stride)
            .arg(&out_stride)
            .arg(&bt)
            .launch(cfg((gx, gy, 1), (MATMUL_WARPS * 32) as u32, op)?)
    }
    .map_err(driver(op))?;
    finish(enc, [x, w.packed(), w.scales(), out], job, &k.name);
    Ok(())
}
