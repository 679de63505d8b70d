//! The cases: each builds random data, times one op over rotating weight copies, checks the
//! last result against the oracle and reports a [`Record`].
//!
//! Weights are quantized once per (shape, bits, layout) and shared by every M, so the slow
//! parts (random data, quantization, copies, the reference's weight columns) are paid once.

use super::data::{self, copies_for, replicate, spread};
use super::report::{Record, Reporter};
use super::{check, dedup, Setup};
use mlxq::{ops, Buffer, DType, QuantSpec, QuantizedWeight};
use rand::rngs::StdRng;
use rand::seq::index::sample;
use rand::SeedableRng;
use std::collections::HashMap;

/// The MoE layer of `--op gather`.
#[derive(Clone, Copy, Debug)]
pub struct Moe {
    pub experts: usize,
    pub n: usize,
    pub k: usize,
    pub top_k: usize,
}

/// Normwise relative tolerance for a result of `kernel` (the encoder's name of what ran)
/// with x of `dtype` and `bits`-bit codes: 1e-5 for f32 x, 1e-2 for bf16/f16; for an
/// opt-in int8 variant ([`mlxq::backend::cpu::APPROXIMATE`]) `3/L`, `L` its x grid's levels
/// (rounding x per block of 32 to steps of `max|x|/L` errs ~1/L normwise on this data: a
/// sanity bound; the conformance suite tests the per-output bound the variant documents).
fn tolerance(dtype: DType, kernel: &str, bits: u32) -> f64 {
    let exact = if dtype == DType::F32 { 1e-5 } else { 1e-2 };
    mlxq::backend::cpu::APPROXIMATE
        .iter()
        .find(|v| kernel.ends_with(*v))
        .and_then(|v| mlxq::backend::cpu::int8_levels(v, bits))
        .map_or(exact, |l| exact.max(3.0 / f64::from(l)))
}

/// A seed for one piece of data, mixed from the base seed and what identifies it.
fn seed(base: u64, parts: &[usize]) -> u64 {
    parts.iter().fold(base ^ 0x243F_6A88_85A3_08D3, |h, &p| {
        (h ^ p as u64)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .rotate_left(29)
    })
}

/// Numbers progress lines on stderr.
struct Progress {
    op: &'static str,
    done: usize,
    total: usize,
}

impl Progress {
    fn new(op: &'static str, total: usize) -> Progress {
        Progress { op, done: 0, total }
    }
    fn note(&self, what: &str) {
        eprintln!("[{}] {what}", self.op);
    }
    fn start(&mut self, what: &str) {
        self.done += 1;
        eprintln!("[{} {}/{}] {what}", self.op, self.done, self.total);
    }
}

/// A quantized random weight of `shape` and its copies, with a progress note.
fn prepare(
    s: &Setup,
    p: &Progress,
    shape: &[usize],
    spec: QuantSpec,
    seed: u64,
) -> anyhow::Result<(QuantizedWeight, Vec<QuantizedWeight>)> {
    let wf = data::random(s.dtype, shape, seed)?;
    let mut enc = s.device.encoder();
    let qw = ops::quantize(&mut enc, &wf, spec, s.flavour)?;
    enc.commit_and_wait()?;
    let count = copies_for(qw.nbytes(), s.rotate_bytes, s.max_copies);
    p.note(&format!(
        "weights {shape:?} {}-bit: {:.1} MB, {count} copies ({:.0} MB) to rotate",
        spec.bits(),
        qw.nbytes() as f64 / 1e6,
        (count * qw.nbytes()) as f64 / 1e6
    ));
    let copies = replicate(&qw, count)?;
    Ok((qw, copies))
}

/// `x` as f64.
fn f64s(b: &Buffer) -> anyhow::Result<Vec<f64>> {
    Ok(b.to_f32_vec()?.into_iter().map(f64::from).collect())
}

/// Runs of the bandwidth probe per prefetch distance after each case (the first reading, at
/// the start, takes 5).
const ROOFLINE_RUNS: usize = 2;

