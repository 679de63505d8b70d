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
//! shifted left by 8 and `vpdpbusd` adds `q·lo`; one conversion and one FMA per group apply
//! `s·2^(e−8)`. The only error is x̂'s: `|x − x̂| ≤ 2^(e−9) < max|x_g|/32512` (half a step
//! of lo, with `2^e < max|x_g|/63.5`). The grid holds every multiple of `2^(e−8)`, so a bf16
//! element (8 significant bits) within a factor 127 of its group's largest is represented
//! exactly, an f16 one (11 bits) within a factor 15.9. Smaller elements are rounded on the
//! group's grid: about 2^-15 of the group's largest, far below the rounding of a bf16 or f16
//! output (2^-9, 2^-12), which is why only those outputs take this kernel. Σx for the bias term `b·Σx` is the f32 sum of the exact x. The conformance suite
//! checks the results against the f64 oracle at the bf16/f16 tolerance, and a test with x
//! spread over six decades inside each group checks the bound.
//!
//! Cost (port slots of the two 512-bit ports, one 64-code chunk): 4-bit decode 2 (`vpsrlvw`,
//! `vpandd` on a broadcast load), 8-bit 0, other widths 3 (`vpermb`, `vpmultishiftqb`,
//! `vpandd`); per row 2 `vpdpbusd` (1 slot each) plus, per group, a shift, a conversion and an
//! FMA. The bf16 kernel spends 4 slots on one `vdpbf16ps` of 32 products on this CPU family,
//! so this one does about four times the work per slot.
//!
//! Groups of 32 use 32-code chunks in 64-lane registers whose upper x lanes are zero.

use super::qmm::QmmArgs;
use super::x86_columns::{prefetch_w, run, Columns, Rows, Walk, MAX_COLS, MAX_ROWS};
use super::{cast, cast_mut, Variant};
use crate::dtype::Float;
use crate::error::Result;
use rayon::prelude::*;
use std::arch::x86_64::*;
use std::cell::RefCell;

/// The variant: `quantized_matmul`, transpose, bf16 or f16 x and output, every affine width.
///
/// An f32 output (f32 scales) asks for a relative error of 1e-5, which x̂'s error can reach
/// when a group's x spans more than 2^7; those keys go to the float kernels.
pub(crate) const QMM_T_VNNI: Variant = Variant {
    name: "avx512vnni",
    supports: |k| {
        k.mode == crate::QuantMode::Affine
            && k.op == crate::registry::OpKind::QuantizedMatmul
            && k.flag
            && matches!(k.input, crate::DType::BF16 | crate::DType::F16)
            && matches!(k.output, crate::DType::BF16 | crate::DType::F16)
            && available()
    },
    build: |k| {
        use crate::quant::pack::dispatch_bits;
        crate::with_float_type!(k.scales, S => crate::with_float_type!(k.output, O => {
            Some(dispatch_bits!(k.bits, B => super::KernelFn::Qmm(qmm_t::<S, O, B>), _ => return None))
        }, _ => None), _ => None)
    },
};

/// Whether this CPU can run the kernels of this module.
pub(crate) fn available() -> bool {
    super::x86::available() && is_x86_feature_detected!("avx512vnni")
}

/// Rows of x sharing one decoded chunk: 4 rather than 8 keeps a block's accumulators and
/// scale factors in registers (M = 8 4096×4096 4-bit: 6.2 ms CPU time against 7.1 with 8).
const ROWS: usize = 4;
/// Columns sharing each load of x: two give each group two independent chains and halve
/// the x loads (M = 1 4-bit 1.3× faster, M = 8 1.17×, CPU time; four gained nothing more).
const COLS: usize = 2;
/// Bytes of split x one row block may touch per K block (L1-resident beside the weights).
const X_BLOCK_BYTES: usize = 24 << 10;

/// x prepared for one call: per row, per chunk, 64 `hi` bytes then 64 `lo` bytes (lanes in
/// the decode order of the width), per row and group the step `2^(e−8)` and Σx.
#[derive(Default)]
struct Prepared {
    split: Vec<i8>,
    step: Vec<f32>,
    xsum: Vec<f32>,
}

