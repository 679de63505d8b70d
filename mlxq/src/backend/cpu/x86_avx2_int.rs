//! AVX2 kernel for `y = x·Wᵀ` with bf16 or f16 x and output on CPUs without AVX-512 (Zen 2/3,
//! Intel client cores): integer dot products on the codes, at f32-path accuracy.
//!
//! **x on a 16-bit grid.** Each row of x is rounded, per quantization group, to integers on a
//! power-of-two grid: with `e` the smallest exponent such that `max|x_g| ≤ 127·2^e` (the
//! grid [`avx512vnni`](super::x86_vnni) splits x on),
//!
//! `x ≈ x̂ = X·2^(e−8)`, `X = round(x·2^(8−e))`, `|X| ≤ 32512`,
//!
//! which is that kernel's `256·hi + lo`: the same x̂, so the same bound `|x − x̂| ≤ 2^(e−9) <
//! max|x_g|/32512`, and a bf16 element within a factor 127 of its group's largest (an f16 one
//! within 15.9) is exact. The error is far below the rounding of a bf16 or f16 output, which is
//! why only those outputs take this kernel; Σx for the bias term is the f32 sum of the exact
//! x.
//!
//! **Dot products.** Each chunk of codes is taken apart into planes of 16 words, one code per
//! word (x permuted to match, [`permuted`]): 1-, 2-, 4- and 8-bit codes as loaded, by a shift
//! and a mask per plane; 3-, 5- and 6-bit codes after one byte shuffle per plane pair, which
//! puts two codes with the same bit offset in each dword, so that one dword shift (`vpsrlvd`)
//! and a mask extract both (session 27: 1.4–2.3× faster than widening them through bytes).
//! `vpmaddwd` multiplies the planes by X and adds pairs into i32 lanes: exact, as `q·|X| ≤
//! 255·32512 < 2^23` and a lane sums at most 16 products per group of 128. Per group, one
//! conversion and one FMA apply `s·2^(e−8)`; the bias term `b·Σx` is one FMA per 8 groups.
//! Against the f32 path (`avx2`: a conversion and an FMA per 8 weights) this is 2–3
//! instructions per 16 weights at 4 bits, and no conversion per weight.

use super::qmm::QmmArgs;
use super::x86_avx2::{available, hsum8, widen8};
use super::x86_columns::{
    groups_ahead, prefetch_groups_at, prefetch_w, run, Columns, PrefetchTo, Walk, MAX_COLS,
    MAX_ROWS, PREFETCH_AHEAD,
};
use super::x86_vnni::{grid_exponent, grid_key, pow2, round};
use super::{Rows, Variant};
use crate::aligned::AlignedBytes;
use crate::dtype::Float;
use crate::error::{Error, Result};
use rayon::prelude::*;
use std::arch::x86_64::*;
use std::cell::RefCell;

/// The variant: `quantized_matmul`, transpose, bf16 or f16 x and output, every affine width.
///
/// An f32 output asks for a relative error of 1e-5, which x̂'s error can reach when a group's
/// x spans more than 2^7; those keys go to the f32 kernels.
pub(crate) const QMM_T_AVX2_INT: Variant = Variant {
    name: "avx2i16",
    supports: |k| grid_key(k) && available(),
    decode: None,
    build: |k| {
        use crate::quant::pack::dispatch_bits;
        crate::with_float_type!(k.scales, S => crate::with_float_type!(k.output, O => {
            Some(dispatch_bits!(k.bits, B => super::KernelFn::Qmm(qmm_t::<S, O, B>), _ => return None))
        }, _ => None), _ => None)
    },
};

/// Rows of x sharing one decoded chunk: 16 ymm registers hold a chunk's code words, and per
/// row a group sum and an accumulator.
const ROWS: usize = 4;
/// Bytes of x one row block may touch per K block: half of a Zen 3 core's L2, so K is cut
/// only past 32768 elements at four rows. Every column reads its block of x from L2 if need
/// be; blocking K at 24 KiB to keep x in L1 (as before session 45) cut each weight row's
/// stream into pieces and cost 5–17% at M = 8..16 on a Zen 3 VM (docs/perf.md, session 45).
const X_BLOCK_BYTES: usize = 256 << 10;
/// Elements of x up to which [`prepare`] runs on the calling thread alone.
const SEQUENTIAL: usize = 1 << 14;

/// Elements of one code chunk: what one 32-byte load of 1-, 2-, 4- or 8-bit codes holds (256,
/// 128, 64, 32), 64 codes of 3 bits (24 bytes) or 32 of 5 or 6 bits (20, 24 bytes). A chunk
/// decodes into [`planes_of`] vectors of 16 words, one code per word.
const fn chunk(bits: usize) -> usize {
    match bits {
        1 => 256,
        2 => 128,
        3 | 4 => 64,
        _ => 32,
    }
}

/// Vectors of 16 words (planes) one chunk decodes into.
const fn planes_of(bits: usize) -> usize {
    chunk(bits) / 16
}

/// Bytes of codes in one chunk.
const fn chunk_bytes(bits: usize) -> usize {
    chunk(bits) / 8 * bits
}

