//! AMX-INT8 decode for `y = x·Wᵀ` with a few rows of x (2..16) and bf16 or f16 x and output:
//! `avx512vnni`'s arithmetic on the tile unit, so that the dots cost the same for 16 rows of
//! x as for one.
//!
//! **Arithmetic.** That of [`avx512vnni`](super::x86_vnni): x is split per row and group into
//! signed bytes `hi` and `lo` on a power-of-two grid (`x̂ = (256·hi + lo)·step`, the same
//! split, bit for bit), MLX's unsigned codes are the u8 operand as they are, and the integer
//! dots are exact. Here `tdpbusd` makes them: a tile of 16 rows of W (one group's codes, or
//! half a group of 128) times a tile of x holding, per row `r` of x, `hi` in column `2r` and
//! `lo` in column `2r + 1` (8 rows of x a tile, two tiles for 9..16). Each group's i32 sums
//! are exact in f32 (below 2^24: at most 128 products of `255·128`), and one FMA a row of W
//! adds them times `s·256·step` (hi columns) or `s·step` (lo), another `b·Σx`; a row of the
//! output is the sum of its two columns. So the results are `avx512vnni`'s up to the order of
//! the f32 sums: the same error bound, checked by the same tests.
//!
//! **Streaming.** `avx512vnni` pays two `vpdpbusd` per 64 products and row of x, so 8 rows
//! cost ~3× one; a `tdpbusd` does 16 rows of W × 16 columns × 64 values in one instruction,
//! and what is left per weight (the decode, the per-group scaling) does not grow with the rows
//! of x. A task owns a run of blocks of 16 consecutive rows of W. Per slice of 1024 values of
//! K it decodes the block's 16 rows into an L1 buffer of tile rows `[64-code chunk][row][64
//! codes]` (each A tile 1 KiB at one stride; session 43's trial loaded tiles straight from 16
//! rows side by side, 32 bytes of each a group, and read W at half the stream rate), then runs
//! the slice's groups on the tiles, one group's dots issued while the group before is scaled
//! (two sets of C tiles). Meanwhile it prefetches the next block's rows, consecutive in
//! memory, into L2 a share per group, so the stream from memory stays sequential and the
//! decode reads L2. x is prepared once a call: per 64 (or 32) values of K and tile of x, one B
//! tile in `tdpbusd`'s layout (row `kk` holds four consecutive values of each column), its
//! values in the decoded codes' order ([`perm`]).

use super::qmm::QmmArgs;
use super::x86::{mask16, widen16};
use super::x86_amx::{narrow16, tile, TileConfig};
use super::x86_columns::PrefetchTo;
use super::x86_gemm::{decode64, perm, transpose16};
use super::{DisjointOut, KernelFn, Rows, Variant};
use crate::aligned::{AlignedBytes, Line};
use crate::dtype::Float;
use crate::error::Result;
use std::arch::x86_64::*;
use std::cell::RefCell;
use std::sync::OnceLock;

/// The variant: `quantized_matmul`, transpose, every affine width, bf16 or f16 x and output
/// (`avx512vnni`'s keys), on CPUs with AMX-INT8 whose OS grants the tile state. Any number of
/// rows runs (16 at a time); by default `amx` hands it 2..16.
pub(crate) const QMM_T_AMX_DEC: Variant = Variant {
    name: "amx-dec",
    supports: |k| super::x86_vnni::grid_key(k) && available(),
    decode: None,
    build: |k| {
        use crate::quant::pack::dispatch_bits;
        crate::with_float_type!(k.scales, S => crate::with_float_type!(k.output, O => {
            Some(KernelFn::Qmm(dispatch_bits!(k.bits, B => qmm_t::<S, O, B> as super::qmm::QmmFn,
                _ => return None)))
        }, _ => None), _ => None)
    },
};

