//! Affine quantize and dequantize on AVX2 and FMA (the `avx2` variant), bit-identical to the
//! definition ([`quantize_group`], [`dequantize_value`](crate::quant::affine::dequantize_value))
//! and so to MLX, in both flavours.
//!
//! **Quantize** is the AVX-512 kernel's method ([`x86_quant`](super::x86_quant), whose module
//! docs derive the bound used here) on 8 lanes.
//!
//! The tensor is one flat sequence of groups; batches of 8 consecutive groups run each
//! group's scalar work once per lane of one vector:
//! 1. Widen a batch to f32, keeping per-group min/max vectors (`vminps x, acc` keeps `acc`
//!    where `x` is NaN: NaN is skipped, as the definition's strict comparisons skip it), and
//!    reduce them by a transposing tree of shuffles to one vector of 8 group minima (maxima).
//!    bf16 widens 16 values in two instructions, in whatever order: the even elements shifted
//!    into the high halves of the dwords, the odd ones masked in place.
//! 2. Scale and bias for the 8 groups with the definition's own IEEE operations lane by lane
//!    ([`group_params`](crate::quant::affine::group_params)), and the fast pass's constants
//!    `r = RN(1/s)`, `c = RN(−b·r)` and near-tie threshold `0.5 − 2⁻²¹·M − 2⁻²⁴`.
//! 3. Codes by one FMA, `q̃ = RN(w·r + c)`, rounded to the nearest integer; each 32 codes keep
//!    `max |q̃ − rint(q̃)|`, and where it reaches the threshold those 32 are listed (without a
//!    branch) and redone after the batch's fast pass with MLX's true division `(w − b)/s` and
//!    the flavour's tie rule. The codes pass reads the batch's
//!    input again (from L1 or L2); bf16 widens it by two unpacks per 16 values, in their
//!    lane-interleaved order, which the pack's final permute puts right.
//! 4. Pack 32 codes at a time: two saturating packs and one dword permute put them in order as
//!    bytes (`vpminuw` clamps above at `n` first); 8-bit stores them, 4-bit merges byte pairs
//!    with `vpmaddubsw`, other widths merge 4 codes into a dword (`vpmaddubsw`, `vpmaddwd`;
//!    odd widths then dword pairs into a qword) and gather the bytes with `vpshufb`.
//!
//! Software-pipelined in three stages: each iteration `i` runs, in program order, step 2 of
//! batch `i − 1` (a chain of dependent divisions and shuffles whose inputs are ready), step 3
//! of batch `i − 2` (independent work that the out-of-order core runs while the chain
//! retires), then step 1 of batch `i`.
//!
//! Groups whose scale or bias is not finite (inputs with ±∞, huge ranges), and 1-bit groups
//! whose minimum is a zero (the bias is the minimum, and of +0 and −0 the definition keeps the
//! first), are redone with [`quantize_group`] itself.
//!
//! **Dequantize** decodes 16 codes at a time into f32 lanes (8-bit: two byte widenings; 4-bit:
//! nibbles split and interleaved; other widths: each 8 codes' bytes as one u64, shifted per
//! code in qword lanes) and rounds as the flavour does, GPU `O(fma(q, s, b))`, CPU
//! `O(S(S(q·s) + b))` with `S` the scales' dtype; the conversions to bf16 and f16 are the
//! FP kernels' (`half`'s nearest-even, NaN kept).

use super::dequantize::{DequantizeArgs, DequantizeFn};
use super::quantize::{QuantizeArgs, QuantizeFn};
use super::x86_avx2::widen8;
use super::x86_avx2_fp_quant::{store16, store8, to_dtype};
use super::x86_quant::{dequantize_tasks, quantize_tasks, Groups};
use crate::dtype::{DType, Float};
use crate::error::{Error, Result};
use crate::quant::affine::{quantize_group, EPS};
use crate::quant::pack::{dispatch_bits, pack8};
use crate::quant::Flavour;
use std::arch::x86_64::*;

/// Groups per batch: one per lane of an f32 vector.
const BATCH: usize = 8;
/// Groups per parallel task (a multiple of [`BATCH`]).
const TASK_GROUPS: usize = 64 * BATCH;
/// Bytes ahead of a batch's input that its first pass prefetches.
const AHEAD: usize = 4096;
/// Largest group size.
const MAX_G: usize = 128;

/// Whether this kernel takes groups of `g` values.
pub(crate) fn supports_group(g: usize) -> bool {
    matches!(g, 32 | 64 | 128)
}