/// Times `quantized_matmul` for every shape × bits × layout.
pub fn matmul(
    s: &Setup,
    shapes: &[[usize; 3]],
    specs: &[QuantSpec],
    transposes: &[bool],
    out: &mut Reporter,
) -> anyhow::Result<()> {
    let transposes = dedup(transposes.iter().copied());
    let weights = dedup(shapes.iter().map(|&[_, n, k]| (n, k)));
    let total = dedup(shapes.iter().copied()).len() * specs.len() * transposes.len();
    let mut p = Progress::new("matmul", total);
    for &(n, k) in &weights {
        let ms = dedup(
            shapes
                .iter()
                .filter(|s| (s[1], s[2]) == (n, k))
                .map(|s| s[0]),
        );
        for &spec in specs {
            for &t in &transposes {
                let shape = if t { [n, k] } else { [k, n] };
                let bits = spec.bits() as usize;
                let (qw, copies) = prepare(s, &p, &shape, spec, seed(s.seed, &[1, n, k, bits]))?;
                let cols = spread(n, s.check_cols);
                let wcols = check::weight_columns(&qw, t, &cols)?;
                for &m in &ms {
                    p.start(&format!("matmul {m}×{n}×{k} {bits}-bit {}", s.dtype));
                    let x = data::random(s.dtype, &[m, k], seed(s.seed, &[2, m, k]))?;
                    let out_dtype = s.dtype.promote(qw.scales_dtype()).unwrap_or(s.dtype);
                    let mut y = Buffer::zeros(out_dtype, &[m, n])?;
                    let mut enc = s.device.encoder();
                    let timing = s.timing.run(|i| {
                        let w = &copies[i % copies.len()];
                        ops::quantized_matmul_into(&mut enc, &x, w, t, &mut y)?;
                        enc.commit_and_wait()?;
                        Ok(())
                    })?;
                    let rows = spread(m, s.check_rows);
                    let (got, want) = check::sample_matmul(
                        &f64s(&x)?,
                        k,
                        &rows,
                        &wcols,
                        &cols,
                        &y.to_f32_vec()?,
                        n,
                    );
                    let err = check::error(&got, &want);
                    let kernel = enc.last_kernel().unwrap_or("?").to_owned();
                    let tol = tolerance(s.dtype, &kernel, spec.bits());
                    out.push(Record {
                        op: "matmul",
                        device: s.device.location().to_string(),
                        m: Some(m),
                        n,
                        k,
                        bits: spec.bits(),
                        group_size: spec.group_size(),
                        mode: spec.mode(),
                        dtype: s.dtype,
                        transpose: t,
                        moe: None,
                        seconds: timing.median.max(1e-12),
                        weight_bytes: qw.nbytes(),
                        flops: Some(2.0 * (m * n * k) as f64),
                        roofline_gbps: s.roofline.read(ROOFLINE_RUNS),
                        max_rel_err: err,
                        tolerance: tol,
                        pass: err <= tol,
                        kernel,
                        copies: copies.len().min(timing.calls),
                        iters: timing.iters,
                        checked: [rows.len(), m, cols.len(), n],
                    });
                }
            }
        }
    }
    Ok(())
}

