//! AMX GEMM for `y = x·Wᵀ` with many rows of x (prefill, MoE experts with many tokens), on
//! CPUs with Advanced Matrix Extensions (Intel Sapphire Rapids and later) where the OS grants
//! the tile state: `tdpbf16ps` multiplies 16×32 by 32×16 bf16 tiles into a 16×16 f32 tile,
//! 1.4–2.2 TFLOP/s per core on this VM's Xeon (six times its 512-bit FMA peak).
//!
//! **Arithmetic: exact products, f32 sums.** Operands are split into bf16 planes whose sum
//! is the value: x into `x₁ + x₂ + x₃` (x₁ the nearest bf16, x₂ the nearest to the
//! remainder, x₃ the rest; one plane holds bf16 x exactly, two any value of ≤ 16 significant
//! bits such as f16, three any f32 — the call uses as few as x needs, from an OR over x's
//! bits), and W's decoded weights `s·q` the same way (two planes for bf16 scales, where
//! `s·q` has ≤ 16 significant bits; three for f16, and for f32 scales `s·q` rounded to f32
//! once, as every f32 decode does). Products of bf16 planes are exact in f32; the tiles sum
//! them in f32 (pairs, then into the accumulator), over the whole of K, so the error is the
//! f32 accumulation's. Plane products `xᵢ·wⱼ` with `i + j > 2` (counting from 0) are left
//! out: each is below 2⁻²⁴ of `|x·w|`. The bias term `Σ_j b[n,j]·Σx[r,j]` rides along as
//! extra K steps: the biases' planes against the three planes of the f32 group sums of x.
//! Tiles treat bf16 inputs below f32's normal range as zero and flush such sums (below any
//! tolerance); a remainder that is not finite (an infinite or NaN value) becomes zero, so
//! such a value gives what its first plane alone gives.
//!
//! **Blocking.** A task owns [`NB`] × 32 output columns (`NB` pairs of 16-row W tiles). Per
//! block of [`KC`] values of K and pair of W tiles it decodes those 32 rows of W into their
//! bf16 planes (a 32-code step is one 64-byte tile row; 32 KiB, in L1; codes of up to 6 bits
//! through per-row tables of their values' planes), then for each pair of 16-row tiles of x
//! (x's block stays in L2 for the task's pairs) loads the four C tiles (zero, plus the bias
//! steps, in the first block), and per step and plane pair loads two W and two x tiles for
//! four `tdpbf16ps`, then stores the C tiles. x is packed once per call into the B-operand
//! layout (row `kp` of a tile holds the pairs `x[r,2kp], x[r,2kp+1]` of its 16 rows), rows
//! past M zero.
//!
//! Fewer than [`min_m`] rows (16 or 32) take `avx512gemm`, which hands the fewest to its
//! decode kernels; where `avx512vnni` would take them and the CPU has AMX-INT8, calls of
//! [`ROWS`](super::x86_amx_dec::ROWS) rows (6..=16, past `min_m` for narrow codes) go to
//! `amx-dec` instead.

use super::qmm::QmmArgs;
use super::x86_gemm::{decode64, transpose16};
use super::{DisjointOut, KernelFn, MatrixRef, Variant};
use crate::dtype::Float;
use crate::error::Result;
use crate::quant::pack::dispatch_bits;
use rayon::prelude::*;
use std::arch::x86_64::*;
use std::cell::RefCell;
use std::sync::OnceLock;

/// The variant: `quantized_matmul`, transpose, every affine width, any x dtype, on CPUs with
/// AMX-BF16 (and the AVX-512 the other kernels need) whose OS grants the tile state.
pub(crate) const QMM_T_AMX: Variant = Variant {
    name: "amx",
    supports: |k| (super::x86_gemm::QMM_T_GEMM.supports)(k) && available(),
    decode: Some(|k| {
        // As the calls go: fewer than `min_m` rows to `avx512gemm`, which hands its fewest on
        // (so its decode kernels' range ends at `min_m` at the latest).
        let top = min_m(k.bits as usize);
        let dec = (super::x86_amx_dec::QMM_T_AMX_DEC.supports)(k);
        let mut below: Vec<_> = super::x86_gemm::handoffs(k)
            .into_iter()
            .flat_map(|(rows, name)| {
                // `amx-dec` takes `avx512vnni`'s keys' calls of `ROWS` rows (up to 16, from
                // the top of `avx512vnni`'s range, where it may pass `top`).
                let dec = dec && name == super::x86_vnni::QMM_T_VNNI.name;
                let r = &super::x86_amx_dec::ROWS;
                let first = (if dec { r.start } else { rows.min(top) }, name);
                let second = dec.then_some((r.end, super::x86_amx_dec::QMM_T_AMX_DEC.name));
                std::iter::once(first).chain(second)
            })
            .collect();
        if below.last().is_none_or(|&(rows, _)| rows < top) {
            below.push((top, super::x86_gemm::QMM_T_GEMM.name));
        }
        below
    }),
    build: |k| {
        let small = super::x86_gemm::decode_kernel(k).1;
        crate::with_float_type!(k.scales, S => crate::with_float_type!(k.output, O => {
            Some(KernelFn::Qmm(dispatch_bits!(k.bits, B => match small {
                super::x86_gemm::SMALL_VNNI =>
                    qmm_t::<S, O, B, { super::x86_gemm::SMALL_VNNI }> as super::qmm::QmmFn,
                super::x86_gemm::SMALL_BF16 =>
                    qmm_t::<S, O, B, { super::x86_gemm::SMALL_BF16 }> as super::qmm::QmmFn,
                _ => qmm_t::<S, O, B, { super::x86_gemm::SMALL_F32 }> as super::qmm::QmmFn,
            }, _ => return None)))
        }, _ => None), _ => None)
    },
};

/// Rows of x from which the tiles beat `avx512gemm` and the decode kernels it hands few
/// rows to: 16 for codes of ≤ 4 bits, 32 for wider ones (`mlxq bench`, 4096×4096, session 16
/// of docs/perf.md: at 16 rows 4-bit is clearly faster on the tiles, 5- and 6-bit within the
/// noise; at 32 rows every width is).
const fn min_m(bits: usize) -> usize {
    if bits <= 4 {
        16
    } else {
        32
    }
}
/// Output columns per task: two tiles of 16 rows of W.
const NT: usize = 32;
/// Groups of [`NT`] columns per task: x's block is read from L3 once for all of them.
const NB: usize = 4;
/// Values of K per decoded block: 8 steps of 32, 16 KiB of bf16 a plane for 32 rows of W.
const KC: usize = 256;
/// Values of K per tile step (one 64-byte row of bf16).
const STEP: usize = 32;

