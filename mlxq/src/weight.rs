//! [`QuantizedWeight`]: packed codes + scales + biases + spec, validated once.
//!
//! The logical weight has shape `[..batch, rows, cols]`, quantized along `cols` (the last
//! axis). For `quantized_matmul(transpose = true)` that is `[N, K]`, MLX's `QuantizedLinear`
//! layout; for `transpose = false` it is `[K, N]`. The stored tensors are
//! `packed: u32 [..batch, rows, cols·bits/32]`, `scales` and (affine) `biases`:
//! `[..batch, rows, cols/group_size]`. Construction performs every check MLX's
//! `validate_quantized_input` does, so ops never re-check.

use crate::buffer::Buffer;
use crate::device::Device;
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
        let rows = self.rows();
        self.rows_view(index * rows, rows)
    }

    /// Rows `start..start + count` of the three tensors, their batch dims flattened into
    /// rows (matrix i of a batch is rows i·R..(i + 1)·R), as a 2-D weight sharing storage.
    /// The caller has checked the range; `Buffer::view` checks it again against the storage.
    fn rows_view(&self, start: usize, count: usize) -> Result<QuantizedWeight> {
        let slice = |b: &Buffer| -> Result<Buffer> {
            let width = b.shape()[b.ndim() - 1];
            b.view(start * width * b.dtype().size(), b.dtype(), &[count, width])
        };
        Ok(QuantizedWeight {
            packed: slice(&self.packed)?,
            scales: slice(&self.scales)?,
            biases: self.biases.as_ref().map(slice).transpose()?,
            spec: self.spec,
            shape: vec![count, self.cols()],
        })
    }

    /// Stacks 2-D weights along their rows (N for `transpose = true`) into one weight on
    /// `device`: how q, k and v (or gate and up) projections become one weight that a single
    /// matmul launch serves, whose output columns are the parts' outputs side by side.
    ///
    /// Every part must be 2-D with the same [`QuantSpec`], the same column count, the same
    /// scales dtype, and biases present (affine) or absent (FP modes) alike. The parts may live
    /// anywhere: their bytes are copied to the host ([`Buffer::to_host`]), concatenated (for
    /// row-major 2-D tensors the parts' blocks simply follow each other), and the result is
    /// moved to `device` and validated as [`QuantizedWeight::new`] does. Row `r` of part `i`
    /// becomes row `r + (rows of parts 0..i)`; [`QuantizedWeight::row_range`] gives each part
    /// back as a view.
    ///
    /// Errors (naming the parameter `parts` and the index of the part at fault): an empty
    /// list, a batched part, or a part whose spec, columns, scales dtype or biases disagree
    /// with part 0's; a total size that overflows `usize`.
    ///
    /// ```
    /// use mlxq::{ops, Buffer, DType, Device, Flavour, QuantSpec, QuantizedWeight};
    /// # fn main() -> mlxq::Result<()> {
    /// let device = Device::cpu();
    /// let mut enc = device.encoder();
    /// let spec = QuantSpec::affine(4, 64)?;
    /// let quant = |rows: usize, enc: &mut mlxq::CommandEncoder| {
    ///     let w = Buffer::from_f32(&vec![0.25; rows * 256], DType::BF16, &[rows, 256])?;
    ///     ops::quantize(enc, &w, spec, Flavour::Gpu)
    /// };
    /// let (q, k, v) = (quant(96, &mut enc)?, quant(32, &mut enc)?, quant(32, &mut enc)?);
    /// let qkv = QuantizedWeight::concat_rows(&[&q, &k, &v], &device)?;
    /// assert_eq!(qkv.shape(), &[160, 256]);
    /// assert_eq!(qkv.row_range(96, 32)?.packed().bytes(), k.packed().bytes());
    /// # Ok(()) }
    /// ```
    pub fn concat_rows(parts: &[&QuantizedWeight], device: &Device) -> Result<QuantizedWeight> {
        const OP: &str = "QuantizedWeight::concat_rows";
        let first = *parts
            .first()
            .ok_or_else(|| Error::invalid(OP, "parts", "at least one weight", "an empty list"))?;
        let cols = first.cols();
        let mut rows = 0usize;
        for (i, p) in parts.iter().enumerate() {
            if p.shape.len() != 2 {
                return Err(Error::shape(
                    OP,
                    "parts",
                    format!("[rows, cols] at part {i} (a 2-D weight)"),
                    &p.shape,
                ));
            }
            if p.spec != first.spec {
                return Err(Error::invalid(
                    OP,
                    "parts",
                    format!("{} at part {i} (part 0's spec)", first.spec),
                    p.spec,
                ));
            }
            if p.cols() != cols {
                return Err(Error::shape(
                    OP,
                    "parts",
                    format!("[rows, {cols}] at part {i} (part 0's columns)"),
                    &p.shape,
                ));
            }
            if p.scales_dtype() != first.scales_dtype() {
                return Err(Error::dtype(
                    OP,
                    "parts",
                    format!("{} at part {i} (part 0's scales)", first.scales_dtype()),
                    p.scales_dtype(),
                ));
            }
            if p.biases.is_some() != first.biases.is_some() {
                let has = |b: bool| if b { "biases" } else { "no biases" };
                return Err(Error::invalid(
                    OP,
                    "parts",
                    format!("{} at part {i} (as part 0)", has(first.biases.is_some())),
                    has(p.biases.is_some()),
                ));
            }
            rows = rows.checked_add(p.rows()).ok_or(Error::SizeOverflow {
                op: OP,
                what: "rows of the parts",
            })?;
        }
        // Row-major 2-D tensors of equal row length: the parts' bytes simply follow each other.
        let stack = |bufs: Vec<&Buffer>| -> Result<Buffer> {
            let (dtype, width) = (bufs[0].dtype(), bufs[0].shape()[1]);
            let len = checked_product(OP, "stacked bytes", [rows, width, dtype.size()])?;
            let mut bytes = Vec::with_capacity(len);
            for b in bufs {
                bytes.extend_from_slice(b.to_host()?.bytes());
            }
            Buffer::from_bytes(&bytes, dtype, &[rows, width])?.to_device(device)
        };
        let packed = stack(parts.iter().map(|p| &p.packed).collect())?;
        let scales = stack(parts.iter().map(|p| &p.scales).collect())?;
        let biases = match first.biases {
            Some(_) => Some(stack(
                parts.iter().filter_map(|p| p.biases.as_ref()).collect(),
            )?),
            None => None,
        };
        QuantizedWeight::new(packed, scales, biases, first.spec)
    }

    /// A zero-copy view of rows `start..start + count` of a 2-D weight (for
    /// `quantized_matmul(transpose = true)`, output columns `start..start + count`): e.g. the
    /// k projection of a q/k/v weight made by [`QuantizedWeight::concat_rows`]. The view
    /// shares storage with this weight, wherever it lives.
    ///
    /// Errors: a batched weight (take one matrix with [`QuantizedWeight::expert`] first),
    /// `count == 0`, or `start + count` past the last row.
    pub fn row_range(&self, start: usize, count: usize) -> Result<QuantizedWeight> {
        const OP: &str = "QuantizedWeight::row_range";
        if self.shape.len() != 2 {
            return Err(Error::shape(
                OP,
                "self",
                "[rows, cols] (a 2-D weight: take a matrix of a batch with `expert`)",
                &self.shape,
            ));
        }
        if count == 0 {
            return Err(Error::invalid(OP, "count", "at least 1 row", count));
        }
        let rows = self.rows();
        if start.checked_add(count).is_none_or(|end| end > rows) {
            return Err(Error::invalid(
                OP,
                "start + count",
                format!("at most {rows} (the weight's rows)"),
                format!("{start} + {count}"),
            ));
        }
        // No overflow: start < rows, and rows × row bytes was checked when the buffer was made.
        self.rows_view(start, count)
    }
}
