//! AVX-512 kernel for `y = x·W` (`transpose = false`): W `[K, N]` quantized along N, so row
//! `k` of W holds `N/g` groups, each with a scale `s[k,j]` and bias `b[k,j]`, and
//! `y[r,n] = Σ_k x[r,k]·(s[k,n/g]·q[k,n] + b[k,n/g])`.
//!
//! Unlike the transposed layout, a group here spans columns, not the reduction axis, so the
//! scale cannot be pulled out of the sum: every row of W is dequantized (`s·q + b` in f32)
//! and then multiplied by one element of x per row of x. Each 32-column chunk of a row is
//! dequantized once, into two f32 vectors, and used by up to [`ROWS`] rows of x with one FMA
//! per 16 weights per row (x broadcast from memory), so rows 2..8 of x cost little more
//! memory traffic than row 1.
//!
//! Dequantizing 32 codes, by width (none leaves the chunk's `4·BITS` bytes):
//! - 1, 2, 4-bit: the chunk (4, 8 or 16 bytes) is broadcast to every 32-bit lane group and
//!   `vpsrlvd` moves a different code to the bottom of each lane; `vpermps` then looks the low
//!   4 bits up in a 16-entry table of `s·i + b` (built with one FMA per chunk, repeated every
//!   `2^BITS` entries so the neighbouring codes' bits above need no mask). 1-bit lanes come in
//!   column order; 2- and 4-bit lanes in a fixed permutation of the chunk's columns.
//! - 3, 5, 6-bit: `vpermb` gathers the two bytes holding code `i` into lane `i`, `vpsrlvd`
//!   aligns it; 3-bit looks it up like the above, 5-bit in a 32-entry table (`vpermt2ps`),
//!   6-bit is masked, converted and scaled (`s·q + b` as one FMA).
//! - 8-bit: `vpmovzxbd`, convert, one FMA.
//!
//! Lane permutations are free: a chunk never straddles a group (`g ≥ 32`), so accumulators
//! stay permuted until the output is written, which undoes the permutation once per element.
//!
//! Work, in one of two forms (both walk W in bands of rows, each band across a range of
//! columns in blocks of at most [`BLOCK_COLS`]: the band's scales and biases are widened to f32
//! once per block for all rows of x, then each register tile (rows of x × chunks, as many
//! chunks as the 32 vector registers allow) streams down the band's rows, prefetching ahead,
//! and adds its sums into f32 accumulators; summing per band keeps error growth low):
//! - up to [`SPLIT_MAX_M`] rows of x, K is split between the threads: each walks its rows of
//!   W in bands of [`band_rows`] rows across every column, into its own partial sums of all of
//!   y, and the partial sums are added at the end. W is then read as a few row-wise streams
//!   per thread, the order that reaches the memory's stream rate (docs/perf.md, sessions 40
//!   and 41);
//! - more rows of x (or one thread): tasks own disjoint, group-aligned column ranges (several
//!   per thread, so cores finish together) and walk each column block in bands of
//!   [`K_BLOCK`] rows, the block's sums L2-resident.
//!
//! Accumulation is f32 throughout; results equal the generic kernel's up to summation order
//! and the single rounding of `s·q + b`.
//!
//! The driver ([`qmv_n`]: checks, x's transposition, the two forms' tasks, the partial sums
//! and the output's un-permutation) is shared with the AVX2 kernel
//! ([`x86_avx2_qvm`](super::x86_avx2_qvm)) through [`QvmIsa`].

use super::qmm::QmmArgs;
use super::x86::{mask16, widen16};
use super::{DisjointOut, KernelFn, Variant};
use crate::dtype::{Element, Float};
use crate::error::{Error, Result};
use std::arch::x86_64::*;
use std::cell::RefCell;

/// The variant: `quantized_matmul` without transpose, every affine width.
pub(crate) const QMV_N: Variant = Variant {
    name: "avx512",
    supports: |k| {
        k.mode == crate::QuantMode::Affine
            && k.op == crate::registry::OpKind::QuantizedMatmul
            && !k.flag
            && super::x86::available()
    },
    decode: None,
    build: |k| {
        use crate::quant::pack::dispatch_bits;
        crate::with_float_type!(k.scales, S => crate::with_float_type!(k.output, O => {
            Some(dispatch_bits!(k.bits, B => KernelFn::Qmm(qmv_n::<Avx512Qvm, S, O, B>), _ => return None))
        }, _ => None), _ => None)
    },
};