/// Whether this CPU has AMX-BF16 and AVX-512 BF16, and the OS granted this process the tile
/// state (asked once).
pub(crate) fn available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| super::x86_bf16::available() && cpu_has_amx_bf16() && request_tile_state())
}

/// CPUID leaf 7: EDX bit 22 is AMX-BF16, bit 24 AMX-TILE.
/// Whether the CPU has AMX-INT8 (CPUID leaf 7, EDX bit 25) besides what [`available`]
/// checks.
pub(crate) fn has_amx_int8() -> bool {
    // SAFETY: as in `cpu_has_amx_bf16` (callers check AVX-512 first).
    #[allow(unused_unsafe)]
    let r = unsafe { __cpuid_count(7, 0) };
    r.edx & (1 << 25) != 0
}

fn cpu_has_amx_bf16() -> bool {
    // SAFETY: CPUID leaf 7 exists on every CPU with AVX-512 (checked first by the caller).
    #[allow(unused_unsafe)]
    let r = unsafe { __cpuid_count(7, 0) };
    r.edx & (1 << 22) != 0 && r.edx & (1 << 24) != 0
}

/// Linux grants the 8 KiB tile-data state per process on request (`arch_prctl`
/// `ARCH_REQ_XCOMP_PERM`, feature 18); it fails where the kernel or hypervisor does not
/// support it.
#[cfg(target_os = "linux")]
fn request_tile_state() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: a plain system call with integer arguments; it changes only whether this
    // process may use the tile registers.
    unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        ) == 0
    }
}

#[cfg(not(target_os = "linux"))]
fn request_tile_state() -> bool {
    false
}

/// A tile palette (palette 1): each tile's bytes per row and rows.
#[repr(C, align(64))]
pub(crate) struct TileConfig([u8; 64]);

impl TileConfig {
    /// Tiles `0..8` of `colsb[t]` bytes × `rows[t]` rows (0 × 0: unused).
    pub(crate) const fn new(colsb: [u16; 8], rows: [u8; 8]) -> TileConfig {
        let mut c = [0u8; 64];
        c[0] = 1;
        let mut t = 0;
        while t < 8 {
            let b = colsb[t].to_le_bytes();
            c[16 + 2 * t] = b[0];
            c[17 + 2 * t] = b[1];
            c[48 + t] = rows[t];
            t += 1;
        }
        TileConfig(c)
    }
}

/// This kernel's palette: all eight tiles 16 rows × 64 bytes (0–3 accumulate f32, 4–5 hold
/// W's codes, 6–7 x's planes).
static CONFIG: TileConfig = TileConfig::new([64; 8], [16; 8]);

/// Tile instructions. Inline assembly blocks that are not `pure` keep their order, so the
/// tile state (which the compiler never touches) flows from one to the next.
pub(crate) mod tile {
    use super::{TileConfig, CONFIG};
    use std::arch::asm;

    /// Loads `amx`'s palette.
    ///
    /// # Safety
    /// [`available`](super::available) holds.
    #[inline(always)]
    pub unsafe fn configure() {
        // SAFETY: the caller's contract.
        unsafe { configure_with(&CONFIG) }
    }

    /// Loads the palette `c`.
    ///
    /// # Safety
    /// [`available`](super::available) holds.
    #[inline(always)]
    pub unsafe fn configure_with(c: &TileConfig) {
        // SAFETY: the caller's contract; a TileConfig is a valid 64-byte palette-1 configuration.
        unsafe {
            asm!("ldtilecfg [{0}]", in(reg) c.0.as_ptr(), options(nostack, readonly, preserves_flags))
        }
    }

    /// # Safety
    /// [`available`](super::available) holds.
    #[inline(always)]
    pub unsafe fn release() {
        // SAFETY: the caller's contract.
        unsafe { asm!("tilerelease", options(nostack, nomem, preserves_flags)) }
    }

    /// # Safety
    /// The tiles are configured.
    #[inline(always)]
    pub unsafe fn zero<const T: u8>() {
        // SAFETY: the caller's contract.
        unsafe { asm!("tilezero tmm{t}", t = const T, options(nostack, nomem, preserves_flags)) }
    }

    /// Loads tile `T` from 16 rows of 64 bytes at `p`.
    ///
    /// # Safety
    /// The tiles are configured as 16 rows of 64 bytes; 1 KiB at `p` is readable.
    #[inline(always)]
    pub unsafe fn load<const T: u8>(p: *const u8) {
        // SAFETY: the caller's contract.
        unsafe { load_strided::<T>(p, 64) }
    }

    /// Loads tile `T`'s rows from `p`, `stride` bytes apart.
    ///
    /// # Safety
    /// The tiles are configured; each of tile `T`'s rows (its configured bytes) at `p`,
    /// `p + stride`, … is readable.
    #[inline(always)]
    pub unsafe fn load_strided<const T: u8>(p: *const u8, stride: usize) {
        // SAFETY: the caller's contract.
        unsafe {
            asm!("tileloadd tmm{t}, [{p} + {s}*1]", t = const T, p = in(reg) p, s = in(reg) stride,
                 options(nostack, readonly, preserves_flags))
        }
    }

    /// Stores tile `T` to 16 rows of 64 bytes at `p`.
    ///
    /// # Safety
    /// The tiles are configured as 16 rows of 64 bytes; 1 KiB at `p` is writable.
    #[inline(always)]
    pub unsafe fn store<const T: u8>(p: *mut u8) {
        // SAFETY: the caller's contract.
        unsafe {
            asm!("tilestored [{p} + {s}*1], tmm{t}", t = const T, p = in(reg) p, s = in(reg) 64usize,
                 options(nostack, preserves_flags))
        }
    }

    /// `tmm C += tmm A · tmm B` (bf16 pairs, f32 sums).
    ///
    /// # Safety
    /// The tiles are configured.
    #[inline(always)]
    pub unsafe fn dp<const C: u8, const A: u8, const B: u8>() {
        // SAFETY: the caller's contract.
        unsafe {
            asm!("tdpbf16ps tmm{c}, tmm{a}, tmm{b}", c = const C, a = const A, b = const B,
                 options(nostack, nomem, preserves_flags))
        }
    }

