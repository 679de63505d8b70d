//! MLX's quantization format: the spec, the bit packing, the affine quantizer and the
//! floating-point modes.

pub mod affine;
pub mod fp;
pub mod pack;
mod spec;

pub use spec::{Flavour, QuantMode, QuantSpec};
