//! AVX-512 blocked GEMM for `y = x·Wᵀ` with many rows of x (prefill, MoE experts with many
//! tokens): each tile of W is decoded once into f32 and reused by every row of x.
//!
//! **Why f32 FMA, not `vdpbf16ps`.** On this machine's cores (Sapphire Rapids family) a
//! 512-bit `vfmadd231ps` issues twice per cycle (32 multiply-adds) while `vdpbf16ps` issues
//! about once every two cycles (16 multiply-adds): f32 FMA is the faster exact instruction
//! (`tools/cpu_peak.c`, docs/perf.md). It is also exact for every x dtype.
//!
//! **Arithmetic.** With codes `q`, scales `s` and biases `b` per group `j`,
//! `y[r,n] = Σ_k x[r,k]·(s[n,j]·q[n,k]) + Σ_j b[n,j]·Σx[r,j]`. The panel holds `s·q` in f32,
//! which is exact for bf16 and f16 scales (8- or 11-bit significand times a code of ≤ 8 bits)
//! and rounded once for f32 scales; the bias term rides along as extra rows of the panel
//! (`b[n,j]`) against extra columns of packed x (`Σx[r,j]`, summed in f32 from x itself), so
//! the whole product is one f32 GEMM over `K + K/g` terms with FMA accumulation — the same
//! error class as the decode kernels' `s·Σ(x·q) + b·Σx`.
//!
//! **Blocking.** Work is split over column tiles of [`NC`] = 48 outputs (tasks finish
//! together: 4096 columns make 86 tiles). Per tile and block of [`KC`] = 128 values of K, 48
//! columns × 128 codes are decoded once — one code per byte (4-bit nibbles split in place,
//! other widths by `vpermb` + `vpmultishiftqb`), a 16×16 dword transpose of 16 columns, then
//! `(dword >> 8·i) & 0xff`, `vcvtdq2ps` and a multiply by the column's scale — into a
//! `[K-step][48 columns]` panel (25 KiB, L1). The micro-kernel then runs every [`R`]-row
//! slice of x over it: per K-step three panel vectors, eight broadcasts of x, 24 FMAs into
//! 24 register accumulators (8 rows × 48 columns). x is packed once per call, in the panel's
//! K order (4-bit chunks hold even then odd elements), with each block's group sums appended.
//!
//! Fewer than [`MIN_M`] rows take the decode kernels (`avx512vnni` where it applies,
//! `avx512bf16` for other bf16 x, `avx512` otherwise), which stream W once with no panel.
//!
//! The driver ([`gemm_t`]) is generic over the instruction set ([`GemmIsa`]: tile sizes,
//! scale widening, panel decode, micro-kernel); `avx2gemm` ([`x86_avx2`](super::x86_avx2))
//! runs it with 6 × 16 tiles and panels of 512 values of K on CPUs without AVX-512.

use super::qmm::QmmArgs;
use super::{DisjointOut, KernelFn, Variant};
use crate::dtype::Float;
use crate::error::Result;
use crate::quant::pack::dispatch_bits;
use rayon::prelude::*;
use std::arch::x86_64::*;
use std::cell::RefCell;

/// The variant: `quantized_matmul`, transpose, every affine width, any x dtype.
pub(crate) const QMM_T_GEMM: Variant = Variant {
    name: "avx512gemm",
    supports: |k| {
        k.mode == crate::QuantMode::Affine
            && k.op == crate::registry::OpKind::QuantizedMatmul
            && k.flag
            && super::x86::available()
    },
    decode: Some(handoffs),
    build: |k| {
        let small = decode_kernel(k).1;
        crate::with_float_type!(k.scales, S => crate::with_float_type!(k.output, O => {
            Some(KernelFn::Qmm(dispatch_bits!(k.bits, B => match small {
                SMALL_VNNI => qmm_t::<S, O, B, SMALL_VNNI> as super::qmm::QmmFn,
                SMALL_BF16 => qmm_t::<S, O, B, SMALL_BF16> as super::qmm::QmmFn,
                _ => qmm_t::<S, O, B, SMALL_F32> as super::qmm::QmmFn,
            }, _ => return None)))
        }, _ => None), _ => None)
    },
};

/// The decode kernel that takes a call of fewer rows than the returned count: the best the
/// key allows.
pub(crate) fn decode_kernel(k: &crate::registry::KernelKey) -> (usize, u8) {
    if (super::x86_vnni::QMM_T_VNNI.supports)(k) {
        (MIN_M_VNNI, SMALL_VNNI)
    } else if k.input == crate::DType::BF16 && super::x86_bf16::available() {
        (MIN_M, SMALL_BF16)
    } else {
        (MIN_M, SMALL_F32)
    }
}

/// The variant's hand-off: below how many rows, and to which decode kernel (the one
/// [`decode_kernel`] picks for `k`).
pub(crate) fn handoffs(k: &crate::registry::KernelKey) -> Vec<(usize, &'static str)> {
    let (below, small) = decode_kernel(k);
    let name = match small {
        SMALL_VNNI => super::x86_vnni::QMM_T_VNNI.name,
        SMALL_BF16 => super::x86_bf16::QMM_T_BF16.name,
        _ => super::x86::QMV_T.name,
    };
    vec![(below, name)]
}

/// Which decode kernel runs fewer than [`MIN_M`] rows: `avx512vnni`, `avx512bf16`, `avx512`.
pub(crate) const SMALL_VNNI: u8 = 0;
pub(crate) const SMALL_BF16: u8 = 1;
pub(crate) const SMALL_F32: u8 = 2;

/// Rows of x from which the GEMM beats the decode kernels.
pub(crate) const MIN_M: usize = 8;
/// The same for keys `avx512vnni` takes: its integer dots beat the panel up to 16 rows
/// (`mlxq bench`, two threads, 4096×4096 4-bit, session 8 of docs/perf.md: M=12 2.6–3.1 ms
/// against 3.8–4.5, M=16 3.5–3.9 against 4.9–6.5; M=24 within the noise of each other).
pub(crate) const MIN_M_VNNI: usize = 17;
/// Rows of x per micro-kernel tile.
const R: usize = 8;
/// 16-column vectors per micro-kernel tile.
pub(crate) const CB: usize = 3;
/// Columns per panel (and per task).
pub(crate) const NC: usize = 16 * CB;
/// Values of K per panel: a multiple of every group size and of the 64-code decode chunk.
pub(crate) const KC: usize = 128;
/// Codes decoded per column at a time.
pub(crate) const CHUNK: usize = 64;

// Panels and output tiles are made of cache lines so that no vector load of the
// micro-kernels splits a line.
use crate::aligned::Line;