    /// `tmm C += tmm A · tmm B` with A's bytes unsigned and B's signed (four products a
    /// dword, i32 sums).
    ///
    /// # Safety
    /// The tiles are configured; the CPU has AMX-INT8.
    #[inline(always)]
    pub unsafe fn dpbusd<const C: u8, const A: u8, const B: u8>() {
        // SAFETY: the caller's contract.
        unsafe {
            asm!("tdpbusd tmm{c}, tmm{a}, tmm{b}", c = const C, a = const A, b = const B,
                 options(nostack, nomem, preserves_flags))
        }
    }
}

// Tile rows are cache lines.
use crate::aligned::Line;
const ZERO: Line = Line::ZERO;

/// A task's scratch: decoded W block, the bias steps' W side, the C tiles as stored
/// between blocks, and the task's scales and biases as f32 `[column][group]`.
type Scratch = (Vec<Line>, Vec<Line>, Vec<Line>, Vec<f32>, Vec<f32>);

thread_local! {
    static SCRATCH: RefCell<Scratch> = const {
        RefCell::new((Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new()))
    };
    /// Σx of a tile of x while it is packed.
    static SUMS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// Packed x, taken out for the length of a call.
    static XPACK: RefCell<Vec<Line>> = const { RefCell::new(Vec::new()) };
}

/// The kernel: fewer than [`min_m`] rows go to `avx512gemm` (which hands the fewest to its
/// decode kernel `SMALL`).
fn qmm_t<S: Float, O: Float, const BITS: usize, const SMALL: u8>(a: QmmArgs<'_>) -> Result<()> {
    if SMALL == super::x86_gemm::SMALL_VNNI
        && super::x86_amx_dec::ROWS.contains(&a.m)
        && super::x86_amx_dec::available()
    {
        return super::x86_amx_dec::qmm_t::<S, O, BITS>(a);
    }
    if a.m < min_m(BITS) {
        return super::x86_gemm::qmm_t::<S, O, BITS, SMALL>(a);
    }
    const OP: &str = "quantized_matmul";
    let w = a.w;
    let a = a.operands::<S, O>(OP, true, true)?;
    let (m, n, k, groups) = (a.m, a.rows, a.cols, a.w.groups);
    let (scales, biases) = (a.w.scales, a.w.biases);
    if !w.group_size.is_multiple_of(STEP) || !KC.is_multiple_of(w.group_size) {
        return Err(crate::Error::unsupported(
            OP,
            format!("amx on group size {} (m {m}, n {n}, k {k})", w.group_size),
        ));
    }
    // Columns c0.. of the scales and biases as f32, [column][group].
    let widen = |c0: usize, cols: usize, sv: &mut [f32], bv: &mut [f32]| {
        for (src, dst) in [(scales, sv), (biases, bv)] {
            let (src, dst) = (
                &src[c0 * groups..(c0 + cols) * groups],
                &mut dst[..cols * groups],
            );
            for (d, s) in dst.iter_mut().zip(src) {
                *d = s.to_f32();
            }
        }
    };
    let writer = DisjointOut::new(a.out);
    let write = |c0: usize, cols: usize, acc: &[f32]| {
        for mt in 0..m.div_ceil(16) {
            for ct in 0..cols.div_ceil(16) {
                let tile = &acc[tile_index(mt, ct)..][..256];
                let (rows, width) = (16.min(m - mt * 16), 16.min(cols - ct * 16));
                // SAFETY: this variant runs where AVX-512 is present; the task of columns
                // c0.. alone writes them, in every row.
                unsafe { write_tile(tile, rows, width, &writer, mt * 16 * n + c0 + ct * 16, n) };
            }
        }
    };
    // s·q has at most 16 significant bits for bf16 scales (two planes), 19 for f16; f32
    // scales give s·q rounded to f32 (as every kernel's f32 decode does).
    let wplanes = if S::DTYPE == crate::DType::BF16 { 2 } else { 3 };
    // SAFETY: this variant is only chosen where `available()` holds.
    unsafe { gemm::<BITS>(a.x, m, &w, wplanes, &widen, &write) };
    Ok(())
}

/// Where the C tile of x tile `mt` and W tile `ct` (0 or 1) of a pair of W tiles starts in
/// its accumulators as stored: per pair of x tiles four tiles (W rows 0..16 × x tile 0,
/// × x tile 1, W rows 16..32 × x tile 0, × x tile 1), each 16 W rows × 16 rows of x.
#[inline(always)]
fn tile_index(mt: usize, ct: usize) -> usize {
    ((mt / 2) * 4 + ct * 2 + mt % 2) * 256
}

/// Writes a stored C tile (16 columns of output × 16 rows of x) transposed into `out`: row
/// `r < rows` of x at `base + r·n`, its first `width` columns.
///
/// # Safety
/// The CPU has AVX-512 F/BW/VL; no other thread writes those outputs.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn write_tile<O: Float>(
    tile: &[f32],
    rows: usize,
    width: usize,
    out: &DisjointOut<O>,
    base: usize,
    n: usize,
) {
    let mut v = [_mm512_setzero_si512(); 16];
    for (c, v) in v.iter_mut().enumerate() {
        // SAFETY: 16 floats of the 256 (sliced below).
        *v = unsafe { _mm512_loadu_si512(tile[..256][c * 16..].as_ptr() as *const __m512i) };
    }
    transpose16(&mut v);
    for (r, v) in v.iter().take(rows).enumerate() {
        let row = narrow16::<O>(_mm512_castsi512_ps(*v));
        // SAFETY: the caller's contract.
        unsafe { out.write_slice(base + r * n, &row[..width]) };
    }
}

/// 16 floats narrowed to `O` as `O::from_f32` does (round to nearest even; NaN stays NaN).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(crate) fn narrow16<O: Float>(v: __m512) -> [O; 16] {
    let mut out = [O::from_f32(0.0); 16];
    let p = out.as_mut_ptr();
    // SAFETY: `out` holds 16 elements of O's size (4 or 2 bytes), as each store writes.
    unsafe {
        match O::DTYPE {
            crate::DType::F32 => _mm512_storeu_ps(p as *mut f32, v),
            crate::DType::F16 => _mm256_storeu_si256(
                p as *mut __m256i,
                _mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v),
            ),
            _ => {
                // bf16: the upper half, rounded to nearest even; NaN gets its quiet bit.
                let bits = _mm512_castps_si512(v);
                let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(bits), _mm512_set1_epi32(1));
                let up = _mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7fff)), lsb);
                let nan = _mm512_cmpgt_epu32_mask(
                    _mm512_and_si512(bits, _mm512_set1_epi32(0x7fff_ffff)),
                    _mm512_set1_epi32(0x7f80_0000),
                );
                let quiet = _mm512_or_si512(_mm512_srli_epi32::<16>(bits), _mm512_set1_epi32(0x40));
                let r = _mm512_mask_mov_epi32(_mm512_srli_epi32::<16>(up), nan, quiet);
                _mm256_storeu_si256(p as *mut __m256i, _mm512_cvtepi32_epi16(r));
            }
        }
    }
    out
}

