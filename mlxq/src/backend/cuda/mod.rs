//! The CUDA backend: the driver and NVRTC are loaded at run time (cudarc's dynamic loading),
//! so this module builds everywhere and [`Device::cuda`](crate::Device::cuda) says plainly when
//! a machine has no driver or no GPU.
//!
//! One [`CudaDevice`] per [`Device`](crate::Device): the primary context, one stream (every
//! encoder of the device records on it, so host copies and kernels stay in order), the kernel
//! registry, and a few words of device memory where kernels report an out-of-range index.
//! Memory is plain device allocations ([`DeviceMem`], `cuMemAlloc`), never managed memory.
//!
//! Kernels live in `kernels/*.cu`, embedded with `include_str!`, and are compiled by NVRTC for
//! the device's own architecture on first use of a [`KernelKey`] (the key's fields become
//! `-D` defines), cached in memory by the registry and on disk by [`nvrtc`]. For experiments,
//! `MLXQ_CUDA_KERNELS=DIR` compiles DIR's copy of any kernel file it holds instead of the
//! embedded one (`kernel_file`), so a kernel change needs no rebuild of the library.

mod dq_gemm;
mod fp;
pub(crate) mod launch;
mod nvrtc;

use crate::error::{Error, Result};
use crate::quant::QuantMode;
use crate::registry::{KernelKey, KernelRegistry, OpKind};
use crate::DType;
use cudarc::driver::{result as cu, sys, CudaContext, CudaFunction, CudaStream, DriverError};
use std::sync::{Arc, Mutex};

pub use launch::{cublas_bf16_gemm_us, read_bandwidth_probe, EventTimer};

/// Whether cuBLAS is loaded, or can be, for `device` (a CUDA device): the large-M prefill
/// route (dequantized slabs of W, one cuBLAS GEMM each) needs it. Loads it on first call
/// outside a graph capture; false for other devices.
pub fn cublas_available(device: &crate::Device) -> bool {
    device.cuda_state().is_ok_and(|d| d.blas().is_some())
}

/// Maps a driver error to [`Error::Cuda`] naming `op`.
pub(crate) fn driver(op: &'static str) -> impl Fn(DriverError) -> Error {
    move |e| Error::Cuda {
        op,
        cause: format!("{e:?}"),
    }
}

/// A plain device allocation, freed on drop.
pub struct DeviceMem {
    ptr: u64,
    len: usize,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
}

impl std::fmt::Debug for DeviceMem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceMem({:#x}, {} bytes)", self.ptr, self.len)
    }
}

impl DeviceMem {
    /// Device address of the first byte.
    pub(crate) fn ptr(&self) -> u64 {
        self.ptr
    }
    /// Length in bytes.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    fn check(&self, op: &'static str, offset: usize, len: usize) -> Result<()> {
        if offset.checked_add(len).is_none_or(|end| end > self.len) {
            return Err(Error::BufferTooSmall {
                op,
                param: "buffer",
                needed: len as u64,
                offset: offset as u64,
                available: self.len.saturating_sub(offset) as u64,
            });
        }
        Ok(())
    }

    /// Copies `src` to `offset..`, in stream order, and waits for it.
    pub(crate) fn upload(&self, offset: usize, src: &[u8]) -> Result<()> {
        self.check("Buffer::to_device", offset, src.len())?;
        if src.is_empty() {
            return Ok(());
        }
        self.ctx
            .bind_to_thread()
            .map_err(driver("Buffer::to_device"))?;
        // SAFETY: the destination range lies in this allocation (checked above); the stream
        // is synchronised before `src` can be released.
        unsafe { cu::memcpy_htod_async(self.ptr + offset as u64, src, self.stream.cu_stream()) }
            .map_err(driver("Buffer::to_device"))?;
        self.stream
            .synchronize()
            .map_err(driver("Buffer::to_device"))
    }

    /// Copies `offset..offset + dst.len()` into `dst` after all work queued on the stream.
    pub(crate) fn download(&self, offset: usize, dst: &mut [u8]) -> Result<()> {
        self.check("Buffer::to_host", offset, dst.len())?;
        if dst.is_empty() {
            return Ok(());
        }
        self.ctx
            .bind_to_thread()
            .map_err(driver("Buffer::to_host"))?;
        // SAFETY: the source range lies in this allocation; we wait before `dst` is used.
        unsafe { cu::memcpy_dtoh_async(dst, self.ptr + offset as u64, self.stream.cu_stream()) }
            .map_err(driver("Buffer::to_host"))?;
        self.stream.synchronize().map_err(driver("Buffer::to_host"))
    }
}

impl Drop for DeviceMem {
    fn drop(&mut self) {
        if self.len > 0 && self.ctx.bind_to_thread().is_ok() {
            // SAFETY: allocated by `cuMemAlloc` and freed once. Work that may still use it is
            // kept alive by the encoder that recorded it (see `CommandEncoder::retain`).
            let _ = unsafe { cu::free_sync(self.ptr) };
        }
    }
}

