//! [`QuantSpec`]: mode, bits and group size, validated once.

use crate::dtype::DType;
use crate::error::{Error, Result};
use std::fmt;

/// MLX's quantization modes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QuantMode {
    /// Per-group scale and bias, unsigned integer codes of 1..8 bits.
    Affine,
    /// OCP MX fp4: E2M1 elements, E8M0 scale per 32.
    Mxfp4,
    /// OCP MX fp8: E4M3FN elements, E8M0 scale per 32.
    Mxfp8,
    /// NVIDIA fp4: E2M1 elements, E4M3 scale per 16.
    Nvfp4,
}

impl QuantMode {
    /// MLX's name for the mode.
    pub const fn name(self) -> &'static str {
        match self {
            QuantMode::Affine => "affine",
            QuantMode::Mxfp4 => "mxfp4",
            QuantMode::Mxfp8 => "mxfp8",
            QuantMode::Nvfp4 => "nvfp4",
        }
    }

    /// Parses MLX's mode names.
    pub fn parse(s: &str) -> Result<QuantMode> {
        Ok(match s {
            "affine" => QuantMode::Affine,
            "mxfp4" => QuantMode::Mxfp4,
            "mxfp8" => QuantMode::Mxfp8,
            "nvfp4" => QuantMode::Nvfp4,
            _ => {
                return Err(Error::invalid(
                    "QuantMode::parse",
                    "mode",
                    "affine, mxfp4, mxfp8 or nvfp4",
                    s,
                ))
            }
        })
    }
}

impl fmt::Display for QuantMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Which MLX implementation's arithmetic to reproduce bit for bit.
///
/// MLX's CPU and GPU (Metal, CUDA) code paths quantize and dequantize slightly differently;
/// both are deterministic. See `DESIGN.md` §1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Flavour {
    /// `mx.quantize` on MLX's CPU stream: ties to even, the true group max; dequantize rounds
    /// after the multiply and again after the add.
    Cpu,
    /// MLX's Metal and CUDA kernels, which made most published checkpoints (`mlx_lm.convert` on
    /// a Mac): ties away from zero, the group max floored at 0; dequantize is one f32 FMA
    /// rounded once. The default, because it reproduces the files people download.
    #[default]
    Gpu,
}

impl Flavour {
    /// `cpu` or `gpu`.
    pub const fn name(self) -> &'static str {
        match self {
            Flavour::Cpu => "cpu",
            Flavour::Gpu => "gpu",
        }
    }

    /// Parses `cpu` or `gpu`.
    pub fn parse(s: &str) -> Result<Flavour> {
        match s {
            "cpu" => Ok(Flavour::Cpu),
            "gpu" => Ok(Flavour::Gpu),
            _ => Err(Error::invalid("Flavour::parse", "flavour", "cpu or gpu", s)),
        }
    }
}

impl fmt::Display for Flavour {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A validated quantization: mode, bits per element and elements per group.
///
/// Fields are private: every `QuantSpec` that exists is one MLX accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct QuantSpec {
    mode: QuantMode,
    bits: u32,
    group_size: u32,
}

impl QuantSpec {
    /// Affine quantization with `bits` ∈ {1,2,3,4,5,6,8} and `group_size` ∈ {32,64,128}.
    pub fn affine(bits: u32, group_size: u32) -> Result<QuantSpec> {
        QuantSpec::new(QuantMode::Affine, bits, group_size)
    }

