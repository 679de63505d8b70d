//! AVX-512 affine quantize and dequantize (x86-64 with AVX-512 F/BW/DQ/VL/VBMI, chosen at run
//! time), bit-identical to the generic kernels and so to MLX, in both flavours.
//!
//! **Quantize** works on batches of 16 consecutive groups (the tensor is one flat sequence of
//! groups: rows hold whole groups), so each group's scalar work runs once per lane of one
//! vector:
//! 1. Widen the batch to f32 into an L1 scratch buffer, keeping per-group min/max vectors
//!    (`vminps x, acc` keeps `acc` when `x` is NaN: NaN is skipped, as `f32::min` does).
//! 2. Reduce the 16 min (max) vectors to one vector of 16 group minima (maxima) by a
//!    transposing tree of shuffles, then compute scale and bias for the 16 groups with the
//!    scalar definition's operations lane by lane ([`quantize_group`] is the spec).
//! 3. Codes. MLX divides, `q = round(RN(w − b) / s)`, and `vdivps` would be the bottleneck.
//!    The fast pass uses one FMA instead: `q̃ = RN(w·r + c)` with `r = RN(1/s)` and
//!    `c = RN(−b·r)`. With `Q = (w − b)/s`, `B = b/s` and `u = 2⁻²⁴`, `q̃` and MLX's
//!    `d = RN(RN(w − b)/s)` differ by at most `4.01u·|Q| + 1.01u·|B| + 2⁻¹⁴⁹`, and
//!    `clamp(round(·), 0, n)` only changes value at half-integers, so wherever `q̃` is farther
//!    than that from every half-integer, rounding `q̃` (any tie rule) gives exactly MLX's code.
//!    Each 64 codes keep `max |q̃ − rint(q̃)|` (`vreduceps`, `vrangeps`); if it reaches
//!    `0.5 − 2⁻²¹·M − 2⁻²⁴` (`M` bounds `|Q| + |B|` over the group, computed lane by lane
//!    with the scales; −1 where `M ≥ 2¹⁹` or `|s| > 10³⁰`), those 64 are redone with true
//!    divisions and the flavour's tie rule. Random f32 weights need that for about 1% of
//!    blocks; bf16 weights, whose values sit on a coarse grid, produce exact ties (`k + ½`)
//!    far more often (about 6% of blocks of random bf16 values).
//! 4. Pack 64 codes at a time: two saturating packs (`vpackusdw`, `vpackuswb`) clamp below at
//!    0 and leave bytes in a fixed lane order, `vpminub` clamps above at `n`, `vpmaddubsw` and
//!    `vpmaddwd` merge 4 consecutive codes into `4·bits` bits of a dword, and one `vpermb`
//!    gathers the output bytes (odd widths first join dword pairs into qwords).
//!
//! Groups whose scale or bias is not finite (inputs with ±∞, huge ranges), and 1-bit groups
//! whose minimum is a zero (the sign of a zero bias is the fold order's choice), are redone
//! with [`quantize_group`] itself.
//!
//! **Dequantize** decodes 32 codes at a time (`vpermb` + `vpmultishiftqb`, as in
//! [`super::x86`]) and applies the flavour's rounding per vector: GPU `O(fma(q, s, b))`, CPU
//! `O(S(S(q·s) + b))` (`S` the scales' dtype); the conversion to bf16 is the integer
//! round-to-nearest-even `half` uses.

use super::dequantize::DequantizeArgs;
use super::quantize::QuantizeArgs;
use super::x86_columns::PrefetchTo;
use super::{cast, cast_mut, KernelFn, Variant};
use crate::dtype::{DType, Float};
use crate::error::{Error, Result};
use crate::quant::affine::{quantize_group, EPS};
use crate::quant::pack::{dispatch_bits, pack8};
use crate::quant::Flavour;
use crate::registry::OpKind;
use rayon::prelude::*;
use std::arch::x86_64::*;

/// The variant: affine `quantize` and `dequantize`, every width, group size and float dtype.
pub(crate) const QUANT: Variant = Variant {
    name: "avx512",
    supports: |k| {
        k.mode == crate::QuantMode::Affine
            && matches!(k.op, OpKind::Quantize | OpKind::Dequantize)
            && matches!(k.group_size, 32 | 64 | 128)
            && available()
    },
    decode: None,
    build: |k| match k.op {
        OpKind::Quantize => quantize_kernel(k.input, k.bits).map(KernelFn::Quantize),
        OpKind::Dequantize => {
            dequantize_kernel(k.scales, k.output, k.bits).map(KernelFn::Dequantize)
        }
        OpKind::QuantizedMatmul => None,
    },
};

/// Whether this CPU can run the kernels of this module.
pub(crate) fn available() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512dq")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512vbmi")
}

/// Groups per batch: one per lane of an f32 vector.
const BATCH: usize = 16;
/// Groups per parallel task (a multiple of [`BATCH`]).
const TASK_GROUPS: usize = 64 * BATCH;
/// Largest group size, in vectors of 16.
const MAX_VPG: usize = 8;

/// The quantize kernel for input dtype `dtype` and `bits`.
fn quantize_kernel(dtype: DType, bits: u32) -> Option<super::quantize::QuantizeFn> {
    crate::with_float_type!(dtype, T => {
        Some(dispatch_bits!(bits, B => quantize::<T, B> as super::quantize::QuantizeFn, _ => return None))
    }, _ => None)
}

/// The dequantize kernel for scales of dtype `scales`, output `out` and `bits`.
fn dequantize_kernel(
    scales: DType,
    out: DType,
    bits: u32,
) -> Option<super::dequantize::DequantizeFn> {
    crate::with_float_type!(scales, S => crate::with_float_type!(out, O => {
        Some(dispatch_bits!(bits, B => dequantize::<S, O, B> as super::dequantize::DequantizeFn, _ => return None))
    }, _ => None), _ => None)
}

pub(super) fn missing_features(op: &'static str) -> Error {
    Error::unsupported(
        op,
        "the avx512 kernels on a CPU without AVX-512 F/BW/DQ/VL/VBMI",
    )
}

fn bad_group_size(op: &'static str, g: usize) -> Error {
    Error::invalid(op, "group_size", "32, 64 or 128", g)
}

/// One length check of a kernel's slices, as an error naming the slice.
pub(super) fn check_len(
    op: &'static str,
    param: &'static str,
    want: usize,
    got: usize,
) -> Result<()> {
    if want == got {
        Ok(())
    } else {
        Err(Error::invalid(
            op,
            param,
            format!("{want} elements"),
            format!("{got} elements"),
        ))
    }
}

// ---------------------------------------------------------------------------------------------
// Quantize.

/// The quantize kernel: batches of 16 groups, [`TASK_GROUPS`] groups per parallel task.
fn quantize<T: Float, const BITS: usize>(a: QuantizeArgs<'_>) -> Result<()> {
    const OP: &str = "quantize";
    if !available() {
        return Err(missing_features(OP));
    }
    let g = a.group_size;
    if !matches!(g, 32 | 64 | 128) {
        return Err(bad_group_size(OP, g));
    }
    let flavour = a.flavour;
    quantize_tasks::<T>(OP, a, BITS, TASK_GROUPS, |task| {
        // SAFETY: `available()` holds (checked above); `quantize_groups` checks the slice
        // lengths, which agree by construction (equal numbers of groups per chunk).
        unsafe {
            match g {
                32 => quantize_groups::<T, BITS, 2>(task, flavour),
                64 => quantize_groups::<T, BITS, 4>(task, flavour),
                _ => quantize_groups::<T, BITS, 8>(task, flavour),
            }
        }
    })
}

/// A run of whole groups of a quantize call: their inputs and every output.
pub(super) struct Groups<'a, T> {
    pub(super) w: &'a [T],
    pub(super) packed: &'a mut [u8],
    pub(super) scales: &'a mut [T],
    pub(super) biases: &'a mut [T],
}

