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
//! **Dot products.** Codes are widened to 16-bit words (`vpmovzxbw`; 4-bit codes then split by
//! `& 0xF` and `>> 4`, x permuted to the even-then-odd order every x86 kernel uses) and
//! `vpmaddwd` multiplies them by X and adds pairs into i32 lanes: exact, as `q·|X| ≤ 255·32512
//! < 2^23` and a lane sums at most 16 products per group of 128. Per group, one conversion and
//! one FMA apply `s·2^(e−8)`; the bias term `b·Σx` is one FMA per 8 groups. Against the f32
//! path (`avx2`: a conversion and an FMA per 8 weights) this is 2–3 instructions per 16
//! weights, and no conversion per weight.

use super::qmm::QmmArgs;
use super::x86_avx2::{available, decode32, widen8};
use super::x86_columns::{prefetch_w, run, Columns, PrefetchTo, Rows, Walk, MAX_COLS, MAX_ROWS};
use super::x86_vnni::{grid_exponent, grid_key, pow2, round};
use super::{cast, cast_mut, Variant};
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
/// Bytes of x one row block may touch per K block (L1-resident beside the weights).
const X_BLOCK_BYTES: usize = 24 << 10;
/// The same with a single block of rows (decode): every column reads x once per call, from
/// L2 if need be; blocking K would only cut each weight row's stream into pieces.
const X_BLOCK_BYTES_DECODE: usize = 256 << 10;
/// Elements of x up to which [`prepare`] runs on the calling thread alone.
const SEQUENTIAL: usize = 1 << 14;

/// Elements of one code chunk (one 32-byte vector of 4-bit codes, or 32 codes of another
/// width); rows of X are padded to whole 64-element chunks.
const fn chunk(bits: usize) -> usize {
    if bits == 4 {
        64
    } else {
        32
    }
}

/// Where element `i` of a chunk lies in X: word `t` of the chunk's code vector holds 4-bit
/// elements `4t..4t + 4` (one per nibble), or elements `2t, 2t + 1` of other widths (one per
/// byte), and the `p`-th of them is taken apart into plane `p` (16 words), which is where its
/// x goes.
#[inline(always)]
fn permuted(bits: usize, i: usize) -> usize {
    if bits == 4 {
        16 * (i % 4) + i / 4
    } else {
        16 * (i % 2) + i / 2
    }
}

/// Row length of X: `k` padded to whole 64-element chunks (the padding is zero).
fn padded(k: usize) -> usize {
    k.div_ceil(64) * 64
}

/// x prepared for one call: X (`m` rows of [`padded`]`(k)` i16, each chunk in [`permuted`]
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
    let (groups, kp) = (k / g, padded(k));
    let ch = const { chunk(BITS) };
    p.step.clear();
    p.step.resize(m * groups, 0.0);
    p.xsum.clear();
    p.xsum.resize(m * groups, 0.0);
    let xq = p.x.clear_to_zeroed_elems::<i16>(m * kp);
    let min_len = if m * k <= SEQUENTIAL { usize::MAX } else { 1 };
    let fast = available() && g <= 128;
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
                let t = &mut tmp[..g.min(128)];
                (step[j], xsum[j]) = if fast {
                    // SAFETY: `available()` holds.
                    unsafe { grid_group_avx2(xg, t) }
                } else {
                    grid_group(xg, t)
                };
                for (i, &v) in t.iter().enumerate() {
                    let at = j * g + i;
                    out[at / ch * ch + permuted(BITS, at % ch)] = v;
                }
            }
        });
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
    match a.w.group_size {
        32 => qmm_t_g::<S, O, BITS, 32>(a),
        64 => qmm_t_g::<S, O, BITS, 64>(a),
        128 => qmm_t_g::<S, O, BITS, 128>(a),
        g => Err(Error::invalid(
            "quantized_matmul",
            "group_size",
            "32, 64 or 128",
            g,
        )),
    }
}

