//! AVX-512 VNNI kernel for `y = x·Wᵀ` with bf16 or f16 x: integer dot products on the codes
//! as they are, at f32-path accuracy.
//!
//! MLX's codes are unsigned and at most 8 bits wide: they are `vpdpbusd`'s u8 operand as they
//! are. x is split, per row and quantization group, into two signed bytes on a power-of-two
//! grid: with `2^e ≥ max|x_g| / 127`,
//!
//! `x ≈ x̂ = (256·hi + lo) · 2^(e−8)`, `hi = round(x / 2^e)`, `lo = round((x − hi·2^e) / 2^(e−8))`,
//!
//! so `Σ q·x̂` is an exact integer: `vpdpbusd` sums `q·hi` (four products a lane), the sum is
//! shifted left by 8 and `vpdpbusd` adds `q·lo`; one conversion and one FMA apply
//! `s·2^(e−8)`. The only error is x̂'s: `|x − x̂| ≤ 2^(e−9) < max|x_g|/32512` (half a step
//! of lo, with `2^e < max|x_g|/63.5`). The grid holds every multiple of `2^(e−8)`, so a bf16
//! element (8 significant bits) within a factor 127 of its group's largest is represented
//! exactly, an f16 one (11 bits) within a factor 15.9. Smaller elements are rounded on the
//! group's grid: about 2^-15 of the group's largest, far below the rounding of a bf16 or f16
//! output (2^-9, 2^-12), which is why only those outputs take this kernel. Σx for the bias
//! term `b·Σx` is the f32 sum of the exact x. The conformance suite checks the results
//! against the f64 oracle at the bf16/f16 tolerance, and a test with x spread over six
//! decades inside each group checks the bound.
//!
//! **Superblocks.** Four consecutive groups of a weight row are decoded together into
//! `g/16` code registers, each 128-bit lane holding 16 codes of one group (lane `j` group
//! `j`), and x's split is laid out to match. Every `vpdpbusd` then adds into lanes that
//! belong to four groups at once, so the per-group tail of the sum (the shift, the int→f32
//! conversion, the scale product and the FMA) is paid once per four groups instead of once
//! per group: per row, column and group of 64, 2 `vpdpbusd` plus one op, against 2 plus
//! three when each register held one group. 4- and 8-bit codes reach that layout with
//! 128-bit lane shuffles of the packed bytes (`vshufi64x2`) and, for 4-bit, one mask and one
//! shift per register; other widths decode each group's codes as before (`vpermb`,
//! `vpmultishiftqb`) and then shuffle. A weight row's last superblock may hold fewer than
//! four groups: its loads are masked and the missing groups' x, step and Σx are zero.
//!
//! **mxfp4.** An E2M1 element `v` times two is an integer in −12..12, so `c = 2v + 12` is an
//! unsigned code of 0..24 and `Σ v·s·x = (s/2)·Σ c·x − 6s·Σx`: the affine form with scale
//! `s/2` and bias `−6s`. One `vpshufb` per code register takes the 4-bit codes to `c`
//! ([`Groups::FP4`]); the E8M0 scale codes are widened 16 at a time into MLX's matmul
//! scales ([`e8m0_16`]). The error bound is the affine one (x̂'s), with codes of at most 24.

use super::qmm::QmmArgs;
use super::x86::widen16;
use super::x86_columns::{
    l1d_bytes, prefetch_groups, prefetch_w, run, zen3_or_4, Columns, PrefetchTo, Walk, MAX_COLS,
    MAX_ROWS,
};
use super::{Rows, Variant};
use crate::aligned::AlignedBytes;
use crate::dtype::{DType, Element, Float};
use crate::error::Result;
use rayon::prelude::*;
use std::arch::x86_64::*;
use std::cell::RefCell;
use std::marker::PhantomData;

/// The variant: `quantized_matmul`, transpose, bf16 or f16 x and output, every affine width
/// and mxfp4.
///
/// An f32 output (f32 scales) asks for a relative error of 1e-5, which x̂'s error can reach
/// when a group's x spans more than 2^7; those keys go to the float kernels.
pub(crate) const QMM_T_VNNI: Variant = Variant {
    name: "avx512vnni",
    supports: |k| (grid_key(k) || mxfp4_key(k)) && available(),
    decode: None,
    build: |k| {
        use crate::quant::pack::dispatch_bits;
        if mxfp4_key(k) {
            return crate::with_float_type!(k.output, X => {
                Some(super::KernelFn::Qmm(qmm_t::<Mxfp4<X>, X, 4>))
            }, _ => None);
        }
        crate::with_float_type!(k.scales, S => crate::with_float_type!(k.output, O => {
            Some(dispatch_bits!(k.bits, B => super::KernelFn::Qmm(qmm_t::<Affine<S>, O, B>), _ => return None))
        }, _ => None), _ => None)
    },
};

/// mxfp4's keys this kernel serves: `quantized_matmul`, transpose, bf16 or f16 x and output
/// (uint8 scales).
pub(crate) fn mxfp4_key(k: &crate::registry::KernelKey) -> bool {
    k.mode == crate::QuantMode::Mxfp4
        && k.op == crate::registry::OpKind::QuantizedMatmul
        && k.flag
        && k.scales == DType::U8
        && matches!(k.input, DType::BF16 | DType::F16)
        && k.output == k.input
}

/// How a weight's groups are scaled: MLX's affine mode ([`Affine`]: scales and biases of a
/// float dtype) or mxfp4 ([`Mxfp4`]: E8M0 scale codes, element codes taken to `2v + 12`).
pub(crate) trait Groups: Sync + 'static {
    /// Element type of the scales, and of the biases (mxfp4 has none: its scales stand in).
    type E: bytemuck::Pod + Sync;
    /// Whether the element codes are E2M1, taken to `2v + 12` by [`E2M1_CODES`].
    const FP4: bool;
    /// 16 groups' (`m`asked: other lanes 0) factors in f32: of the integer dots (from the
    /// scales at `sp`) and of Σx (from the biases at `bp`).
    ///
    /// # Safety
    /// The masked elements at `sp` and `bp` are readable; the CPU supports [`available`]'s
    /// features.
    unsafe fn factors16(sp: *const Self::E, bp: *const Self::E, m: __mmask16) -> [__m512; 2];
}

/// Affine groups with scales and biases of dtype `S`.
pub(crate) struct Affine<S>(PhantomData<S>);
/// mxfp4 groups, with x (and the scales' rounding) of dtype `X`.
pub(crate) struct Mxfp4<X>(PhantomData<X>);

impl<S: Float> Groups for Affine<S> {
    type E = S;
    const FP4: bool = false;
    #[inline(always)]
    unsafe fn factors16(sp: *const S, bp: *const S, m: __mmask16) -> [__m512; 2] {
        // SAFETY: the caller's contract.
        unsafe { [widen16(sp, m), widen16(bp, m)] }
    }
}

impl<X: Float> Groups for Mxfp4<X> {
    type E = u8;
    const FP4: bool = true;
    /// `s/2` and `−6s` (exact: the scales are powers of two); `bp` is the scales too.
    #[inline(always)]
    unsafe fn factors16(sp: *const u8, _bp: *const u8, m: __mmask16) -> [__m512; 2] {
        // SAFETY: the caller's contract.
        unsafe { mxfp4_factors16::<X>(sp, m) }
    }
}

/// `vpshufb` table (each 128-bit lane): E2M1 code → `2v + 12` (0..24).
const E2M1_CODES: [u8; 16] = [12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0];

/// [`e8m0_16`] times 0.5 and times −6.
///
/// # Safety
/// As for [`e8m0_16`].
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn mxfp4_factors16<X: Element>(p: *const u8, m: __mmask16) -> [__m512; 2] {
    // SAFETY: the caller's contract.
    let s = unsafe { e8m0_16::<X>(p, m) };
    [
        _mm512_mul_ps(s, _mm512_set1_ps(0.5)),
        _mm512_mul_ps(s, _mm512_set1_ps(-6.0)),
    ]
}

/// The `m`asked of 16 E8M0 scale codes at `p` as MLX's CPU matmul reads them with x of
/// dtype `X` ([`fp::matmul_scale`](crate::quant::fp::matmul_scale)): `2^(e − 127)` built as
/// a bfloat16 (code 0 the subnormal 2^-127), rounded to f16 for f16 x (codes below 103, under
/// 2^-24, to 0; above 142, past 2^15, to infinity). Other lanes are 0.
///
/// Code 255 is NaN, as in the OCP MX format, MLX's dequantize and its GPU matmul. (MLX's CPU
/// matmul reads it as infinity; so does this kernel read f16's overflowing codes. The scaled
/// sums `(s/2)·Σc·x − 6s·Σx` of an infinite scale come out NaN or infinite where MLX's
/// `Σ x·(v·s)` may be the other: both non-finite.)
///
/// # Safety
/// The masked bytes at `p` are readable; the CPU supports AVX-512 F, BW and VL.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(crate) unsafe fn e8m0_16<X: Element>(p: *const u8, m: __mmask16) -> __m512 {
    // SAFETY: the masked load touches only the bytes the mask names (caller: readable).
    let e = _mm512_cvtepu8_epi32(unsafe { _mm_maskz_loadu_epi8(m, p as *const i8) });
    let bits = _mm512_slli_epi32::<23>(e);
    let set = _mm512_set1_epi32;
    let v = if X::DTYPE == DType::F16 {
        let inf = _mm512_cmpgt_epu32_mask(e, set(142));
        let zero = _mm512_cmplt_epu32_mask(e, set(103));
        _mm512_mask_mov_epi32(
            _mm512_mask_mov_epi32(bits, inf, set(0x7f80_0000)),
            zero,
            set(0),
        )
    } else {
        let sub = _mm512_cmpeq_epi32_mask(e, set(0));
        _mm512_mask_mov_epi32(bits, sub, set(0x0040_0000))
    };
    let nan = _mm512_cmpeq_epi32_mask(e, set(255));
    let v = _mm512_mask_mov_epi32(v, nan, set(0x7fc0_0000));
    _mm512_castsi512_ps(_mm512_maskz_mov_epi32(m, v))
}