/// Rows of x that `amx` hands to this kernel (where `avx512vnni`'s keys run): from 6, below
/// which `avx512vnni` is faster (its dots grow with the rows from a cost at one row near the
/// stream's), to 16, where this kernel beats `avx512vnni` and `amx`'s bf16 tiles (`mlxq
/// bench`, 4096×4096 4- and 8-bit, docs/perf.md session 53).
pub(crate) const ROWS: std::ops::Range<usize> = 6..17;
/// Rows of x a pass: two x tiles of 8 rows.
const SLAB: usize = 16;
/// Values of K decoded at a time: 16 KiB of codes for a block's 16 rows, in L1.
const SLICE: usize = 1024;

/// Whether this CPU has AMX-INT8 and the kernels of `amx` and `avx512vnni` run here.
pub(crate) fn available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        super::x86_vnni::available()
            && super::x86_amx::available()
            && super::x86_amx::has_amx_int8()
    })
}

/// Palettes for tiles of `KC` values of K (see [`Tiles`]): 0, 1, 5, 6 the C tiles (16 rows of
/// W × 16 columns of i32), 2 and 7 the A tiles (16 rows of W × `KC` codes), 3 and 4 the B
/// tiles (`KC/4` rows of four values of 16 columns).
static CONFIG_64: TileConfig = TileConfig::new([64; 8], [16, 16, 16, 16, 16, 16, 16, 16]);
static CONFIG_32: TileConfig = TileConfig::new(
    [64, 64, 32, 64, 64, 64, 64, 32],
    [16, 16, 16, 8, 8, 16, 16, 16],
);

/// x prepared for the tiles (one slab of ≤ 16 rows).
#[derive(Default)]
struct Prepared {
    /// B tiles: `[K / KC][tile][KC/4 rows][64 bytes]`.
    b: AlignedBytes,
    /// Per group and tile, the columns' factors: `256·step` (hi columns), `step` (lo).
    f: Vec<f32>,
    /// Per group and tile, Σx in the hi columns (0 in the lo ones).
    xs: Vec<f32>,
}

/// A task's scratch: the decoded block `[chunk][row][64]`, its scales and biases as f32
/// `[row][group]` (rows padded to whole 16s of groups), the C tiles as stored.
type Scratch = (Vec<Line>, Vec<f32>, Vec<f32>, Vec<Line>);

thread_local! {
    static SCRATCH: RefCell<Scratch> =
        const { RefCell::new((Vec::new(), Vec::new(), Vec::new(), Vec::new())) };
    static PREP: RefCell<Option<Prepared>> = const { RefCell::new(None) };
}

/// The kernel (any number of rows, 16 at a time).
pub(crate) fn qmm_t<S: Float, O: Float, const BITS: usize>(a: QmmArgs<'_>) -> Result<()> {
    super::x86_columns::with_group!(a.w.group_size, G => qmm_t_g::<S, O, BITS, G>(a))
}

fn qmm_t_g<S: Float, O: Float, const BITS: usize, const G: usize>(a: QmmArgs<'_>) -> Result<()> {
    const OP: &str = "quantized_matmul";
    let a = a.operands::<S, O>(OP, true, true)?;
    let (m, n, k) = (a.m, a.rows, a.cols);
    let out = DisjointOut::new(a.out);
    let mut prep = PREP.with(|p| p.borrow_mut().take()).unwrap_or_default();
    for slab in (0..m).step_by(SLAB) {
        let xr = SLAB.min(m - slab);
        let x = &a.x[slab * k..(slab + xr) * k];
        // SAFETY: this variant is only chosen where `available` holds.
        unsafe {
            prepare::<BITS, G>(x, xr, k, &mut prep);
            if xr > 8 {
                run::<S, O, BITS, G, 2>(&a.w, &prep, n, k, slab, xr, &out);
            } else {
                run::<S, O, BITS, G, 1>(&a.w, &prep, n, k, slab, xr, &out);
            }
        }
    }
    PREP.with(|p| *p.borrow_mut() = Some(prep));
    Ok(())
}

