//! `quantize`: float weights → [`QuantizedWeight`], bit-identical to MLX in either flavour,
//! for every mode (affine, and on the CPU mxfp4, mxfp8 and nvfp4).
//!
//! [`quantize_into`] writes into a caller-owned weight (no allocation, and no page faults on
//! fresh output memory, per call); [`quantize`] allocates one and runs the same path.

use super::{require_float, require_nonzero};
use crate::backend::cpu::{self, quantize::QuantizeArgs, KernelFn};
use crate::error::{Error, Result};
use crate::quant::{Flavour, QuantSpec};
use crate::registry::{KernelKey, OpKind};
use crate::{Buffer, CommandEncoder, DType, QuantizedWeight};

const OP: &str = "quantize";

/// Checks `w` and `spec`; returns the shapes of the packed codes and of the scales (and
/// biases) that quantizing `w` gives.
fn output_shapes(
    enc: &CommandEncoder,
    w: &Buffer,
    spec: QuantSpec,
) -> Result<(Vec<usize>, Vec<usize>)> {
    let (words, groups) = check_input(enc, w, spec)?;
    let lead = &w.shape()[..w.ndim() - 1];
    let with_last = |d: usize| lead.iter().copied().chain([d]).collect::<Vec<_>>();
    Ok((with_last(words), with_last(groups)))
}

/// Checks `w` for quantizing as `spec` on `enc`'s device: the last dimensions of the packed
/// codes (u32 words) and of the scales, without building the shapes (`quantize_into`
/// allocates nothing).
fn check_input(enc: &CommandEncoder, w: &Buffer, spec: QuantSpec) -> Result<(usize, usize)> {
    enc.check_location(OP, "w", w)?;
    require_float(OP, "w", w)?;
    if w.ndim() < 2 {
        return Err(Error::shape(OP, "w", "at least 2 dimensions", w.shape()));
    }
    require_nonzero(OP, "w", w.shape())?;
    let cols = w.shape()[w.ndim() - 1];
    let g = spec.group_size() as usize;
    let words = spec.packed_words(cols).ok_or_else(|| {
        Error::shape(
            OP,
            "w",
            format!("last dimension a multiple of the group size {g}"),
            w.shape(),
        )
    })?;
    Ok((words, cols / g))
}

/// Quantizes `w` (`[..., rows, cols]`, f32/f16/bf16, `cols` a multiple of the group size)
/// along its last axis. Affine scales and biases get `w`'s dtype, as in MLX; the FP modes
/// (mxfp4, mxfp8, nvfp4) give uint8 scale codes and no biases.
///
/// Allocates the result, then runs [`quantize_into`]'s path; to quantize repeatedly without
/// allocating (and faulting in fresh output pages) per call, use [`quantize_into`].
pub fn quantize(
    enc: &mut CommandEncoder,
    w: &Buffer,
    spec: QuantSpec,
    flavour: Flavour,
) -> Result<QuantizedWeight> {
    let (pshape, sshape) = output_shapes(enc, w, spec)?;
    let device = enc.device().clone();
    let packed = Buffer::uninit_on(&device, DType::U32, &pshape)?;
    let scales = Buffer::uninit_on(&device, spec.scales_dtype(w.dtype()), &sshape)?;
    let biases = if spec.has_biases() {
        Some(Buffer::uninit_on(&device, w.dtype(), &sshape)?)
    } else {
        None
    };
    let mut out = QuantizedWeight::new(packed, scales, biases, spec)?;
    execute(enc, w, spec, flavour, &mut out)?;
    Ok(out)
}

/// Quantizes `w` as [`quantize`] does, writing every byte of the caller-owned `out`'s codes,
/// scales and biases (bit-identical to [`quantize`]'s result).
///
/// `out` must be a weight of `spec` and of `w`'s logical shape, with scales (and biases) of
/// `w`'s dtype, on the encoder's device, and on the host it must own its storage alone (not
/// a memory-mapped file, nor shared with a clone or an expert view); otherwise this returns
/// an error naming `out`, what was expected and what came, and writes nothing.
pub fn quantize_into(
    enc: &mut CommandEncoder,
    w: &Buffer,
    spec: QuantSpec,
    flavour: Flavour,
    out: &mut QuantizedWeight,
) -> Result<()> {
    check_input(enc, w, spec)?;
    if out.spec() != spec {
        return Err(Error::invalid(
            OP,
            "out",
            format!("a weight quantized as {spec}"),
            out.spec(),
        ));
    }
    if out.shape() != w.shape() {
        return Err(Error::shape(
            OP,
            "out",
            format!("logical shape {:?} (as w)", w.shape()),
            out.shape(),
        ));
    }
    let want = spec.scales_dtype(w.dtype());
    if out.scales_dtype() != want {
        return Err(Error::dtype(
            OP,
            "out",
            if spec.has_biases() {
                format!("scales and biases of {} (as w)", w.dtype().name())
            } else {
                format!("scales of uint8 (for {})", spec.mode())
            },
            out.scales_dtype(),
        ));
    }
    execute(enc, w, spec, flavour, out)
}

/// Runs the quantize kernel of `enc`'s device from `w` into `out` (both checked).
fn execute(
    enc: &mut CommandEncoder,
    w: &Buffer,
    spec: QuantSpec,
    flavour: Flavour,
    out: &mut QuantizedWeight,
) -> Result<()> {
    enc.check_location(OP, "out", out.packed())?;
    enc.check_location(OP, "out", out.scales())?;
    if let Some(b) = out.biases() {
        enc.check_location(OP, "out", b)?;
    }
    #[cfg(feature = "cuda")]
    if enc.device().cuda_state().is_ok() {
        return crate::backend::cuda::launch::quantize(enc, w, flavour, out);
    }
    let key = KernelKey {
        op: OpKind::Quantize,
        mode: spec.mode(),
        bits: spec.bits(),
        group_size: spec.group_size(),
        input: w.dtype(),
        scales: spec.scales_dtype(w.dtype()),
        output: DType::U32,
        flag: flavour == Flavour::Gpu,
        variant: crate::registry::AUTO,
    };
    let kernel = cpu::kernel(enc.device(), key)?;
    let KernelFn::Quantize(f) = kernel.func else {
        return Err(Error::unsupported(OP, format!("kernel {}", kernel.name)));
    };
    let (packed, scales, biases) = out.buffers_mut();
    let biases: &mut [u8] = match biases {
        Some(b) => writable(b)?,
        None if !spec.has_biases() => &mut [],
        None => return Err(Error::invalid(OP, "out", "a weight with biases", "none")),
    };
    f(QuantizeArgs {
        w: w.bytes(),
        group_size: spec.group_size() as usize,
        flavour,
        packed: writable(packed)?,
        scales: writable(scales)?,
        biases,
    })?;
    enc.record(&kernel.name);
    Ok(())
}

/// The bytes of one of `out`'s buffers, writable, or the read-only error naming `out`.
fn writable(b: &mut Buffer) -> Result<&mut [u8]> {
    b.bytes_mut().map_err(|e| match e {
        Error::ReadOnly { reason, .. } => Error::ReadOnly {
            op: OP,
            param: "out",
            reason,
        },
        e => e,
    })
}