thread_local! {
    /// The prepared x, reused across calls (taken, not borrowed, so nested calls allocate).
    static SCRATCH: RefCell<Prepared> = RefCell::new(Prepared::default());
}

/// Lane of element `i` of a chunk of `ch` codes for `bits` (4-bit: even elements, then odd).
#[inline(always)]
fn lane(bits: usize, ch: usize, i: usize) -> usize {
    if bits == 4 {
        (i % 2) * (ch / 2) + i / 2
    } else {
        i
    }
}

/// Splits x (`m × k`) into [`Prepared`] for `bits`, groups of `g`, chunks of `ch`.
fn prepare(x: &[f32], m: usize, k: usize, g: usize, ch: usize, bits: usize, p: &mut Prepared) {
    let (groups, chunks) = (k / g, k / ch);
    p.split.clear();
    p.split.resize(m * chunks * 128, 0);
    p.step.clear();
    p.step.resize(m * groups, 0.0);
    p.xsum.clear();
    p.xsum.resize(m * groups, 0.0);
    let fast = available();
    // SAFETY: `fast` says the CPU has the features.
    let perm = fast.then(|| unsafe { lane_permutation(bits, ch) });
    // Rows, or for a single row stretches of groups, in parallel: a decode call's whole
    // preparation is one row.
    let per_task = (groups / rayon::current_num_threads().max(1)).clamp(1, 64);
    let tasks = p
        .split
        .par_chunks_mut(per_task * g / ch * 128)
        .zip(p.step.par_chunks_mut(per_task))
        .zip(p.xsum.par_chunks_mut(per_task))
        .enumerate();
    tasks.for_each(|(t, ((split, step), xsum))| {
        // Task t covers groups t·per_task.. of the flattened m × groups.
        for (jj, (st, xs)) in step.iter_mut().zip(xsum.iter_mut()).enumerate() {
            let j = t * per_task + jj;
            let (row, gi) = (j / groups, j % groups);
            let xg = &x[row * k + gi * g..row * k + (gi + 1) * g];
            let out = &mut split[jj * (g / ch) * 128..(jj + 1) * (g / ch) * 128];
            match perm {
                // SAFETY: `perm` exists only where the CPU has the features.
                Some(perm) => unsafe { split_group_avx512(xg, ch, bits, perm, st, xs, out) },
                None => split_group(xg, ch, bits, st, xs, out),
            }
        }
    });
}

/// One group's split, step and Σx (the definition; [`split_group_avx512`] is its fast twin).
fn split_group(xg: &[f32], ch: usize, bits: usize, step: &mut f32, xsum: &mut f32, out: &mut [i8]) {
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
    for (c, xc) in xg.chunks_exact(ch).enumerate() {
        let out = &mut out[c * 128..(c + 1) * 128];
        for (i, &v) in xc.iter().enumerate() {
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
            let l = lane(bits, ch, i);
            out[l] = hi as i8;
            out[64 + l] = lo as i8;
        }
    }
}

/// `vpermb` indices taking a chunk's bytes from element order to lane order ([`lane`]),
/// and the mask of the chunk's lanes (lanes past `ch` are zero).
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
fn lane_permutation(bits: usize, ch: usize) -> (__m512i, __mmask64) {
    let mut idx = [0u8; 64];
    for i in 0..ch {
        idx[lane(bits, ch, i)] = i as u8;
    }
    let mask = if ch >= 64 { u64::MAX } else { (1u64 << ch) - 1 };
    // SAFETY: reads exactly the 64 bytes of `idx`.
    (
        unsafe { _mm512_loadu_si512(idx.as_ptr() as *const __m512i) },
        mask,
    )
}