/// Times `gather_qmm` on a MoE layer for every token count × bits × layout.
///
/// Each token picks `top_k` distinct random experts. Call `i` uses weight copy
/// `i mod copies` and shifts every expert index by `top_k · ⌊i / copies⌋` (mod experts), so at
/// one token successive calls sweep all experts of all copies before touching one twice.
pub fn gather(
    s: &Setup,
    moe: Moe,
    tokens: &[usize],
    specs: &[QuantSpec],
    transposes: &[bool],
    out: &mut Reporter,
) -> anyhow::Result<()> {
    let transposes = dedup(transposes.iter().copied());
    let Moe {
        experts,
        n,
        k,
        top_k,
    } = moe;
    let mut p = Progress::new("gather", tokens.len() * specs.len() * transposes.len());
    for &spec in specs {
        for &t in &transposes {
            let shape = if t { [experts, n, k] } else { [experts, k, n] };
            let bits = spec.bits() as usize;
            let (qw, copies) =
                prepare(s, &p, &shape, spec, seed(s.seed, &[3, experts, n, k, bits]))?;
            let per_expert = qw.nbytes() / experts;
            let cols = spread(n, s.check_cols);
            let mut wcols: HashMap<usize, Vec<f64>> = HashMap::new();
            for &tok in tokens {
                p.start(&format!(
                    "gather {tok} tokens × top-{top_k} of {experts} experts {n}×{k} {bits}-bit {}",
                    s.dtype
                ));
                let x = data::random(s.dtype, &[tok, 1, k], seed(s.seed, &[4, tok, k]))?;
                let lhs: Vec<u32> = (0..tok * top_k).map(|i| (i / top_k) as u32).collect();
                let lhs = Buffer::from_slice(&lhs, &[tok, top_k])?;
                let mut rng = StdRng::seed_from_u64(seed(s.seed, &[5, tok, experts, top_k]));
                let base: Vec<usize> = (0..tok)
                    .flat_map(|_| sample(&mut rng, experts, top_k).into_vec())
                    .collect();
                let shifts = experts / gcd(experts, top_k);
                let routes = (0..shifts)
                    .map(|j| {
                        let r: Vec<u32> = base
                            .iter()
                            .map(|&e| ((e + j * top_k) % experts) as u32)
                            .collect();
                        Buffer::from_slice(&r, &[tok, top_k])
                    })
                    .collect::<mlxq::Result<Vec<_>>>()?;
                let route = |i: usize| (i / copies.len()) % shifts;
                let distinct = dedup(base.iter().copied()).len();
                let mut enc = s.device.encoder();
                // The first call makes the output, the others write into it (no allocation
                // per call, as in a decode loop).
                let mut y: Option<Buffer> = None;
                let timing = s.timing.run(|i| {
                    let w = &copies[i % copies.len()];
                    let (l, r) = (Some(&lhs), Some(&routes[route(i)]));
                    match &mut y {
                        Some(out) => ops::gather_qmm_into(&mut enc, &x, w, l, r, t, false, out)?,
                        None => y = Some(ops::gather_qmm(&mut enc, &x, w, l, r, t, false)?),
                    }
                    enc.commit_and_wait()?;
                    Ok(())
                })?;
                let Some(y) = y else {
                    anyhow::bail!("gather_qmm was never called")
                };
                // Check sampled (token, slot) rows of the last call against its experts.
                let got_all = y.to_f32_vec()?;
                let last_route = routes[route(timing.calls - 1)].to_vec::<u32>()?;
                let xf = f64s(&x)?;
                let pairs = spread(tok * top_k, s.check_rows);
                let (got, want) = check::sample_gather(
                    &xf,
                    k,
                    &qw,
                    t,
                    &last_route,
                    top_k,
                    &pairs,
                    &cols,
                    &got_all,
                    n,
                    &mut wcols,
                )?;
                let err = check::error(&got, &want);
                let kernel = enc.last_kernel().unwrap_or("?").to_owned();
                let tol = tolerance(s.dtype, &kernel, spec.bits());
                out.push(Record {
                    op: "gather",
                    device: s.device.location().to_string(),
                    m: Some(tok),
                    n,
                    k,
                    bits: spec.bits(),
                    group_size: spec.group_size(),
                    mode: spec.mode(),
                    dtype: s.dtype,
                    transpose: t,
                    moe: Some((experts, top_k)),
                    seconds: timing.median.max(1e-12),
                    weight_bytes: distinct * per_expert,
                    flops: Some(2.0 * (tok * top_k * n * k) as f64),
                    roofline_gbps: s.roofline.read(ROOFLINE_RUNS),
                    max_rel_err: err,
                    tolerance: tol,
                    pass: err <= tol,
                    kernel,
                    copies: copies.len().min(timing.calls),
                    iters: timing.iters,
                    checked: [pairs.len(), tok * top_k, cols.len(), n],
                });
            }
        }
    }
    Ok(())
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a.max(1)
    } else {
        gcd(b, a % b)
    }
}