/// A task's scratch: panel, f32 output tile, scales and biases (see `TILE`).
type Tile = (Vec<Line>, Vec<Line>, Vec<f32>, Vec<f32>);

thread_local! {
    /// Per-thread scratch of both GEMM paths, made once and reused: the decoded panel (f32
    /// `[K-step][NC]`, or for the int8 variant u8 `[K/4][CB][64 bytes]`), the f32 output
    /// tile, and the tile's scales and biases as f32 (`[group][column]`).
    static TILE: RefCell<Tile> =
        const { RefCell::new((Vec::new(), Vec::new(), Vec::new(), Vec::new())) };
    /// Packed x, taken out for the length of a call (a nested call allocates its own).
    static XPACK: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Panel K-steps for a block of `len` values of K with groups of `g`: codes padded to whole
/// chunks of `chunk`, then one row per group for the biases.
fn steps(len: usize, g: usize, chunk: usize) -> usize {
    len.div_ceil(chunk) * chunk + len / g
}

/// Position `p` of a decoded chunk holds element `perm(p)` of that chunk.
#[inline(always)]
pub(crate) fn perm(bits: usize, p: usize) -> usize {
    if bits == 4 {
        // Each 32-code half: 16 low nibbles (even elements), then 16 high nibbles (odd).
        let (half, i) = (p / 32, p % 32);
        32 * half + if i < 16 { 2 * i } else { 2 * (i - 16) + 1 }
    } else {
        p
    }
}

/// The kernel.
pub(crate) fn qmm_t<S: Float, O: Float, const BITS: usize, const SMALL: u8>(
    a: QmmArgs<'_>,
) -> Result<()> {
    if a.m < MIN_M || (SMALL == SMALL_VNNI && a.m < MIN_M_VNNI) {
        return match SMALL {
            SMALL_VNNI => super::x86_vnni::qmm_t::<super::x86_vnni::Affine<S>, O, BITS>(a),
            SMALL_BF16 => super::x86_bf16::qmm_t::<S, O, BITS>(a),
            _ => super::x86::qmv_t::<S, O, BITS>(a),
        };
    }
    // SAFETY: this variant is only chosen where `x86::available()` holds.
    unsafe { gemm_t::<Avx512Gemm, S, O, BITS>(a) }
}

/// What the blocked GEMM needs from an instruction set: its tile sizes, and its three
/// kernels (a tile's scales widened, the panel decode, the micro-kernel). The driver
/// ([`gemm_t`]) is shared: AVX-512 here, AVX2 in [`x86_avx2`](super::x86_avx2).
pub(crate) trait GemmIsa: 'static {
    /// The variant's name, for errors.
    const NAME: &'static str;
    /// f32 lanes per vector.
    const LANES: usize;
    /// Column vectors per micro-kernel tile.
    const CB: usize;
    /// Rows of x per micro-kernel tile.
    const R: usize;
    /// Codes decoded per column at a time (32 or 64; a block's codes are padded to it).
    const CHUNK: usize;
    /// Values of K per panel: a multiple of every group size and of `CHUNK`.
    const KC: usize;
    /// Columns per panel (and per task).
    const NC: usize = Self::LANES * Self::CB;

    /// `out[j·NC + c] = src[(c0 + c)·groups + j]` widened to f32 for every group `j` and the
    /// tile's `cols` columns, zero past them; does nothing if a slice is too short.
    ///
    /// # Safety
    /// The CPU has the instruction set.
    unsafe fn widen_tile<S: Float>(
        src: &[S],
        groups: usize,
        c0: usize,
        cols: usize,
        out: &mut [f32],
    );

    /// Decodes `src`'s codes into `panel` (`[K-step][NC]`, scaled by `sv`, `[group][NC]`);
    /// does nothing if a slice is too short.
    ///
    /// # Safety
    /// The CPU has the instruction set.
    unsafe fn decode_panel<const BITS: usize>(src: &Panel<'_>, sv: &[f32], panel: &mut [f32]);

    /// `c[rows][NC] (+)= x[rows][..kp] · panel[kp][NC]` over `cbs` column vectors (rows of
    /// x `xs` apart); `c` starts from zero when `first`. Does nothing if a slice is short.
    ///
    /// # Safety
    /// The CPU has the instruction set.
    #[allow(clippy::too_many_arguments)]
    unsafe fn micro(
        rows: usize,
        cbs: usize,
        kp: usize,
        x: &[f32],
        xs: usize,
        panel: &[f32],
        c: &mut [f32],
        first: bool,
    );
}

/// AVX-512: 8 rows × 48 columns, 64-code chunks.
struct Avx512Gemm;

impl GemmIsa for Avx512Gemm {
    const NAME: &'static str = "avx512gemm";
    const LANES: usize = 16;
    const CB: usize = CB;
    const R: usize = R;
    const CHUNK: usize = CHUNK;
    const KC: usize = KC;

    unsafe fn widen_tile<S: Float>(
        src: &[S],
        groups: usize,
        c0: usize,
        cols: usize,
        out: &mut [f32],
    ) {
        // SAFETY: the caller's contract.
        unsafe { widen_tile(src, groups, c0, cols, out) }
    }

    unsafe fn decode_panel<const BITS: usize>(src: &Panel<'_>, sv: &[f32], panel: &mut [f32]) {
        // SAFETY: the caller's contract.
        unsafe { decode_panel::<BITS>(src, sv, panel) }
    }

    unsafe fn micro(
        rows: usize,
        cbs: usize,
        kp: usize,
        x: &[f32],
        xs: usize,
        panel: &[f32],
        c: &mut [f32],
        first: bool,
    ) {
        // SAFETY: the caller's contract.
        unsafe { micro_dispatch(rows, cbs, kp, x, xs, panel, c, first) }
    }
}

/// The blocked GEMM on instruction set `G` (every M; callers hand few rows to decode
/// kernels first).
///
/// # Safety
/// The CPU has `G`'s instruction set.
pub(crate) unsafe fn gemm_t<G: GemmIsa, S: Float, O: Float, const BITS: usize>(
    a: QmmArgs<'_>,
) -> Result<()> {
    const OP: &str = "quantized_matmul";
    let (nc, chunk) = (G::NC, G::CHUNK);
    let w = a.w;
    let a = a.operands::<S, O>(OP, true, true)?;
    let (m, n, k, g) = (a.m, a.rows, a.cols, a.w.g);
    let (groups, row_bytes) = (a.w.groups, a.w.row_bytes);
    let (scales, biases, out) = (a.w.scales, a.w.biases, a.out);
    if !g.is_multiple_of(32) || !G::KC.is_multiple_of(g) {
        return Err(crate::Error::unsupported(
            OP,
            format!("{} on group size {g} (m {m}, n {n}, k {k})", G::NAME),
        ));
    }
    let blocks = k.div_ceil(G::KC);
    let stride = steps(G::KC.min(k), g, chunk);
    let mut xp = XPACK.with(|s| std::mem::take(&mut *s.borrow_mut()));
    xp.clear();
    xp.resize(blocks * m * stride, 0.0);
    // Row `r` of block `b` at (b·m + r)·stride: codes' K order, zero padding, group sums.
    xp.par_chunks_mut(stride).enumerate().for_each(|(i, dst)| {
        let (b, r) = (i / m, i % m);
        let k0 = b * G::KC;
        let len = G::KC.min(k - k0);
        let src = &a.x[r * k + k0..r * k + k0 + len];
        let pad = len.div_ceil(chunk) * chunk;
        for (p, d) in dst[..pad].iter_mut().enumerate() {
            let e = (p / chunk) * chunk + perm(BITS, p % chunk);
            *d = if e < len { src[e] } else { 0.0 };
        }
        for (d, grp) in dst[pad..].iter_mut().zip(src.chunks_exact(g)) {
            *d = grp.iter().sum();
        }
    });
    let writer = DisjointOut::new(out);
    let xp_ref = &xp[..];
    (0..n.div_ceil(nc)).into_par_iter().for_each(|t| {
        TILE.with(|tile| {
            let mut tile = tile.borrow_mut();
            let (panel, acc, sv, bv) = &mut *tile;
            panel.resize((stride * nc).div_ceil(16), Line::ZERO);
            acc.resize((m * nc).div_ceil(16), Line::ZERO);
            let panel: &mut [f32] = bytemuck::cast_slice_mut(&mut panel[..]);
            let acc: &mut [f32] = bytemuck::cast_slice_mut(&mut acc[..]);
            sv.resize(groups * nc, 0.0);
            bv.resize(groups * nc, 0.0);
            let c0 = t * nc;
            let cols = nc.min(n - c0);
            // The tile's scales and biases as f32, [group][column], zero past N.
            // SAFETY: the caller guarantees the features; `widen_tile` checks its slices.
            unsafe {
                G::widen_tile(scales, groups, c0, cols, sv);
                G::widen_tile(biases, groups, c0, cols, bv);
            }
            for b in 0..blocks {
                let k0 = b * G::KC;
                let len = G::KC.min(k - k0);
                let kp = steps(len, g, chunk);
                let (g0, gb) = (k0 / g, len / g);
                // The biases go into the panel's bias rows.
                let pad = len.div_ceil(chunk) * chunk;
                panel[pad * nc..(pad + gb) * nc].copy_from_slice(&bv[g0 * nc..(g0 + gb) * nc]);
                let src = Panel {
                    packed: w.packed,
                    row_bytes,
                    col0: c0,
                    cols,
                    byte0: k0 / 8 * BITS,
                    len,
                    g,
                };
                // SAFETY: the caller guarantees the features; `decode_panel` checks its slices.
                unsafe { G::decode_panel::<BITS>(&src, &sv[g0 * nc..], panel) };
                prefetch_next(
                    &src,
                    b + 1 < blocks,
                    G::KC,
                    k,
                    n,
                    nc,
                    BITS,
                    scales,
                    biases,
                    groups,
                );
                let cbs = cols.div_ceil(G::LANES);
                for r0 in (0..m).step_by(G::R) {
                    let rows = G::R.min(m - r0);
                    let x = &xp_ref[(b * m + r0) * stride..];
                    let c = &mut acc[r0 * nc..(r0 + rows) * nc];
                    // SAFETY: the caller guarantees the features; `micro` checks its slices.
                    unsafe { G::micro(rows, cbs, kp, x, stride, panel, c, b == 0) };
                }
            }
            // SAFETY: task `t` alone owns columns c0..c0 + cols of every row.
            unsafe { write_tile(acc, nc, m, cols, &writer, n, c0) };
        })
    });
    XPACK.with(|s| *s.borrow_mut() = xp);
    Ok(())
}

/// Writes a finished tile (`m` rows of `cols` outputs, `nc` apart in `acc`) to columns
/// `c0..c0 + cols` of `out` (`n` columns), vectorised where the CPU has AVX2, FMA and F16C.
///
/// # Safety
/// The calling task alone writes columns `c0..c0 + cols` of every row of `out`.
unsafe fn write_tile<O: Float>(
    acc: &[f32],
    nc: usize,
    m: usize,
    cols: usize,
    out: &DisjointOut<O>,
    n: usize,
    c0: usize,
) {
    if super::x86_avx2::available() {
        // SAFETY: the features are checked; the caller's contract.
        unsafe { super::x86_avx2::write_tile(acc, nc, m, cols, out, n, c0) };
        return;
    }
    for r in 0..m {
        for cc in 0..cols {
            // SAFETY: the caller's contract.
            unsafe { out.write(r * n + c0 + cc, O::from_f32(acc[r * nc + cc])) };
        }
    }
}

/// Prefetches into L2, while the tiles of panel `cur` run, what the task decodes next: the
/// codes of the next K block of the same columns, or after the last block (`more` false) the
/// first block of the next column tile (`nc` columns on) with its scales and biases. Each is
/// `cols` rows of W a row apart (`row_bytes`), a few hundred bytes each: a pattern the
/// hardware prefetchers do not follow, so without this the decode waits on memory.
#[allow(clippy::too_many_arguments)]
fn prefetch_next<S>(
    cur: &Panel<'_>,
    more: bool,
    kc: usize,
    k: usize,
    n: usize,
    nc: usize,
    bits: usize,
    scales: &[S],
    biases: &[S],
    groups: usize,
) {
    use super::x86_columns::PrefetchTo;
    let k0 = cur.byte0 / bits * 8;
    let (col0, cols, k0) = if more {
        (cur.col0, cur.cols, k0 + kc)
    } else if cur.col0 + nc < n {
        let col0 = cur.col0 + nc;
        let cols = nc.min(n - col0);
        let (at, len) = (col0 * groups, cols * groups * std::mem::size_of::<S>());
        PrefetchTo::L2.prefetch_lines(scales.as_ptr().wrapping_add(at) as *const u8, len);
        PrefetchTo::L2.prefetch_lines(biases.as_ptr().wrapping_add(at) as *const u8, len);
        (col0, cols, 0)
    } else {
        return;
    };
    let bytes = kc.min(k.saturating_sub(k0)) / 8 * bits;
    for c in col0..col0 + cols {
        let at = c * cur.row_bytes + k0 / 8 * bits;
        PrefetchTo::L2.prefetch_lines(cur.packed.as_ptr().wrapping_add(at), bytes);
    }
}

/// Where one panel's codes come from: columns `col0..col0 + cols` of W, K values starting at
/// byte `byte0` of each row, `len` of them.
pub(crate) struct Panel<'a> {
    pub packed: &'a [u8],
    pub row_bytes: usize,
    pub col0: usize,
    pub cols: usize,
    pub byte0: usize,
    pub len: usize,
    pub g: usize,
}

