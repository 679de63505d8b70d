//! CPU quantized matmul, generic variant.
//!
//! One pair of loops serves every mode: a [`Groups`] type says how a group is stored (bits per
//! code, the scale's type, whether there is a bias) and decodes it to f32 values `v` with a
//! scale `s` and bias `b`, the weight being `s·v + b`. Affine groups ([`Affine`]) decode the
//! integer codes (`v = q`) and carry a bias; the FP modes ([`Fp`]) decode the E2M1/E4M3
//! elements through [`fp::decode_group`] with the scale [`fp::matmul_scale`] and no bias.
//!
//! `transpose = true` (`y = x·Wᵀ`, W `[N, K]` quantized along K) uses the group identity
//! `Σ x·(s·v + b) = s·Σ(x·v) + b·Σx`: Σx is computed once per row of x and group and shared
//! by all N outputs, so the inner loop is a dot of x with decoded values. Tasks own disjoint
//! ranges of N; each decodes a group once and reuses it for a block of rows of x.
//!
//! `transpose = false` (`y = x·W`, W `[K, N]` quantized along N) streams W's rows: tasks own
//! disjoint, group-aligned ranges of N and accumulate `x[r,k]·(s·v + b)` into f32 sums.
//!
//! Accumulation is f32 throughout, whatever the input and output dtypes.

use super::quantize::fp_mode;
use super::{cast, cast_mut, DisjointOut, MatrixRef, Rows, Tier};
use crate::dtype::Float;
use crate::error::checked_product;
use crate::error::Result;
use crate::quant::fp;
use crate::quant::pack::{dispatch_bits, unpack8};
use crate::QuantMode;
use rayon::prelude::*;
use std::marker::PhantomData;

/// Arguments: `x` is `m × in_dim` f32 (already widened), `out` is `m × out_dim` of the key's
/// output dtype, with (in, out) = (cols, rows) for transpose and (rows, cols) otherwise.
pub(crate) struct QmmArgs<'a> {
    pub x: &'a [f32],
    pub m: usize,
    pub w: MatrixRef<'a>,
    pub out: &'a mut [u8],
}

pub(crate) type QmmFn = fn(QmmArgs<'_>) -> Result<()>;

/// A matmul kernel's operands as their element types: scales and biases `S`, output `O`.
/// Made by [`QmmArgs::operands`], which checks every buffer against the shapes once, so the
/// kernels' raw loads rely on these lengths and check nothing of their own.
pub(crate) struct Operands<'a, S, O> {
    /// x: `m` rows of the input dimension (`cols` for transpose, `rows` otherwise), f32.
    pub x: &'a [f32],
    /// Rows of x.
    pub m: usize,
    /// W's packed rows with their scales and biases (where W has none: the scales again).
    pub w: Rows<'a, S>,
    /// W's rows and columns (W is quantized along its columns).
    pub rows: usize,
    pub cols: usize,
    /// y: `m` rows of the output dimension (`rows` for transpose, `cols` otherwise).
    pub out: &'a mut [O],
}

impl<'a> QmmArgs<'a> {
    /// The operands typed (scales and biases as `S`, the output as `O`), each buffer checked
    /// to hold what `transpose`'s shapes read: W's `rows` packed rows and their
    /// `rows × groups` scales and, where `biased`, biases; x `m × in_dim`; y `m × out_dim`.
    /// Without biases (the FP modes) [`Operands::w`]'s biases are the scales. Errors name the
    /// buffer, the bytes it needs and the bytes it has.
    pub(crate) fn operands<S: bytemuck::Pod, O: bytemuck::Pod>(
        self,
        op: &'static str,
        transpose: bool,
        biased: bool,
    ) -> Result<Operands<'a, S, O>> {
        let w = self.w;
        let (rows, cols, g) = (w.rows, w.cols, w.group_size);
        if g == 0 || !cols.is_multiple_of(g) {
            return Err(crate::Error::invalid(
                op,
                "group_size",
                format!("a group size dividing the {cols} columns"),
                g,
            ));
        }
        let scales: &[S] = cast(op, "scales", w.scales)?;
        let biases: &[S] = if biased {
            cast(op, "biases", w.biases)?
        } else {
            scales
        };
        let out: &mut [O] = cast_mut(op, "out", self.out)?;
        let (in_dim, out_dim) = if transpose {
            (cols, rows)
        } else {
            (rows, cols)
        };
        let bytes = |param, dims: [usize; 2], elem: usize| {
            checked_product(op, param, dims.into_iter().chain([elem]))
        };
        let (s_size, o_size) = (std::mem::size_of::<S>(), std::mem::size_of::<O>());
        let need = [
            ("w", bytes("w", [rows, w.row_bytes()], 1)?, w.packed.len()),
            (
                "scales",
                bytes("scales", [rows, w.groups()], s_size)?,
                w.scales.len(),
            ),
            (
                "biases",
                bytes("biases", [rows, w.groups()], s_size)?,
                size_of_val(biases),
            ),
            ("x", bytes("x", [self.m, in_dim], 4)?, size_of_val(self.x)),
            (
                "out",
                bytes("out", [self.m, out_dim], o_size)?,
                size_of_val(out),
            ),
        ];
        if let Some(&(param, needed, have)) = need.iter().find(|(_, n, have)| have < n) {
            return Err(crate::Error::BufferTooSmall {
                op,
                param,
                needed: needed as u64,
                offset: 0,
                available: have as u64,
            });
        }
        Ok(Operands {
            x: self.x,
            m: self.m,
            w: Rows {
                packed: w.packed,
                scales,
                biases,
                row_bytes: w.row_bytes(),
                groups: w.groups(),
                g,
            },
            rows,
            cols,
            out,
        })
    }
}