fn qmm_t_g<S: Float, O: Float, const BITS: usize, const G: usize>(a: QmmArgs<'_>) -> Result<()> {
    const OP: &str = "quantized_matmul";
    if !available() {
        return Err(Error::unsupported(
            OP,
            "the avx2i16 kernel on a CPU without AVX2, FMA and F16C",
        ));
    }
    let w = a.w;
    let scales: &[S] = cast(OP, "scales", w.scales)?;
    let biases: &[S] = cast(OP, "biases", w.biases)?;
    let out: &mut [O] = cast_mut(OP, "out", a.out)?;
    let (m, n, k) = (a.m, w.rows, w.cols);
    let x_block = if m <= ROWS {
        X_BLOCK_BYTES_DECODE
    } else {
        X_BLOCK_BYTES
    };
    let mut walk = Walk::new(m, n, k, G, ROWS, 2, x_block);
    // K blocks of whole chunks (a chunk of 4-bit codes holds two groups of 32).
    let per = (chunk(BITS) / G).max(1);
    walk.block_groups = walk.block_groups.div_ceil(per) * per;
    let mut prep = SCRATCH.with(|s| std::mem::take(&mut *s.borrow_mut()));
    prepare::<BITS>(a.x, m, k, G, &mut prep);
    let kernel = Kernel::<S, BITS, G> {
        w: Rows::new(&w, scales, biases),
        x: prep.x.elems(),
        step: &prep.step,
        xsum: &prep.xsum,
        kp: padded(k),
    };
    // SAFETY: `available()` holds (checked above).
    unsafe { run(&kernel, walk, out) };
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
        let groups = self.w.groups;
        if count == 0 {
            return;
        }
        let (Some((packed, scales, biases)), Some(x), Some(step), Some(xsum)) = (
            self.w.row(col, g0, g1, BITS),
            self.x.get(row0 * self.kp + g0 * G..),
            self.step.get(row0 * groups + g0..),
            self.xsum.get(row0 * groups + g0..),
        ) else {
            return;
        };
        let c = Column {
            packed,
            scales,
            biases,
            x,
            step,
            xsum,
            kp: self.kp,
            groups,
            row_bytes: self.w.row_bytes,
        };
        // SAFETY: the caller guarantees the CPU features; `column` checks the slices.
        unsafe { column::<S, BITS, G, R>(&c, &mut acc[0]) }
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
}

