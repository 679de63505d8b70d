//! NEON kernels (aarch64, where Advanced SIMD is part of the baseline: nothing to detect).
//!
//! **Decode (`qmv_t`)**: `y = x·Wᵀ` with W `[N, K]` quantized along K, for a block of up to
//! [`ROWS`] rows of x at a time. Each 32-code chunk of a weight row is decoded once into eight
//! `float32x4_t` and used by every row of the block (so for M ≤ 8 each weight byte is read
//! once per call); the scale is applied once per group (`acc += s·Σ x·q`) and the bias through
//! the precomputed Σx (`+ b·Σx`), so the inner loop is one `fmla` per 4 weights per row.
//!
//! Decoding 32 codes, by width (then `ushll`/`ushll2` twice and `ucvtf` to f32):
//! - 8-bit: two loads of 16 bytes; codes arrive in element order.
//! - 4-bit: one load of 16 bytes, `& 0xF` (even elements) and `>> 4` (odd elements). Instead
//!   of zipping the codes back into order, x is permuted once per call into the same
//!   even/odd order (as the AVX-512 kernel does): free for the weights, which dominate.
//! - 2-bit: one load of 8 bytes joined with itself shifted right by 2, then `& 3` and
//!   `>> 4 & 3`: elements `4i`, `4i+1`, `4i+2`, `4i+3` in four runs of 8, x permuted to match.
//! - 1, 3, 5 and 6 bits: the 32 codes are 4 chunks of `BITS` bytes, each read as one
//!   little-endian integer and shifted out into bytes (scalar), then widened as 8-bit codes.
//!
//! Rows of x beyond [`ROWS`] run in further blocks of up to [`ROWS`] rows (every M is
//! supported, so the variant never hands work to another one): a block re-reads the task's
//! weight rows, which a task keeps few enough to stay in cache. There is no blocked GEMM for
//! prefill on ARM yet; this loop is what runs there, and still decodes each chunk once per
//! 8 rows instead of once per row.
//!
//! Accumulation is f32; results equal the generic kernel's up to f32 summation order.

use super::qmm::{QmmArgs, QmmFn};
use super::DisjointOut;
use crate::dtype::Float;
use crate::error::{Error, Result};
use crate::quant::pack::dispatch_bits;
use crate::registry::{KernelKey, OpKind};
use core::arch::aarch64::*;
use rayon::prelude::*;
use std::cell::RefCell;

/// The decode variant: `quantized_matmul` with transpose, every affine width, groups that
/// are a multiple of 32, scales and output of f32, f16 or bf16; every other op and key runs
/// `generic`.
pub(crate) const QMV_T: super::Variant = super::Variant {
    name: "neon",
    supports,
    decode: None,
    build: |k| kernel(k.scales, k.output, k.bits).map(super::KernelFn::Qmm),
};

/// Whether [`QMV_T`] runs `k` (the same set of keys [`kernel`] builds).
fn supports(k: &KernelKey) -> bool {
    let float = |d| {
        matches!(
            d,
            crate::DType::F32 | crate::DType::F16 | crate::DType::BF16
        )
    };
    k.mode == crate::QuantMode::Affine
        && k.op == OpKind::QuantizedMatmul
        && k.flag
        && matches!(k.bits, 1 | 2 | 3 | 4 | 5 | 6 | 8)
        && k.group_size > 0
        && k.group_size.is_multiple_of(32)
        && float(k.scales)
        && float(k.output)
}

/// The decode kernel for scales `scales`, output `out` and `bits`.
fn kernel(scales: crate::DType, out: crate::DType, bits: u32) -> Option<QmmFn> {
    crate::with_float_type!(scales, S => crate::with_float_type!(out, O => {
        Some(dispatch_bits!(bits, B => qmv_t::<S, O, B> as QmmFn, _ => return None))
    }, _ => None), _ => None)
}

/// Rows of x sharing one decoded chunk. Eight rows keep 8 decoded vectors, 8 running sums and
/// 8 group sums within the 32 vector registers.
pub(crate) const ROWS: usize = 8;

const OP: &str = "quantized_matmul";

