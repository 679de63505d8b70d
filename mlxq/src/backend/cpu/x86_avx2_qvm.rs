//! AVX2 + FMA kernel for `y = x·W` (`transpose = false`) on CPUs without the AVX-512 one:
//! W `[K, N]` quantized along N, `y[r,n] = Σ_k x[r,k]·(s[k,n/g]·q[k,n] + b[k,n/g])`.
//!
//! The work is [`x86_qvm`](super::x86_qvm)'s: its driver (K split between the threads for
//! a few rows of x, column ranges otherwise; bands of rows of W, column blocks of at most 512
//! columns) calls this module's [`QvmIsa::columns`]. Per band and column block the block's
//! scales and biases are widened to f32 once per group (8 at a time); each register tile (up
//! to [`ROWS`] rows of x × `CH` chunks of 32 columns, in 4 f32 vectors each) then streams down
//! the band's rows of W, prefetching ahead.
//!
//! A chunk's 32 codes become four vectors of dword codes, by width:
//! - 8-bit: `vpmovzxbd` from memory, 8 bytes at a time;
//! - 4-bit: `vpmovzxbd` of 8 bytes (16 codes), then `& 15` and `>> 4`: lanes hold columns
//!   `2l`, `2l + 1`, `16 + 2l`, `17 + 2l`;
//! - 2-bit: `vpmovzxbd` of the chunk's 8 bytes, then shifts by 0, 2, 4, 6 and `& 3`: lane `l`
//!   of vector `v` holds column `4l + v`;
//! - 1, 3, 5, 6-bit: [`decode32`](super::x86_avx2::decode32) into 32 bytes in column order,
//!   then four `vpmovzxbd`.
//!
//! The sum is taken in the form MLX's kernels use, `Σ_k (x·s)·q + Σ_k x·b`: per band,
//! `x·s` is formed for every row of W, row of x and group (8 groups at a time) and the bias
//! part `Σ x·b` per row of x and group; each tile's sums start from the bias part, and each
//! vector of codes is then converted once and used by every row of the tile with one FMA.
//! Lane permutations are undone by the driver when it writes the output. Accumulation is f32;
//! results equal the generic kernel's up to summation order and the rounding of `x·s`.

use super::qmm::QmmFn;
use super::x86_qvm::{Columns, QvmIsa, BLOCK_COLS, K_BLOCK};
use crate::dtype::Float;
use crate::quant::pack::dispatch_bits;
use std::arch::x86_64::*;

/// The AVX2 kernel for [`x86_qvm::qmv_n`](super::x86_qvm::qmv_n).
pub(crate) struct Avx2Qvm;

/// The kernel for scales `scales`, output `out` and `bits` (`None`: not a float dtype or an
/// affine width).
pub(crate) fn kernel(scales: crate::DType, out: crate::DType, bits: u32) -> Option<QmmFn> {
    use super::x86_qvm::qmv_n;
    crate::with_float_type!(scales, S => crate::with_float_type!(out, O => {
        Some(dispatch_bits!(bits, B => qmv_n::<Avx2Qvm, S, O, B> as QmmFn, _ => return None))
    }, _ => None), _ => None)
}

/// Most rows of x in one register tile: 3 rows × 1 chunk is 12 accumulators of 16 registers.
const ROWS: usize = 3;

impl QvmIsa for Avx2Qvm {
    const NEEDS: &'static str = "AVX2, FMA and F16C on this CPU";
    const ROWS: usize = ROWS;
    fn available() -> bool {
        super::x86_avx2::available()
    }
    fn lane_column(bits: usize, lane: usize) -> usize {
        lane_column(bits, lane)
    }
    unsafe fn columns<S: Float, const BITS: usize>(
        cx: &Columns<'_>,
        scales: &[S],
        biases: &[S],
        sb: &mut [f32],
        acc: &mut [f32],
    ) {
        // SAFETY: the caller guarantees the CPU features.
        unsafe { columns::<S, BITS>(cx, scales, biases, sb, acc) }
    }
}