/// The quantize kernel for input dtype `dtype` and `bits`.
pub(crate) fn kernel(dtype: DType, bits: u32) -> Option<QuantizeFn> {
    crate::with_float_type!(dtype, T => {
        Some(dispatch_bits!(bits, B => quantize::<T, B> as QuantizeFn, _ => return None))
    }, _ => None)
}

const OP: &str = "quantize";

/// What both kernels check on entry: a group size they take, and the CPU features.
fn entry(op: &'static str, g: usize) -> Result<()> {
    if !supports_group(g) {
        return Err(Error::invalid(
            op,
            "group_size",
            "32, 64 or 128 (the avx2 kernels)",
            g,
        ));
    }
    if !super::x86_avx2::available() {
        return Err(Error::unsupported(
            op,
            "the avx2 kernels on a CPU without AVX2, FMA and F16C",
        ));
    }
    Ok(())
}

fn quantize<T: Float, const BITS: usize>(a: QuantizeArgs<'_>) -> Result<()> {
    let g = a.group_size;
    entry(OP, g)?;
    let flavour = a.flavour;
    quantize_tasks::<T>(OP, a, BITS, TASK_GROUPS, |task| {
        // SAFETY: `available()` holds (checked above); `quantize_groups` checks the slice
        // lengths, which agree by construction (equal numbers of groups per chunk).
        unsafe {
            match g {
                32 => quantize_groups::<T, BITS, 4>(task, flavour),
                64 => quantize_groups::<T, BITS, 8>(task, flavour),
                _ => quantize_groups::<T, BITS, 16>(task, flavour),
            }
        }
    })
}

/// A batch after [`batch_params`]: scale, bias and the fast pass's constants of its groups,
/// lane `j` for group `j`.
struct Params {
    /// Groups in the batch (≤ 8).
    count: usize,
    s: [f32; BATCH],
    b: [f32; BATCH],
    r: [f32; BATCH],
    /// `RN(−b·r)`: the fast pass computes `RN(w·r + c)` in one FMA.
    c: [f32; BATCH],
    /// The group's near-tie threshold; −1 where the fast pass's bound is too loose (every code
    /// of the group by division).
    thr: [f32; BATCH],
    /// Groups for [`quantize_group`] itself (bit `j`).
    fix: u32,
}

/// Quantizes every group of `t` (groups of `8·VPG` elements), 8 at a time. Does nothing if
/// the slice lengths disagree (they never do; the check keeps the raw accesses in bounds).
///
/// # Safety
/// The CPU has AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quantize_groups<T: Float, const BITS: usize, const VPG: usize>(
    t: Groups<'_, T>,
    flavour: Flavour,
) {
    let g = 8 * VPG;
    let gb = g / 8 * BITS;
    let groups = t.scales.len();
    if g > MAX_G
        || t.w.len() != groups * g
        || t.packed.len() != groups * gb
        || t.biases.len() != groups
    {
        return;
    }
    let batches = groups.div_ceil(BATCH);
    let span = |i: usize| (i * BATCH, (groups - i * BATCH).min(BATCH));
    let mut loaded: Option<(__m256, __m256)> = None;
    let mut pending: Option<Params> = None;
    for i in 0..batches + 2 {
        let prepared = loaded.take().map(|minmax| {
            let (b0, count) = span(i - 1);
            // SAFETY: the CPU features are this function's contract.
            unsafe {
                batch_params::<T, BITS>(
                    minmax,
                    flavour,
                    &mut t.scales[b0..b0 + count],
                    &mut t.biases[b0..b0 + count],
                )
            }
        });
        if let Some(p) = pending.take() {
            let (b0, count) = span(i - 2);
            let batch = Groups {
                w: &t.w[b0 * g..(b0 + count) * g],
                packed: &mut t.packed[b0 * gb..(b0 + count) * gb],
                scales: &mut t.scales[b0..b0 + count],
                biases: &mut t.biases[b0..b0 + count],
            };
            // SAFETY: as above; the slices hold the batch's `count` whole groups (lengths
            // checked above).
            unsafe { finish_batch::<T, BITS, VPG>(&p, batch, flavour) };
        }
        if i < batches {
            let (b0, count) = span(i);
            // SAFETY: as above.
            loaded = Some(unsafe { load_batch::<T, VPG>(&t.w[b0 * g..(b0 + count) * g], flavour) });
        }
        pending = prepared;
    }
}

