//! CPU quantize (affine and the FP modes): rows in parallel, each group through
//! [`quantize_group`](crate::quant::affine::quantize_group), the definition itself.

use super::{cast, cast_mut, Tier};
use crate::dtype::Float;
use crate::error::Result;
use crate::quant::affine::quantize_group;
use crate::quant::pack::{dispatch_bits, pack8};
use crate::quant::{fp, Flavour, QuantMode};
use rayon::prelude::*;

/// Arguments of a quantize kernel: `w` is `rows × cols` elements of the key's input dtype;
/// outputs are the packed bytes and scales/biases of the same dtype.
pub(crate) struct QuantizeArgs<'a> {
    pub w: &'a [u8],
    pub group_size: usize,
    pub flavour: Flavour,
    pub packed: &'a mut [u8],
    pub scales: &'a mut [u8],
    pub biases: &'a mut [u8],
}

pub(crate) type QuantizeFn = fn(QuantizeArgs<'_>) -> Result<()>;

const OP: &str = "quantize";

fn quantize_generic<Tr: Tier, T: Float, const BITS: usize>(a: QuantizeArgs<'_>) -> Result<()> {
    let w: &[T] = cast(OP, "w", a.w)?;
    let scales: &mut [T] = cast_mut(OP, "scales", a.scales)?;
    let biases: &mut [T] = cast_mut(OP, "biases", a.biases)?;
    let g = a.group_size;
    let group_bytes = g / 8 * BITS;
    let flavour = a.flavour;
    // One task per group: groups are independent, so results do not depend on threading.
    w.par_chunks(g)
        .zip(a.packed.par_chunks_mut(group_bytes))
        .zip(scales.par_iter_mut().zip(biases.par_iter_mut()))
        .with_min_len(64)
        .for_each(|((wg, pg), (s, b))| {
            Tr::run(
                #[inline(always)]
                || {
                    let mut vals = [0f32; 128];
                    let mut codes = [0u8; 128];
                    for (v, &x) in vals.iter_mut().zip(wg) {
                        *v = x.to_f32();
                    }
                    let (scale, bias) =
                        quantize_group(&vals[..g], BITS as u32, flavour, &mut codes[..g]);
                    *s = T::from_f32(scale);
                    *b = T::from_f32(bias);
                    for (c, out) in codes[..g].chunks_exact(8).zip(pg.chunks_exact_mut(BITS)) {
                        let c: &[u8; 8] = c.try_into().unwrap_or(&[0; 8]);
                        pack8::<BITS>(c, out);
                    }
                },
            )
        });
    Ok(())
}

fn select<Tr: Tier, T: Float>(bits: u32) -> Option<QuantizeFn> {
    Some(dispatch_bits!(bits, B => quantize_generic::<Tr, T, B> as QuantizeFn, _ => return None))
}

/// The portable quantize kernel for input dtype `dtype` and `bits`, compiled for tier `Tr`.
pub(crate) fn generic<Tr: Tier>(dtype: crate::DType, bits: u32) -> Option<QuantizeFn> {
    crate::with_float_type!(dtype, T => select::<Tr, T>(bits), _ => None)
}

/// The FP modes (mxfp4, mxfp8, nvfp4): one task per group through
/// [`fp::quantize_group`](crate::quant::fp::quantize_group); scales are uint8 codes and there
/// are no biases (`a.biases` is ignored).
fn quantize_fp<Tr: Tier, T: Float, const MODE: u8>(a: QuantizeArgs<'_>) -> Result<()> {
    let mode = fp_mode(MODE);
    let w: &[T] = cast(OP, "w", a.w)?;
    let g = a.group_size;
    let bits = if mode == QuantMode::Mxfp8 { 8 } else { 4 };
    let group_bytes = g / 8 * bits;
    let flavour = a.flavour;
    w.par_chunks(g)
        .zip(a.packed.par_chunks_mut(group_bytes))
        .zip(a.scales.par_iter_mut())
        .with_min_len(64)
        .for_each(|((wg, pg), s)| {
            Tr::run(
                #[inline(always)]
                || *s = fp_group(wg, mode, flavour, pg),
            )
        });
    Ok(())
}

/// Quantizes one FP-mode group `wg` (at most 32 values) through
/// [`fp::quantize_group`](crate::quant::fp::quantize_group): its element codes packed into
/// `pg` (two per byte for 4 bits, element `2i` in the low nibble of byte `i`), its scale code
/// returned. The portable kernel, and the fast kernels' path for the groups they cannot do.
#[inline(always)]
pub(crate) fn fp_group<T: Float>(wg: &[T], mode: QuantMode, flavour: Flavour, pg: &mut [u8]) -> u8 {
    let mut vals = [0f32; 32];
    let mut codes = [0u8; 32];
    let n = wg.len().min(32);
    for (v, &x) in vals.iter_mut().zip(wg) {
        *v = x.to_f32();
    }
    let s = fp::quantize_group::<T>(&vals[..n], mode, flavour, &mut codes[..n]);
    if mode == QuantMode::Mxfp8 {
        for (o, &c) in pg.iter_mut().zip(&codes[..n]) {
            *o = c;
        }
    } else {
        for (o, c) in pg.iter_mut().zip(codes[..n].chunks_exact(2)) {
            *o = (c[0] & 15) | (c[1] << 4);
        }
    }
    s
}

/// The FP mode a kernel's `MODE` constant names (1: mxfp4, 2: mxfp8, 3: nvfp4).
pub(crate) const fn fp_mode(m: u8) -> QuantMode {
    match m {
        1 => QuantMode::Mxfp4,
        2 => QuantMode::Mxfp8,
        _ => QuantMode::Nvfp4,
    }
}

fn select_fp<Tr: Tier, T: Float>(mode: QuantMode) -> Option<QuantizeFn> {
    Some(match mode {
        QuantMode::Affine => return None,
        QuantMode::Mxfp4 => quantize_fp::<Tr, T, 1> as QuantizeFn,
        QuantMode::Mxfp8 => quantize_fp::<Tr, T, 2> as QuantizeFn,
        QuantMode::Nvfp4 => quantize_fp::<Tr, T, 3> as QuantizeFn,
    })
}

/// The portable FP-mode quantize kernel for input dtype `dtype`, compiled for tier `Tr`.
pub(crate) fn generic_fp<Tr: Tier>(dtype: crate::DType, mode: QuantMode) -> Option<QuantizeFn> {
    crate::with_float_type!(dtype, T => select_fp::<Tr, T>(mode), _ => None)
}
