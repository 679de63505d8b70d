//! The CPU backend: kernels specialised per (bits, dtypes) through monomorphisation, chosen
//! once per [`KernelKey`] and cached in the device's registry.
//!
//! Kernel variants are data: each has a name and a `supports` test, and the dispatcher takes
//! the first in its list that fits (a caller can force one by name, which is how tests run
//! every path). The `generic` variants are portable scalar Rust, written so the compiler can
//! vectorise them, and are the twins of the f64 oracle in [`crate::reference`].

#[cfg(target_arch = "aarch64")]
pub(crate) mod arm_neon;
pub(crate) mod dequantize;
pub(crate) mod qmm;
pub(crate) mod quantize;
// The x86 decode kernels' task runner (the NEON decode keeps rayon's loop: not measured on ARM).
#[cfg(target_arch = "x86_64")]
pub(crate) mod tasks;
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86;
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86_amx;
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86_amx_dec;
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86_avx2;
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86_avx2_fp_quant;
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86_avx2_i8;
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86_avx2_int;
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86_avx2_quant;
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86_avx2_qvm;
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86_bf16;
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86_columns;
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86_fp;
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86_fp_quant;
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86_gemm;
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86_gemm_bf16;
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86_quant;
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86_qvm;
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86_vnni;

use crate::error::Result;
use crate::registry::{KernelKey, OpKind};
use std::sync::Arc;

/// A CPU kernel as cached by the registry: its name and its entry point.
#[derive(Clone)]
pub struct CpuKernel {
    /// Name reported by benchmarks and the encoder, derived from the kernel key.
    pub name: Arc<str>,
    /// Calls of fewer rows than the first count that exceeds theirs run the kernel named
    /// with it instead (ascending; see [`CpuKernel::name_for_rows`]).
    /// Shared, so that the registry's copy of a cached kernel allocates nothing.
    decode: Arc<[(usize, Arc<str>)]>,
    pub(crate) func: KernelFn,
}

impl CpuKernel {
    /// The name of the kernel that runs a call with `rows` rows of x: [`CpuKernel::name`],
    /// or that of the kernel this one hands such calls to.
    pub fn name_for_rows(&self, rows: usize) -> &str {
        self.decode
            .iter()
            .find(|(below, _)| rows < *below)
            .map_or(&self.name, |(_, name)| name)
    }
}

impl std::fmt::Debug for CpuKernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name)
    }
}

/// Type-erased entry points; each is a monomorphised generic function.
#[derive(Clone, Copy)]
pub(crate) enum KernelFn {
    Quantize(quantize::QuantizeFn),
    Dequantize(dequantize::DequantizeFn),
    Qmm(qmm::QmmFn),
}

/// One matrix of a quantized weight, as raw bytes: `rows × cols`, quantized along `cols`.
#[derive(Clone, Copy)]
pub(crate) struct MatrixRef<'a> {
    pub packed: &'a [u8],
    pub scales: &'a [u8],
    pub biases: &'a [u8],
    pub rows: usize,
    pub cols: usize,
    pub group_size: usize,
    pub bits: u32,
}

impl MatrixRef<'_> {
    /// Bytes of one packed row.
    pub fn row_bytes(&self) -> usize {
        self.cols / 8 * self.bits as usize
    }
    /// Groups per row.
    pub fn groups(&self) -> usize {
        self.cols / self.group_size
    }
}

/// A matmul kernel's weight, typed (made by [`qmm::QmmArgs::operands`], which checks every
/// length), with the slice of one row over a range of groups.
pub(crate) struct Rows<'a, S> {
    pub packed: &'a [u8],
    pub scales: &'a [S],
    pub biases: &'a [S],
    /// Bytes from one packed row to the next.
    pub row_bytes: usize,
    /// Groups per row, and elements per group.
    pub groups: usize,
    pub g: usize,
}

// The x86 decode kernels' accessor (the other kernels index the slices themselves).
#[cfg(target_arch = "x86_64")]
impl<'a, S> Rows<'a, S> {
    /// Groups `g0..g1` of row `row` (codes `bits` wide): its packed codes, scales and
    /// biases, or `None` where any of them is out of range.
    #[inline]
    pub fn row(
        &self,
        row: usize,
        g0: usize,
        g1: usize,
        bits: usize,
    ) -> Option<(&'a [u8], &'a [S], &'a [S])> {
        let (p0, s0, per) = (row * self.row_bytes, row * self.groups, self.g / 8 * bits);
        Some((
            self.packed.get(p0 + g0 * per..p0 + g1 * per)?,
            self.scales.get(s0 + g0..s0 + g1)?,
            self.biases.get(s0 + g0..s0 + g1)?,
        ))
    }
}