/// Step 1 of a batch of `w.len() / (8·VPG) ≤ 8` groups of `8·VPG` elements `w`: returns the
/// groups' minima and maxima, lane `j` for group `j` (0 for absent groups).
///
/// # Safety
/// The CPU has AVX2, FMA and F16C.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load_batch<T: Float, const VPG: usize>(w: &[T], flavour: Flavour) -> (__m256, __m256) {
    let count = (w.len() / (8 * VPG)).min(BATCH);
    let init_max = match flavour {
        Flavour::Cpu => f32::NEG_INFINITY,
        Flavour::Gpu => 0.0,
    };
    // Per-group min and max vectors. Absent groups stay at 0.
    let mut lo = [_mm256_setzero_ps(); BATCH];
    let mut hi = [_mm256_setzero_ps(); BATCH];
    let p = w.as_ptr();
    let group_bytes = 8 * VPG * std::mem::size_of::<T>();
    for j in 0..count {
        for line in (0..group_bytes).step_by(64) {
            let ahead = (p as *const u8).wrapping_add(AHEAD + j * group_bytes + line);
            // A prefetch does not fault, whatever the address.
            _mm_prefetch::<_MM_HINT_T0>(ahead as *const i8);
        }
        let (mut l, mut h) = (_mm256_set1_ps(f32::INFINITY), _mm256_set1_ps(init_max));
        for v in (0..VPG).step_by(2) {
            // SAFETY: (j·VPG + v)·8 + 16 ≤ count·8·VPG ≤ w.len() (VPG is even).
            let xs = unsafe { widen16_any_order(p.add((j * VPG + v) * 8)) };
            for x in xs {
                // `x` first: where it is NaN, the instructions return the accumulator.
                l = _mm256_min_ps(x, l);
                h = _mm256_max_ps(x, h);
            }
        }
        lo[j] = l;
        hi[j] = h;
    }
    (reduce8::<false>(&lo), reduce8::<true>(&hi))
}

/// Step 2 of a batch of `count = scales.len() ≤ 8` groups, from their minima and maxima:
/// stores the scales and biases (rounded to `T`) and returns the codes pass's constants.
///
/// # Safety
/// The CPU has AVX2, FMA and F16C; `biases` holds `count` elements.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn batch_params<T: Float, const BITS: usize>(
    (mn, mx): (__m256, __m256),
    flavour: Flavour,
    scales: &mut [T],
    biases: &mut [T],
) -> Params {
    let count = scales.len().min(biases.len()).min(BATCH);
    let (s, bias) = group_params::<BITS>(mn, mx, flavour);
    // Lanes the vector passes cannot do exactly: redone by the scalar definition.
    let mut bad = !finite_mask(s) | !finite_mask(bias);
    if BITS == 1 {
        bad |= _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_EQ_OQ>(mn, _mm256_setzero_ps())) as u32;
    }
    let valid = (1u32 << count) - 1;
    let r = _mm256_div_ps(_mm256_set1_ps(1.0), s);
    let c = neg(_mm256_mul_ps(bias, r));
    // M ≥ |(w − b)/s|·(1 − 3u) + |b/s|·(1 − 2u) for every element: |w − b| peaks at the min
    // or the max, and RN is monotone.
    let reach = _mm256_max_ps(abs(_mm256_sub_ps(mx, bias)), abs(_mm256_sub_ps(mn, bias)));
    let m = _mm256_add_ps(_mm256_mul_ps(reach, abs(r)), abs(c));
    let thr = _mm256_sub_ps(
        _mm256_set1_ps(0.5),
        _mm256_add_ps(
            _mm256_mul_ps(m, _mm256_set1_ps(1.0 / (1u64 << 21) as f32)),
            _mm256_set1_ps(1.0 / (1u64 << 24) as f32),
        ),
    );
    // A scale above 10³⁰ has a subnormal-prone reciprocal; a bound ≥ 2¹⁹ (or NaN) leaves no
    // margin: threshold −1, so every code of such a group is divided.
    let loose = _mm256_or_ps(
        _mm256_cmp_ps::<_CMP_GT_OQ>(abs(s), _mm256_set1_ps(1e30)),
        _mm256_cmp_ps::<_CMP_NLT_UQ>(m, _mm256_set1_ps((1u32 << 19) as f32)),
    );
    let thr = _mm256_blendv_ps(thr, _mm256_set1_ps(-1.0), loose);
    let lanes = |v: __m256| -> [f32; BATCH] {
        // SAFETY: `__m256` and `[f32; 8]` have the same size, and every bit pattern is valid.
        unsafe { std::mem::transmute(v) }
    };
    let p = Params {
        count,
        s: lanes(s),
        b: lanes(bias),
        r: lanes(r),
        c: lanes(c),
        thr: lanes(thr),
        fix: bad & valid,
    };
    // Rounded to `T` 8 lanes at a time, then the batch's `count` copied out (docs/perf.md,
    // session 45: 1.5% of the kernel against 16 scalar conversions).
    for (dst, v) in [(scales, s), (biases, bias)] {
        let mut tmp = [T::from_f32(0.0); BATCH];
        // SAFETY: 8 elements of `tmp`; the features are this function's.
        unsafe { store8::<T, true>(tmp.as_mut_ptr(), v) };
        dst[..count].copy_from_slice(&tmp[..count]);
    }
    p
}

