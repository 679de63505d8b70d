//! `avx512bf16gemm`: the blocked GEMM for bf16 x on CPUs whose `vdpbf16ps` runs at full rate
//! (AMD Zen 4 and Zen 5), exact products and f32 sums: the f32 path's error class at twice
//! its multiply-adds per cycle.
//!
//! **Why.** On Zen 4 a 512-bit `vdpbf16ps` (32 bf16 products summed into 16 f32 lanes)
//! issues once per cycle, as a 512-bit `vfmadd231ps` (16 products) does: `tools/cpu_peak.c`
//! measures 464 G ops/s for two threads against 230 for the f32 FMA that `avx512gemm` is
//! built on (docs/perf.md, session 68). On Intel's AVX-512 cores it issues at half that rate
//! (session 8), so there the f32 GEMM (or AMX) stays.
//!
//! **Arithmetic.** A bf16 value times a code `q ≤ 255` is exact in f32 (8 + 8 significant
//! bits), and `q` itself is exact in bf16, so the panel holds the raw codes as bf16 and the
//! products `x·q` are exact; `vdpbf16ps` adds them in f32 (round to nearest even; like every
//! `vdpbf16ps` user, inputs and results below f32's normal range count as zero). Per group
//! `j` and output the epilogue adds `s·Σ(x·q) + b·Σx` into the f32 output tile, `Σx` being
//! the exact f32 sum of the group (as the other kernels). The difference from the f32 path is
//! only the order of f32 roundings: the conformance tolerances hold (the same sweep runs it).
//!
//! **Layout.** Driver, blocking and tiles are [`gemm_codes`]'s (48-column tiles, K blocks of
//! 128, 8 rows per micro-kernel tile). A panel vector holds 16 columns × one pair of K values
//! (two bf16 words per dword, `vdpbf16ps`'s layout); x is packed per row in the same pair
//! order, so one 32-bit broadcast of x meets three panel vectors. Decode: `avx512gemm`'s
//! 64-code chunks and 16×16 dword transpose (a dword = 4 codes of one column), then per
//! dword the even and odd bytes as words (an `and`, a shift), widened to bf16 by a table
//! lookup (`vpermw`, `vpermt2w` for 6-bit codes) or, for 8-bit codes, two conversions to f32
//! whose high halves are the bf16 values.
//!
//! [`gemm_codes`]: super::x86_gemm::gemm_codes

use super::qmm::QmmArgs;
use super::x86_gemm::{
    chunk16, gemm_codes, perm, CodesIsa, Panel, XTile, CB, CHUNK, KC, NC, XBLOCK,
};
use super::{KernelFn, Variant};
use crate::aligned::Line;
use crate::dtype::Float;
use crate::error::Result;
use crate::quant::pack::dispatch_bits;
use std::arch::x86_64::*;

/// The variant: `quantized_matmul`, transpose, bf16 x, every affine width, on CPUs with a
/// full-rate `vdpbf16ps` ([`available`]). Few rows take the decode kernels ([`min_m`]).
pub(crate) const QMM_T_GEMM_BF16: Variant = Variant {
    name: Avx512Bf16Gemm::NAME,
    supports: |k| {
        k.mode == crate::QuantMode::Affine
            && k.op == crate::registry::OpKind::QuantizedMatmul
            && k.flag
            && k.input == crate::DType::BF16
            && available()
    },
    decode: Some(handoffs),
    build: |k| {
        let vnni = (super::x86_vnni::QMM_T_VNNI.supports)(k);
        crate::with_float_type!(k.scales, S => crate::with_float_type!(k.output, O => {
            Some(KernelFn::Qmm(dispatch_bits!(k.bits, B => if vnni {
                qmm_t::<S, O, B, true> as super::qmm::QmmFn
            } else {
                qmm_t::<S, O, B, false> as super::qmm::QmmFn
            }, _ => return None)))
        }, _ => None), _ => None)
    },
};

/// Rows of x from which the GEMM runs: where `avx512vnni` applies (bf16 or f16 output) its
/// integer dots win below `avx512gemm`'s [`MIN_M_VNNI`] (17) rows here too (Zen 4, 4096²,
/// 4-bit: M = 16 2.36 against 2.75 ms; 8-bit 3.01 against 2.58; docs/perf.md, session 68);
/// else (`avx512bf16` takes f32 outputs) from [`MIN_M`] (8).
///
/// [`MIN_M_VNNI`]: super::x86_gemm::MIN_M_VNNI
/// [`MIN_M`]: super::x86_gemm::MIN_M
const fn min_m(vnni: bool) -> usize {
    if vnni {
        super::x86_gemm::MIN_M_VNNI
    } else {
        super::x86_gemm::MIN_M
    }
}

