//! AVX-512 BF16 kernel for `y = x·Wᵀ` when x is bf16 (MLX models' usual activation dtype).
//!
//! A bf16 x times an integer code `q ≤ 255` is exact in f32 (8-bit × 8-bit significands),
//! and `vdpbf16ps` sums such products in f32: the same arithmetic as the f32 path, at twice
//! the multiply-adds per instruction of an f32 FMA and, where the CPU runs it at full width
//! (Zen 5: two a cycle, 64 products), twice the exact products per cycle of `avx512vnni`'s
//! split x (two `vpdpbusd` of 64 products per 64 codes). Like every `vdpbf16ps` user it
//! reads subnormal inputs as zero and flushes subnormal sums: bf16 x below 2^-126 in
//! magnitude counts as 0, far below any output's rounding.
//!
//! **Superblocks**, as in `avx512vnni` ([`x86_vnni`](super::x86_vnni)): four consecutive
//! groups of a weight row decoded together, lane `j` (128 bits) of every code register
//! holding codes of group `j`. [`decode_sb`] gives `g/16` byte registers (16 codes a lane,
//! every width); each becomes two bf16 registers, bytes 0..8 and 8..16 of every lane:
//! - up to 5 bits: `vpunpck{l,h}bw` widens the bytes to words in place and `vpermw` looks
//!   them up in a table of bf16(0..32) (6-bit: `vpermi2w`, 64 entries);
//! - 8 bits: a zero-masked `vpermb` puts the bytes of lanes 0–1 (then 2–3) in dwords,
//!   `vcvtdq2ps` makes them f32 and `vcvtne2ps2bf16` packs both halves back into the same
//!   word positions (exact: q has at most 8 significant bits).
//!
//! x is laid out to match once per call (bf16, per row and superblock, `g/8` registers of
//! 32 words). Per superblock and row the dot products are `g/8` `vdpbf16ps` into one f32
//! accumulator whose lanes `4j..4j + 4` belong to group `j`, then one FMA by the four groups'
//! scales spread over their lanes; the bias terms `b·Σx` take one FMA per 16 groups and row.
//!
//! Work is split into tasks over output columns (cores finish together) and, for several
//! rows of x, into blocks of K so the rows of x a column visits stay in L1.

use super::qmm::QmmArgs;
use super::x86::widen16;
use super::x86_columns::{
    prefetch_groups, prefetch_w, run, Columns, PrefetchTo, Walk, MAX_COLS, MAX_ROWS,
};
use super::x86_vnni::{decode_sb, slot, tables as code_tables, Tables as CodeTables, SB};
use super::{Rows, Variant};
use crate::aligned::AlignedBytes;
use crate::dtype::Float;
use crate::error::Result;
use half::bf16;
use std::arch::x86_64::*;
use std::cell::RefCell;

/// The variant: `quantized_matmul`, transpose, bf16 x, every affine width.
pub(crate) const QMM_T_BF16: Variant = Variant {
    name: "avx512bf16",
    supports: |k| {
        k.mode == crate::QuantMode::Affine
            && k.op == crate::registry::OpKind::QuantizedMatmul
            && k.flag
            && k.input == crate::DType::BF16
            && available()
    },
    decode: None,
    build: |k| {
        use crate::quant::pack::dispatch_bits;
        crate::with_float_type!(k.scales, S => crate::with_float_type!(k.output, O => {
            Some(dispatch_bits!(k.bits, B => super::KernelFn::Qmm(qmm_t::<S, O, B>), _ => return None))
        }, _ => None), _ => None)
    },
};

/// Whether this CPU can run the kernels of this module (the superblock decode is
/// `avx512vnni`'s, compiled with its features).
pub(crate) fn available() -> bool {
    super::x86_vnni::available() && is_x86_feature_detected!("avx512bf16")
}

/// Rows of x sharing one decoded superblock.
const ROWS: usize = 8;
/// Most rows whose dot products take two chains per row (see [`column`]).
const CHAIN2_MAX: usize = 4;
/// Bytes of x one row block may touch per K block: 16 KiB stay in L1 beside the weights
/// streaming through (8 rows × 1024 bf16 values).
const X_BLOCK_BYTES: usize = 16 << 10;
/// The same with one row of x: no blocking (see `avx512vnni`'s `X_BLOCK_BYTES_DECODE`).
const X_BLOCK_BYTES_DECODE: usize = 256 << 10;

/// x prepared for one call: per row and superblock (a row's groups padded with zero groups
/// to whole superblocks) `g/8` registers of 32 bf16 (see [`word_at`]), and Σx per row and
/// group (same padding).
#[derive(Default)]
struct Prepared {
    x: AlignedBytes,
    xsum: Vec<f32>,
}