/// Views raw bytes as `T`, failing with a clear error if misaligned or of the wrong length.
pub(crate) fn cast<'a, T: bytemuck::Pod>(
    op: &'static str,
    param: &'static str,
    b: &'a [u8],
) -> Result<&'a [T]> {
    bytemuck::try_cast_slice(b).map_err(|_| crate::Error::Misaligned {
        op,
        param,
        dtype: crate::DType::U8,
        align: std::mem::align_of::<T>(),
        offset: b.as_ptr() as u64 % std::mem::align_of::<T>() as u64,
    })
}

/// Mutable twin of [`cast`].
pub(crate) fn cast_mut<'a, T: bytemuck::Pod>(
    op: &'static str,
    param: &'static str,
    b: &'a mut [u8],
) -> Result<&'a mut [T]> {
    let addr = b.as_ptr() as u64;
    bytemuck::try_cast_slice_mut(b).map_err(|_| crate::Error::Misaligned {
        op,
        param,
        dtype: crate::DType::U8,
        align: std::mem::align_of::<T>(),
        offset: addr % std::mem::align_of::<T>() as u64,
    })
}

/// A pointer for writing disjoint elements of one output slice from several threads.
pub(crate) struct DisjointOut<T> {
    ptr: *mut T,
    len: usize,
}

// SAFETY: the pointer is only written through `write`, whose contract requires that no two
// threads write the same index and that the slice outlives every writer (it is borrowed
// mutably for the whole parallel loop that uses it).
unsafe impl<T: Send> Send for DisjointOut<T> {}
// SAFETY: as above; shared references only allow `write` under its contract.
unsafe impl<T: Send> Sync for DisjointOut<T> {}

impl<T> DisjointOut<T> {
    pub fn new(out: &mut [T]) -> Self {
        DisjointOut {
            ptr: out.as_mut_ptr(),
            len: out.len(),
        }
    }

    /// Writes `v` at `i`; out-of-range indices are ignored (and caught by debug assertions).
    ///
    /// # Safety
    /// No other thread may read or write index `i` while the parallel loop runs, and the slice
    /// given to [`DisjointOut::new`] must still be mutably borrowed by the caller.
    #[inline(always)]
    pub unsafe fn write(&self, i: usize, v: T) {
        debug_assert!(i < self.len);
        if i < self.len {
            // SAFETY: in bounds (checked above); exclusive per the function's contract.
            unsafe { self.ptr.add(i).write(v) };
        }
    }

    /// The pointer to elements `i..i + len`, or `None` where the range passes the end.
    ///
    /// # Safety
    /// As [`DisjointOut::write`], for every index written through the pointer; nothing may
    /// be read through it.
    #[cfg(target_arch = "x86_64")] // only the x86 kernels write whole runs
    #[inline(always)]
    pub unsafe fn range_ptr(&self, i: usize, len: usize) -> Option<*mut T> {
        let end = i.checked_add(len)?;
        // SAFETY: i ≤ end ≤ len of the allocation (checked).
        (end <= self.len).then(|| unsafe { self.ptr.add(i) })
    }

    /// Writes `v` at `i..i + v.len()`; a range past the end is ignored (and caught by debug
    /// assertions).
    ///
    /// # Safety
    /// As [`DisjointOut::write`], for every index of the range.
    #[cfg(target_arch = "x86_64")] // only the x86 kernels write whole runs
    #[inline(always)]
    pub unsafe fn write_slice(&self, i: usize, v: &[T])
    where
        T: Copy,
    {
        debug_assert!(i + v.len() <= self.len);
        if i.checked_add(v.len()).is_some_and(|end| end <= self.len) {
            // SAFETY: in bounds (checked above); exclusive per the function's contract; `v`
            // is a distinct borrow, so the ranges do not overlap.
            unsafe { std::ptr::copy_nonoverlapping(v.as_ptr(), self.ptr.add(i), v.len()) };
        }
    }
}

/// Where a portable kernel's per-task body is compiled: for the baseline target, or (on
/// x86-64) with AVX2 and FMA enabled, so that LLVM vectorises it 8 wide and uses the fused
/// `f32::mul_add` and rounding instructions of the newer ISA instead of library calls. Rust
/// never contracts `a·b + c` on its own, so both tiers compute bit-identical results.
pub(crate) trait Tier: Sync + 'static {
    /// Runs `f`, inlined into a function compiled for this tier.
    fn run<R>(f: impl FnOnce() -> R) -> R;
}

/// The baseline target (the `generic` variant).
pub(crate) struct Baseline;

impl Tier for Baseline {
    #[inline(always)]
    fn run<R>(f: impl FnOnce() -> R) -> R {
        f()
    }
}