/// Column (within its 32-column chunk) of lane `lane` (vector `lane / 8`, lane `lane % 8`) as
/// [`codes`] produces it for `bits`.
fn lane_column(bits: usize, lane: usize) -> usize {
    let (v, l) = (lane / 8, lane % 8);
    match bits {
        4 => 16 * (v / 2) + 2 * l + v % 2,
        2 => 4 * l + v,
        _ => lane,
    }
}

/// The 32 codes of the chunk at `p` as four vectors of dwords, lanes in [`lane_column`] order.
///
/// # Safety
/// `p` points to `4·BITS` readable bytes; the CPU has AVX2.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn codes<const BITS: usize>(p: *const u8) -> [__m256i; 4] {
    // Eight bytes at `p + off`, zero-extended to dwords (off + 8 ≤ 4·BITS for every use).
    let widen =
        |off: usize| unsafe { _mm256_cvtepu8_epi32(_mm_loadl_epi64(p.add(off) as *const __m128i)) };
    // SAFETY (all loads): each reads within the 4·BITS bytes the caller vouches for.
    match BITS {
        8 => [widen(0), widen(8), widen(16), widen(24)],
        4 => {
            let (a, b) = (widen(0), widen(8));
            let m = _mm256_set1_epi32(15);
            [
                _mm256_and_si256(a, m),
                _mm256_srli_epi32::<4>(a),
                _mm256_and_si256(b, m),
                _mm256_srli_epi32::<4>(b),
            ]
        }
        2 => {
            let a = widen(0);
            let m = _mm256_set1_epi32(3);
            [
                _mm256_and_si256(a, m),
                _mm256_and_si256(_mm256_srli_epi32::<2>(a), m),
                _mm256_and_si256(_mm256_srli_epi32::<4>(a), m),
                _mm256_srli_epi32::<6>(a),
            ]
        }
        _ => {
            // SAFETY: decode32 reads exactly 4·BITS bytes at `p`.
            let d = unsafe { super::x86_avx2::decode32::<BITS>(p) };
            let (lo, hi) = (_mm256_castsi256_si128(d), _mm256_extracti128_si256::<1>(d));
            [
                _mm256_cvtepu8_epi32(lo),
                _mm256_cvtepu8_epi32(_mm_srli_si128::<8>(lo)),
                _mm256_cvtepu8_epi32(hi),
                _mm256_cvtepu8_epi32(_mm_srli_si128::<8>(hi)),
            ]
        }
    }
}

/// One register tile's inputs: `rows` rows of W from the tile's first chunk, the band's
/// `x·s` per group and row of x, and where its sums go.
#[derive(Clone, Copy)]
struct Tile {
    /// Packed W at the first row of the band and the tile's first chunk.
    w: *const u8,
    /// Bytes per row of W.
    row_bytes: usize,
    /// Bytes from a row to the row the tile prefetches (0: no prefetch).
    prefetch: usize,
    /// Rows of W in the band.
    rows: usize,
    /// `x·s` per row of W, row of x and group of the block: `[(kk·ROWS + r)·16 + j]`.
    xs: *const f32,
    /// The tile's first chunk within the block, and `log2(g / 32)` (chunk `c` is in group
    /// `c >> gshift`).
    chunk0: usize,
    gshift: u32,
    /// The band's `Σ x·b` per row of x and group of the block (`[r][j]`), the part of the
    /// sum that does not depend on the codes: the tile's sums start from it.
    bias: *const [f32; 16],
    /// Accumulators: `[r·acc_stride + 32·c + lane]`.
    acc: *mut f32,
    acc_stride: usize,
}