thread_local! {
    /// The prepared x, reused across calls (taken, not borrowed, so nested calls allocate).
    static SCRATCH: RefCell<Prepared> = RefCell::new(Prepared::default());
}

/// Word of its superblock's registers (`g/8` of 32 words) that element `e` of group 0 of
/// the superblock takes; group `j`'s is `8j` further. Byte `t` of lane `j` of byte register
/// `reg` ([`slot`]) becomes word `t % 8` of lane `j` of bf16 register `2·reg + t/8`.
fn word_at(bits: usize, g: usize, e: usize) -> usize {
    let (reg, t) = slot(bits, g, e);
    (2 * reg + t / 8) * 32 + t % 8
}

/// Lays x (`m × k`, f32 values that came from bf16) out as [`Prepared`] for `bits`, groups
/// of `g` (≤ 128).
fn prepare(x: &[f32], m: usize, k: usize, g: usize, bits: usize, p: &mut Prepared) {
    let groups = k / g;
    let nsb = groups.div_ceil(SB);
    let sb_words = g / 8 * 32;
    let mut pos = [0usize; 128];
    for (e, w) in pos.iter_mut().enumerate().take(g) {
        *w = word_at(bits, g, e);
    }
    let xs = p.x.clear_to_zeroed_elems::<bf16>(m * nsb * sb_words);
    p.xsum.clear();
    p.xsum.resize(m * nsb * SB, 0.0);
    for (row, xr) in x.chunks_exact(k).take(m).enumerate() {
        for (gi, src) in xr.chunks_exact(g).enumerate() {
            let base = (row * nsb + gi / SB) * sb_words + 8 * (gi % SB);
            let dst = &mut xs[base..base + sb_words - 8 * (gi % SB)];
            let mut sum = 0f32;
            for (&v, &w) in src.iter().zip(&pos) {
                // Exact: x came from bf16.
                dst[w] = bf16::from_f32(v);
                sum += v;
            }
            p.xsum[row * nsb * SB + gi] = sum;
        }
    }
}

/// Constant vectors one call needs.
#[derive(Clone, Copy)]
struct Tables {
    /// [`decode_sb`]'s.
    codes: CodeTables,
    /// bf16(i) for i in 0..32 and 32..64.
    lut_lo: __m512i,
    lut_hi: __m512i,
    /// 8-bit: `vpermb` indices putting bytes `8h..8h + 8` of lanes 0–1 (`to_dw[2h]`) or 2–3
    /// (`to_dw[2h + 1]`) in the low byte of 16 dwords.
    to_dw: [__m512i; 4],
}

#[target_feature(enable = "avx512f,avx512bw")]
fn tables<const BITS: usize, const G: usize>() -> Tables {
    let lut: [u16; 64] = std::array::from_fn(|i| bf16::from_f32(i as f32).to_bits());
    let to_dw: [[u8; 64]; 4] = std::array::from_fn(|v| {
        let (h, pair) = (v / 2, v % 2);
        std::array::from_fn(|b| {
            let d = b / 4;
            (16 * (2 * pair + d / 8) + 8 * h + d % 8) as u8
        })
    });
    let v = |a: *const u8| {
        // SAFETY: each caller passes a 64-byte array.
        unsafe { _mm512_loadu_si512(a as *const __m512i) }
    };
    Tables {
        codes: code_tables::<BITS, G>(),
        lut_lo: v(lut.as_ptr() as *const u8),
        lut_hi: v(lut[32..].as_ptr() as *const u8),
        to_dw: to_dw.map(|a| v(a.as_ptr())),
    }
}

/// One byte register of [`decode_sb`] (16 codes a lane) as two bf16 registers: bytes
/// `0..8`, then `8..16`, of every lane, each in word `t % 8` of its lane.
///
/// # Safety
/// The CPU supports [`available`]'s features.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx512vnni,avx512bf16")]
unsafe fn expand<const BITS: usize>(b: __m512i, t: &Tables) -> [__m512bh; 2] {
    // The vector types are 64 plain bytes: the transmutes are reinterpretations. (No
    // closures: they would not inherit this function's target features.)
    unsafe {
        if BITS == 8 {
            const DWORD_LOW_BYTES: __mmask64 = 0x1111_1111_1111_1111;
            let mut f = [_mm512_setzero_ps(); 4];
            for (fi, idx) in f.iter_mut().zip(&t.to_dw) {
                *fi = _mm512_cvtepi32_ps(_mm512_maskz_permutexvar_epi8(DWORD_LOW_BYTES, *idx, b));
            }
            // The low half of the result (lanes 0–1) from the second operand.
            return [
                _mm512_cvtne2ps_pbh(f[1], f[0]),
                _mm512_cvtne2ps_pbh(f[3], f[2]),
            ];
        }
        let z = _mm512_setzero_si512();
        let words = [_mm512_unpacklo_epi8(b, z), _mm512_unpackhi_epi8(b, z)];
        let mut out = [std::mem::transmute::<__m512i, __m512bh>(z); 2];
        for (o, w) in out.iter_mut().zip(words) {
            let v = if BITS == 6 {
                _mm512_permutex2var_epi16(t.lut_lo, w, t.lut_hi)
            } else {
                _mm512_permutexvar_epi16(w, t.lut_lo)
            };
            *o = std::mem::transmute::<__m512i, __m512bh>(v);
        }
        out
    }
}