/// A kernel compiled for one [`KernelKey`]: its name and entry points (row-tile variants).
#[derive(Clone)]
pub struct CudaKernel {
    /// `cuda_{key}`.
    pub name: Arc<str>,
    funcs: Arc<[CudaFunction]>,
    /// The entry points' names, in the order of `funcs`.
    entries: &'static [&'static str],
}

impl std::fmt::Debug for CudaKernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name)
    }
}

impl CudaKernel {
    /// The entry point called `name` (robust to the order of the variant's entry list).
    pub(crate) fn func_named(&self, name: &str) -> Result<&CudaFunction> {
        self.entries
            .iter()
            .position(|e| *e == name)
            .and_then(|i| self.funcs.get(i))
            .ok_or_else(|| {
                Error::unsupported(
                    "CudaKernel",
                    format!("entry {name} of kernel {}", self.name),
                )
            })
    }
}

/// One CUDA kernel source and how a key specialises it: variants are data, as on the CPU.
struct Variant {
    name: &'static str,
    supports: fn(&KernelKey) -> bool,
    /// Its files after `common.cuh` (see [`module_source`]).
    source: &'static [&'static str],
    entries: &'static [&'static str],
    /// Allow fusing a product and a sum (off where rounding must match MLX bit for bit).
    fmad: bool,
    defines: fn(&KernelKey) -> Vec<String>,
}

/// The kernel files of `kernels/`, by name, as embedded in the library.
const FILES: [(&str, &str); 11] = [
    ("common.cuh", include_str!("kernels/common.cuh")),
    ("batch.cuh", include_str!("kernels/batch.cuh")),
    ("smem.cuh", include_str!("kernels/smem.cuh")),
    ("quant.cu", include_str!("kernels/quant.cu")),
    ("qmv.cu", include_str!("kernels/qmv.cu")),
    ("fp.cu", include_str!("kernels/fp.cu")),
    ("qmm_tc.cu", include_str!("kernels/qmm_tc.cu")),
    ("qmv_dec.cu", include_str!("kernels/qmv_dec.cu")),
    ("qmv_decb.cu", include_str!("kernels/qmv_decb.cu")),
    ("qmm_tile.cu", include_str!("kernels/qmm_tile.cu")),
    ("qmm_wg.cu", include_str!("kernels/qmm_wg.cu")),
];
/// A module is `common.cuh` then its files in order (`module_source`).
const QUANT: &[&str] = &["quant.cu"];
/// The bandwidth probe's module (`Batch` and its resolution come first, as in every module that
/// uses them: batch.cuh).
const QMV: &[&str] = &["batch.cuh", "qmv.cu"];
/// The FP modes' kernels (quantize, dequantize, matmul).
const FP: &[&str] = &["batch.cuh", "fp.cu"];
/// The matmul module: the CUDA-core kernels, then the tensor-core ones (which use `Batch`).
const QMM: &[&str] = &[
    "batch.cuh",
    "smem.cuh",
    "qmv.cu",
    "qmm_tc.cu",
    "qmv_dec.cu",
    "qmv_decb.cu",
    "qmm_tile.cu",
    "qmm_wg.cu",
];
/// The FP modes' tensor-core module: the wgmma tiles (and the gather's sort) and the
/// bulk-copy decode kernel (`qmv_decb`) of the matmul module, dequantising E2M1 / E4M3
/// elements with their scale codes (`FPM` in qmm_tc.cu).
const FP_TILES: &[&str] = &[
    "batch.cuh",
    "smem.cuh",
    "qmm_tc.cu",
    "qmv_dec.cu",
    "qmv_decb.cu",
    "qmm_tile.cu",
    "qmm_wg.cu",
];

/// The text of kernel file `name` (one of [`FILES`]): as embedded, or, where
/// `MLXQ_CUDA_KERNELS` names a folder that holds a file of that name, that file (experiments:
/// a kernel changed without rebuilding the library; the disk cache is keyed by the text).
fn kernel_file(name: &str) -> Result<std::borrow::Cow<'static, str>> {
    kernel_file_in(std::env::var_os("MLXQ_CUDA_KERNELS").as_deref(), name)
}

/// [`kernel_file`] with the override folder given.
fn kernel_file_in(
    dir: Option<&std::ffi::OsStr>,
    name: &str,
) -> Result<std::borrow::Cow<'static, str>> {
    if let Some(dir) = dir {
        let path = std::path::Path::new(dir).join(name);
        if path.is_file() {
            return std::fs::read_to_string(&path)
                .map(Into::into)
                .map_err(|cause| Error::Io {
                    path: path.display().to_string(),
                    cause,
                });
        }
    }
    FILES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, text)| (*text).into())
        .ok_or_else(|| Error::unsupported("KernelRegistry", format!("no kernel file {name}")))
}