/// Widens a task's scales and biases: `(c0, cols, scales out, biases out)`.
type WidenFn<'a> = dyn Fn(usize, usize, &mut [f32], &mut [f32]) + Sync + 'a;
/// Writes a task's accumulators out: `(c0, cols, C tiles as stored)`.
type WriteFn<'a> = dyn Fn(usize, usize, &[f32]) + Sync + 'a;

/// The GEMM, generic over the code width only (scales and output types come in closures,
/// called once per task).
///
/// # Safety
/// [`available`] holds; the caller checked the sizes of x, W, scales and biases.
unsafe fn gemm<const BITS: usize>(
    x: &[f32],
    m: usize,
    w: &MatrixRef<'_>,
    wplanes: usize,
    widen: &WidenFn<'_>,
    write: &WriteFn<'_>,
) {
    let (n, k, g) = (w.rows, w.cols, w.group_size);
    let groups = w.groups();
    let row_bytes = w.row_bytes();
    let steps = k / STEP;
    let bsteps = groups.div_ceil(STEP);
    let mts = m.div_ceil(16);
    // Planes of x: 1 where x is bf16, 2 where its values have ≤ 16 significant bits, else 3.
    let or = x[..m * k]
        .par_chunks(1 << 14)
        .map(|c| c.iter().fold(0u32, |a, v| a | v.to_bits()))
        .reduce(|| 0, |a, b| a | b);
    let xplanes = if or & 0xffff == 0 {
        1
    } else if or & 0xff == 0 {
        2
    } else {
        3
    };
    let shape = XShape {
        steps,
        xplanes,
        tile_lines: (steps * xplanes + bsteps * 3) * 16,
    };
    let mut xv = XPACK.with(|s| std::mem::take(&mut *s.borrow_mut()));
    xv.clear();
    xv.resize(mts * shape.tile_lines, ZERO);
    xv.par_chunks_mut(shape.tile_lines)
        .enumerate()
        .for_each(|(mt, dst)| {
            let rows = 16.min(m - mt * 16);
            let xt = &x[mt * 16 * k..(mt * 16 + rows) * k];
            // SAFETY: the caller's contract (AVX-512 and BF16 present); `dst` sized above.
            unsafe { pack_x(xt, rows, k, g, &shape, dst) };
        });
    let xv_ref = &xv[..];
    let (pl, bl, al) = (
        KC / STEP * wplanes * 32,
        bsteps * wplanes * 32,
        mts.div_ceil(2) * 64,
    );
    (0..n.div_ceil(NT * NB)).into_par_iter().for_each(|t| {
        SCRATCH.with(|s| {
            let mut s = s.borrow_mut();
            let (panel, bpanel, acc, sv, bv) = &mut *s;
            let c0 = t * NT * NB;
            let cols = (NT * NB).min(n - c0);
            let nbs = cols.div_ceil(NT);
            let cols_of = |nb: usize| NT.min(cols - nb * NT);
            panel.resize(pl, ZERO);
            bpanel.resize(NB * bl, ZERO);
            acc.resize(NB * al, ZERO);
            sv.resize(NB * NT * groups, 0.0);
            bv.resize(NB * NT * groups, 0.0);
            widen(c0, cols, sv, bv);
            // SAFETY: the caller's contract; the tiles are configured for this thread here
            // and released before the task ends.
            unsafe {
                for nb in 0..nbs {
                    // The bias steps: b[c, j] against Σx[r, j], 32 groups a step.
                    let bvn = &bv[nb * NT * groups..];
                    decode_bias(bvn, groups, cols_of(nb), wplanes, &mut bpanel[nb * bl..]);
                }
                tile::configure();
                for k0 in (0..k).step_by(KC) {
                    let len = KC.min(k - k0);
                    let t = Task {
                        xv: xv_ref,
                        shape: &shape,
                        wplanes,
                        step0: k0 / STEP,
                    };
                    // Each pair of W tiles is decoded into the L1-resident panel and passes
                    // every tile of x's block (which stays in L2) while it is there.
                    for nb in 0..nbs {
                        let block = Block {
                            packed: w.packed,
                            row_bytes,
                            c0: c0 + nb * NT,
                            cols: cols_of(nb),
                            k0,
                            len,
                            g,
                            groups,
                        };
                        let svn = &sv[nb * NT * groups..];
                        if BITS <= 6 {
                            decode_block::<BITS, true>(&block, svn, wplanes, panel);
                        } else {
                            decode_block::<BITS, false>(&block, svn, wplanes, panel);
                        }
                        let bn = &bpanel[nb * bl..][..bl];
                        for mt in (0..mts).step_by(2) {
                            let pair = &mut acc[nb * al + mt / 2 * 64..][..64];
                            t.run(mt, mt + 1 < mts, k0 == 0, panel, len / STEP, bn, pair);
                        }
                    }
                }
                tile::release();
            }
            for nb in 0..nbs {
                let accn = bytemuck::cast_slice(&acc[nb * al..][..al]);
                write(c0 + nb * NT, cols_of(nb), accn);
            }
        })
    });
    XPACK.with(|s| *s.borrow_mut() = xv);
}

/// The packed x's layout: per 16-row tile, `steps` K steps of `xplanes` planes, then the
/// bias steps of 3 planes (Σx is any f32); 16 lines a plane.
struct XShape {
    steps: usize,
    xplanes: usize,
    tile_lines: usize,
}

impl XShape {
    /// Planes of step `s`: x's, or the 3 of Σx for the bias steps (from `steps` on).
    fn planes(&self, s: usize) -> usize {
        if s < self.steps {
            self.xplanes
        } else {
            3
        }
    }

    /// First plane of step `s` within a tile.
    fn plane0(&self, s: usize) -> usize {
        if s < self.steps {
            s * self.xplanes
        } else {
            self.steps * self.xplanes + (s - self.steps) * 3
        }
    }

    /// First line of plane 0 of step `s` of x tile `mt`.
    fn at(&self, mt: usize, s: usize) -> usize {
        mt * self.tile_lines + 16 * self.plane0(s)
    }
}

