//! [`QuantizedWeight`]: packed codes + scales + biases + spec, validated once.
//!
//! The logical weight has shape `[..batch, rows, cols]`, quantized along `cols` (the last
//! axis). For `quantized_matmul(transpose = true)` that is `[N, K]`, MLX's `QuantizedLinear`
//! layout; for `transpose = false` it is `[K, N]`. The stored tensors are
//! `packed: u32 [..batch, rows, cols·bits/32]`, `scales` and (affine) `biases`:
//! `[..batch, rows, cols/group_size]`. Construction performs every check MLX's
//! `validate_quantized_input` does, so ops never re-check.

use crate::buffer::Buffer;
use crate::dtype::DType;
use crate::error::{checked_product, Error, Result};
use crate::quant::{QuantMode, QuantSpec};

/// A validated quantized weight tensor (2-D, or a stack of experts with batch dims).
#[derive(Clone, Debug)]
pub struct QuantizedWeight {
    packed: Buffer,
    scales: Buffer,
    biases: Option<Buffer>,
    spec: QuantSpec,
    shape: Vec<usize>,
}

const OP: &str = "QuantizedWeight";

impl QuantizedWeight {
    /// Validates and assembles a quantized weight from MLX's three tensors.
    ///
    /// Checks: `packed` is uint32 with ≥ 2 dims; `scales` has the same rank, batch dims and rows;
    /// affine scales are f32/f16/bf16 and `biases` has their dtype and shape; FP-mode scales are
    /// uint8 and there are no biases; `packed_cols · 32 / bits == groups · group_size`.
    pub fn new(
        packed: Buffer,
        scales: Buffer,
        biases: Option<Buffer>,
        spec: QuantSpec,
    ) -> Result<QuantizedWeight> {
        if packed.dtype() != DType::U32 {
            return Err(Error::dtype(OP, "packed", "uint32", packed.dtype()));
        }
        if packed.ndim() < 2 {
            return Err(Error::shape(
                OP,
                "packed",
                "at least 2 dimensions",
                packed.shape(),
            ));
        }
        match spec.mode() {
            QuantMode::Affine => {
                if !scales.dtype().is_float() {
                    return Err(Error::dtype(
                        OP,
                        "scales",
                        "float32, float16 or bfloat16",
                        scales.dtype(),
                    ));
                }
                let b = biases.as_ref().ok_or_else(|| {
                    Error::invalid(OP, "biases", "a biases tensor for affine mode", "none")
                })?;
                if b.dtype() != scales.dtype() {
                    return Err(Error::dtype(OP, "biases", scales.dtype().name(), b.dtype()));
                }
                if b.shape() != scales.shape() {
                    return Err(Error::shape(
                        OP,
                        "biases",
                        format!("{:?} (as scales)", scales.shape()),
                        b.shape(),
                    ));
                }
            }
            _ => {
                if scales.dtype() != DType::U8 {
                    return Err(Error::dtype(OP, "scales", "uint8", scales.dtype()));
                }
                if biases.is_some() {
                    return Err(Error::invalid(
                        OP,
                        "biases",
                        format!("none for {}", spec.mode()),
                        "a tensor",
                    ));
                }
            }
        }
        let nd = packed.ndim();
        let (pshape, sshape) = (packed.shape(), scales.shape());
        if scales.ndim() != nd || sshape[..nd - 1] != pshape[..nd - 1] {
            return Err(Error::shape(
                OP,
                "scales",
                format!("{:?} followed by the group count", &pshape[..nd - 1]),
                sshape,
            ));
        }
        let (words, groups) = (pshape[nd - 1], sshape[nd - 1]);
        let g = spec.group_size() as usize;
        let cols = checked_product(OP, "columns", [groups, g])?;
        let expected_words = spec.packed_words(cols).unwrap_or(usize::MAX);
        if words != expected_words || cols == 0 {
            return Err(Error::shape(
                OP,
                "packed",
                format!(
                    "last dimension {expected_words} (= {groups} groups × {g} × {} bits / 32) and non-zero",
                    spec.bits()
                ),
                pshape,
            ));
        }
        if pshape.contains(&0) {
            return Err(Error::shape(OP, "packed", "no zero dimension", pshape));
        }
        let mut shape = pshape.to_vec();
        shape[nd - 1] = cols;
        checked_product(OP, "elements", shape.iter().copied())?;
        Ok(QuantizedWeight {
            packed,
            scales,
            biases,
            spec,
            shape,
        })
    }