/// [`split_group`] with AVX-512, bit for bit the same split and step (Σx may differ in its
/// last bits: another summation order). f32 suffices where `2^±e` and `2^(8−e)` are normal
/// f32 (|e| ≤ 100): scaling by them is then exact, or underflows only where the result
/// rounds to 0 either way; other groups take [`split_group`].
///
/// # Safety
/// The CPU supports [`available`]'s features.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx512dq")]
unsafe fn split_group_avx512(
    xg: &[f32],
    ch: usize,
    bits: usize,
    (perm, lanes): (__m512i, __mmask64),
    step: &mut f32,
    xsum: &mut f32,
    out: &mut [i8],
) {
    let g = xg.len();
    if !g.is_multiple_of(16) || !g.is_multiple_of(ch) || out.len() < g / ch * 128 {
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
        return split_group(xg, ch, bits, step, xsum, out);
    }
    *step = pow2(e - 8) as f32;
    let (unit, inv_hi, inv_lo) = (
        _mm512_set1_ps(pow2(e) as f32),
        _mm512_set1_ps(pow2(-e) as f32),
        _mm512_set1_ps(pow2(8 - e) as f32),
    );
    const NEAREST: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    for c in 0..g / ch {
        let (mut hi8, mut lo8) = ([0i8; 64], [0i8; 64]);
        for v0 in (0..ch).step_by(16) {
            // SAFETY: c·ch + v0 + 16 ≤ g elements of `xg`.
            let v = unsafe { _mm512_loadu_ps(p.add(c * ch + v0)) };
            let v = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask::<_CMP_LT_OQ>(_mm512_abs_ps(v), inf), v);
            let mut hi = _mm512_roundscale_ps::<NEAREST>(_mm512_mul_ps(v, inv_hi));
            // Exact (see `split_group`), so fused or not makes no difference.
            let rest = _mm512_fnmadd_ps(hi, unit, v);
            let mut lo = _mm512_roundscale_ps::<NEAREST>(_mm512_mul_ps(rest, inv_lo));
            let carry = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(lo, _mm512_set1_ps(127.0));
            hi = _mm512_mask_add_ps(hi, carry, hi, _mm512_set1_ps(1.0));
            lo = _mm512_mask_sub_ps(lo, carry, lo, _mm512_set1_ps(256.0));
            // SAFETY: v0 + 16 ≤ 64 bytes of each array.
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
        // SAFETY: 128 bytes from c·128 lie in `out` (checked above); the arrays are 64 bytes.
        unsafe {
            let o = out.as_mut_ptr().add(c * 128) as *mut __m512i;
            let h = _mm512_loadu_si512(hi8.as_ptr() as *const __m512i);
            let l = _mm512_loadu_si512(lo8.as_ptr() as *const __m512i);
            _mm512_storeu_si512(o, _mm512_maskz_permutexvar_epi8(lanes, perm, h));
            _mm512_storeu_si512(o.add(1), _mm512_maskz_permutexvar_epi8(lanes, perm, l));
        }
    }
}