/// `R` rows of x times `CH` chunks of W over one band, added into the accumulators.
///
/// # Safety
/// Every pointer of `t` must be valid for the extent its field describes: `w` for `rows` rows
/// of `row_bytes` bytes, of which the tile reads `CH·4·BITS` from the start; `xs` for
/// `16·ROWS·rows` floats with the tile's groups below 16; `bias` for `R` rows; `acc` for `R`
/// rows of `32·CH` floats at `acc_stride`, used by no other thread. The CPU must have AVX2
/// and FMA.
#[target_feature(enable = "avx2,fma")]
unsafe fn tile<const BITS: usize, const R: usize, const CH: usize>(t: &Tile) {
    let seg = CH * 4 * BITS;
    let group: [usize; CH] = std::array::from_fn(|c| (t.chunk0 + c) >> t.gshift);
    let mut a = [[[_mm256_setzero_ps(); 4]; CH]; R];
    for (r, ar) in a.iter_mut().enumerate() {
        for (acc, &j) in ar.iter_mut().zip(&group) {
            // SAFETY: row r < R of the caller's `bias`; j < 16 (the caller's guarantee).
            *acc = [_mm256_set1_ps(unsafe { (*t.bias.add(r))[j] }); 4];
        }
    }
    for kk in 0..t.rows {
        // SAFETY: row kk < rows of the block: within the extents the caller guarantees. The
        // prefetch address may lie past W; prefetches never fault, and `wrapping_add` keeps
        // computing it defined.
        unsafe {
            let p = t.w.add(kk * t.row_bytes);
            if t.prefetch != 0 {
                let pf = p.wrapping_add(t.prefetch);
                let mut off = 0;
                while off < seg {
                    _mm_prefetch::<_MM_HINT_T0>(pf.wrapping_add(off) as *const i8);
                    off += 64;
                }
                _mm_prefetch::<_MM_HINT_T0>(pf.wrapping_add(seg - 1) as *const i8);
            }
            let xs = t.xs.add(kk * ROWS * 16);
            for (ci, &j) in group.iter().enumerate() {
                let q = codes::<BITS>(p.add(ci * 4 * BITS));
                for (v, &qv) in q.iter().enumerate() {
                    let qf = _mm256_cvtepi32_ps(qv);
                    for (r, ar) in a.iter_mut().enumerate() {
                        let f = _mm256_broadcast_ss(&*xs.add(r * 16 + j));
                        ar[ci][v] = _mm256_fmadd_ps(qf, f, ar[ci][v]);
                    }
                }
            }
        }
    }
    for (r, ar) in a.iter().enumerate() {
        for (ci, acc) in ar.iter().enumerate() {
            for (v, &av) in acc.iter().enumerate() {
                // SAFETY: row r < R, columns 32·ci + 8·v.. + 8 ≤ 32·CH: the caller's extent.
                unsafe {
                    let d = t.acc.add(r * t.acc_stride + 32 * ci + 8 * v);
                    _mm256_storeu_ps(d, _mm256_add_ps(_mm256_loadu_ps(d), av));
                }
            }
        }
    }
}

/// All chunks of a column block for `R` rows of x: tiles of `CH` chunks, then single ones.
///
/// # Safety
/// As for [`tile`], with `t` describing chunk 0 and `chunks` chunks in all (`acc` rows are
/// `32·chunks` floats wide).
#[target_feature(enable = "avx2,fma")]
unsafe fn block<const BITS: usize, const R: usize, const CH: usize>(t: &Tile, chunks: usize) {
    let mut ci = 0;
    while ci < chunks {
        let at = Tile {
            w: t.w.wrapping_add(ci * 4 * BITS),
            chunk0: ci,
            acc: t.acc.wrapping_add(32 * ci),
            ..*t
        };
        // SAFETY: chunks ci..ci + CH (or ci alone) lie inside the block the caller described.
        unsafe {
            if ci + CH <= chunks {
                tile::<BITS, R, CH>(&at);
                ci += CH;
            } else {
                tile::<BITS, R, 1>(&at);
                ci += 1;
            }
        }
    }
}