/// The keys an x split on a per-group power-of-two grid serves (this kernel's, and
/// `avx2i16`'s): `quantized_matmul`, transpose, affine, bf16 or f16 x and output.
pub(crate) fn grid_key(k: &crate::registry::KernelKey) -> bool {
    k.mode == crate::QuantMode::Affine
        && k.op == crate::registry::OpKind::QuantizedMatmul
        && k.flag
        && matches!(k.input, crate::DType::BF16 | crate::DType::F16)
        && matches!(k.output, crate::DType::BF16 | crate::DType::F16)
}

/// Whether this CPU can run the kernels of this module.
pub(crate) fn available() -> bool {
    super::x86::available() && is_x86_feature_detected!("avx512vnni")
}

/// Rows of x sharing one decoded superblock: 4 keeps a block's accumulators and code
/// registers in registers.
const ROWS: usize = 4;
/// Groups per superblock: one per 128-bit lane.
pub(crate) const SB: usize = 4;
/// Bytes of split x one row block may touch per K block (L1-resident beside the weights).
const X_BLOCK_BYTES: usize = 24 << 10;
/// The same with a single block of rows (decode): every column then reads the block of x
/// once, from L2 if need be, and blocking K would only cut each weight row's stream into
/// short pieces (with a second pass over every column per extra block).
const X_BLOCK_BYTES_DECODE: usize = 256 << 10;

/// Longest K at which a one-row call reads one weight row at a time instead of two side by
/// side: while x's split (2 bytes an element) takes at most 5/8 of the L1 data cache.
///
/// Two rows read together are two streams a row apart, which Zen 4's prefetchers follow at
/// half the rate of one (docs/perf.md, session 23: 12–13 against 26–31 GB/s on one core,
/// `tools/stream_pattern_probe.c`); sharing each load of x between two columns matters less
/// while x's split stays in L1, and more once it does not. With Zen 4's 32 KiB that is
/// K ≤ 10240 (session 23 measured two columns faster at K = 14336); with Zen 5's 48 KiB
/// K ≤ 15360, and one column read 1×4096×14336 4-bit 7–13% faster there (session 30).
fn one_column_k() -> usize {
    l1d_bytes() * 5 / 16
}

/// Elements of x up to which [`prepare`] runs on the calling thread alone.
const SEQUENTIAL_SPLIT: usize = 1 << 14;

/// x prepared for one call, per row and superblock (four groups; a row's groups padded with
/// zero groups to whole superblocks): `g/16` registers of 64 `hi` bytes then 64 `lo` bytes
/// (lane `16j + t` of register `i`: element [`slot`]`⁻¹(i, t)` of the superblock's group
/// `j`), 16 steps (lane `4j + u`: group `j`'s `2^(e−8)`), 4 sums Σx (one per group). The
/// split is cache-line aligned, so each of its 64-byte loads reads one line.
#[derive(Default)]
struct Prepared {
    split: AlignedBytes,
    step: Vec<f32>,
    xsum: Vec<f32>,
}

impl Prepared {
    /// The split bytes.
    fn split(&self) -> &[i8] {
        self.split.elems()
    }

    /// Whether this holds groups `g0..g0 + groups` (from a superblock's start, within `nsb`
    /// superblocks a row) of rows `..rows_end`, for codes of `nr` registers a superblock
    /// (2..=8: groups of 32 to 128): the checks every kernel loop makes before it reads x.
    fn covers(&self, rows_end: usize, nsb: usize, g0: usize, groups: usize, nr: usize) -> bool {
        g0.is_multiple_of(SB)
            && g0 + groups <= nsb * SB
            && self.split().len() >= rows_end * nsb * nr * 128
            && self.step.len() >= rows_end * nsb * 16
            && self.xsum.len() >= rows_end * nsb * SB
            && (2..=8).contains(&nr)
    }
}

thread_local! {
    /// The prepared x, reused across calls (taken, not borrowed, so nested calls allocate).
    static SCRATCH: RefCell<Prepared> = RefCell::new(Prepared::default());
}

/// Where element `e` of a group of `g` lies in a superblock: its code register and byte
/// within the group's 128-bit lane. 4-bit: register `2p` holds the low nibbles of packed
/// piece `p` (16 bytes: elements `32p + 2t`), register `2p + 1` the high ones
/// (`32p + 2t + 1`). With groups of 64 or 128, 2- and 1-bit codes are taken in pieces of 64
/// codes (16 and 8 bytes), register `4p + i` holding piece `p`'s bit field `i` of every byte,
/// so that a shift or a bit test decodes a whole register (see [`decode_sb`]): 2-bit, byte
/// `t` is element `64p + 4t + i`; 1-bit, byte `t < 8` is bit `i` of the piece's byte `t`
/// (element `64p + 8t + i`) and byte `t ≥ 8` bit `i + 4` of byte `t − 8`. Other widths (and
/// 1-, 2-bit groups of 32): register `i` holds elements `16i + t`.
#[inline(always)]
pub(crate) fn slot(bits: usize, g: usize, e: usize) -> (usize, usize) {
    let (p, r) = (e / 64, e % 64);
    match bits {
        4 => {
            let (p, r) = (e / 32, e % 32);
            (2 * p + r % 2, r / 2)
        }
        2 if g >= 64 => (4 * p + r % 4, r / 4),
        1 if g >= 64 => (4 * p + r % 8 % 4, r / 8 + 8 * (r % 8 / 4)),
        _ => (e / 16, e % 16),
    }
}

/// `vpermb` indices taking a 64-element chunk (elements `64c..64c + 64` of a group, in
/// order) to the 16-byte pieces of registers `4c..4c + 4` (piece `q` in bytes `16q..`).
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
fn place_permutation(bits: usize, g: usize) -> __m512i {
    let mut idx = [0u8; 64];
    for e in 0..64 {
        let (reg, t) = slot(bits, g, e);
        idx[16 * (reg % 4) + t] = e as u8;
    }
    // SAFETY: reads exactly the 64 bytes of `idx`.
    unsafe { _mm512_loadu_si512(idx.as_ptr() as *const __m512i) }
}

/// Splits x (`m × k`) into [`Prepared`] for `bits`, groups of `g`.
fn prepare(x: &[f32], m: usize, k: usize, g: usize, bits: usize, p: &mut Prepared) {
    let groups = k / g;
    let nsb = groups.div_ceil(SB);
    let sb_bytes = g / 16 * 128;
    p.step.clear();
    p.step.resize(m * nsb * 16, 0.0);
    p.xsum.clear();
    p.xsum.resize(m * nsb * SB, 0.0);
    let fast = available();
    // SAFETY: `fast` says the CPU has the features.
    let perm = fast.then(|| unsafe { place_permutation(bits, g) });
    // Superblocks in parallel, a few per task: a decode call's whole preparation is one row.
    // Below `SEQUENTIAL_SPLIT` elements the calling thread does it alone (no split of the
    // iterator, so no hand-off to the pool): waking the pool costs more than the work.
    let per_task = (m * nsb / rayon::current_num_threads().max(1)).clamp(1, 16);
    let min_len = if m * k <= SEQUENTIAL_SPLIT {
        usize::MAX
    } else {
        1
    };
    let split = p.split.clear_to_zeroed_elems::<i8>(m * nsb * sb_bytes);
    let tasks = split
        .par_chunks_mut(per_task * sb_bytes)
        .zip(p.step.par_chunks_mut(per_task * 16))
        .zip(p.xsum.par_chunks_mut(per_task * SB))
        .enumerate()
        .with_min_len(min_len);
    tasks.for_each(|(t, ((split, step), xsum))| {
        let (mut hi, mut lo) = ([0i8; 128], [0i8; 128]);
        for (ss, ((out, st), xs)) in split
            .chunks_exact_mut(sb_bytes)
            .zip(step.chunks_exact_mut(16))
            .zip(xsum.chunks_exact_mut(SB))
            .enumerate()
        {
            // Superblock s of row `row`, flattened over m × nsb.
            let s = t * per_task + ss;
            let (row, sb) = (s / nsb, s % nsb);
            for jj in 0..SB {
                let gi = sb * SB + jj;
                if gi >= groups {
                    break;
                }
                let xg = &x[row * k + gi * g..row * k + (gi + 1) * g];
                let mut stj = 0f32;
                match perm {
                    // SAFETY: `perm` exists only where the CPU has the features.
                    Some(perm) => unsafe {
                        split_group_avx512(xg, &mut stj, &mut xs[jj], &mut hi, &mut lo);
                        place_avx512(g, perm, &hi, &lo, out, jj);
                    },
                    None => {
                        split_group(xg, &mut stj, &mut xs[jj], &mut hi, &mut lo);
                        place(bits, g, &hi, &lo, out, jj);
                    }
                }
                st[4 * jj..4 * jj + 4].fill(stj);
            }
        }
    });
}