/// One task's view of packed x for a block.
struct Task<'a> {
    xv: &'a [Line],
    shape: &'a XShape,
    wplanes: usize,
    /// First K step of the block.
    step0: usize,
}

impl Task<'_> {
    /// Accumulates the block (`nsteps` steps of `panel`) for x tiles `mt` and (if `two`)
    /// `mt + 1` into their C tiles, stored in `pair` (the first block starts them from zero
    /// and adds the bias steps of `bpanel`).
    ///
    /// # Safety
    /// The tiles are configured; the slices are sized as [`gemm`] makes them.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn run(
        &self,
        mt: usize,
        two: bool,
        first: bool,
        panel: &[Line],
        nsteps: usize,
        bpanel: &[Line],
        pair: &mut [Line],
    ) {
        let cp = pair[..64].as_mut_ptr() as *mut u8;
        // SAFETY: the caller's contract; `cp` names 4 KiB (sliced above).
        unsafe {
            if first {
                tile::zero::<0>();
                tile::zero::<2>();
                if two {
                    tile::zero::<1>();
                    tile::zero::<3>();
                }
                let bsteps = bpanel.len() / (self.wplanes * 32);
                for b in 0..bsteps {
                    let s = self.shape.steps + b;
                    self.step(mt, two, s, &bpanel[b * self.wplanes * 32..]);
                }
            } else {
                tile::load::<0>(cp);
                tile::load::<2>(cp.add(2048));
                if two {
                    tile::load::<1>(cp.add(1024));
                    tile::load::<3>(cp.add(3072));
                }
            }
            for s in 0..nsteps {
                let a = &panel[s * self.wplanes * 32..];
                self.step(mt, two, self.step0 + s, a);
            }
            tile::store::<0>(cp);
            tile::store::<2>(cp.add(2048));
            if two {
                tile::store::<1>(cp.add(1024));
                tile::store::<3>(cp.add(3072));
            }
        }
    }

    /// One K step: x planes `i` of step `s` times W planes `j` of `a` (`[plane][2 tiles]`),
    /// for `i + j ≤ 2` (the products dropped are below 2⁻²⁴ of x·w).
    ///
    /// # Safety
    /// As [`Task::run`].
    #[inline(always)]
    unsafe fn step(&self, mt: usize, two: bool, s: usize, a: &[Line]) {
        let xplanes = self.shape.planes(s);
        let x0 = &self.xv[self.shape.at(mt, s)..][..xplanes * 16];
        let x1 = if two {
            &self.xv[self.shape.at(mt + 1, s)..][..xplanes * 16]
        } else {
            x0
        };
        let a = &a[..self.wplanes * 32];
        // SAFETY: the caller's contract; every pointer names 16 lines (sliced above).
        unsafe {
            for i in 0..xplanes {
                tile::load::<6>(x0[i * 16..].as_ptr() as *const u8);
                if two {
                    tile::load::<7>(x1[i * 16..].as_ptr() as *const u8);
                }
                for j in 0..self.wplanes.min(3 - i) {
                    tile::load::<4>(a[j * 32..].as_ptr() as *const u8);
                    tile::load::<5>(a[j * 32 + 16..].as_ptr() as *const u8);
                    tile::dp::<0, 4, 6>();
                    tile::dp::<2, 5, 6>();
                    if two {
                        tile::dp::<1, 4, 7>();
                        tile::dp::<3, 5, 7>();
                    }
                }
            }
        }
    }
}

/// Where a task's block of W comes from: rows `c0..c0 + cols`, K values `k0..k0 + len`.
struct Block<'a> {
    packed: &'a [u8],
    row_bytes: usize,
    c0: usize,
    cols: usize,
    k0: usize,
    len: usize,
    g: usize,
    groups: usize,
}

/// Splits 32 floats (`lo`, `hi`: elements 0..16, 16..32) into `planes` bf16 vectors whose
/// sum is the input (exactly, for inputs of ≤ 8·planes significant bits; remainders that are
/// not finite become zero), handing plane `j` to `out`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
fn split(lo: __m512, hi: __m512, planes: usize, out: impl FnMut(usize, __m512i)) {
    split_with::<true>(lo, hi, planes, out)
}

/// [`split`]; without `CHECK` the inputs must be finite and below 2¹²⁷ in magnitude (so that
/// every plane and remainder is finite, and the masking of [`split`] changes nothing).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
fn split_with<const CHECK: bool>(
    mut lo: __m512,
    mut hi: __m512,
    planes: usize,
    mut out: impl FnMut(usize, __m512i),
) {
    let widen = |h: __m256i| _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)));
    let finite = |v: __m512| {
        if !CHECK {
            return v;
        }
        let ok = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(_mm512_sub_ps(v, v), _mm512_setzero_ps());
        _mm512_maskz_mov_ps(ok, v)
    };
    for j in 0..planes {
        // SAFETY: plain vector reinterpretation (64 bytes each way).
        let b: __m512i = unsafe { std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo)) };
        out(j, b);
        if j + 1 < planes {
            lo = finite(_mm512_sub_ps(lo, widen(_mm512_castsi512_si256(b))));
            hi = finite(_mm512_sub_ps(hi, widen(_mm512_extracti64x4_epi64::<1>(b))));
        }
    }
}

/// Decodes the block's W rows (zero past `cols`) times their scales into `panel`: step `s`,
/// plane `j`, W tile `i` (rows 16i..16i + 16) at lines `((s·planes + j)·2 + i)·16..`.
/// With `LUT` (widths ≤ 6) each row and group gets a table of its `2^BITS` values' planes
/// once ([`row_table`]) and each step is one `vpermw` per plane; otherwise every code is
/// converted, scaled and split. Both give the same bits.
///
/// # Safety
/// The CPU has AVX-512 F/BW/VL/VBMI and BF16; `packed` holds every row of W, `sv` the
/// task's scales `[column][group]`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx512bf16")]
unsafe fn decode_block<const BITS: usize, const LUT: bool>(
    b: &Block<'_>,
    sv: &[f32],
    planes: usize,
    panel: &mut [Line],
) {
    let nsteps = b.len / STEP;
    // Rows past `cols` are zero.
    for r in b.cols.min(NT)..NT {
        for s in 0..nsteps {
            for j in 0..planes {
                panel[line(planes, r, s, j)] = ZERO;
            }
        }
    }
    if LUT {
        // SAFETY: the caller's contract.
        unsafe {
            if planes == 2 {
                decode_lut::<BITS, 2>(b, sv, panel)
            } else {
                decode_lut::<BITS, 3>(b, sv, panel)
            }
        }
        return;
    }
    let spg = b.g / STEP;
    for r in 0..b.cols.min(NT) {
        let row = b.row::<BITS>(r);
        for s in 0..nsteps {
            let src = &row[s * STEP / 8 * BITS..][..STEP / 8 * BITS];
            let scale = _mm512_set1_ps(sv[r * b.groups + b.k0 / b.g + s / spg]);
            // SAFETY: `src` holds the step's bytes (sliced above); the CPU has the features.
            let (lo, hi) = unsafe { codes32::<BITS>(src.as_ptr()) };
            split(
                _mm512_mul_ps(lo, scale),
                _mm512_mul_ps(hi, scale),
                planes,
                |j, v| store(panel, line(planes, r, s, j), v),
            );
        }
    }
}