/// The smallest `e` with `max ≤ 127·2^e` (0 for `max = 0`).
fn grid_exponent(max: f32) -> i32 {
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
fn pow2(e: i32) -> f64 {
    f64::from_bits(((e + 1023) as u64) << 52)
}

/// Round half to even for |v| < 2^51, without a libm call.
#[inline(always)]
fn round(v: f64) -> f64 {
    const MAGIC: f64 = 6755399441055744.0; // 1.5·2^52
    (v + MAGIC) - MAGIC
}

/// Constant vectors the decode needs, built once per call.
#[derive(Clone, Copy)]
struct Tables {
    /// 4-bit: word shifts, 0 in the low 256 bits and 4 in the high (CH = 64) or 0/4 per
    /// 128 bits (CH = 32).
    shifts: __m512i,
    /// Other widths: `vpermb` indices and `vpmultishiftqb` controls.
    spread: __m512i,
    ctl: __m512i,
    /// `2^bits − 1` in every byte.
    mask: __m512i,
}

#[target_feature(enable = "avx512f,avx512bw")]
fn tables<const BITS: usize>(ch: usize) -> Tables {
    let shifts: [u16; 32] = std::array::from_fn(|i| {
        if (ch == 64 && i >= 16) || (ch == 32 && i % 16 >= 8) {
            4
        } else {
            0
        }
    });
    let spread: [u8; 64] = std::array::from_fn(|i| ((i / 8) * BITS + i % 8).min(63) as u8);
    let ctl: [u8; 64] = std::array::from_fn(|i| ((i % 8) * BITS) as u8);
    // SAFETY: each load reads exactly the 64 bytes of its array.
    unsafe {
        Tables {
            shifts: _mm512_loadu_si512(shifts.as_ptr() as *const __m512i),
            spread: _mm512_loadu_si512(spread.as_ptr() as *const __m512i),
            ctl: _mm512_loadu_si512(ctl.as_ptr() as *const __m512i),
            mask: _mm512_set1_epi8(((1u32 << BITS) - 1) as u8 as i8),
        }
    }
}

/// The `CH` codes of a chunk at `p` as bytes in lane order (lanes ≥ CH hold garbage, which
/// meets zero x there).
///
/// # Safety
/// `p` points to `CH·BITS/8` readable bytes; the CPU supports [`available`]'s features.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx512vnni")]
unsafe fn decode<const BITS: usize, const CH: usize>(p: *const u8, t: &Tables) -> __m512i {
    // SAFETY: the caller guarantees CH·BITS/8 readable bytes at `p` and the CPU features;
    // masked loads touch only the bytes their mask names.
    unsafe {
        match (BITS, CH) {
            (8, 64) => _mm512_loadu_si512(p as *const __m512i),
            (8, _) => _mm512_maskz_loadu_epi8(u32::MAX as u64, p as *const i8),
            (4, 64) => {
                let b = _mm512_broadcast_i64x4(_mm256_loadu_si256(p as *const __m256i));
                _mm512_and_si512(_mm512_srlv_epi16(b, t.shifts), t.mask)
            }
            (4, _) => {
                let b = _mm512_broadcast_i32x4(_mm_loadu_si128(p as *const __m128i));
                _mm512_and_si512(_mm512_srlv_epi16(b, t.shifts), t.mask)
            }
            _ => {
                let mask: __mmask64 = (1u64 << (CH / 8 * BITS)) - 1;
                let raw = _mm512_maskz_loadu_epi8(mask, p as *const i8);
                let fields =
                    _mm512_multishift_epi64_epi8(t.ctl, _mm512_permutexvar_epi8(t.spread, raw));
                _mm512_and_si512(fields, t.mask)
            }
        }
    }
}

/// The kernel.
pub(crate) fn qmm_t<S: Float, O: Float, const BITS: usize>(a: QmmArgs<'_>) -> Result<()> {
    if a.w.group_size >= 64 {
        qmm_t_ch::<S, O, BITS, 64>(a)
    } else {
        qmm_t_ch::<S, O, BITS, 32>(a)
    }
}

fn qmm_t_ch<S: Float, O: Float, const BITS: usize, const CH: usize>(a: QmmArgs<'_>) -> Result<()> {
    const OP: &str = "quantized_matmul";
    let w = a.w;
    let scales: &[S] = cast(OP, "scales", w.scales)?;
    let biases: &[S] = cast(OP, "biases", w.biases)?;
    let out: &mut [O] = cast_mut(OP, "out", a.out)?;
    let (m, n, k, g) = (a.m, w.rows, w.cols, w.group_size);
    // K blocks such that the split rows of x a column visits stay in L1.
    let walk = Walk::new(m, n, k, g, ROWS, 128 / CH, X_BLOCK_BYTES);
    let mut prep = SCRATCH.with(|s| std::mem::take(&mut *s.borrow_mut()));
    prepare(a.x, m, k, g, CH, BITS, &mut prep);
    let kernel = Kernel::<S, BITS, CH> {
        w: Rows::new(&w, scales, biases),
        prep: &prep,
        k,
        // SAFETY: this variant is only chosen where `available` holds.
        tables: unsafe { tables::<BITS>(CH) },
    };
    // SAFETY: as for `tables`.
    unsafe { run(&kernel, walk, out) };
    SCRATCH.with(|s| *s.borrow_mut() = prep);
    Ok(())
}

/// Everything one call's columns read.
struct Kernel<'a, S, const BITS: usize, const CH: usize> {
    w: Rows<'a, S>,
    prep: &'a Prepared,
    k: usize,
    tables: Tables,
}