/// What a `transpose = false` kernel supplies to the shared driver [`qmv_n`].
pub(crate) trait QvmIsa {
    /// What the CPU lacks when [`QvmIsa::available`] is false (for the error).
    const NEEDS: &'static str;
    /// Most rows of x in one register tile (x is transposed per block of this many rows).
    const ROWS: usize;
    /// Whether this CPU can run the kernel.
    fn available() -> bool;
    /// Column (within its 32-column chunk) of accumulator lane `lane` (0..32) for `bits`.
    fn lane_column(bits: usize, lane: usize) -> usize;
    /// Adds to `acc[r·cols + lane]` (lanes permuted per chunk as [`QvmIsa::lane_column`]
    /// says) the sums of every row of x over rows `cx.k_lo..cx.k_hi` of W, band by band,
    /// using `sb` (`K_BLOCK × 32` floats) as scratch for one band's f32 scales and biases.
    /// Does nothing where [`Columns::fits`] is false.
    ///
    /// # Safety
    /// The CPU must support the kernel's features ([`QvmIsa::available`]).
    unsafe fn columns<S: Float, const BITS: usize>(
        cx: &Columns<'_>,
        scales: &[S],
        biases: &[S],
        sb: &mut [f32],
        acc: &mut [f32],
    );
}

/// The AVX-512 kernel of this module.
pub(crate) struct Avx512Qvm;

impl QvmIsa for Avx512Qvm {
    const NEEDS: &'static str = "AVX-512 on this CPU";
    const ROWS: usize = ROWS;
    fn available() -> bool {
        super::x86::available()
    }
    fn lane_column(bits: usize, lane: usize) -> usize {
        lane_column(bits, lane)
    }
    unsafe fn columns<S: Float, const BITS: usize>(
        cx: &Columns<'_>,
        scales: &[S],
        biases: &[S],
        sb: &mut [f32],
        acc: &mut [f32],
    ) {
        // SAFETY: the caller guarantees the CPU features.
        unsafe { columns::<S, BITS>(cx, scales, biases, sb, acc) }
    }
}

/// Most rows of x in one register tile.
const ROWS: usize = 8;
/// Most columns in one column block: 16 chunks, so a row's chunk scales fit one vector.
pub(crate) const BLOCK_COLS: usize = 512;
/// Rows of W per band in the column-split form, and the most in any band: a band's f32 scales
/// and biases for one column block (`K_BLOCK × 32` floats) and the rows of W a tile revisits
/// stay in L1.
pub(crate) const K_BLOCK: usize = 64;
/// How many rows of W ahead a tile prefetches (the column-split form).
pub(crate) const PREFETCH_ROWS: usize = 16;
/// Rows of W per band in the K-split form (small M) for `bits`: a band's rows are read side
/// by side across the whole width while the next band is prefetched. Fewer rows keep fewer
/// streams open (8-bit, which waits on memory); more amortise the accumulators' round trip
/// per band (the narrower codes, which wait on arithmetic). docs/perf.md, session 41.
const fn band_rows(bits: usize) -> usize {
    match bits {
        8 => 8,
        5 | 6 => 16,
        _ => 32,
    }
}
/// Most rows of x for which K is split between the threads.
const SPLIT_MAX_M: usize = 8;
/// Floats of accumulators one task may keep per column block (512 KiB: L2-resident).
const ACC_FLOATS: usize = 1 << 17;

const OP: &str = "quantized_matmul";

thread_local! {
    /// The calling thread's scratch: x transposed per block of rows, and the K-split form's
    /// partial sums (one `m × n` slice per task).
    static XT: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
    /// A task's scratch: one band's f32 scales and biases.
    static TILE: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// A task's scratch: its column block's accumulators (the column-split form).
    static ACC: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// The K-split form's parameters: the environment may override them for experiments
/// (`MLXQ_QVM_BAND`, `MLXQ_QVM_PF`: rows per band and rows prefetched ahead, by default
/// [`band_rows`]; `MLXQ_QVM_SPLIT_M`: most rows of x, by default [`SPLIT_MAX_M`]).
struct Tune {
    band: Option<usize>,
    split_m: usize,
    prefetch: Option<usize>,
}

fn tune() -> &'static Tune {
    static T: std::sync::OnceLock<Tune> = std::sync::OnceLock::new();
    T.get_or_init(|| {
        let opt = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<usize>().ok());
        Tune {
            band: opt("MLXQ_QVM_BAND").map(|b| b.clamp(1, K_BLOCK)),
            split_m: opt("MLXQ_QVM_SPLIT_M").unwrap_or(SPLIT_MAX_M),
            prefetch: opt("MLXQ_QVM_PF"),
        }
    })
}