/// Values of K per tile (a group, or 64 of a wider one).
const fn kc(g: usize) -> usize {
    if g < 64 {
        g
    } else {
        64
    }
}

/// Splits `xr` rows of x (`x`, `xr × k`) into `p`'s B tiles, factors and sums.
///
/// # Safety
/// [`available`] holds; `x.len() == xr·k`, `1 ≤ xr ≤ 16`, `G` divides `k`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx512dq")]
unsafe fn prepare<const BITS: usize, const G: usize>(
    x: &[f32],
    xr: usize,
    k: usize,
    p: &mut Prepared,
) {
    let kcv = kc(G);
    let nbt = if xr > 8 { 2 } else { 1 };
    let groups = k / G;
    let tile_bytes = kcv * 16;
    let b = p.b.clear_to_zeroed_elems::<u8>(k / kcv * nbt * tile_bytes);
    p.f.clear();
    p.f.resize(groups * nbt * 16, 0.0);
    p.xs.clear();
    p.xs.resize(groups * nbt * 16, 0.0);
    // Position q of a tile row of codes holds value perm(q) of its chunk (for 32-value tiles
    // the first half of a 64-code chunk, which perm keeps within it).
    let idx: [u8; 64] = std::array::from_fn(|q| perm(BITS, q) as u8);
    // SAFETY: a 64-byte array.
    let idx = unsafe { _mm512_loadu_si512(idx.as_ptr() as *const __m512i) };
    // Row 8t + j's hi and lo (zero past xr): columns 2j and 2j + 1 of tile t.
    let (mut his, mut los) = ([[0i8; 128]; 16], [[0i8; 128]; 16]);
    for gi in 0..groups {
        for r in 0..xr {
            let (t, j) = (r / 8, r % 8);
            let (mut step, mut sum) = (0f32, 0f32);
            let xg = &x[r * k + gi * G..r * k + (gi + 1) * G];
            // SAFETY: the caller's contract covers the features.
            unsafe {
                super::x86_vnni::split_group_avx512(
                    xg,
                    &mut step,
                    &mut sum,
                    &mut his[r],
                    &mut los[r],
                )
            };
            let at = (gi * nbt + t) * 16 + 2 * j;
            p.f[at] = 256.0 * step;
            p.f[at + 1] = step;
            p.xs[at] = sum;
        }
        for c in 0..G / kcv {
            for t in 0..nbt {
                let mut v = [_mm512_setzero_si512(); 16];
                for (col, v) in v.iter_mut().enumerate() {
                    let src = if col % 2 == 0 { &his } else { &los };
                    // SAFETY: 64 bytes from c·kcv ≤ 64 lie in the 128-byte array.
                    let raw = unsafe {
                        _mm512_loadu_si512(
                            src[t * 8 + col / 2].as_ptr().add(c * kcv) as *const __m512i
                        )
                    };
                    *v = _mm512_permutexvar_epi8(idx, raw);
                }
                // Row kk of the tile: dword kk (values 4kk..4kk + 4) of every column.
                transpose16(&mut v);
                let at = ((gi * G / kcv + c) * nbt + t) * tile_bytes;
                for (kk, v) in v.iter().take(kcv / 4).enumerate() {
                    // SAFETY: tile `at` of `b` holds kcv/4 rows of 64 bytes.
                    unsafe {
                        _mm512_storeu_si512(b.as_mut_ptr().add(at + 64 * kk) as *mut __m512i, *v)
                    };
                }
            }
        }
    }
}