/// AVX2 and FMA (the `avx2` variant's portable kernels).
#[cfg(target_arch = "x86_64")]
pub(crate) struct Avx2Fma;

#[cfg(target_arch = "x86_64")]
impl Tier for Avx2Fma {
    #[inline(always)]
    fn run<R>(f: impl FnOnce() -> R) -> R {
        #[target_feature(enable = "avx2,fma")]
        #[inline]
        unsafe fn on_avx2<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        // SAFETY: kernels of this tier are only chosen where `x86_avx2::available()` holds.
        unsafe { on_avx2(f) }
    }
}

/// Below how many rows a kernel hands a call to another kernel, and that variant's name:
/// ascending counts (a GEMM may hand few rows to a decode kernel and more to another GEMM).
pub(crate) type DecodeFn = fn(&KernelKey) -> Vec<(usize, &'static str)>;

/// One kernel variant: a name, which keys it can run on this machine, and how to build it.
/// Each kernel file defines its own; [`TABLE`] lists them best first.
pub(crate) struct Variant {
    pub name: &'static str,
    pub supports: fn(&KernelKey) -> bool,
    /// For a kernel that hands calls of few rows to a decode kernel: below how many rows, and
    /// that kernel's variant name (so the encoder records what actually ran).
    pub decode: Option<DecodeFn>,
    pub build: fn(&KernelKey) -> Option<KernelFn>,
}

/// Every variant, best first. The dispatcher takes the first that supports a key.
const TABLE: &[Variant] = &[
    #[cfg(target_arch = "x86_64")]
    x86_amx::QMM_T_AMX,
    // Never first for a key (`amx` takes all of its keys and hands it 2..16 rows): listed so
    // that it can be named.
    #[cfg(target_arch = "x86_64")]
    x86_amx_dec::QMM_T_AMX_DEC,
    // bf16 x on AMD's full-rate `vdpbf16ps` (Zen 4/5); other keys and CPUs go on.
    #[cfg(target_arch = "x86_64")]
    x86_gemm_bf16::QMM_T_GEMM_BF16,
    #[cfg(target_arch = "x86_64")]
    x86_gemm::QMM_T_GEMM,
    #[cfg(target_arch = "x86_64")]
    x86_vnni::QMM_T_VNNI,
    #[cfg(target_arch = "x86_64")]
    x86_bf16::QMM_T_BF16,
    #[cfg(target_arch = "x86_64")]
    x86::QMV_T,
    #[cfg(target_arch = "x86_64")]
    x86_quant::QUANT,
    #[cfg(target_arch = "x86_64")]
    x86_fp_quant::FP_QUANT,
    #[cfg(target_arch = "x86_64")]
    x86_avx2_fp_quant::FP_QUANT_AVX2,
    #[cfg(target_arch = "x86_64")]
    x86_qvm::QMV_N,
    #[cfg(target_arch = "x86_64")]
    x86_avx2::QMM_T_GEMM_AVX2,
    #[cfg(target_arch = "x86_64")]
    x86_avx2_int::QMM_T_AVX2_INT,
    #[cfg(target_arch = "x86_64")]
    x86::QMV_T_AVX2,
    #[cfg(target_arch = "aarch64")]
    arm_neon::QMV_T,
    GENERIC,
];

/// Names of the CPU kernel variants (see [`Device::cpu_with_variant`](crate::Device::cpu_with_variant)).
pub const VARIANTS: &[&str] = &[
    "amx",
    "amx-dec",
    "avx512bf16gemm",
    "avx512gemm",
    "avx512vnni",
    "avx512bf16",
    "avx512",
    "avx2gemm",
    "avx2i16",
    "avx2",
    "neon",
    "generic",
    "avx512gemm-i8",
    "avx2gemm-i8",
];

/// The variants of [`VARIANTS`] whose results may differ from the f32 path by more than the
/// conformance tolerance: never chosen unless forced by name, each documented with its error
/// bound (`avx512gemm-i8` and `avx2gemm-i8`: x quantized to int8 per block of 32).
pub const APPROXIMATE: &[&str] = &["avx512gemm-i8", "avx2gemm-i8"];

/// For an [`APPROXIMATE`] variant, the largest |x̂| `L` of the int8 grid that x is rounded to
/// for codes of `bits` bits: per block of 32 values, steps of `max|x|/L`, so each output errs
/// by at most half a step of each block times that block's `Σ|s·q|`. 127, but 63 for 8-bit
/// codes on `avx2gemm-i8` (whose `vpmaddubsw` would saturate). `None` for any other name.
pub fn int8_levels(variant: &str, bits: u32) -> Option<u32> {
    #[cfg(target_arch = "x86_64")]
    {
        use x86_gemm::CodesIsa;
        let b = bits as usize;
        if variant == x86_gemm::Avx512I8::NAME {
            return Some(x86_gemm::Avx512I8::levels(b) as u32);
        }
        if variant == x86_avx2_i8::Avx2I8::NAME {
            return Some(x86_avx2_i8::Avx2I8::levels(b) as u32);
        }
    }
    let _ = (variant, bits);
    None
}

/// Opt-in variants ([`APPROXIMATE`]): considered only when a device prefers one by name.
const OPT_IN: &[Variant] = &[
    #[cfg(target_arch = "x86_64")]
    x86_gemm::QMM_T_GEMM_I8,
    #[cfg(target_arch = "x86_64")]
    x86_avx2_i8::QMM_T_GEMM_I8_AVX2,
];

/// Every variant a key may run on: the opt-in ones first, so a device that names one gets it.
fn all_variants() -> impl Iterator<Item = &'static Variant> {
    OPT_IN.iter().chain(TABLE)
}