/// Runs `f` on a thread-local scratch vector, or on a fresh one if this thread is already
/// using it (a re-entrant call through rayon's work stealing).
fn with_scratch<T: Default, R>(
    key: &'static std::thread::LocalKey<RefCell<T>>,
    f: impl FnOnce(&mut T) -> R,
) -> R {
    key.with(|cell| match cell.try_borrow_mut() {
        Ok(mut s) => f(&mut s),
        Err(_) => f(&mut T::default()),
    })
}

/// Column (within its 32-column chunk) of lane `lane` (0..16 of the first vector, 16..32 of
/// the second) as [`dequant32`] produces it for `bits`.
#[inline(always)]
fn lane_column(bits: usize, lane: usize) -> usize {
    let (h, i) = (lane / 16, lane % 16);
    match bits {
        4 => 2 * (4 * (i % 4) + i / 4) + h,
        2 => 16 * (i % 2) + 8 * h + i / 2,
        _ => lane,
    }
}

/// Constant vectors for [`dequant32`], built once per tile.
#[derive(Clone, Copy)]
struct Consts {
    /// Per-lane shift counts of the first and second vector.
    shift0: __m512i,
    shift1: __m512i,
    /// `vpermb` indices (3, 5, 6-bit): lane `i` gathers the bytes holding code `i` (`+16`).
    gather0: __m512i,
    gather1: __m512i,
    /// Codes the lookup tables are built for: entry `i` holds `i mod 2^BITS` (lanes 16..32
    /// for 5-bit in `iota_hi`).
    iota_lo: __m512,
    iota_hi: __m512,
}

impl Consts {
    /// The constants for `BITS`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn new<const BITS: usize>() -> Consts {
        let shifts = |h: usize| -> [u32; 16] {
            std::array::from_fn(|i| match BITS {
                1 => (16 * h + i) as u32,
                2 => (16 * h + 2 * (i / 2)) as u32,
                4 => (8 * (i / 4) + 4 * h) as u32,
                _ => ((BITS * (16 * h + i)) % 8) as u32,
            })
        };
        let gather = |h: usize| -> [u8; 64] {
            std::array::from_fn(|b| {
                let code = 16 * h + b / 4;
                ((BITS * code / 8 + b % 4).min(63)) as u8
            })
        };
        let iota = |h: usize| -> [f32; 16] {
            std::array::from_fn(|i| ((16 * h + i) % (1 << BITS.min(5))) as f32)
        };
        let (s0, s1, g0, g1, i0, i1) =
            (shifts(0), shifts(1), gather(0), gather(1), iota(0), iota(1));
        // SAFETY: each load reads exactly the 64 bytes of its array.
        unsafe {
            Consts {
                shift0: _mm512_loadu_si512(s0.as_ptr() as *const __m512i),
                shift1: _mm512_loadu_si512(s1.as_ptr() as *const __m512i),
                gather0: _mm512_loadu_si512(g0.as_ptr() as *const __m512i),
                gather1: _mm512_loadu_si512(g1.as_ptr() as *const __m512i),
                iota_lo: _mm512_loadu_ps(i0.as_ptr()),
                iota_hi: _mm512_loadu_ps(i1.as_ptr()),
            }
        }
    }
}