/// Step 3 of a prepared batch: its codes, packed, then the groups [`quantize_group`] must
/// redo.
///
/// # Safety
/// The CPU has AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn finish_batch<T: Float, const BITS: usize, const VPG: usize>(
    p: &Params,
    b: Groups<'_, T>,
    flavour: Flavour,
) {
    let g = 8 * VPG;
    let gb = g / 8 * BITS;
    let count = p.count;
    if b.w.len() < count * g || b.packed.len() < count * gb || b.scales.len() < count {
        return;
    }
    let sign = _mm256_set1_ps(-0.0);
    // Runs of 32 codes with a near tie, as (group, run): appended without a branch and redone
    // after the batch's fast pass. A branch per run mispredicted on most of the runs it took
    // (7.5% of them with bf16 input), each flushing the fast pass's work in flight: 25% of the
    // kernel's time at one thread (docs/perf.md, session 46).
    let mut ties = [(0u8, 0u8); BATCH * MAX_G / 32];
    let mut n = 0;
    for j in 0..count {
        if p.fix & (1 << j) != 0 {
            continue;
        }
        let (r, c, thr) = (
            _mm256_set1_ps(p.r[j]),
            _mm256_set1_ps(p.c[j]),
            _mm256_set1_ps(p.thr[j]),
        );
        for q in 0..g / 32 {
            let at = j * g + 32 * q;
            // SAFETY: at + 32 ≤ count·g ≤ b.w.len() (checked above).
            let xs = unsafe { widen32(b.w.as_ptr().add(at)) };
            let mut worst = _mm256_setzero_ps();
            let mut ks = [_mm256_setzero_si256(); 4];
            for (k, &x) in ks.iter_mut().zip(&xs) {
                let q = _mm256_fmadd_ps(x, r, c);
                let frac = _mm256_sub_ps(q, _mm256_round_ps::<ROUND_NEAREST>(q));
                // `frac` first: a NaN (from a NaN input) keeps `worst`; its code converts to
                // i32::MIN, which packs to 0, as the definition's `NaN as u8`.
                worst = _mm256_max_ps(_mm256_andnot_ps(sign, frac), worst);
                *k = _mm256_cvtps_epi32(q);
            }
            let near = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_NLT_UQ>(worst, thr)) != 0;
            // j < 8 and q < 4 fit a byte; `n` counts earlier runs only, so it is below the
            // array's length (one entry per run of the batch).
            if let Some(t) = ties.get_mut(n) {
                *t = (j as u8, q as u8);
            }
            n += usize::from(near);
            // SAFETY: the 32 codes' 4·BITS bytes lie within the batch's `count·gb` bytes.
            unsafe {
                pack32::<BITS>(
                    &ks,
                    interleaved::<T>(),
                    b.packed.as_mut_ptr().add(at / 8 * BITS),
                )
            };
        }
    }
    // The near ties' runs again with MLX's true division `(w − b)/s` and the flavour's tie
    // rule, over the fast pass's codes.
    for &(j, q) in &ties[..n.min(ties.len())] {
        let (j, q) = (usize::from(j), usize::from(q));
        let at = j * g + 32 * q;
        // SAFETY: as in the fast pass (the same run).
        let xs = unsafe { widen32(b.w.as_ptr().add(at)) };
        let (s, bias) = (_mm256_set1_ps(p.s[j]), _mm256_set1_ps(p.b[j]));
        let ks = xs.map(|x| {
            let q = _mm256_div_ps(_mm256_sub_ps(x, bias), s);
            _mm256_cvttps_epi32(round(q, flavour))
        });
        // SAFETY: as in the fast pass.
        unsafe {
            pack32::<BITS>(
                &ks,
                interleaved::<T>(),
                b.packed.as_mut_ptr().add(at / 8 * BITS),
            )
        };
    }
    let mut fix = p.fix;
    while fix != 0 {
        let j = fix.trailing_zeros() as usize;
        fix &= fix - 1;
        let mut vals = [0f32; MAX_G];
        for (v, x) in vals[..g].iter_mut().zip(&b.w[j * g..(j + 1) * g]) {
            *v = x.to_f32();
        }
        let mut codes = [0u8; MAX_G];
        let (s, bias) = quantize_group(&vals[..g], BITS as u32, flavour, &mut codes[..g]);
        for (c, o) in codes[..g]
            .chunks_exact(8)
            .zip(b.packed[j * gb..(j + 1) * gb].chunks_exact_mut(BITS))
        {
            pack8::<BITS>(c.try_into().unwrap_or(&[0; 8]), o);
        }
        b.scales[j] = T::from_f32(s);
        b.biases[j] = T::from_f32(bias);
    }
}