/// Where element `i` of a chunk lies in X: plane `p` (16 words) holds the codes whose x lie at
/// `16p..16p + 16`.
///
/// - 1, 2, 4, 8 bits: word `t` of the loaded chunk holds elements `c·t..c·t + c` (`c = 16 /
///   bits` per word); plane `p` takes the `p`-th of each word's.
/// - 3, 5, 6 bits: a byte shuffle gives each word one code (3-bit: two neighbouring ones) of its
///   128-bit lane `L`, placed so that the two words of a dword share the code's bit offset (a
///   dword shift then serves both); word `2d + h` of a lane holds, for 3 bits, in shuffle `v`,
///   codes `2a`, `2a + 1` (`a = d + 4h`) of the chunk's `32L + 16v..+ 16` (plane `2v + p`
///   takes code `2a + p`: lane `L` is the chunk's group `L` at groups of 32); for 5 bits, in
///   plane `v`, code `4v + d + 8h` of the lane's 16; for 6 bits, in plane `v` (the chunk's
///   codes `16v..16v + 16`), code `d + 4h` of the lane's 8.
#[inline(always)]
const fn permuted(bits: usize, i: usize) -> usize {
    const fn word(l: usize, d: usize, h: usize) -> usize {
        8 * l + 2 * d + h
    }
    match bits {
        3 => {
            let (l, v, r) = (i / 32, i / 16 % 2, i % 16);
            let a = r / 2;
            16 * (2 * v + r % 2) + word(l, a % 4, a / 4)
        }
        5 => {
            let (l, r) = (i / 16, i % 16);
            let e = r % 8;
            16 * (e / 4) + word(l, e % 4, r / 8)
        }
        6 => {
            let (v, r) = (i / 16, i % 16);
            let a = r % 8;
            16 * v + word(r / 8, a % 4, a / 4)
        }
        _ => {
            let c = 16 / bits;
            16 * (i % c) + i / c
        }
    }
}

/// The byte shuffle (`vpshufb` indices) and dword shifts that place a 3-, 5- or 6-bit chunk's
/// codes as [`permuted`] says, for shuffle `which`: 3 bits, the chunk's 24 bytes as bytes
/// 0..16 and 8..24 in the two lanes; 5 bits, its 20 bytes as bytes 0..16 and 4..20; 6 bits,
/// plane `which`'s 12 bytes broadcast from byte 0 or 8 of the chunk. Each word takes the two bytes that hold
/// its code (the second zero where the code ends in the first and the next byte lies past
/// its lane's codes); the shift is that code's bit offset in its first byte.
const fn layout(bits: usize, which: usize) -> ([u8; 32], [i32; 8]) {
    let (mut idx, mut shift) = ([0u8; 32], [0i32; 8]);
    let lane_bytes = if bits == 5 { 10 } else { 6 };
    let mut l = 0;
    while l < 2 {
        let base = match bits {
            3 => 6 * which + 4 * l,
            5 => 6 * l,
            _ => 6 * l + 4 * which,
        };
        let mut d = 0;
        while d < 4 {
            let mut h = 0;
            while h < 2 {
                let c = match bits {
                    3 => 2 * (d + 4 * h),
                    5 => 4 * which + d + 8 * h,
                    _ => d + 4 * h,
                };
                let (b, s) = (c * bits / 8, (c * bits % 8) as i32);
                let o = 16 * l + 4 * d + 2 * h;
                idx[o] = (base + b) as u8;
                idx[o + 1] = if b + 1 < lane_bytes {
                    (base + b + 1) as u8
                } else {
                    0x80
                };
                assert!(
                    h == 0 || shift[4 * l + d] == s,
                    "a dword's codes share their shift"
                );
                shift[4 * l + d] = s;
                h += 1;
            }
            d += 1;
        }
        l += 1;
    }
    (idx, shift)
}

const L3: [([u8; 32], [i32; 8]); 2] = [layout(3, 0), layout(3, 1)];
const L5: [([u8; 32], [i32; 8]); 2] = [layout(5, 0), layout(5, 1)];
const L6: [([u8; 32], [i32; 8]); 2] = [layout(6, 0), layout(6, 1)];
/// 3-bit planes `2v` and `2v + 1`: the shifts of the pair's first and second code.
const S3: [[i32; 8]; 2] = {
    let mut s = [L3[0].1, L3[0].1];
    let mut i = 0;
    while i < 8 {
        s[1][i] += 3;
        i += 1;
    }
    s
};

/// Row length of X: `k` padded to whole chunks (the padding is zero).
fn padded(k: usize, bits: usize) -> usize {
    k.div_ceil(chunk(bits)) * chunk(bits)
}

/// x prepared for one call: X (`m` rows of [`padded`]`(k, BITS)` i16, each chunk in [`permuted`]
/// order), and per row and group the step `2^(e−8)` and Σx.
#[derive(Default)]
struct Prepared {
    x: AlignedBytes,
    step: Vec<f32>,
    xsum: Vec<f32>,
}

thread_local! {
    /// The prepared x, reused across calls (taken, not borrowed, so nested calls allocate).
    static SCRATCH: RefCell<Prepared> = RefCell::new(Prepared::default());
}

/// Rounds x (`m × k`, groups of `g`) onto its groups' grids into `p`.
fn prepare<const BITS: usize>(x: &[f32], m: usize, k: usize, g: usize, p: &mut Prepared) {
    let (groups, kp) = (k / g, padded(k, BITS));
    p.step.clear();
    p.step.resize(m * groups, 0.0);
    p.xsum.clear();
    p.xsum.resize(m * groups, 0.0);
    let xq = p.x.clear_to_zeroed_elems::<i16>(m * kp);
    let min_len = if m * k <= SEQUENTIAL { usize::MAX } else { 1 };
    let fast = available() && g <= 128;
    // 4 and 8 bits: each row in element order, then its chunks permuted in place by
    // shuffles; other widths: each group scattered through the permutation table.
    let in_place = fast && (BITS == 4 || BITS == 8);
    xq.par_chunks_mut(kp)
        .zip(x.par_chunks(k))
        .zip(
            p.step
                .par_chunks_mut(groups)
                .zip(p.xsum.par_chunks_mut(groups)),
        )
        .with_min_len(min_len)
        .for_each(|((out, xr), (step, xsum))| {
            let mut tmp = [0i16; 128];
            for (j, xg) in xr.chunks_exact(g).enumerate() {
                if in_place {
                    // SAFETY: `available()` holds (`fast`).
                    (step[j], xsum[j]) =
                        unsafe { grid_group_avx2(xg, &mut out[j * g..(j + 1) * g]) };
                    continue;
                }
                let t = &mut tmp[..g.min(128)];
                (step[j], xsum[j]) = if fast {
                    // SAFETY: `available()` holds.
                    unsafe { grid_group_avx2(xg, t) }
                } else {
                    grid_group(xg, t)
                };
                scatter::<BITS>(t, j * g, out);
            }
            if in_place {
                // SAFETY: `available()` holds (`fast`).
                unsafe { permute_chunks::<BITS>(out) };
            }
        });
}

