//! Large-M prefill through cuBLAS: W is dequantized, a slab of rows at a time, into the
//! device's scratch (f16/bf16, x's dtype, one rounding of `q·s + b` as the tensor-core tiles
//! make their A fragments), and each slab is one cuBLAS GEMM (`cublasGemmEx`, f32
//! accumulation) into its columns of the output.
//!
//! Why: from a few hundred tokens a prefill matmul is compute-bound, and cuBLAS's bf16 GEMM
//! runs near the tensor cores' peak where mlxq's own wgmma tiles, which dequantize in
//! registers on every block, reach 62–78% of it (docs/perf-cuda.md). Dequantizing costs one
//! pass over W (its codes read, 2 bytes per weight written into a slab that the GEMM then
//! reads, mostly from L2): ~10 µs for 4096×4096 on an H200, against ~160 µs of GEMM at
//! M = 4096. The same practice as exllama's and vLLM's AWQ prefill ("reconstruct, then
//! cuBLAS"). It serves every affine width (1..8 bits), where the tiles serve 4 and 8 only,
//! and MLX's FP modes (mxfp4, nvfp4, mxfp8).
//!
//! Memory: the slab is the device's split-K scratch (32 MiB, made when the device opens), so
//! the route allocates nothing per call and can be captured in a graph; cuBLAS is loaded on
//! the first call that takes the route outside a capture, with its own 32 MiB workspace.
//! A call captured before that, or on a machine without libcublas, keeps the tiles.
//!
//! Knobs (experiments, read once per process): `MLXQ_DQ=0` never takes the route, `=1` takes
//! it wherever it can serve (from `MLXQ_TILE_MIN_M`); `MLXQ_DQ_MIN_M` its first M;
//! `MLXQ_DQ_SLAB_MB` the slab's size (a larger one is allocated once, outside captures).

use super::launch::{knob, ptr};
use super::CudaDevice;
use crate::error::{Error, Result};
use crate::quant::QuantMode;
use crate::registry::KernelKey;
use crate::{Buffer, CommandEncoder, DType, QuantizedWeight};
use cudarc::cublas::{result as blas, sys as bsys, CudaBlas};
use cudarc::driver::sys;
use std::sync::Arc;

/// Bytes of cuBLAS workspace (the size NVIDIA's documentation gives for Hopper).
const WORKSPACE: usize = 32 << 20;

/// Rows of a slab are a multiple of this (whole cuBLAS tiles but the last slab's).
const SLAB_ALIGN: u64 = 128;

/// A cuBLAS handle on the device's stream with its workspace.
pub(crate) struct Blas {
    handle: CudaBlas,
    _workspace: super::DeviceMem,
}

/// The device's cuBLAS state: not tried yet, not available (no libcublas, or its handle
/// failed), or ready.
#[derive(Default)]
pub(crate) enum BlasState {
    #[default]
    Untried,
    Missing,
    Ready(Arc<Blas>),
}

impl CudaDevice {
    /// The device's cuBLAS handle, made on first use; `None` where libcublas is missing, or
    /// while the stream is capturing and no handle exists yet (making one allocates).
    pub(crate) fn blas(&self) -> Option<Arc<Blas>> {
        let mut s = self.blas.lock().unwrap_or_else(|e| e.into_inner());
        match &*s {
            BlasState::Ready(b) => return Some(Arc::clone(b)),
            BlasState::Missing => return None,
            BlasState::Untried => {}
        }
        if self.capturing() {
            return None;
        }
        // SAFETY: probing for the library has no preconditions.
        let made = if unsafe { bsys::is_culib_present() } {
            self.make_blas().ok()
        } else {
            None
        };
        *s = match made {
            Some(b) => BlasState::Ready(Arc::new(b)),
            None => BlasState::Missing,
        };
        match &*s {
            BlasState::Ready(b) => Some(Arc::clone(b)),
            _ => None,
        }
    }