/// Dequantizes the 32 codes at `p` with scale `s` and bias `b` (both broadcast) into two f32
/// vectors, lanes in [`lane_column`] order.
///
/// # Safety
/// `p` must point to `4·BITS` readable bytes; the CPU must support
/// [`available`](super::x86::available)'s features.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi")]
unsafe fn dequant32<const BITS: usize>(
    p: *const u8,
    s: __m512,
    b: __m512,
    c: &Consts,
) -> (__m512, __m512) {
    // SAFETY: every load below reads within the `4·BITS` bytes at `p` (the caller's
    // guarantee); the CPU features are the caller's guarantee too.
    unsafe {
        match BITS {
            1..=4 => dequant_lut::<BITS>(p, _mm512_fmadd_ps(c.iota_lo, s, b), c),
            8 => {
                let lo = _mm512_cvtepu8_epi32(_mm_loadu_si128(p as *const __m128i));
                let hi = _mm512_cvtepu8_epi32(_mm_loadu_si128(p.add(16) as *const __m128i));
                (
                    _mm512_fmadd_ps(_mm512_cvtepi32_ps(lo), s, b),
                    _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi), s, b),
                )
            }
            _ => {
                let mask: __mmask64 = (1u64 << (4 * BITS)) - 1;
                let raw = _mm512_maskz_loadu_epi8(mask, p as *const i8);
                let v0 = _mm512_srlv_epi32(_mm512_permutexvar_epi8(c.gather0, raw), c.shift0);
                let v1 = _mm512_srlv_epi32(_mm512_permutexvar_epi8(c.gather1, raw), c.shift1);
                match BITS {
                    5 => {
                        let lo = _mm512_fmadd_ps(c.iota_lo, s, b);
                        let hi = _mm512_fmadd_ps(c.iota_hi, s, b);
                        (
                            _mm512_permutex2var_ps(lo, v0, hi),
                            _mm512_permutex2var_ps(lo, v1, hi),
                        )
                    }
                    _ => {
                        let m = _mm512_set1_epi32((1 << BITS) - 1);
                        let q0 = _mm512_cvtepi32_ps(_mm512_and_si512(v0, m));
                        let q1 = _mm512_cvtepi32_ps(_mm512_and_si512(v1, m));
                        (_mm512_fmadd_ps(q0, s, b), _mm512_fmadd_ps(q1, s, b))
                    }
                }
            }
        }
    }
}

/// Whether `BITS` dequantizes through a 16-entry table of `s·i + b` (see [`dequant32`]).
const fn table_width(bits: usize) -> bool {
    bits <= 4
}

/// [`dequant32`] for the widths of [`table_width`], with the chunk's table `lut` (entry `i`:
/// `s·(i mod 2^BITS) + b`) built by the caller, so chunks of one group can share it.
///
/// # Safety
/// As for [`dequant32`], with `BITS ≤ 4`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi")]
unsafe fn dequant_lut<const BITS: usize>(
    p: *const u8,
    lut: __m512,
    c: &Consts,
) -> (__m512, __m512) {
    // SAFETY: every load below reads within the `4·BITS` bytes at `p` (the caller's
    // guarantee); the CPU features are the caller's guarantee too.
    unsafe {
        let (v0, v1) = match BITS {
            1 | 2 | 4 => {
                let raw = match BITS {
                    1 => _mm512_set1_epi32((p as *const i32).read_unaligned()),
                    2 => _mm512_set1_epi64((p as *const i64).read_unaligned()),
                    _ => _mm512_broadcast_i32x4(_mm_loadu_si128(p as *const __m128i)),
                };
                (
                    _mm512_srlv_epi32(raw, c.shift0),
                    _mm512_srlv_epi32(raw, c.shift1),
                )
            }
            _ => {
                let mask: __mmask64 = (1u64 << (4 * BITS)) - 1;
                let raw = _mm512_maskz_loadu_epi8(mask, p as *const i8);
                (
                    _mm512_srlv_epi32(_mm512_permutexvar_epi8(c.gather0, raw), c.shift0),
                    _mm512_srlv_epi32(_mm512_permutexvar_epi8(c.gather1, raw), c.shift1),
                )
            }
        };
        (
            _mm512_permutexvar_ps(v0, lut),
            _mm512_permutexvar_ps(v1, lut),
        )
    }
}

/// One register tile's inputs: `rows` rows of W starting at the tile's first chunk, their
/// per-chunk scales and biases, the tile's rows of x, and where its sums go.
#[derive(Clone, Copy)]
struct Tile {
    /// Packed W at the first row of the band and the tile's first chunk.
    w: *const u8,
    /// Bytes per row of W.
    row_bytes: usize,
    /// Rows of W in the band.
    rows: usize,
    /// Bytes from a row to the row the tile prefetches (0: no prefetch).
    prefetch: usize,
    /// f32 scales (`[kk·32 + c]`) and biases (`[kk·32 + 16 + c]`) of the tile's chunks `c`.
    sb: *const f32,
    /// x transposed: `[kk·R + r]`.
    xt: *const f32,
    /// Whether chunks `2i` and `2i + 1` of the tile are in one group (g ≥ 64).
    pairs: bool,
    /// Accumulators: `[r·acc_stride + 32·c + lane]`.
    acc: *mut f32,
    acc_stride: usize,
}