impl Panel<'_> {
    /// Whether [`chunk16`] may read every chunk of the panel: `len` a multiple of 32, and the
    /// block's bytes inside each of the columns' rows.
    pub(crate) fn readable(&self, bits: usize) -> bool {
        self.len.is_multiple_of(32)
            && self.packed.len() >= (self.col0 + self.cols) * self.row_bytes
            && self.byte0 + self.len / 8 * bits <= self.row_bytes
    }

    /// Values of K of the panel padded to whole [`CHUNK`]s.
    pub(crate) fn pad(&self) -> usize {
        self.len.div_ceil(CHUNK) * CHUNK
    }
}

/// Chunk `ch` (64 codes; the last may be 32) of the 16 columns `col0 + 16·cb..` of `src`,
/// one code per byte in [`perm`] order, transposed: `rows[q]` lane `c` holds positions
/// `4q..4q + 4` of column `c`, one byte each (zero past the panel's columns and, in a half
/// chunk, past 32 codes).
///
/// # Safety
/// The CPU has AVX-512 F/BW/VL/VBMI; `src.readable(BITS)` holds and `ch < src.pad()/CHUNK`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi")]
pub(crate) unsafe fn chunk16<const BITS: usize>(
    src: &Panel<'_>,
    cb: usize,
    ch: usize,
) -> [__m512i; 16] {
    let last_col = src.col0 + src.cols;
    let half = src.len - ch * CHUNK == 32;
    let mut rows = [_mm512_setzero_si512(); 16];
    for (c, row) in rows.iter_mut().enumerate() {
        let col = src.col0 + cb * 16 + c;
        if col < last_col {
            let at = col * src.row_bytes + src.byte0 + ch * CHUNK / 8 * BITS;
            // SAFETY: the chunk's bytes lie within column `col`'s row of the block (the
            // caller's `readable`: `byte0 + len/8·BITS ≤ row_bytes`, `col < packed.len() /
            // row_bytes`).
            *row = unsafe { decode64::<BITS>(src.packed.as_ptr().add(at), half) };
        }
    }
    transpose16(&mut rows);
    rows
}

