//! The kernel registry: a kernel is specialised for a typed key on first use, then cached.
//!
//! On the CPU, "compiling" a kernel means choosing the monomorphised function for the key's
//! bits, group size, dtypes and SIMD level; on CUDA it will mean an NVRTC compile. Either way the
//! key is a plain value ([`KernelKey`]) and names are derived from it in one place.

use crate::dtype::DType;
use crate::error::Result;
use crate::quant::QuantMode;
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// The operation a kernel implements.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OpKind {
    /// Float weights → packed weights, scales, biases.
    Quantize,
    /// Packed weights → floats.
    Dequantize,
    /// `x · Wᵀ` (transpose) or `x · W`.
    QuantizedMatmul,
}

/// The `variant` of a key before the backend's dispatcher has chosen one.
pub const AUTO: &str = "auto";

/// Everything a kernel is specialised on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KernelKey {
    /// The op.
    pub op: OpKind,
    /// Quantization mode.
    pub mode: QuantMode,
    /// Bits per weight.
    pub bits: u32,
    /// Elements per group.
    pub group_size: u32,
    /// dtype of the float input (x for matmul, w for quantize, scales for dequantize).
    pub input: DType,
    /// dtype of scales and biases.
    pub scales: DType,
    /// dtype of the output.
    pub output: DType,
    /// Op-specific switch: transpose for matmul, the MLX flavour for quantize/dequantize.
    pub flag: bool,
    /// The kernel variant (e.g. `generic`).
    pub variant: &'static str,
}

impl KernelKey {
    /// The key of the dequantize kernel for `w` into `output` in `flavour` (variant chosen by
    /// the registry).
    pub(crate) fn dequantize(
        w: &crate::QuantizedWeight,
        output: DType,
        flavour: crate::Flavour,
    ) -> Self {
        let spec = w.spec();
        KernelKey {
            op: OpKind::Dequantize,
            mode: spec.mode(),
            bits: spec.bits(),
            group_size: spec.group_size(),
            input: DType::U32,
            scales: w.scales_dtype(),
            output,
            flag: flavour == crate::Flavour::Gpu,
            variant: AUTO,
        }
    }
}

impl fmt::Display for KernelKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?}_{}_b{}_g{}_{}_{}_{}_{}_{}",
            self.op,
            self.mode,
            self.bits,
            self.group_size,
            self.input,
            self.scales,
            self.output,
            u8::from(self.flag),
            self.variant
        )
    }
}

/// A cache from [`KernelKey`] to a built kernel `V`.
pub struct KernelRegistry<V> {
    cache: Mutex<HashMap<KernelKey, V>>,
    builds: AtomicU64,
}

impl<V: Clone> Default for KernelRegistry<V> {
    fn default() -> Self {
        Self::new()
    }
}

impl<V: Clone> KernelRegistry<V> {
    /// An empty registry.
    pub fn new() -> Self {
        KernelRegistry {
            cache: Mutex::new(HashMap::new()),
            builds: AtomicU64::new(0),
        }
    }

    /// The kernel for `key`, built by `build` the first time it is asked for.
    pub fn get_or_build(
        &self,
        key: KernelKey,
        build: impl FnOnce(&KernelKey) -> Result<V>,
    ) -> Result<V> {
        // A poisoned lock only means another thread panicked mid-insert; the map is still valid.
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(k) = cache.get(&key) {
            return Ok(k.clone());
        }
        let k = build(&key)?;
        self.builds.fetch_add(1, Ordering::Relaxed);
        cache.insert(key, k.clone());
        Ok(k)
    }

    /// How many kernels were built (cache misses) so far.
    pub fn builds(&self) -> u64 {
        self.builds.load(Ordering::Relaxed)
    }

    /// How many kernels are cached.
    pub fn len(&self) -> usize {
        self.cache.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