/// One group's split (element order, `hi` and `lo` of its `g ≤ 128` elements), step and Σx:
/// the definition; [`split_group_avx512`] is its fast twin.
fn split_group(xg: &[f32], step: &mut f32, xsum: &mut f32, hi8: &mut [i8], lo8: &mut [i8]) {
    *xsum = xg.iter().sum();
    // Non-finite elements become 0 in the split; they still reach the output through Σx in
    // the bias term, as NaN or ∞.
    let max = xg
        .iter()
        .filter(|v| v.is_finite())
        .fold(0f32, |a, v| a.max(v.abs()));
    let e = grid_exponent(max);
    *step = pow2(e - 8) as f32;
    let (unit, inv_hi, inv_lo) = (pow2(e), pow2(-e), pow2(8 - e));
    for ((&v, h), l) in xg.iter().zip(hi8.iter_mut()).zip(lo8.iter_mut()) {
        // f64: exact products by powers of two whatever e is.
        let v = if v.is_finite() { v as f64 } else { 0.0 };
        let mut hi = round(v * inv_hi);
        // Exact: v and hi·2^e are within a factor 2 or hi = 0 (Sterbenz).
        let rest = v - hi * unit;
        let mut lo = round(rest * inv_lo);
        // |rest| ≤ 2^(e−1), so lo ∈ [−128, 128]; 128 only when v = (hi + ½)·2^e, where
        // hi < 127: carry it into hi (same x̂, both in range).
        if lo > 127.0 {
            hi += 1.0;
            lo -= 256.0;
        }
        (*h, *l) = (hi as i8, lo as i8);
    }
}

/// Writes one group's split (element order) into slot `jj` of its superblock `out`: the
/// definition of the layout; [`place_avx512`] is its fast twin.
fn place(bits: usize, g: usize, hi: &[i8], lo: &[i8], out: &mut [i8], jj: usize) {
    for e in 0..g {
        let (reg, t) = slot(bits, g, e);
        out[reg * 128 + 16 * jj + t] = hi[e];
        out[reg * 128 + 64 + 16 * jj + t] = lo[e];
    }
}

/// [`place`] with one `vpermb` per 64 elements (`perm` from [`place_permutation`]).
///
/// # Safety
/// The CPU supports [`available`]'s features.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi")]
unsafe fn place_avx512(
    g: usize,
    perm: __m512i,
    hi: &[i8; 128],
    lo: &[i8; 128],
    out: &mut [i8],
    jj: usize,
) {
    if out.len() < g / 16 * 128 || jj >= SB || g > 128 {
        return;
    }
    let mut tmp = [0i8; 64];
    for c in 0..g.div_ceil(64) {
        for (half, src) in [hi, lo].into_iter().enumerate() {
            // SAFETY: 64 bytes from 64c ≤ 64 lie in the 128-byte array; `tmp` is 64 bytes.
            unsafe {
                let v = _mm512_loadu_si512(src.as_ptr().add(64 * c) as *const __m512i);
                _mm512_storeu_si512(
                    tmp.as_mut_ptr() as *mut __m512i,
                    _mm512_permutexvar_epi8(perm, v),
                );
            }
            for q in 0..(g - 64 * c).min(64) / 16 {
                let at = (4 * c + q) * 128 + 64 * half + 16 * jj;
                out[at..at + 16].copy_from_slice(&tmp[16 * q..16 * q + 16]);
            }
        }
    }
}

/// [`split_group`] with AVX-512, bit for bit the same split and step (Σx may differ in its
/// last bits: another summation order). f32 suffices where `2^±e` and `2^(8−e)` are normal
/// f32 (|e| ≤ 100): scaling by them is then exact, or underflows only where the result
/// rounds to 0 either way; other groups take [`split_group`].
///
/// # Safety
/// The CPU supports [`available`]'s features.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx512dq")]
pub(crate) unsafe fn split_group_avx512(
    xg: &[f32],
    step: &mut f32,
    xsum: &mut f32,
    hi8: &mut [i8; 128],
    lo8: &mut [i8; 128],
) {
    let g = xg.len();
    if !g.is_multiple_of(16) || g > 128 {
        return;
    }
    let p = xg.as_ptr();
    let inf = _mm512_set1_ps(f32::INFINITY);
    let (mut sum, mut max) = (_mm512_setzero_ps(), _mm512_setzero_ps());
    for v0 in (0..g).step_by(16) {
        // SAFETY: v0 + 16 ≤ g elements of `xg`.
        let v = unsafe { _mm512_loadu_ps(p.add(v0)) };
        sum = _mm512_add_ps(sum, v);
        let a = _mm512_abs_ps(v);
        max = _mm512_mask_max_ps(max, _mm512_cmp_ps_mask::<_CMP_LT_OQ>(a, inf), max, a);
    }
    *xsum = _mm512_reduce_add_ps(sum);
    let e = grid_exponent(_mm512_reduce_max_ps(max));
    if e.abs() > 100 {
        return split_group(xg, step, xsum, hi8, lo8);
    }
    *step = pow2(e - 8) as f32;
    let (unit, inv_hi, inv_lo) = (
        _mm512_set1_ps(pow2(e) as f32),
        _mm512_set1_ps(pow2(-e) as f32),
        _mm512_set1_ps(pow2(8 - e) as f32),
    );
    const NEAREST: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    for v0 in (0..g).step_by(16) {
        // SAFETY: v0 + 16 ≤ g elements of `xg`.
        let v = unsafe { _mm512_loadu_ps(p.add(v0)) };
        let v = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask::<_CMP_LT_OQ>(_mm512_abs_ps(v), inf), v);
        let mut hi = _mm512_roundscale_ps::<NEAREST>(_mm512_mul_ps(v, inv_hi));
        // Exact (see `split_group`), so fused or not makes no difference.
        let rest = _mm512_fnmadd_ps(hi, unit, v);
        let mut lo = _mm512_roundscale_ps::<NEAREST>(_mm512_mul_ps(rest, inv_lo));
        let carry = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(lo, _mm512_set1_ps(127.0));
        hi = _mm512_mask_add_ps(hi, carry, hi, _mm512_set1_ps(1.0));
        lo = _mm512_mask_sub_ps(lo, carry, lo, _mm512_set1_ps(256.0));
        // SAFETY: v0 + 16 ≤ 128 bytes of each array.
        unsafe {
            _mm_storeu_si128(
                hi8.as_mut_ptr().add(v0) as *mut __m128i,
                _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(hi)),
            );
            _mm_storeu_si128(
                lo8.as_mut_ptr().add(v0) as *mut __m128i,
                _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(lo)),
            );
        }
    }
}

/// The smallest `e` with `max ≤ 127·2^e` (0 for `max = 0`); `avx2i16`'s grid too.
pub(crate) fn grid_exponent(max: f32) -> i32 {
    if max <= 0.0 {
        return 0;
    }
    let max = max as f64;
    // An estimate from the exponent of max/127, then exact checks against powers of two.
    let t = (max / 127.0).to_bits();
    let mut e = ((t >> 52) & 0x7ff) as i32 - 1023 + i32::from(t & ((1 << 52) - 1) != 0);
    while max > 127.0 * pow2(e) {
        e += 1;
    }
    while max <= 127.0 * pow2(e - 1) {
        e -= 1;
    }
    e
}

/// 2^e, exactly, for |e| < 1000.
#[inline(always)]
pub(crate) fn pow2(e: i32) -> f64 {
    f64::from_bits(((e + 1023) as u64) << 52)
}

/// Round half to even for |v| < 2^51, without a libm call.
#[inline(always)]
pub(crate) fn round(v: f64) -> f64 {
    const MAGIC: f64 = 6755399441055744.0; // 1.5·2^52
    (v + MAGIC) - MAGIC
}

/// Constant vectors the decode of widths other than 4 and 8 needs, built once per call.
#[derive(Clone, Copy)]
pub(crate) struct Tables {
    /// `vpermb` indices and `vpmultishiftqb` controls.
    spread: __m512i,
    ctl: __m512i,
    /// `2^bits − 1` in every byte.
    mask: __m512i,
    /// The direct decodes of [`decode_sb`] (1-, 2- and 3-bit codes): 1-bit, the `vpermq`
    /// indices of pieces 0 and 1 and the four bit tests; 2-bit, the `vpmultishiftqb`
    /// controls of bit fields 0..3; 3-bit, the `vpermt2b` indices of register pairs (0, 1)
    /// and (2, 3) and the controls of the pair's first and second register.
    idx: [__m512i; 2],
    sel: [__m512i; 4],
    /// 1 in every byte.
    ones: __m512i,
    /// [`E2M1_CODES`] in every 128-bit lane (mxfp4).
    e2m1: __m512i,
}

/// Whether [`decode_sb`] decodes `BITS`-bit codes in groups of `G` directly into the
/// [`slot`] layout (without decoding each group in element order first).
const fn direct(bits: usize, g: usize) -> bool {
    matches!((bits, g), (1 | 2, 64 | 128) | (3, 32 | 64))
}