/// 64 codes (or the first 32, the rest zero, when `half`) of one row at `p`, one per byte,
/// in [`perm`] order.
///
/// # Safety
/// `p` points to `CHUNK·BITS/8` readable bytes (half as many when `half`); the CPU has
/// AVX-512 F/BW/VL/VBMI.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi")]
pub(crate) unsafe fn decode64<const BITS: usize>(p: *const u8, half: bool) -> __m512i {
    let bytes = if half { 4 * BITS } else { 8 * BITS };
    let mask: __mmask64 = if bytes == 64 {
        u64::MAX
    } else {
        (1u64 << bytes) - 1
    };
    // SAFETY: the masked load reads only the `bytes` the caller guarantees.
    let raw = unsafe { _mm512_maskz_loadu_epi8(mask, p as *const i8) };
    match BITS {
        8 => raw,
        4 => {
            // 128-bit lanes [b0, b0, b1, b1] (b0, b1: 16 bytes each); lanes 1 and 3 take the
            // high nibbles.
            let lanes = _mm512_shuffle_i64x2::<0b01_01_00_00>(raw, raw);
            let shifted = _mm512_mask_srli_epi16::<4>(lanes, 0xff00_ff00, lanes);
            // (Lanes 1 and 3 are words 8..16 and 24..32 of the 32 the mask covers.)
            _mm512_and_si512(shifted, _mm512_set1_epi8(0x0f))
        }
        _ => {
            let spread: [u8; 64] = std::array::from_fn(|i| ((i / 8) * BITS + i % 8).min(63) as u8);
            let ctl: [u8; 64] = std::array::from_fn(|i| ((i % 8) * BITS) as u8);
            // SAFETY: each load reads exactly its 64-byte array.
            let (spread, ctl) = unsafe {
                (
                    _mm512_loadu_si512(spread.as_ptr() as *const __m512i),
                    _mm512_loadu_si512(ctl.as_ptr() as *const __m512i),
                )
            };
            let fields = _mm512_multishift_epi64_epi8(ctl, _mm512_permutexvar_epi8(spread, raw));
            _mm512_and_si512(fields, _mm512_set1_epi8(((1u32 << BITS) - 1) as i8))
        }
    }
}

/// `out[j·NC + c] = src[(c0 + c)·groups + j]` widened to f32, for every group `j` and the
/// tile's `cols` columns (zero past them): a tile's scales or biases, converted once per task
/// and 16 columns × 16 groups at a time (the scalar per-block conversion it replaced cost as
/// much as the panel decode at M = 8). Does nothing if a slice is too short.
///
/// # Safety
/// The CPU has AVX-512 F, BW and VL.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(crate) unsafe fn widen_tile<S: Float>(
    src: &[S],
    groups: usize,
    c0: usize,
    cols: usize,
    out: &mut [f32],
) {
    if cols > NC || out.len() < groups * NC || src.len() < (c0 + cols) * groups {
        return;
    }
    for cb in 0..CB {
        for j0 in (0..groups).step_by(16) {
            let nj = 16.min(groups - j0);
            let mask = super::x86::mask16(nj);
            let mut rows = [_mm512_setzero_si512(); 16];
            for (c, row) in rows.iter_mut().enumerate() {
                let col = cb * 16 + c;
                if col >= cols {
                    break;
                }
                // SAFETY: elements j0..j0 + nj of column c0 + col lie inside `src` (checked
                // above); the masked loads touch no others.
                *row = _mm512_castps_si512(unsafe {
                    super::x86::widen16(src.as_ptr().add((c0 + col) * groups + j0), mask)
                });
            }
            transpose16(&mut rows);
            for (j, v) in rows.iter().take(nj).enumerate() {
                // SAFETY: (j0 + j)·NC + cb·16 + 16 ≤ groups·NC (checked above).
                unsafe {
                    _mm512_storeu_si512(
                        out.as_mut_ptr().add((j0 + j) * NC + cb * 16) as *mut __m512i,
                        *v,
                    )
                };
            }
        }
    }
}