/// The tiles over every row of W for one slab of x (`xr` rows from row `slab`, in `NBT`
/// tiles of x).
///
/// # Safety
/// [`available`] holds; `p` was prepared for this slab; `w` holds `n` rows of `k` values.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi")]
unsafe fn run<S: Float, O: Float, const BITS: usize, const G: usize, const NBT: usize>(
    w: &Rows<'_, S>,
    p: &Prepared,
    n: usize,
    k: usize,
    slab: usize,
    xr: usize,
    out: &DisjointOut<O>,
) {
    let blocks = n.div_ceil(16);
    // A few tasks per thread, each a run of consecutive blocks (so that a block's tiles can
    // prefetch the next one's rows).
    let per_task = blocks
        .div_ceil(rayon::current_num_threads().max(1) * 8)
        .max(1);
    let b = p.b.bytes();
    super::tasks::for_each(blocks.div_ceil(per_task), |t| {
        SCRATCH.with(|s| {
            let mut s = s.borrow_mut();
            let (buf, sv, bv, cb) = &mut *s;
            let groups = k / G;
            let gpad = groups.next_multiple_of(16);
            buf.resize(SLICE / 64 * 16, Line::ZERO);
            sv.resize(16 * gpad, 0.0);
            bv.resize(16 * gpad, 0.0);
            cb.resize(32, Line::ZERO);
            let cfg = if G < 64 { &CONFIG_32 } else { &CONFIG_64 };
            // SAFETY: the caller's contract; the tiles are configured here and released
            // before the task ends.
            unsafe {
                tile::configure_with(cfg);
                let b0 = t * per_task;
                for blk in b0..(b0 + per_task).min(blocks) {
                    let last = blk + 1 == (b0 + per_task).min(blocks);
                    block::<S, O, BITS, G, NBT>(
                        w,
                        b,
                        p,
                        n,
                        k,
                        blk * 16,
                        !last,
                        slab,
                        xr,
                        buf,
                        sv,
                        bv,
                        cb,
                        out,
                    );
                }
                tile::release();
            }
        })
    });
}