thread_local! {
    /// Per-thread scratch for the permuted x and its group sums, reused across calls.
    static SCRATCH: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// Whether `BITS`-bit codes decode out of element order, so that x is permuted to match.
const fn permutes(bits: usize) -> bool {
    bits == 2 || bits == 4
}

/// Position, within its 32-element chunk, that element `i` of x moves to for `bits` (the
/// order [`decode32`] leaves the codes in).
#[inline(always)]
fn permuted(bits: usize, i: usize) -> usize {
    match bits {
        // Low nibbles (even elements), then high nibbles (odd elements).
        4 => (i % 2) * 16 + i / 2,
        // Bit pairs 0, 1, 2, 3 of each byte: elements 4i, 4i+1, 4i+2, 4i+3.
        2 => (i % 4) * 8 + i / 4,
        _ => i,
    }
}

/// The decode kernel, `transpose = true`: tasks own disjoint ranges of N, and within a task,
/// each block of up to [`ROWS`] rows of x runs over every column of the range.
fn qmv_t<S: Float, O: Float, const BITS: usize>(a: QmmArgs<'_>) -> Result<()> {
    let w = a.w;
    if w.bits as usize != BITS {
        return Err(Error::invalid(OP, "bits", format!("{BITS}"), w.bits));
    }
    let (k, g) = (w.cols, w.group_size);
    if g == 0 || !g.is_multiple_of(32) || !k.is_multiple_of(g) {
        return Err(Error::invalid(
            OP,
            "group_size",
            format!("a multiple of 32 dividing K = {k}"),
            g,
        ));
    }
    // Everything the raw loads below may touch, checked once.
    let a = a.operands::<S, O>(OP, true, true)?;
    let (m, n) = (a.m, a.rows);
    let (groups, row_bytes) = (a.w.groups, a.w.row_bytes);
    let (scales, biases, out) = (a.w.scales, a.w.biases, a.out);
    if m == 0 || n == 0 {
        return Ok(());
    }
    // Taken out of the thread-local rather than borrowed across the parallel loop: a nested
    // call on this thread (gather_qmm runs experts concurrently) finds it empty and allocates
    // its own, instead of finding it borrowed.
    let (mut xp, mut xsum) = SCRATCH.with(|s| std::mem::take(&mut *s.borrow_mut()));
    xp.clear();
    if permutes(BITS) {
        xp.resize(m * k, 0.0);
        for (src, dst) in a.x.chunks_exact(32).zip(xp.chunks_exact_mut(32)) {
            for (i, &v) in src.iter().enumerate() {
                if let Some(d) = dst.get_mut(permuted(BITS, i)) {
                    *d = v;
                }
            }
        }
    }
    // The m·k elements of x (all there: checked above).
    let x_in = a.x.get(..m * k).unwrap_or_default();
    let x: &[f32] = if permutes(BITS) { &xp } else { x_in };
    // Σx per (row of x, group), shared by every output column.
    xsum.clear();
    xsum.extend(x_in.chunks_exact(g).map(|c| c.iter().sum::<f32>()));
    let writer = DisjointOut::new(out);
    let tasks = (rayon::current_num_threads() * 8).max(1);
    let cols_per_task = n.div_ceil(tasks).max(4);
    let result = (0..n.div_ceil(cols_per_task))
        .into_par_iter()
        .try_for_each(|t| {
            let (n0, n1) = (t * cols_per_task, ((t + 1) * cols_per_task).min(n));
            for r0 in (0..m).step_by(ROWS) {
                let rows = ROWS.min(m - r0);
                for col in n0..n1 {
                    let column = Column {
                        packed: w.packed.get(col * row_bytes..(col + 1) * row_bytes),
                        scales: scales.get(col * groups..(col + 1) * groups),
                        biases: biases.get(col * groups..(col + 1) * groups),
                        x: x.get(r0 * k..),
                        xsum: xsum.get(r0 * groups..),
                        k,
                        groups,
                        g,
                    };
                    let acc = block::<S, BITS>(&column, rows).ok_or_else(|| {
                        Error::unsupported(OP, "a NEON decode block past its buffers")
                    })?;
                    for (r, &v) in acc.iter().enumerate().take(rows) {
                        // SAFETY: task `t` alone owns columns n0..n1 of every row; the index is
                        // below m·n ≤ out.len() (checked above).
                        unsafe { writer.write((r0 + r) * n + col, O::from_f32(v)) };
                    }
                }
            }
            Ok(())
        });
    SCRATCH.with(|s| *s.borrow_mut() = (xp, xsum));
    result
}

/// One output column for a block of rows of x: its packed codes, scales and biases (one per
/// group), and from the block's first row on, the rows of x (`k` apart, permuted where
/// [`permutes`]) and of their group sums (`groups` apart). `None` where the slice was out of
/// range (never, after the checks in [`qmv_t`]).
struct Column<'a, S> {
    packed: Option<&'a [u8]>,
    scales: Option<&'a [S]>,
    biases: Option<&'a [S]>,
    x: Option<&'a [f32]>,
    xsum: Option<&'a [f32]>,
    k: usize,
    groups: usize,
    g: usize,
}