/// The panel line of row `r`, step `s`, plane `j` (of `planes`).
#[inline(always)]
fn line(planes: usize, r: usize, s: usize, j: usize) -> usize {
    ((s * planes + j) * 2 + r / 16) * 16 + r % 16
}

/// Stores `v` as panel line `at`.
#[inline]
#[target_feature(enable = "avx512f")]
fn store(panel: &mut [Line], at: usize, v: __m512i) {
    // SAFETY: a 64-byte line.
    unsafe { _mm512_storeu_si512(panel[at].0.as_mut_ptr() as *mut __m512i, v) }
}

impl Block<'_> {
    /// Row `r`'s codes of the block, its next block prefetched: 32 × 4 rows stream side by
    /// side, more than the hardware prefetchers follow. (A prefetch never faults; these stay
    /// inside the row anyway.)
    #[inline(always)]
    fn row<const BITS: usize>(&self, r: usize) -> &[u8] {
        let at = (self.c0 + r) * self.row_bytes + self.k0 / 8 * BITS;
        let len = self.len / 8 * BITS;
        let end = ((self.c0 + r + 1) * self.row_bytes).min(at + 2 * len);
        for off in (at + len..end).step_by(64) {
            // SAFETY: SSE is baseline on x86-64.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(self.packed[off..].as_ptr() as *const i8) };
        }
        &self.packed[at..][..len]
    }
}

/// [`decode_block`]'s table path for `P` planes, rows below `cols`.
///
/// # Safety
/// As [`decode_block`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx512bf16")]
unsafe fn decode_lut<const BITS: usize, const P: usize>(
    b: &Block<'_>,
    sv: &[f32],
    panel: &mut [Line],
) {
    let step_bytes = STEP / 8 * BITS;
    let (spg, j0, nsteps) = (b.g / STEP, b.k0 / b.g, b.len / STEP);
    let rows = b.cols.min(NT);
    if BITS <= 4 {
        // Two rows a table: row r in entries 0..16, row r + 1 in 16..32.
        for r in (0..rows).step_by(2) {
            let two = r + 1 < rows;
            let row0 = b.row::<BITS>(r);
            let row1 = if two { b.row::<BITS>(r + 1) } else { row0 };
            for gi in 0..nsteps / spg {
                let j = j0 + gi;
                let s1 = if two { sv[(r + 1) * b.groups + j] } else { 0.0 };
                let table = row_table::<BITS, P>(sv[r * b.groups + j], s1);
                for s in gi * spg..(gi + 1) * spg {
                    // SAFETY: the step's bytes lie inside the rows; the CPU has the features.
                    let (i0, i1) = unsafe {
                        (
                            indices32::<BITS, false>(row0[s * step_bytes..].as_ptr()),
                            indices32::<BITS, true>(row1[s * step_bytes..].as_ptr()),
                        )
                    };
                    for (p, t) in table.iter().enumerate() {
                        store(panel, line(P, r, s, p), _mm512_permutexvar_epi16(i0, t[0]));
                        if two {
                            let v = _mm512_permutexvar_epi16(i1, t[0]);
                            store(panel, line(P, r + 1, s, p), v);
                        }
                    }
                }
            }
        }
    } else {
        for r in 0..rows {
            let row = b.row::<BITS>(r);
            for gi in 0..nsteps / spg {
                let s0 = sv[r * b.groups + j0 + gi];
                let table = row_table::<BITS, P>(s0, s0);
                for s in gi * spg..(gi + 1) * spg {
                    // SAFETY: the step's bytes lie inside `row`; the CPU has the features.
                    let idx = unsafe { indices32::<BITS, false>(row[s * step_bytes..].as_ptr()) };
                    for (p, t) in table.iter().enumerate() {
                        let v = if BITS == 6 {
                            _mm512_permutex2var_epi16(t[0], idx, t[1])
                        } else {
                            _mm512_permutexvar_epi16(idx, t[0])
                        };
                        store(panel, line(P, r, s, p), v);
                    }
                }
            }
        }
    }
}

/// The task's biases (`bv`, `[column][group]`) as the bias steps' W side: step `b`, plane
/// `j`, tile `i` at lines `((b·planes + j)·2 + i)·16..`, groups past the last zero.
///
/// # Safety
/// The CPU has AVX-512 F/BW/VL and BF16.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn decode_bias(bv: &[f32], groups: usize, cols: usize, planes: usize, bpanel: &mut [Line]) {
    let bsteps = groups.div_ceil(STEP);
    for r in 0..NT {
        for b in 0..bsteps {
            let mut v = [0f32; STEP];
            if r < cols {
                let j0 = b * STEP;
                let src = &bv[r * groups + j0..r * groups + groups.min(j0 + STEP)];
                v[..src.len()].copy_from_slice(src);
            }
            // SAFETY: 32 floats.
            let (lo, hi) = unsafe {
                (
                    _mm512_loadu_ps(v.as_ptr()),
                    _mm512_loadu_ps(v.as_ptr().add(16)),
                )
            };
            split(lo, hi, planes, |j, x| {
                let line = &mut bpanel[((b * planes + j) * 2 + r / 16) * 16 + r % 16];
                // SAFETY: a 64-byte line.
                unsafe { _mm512_storeu_si512(line.0.as_mut_ptr() as *mut __m512i, x) };
            });
        }
    }
}