const ROUND_NEAREST: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;

/// Whether [`widen32`] returns `T`'s values in the lane-interleaved order of bf16's unpacks.
const fn interleaved<T: Float>() -> bool {
    matches!(T::DTYPE, DType::BF16)
}

/// The 16 elements at `p` as f32, in no particular order (for minima and maxima). bf16 takes
/// one load and two instructions: the even elements shifted into the high halves, the odd ones
/// masked in place.
///
/// # Safety
/// The CPU has AVX2 and F16C; `p` is valid for 16 elements.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn widen16_any_order<T: Float>(p: *const T) -> [__m256; 2] {
    // SAFETY: the loads read the 16 elements the caller vouches for.
    unsafe {
        if interleaved::<T>() {
            let v = _mm256_loadu_si256(p as *const __m256i);
            [
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(v)),
                _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(-0x1_0000))),
            ]
        } else {
            [widen8(p), widen8(p.add(8))]
        }
    }
}

/// The 32 elements at `p` as f32 in four vectors: in order (`v[t]` = elements `8t..8t + 8`),
/// or for bf16 ([`interleaved`]) as its unpacks leave them, per 16 elements `[0..4, 8..12]`
/// then `[4..8, 12..16]`: two instructions per 16 values instead of four.
///
/// # Safety
/// The CPU has AVX2 and F16C; `p` is valid for 32 elements.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn widen32<T: Float>(p: *const T) -> [__m256; 4] {
    // SAFETY: the loads read the 32 elements the caller vouches for.
    unsafe {
        if interleaved::<T>() {
            let z = _mm256_setzero_si256();
            let (a, b) = (
                _mm256_loadu_si256(p as *const __m256i),
                _mm256_loadu_si256(p.add(16) as *const __m256i),
            );
            [
                _mm256_unpacklo_epi16(z, a),
                _mm256_unpackhi_epi16(z, a),
                _mm256_unpacklo_epi16(z, b),
                _mm256_unpackhi_epi16(z, b),
            ]
            .map(|v| _mm256_castsi256_ps(v))
        } else {
            std::array::from_fn(|t| widen8(p.add(8 * t)))
        }
    }
}

/// The byte shuffle that gathers, in each 128-bit lane, the first `per` bytes of each of the
/// lane's `16 / stride` units of `stride` bytes into the lane's first bytes (the rest zero).
const fn gather_bytes(stride: usize, per: usize) -> [u8; 32] {
    let mut idx = [0x80u8; 32];
    let mut l = 0;
    while l < 2 {
        let mut o = 0;
        while o < 16 / stride * per {
            idx[16 * l + o] = (stride * (o / per) + o % per) as u8;
            o += 1;
        }
        l += 1;
    }
    idx
}