/// Whether this CPU runs the variant: AVX-512 with VNNI, VBMI and BF16 (as `avx512bf16`), on
/// an AMD core (family 19h and later: Zen 4's and Zen 5's `vdpbf16ps` issues every cycle).
pub(crate) fn available() -> bool {
    static FAST: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FAST.get_or_init(|| {
        super::x86_bf16::available() && super::x86_columns::amd_family().is_some_and(|f| f >= 0x19)
    })
}

/// The variant's hand-off: below [`min_m`] rows, to the decode kernel the key allows.
fn handoffs(k: &crate::registry::KernelKey) -> Vec<(usize, &'static str)> {
    if (super::x86_vnni::QMM_T_VNNI.supports)(k) {
        vec![(min_m(true), super::x86_vnni::QMM_T_VNNI.name)]
    } else {
        vec![(min_m(false), super::x86_bf16::QMM_T_BF16.name)]
    }
}

/// The kernel: the decode kernel below [`min_m`] rows (`avx512vnni` when `VNNI`, else
/// `avx512bf16`), else [`gemm_codes`] on [`Avx512Bf16Gemm`].
fn qmm_t<S: Float, O: Float, const BITS: usize, const VNNI: bool>(a: QmmArgs<'_>) -> Result<()> {
    if a.m < min_m(VNNI) {
        return if VNNI {
            super::x86_vnni::qmm_t::<super::x86_vnni::Affine<S>, O, BITS>(a)
        } else {
            super::x86_bf16::qmm_t::<S, O, BITS>(a)
        };
    }
    // SAFETY: this variant is only chosen where `available()` holds, which includes every
    // feature `Avx512Bf16Gemm` uses.
    unsafe { gemm_codes::<Avx512Bf16Gemm, S, O, BITS>(a) }
}

/// AVX-512 BF16: 8 rows × 48 columns, `vdpbf16ps` on the codes as bf16.
pub(crate) struct Avx512Bf16Gemm;

impl CodesIsa for Avx512Bf16Gemm {
    const NAME: &'static str = "avx512bf16gemm";
    const LANES: usize = 16;
    const NC: usize = NC;
    const R: usize = 8;
    const KC: usize = KC;
    const PANEL_BYTES: usize = 2;
    type X = u16;

    unsafe fn prepare_x<const BITS: usize>(
        src: &[f32],
        q: &mut [u16],
        _d: &mut [f32],
        sums: &mut [f32],
        g: usize,
    ) {
        // SAFETY: the caller guarantees the instruction set, which includes AVX-512 F/BW.
        unsafe { pack_x_avx512::<BITS>(src, q, sums, g) };
    }

    unsafe fn widen_tile<S: Float>(
        src: &[S],
        groups: usize,
        c0: usize,
        cols: usize,
        out: &mut [f32],
    ) {
        // SAFETY: the caller's contract.
        unsafe { super::x86_gemm::widen_tile(src, groups, c0, cols, out) }
    }

    unsafe fn decode_panel<const BITS: usize>(src: &Panel<'_>, panel: &mut [Line]) {
        // SAFETY: the caller's contract.
        unsafe { decode_panel_bf16::<BITS>(src, panel) }
    }

    unsafe fn micro<const BITS: usize>(
        rows: usize,
        cbs: usize,
        x: &XTile<'_, u16>,
        panel: &[Line],
        sv: &[f32],
        bv: &[f32],
        c: &mut [f32],
    ) {
        // SAFETY: the caller's contract; `micro` checks its slices.
        unsafe { super::x86_gemm::tile_dispatch!(rows, cbs, micro(x, panel, sv, bv, c)) }
    }
}

/// Position in a decoded chunk of packed value `i` of the chunk: panel pair `i/2` is the even
/// (`i/2` even) or odd bytes of transposed dword `i/4`, i.e. positions `4·(i/4) + (i/2)%2`
/// and that + 2.
#[inline(always)]
fn pair_position(i: usize) -> usize {
    4 * (i / 4) + (i / 2) % 2 + 2 * (i % 2)
}