/// Puts every chunk of a row of X (`out`, whole chunks) from element order into
/// [`permuted`] order, in place, for 4- and 8-bit codes (other widths: nothing): per 128-bit
/// lane one byte shuffle gathers each plane's words into a dword (4 bits) or qword (8 bits),
/// and a transpose of those across the chunk's lanes completes the planes. ~16 instructions
/// per 64 elements where [`scatter`] takes a store and its address per element.
///
/// # Safety
/// The CPU has AVX2.
#[target_feature(enable = "avx2")]
unsafe fn permute_chunks<const BITS: usize>(out: &mut [i16]) {
    let ch = chunk(BITS);
    for c in out.chunks_exact_mut(ch) {
        let p = c.as_mut_ptr() as *mut __m256i;
        // SAFETY: a chunk is 2 (8 bits) or 4 (4 bits) vectors of 16 i16, read then written.
        unsafe {
            match BITS {
                4 => {
                    // Words [e0 e4 e1 e5 e2 e6 e3 e7] per lane: dword d = plane d's two words.
                    let idx = _mm256_setr_epi8(
                        0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15, 0, 1, 8, 9, 2, 3, 10,
                        11, 4, 5, 12, 13, 6, 7, 14, 15,
                    );
                    let v: [__m256i; 4] = std::array::from_fn(|i| {
                        _mm256_shuffle_epi8(_mm256_loadu_si256(p.add(i)), idx)
                    });
                    let (t0, t1) = (
                        _mm256_unpacklo_epi32(v[0], v[1]),
                        _mm256_unpackhi_epi32(v[0], v[1]),
                    );
                    let (t2, t3) = (
                        _mm256_unpacklo_epi32(v[2], v[3]),
                        _mm256_unpackhi_epi32(v[2], v[3]),
                    );
                    // Plane d, lane L: dword d of vectors 0..4's lane L; lanes interleaved last.
                    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
                    let planes = [
                        _mm256_unpacklo_epi64(t0, t2),
                        _mm256_unpackhi_epi64(t0, t2),
                        _mm256_unpacklo_epi64(t1, t3),
                        _mm256_unpackhi_epi64(t1, t3),
                    ];
                    for (i, q) in planes.into_iter().enumerate() {
                        _mm256_storeu_si256(p.add(i), _mm256_permutevar8x32_epi32(q, order));
                    }
                }
                8 => {
                    // Words [e0 e2 e4 e6 e1 e3 e5 e7] per lane: qword 0 even, qword 1 odd.
                    let idx = _mm256_setr_epi8(
                        0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15, 0, 1, 4, 5, 8, 9, 12,
                        13, 2, 3, 6, 7, 10, 11, 14, 15,
                    );
                    let a = _mm256_shuffle_epi8(_mm256_loadu_si256(p), idx);
                    let b = _mm256_shuffle_epi8(_mm256_loadu_si256(p.add(1)), idx);
                    let even =
                        _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_unpacklo_epi64(a, b));
                    let odd =
                        _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_unpackhi_epi64(a, b));
                    _mm256_storeu_si256(p, even);
                    _mm256_storeu_si256(p.add(1), odd);
                }
                _ => return,
            }
        }
    }
}

/// [`permuted`] for every position of a chunk of `bits`-bit codes (at most 256).
const fn permutation(bits: usize) -> [u8; 256] {
    let mut p = [0u8; 256];
    let mut i = 0;
    while i < chunk(bits) {
        p[i] = permuted(bits, i) as u8;
        i += 1;
    }
    p
}

/// Writes one group's X, `t` (elements `at0..at0 + t.len()` of the row), into the row's
/// chunks `out` in [`permuted`] order. The chunk size and the permutation are constants here:
/// computed per element at run time (a division by the captured chunk size, and the
/// permutation's arithmetic), this loop took ~5 µs of a 4096-long row on a Zen 3 core, as
/// long as ~300 columns' dot products (docs/perf.md, session 44).
#[inline(always)]
fn scatter<const BITS: usize>(t: &[i16], at0: usize, out: &mut [i16]) {
    let ch = const { chunk(BITS) };
    let perm = const { &permutation(BITS) };
    for (i, &v) in t.iter().enumerate() {
        let at = at0 + i;
        out[at / ch * ch + perm[at % ch] as usize] = v;
    }
}

/// One group's X (in element order), step `2^(e−8)` and Σx: the definition of the grid.
/// Non-finite elements become 0 on the grid; they still reach the output through Σx in the
/// bias term, as NaN or ∞.
fn grid_group(xg: &[f32], out: &mut [i16]) -> (f32, f32) {
    let max = xg
        .iter()
        .filter(|v| v.is_finite())
        .fold(0f32, |a, v| a.max(v.abs()));
    let e = grid_exponent(max);
    let inv = pow2(8 - e);
    for (o, &v) in out.iter_mut().zip(xg) {
        // f64: the product by a power of two is exact whatever e is; |X| ≤ 32512.
        let v = if v.is_finite() { v as f64 } else { 0.0 };
        *o = round(v * inv) as i16;
    }
    (pow2(e - 8) as f32, xg.iter().sum())
}