/// The affine quantize driver of the x86 kernels: `a`'s buffers as `T`, checked against its
/// groups of `a.group_size` values and `bits`-bit codes, then split into runs of `task_groups`
/// whole groups that `task` quantizes on the thread pool.
pub(super) fn quantize_tasks<T: Float>(
    op: &'static str,
    a: QuantizeArgs<'_>,
    bits: usize,
    task_groups: usize,
    task: impl Fn(Groups<'_, T>) + Sync + Send,
) -> Result<()> {
    let w: &[T] = cast(op, "w", a.w)?;
    let scales: &mut [T] = cast_mut(op, "scales", a.scales)?;
    let biases: &mut [T] = cast_mut(op, "biases", a.biases)?;
    let (g, groups) = (a.group_size, scales.len());
    let gb = g / 8 * bits;
    check_len(op, "w", groups * g, w.len())?;
    check_len(op, "biases", groups, biases.len())?;
    check_len(op, "packed", groups * gb, a.packed.len())?;
    w.par_chunks(task_groups * g)
        .zip(a.packed.par_chunks_mut(task_groups * gb))
        .zip(
            scales
                .par_chunks_mut(task_groups)
                .zip(biases.par_chunks_mut(task_groups)),
        )
        .for_each(|((w, packed), (scales, biases))| {
            task(Groups {
                w,
                packed,
                scales,
                biases,
            })
        });
    Ok(())
}

/// Quantizes every group of `t` (groups of `16·VPG` elements), 16 at a time. Does nothing if
/// the slice lengths disagree (they never do; the check keeps the raw accesses in bounds).
///
/// Software-pipelined in three stages, each iteration `i` running, in program order, the
/// scales of batch `i − 1` (a chain of dependent divisions and shuffles, ~170 cycles, whose
/// inputs are ready), the codes of batch `i − 2` (independent work that the out-of-order core
/// runs while the chain retires), then the loads and min/max of batch `i` (whose cache misses
/// overlap the next iteration). The codes pass reads batch `i − 2`'s input again (from L1 or
/// L2: two batches are at most 16 KiB) rather than a copy of its widened values kept in three
/// rotating buffers, which measured no faster (docs/perf.md, session 33).
///
/// # Safety
/// The CPU must support [`available`]'s features.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vbmi")]
unsafe fn quantize_groups<T: Float, const BITS: usize, const VPG: usize>(
    t: Groups<'_, T>,
    flavour: Flavour,
) {
    let g = 16 * VPG;
    let gb = g / 8 * BITS;
    let groups = t.scales.len();
    if t.w.len() != groups * g || t.packed.len() != groups * gb || t.biases.len() != groups {
        return;
    }
    let mut loaded: Option<(__m512, __m512)> = None;
    let mut pending: Option<Prepared> = None;
    let batches = groups.div_ceil(BATCH);
    let span = |i: usize| (i * BATCH, (groups - i * BATCH).min(BATCH));
    for i in 0..batches + 2 {
        let prepared = loaded.take().map(|minmax| {
            let (b0, count) = span(i - 1);
            // SAFETY: the CPU features are this function's contract; the slices hold `count`
            // whole groups.
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
            let (b0, count) = (span(i - 2).0, p.count);
            // Prefetch batch i + 1, loaded next iteration (past the end: no fault).
            let ahead = t.w.as_ptr().wrapping_add((b0 + 3 * BATCH) * g) as *const u8;
            let batch = Groups {
                w: &t.w[b0 * g..(b0 + count) * g],
                packed: &mut t.packed[b0 * gb..(b0 + count) * gb],
                scales: &mut t.scales[b0..b0 + count],
                biases: &mut t.biases[b0..b0 + count],
            };
            // SAFETY: as above.
            unsafe { finish_batch::<T, BITS, VPG>(&p, batch, flavour, ahead) };
        }
        if i < batches {
            let (b0, count) = span(i);
            // SAFETY: as above.
            loaded = Some(unsafe {
                load_batch::<T, VPG>(&t.w[b0 * g..(b0 + count) * g], count, flavour)
            });
        }
        pending = prepared;
    }
}

/// A batch after [`batch_params`]: what [`finish_batch`] needs.
struct Prepared {
    /// Groups in the batch (≤ 16).
    count: usize,
    /// Scale, bias and the fast pass's constants, lane `j` for group `j`.
    p: Params,
    /// Groups for [`quantize_group`] itself.
    fix: __mmask16,
}

/// Scale, bias and the fast pass's constants of the 16 groups of a batch, lane `j` for group
/// `j`.
struct Params {
    s: [f32; BATCH],
    b: [f32; BATCH],
    r: [f32; BATCH],
    /// `RN(−b·r)`: the fast pass computes `RN(w·r + c)` in one FMA.
    c: [f32; BATCH],
    /// The group's near-tie threshold (module docs); −1 where the fast pass's bound is too
    /// loose (every code of the group by division).
    thr: [f32; BATCH],
}

/// Stage 1 of a batch of `count ≤ 16` groups of `16·VPG` elements `w`: returns the groups'
/// minima and maxima, lane `j` for group `j` (0 for absent groups).
///
/// # Safety
/// The CPU must support [`available`]'s features; `w` must hold `count·16·VPG` elements.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vbmi")]
unsafe fn load_batch<T: Float, const VPG: usize>(
    w: &[T],
    count: usize,
    flavour: Flavour,
) -> (__m512, __m512) {
    let init_max = match flavour {
        Flavour::Cpu => f32::NEG_INFINITY,
        Flavour::Gpu => 0.0,
    };
    // Per-group min and max vectors. Absent groups stay at 0.
    let mut lo = [_mm512_setzero_ps(); BATCH];
    let mut hi = [_mm512_setzero_ps(); BATCH];
    let w = w.as_ptr();
    for j in 0..count {
        let (mut l, mut h) = (_mm512_set1_ps(f32::INFINITY), _mm512_set1_ps(init_max));
        for v in (0..VPG).step_by(2) {
            // SAFETY: element (j·VPG + v + 1)·16 + 15 < count·16·VPG = w.len() (contract).
            let (x, y) = unsafe { load32::<T>(w.add((j * VPG + v) * 16)) };
            // `x` first: where it is NaN, the instructions return the accumulator.
            l = _mm512_min_ps(y, _mm512_min_ps(x, l));
            h = _mm512_max_ps(y, _mm512_max_ps(x, h));
        }
        lo[j] = l;
        hi[j] = h;
    }
    (reduce16::<false>(&lo), reduce16::<true>(&hi))
}

/// Stage 2 of a batch of `count = scales.len() ≤ 16` groups, from their minima and maxima:
/// computes and stores the scales and biases (rounded to `T`), and the code pass's constants.
///
/// # Safety
/// The CPU must support [`available`]'s features; `biases` must hold `count` elements.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vbmi")]
unsafe fn batch_params<T: Float, const BITS: usize>(
    (mn, mx): (__m512, __m512),
    flavour: Flavour,
    scales: &mut [T],
    biases: &mut [T],
) -> Prepared {
    let count = scales.len();
    let (s, bias) = group_params::<BITS>(mn, mx, flavour);
    let valid: __mmask16 = ((1u32 << count) - 1) as __mmask16;
    // Lanes the vector passes cannot do exactly: redone by the scalar definition.
    let mut bad = _mm512_fpclass_ps_mask::<0x99>(s) | _mm512_fpclass_ps_mask::<0x99>(bias);
    if BITS == 1 {
        bad |= _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(mn, _mm512_setzero_ps());
    }
    let good = valid & !bad;
    let r = _mm512_div_ps(_mm512_set1_ps(1.0), s);
    let c = neg(_mm512_mul_ps(bias, r));
    // M ≥ |(w − b)/s|·(1 − 3u) + |b/s|·(1 − 2u) for every element: |w − b| peaks at the min
    // or the max, and RN is monotone.
    let reach = _mm512_max_ps(abs(_mm512_sub_ps(mx, bias)), abs(_mm512_sub_ps(mn, bias)));
    let m = _mm512_add_ps(_mm512_mul_ps(reach, abs(r)), abs(c));
    // Threshold of the near-tie test (module docs), per group: 0.5 − 2⁻²¹·M − 2⁻²⁴, rounded,
    // is still below 0.5 − 4.01·2⁻²⁴·|Q|max − 1.01·2⁻²⁴·|B|max − 2⁻¹⁴⁹. Lane by lane, so no
    // horizontal reduction lengthens the chain of dependent divisions before the codes.
    let thr = _mm512_sub_ps(
        _mm512_set1_ps(0.5),
        _mm512_add_ps(
            _mm512_mul_ps(m, _mm512_set1_ps(1.0 / (1u64 << 21) as f32)),
            _mm512_set1_ps(1.0 / (1u64 << 24) as f32),
        ),
    );
    // A scale ≥ 2¹⁰⁰ has a subnormal-prone reciprocal; a bound ≥ 2¹⁹ (or NaN) leaves no
    // margin: threshold −1, so every code of such a group is divided.
    let loose = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(abs(s), _mm512_set1_ps(1e30))
        | _mm512_cmp_ps_mask::<_CMP_NLT_UQ>(m, _mm512_set1_ps((1u32 << 19) as f32));
    let thr = _mm512_mask_mov_ps(thr, loose, _mm512_set1_ps(-1.0));
    let mut p = Params {
        s: [0.0; BATCH],
        b: [0.0; BATCH],
        r: [0.0; BATCH],
        c: [0.0; BATCH],
        thr: [0.0; BATCH],
    };
    // SAFETY: each array holds exactly 16 f32; `scales` and `biases` hold `count` elements
    // and the stores are masked to them.
    unsafe {
        _mm512_storeu_ps(p.s.as_mut_ptr(), s);
        _mm512_storeu_ps(p.b.as_mut_ptr(), bias);
        _mm512_storeu_ps(p.r.as_mut_ptr(), r);
        _mm512_storeu_ps(p.c.as_mut_ptr(), c);
        _mm512_storeu_ps(p.thr.as_mut_ptr(), thr);
        store16::<T>(scales.as_mut_ptr(), valid, s);
        store16::<T>(biases.as_mut_ptr(), valid, bias);
    }
    Prepared {
        count,
        p,
        fix: good ^ valid,
    }
}

/// Pass 2 of a prepared batch: its codes, packed, then the groups [`quantize_group`] must
/// redo. Prefetches the input at `ahead` meanwhile.
///
/// # Safety
/// The CPU must support [`available`]'s features; `b` must hold the batch's `p.count` groups
/// (`packed`: `count·2·VPG·BITS` bytes).
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vbmi")]
unsafe fn finish_batch<T: Float, const BITS: usize, const VPG: usize>(
    p: &Prepared,
    mut b: Groups<'_, T>,
    flavour: Flavour,
    ahead: *const u8,
) {
    let (count, packed) = (p.count, b.packed.as_mut_ptr());
    if b.w.len() < count * 16 * VPG {
        return;
    }
    // SAFETY: contract of this function (output sizes), `count ≤ 16`, and `b.w` holds the
    // `count` groups (checked above).
    unsafe { codes_pass::<T, BITS, VPG>(b.w.as_ptr(), &p.p, count, flavour, packed, ahead) };
    let mut fix = p.fix;
    while fix != 0 {
        let j = fix.trailing_zeros() as usize;
        fix &= fix - 1;
        let mut x = [_mm512_setzero_ps(); MAX_VPG];
        for v in (0..VPG).step_by(2) {
            // SAFETY: group j < count lies within `b.w` (checked above).
            (x[v], x[v + 1]) = unsafe { load32::<T>(b.w.as_ptr().add((j * VPG + v) * 16)) };
        }
        scalar_group::<T, BITS, VPG>(&x[..VPG], j, flavour, &mut b);
    }
}

/// Redoes group `j` of a batch with [`quantize_group`], from its widened values `x`.
fn scalar_group<T: Float, const BITS: usize, const VPG: usize>(
    x: &[__m512],
    j: usize,
    flavour: Flavour,
    b: &mut Groups<'_, T>,
) {
    let g = 16 * VPG;
    let gb = g / 8 * BITS;
    let mut vals = [0f32; 16 * MAX_VPG];
    for (pair, chunk) in x.chunks_exact(2).zip(vals.chunks_exact_mut(32)) {
        // SAFETY: `__m512` and `[f32; 16]` have the same size, and every bit pattern is valid.
        let [a, b] =
            [pair[0], pair[1]].map(|v| unsafe { std::mem::transmute::<__m512, [f32; 16]>(v) });
        for i in 0..16 {
            if even_odd::<T>() {
                (chunk[2 * i], chunk[2 * i + 1]) = (a[i], b[i]);
            } else {
                (chunk[i], chunk[16 + i]) = (a[i], b[i]);
            }
        }
    }
    let mut codes = [0u8; 16 * MAX_VPG];
    let (s, bias) = quantize_group(&vals[..g], BITS as u32, flavour, &mut codes[..g]);
    let (Some(out), Some(sj), Some(bj)) = (
        b.packed.get_mut(j * gb..(j + 1) * gb),
        b.scales.get_mut(j),
        b.biases.get_mut(j),
    ) else {
        return;
    };
    for (c, o) in codes[..g].chunks_exact(8).zip(out.chunks_exact_mut(BITS)) {
        pack8::<BITS>(c.try_into().unwrap_or(&[0; 8]), o);
    }
    *sj = T::from_f32(s);
    *bj = T::from_f32(bias);
}

/// Scale and bias of 16 groups from their minima and maxima: [`quantize_group`]'s steps, lane
/// by lane, with the same IEEE operations (so the same results).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vbmi")]
fn group_params<const BITS: usize>(mn: __m512, mx: __m512, flavour: Flavour) -> (__m512, __m512) {
    let eps = _mm512_set1_ps(EPS);
    if BITS == 1 {
        return (_mm512_max_ps(_mm512_sub_ps(mx, mn), eps), mn);
    }
    let n = _mm512_set1_ps(((1u32 << BITS) - 1) as f32);
    let s = _mm512_max_ps(_mm512_div_ps(_mm512_sub_ps(mx, mn), n), eps);
    let low_edge = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(abs(mn), abs(mx));
    let edge = _mm512_mask_blend_ps(low_edge, mx, mn);
    let s = _mm512_mask_blend_ps(low_edge, neg(s), s);
    let q0 = round(_mm512_div_ps(edge, s), flavour);
    let nonzero = _mm512_cmp_ps_mask::<_CMP_NEQ_UQ>(q0, _mm512_setzero_ps());
    let s = _mm512_mask_blend_ps(nonzero, s, _mm512_div_ps(edge, q0));
    let bias = _mm512_maskz_mov_ps(nonzero, edge);
    (s, bias)
}

/// One pass over a batch's codes, 64 at a time, writing the packed bytes. Each 64 codes are
/// first computed with the reciprocal, and redone by true divisions rounded as `flavour` does
/// only if one of them lies within `1/2 − thr` of a half-integer (module docs; `thr` the
/// smaller of the thresholds of the one or two groups the 64 codes belong to). A NaN `q̃` (a NaN input) converts to
/// `i32::MIN`, which packs to code 0, as `NaN as u8` is 0: it needs no redo. Meanwhile the
/// pass prefetches a later batch's input, as many bytes as it reads, from `ahead` (any
/// address: prefetches do not fault).
///
/// # Safety
/// The CPU must support [`available`]'s features; `packed` must have room for `count` groups
/// of `16·VPG` codes (`count·2·VPG·BITS` bytes) and `w` their `count·16·VPG` inputs,
/// `count ≤ 16`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vbmi")]
unsafe fn codes_pass<T: Float, const BITS: usize, const VPG: usize>(
    w: *const T,
    p: &Params,
    count: usize,
    flavour: Flavour,
    packed: *mut u8,
    ahead: *const u8,
) {
    // Each 64 codes read 64·size_of::<T>() input bytes: prefetch as many lines of the input
    // `ahead`, so that a batch's lines are requested while an earlier one computes.
    let lines = std::mem::size_of::<T>();
    let lut = pack_luts::<BITS>(even_odd::<T>());
    let vectors = count * VPG;
    let mut out = packed;
    for v0 in (0..vectors).step_by(4) {
        let live = (vectors - v0).min(4);
        for l in 0..lines {
            // f32 input (four lines per 64 codes) streams 16–33% faster with its lines
            // prefetched into L2 on Zen 4, bf16 and f16 input (half the bytes per code) no
            // faster (docs/perf.md, session 24; `PrefetchTo` says why).
            let into = if lines >= 4 {
                PrefetchTo::L2
            } else {
                PrefetchTo::L1
            };
            into.prefetch(ahead.wrapping_add((v0 / 4 * lines + l) * 64));
        }
        // The 4 (or, in a last group of VPG = 2, 2) vectors of these 64 codes, widened again.
        let mut xs = [_mm512_setzero_ps(); 4];
        for t in (0..live).step_by(2) {
            // SAFETY: vectors v0 + t and v0 + t + 1 < count·VPG lie within `w` (contract;
            // `live` is even, as VPG is).
            (xs[t], xs[t + 1]) = unsafe { load32::<T>(w.add((v0 + t) * 16)) };
        }
        let mut ks = [_mm512_setzero_si512(); 4];
        let mut worst = _mm512_setzero_ps();
        for (t, k) in ks.iter_mut().enumerate().take(live) {
            let j = (v0 + t) / VPG;
            let (r, c) = (_mm512_set1_ps(p.r[j]), _mm512_set1_ps(p.c[j]));
            let q = _mm512_fmadd_ps(xs[t], r, c);
            // Signed distance to the nearest integer; keep the largest magnitude.
            let frac = _mm512_reduce_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(q);
            worst = _mm512_range_ps::<0b1011>(worst, frac);
            *k = _mm512_cvt_roundps_epi32::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(q);
        }
        // The 4 vectors lie in one group (VPG ≥ 4) or two (VPG = 2).
        let thr = p.thr[v0 / VPG].min(p.thr[(v0 + live - 1) / VPG]);
        if _mm512_cmp_ps_mask::<_CMP_NLT_UQ>(worst, _mm512_set1_ps(thr)) != 0 {
            for (t, k) in ks.iter_mut().enumerate().take(live) {
                let j = (v0 + t) / VPG;
                let a = _mm512_sub_ps(xs[t], _mm512_set1_ps(p.b[j]));
                *k = round_to_int(_mm512_div_ps(a, _mm512_set1_ps(p.s[j])), flavour);
            }
        }
        // SAFETY: `live·16` codes → `live·2·BITS` bytes, within the `count` groups' bytes
        // (contract): vectors are consecutive, and so are their bytes.
        unsafe { pack64::<BITS>(&ks, &lut, even_odd::<T>(), out, live * 2 * BITS) };
        out = out.wrapping_add(8 * BITS);
    }
}

/// `v` rounded to an integer as `flavour` rounds (ties to even, or away from zero), as i32.
/// Values below 0 may come out as any integer ≤ 0 (they clamp to 0 anyway); NaN gives
/// `i32::MIN`, which also clamps to 0, as `NaN as u8` does.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vbmi")]
fn round_to_int(v: __m512, flavour: Flavour) -> __m512i {
    match flavour {
        Flavour::Cpu => {
            _mm512_cvt_roundps_epi32::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v)
        }
        Flavour::Gpu => {
            // trunc(v) + 1 where v − trunc(v) ≥ ½ (exact: v and trunc(v) are within a factor
            // of 2, or trunc(v) = 0); for v < 0 the fraction is ≤ 0 and trunc(v) ≤ 0.
            let t = _mm512_roundscale_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(v);
            let up = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(_mm512_sub_ps(v, t), _mm512_set1_ps(0.5));
            let t = _mm512_cvtt_roundps_epi32::<_MM_FROUND_NO_EXC>(t);
            _mm512_mask_add_epi32(t, up, t, _mm512_set1_epi32(1))
        }
    }
}

/// `v` rounded to an integer-valued float as `flavour` rounds (the scalar [`round`]'s twin).
///
/// [`round`]: crate::quant::affine::round
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vbmi")]
fn round(v: __m512, flavour: Flavour) -> __m512 {
    match flavour {
        Flavour::Cpu => {
            _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v)
        }
        Flavour::Gpu => {
            let t = _mm512_roundscale_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(v);
            let up =
                _mm512_cmp_ps_mask::<_CMP_GE_OQ>(abs(_mm512_sub_ps(v, t)), _mm512_set1_ps(0.5));
            // copysign(1, v): exact, |t| < 2²³ wherever the fraction is nonzero.
            let one = _mm512_or_ps(_mm512_and_ps(v, _mm512_set1_ps(-0.0)), _mm512_set1_ps(1.0));
            _mm512_mask_add_ps(t, up, t, one)
        }
    }
}