#[target_feature(enable = "avx512f,avx512bw")]
pub(crate) fn tables<const BITS: usize, const G: usize>() -> Tables {
    let spread: [u8; 64] = std::array::from_fn(|i| ((i / 8) * BITS + i % 8).min(63) as u8);
    let ctl: [u8; 64] = std::array::from_fn(|i| ((i % 8) * BITS) as u8);
    let mut idx = [[0u8; 64]; 2];
    let mut sel = [[0u8; 64]; 4];
    match BITS {
        1 => {
            // Piece p (8 bytes) of group j is qword j (G = 64) or 2j + p (G = 128): lane j
            // takes it twice.
            for (p, ix) in idx.iter_mut().enumerate() {
                for q in 0..8 {
                    ix[8 * q] = if G == 64 { q / 2 } else { 2 * (q / 2) + p } as u8;
                }
            }
            // Register i tests bit i in a lane's bytes 0..8, bit i + 4 in bytes 8..16.
            for (i, sl) in sel.iter_mut().enumerate() {
                for (t, b) in sl.iter_mut().enumerate() {
                    *b = 1 << (i + 4 * (t % 16 / 8));
                }
            }
        }
        2 => {
            // Bit field i of every byte: bits 2i.. of the byte (the qword's byte t % 8).
            for (i, sl) in sel.iter_mut().enumerate() {
                for (t, b) in sl.iter_mut().enumerate() {
                    *b = (8 * (t % 8) + 2 * i) as u8;
                }
            }
        }
        3 => {
            // Qword h of lane j of register i holds elements 16i + 8h.. of group j: the 3
            // bytes at 3(2i + h) of the group. A pair's permutation puts register 2P's
            // bytes at 0..3 of the qword and register 2P + 1's at 3..6.
            let bpg = G / 8 * 3;
            for (pair, ix) in idx.iter_mut().enumerate() {
                for (q, b) in ix.iter_mut().enumerate() {
                    let (j, h, k) = (q / 16, q % 16 / 8, q % 8);
                    let (i, k) = if k < 3 {
                        (2 * pair, k)
                    } else {
                        (2 * pair + 1, k - 3)
                    };
                    if k < 3 && i < G / 16 {
                        *b = (j * bpg + 3 * (2 * i + h) + k) as u8;
                    }
                }
            }
            for (t, b) in sel[0].iter_mut().enumerate() {
                *b = (3 * (t % 8)) as u8;
            }
            for (t, b) in sel[1].iter_mut().enumerate() {
                *b = (24 + 3 * (t % 8)) as u8;
            }
        }
        _ => {}
    }
    let v = |a: &[u8; 64]| {
        // SAFETY: reads exactly the 64 bytes of `a`.
        unsafe { _mm512_loadu_si512(a.as_ptr() as *const __m512i) }
    };
    Tables {
        spread: v(&spread),
        ctl: v(&ctl),
        mask: _mm512_set1_epi8(((1u32 << BITS) - 1) as u8 as i8),
        idx: [v(&idx[0]), v(&idx[1])],
        sel: [v(&sel[0]), v(&sel[1]), v(&sel[2]), v(&sel[3])],
        ones: _mm512_set1_epi8(1),
        // SAFETY: reads exactly the 16 bytes of the table.
        e2m1: _mm512_broadcast_i32x4(unsafe {
            _mm_loadu_si128(E2M1_CODES.as_ptr() as *const __m128i)
        }),
    }
}

/// The `CH` codes (32 or 64) at `p`, `BITS` wide, as bytes in element order (lanes ≥ CH
/// hold garbage).
///
/// # Safety
/// `p` points to `CH·BITS/8` readable bytes; the CPU supports [`available`]'s features.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx512vnni")]
unsafe fn decode_fields<const BITS: usize, const CH: usize>(p: *const u8, t: &Tables) -> __m512i {
    let mask: __mmask64 = (1u64 << (CH / 8 * BITS)) - 1;
    // SAFETY: the masked load touches only the CH·BITS/8 bytes the caller guarantees.
    let raw = unsafe { _mm512_maskz_loadu_epi8(mask, p as *const i8) };
    let fields = _mm512_multishift_epi64_epi8(t.ctl, _mm512_permutexvar_epi8(t.spread, raw));
    _mm512_and_si512(fields, t.mask)
}

/// 64 bytes at `p`, of which the first `n` are read (the rest zero).
///
/// # Safety
/// `p` points to `min(n, 64)` readable bytes; the CPU supports [`available`]'s features.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn load_first(p: *const u8, n: usize) -> __m512i {
    // SAFETY: the caller guarantees the bytes each branch reads.
    unsafe {
        if n >= 64 {
            _mm512_loadu_si512(p as *const __m512i)
        } else {
            _mm512_maskz_loadu_epi8((1u64 << n) - 1, p as *const i8)
        }
    }
}

/// 128-bit lanes `(a.i0, a.i1, b.i0, b.i1)` of `(a, b)` with `I = i0 | i1 << 2 | i0 << 4 |
/// i1 << 6`: `0x88` takes lanes 0 and 2, `0xDD` lanes 1 and 3, `0x44` lanes 0 and 1.
#[inline(always)]
fn lanes<const I: i32>(a: __m512i, b: __m512i) -> __m512i {
    // SAFETY: AVX-512F, which every caller's target features include.
    unsafe { _mm512_shuffle_i64x2::<I>(a, b) }
}

/// Registers `[a, b, c, d]` of four 128-bit pieces each (one group per register) as four
/// registers of one piece per group: `out[i] = (a.i, b.i, c.i, d.i)`.
#[inline(always)]
fn transpose4(a: __m512i, b: __m512i, c: __m512i, d: __m512i) -> [__m512i; 4] {
    let (t0, t1) = (lanes::<0x88>(a, b), lanes::<0xDD>(a, b));
    let (t2, t3) = (lanes::<0x88>(c, d), lanes::<0xDD>(c, d));
    [
        lanes::<0x88>(t0, t2),
        lanes::<0x88>(t1, t3),
        lanes::<0xDD>(t0, t2),
        lanes::<0xDD>(t1, t3),
    ]
}

/// The code registers of one superblock: the `valid ≤ 4` groups of `G` codes `BITS` wide
/// packed at `p`, in the [`slot`] layout (registers `G/16..` and missing groups' lanes
/// zero).
///
/// # Safety
/// `p` points to `valid·G·BITS/8` readable bytes; the CPU supports [`available`]'s features.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx512vnni")]
pub(crate) unsafe fn decode_sb<const BITS: usize, const G: usize, const FULL: bool>(
    p: *const u8,
    valid: usize,
    t: &Tables,
) -> [__m512i; 8] {
    // A full superblock (the steady state) takes plain loads: no mask arithmetic or branch.
    let valid = if FULL { SB } else { valid };
    let bpg = G / 8 * BITS;
    let zero = _mm512_setzero_si512();
    let mut out = [zero; 8];
    if BITS == 4 || BITS == 8 || (BITS == 2 && direct(BITS, G)) {
        // The four groups' bytes are contiguous: P registers of 16-byte pieces, group-major.
        let pieces = bpg / 16;
        let vb = valid * bpg;
        let mut raw = [zero; 8];
        for (k, r) in raw.iter_mut().enumerate().take(pieces) {
            // SAFETY: the bytes before `vb` are readable (caller).
            *r = unsafe {
                if FULL {
                    _mm512_loadu_si512(p.wrapping_add(64 * k) as *const __m512i)
                } else {
                    load_first(p.wrapping_add(64 * k), vb.saturating_sub(64 * k))
                }
            };
        }
        let mut tr = [zero; 8];
        match pieces {
            1 => tr[0] = raw[0],
            2 => {
                tr[0] = lanes::<0x88>(raw[0], raw[1]);
                tr[1] = lanes::<0xDD>(raw[0], raw[1]);
            }
            4 => tr[..4].copy_from_slice(&transpose4(raw[0], raw[1], raw[2], raw[3])),
            _ => {
                tr[..4].copy_from_slice(&transpose4(raw[0], raw[2], raw[4], raw[6]));
                tr[4..].copy_from_slice(&transpose4(raw[1], raw[3], raw[5], raw[7]));
            }
        }
        if BITS == 8 {
            return tr;
        }
        if BITS == 2 {
            // Bit field i of every byte (a `vpmultishiftqb` per register, field 0 as it is).
            for pi in 0..pieces {
                out[4 * pi] = _mm512_and_si512(tr[pi], t.mask);
                for i in 1..4 {
                    let f = _mm512_multishift_epi64_epi8(t.sel[i], tr[pi]);
                    out[4 * pi + i] = _mm512_and_si512(f, t.mask);
                }
            }
            return out;
        }
        let nib = _mm512_set1_epi8(0x0f);
        for pi in 0..pieces {
            out[2 * pi] = _mm512_and_si512(tr[pi], nib);
            out[2 * pi + 1] = _mm512_and_si512(_mm512_srli_epi16::<4>(tr[pi]), nib);
        }
        return out;
    }
    if BITS == 1 && direct(BITS, G) {
        // The superblock is 32 (G = 64) or 64 bytes: piece p of every group is spread to
        // both halves of the group's lane (`vpermq`) and register 4p + i is a bit test.
        let vb = valid * bpg;
        // SAFETY: the bytes before `vb` are readable (caller).
        let raw = unsafe {
            match (FULL, G) {
                (true, 64) => _mm512_castsi256_si512(_mm256_loadu_si256(p as *const __m256i)),
                (true, _) => _mm512_loadu_si512(p as *const __m512i),
                _ => load_first(p, vb),
            }
        };
        for pi in 0..G / 64 {
            let src = _mm512_permutexvar_epi64(t.idx[pi], raw);
            for i in 0..4 {
                let bit = _mm512_test_epi8_mask(src, t.sel[i]);
                out[4 * pi + i] = _mm512_maskz_mov_epi8(bit, t.ones);
            }
        }
        return out;
    }
    if BITS == 3 && direct(BITS, G) {
        // The superblock is 48 (G = 32) or 96 bytes: one byte permutation per register pair
        // gathers each qword's 8 + 8 codes (3 + 3 bytes), two `vpmultishiftqb` take them apart.
        let vb = valid * bpg;
        // SAFETY: the bytes before `vb` are readable (caller).
        let (lo, hi) = unsafe {
            if FULL && G == 64 {
                (
                    _mm512_loadu_si512(p as *const __m512i),
                    _mm512_castsi256_si512(
                        _mm256_loadu_si256(p.wrapping_add(64) as *const __m256i),
                    ),
                )
            } else {
                (
                    load_first(p, vb),
                    load_first(p.wrapping_add(64), vb.saturating_sub(64)),
                )
            }
        };
        for pair in 0..G / 32 {
            let pr = if G == 64 {
                _mm512_permutex2var_epi8(lo, t.idx[pair], hi)
            } else {
                _mm512_permutexvar_epi8(t.idx[pair], lo)
            };
            for h in 0..2 {
                let f = _mm512_multishift_epi64_epi8(t.sel[h], pr);
                out[2 * pair + h] = _mm512_and_si512(f, t.mask);
            }
        }
        return out;
    }
    // Other widths: each group's codes decoded in element order, 64 (or 32) per register,
    // then its 16-code pieces gathered across the four groups.
    let ch = G.min(64);
    let mut d = [[zero; 2]; SB];
    for (j, dj) in d.iter_mut().enumerate().take(valid) {
        for (h, dh) in dj.iter_mut().enumerate().take(G / ch) {
            let q = p.wrapping_add(j * bpg + h * ch / 8 * BITS);
            // SAFETY: group j < valid lies within the caller's bytes.
            *dh = unsafe {
                if G == 32 {
                    decode_fields::<BITS, 32>(q, t)
                } else {
                    decode_fields::<BITS, 64>(q, t)
                }
            };
        }
    }
    match G {
        32 => {
            let (r0, r1) = (
                lanes::<0x44>(d[0][0], d[1][0]),
                lanes::<0x44>(d[2][0], d[3][0]),
            );
            out[0] = lanes::<0x88>(r0, r1);
            out[1] = lanes::<0xDD>(r0, r1);
        }
        64 => out[..4].copy_from_slice(&transpose4(d[0][0], d[1][0], d[2][0], d[3][0])),
        _ => {
            out[..4].copy_from_slice(&transpose4(d[0][0], d[1][0], d[2][0], d[3][0]));
            out[4..].copy_from_slice(&transpose4(d[0][1], d[1][1], d[2][1], d[3][1]));
        }
    }
    out
}