/// Packs 32 codes (as i32; negative and NaN's `i32::MIN` clamp to 0, large ones to `n`) into
/// the `4·BITS` bytes at `out`. The codes lie in `k` as [`widen32`] leaves the values: in
/// order (`k[v]` lane `i` = code `8v + i`), or `interleaved` as bf16's unpacks.
///
/// # Safety
/// The CPU has AVX2; `out` is valid for `4·BITS` bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn pack32<const BITS: usize>(k: &[__m256i; 4], interleaved: bool, out: *mut u8) {
    let n = _mm256_set1_epi16(((1u32 << BITS) - 1) as i16);
    // Per 128-bit lane: [k0 k1] words, then [k0 k1 k2 k3] bytes of that lane's half of each.
    // In order, lane 0 then holds the dwords of codes 0, 8, 16, 24 (each 4 codes) and lane 1
    // those of 4, 12, 20, 28; interleaved, lane 0 holds 0, 4, 16, 20 and lane 1 8, 12, 24, 28.
    let w0 = _mm256_min_epu16(_mm256_packus_epi32(k[0], k[1]), n);
    let w1 = _mm256_min_epu16(_mm256_packus_epi32(k[2], k[3]), n);
    let order = if interleaved {
        _mm256_setr_epi32(0, 1, 4, 5, 2, 3, 6, 7)
    } else {
        _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)
    };
    let bytes = _mm256_permutevar8x32_epi32(_mm256_packus_epi16(w0, w1), order);
    // SAFETY (every store): within the 4·BITS bytes at `out`.
    unsafe {
        match BITS {
            8 => _mm256_storeu_si256(out as *mut __m256i, bytes),
            4 => {
                let pairs = _mm256_maddubs_epi16(bytes, _mm256_set1_epi16(0x1001));
                let packed = _mm256_permute4x64_epi64::<0b1000>(_mm256_packus_epi16(pairs, pairs));
                _mm_storeu_si128(out as *mut __m128i, _mm256_castsi256_si128(packed));
            }
            _ => {
                // Dword d = codes 4d..4d + 4 in its low 4·BITS bits.
                let pair = _mm256_set1_epi16((1 | (1 << (8 + BITS))) as i16);
                let quad = _mm256_set1_epi32(1 | (1 << (16 + 2 * BITS)));
                let d = _mm256_madd_epi16(_mm256_maddubs_epi16(bytes, pair), quad);
                let (v, idx) = if BITS.is_multiple_of(2) {
                    (d, const { gather_bytes(4, BITS / 2) })
                } else {
                    // Qword = codes 8q..8q + 8 in its low 8·BITS bits: BITS bytes.
                    let low = _mm256_and_si256(d, _mm256_set1_epi64x(0xffff_ffff));
                    let high = _mm256_sll_epi64(
                        _mm256_srli_epi64::<32>(d),
                        _mm_cvtsi32_si128(4 * BITS as i32),
                    );
                    (_mm256_or_si256(low, high), const { gather_bytes(8, BITS) })
                };
                let v = _mm256_shuffle_epi8(v, _mm256_loadu_si256(idx.as_ptr() as *const __m256i));
                // Each lane's 2·BITS bytes, lane 0's first.
                let mut tmp = [0u8; 32];
                _mm256_storeu_si256(tmp.as_mut_ptr() as *mut __m256i, v);
                let half = 2 * BITS;
                std::ptr::copy_nonoverlapping(tmp.as_ptr(), out, half);
                std::ptr::copy_nonoverlapping(tmp.as_ptr().add(16), out.add(half), half);
            }
        }
    }
}

/// Bit `j` set where lane `j` is finite.
#[inline]
#[target_feature(enable = "avx2")]
fn finite_mask(v: __m256) -> u32 {
    _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_LT_OQ>(
        abs(v),
        _mm256_set1_ps(f32::INFINITY),
    )) as u32
}

#[inline]
#[target_feature(enable = "avx2")]
fn abs(v: __m256) -> __m256 {
    _mm256_andnot_ps(_mm256_set1_ps(-0.0), v)
}

#[inline]
#[target_feature(enable = "avx2")]
fn neg(v: __m256) -> __m256 {
    _mm256_xor_ps(v, _mm256_set1_ps(-0.0))
}

/// Lane `j` = min (or max, with `MAX`) of the 8 lanes of `p[j]`: a tree of shuffles that
/// halves the lanes per group and doubles the groups per vector at each level. Exact for
/// values that are not NaN (order only matters for the sign of a zero).
#[inline]
#[target_feature(enable = "avx2")]
fn reduce8<const MAX: bool>(p: &[__m256; 8]) -> __m256 {
    let op = |a: __m256, b: __m256| {
        if MAX {
            _mm256_max_ps(a, b)
        } else {
            _mm256_min_ps(a, b)
        }
    };
    // Level 1, per 128-bit lane: [a02 a13 b02 b13] of the pair (a, b) = (p[2m], p[2m + 1]).
    let t: [__m256; 4] = std::array::from_fn(|m| {
        let (a, b) = (p[2 * m], p[2 * m + 1]);
        op(
            _mm256_shuffle_ps::<0x44>(a, b),
            _mm256_shuffle_ps::<0xEE>(a, b),
        )
    });
    // Level 2, per 128-bit lane: groups 4h..4h + 4 reduced over that lane's 4 elements.
    let u: [__m256; 2] = std::array::from_fn(|h| {
        let (a, b) = (t[2 * h], t[2 * h + 1]);
        op(
            _mm256_shuffle_ps::<0x88>(a, b),
            _mm256_shuffle_ps::<0xDD>(a, b),
        )
    });
    // Level 3: the two 128-bit lanes of each.
    op(
        _mm256_permute2f128_ps::<0x20>(u[0], u[1]),
        _mm256_permute2f128_ps::<0x31>(u[0], u[1]),
    )
}

