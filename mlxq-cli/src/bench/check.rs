//! Sampled checks against the f64 oracle: only the sampled outputs are computed, from only
//! the rows (or groups) of W that feed them, so checking a 14336 × 4096 result costs
//! milliseconds rather than minutes.

use super::data::{round_to, select};
use mlxq::quant::{affine::quantize_group, fp, pack::read_code, Flavour};
use mlxq::reference::{dequantize_f64, matmul_f64, max_rel_err};
use mlxq::{Buffer, Float, QuantMode, QuantizedWeight};
use std::collections::hash_map::{Entry, HashMap};

/// The dequantized (f64) weights that feed output columns `cols` of a matmul with the 2-D
/// `w`, as a `cols.len() × K` row-major matrix (a "transposed" weight for [`matmul_f64`]).
pub fn weight_columns(
    w: &QuantizedWeight,
    transpose: bool,
    cols: &[usize],
) -> anyhow::Result<Vec<f64>> {
    if transpose {
        // Output column n is fed by row n of W [N, K].
        return Ok(dequantize_f64(&select(w, cols, 0..w.groups_per_row())?)?);
    }
    // W is [K, N]: output column n is element n of every row, so dequantize only the group
    // holding it (in all K rows), once per distinct group.
    let (k, g) = (w.rows(), w.spec().group_size() as usize);
    let all_rows: Vec<usize> = (0..k).collect();
    let mut out = vec![0f64; cols.len() * k];
    let (mut current, mut group) = (usize::MAX, Vec::new());
    for (i, &c) in cols.iter().enumerate() {
        if c / g != current {
            current = c / g;
            group = dequantize_f64(&select(w, &all_rows, current..current + 1)?)?;
        }
        for r in 0..k {
            out[i * k + r] = group[r * g + c % g];
        }
    }
    Ok(out)
}

/// The sampled outputs `(got, want)` of one matrix product: rows `rows` of `x` (row-major,
/// `K` wide, f64) against the weight columns `wcols` (from [`weight_columns`] for `cols`),
/// and the same entries of `got` (row-major, `n` wide).
pub fn sample_matmul(
    x: &[f64],
    k: usize,
    rows: &[usize],
    wcols: &[f64],
    cols: &[usize],
    got: &[f32],
    n: usize,
) -> (Vec<f64>, Vec<f64>) {
    let xs: Vec<f64> = rows
        .iter()
        .flat_map(|&r| x[r * k..(r + 1) * k].iter().copied())
        .collect();
    let want = matmul_f64(&xs, rows.len(), wcols, cols.len(), k, true);
    let got = rows
        .iter()
        .flat_map(|&r| cols.iter().map(move |&c| f64::from(got[r * n + c])))
        .collect();
    (got, want)
}

/// The sampled outputs `(got, want)` of a gather: pairs `pairs` (flat (token, slot)
/// positions, `top` slots per token) of `got` (`[pairs, n]` row-major), each against the f64
/// product of its token's row of `x` (`K` wide) with its expert `route[pair]` of the stack
/// `w`, over output columns `cols`. `wcols` caches each expert's [`weight_columns`].
#[allow(clippy::too_many_arguments)]
pub fn sample_gather(
    x: &[f64],
    k: usize,
    w: &QuantizedWeight,
    transpose: bool,
    route: &[u32],
    top: usize,
    pairs: &[usize],
    cols: &[usize],
    got: &[f32],
    n: usize,
    wcols: &mut HashMap<usize, Vec<f64>>,
) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    let (mut g, mut want) = (Vec::new(), Vec::new());
    for &pair in pairs {
        let e = route[pair] as usize;
        if let Entry::Vacant(slot) = wcols.entry(e) {
            slot.insert(weight_columns(&w.expert(e)?, transpose, cols)?);
        }
        let t = pair / top;
        let (pg, pw) = sample_matmul(
            &x[t * k..(t + 1) * k],
            k,
            &[0],
            &wcols[&e],
            cols,
            &got[pair * n..(pair + 1) * n],
            n,
        );
        g.extend(pg);
        want.extend(pw);
    }
    Ok((g, want))
}