/// [`grid_group`] with AVX2, bit for bit the same X and step (Σx may differ in its last bits:
/// another summation order). f32 suffices where `2^(8−e)` is a normal f32 (|e| ≤ 100): the
/// product is then exact, or so small that it rounds to 0 either way; other groups (and
/// lengths that are not a multiple of 16) take [`grid_group`].
///
/// # Safety
/// The CPU has AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
unsafe fn grid_group_avx2(xg: &[f32], out: &mut [i16]) -> (f32, f32) {
    let g = xg.len();
    if !g.is_multiple_of(16) || out.len() < g {
        return grid_group(xg, out);
    }
    let p = xg.as_ptr();
    let (inf, sign) = (_mm256_set1_ps(f32::INFINITY), _mm256_set1_ps(-0.0));
    // Finite elements of the 8 at `at` (the others 0).
    let finite = |at: usize| {
        // SAFETY: at + 8 ≤ g elements of `xg`.
        let v = unsafe { _mm256_loadu_ps(p.add(at)) };
        let keep = _mm256_cmp_ps::<_CMP_LT_OQ>(_mm256_andnot_ps(sign, v), inf);
        (v, _mm256_and_ps(v, keep))
    };
    let (mut sum, mut max) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    for at in (0..g).step_by(8) {
        let (v, f) = finite(at);
        sum = _mm256_add_ps(sum, v);
        max = _mm256_max_ps(max, _mm256_andnot_ps(sign, f));
    }
    let lanes = |v: __m256| -> [f32; 8] {
        // SAFETY: `__m256` and `[f32; 8]` have the same size, and every bit pattern is valid.
        unsafe { std::mem::transmute(v) }
    };
    let xsum: f32 = lanes(sum).iter().sum();
    let e = grid_exponent(lanes(max).iter().fold(0f32, |a, &b| a.max(b)));
    if e.abs() > 100 {
        let (step, _) = grid_group(xg, out);
        return (step, xsum);
    }
    let inv = _mm256_set1_ps(pow2(8 - e) as f32);
    for at in (0..g).step_by(16) {
        // Round to nearest, ties to even (MXCSR's default, which Rust never changes).
        let a = _mm256_cvtps_epi32(_mm256_mul_ps(finite(at).1, inv));
        let b = _mm256_cvtps_epi32(_mm256_mul_ps(finite(at + 8).1, inv));
        // `packs` interleaves the lanes: [a0 b0 | a1 b1] → [a0 a1 b0 b1]; |X| ≤ 32512.
        let w = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packs_epi32(a, b));
        // SAFETY: at + 16 ≤ g ≤ out.len().
        unsafe { _mm256_storeu_si256(out.as_mut_ptr().add(at) as *mut __m256i, w) };
    }
    (pow2(e - 8) as f32, xsum)
}

/// The kernel.
pub(crate) fn qmm_t<S: Float, O: Float, const BITS: usize>(a: QmmArgs<'_>) -> Result<()> {
    super::x86_columns::with_group!(a.w.group_size, G => qmm_t_g::<S, O, BITS, G>(a))
}

fn qmm_t_g<S: Float, O: Float, const BITS: usize, const G: usize>(a: QmmArgs<'_>) -> Result<()> {
    const OP: &str = "quantized_matmul";
    if !available() {
        return Err(Error::unsupported(
            OP,
            "the avx2i16 kernel on a CPU without AVX2, FMA and F16C",
        ));
    }
    let a = a.operands::<S, O>(OP, true, true)?;
    let (m, n, k) = (a.m, a.rows, a.cols);
    let mut walk = Walk::new(m, n, k, G, ROWS, 2, X_BLOCK_BYTES);
    // K blocks of whole chunks (a chunk of 4-bit codes holds two groups of 32).
    let per = (chunk(BITS) / G).max(1);
    walk.block_groups = walk.block_groups.div_ceil(per) * per;
    let mut prep = SCRATCH.with(|s| std::mem::take(&mut *s.borrow_mut()));
    prepare::<BITS>(a.x, m, k, G, &mut prep);
    let kernel = Kernel::<S, BITS, G> {
        w: a.w,
        x: prep.x.elems(),
        step: &prep.step,
        xsum: &prep.xsum,
        kp: padded(k, BITS),
    };
    // SAFETY: `available()` holds (checked above).
    unsafe { run(&kernel, walk, a.out) };
    SCRATCH.with(|s| *s.borrow_mut() = prep);
    Ok(())
}

/// Everything one call's columns read.
struct Kernel<'a, S, const BITS: usize, const G: usize> {
    w: Rows<'a, S>,
    x: &'a [i16],
    step: &'a [f32],
    xsum: &'a [f32],
    /// Row length of X.
    kp: usize,
}

impl<S: Float, const BITS: usize, const G: usize> Columns for Kernel<'_, S, BITS, G> {
    const ROWS: usize = ROWS;
    const COLS: usize = 1;

    unsafe fn columns<const R: usize>(
        &self,
        col: usize,
        count: usize,
        g0: usize,
        g1: usize,
        row0: usize,
        acc: &mut [[f32; MAX_ROWS]; MAX_COLS],
    ) {
        if count == 0 {
            return;
        }
        let Some(c) = self.column_at(col, g0, g1, row0, self.ahead(g0, g1)) else {
            return;
        };
        // SAFETY: the caller guarantees the CPU features; `column` checks the slices.
        if let Some(v) = unsafe { column::<S, BITS, G, R>(&c) } {
            acc[0][..R].copy_from_slice(&v);
        }
    }

    /// One call for the task's columns (M = 1): a call per column, with its setup and
    /// checks, cost as much as a fifth of a 4096-long row's dot product.
    unsafe fn row_run(
        &self,
        cols: std::ops::Range<usize>,
        g0: usize,
        g1: usize,
        row0: usize,
        acc: &mut [f32],
    ) {
        // SAFETY: the caller guarantees the CPU features.
        unsafe { row_run::<S, BITS, G>(self, cols, g0, g1, row0, acc) }
    }
}

impl<'a, S: Float, const BITS: usize, const G: usize> Kernel<'a, S, BITS, G> {
    /// [`groups_ahead`] for the slices of groups `g0..g1` (two divisions: once per slice
    /// or per run of columns, not per block of groups).
    fn ahead(&self, g0: usize, g1: usize) -> usize {
        let groups = g1.saturating_sub(g0);
        groups_ahead(groups, groups * (G / 8 * BITS), self.w.row_bytes, 1)
    }

