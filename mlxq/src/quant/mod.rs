//! MLX's quantization format: the spec, the bit packing, and the affine quantizer.

pub mod affine;
pub mod pack;
mod spec;

pub use spec::{Flavour, QuantMode, QuantSpec};