    /// The quantization spec.
    pub fn spec(&self) -> QuantSpec {
        self.spec
    }
    /// Logical shape `[..batch, rows, cols]` (cols unpacked).
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    /// Leading batch (expert) dims; empty for a 2-D weight.
    pub fn batch_shape(&self) -> &[usize] {
        &self.shape[..self.shape.len() - 2]
    }
    /// Product of the batch dims (1 for a 2-D weight).
    pub fn batch_size(&self) -> usize {
        self.batch_shape().iter().product()
    }
    /// Rows of one matrix (N for transpose = true).
    pub fn rows(&self) -> usize {
        self.shape[self.shape.len() - 2]
    }
    /// Columns of one matrix, along which groups run (K for transpose = true).
    pub fn cols(&self) -> usize {
        self.shape[self.shape.len() - 1]
    }
    /// Groups per row.
    pub fn groups_per_row(&self) -> usize {
        self.cols() / self.spec.group_size() as usize
    }
    /// The packed codes, uint32 `[..batch, rows, cols·bits/32]`.
    pub fn packed(&self) -> &Buffer {
        &self.packed
    }
    /// The scales.
    pub fn scales(&self) -> &Buffer {
        &self.scales
    }
    /// The biases (affine only).
    pub fn biases(&self) -> Option<&Buffer> {
        self.biases.as_ref()
    }
    /// The three tensors, mutably, for ops that write a weight in place (`quantize_into`).
    /// Callers only write their bytes (never assign whole buffers), so the weight stays valid.
    pub(crate) fn buffers_mut(&mut self) -> (&mut Buffer, &mut Buffer, Option<&mut Buffer>) {
        (&mut self.packed, &mut self.scales, self.biases.as_mut())
    }
    /// dtype of scales (and biases).
    pub fn scales_dtype(&self) -> DType {
        self.scales.dtype()
    }
    /// Bytes of packed codes, scales and biases together: what a matmul must read.
    pub fn nbytes(&self) -> usize {
        self.packed.nbytes() + self.scales.nbytes() + self.biases.as_ref().map_or(0, Buffer::nbytes)
    }
    /// Stored bits per weight, scales and biases included (4.5 for 4-bit g64 with bf16 scales).
    pub fn bits_per_weight(&self) -> f64 {
        self.nbytes() as f64 * 8.0 / self.shape.iter().product::<usize>() as f64
    }

    /// A zero-copy view of matrix `index` of the flattened batch dims: the reference system's
    /// expert offset. Fails if `index` is out of range or the weight is 2-D... which has one
    /// matrix, index 0, returned as itself.
    pub fn expert(&self, index: usize) -> Result<QuantizedWeight> {
        let count = self.batch_size();
        if index >= count {
            return Err(Error::IndexOutOfRange {
                op: "QuantizedWeight::expert",
                param: "index",
                position: 0,
                index: index as i64,
                bound: count,
            });
        }
        let slice = |b: &Buffer| -> Result<Buffer> {
            let nd = b.ndim();
            let mat = &b.shape()[nd - 2..];
            let bytes = mat[0] * mat[1] * b.dtype().size();
            b.view(index * bytes, b.dtype(), mat)
        };
        Ok(QuantizedWeight {
            packed: slice(&self.packed)?,
            scales: slice(&self.scales)?,
            biases: self.biases.as_ref().map(slice).transpose()?,
            spec: self.spec,
            shape: self.shape[self.shape.len() - 2..].to_vec(),
        })
    }
}