impl<S: Float, const BITS: usize, const CH: usize> Columns for Kernel<'_, S, BITS, CH> {
    const ROWS: usize = ROWS;
    const COLS: usize = COLS;

    unsafe fn columns<const R: usize>(
        &self,
        col: usize,
        count: usize,
        g0: usize,
        g1: usize,
        row0: usize,
        acc: &mut [[f32; MAX_ROWS]; MAX_COLS],
    ) {
        let g = self.w.g;
        let mut args = Column {
            packed: [&[]; COLS],
            scales: [&[]; COLS],
            biases: [&[]; COLS],
            prep: self.prep,
            row0,
            k: self.k,
            k0: g0 * g,
            g,
            tables: &self.tables,
            row_bytes: self.w.row_bytes,
        };
        for c in 0..count.min(COLS) {
            let Some((packed, scales, biases)) = self.w.row(col + c, g0, g1, BITS) else {
                return;
            };
            (args.packed[c], args.scales[c], args.biases[c]) = (packed, scales, biases);
        }
        // SAFETY: the caller guarantees the CPU features; `columns` checks the slices.
        unsafe {
            match count {
                1 => columns::<S, BITS, CH, R, 1>(&args, acc),
                _ => columns::<S, BITS, CH, R, COLS>(&args, acc),
            }
        }
    }
}

/// Up to [`COLS`] columns' slices of K (`k0..k0 + scales.len()·g`) for rows
/// `row0..row0 + R` of x.
struct Column<'a, S> {
    packed: [&'a [u8]; COLS],
    scales: [&'a [S]; COLS],
    biases: [&'a [S]; COLS],
    prep: &'a Prepared,
    row0: usize,
    k: usize,
    k0: usize,
    g: usize,
    tables: &'a Tables,
    /// Bytes from one weight row to the next.
    row_bytes: usize,
}

/// 16 values of `S` at `p` widened exactly to f32.
///
/// # Safety
/// `p` points to 16 readable `S`; the CPU supports [`available`]'s features.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx512vnni")]
unsafe fn widen16<S: Float>(p: *const S) -> __m512 {
    // SAFETY: the caller guarantees 16 readable elements at `p` (32 bytes for bf16/f16, 64
    // for f32) and the CPU features.
    unsafe {
        match S::DTYPE {
            crate::DType::BF16 => _mm512_castsi512_ps(_mm512_slli_epi32::<16>(
                _mm512_cvtepu16_epi32(_mm256_loadu_si256(p as *const __m256i)),
            )),
            crate::DType::F16 => _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)),
            _ => _mm512_loadu_ps(p as *const f32),
        }
    }
}