/// [`decode_sb`], the codes then taken through [`E2M1_CODES`] for mxfp4 ([`Groups::FP4`]).
///
/// # Safety
/// As for [`decode_sb`].
#[inline(always)]
unsafe fn decode<P: Groups, const BITS: usize, const G: usize, const FULL: bool>(
    p: *const u8,
    valid: usize,
    t: &Tables,
) -> [__m512i; 8] {
    // SAFETY: the caller's contract.
    let mut c = unsafe { decode_sb::<BITS, G, FULL>(p, valid, t) };
    if P::FP4 {
        for r in c.iter_mut().take(G / 16) {
            // SAFETY: the caller guarantees the CPU features.
            *r = unsafe { _mm512_shuffle_epi8(t.e2m1, *r) };
        }
    }
    c
}

/// The kernel.
pub(crate) fn qmm_t<P: Groups, O: Float, const BITS: usize>(a: QmmArgs<'_>) -> Result<()> {
    super::x86_columns::with_group!(a.w.group_size, G => qmm_t_g::<P, O, BITS, G>(a))
}

fn qmm_t_g<P: Groups, O: Float, const BITS: usize, const G: usize>(a: QmmArgs<'_>) -> Result<()> {
    const OP: &str = "quantized_matmul";
    // mxfp4 has no biases: its bias factors come from the scales (`Groups::factors16`).
    let a = a.operands::<P::E, O>(OP, true, !P::FP4)?;
    let (m, n, k) = (a.m, a.rows, a.cols);
    // K blocks such that the split rows of x a column visits stay in L1, whole superblocks.
    let x_block = if m <= ROWS {
        X_BLOCK_BYTES_DECODE
    } else {
        X_BLOCK_BYTES
    };
    let walk = Walk::new(m, n, k, G, ROWS, 2, x_block).in_superblocks(SB);
    let mut prep = SCRATCH.with(|s| std::mem::take(&mut *s.borrow_mut()));
    prepare(a.x, m, k, G, BITS, &mut prep);
    let kernel = Kernel::<P, BITS, G> {
        w: a.w,
        prep: &prep,
        nsb: (k / G).div_ceil(SB),
        // SAFETY: this variant is only chosen where `available` holds.
        tables: unsafe { tables::<BITS, G>() },
        // One block of rows: W streams at the memory's pace (see `PrefetchTo`).
        prefetch: if m <= ROWS {
            PrefetchTo::stream(m)
        } else {
            PrefetchTo::L1
        },
        stream: m <= ROWS,
        cols: if m == 1 && k <= one_column_k() {
            1
        } else {
            <Kernel<P, BITS, G> as Columns>::COLS
        },
    };
    // SAFETY: as for `tables`.
    unsafe { run(&kernel, walk, a.out) };
    SCRATCH.with(|s| *s.borrow_mut() = prep);
    Ok(())
}

/// Everything one call's columns read.
struct Kernel<'a, P: Groups, const BITS: usize, const G: usize> {
    w: Rows<'a, P::E>,
    prep: &'a Prepared,
    /// Superblocks per row of x.
    nsb: usize,
    tables: Tables,
    /// Columns per call: [`Columns::COLS`], or 1 (see [`one_column_k`]).
    cols: usize,
    /// Where W's prefetches go.
    prefetch: PrefetchTo,
    /// Whether the call is one block of rows (W streams at the memory's pace).
    stream: bool,
}

impl<P: Groups, const BITS: usize, const G: usize> Kernel<'_, P, BITS, G> {
    /// A [`Column`] for rows `row0..` of x from group `g0`, with no columns' slices yet.
    fn args(&self, row0: usize, g0: usize) -> Column<'_, P::E> {
        Column {
            packed: [&[]; MAX_COLS],
            scales: [&[]; MAX_COLS],
            biases: [&[]; MAX_COLS],
            prep: self.prep,
            row0,
            g0,
            nsb: self.nsb,
            tables: &self.tables,
            row_bytes: self.w.row_bytes,
            prefetch: self.prefetch,
            stream: self.stream,
        }
    }
}

impl<P: Groups, const BITS: usize, const G: usize> Columns for Kernel<'_, P, BITS, G> {
    const ROWS: usize = ROWS;
    /// Two columns share each load of x, except with groups of 128, whose eight code
    /// registers per column leave no room for a second column's.
    const COLS: usize = if G == 128 { 1 } else { 2 };

    fn cols(&self) -> usize {
        self.cols
    }

    unsafe fn columns<const R: usize>(
        &self,
        col: usize,
        count: usize,
        g0: usize,
        g1: usize,
        row0: usize,
        acc: &mut [[f32; MAX_ROWS]; MAX_COLS],
    ) {
        let mut args = self.args(row0, g0);
        for c in 0..count.min(Self::COLS) {
            let Some((packed, scales, biases)) = self.w.row(col + c, g0, g1, BITS) else {
                return;
            };
            (args.packed[c], args.scales[c], args.biases[c]) = (packed, scales, biases);
        }
        // SAFETY: the caller guarantees the CPU features; `columns` checks the slices.
        unsafe {
            match (count, Self::COLS) {
                (1, _) | (_, 1) => columns::<P, BITS, G, R, 1>(&args, acc),
                _ => columns::<P, BITS, G, R, 2>(&args, acc),
            }
        }
    }

    /// One column at a time with groups of 32 or 64 (M = 1, K up to [`one_column_k`]): one
    /// call for the task's columns, which checks the slices once and runs [`one_column`] per
    /// column (a call per column cost ~20% of a 4096-long row's time; docs/perf.md, session
    /// 42); otherwise the default.
    unsafe fn row_run(
        &self,
        cols: std::ops::Range<usize>,
        g0: usize,
        g1: usize,
        row0: usize,
        acc: &mut [f32],
    ) {
        if self.cols == 1 && G <= 64 {
            // SAFETY: the caller guarantees the CPU features.
            unsafe {
                if BITS == 8 && !zen3_or_4() {
                    one_column_run::<P, BITS, G, 1>(self, cols, g0, g1, row0, acc)
                } else {
                    one_column_run::<P, BITS, G, 2>(self, cols, g0, g1, row0, acc)
                }
            }
        } else {
            // SAFETY: the caller's contract.
            unsafe { super::x86_columns::columns_one_row(self, cols, g0, g1, row0, acc) }
        }
    }
}

/// [`Columns::row_run`] by [`one_column`]: `acc[i] +=` row `row0` of x · groups `g0..g1` of
/// weight row `cols.start + i`, every slice checked once for the run (nothing is read, and
/// `acc` is left as it is, where any is out of range).
///
/// # Safety
/// The CPU must support [`available`]'s features; `G / 16 ≤ 4`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx512vnni")]
unsafe fn one_column_run<P: Groups, const BITS: usize, const G: usize, const U: usize>(
    k: &Kernel<'_, P, BITS, G>,
    cols: std::ops::Range<usize>,
    g0: usize,
    g1: usize,
    row0: usize,
    acc: &mut [f32],
) {
    let (nr, nsb) = (G / 16, k.nsb);
    let groups = g1.saturating_sub(g0);
    let rows_end = row0 + 1;
    // The checks of `columns` for R = 1, once: the last column's slices are in range, and so
    // every earlier column's (rows lie at increasing offsets).
    if cols.is_empty()
        || acc.len() < cols.len()
        || groups == 0
        || !k.prep.covers(rows_end, nsb, g0, groups, nr)
        || nr > 4
        || k.w.row(cols.end - 1, g0, g1, BITS).is_none()
    {
        return;
    }
    let mut args = k.args(row0, g0);
    for (a, col) in acc.iter_mut().zip(cols) {
        let Some((packed, scales, biases)) = k.w.row(col, g0, g1, BITS) else {
            return;
        };
        (args.packed[0], args.scales[0], args.biases[0]) = (packed, scales, biases);
        // SAFETY: this column's slices are those `columns` checks, in range as checked above;
        // the caller guarantees the CPU features.
        *a += unsafe { one_column::<P, BITS, G, U>(&args) };
    }
}