/// Transposes a 16×16 matrix of dwords in place (`r[i]` lane `j` ↔ `r[j]` lane `i`).
#[inline]
#[target_feature(enable = "avx512f")]
pub(crate) fn transpose16(r: &mut [__m512i; 16]) {
    let mut t = [_mm512_setzero_si512(); 16];
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for q in 0..4 {
        let b = 4 * q;
        r[b] = _mm512_unpacklo_epi64(t[b], t[b + 2]);
        r[b + 1] = _mm512_unpackhi_epi64(t[b], t[b + 2]);
        r[b + 2] = _mm512_unpacklo_epi64(t[b + 1], t[b + 3]);
        r[b + 3] = _mm512_unpackhi_epi64(t[b + 1], t[b + 3]);
    }
    // r[4a + e] now holds, in 128-bit lane L, element 4L + e of rows 4a..4a+4.
    for e in 0..4 {
        t[e] = _mm512_shuffle_i32x4::<0x88>(r[e], r[4 + e]);
        t[4 + e] = _mm512_shuffle_i32x4::<0xdd>(r[e], r[4 + e]);
        t[8 + e] = _mm512_shuffle_i32x4::<0x88>(r[8 + e], r[12 + e]);
        t[12 + e] = _mm512_shuffle_i32x4::<0xdd>(r[8 + e], r[12 + e]);
    }
    for e in 0..4 {
        r[e] = _mm512_shuffle_i32x4::<0x88>(t[e], t[8 + e]);
        r[4 + e] = _mm512_shuffle_i32x4::<0x88>(t[4 + e], t[12 + e]);
        r[8 + e] = _mm512_shuffle_i32x4::<0xdd>(t[e], t[8 + e]);
        r[12 + e] = _mm512_shuffle_i32x4::<0xdd>(t[4 + e], t[12 + e]);
    }
}

/// Decodes the codes of `src` into `panel` rows `0..pad` (`[K-step][NC]`, scaled by `sv`,
/// `[group][NC]`); rows past `len` and columns past `cols` become zero.
///
/// # Safety
/// The CPU has AVX-512 F/BW/VL/VBMI. (Slices are checked here.)
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi")]
unsafe fn decode_panel<const BITS: usize>(src: &Panel<'_>, sv: &[f32], panel: &mut [f32]) {
    let pad = src.pad();
    if !src.readable(BITS) || sv.len() < src.len / src.g * NC || panel.len() < pad * NC {
        return;
    }
    let ff = _mm512_set1_epi32(0xff);
    for cb in 0..src.cols.div_ceil(16) {
        for ch in 0..pad / CHUNK {
            // SAFETY: `readable` holds and ch < pad/CHUNK.
            let rows = unsafe { chunk16::<BITS>(src, cb, ch) };
            // rows[q] lane c = positions 4q..4q+4 of column c, one byte each.
            for (q, &d) in rows.iter().enumerate() {
                let p0 = ch * CHUNK + 4 * q;
                let (j, live) = ((p0 / 32 * 32) / src.g, p0 < src.len);
                let s = if live {
                    // SAFETY: j < len/g groups, each NC wide (checked above).
                    unsafe { _mm512_loadu_ps(sv.as_ptr().add(j * NC + cb * 16)) }
                } else {
                    _mm512_setzero_ps()
                };
                let v = [
                    _mm512_and_si512(d, ff),
                    _mm512_and_si512(_mm512_srli_epi32::<8>(d), ff),
                    _mm512_and_si512(_mm512_srli_epi32::<16>(d), ff),
                    _mm512_srli_epi32::<24>(d),
                ];
                for (i, v) in v.into_iter().enumerate() {
                    let f = _mm512_mul_ps(_mm512_cvtepi32_ps(v), s);
                    // SAFETY: row p0 + i < pad, NC wide (checked above).
                    unsafe { _mm512_storeu_ps(panel.as_mut_ptr().add((p0 + i) * NC + cb * 16), f) };
                }
            }
        }
    }
}

/// Runs [`micro`] for `rows` (1..=R) rows and `cbs` (1..=CB) column vectors.
///
/// # Safety
/// The CPU has AVX-512 F.
#[allow(clippy::too_many_arguments)]
unsafe fn micro_dispatch(
    rows: usize,
    cbs: usize,
    kp: usize,
    x: &[f32],
    xs: usize,
    panel: &[f32],
    c: &mut [f32],
    first: bool,
) {
    // SAFETY: the caller's contract; `micro` checks its slices.
    unsafe { tile_dispatch!(rows, cbs, micro(kp, x, xs, panel, c, first)) }
}

/// Calls `$f::<RR, C>(args)` for `RR = rows` (1..=8) and `C = cbs` (1, 2, or 3 for any
/// larger count): the AVX-512 GEMMs' micro-kernels are monomorphised per tile shape so their
/// accumulators stay in registers. Nothing runs for 0 or more than 8 rows.
macro_rules! tile_dispatch {
    ($rows:expr, $cbs:expr, $f:ident $args:tt) => {
        $crate::backend::cpu::x86_gemm::tile_dispatch!(@rows $rows, $cbs, $f $args; 1 2 3 4 5 6 7 8)
    };
    (@rows $rows:expr, $cbs:expr, $f:ident $args:tt; $($r:literal)*) => {
        match ($rows, $cbs) {
            $( ($r, 1) => $f::<$r, 1> $args,
               ($r, 2) => $f::<$r, 2> $args,
               ($r, _) => $f::<$r, 3> $args, )*
            _ => {}
        }
    };
}
pub(crate) use tile_dispatch;