/// The kernel.
pub(crate) fn qmm_t<S: Float, O: Float, const BITS: usize>(a: QmmArgs<'_>) -> Result<()> {
    super::x86_columns::with_group!(a.w.group_size, G => qmm_t_g::<S, O, BITS, G>(a))
}

fn qmm_t_g<S: Float, O: Float, const BITS: usize, const G: usize>(a: QmmArgs<'_>) -> Result<()> {
    const OP: &str = "quantized_matmul";
    let a = a.operands::<S, O>(OP, true, true)?;
    let (m, n, k) = (a.m, a.rows, a.cols);
    let x_block = if m == 1 {
        X_BLOCK_BYTES_DECODE
    } else {
        X_BLOCK_BYTES
    };
    let walk = Walk::new(m, n, k, G, ROWS, 2, x_block).in_superblocks(SB);
    let mut prep = SCRATCH.with(|s| std::mem::take(&mut *s.borrow_mut()));
    prepare(a.x, m, k, G, BITS, &mut prep);
    let stream = m <= 4;
    let kernel = Kernel::<S, BITS, G> {
        w: a.w,
        prep: &prep,
        nsb: (k / G).div_ceil(SB),
        // SAFETY: this variant is only chosen where `available` holds.
        tables: unsafe { tables::<BITS, G>() },
        prefetch: if stream {
            PrefetchTo::stream(m)
        } else {
            PrefetchTo::L1
        },
        stream,
    };
    // SAFETY: as for `tables`.
    unsafe { run(&kernel, walk, a.out) };
    SCRATCH.with(|s| *s.borrow_mut() = prep);
    Ok(())
}

/// Everything one call's columns read.
struct Kernel<'a, S, const BITS: usize, const G: usize> {
    w: Rows<'a, S>,
    prep: &'a Prepared,
    /// Superblocks per row of x.
    nsb: usize,
    tables: Tables,
    /// Where W's prefetches go.
    prefetch: PrefetchTo,
    /// Whether W streams at the memory's pace (few rows): scales and biases are prefetched.
    stream: bool,
}

impl<S: Float, const BITS: usize, const G: usize> Columns for Kernel<'_, S, BITS, G> {
    const ROWS: usize = ROWS;
    const COLS: usize = 1;

    unsafe fn columns<const R: usize>(
        &self,
        col: usize,
        _count: usize,
        g0: usize,
        g1: usize,
        row0: usize,
        acc: &mut [[f32; MAX_ROWS]; MAX_COLS],
    ) {
        let Some((packed, scales, biases)) = self.w.row(col, g0, g1, BITS) else {
            return;
        };
        let args = Column {
            packed,
            scales,
            biases,
            prep: self.prep,
            row0,
            g0,
            nsb: self.nsb,
            tables: &self.tables,
            row_bytes: self.w.row_bytes,
            prefetch: self.prefetch,
            stream: self.stream,
        };
        // SAFETY: the caller guarantees the CPU features; `column` checks the slices.
        unsafe { column::<S, BITS, G, R>(&args, &mut acc[0]) }
    }
}

/// One column's slice of K (groups `g0..g0 + scales.len()`) for rows `row0..row0 + R` of x.
struct Column<'a, S> {
    packed: &'a [u8],
    scales: &'a [S],
    biases: &'a [S],
    prep: &'a Prepared,
    row0: usize,
    g0: usize,
    nsb: usize,
    tables: &'a Tables,
    /// Bytes from one weight row to the next.
    row_bytes: usize,
    prefetch: PrefetchTo,
    stream: bool,
}