    /// A spec for `mode`; the FP modes accept only their fixed bits and group size
    /// (mxfp4: 4/32, mxfp8: 8/32, nvfp4: 4/16).
    pub fn new(mode: QuantMode, bits: u32, group_size: u32) -> Result<QuantSpec> {
        const OP: &str = "QuantSpec";
        match mode {
            QuantMode::Affine => {
                if !matches!(bits, 1..=6 | 8) {
                    return Err(Error::invalid(
                        OP,
                        "bits",
                        "one of 1, 2, 3, 4, 5, 6, 8",
                        bits,
                    ));
                }
                if !matches!(group_size, 32 | 64 | 128) {
                    return Err(Error::invalid(
                        OP,
                        "group_size",
                        "one of 32, 64, 128",
                        group_size,
                    ));
                }
            }
            QuantMode::Mxfp4 | QuantMode::Mxfp8 | QuantMode::Nvfp4 => {
                let (b, g) = QuantSpec::fp_defaults(mode);
                if bits != b {
                    return Err(Error::invalid(OP, "bits", format!("{b} for {mode}"), bits));
                }
                if group_size != g {
                    return Err(Error::invalid(
                        OP,
                        "group_size",
                        format!("{g} for {mode}"),
                        group_size,
                    ));
                }
            }
        }
        Ok(QuantSpec {
            mode,
            bits,
            group_size,
        })
    }

    /// The only (bits, group size) of an FP mode; MLX's defaults (4, 64) for affine.
    pub const fn fp_defaults(mode: QuantMode) -> (u32, u32) {
        match mode {
            QuantMode::Affine => (4, 64),
            QuantMode::Mxfp4 => (4, 32),
            QuantMode::Mxfp8 => (8, 32),
            QuantMode::Nvfp4 => (4, 16),
        }
    }

    /// The mode.
    pub const fn mode(&self) -> QuantMode {
        self.mode
    }
    /// Bits per element.
    pub const fn bits(&self) -> u32 {
        self.bits
    }
    /// Elements per group.
    pub const fn group_size(&self) -> u32 {
        self.group_size
    }
    /// Largest code, `2^bits − 1`.
    pub const fn max_code(&self) -> u32 {
        (1 << self.bits) - 1
    }
    /// Whether groups carry a bias (affine only).
    pub const fn has_biases(&self) -> bool {
        matches!(self.mode, QuantMode::Affine)
    }
    /// The dtype of the scales quantizing a weight of `weight` dtype gives: the weight's own
    /// (affine, as MLX: scales and biases in the input's float type) or uint8 codes (the FP
    /// modes' E8M0 or E4M3 scales).
    pub const fn scales_dtype(&self, weight: DType) -> DType {
        if self.has_biases() {
            weight
        } else {
            DType::U8
        }
    }
    /// Bytes of packed codes per group: `group_size · bits / 8` (always whole).
    pub const fn group_bytes(&self) -> usize {
        (self.group_size * self.bits / 8) as usize
    }
    /// Number of uint32 words a row of `cols` elements packs into, or `None` if `cols` is
    /// not a whole number of groups.
    pub fn packed_words(&self, cols: usize) -> Option<usize> {
        if !cols.is_multiple_of(self.group_size as usize) {
            return None;
        }
        // Whole words: cols·bits is a multiple of 32 for every mode's groups (affine's of 32
        // or more; nvfp4's 16 four-bit codes are 64 bits), so a row of an odd number of
        // nvfp4 groups still packs into whole words (48 codes: 6).
        let row_bits = cols.checked_mul(self.bits as usize)?;
        row_bits.is_multiple_of(32).then_some(row_bits / 32)
    }
}

impl fmt::Display for QuantSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}-bit group {}",
            self.mode, self.bits, self.group_size
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_what_mlx_rejects() {
        for bits in [0, 7, 9, 16] {
            let e = QuantSpec::affine(bits, 64).unwrap_err().to_string();
            assert!(e.contains("bits") && e.contains(&bits.to_string()), "{e}");
        }
        for g in [0, 16, 48, 256] {
            let e = QuantSpec::affine(4, g).unwrap_err().to_string();
            assert!(
                e.contains("group_size") && e.contains(&g.to_string()),
                "{e}"
            );
        }
        assert!(QuantSpec::new(QuantMode::Mxfp4, 4, 64).is_err());
        assert!(QuantSpec::new(QuantMode::Nvfp4, 4, 16).is_ok());
    }

    #[test]
    fn packed_sizes() {
        let s = QuantSpec::affine(3, 32).unwrap();
        assert_eq!(s.group_bytes(), 12);
        assert_eq!(s.packed_words(4096), Some(384));
        assert_eq!(s.packed_words(4100), None);
    }
}