/// The code chunk at `p` as its planes of 16 words (4-bit: four, other widths: two; the rest
/// zero), `half` meaning only the first 16 bytes of a 4-bit chunk exist (its second half
/// reads as zero codes).
///
/// # Safety
/// `p` points to the chunk's bytes (`4·BITS`; 4-bit: 32, or 16 with `half`); the CPU has AVX2.
#[inline(always)]
unsafe fn planes<const BITS: usize>(p: *const u8, half: bool) -> [__m256i; 4] {
    // SAFETY (every load): exactly the caller's bytes; AVX2 is the caller's.
    unsafe {
        let z = _mm256_setzero_si256();
        if BITS == 4 {
            let w = if half {
                _mm256_zextsi128_si256(_mm_loadu_si128(p as *const __m128i))
            } else {
                _mm256_loadu_si256(p as *const __m256i)
            };
            let m = _mm256_set1_epi16(0xf);
            return [
                _mm256_and_si256(w, m),
                _mm256_and_si256(_mm256_srli_epi16::<4>(w), m),
                _mm256_and_si256(_mm256_srli_epi16::<8>(w), m),
                _mm256_srli_epi16::<12>(w),
            ];
        }
        let w = if BITS == 8 {
            _mm256_loadu_si256(p as *const __m256i)
        } else {
            decode32::<BITS>(p)
        };
        [
            _mm256_and_si256(w, _mm256_set1_epi16(0xff)),
            _mm256_srli_epi16::<8>(w),
            z,
            z,
        ]
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

/// `acc[r]` = the slice's dot product with row `r` of x, for `R` rows. Writes nothing if the
/// slices are shorter than [`Column`] promises (they never are; the check keeps the raw loads
/// in bounds).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn column<S: Float, const BITS: usize, const G: usize, const R: usize>(
    a: &Column<'_, S>,
    acc: &mut [f32; MAX_ROWS],
) {
    let ch = chunk(BITS);
    let np = if BITS == 4 { 4 } else { 2 };
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
        return;
    }
    // Independent f32 sums per row: 2 for one row (groups alternate), else 1.
    let ways = if R == 1 { 2 } else { 1 };
    let zero = _mm256_setzero_ps();
    let mut vacc = [[zero; 2]; R];
    let (pp, xp) = (a.packed.as_ptr(), a.x.as_ptr());
    // Chunk `c`'s dot products with row `r` of X, added into `d[r]`.
    let dots = |c: usize, half: bool, d: &mut [__m256i; R]| {
        // SAFETY: chunk c's bytes lie in `packed` (`half`: its first 16 do, the slice's last
        // group), and r·kp + (c + 1)·ch ≤ x.len() (checked above: X is padded to chunks).
        unsafe {
            let q = planes::<BITS>(pp.add(c * ch / 8 * BITS), half);
            for (r, d) in d.iter_mut().enumerate() {
                let px = xp.add(r * kp + c * ch) as *const __m256i;
                for (i, &q) in q.iter().enumerate().take(np) {
                    *d = _mm256_add_epi32(*d, _mm256_madd_epi16(q, _mm256_loadu_si256(px.add(i))));
                }
            }
        }
    };
    for j0 in (0..groups).step_by(8) {
        let nb = (groups - j0).min(8);
        for o in (0..nb * gb).step_by(64) {
            prefetch_w(pp, j0 * gb + o, len, a.row_bytes, 1, PrefetchTo::L1);
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
        if BITS == 4 && G == 32 {
            // A chunk is two groups: lanes 0..4 of its sums are group jj's, 4..8 group jj + 1's
            // (zero codes and factor past the slice's last group).
            for jj in (0..nb).step_by(2) {
                let mut d = [_mm256_setzero_si256(); R];
                dots((j0 + jj) / 2, jj + 1 == nb, &mut d);
                let (u, v) = (jj as i32, jj as i32 + 1);
                let pick = _mm256_setr_epi32(u, u, u, u, v, v, v, v);
                for r in 0..R {
                    let s = _mm256_permutevar8x32_ps(f[r], pick);
                    let w = &mut vacc[r][jj / 2 % ways];
                    *w = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d[r]), s, *w);
                }
            }
            continue;
        }
        for jj in 0..nb {
            let j = j0 + jj;
            let mut d = [_mm256_setzero_si256(); R];
            for c in 0..G / ch {
                dots(j * (G / ch) + c, false, &mut d);
            }
            let pick = _mm256_set1_epi32(jj as i32);
            for r in 0..R {
                let s = _mm256_permutevar8x32_ps(f[r], pick);
                let w = &mut vacc[r][jj % ways];
                *w = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d[r]), s, *w);
            }
        }
    }
    for (o, v) in acc.iter_mut().zip(&vacc) {
        let v = _mm256_add_ps(v[0], v[1]);
        let h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        *o = _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps::<0b01>(h, h)));
    }
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

    /// `planes` against the packing definition, every width, random codes, whole and half
    /// 4-bit chunks.
    #[test]
    fn planes_match_the_packing() {
        if !available() {
            eprintln!("skipped: this CPU lacks AVX2, FMA or F16C");
            return;
        }
        fn check<const BITS: usize>(next: &mut impl FnMut() -> f64) {
            let ch = chunk(BITS);
            for case in 0..64 {
                let half = BITS == 4 && case % 2 == 1;
                let codes: Vec<u8> = (0..ch)
                    .map(|i| {
                        if half && i >= 32 {
                            0
                        } else {
                            (next() * (1u32 << BITS) as f64) as u8
                        }
                    })
                    .collect();
                let mut packed = vec![0u8; ch / 8 * BITS];
                for (c, out) in codes.chunks_exact(8).zip(packed.chunks_exact_mut(BITS)) {
                    pack8::<BITS>(c.try_into().unwrap(), out);
                }
                // Only the bytes the call may read: 16 for a half chunk.
                let bytes = if half { 16 } else { packed.len() };
                let src = packed[..bytes].to_vec();
                // SAFETY: AVX2 checked above; `src` holds the bytes `planes` reads.
                let q = unsafe { planes::<BITS>(src.as_ptr(), half) };
                let got: [[u16; 16]; 4] = unsafe { std::mem::transmute(q) };
                for (i, &c) in codes.iter().enumerate() {
                    let p = permuted(BITS, i);
                    assert_eq!(got[p / 16][p % 16], c as u16, "{BITS}-bit element {i}");
                }
                if BITS != 4 {
                    assert!(got[2..].iter().flatten().all(|&w| w == 0));
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