/// The planes of `s·q` for every code `q` of a width (≤ 6 bits) as `vpermw` tables,
/// `[plane][half]`. Up to 4 bits a table serves two rows: entry `i < 16` holds
/// `s0·(i mod 2^BITS)`, entry `16 + i` `s1·(i mod 2^BITS)` (see [`indices32`]). At 5 and 6
/// bits entry `i` of half `h` holds `s0·((32h + i) mod 2^BITS)` (`s1` unused). The same
/// products and the same [`split`] as the per-code decode, so the same bits (without its
/// masking where every product is finite and far from overflow, which it would not change).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
fn row_table<const BITS: usize, const P: usize>(s0: f32, s1: f32) -> [[__m512i; 2]; P] {
    let mut t = [[_mm512_setzero_si512(); 2]; P];
    let codes = |first: i32, s: f32| {
        let q = _mm512_add_epi32(
            _mm512_set1_epi32(first),
            _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
        );
        let q = _mm512_and_si512(q, _mm512_set1_epi32((1 << BITS) - 1));
        _mm512_mul_ps(_mm512_cvtepi32_ps(q), _mm512_set1_ps(s))
    };
    // Products below 2¹²⁰ (scales below 2¹¹⁴, codes below 64) and finite: no masking needed.
    let tame = |s: f32| s.abs() < 2f32.powi(114);
    let mut half = |h: usize, lo: __m512, hi: __m512| {
        if tame(s0) && tame(s1) {
            split_with::<false>(lo, hi, P, |j, v| t[j][h] = v)
        } else {
            split(lo, hi, P, |j, v| t[j][h] = v)
        }
    };
    if BITS <= 4 {
        half(0, codes(0, s0), codes(0, s1));
    } else {
        half(0, codes(0, s0), codes(16, s0));
        if BITS == 6 {
            half(1, codes(32, s0), codes(48, s0));
        }
    }
    t
}

/// The 32 codes of one step at `p` as 16-bit `vpermw` indices (low 5 bits), in order; with
/// `ODD` (widths ≤ 4) each plus 16, for the second row of a [`row_table`]. At 4 bits the
/// words come from the bytes widened to 32 bits, `d | d << 12`: code `2i` in the low nibble
/// of word `2i`, code `2i + 1` in word `2i + 1`, and bit 4 set by the same ternary logic
/// that masks the rest.
///
/// # Safety
/// `4·BITS` bytes at `p` are readable; the CPU has AVX-512 F/BW/VL/VBMI.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi")]
unsafe fn indices32<const BITS: usize, const ODD: bool>(p: *const u8) -> __m512i {
    // SAFETY: the caller's contract.
    unsafe {
        if BITS == 4 {
            let d = _mm512_cvtepu8_epi32(_mm_loadu_si128(p as *const __m128i));
            let nibbles = _mm512_set1_epi32(0x000f_000f);
            // (d | d << 12) & nibbles, or (d | d << 12) | !nibbles.
            if ODD {
                _mm512_ternarylogic_epi32::<0xfd>(d, _mm512_slli_epi32::<12>(d), nibbles)
            } else {
                _mm512_ternarylogic_epi32::<0xa8>(d, _mm512_slli_epi32::<12>(d), nibbles)
            }
        } else {
            let i = _mm512_cvtepu8_epi16(_mm512_castsi512_si256(decode64::<BITS>(p, true)));
            if ODD {
                _mm512_or_si512(i, _mm512_set1_epi16(16))
            } else {
                i
            }
        }
    }
}

/// 32 codes at `p` as f32, in order (elements 0..16, 16..32).
///
/// # Safety
/// `4·BITS` bytes at `p` are readable; the CPU has AVX-512 F/BW/VL/VBMI.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi")]
unsafe fn codes32<const BITS: usize>(p: *const u8) -> (__m512, __m512) {
    let f = |b: __m128i| _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(b));
    // SAFETY: the caller's contract.
    unsafe {
        match BITS {
            4 => {
                // Byte i → words 2i (low nibble) and 2i + 1 (high nibble).
                let d = _mm512_cvtepu8_epi32(_mm_loadu_si128(p as *const __m128i));
                let words = _mm512_ternarylogic_epi32::<0xf8>(
                    _mm512_and_si512(_mm512_slli_epi32::<12>(d), _mm512_set1_epi32(0xf_0000)),
                    d,
                    _mm512_set1_epi32(0xf),
                );
                let w = |h: __m256i| _mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(h));
                (
                    w(_mm512_castsi512_si256(words)),
                    w(_mm512_extracti64x4_epi64::<1>(words)),
                )
            }
            8 => (
                f(_mm_loadu_si128(p as *const __m128i)),
                f(_mm_loadu_si128(p.add(16) as *const __m128i)),
            ),
            _ => {
                let bytes = decode64::<BITS>(p, true);
                (
                    f(_mm512_castsi512_si128(bytes)),
                    f(_mm512_extracti32x4_epi32::<1>(bytes)),
                )
            }
        }
    }
}

/// Packs one 16-row tile of x (`rows` real rows of `k`, zero past them) into `dst`: per K
/// step its `planes` planes, then per 32 groups the 3 planes of Σx, each plane 16 lines in
/// the B-operand layout (line `kp` holds the pairs `2kp, 2kp + 1` of the 16 rows).
///
/// # Safety
/// The CPU has AVX-512 F/BW/VL and BF16; `dst` is sized for `k`, `planes` and `g`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn pack_x(x: &[f32], rows: usize, k: usize, g: usize, shape: &XShape, dst: &mut [Line]) {
    let groups = k / g;
    // Σx per row, 32 groups a bias step, zero past the last group.
    let bsteps = groups.div_ceil(STEP);
    SUMS.with(|sums| {
        let mut sums = sums.borrow_mut();
        sums.clear();
        sums.resize(16 * bsteps * STEP, 0.0);
        // SAFETY: the caller's contract.
        unsafe { pack_tile(x, rows, k, g, shape, &mut sums, dst) }
    })
}