/// Up to [`MAX_COLS`] columns' slices of K (groups `g0..g0 + scales.len()`) for rows
/// `row0..row0 + R` of x.
struct Column<'a, S> {
    packed: [&'a [u8]; MAX_COLS],
    scales: [&'a [S]; MAX_COLS],
    biases: [&'a [S]; MAX_COLS],
    prep: &'a Prepared,
    row0: usize,
    g0: usize,
    nsb: usize,
    tables: &'a Tables,
    /// Bytes from one weight row to the next.
    row_bytes: usize,
    /// Where W's prefetches go.
    prefetch: PrefetchTo,
    /// Whether the call is one block of rows (W streams at the memory's pace).
    stream: bool,
}

/// `acc[c][r] = Σ over this K slice of x[row0 + r]·ŵ[c]`, for `R` rows and `C` columns
/// (each load of x serves every column).
///
/// # Safety
/// The CPU must support [`available`]'s features.
// Index loops: each step reads the same row or column of several register arrays (codes,
// accumulators, scale factors), which iterators over one of them would only obscure.
#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx512vnni")]
unsafe fn columns<P: Groups, const BITS: usize, const G: usize, const R: usize, const C: usize>(
    a: &Column<'_, P::E>,
    acc: &mut [[f32; MAX_ROWS]],
) {
    let nr = G / 16;
    let bpg = G / 8 * BITS;
    let groups = a.scales[0].len();
    let (nsb, g0) = (a.nsb, a.g0);
    let rows_end = a.row0 + R;
    if (0..C).any(|c| {
        a.scales[c].len() != groups
            || a.biases[c].len() < groups
            || a.packed[c].len() < groups * bpg
    }) || !a.prep.covers(rows_end, nsb, g0, groups, nr)
        || C > MAX_COLS
        || acc.len() < C
    {
        return;
    }
    // One row of x and one column (decode at M = 1): the dedicated loop (see
    // `one_column`). Wider groups (eight code registers a superblock) leave no registers for
    // a second superblock and take the general loop.
    if R == 1 && C == 1 && nr <= 4 {
        // SAFETY: the slices were checked above; the caller guarantees the CPU features.
        acc[0][0] = unsafe {
            if BITS == 8 && !zen3_or_4() {
                one_column::<P, BITS, G, 1>(a)
            } else {
                one_column::<P, BITS, G, 2>(a)
            }
        };
        return;
    }
    let zero = _mm512_setzero_ps();
    // The bias terms `b·Σx` go straight into the sums.
    let mut vacc = [[zero; R]; C];
    let (split, step, xsum) = (
        a.prep.split().as_ptr(),
        a.prep.step.as_ptr(),
        a.prep.xsum.as_ptr(),
    );
    // Lane 4j + u of a superblock's factors: group j's (of the current four).
    let spread4 = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    // Superblock q's scales (of a block of 16 groups' `s16`) spread to those lanes.
    let spread = |s16: __m512, q: usize| {
        _mm512_permutexvar_ps(
            _mm512_add_epi32(spread4, _mm512_set1_epi32(4 * q as i32)),
            s16,
        )
    };
    // `vpshufb` indices (within each 128-bit lane) moving every dword's bytes up by one, the
    // top one out and a zero in: a left shift by 8, exact here as `|h|·256 < 2^31` (h sums
    // at most 32 products `q·hi`, each below 2^15). Opaque to the compiler, which would
    // otherwise turn the constant shuffle back into `vpslld`.
    let (d0, d1, d2, d3) = (0x0201_0080, 0x0605_0480, 0x0a09_0880, 0x0e0d_0c80);
    let shl8 = std::hint::black_box(_mm512_setr_epi32(
        d0, d1, d2, d3, d0, d1, d2, d3, d0, d1, d2, d3, d0, d1, d2, d3,
    ));
    let len = groups * bpg;
    for j0 in (0..groups).step_by(16) {
        let valid16 = (groups - j0).min(16);
        let m16: __mmask16 = ((1u32 << valid16) - 1) as u16;
        let mut s16 = [zero; C];
        for c in 0..C {
            prefetch_scales(a, c, j0, C);
            // SAFETY: groups j0..j0 + valid16 of this slice are in `scales`/`biases`, and of
            // rows row0..row0 + R in `xsum` (all checked above).
            unsafe {
                let b;
                [s16[c], b] = P::factors16(
                    a.scales[c].as_ptr().add(j0),
                    a.biases[c].as_ptr().add(j0),
                    m16,
                );
                for r in 0..R {
                    let at = (a.row0 + r) * nsb * SB + g0 + j0;
                    let xs = _mm512_maskz_loadu_ps(m16, xsum.add(at));
                    vacc[c][r] = _mm512_fmadd_ps(b, xs, vacc[c][r]);
                }
            }
        }
        let nq = valid16.div_ceil(SB);
        let mut q = 0;
        while q < nq {
            let jb = j0 + q * SB;
            let valid = (groups - jb).min(SB);
            let sbi = (g0 + jb) / SB;
            let mut sv = [zero; C];
            let mut codes = [[_mm512_setzero_si512(); 8]; C];
            for c in 0..C {
                sv[c] = spread(s16[c], q);
                let pp = a.packed[c].as_ptr();
                let off = jb * bpg;
                // The next slice of this column's stream is C rows of W on.
                for l in (0..SB * bpg).step_by(64) {
                    prefetch_w(pp, off + l, len, C * a.row_bytes, C, a.prefetch);
                }
                // SAFETY: groups jb..jb + valid of this slice lie in `packed` (checked).
                codes[c] = unsafe {
                    if valid == SB {
                        decode::<P, BITS, G, true>(pp.add(off), valid, a.tables)
                    } else {
                        decode::<P, BITS, G, false>(pp.add(off), valid, a.tables)
                    }
                };
            }
            // Superblock sbi of rows row0.. (in `split` and `step`: checked above).
            let px: [*const __m512i; R] = std::array::from_fn(|r| {
                split.wrapping_add(((a.row0 + r) * nsb + sbi) * nr * 128) as *const __m512i
            });
            // The dot products, rows interleaved so that consecutive `vpdpbusd` belong to
            // different chains. With few rows, hi and lo take separate chains too (joined
            // by a shift and an add): a chain of 2·g/16 dependent `vpdpbusd` per superblock
            // would otherwise outlast the work there is to overlap it with.
            let zi = _mm512_setzero_si512();
            let mut dh = [[zi; C]; R];
            let mut dl = [[zi; C]; R];
            // SAFETY: as above, for every load through `px`.
            unsafe {
                if R <= 2 {
                    // Even and odd registers in separate chains as well: a chain of g/16
                    // dependent `vpdpbusd` per superblock was what the M = 1 loop waited on.
                    let mut dh2 = [[zi; C]; R];
                    let mut dl2 = [[zi; C]; R];
                    for i in 0..nr {
                        for r in 0..R {
                            let xh = _mm512_loadu_si512(px[r].add(2 * i));
                            let xl = _mm512_loadu_si512(px[r].add(2 * i + 1));
                            for c in 0..C {
                                if i % 2 == 0 {
                                    dh[r][c] = _mm512_dpbusd_epi32(dh[r][c], codes[c][i], xh);
                                    dl[r][c] = _mm512_dpbusd_epi32(dl[r][c], codes[c][i], xl);
                                } else {
                                    dh2[r][c] = _mm512_dpbusd_epi32(dh2[r][c], codes[c][i], xh);
                                    dl2[r][c] = _mm512_dpbusd_epi32(dl2[r][c], codes[c][i], xl);
                                }
                            }
                        }
                    }
                    for r in 0..R {
                        for c in 0..C {
                            let h = _mm512_add_epi32(dh[r][c], dh2[r][c]);
                            let l = _mm512_add_epi32(dl[r][c], dl2[r][c]);
                            dh[r][c] = _mm512_add_epi32(_mm512_slli_epi32::<8>(h), l);
                        }
                    }
                } else {
                    for i in 0..nr {
                        for r in 0..R {
                            let xh = _mm512_loadu_si512(px[r].add(2 * i));
                            for c in 0..C {
                                dh[r][c] = _mm512_dpbusd_epi32(dh[r][c], codes[c][i], xh);
                            }
                        }
                    }
                    // `<< 8` as a byte shuffle, which runs on port 5: `vpslld` would take
                    // port 0, which the dot products and conversions already fill. (Index
                    // loops, not `iter_mut().flatten()`: the iterator made the compiler keep
                    // `dh` in memory and shift it there, every superblock.)
                    for r in 0..R {
                        for c in 0..C {
                            dh[r][c] = _mm512_shuffle_epi8(dh[r][c], shl8);
                        }
                    }
                    for i in 0..nr {
                        for r in 0..R {
                            let xl = _mm512_loadu_si512(px[r].add(2 * i + 1));
                            for c in 0..C {
                                dh[r][c] = _mm512_dpbusd_epi32(dh[r][c], codes[c][i], xl);
                            }
                        }
                    }
                }
                for r in 0..R {
                    let st = _mm512_loadu_ps(step.add(((a.row0 + r) * nsb + sbi) * 16));
                    for c in 0..C {
                        let f = _mm512_mul_ps(sv[c], st);
                        vacc[c][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dh[r][c]), f, vacc[c][r]);
                    }
                }
            }
            q += 1;
        }
    }
    for c in 0..C {
        for r in 0..R {
            acc[c][r] = _mm512_reduce_add_ps(vacc[c][r]);
        }
    }
}

/// [`prefetch_groups`] for column `c` of `a`, where W streams at the memory's pace (one
/// block of rows, prefetches into L2): with more rows the loop computes long enough per line
/// for the hardware prefetcher, and the extra prefetches cost M = 8 15% (docs/perf.md,
/// session 28).
#[inline(always)]
fn prefetch_scales<S>(a: &Column<'_, S>, c: usize, j0: usize, share: usize) {
    if a.stream {
        let (scales, biases) = (a.scales[c], a.biases[c]);
        prefetch_groups(
            scales,
            biases,
            j0,
            a.packed[c].len(),
            a.row_bytes,
            share,
            a.prefetch,
        );
    }
}

/// [`columns`] for one row of x and one column (groups of 32 or 64): the decode step at
/// M = 1, which streams W and must keep pace with memory. `U` full superblocks at a time,
/// their dot products interleaved (see [`dots`]): two (session 24, Zen 4: 1–20% faster than
/// one, every width), except 8-bit codes on CPUs other than Zen 3/4 (on Zen 5 one at a time
/// was 5–14% faster at 8 bits from memory, equal at 4; docs/perf.md, session 28); a row's
/// last superblocks, where fewer than `U` full ones are left, one at a time, the very last
/// possibly partial (masked loads; its missing groups' x, steps and Σx are zero). Nothing
/// else in the loop: the scale lanes come from four constant index
/// vectors, and where the column's slice is its whole row (the next slice the task reads
/// starts where this one ends) the prefetch address is a fixed distance along the stream.
/// The general loop spent ~40 of its ~135 instructions per pair on the prefetch's wrap to
/// the next slice and on reloading spilled pointers; this one has ~75, and ran 10–20% faster
/// with W in L3 on one Zen 5 core (docs/perf.md, session 28). Whole blocks of 16 groups of a
/// whole row take full steps only, with no tail logic and the prefetches in ascending order
/// (session 42: 11–17% faster with W in L2 on one Xeon core, 1–10% from memory below 8 bits).
///
/// # Safety
/// [`columns`]' checks hold for `R = 1`, `C = 1`; `G / 16 ≤ 4`; the CPU supports
/// [`available`]'s features.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx512vnni")]
unsafe fn one_column<P: Groups, const BITS: usize, const G: usize, const U: usize>(
    a: &Column<'_, P::E>,
) -> f32 {
    let nr = G / 16;
    let bpg = G / 8 * BITS;
    let groups = a.scales[0].len();
    let len = groups * bpg;
    let pp = a.packed[0].as_ptr();
    let (sp, bp) = (a.scales[0].as_ptr(), a.biases[0].as_ptr());
    let base = (a.row0 * a.nsb + a.g0 / SB) as isize;
    let split = a.prep.split().as_ptr() as *const __m512i;
    let (step, xsum) = (a.prep.step.as_ptr(), a.prep.xsum.as_ptr());
    // Where the stream continues past this slice: right after it (a whole row), or else the
    // general rule.
    let linear = len == a.row_bytes;
    let spread4 = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    let idx: [__m512i; 4] =
        std::array::from_fn(|q| _mm512_add_epi32(spread4, _mm512_set1_epi32(4 * q as i32)));
    let zero = _mm512_setzero_ps();
    let (mut vacc, mut v2) = (zero, [zero; 2]);
    for j0 in (0..groups).step_by(16) {
        let valid16 = (groups - j0).min(16);
        let m16: __mmask16 = ((1u32 << valid16) - 1) as u16;
        prefetch_scales(a, 0, j0, 1);
        // SAFETY: groups j0..j0 + valid16 lie in the slice's scales and biases and in row
        // row0's Σx (the caller's checks).
        let s16 = unsafe {
            let [s, b] = P::factors16(sp.add(j0), bp.add(j0), m16);
            let xs = _mm512_maskz_loadu_ps(m16, xsum.add(a.row0 * a.nsb * SB + a.g0 + j0));
            vacc = _mm512_fmadd_ps(b, xs, vacc);
            s
        };
        // The scaled sums of `U` full superblocks from `off` (superblock `sb` of x), the
        // block's `q`-th on.
        let full = |q: usize, off: usize, sb: isize, v2: &mut [__m512; 2]| {
            let px = split.wrapping_offset(sb * nr as isize * 2);
            let st = step.wrapping_offset(sb * 16);
            // SAFETY: the U superblocks from `off` lie in the slice, and superblocks sb.. of
            // row row0 in the split and the steps (the callers' checks).
            unsafe {
                let c: [[__m512i; 8]; U] = std::array::from_fn(|u| {
                    decode::<P, BITS, G, true>(pp.add(off + u * SB * bpg), SB, a.tables)
                });
                let h = dots::<U>(nr, c, px);
                for u in 0..U {
                    let sv = _mm512_permutexvar_ps(idx[(q + u) % 4], s16);
                    let f = _mm512_mul_ps(sv, _mm512_loadu_ps(st.add(16 * u)));
                    v2[u] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(h[u]), f, v2[u]);
                }
            }
        };
        if valid16 == 16 && linear {
            // The steady state: a whole block of a whole row, whose stream continues right
            // after it. Full steps only, the prefetches in the stream's order (ascending,
            // one after another: with the compiler's order of `_mm_prefetch`es and the tail
            // logic below, this loop ran 11–17% slower on a Xeon; docs/perf.md, session 42).
            for q in (0..4).step_by(U) {
                let off = (j0 + q * SB) * bpg;
                a.prefetch.prefetch_lines(
                    pp.wrapping_add(off + super::x86_columns::PREFETCH_AHEAD),
                    U * SB * bpg,
                );
                full(q, off, base + ((j0 + q * SB) / SB) as isize, &mut v2);
            }
            continue;
        }
        let nq = valid16.div_ceil(SB);
        let mut q = 0;
        while q < nq {
            let jb = j0 + q * SB;
            let left = groups - jb;
            // Full superblocks this step: U where as many are left, else one (full or not).
            let step_sbs = if left >= U * SB { U } else { 1 };
            let off = jb * bpg;
            for l in (0..step_sbs * SB * bpg).step_by(64) {
                if linear {
                    a.prefetch
                        .prefetch(pp.wrapping_add(off + l + super::x86_columns::PREFETCH_AHEAD));
                } else {
                    prefetch_w(pp, off + l, len, a.row_bytes, 1, a.prefetch);
                }
            }
            let sb = base + (jb / SB) as isize;
            if left >= U * SB {
                full(q, off, sb, &mut v2);
                q += U;
                continue;
            }
            // One superblock, full or not (with `U = 1`, `step_sbs == U` also where it is
            // partial: until session 42 that case took the full decode, which read past the
            // slice's end; the missing groups' x and scales are zero, so only the read was
            // wrong, never the sum).
            let px = split.wrapping_offset(sb * nr as isize * 2);
            let st = step.wrapping_offset(sb * 16);
            // SAFETY: groups jb..jb + min(left, SB) lie in the slice, and superblock sb of row
            // row0 in the split and the steps, which cover the row's groups padded to whole
            // superblocks (the caller's checks).
            unsafe {
                let c = if left >= SB {
                    decode::<P, BITS, G, true>(pp.add(off), SB, a.tables)
                } else {
                    decode::<P, BITS, G, false>(pp.add(off), left, a.tables)
                };
                let [h] = dots::<1>(nr, [c], px);
                let sv = _mm512_permutexvar_ps(idx[q % 4], s16);
                let f = _mm512_mul_ps(sv, _mm512_loadu_ps(st));
                v2[0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(h), f, v2[0]);
            }
            q += 1;
        }
    }
    _mm512_reduce_add_ps(_mm512_add_ps(vacc, _mm512_add_ps(v2[0], v2[1])))
}