/// One block of 16 rows of W from `row0` (fewer at the end): decoded, then its tiles.
///
/// # Safety
/// As [`run`]; the tiles are configured with this kernel's palette; the scratch is sized
/// as `run` sizes it.
#[allow(clippy::too_many_arguments)]
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi")]
unsafe fn block<S: Float, O: Float, const BITS: usize, const G: usize, const NBT: usize>(
    w: &Rows<'_, S>,
    b: &[u8],
    p: &Prepared,
    n: usize,
    k: usize,
    row0: usize,
    next: bool,
    slab: usize,
    xr: usize,
    buf: &mut [Line],
    sv: &mut [f32],
    bv: &mut [f32],
    cb: &mut [Line],
    out: &DisjointOut<O>,
) {
    let groups = k / G;
    let gpad = groups.next_multiple_of(16);
    let wr = 16.min(n - row0);
    let mut rows: [&[u8]; 16] = [&[]; 16];
    for (r, row) in rows.iter_mut().enumerate().take(wr) {
        let Some((codes, s, bias)) = w.row(row0 + r, 0, groups, BITS) else {
            return;
        };
        *row = codes;
        for j0 in (0..groups).step_by(16) {
            let m = mask16(groups - j0);
            // SAFETY: the masked groups j0.. of the row's scales and biases; 16 floats from
            // r·gpad + j0 ≤ 16·gpad − 16.
            unsafe {
                _mm512_storeu_ps(
                    sv.as_mut_ptr().add(r * gpad + j0),
                    widen16(s.as_ptr().add(j0), m),
                );
                _mm512_storeu_ps(
                    bv.as_mut_ptr().add(r * gpad + j0),
                    widen16(bias.as_ptr().add(j0), m),
                );
            }
        }
    }
    // The next block's rows (consecutive in `packed`), its scales and biases: into L2 while
    // the tiles run, a share per group.
    let nrows = if next { 16.min(n - row0 - 16) } else { 0 };
    let (next_at, next_len) = ((row0 + 16) * w.row_bytes, nrows * w.row_bytes);
    if nrows > 0 {
        let es = std::mem::size_of::<S>();
        for src in [w.scales.as_ptr(), w.biases.as_ptr()] {
            let at = src.wrapping_add((row0 + 16) * groups) as *const u8;
            PrefetchTo::L2.prefetch_lines(at, nrows * groups * es);
        }
    }
    let zero = _mm512_setzero_ps();
    let mut acc = [[zero; 16]; NBT];
    let tiles = Tiles::<G, NBT> {
        a: buf.as_ptr() as *const u8,
        b: b.as_ptr(),
    };
    for k0 in (0..k).step_by(SLICE) {
        let len = SLICE.min(k - k0);
        // The slice's codes, row by row (from L2, where the block before prefetched them),
        // into `buf`'s L1-resident tile rows.
        for (r, &codes) in rows.iter().enumerate().take(wr) {
            let cp = codes.as_ptr().wrapping_add(k0 / 8 * BITS);
            for ch in 0..len / 64 {
                // SAFETY: chunk ch's 8·BITS bytes lie in the row; line ch·16 + r of `buf`.
                unsafe {
                    let v = decode64::<BITS>(cp.add(ch * 8 * BITS), false);
                    _mm512_store_si512(buf[ch * 16 + r].0.as_mut_ptr() as *mut __m512i, v);
                }
            }
            if !len.is_multiple_of(64) {
                let ch = len / 64;
                // SAFETY: the row's last 4·BITS bytes (32 codes).
                unsafe {
                    let v = decode64::<BITS>(cp.add(ch * 8 * BITS), true);
                    _mm512_store_si512(buf[ch * 16 + r].0.as_mut_ptr() as *mut __m512i, v);
                }
            }
        }
        // Group gi's dots go to tile set gi % 2, issued a group ahead of their scaling, so
        // that the tile unit works on one group while the vector units scale the one before.
        let (g0, g1) = (k0 / G, (k0 + len) / G);
        // SAFETY: the tiles are configured; `tiles` reads inside `buf` and `b` (see `issue`).
        unsafe { tiles.issue::<0>(g0, k0) };
        for gi in g0..g1 {
            if nrows > 0 {
                let (from, to) = (next_len * gi / groups, next_len * (gi + 1) / groups);
                PrefetchTo::L2
                    .prefetch_lines(w.packed.as_ptr().wrapping_add(next_at + from), to - from);
            }
            // SAFETY: as above; `cb` holds 32 lines.
            unsafe {
                if (gi - g0) % 2 == 0 {
                    if gi + 1 < g1 {
                        tiles.issue::<1>(gi + 1, k0);
                    }
                    tiles.store::<0>(cb);
                } else {
                    if gi + 1 < g1 {
                        tiles.issue::<0>(gi + 1, k0);
                    }
                    tiles.store::<1>(cb);
                }
            }
            for (t, acc) in acc.iter_mut().enumerate() {
                let at = (gi * NBT + t) * 16;
                // SAFETY: 16 floats at `at` of `f` and `xs` (groups·NBT·16 each); line t·16 + r
                // of `cb`; element r·gpad + gi of `sv` and `bv` (16 rows of gpad).
                unsafe {
                    let f = _mm512_loadu_ps(p.f.as_ptr().add(at));
                    let xs = _mm512_loadu_ps(p.xs.as_ptr().add(at));
                    let (sp, bp) = (sv.as_ptr().add(gi), bv.as_ptr().add(gi));
                    let cp = cb.as_ptr().add(t * 16) as *const __m512i;
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let c = _mm512_cvtepi32_ps(_mm512_load_si512(cp.add(r)));
                        let s = _mm512_set1_ps(*sp.add(r * gpad));
                        let bb = _mm512_set1_ps(*bp.add(r * gpad));
                        *acc = _mm512_fmadd_ps(c, _mm512_mul_ps(f, s), *acc);
                        *acc = _mm512_fmadd_ps(xs, bb, *acc);
                    }
                }
            }
        }
    }
    for (t, acc) in acc.iter().enumerate() {
        let mut v: [__m512i; 16] = std::array::from_fn(|r| _mm512_castps_si512(acc[r]));
        // v[column] now holds that column over the block's 16 rows of W.
        transpose16(&mut v);
        for j in 0..8 {
            let row = 8 * t + j;
            if row >= xr {
                break;
            }
            let y = _mm512_add_ps(
                _mm512_castsi512_ps(v[2 * j]),
                _mm512_castsi512_ps(v[2 * j + 1]),
            );
            let y = narrow16::<O>(y);
            // SAFETY: this task alone writes rows row0..row0 + wr of W's outputs.
            unsafe { out.write_slice((slab + row) * n + row0, &y[..wr]) };
        }
    }
}