/// Times `quantize_into` of N×K float weights for every distinct N×K × bits, into
/// preallocated outputs: one output set per input copy, rotated with the inputs (so neither
/// comes from the cache), allocated and written once before timing, so the timed calls
/// neither allocate nor fault in fresh pages.
pub fn quantize(
    s: &Setup,
    shapes: &[[usize; 3]],
    specs: &[QuantSpec],
    out: &mut Reporter,
) -> anyhow::Result<()> {
    let weights = dedup(shapes.iter().map(|&[_, n, k]| (n, k)));
    let mut p = Progress::new("quantize", weights.len() * specs.len());
    for &(n, k) in &weights {
        let wf = data::random(s.dtype, &[n, k], seed(s.seed, &[6, n, k]))?;
        let count = copies_for(wf.nbytes(), s.rotate_bytes, s.max_copies);
        let mut inputs = vec![wf];
        for _ in 1..count {
            inputs.push(data::copy(&inputs[0])?);
        }
        for &spec in specs {
            p.start(&format!(
                "quantize_into {n}×{k} {} to {}-bit ({count} input copies, {count} preallocated output sets)",
                s.dtype,
                spec.bits()
            ));
            let mut enc = s.device.encoder();
            let mut outs = inputs
                .iter()
                .map(|w| ops::quantize(&mut enc, w, spec, s.flavour))
                .collect::<mlxq::Result<Vec<_>>>()?;
            enc.commit_and_wait()?;
            let timing = s.timing.run(|i| {
                ops::quantize_into(
                    &mut enc,
                    &inputs[i % count],
                    spec,
                    s.flavour,
                    &mut outs[i % count],
                )?;
                enc.commit_and_wait()?;
                Ok(())
            })?;
            let rows = spread(n, s.check_rows);
            let last = (timing.calls - 1) % count;
            let (input, qw) = (&inputs[last], &outs[last]);
            let (err, mismatches) = check::quantize(input, qw, s.flavour, &rows)?;
            if mismatches > 0 {
                eprintln!("quantize {n}×{k} {}-bit: {mismatches} codes, scales or biases differ from MLX's definition", spec.bits());
            }
            out.push(conversion_record(
                s,
                "quantize",
                (n, k, spec),
                &timing,
                count,
                input.nbytes() + qw.nbytes(),
                (err, mismatches, rows.len()),
                enc.last_kernel(),
            ));
        }
    }
    Ok(())
}