/// `R` rows of x times `CH` chunks of W over one band, added into the accumulators.
///
/// # Safety
/// Every pointer of `t` must be valid for the extent its field describes: `w` for
/// `rows` rows of `row_bytes` bytes, of which the tile reads `CH·4·BITS` from the start;
/// `sb` for `32·rows` floats; `xt` for `R·rows` floats; `acc` for `R` rows of `32·CH` floats
/// at `acc_stride`, used by no other thread. The CPU must support the features of
/// [`available`](super::x86::available).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi")]
unsafe fn tile<const BITS: usize, const R: usize, const CH: usize>(t: &Tile, c: &Consts) {
    let seg = CH * 4 * BITS;
    let mut a = [[[_mm512_setzero_ps(); 2]; CH]; R];
    for kk in 0..t.rows {
        // SAFETY: row kk < rows of the block: within the extents the caller guarantees. The
        // prefetch address may lie past W; prefetches never fault, and `wrapping_add` keeps
        // computing it defined.
        unsafe {
            let p = t.w.add(kk * t.row_bytes);
            if t.prefetch != 0 {
                let pf = p.wrapping_add(t.prefetch);
                let mut off = 0;
                while off < seg {
                    _mm_prefetch::<_MM_HINT_T0>(pf.wrapping_add(off) as *const i8);
                    off += 64;
                }
                _mm_prefetch::<_MM_HINT_T0>(pf.wrapping_add(seg - 1) as *const i8);
            }
            let sb = t.sb.add(kk * 32);
            let x = t.xt.add(kk * R);
            let mut lut = _mm512_setzero_ps();
            for ci in 0..CH {
                let (w0, w1) = if table_width(BITS) {
                    // Chunks 2i and 2i + 1 of a tile share a group where g ≥ 64 (tiles start
                    // at an even chunk of a group-aligned block): one table for both.
                    if ci % 2 == 0 || !t.pairs {
                        let s = _mm512_set1_ps(*sb.add(ci));
                        let b = _mm512_set1_ps(*sb.add(16 + ci));
                        lut = _mm512_fmadd_ps(c.iota_lo, s, b);
                    }
                    dequant_lut::<BITS>(p.add(ci * 4 * BITS), lut, c)
                } else {
                    let s = _mm512_set1_ps(*sb.add(ci));
                    let b = _mm512_set1_ps(*sb.add(16 + ci));
                    dequant32::<BITS>(p.add(ci * 4 * BITS), s, b, c)
                };
                for (r, ar) in a.iter_mut().enumerate() {
                    let xv = _mm512_set1_ps(*x.add(r));
                    let acc = &mut ar[ci];
                    acc[0] = _mm512_fmadd_ps(w0, xv, acc[0]);
                    acc[1] = _mm512_fmadd_ps(w1, xv, acc[1]);
                }
            }
        }
    }
    for (r, ar) in a.iter().enumerate() {
        for (ci, acc) in ar.iter().enumerate() {
            // SAFETY: row r < R, columns 32·ci..32·ci + 32 < 32·CH: inside the caller's extent.
            unsafe {
                let d = t.acc.add(r * t.acc_stride + 32 * ci);
                _mm512_storeu_ps(d, _mm512_add_ps(_mm512_loadu_ps(d), acc[0]));
                let d = d.add(16);
                _mm512_storeu_ps(d, _mm512_add_ps(_mm512_loadu_ps(d), acc[1]));
            }
        }
    }
}

/// All chunks of a column block for `R` rows of x: tiles of `CH` chunks, then single ones.
///
/// # Safety
/// As for [`tile`], with `t` describing chunk 0 and `chunks` chunks in all (`sb` rows hold
/// them all; `acc` rows are `32·chunks` floats wide).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi")]
unsafe fn block<const BITS: usize, const R: usize, const CH: usize>(
    t: &Tile,
    chunks: usize,
    c: &Consts,
) {
    let mut ci = 0;
    while ci < chunks {
        let at = Tile {
            w: t.w.wrapping_add(ci * 4 * BITS),
            sb: t.sb.wrapping_add(ci),
            acc: t.acc.wrapping_add(32 * ci),
            ..*t
        };
        // SAFETY: chunks ci..ci + CH (or ci alone) lie inside the block the caller described.
        unsafe {
            if ci + CH <= chunks {
                tile::<BITS, R, CH>(&at, c);
                ci += CH;
            } else {
                tile::<BITS, R, 1>(&at, c);
                ci += 1;
            }
        }
    }
}