/// A module's whole source: `common.cuh`, then its files, newline-joined.
fn module_source(files: &[&str]) -> Result<String> {
    let texts = std::iter::once(&"common.cuh")
        .chain(files)
        .map(|f| kernel_file(f))
        .collect::<Result<Vec<_>>>()?;
    Ok(texts.join("\n"))
}

fn ctype(d: DType) -> &'static str {
    match d {
        DType::F32 => "float",
        DType::F16 => "f16_t",
        DType::BF16 => "bf16_t",
        _ => "void",
    }
}

fn affine(k: &KernelKey) -> bool {
    k.mode == QuantMode::Affine && k.scales.is_float() && k.output.is_float()
}

fn base_defines(k: &KernelKey) -> Vec<String> {
    let mut d = vec![
        format!("-DBITS={}", k.bits),
        format!("-DGROUP={}", k.group_size),
    ];
    d.extend(experiment_defines());
    d
}

/// Extra `-D` defines from `MLXQ_CUDA_DEFINES` (`NAME=VALUE,...`, experiments such as
/// `DEC_PROBE=1`); entries that are not a plain identifier and value are ignored.
fn experiment_defines() -> Vec<String> {
    let plain = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    std::env::var("MLXQ_CUDA_DEFINES")
        .unwrap_or_default()
        .split(',')
        .filter_map(|e| e.split_once('='))
        .filter(|(n, v)| plain(n) && plain(v))
        .map(|(n, v)| format!("-D{n}={v}"))
        .collect()
}

/// Whether a key is one of the FP modes (mxfp4, mxfp8, nvfp4) with float data.
fn fp_mode(k: &KernelKey) -> bool {
    k.mode != QuantMode::Affine && k.scales == DType::U8
}

/// An entry list: `$e`, then the wgmma tiles of qmm_wg.cu (`launch::TILES` finds them by
/// name), which both matmul modules compile.
macro_rules! with_wg_tiles {
    ($($e:literal),* $(,)?) => {
        &[
            $($e,)*
            "qmm_wg_256",
            "qmm_wg_128",
            "qmm_wg_64",
            "qmm_wg_g64",
            "qmm_ws_256",
            "qmm_ws_256s5",
            "qmm_ws_128",
            "qmm_ws_64",
            "qmm_ws_g80",
            "qmm_wsp_g80",
            "qmm_wsp3_g80",
            "qmm_wspt_g80",
            "qmm_wg_g128",
            "qmm_wg_g80",
        ]
    };
}