    fn make_blas(&self) -> Result<Blas> {
        const OP: &str = "cublas";
        let err = |e: blas::CublasError| Error::Cuda {
            op: OP,
            cause: format!("{e:?}"),
        };
        let handle = CudaBlas::new(Arc::clone(self.stream())).map_err(err)?;
        let ws = self.alloc(WORKSPACE)?;
        // SAFETY: a live handle and WORKSPACE bytes of device memory that the handle's owner
        // keeps alive as long as the handle.
        unsafe {
            bsys::cublasSetWorkspace_v2(
                *handle.handle(),
                ws.ptr as *mut std::ffi::c_void,
                WORKSPACE,
            )
        }
        .result()
        .map_err(err)?;
        Ok(Blas {
            handle,
            _workspace: ws,
        })
    }

    /// Whether the device's stream is capturing a graph.
    pub(crate) fn capturing(&self) -> bool {
        !matches!(
            self.stream().capture_status(),
            Ok(sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE)
        )
    }
}

/// `y = x · Wᵀ` for row-major `x [m, k]`, `w [n, k]` and `y [m, n]` whose rows lie `ldy`
/// elements apart, all of `dtype` (f16 or bf16), f32 accumulation, on the handle's stream.
///
/// # Safety
/// The pointers must address device memory of those sizes, alive until the GEMM completes.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_xwt(
    b: &Blas,
    op: &'static str,
    dtype: DType,
    [m, n, k]: [u64; 3],
    x: u64,
    w: u64,
    y: u64,
    ldy: u64,
) -> Result<()> {
    let dim = |v: u64| {
        i32::try_from(v).map_err(|_| Error::SizeOverflow {
            op,
            what: "cuBLAS GEMM size",
        })
    };
    let (mi, ni, ki, ld) = (dim(m)?, dim(n)?, dim(k)?, dim(ldy)?);
    let t = match dtype {
        DType::BF16 => bsys::cudaDataType::CUDA_R_16BF,
        DType::F16 => bsys::cudaDataType::CUDA_R_16F,
        other => {
            return Err(Error::unsupported(
                op,
                format!("a {other} cuBLAS GEMM (f16 or bf16 only)"),
            ))
        }
    };
    let (alpha, beta) = (1.0f32, 0.0f32);
    // Column-major view: yᵀ [n, m] = (W as column-major [k, n])ᵀ · (x as column-major [k, m]).
    // SAFETY: the caller's pointers and sizes; alpha and beta are read before this returns.
    unsafe {
        blas::gemm_ex(
            *b.handle.handle(),
            bsys::cublasOperation_t::CUBLAS_OP_T,
            bsys::cublasOperation_t::CUBLAS_OP_N,
            ni,
            mi,
            ki,
            (&alpha as *const f32).cast(),
            w as *const std::ffi::c_void,
            t,
            ki,
            x as *const std::ffi::c_void,
            t,
            ki,
            (&beta as *const f32).cast(),
            y as *mut std::ffi::c_void,
            t,
            ld,
            bsys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            bsys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT_TENSOR_OP,
        )
    }
    .map_err(|e| Error::Cuda {
        op,
        cause: format!("cublasGemmEx: {e:?}"),
    })
}