/// One row's K block of x (`src`: bf16 values widened to f32, so the top half of each is the
/// bf16) as bf16 words in the panel's pair order ([`pair_position`] of [`perm`] order), zero
/// past `src.len()` up to whole chunks; `sums[j]` the f32 sum of group `j` (`g` values).
/// Does nothing if a slice is too short. The scalar definition that [`pack_x_avx512`] is
/// tested against.
#[cfg(test)]
fn pack_x<const BITS: usize>(src: &[f32], q: &mut [u16], sums: &mut [f32], g: usize) {
    let len = src.len();
    let pad = len.div_ceil(CHUNK) * CHUNK;
    if g == 0 || q.len() < pad || sums.len() < len / g {
        return;
    }
    for (c, dst) in q[..pad].chunks_exact_mut(CHUNK).enumerate() {
        for (i, d) in dst.iter_mut().enumerate() {
            let e = c * CHUNK + perm(BITS, pair_position(i));
            *d = src.get(e).map_or(0, |v| (v.to_bits() >> 16) as u16);
        }
    }
    for (s, grp) in sums.iter_mut().zip(src.chunks_exact(g)) {
        *s = grp.iter().sum();
    }
}

/// The scalar `pack_x` vectorised: per 32 values one `vpermt2w` takes the bf16 halves of two f32
/// vectors in the pair order; the group sums add 16 lanes at a time (their rounding order is
/// not `pack_x`'s sequential one: the same f32 error class). Does nothing if a slice is too
/// short or `src.len()` and `g` are not multiples of 32.
#[target_feature(enable = "avx512f,avx512bw")]
fn pack_x_avx512<const BITS: usize>(src: &[f32], q: &mut [u16], sums: &mut [f32], g: usize) {
    let len = src.len();
    let pad = len.div_ceil(CHUNK) * CHUNK;
    if g == 0
        || !g.is_multiple_of(32)
        || !len.is_multiple_of(32)
        || q.len() < pad
        || sums.len() < len / g
    {
        return;
    }
    // Word i of each 32-value half: the high word of element perm(pair_position(i)) of the
    // half (both orders stay inside a half of a chunk).
    let idx: [u16; 32] = std::array::from_fn(|i| (2 * perm(BITS, pair_position(i)) + 1) as u16);
    // SAFETY: `idx` is 64 readable bytes.
    let idx = unsafe { _mm512_loadu_si512(idx.as_ptr() as *const __m512i) };
    for h in 0..pad / 32 {
        let v = if 32 * h < len {
            // SAFETY: values 32h..32h + 32 lie in `src` (len is a multiple of 32).
            let (a, b) = unsafe {
                (
                    _mm512_loadu_ps(src.as_ptr().add(32 * h)),
                    _mm512_loadu_ps(src.as_ptr().add(32 * h + 16)),
                )
            };
            _mm512_permutex2var_epi16(_mm512_castps_si512(a), idx, _mm512_castps_si512(b))
        } else {
            _mm512_setzero_si512()
        };
        // SAFETY: words 32h..32h + 32 < pad ≤ q.len() (checked above).
        unsafe { _mm512_storeu_si512(q.as_mut_ptr().add(32 * h) as *mut __m512i, v) };
    }
    for (j, s) in sums[..len / g].iter_mut().enumerate() {
        let mut acc = _mm512_setzero_ps();
        for t in (0..g).step_by(16) {
            // SAFETY: values j·g + t..+16 lie in group j < len/g of `src`.
            acc = _mm512_add_ps(acc, unsafe { _mm512_loadu_ps(src.as_ptr().add(j * g + t)) });
        }
        *s = _mm512_reduce_add_ps(acc);
    }
}

/// The bf16 values of the words of `w` (each below `2^BITS`; `lo` and `hi` hold bf16(0..32)
/// and bf16(32..64)).
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
fn words_to_bf16<const BITS: usize>(w: __m512i, lo: __m512i, hi: __m512i) -> __m512i {
    match BITS {
        6 => _mm512_permutex2var_epi16(lo, w, hi),
        b if b < 6 => _mm512_permutexvar_epi16(w, lo),
        _ => {
            // Codes up to 255 are exact in f32 and in bf16: a bf16 is the f32's high half.
            let even = _mm512_cvtepi32_ps(_mm512_and_si512(w, _mm512_set1_epi32(0xffff)));
            let odd = _mm512_cvtepi32_ps(_mm512_srli_epi32::<16>(w));
            _mm512_mask_blend_epi16(
                0xaaaa_aaaa,
                _mm512_srli_epi32::<16>(_mm512_castps_si512(even)),
                _mm512_castps_si512(odd),
            )
        }
    }
}

