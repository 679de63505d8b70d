//! MLX's quantized modules in a file: `P.weight` (uint32 packed), `P.scales`, and for affine
//! mode `P.biases`, assembled into a [`QuantizedWeight`] with the spec inferred from shapes.

use super::Tensors;
use crate::buffer::Buffer;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::quant::{QuantMode, QuantSpec};
use crate::weight::QuantizedWeight;

/// The spec of a quantized tensor from its stored shapes, as mlx-lm infers it.
///
/// With biases the mode is affine and `bits = packed_cols · 32 / (groups · group_size)`, which
/// needs the right `group_size`: shapes alone cannot tell 4-bit groups of 64 from 8-bit groups
/// of 32 (mlx-lm keeps the group size in `config.json`). Without biases and with uint8 scales the
/// mode is the FP mode whose `bits · group` matches (`mxfp4` 128, `mxfp8` 256, `nvfp4` 64) and
/// `group_size` is ignored. Fails if the shapes fit no spec MLX accepts.
pub fn infer_spec(
    packed: &Buffer,
    scales: &Buffer,
    has_biases: bool,
    group_size: u32,
) -> Result<QuantSpec> {
    const OP: &str = "io::infer_spec";
    if packed.dtype() != DType::U32 {
        return Err(Error::dtype(OP, "weight", "uint32", packed.dtype()));
    }
    let (Some(&words), Some(&groups)) = (packed.shape().last(), scales.shape().last()) else {
        return Err(Error::shape(
            OP,
            "weight",
            "at least 1 dimension in weight and scales",
            packed.shape(),
        ));
    };
    if groups == 0 || words == 0 {
        return Err(Error::shape(
            OP,
            "scales",
            "a non-zero last dimension in weight and scales",
            scales.shape(),
        ));
    }
    let bits_times_group = words.checked_mul(32).ok_or(Error::SizeOverflow {
        op: OP,
        what: "packed bits",
    })?;
    if !has_biases && scales.dtype() == DType::U8 {
        let mode = match (bits_times_group % groups, bits_times_group / groups) {
            (0, 128) => QuantMode::Mxfp4,
            (0, 256) => QuantMode::Mxfp8,
            (0, 64) => QuantMode::Nvfp4,
            _ => {
                return Err(Error::shape(
                    OP,
                    "weight",
                    format!(
                    "last dimension {} (mxfp4), {} (mxfp8) or {} (nvfp4) for {groups} uint8 scales",
                    groups * 4,
                    groups * 8,
                    groups * 2
                ),
                    packed.shape(),
                ))
            }
        };
        let (bits, group) = QuantSpec::fp_defaults(mode);
        return QuantSpec::new(mode, bits, group);
    }
    if !has_biases {
        return Err(Error::invalid(
            OP,
            "biases",
            "a biases tensor beside float scales (affine mode)",
            "none",
        ));
    }
    // bits · group_size per group, from the packed words and the group count of one row.
    let product = (bits_times_group % groups == 0).then_some(bits_times_group / groups);
    let bits = product
        .filter(|p| p % group_size.max(1) as usize == 0)
        .map(|p| p / group_size.max(1) as usize)
        .filter(|&b| matches!(b, 1..=6 | 8));
    match bits {
        Some(bits) => QuantSpec::affine(bits as u32, group_size),
        None => Err(Error::invalid(
            OP,
            "group_size",
            match product {
                Some(p) => format!(
                    "one that divides bits × group_size = {p} (from {words} packed words and {groups} groups per row) into 1-6 or 8 bits"
                ),
                None => format!("whole bits per group: {words} packed words are not a multiple of {groups} groups"),
            },
            group_size,
        )),
    }
}

/// `b` itself if its data is aligned for its dtype, else an owned (aligned) copy.
///
/// Kernels view data as typed slices, which needs alignment; MLX's unpadded files often place
/// tensors at odd offsets. Copies only the tensors that need it.
pub fn aligned(b: &Buffer) -> Result<Buffer> {
    if b.bytes().as_ptr().align_offset(b.dtype().size()) == 0 {
        Ok(b.clone())
    } else {
        Buffer::from_bytes(b.bytes(), b.dtype(), b.shape())
    }
}

impl Tensors {
    /// Prefixes `P` of the quantized modules: those with a uint32 `P.weight` and a `P.scales`,
    /// in the order of their weights.
    pub fn quantized_modules(&self) -> Vec<&str> {
        self.iter()
            .filter_map(|(name, b)| {
                let prefix = name.strip_suffix(".weight")?;
                (b.dtype() == DType::U32 && self.contains(&format!("{prefix}.scales")))
                    .then_some(prefix)
            })
            .collect()
    }

    /// Assembles module `prefix`'s `P.weight`, `P.scales` and `P.biases` into a validated
    /// [`QuantizedWeight`], the spec inferred by [`infer_spec`] with `group_size`.
    ///
    /// Tensors stay zero-copy unless misaligned (see [`aligned`]). Errors are
    /// [`Error::Format`] naming the file and the module.
    pub fn quantized_weight(&self, prefix: &str, group_size: u32) -> Result<QuantizedWeight> {
        let get = |suffix: &str| self.get(&format!("{prefix}.{suffix}"));
        let missing = |suffix: &str| self.format_error(format!("{prefix}.{suffix}: missing"));
        let packed = get("weight").ok_or_else(|| missing("weight"))?;
        let scales = get("scales").ok_or_else(|| missing("scales"))?;
        let biases = get("biases");
        let in_module = |e: Error| self.format_error(format!("{prefix}: {e}"));
        let spec = infer_spec(packed, scales, biases.is_some(), group_size).map_err(in_module)?;
        let biases = biases.map(aligned).transpose().map_err(in_module)?;
        QuantizedWeight::new(
            aligned(packed).map_err(in_module)?,
            aligned(scales).map_err(in_module)?,
            biases,
            spec,
        )
        .map_err(in_module)
    }
}