/// `c[RR][NC] (+)= x[RR][..kp] · panel[kp][NC]` for the first `C` column vectors; `c` starts
/// from zero when `first`. Does nothing if a slice is shorter than that needs.
///
/// # Safety
/// The CPU has AVX-512 F.
#[target_feature(enable = "avx512f")]
unsafe fn micro<const RR: usize, const C: usize>(
    kp: usize,
    x: &[f32],
    xs: usize,
    panel: &[f32],
    c: &mut [f32],
    first: bool,
) {
    if kp == 0 || x.len() < (RR - 1) * xs + kp || panel.len() < kp * NC || c.len() < RR * NC {
        return;
    }
    let (xp, pp, cp) = (x.as_ptr(), panel.as_ptr(), c.as_mut_ptr());
    let mut acc = [[_mm512_setzero_ps(); C]; RR];
    if !first {
        for (r, row) in acc.iter_mut().enumerate() {
            for (v, a) in row.iter_mut().enumerate() {
                // SAFETY: r < RR rows of NC, v·16 + 16 ≤ NC (checked above).
                *a = unsafe { _mm512_loadu_ps(cp.add(r * NC + v * 16)) };
            }
        }
    }
    for s in 0..kp {
        // SAFETY: step s < kp of the panel (kp·NC checked) and of every row of x.
        unsafe {
            let mut wv = [_mm512_setzero_ps(); C];
            for (v, wv) in wv.iter_mut().enumerate() {
                *wv = _mm512_loadu_ps(pp.add(s * NC + v * 16));
            }
            for (r, row) in acc.iter_mut().enumerate() {
                let xv = _mm512_set1_ps(*xp.add(r * xs + s));
                for (a, &wv) in row.iter_mut().zip(&wv) {
                    *a = _mm512_fmadd_ps(xv, wv, *a);
                }
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        for (v, &a) in row.iter().enumerate() {
            // SAFETY: as for the loads.
            unsafe { _mm512_storeu_ps(cp.add(r * NC + v * 16), a) };
        }
    }
}

/// The opt-in int8-activation variant (never chosen unless forced by name): x is quantized
/// to int8 per block of 32 values, so its results differ from the f32 path by up to the
/// bound in [`Avx512I8`]'s documentation, beyond the conformance tolerance.
pub(crate) const QMM_T_GEMM_I8: Variant = Variant {
    name: Avx512I8::NAME,
    supports: |k| {
        k.mode == crate::QuantMode::Affine
            && k.op == crate::registry::OpKind::QuantizedMatmul
            && k.flag
            && super::x86::available()
            && is_x86_feature_detected!("avx512vnni")
    },
    decode: None,
    build: build_codes::<Avx512I8>,
};

/// The `build` of a [`CodesIsa`] variant on instruction set `I`: [`gemm_codes`] for the
/// key's scale and output dtypes and width. Only for a variant whose `supports` checks `I`'s
/// features.
pub(crate) fn build_codes<I: CodesIsa>(k: &crate::registry::KernelKey) -> Option<KernelFn> {
    crate::with_float_type!(k.scales, S => crate::with_float_type!(k.output, O => {
        Some(KernelFn::Qmm(dispatch_bits!(k.bits, B =>
            qmm_codes::<I, S, O, B> as super::qmm::QmmFn, _ => return None)))
    }, _ => None), _ => None)
}

/// [`gemm_codes`] on `I` as a kernel entry (built only by [`build_codes`]).
fn qmm_codes<I: CodesIsa, S: Float, O: Float, const BITS: usize>(a: QmmArgs<'_>) -> Result<()> {
    // SAFETY: `build_codes` serves only variants whose `supports` checked `I`'s features, and
    // the dispatcher builds a variant only for keys it supports on this CPU.
    unsafe { gemm_codes::<I, S, O, BITS>(a) }
}

/// Rows of x per int8 micro-kernel tile: 8 rows × 3 column vectors are 24 i32 accumulators,
/// which leaves registers for the three panel vectors and one broadcast of x (the f32 sums
/// live in the L1-resident output tile, touched once per block of 32).
const RI: usize = 8;
/// Values of x sharing one int8 scale.
pub(crate) const XBLOCK: usize = 32;

thread_local! {
    /// Packed x (as lines, cast to the variant's [`CodesIsa::X`]), its block factors and its
    /// group sums, taken out per call.
    static XPACK_CODES: RefCell<(Vec<Line>, Vec<f32>, Vec<f32>)> =
        const { RefCell::new((Vec::new(), Vec::new(), Vec::new())) };
}

/// What the GEMM over a panel of raw codes ([`gemm_codes`]) needs from an instruction set:
/// its tile sizes, its packed x (one element of [`CodesIsa::X`] per value of K, with per-block
/// factors and exact f32 group sums), and its three kernels (a tile's scales widened, the
/// panel decode, the micro-kernel with its per-block epilogue). The int8-activation variants
/// ([`Avx512I8`]; AVX2 `vpmaddubsw` in [`x86_avx2_i8`](super::x86_avx2_i8)) quantize x;
/// `avx512bf16gemm` ([`x86_gemm_bf16`](super::x86_gemm_bf16)) keeps bf16 x exact.
pub(crate) trait CodesIsa: 'static {
    /// The variant's name, for errors.
    const NAME: &'static str;
    /// Columns per vector.
    const LANES: usize;
    /// Columns per panel (and per task): a multiple of `LANES`, at most 64.
    const NC: usize;
    /// Rows of x per micro-kernel tile.
    const R: usize;
    /// Values of K per panel: a multiple of every group size (and of [`XBLOCK`]).
    const KC: usize;
    /// Bytes of panel per code (1: u8 codes; 2: bf16).
    const PANEL_BYTES: usize;
    /// One value of packed x.
    type X: bytemuck::Pod + Send + Sync;

    /// Packs one row's K block of x (`src`, f32, a multiple of 32 values) for the
    /// micro-kernel: `q` (`src.len()` values, in the panel's K order), `d` (a factor per block
    /// of [`XBLOCK`] values, where the variant has one) and `sums` (the f32 sum of each group
    /// of `g`). Does nothing if a slice is too short.
    ///
    /// # Safety
    /// The CPU has the instruction set.
    unsafe fn prepare_x<const BITS: usize>(
        src: &[f32],
        q: &mut [Self::X],
        d: &mut [f32],
        sums: &mut [f32],
        g: usize,
    );

    /// As [`GemmIsa::widen_tile`].
    ///
    /// # Safety
    /// The CPU has the instruction set.
    unsafe fn widen_tile<S: Float>(
        src: &[S],
        groups: usize,
        c0: usize,
        cols: usize,
        out: &mut [f32],
    );

    /// Decodes `src`'s codes into `panel` in the micro-kernel's layout and [`perm`] order;
    /// columns past `cols` are zero. Does nothing if a slice is too short.
    ///
    /// # Safety
    /// The CPU has the instruction set.
    unsafe fn decode_panel<const BITS: usize>(src: &Panel<'_>, panel: &mut [Line]);

    /// `c[rows][NC] += Σ_groups (s·Σ(q·x) + b·Σx)` over one K block (x as packed by
    /// [`CodesIsa::prepare_x`]), for the first `cbs` column vectors of each row. Does nothing
    /// if a slice is shorter than that needs.
    ///
    /// # Safety
    /// The CPU has the instruction set.
    #[allow(clippy::too_many_arguments)]
    unsafe fn micro<const BITS: usize>(
        rows: usize,
        cbs: usize,
        x: &XTile<'_, Self::X>,
        panel: &[Line],
        sv: &[f32],
        bv: &[f32],
        c: &mut [f32],
    );
}

/// AVX-512 VNNI int8 activations: 8 rows × 48 columns, `vpdpbusd` (no saturation: every
/// width takes ±127).
///
/// Each block of 32 values of a row of x becomes `d·x̂` with `d = max|x|/L` and
/// `x̂ = round(x/d) ∈ [-L, L]`, `L = levels(BITS)` (127 here; 63 for 8-bit codes on
/// `avx2gemm-i8`, whose dot would saturate); the codes (u8) meet x̂ in integer dot products
/// into i32 sums. Per block the i32 sum is converted and scaled by `s·d`; the bias term uses
/// the exact f32 `Σx` of each group, so only `s·q` meets rounded x. Error against the exact
/// product, per output:
///
/// `|y − y_exact| ≤ Σ_blocks (max|x_blk| / 2L) · Σ_{k∈blk} |s·q_k|`  (plus f32 rounding),
///
/// i.e. at most half an int8 step of each block times the weights' magnitude without bias.
pub(crate) struct Avx512I8;

impl Avx512I8 {
    /// The largest |x̂| of the int8 grid for codes of `bits` bits.
    pub(crate) fn levels(_bits: usize) -> f32 {
        127.0
    }
}

impl CodesIsa for Avx512I8 {
    const NAME: &'static str = "avx512gemm-i8";
    const LANES: usize = 16;
    const NC: usize = NC;
    const R: usize = RI;
    const KC: usize = KC;
    const PANEL_BYTES: usize = 1;
    type X = i8;

    unsafe fn prepare_x<const BITS: usize>(
        src: &[f32],
        q: &mut [i8],
        d: &mut [f32],
        sums: &mut [f32],
        g: usize,
    ) {
        // SAFETY: AVX-512 includes AVX2; `quantize_x` checks its slices.
        unsafe { super::x86_avx2_i8::quantize_x(src, q, d, sums, g, BITS, Self::levels(BITS)) }
    }

    unsafe fn widen_tile<S: Float>(
        src: &[S],
        groups: usize,
        c0: usize,
        cols: usize,
        out: &mut [f32],
    ) {
        // SAFETY: the caller's contract.
        unsafe { widen_tile(src, groups, c0, cols, out) }
    }

    unsafe fn decode_panel<const BITS: usize>(src: &Panel<'_>, panel: &mut [Line]) {
        // SAFETY: the caller's contract.
        unsafe { decode_panel_u8::<BITS>(src, panel) }
    }

    unsafe fn micro<const BITS: usize>(
        rows: usize,
        cbs: usize,
        x: &XTile<'_, i8>,
        panel: &[Line],
        sv: &[f32],
        bv: &[f32],
        c: &mut [f32],
    ) {
        // SAFETY: the caller's contract.
        unsafe { micro_i8_dispatch(rows, cbs, x, panel, sv, bv, c) }
    }
}

/// The GEMM over a panel of raw codes on instruction set `I` (every M): per column tile and
/// K block the codes are decoded once into `I`'s panel, and `I`'s micro-kernel runs every
/// tile of rows of x (packed once per call by [`CodesIsa::prepare_x`]) over it, applying
/// scales and biases per block into an f32 output tile.
///
/// # Safety
/// The CPU has `I`'s instruction set.
pub(crate) unsafe fn gemm_codes<I: CodesIsa, S: Float, O: Float, const BITS: usize>(
    a: QmmArgs<'_>,
) -> Result<()> {
    const OP: &str = "quantized_matmul";
    let (nc, kc) = (I::NC, I::KC);
    let w = a.w;
    let a = a.operands::<S, O>(OP, true, true)?;
    let (m, n, k, g) = (a.m, a.rows, a.cols, a.w.g);
    let (groups, row_bytes) = (a.w.groups, a.w.row_bytes);
    let (scales, biases, out) = (a.w.scales, a.w.biases, a.out);
    if !g.is_multiple_of(XBLOCK) || !kc.is_multiple_of(g) {
        return Err(crate::Error::unsupported(
            OP,
            format!("{} on group size {g} (m {m}, n {n}, k {k})", I::NAME),
        ));
    }
    let blocks = k.div_ceil(kc);
    let xsize = std::mem::size_of::<I::X>();
    let (mut xlines, mut xd, mut xs) = XPACK_CODES.with(|s| std::mem::take(&mut *s.borrow_mut()));
    xlines.clear();
    xlines.resize((blocks * m * kc * xsize).div_ceil(64), Line::ZERO);
    let xq: &mut [I::X] = &mut bytemuck::cast_slice_mut(&mut xlines[..])[..blocks * m * kc];
    xd.clear();
    xd.resize(blocks * m * (kc / XBLOCK), 0.0);
    xs.clear();
    xs.resize(blocks * m * (kc / XBLOCK), 0.0);
    // Row `r` of block `b` at (b·m + r)·KC values (K order of the panel), its block factors
    // and group sums at (b·m + r)·KC/32.
    xq.par_chunks_mut(kc)
        .zip(xd.par_chunks_mut(kc / XBLOCK))
        .zip(xs.par_chunks_mut(kc / XBLOCK))
        .enumerate()
        .for_each(|(i, ((q, d), s))| {
            let (b, r) = (i / m, i % m);
            let k0 = b * kc;
            let len = kc.min(k - k0);
            let src = &a.x[r * k + k0..r * k + k0 + len];
            // SAFETY: the caller guarantees the features; `prepare_x` checks its slices.
            unsafe { I::prepare_x::<BITS>(src, q, d, s, g) };
        });
    let writer = DisjointOut::new(out);
    let (xq_ref, xd_ref, xs_ref) = (&xq[..], &xd[..], &xs[..]);
    (0..n.div_ceil(nc)).into_par_iter().for_each(|t| {
        TILE.with(|tile| {
            let mut tile = tile.borrow_mut();
            let (panel, acc, sv, bv) = &mut *tile;
            panel.resize((kc * nc * I::PANEL_BYTES).div_ceil(64), Line::ZERO);
            acc.resize((m * nc).div_ceil(16), Line::ZERO);
            let acc: &mut [f32] = bytemuck::cast_slice_mut(&mut acc[..]);
            sv.resize(groups * nc, 0.0);
            bv.resize(groups * nc, 0.0);
            let c0 = t * nc;
            let cols = nc.min(n - c0);
            acc[..m * nc].fill(0.0);
            // SAFETY: the caller guarantees the features; `widen_tile` checks its slices.
            unsafe {
                I::widen_tile(scales, groups, c0, cols, sv);
                I::widen_tile(biases, groups, c0, cols, bv);
            }
            for b in 0..blocks {
                let k0 = b * kc;
                let len = kc.min(k - k0);
                let g0 = k0 / g;
                let src = Panel {
                    packed: w.packed,
                    row_bytes,
                    col0: c0,
                    cols,
                    byte0: k0 / 8 * BITS,
                    len,
                    g,
                };
                // SAFETY: the caller guarantees the features; `decode_panel` checks its slices.
                unsafe { I::decode_panel::<BITS>(&src, panel) };
                prefetch_next(
                    &src,
                    b + 1 < blocks,
                    kc,
                    k,
                    n,
                    nc,
                    BITS,
                    scales,
                    biases,
                    groups,
                );
                let cbs = cols.div_ceil(I::LANES);
                let (sv, bv) = (&sv[g0 * nc..], &bv[g0 * nc..]);
                for r0 in (0..m).step_by(I::R) {
                    let rows = I::R.min(m - r0);
                    let at = b * m + r0;
                    let x = XTile {
                        q: &xq_ref[at * kc..],
                        d: &xd_ref[at * (kc / XBLOCK)..],
                        sums: &xs_ref[at * (kc / XBLOCK)..],
                        len,
                        g,
                    };
                    let c = &mut acc[r0 * nc..(r0 + rows) * nc];
                    // SAFETY: the caller guarantees the features; `micro` checks its slices.
                    unsafe { I::micro::<BITS>(rows, cbs, &x, panel, sv, bv, c) };
                }
            }
            // SAFETY: task `t` alone owns columns c0..c0 + cols of every row.
            unsafe { write_tile(acc, nc, m, cols, &writer, n, c0) };
        })
    });
    XPACK_CODES.with(|s| *s.borrow_mut() = (xlines, xd, xs));
    Ok(())
}

/// Decodes the codes of `src` into `panel` as u8 (`[K/4][CB]` vectors of 16 columns × 4
/// codes, `vpdpbusd`'s layout); columns past `cols` are zero.
///
/// # Safety
/// The CPU has AVX-512 F/BW/VL/VBMI. (Slices are checked here.)
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi")]
unsafe fn decode_panel_u8<const BITS: usize>(src: &Panel<'_>, panel: &mut [Line]) {
    let pad = src.pad();
    if !src.readable(BITS) || panel.len() < pad / 4 * CB {
        return;
    }
    for cb in 0..src.cols.div_ceil(16) {
        for ch in 0..pad / CHUNK {
            // SAFETY: `readable` holds and ch < pad/CHUNK.
            let rows = unsafe { chunk16::<BITS>(src, cb, ch) };
            for (q, &d) in rows.iter().enumerate() {
                let dst = &mut panel[(ch * CHUNK / 4 + q) * CB + cb];
                // SAFETY: `dst` is 64 writable bytes.
                unsafe { _mm512_storeu_si512(dst.0.as_mut_ptr() as *mut __m512i, d) };
            }
        }
    }
}

/// Rows of packed x for one K block: values `X` (row stride `KC`), block factors and group
/// sums (row stride `KC/32`), `len` values of K, groups of `g`.
pub(crate) struct XTile<'a, X> {
    pub q: &'a [X],
    pub d: &'a [f32],
    pub sums: &'a [f32],
    pub len: usize,
    pub g: usize,
}

/// Runs [`micro_i8`] for `rows` (1..=RI) rows and `cbs` (1..=CB) column vectors.
///
/// # Safety
/// The CPU has AVX-512 F and VNNI.
unsafe fn micro_i8_dispatch(
    rows: usize,
    cbs: usize,
    x: &XTile<'_, i8>,
    panel: &[Line],
    sv: &[f32],
    bv: &[f32],
    c: &mut [f32],
) {
    // SAFETY: the caller's contract; `micro_i8` checks its slices.
    unsafe { tile_dispatch!(rows, cbs, micro_i8(x, panel, sv, bv, c)) }
}

/// `c[RR][NC] += Σ_blocks s·d·Σ(q·x̂) + Σ_groups b·Σx` over one K block, for the first `C`
/// column vectors. Per block of 32 values of K: eight `vpdpbusd` steps into `RR × C` i32
/// accumulators held in registers, then one read-modify-write of the f32 tile in L1.
/// Does nothing if a slice is shorter than that needs.
///
/// # Safety
/// The CPU has AVX-512 F and VNNI.
#[target_feature(enable = "avx512f,avx512vnni")]
unsafe fn micro_i8<const RR: usize, const C: usize>(
    x: &XTile<'_, i8>,
    panel: &[Line],
    sv: &[f32],
    bv: &[f32],
    c: &mut [f32],
) {
    let (nblk, ngrp, ds) = (x.len / XBLOCK, x.len / x.g, KC / XBLOCK);
    if x.q.len() < (RR - 1) * KC + x.len
        || x.d.len() < (RR - 1) * ds + nblk
        || x.sums.len() < (RR - 1) * ds + ngrp
        || panel.len() < x.len / 4 * CB
        || sv.len() < ngrp * NC
        || bv.len() < ngrp * NC
        || c.len() < RR * NC
    {
        return;
    }
    let (xp, cp) = (x.q.as_ptr(), c.as_mut_ptr());
    let per_group = x.g / XBLOCK;
    let (pp, dp, sp) = (
        panel.as_ptr() as *const __m512i,
        x.d.as_ptr(),
        x.sums.as_ptr(),
    );
    let (svp, bvp) = (sv.as_ptr(), bv.as_ptr());
    for blk in 0..nblk {
        let mut dot = [[_mm512_setzero_si512(); C]; RR];
        for q in 0..XBLOCK / 4 {
            let s = blk * XBLOCK / 4 + q;
            // SAFETY: panel entry s·CB + v < len/4·CB and x byte 4s + 4 ≤ len of row r < RR
            // (checked above).
            unsafe {
                let mut w = [_mm512_setzero_si512(); C];
                for (v, w) in w.iter_mut().enumerate() {
                    *w = _mm512_load_si512(pp.add(s * CB + v));
                }
                for (r, row) in dot.iter_mut().enumerate() {
                    let xb = (xp.add(r * KC + 4 * s) as *const i32).read_unaligned();
                    let xb = _mm512_set1_epi32(xb);
                    for (d, &w) in row.iter_mut().zip(&w) {
                        *d = _mm512_dpbusd_epi32(*d, w, xb);
                    }
                }
            }
        }
        let j = blk / per_group;
        let last = (blk + 1) % per_group == 0;
        // SAFETY: group j < ngrp of NC scales/biases; x scale blk < nblk and group sum
        // j < ngrp of each row r < RR; tile entries r·NC + v·16 + 16 ≤ RR·NC (checked above).
        unsafe {
            for (r, drow) in dot.iter().enumerate() {
                let d = _mm512_set1_ps(*dp.add(r * ds + blk));
                let sum = _mm512_set1_ps(*sp.add(r * ds + j));
                for (v, &dd) in drow.iter().enumerate() {
                    let at = cp.add(r * NC + v * 16);
                    let s = _mm512_loadu_ps(svp.add(j * NC + v * 16));
                    let mut a = _mm512_loadu_ps(at);
                    a = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(dd), s), d, a);
                    if last {
                        a = _mm512_fmadd_ps(_mm512_loadu_ps(bvp.add(j * NC + v * 16)), sum, a);
                    }
                    _mm512_storeu_ps(at, a);
                }
            }
        }
    }
}