/// Runs [`block`] with the row count `r` (1..=[`ROWS`]) as a constant and as many chunks per
/// tile as the registers hold.
///
/// # Safety
/// As for [`block`], with `R = r`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi")]
unsafe fn block_rows<const BITS: usize>(r: usize, t: &Tile, chunks: usize, c: &Consts) {
    // SAFETY: forwarded from the caller; R matches the rows `t` describes.
    unsafe {
        match r {
            1 => block::<BITS, 1, 8>(t, chunks, c),
            2 => block::<BITS, 2, 4>(t, chunks, c),
            3 => block::<BITS, 3, 2>(t, chunks, c),
            4 => block::<BITS, 4, 2>(t, chunks, c),
            5 => block::<BITS, 5, 1>(t, chunks, c),
            6 => block::<BITS, 6, 1>(t, chunks, c),
            7 => block::<BITS, 7, 1>(t, chunks, c),
            _ => block::<BITS, 8, 1>(t, chunks, c),
        }
    }
}

/// Fills `sb` (`rows × 32` floats) with the f32 scales and biases of `chunks` chunks for rows
/// `k0..k0 + rows` of W, starting at group `j0`.
///
/// # Safety
/// `scales` and `biases` must hold `(k0 + rows)·groups` elements, `j0 + chunks·32/g ≤ groups`,
/// `chunks ≤ 16`, `sb.len() ≥ 32·rows`; the CPU must support AVX-512 F/BW/VL.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn widen_block<S: Element>(
    scales: &[S],
    biases: &[S],
    groups: usize,
    g: usize,
    j0: usize,
    chunks: usize,
    k0: usize,
    sb: &mut [f32],
) {
    let ng = chunks * 32 / g;
    // Chunk c takes group c·32/g.
    let idx: [i32; 16] = std::array::from_fn(|c| (c * 32 / g) as i32);
    // SAFETY: reads the 64 bytes of `idx`.
    let idx = unsafe { _mm512_loadu_si512(idx.as_ptr() as *const __m512i) };
    for (kk, row) in sb.chunks_exact_mut(32).enumerate() {
        let off = (k0 + kk) * groups + j0;
        if off + ng > scales.len() || off + ng > biases.len() {
            return;
        }
        // SAFETY: `ng` elements from `off` are in bounds (checked above); `row` is 32 floats.
        unsafe {
            let s = widen16(scales.as_ptr().add(off), mask16(ng));
            let b = widen16(biases.as_ptr().add(off), mask16(ng));
            _mm512_storeu_ps(row.as_mut_ptr(), _mm512_permutexvar_ps(idx, s));
            _mm512_storeu_ps(row.as_mut_ptr().add(16), _mm512_permutexvar_ps(idx, b));
        }
    }
}