#[inline]
#[target_feature(enable = "avx512f,avx512dq")]
pub(super) fn abs(v: __m512) -> __m512 {
    _mm512_andnot_ps(_mm512_set1_ps(-0.0), v)
}

#[inline]
#[target_feature(enable = "avx512f,avx512dq")]
fn neg(v: __m512) -> __m512 {
    _mm512_xor_ps(v, _mm512_set1_ps(-0.0))
}

/// Lane `j` = min (or max, with `MAX`) of the 16 lanes of `p[j]`: a tree of shuffles that
/// halves the lanes per group and doubles the groups per vector at each level. Exact for
/// values that are not NaN (order only matters for the sign of a zero).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vbmi")]
pub(super) fn reduce16<const MAX: bool>(p: &[__m512; 16]) -> __m512 {
    let op = |a: __m512, b: __m512| {
        if MAX {
            _mm512_max_ps(a, b)
        } else {
            _mm512_min_ps(a, b)
        }
    };
    // Level 1: quarters 0–1 of group 2m, 2–3 of group 2m+1.
    let q: [__m512; 8] = std::array::from_fn(|m| {
        let (a, b) = (p[2 * m], p[2 * m + 1]);
        op(
            _mm512_shuffle_f32x4::<0x44>(a, b),
            _mm512_shuffle_f32x4::<0xEE>(a, b),
        )
    });
    // Level 2: quarter t of r[m] is group 4m + t.
    let r: [__m512; 4] = std::array::from_fn(|m| {
        let (a, b) = (q[2 * m], q[2 * m + 1]);
        op(
            _mm512_shuffle_f32x4::<0x88>(a, b),
            _mm512_shuffle_f32x4::<0xDD>(a, b),
        )
    });
    // Level 3: quarter t of s[i] holds groups 8i + t (lanes 0–1) and 8i + 4 + t (lanes 2–3).
    let s: [__m512; 2] = std::array::from_fn(|i| {
        let (a, b) = (r[2 * i], r[2 * i + 1]);
        op(
            _mm512_shuffle_ps::<0x44>(a, b),
            _mm512_shuffle_ps::<0xEE>(a, b),
        )
    });
    // Level 4: lane 4t + u is group t + 4u.
    let f = op(
        _mm512_shuffle_ps::<0x88>(s[0], s[1]),
        _mm512_shuffle_ps::<0xDD>(s[0], s[1]),
    );
    let idx = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    _mm512_permutexvar_ps(idx, f)
}

