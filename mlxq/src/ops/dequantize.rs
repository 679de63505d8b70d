//! `dequantize`: [`QuantizedWeight`] → floats, rounding as either MLX flavour does (affine,
//! and on the CPU mxfp4, mxfp8 and nvfp4).
//!
//! [`dequantize_into`] writes into a caller-owned buffer (no allocation per call);
//! [`dequantize`] allocates one and runs the same path.

use crate::backend::cpu::{self, dequantize::DequantizeArgs, KernelFn, MatrixRef};
use crate::error::{Error, Result};
use crate::quant::Flavour;
use crate::registry::KernelKey;
use crate::{Buffer, CommandEncoder, DType, QuantizedWeight};

const OP: &str = "dequantize";

/// Options of [`dequantize`] (and [`embedding`](super::embedding)).
#[derive(Clone, Copy, Debug, Default)]
pub struct DequantizeOptions {
    /// Output dtype; `None` means, as MLX, the scales' dtype (affine) or bfloat16 (the FP
    /// modes, whose scales are uint8 codes).
    pub dtype: Option<DType>,
    /// Which MLX rounding to reproduce (default: GPU, one rounding of an f32 FMA).
    pub flavour: Flavour,
}

/// The output dtype of dequantizing `w` with `opts`, on any backend: `opts.dtype`, else the
/// scales' dtype (affine) or bfloat16 (the FP modes); an error unless it is a float.
pub(crate) fn output_dtype(w: &QuantizedWeight, opts: DequantizeOptions) -> Result<DType> {
    let default = if w.spec().has_biases() {
        w.scales_dtype()
    } else {
        DType::BF16
    };
    let out = opts.dtype.unwrap_or(default);
    if !out.is_float() {
        return Err(Error::dtype(
            OP,
            "dtype",
            "float32, float16 or bfloat16",
            out,
        ));
    }
    Ok(out)
}

pub(crate) fn dequantize_kernel(
    enc: &CommandEncoder,
    w: &QuantizedWeight,
    opts: DequantizeOptions,
) -> Result<(
    crate::backend::cpu::CpuKernel,
    crate::backend::cpu::dequantize::DequantizeFn,
    DType,
)> {
    let out = output_dtype(w, opts)?;
    let key = KernelKey::dequantize(w, out, opts.flavour);
    let kernel = cpu::kernel(enc.device(), key)?;
    let KernelFn::Dequantize(f) = kernel.func else {
        return Err(Error::unsupported(OP, format!("kernel {}", kernel.name)));
    };
    Ok((kernel, f, out))
}

/// Dequantizes the whole of `w` into a new buffer of `w.shape()`.
///
/// Allocates the result, then runs [`dequantize_into`]; to dequantize repeatedly without
/// allocating (and faulting in fresh output pages) per call, use [`dequantize_into`].
pub fn dequantize(
    enc: &mut CommandEncoder,
    w: &QuantizedWeight,
    opts: DequantizeOptions,
) -> Result<Buffer> {
    enc.check_location(OP, "w", w.packed())?;
    let out_dtype = output_dtype(w, opts)?;
    let mut out = Buffer::uninit_on(enc.device(), out_dtype, w.shape())?;
    dequantize_into(enc, w, opts, &mut out)?;
    Ok(out)
}

/// Dequantizes the whole of `w` as [`dequantize`] does, writing every element of the
/// caller-owned `out` (bit-identical to [`dequantize`]'s result); nothing is allocated, so
/// the call can be timed on its own or captured in a CUDA graph.
///
/// `out` must have the dtype [`dequantize`] would give (`opts.dtype`, else the scales' dtype
/// for affine or bfloat16 for the FP modes), `w`'s logical shape, live on the encoder's
/// device, and on the host own its storage alone (not a memory-mapped file, nor shared with
/// a clone); otherwise this returns an error naming `out`, what was expected and what came,
/// and writes nothing.
pub fn dequantize_into(
    enc: &mut CommandEncoder,
    w: &QuantizedWeight,
    opts: DequantizeOptions,
    out: &mut Buffer,
) -> Result<()> {
    enc.check_location(OP, "w", w.packed())?;
    let out_dtype = output_dtype(w, opts)?;
    if out.dtype() != out_dtype {
        return Err(Error::dtype(OP, "out", out_dtype.name(), out.dtype()));
    }
    if out.shape() != w.shape() {
        return Err(Error::shape(
            OP,
            "out",
            format!("{:?} (as w)", w.shape()),
            out.shape(),
        ));
    }
    enc.check_location(OP, "out", out)?;
    #[cfg(feature = "cuda")]
    if enc.device().cuda_state().is_ok() {
        return crate::backend::cuda::launch::dequantize_into(enc, w, opts, out);
    }
    let (kernel, f, _) = dequantize_kernel(enc, w, opts)?;
    let spec = w.spec();
    // The batch matrices are contiguous, so the whole stack is one tall matrix.
    let all = MatrixRef {
        packed: w.packed().bytes(),
        scales: w.scales().bytes(),
        biases: w.biases().map_or(&[][..], Buffer::bytes),
        rows: w.batch_size() * w.rows(),
        cols: w.cols(),
        group_size: spec.group_size() as usize,
        bits: spec.bits(),
    };
    let bytes = out.bytes_mut().map_err(|e| match e {
        Error::ReadOnly { reason, .. } => Error::ReadOnly {
            op: OP,
            param: "out",
            reason,
        },
        e => e,
    })?;
    f(DequantizeArgs {
        w: all,
        flavour: opts.flavour,
        out: bytes,
    })?;
    enc.record(&kernel.name);
    Ok(())
}