/// Scale and bias of 8 groups from their minima and maxima: the definition's steps
/// ([`group_params`](crate::quant::affine::group_params)), lane by lane, with the same IEEE
/// operations (so the same results).
#[inline]
#[target_feature(enable = "avx2,fma")]
fn group_params<const BITS: usize>(mn: __m256, mx: __m256, flavour: Flavour) -> (__m256, __m256) {
    let eps = _mm256_set1_ps(EPS);
    if BITS == 1 {
        return (_mm256_max_ps(_mm256_sub_ps(mx, mn), eps), mn);
    }
    let n = _mm256_set1_ps(((1u32 << BITS) - 1) as f32);
    let s = _mm256_max_ps(_mm256_div_ps(_mm256_sub_ps(mx, mn), n), eps);
    let low_edge = _mm256_cmp_ps::<_CMP_GT_OQ>(abs(mn), abs(mx));
    let edge = _mm256_blendv_ps(mx, mn, low_edge);
    let s = _mm256_blendv_ps(neg(s), s, low_edge);
    let q0 = round(_mm256_div_ps(edge, s), flavour);
    let nonzero = _mm256_cmp_ps::<_CMP_NEQ_UQ>(q0, _mm256_setzero_ps());
    let s = _mm256_blendv_ps(s, _mm256_div_ps(edge, q0), nonzero);
    let bias = _mm256_and_ps(edge, nonzero);
    (s, bias)
}