/// Index vectors of [`pack64`] for `BITS` and code order: the final `vpermb`, and the
/// `vpermd` (odd widths, element order) or `vpermb` (even/odd order) before the merges.
#[inline]
#[target_feature(enable = "avx512f")]
fn pack_luts<const BITS: usize>(even_odd: bool) -> (__m512i, __m512i) {
    let (last, first) = if even_odd {
        (pack_index_even_odd(BITS), unshuffle_even_odd())
    } else {
        let dwords: [u32; 16] = std::array::from_fn(|b| (4 * (b % 4) + b / 4) as u32);
        (pack_index(BITS), bytemuck::cast(dwords))
    };
    // SAFETY: each load reads exactly the 64 bytes of its array.
    unsafe {
        (
            _mm512_loadu_si512(last.as_ptr() as *const __m512i),
            _mm512_loadu_si512(first.as_ptr() as *const __m512i),
        )
    }
}

/// The `vpermb` index gathering packed output bytes from what [`pack64`] has before its last
/// step, for codes in element order. After the two packs, byte `16L + 4v + i` holds element
/// `16v + 4L + i` (`L` a 128-bit lane, `v` the source vector); after `vpmaddwd`, dword
/// `4L + v` holds the 4-element block `4v + L`.
const fn pack_index(bits: usize) -> [u8; 64] {
    let mut idx = [0u8; 64];
    let mut o = 0;
    while o < 64 {
        idx[o] = if bits == 8 {
            let (v, l, i) = (o / 16, (o % 16) / 4, o % 4);
            (16 * l + 4 * v + i) as u8
        } else if o >= 8 * bits {
            0
        } else if bits == 4 {
            // After `vpmaddubsw`, word 8L + 2v + i/2 holds elements 16v + 4L + i, + 1 (i even):
            // output byte o = 8v + 2L + i/2 is its low byte.
            let (v, l, h) = (o / 8, (o % 8) / 2, o % 2);
            (2 * (8 * l + 2 * v + h)) as u8
        } else if bits.is_multiple_of(2) {
            // Block β's 4·bits bits are the low bits/2 bytes of dword 4(β mod 4) + β/4.
            let half = bits / 2;
            let (beta, t) = (o / half, o % half);
            (4 * (4 * (beta % 4) + beta / 4) + t) as u8
        } else {
            // Qword γ holds blocks 2γ, 2γ+1 (after `vpermd` and the merge): bits bytes.
            (8 * (o / bits) + o % bits) as u8
        };
        o += 1;
    }
    idx
}