/// Times `dequantize_into` of N×K quantized weights for every distinct N×K × bits, into
/// preallocated float outputs of `--dtype`: the weight is quantized once and replicated, one
/// output per copy, rotated with the copies (so neither comes from the cache), allocated and
/// written once before timing, so the timed calls neither allocate nor fault in fresh pages.
/// Sampled rows of the last call's output are checked bit for bit against MLX's definition.
pub fn dequantize(
    s: &Setup,
    shapes: &[[usize; 3]],
    specs: &[QuantSpec],
    out: &mut Reporter,
) -> anyhow::Result<()> {
    let weights = dedup(shapes.iter().map(|&[_, n, k]| (n, k)));
    let mut p = Progress::new("dequantize", weights.len() * specs.len());
    let opts = ops::DequantizeOptions {
        dtype: Some(s.dtype),
        flavour: s.flavour,
    };
    for &(n, k) in &weights {
        for &spec in specs {
            let wf = data::random(s.dtype, &[n, k], seed(s.seed, &[7, n, k]))?;
            let mut enc = s.device.encoder();
            let qw = ops::quantize(&mut enc, &wf, spec, s.flavour)?;
            drop(wf);
            let float_bytes = n * k * s.dtype.size();
            let count = copies_for(qw.nbytes() + float_bytes, s.rotate_bytes, s.max_copies);
            let copies = replicate(&qw, count)?;
            let label = if spec.mode() == mlxq::QuantMode::Affine {
                format!("{}-bit", spec.bits())
            } else {
                spec.mode().to_string()
            };
            p.start(&format!(
                "dequantize_into {n}×{k} {label} to {} ({count} weight copies, {count} preallocated outputs)",
                s.dtype,
            ));
            let mut outs = copies
                .iter()
                .map(|w| ops::dequantize(&mut enc, w, opts))
                .collect::<mlxq::Result<Vec<_>>>()?;
            enc.commit_and_wait()?;
            let timing = s.timing.run(|i| {
                ops::dequantize_into(&mut enc, &copies[i % count], opts, &mut outs[i % count])?;
                enc.commit_and_wait()?;
                Ok(())
            })?;
            let rows = spread(n, s.check_rows);
            let last = (timing.calls - 1) % count;
            let (err, mismatches) =
                check::dequantize(&copies[last], &outs[last], s.flavour, &rows)?;
            if mismatches > 0 {
                eprintln!(
                    "dequantize {n}×{k} {label}: {mismatches} values differ from MLX's definition"
                );
            }
            out.push(conversion_record(
                s,
                "dequantize",
                (n, k, spec),
                &timing,
                count,
                qw.nbytes() + outs[last].nbytes(),
                (err, mismatches, rows.len()),
                enc.last_kernel(),
            ));
        }
    }
    Ok(())
}

/// The record of a timed `quantize_into` or `dequantize_into` (`op`) of an N×K weight of
/// `spec`: `bytes` read and written per call, `count` copies rotated, the check's error,
/// mismatches and rows, and the kernel that ran (into preallocated outputs).
#[allow(clippy::too_many_arguments)]
fn conversion_record(
    s: &Setup,
    op: &'static str,
    (n, k, spec): (usize, usize, QuantSpec),
    timing: &super::timing::Timing,
    count: usize,
    bytes: usize,
    (err, mismatches, rows): (f64, usize, usize),
    kernel: Option<&str>,
) -> Record {
    Record {
        op,
        device: s.device.location().to_string(),
        m: None,
        n,
        k,
        bits: spec.bits(),
        group_size: spec.group_size(),
        mode: spec.mode(),
        dtype: s.dtype,
        transpose: true,
        moe: None,
        seconds: timing.median.max(1e-12),
        weight_bytes: bytes,
        flops: None,
        roofline_gbps: s.roofline.read(ROOFLINE_RUNS),
        max_rel_err: err,
        tolerance: 0.0,
        pass: mismatches == 0 && err == 0.0,
        kernel: format!(
            "{} ({op}_into, outputs preallocated)",
            kernel.unwrap_or("?")
        ),
        copies: count.min(timing.calls),
        iters: timing.iters,
        checked: [rows, n, k, k],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Exact kernels keep the conformance tolerances; an int8 variant gets 3/L, wherever it
    /// is built (the names are known on every target that builds it).
    #[test]
    fn tolerance_follows_the_kernel_that_ran() {
        let exact = "cpu_QuantizedMatmul_affine_b8_g64_bfloat16_bfloat16_bfloat16_1_avx2gemm";
        assert_eq!(tolerance(DType::F32, exact, 8), 1e-5);
        assert_eq!(tolerance(DType::BF16, exact, 4), 1e-2);
        if cfg!(target_arch = "x86_64") {
            let i8 = "cpu_QuantizedMatmul_affine_b8_g64_bfloat16_bfloat16_bfloat16_1_avx2gemm-i8";
            assert_eq!(tolerance(DType::BF16, i8, 8), 3.0 / 63.0);
            assert_eq!(tolerance(DType::F32, i8, 4), 3.0 / 127.0);
        }
    }
}