    /// Weight row `col`'s groups `g0..g1` against rows `row0..` of x (`None` where a slice
    /// is out of range); `ahead` is [`groups_ahead`] for the slice.
    fn column_at(
        &self,
        col: usize,
        g0: usize,
        g1: usize,
        row0: usize,
        ahead: usize,
    ) -> Option<Column<'a, S>> {
        let groups = self.w.groups;
        let (packed, scales, biases) = self.w.row(col, g0, g1, BITS)?;
        Some(Column {
            packed,
            scales,
            biases,
            x: self.x.get(row0 * self.kp + g0 * G..)?,
            step: self.step.get(row0 * groups + g0..)?,
            xsum: self.xsum.get(row0 * groups + g0..)?,
            kp: self.kp,
            groups,
            row_bytes: self.w.row_bytes,
            groups_ahead: ahead,
        })
    }
}

/// [`Columns::row_run`]: `acc[i] +=` row `row0` of x · groups `g0..g1` of weight row
/// `cols.start + i`, in one call (the loop over columns inside the kernel's features).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn row_run<S: Float, const BITS: usize, const G: usize>(
    k: &Kernel<'_, S, BITS, G>,
    cols: std::ops::Range<usize>,
    g0: usize,
    g1: usize,
    row0: usize,
    acc: &mut [f32],
) {
    let ahead = k.ahead(g0, g1);
    for (a, col) in acc.iter_mut().zip(cols) {
        let Some(c) = k.column_at(col, g0, g1, row0, ahead) else {
            return;
        };
        // SAFETY: the caller guarantees the CPU features; `column` checks the slices.
        if let Some([v]) = unsafe { column::<S, BITS, G, 1>(&c) } {
            *a += v;
        }
    }
}

/// One output column's slice of K (`scales.len()` groups, starting on a chunk) for `R` rows
/// of x: its packed codes, scales and biases, and from the slice's first element on, the
/// rows of X (`kp` apart) and of their steps and sums (`groups` apart).
struct Column<'a, S> {
    packed: &'a [u8],
    scales: &'a [S],
    biases: &'a [S],
    x: &'a [i16],
    step: &'a [f32],
    xsum: &'a [f32],
    kp: usize,
    groups: usize,
    /// Bytes from one weight row to the next.
    row_bytes: usize,
    /// [`groups_ahead`] for the slice.
    groups_ahead: usize,
}