/// For codes in even/odd order (vectors: even elements 0–30, odd 1–31, even 32–62, odd
/// 33–63): the byte of the packed bytes that holds element `e`, at `e`. After the two packs,
/// byte `16L + 4v + i` holds lane `4L + i` of vector `v`.
const fn unshuffle_even_odd() -> [u8; 64] {
    let mut idx = [0u8; 64];
    let mut e = 0;
    while e < 64 {
        let (chunk, w) = (e / 32, e % 32);
        let (v, lane) = (2 * chunk + w % 2, w / 2);
        idx[e] = (16 * (lane / 4) + 4 * v + lane % 4) as u8;
        e += 1;
    }
    idx
}

/// The final `vpermb` index for codes in even/odd order. 8-bit: [`unshuffle_even_odd`] is
/// the output. 4-bit: qword `γ = 2L + h` of the packed bytes holds elements `32h + 8L + 2i`
/// (low dword) and `+ 1` (high dword); the merge leaves output byte `i` of those 8 elements
/// in byte `i` of the qword. Other widths are unshuffled first, then as [`pack_index`] with
/// dword `β` holding block `β`.
const fn pack_index_even_odd(bits: usize) -> [u8; 64] {
    if bits == 8 {
        return unshuffle_even_odd();
    }
    let mut idx = [0u8; 64];
    let mut o = 0;
    while o < 8 * bits {
        idx[o] = if bits == 4 {
            let e = 2 * o;
            let (h, w) = (e / 32, e % 32);
            (8 * (2 * (w / 8) + h) + (w % 8) / 2) as u8
        } else if bits.is_multiple_of(2) {
            let half = bits / 2;
            (4 * (o / half) + o % half) as u8
        } else {
            (8 * (o / bits) + o % bits) as u8
        };
        o += 1;
    }
    idx
}

/// Packs 64 codes (`k[v]` lane `i` = code `16v + i` as i32, or with `even_odd` the order
/// [`load32`] gives) and stores the first `nbytes` (≤ `8·BITS`) bytes of the bit stream at
/// `out`. Codes are clamped to `0..=2^BITS − 1`.
///
/// # Safety
/// The CPU must support [`available`]'s features; `out` must be valid for `nbytes` bytes.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vbmi")]
unsafe fn pack64<const BITS: usize>(
    k: &[__m512i; 4],
    lut: &(__m512i, __m512i),
    even_odd: bool,
    out: *mut u8,
    nbytes: usize,
) {
    // Saturating packs clamp below at 0 (NaN's i32::MIN included) and above at 255.
    let bytes = _mm512_packus_epi16(
        _mm512_packus_epi32(k[0], k[1]),
        _mm512_packus_epi32(k[2], k[3]),
    );
    let stream = if BITS == 8 {
        _mm512_permutexvar_epi8(lut.0, bytes)
    } else {
        let n = ((1u32 << BITS) - 1) as i8;
        let bytes = _mm512_min_epu8(bytes, _mm512_set1_epi8(n));
        let pair = _mm512_set1_epi16((1u32 | (1u32 << (BITS + 8))) as i16);
        if even_odd && BITS == 4 {
            // Each qword: 4 even codes, then the 4 odd ones; odd << 4 into the low dword.
            let merged = _mm512_or_si512(bytes, _mm512_srli_epi64::<28>(bytes));
            _mm512_permutexvar_epi8(lut.0, merged)
        } else if BITS == 4 {
            // Pairs → words whose low byte is the output byte.
            _mm512_permutexvar_epi8(lut.0, _mm512_maddubs_epi16(bytes, pair))
        } else {
            let bytes = if even_odd {
                _mm512_permutexvar_epi8(lut.1, bytes)
            } else {
                bytes
            };
            // Pairs → words (c0 + c1·2^b), pairs of words → dwords: 4 codes in 4·b bits.
            let words = _mm512_maddubs_epi16(bytes, pair);
            let dwords = _mm512_madd_epi16(
                words,
                _mm512_set1_epi32((1u64 | (1u64 << (2 * BITS + 16))) as i32),
            );
            if BITS.is_multiple_of(2) {
                _mm512_permutexvar_epi8(lut.0, dwords)
            } else {
                // Odd widths: dwords in block order, then each qword's pair merged to 8·b bits.
                let d = if even_odd {
                    dwords
                } else {
                    _mm512_permutexvar_epi32(lut.1, dwords)
                };
                let hi = _mm512_srlv_epi64(d, _mm512_set1_epi64(32 - 4 * BITS as i64));
                let low_mask = _mm512_set1_epi64((1i64 << (4 * BITS)) - 1);
                let q = _mm512_ternarylogic_epi64::<0xE4>(d, hi, low_mask);
                _mm512_permutexvar_epi8(lut.0, q)
            }
        }
    };
    let mask: __mmask64 = if nbytes >= 64 {
        !0
    } else {
        (1u64 << nbytes) - 1
    };
    // SAFETY: the store writes only the `nbytes` bytes the caller vouches for.
    unsafe { _mm512_mask_storeu_epi8(out as *mut i8, mask, stream) };
}

/// Whether [`load32`] returns `T`'s 32 elements as even elements, then odd ones (bf16: one
/// load, a shift and a mask) rather than in order.
pub(super) fn even_odd<T: Float>() -> bool {
    T::DTYPE == DType::BF16
}

/// Loads 32 elements of `T` at `p`, widened exactly to f32: elements 0–15 and 16–31, or with
/// [`even_odd`] the even elements and the odd ones.
///
/// # Safety
/// `p` must be valid for reading 32 elements; the CPU must support [`available`]'s features.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vbmi")]
pub(super) unsafe fn load32<T: Float>(p: *const T) -> (__m512, __m512) {
    // SAFETY: 32 elements readable at `p` (contract); the casts match T's dtype.
    unsafe {
        match T::DTYPE {
            DType::F16 => (
                _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)),
                _mm512_cvtph_ps(_mm256_loadu_si256((p as *const __m256i).add(1))),
            ),
            DType::BF16 => {
                // bf16 is the top half of an f32: the even element is the low word.
                let x = _mm512_loadu_si512(p as *const __m512i);
                (
                    _mm512_castsi512_ps(_mm512_slli_epi32::<16>(x)),
                    _mm512_castsi512_ps(_mm512_and_si512(x, _mm512_set1_epi32(!0xFFFF))),
                )
            }
            _ => (
                _mm512_loadu_ps(p as *const f32),
                _mm512_loadu_ps((p as *const f32).add(16)),
            ),
        }
    }
}

/// Stores the lanes `mask` of `v` rounded to `T` (nearest-even, as `T::from_f32`) at `p`.
///
/// # Safety
/// `p` must be valid for writing the masked elements; the CPU must support [`available`]'s
/// features.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vbmi")]
pub(super) unsafe fn store16<T: Float>(p: *mut T, mask: __mmask16, v: __m512) {
    // SAFETY: masked stores write only the lanes the caller vouches for.
    unsafe {
        match T::DTYPE {
            DType::F16 => _mm256_mask_storeu_epi16(
                p as *mut i16,
                mask,
                _mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v),
            ),
            DType::BF16 => _mm256_mask_storeu_epi16(
                p as *mut i16,
                mask,
                _mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(_mm512_castps_si512(bf16_round(v)))),
            ),
            _ => _mm512_mask_storeu_ps(p as *mut f32, mask, v),
        }
    }
}

/// `v` rounded to bf16 and widened back: `half`'s nearest-even rule (`+ 0x7FFF + lsb`, then
/// truncate), NaN kept NaN with the quiet bit set. The low 16 bits of each lane are zero.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vbmi")]
fn bf16_round(v: __m512) -> __m512 {
    let x = _mm512_castps_si512(v);
    let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(x), _mm512_set1_epi32(1));
    let rounded = _mm512_add_epi32(x, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
    let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
    let r = _mm512_mask_or_epi32(rounded, nan, x, _mm512_set1_epi32(0x0040_0000));
    _mm512_castsi512_ps(_mm512_and_si512(
        r,
        _mm512_set1_epi32(0xFFFF_0000u32 as i32),
    ))
}

