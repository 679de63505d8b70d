//! CPU quantized matmul, generic variant.
//!
//! `transpose = true` (`y = x·Wᵀ`, W `[N, K]` quantized along K) uses the group identity
//! `Σ x·(s·q + b) = s·Σ(x·q) + b·Σx`: Σx is computed once per row of x and group and shared
//! by all N outputs, so the inner loop is a dot of x with raw codes. Tasks own disjoint
//! ranges of N; each decodes a group once and reuses it for a block of rows of x.
//!
//! `transpose = false` (`y = x·W`, W `[K, N]` quantized along N) streams W's rows: tasks own
//! disjoint, group-aligned ranges of N and accumulate `x[r,k]·(s·q + b)` into f32 sums.
//!
//! Accumulation is f32 throughout, whatever the input and output dtypes.

use super::{cast, cast_mut, DisjointOut, MatrixRef, Tier};
use crate::dtype::Float;
use crate::error::Result;
use crate::quant::pack::{dispatch_bits, unpack8};
use rayon::prelude::*;

/// Arguments: `x` is `m × in_dim` f32 (already widened), `out` is `m × out_dim` of the key's
/// output dtype, with (in, out) = (cols, rows) for transpose and (rows, cols) otherwise.
pub(crate) struct QmmArgs<'a> {
    pub x: &'a [f32],
    pub m: usize,
    pub w: MatrixRef<'a>,
    pub out: &'a mut [u8],
}