/// The first M of the route for matmul `key` on a device of compute capability `arch`, or
/// None when it is switched off: `MLXQ_DQ=0` never, `=1` from `tile_min_m`, `MLXQ_DQ_MIN_M`;
/// by default, where the wgmma tiles serve the key (4- and 8-bit, f16/bf16, sm_90), from the
/// M where the route measured faster than them at every shape tried (H100, session 48: 8-bit
/// from 2048, 4-bit from 3072; at 2048 the tiles won two of three), else from `tile_min_m` (every other width: the CUDA-core kernels are
/// 50-100x slower at M = 1024). On tensor-core devices without wgmma, from M = 1024 (not
/// measured: their mma.sync tiles ran 1.7x slower than the wgmma tiles at 4096^3, run 8).
/// MLX's FP modes from M = 2048 on Hopper (measured faster than their wgmma tiles at every
/// shape tried, 2048x4096x4096 included: mxfp4 108 against 123 µs, mxfp8 110 against 142).
pub(super) fn min_m(key: &KernelKey, arch: u32, tile_min_m: u64) -> Option<u64> {
    match knob("MLXQ_DQ") {
        Some("0") => return None,
        Some("1") => return Some(tile_min_m),
        _ => {}
    }
    if let Some(v) = knob("MLXQ_DQ_MIN_M").and_then(|v| v.parse::<u64>().ok()) {
        return Some(v.max(1));
    }
    let fp = key.mode != QuantMode::Affine;
    let first = if !super::tensor_core_path(key, arch) {
        tile_min_m
    } else if super::nvrtc::wgmma(arch) {
        if fp || key.bits == 8 {
            2048
        } else {
            3072
        }
    } else {
        1024
    };
    Some(first.max(tile_min_m))
}

/// Rows of W per slab for W `[n, k]` at `esize` bytes per dequantized weight in a slab of
/// `budget` bytes: all of W where it fits, else slabs of equal size (a multiple of
/// [`SLAB_ALIGN`] rows, the last one shorter). None where not even [`SLAB_ALIGN`] rows fit.
pub(super) fn slab_rows(n: u64, k: u64, esize: u64, budget: u64) -> Option<u64> {
    let row = k.checked_mul(esize)?.max(1);
    let most = budget / row;
    if most >= n {
        return Some(n);
    }
    let most = most / SLAB_ALIGN * SLAB_ALIGN;
    if most == 0 {
        return None;
    }
    let slabs = n.div_ceil(most);
    Some(n.div_ceil(slabs).div_ceil(SLAB_ALIGN) * SLAB_ALIGN)
}