const OP: &str = "quantized_matmul";
/// Rows of x that share one decoded group.
const ROW_BLOCK: usize = 8;

/// How the kernels read a group of one quantization mode: the weight is `s·v + b` with `v`
/// the decoded codes, `s` the group's scale and `b` its bias (0 without biases).
trait Groups: 'static {
    /// A stored scale (and bias).
    type Scale: bytemuck::Pod + Sync;
    /// Bits per code.
    const BITS: usize;
    /// Whether groups have a bias (affine) or not (the FP modes).
    const BIASED: bool;
    /// Decodes one group's packed codes into `values`.
    fn decode(packed: &[u8], values: &mut [f32]);
    /// A stored scale as f32.
    fn scale(s: Self::Scale) -> f32;
    /// A stored bias as f32 (only called when [`Groups::BIASED`]).
    fn bias(b: Self::Scale) -> f32;
}

/// Affine groups: `BITS`-bit unsigned codes, scales and biases of dtype `S`.
struct Affine<S, const BITS: usize>(PhantomData<S>);

impl<S: Float + Sync, const BITS: usize> Groups for Affine<S, BITS> {
    type Scale = S;
    const BITS: usize = BITS;
    const BIASED: bool = true;
    #[inline(always)]
    fn decode(packed: &[u8], values: &mut [f32]) {
        for (c8, p) in values.chunks_exact_mut(8).zip(packed.chunks_exact(BITS)) {
            for (c, q) in c8.iter_mut().zip(unpack8::<BITS>(p)) {
                *c = f32::from(q);
            }
        }
    }
    #[inline(always)]
    fn scale(s: S) -> f32 {
        s.to_f32()
    }
    #[inline(always)]
    fn bias(b: S) -> f32 {
        b.to_f32()
    }
}

/// FP groups of mode `MODE` (see [`fp_mode`]) read as MLX's CPU matmul reads them in x's dtype
/// `X` (the output dtype of an FP matmul): uint8 scale codes, no biases.
struct Fp<X, const MODE: u8>(PhantomData<X>);