/// The kernel, `transpose = false`, on the instruction set `I`.
pub(crate) fn qmv_n<I: QvmIsa, S: Float, O: Float, const BITS: usize>(
    a: QmmArgs<'_>,
) -> Result<()> {
    let w = a.w;
    let (g, n) = (w.group_size, w.cols);
    if !I::available() {
        return Err(Error::unsupported(OP, I::NEEDS));
    }
    if !matches!(g, 32 | 64 | 128) || n % g != 0 || w.bits as usize != BITS {
        return Err(Error::invalid(
            OP,
            "w",
            format!("{BITS}-bit, group 32, 64 or 128 dividing {n} columns"),
            format!("{}-bit, group {g}", w.bits),
        ));
    }
    let a = a.operands::<S, O>(OP, false, true)?;
    let (m, kdim) = (a.m, a.rows);
    let (groups, row_bytes) = (a.w.groups, a.w.row_bytes);
    let (scales, biases, out) = (a.w.scales, a.w.biases, a.out);
    if m == 0 || n == 0 {
        return Ok(());
    }
    let writer = DisjointOut::new(out);
    let threads = rayon::current_num_threads();
    with_scratch(&XT, |(xt, part)| {
        // x transposed per block of I::ROWS rows: block at r0 holds [kk·R + r] from r0·K.
        xt.clear();
        xt.resize(m * kdim, 0.0);
        for r0 in (0..m).step_by(I::ROWS) {
            let rows = I::ROWS.min(m - r0);
            let dst = &mut xt[r0 * kdim..(r0 + rows) * kdim];
            for r in 0..rows {
                let src = &a.x[(r0 + r) * kdim..(r0 + r + 1) * kdim];
                for (kk, &v) in src.iter().enumerate() {
                    dst[kk * rows + r] = v;
                }
            }
        }
        let xt = &xt[..];
        let cx = |k_lo, k_hi, band, prefetch_rows, c0, cols| Columns {
            w: a.w.packed,
            row_bytes,
            kdim,
            k_lo,
            k_hi,
            band,
            prefetch_rows,
            c0,
            cols,
            g,
            groups,
            xt,
            m,
        };
        // Writes rows of sums for columns c0.. (lanes permuted per chunk) to the output.
        let emit = |r: usize, c0: usize, sums: &mut dyn Iterator<Item = (usize, f32)>| {
            for (i, v) in sums {
                let col = c0 + i / 32 * 32 + I::lane_column(BITS, i % 32);
                // SAFETY: the caller's task alone owns these columns of row r.
                unsafe { writer.write(r * n + col, O::from_f32(v)) };
            }
        };
        let band = tune().band.unwrap_or(band_rows(BITS));
        let bands = kdim.div_ceil(band);
        if m <= tune().split_m && threads > 1 && bands >= 2 {
            // Small M: K split between the threads, each band of W read across every column
            // (row by row streams, see docs/perf.md session 40), into per-task partial sums
            // of all of y that are added at the end.
            let tasks = threads.min(bands);
            let len = m * n;
            if part.len() < tasks * len {
                part.resize(tasks * len, 0.0);
            }
            super::tasks::for_each_chunk_mut(&mut part[..tasks * len], len, |t, acc| {
                acc.fill(0.0);
                let k_lo = (t * bands / tasks * band).min(kdim);
                let k_hi = ((t + 1) * bands / tasks * band).min(kdim);
                with_scratch(&TILE, |sb| {
                    sb.resize(K_BLOCK * 32, 0.0);
                    let c = cx(k_lo, k_hi, band, tune().prefetch.unwrap_or(band), 0, n);
                    // SAFETY: features checked above; `c` was sized against the slices.
                    unsafe { I::columns::<S, BITS>(&c, scales, biases, sb, acc) };
                });
            });
            let part = &part[..tasks * len];
            let chunks = n / 32;
            let pieces = (threads * 4).clamp(1, chunks.max(1));
            super::tasks::for_each(pieces, |p| {
                let (c0, c1) = (p * chunks / pieces * 32, (p + 1) * chunks / pieces * 32);
                for r in 0..m {
                    let at = r * n;
                    let sum =
                        |i: usize| -> f32 { part.chunks_exact(len).map(|acc| acc[at + i]).sum() };
                    emit(r, 0, &mut (c0..c1).map(|i| (i, sum(i))));
                }
            });
            return;
        }
        // Columns per block: a multiple of g, at most BLOCK_COLS, accumulators L2-sized.
        let block_cols = (ACC_FLOATS / m / g * g).clamp(g, BLOCK_COLS);
        let tasks = (threads * 4).clamp(1, groups);
        super::tasks::for_each(tasks, |t| {
            let (j0, j1) = (t * groups / tasks, (t + 1) * groups / tasks);
            with_scratch(&TILE, |sb| {
                sb.resize(K_BLOCK * 32, 0.0);
                with_scratch(&ACC, |acc| {
                    let mut c0 = j0 * g;
                    while c0 < j1 * g {
                        let cols = block_cols.min(j1 * g - c0);
                        acc.clear();
                        acc.resize(m * cols, 0.0);
                        let c = cx(0, kdim, K_BLOCK, PREFETCH_ROWS, c0, cols);
                        // SAFETY: features checked above; `c` was sized against the slices.
                        unsafe { I::columns::<S, BITS>(&c, scales, biases, sb, acc) };
                        for r in 0..m {
                            let row = &acc[r * cols..(r + 1) * cols];
                            emit(r, c0, &mut row.iter().copied().enumerate());
                        }
                        c0 += cols;
                    }
                });
            });
        });
    });
    Ok(())
}