pub(crate) type QmmFn = fn(QmmArgs<'_>) -> Result<()>;

const OP: &str = "quantized_matmul";
/// Rows of x that share one decoded group.
const ROW_BLOCK: usize = 8;

/// Decodes the codes of one group into f32.
#[inline(always)]
fn decode_group<const BITS: usize>(packed: &[u8], codes: &mut [f32]) {
    for (c8, p) in codes.chunks_exact_mut(8).zip(packed.chunks_exact(BITS)) {
        for (c, q) in c8.iter_mut().zip(unpack8::<BITS>(p)) {
            *c = f32::from(q);
        }
    }
}

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight independent partial sums: vectorisable and a shallower error tree than a chain.
    let mut acc = [0f32; 8];
    for (a8, b8) in a.chunks_exact(8).zip(b.chunks_exact(8)) {
        for j in 0..8 {
            acc[j] += a8[j] * b8[j];
        }
    }
    let tail: f32 = a
        .chunks_exact(8)
        .remainder()
        .iter()
        .zip(b.chunks_exact(8).remainder())
        .map(|(x, y)| x * y)
        .sum();
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

fn qmm_t_generic<S: Float, O: Float, const BITS: usize>(a: QmmArgs<'_>) -> Result<()> {
    let w = a.w;
    let scales: &[S] = cast(OP, "scales", w.scales)?;
    let biases: &[S] = cast(OP, "biases", w.biases)?;
    let out: &mut [O] = cast_mut(OP, "out", a.out)?;
    let (m, n, k, g) = (a.m, w.rows, w.cols, w.group_size);
    let groups = w.groups();
    let row_bytes = w.row_bytes();
    let gbytes = g / 8 * BITS;
    // Σx per (row of x, group), shared by every output column.
    let xsum: Vec<f32> = a.x.chunks_exact(g).map(|c| c.iter().sum()).collect();
    let x = a.x;
    let writer = DisjointOut::new(out);
    let tasks = (rayon::current_num_threads() * 8).max(1);
    let cols_per_task = n.div_ceil(tasks).max(4);
    (0..n.div_ceil(cols_per_task))
        .into_par_iter()
        .for_each(|t| {
            let (n0, n1) = (t * cols_per_task, ((t + 1) * cols_per_task).min(n));
            let mut codes = [0f32; 128];
            for r0 in (0..m).step_by(ROW_BLOCK) {
                let rows = ROW_BLOCK.min(m - r0);
                for col in n0..n1 {
                    let mut acc = [0f32; ROW_BLOCK];
                    let prow = &w.packed[col * row_bytes..(col + 1) * row_bytes];
                    for j in 0..groups {
                        decode_group::<BITS>(&prow[j * gbytes..(j + 1) * gbytes], &mut codes[..g]);
                        let s = scales[col * groups + j].to_f32();
                        let b = biases[col * groups + j].to_f32();
                        for (r, acc) in acc.iter_mut().enumerate().take(rows) {
                            let row = r0 + r;
                            let xg = &x[row * k + j * g..row * k + (j + 1) * g];
                            *acc += s * dot(xg, &codes[..g]) + b * xsum[row * groups + j];
                        }
                    }
                    for (r, &v) in acc.iter().enumerate().take(rows) {
                        // SAFETY: task `t` alone owns columns n0..n1 of every row.
                        unsafe { writer.write((r0 + r) * n + col, O::from_f32(v)) };
                    }
                }
            }
        });
    Ok(())
}

fn qmm_n_generic<T: Tier, S: Float, O: Float, const BITS: usize>(a: QmmArgs<'_>) -> Result<()> {
    let w = a.w;
    let scales: &[S] = cast(OP, "scales", w.scales)?;
    let biases: &[S] = cast(OP, "biases", w.biases)?;
    let out: &mut [O] = cast_mut(OP, "out", a.out)?;
    let (m, kdim, n, g) = (a.m, w.rows, w.cols, w.group_size);
    let groups = w.groups();
    let row_bytes = w.row_bytes();
    let gbytes = g / 8 * BITS;
    let x = a.x;
    let writer = DisjointOut::new(out);
    // Tasks own whole groups of output columns.
    let tasks = (rayon::current_num_threads() * 4).max(1);
    let groups_per_task = groups.div_ceil(tasks).max(1);
    (0..groups.div_ceil(groups_per_task))
        .into_par_iter()
        .for_each(|t| {
            T::run(
                #[inline(always)]
                || {
                    let (g0, g1) = (t * groups_per_task, ((t + 1) * groups_per_task).min(groups));
                    let width = (g1 - g0) * g;
                    let mut codes = [0f32; 128];
                    for r0 in (0..m).step_by(ROW_BLOCK) {
                        let rows = ROW_BLOCK.min(m - r0);
                        let mut acc = vec![0f32; rows * width];
                        for kk in 0..kdim {
                            let prow = &w.packed[kk * row_bytes..(kk + 1) * row_bytes];
                            for j in g0..g1 {
                                decode_group::<BITS>(
                                    &prow[j * gbytes..(j + 1) * gbytes],
                                    &mut codes[..g],
                                );
                                let s = scales[kk * groups + j].to_f32();
                                let b = biases[kk * groups + j].to_f32();
                                for r in 0..rows {
                                    let xv = x[(r0 + r) * kdim + kk];
                                    let (xs, xb) = (xv * s, xv * b);
                                    let dst = &mut acc[r * width + (j - g0) * g..][..g];
                                    for (d, &c) in dst.iter_mut().zip(&codes[..g]) {
                                        *d += xs * c + xb;
                                    }
                                }
                            }
                        }
                        for r in 0..rows {
                            for (i, &v) in acc[r * width..(r + 1) * width].iter().enumerate() {
                                // SAFETY: task `t` alone owns columns g0·g..g1·g of every row.
                                unsafe { writer.write((r0 + r) * n + g0 * g + i, O::from_f32(v)) };
                            }
                        }
                    }
                },
            )
        });
    Ok(())
}

fn select<T: Tier, S: Float>(out: crate::DType, bits: u32, transpose: bool) -> Option<QmmFn> {
    crate::with_float_type!(out, O => {
        Some(dispatch_bits!(bits, B => if transpose {
            // Transposed matmuls have hand-written kernels wherever a faster tier exists
            // (session 11: this loop gains nothing from AVX2), so only the baseline is built.
            qmm_t_generic::<S, O, B> as QmmFn
        } else {
            qmm_n_generic::<T, S, O, B> as QmmFn
        }, _ => return None))
    }, _ => None)
}

/// The portable kernel for scales dtype `scales`, output dtype `out`, `bits` and
/// `transpose`, compiled for tier `T`.
pub(crate) fn generic<T: Tier>(
    scales: crate::DType,
    out: crate::DType,
    bits: u32,
    transpose: bool,
) -> Option<QmmFn> {
    crate::with_float_type!(scales, S => select::<T, S>(out, bits, transpose), _ => None)
}

/// The AVX2 decode kernel (transpose only) for scales `scales`, output `out` and `bits`.
#[cfg(target_arch = "x86_64")]
pub(crate) fn avx2(scales: crate::DType, out: crate::DType, bits: u32) -> Option<QmmFn> {
    use super::x86::qmv_t_avx2;
    crate::with_float_type!(scales, S => crate::with_float_type!(out, O => {
        Some(dispatch_bits!(bits, B => qmv_t_avx2::<S, O, B> as QmmFn, _ => return None))
    }, _ => None), _ => None)
}

/// The AVX-512 decode kernel (transpose only) for scales `scales`, output `out` and `bits`.
#[cfg(target_arch = "x86_64")]
pub(crate) fn avx512(scales: crate::DType, out: crate::DType, bits: u32) -> Option<QmmFn> {
    use super::x86::qmv_t;
    crate::with_float_type!(scales, S => crate::with_float_type!(out, O => {
        Some(dispatch_bits!(bits, B => qmv_t::<S, O, B> as QmmFn, _ => return None))
    }, _ => None), _ => None)
}