impl<X: Float + Sync, const MODE: u8> Groups for Fp<X, MODE> {
    type Scale = u8;
    const BITS: usize = if matches!(fp_mode(MODE), QuantMode::Mxfp8) {
        8
    } else {
        4
    };
    const BIASED: bool = false;
    #[inline(always)]
    fn decode(packed: &[u8], values: &mut [f32]) {
        fp::decode_group(packed, Self::BITS as u32, values);
    }
    #[inline(always)]
    fn scale(s: u8) -> f32 {
        fp::matmul_scale::<X>(s, fp_mode(MODE))
    }
    #[inline(always)]
    fn bias(_: u8) -> f32 {
        0.0
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

fn qmm_t_generic<C: Groups, O: Float>(a: QmmArgs<'_>) -> Result<()> {
    let a = a.operands::<C::Scale, O>(OP, true, C::BIASED)?;
    let (m, n, k, g) = (a.m, a.rows, a.cols, a.w.g);
    let (w, groups, row_bytes) = (&a.w, a.w.groups, a.w.row_bytes);
    let (scales, biases) = (w.scales, w.biases);
    let gbytes = g / 8 * C::BITS;
    // Σx per (row of x, group), shared by every output column (biased groups only).
    let xsum: Vec<f32> = if C::BIASED {
        a.x.chunks_exact(g).map(|c| c.iter().sum()).collect()
    } else {
        Vec::new()
    };
    let x = a.x;
    let writer = DisjointOut::new(a.out);
    let tasks = (rayon::current_num_threads() * 8).max(1);
    let cols_per_task = n.div_ceil(tasks).max(4);
    (0..n.div_ceil(cols_per_task))
        .into_par_iter()
        .for_each(|t| {
            let (n0, n1) = (t * cols_per_task, ((t + 1) * cols_per_task).min(n));
            let mut values = [0f32; 128];
            for r0 in (0..m).step_by(ROW_BLOCK) {
                let rows = ROW_BLOCK.min(m - r0);
                for col in n0..n1 {
                    let mut acc = [0f32; ROW_BLOCK];
                    let prow = &w.packed[col * row_bytes..(col + 1) * row_bytes];
                    for j in 0..groups {
                        C::decode(&prow[j * gbytes..(j + 1) * gbytes], &mut values[..g]);
                        let s = C::scale(scales[col * groups + j]);
                        let b = if C::BIASED {
                            C::bias(biases[col * groups + j])
                        } else {
                            0.0
                        };
                        for (r, acc) in acc.iter_mut().enumerate().take(rows) {
                            let row = r0 + r;
                            let xg = &x[row * k + j * g..row * k + (j + 1) * g];
                            let sx = s * dot(xg, &values[..g]);
                            *acc += if C::BIASED {
                                sx + b * xsum[row * groups + j]
                            } else {
                                sx
                            };
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

fn qmm_n_generic<T: Tier, C: Groups, O: Float>(a: QmmArgs<'_>) -> Result<()> {
    let a = a.operands::<C::Scale, O>(OP, false, C::BIASED)?;
    let (m, kdim, n, g) = (a.m, a.rows, a.cols, a.w.g);
    let (w, groups, row_bytes) = (&a.w, a.w.groups, a.w.row_bytes);
    let (scales, biases) = (w.scales, w.biases);
    let gbytes = g / 8 * C::BITS;
    let x = a.x;
    let writer = DisjointOut::new(a.out);
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
                    let mut values = [0f32; 128];
                    for r0 in (0..m).step_by(ROW_BLOCK) {
                        let rows = ROW_BLOCK.min(m - r0);
                        let mut acc = vec![0f32; rows * width];
                        for kk in 0..kdim {
                            let prow = &w.packed[kk * row_bytes..(kk + 1) * row_bytes];
                            for j in g0..g1 {
                                C::decode(&prow[j * gbytes..(j + 1) * gbytes], &mut values[..g]);
                                let s = C::scale(scales[kk * groups + j]);
                                let b = if C::BIASED {
                                    C::bias(biases[kk * groups + j])
                                } else {
                                    0.0
                                };
                                for r in 0..rows {
                                    let xv = x[(r0 + r) * kdim + kk];
                                    let (xs, xb) = (xv * s, xv * b);
                                    let dst = &mut acc[r * width + (j - g0) * g..][..g];
                                    if C::BIASED {
                                        for (d, &v) in dst.iter_mut().zip(&values[..g]) {
                                            *d += xs * v + xb;
                                        }
                                    } else {
                                        for (d, &v) in dst.iter_mut().zip(&values[..g]) {
                                            *d += xs * v;
                                        }
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

/// The kernel for groups `C` and output `O`: transposed or not.
fn pick<T: Tier, C: Groups, O: Float>(transpose: bool) -> QmmFn {
    if transpose {
        // Transposed matmuls have hand-written kernels wherever a faster tier exists
        // (session 11: this loop gains nothing from AVX2), so only the baseline is built.
        qmm_t_generic::<C, O> as QmmFn
    } else {
        qmm_n_generic::<T, C, O> as QmmFn
    }
}

fn select<T: Tier, S: Float + Sync>(
    out: crate::DType,
    bits: u32,
    transpose: bool,
) -> Option<QmmFn> {
    crate::with_float_type!(out, O => {
        Some(dispatch_bits!(bits, B => pick::<T, Affine<S, B>, O>(transpose), _ => return None))
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

fn select_fp<T: Tier, X: Float + Sync>(mode: QuantMode, transpose: bool) -> Option<QmmFn> {
    Some(match mode {
        QuantMode::Affine => return None,
        QuantMode::Mxfp4 => pick::<T, Fp<X, 1>, X>(transpose),
        QuantMode::Mxfp8 => pick::<T, Fp<X, 2>, X>(transpose),
        QuantMode::Nvfp4 => pick::<T, Fp<X, 3>, X>(transpose),
    })
}

/// The portable kernel for an FP `mode` (uint8 scales, no biases) with x and the output of
/// dtype `out` (MLX's FP matmuls output x's dtype) and `transpose`, compiled for tier `T`.
pub(crate) fn generic_fp<T: Tier>(
    out: crate::DType,
    mode: QuantMode,
    transpose: bool,
) -> Option<QmmFn> {
    crate::with_float_type!(out, X => select_fp::<T, X>(mode, transpose), _ => None)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A 4-bit 8×64 weight (group 32) with bf16 scales and biases, x of `m` rows.
    fn args<'a>(
        x: &'a [f32],
        packed: &'a [u8],
        scales: &'a [u8],
        biases: &'a [u8],
        out: &'a mut [u8],
    ) -> QmmArgs<'a> {
        QmmArgs {
            x,
            m: 2,
            w: MatrixRef {
                packed,
                scales,
                biases,
                rows: 8,
                cols: 64,
                group_size: 32,
                bits: 4,
            },
            out,
        }
    }

    fn too_small(r: Result<Operands<'_, half::bf16, f32>>) -> Option<(&'static str, u64, u64)> {
        match r {
            Err(crate::Error::BufferTooSmall {
                param,
                needed,
                available,
                ..
            }) => Some((param, needed, available)),
            _ => None,
        }
    }

    #[test]
    fn operands_check_every_buffer_against_the_shapes() {
        // Whole buffers: 8 rows of 32 bytes, 8×2 bf16 scales and biases, x 2×64 (transpose)
        // or 2×8, y 2×8 or 2×64 f32.
        let (packed, ss) = (vec![0u8; 256], vec![0u16; 16]);
        let sb: &[u8] = bytemuck::cast_slice(&ss);
        let (x, mut y) = (vec![0f32; 128], vec![0f32; 128]);
        let yb: &mut [u8] = bytemuck::cast_slice_mut(&mut y);
        let ok = args(&x, &packed, sb, sb, yb).operands::<half::bf16, f32>("t", true, true);
        let ok = ok.map(|o| (o.m, o.rows, o.cols, o.w.groups, o.w.row_bytes));
        assert_eq!(ok.ok(), Some((2, 8, 64, 2, 32)));
        // One buffer short at a time: the error names it with the bytes needed and held.
        let yb: &mut [u8] = bytemuck::cast_slice_mut(&mut y);
        let r = args(&x, &packed[..255], sb, sb, yb).operands("t", true, true);
        assert_eq!(too_small(r), Some(("w", 256, 255)));
        let yb: &mut [u8] = bytemuck::cast_slice_mut(&mut y);
        let r = args(&x, &packed, &sb[..30], sb, yb).operands("t", true, true);
        assert_eq!(too_small(r), Some(("scales", 32, 30)));
        let yb: &mut [u8] = bytemuck::cast_slice_mut(&mut y);
        let r = args(&x, &packed, sb, &sb[..2], yb).operands("t", true, true);
        assert_eq!(too_small(r), Some(("biases", 32, 2)));
        // Without biases their buffer is not read (the scales stand in).
        let yb: &mut [u8] = bytemuck::cast_slice_mut(&mut y);
        let r = args(&x, &packed, sb, &[], yb).operands::<half::bf16, f32>("t", true, false);
        assert!(r.is_ok());
        let yb: &mut [u8] = bytemuck::cast_slice_mut(&mut y);
        let r = args(&x[..127], &packed, sb, sb, yb).operands("t", true, true);
        assert_eq!(too_small(r), Some(("x", 512, 508)));
        let yb: &mut [u8] = bytemuck::cast_slice_mut(&mut y[..15]);
        let r = args(&x, &packed, sb, sb, yb).operands("t", true, true);
        assert_eq!(too_small(r), Some(("out", 64, 60)));
        // transpose = false: x is m × rows and y m × cols.
        let yb: &mut [u8] = bytemuck::cast_slice_mut(&mut y[..127]);
        let r = args(&x[..16], &packed, sb, sb, yb).operands("t", false, true);
        assert_eq!(too_small(r), Some(("out", 512, 508)));
        // A group size that does not divide the columns.
        let yb: &mut [u8] = bytemuck::cast_slice_mut(&mut y);
        let mut a = args(&x, &packed, sb, sb, yb);
        a.w.group_size = 48;
        let r = a.operands::<half::bf16, f32>("t", true, true);
        assert!(matches!(
            r,
            Err(crate::Error::InvalidParameter {
                param: "group_size",
                ..
            })
        ));
    }
}