/// Every CUDA kernel variant; the dispatcher takes the first that supports a key.
const TABLE: &[Variant] = &[
    Variant {
        name: "fp_quantize",
        supports: |k| k.op == OpKind::Quantize && fp_mode(k) && k.input.is_float(),
        source: FP,
        entries: &["fp_quantize"],
        fmad: false,
        defines: |k| {
            let mut d = fp::fp_defines(k);
            d.push(format!("-DGPU_FLAVOUR={}", u8::from(k.flag)));
            d.push(format!("-DWT={}", ctype(k.input)));
            d.extend(experiment_defines());
            d
        },
    },
    Variant {
        name: "fp_dequantize",
        supports: |k| k.op == OpKind::Dequantize && fp_mode(k) && k.output.is_float(),
        source: FP,
        entries: &["fp_dequantize"],
        fmad: false,
        defines: |k| {
            let mut d = fp::fp_defines(k);
            d.push(format!("-DGPU_FLAVOUR={}", u8::from(k.flag)));
            d.push(format!("-DOT={}", ctype(k.output)));
            d.extend(experiment_defines());
            d
        },
    },
    Variant {
        name: "fp_qmm",
        supports: |k| {
            k.op == OpKind::QuantizedMatmul
                && fp_mode(k)
                && k.input.is_float()
                && k.output == k.input
        },
        source: FP,
        entries: &[
            "fp_qmv_t_1",
            "fp_qmv_t_4",
            "fp_qmv_t_8",
            "fp_qmv_n_1",
            "fp_qmv_n_4",
        ],
        fmad: true,
        defines: |k| {
            let mut d = fp::fp_defines(k);
            d.push(format!("-DXT={}", ctype(k.input)));
            d.extend(experiment_defines());
            d
        },
    },
    // Not chosen by `kernel` (fp_qmm above serves every FP matmul key first): the launcher asks
    // for it by name where its wgmma tiles serve the call (`launch::qmm`).
    Variant {
        name: "fp_tiles",
        supports: |k| {
            k.op == OpKind::QuantizedMatmul
                && fp_mode(k)
                && k.flag
                && tc_x(k.input) != 0
                && k.output == k.input
        },
        source: FP_TILES,
        entries: with_wg_tiles![
            "gather_count",
            "gather_place",
            "qmv_decb_4_3",
            "qmv_decb_8_2",
            "qmv_decb_8_3",
            "qmv_decb_8_4",
            "qmv_decb_8_2_t2",
        ],
        fmad: true,
        defines: |k| {
            let mut d: Vec<String> = fp::fp_defines(k)
                .into_iter()
                .map(|d| d.replace("-DMODE=", "-DFPM="))
                .collect();
            d.push(format!("-DXT={}", ctype(k.input)));
            d.push("-DST=u8".into());
            d.push(format!("-DOT={}", ctype(k.output)));
            d.push(format!("-DTC_X={}", tc_x(k.input)));
            d.push(format!("-DDEC_SU={}", dec_steps()));
            d.extend(experiment_defines());
            d
        },
    },
    Variant {
        name: "quantize",
        supports: |k| k.op == OpKind::Quantize && k.mode == QuantMode::Affine && k.input.is_float(),
        source: QUANT,
        entries: &["quantize"],
        fmad: false,
        defines: |k| {
            let mut d = base_defines(k);
            d.push(format!("-DGPU_FLAVOUR={}", u8::from(k.flag)));
            d.push(format!("-DWT={}", ctype(k.input)));
            d
        },
    },
    Variant {
        name: "dequantize",
        supports: |k| k.op == OpKind::Dequantize && affine(k),
        source: QUANT,
        entries: &["dequantize"],
        fmad: false,
        defines: |k| {
            let mut d = base_defines(k);
            d.push(format!("-DGPU_FLAVOUR={}", u8::from(k.flag)));
            d.push(format!("-DST={}", ctype(k.scales)));
            d.push(format!("-DOT={}", ctype(k.output)));
            d
        },
    },
    Variant {
        name: "qmv",
        supports: |k| k.op == OpKind::QuantizedMatmul && affine(k) && k.input.is_float(),
        source: QMM,
        entries: with_wg_tiles![
            "qmv_t_1",
            "qmv_t_2",
            "qmv_t_4",
            "qmv_t_8",
            "qmv_t_16",
            "qmv_n_1",
            "qmv_n_2",
            "qmv_n_4",
            "qmv_n_8",
            "qmv_n_16",
            "qmv_n_reduce",
            "qmm_tc_8",
            "qmv_tc_1",
            "qmv_tc_2",
            "qmv_dec_1",
            "qmv_dec_2",
            "qmv_dec_4",
            "qmv_dec_8",
            "qmm_tc_g8",
            "gather_count",
            "gather_place",
            "qmv_decr_2",
            "qmv_decr_4",
            "qmv_decr6_2",
            "qmv_decr6_4",
            "qmv_decm_2_1",
            "qmv_decm_2_2",
            "qmv_decm_2_4",
            "qmv_decm_4_1",
            "qmv_decm_4_2",
            "qmv_decm_4_4",
            "qmv_decm_8_1",
            "qmv_decm_8_2",
            "qmv_decm_8_4",
            "qmv_decm6_2_1",
            "qmv_decm6_4_1",
            "qmv_decb_4_3",
            "qmv_decb_8_2",
            "qmv_decb_8_3",
            "qmv_decb_8_4",
            "qmv_decb_8_2_t2",
            "qmv_decb_8_2_t4",
            "qmv_decb_4_3_s",
            "qmv_decb_4_3_s5",
            "qmv_decb_4_3_5",
            "qmv_decb_8_2_s",
            "qmv_decb_8_2_g1",
            "qmv_decb_8_2_g2",
            "qmv_decb_8_4_g1",
            "qmm_tile_l",
            "qmm_tile_m",
            "qmm_tile_g",
            "qmm_tile_l5",
            "qmm_tile_m6",
            "qmm_tile_g6",
            "qmm_wgn_256",
            "qmm_wgn_128",
            "qmm_wgn_64",
        ],
        fmad: true,
        defines: |k| {
            let mut d = base_defines(k);
            d.push(format!("-DXT={}", ctype(k.input)));
            d.push(format!("-DST={}", ctype(k.scales)));
            d.push(format!("-DOT={}", ctype(k.output)));
            d.push(format!("-DTC_X={}", tc_x(k.input)));
            d.push(format!("-DDEC_SU={}", dec_steps()));
            d
        },
    },
];

/// The tensor-core matmul's operand type for x (`TC_X` in `qmm_tc.cu`): 2 bf16, 1 f16, 0 none.
fn tc_x(d: DType) -> u32 {
    match d {
        DType::BF16 => 2,
        DType::F16 => 1,
        _ => 0,
    }
}