/// One call's share of W: a range of rows, walked in bands, and a range of columns.
pub(crate) struct Columns<'a> {
    /// Packed W, `kdim` rows of `row_bytes` bytes.
    pub w: &'a [u8],
    pub row_bytes: usize,
    pub kdim: usize,
    /// Rows `k_lo..k_hi` of W, walked in bands of `band ≤ K_BLOCK` rows: each band is read
    /// across all the call's columns before the next.
    pub k_lo: usize,
    pub k_hi: usize,
    pub band: usize,
    /// How many rows ahead the tiles prefetch (0: none).
    pub prefetch_rows: usize,
    /// First column and column count (multiples of g).
    pub c0: usize,
    pub cols: usize,
    /// Group size and groups per row of W.
    pub g: usize,
    pub groups: usize,
    /// x transposed per block of `ROWS` rows (see [`qmv_n`]), and its row count.
    pub xt: &'a [f32],
    pub m: usize,
}

impl Columns<'_> {
    /// Whether every access the kernels make for this call lies inside its slices: W's rows
    /// and columns, x, `acc` (`acc_len` floats, `m` rows of `cols`) and the band's scratch
    /// (`sb_len` floats, `K_BLOCK` rows of 32).
    pub(crate) fn fits(&self, bits: usize, acc_len: usize, sb_len: usize) -> bool {
        let end = self.c0.checked_add(self.cols);
        self.band > 0
            && self.band <= K_BLOCK
            && self.k_lo <= self.k_hi
            && self.k_hi <= self.kdim
            && self.g >= 32
            && self.g.is_power_of_two()
            && self.c0.is_multiple_of(self.g)
            && self.cols.is_multiple_of(self.g)
            && end.is_some_and(|e| e / 8 * bits <= self.row_bytes && e / self.g <= self.groups)
            && self.w.len() >= self.kdim.saturating_mul(self.row_bytes)
            && self.xt.len() >= self.m.saturating_mul(self.kdim)
            && acc_len >= self.m.saturating_mul(self.cols)
            && sb_len >= K_BLOCK * 32
    }
}

/// Accumulates `acc[r·cols + lane]` (lanes permuted per chunk) for every row of x over rows
/// `k_lo..k_hi` of W: band by band, each band across all of the call's columns in blocks of
/// at most [`BLOCK_COLS`].
///
/// # Safety
/// The CPU must support the features of [`available`](super::x86::available).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi")]
unsafe fn columns<S: Element, const BITS: usize>(
    cx: &Columns<'_>,
    scales: &[S],
    biases: &[S],
    sb: &mut [f32],
    acc: &mut [f32],
) {
    let (kdim, cols, m) = (cx.kdim, cx.cols, cx.m);
    if !cx.fits(BITS, acc.len(), sb.len()) {
        return;
    }
    let consts = Consts::new::<BITS>();
    let prefetch = cx.prefetch_rows * cx.row_bytes;
    for k0 in (cx.k_lo..cx.k_hi).step_by(cx.band) {
        let rows = cx.band.min(cx.k_hi - k0);
        let mut b0 = 0;
        while b0 < cols {
            let bcols = BLOCK_COLS.min(cols - b0);
            let chunks = bcols / 32;
            // SAFETY: scales and biases hold kdim·groups elements; the group range lies in a
            // row (`fits`).
            unsafe {
                widen_block(
                    scales,
                    biases,
                    cx.groups,
                    cx.g,
                    (cx.c0 + b0) / cx.g,
                    chunks,
                    k0,
                    &mut sb[..rows * 32],
                )
            };
            for r0 in (0..m).step_by(ROWS) {
                let r = ROWS.min(m - r0);
                let t = Tile {
                    // Row k0, the block's first chunk: (c0 + b0)/32 chunks of 4·BITS bytes in.
                    w: cx.w[k0 * cx.row_bytes + (cx.c0 + b0) / 8 * BITS..].as_ptr(),
                    row_bytes: cx.row_bytes,
                    rows,
                    prefetch,
                    sb: sb.as_ptr(),
                    xt: cx.xt[r0 * kdim + k0 * r..].as_ptr(),
                    pairs: cx.g >= 64,
                    acc: acc[r0 * cols + b0..].as_mut_ptr(),
                    acc_stride: cols,
                };
                // SAFETY: rows k0..k0 + rows of W, the block's chunks of each (`fits` checked
                // them against row_bytes), sb's `rows` rows, x rows r0..r0 + r from k0 and
                // accumulator rows r0..r0 + r, columns b0..b0 + bcols, are all in bounds and
                // this task's alone.
                unsafe { block_rows::<BITS>(r, &t, chunks, &consts) };
            }
            b0 += bcols;
        }
    }
}