// ---------------------------------------------------------------------------------------------
// Dequantize.

/// Groups per parallel dequantize task.
const DEQ_TASK_GROUPS: usize = 256;

/// The dequantize kernel, the generic one's twin: each code becomes `O(fma(q, s, b))` (GPU)
/// or `O(S(S(q·s) + b))` (CPU), `S` the scales' dtype and `O` the output's.
fn dequantize<S: Float, O: Float, const BITS: usize>(a: DequantizeArgs<'_>) -> Result<()> {
    const OP: &str = "dequantize";
    if !available() {
        return Err(missing_features(OP));
    }
    let g = a.w.group_size;
    if !matches!(g, 32 | 64 | 128) {
        return Err(bad_group_size(OP, g));
    }
    let flavour = a.flavour;
    dequantize_tasks::<S, O>(
        OP,
        a,
        BITS,
        DEQ_TASK_GROUPS,
        |packed, scales, biases, out| {
            // SAFETY: `available()` holds (checked above); `dequantize_groups` checks lengths.
            unsafe { dequantize_groups::<S, O, BITS>(packed, scales, biases, g, flavour, out) };
        },
    )
}

/// The affine dequantize driver of the x86 kernels: `a`'s scales and biases as `S` and its
/// output as `O`, checked against its groups and `bits`-bit codes, then split into runs of
/// `task_groups` whole groups that `task` dequantizes on the thread pool.
pub(super) fn dequantize_tasks<S: Float, O: Float>(
    op: &'static str,
    a: DequantizeArgs<'_>,
    bits: usize,
    task_groups: usize,
    task: impl Fn(&[u8], &[S], &[S], &mut [O]) + Sync + Send,
) -> Result<()> {
    let scales: &[S] = cast(op, "scales", a.w.scales)?;
    let biases: &[S] = cast(op, "biases", a.w.biases)?;
    let out: &mut [O] = cast_mut(op, "out", a.out)?;
    let (g, groups) = (a.w.group_size, scales.len());
    let gb = g / 8 * bits;
    check_len(op, "biases", groups, biases.len())?;
    check_len(op, "out", groups * g, out.len())?;
    check_len(op, "packed", groups * gb, a.w.packed.len())?;
    out.par_chunks_mut(task_groups * g)
        .zip(a.w.packed.par_chunks(task_groups * gb))
        .zip(
            scales
                .par_chunks(task_groups)
                .zip(biases.par_chunks(task_groups)),
        )
        .for_each(|((out, packed), (scales, biases))| task(packed, scales, biases, out));
    Ok(())
}

/// Dequantizes whole groups of `g` codes. Does nothing if the lengths disagree.
///
/// # Safety
/// The CPU must support [`available`]'s features.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vbmi")]
unsafe fn dequantize_groups<S: Float, O: Float, const BITS: usize>(
    packed: &[u8],
    scales: &[S],
    biases: &[S],
    g: usize,
    flavour: Flavour,
    out: &mut [O],
) {
    let groups = scales.len();
    let chunk_bytes = 4 * BITS;
    if !g.is_multiple_of(32)
        || biases.len() != groups
        || out.len() != groups * g
        || packed.len() != groups * g / 32 * chunk_bytes
    {
        return;
    }
    let (spread, ctl) = (spread_index::<BITS>(), shift_control::<BITS>());
    let (pp, po) = (packed.as_ptr(), out.as_mut_ptr());
    for (j, (s, b)) in scales.iter().zip(biases).enumerate() {
        let (s, b) = (_mm512_set1_ps(s.to_f32()), _mm512_set1_ps(b.to_f32()));
        for c in j * g / 32..(j + 1) * g / 32 {
            // SAFETY: chunk c < groups·g/32 lies within `packed` (checked above), and its 32
            // outputs at 32c within `out`.
            unsafe {
                let (lo, hi) = decode32::<BITS>(pp.add(c * chunk_bytes), spread, ctl);
                let (lo, hi) = match flavour {
                    Flavour::Gpu => (_mm512_fmadd_ps(lo, s, b), _mm512_fmadd_ps(hi, s, b)),
                    Flavour::Cpu => (cpu_value::<S>(lo, s, b), cpu_value::<S>(hi, s, b)),
                };
                store32::<O>(po.add(32 * c), lo, hi);
            }
        }
    }
}

/// MLX's CPU dequantization in the scales' dtype `S`: `S(S(q·s) + b)`, as f32 (then rounded
/// to the output dtype by the store: a no-op when that is `S`).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vbmi")]
fn cpu_value<S: Float>(q: __m512, s: __m512, b: __m512) -> __m512 {
    to_dtype::<S>(_mm512_add_ps(to_dtype::<S>(_mm512_mul_ps(q, s)), b))
}

/// `v` rounded to `O` and widened back to f32 (exact round trip).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vbmi")]
pub(super) fn to_dtype<O: Float>(v: __m512) -> __m512 {
    match O::DTYPE {
        DType::F16 => _mm512_cvtph_ps(_mm512_cvtps_ph::<
            { _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC },
        >(v)),
        DType::BF16 => bf16_round(v),
        _ => v,
    }
}

/// Stores 32 values (`lo` then `hi`) rounded to `O` at `p`.
///
/// # Safety
/// `p` must be valid for writing 32 elements of `O`; the CPU must support [`available`]'s
/// features.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vbmi")]
unsafe fn store32<O: Float>(p: *mut O, lo: __m512, hi: __m512) {
    // SAFETY: 32 elements writable at `p` (contract).
    unsafe {
        match O::DTYPE {
            DType::F16 => {
                const RNE: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
                _mm256_storeu_si256(p as *mut __m256i, _mm512_cvtps_ph::<RNE>(lo));
                _mm256_storeu_si256((p as *mut __m256i).add(1), _mm512_cvtps_ph::<RNE>(hi));
            }
            DType::BF16 => {
                // The high word of every rounded lane: indices 1, 3, …, 63 of lo:hi.
                let idx: [u16; 32] = std::array::from_fn(|i| (2 * i + 1) as u16);
                let idx = _mm512_loadu_si512(idx.as_ptr() as *const __m512i);
                let words = _mm512_permutex2var_epi16(
                    _mm512_castps_si512(bf16_round(lo)),
                    idx,
                    _mm512_castps_si512(bf16_round(hi)),
                );
                _mm512_storeu_si512(p as *mut __m512i, words);
            }
            _ => {
                _mm512_storeu_ps(p as *mut f32, lo);
                _mm512_storeu_ps((p as *mut f32).add(16), hi);
            }
        }
    }
}

/// Decodes the 32 codes of `4·BITS` bytes at `p` into two f32 vectors, in element order.
///
/// # Safety
/// `p` must point to `4·BITS` readable bytes; the CPU must support [`available`]'s features.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vbmi")]
unsafe fn decode32<const BITS: usize>(
    p: *const u8,
    spread: __m512i,
    ctl: __m512i,
) -> (__m512, __m512) {
    // SAFETY: the caller guarantees 4·BITS readable bytes at `p` and the CPU features.
    unsafe {
        let (lo, hi) = if BITS == 8 {
            (
                _mm_loadu_si128(p as *const __m128i),
                _mm_loadu_si128(p.add(16) as *const __m128i),
            )
        } else {
            // Chunk c (BITS bytes) → qword c; code j of a chunk from bit j·BITS → byte j.
            let mask: __mmask64 = (1u64 << (4 * BITS)) - 1;
            let raw = _mm512_maskz_loadu_epi8(mask, p as *const i8);
            let fields = _mm512_multishift_epi64_epi8(ctl, _mm512_permutexvar_epi8(spread, raw));
            let codes = _mm512_and_si512(fields, _mm512_set1_epi8(((1u32 << BITS) - 1) as i8));
            (
                _mm512_castsi512_si128(codes),
                _mm512_extracti32x4_epi32::<1>(codes),
            )
        };
        (
            _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo)),
            _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi)),
        )
    }
}