/// Whether the wgmma tiles of W `[K, N]` (`qmm_wgn_*`, transpose = false) serve a matmul key
/// on a device of compute capability `arch`: affine 4- or 8-bit codes, f16/bf16 x and output,
/// sm_90a (their shapes: `launch::wgn_fits`).
pub(crate) fn wgmma_n_path(k: &KernelKey, arch: u32) -> bool {
    nvrtc::wgmma(arch)
        && !k.flag
        && k.mode == QuantMode::Affine
        && matches!(k.bits, 4 | 8)
        && tc_x(k.input) != 0
        && matches!(k.output, DType::BF16 | DType::F16)
}

/// Whether `qmm_tc` serves a matmul key on a device of compute capability `arch`.
pub(crate) fn tensor_core_path(k: &KernelKey, arch: u32) -> bool {
    // f32 outputs keep the exact FFMA kernels (their tolerance is 1e-5; the prefill kernel
    // rounds each weight to the x dtype).
    arch >= 80
        && k.flag
        && matches!(k.bits, 4 | 8)
        && tc_x(k.input) != 0
        && matches!(k.output, DType::BF16 | DType::F16)
}

/// Steps of W per load batch in `qmv_dec` (`DEC_SU`): 2, or `MLXQ_DEC_SU` (1, 2 or 4) for
/// experiments.
pub(crate) fn dec_steps() -> u64 {
    static SU: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *SU.get_or_init(|| {
        std::env::var("MLXQ_DEC_SU")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|v| matches!(v, 1 | 2 | 4))
            .unwrap_or(2)
    })
}

/// Most dynamic shared memory (bytes) `qmv_dec` is launched with (x of the whole row).
pub(crate) const DEC_SMEM_MAX: usize = 100 << 10;

/// Most dynamic shared memory (bytes) the tensor-core decode kernel is launched with.
pub(crate) const TC_SMEM_MAX: usize = 64 << 10;

/// Bytes of split-K scratch allocated when a device opens.
pub(crate) const SCRATCH_BYTES: usize = 32 << 20;

/// The CUDA state of one device.
pub struct CudaDevice {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    registry: KernelRegistry<CudaKernel>,
    /// Compute capability as `major * 10 + minor` (90 on Hopper).
    arch: u32,
    driver_version: i32,
    name: String,
    sms: u32,
    l2_bytes: usize,
    /// Most dynamic shared memory one block may opt in to (bytes).
    pub(crate) smem_optin: usize,
    /// `[position + 1, index, bound, which]` of the first out-of-range index a kernel saw.
    fault: DeviceMem,
    /// Scratch for split-K partial sums, grown on demand.
    scratch: Mutex<Option<crate::Buffer>>,
    /// A tiny utility module (the bandwidth probe), compiled on first use.
    probe: Mutex<Option<CudaFunction>>,
    /// The output's device byte range `[start, end)` of the last kernel enqueued on the
    /// stream if it was a `qmv_dec` (the next one may then be launched as its programmatic
    /// dependent, and needs to wait for it only to read what it wrote), else `None`.
    last_dec: Mutex<Option<(u64, u64)>>,
    /// cuBLAS (large-M prefill, `dq_gemm`), loaded on first use.
    blas: Mutex<dq_gemm::BlasState>,
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaDevice({}, sm_{})", self.name, self.arch)
    }
}