/// The exact dot products of `U` (1 or 2) consecutive superblocks of one weight row
/// (`codes`) with one row of x's split at `px` (the first superblock's `nr` hi/lo register
/// pairs, the next's right after): four chains per superblock, two superblocks' `vpdpbusd`
/// alternating so that one's wait on its loads and chains overlaps the other's work.
///
/// # Safety
/// `px` points to `U·nr` hi/lo register pairs; the CPU supports [`available`]'s features.
// Index loop: each step reads register i of every superblock's codes and x.
#[allow(clippy::needless_range_loop)]
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx512vnni")]
unsafe fn dots<const U: usize>(
    nr: usize,
    codes: [[__m512i; 8]; U],
    px: *const __m512i,
) -> [__m512i; U] {
    let zi = _mm512_setzero_si512();
    let (mut dh, mut dl, mut dh2, mut dl2) = ([zi; U], [zi; U], [zi; U], [zi; U]);
    for i in 0..nr {
        for u in 0..U {
            // SAFETY: register pair i of superblock u lies in the U·nr pairs at `px`.
            let (xh, xl) = unsafe {
                (
                    _mm512_loadu_si512(px.add(2 * (u * nr + i))),
                    _mm512_loadu_si512(px.add(2 * (u * nr + i) + 1)),
                )
            };
            if i % 2 == 0 {
                dh[u] = _mm512_dpbusd_epi32(dh[u], codes[u][i], xh);
                dl[u] = _mm512_dpbusd_epi32(dl[u], codes[u][i], xl);
            } else {
                dh2[u] = _mm512_dpbusd_epi32(dh2[u], codes[u][i], xh);
                dl2[u] = _mm512_dpbusd_epi32(dl2[u], codes[u][i], xl);
            }
        }
    }
    std::array::from_fn(|u| {
        let h = _mm512_add_epi32(dh[u], dh2[u]);
        let l = _mm512_add_epi32(dl[u], dl2[u]);
        _mm512_add_epi32(_mm512_slli_epi32::<8>(h), l)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A xorshift generator of uniform values in [0, 1).
    fn uniform(mut seed: u64) -> impl FnMut() -> f64 {
        move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    /// x̂ rebuilt from the split: `(256·hi + lo)·step` for element `i` of row 0.
    fn rebuilt(p: &Prepared, g: usize, bits: usize, i: usize) -> f64 {
        let (j, e) = (i / g, i % g);
        let (sb, jj) = (j / SB, j % SB);
        let (reg, t) = slot(bits, g, e);
        let at = (sb * (g / 16) + reg) * 128 + 16 * jj + t;
        let (hi, lo) = (p.split()[at], p.split()[at + 64]);
        (256.0 * hi as f64 + lo as f64) * p.step[sb * 16 + 4 * jj] as f64
    }

    /// Every element of a group has its own slot, inside the group's lane, and a chunk of 64
    /// elements stays within its 4 registers.
    #[test]
    fn slots_are_a_permutation() {
        for bits in 1..=8 {
            for g in [32, 64, 128] {
                let mut seen = vec![false; g];
                for e in 0..g {
                    let (reg, t) = slot(bits, g, e);
                    assert!(reg < g / 16 && t < 16, "bits {bits} g {g} e {e}");
                    // `place_avx512` moves each 64-element chunk into its own 4 registers.
                    assert_eq!(reg / 4, e / 64, "bits {bits} g {g} e {e}");
                    assert!(!std::mem::replace(&mut seen[reg * 16 + t], true));
                }
            }
        }
    }

    /// The superblock decode puts code `e` of group `j` at byte `16j + t` of register `reg`
    /// (`slot(e) = (reg, t)`), for every width and group size, with 1..4 groups present
    /// (absent groups' lanes zero) and nothing read past them.
    #[test]
    fn superblock_decode_follows_the_slots() {
        if !available() {
            eprintln!("skipped: this CPU lacks AVX-512 VNNI");
            return;
        }
        let mut next = uniform(0x1234_5678_9abc_def1);
        fn check<const BITS: usize, const G: usize>(next: &mut dyn FnMut() -> f64) {
            for valid in 1..=SB {
                let codes: Vec<u8> = (0..valid * G)
                    .map(|_| (next() * (1 << BITS) as f64) as u8)
                    .collect();
                // Exactly the groups' bytes, so a read past them would leave the Vec.
                let mut packed = vec![0u8; valid * G / 8 * BITS];
                for (c, out) in codes.chunks_exact(8).zip(packed.chunks_exact_mut(BITS)) {
                    crate::quant::pack::pack8::<BITS>(c.try_into().unwrap(), out);
                }
                let t = unsafe { tables::<BITS, G>() };
                // The general path for every count, and the full-superblock one where it applies.
                for full in [false, true] {
                    if full && valid < SB {
                        continue;
                    }
                    let regs = unsafe {
                        if full {
                            decode_sb::<BITS, G, true>(packed.as_ptr(), valid, &t)
                        } else {
                            decode_sb::<BITS, G, false>(packed.as_ptr(), valid, &t)
                        }
                    };
                    check_regs::<BITS, G>(regs, &codes, valid, full);
                }
            }
        }
        fn check_regs<const BITS: usize, const G: usize>(
            regs: [__m512i; 8],
            codes: &[u8],
            valid: usize,
            full: bool,
        ) {
            {
                let mut got = [[0u8; 64]; 8];
                for (g, r) in got.iter_mut().zip(regs) {
                    unsafe { _mm512_storeu_si512(g.as_mut_ptr() as *mut __m512i, r) };
                }
                for j in 0..SB {
                    for e in 0..G {
                        let (reg, tt) = slot(BITS, G, e);
                        let want = if j < valid { codes[j * G + e] } else { 0 };
                        assert_eq!(
                            got[reg][16 * j + tt],
                            want,
                            "bits {BITS} g {G} valid {valid} full {full} group {j} element {e}"
                        );
                    }
                }
            }
        }
        macro_rules! all {
            ($($b:literal),*) => {$(
                check::<$b, 32>(&mut next);
                check::<$b, 64>(&mut next);
                check::<$b, 128>(&mut next);
            )*};
        }
        all!(1, 2, 3, 4, 5, 6, 8);
    }

    /// The AVX-512 split and placement are the scalar definition's, bit for bit, over
    /// magnitudes from subnormal to near f32's largest (both sides of the |e| ≤ 100 switch),
    /// non-finite elements and every layout; Σx agrees to f32 summation-order error.
    #[test]
    fn fast_split_matches_the_definition() {
        if !available() {
            eprintln!("skipped: this CPU lacks AVX-512 VNNI");
            return;
        }
        let mut next = uniform(0x2545f4914f6cdd1du64);
        for (g, bits) in [(32, 4), (64, 4), (128, 4), (64, 8), (32, 3), (128, 5)] {
            let perm = unsafe { place_permutation(bits, g) };
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
                let jj = case as usize % SB;
                let (mut h1, mut l1, mut h2, mut l2) = ([0i8; 128], [0i8; 128], [0; 128], [0; 128]);
                let (mut s1, mut x1, mut o1) = (0f32, 0f32, vec![0i8; g / 16 * 128]);
                let (mut s2, mut x2, mut o2) = (0f32, 0f32, vec![0i8; g / 16 * 128]);
                split_group(&xg, &mut s1, &mut x1, &mut h1, &mut l1);
                place(bits, g, &h1, &l1, &mut o1, jj);
                unsafe {
                    split_group_avx512(&xg, &mut s2, &mut x2, &mut h2, &mut l2);
                    place_avx512(g, perm, &h2, &l2, &mut o2, jj);
                }
                assert_eq!(o1, o2, "case {case} g {g} bits {bits}");
                assert_eq!(s1.to_bits(), s2.to_bits(), "case {case}: step");
                let scale: f32 = xg.iter().filter(|v| v.is_finite()).map(|v| v.abs()).sum();
                assert!(
                    x1 == x2 || (x1.is_nan() && x2.is_nan()) || (x1 - x2).abs() <= scale * 1e-5,
                    "case {case}: Σx {x1} vs {x2}"
                );
            }
        }
    }

    /// The split's error bound, its exactness for bf16 values within a factor 127 of the
    /// group's largest, and no byte overflow, over groups whose values span six decades, ties
    /// and extreme magnitudes, for every layout, with a partial last superblock.
    #[test]
    fn split_is_exact_on_the_grid_and_bounded_elsewhere() {
        let mut next = uniform(0x9e3779b97f4a7c15u64);
        for (g, bits) in [(32, 4), (64, 4), (128, 3), (64, 8), (32, 5)] {
            for case in 0..200 {
                let k = 5 * g;
                let scale = 10f64.powi(case % 60 - 30) as f32;
                let x: Vec<f32> = (0..k)
                    .map(|i| match case % 4 {
                        // Six decades inside each group.
                        0 => ((next() - 0.5) * 10f64.powf(next() * 6.0 - 3.0)) as f32 * scale,
                        // Half-steps of the lo grid (ties) next to a group maximum of 127.
                        1 if i % g == 0 => 127.0 * scale,
                        1 => ((next() * 254.0).round() / 2.0 - 63.0) as f32 * scale,
                        // Maxima just above and below 127·2^e.
                        2 => {
                            (if i % 2 == 0 { 127.0 } else { 127.5 } * scale)
                                * (1.0 - next() as f32 * 1e-7)
                        }
                        _ => half::bf16::from_f32((next() as f32 - 0.5) * scale).to_f32(),
                    })
                    .collect();
                let mut p = Prepared::default();
                prepare(&x, 1, k, g, bits, &mut p);
                for (j, xg) in x.chunks_exact(g).enumerate() {
                    let max = xg.iter().fold(0f32, |a, v| a.max(v.abs())) as f64;
                    let sum: f64 = xg.iter().map(|&v| v as f64).sum();
                    let xs = p.xsum[j] as f64;
                    assert!((xs - sum).abs() <= 1e-5 * max * g as f64, "case {case}: Σx");
                    for (e, &v) in xg.iter().enumerate() {
                        let i = j * g + e;
                        let err = (rebuilt(&p, g, bits, i) - v as f64).abs();
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
                // The padding of the last superblock (groups 5..8) is zero.
                let nr = g / 16;
                for reg in 0..nr {
                    let at = (nr + reg) * 128;
                    for jj in 1..SB {
                        assert!(p.split()[at + 16 * jj..at + 16 * jj + 16]
                            .iter()
                            .all(|&b| b == 0));
                        assert!(p.split()[at + 64 + 16 * jj..at + 80 + 16 * jj]
                            .iter()
                            .all(|&b| b == 0));
                    }
                }
                assert!(p.step[16 + 4..32].iter().all(|&s| s == 0.0));
                assert!(p.xsum[5..8].iter().all(|&s| s == 0.0));
            }
        }
    }
}