/// [`pack_x`] with `sums` (16 rows × the bias steps' 32 values, zero) to fill.
///
/// # Safety
/// As [`pack_x`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn pack_tile(
    x: &[f32],
    rows: usize,
    k: usize,
    g: usize,
    shape: &XShape,
    sums: &mut [f32],
    dst: &mut [Line],
) {
    let steps = shape.steps;
    let bsteps = (k / g).div_ceil(STEP);
    for r in 0..rows {
        let xr = &x[r * k..][..k];
        for (j, grp) in xr.chunks_exact(g).enumerate() {
            let mut v = _mm512_setzero_ps();
            for c in grp.chunks_exact(16) {
                // SAFETY: 16 floats.
                v = _mm512_add_ps(v, unsafe { _mm512_loadu_ps(c.as_ptr()) });
            }
            sums[r * bsteps * STEP + j] = _mm512_reduce_add_ps(v);
        }
    }
    let total = steps + bsteps;
    for s in 0..total {
        let (np, base) = (shape.planes(s), shape.plane0(s));
        let mut tiles = [[_mm512_setzero_si512(); 16]; 3];
        for r in 0..rows {
            let src = if s < steps {
                &x[r * k + s * STEP..][..STEP]
            } else {
                &sums[r * bsteps * STEP + (s - steps) * STEP..][..STEP]
            };
            // SAFETY: 32 floats (sliced above).
            let (lo, hi) = unsafe {
                (
                    _mm512_loadu_ps(src.as_ptr()),
                    _mm512_loadu_ps(src.as_ptr().add(16)),
                )
            };
            split(lo, hi, np, |j, b| tiles[j][r] = b);
        }
        for (p, tile) in tiles.iter_mut().take(np).enumerate() {
            transpose16(tile);
            for (kp, v) in tile.iter().enumerate() {
                let line = &mut dst[(base + p) * 16 + kp];
                // SAFETY: a 64-byte line.
                unsafe { _mm512_storeu_si512(line.0.as_mut_ptr() as *mut __m512i, *v) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use half::{bf16, f16};

    /// The next value of a xorshift32 sequence (the tests' random bits).
    fn xorshift(state: &mut u32) -> u32 {
        *state ^= *state << 13;
        *state ^= *state >> 17;
        *state ^= *state << 5;
        *state
    }

    /// The vector narrowing matches `Float::from_f32` bit for bit: ties, NaN, infinities,
    /// overflow, subnormals of both widths, random values.
    #[test]
    fn narrow16_matches_from_f32() {
        if !super::super::x86::available() {
            println!("skipped: no AVX-512 here");
            return;
        }
        let mut vals = vec![
            0.0f32,
            -0.0,
            1.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -f32::NAN,
            f32::from_bits(0x7f80_0001),
            f32::MAX,
            -f32::MAX,
            f32::MIN_POSITIVE,
            f32::from_bits(1),
            f32::from_bits(0x0000_8000),
            f32::from_bits(0x3f80_8000),
            f32::from_bits(0x3f81_8000),
            f32::from_bits(0x3f80_7fff),
            65504.0,
            65520.0,
            6.0e-8,
            3.0e-8,
            1.0e-5,
            2049.0,
            2051.0,
        ];
        let mut state = 0x1234_5678u32;
        vals.extend((0..1000).map(|_| f32::from_bits(xorshift(&mut state))));
        vals.resize(vals.len().div_ceil(16) * 16, 1.5);
        for chunk in vals.chunks(16) {
            // SAFETY: AVX-512 F/BW/VL checked above; 16 floats.
            let v = unsafe { std::arch::x86_64::_mm512_loadu_ps(chunk.as_ptr()) };
            // SAFETY: as above.
            let (b, h) = unsafe { (super::narrow16::<bf16>(v), super::narrow16::<f16>(v)) };
            for (i, &x) in chunk.iter().enumerate() {
                assert_eq!(
                    b[i].to_bits(),
                    bf16::from_f32(x).to_bits(),
                    "bf16 of {x:e} ({:#x})",
                    x.to_bits()
                );
                assert_eq!(h[i].is_nan(), x.is_nan(), "f16 of {x:e}");
                if !x.is_nan() {
                    assert_eq!(
                        h[i].to_bits(),
                        f16::from_f32(x).to_bits(),
                        "f16 of {x:e} ({:#x})",
                        x.to_bits()
                    );
                }
            }
        }
    }

    /// The table decode gives the per-code decode's panel bit for bit: every width it
    /// serves, two and three planes, groups of 32, 64 and 128, a block past the first,
    /// random codes, scales with zeros, infinities, NaN, subnormals and values near f32's
    /// limits among random ones, and a last tile of 13 rows.
    #[test]
    fn table_decode_matches_per_code_decode() {
        if !(super::super::x86::available() && std::is_x86_feature_detected!("avx512bf16")) {
            println!("skipped: no AVX-512 VBMI and BF16 here");
            return;
        }
        fn check<const B: usize>(state: &mut u32) {
            let mut next = || xorshift(state);
            let (k, cols) = (2 * super::KC, super::NT - 3);
            let row_bytes = k / 8 * B;
            let packed: Vec<u8> = (0..super::NT * row_bytes).map(|_| next() as u8).collect();
            let special = [
                0.0f32,
                -0.0,
                f32::INFINITY,
                f32::NEG_INFINITY,
                f32::NAN,
                f32::MAX,
                -f32::MAX / 3.0,
                f32::MIN_POSITIVE,
                f32::from_bits(5),
                1.0,
            ];
            for g in [32, 64, 128] {
                let groups = k / g;
                let sv: Vec<f32> = (0..super::NT * groups)
                    .map(|i| match next() % 4 {
                        0 => special[i % special.len()],
                        1 => f32::from_bits(next()),
                        _ => f32::from_bits(next() & 0xffff_0000) * 1e-3,
                    })
                    .collect();
                for planes in [2, 3] {
                    let block = super::Block {
                        packed: &packed,
                        row_bytes,
                        c0: 0,
                        cols,
                        k0: super::KC,
                        len: super::KC,
                        g,
                        groups,
                    };
                    let lines = super::KC / super::STEP * planes * 32;
                    let (mut a, mut b) = (vec![super::ZERO; lines], vec![super::ZERO; lines]);
                    // SAFETY: the features were checked above; the slices are sized as the
                    // GEMM sizes them.
                    unsafe {
                        super::decode_block::<B, true>(&block, &sv, planes, &mut a);
                        super::decode_block::<B, false>(&block, &sv, planes, &mut b);
                    }
                    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
                        assert_eq!(x.0, y.0, "{B}-bit, group {g}, {planes} planes, line {i}");
                    }
                }
            }
        }
        let mut state = 0x9e37_79b9u32;
        check::<1>(&mut state);
        check::<2>(&mut state);
        check::<3>(&mut state);
        check::<4>(&mut state);
        check::<5>(&mut state);
        check::<6>(&mut state);
    }

    #[test]
    fn config_is_palette_one_with_eight_full_tiles() {
        let c = &super::CONFIG.0;
        assert_eq!(c[0], 1);
        for t in 0..8 {
            assert_eq!(u16::from_le_bytes([c[16 + 2 * t], c[17 + 2 * t]]), 64);
            assert_eq!(c[48 + t], 16);
        }
    }
}