/// [`Column`] with every slice present and long enough for a block of `rows` rows of
/// `BITS`-bit codes: what [`column`] reads through raw pointers.
struct Checked<'a, S> {
    packed: &'a [u8],
    scales: &'a [S],
    biases: &'a [S],
    x: &'a [f32],
    xsum: &'a [f32],
    k: usize,
    groups: usize,
    g: usize,
}

impl<'a, S> Column<'a, S> {
    /// The column's slices, if present and long enough for `rows` rows of `BITS`-bit codes.
    fn checked<const BITS: usize>(&self, rows: usize) -> Option<Checked<'a, S>> {
        let (k, groups, g) = (self.k, self.groups, self.g);
        let len = groups.checked_mul(g)?;
        let c = Checked {
            packed: self.packed?,
            scales: self.scales?,
            biases: self.biases?,
            x: self.x?,
            xsum: self.xsum?,
            k,
            groups,
            g,
        };
        let ok = rows >= 1
            && g.is_multiple_of(32)
            && len <= k
            && c.packed.len() >= len / 32 * 4 * BITS
            && c.scales.len() >= groups
            && c.biases.len() >= groups
            && c.x.len() >= (rows - 1) * k + len
            && c.xsum.len() >= (rows - 1) * groups + groups;
        ok.then_some(c)
    }
}

/// [`column`] for a block of `rows` (1..=[`ROWS`]) rows: the first `rows` sums. `None` if the
/// slices are not what [`Column`] promises or `rows` is out of range.
///
/// Not inlined: its eight bodies are compiled once per scales dtype and width, not again for
/// every output dtype.
#[inline(never)]
fn block<S: Float, const BITS: usize>(c: &Column<'_, S>, rows: usize) -> Option<[f32; ROWS]> {
    let c = c.checked::<BITS>(rows)?;
    let mut acc = [0f32; ROWS];
    // SAFETY: `checked` verified the slice lengths `column` requires for `rows` rows, and
    // NEON is part of every aarch64 target's baseline.
    unsafe {
        match rows {
            1 => column::<S, BITS, 1>(&c, &mut acc),
            2 => column::<S, BITS, 2>(&c, &mut acc),
            3 => column::<S, BITS, 3>(&c, &mut acc),
            4 => column::<S, BITS, 4>(&c, &mut acc),
            5 => column::<S, BITS, 5>(&c, &mut acc),
            6 => column::<S, BITS, 6>(&c, &mut acc),
            7 => column::<S, BITS, 7>(&c, &mut acc),
            8 => column::<S, BITS, 8>(&c, &mut acc),
            _ => return None,
        }
    }
    Some(acc)
}

/// Widens 16 codes (one per byte) exactly to four f32 vectors, in lane order.
#[inline]
#[target_feature(enable = "neon")]
fn widen16(v: uint8x16_t) -> [float32x4_t; 4] {
    let lo = vmovl_u8(vget_low_u8(v));
    let hi = vmovl_high_u8(v);
    [
        vcvtq_f32_u32(vmovl_u16(vget_low_u16(lo))),
        vcvtq_f32_u32(vmovl_high_u16(lo)),
        vcvtq_f32_u32(vmovl_u16(vget_low_u16(hi))),
        vcvtq_f32_u32(vmovl_high_u16(hi)),
    ]
}

