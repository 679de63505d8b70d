//! CPU dequantize (affine and the FP modes): groups in parallel, each value through
//! [`dequantize_value`](crate::quant::affine::dequantize_value).

use super::{cast, cast_mut, MatrixRef, Tier};
use crate::dtype::Float;
use crate::error::Result;
use crate::quant::affine::dequantize_value;
use crate::quant::pack::{dispatch_bits, unpack8};
use crate::quant::{fp, Flavour, QuantMode};
use rayon::prelude::*;

/// Arguments: the weight (all batch matrices as one tall matrix) and the output bytes.
pub(crate) struct DequantizeArgs<'a> {
    pub w: MatrixRef<'a>,
    pub flavour: Flavour,
    pub out: &'a mut [u8],
}

pub(crate) type DequantizeFn = fn(DequantizeArgs<'_>) -> Result<()>;

const OP: &str = "dequantize";

/// Values are computed as the flavour rounds in the scales' dtype `S` (CPU: `S(S(q·s) + b)`;
/// GPU: one f32 FMA), then converted to the output dtype `O` — what MLX's CPU does when
/// `dtype` differs from the scales' (its GPU rounds the f32 FMA straight to `O`, the same).
fn dequantize_generic<T: Tier, S: Float, O: Float, const BITS: usize>(
    a: DequantizeArgs<'_>,
) -> Result<()> {
    let scales: &[S] = cast(OP, "scales", a.w.scales)?;
    let biases: &[S] = cast(OP, "biases", a.w.biases)?;
    let out: &mut [O] = cast_mut(OP, "out", a.out)?;
    let g = a.w.group_size;
    let flavour = a.flavour;
    out.par_chunks_mut(g)
        .zip(a.w.packed.par_chunks(g / 8 * BITS))
        .zip(scales.par_iter().zip(biases.par_iter()))
        .with_min_len(64)
        .for_each(|((og, pg), (&s, &b))| {
            T::run(
                #[inline(always)]
                || {
                    for (o8, p) in og.chunks_exact_mut(8).zip(pg.chunks_exact(BITS)) {
                        for (o, q) in o8.iter_mut().zip(unpack8::<BITS>(p)) {
                            *o = match flavour {
                                Flavour::Cpu => {
                                    O::from_f32(dequantize_value(q, s, b, flavour).to_f32())
                                }
                                Flavour::Gpu => {
                                    O::from_f32(f32::from(q).mul_add(s.to_f32(), b.to_f32()))
                                }
                            };
                        }
                    }
                },
            )
        });
    Ok(())
}

fn select<T: Tier, S: Float>(out: crate::DType, bits: u32) -> Option<DequantizeFn> {
    crate::with_float_type!(out, O => {
        Some(dispatch_bits!(bits, B => dequantize_generic::<T, S, O, B> as DequantizeFn, _ => return None))
    }, _ => None)
}

/// The portable dequantize kernel for scales of `scales` dtype, output `out` dtype and
/// `bits`, compiled for tier `T`.
pub(crate) fn generic<T: Tier>(
    scales: crate::DType,
    out: crate::DType,
    bits: u32,
) -> Option<DequantizeFn> {
    crate::with_float_type!(scales, S => select::<T, S>(out, bits), _ => None)
}

/// The FP modes: each value through [`fp::dequantize_value`] (scales are uint8 codes, no
/// biases), straight into the output dtype `O` as MLX computes them.
fn dequantize_fp<T: Tier, O: Float, const MODE: u8>(a: DequantizeArgs<'_>) -> Result<()> {
    let mode = super::quantize::fp_mode(MODE);
    let out: &mut [O] = cast_mut(OP, "out", a.out)?;
    let g = a.w.group_size;
    let bits = if mode == QuantMode::Mxfp8 { 8 } else { 4 };
    let flavour = a.flavour;
    out.par_chunks_mut(g)
        .zip(a.w.packed.par_chunks(g / 8 * bits))
        .zip(a.w.scales.par_iter())
        .with_min_len(64)
        .for_each(|((og, pg), &s)| {
            T::run(
                #[inline(always)]
                || {
                    if bits == 8 {
                        for (o, &c) in og.iter_mut().zip(pg) {
                            *o = fp::dequantize_value(c, s, mode, flavour);
                        }
                    } else {
                        for (o2, &b) in og.chunks_exact_mut(2).zip(pg) {
                            o2[0] = fp::dequantize_value(b & 15, s, mode, flavour);
                            o2[1] = fp::dequantize_value(b >> 4, s, mode, flavour);
                        }
                    }
                },
            )
        });
    Ok(())
}

fn select_fp<T: Tier, O: Float>(mode: QuantMode) -> Option<DequantizeFn> {
    Some(match mode {
        QuantMode::Affine => return None,
        QuantMode::Mxfp4 => dequantize_fp::<T, O, 1> as DequantizeFn,
        QuantMode::Mxfp8 => dequantize_fp::<T, O, 2> as DequantizeFn,
        QuantMode::Nvfp4 => dequantize_fp::<T, O, 3> as DequantizeFn,
    })
}

/// The portable FP-mode dequantize kernel for output dtype `out`, compiled for tier `T`.
pub(crate) fn generic_fp<T: Tier>(out: crate::DType, mode: QuantMode) -> Option<DequantizeFn> {
    crate::with_float_type!(out, O => select_fp::<T, O>(mode), _ => None)
}