/// A block's tile work: A tiles from the decoded block at `a` (`[chunk][row][64]`), B tiles
/// from the prepared x at `b` (`[K / KC][tile of x][KC·16 bytes]`). Two sets of tiles: set 0
/// accumulates in tiles 0 (and 1: the second tile of x), set 1 in 5 (and 6); A goes to 2 or
/// 7, B to 3 (and 4); with one tile of x, set 1's B goes to 4.
struct Tiles<const G: usize, const NBT: usize> {
    a: *const u8,
    b: *const u8,
}

impl<const G: usize, const NBT: usize> Tiles<G, NBT> {
    /// Zeroes set `SET`'s C tiles and adds group `gi`'s dots into them (`a` holding the
    /// slice of K from `k0`).
    ///
    /// # Safety
    /// The tiles are configured with this kernel's palette; `a` holds group `gi`'s chunks
    /// (16 lines each) and `b` its B tiles.
    #[inline(always)]
    unsafe fn issue<const SET: u8>(&self, gi: usize, k0: usize) {
        // SAFETY: the caller's contract.
        unsafe {
            if SET == 0 {
                self.dots::<0, 1, 2, 3, 4>(gi, k0)
            } else if NBT == 1 {
                self.dots::<5, 6, 7, 4, 4>(gi, k0)
            } else {
                self.dots::<5, 6, 7, 3, 4>(gi, k0)
            }
        }
    }

    /// # Safety
    /// As [`Tiles::issue`].
    #[inline(always)]
    unsafe fn dots<const C0: u8, const C1: u8, const A: u8, const B0: u8, const B1: u8>(
        &self,
        gi: usize,
        k0: usize,
    ) {
        let kcv = kc(G);
        let tile_bytes = kcv * 16;
        // SAFETY: the caller's contract.
        unsafe {
            tile::zero::<C0>();
            if NBT == 2 {
                tile::zero::<C1>();
            }
            for c in 0..G / kcv {
                let e = gi * G + c * kcv;
                let ea = e - k0;
                tile::load_strided::<A>(self.a.add((ea / 64) * 1024 + ea % 64), 64);
                let b_at = self.b.add((e / kcv) * NBT * tile_bytes);
                tile::load_strided::<B0>(b_at, 64);
                tile::dpbusd::<C0, A, B0>();
                if NBT == 2 {
                    tile::load_strided::<B1>(b_at.add(tile_bytes), 64);
                    tile::dpbusd::<C1, A, B1>();
                }
            }
        }
    }

    /// Stores set `SET`'s C tiles into `cb` (lines 0..16, and 16..32 for the second tile of
    /// x).
    ///
    /// # Safety
    /// The tiles are configured; `cb` holds 32 lines.
    #[inline(always)]
    unsafe fn store<const SET: u8>(&self, cb: &mut [Line]) {
        let p = cb.as_mut_ptr() as *mut u8;
        // SAFETY: the caller's contract.
        unsafe {
            if SET == 0 {
                tile::store::<0>(p);
                if NBT == 2 {
                    tile::store::<1>(p.add(1024));
                }
            } else {
                tile::store::<5>(p);
                if NBT == 2 {
                    tile::store::<6>(p.add(1024));
                }
            }
        }
    }
}
