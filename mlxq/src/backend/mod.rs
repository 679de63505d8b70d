//! Backends. The CPU backend always exists; CUDA comes behind the `cuda` feature.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
