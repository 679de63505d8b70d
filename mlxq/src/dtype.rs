//! Element types of buffers, and the three floating-point types ops compute with.

use half::{bf16, f16};
use std::fmt;

/// The element type of a [`Buffer`](crate::Buffer).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    /// IEEE binary32.
    F32,
    /// IEEE binary16.
    F16,
    /// bfloat16 (the top half of an f32).
    BF16,
    /// Unsigned byte (FP-mode scales).
    U8,
    /// Unsigned 32-bit word (packed quantized weights, indices).
    U32,
    /// Signed 32-bit integer (indices).
    I32,
}

impl DType {
    /// Bytes per element.
    pub const fn size(self) -> usize {
        match self {
            DType::F32 | DType::U32 | DType::I32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::U8 => 1,
        }
    }

    /// Whether this is one of the floating-point types ops take as input.
    pub const fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F16 | DType::BF16)
    }

    /// The result type of arithmetic between `self` and `other`, as MLX promotes:
    /// equal types stay, f32 wins, and f16 with bf16 gives f32 (neither holds the other).
    /// Only meaningful for float types; integer operands yield `None`.
    pub fn promote(self, other: DType) -> Option<DType> {
        if !self.is_float() || !other.is_float() {
            return None;
        }
        Some(if self == other { self } else { DType::F32 })
    }

    /// The name MLX and safetensors use (`float32`, `bfloat16`, ...).
    pub const fn name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            DType::U8 => "uint8",
            DType::U32 => "uint32",
            DType::I32 => "int32",
        }
    }

    /// Parses `f32`/`float32`, `f16`/`float16`, `bf16`/`bfloat16`, `u8`, `u32`, `i32`.
    pub fn parse(s: &str) -> Option<DType> {
        Some(match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => DType::F32,
            "f16" | "float16" | "half" => DType::F16,
            "bf16" | "bfloat16" => DType::BF16,
            "u8" | "uint8" => DType::U8,
            "u32" | "uint32" => DType::U32,
            "i32" | "int32" => DType::I32,
            _ => return None,
        })
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Rust types that can be the elements of a buffer.
pub trait Element: bytemuck::Pod + Send + Sync + 'static {
    /// The matching [`DType`].
    const DTYPE: DType;
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
}
impl Element for f16 {
    const DTYPE: DType = DType::F16;
}
impl Element for bf16 {
    const DTYPE: DType = DType::BF16;
}
impl Element for u8 {
    const DTYPE: DType = DType::U8;
}
impl Element for u32 {
    const DTYPE: DType = DType::U32;
}
impl Element for i32 {
    const DTYPE: DType = DType::I32;
}

/// The floating-point element types (f32, f16, bf16): exact widening to f32 and
/// round-to-nearest-even narrowing from f32 (what MLX does on every cast).
pub trait Float: Element + Copy + PartialOrd {
    /// Widens exactly.
    fn to_f32(self) -> f32;
    /// Narrows with round-to-nearest-even.
    fn from_f32(v: f32) -> Self;
}

impl Float for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        v
    }
}

impl Float for f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
}

impl Float for bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
}

/// Calls `$body` with the type alias `$t` bound to the Rust type of the float dtype `$dtype`;
/// evaluates `$other` for non-float dtypes. Runtime dtype → generic code, in one place.
#[macro_export]
#[doc(hidden)]
macro_rules! with_float_type {
    ($dtype:expr, $t:ident => $body:expr, _ => $other:expr) => {
        match $dtype {
            $crate::DType::F32 => {
                type $t = f32;
                $body
            }
            $crate::DType::F16 => {
                type $t = $crate::half::f16;
                $body
            }
            $crate::DType::BF16 => {
                type $t = $crate::half::bf16;
                $body
            }
            _ => $other,
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn promotion_follows_mlx() {
        assert_eq!(DType::F16.promote(DType::BF16), Some(DType::F32));
        assert_eq!(DType::BF16.promote(DType::BF16), Some(DType::BF16));
        assert_eq!(DType::F32.promote(DType::F16), Some(DType::F32));
        assert_eq!(DType::U32.promote(DType::F32), None);
    }

    #[test]
    fn narrowing_is_nearest_even() {
        // 1 + 2^-8 lies exactly between two bf16 values: ties go to the even one (1.0).
        assert_eq!(bf16::from_f32(1.0 + 2f32.powi(-8)).to_f32(), 1.0);
        assert_eq!(
            bf16::from_f32(1.0 + 3.0 * 2f32.powi(-8)).to_f32(),
            1.0 + 2f32.powi(-6)
        );
    }
}
