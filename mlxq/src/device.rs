//! Devices: where buffers live and work runs.
//!
//! A [`Device`] is cheap to clone and owns the [`KernelRegistry`] of its backend, so kernels
//! are specialised once per device and reused by every encoder made from it.

use crate::backend::cpu::CpuKernel;
use crate::encoder::CommandEncoder;
use crate::error::{Error, Result};
use crate::registry::KernelRegistry;
use std::fmt;
use std::sync::Arc;

/// Where a buffer's memory lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Location {
    /// Host memory.
    Cpu,
    /// Memory of CUDA device `n`.
    Cuda(usize),
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Cpu => f.write_str("cpu"),
            Location::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

struct Inner {
    location: Location,
    preferred_variant: Option<&'static str>,
    registry: KernelRegistry<CpuKernel>,
    #[cfg(feature = "cuda")]
    cuda: Option<Arc<crate::backend::cuda::CudaDevice>>,
}

/// A compute device and its kernel cache.
#[derive(Clone)]
pub struct Device {
    inner: Arc<Inner>,
}

impl fmt::Debug for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Device({})", self.inner.location)
    }
}

impl Device {
    /// The host CPU (all cores, SIMD chosen at run time).
    pub fn cpu() -> Device {
        Device {
            inner: Arc::new(Inner {
                location: Location::Cpu,
                preferred_variant: None,
                registry: KernelRegistry::new(),
                #[cfg(feature = "cuda")]
                cuda: None,
            }),
        }
    }

    /// The CPU, preferring kernel `variant` (one of [`backend::cpu::VARIANTS`]) wherever it
    /// applies and falling back to `generic` elsewhere: how tests run every path and
    /// benchmarks compare them. The encoder's [`last_kernel`](CommandEncoder::last_kernel)
    /// says which ran.
    ///
    /// [`backend::cpu::VARIANTS`]: crate::backend::cpu::VARIANTS
    pub fn cpu_with_variant(variant: &str) -> Result<Device> {
        let v = crate::backend::cpu::VARIANTS
            .iter()
            .find(|v| **v == variant)
            .ok_or_else(|| {
                Error::invalid(
                    "Device::cpu_with_variant",
                    "variant",
                    format!("one of {:?}", crate::backend::cpu::VARIANTS),
                    variant,
                )
            })?;
        Ok(Device {
            inner: Arc::new(Inner {
                location: Location::Cpu,
                preferred_variant: Some(v),
                registry: KernelRegistry::new(),
                #[cfg(feature = "cuda")]
                cuda: None,
            }),
        })
    }

    /// The kernel variant this device prefers, if one was forced.
    pub fn preferred_variant(&self) -> Option<&'static str> {
        self.inner.preferred_variant
    }

    /// CUDA device `ordinal`: its primary context and one stream, on which every encoder of
    /// this device records (kernels are compiled by NVRTC on first use). Returns
    /// [`Error::BackendUnavailable`] naming the reason when mlxq was built without the `cuda`
    /// feature, when no NVIDIA driver is installed, or when there is no such device.
    pub fn cuda(ordinal: usize) -> Result<Device> {
        #[cfg(feature = "cuda")]
        {
            let cuda = crate::backend::cuda::CudaDevice::open(ordinal)?;
            Ok(Device {
                inner: Arc::new(Inner {
                    location: Location::Cuda(ordinal),
                    preferred_variant: None,
                    registry: KernelRegistry::new(),
                    cuda: Some(cuda),
                }),
            })
        }
        #[cfg(not(feature = "cuda"))]
        Err(Error::BackendUnavailable {
            device: Location::Cuda(ordinal).to_string(),
            reason: "mlxq was built without the `cuda` feature".into(),
        })
    }

    /// The CUDA state of this device, or [`Error::BackendUnavailable`] for the CPU.
    #[cfg(feature = "cuda")]
    pub fn cuda_state(&self) -> Result<&Arc<crate::backend::cuda::CudaDevice>> {
        self.inner
            .cuda
            .as_ref()
            .ok_or_else(|| Error::BackendUnavailable {
                device: self.inner.location.to_string(),
                reason: "not a CUDA device".into(),
            })
    }

    /// Parses `cpu`, `cuda` or `cuda:N`.
    pub fn parse(name: &str) -> Result<Device> {
        match name {
            "cpu" => Ok(Device::cpu()),
            "cuda" => Device::cuda(0),
            s => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Device::cuda(n),
                _ => Err(Error::invalid(
                    "Device::parse",
                    "device",
                    "cpu, cuda or cuda:N",
                    s,
                )),
            },
        }
    }

    /// Where this device's buffers live.
    pub fn location(&self) -> Location {
        self.inner.location
    }

    /// The kernel cache of this device.
    pub fn registry(&self) -> &KernelRegistry<CpuKernel> {
        &self.inner.registry
    }

    /// A new command encoder that records work on this device.
    pub fn encoder(&self) -> CommandEncoder {
        CommandEncoder::new(self.clone())
    }
}