/// Decodes the codes of `src` into `panel` as bf16 pairs: vector `s·CB + cb` holds K pair `s`
/// (in [`pair_position`] order) of columns `16·cb..16·cb + 16`; columns past `cols` are zero.
///
/// # Safety
/// The CPU has AVX-512 F/BW/VL/VBMI. (Slices are checked here.)
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi")]
unsafe fn decode_panel_bf16<const BITS: usize>(src: &Panel<'_>, panel: &mut [Line]) {
    let pad = src.pad();
    if !src.readable(BITS) || panel.len() < pad / 2 * CB {
        return;
    }
    // bf16(i) for i < 64: words 0..32 in `lo`, 32..64 in `hi`.
    let table = |base: u32| {
        let t: [u16; 32] =
            std::array::from_fn(|i| ((base as f32 + i as f32).to_bits() >> 16) as u16);
        // SAFETY: `t` is 64 readable bytes.
        unsafe { _mm512_loadu_si512(t.as_ptr() as *const __m512i) }
    };
    let (lo, hi) = (table(0), table(32));
    let low_bytes = _mm512_set1_epi16(0xff);
    for cb in 0..src.cols.div_ceil(16) {
        for ch in 0..pad / CHUNK {
            // SAFETY: `readable` holds and ch < pad/CHUNK.
            let rows = unsafe { chunk16::<BITS>(src, cb, ch) };
            // rows[q] lane c = positions 4q..4q+4 of column c, one byte each: the even bytes
            // (positions 4q, 4q+2) are pair 2q, the odd ones pair 2q+1.
            for (q, &d) in rows.iter().enumerate() {
                let pairs = [_mm512_and_si512(d, low_bytes), _mm512_srli_epi16::<8>(d)];
                for (o, w) in pairs.into_iter().enumerate() {
                    let v = words_to_bf16::<BITS>(w, lo, hi);
                    let dst = &mut panel[(ch * CHUNK / 2 + 2 * q + o) * CB + cb];
                    // SAFETY: `dst` is 64 writable bytes.
                    unsafe { _mm512_storeu_si512(dst.0.as_mut_ptr() as *mut __m512i, v) };
                }
            }
        }
    }
}