impl CudaDevice {
    /// Opens device `ordinal`, or says why it cannot.
    pub(crate) fn open(ordinal: usize) -> Result<Arc<CudaDevice>> {
        let unavailable = |reason: String| Error::BackendUnavailable {
            device: format!("cuda:{ordinal}"),
            reason,
        };
        // SAFETY: probing for the library has no preconditions.
        if !unsafe { sys::is_culib_present() } {
            return Err(unavailable(
                "the CUDA driver library (libcuda.so) was not found: no NVIDIA driver here".into(),
            ));
        }
        cu::init().map_err(|e| unavailable(format!("cuInit failed: {e:?}")))?;
        let count = cu::device::get_count().map_err(|e| unavailable(format!("{e:?}")))?;
        if ordinal >= count.max(0) as usize {
            return Err(unavailable(format!(
                "this machine has {count} CUDA device(s)"
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| unavailable(format!("{e:?}")))?;
        // Everything is ordered on one stream; cudarc's per-slice events are not needed.
        // SAFETY: no cudarc slices are used by this backend.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(driver("Device::cuda"))?;
        let attr = |a| ctx.attribute(a).map_err(driver("Device::cuda"));
        use sys::CUdevice_attribute as A;
        let major = attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
        let minor = attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
        let sms = attr(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?;
        let l2 = attr(A::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)?;
        let optin = attr(A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?;
        let mut driver_version = 0;
        // SAFETY: a valid out-pointer.
        unsafe { sys::cuDriverGetVersion(&mut driver_version) }
            .result()
            .map_err(driver("Device::cuda"))?;
        let name = ctx.name().unwrap_or_else(|_| "CUDA device".into());
        let fault = raw_alloc(&ctx, &stream, 16)?;
        // Split-K scratch exists before any capture (no allocation may happen inside one).
        let scratch = crate::Buffer::from_device_mem(
            raw_alloc(&ctx, &stream, SCRATCH_BYTES)?,
            ordinal,
            &[SCRATCH_BYTES],
        )?;
        // SAFETY: 16 bytes of the allocation just made.
        unsafe { cu::memset_d8_async(fault.ptr, 0, 16, stream.cu_stream()) }
            .map_err(driver("Device::cuda"))?;
        stream.synchronize().map_err(driver("Device::cuda"))?;
        Ok(Arc::new(CudaDevice {
            ctx,
            stream,
            registry: KernelRegistry::new(),
            arch: (major * 10 + minor) as u32,
            driver_version,
            name,
            sms: sms as u32,
            l2_bytes: l2 as usize,
            smem_optin: optin.max(0) as usize,
            fault,
            scratch: Mutex::new(Some(scratch)),
            probe: Mutex::new(None),
            last_dec: Mutex::new(None),
            blas: Mutex::new(dq_gemm::BlasState::default()),
        }))
    }

    /// The device's name, e.g. `NVIDIA H200`.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// Compute capability as `major * 10 + minor`.
    pub fn arch(&self) -> u32 {
        self.arch
    }
    /// Number of multiprocessors.
    pub fn multiprocessors(&self) -> u32 {
        self.sms
    }
    /// L2 cache size in bytes.
    pub fn l2_bytes(&self) -> usize {
        self.l2_bytes
    }
    /// The driver's CUDA version (e.g. 13000).
    pub fn driver_version(&self) -> i32 {
        self.driver_version
    }
    /// The kernel cache of this device.
    pub fn registry(&self) -> &KernelRegistry<CudaKernel> {
        &self.registry
    }

    /// A new uninitialised allocation of `len` bytes.
    pub(crate) fn alloc(&self, len: usize) -> Result<DeviceMem> {
        raw_alloc(&self.ctx, &self.stream, len)
    }

    /// Waits for all work queued on the device's stream.
    pub(crate) fn synchronize(&self) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(driver("commit_and_wait"))?;
        self.stream.synchronize().map_err(driver("commit_and_wait"))
    }

    /// Reads (and clears) the fault words: an out-of-range index seen by a kernel.
    pub(crate) fn take_fault(&self) -> Result<()> {
        let mut words = [0u8; 16];
        self.fault.download(0, &mut words)?;
        let w: [u32; 4] = bytemuck::cast(words);
        if w[0] == 0 {
            return Ok(());
        }
        self.fault.upload(0, &[0u8; 16])?;
        Err(Error::IndexOutOfRange {
            op: "gather_qmm",
            param: if w[3] == 0 {
                "lhs_indices"
            } else {
                "rhs_indices"
            },
            position: (w[0] - 1) as usize,
            index: i64::from(w[1]),
            bound: w[2] as usize,
        })
    }

    /// Records the output range of the kernel about to be enqueued if it is a `qmv_dec`
    /// (`None` for any other); returns the previous kernel's.
    pub(crate) fn swap_last_dec(&self, out: Option<(u64, u64)>) -> Option<(u64, u64)> {
        let mut last = self.last_dec.lock().unwrap_or_else(|e| e.into_inner());
        std::mem::replace(&mut *last, out)
    }

    pub(crate) fn fault_ptr(&self) -> u64 {
        self.fault.ptr
    }

    pub(crate) fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Scratch memory of at least `len` bytes, grown on demand (work that uses it retains
    /// the buffer, so a replaced one lives until that work is done).
    pub(crate) fn scratch(&self, len: usize) -> Result<crate::Buffer> {
        let mut s = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = s.as_ref().filter(|b| b.nbytes() >= len) {
            return Ok(b.clone());
        }
        let len = len.max(1 << 20);
        let b = crate::Buffer::from_device_mem(self.alloc(len)?, self.ctx.ordinal(), &[len])?;
        *s = Some(b.clone());
        Ok(b)
    }

    /// The kernel for `key` (its variant is filled in here), compiled on first use.
    pub(crate) fn kernel(&self, mut key: KernelKey) -> Result<CudaKernel> {
        let v = TABLE
            .iter()
            .find(|v| (v.supports)(&key))
            .ok_or_else(|| Error::Unsupported {
                op: "KernelRegistry",
                what: format!("a CUDA kernel for {key}"),
                detail: format!(
                    " (mode {}, bits {}, input {}, scales {}, output {})",
                    key.mode, key.bits, key.input, key.scales, key.output
                ),
            })?;
        key.variant = v.name;
        self.registry.get_or_build(key, |k| self.build(v, k))
    }

    /// The kernel of the variant called `name` for `key` (a module the dispatcher does not
    /// pick by itself, such as `fp_tiles`), compiled on first use and cached as [`Self::kernel`]'s.
    pub(crate) fn kernel_variant(&self, mut key: KernelKey, name: &str) -> Result<CudaKernel> {
        let v = TABLE
            .iter()
            .find(|v| v.name == name && (v.supports)(&key))
            .ok_or_else(|| Error::Unsupported {
                op: "KernelRegistry",
                what: format!("the CUDA kernel {name} for {key}"),
                detail: String::new(),
            })?;
        key.variant = v.name;
        self.registry.get_or_build(key, |k| self.build(v, k))
    }

    fn build(&self, v: &Variant, key: &KernelKey) -> Result<CudaKernel> {
        let name = format!("cuda_{key}");
        let mut opts = vec!["-std=c++17".to_string()];
        if !v.fmad {
            opts.push("--fmad=false".into());
        }
        opts.extend((v.defines)(key));
        let funcs = self.load(&name, &module_source(v.source)?, &opts, v.entries)?;
        Ok(CudaKernel {
            name: name.into(),
            funcs: funcs.into(),
            entries: v.entries,
        })
    }

    fn load(
        &self,
        name: &str,
        source: &str,
        opts: &[String],
        entries: &[&str],
    ) -> Result<Vec<CudaFunction>> {
        let cubin = nvrtc::compile(name, source, opts, self.arch, self.driver_version)?;
        let module = self
            .ctx
            .load_module(cudarc::nvrtc::Ptx::from_binary(cubin))
            .map_err(driver("load kernel module"))?;
        entries
            .iter()
            .map(|e| {
                let f = module
                    .load_function(e)
                    .map_err(driver("load kernel function"))?;
                let smem = if e.starts_with("qmv_tc") {
                    // x of a K segment in dynamic shared memory, beside the 32 KB W ring.
                    TC_SMEM_MAX
                } else if e.starts_with("qmv_decb") {
                    // The bulk-copy ring: as much as the device lets one block have.
                    self.smem_optin
                } else if e.starts_with("qmv_dec") {
                    DEC_SMEM_MAX
                } else if ["qmm_tile", "qmm_wg", "qmm_ws"]
                    .iter()
                    .any(|p| e.starts_with(p))
                {
                    // The tiled prefills' rings: as much as the device lets one block have.
                    self.smem_optin
                } else {
                    0
                };
                if smem > 0 {
                    use sys::CUfunction_attribute as F;
                    f.set_attribute(
                        F::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                        smem as i32,
                    )
                    .and_then(|()| {
                        f.set_attribute(F::CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT, 100)
                    })
                    .map_err(driver("load kernel function"))?;
                }
                Ok(f)
            })
            .collect()
    }

    /// Compiles `source` (after the common header) with NVRTC for this device, through the
    /// disk cache, and loads `entries` from it: a check that kernels build, and that a broken
    /// one reports NVRTC's log.
    pub fn compile_source(&self, name: &str, source: &str, entries: &[&str]) -> Result<()> {
        let src = format!("{}\n{source}", kernel_file("common.cuh")?);
        self.load(name, &src, &["-std=c++17".to_string()], entries)
            .map(drop)
    }

    /// The bandwidth probe kernel (reads 16-byte words).
    pub(crate) fn probe(&self) -> Result<CudaFunction> {
        let mut p = self.probe.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = p.as_ref() {
            return Ok(f.clone());
        }
        let opts = [
            "-std=c++17".to_string(),
            "-DBITS=4".into(),
            "-DGROUP=64".into(),
            "-DXT=float".into(),
            "-DST=float".into(),
            "-DOT=float".into(),
        ];
        let f = self.load(
            "cuda_read_probe",
            &module_source(QMV)?,
            &opts,
            &["read_probe"],
        )?;
        let f = f
            .into_iter()
            .next()
            .ok_or_else(|| Error::unsupported("probe", "no entry"))?;
        *p = Some(f.clone());
        Ok(f)
    }

    pub(crate) fn begin_capture(&self) -> Result<()> {
        self.stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(driver("CommandEncoder::capture"))
    }

    pub(crate) fn end_capture(&self, keep: Vec<crate::Buffer>) -> Result<Graph> {
        let g = self
            .stream
            .end_capture(sys::CUgraphInstantiate_flags(0))
            .map_err(driver("CommandEncoder::capture"))?
            .ok_or_else(|| Error::Cuda {
                op: "CommandEncoder::capture",
                cause: "nothing was captured".into(),
            })?;
        Ok(Graph {
            graph: g,
            _keep: keep,
        })
    }
}

/// Compiles (without a GPU: NVRTC alone) every CUDA kernel variant for `sm_{arch}` on a
/// spread of keys that together touch every width, group size and dtype; returns how many
/// modules were built. A check that the kernel sources are valid wherever NVRTC exists.
pub fn compile_all_kernels(arch: u32) -> Result<usize> {
    let mut built = 0;
    for v in TABLE {
        // Each width with one dtype, and the tensor-core widths with both half types too.
        let mut cases: Vec<(usize, u32, DType)> = Vec::new();
        for (i, &bits) in [1u32, 2, 3, 4, 5, 6, 8].iter().enumerate() {
            cases.push((i, bits, [DType::F32, DType::F16, DType::BF16][i % 3]));
            if matches!(bits, 4 | 8) {
                cases.push((i + 1, bits, DType::BF16));
                cases.push((i + 2, bits, DType::F16));
            }
        }
        let op = match v.name {
            "quantize" | "fp_quantize" => OpKind::Quantize,
            "dequantize" | "fp_dequantize" => OpKind::Dequantize,
            _ => OpKind::QuantizedMatmul,
        };
        let mut keys: Vec<KernelKey> = cases
            .into_iter()
            .map(|(i, bits, dt)| KernelKey {
                op,
                mode: QuantMode::Affine,
                bits,
                group_size: [32, 64, 128][i % 3],
                input: dt,
                scales: dt,
                output: [DType::BF16, DType::F32, DType::F16][i % 3],
                flag: i % 2 == 0 || dt != DType::F32,
                variant: v.name,
            })
            .collect();
        // The FP modes: each with each float dtype, both flavours over the three.
        for (i, mode) in [QuantMode::Mxfp4, QuantMode::Mxfp8, QuantMode::Nvfp4]
            .into_iter()
            .enumerate()
        {
            let (bits, group_size) = crate::QuantSpec::fp_defaults(mode);
            for (j, dt) in [DType::F32, DType::F16, DType::BF16]
                .into_iter()
                .enumerate()
            {
                keys.push(KernelKey {
                    op,
                    mode,
                    bits,
                    group_size,
                    input: dt,
                    scales: DType::U8,
                    output: dt,
                    flag: (i + j) % 2 == 0,
                    variant: v.name,
                });
            }
        }
        for key in keys {
            if !(v.supports)(&key) {
                continue;
            }
            let mut opts = vec!["-std=c++17".to_string()];
            if !v.fmad {
                opts.push("--fmad=false".into());
            }
            opts.extend((v.defines)(&key));
            nvrtc::compile(
                &format!("cuda_{key}"),
                &module_source(v.source)?,
                &opts,
                arch,
                0,
            )?;
            built += 1;
        }
    }
    Ok(built)
}

fn raw_alloc(ctx: &Arc<CudaContext>, stream: &Arc<CudaStream>, len: usize) -> Result<DeviceMem> {
    let ptr = if len == 0 {
        0
    } else {
        ctx.bind_to_thread().map_err(driver("alloc"))?;
        // SAFETY: a plain allocation; freed by `DeviceMem::drop`.
        unsafe { cu::malloc_sync(len) }.map_err(|e| Error::Cuda {
            op: "alloc",
            cause: format!("cuMemAlloc of {len} bytes: {e:?}"),
        })?
    };
    Ok(DeviceMem {
        ptr,
        len,
        ctx: Arc::clone(ctx),
        stream: Arc::clone(stream),
    })
}

/// A captured sequence of ops (see [`CommandEncoder::capture`](crate::CommandEncoder::capture)).
/// It keeps the buffers its kernels use alive.
pub struct Graph {
    graph: cudarc::driver::CudaGraph,
    _keep: Vec<crate::Buffer>,
}

impl std::fmt::Debug for Graph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Graph")
    }
}

impl Graph {
    /// Enqueues one replay on the device's stream (wait with the encoder's `commit_and_wait`).
    pub fn replay(&self) -> Result<()> {
        self.graph.launch().map_err(driver("Graph::replay"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_module_file_is_embedded_and_a_folder_overrides_it() -> std::io::Result<()> {
        for v in TABLE {
            let src = module_source(v.source);
            for f in std::iter::once(&"common.cuh").chain(v.source) {
                let text = FILES.iter().find(|(n, _)| n == f).map(|(_, t)| *t);
                assert!(
                    matches!((&src, text), (Ok(s), Some(t)) if s.contains(t)),
                    "{} lacks {f}",
                    v.name
                );
            }
        }
        let dir = std::env::temp_dir().join(format!("mlxq-kernels-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("qmv.cu"), "// replaced")?;
        let d = Some(dir.as_os_str());
        let text = |name| kernel_file_in(d, name).map(|t| t.into_owned()).ok();
        assert_eq!(text("qmv.cu").as_deref(), Some("// replaced"));
        // Files the folder does not hold stay as embedded; unknown names are errors.
        assert_eq!(text("quant.cu").as_deref(), Some(FILES[3].1));
        let err = kernel_file_in(None, "nope.cu").map(drop);
        assert!(
            matches!(&err, Err(e) if e.to_string().contains("nope.cu")),
            "{err:?}"
        );
        std::fs::remove_dir_all(&dir)
    }
}