/// Widens `n ≤ 16` scales (or biases) at `src` to f32 into `dst`: 8 at a time, the rest one
/// by one (bf16 by a shift, f16 by F16C: exact, and without the library conversions' NaN
/// handling, which made this a fifth of a narrow column block's time).
///
/// # Safety
/// `src` holds `n` readable elements, `dst` `n` writable floats; the CPU has AVX2 and F16C.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn widen_n<S: Float>(src: *const S, n: usize, dst: *mut f32) {
    let mut i = 0;
    // SAFETY: each access is below `n` on both sides (the caller's extents).
    unsafe {
        while i + 8 <= n {
            _mm256_storeu_ps(dst.add(i), super::x86_avx2::widen8(src.add(i)));
            i += 8;
        }
        while i < n {
            let p = src.add(i);
            *dst.add(i) = match S::DTYPE {
                crate::DType::BF16 => f32::from_bits(u32::from((p as *const u16).read()) << 16),
                crate::DType::F16 => _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(
                    (p as *const u16).read(),
                )))),
                _ => (p as *const f32).read(),
            };
            i += 1;
        }
    }
}

/// For one band of `rows` rows of W and `r ≤ ROWS` rows of x (`x[kk·r + rr]`): writes
/// `xs[(kk·ROWS + rr)·16 + j] = x·s[kk][j]` and returns `Σ_kk x·b[kk][j]` per row of x and
/// group `j` (the part of `Σ x·(s·q + b)` that does not depend on the codes).
///
/// # Safety
/// `sb` holds `32·rows` floats (scales then biases per row), `x` `r·rows`, `xs`
/// `16·ROWS·rows`; `r ≤ ROWS`; the CPU has AVX2 and FMA.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn scale_x(
    sb: &[f32],
    x: &[f32],
    r: usize,
    rows: usize,
    xs: &mut [f32; K_BLOCK * ROWS * 16],
) -> [[f32; 16]; ROWS] {
    let mut bias = [[_mm256_setzero_ps(); 2]; ROWS];
    for kk in 0..rows.min(K_BLOCK) {
        let row = &sb[kk * 32..][..32];
        // SAFETY: each load reads 8 of the row's 32 floats.
        let (s0, s1, b0, b1) = unsafe {
            (
                _mm256_loadu_ps(row.as_ptr()),
                _mm256_loadu_ps(row.as_ptr().add(8)),
                _mm256_loadu_ps(row.as_ptr().add(16)),
                _mm256_loadu_ps(row.as_ptr().add(24)),
            )
        };
        for (rr, bs) in bias.iter_mut().enumerate().take(r.min(ROWS)) {
            let xv = _mm256_set1_ps(x[kk * r + rr]);
            let d = &mut xs[(kk * ROWS + rr) * 16..][..16];
            // SAFETY: each store writes 8 of `d`'s 16 floats.
            unsafe {
                _mm256_storeu_ps(d.as_mut_ptr(), _mm256_mul_ps(xv, s0));
                _mm256_storeu_ps(d.as_mut_ptr().add(8), _mm256_mul_ps(xv, s1));
            }
            bs[0] = _mm256_fmadd_ps(xv, b0, bs[0]);
            bs[1] = _mm256_fmadd_ps(xv, b1, bs[1]);
        }
    }
    let mut out = [[0f32; 16]; ROWS];
    for (o, bs) in out.iter_mut().zip(&bias) {
        // SAFETY: each store writes 8 of `o`'s 16 floats.
        unsafe {
            _mm256_storeu_ps(o.as_mut_ptr(), bs[0]);
            _mm256_storeu_ps(o.as_mut_ptr().add(8), bs[1]);
        }
    }
    out
}