/// Normwise relative error of sampled outputs.
pub fn error(got: &[f64], want: &[f64]) -> f64 {
    max_rel_err(got, want)
}

/// Checks rows `rows` of `qw`, the quantization of the 2-D float `input`, bit for bit against
/// MLX's definition ([`quantize_group`], scales and biases rounded to the input dtype; the FP
/// modes' [`fp::quantize_group`]).
/// Returns the normwise relative error between the dequantized values of the kernel's output
/// and the oracle's (0 when identical) and the number of mismatched codes, scales and biases.
pub fn quantize(
    input: &Buffer,
    qw: &QuantizedWeight,
    flavour: Flavour,
    rows: &[usize],
) -> anyhow::Result<(f64, usize)> {
    let spec = qw.spec();
    let (bits, mode, dtype) = (spec.bits(), spec.mode(), input.dtype());
    let sub = select(qw, rows, 0..qw.groups_per_row())?;
    if mode != QuantMode::Affine {
        let scales = sub.scales().to_vec::<u8>()?;
        let value = |q| f64::from(fp::element_value(q, bits));
        return mlxq::with_float_type!(dtype, T => check_rows(input, qw, &sub, rows, value, |gi, w, codes| {
            let sc = fp::quantize_group::<T>(w, mode, flavour, codes);
            // The oracle's reading of the scale (`reference::dequantize_f64`), so that equal
            // codes give an error of exactly 0.
            let s = if mode == QuantMode::Nvfp4 {
                f64::from(fp::e4m3_to_f32(sc))
            } else {
                2f64.powi(i32::from(sc) - 127)
            };
            (usize::from(sc != scales[gi]), s, 0.0)
        }), _ => anyhow::bail!("quantize input of dtype {dtype}"));
    }
    let scales = sub.scales().to_f32_vec()?;
    let biases = match sub.biases() {
        Some(b) => b.to_f32_vec()?,
        None => anyhow::bail!("an affine weight without biases"),
    };
    check_rows(input, qw, &sub, rows, f64::from, |gi, w, codes| {
        let (s, b) = quantize_group(w, bits, flavour, codes);
        let (s, b) = (round_to(dtype, s), round_to(dtype, b));
        let wrong = usize::from(s.to_bits() != scales[gi].to_bits())
            + usize::from(b.to_bits() != biases[gi].to_bits());
        (wrong, f64::from(s), f64::from(b))
    })
}

/// Checks rows `rows` of `got`, the dequantization of the 2-D `qw` into `got`'s float dtype
/// in `flavour`, bit for bit against MLX's definition, one element at a time: affine
/// [`dequantize_value`](mlxq::quant::affine::dequantize_value)'s rounding in the scales'
/// dtype (CPU `S(S(q·s) + b)`, GPU one f32 FMA), then converted to the output dtype; the FP
/// modes' [`fp::dequantize_value`].
/// Returns the normwise relative error between the sampled outputs and the definition's (0
/// when identical) and the number of elements whose bits differ.
pub fn dequantize(
    qw: &QuantizedWeight,
    got: &Buffer,
    flavour: Flavour,
    rows: &[usize],
) -> anyhow::Result<(f64, usize)> {
    let dtype = got.dtype();
    mlxq::with_float_type!(dtype, O => dequantize_rows::<O>(qw, got, flavour, rows),
        _ => anyhow::bail!("dequantize output of dtype {dtype}"))
}