/// `vpermb` indices: byte `t` of qword `c` takes source byte `c·BITS + t`.
#[inline]
#[target_feature(enable = "avx512f")]
fn spread_index<const BITS: usize>() -> __m512i {
    let idx: [u8; 64] = std::array::from_fn(|i| ((i / 8) * BITS + i % 8).min(63) as u8);
    // SAFETY: reads exactly the 64 bytes of `idx`.
    unsafe { _mm512_loadu_si512(idx.as_ptr() as *const __m512i) }
}

/// `vpmultishiftqb` control: byte `j` of each qword starts at bit `j·BITS`.
#[inline]
#[target_feature(enable = "avx512f")]
fn shift_control<const BITS: usize>() -> __m512i {
    let ctl: [u8; 64] = std::array::from_fn(|i| ((i % 8) * BITS) as u8);
    // SAFETY: reads exactly the 64 bytes of `ctl`.
    unsafe { _mm512_loadu_si512(ctl.as_ptr() as *const __m512i) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The packing index tables against the generic bit-stream writer, every width and both
    /// code orders: 64 codes through [`pack64`] equal [`pack8`] of the same codes.
    #[test]
    fn pack64_matches_pack8() {
        if !available() {
            eprintln!("skipped: no AVX-512");
            return;
        }
        for bits in [1usize, 2, 3, 4, 5, 6, 8] {
            let n = (1i32 << bits) - 1;
            // Out-of-range values must clamp: −7 → 0, n + 9 → n.
            let vals: [i32; 64] = std::array::from_fn(|i| match i % 11 {
                3 => -7,
                7 => n + 9,
                _ => (i as i32 * 37 + 5) % (n + 1),
            });
            let codes: Vec<u8> = vals.iter().map(|&v| v.clamp(0, n) as u8).collect();
            let mut want = vec![0u8; 8 * bits];
            assert!(crate::quant::pack::pack_row(bits as u32, &codes, &mut want));
            for even_odd in [false, true] {
                // Vector v, lane i: element 16v + i, or (even/odd) 32(v/2) + 2i + v % 2.
                let order: [i32; 64] = std::array::from_fn(|j| {
                    let (v, i) = (j / 16, j % 16);
                    if even_odd {
                        vals[32 * (v / 2) + 2 * i + v % 2]
                    } else {
                        vals[j]
                    }
                });
                let mut got = vec![0xAAu8; 8 * bits + 8];
                // SAFETY: features checked; `got` has 8·bits (+8 spare) bytes.
                unsafe {
                    let k: [__m512i; 4] = std::array::from_fn(|v| {
                        _mm512_loadu_si512(order[16 * v..].as_ptr() as *const __m512i)
                    });
                    dispatch_bits!(bits as u32, B => {
                        let lut = pack_luts::<B>(even_odd);
                        pack64::<B>(&k, &lut, even_odd, got.as_mut_ptr(), 8 * B)
                    }, _ => unreachable!());
                }
                assert_eq!(
                    &got[..8 * bits],
                    &want[..],
                    "bits {bits}, even/odd {even_odd}"
                );
                assert!(
                    got[8 * bits..].iter().all(|&b| b == 0xAA),
                    "bits {bits}: wrote past the end"
                );
            }
        }
    }

    /// The packed output at every offset within a 64-byte line (`quantize_into` writes into
    /// caller-owned buffers, and tasks share the lines at their edges): equal to the generic
    /// kernel's bytes, and nothing written outside the slice. Two parallel tasks, the second
    /// ending in a partial batch; every width and group size.
    #[test]
    fn quantize_output_at_every_alignment() {
        if !available() {
            eprintln!("skipped: no AVX-512");
            return;
        }
        let groups = TASK_GROUPS + 3 * BATCH + 5;
        let mut seed = 0x2545_F491_4F6C_DD1Du64;
        for bits in [1u32, 2, 3, 4, 5, 6, 8] {
            for g in [32usize, 64, 128] {
                let mut w = vec![0f32; groups * g];
                for group in w.chunks_exact_mut(g) {
                    special_group(&mut seed, group);
                }
                let gb = g / 8 * bits as usize;
                let n = groups * gb;
                let run = |f: super::super::quantize::QuantizeFn, packed: &mut [u8]| {
                    let (mut scales, mut biases) = (vec![0u8; groups * 4], vec![0u8; groups * 4]);
                    f(QuantizeArgs {
                        w: bytemuck::cast_slice(&w),
                        group_size: g,
                        flavour: Flavour::Gpu,
                        packed,
                        scales: &mut scales,
                        biases: &mut biases,
                    })
                    .expect("valid arguments");
                };
                let mut want = vec![0u8; n];
                run(
                    super::super::quantize::generic::<super::super::Baseline>(DType::F32, bits)
                        .expect("generic"),
                    &mut want,
                );
                let f = quantize_kernel(DType::F32, bits).expect("a kernel for every width");
                for off in [0usize, 1, 4, 17, 32, 45, 63] {
                    // A 64-byte aligned base: `off` is the slice's offset within its line.
                    let mut store = vec![0u64; (n + 256) / 8];
                    let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut store);
                    let base = bytes.as_ptr() as usize;
                    let start = (64 - base % 64) % 64 + off;
                    bytes.fill(0xA5);
                    run(f, &mut bytes[start..start + n]);
                    let ctx = format!("{bits}-bit g{g} offset {off}");
                    assert!(bytes[start..start + n] == want[..], "{ctx}: codes differ");
                    assert!(
                        bytes[..start].iter().all(|&b| b == 0xA5),
                        "{ctx}: wrote before"
                    );
                    assert!(
                        bytes[start + n..].iter().all(|&b| b == 0xA5),
                        "{ctx}: wrote after"
                    );
                }
            }
        }
    }

    /// Random values of one group: ordinary ones of a random magnitude, ties of a power-of-2
    /// grid, constants, signed zeros, subnormals, huge ranges, and NaN/±∞ sprinkled in.
    fn special_group(seed: &mut u64, out: &mut [f32]) {
        let mut next = move || {
            *seed ^= *seed << 13;
            *seed ^= *seed >> 7;
            *seed ^= *seed << 17;
            *seed
        };
        let unit = |x: u64| (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
        let kind = next() % 9;
        let magnitude = [1e-3f32, 0.02, 1.0, 300.0][(next() % 4) as usize];
        for v in out.iter_mut() {
            let x = next();
            *v = match kind {
                0 => unit(x) * magnitude,
                1 => (x % 31) as f32 * 0.125 - 1.5,
                2 => magnitude,
                3 => f32::from_bits(((x & 1) as u32) << 31),
                4 => f32::from_bits((x as u32 & 0x007F_FFFF) | ((x >> 40) as u32 & 1) << 31),
                5 => unit(x) * 3.4e38 * 1.9,
                6 => unit(x) * 1e32,
                _ => unit(x) * magnitude + 1.0,
            };
        }
        let specials = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -0.0, 0.0, 1e-40];
        for _ in 0..next() % 3 {
            let i = (next() % out.len() as u64) as usize;
            out[i] = specials[(next() % specials.len() as u64) as usize];
        }
    }

    /// The kernel against the scalar definition ([`quantize_group`], [`pack8`], `T::from_f32`)
    /// on groups from [`special_group`], outputs poisoned first: every width, group size and
    /// flavour, a count of groups that ends in a partial batch.
    fn check_against_definition<T: Float>() {
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let groups = 5 * BATCH + 7;
        for bits in [1u32, 2, 3, 4, 5, 6, 8] {
            for g in [32usize, 64, 128] {
                let mut w = vec![0f32; groups * g];
                for group in w.chunks_exact_mut(g) {
                    special_group(&mut seed, group);
                }
                let w: Vec<T> = w.iter().map(|&v| T::from_f32(v)).collect();
                for flavour in [Flavour::Cpu, Flavour::Gpu] {
                    let gb = g / 8 * bits as usize;
                    let sb = groups * size_of::<T>();
                    let (mut packed, mut scales, mut biases) = (
                        vec![0xA5u8; groups * gb],
                        vec![0xA5u8; sb],
                        vec![0xA5u8; sb],
                    );
                    let f = quantize_kernel(T::DTYPE, bits).expect("a kernel for every width");
                    f(QuantizeArgs {
                        w: bytemuck::cast_slice(&w),
                        group_size: g,
                        flavour,
                        packed: &mut packed,
                        scales: &mut scales,
                        biases: &mut biases,
                    })
                    .expect("valid arguments");
                    for (j, wg) in w.chunks_exact(g).enumerate() {
                        let vals: Vec<f32> = wg.iter().map(|v| v.to_f32()).collect();
                        let mut codes = vec![0u8; g];
                        let (s, b) = quantize_group(&vals, bits, flavour, &mut codes);
                        let mut want = vec![0u8; gb];
                        assert!(crate::quant::pack::pack_row(bits, &codes, &mut want));
                        let ts = size_of::<T>();
                        let ctx = format!("{} {bits}-bit g{g} {flavour} group {j}", T::DTYPE);
                        assert_eq!(packed[j * gb..(j + 1) * gb], want[..], "{ctx}: {vals:?}");
                        let (s, b) = (T::from_f32(s), T::from_f32(b));
                        assert_eq!(
                            scales[j * ts..(j + 1) * ts],
                            *bytemuck::bytes_of(&s),
                            "{ctx} scale: {vals:?}"
                        );
                        assert_eq!(
                            biases[j * ts..(j + 1) * ts],
                            *bytemuck::bytes_of(&b),
                            "{ctx} bias: {vals:?}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn quantize_matches_definition_on_special_values() {
        if !available() {
            eprintln!("skipped: no AVX-512");
            return;
        }
        check_against_definition::<f32>();
        check_against_definition::<half::f16>();
        check_against_definition::<half::bf16>();
    }

    /// `vreduceps` gives `q − rint(q)` and `vrangeps` (imm 0b1011) the larger magnitude: the
    /// two facts the near-tie test relies on.
    #[test]
    fn reduce_and_range_semantics() {
        if !available() {
            eprintln!("skipped: no AVX-512");
            return;
        }
        let q: [f32; 16] = [
            0.5, 1.5, 2.5, -0.5, 0.49999997, 3.7, -2.2, 1e9, 7.0, 0.0, -0.0, 12.25, 5.5000005,
            0.75, 2.0e-40, 255.5,
        ];
        // SAFETY: features checked; arrays of 16 f32.
        let (frac, worst) = unsafe {
            let v = _mm512_loadu_ps(q.as_ptr());
            let frac = _mm512_reduce_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v);
            let worst = _mm512_range_ps::<0b1011>(_mm512_set1_ps(-0.25), frac);
            let mut f = [0f32; 16];
            let mut w = [0f32; 16];
            _mm512_storeu_ps(f.as_mut_ptr(), frac);
            _mm512_storeu_ps(w.as_mut_ptr(), worst);
            (f, w)
        };
        for i in 0..16 {
            assert_eq!(frac[i], q[i] - q[i].round_ties_even(), "frac of {}", q[i]);
            assert_eq!(worst[i], frac[i].abs().max(0.25), "range of {}", q[i]);
        }
    }

    /// The shuffle tree puts group j's min and max in lane j.
    #[test]
    fn reduce16_orders_lanes() {
        if !available() {
            eprintln!("skipped: no AVX-512");
            return;
        }
        let vals: Vec<f32> = (0..256)
            .map(|i| ((i * 97 + 13) % 256) as f32 - 100.0)
            .collect();
        // SAFETY: features checked; 256 f32 read as 16 vectors.
        let (mn, mx) = unsafe {
            let p: [__m512; 16] = std::array::from_fn(|j| _mm512_loadu_ps(vals[16 * j..].as_ptr()));
            let mut mn = [0f32; 16];
            let mut mx = [0f32; 16];
            _mm512_storeu_ps(mn.as_mut_ptr(), reduce16::<false>(&p));
            _mm512_storeu_ps(mx.as_mut_ptr(), reduce16::<true>(&p));
            (mn, mx)
        };
        for j in 0..16 {
            let g = &vals[16 * j..16 * (j + 1)];
            assert_eq!(
                mn[j],
                g.iter().copied().fold(f32::INFINITY, f32::min),
                "min {j}"
            );
            assert_eq!(
                mx[j],
                g.iter().copied().fold(f32::NEG_INFINITY, f32::max),
                "max {j}"
            );
        }
    }

    /// Times the quantize kernels alone (outputs allocated once, so no page faults or
    /// zeroing inside the timing), 4-bit group 64 on a 4096×14336 weight in f32 and bf16,
    /// rotating copies (≥ 600 MB), best of `MLXQ_PROBE_ITERS` (7); a plain parallel read
    /// of the same copies gives the bandwidth. `MLXQ_PROBE_ROWS` and `MLXQ_PROBE_COPIES`
    /// (copies of the bf16 weight) change the shape and the rotation. Ignored: run with `cargo test --release -p mlxq
    /// --lib kernel_speed -- --ignored --nocapture`.
    #[test]
    #[ignore = "timing probe, not a test"]
    fn kernel_speed() {
        use std::time::Instant;
        if !available() {
            eprintln!("skipped: no AVX-512");
            return;
        }
        let env = |var: &str, default: usize| {
            std::env::var(var)
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(default)
        };
        let iters = env("MLXQ_PROBE_ITERS", 7);
        let (rows, cols, g) = (env("MLXQ_PROBE_ROWS", 4096), 14336usize, 64usize);
        let copies = env(
            "MLXQ_PROBE_COPIES",
            (600usize << 20).div_ceil(rows * cols * 2),
        );
        let v: Vec<f32> = (0..rows * cols)
            .map(|i| {
                let h = |k: u32| (i as u32).wrapping_mul(2654435761).wrapping_add(k * 40503) >> 8;
                (0..4)
                    .map(|k| h(k) as f32 / (1u32 << 24) as f32 - 0.5)
                    .sum::<f32>()
                    * 0.035
            })
            .collect();
        fn run<T: Float>(
            v: &[f32],
            rows: usize,
            cols: usize,
            g: usize,
            iters: usize,
            copies: usize,
        ) {
            let copies = (copies * 2).div_ceil(size_of::<T>());
            let inputs: Vec<Vec<T>> = (0..copies)
                .map(|_| v.iter().map(|&x| T::from_f32(x)).collect())
                .collect();
            let groups = rows * cols / g;
            let mut packed = vec![0u8; rows * cols / 2];
            let mut scales = vec![0u8; groups * size_of::<T>()];
            let mut biases = vec![0u8; groups * size_of::<T>()];
            let mut read = f64::INFINITY;
            for i in 0..iters {
                let bytes: &[u8] = bytemuck::cast_slice(&inputs[i % inputs.len()]);
                let t = Instant::now();
                let sum = bytes
                    .par_chunks(1 << 18)
                    .map(|c| {
                        c.chunks_exact(8).fold(0u64, |s, w| {
                            s ^ u64::from_le_bytes(w.try_into().unwrap_or([0; 8]))
                        })
                    })
                    .reduce(|| 0, |a, b| a ^ b);
                std::hint::black_box(sum);
                read = read.min(t.elapsed().as_secs_f64());
            }
            let bytes = (rows * cols * size_of::<T>()) as f64;
            println!("{:>8}: read {:6.2} GB/s", T::DTYPE, bytes / read / 1e9);
            for flavour in [Flavour::Gpu, Flavour::Cpu] {
                for (name, f) in [
                    ("avx512", quantize_kernel(T::DTYPE, 4)),
                    (
                        "generic",
                        super::super::quantize::generic::<super::super::Baseline>(T::DTYPE, 4),
                    ),
                ] {
                    let Some(f) = f else { continue };
                    let n = if name == "generic" { 1 } else { iters };
                    let mut best = f64::INFINITY;
                    for i in 0..n {
                        let t = Instant::now();
                        f(QuantizeArgs {
                            w: bytemuck::cast_slice(&inputs[i % inputs.len()]),
                            group_size: g,
                            flavour,
                            packed: &mut packed,
                            scales: &mut scales,
                            biases: &mut biases,
                        })
                        .unwrap();
                        best = best.min(t.elapsed().as_secs_f64());
                    }
                    println!(
                        "{:>8} {flavour} {name:<8} kernel best {:8.2} ms {:6.2} GB/s of input = {:5.1}% of read",
                        T::DTYPE,
                        best * 1e3,
                        bytes / best / 1e9,
                        100.0 * read / best
                    );
                }
            }
        }
        run::<f32>(&v, rows, cols, g, iters, copies);
        run::<half::bf16>(&v, rows, cols, g, iters, copies);
    }
}