/// Accumulates one column block for every row of x over all of K (see [`QvmIsa::columns`]).
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn columns<S: Float, const BITS: usize>(
    cx: &Columns<'_>,
    scales: &[S],
    biases: &[S],
    sb: &mut [f32],
    acc: &mut [f32],
) {
    let (kdim, cols, m, g) = (cx.kdim, cx.cols, cx.m, cx.g);
    if !cx.fits(BITS, acc.len(), sb.len())
        || scales.len() < kdim * cx.groups
        || biases.len() < kdim * cx.groups
    {
        return;
    }
    let gshift = (g / 32).trailing_zeros();
    let mut xs = [0f32; K_BLOCK * ROWS * 16];
    for k0 in (cx.k_lo..cx.k_hi).step_by(cx.band) {
        let rows = cx.band.min(cx.k_hi - k0);
        let mut b0 = 0;
        while b0 < cols {
            let bcols = BLOCK_COLS.min(cols - b0);
            let (chunks, ng, j0) = (bcols / 32, bcols / g, (cx.c0 + b0) / g);
            for kk in 0..rows {
                let off = (k0 + kk) * cx.groups + j0;
                // SAFETY: `ng ≤ 16` elements from `off` lie in row k0 + kk of the scales and
                // biases (`fits` and the check above); the row of `sb` holds 32 floats.
                unsafe {
                    let row = sb.as_mut_ptr().add(kk * 32);
                    widen_n(scales.as_ptr().add(off), ng, row);
                    widen_n(biases.as_ptr().add(off), ng, row.add(16));
                }
            }
            for r0 in (0..m).step_by(ROWS) {
                let r = ROWS.min(m - r0);
                let x = &cx.xt[r0 * kdim + k0 * r..][..rows * r];
                // SAFETY: `sb` holds `rows` rows of 32 floats; `xs` K_BLOCK·ROWS rows of 16.
                let bias = unsafe { scale_x(sb, x, r, rows, &mut xs) };
                let t = Tile {
                    // Row k0, the block's first chunk.
                    w: cx.w[k0 * cx.row_bytes + (cx.c0 + b0) / 8 * BITS..].as_ptr(),
                    row_bytes: cx.row_bytes,
                    prefetch: cx.prefetch_rows * cx.row_bytes,
                    rows,
                    xs: xs.as_ptr(),
                    chunk0: 0,
                    gshift,
                    bias: bias.as_ptr(),
                    acc: acc[r0 * cols + b0..].as_mut_ptr(),
                    acc_stride: cols,
                };
                // SAFETY: rows k0..k0 + rows of W, the block's chunks of each (`fits` checked
                // them against row_bytes), xs's `rows` rows, `bias`'s `r` rows, x rows
                // r0..r0 + r from k0 and accumulator rows r0..r0 + r, columns b0..b0 + bcols,
                // are all in bounds and this task's alone.
                unsafe {
                    match r {
                        1 => block::<BITS, 1, 2>(&t, chunks),
                        2 => block::<BITS, 2, 1>(&t, chunks),
                        _ => block::<BITS, 3, 1>(&t, chunks),
                    }
                }
            }
            b0 += bcols;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The lanes of [`codes`] hold the columns [`lane_column`] names, for every width.
    #[test]
    fn codes_follow_lane_column() {
        if !super::super::x86_avx2::available() {
            eprintln!("skipped: this CPU lacks AVX2, FMA or F16C");
            return;
        }
        fn check<const BITS: usize>() {
            // 32 codes, code i = (7·i + 3) mod 2^BITS, packed LSB first.
            let code = |i: usize| (7 * i + 3) % (1 << BITS);
            let mut bytes = vec![0u8; 4 * BITS + 32];
            for i in 0..32 {
                for b in 0..BITS {
                    if code(i) >> b & 1 == 1 {
                        let bit = i * BITS + b;
                        bytes[bit / 8] |= 1 << (bit % 8);
                    }
                }
            }
            // SAFETY: the CPU has AVX2 (checked); `bytes` holds 4·BITS bytes and more.
            let q = unsafe { codes::<BITS>(bytes.as_ptr()) };
            let mut lanes = [0i32; 32];
            for (v, qv) in q.iter().enumerate() {
                // SAFETY: stores 8 dwords into lanes[8v..8v + 8].
                unsafe { _mm256_storeu_si256(lanes[8 * v..].as_mut_ptr() as *mut __m256i, *qv) };
            }
            let mut seen = [false; 32];
            for (lane, &got) in lanes.iter().enumerate() {
                let col = lane_column(BITS, lane);
                assert!(!seen[col], "{BITS}-bit: column {col} twice");
                seen[col] = true;
                assert_eq!(
                    got as usize,
                    code(col),
                    "{BITS}-bit lane {lane} (column {col})"
                );
            }
        }
        check::<1>();
        check::<2>();
        check::<3>();
        check::<4>();
        check::<5>();
        check::<6>();
        check::<8>();
    }
}
