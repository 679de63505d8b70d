//! `quantize`: float weights → [`QuantizedWeight`], bit-identical to MLX in either flavour.

use super::{require_float, require_nonzero};
use crate::backend::cpu::{self, quantize::QuantizeArgs, KernelFn};
use crate::error::{Error, Result};
use crate::quant::{Flavour, QuantSpec};
use crate::registry::{KernelKey, OpKind};
use crate::{Buffer, CommandEncoder, QuantizedWeight};

const OP: &str = "quantize";

/// Quantizes `w` (`[..., rows, cols]`, f32/f16/bf16, `cols` a multiple of the group size)
/// along its last axis. Scales and biases get `w`'s dtype, as in MLX.
pub fn quantize(
    enc: &mut CommandEncoder,
    w: &Buffer,
    spec: QuantSpec,
    flavour: Flavour,
) -> Result<QuantizedWeight> {
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
    let lead = &w.shape()[..w.ndim() - 1];
    let with_last = |d: usize| lead.iter().copied().chain([d]).collect::<Vec<_>>();
    #[cfg(feature = "cuda")]
    if enc.device().cuda_state().is_ok() {
        let (pshape, sshape) = (with_last(words), with_last(cols / g));
        return crate::backend::cuda::launch::quantize(enc, w, spec, flavour, &pshape, &sshape);
    }
    let mut packed = Buffer::zeros(crate::DType::U32, &with_last(words))?;
    let mut scales = Buffer::zeros(w.dtype(), &with_last(cols / g))?;
    let mut biases = Buffer::zeros(w.dtype(), &with_last(cols / g))?;
    let key = KernelKey {
        op: OpKind::Quantize,
        mode: spec.mode(),
        bits: spec.bits(),
        group_size: spec.group_size(),
        input: w.dtype(),
        scales: w.dtype(),
        output: crate::DType::U32,
        flag: flavour == Flavour::Gpu,
        variant: crate::registry::AUTO,
    };
    let kernel = cpu::kernel(enc.device(), key)?;
    let KernelFn::Quantize(f) = kernel.func else {
        return Err(Error::unsupported(OP, format!("kernel {}", kernel.name)));
    };
    f(QuantizeArgs {
        w: w.bytes(),
        group_size: g,
        flavour,
        packed: packed.bytes_mut()?,
        scales: scales.bytes_mut()?,
        biases: biases.bytes_mut()?,
    })?;
    enc.record(&kernel.name);
    QuantizedWeight::new(packed, scales, Some(biases), spec)
}