/// `acc[c][r] = Σ over this K slice of x[row0 + r]·ŵ[c]`, for `R` rows and `C` columns
/// (each x load serves every column).
///
/// # Safety
/// The CPU must support [`available`]'s features.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx512vnni")]
unsafe fn columns<S: Float, const BITS: usize, const CH: usize, const R: usize, const C: usize>(
    a: &Column<'_, S>,
    acc: &mut [[f32; MAX_ROWS]],
) {
    let (k, g) = (a.k, a.g);
    let groups = a.scales[0].len();
    let len = groups * g;
    let (gtotal, ctotal) = (k / g, k / CH);
    let gk0 = a.k0 / g;
    let per_group = g / CH;
    if (0..C).any(|c| {
        a.scales[c].len() != groups
            || a.biases[c].len() < groups
            || a.packed[c].len() < len / 8 * BITS
    }) || a.prep.split.len() < (a.row0 + R) * ctotal * 128
        || a.prep.step.len() < (a.row0 + R) * gtotal
        || a.prep.xsum.len() < (a.row0 + R) * gtotal
        || a.k0 + len > k
        || !(1..=2).contains(&per_group)
        || C > COLS
        || acc.len() < C
    {
        return;
    }
    let mut vacc = [[_mm512_setzero_ps(); R]; C];
    let mut vacc2 = [[_mm512_setzero_ps(); R]; C];
    let mut bacc = [[_mm512_setzero_ps(); R]; C];
    let mut btail = [[0f32; R]; C];
    let (step, xsum) = (a.prep.step.as_ptr(), a.prep.xsum.as_ptr());
    // s·2^(e−8) per column and row for the current block of 16 groups.
    let mut sf = [[[0f32; 16]; R]; C];
    // One group for R rows and C columns: the dots of its chunks with hi, shifted, with lo,
    // scaled into `$vacc`. A macro rather than a function: the accumulators must stay in
    // registers. Safety (at each use): the group's chunks lie within `packed` and its split
    // x within `split` (checked above).
    let ck0 = a.k0 / CH;
    macro_rules! group {
        ($chunk0:expr, $jj:expr, $vacc:ident) => {{
            let chunk0 = $chunk0;
            let mut c0 = [_mm512_setzero_si512(); C];
            let mut c1 = [_mm512_setzero_si512(); C];
            for c in 0..C {
                let pp = a.packed[c].as_ptr();
                // The next slice of this column's stream is C rows of W on.
                prefetch_w(
                    pp,
                    chunk0 * CH / 8 * BITS,
                    len / 8 * BITS,
                    C * a.row_bytes,
                    C,
                );
                c0[c] = decode::<BITS, CH>(pp.add(chunk0 * CH / 8 * BITS), a.tables);
                if per_group == 2 {
                    c1[c] = decode::<BITS, CH>(pp.add((chunk0 + 1) * CH / 8 * BITS), a.tables);
                }
            }
            for r in 0..R {
                let row = a.row0 + r;
                let px =
                    a.prep
                        .split
                        .as_ptr()
                        .add((row * ctotal + ck0 + chunk0) * 128) as *const __m512i;
                let (h0, l0) = (_mm512_loadu_si512(px), _mm512_loadu_si512(px.add(1)));
                let (h1, l1) = if per_group == 2 {
                    (_mm512_loadu_si512(px.add(2)), _mm512_loadu_si512(px.add(3)))
                } else {
                    (_mm512_setzero_si512(), _mm512_setzero_si512())
                };
                for c in 0..C {
                    let mut d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), c0[c], h0);
                    if per_group == 2 {
                        d = _mm512_dpbusd_epi32(d, c1[c], h1);
                    }
                    d = _mm512_slli_epi32::<8>(d);
                    d = _mm512_dpbusd_epi32(d, c0[c], l0);
                    if per_group == 2 {
                        d = _mm512_dpbusd_epi32(d, c1[c], l1);
                    }
                    let f = _mm512_set1_ps(sf[c][r][$jj]);
                    $vacc[c][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), f, $vacc[c][r]);
                }
            }
        }};
    }
    for j0 in (0..groups).step_by(16) {
        let block = 16.min(groups - j0);
        for c in 0..C {
            // SAFETY: groups j0..j0 + block of this slice are in `scales`/`biases`, and of
            // rows row0..row0 + R in `step`/`xsum` (all checked above).
            unsafe {
                if block == 16 {
                    let s = widen16(a.scales[c].as_ptr().add(j0));
                    let b = widen16(a.biases[c].as_ptr().add(j0));
                    for r in 0..R {
                        let gi = (a.row0 + r) * gtotal + gk0 + j0;
                        let sv = _mm512_mul_ps(s, _mm512_loadu_ps(step.add(gi)));
                        _mm512_storeu_ps(sf[c][r].as_mut_ptr(), sv);
                        bacc[c][r] = _mm512_fmadd_ps(b, _mm512_loadu_ps(xsum.add(gi)), bacc[c][r]);
                    }
                } else {
                    let tail = a.scales[c][j0..].iter().zip(&a.biases[c][j0..]);
                    for (jj, (s, b)) in tail.enumerate() {
                        let (s, b) = (s.to_f32(), b.to_f32());
                        for r in 0..R {
                            let gi = (a.row0 + r) * gtotal + gk0 + j0 + jj;
                            sf[c][r][jj] = s * *step.add(gi);
                            btail[c][r] += b * *xsum.add(gi);
                        }
                    }
                }
            }
        }
        // With one column, two accumulators per row, alternating by group: each group's
        // chain (two `vpdpbusd`, a shift, a conversion) is long, the FMA into the sum is the
        // only dependency between groups, and two of them halve it. Several columns give
        // that independence already.
        let mut jj = 0;
        while jj < block {
            // SAFETY: as for `group` (chunks of this slice, rows checked above).
            unsafe {
                group!((j0 + jj) * per_group, jj, vacc);
                if jj + 1 < block {
                    if C == 1 {
                        group!((j0 + jj + 1) * per_group, jj + 1, vacc2);
                    } else {
                        group!((j0 + jj + 1) * per_group, jj + 1, vacc);
                    }
                }
            }
            jj += 2;
        }
    }
    for c in 0..C {
        for r in 0..R {
            let v = _mm512_add_ps(_mm512_add_ps(vacc[c][r], vacc2[c][r]), bacc[c][r]);
            acc[c][r] = _mm512_reduce_add_ps(v) + btail[c][r];
        }
    }
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

    /// x̂ rebuilt from the split: `(256·hi + lo)·step` for element `i` of group `j`.
    fn rebuilt(p: &Prepared, k: usize, g: usize, ch: usize, bits: usize, i: usize) -> f64 {
        let (chunk, e) = (i / ch, i % ch);
        let l = lane(bits, ch, e);
        let (hi, lo) = (p.split[chunk * 128 + l], p.split[chunk * 128 + 64 + l]);
        assert!(k.is_multiple_of(g));
        (256.0 * hi as f64 + lo as f64) * p.step[i / g] as f64
    }

    /// The AVX-512 split is the scalar definition's, bit for bit, over magnitudes from
    /// subnormal to near f32's largest (both sides of the |e| ≤ 100 switch), non-finite
    /// elements and every chunk layout; Σx agrees to f32 summation-order error.
    #[test]
    fn fast_split_matches_the_definition() {
        if !available() {
            eprintln!("skipped: this CPU lacks AVX-512 VNNI");
            return;
        }
        let mut next = uniform(0x2545f4914f6cdd1du64);
        for (g, ch, bits) in [
            (32, 32, 4),
            (64, 64, 4),
            (128, 64, 4),
            (64, 64, 8),
            (32, 32, 3),
        ] {
            let perm = unsafe { lane_permutation(bits, ch) };
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
                let (mut s1, mut x1, mut o1) = (0f32, 0f32, vec![0i8; g / ch * 128]);
                let (mut s2, mut x2, mut o2) = (0f32, 0f32, vec![0i8; g / ch * 128]);
                split_group(&xg, ch, bits, &mut s1, &mut x1, &mut o1);
                unsafe { split_group_avx512(&xg, ch, bits, perm, &mut s2, &mut x2, &mut o2) };
                assert_eq!(o1, o2, "case {case} g {g} ch {ch} bits {bits}");
                assert_eq!(s1.to_bits(), s2.to_bits(), "case {case}: step");
                let scale: f32 = xg.iter().filter(|v| v.is_finite()).map(|v| v.abs()).sum();
                assert!(
                    x1 == x2 || (x1.is_nan() && x2.is_nan()) || (x1 - x2).abs() <= scale * 1e-5,
                    "case {case}: Σx {x1} vs {x2}"
                );
            }
        }
    }

    /// The split's error bound, its exactness for bf16 values within a factor 127 of the group's
    /// largest, and no byte overflow, over groups whose values span six decades, ties and
    /// extreme magnitudes, for every chunk layout.
    #[test]
    fn split_is_exact_on_the_grid_and_bounded_elsewhere() {
        let mut next = uniform(0x9e3779b97f4a7c15u64);
        for (g, ch, bits) in [
            (32, 32, 4),
            (64, 64, 4),
            (128, 64, 3),
            (64, 64, 8),
            (32, 32, 5),
        ] {
            for case in 0..200 {
                let k = 4 * g;
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
                prepare(&x, 1, k, g, ch, bits, &mut p);
                for (j, xg) in x.chunks_exact(g).enumerate() {
                    let max = xg.iter().fold(0f32, |a, v| a.max(v.abs())) as f64;
                    for (e, &v) in xg.iter().enumerate() {
                        let i = j * g + e;
                        let err = (rebuilt(&p, k, g, ch, bits, i) - v as f64).abs();
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