/// Rounds each lane to an integer as `flavour` does ([`round`](crate::quant::affine::round)):
/// ties to even, or away from zero (`trunc(q)`, plus `±1` where `|q − trunc(q)| ≥ ½`; the
/// difference is exact).
#[inline]
#[target_feature(enable = "avx2,fma")]
fn round(q: __m256, flavour: Flavour) -> __m256 {
    match flavour {
        Flavour::Cpu => _mm256_round_ps::<ROUND_NEAREST>(q),
        Flavour::Gpu => {
            let t = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(q);
            let sign = _mm256_set1_ps(-0.0);
            let frac = _mm256_andnot_ps(sign, _mm256_sub_ps(q, t));
            let half = _mm256_cmp_ps::<_CMP_GE_OQ>(frac, _mm256_set1_ps(0.5));
            // ±1 with q's sign where the fraction reaches ½, else 0.
            let step = _mm256_and_ps(
                half,
                _mm256_or_ps(_mm256_and_ps(q, sign), _mm256_set1_ps(1.0)),
            );
            _mm256_add_ps(t, step)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Dequantize.

/// The dequantize kernel for scales of dtype `scales`, output `out` and `bits`.
pub(crate) fn dequantize_kernel(scales: DType, out: DType, bits: u32) -> Option<DequantizeFn> {
    crate::with_float_type!(scales, S => crate::with_float_type!(out, O => {
        Some(dispatch_bits!(bits, B => dequantize::<S, O, B> as DequantizeFn, _ => return None))
    }, _ => None), _ => None)
}

/// The dequantize kernel: runs of [`TASK_GROUPS`] groups in parallel, 16 values at a time,
/// each rounded as the definition ([`dequantize_value`](crate::quant::affine::dequantize_value))
/// and the portable kernel round: GPU `O(fma(q, s, b))`, CPU `O(S(S(q·s) + b))`.
fn dequantize<S: Float, O: Float, const BITS: usize>(a: DequantizeArgs<'_>) -> Result<()> {
    const OP: &str = "dequantize";
    let g = a.w.group_size;
    entry(OP, g)?;
    let cpu = a.flavour == Flavour::Cpu;
    dequantize_tasks::<S, O>(OP, a, BITS, TASK_GROUPS, |packed, scales, biases, out| {
        // SAFETY: `available()` holds (checked above); the callee checks the lengths.
        unsafe {
            if cpu {
                dequantize_groups::<S, O, BITS, true>(packed, scales, biases, g, out)
            } else {
                dequantize_groups::<S, O, BITS, false>(packed, scales, biases, g, out)
            }
        }
    })
}

/// Dequantizes whole groups of `g` (a multiple of 16) values. Does nothing if the lengths
/// disagree (they never do; the check keeps the raw accesses in bounds).
///
/// # Safety
/// The CPU has AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dequantize_groups<S: Float, O: Float, const BITS: usize, const CPU: bool>(
    packed: &[u8],
    scales: &[S],
    biases: &[S],
    g: usize,
    out: &mut [O],
) {
    let groups = scales.len();
    let gb = g / 8 * BITS;
    if !g.is_multiple_of(16)
        || biases.len() != groups
        || packed.len() != groups * gb
        || out.len() != groups * g
    {
        return;
    }
    for (j, (&s, &b)) in scales.iter().zip(biases).enumerate() {
        let (s, b) = (s.to_f32(), b.to_f32());
        // SAFETY: group j's g·BITS/8 bytes and g outputs lie within the slices (lengths
        // checked above).
        unsafe {
            let (p, o) = (packed.as_ptr().add(j * gb), out.as_mut_ptr().add(j * g));
            // A finite scale and bias give no NaN (codes are finite; an overflow is ±∞): the
            // bf16 roundings skip their NaN blend.
            if s.is_finite() && b.is_finite() {
                dequantize_group::<S, O, BITS, CPU, false>(p, s, b, g, o)
            } else {
                dequantize_group::<S, O, BITS, CPU, true>(p, s, b, g, o)
            }
        }
    }
}

/// One group of `g` (a multiple of 16) codes at `p` dequantized with scale `s` and bias `b`
/// to the `g` outputs at `o`. Without `NAN` no result may be NaN.
///
/// # Safety
/// The CPU has AVX2, FMA and F16C; `g·BITS/8` bytes are readable at `p` and `g` outputs
/// writable at `o`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dequantize_group<
    S: Float,
    O: Float,
    const BITS: usize,
    const CPU: bool,
    const NAN: bool,
>(
    p: *const u8,
    s: f32,
    b: f32,
    g: usize,
    o: *mut O,
) {
    let (s, b) = (_mm256_set1_ps(s), _mm256_set1_ps(b));
    for i in (0..g).step_by(16) {
        // SAFETY: these 16 codes' 2·BITS bytes and 16 outputs lie within the group (the
        // caller's).
        unsafe {
            let q = codes16::<BITS>(p.add(i / 8 * BITS));
            let v = q.map(|q| {
                if CPU {
                    let prod = to_dtype::<S, NAN>(_mm256_mul_ps(q, s));
                    to_dtype::<S, NAN>(_mm256_add_ps(prod, b))
                } else {
                    _mm256_fmadd_ps(q, s, b)
                }
            });
            store16::<O, NAN>(o.add(i), v[0], v[1]);
        }
    }
}

/// The 16 codes packed in the `2·BITS` bytes at `p`, as f32: codes 0–7, then 8–15.
///
/// # Safety
/// The CPU has AVX2; `2·BITS` bytes are readable at `p`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn codes16<const BITS: usize>(p: *const u8) -> [__m256; 2] {
    // SAFETY (every load): within the 2·BITS bytes at `p`.
    let (lo, hi) = unsafe {
        match BITS {
            8 => {
                let b = _mm_loadu_si128(p as *const __m128i);
                (
                    _mm256_cvtepu8_epi32(b),
                    _mm256_cvtepu8_epi32(_mm_srli_si128::<8>(b)),
                )
            }
            4 => {
                let b = _mm_loadl_epi64(p as *const __m128i);
                let low = _mm_set1_epi8(0x0f);
                let nibbles = _mm_unpacklo_epi8(
                    _mm_and_si128(b, low),
                    _mm_and_si128(_mm_srli_epi16::<4>(b), low),
                );
                (
                    _mm256_cvtepu8_epi32(nibbles),
                    _mm256_cvtepu8_epi32(_mm_srli_si128::<8>(nibbles)),
                )
            }
            _ => (codes8::<BITS>(p), codes8::<BITS>(p.add(BITS))),
        }
    };
    [_mm256_cvtepi32_ps(lo), _mm256_cvtepi32_ps(hi)]
}

/// The 8 codes packed in the `BITS` bytes at `p` (LSB first, as
/// [`pack8`]), one per dword: the bytes as one u64 shifted by each code's offset in two
/// vectors of qwords, their low dwords gathered in order.
///
/// # Safety
/// The CPU has AVX2; `BITS` bytes are readable at `p`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn codes8<const BITS: usize>(p: *const u8) -> __m256i {
    let mut word = [0u8; 8];
    // SAFETY: BITS ≤ 8 bytes readable at `p` (contract) into an 8-byte array.
    unsafe { std::ptr::copy_nonoverlapping(p, word.as_mut_ptr(), BITS) };
    let v = _mm256_set1_epi64x(i64::from_le_bytes(word));
    let b = BITS as i64;
    let a = _mm256_srlv_epi64(v, _mm256_setr_epi64x(0, b, 2 * b, 3 * b));
    let c = _mm256_srlv_epi64(v, _mm256_setr_epi64x(4 * b, 5 * b, 6 * b, 7 * b));
    // [a0 a1 c0 c1 | a2 a3 c2 c3] (codes 0, 1, 4, 5 | 2, 3, 6, 7), then in order.
    let d = _mm256_castps_si256(_mm256_shuffle_ps::<0x88>(
        _mm256_castsi256_ps(a),
        _mm256_castsi256_ps(c),
    ));
    let d = _mm256_permute4x64_epi64::<0xD8>(d);
    _mm256_and_si256(d, _mm256_set1_epi32(((1u32 << BITS) - 1) as i32))
}