fn dequantize_rows<O: Float>(
    qw: &QuantizedWeight,
    got: &Buffer,
    flavour: Flavour,
    rows: &[usize],
) -> anyhow::Result<(f64, usize)> {
    let spec = qw.spec();
    let (k, g, bits, mode) = (
        qw.cols(),
        spec.group_size() as usize,
        spec.bits(),
        spec.mode(),
    );
    let groups = qw.groups_per_row();
    let sub = select(qw, rows, 0..groups)?;
    let packed = sub.packed().bytes();
    let row_bytes = groups * spec.group_bytes();
    let sdtype = qw.scales_dtype();
    let (scales, codes, biases) = if mode == QuantMode::Affine {
        let biases = match sub.biases() {
            Some(b) => b.to_f32_vec()?,
            None => anyhow::bail!("an affine weight without biases"),
        };
        (sub.scales().to_f32_vec()?, Vec::new(), biases)
    } else {
        (Vec::new(), sub.scales().to_vec::<u8>()?, Vec::new())
    };
    let (mut g64, mut w64, mut mismatches) = (Vec::new(), Vec::new(), 0);
    for (i, &r) in rows.iter().enumerate() {
        let row = got
            .view(r * k * O::DTYPE.size(), O::DTYPE, &[k])?
            .to_vec::<O>()?;
        let prow = &packed[i * row_bytes..(i + 1) * row_bytes];
        for (e, &o) in row.iter().enumerate() {
            let gi = i * groups + e / g;
            let q = read_code(bits, prow, e)
                .ok_or_else(|| anyhow::anyhow!("code {e} of row {r} out of range"))?;
            let want: O = if mode == QuantMode::Affine {
                let (q, s, b) = (f32::from(q), scales[gi], biases[gi]);
                O::from_f32(match flavour {
                    Flavour::Cpu => round_to(sdtype, round_to(sdtype, q * s) + b),
                    Flavour::Gpu => q.mul_add(s, b),
                })
            } else {
                fp::dequantize_value::<O>(q, codes[gi], mode, flavour)
            };
            // f16 and bf16 widen to f32 exactly, so equal f32 bits are equal bits.
            mismatches += usize::from(o.to_f32().to_bits() != want.to_f32().to_bits());
            g64.push(f64::from(o.to_f32()));
            w64.push(f64::from(want.to_f32()));
        }
    }
    Ok((max_rel_err(&g64, &w64), mismatches))
}

/// The walk of [`quantize`]: `group(i, values, codes)` quantizes group `i` (numbered across
/// the checked rows `sub` holds) of the input's rows `rows` into `codes` and returns its
/// mismatched scale parameters and the oracle's scale and bias, with which code `q` stands for
/// `scale · value(q) + bias`. The codes are compared with `sub`'s, the values with its
/// dequantization.
fn check_rows(
    input: &Buffer,
    qw: &QuantizedWeight,
    sub: &QuantizedWeight,
    rows: &[usize],
    value: impl Fn(u8) -> f64,
    mut group: impl FnMut(usize, &[f32], &mut [u8]) -> (usize, f64, f64),
) -> anyhow::Result<(f64, usize)> {
    let spec = qw.spec();
    let (k, g, bits) = (qw.cols(), spec.group_size() as usize, spec.bits());
    let groups = qw.groups_per_row();
    let got = dequantize_f64(sub)?;
    let row_bytes = groups * spec.group_bytes();
    let packed = sub.packed().bytes();
    let dtype = input.dtype();
    let mut want = Vec::with_capacity(got.len());
    let mut mismatches = 0;
    let mut codes = vec![0u8; g];
    for (i, &r) in rows.iter().enumerate() {
        let w = input
            .view(r * k * dtype.size(), dtype, &[k])?
            .to_f32_vec()?;
        let prow = &packed[i * row_bytes..(i + 1) * row_bytes];
        for j in 0..groups {
            let (wrong, s, b) = group(i * groups + j, &w[j * g..(j + 1) * g], &mut codes);
            mismatches += wrong;
            for (e, &q) in codes.iter().enumerate() {
                mismatches += usize::from(read_code(bits, prow, j * g + e) != Some(q));
                want.push(s * value(q) + b);
            }
        }
    }
    Ok((max_rel_err(&got, &want), mismatches))
}