/// The chunk of codes at `p` as the vectors its planes are taken from ([`plane`]): the 32
/// loaded bytes (1, 2, 4, 8 bits) or the shuffles of [`layout`] (3, 5, 6 bits). `avail` is
/// the number of the slice's bytes from `p` on: a 1-, 2-, 3- or 4-bit chunk with fewer than
/// [`chunk_bytes`] reads only those (the rest are zero codes; a slice holds whole groups, so
/// `avail` is a multiple of 4, of 12 at 3 bits and of 16 at 4 bits).
///
/// # Safety
/// The CPU has AVX2, and `min(avail, chunk_bytes(BITS))` bytes at `p` are readable.
#[inline(always)]
unsafe fn load_chunk<const BITS: usize>(p: *const u8, avail: usize) -> [__m256i; 2] {
    // SAFETY (every load): inside the bytes the caller vouches for; AVX2 is the caller's.
    unsafe {
        let z = _mm256_setzero_si256();
        let bcast =
            |q: *const u8| _mm256_broadcastsi128_si256(_mm_loadu_si128(q as *const __m128i));
        let shuffle = |v: __m256i, t: &[u8; 32]| {
            _mm256_shuffle_epi8(v, _mm256_loadu_si256(t.as_ptr() as *const __m256i))
        };
        match BITS {
            3 => {
                let src = if avail >= 24 {
                    _mm256_loadu2_m128i(p.add(8) as *const __m128i, p as *const __m128i)
                } else {
                    // Half a chunk (one group of 32): its 12 bytes, all in the low lane.
                    let keep = _mm_setr_epi32(-1, -1, -1, 0);
                    _mm256_zextsi128_si256(_mm_maskload_epi32(p as *const i32, keep))
                };
                [shuffle(src, &L3[0].0), shuffle(src, &L3[1].0)]
            }
            5 => {
                let src = _mm256_loadu2_m128i(p.add(4) as *const __m128i, p as *const __m128i);
                [shuffle(src, &L5[0].0), shuffle(src, &L5[1].0)]
            }
            6 => [
                shuffle(bcast(p), &L6[0].0),
                shuffle(bcast(p.add(8)), &L6[1].0),
            ],
            _ if avail >= 32 => [_mm256_loadu_si256(p as *const __m256i), z],
            _ => {
                let n = _mm256_set1_epi32((avail / 4) as i32);
                let keep = _mm256_cmpgt_epi32(n, _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
                [_mm256_maskload_epi32(p as *const i32, keep), z]
            }
        }
    }
}

/// Plane `i` (below [`planes_of`]) of a chunk loaded by [`load_chunk`]: 16 codes, one per
/// word.
///
/// # Safety
/// The CPU has AVX2.
#[inline(always)]
unsafe fn plane<const BITS: usize>(v: &[__m256i; 2], i: usize) -> __m256i {
    // SAFETY: register arithmetic and loads of 8-element constant tables; AVX2 is the
    // caller's.
    unsafe {
        let mask = _mm256_set1_epi16(((1u32 << BITS) - 1) as i16);
        let shifts = |s: &[i32; 8]| _mm256_loadu_si256(s.as_ptr() as *const __m256i);
        match BITS {
            3 => _mm256_and_si256(_mm256_srlv_epi32(v[i / 2], shifts(&S3[i % 2])), mask),
            5 => _mm256_and_si256(_mm256_srlv_epi32(v[i], shifts(&L5[i].1)), mask),
            6 => _mm256_and_si256(_mm256_srlv_epi32(v[i], shifts(&L6[i].1)), mask),
            _ => {
                let s = BITS * i;
                let w = if s == 0 {
                    v[0]
                } else {
                    _mm256_srl_epi16(v[0], _mm_cvtsi32_si128(s as i32))
                };
                if s + BITS >= 16 {
                    w
                } else {
                    _mm256_and_si256(w, mask)
                }
            }
        }
    }
}

/// 8 elements from `s[at..]`, zero past `s.len()` or past `at + n`.
#[inline(always)]
fn take8<T: Copy>(s: &[T], at: usize, n: usize, zero: T) -> [T; 8] {
    std::array::from_fn(|i| {
        if i < n {
            s.get(at + i).copied().unwrap_or(zero)
        } else {
            zero
        }
    })
}

/// Chunk `c`'s dot products with row `r` of X (`kp` apart from `xp`), added into `d[r]`;
/// `avail` is the slice's bytes of codes from the chunk on (as [`load_chunk`]'s; `usize::MAX`
/// for a chunk known whole). Always inlined: a call per chunk costs as much as the chunk's
/// arithmetic.
///
/// # Safety
/// The CPU has AVX2; `min(avail, chunk_bytes(BITS))` bytes at `pp + c·chunk_bytes(BITS)` are
/// readable, and so are `(R − 1)·kp + (c + 1)·chunk(BITS)` i16 at `xp`.
#[inline(always)]
unsafe fn dots<const BITS: usize, const R: usize>(
    pp: *const u8,
    avail: usize,
    xp: *const i16,
    kp: usize,
    c: usize,
    d: &mut [__m256i; R],
) {
    let (ch, cb) = (chunk(BITS), chunk_bytes(BITS));
    // SAFETY: the caller's.
    unsafe {
        let v = load_chunk::<BITS>(pp.add(c * cb), avail);
        for i in 0..planes_of(BITS) {
            let q = plane::<BITS>(&v, i);
            for (r, d) in d.iter_mut().enumerate() {
                let px = xp.add(r * kp + c * ch + 16 * i) as *const __m256i;
                *d = _mm256_add_epi32(*d, _mm256_madd_epi16(q, _mm256_loadu_si256(px)));
            }
        }
    }
}

/// The slice's dot products with rows `0..R` of x; `None` if the slices are shorter than
/// [`Column`] promises (they never are; the check keeps the raw loads in bounds). Inlined
/// into [`row_run`]'s loop over columns (same features).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn column<S: Float, const BITS: usize, const G: usize, const R: usize>(
    a: &Column<'_, S>,
) -> Option<[f32; R]> {
    let ch = chunk(BITS);
    let groups = a.scales.len();
    let gb = G / 8 * BITS;
    let len = groups * gb;
    let kp = a.kp;
    if a.packed.len() < len
        || a.biases.len() < groups
        || a.x.len() < (R - 1) * kp + (groups * G).div_ceil(ch) * ch
        || a.step.len() < (R - 1) * a.groups + groups
        || a.xsum.len() < (R - 1) * a.groups + groups
    {
        return None;
    }
    // Independent f32 sums per row: 2 for one row (groups alternate), else 1.
    let ways = if R == 1 { 2 } else { 1 };
    let zero = _mm256_setzero_ps();
    let mut vacc = [[zero; 2]; R];
    let (pp, xp) = (a.packed.as_ptr(), a.x.as_ptr());
    // Chunks of more than a group: i32 lane `l` of a chunk's sums belongs to its group
    // `l·gpc / 8` (1 and 2 bits: a lane's two words hold 32 or 16 neighbouring codes; 4 bits
    // at groups of 32: 8; 3 bits at groups of 32: a 128-bit lane is a group).
    let gpc = (ch / G).max(1);
    let lane_group: [i32; 8] = std::array::from_fn(|l| (l * gpc / 8) as i32);
    // SAFETY: 8 elements.
    let lane_group = unsafe { _mm256_loadu_si256(lane_group.as_ptr() as *const __m256i) };
    // Where the stream continues past this slice: right after it where the slice is its
    // whole row (the prefetch address is then a fixed distance along the stream), else
    // `prefetch_w`'s rule.
    let linear = len == a.row_bytes;
    let to = PrefetchTo::L1;
    for j0 in (0..groups).step_by(8) {
        let nb = (groups - j0).min(8);
        if linear && nb == 8 {
            to.prefetch_lines(pp.wrapping_add(j0 * gb + PREFETCH_AHEAD), 8 * gb);
        } else {
            for o in (0..nb * gb).step_by(64) {
                prefetch_w(pp, j0 * gb + o, len, a.row_bytes, 1, to);
            }
        }
        // A line holds 32 bf16 or f16 factors: one prefetch per 32 groups covers each.
        if R <= 4 && j0 % 32 == 0 {
            prefetch_groups_at(a.scales, a.biases, j0 + a.groups_ahead, to);
        }
        let (sv, bv) = if nb == 8 {
            // SAFETY: j0 + 8 ≤ groups ≤ scales.len(), biases.len() (checked above).
            unsafe {
                (
                    widen8(a.scales.as_ptr().add(j0)),
                    widen8(a.biases.as_ptr().add(j0)),
                )
            }
        } else {
            let z = S::from_f32(0.0);
            let (s, b) = (take8(a.scales, j0, nb, z), take8(a.biases, j0, nb, z));
            // SAFETY: 8 elements each.
            unsafe { (widen8(s.as_ptr()), widen8(b.as_ptr())) }
        };
        let mut f = [zero; R];
        for r in 0..R {
            let at = r * a.groups + j0;
            let (xs, st) = if nb == 8 {
                // SAFETY: at + 8 ≤ (R − 1)·groups_row + groups (checked above).
                unsafe {
                    (
                        _mm256_loadu_ps(a.xsum.as_ptr().add(at)),
                        _mm256_loadu_ps(a.step.as_ptr().add(at)),
                    )
                }
            } else {
                let (xs, st) = (take8(a.xsum, at, nb, 0.0), take8(a.step, at, nb, 0.0));
                // SAFETY: 8 elements each.
                unsafe { (_mm256_loadu_ps(xs.as_ptr()), _mm256_loadu_ps(st.as_ptr())) }
            };
            // The bias term shares the accumulator: its lanes are summed at the end.
            vacc[r][0] = _mm256_fmadd_ps(bv, xs, vacc[r][0]);
            f[r] = _mm256_mul_ps(sv, st);
        }
        if gpc > 1 {
            // A chunk is gpc groups (gpc divides 8, and the slice starts on a chunk); past
            // the slice's last group its codes and factors are zero.
            for jj in (0..nb).step_by(gpc) {
                let mut d = [_mm256_setzero_si256(); R];
                let c = (j0 + jj) / gpc;
                // SAFETY: the chunk starts inside the slice (jj < nb), and X is padded to
                // whole chunks (checked above).
                unsafe { dots::<BITS, R>(pp, len - c * chunk_bytes(BITS), xp, kp, c, &mut d) };
                let pick = _mm256_add_epi32(lane_group, _mm256_set1_epi32(jj as i32));
                for r in 0..R {
                    let s = _mm256_permutevar8x32_ps(f[r], pick);
                    let w = &mut vacc[r][jj / gpc % ways];
                    *w = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d[r]), s, *w);
                }
            }
            continue;
        }
        // Each group's factor broadcast from a copy of the block's on the stack (a load where
        // the compiler keeps it one: it turns some into lane shuffles; docs/perf.md, session 44).
        let mut fa = [[0f32; 8]; R];
        for r in 0..R {
            // SAFETY: 8 elements.
            unsafe { _mm256_storeu_ps(fa[r].as_mut_ptr(), f[r]) };
        }
        for jj in 0..nb {
            let j = j0 + jj;
            let mut d = [_mm256_setzero_si256(); R];
            for c in 0..G / ch {
                // SAFETY: as above (j < groups); a chunk of at most a group is whole.
                unsafe { dots::<BITS, R>(pp, usize::MAX, xp, kp, j * (G / ch) + c, &mut d) };
            }
            for r in 0..R {
                let s = _mm256_broadcast_ss(&fa[r][jj]);
                let w = &mut vacc[r][jj % ways];
                *w = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d[r]), s, *w);
            }
        }
    }
    let mut out = [0f32; R];
    for (o, v) in out.iter_mut().zip(&vacc) {
        *o = hsum8(_mm256_add_ps(v[0], v[1]));
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::pack::{dispatch_bits, pack8};

    fn uniform(mut state: u64) -> impl FnMut() -> f64 {
        move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    /// `permute_chunks` against `scatter` (the permutation table): random rows of X at 4 and 8
    /// bits, several chunks each.
    #[test]
    fn chunk_permutation_matches_scatter() {
        if !available() {
            eprintln!("skipped: this CPU lacks AVX2, FMA or F16C");
            return;
        }
        fn check<const BITS: usize>(next: &mut impl FnMut() -> f64) {
            for chunks in [1usize, 2, 5] {
                let len = chunks * chunk(BITS);
                let row: Vec<i16> = (0..len)
                    .map(|_| (next() * 65535.0 - 32768.0) as i16)
                    .collect();
                let mut want = vec![0i16; len];
                scatter::<BITS>(&row, 0, &mut want);
                let mut got = row.clone();
                // SAFETY: `available()` holds.
                unsafe { permute_chunks::<BITS>(&mut got) };
                assert_eq!(got, want, "{BITS} bits, {chunks} chunks");
            }
        }
        let mut next = uniform(0x9e37_79b9_7f4a_7c15);
        check::<4>(&mut next);
        check::<8>(&mut next);
    }

    /// `load_chunk` and `plane` against the packing definition, every width: random codes
    /// in slices of 1 to 3 chunks, each chunk read with the bytes left in its slice (so the
    /// last, and a 3-bit chunk read from before itself), and partial last chunks (1, 2 and
    /// 4 bits: whole groups of 32 codes, the rest reading as zero codes).
    #[test]
    fn chunks_match_the_packing() {
        if !available() {
            eprintln!("skipped: this CPU lacks AVX2, FMA or F16C");
            return;
        }
        fn check<const BITS: usize>(next: &mut impl FnMut() -> f64) {
            let (ch, cb) = (chunk(BITS), chunk_bytes(BITS));
            assert_eq!(planes_of(BITS) * 16, ch);
            // Every position of a chunk is some element's, once.
            let mut seen = vec![false; ch];
            for i in 0..ch {
                assert!(!std::mem::replace(&mut seen[permuted(BITS, i)], true));
            }
            for case in 0..96 {
                let whole = 1 + case % 3;
                // Codes in the slice: whole chunks, or the last one cut to whole 32s.
                let n = if case % 2 == 1 && ch > 32 {
                    (whole - 1) * ch + 32 * (1 + (next() * (ch / 32 - 1) as f64) as usize)
                } else {
                    whole * ch
                };
                let codes: Vec<u8> = (0..n)
                    .map(|_| (next() * (1u32 << BITS) as f64) as u8)
                    .collect();
                let len = n / 8 * BITS;
                // Packed after 4 bytes of other data, so that a chunk read from before
                // itself stays in the allocation (as the kernel's copy of a one-chunk slice).
                let mut buf = vec![0xa5u8; 4 + len];
                for (c, out) in codes.chunks_exact(8).zip(buf[4..].chunks_exact_mut(BITS)) {
                    pack8::<BITS>(c.try_into().unwrap(), out);
                }
                for c in 0..n.div_ceil(ch) {
                    // SAFETY: AVX2 checked above; the reads stay in `buf` (the doc of
                    // load_chunk: `len − c·cb` bytes from the chunk, or 4 before it).
                    let got: [[u16; 16]; 16] = unsafe {
                        let v = load_chunk::<BITS>(buf.as_ptr().add(4 + c * cb), len - c * cb);
                        let mut got = [[0u16; 16]; 16];
                        for (i, g) in got.iter_mut().enumerate().take(planes_of(BITS)) {
                            *g = std::mem::transmute::<__m256i, [u16; 16]>(plane::<BITS>(&v, i));
                        }
                        got
                    };
                    for i in 0..ch {
                        let want = codes.get(c * ch + i).map_or(0, |&v| v as u16);
                        let p = permuted(BITS, i);
                        assert_eq!(
                            got[p / 16][p % 16],
                            want,
                            "{BITS}-bit chunk {c} of {n} codes, element {i}"
                        );
                    }
                }
            }
        }
        let mut next = uniform(0x2545_f491_4f6c_dd1d);
        for bits in [1u32, 2, 3, 4, 5, 6, 8] {
            dispatch_bits!(bits, B => check::<B>(&mut next), _ => unreachable!());
        }
    }

    /// The AVX2 grid is the definition's, bit for bit (X and step), over magnitudes from
    /// subnormal to near f32's largest (both sides of the |e| ≤ 100 switch) and non-finite
    /// elements; Σx agrees to f32 summation-order error (or both overflow).
    #[test]
    fn fast_grid_matches_the_definition() {
        if !available() {
            eprintln!("skipped: this CPU lacks AVX2, FMA or F16C");
            return;
        }
        let mut next = uniform(0x0123_4567_89ab_cdef);
        for g in [32usize, 64, 128] {
            for case in 0..400 {
                let decade = case % 80 - 44;
                let xg: Vec<f32> = (0..g)
                    .map(|i| {
                        let v = ((next() - 0.5) * 10f64.powf(next() * 4.0 + decade as f64)) as f32;
                        match (case % 7, i % 9) {
                            (0, 3) => f32::NAN,
                            (1, 5) => f32::NEG_INFINITY,
                            (2, _) => half::bf16::from_f32(v).to_f32(),
                            (3, _) if i % 2 == 0 => 0.0,
                            _ => v,
                        }
                    })
                    .collect();
                let (mut want, mut got) = (vec![0i16; g], vec![0i16; g]);
                let (s1, x1) = grid_group(&xg, &mut want);
                // SAFETY: `available()` holds.
                let (s2, x2) = unsafe { grid_group_avx2(&xg, &mut got) };
                assert_eq!(want, got, "case {case} g {g}");
                assert_eq!(s1.to_bits(), s2.to_bits(), "case {case}: step");
                let scale: f32 = xg.iter().filter(|v| v.is_finite()).map(|v| v.abs()).sum();
                // A sum that overflows may end as ∞ in one order and NaN (∞ − ∞) in another.
                assert!(
                    x1 == x2
                        || (!x1.is_finite() && !x2.is_finite())
                        || (x1 - x2).abs() <= scale * 1e-5,
                    "case {case}: Σx {x1} vs {x2}"
                );
            }
        }
    }

    /// The grid's error bound, its exactness for bf16 values within a factor 127 of the
    /// group's largest, |X| ≤ 32512, and X equal to `avx512vnni`'s `256·hi + lo`, over groups
    /// whose values span six decades, ties, maxima at the grid's edges, extreme magnitudes
    /// and non-finite elements.
    #[test]
    fn grid_is_exact_on_bf16_and_bounded_elsewhere() {
        let mut next = uniform(0x9e37_79b9_7f4a_7c15);
        for (g, bits) in [(32, 4), (64, 4), (128, 3), (64, 8), (32, 5)] {
            for case in 0..240 {
                let k = 5 * g;
                let scale = 10f64.powi(case % 60 - 30) as f32;
                let x: Vec<f32> = (0..k)
                    .map(|i| match case % 5 {
                        // Six decades inside each group.
                        0 => ((next() - 0.5) * 10f64.powf(next() * 6.0 - 3.0)) as f32 * scale,
                        // Half-steps of the grid (ties) next to a group maximum of 127.
                        1 if i % g == 0 => 127.0 * scale,
                        1 => ((next() * 254.0).round() / 2.0 - 63.0) as f32 * scale,
                        // Maxima just above and below 127·2^e.
                        2 => {
                            (if i % 2 == 0 { 127.0 } else { 127.5 } * scale)
                                * (1.0 - next() as f32 * 1e-7)
                        }
                        // Non-finite elements among bf16 values.
                        3 if i % 11 == 4 => [f32::NAN, f32::INFINITY][i % 2],
                        _ => half::bf16::from_f32((next() as f32 - 0.5) * scale).to_f32(),
                    })
                    .collect();
                let mut p = Prepared::default();
                dispatch_bits!(bits, B => prepare::<B>(&x, 1, k, g, &mut p), _ => unreachable!());
                let xq: &[i16] = p.x.elems();
                let ch = chunk(bits);
                for (j, xg) in x.chunks_exact(g).enumerate() {
                    let finite = || xg.iter().filter(|v| v.is_finite());
                    let max = finite().fold(0f32, |a, v| a.max(v.abs())) as f64;
                    let sum: f64 = xg.iter().map(|&v| v as f64).sum();
                    let xs = p.xsum[j] as f64;
                    assert!(
                        (xs.is_nan() && sum.is_nan())
                            || xs == sum
                            || (xs - sum).abs() <= 1e-5 * max * g as f64,
                        "case {case}: Σx {xs} vs {sum}"
                    );
                    for (e, &v) in xg.iter().enumerate() {
                        let i = j * g + e;
                        let at = i / ch * ch + permuted(bits, i % ch);
                        let big = xq[at];
                        assert!(big.unsigned_abs() <= 32512, "case {case}: X {big}");
                        if !v.is_finite() {
                            assert_eq!(big, 0, "case {case}: non-finite x on the grid");
                            continue;
                        }
                        let rebuilt = big as f64 * p.step[j] as f64;
                        let err = (rebuilt - v as f64).abs();
                        assert!(
                            err <= max / 32512.0 * (1.0 + 1e-12),
                            "case {case} g {g}: x {v:e} max {max:e} err {err:e}"
                        );
                        let bf = half::bf16::from_f32(v).to_f32() == v;
                        if bf && v != 0.0 && (v.abs() as f64) * 127.0 >= max {
                            assert_eq!(err, 0.0, "case {case}: bf16 {v:e} within 127× {max:e}");
                        }
                    }
                }
            }
        }
    }
}