/// `acc[r] = Σ over this K slice of x[row0 + r]·ŵ`, for `R` rows.
///
/// # Safety
/// The CPU must support [`available`]'s features.
// Index loops: each step reads the same row of several register arrays (accumulators, x
// pointers), which iterators over one of them would only obscure.
#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx512vnni,avx512bf16")]
unsafe fn column<S: Float, const BITS: usize, const G: usize, const R: usize>(
    a: &Column<'_, S>,
    acc: &mut [f32; MAX_ROWS],
) {
    // Byte registers of a superblock, bf16 registers of x per row and superblock.
    let (nb, nx) = (G / 16, G / 8);
    let bpg = G / 8 * BITS;
    let groups = a.scales.len();
    let (nsb, g0) = (a.nsb, a.g0);
    let rows_end = a.row0 + R;
    if a.biases.len() < groups
        || a.packed.len() < groups * bpg
        || !g0.is_multiple_of(SB)
        || g0 + groups > nsb * SB
        || a.prep.x.elems::<bf16>().len() < rows_end * nsb * nx * 32
        || a.prep.xsum.len() < rows_end * nsb * SB
        || !(2..=8).contains(&nb)
    {
        return;
    }
    let t = a.tables;
    let zero = _mm512_setzero_ps();
    let mut vacc = [zero; R];
    let (xp, xsum) = (
        a.prep.x.elems::<bf16>().as_ptr() as *const __m512bh,
        a.prep.xsum.as_ptr(),
    );
    let pp = a.packed.as_ptr();
    let len = groups * bpg;
    // Lane 4j + u of a superblock's scales: group j's (of the current four).
    let spread4 = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    for j0 in (0..groups).step_by(16) {
        let valid16 = (groups - j0).min(16);
        let m16: __mmask16 = ((1u32 << valid16) - 1) as u16;
        if a.stream {
            prefetch_groups(a.scales, a.biases, j0, len, a.row_bytes, 1, a.prefetch);
        }
        // SAFETY: groups j0..j0 + valid16 of this slice are in `scales`/`biases`, and of
        // rows row0..row0 + R in `xsum` (all checked above).
        let s16 = unsafe {
            let b = widen16(a.biases.as_ptr().add(j0), m16);
            for r in 0..R {
                let at = (a.row0 + r) * nsb * SB + g0 + j0;
                let xs = _mm512_maskz_loadu_ps(m16, xsum.add(at));
                vacc[r] = _mm512_fmadd_ps(b, xs, vacc[r]);
            }
            widen16(a.scales.as_ptr().add(j0), m16)
        };
        for q in 0..valid16.div_ceil(SB) {
            let jb = j0 + q * SB;
            let valid = (groups - jb).min(SB);
            let sbi = (g0 + jb) / SB;
            let sv = _mm512_permutexvar_ps(
                _mm512_add_epi32(spread4, _mm512_set1_epi32(4 * q as i32)),
                s16,
            );
            let off = jb * bpg;
            for l in (0..SB * bpg).step_by(64) {
                prefetch_w(pp, off + l, len, a.row_bytes, 1, a.prefetch);
            }
            // SAFETY: groups jb..jb + valid of this slice lie in `packed` (checked).
            let codes = unsafe {
                if valid == SB {
                    decode_sb::<BITS, G, true>(pp.add(off), valid, &t.codes)
                } else {
                    decode_sb::<BITS, G, false>(pp.add(off), valid, &t.codes)
                }
            };
            // Superblock sbi of rows row0.. (checked above).
            let px: [*const __m512bh; R] =
                std::array::from_fn(|r| xp.wrapping_add(((a.row0 + r) * nsb + sbi) * nx));
            // With few rows, even and odd registers take separate chains: g/8 dependent
            // `vdpbf16ps` per superblock would otherwise outlast the work that overlaps them.
            let mut d = [[zero; R]; 2];
            for i in 0..nb {
                // SAFETY: the CPU features (caller); registers 2i, 2i + 1 < nx of each row's
                // superblock lie in the prepared x.
                unsafe {
                    let k2 = expand::<BITS>(codes[i], t);
                    for (h, kh) in k2.into_iter().enumerate() {
                        let chain = if R <= CHAIN2_MAX { h } else { 0 };
                        for r in 0..R {
                            let xv = px[r].add(2 * i + h).read_unaligned();
                            d[chain][r] = _mm512_dpbf16_ps(d[chain][r], kh, xv);
                        }
                    }
                }
            }
            for r in 0..R {
                let dr = if R <= CHAIN2_MAX {
                    _mm512_add_ps(d[0][r], d[1][r])
                } else {
                    d[0][r]
                };
                vacc[r] = _mm512_fmadd_ps(dr, sv, vacc[r]);
            }
        }
    }
    for r in 0..R {
        acc[r] = _mm512_reduce_add_ps(vacc[r]);
    }
}