/// `c[RR][NC] += Σ_groups (s·Σ(q·x) + b·Σx)` over one K block, for the first `C` column
/// vectors. Per group: `g/2` steps of `vdpbf16ps` into `RR × C` f32 accumulators held in
/// registers, then one read-modify-write of the f32 tile in L1. Does nothing if a slice is
/// shorter than that needs.
///
/// # Safety
/// The CPU has AVX-512 F and BF16.
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn micro<const RR: usize, const C: usize>(
    x: &XTile<'_, u16>,
    panel: &[Line],
    sv: &[f32],
    bv: &[f32],
    c: &mut [f32],
) {
    let ds = KC / XBLOCK;
    if x.g == 0 || !x.g.is_multiple_of(2) {
        return;
    }
    let (ngrp, hg) = (x.len / x.g, x.g / 2);
    if x.q.len() < (RR - 1) * KC + x.len
        || x.sums.len() < (RR - 1) * ds + ngrp
        || panel.len() < x.len / 2 * CB
        || sv.len() < ngrp * NC
        || bv.len() < ngrp * NC
        || c.len() < RR * NC
    {
        return;
    }
    let (xp, cp, sp) = (x.q.as_ptr(), c.as_mut_ptr(), x.sums.as_ptr());
    let pp = panel.as_ptr() as *const __m512i;
    let (svp, bvp) = (sv.as_ptr(), bv.as_ptr());
    for j in 0..ngrp {
        let mut dot = [[_mm512_setzero_ps(); C]; RR];
        for s in j * hg..(j + 1) * hg {
            // SAFETY: panel vector s·CB + v < len/2·CB and x words 2s, 2s + 1 < len of row
            // r < RR (checked above); the vector types are 64 plain bytes (the transmutes
            // reinterpret them).
            unsafe {
                let mut w = [_mm512_setzero_si512(); C];
                for (v, w) in w.iter_mut().enumerate() {
                    *w = _mm512_load_si512(pp.add(s * CB + v));
                }
                for (r, row) in dot.iter_mut().enumerate() {
                    let xb = (xp.add(r * KC + 2 * s) as *const i32).read_unaligned();
                    let xb = std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(xb));
                    for (d, &w) in row.iter_mut().zip(&w) {
                        *d = _mm512_dpbf16_ps(*d, std::mem::transmute::<__m512i, __m512bh>(w), xb);
                    }
                }
            }
        }
        // The tile goes through memory at every group: without this opaque copy of its pointer
        // LLVM keeps the tile in registers across groups, and with the 24 dot accumulators
        // spills both (1.4 KB of stack in the 8 × 3 instance).
        let cp = std::hint::black_box(cp);
        // SAFETY: group j < ngrp of NC scales/biases; group sum j < ngrp of each row r < RR;
        // tile entries r·NC + v·16 + 16 ≤ RR·NC (checked above).
        unsafe {
            for (r, drow) in dot.iter().enumerate() {
                let sum = _mm512_set1_ps(*sp.add(r * ds + j));
                for (v, &dd) in drow.iter().enumerate() {
                    let at = cp.add(r * NC + v * 16);
                    let s = _mm512_loadu_ps(svp.add(j * NC + v * 16));
                    let b = _mm512_loadu_ps(bvp.add(j * NC + v * 16));
                    let a = _mm512_fmadd_ps(dd, s, _mm512_loadu_ps(at));
                    _mm512_storeu_ps(at, _mm512_fmadd_ps(b, sum, a));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The packed x and the decoded panel agree on K order: every pair of the panel meets
    /// the x values of the codes it holds (checked through `pair_position` and `perm` for
    /// every width, and the packing's padding with zeros).
    #[test]
    fn pair_positions_cover_each_chunk_once() {
        let mut seen = [false; CHUNK];
        for i in 0..CHUNK {
            let p = pair_position(i);
            assert!(!seen[p], "position {p} twice");
            seen[p] = true;
        }
        let src: Vec<f32> = (0..96)
            .map(|i| half::bf16::from_f32(i as f32).to_f32())
            .collect();
        for bits in [4, 8] {
            let mut q = vec![0xffffu16; 128];
            let mut sums = vec![0.0; 3];
            if bits == 4 {
                pack_x::<4>(&src, &mut q, &mut sums, 32);
            } else {
                pack_x::<8>(&src, &mut q, &mut sums, 32);
            }
            let vals: Vec<f32> = q
                .iter()
                .map(|&b| half::bf16::from_bits(b).to_f32())
                .collect();
            let mut got: Vec<f32> = vals[..96].to_vec();
            got.sort_by(f32::total_cmp);
            assert_eq!(got, src, "bits {bits}: values 0..96 each once");
            assert!(vals[96..].iter().all(|&v| v == 0.0), "padding is zero");
            assert_eq!(sums, [496.0, 1520.0, 2544.0]);
        }
    }

    /// The vectorised packing gives the scalar one's words bit for bit (every width's order,
    /// NaN and subnormal values, a half chunk at the end) and its group sums to f32 rounding.
    #[test]
    fn vectorised_packing_matches_the_scalar_one() {
        if !(is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw")) {
            eprintln!("skipped: this CPU lacks AVX-512 F/BW");
            return;
        }
        let mut state = 7u32;
        let src: Vec<f32> = (0..224)
            .map(|i| {
                state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                let v = (state >> 8) as f32 / (1u32 << 24) as f32 - 0.5;
                let v = match i {
                    5 => f32::NAN,
                    9 => 1e-40,
                    _ => v,
                };
                half::bf16::from_f32(v).to_f32()
            })
            .collect();
        macro_rules! check {
            ($($b:literal)*) => {$(
                for g in [32, 64, 128] {
                    let len = src.len() / g * g;
                    let pad = len.div_ceil(CHUNK) * CHUNK;
                    let (mut q1, mut q2) = (vec![1u16; pad], vec![2u16; pad]);
                    let (mut s1, mut s2) = (vec![0.0; len / g], vec![0.0; len / g]);
                    pack_x::<$b>(&src[..len], &mut q1, &mut s1, g);
                    // SAFETY: the features are checked above.
                    unsafe { pack_x_avx512::<$b>(&src[..len], &mut q2, &mut s2, g) };
                    assert_eq!(q1, q2, "bits {} g {g}", $b);
                    for (a, b) in s1.iter().zip(&s2) {
                        assert!(a.is_nan() && b.is_nan() || (a - b).abs() <= 1e-5, "{a} {b}");
                    }
                }
            )*};
        }
        check!(1 2 3 4 5 6 8);
    }
}