/// Decodes the 32 codes of the `4·BITS` bytes at `p` into eight f32 vectors, in the order
/// [`permuted`] gives (see the module docs).
///
/// # Safety
/// `p` must point to `4·BITS` readable bytes.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn decode32<const BITS: usize>(p: *const u8) -> [float32x4_t; 8] {
    // SAFETY (every load): the caller guarantees 4·BITS readable bytes at `p`, and each load
    // reads within them (8-bit: 32 bytes; 4-bit: 16; 2-bit: 8; else 4·BITS copied).
    let (a, b) = unsafe {
        match BITS {
            8 => (vld1q_u8(p), vld1q_u8(p.add(16))),
            4 => {
                let v = vld1q_u8(p);
                (vandq_u8(v, vdupq_n_u8(0xF)), vshrq_n_u8::<4>(v))
            }
            2 => {
                let v = vld1_u8(p);
                let c = vcombine_u8(v, vshr_n_u8::<2>(v));
                let m = vdupq_n_u8(3);
                (vandq_u8(c, m), vandq_u8(vshrq_n_u8::<4>(c), m))
            }
            _ => {
                // Four chunks of 8 codes, each `BITS` bytes read as one little-endian integer.
                let mut raw = [0u8; 32];
                std::ptr::copy_nonoverlapping(p, raw.as_mut_ptr(), 4 * BITS.min(8));
                let mask = (1u64 << BITS.min(8)) - 1;
                let mut codes = [0u8; 32];
                for (c, out) in codes.chunks_exact_mut(8).enumerate() {
                    // c·BITS + 8 ≤ 3·6 + 8 < 32: within `raw`.
                    let v = u64::from_le(std::ptr::read_unaligned(
                        raw.as_ptr().add(c * BITS) as *const u64
                    ));
                    for (j, o) in out.iter_mut().enumerate() {
                        *o = ((v >> (j * BITS)) & mask) as u8;
                    }
                }
                (vld1q_u8(codes.as_ptr()), vld1q_u8(codes.as_ptr().add(16)))
            }
        }
    };
    let (a, b) = (widen16(a), widen16(b));
    [a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3]]
}

/// One output column over all of K for `R` rows of x: `acc[r]` gets row `r`'s result. Rows
/// keep independent partial sums (4 for one or two rows, 2 up to six, else 1) so the `fmla`
/// chains do not wait on themselves.
///
/// # Safety
/// `c` satisfies [`Column::checked`] for `R` rows of `BITS`-bit codes.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn column<S: Float, const BITS: usize, const R: usize>(
    c: &Checked<'_, S>,
    acc: &mut [f32; ROWS],
) {
    let ways = if R <= 2 {
        4
    } else if R <= 6 {
        2
    } else {
        1
    };
    let (k, g, groups) = (c.k, c.g, c.groups);
    let chunk_bytes = 4 * BITS;
    let zero = vdupq_n_f32(0.0);
    let mut vacc = [zero; R];
    let mut bacc = [0f32; R];
    let (pp, xp, xs) = (c.packed.as_ptr(), c.x.as_ptr(), c.xsum.as_ptr());
    for (j, (s, b)) in c.scales.iter().zip(c.biases).enumerate().take(groups) {
        let mut dots = [[zero; 4]; R];
        for ch in 0..g / 32 {
            let e = j * g + ch * 32;
            // SAFETY: chunk e/32 < groups·g/32, each `chunk_bytes` long, lies within `packed`,
            // and r·k + e + 32 ≤ (R − 1)·k + groups·g ≤ x.len() (the caller's contract).
            unsafe {
                let q = decode32::<BITS>(pp.add(e / 32 * chunk_bytes));
                for (r, d) in dots.iter_mut().enumerate() {
                    let px = xp.add(r * k + e);
                    for (i, &qi) in q.iter().enumerate() {
                        let xv = vld1q_f32(px.add(4 * i));
                        d[i % ways] = vfmaq_f32(d[i % ways], qi, xv);
                    }
                }
            }
        }
        let (s, b) = (s.to_f32(), b.to_f32());
        for (r, (v, d)) in vacc.iter_mut().zip(&dots).enumerate() {
            let mut sum = d[0];
            for p in &d[1..ways] {
                sum = vaddq_f32(sum, *p);
            }
            *v = vfmaq_n_f32(*v, sum, s);
            // SAFETY: r·groups + j < (R − 1)·groups + groups ≤ xsum.len() (caller's contract).
            bacc[r] += b * unsafe { *xs.add(r * groups + j) };
        }
    }
    for ((o, &v), &b) in acc.iter_mut().zip(&vacc).zip(&bacc) {
        *o = vaddvq_f32(v) + b;
    }
}
