//! # mlxq
//!
//! Compute with MLX-format quantized weights anywhere: MLX's affine quantization (1–8 bits,
//! groups of 32/64/128) bit-identical to MLX in both of its flavours, `quantized_matmul`
//! (both transposes, any M), `gather_qmm` for Mixture-of-Experts, quantized embeddings, on a
//! small runtime of devices, typed buffers, command encoders and a kernel registry.
//!
//! ```
//! use mlxq::{ops, Buffer, DType, Device, Flavour, QuantSpec};
//! # fn main() -> mlxq::Result<()> {
//! let device = Device::cpu();
//! let mut enc = device.encoder();
//! // A 256 × 512 weight, quantized to 4 bits in groups of 64 along its 512 columns.
//! let w: Vec<f32> = (0..256 * 512).map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0).collect();
//! let w = Buffer::from_f32(&w, DType::BF16, &[256, 512])?;
//! let qw = ops::quantize(&mut enc, &w, QuantSpec::affine(4, 64)?, Flavour::Gpu)?;
//! // y = x · Wᵀ for 3 rows of x.
//! let x = Buffer::from_f32(&vec![0.5; 3 * 512], DType::BF16, &[3, 512])?;
//! let y = ops::quantized_matmul(&mut enc, &x, &qw, true)?;
//! enc.commit_and_wait()?;
//! assert_eq!((y.shape(), y.dtype()), (&[3, 256][..], DType::BF16));
//! # Ok(()) }
//! ```

#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

mod aligned;
pub mod backend;
pub mod buffer;
pub mod device;
pub mod dtype;
pub mod encoder;
pub mod error;
pub mod io;
pub mod ops;
pub mod quant;
pub mod reference;
pub mod registry;
pub mod weight;

pub use buffer::Buffer;
pub use device::{Device, Location};
pub use dtype::{DType, Element, Float};
pub use encoder::CommandEncoder;
pub use error::{Error, Result};
pub use quant::{Flavour, QuantMode, QuantSpec};
pub use weight::QuantizedWeight;

#[doc(hidden)]
pub use half;