/// Enqueues `y [m, n] = x [m, k] · dequant(W [n, k])ᵀ` by slabs (module docs) and returns
/// true, or returns false having enqueued nothing where the route cannot serve the call: no
/// cuBLAS, a capture before cuBLAS was loaded, a size past cuBLAS's `int`, or `x` and `out`
/// not of one f16/bf16 dtype. `ops` validated the shapes; the caller checked that W is one
/// matrix `[n, k]` (transpose = true, no gather or batch), affine or an FP mode.
pub(super) fn try_run(
    enc: &mut CommandEncoder,
    dev: &CudaDevice,
    op: &'static str,
    x: &Buffer,
    w: &QuantizedWeight,
    out: &Buffer,
    m: u64,
) -> Result<bool> {
    let (n, k) = (w.rows() as u64, w.cols() as u64);
    let spec = w.spec();
    let fp = spec.mode() != QuantMode::Affine;
    // FP weights have no biases (their kernel takes none: the scales stand in, unread).
    let biases = match w.biases() {
        Some(b) => b,
        None if fp => w.scales(),
        None => return Ok(false),
    };
    let dtype = x.dtype();
    if dtype != out.dtype()
        || !matches!(dtype, DType::BF16 | DType::F16)
        || (dtype == DType::BF16 && dev.arch() < 80)
        || [m, n, k].iter().any(|&v| i32::try_from(v).is_err())
    {
        return Ok(false);
    }
    let esize = dtype.size() as u64;
    let budget = knob("MLXQ_DQ_SLAB_MB")
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(super::SCRATCH_BYTES as u64, |mb| mb << 20);
    let Some(rows) = slab_rows(n, k, esize, budget) else {
        return Ok(false);
    };
    let slab_bytes = rows * k * esize;
    // A slab larger than the scratch is allocated only outside a capture.
    if slab_bytes > super::SCRATCH_BYTES as u64 && dev.capturing() {
        return Ok(false);
    }
    // fp_dequantize loads whole 4- or 8-byte words of codes (16-byte aligned base, as
    // `dequantize_into` requires).
    if fp && !ptr(op, "w", w.packed())?.is_multiple_of(16) {
        return Ok(false);
    }
    let Some(blas) = dev.blas() else {
        return Ok(false);
    };
    for (param, b) in [("scales", w.scales()), ("biases", biases)] {
        enc.check_location(op, param, b)?;
    }
    let kern = dev.kernel(KernelKey::dequantize(w, dtype, crate::Flavour::Gpu))?;
    let scratch = dev.scratch(slab_bytes as usize)?;
    let slab = ptr(op, "scratch", &scratch)?;
    let (px, pw, ps, pb, po) = (
        ptr(op, "x", x)?,
        ptr(op, "w", w.packed())?,
        ptr(op, "scales", w.scales())?,
        ptr(op, "biases", biases)?,
        ptr(op, "out", out)?,
    );
    let bits = u64::from(spec.bits());
    let groups = k / u64::from(spec.group_size());
    let ssize = w.scales_dtype().size() as u64;
    // Kept alive until the encoder's work completes, from before the first launch (an error
    // after it leaves work in flight that reads them).
    dev.swap_last_dec(None);
    for b in [x, w.packed(), w.scales(), biases, out, &scratch] {
        enc.retain(b);
    }
    let mut r0 = 0;
    let mut slabs = 0;
    while r0 < n {
        let r = rows.min(n - r0);
        // SAFETY: rows r0..r0 + r of W (their codes, K·bits/8 bytes a row, and K / group
        // scales and biases a row) lie inside the weight `ops` validated; the dequantize
        // kernel writes r·K elements (whole 16-byte items: K is a multiple of the group)
        // into the slab of `slab_bytes` >= r·K·esize bytes.
        unsafe {
            super::launch::enqueue_dequantize(
                dev,
                &kern,
                op,
                fp,
                [
                    pw + r0 * k * bits / 8,
                    ps + r0 * groups * ssize,
                    if fp { slab } else { pb + r0 * groups * ssize },
                    slab,
                ],
                r * k,
                esize,
            )?;
        }
        // SAFETY: x [m, k], the slab's W rows [r, k] and the output's columns r0..r0 + r of
        // its m rows of n (all inside `out`, m·n elements), alive through `retain` above.
        unsafe {
            gemm_xwt(&blas, op, dtype, [m, r, k], px, slab, po + r0 * esize, n)?;
        }
        r0 += r;
        slabs += 1;
    }
    enc.record(&format!("{} dq_cublas/s{slabs}", kern.name));
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::slab_rows;

    #[test]
    fn slabs_cover_w_in_equal_aligned_parts_within_the_budget() {
        const MIB: u64 = 1 << 20;
        // All of W where it fits (any row count).
        assert_eq!(slab_rows(4096, 4096, 2, 32 * MIB), Some(4096));
        assert_eq!(slab_rows(999, 64, 2, 32 * MIB), Some(999));
        assert_eq!(slab_rows(5000, 3000, 2, 32 * MIB), Some(5000));
        for (n, k) in [
            (14336, 4096),
            (4096, 14336),
            (28672, 8192),
            (20000, 3000),
            (129, 131072),
        ] {
            let rows = slab_rows(n, k, 2, 32 * MIB).unwrap();
            assert!(rows * k * 2 <= 32 * MIB, "{n}x{k}: {rows} rows");
            assert_eq!(rows % 128, 0, "{n}x{k}: {rows} rows");
            let slabs = n.div_ceil(rows);
            // Equal parts: no slab shorter by more than the alignment, but the last.
            assert!(slabs * rows - n < 128 * slabs, "{n}x{k}: {rows} rows");
        }
        assert_eq!(slab_rows(14336, 4096, 2, 32 * MIB), Some(3584));
        // Not even 128 rows fit.
        assert_eq!(slab_rows(1000, 131104, 2, 32 * MIB), None);
        assert_eq!(slab_rows(1000, u64::MAX, 2, 32 * MIB), None);
    }
}