/// The portable variant: every op, every key (affine and the FP modes).
const GENERIC: Variant = Variant {
    name: "generic",
    // The FP modes (mxfp4, mxfp8, nvfp4) run here wherever neither `avx512` nor `avx2` runs
    // them: quantize and dequantize on CPUs without AVX2, the matmuls as `x86.rs` says.
    supports: |_| true,
    decode: None,
    build: portable::<Baseline>,
};

/// The portable kernels of every op, compiled for tier `T`.
fn portable<T: Tier>(k: &KernelKey) -> Option<KernelFn> {
    let fp = k.mode != crate::QuantMode::Affine;
    match k.op {
        OpKind::Quantize if fp => {
            quantize::generic_fp::<T>(k.input, k.mode).map(KernelFn::Quantize)
        }
        OpKind::Dequantize if fp => {
            (k.scales == crate::DType::U8).then_some(())?;
            dequantize::generic_fp::<T>(k.output, k.mode).map(KernelFn::Dequantize)
        }
        OpKind::QuantizedMatmul if fp => {
            (k.scales == crate::DType::U8).then_some(())?;
            qmm::generic_fp::<T>(k.output, k.mode, k.flag).map(KernelFn::Qmm)
        }
        OpKind::Quantize => quantize::generic::<T>(k.input, k.bits).map(KernelFn::Quantize),
        OpKind::Dequantize => {
            dequantize::generic::<T>(k.scales, k.output, k.bits).map(KernelFn::Dequantize)
        }
        OpKind::QuantizedMatmul => {
            qmm::generic::<T>(k.scales, k.output, k.bits, k.flag).map(KernelFn::Qmm)
        }
    }
}

/// Whether `variant` can run `key` on this machine.
pub fn supports(variant: &str, key: &KernelKey) -> bool {
    all_variants().any(|v| v.name == variant && (v.supports)(key))
}

/// The kernel for `key` (its `variant` is filled in here) from the device's registry,
/// specialised on first use. A device made with [`Device::cpu_with_variant`] prefers that
/// variant and falls back to `generic` where it does not apply.
///
/// [`Device::cpu_with_variant`]: crate::Device::cpu_with_variant
pub(crate) fn kernel(device: &crate::Device, mut key: KernelKey) -> Result<CpuKernel> {
    let preferred = device.preferred_variant();
    key.variant = all_variants()
        .filter(|v| match preferred {
            Some(p) => v.name == p || v.name == "generic",
            None => !APPROXIMATE.contains(&v.name),
        })
        .find(|v| (v.supports)(&key))
        .ok_or_else(|| unsupported(&key))?
        .name;
    device.registry().get_or_build(key, build)
}

fn unsupported(k: &KernelKey) -> crate::Error {
    crate::Error::Unsupported {
        op: "KernelRegistry",
        what: format!("a CPU kernel for {k}"),
        detail: format!(
            " (mode {}, bits {}, input {}, scales {}, output {})",
            k.mode, k.bits, k.input, k.scales, k.output
        ),
    }
}

fn build(k: &KernelKey) -> Result<CpuKernel> {
    let variant = all_variants()
        .find(|v| v.name == k.variant && (v.supports)(k))
        .ok_or_else(|| unsupported(k))?;
    let func = (variant.build)(k).ok_or_else(|| unsupported(k))?;
    let decode: Arc<[(usize, Arc<str>)]> = variant.decode.map_or_else(
        || Arc::from(Vec::new()),
        |d| {
            d(k).into_iter()
                .map(|(below, name)| {
                    let key = KernelKey {
                        variant: name,
                        ..*k
                    };
                    (below, Arc::from(format!("cpu_{key}")))
                })
                .collect()
        },
    );
    Ok(CpuKernel {
        name: format!("cpu_{k}").into(),
        decode,
        func,
    })
}
