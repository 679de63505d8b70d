//! `mlxq bench --device cuda`: device time of `quantized_matmul` and `gather_qmm` on a CUDA
//! GPU, and of `quantize` and `dequantize`, set against the GPU's read bandwidth measured in
//! the same run.
//!
//! - Weights are quantized on the device from random floats, in enough identical copies that
//!   cycling through them streams at least four times the L2 (and `--rotate-mib`) between two
//!   uses of one copy, so every call reads its weights from HBM.
//! - Times are CUDA-event device time: a batch of calls (one per copy, back to back on the
//!   stream) between two events, per call, median of `--iters` batches (default 20); and the
//!   same batch captured once as a CUDA graph and replayed (`graph_us`). Both ops write into
//!   one output made before the timing (`quantized_matmul_into`, `gather_qmm_into`).
//! - The roofline is a read-only kernel streaming 4 GiB with 16-byte loads (median of 10).
//! - Each result is checked on sampled outputs against the f64 oracle (transpose = true and
//!   false), normwise: 1e-5 for f32 x, 1e-2 for bf16/f16. Non-zero exit if any fails.

use super::data::spread;
use super::{check, BenchArgs, CublasData, Op};
use anyhow::Context;
use mlxq::backend::cuda::{cublas_bf16_gemm_us, read_bandwidth_probe, EventTimer};
use mlxq::{ops, Buffer, DType, Device, QuantSpec, QuantizedWeight};
use rand::rngs::StdRng;
use rand::seq::index::sample;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;

/// cuBLAS's bf16 GEMM on `[m, n, k]` (µs): x and W of the same random values as the
/// quantized cases' x and (unquantized) W, or every element 0x3c3c (≈ 0.0115) with
/// `--cublas-data const`, the reference of sessions before 48, which clocks higher.
fn cublas_reference(
    args: &BenchArgs,
    rng: &mut StdRng,
    device: &Device,
    [m, n, k]: [usize; 3],
    iters: usize,
    rotate: usize,
) -> mlxq::Result<f64> {
    let (x, w) = if args.tune.cublas_data == CublasData::Const {
        let c = half::bf16::from_bits(0x3c3c).to_f32();
        (
            Buffer::from_f32(&vec![c; m * k], DType::BF16, &[m, k])?,
            Buffer::from_f32(&vec![c; n * k], DType::BF16, &[n, k])?,
        )
    } else {
        (
            Buffer::from_f32(&randn(rng, m * k), DType::BF16, &[m, k])?,
            Buffer::from_f32(&randn(rng, n * k), DType::BF16, &[n, k])?,
        )
    };
    cublas_bf16_gemm_us(device, &x, &w, iters, rotate)
}

fn randn(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| (0..4).map(|_| rng.gen_range(-1.0f32..1.0)).sum::<f32>())
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

struct Timed {
    stream_us: f64,
    graph_us: f64,
}

/// Times `calls` (one op launch each) as a batch on the stream and, with `graph`, as a
/// replayed graph (ops that allocate their output cannot be captured: `graph_us` is NaN).
fn time_calls(
    device: &Device,
    iters: usize,
    calls: usize,
    graph: bool,
    mut run: impl FnMut(&mut mlxq::CommandEncoder, usize) -> mlxq::Result<()>,
) -> anyhow::Result<Timed> {
    let mut enc = device.encoder();
    let timer = EventTimer::new(device)?;
    for i in 0..calls {
        run(&mut enc, i)?;
    }
    enc.commit_and_wait()?;
    let mut stream = Vec::new();
    for _ in 0..iters {
        timer.start()?;
        for i in 0..calls {
            run(&mut enc, i)?;
        }
        stream.push(timer.stop_ms()? * 1e3 / calls as f64);
    }
    enc.commit_and_wait()?;
    if !graph {
        return Ok(Timed {
            stream_us: median(stream),
            graph_us: f64::NAN,
        });
    }
    let graph = enc.capture(|e| (0..calls).try_for_each(|i| run(e, i)))?;
    graph.replay()?;
    enc.commit_and_wait()?;
    let mut replay = Vec::new();
    for _ in 0..iters {
        timer.start()?;
        graph.replay()?;
        replay.push(timer.stop_ms()? * 1e3 / calls as f64);
    }
    enc.commit_and_wait()?;
    Ok(Timed {
        stream_us: median(stream),
        graph_us: median(replay),
    })
}

fn host_weight(w: &QuantizedWeight) -> anyhow::Result<QuantizedWeight> {
    Ok(QuantizedWeight::new(
        w.packed().to_host()?,
        w.scales().to_host()?,
        w.biases().map(Buffer::to_host).transpose()?,
        w.spec(),
    )?)
}

/// Normwise error of sampled outputs of `out = x · W(ᵀ)` against the f64 oracle, and whether
/// it is within `tol` with every sampled output finite.
fn check_output(
    args: &BenchArgs,
    xh: &Buffer,
    w: &QuantizedWeight,
    out: &Buffer,
    transpose: bool,
    tol: f64,
) -> anyhow::Result<(f64, bool)> {
    let (m, k) = (xh.shape()[0], xh.shape()[1]);
    let n = out.shape()[1];
    let hw = host_weight(w)?;
    let got = out.to_host()?.to_f32_vec()?;
    let cols_s: Vec<usize> = (0..args.tune.check_cols.min(n))
        .map(|i| i * n / args.tune.check_cols.min(n))
        .collect();
    let rows_s: Vec<usize> = (0..m.min(args.tune.check_rows)).collect();
    let xf: Vec<f64> = xh.to_f32_vec()?.into_iter().map(f64::from).collect();
    let wc = check::weight_columns(&hw, transpose, &cols_s)?;
    let (g, want) = check::sample_matmul(&xf, k, &rows_s, &wc, &cols_s, &got, n);
    let err = check::error(&g, &want);
    Ok((err, err <= tol && g.iter().all(|v| v.is_finite())))
}

/// Normwise error of sampled (token, slot) rows of a gather's output `[tokens, top, 1, n]`
/// against the f64 oracle of each row's expert (`hw`: the expert stack on the host, `idx` the
/// experts), over `check_rows` pairs spread over all of them and `check_cols` columns, and
/// whether it is within `tol` with every sampled output finite.
fn check_gather(
    args: &BenchArgs,
    xh: &Buffer,
    hw: &QuantizedWeight,
    idx: &[u32],
    top: usize,
    out: &Buffer,
    tol: f64,
) -> anyhow::Result<(f64, bool)> {
    let k = xh.shape()[3];
    let n = out.shape()[3];
    let got_all = out.to_host()?.to_f32_vec()?;
    let xf: Vec<f64> = xh.to_f32_vec()?.into_iter().map(f64::from).collect();
    let cols_s = spread(n, args.tune.check_cols);
    let pairs = spread(idx.len(), args.tune.check_rows);
    let (got, want) = check::sample_gather(
        &xf,
        k,
        hw,
        true,
        idx,
        top,
        &pairs,
        &cols_s,
        &got_all,
        n,
        &mut Default::default(),
    )?;
    let err = check::error(&got, &want);
    Ok((err, err <= tol && got.iter().all(|v| v.is_finite())))
}

/// `--chain`: the matmuls of one Llama-3-8B decode step (32 layers × q, k, v, o 4096×4096 /
/// 1024×4096, gate and up 14336×4096, down 4096×14336; M = 1, each layer its own copy of the
/// weights) captured as one CUDA graph; prints total weight bytes / replay time against the
/// read bandwidth. With `--fuse`, each layer's q, k, v are one 6144×4096 weight and gate, up
/// one 28672×4096 weight, stacked by [`QuantizedWeight::concat_rows`] from separately
/// quantized parts (the same bytes as unfused): 4 matmuls a layer. Returns the number of
/// failed output checks (one per distinct weight shape, last layer).
fn chain(
    args: &BenchArgs,
    device: &Device,
    spec: QuantSpec,
    bw: f64,
    iters: usize,
    tol: f64,
    rng: &mut StdRng,
) -> anyhow::Result<usize> {
    const LAYERS: usize = 32;
    // Per distinct weight: the rows (N) of the projections stacked in it (one unless fused)
    // and K. `layer`: a layer's matmuls in execution order, as indices into `shapes`.
    type Shape = (&'static [usize], usize);
    let fuse = args.tune.fuse;
    let (shapes, layer): (&[Shape], &[usize]) = if fuse {
        (
            &[
                (&[4096, 1024, 1024], 4096), // q, k, v
                (&[4096], 4096),             // o
                (&[14336, 14336], 4096),     // gate, up
                (&[4096], 14336),            // down
            ],
            &[0, 1, 2, 3],
        )
    } else {
        (
            &[
                (&[4096], 4096),
                (&[1024], 4096),
                (&[14336], 4096),
                (&[4096], 14336),
            ],
            &[0, 1, 1, 0, 2, 2, 3],
        )
    };
    let dtype = args.dtype;
    let flavour = args.tune.flavour;
    let mut enc = device.encoder();
    let mut weights: Vec<Vec<QuantizedWeight>> = Vec::new();
    let mut xs = Vec::new();
    let mut outs = Vec::new();
    for (s, &(parts, k)) in shapes.iter().enumerate() {
        let copies = LAYERS * layer.iter().filter(|&&l| l == s).count();
        let ws = if let [n] = *parts {
            let wf = Buffer::from_f32(&randn(rng, n * k), dtype, &[n, k])?.to_device(device)?;
            (0..copies)
                .map(|_| ops::quantize(&mut enc, &wf, spec, flavour))
                .collect::<mlxq::Result<Vec<_>>>()?
        } else {
            // Each projection quantized on its own (as an unfused model's), then stacked into
            // one device weight per layer.
            let quantized = parts
                .iter()
                .map(|&n| {
                    let wf =
                        Buffer::from_f32(&randn(rng, n * k), dtype, &[n, k])?.to_device(device)?;
                    let q = ops::quantize(&mut enc, &wf, spec, flavour)?;
                    enc.commit_and_wait()?;
                    host_weight(&q)
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let refs: Vec<&QuantizedWeight> = quantized.iter().collect();
            (0..copies)
                .map(|_| QuantizedWeight::concat_rows(&refs, device))
                .collect::<mlxq::Result<Vec<_>>>()?
        };
        enc.commit_and_wait()?;
        let xh = Buffer::from_f32(&randn(rng, k), dtype, &[1, k])?;
        let x = xh.to_device(device)?;
        let out = ops::quantized_matmul(&mut enc, &x, &ws[0], true)?;
        enc.commit_and_wait()?;
        weights.push(ws);
        xs.push((xh, x));
        outs.push(out);
    }
    // Call i: layer i / layer.len(), matmul i % layer.len(); the j-th use of a shape takes
    // its j-th copy.
    let calls: Vec<(usize, usize)> = {
        let mut used = vec![0usize; shapes.len()];
        (0..LAYERS * layer.len())
            .map(|i| {
                let s = layer[i % layer.len()];
                used[s] += 1;
                (s, used[s] - 1)
            })
            .collect()
    };
    let bytes: f64 = calls
        .iter()
        .map(|&(s, c)| weights[s][c].nbytes() as f64)
        .sum();
    let t = time_calls(device, iters, calls.len(), true, |e, i| {
        let (s, c) = calls[i];
        ops::quantized_matmul_into(e, &xs[s].1, &weights[s][c], true, &mut outs[s])
    })?;
    let mut failed = 0;
    let mut worst = 0.0f64;
    for s in 0..shapes.len() {
        let last = weights[s].len() - 1;
        let (err, ok) = check_output(args, &xs[s].0, &weights[s][last], &outs[s], true, tol)?;
        worst = worst.max(err);
        failed += usize::from(!ok);
    }
    let (stream_us, graph_us) = (
        t.stream_us * calls.len() as f64,
        t.graph_us * calls.len() as f64,
    );
    let best = stream_us.min(graph_us);
    println!(
        "{{\"kind\":\"chain\",\"model\":\"llama-3-8b decode step, {LAYERS} layers x {} matmuls{}, M=1\",\"bits\":{},\"group\":{},\"dtype\":\"{dtype}\",\"launches\":{},\"weight_bytes\":{bytes},\"floor_us\":{:.1},\"stream_us\":{stream_us:.1},\"graph_us\":{graph_us:.1},\"gbps\":{:.1},\"ratio\":{:.3},\"err\":{worst:.2e},\"ok\":{}}}",
        layer.len(),
        if fuse { " (q,k,v and gate,up fused)" } else { "" },
        spec.bits(),
        spec.group_size(),
        calls.len(),
        bytes / (bw * 1e3),
        bytes / (best * 1e3),
        bytes / (best * 1e3) / bw,
        failed == 0,
    );
    Ok(failed)
}

/// `--op quantize`: `quantize_into` of N×K floats on the device into preallocated outputs,
/// one output set per input copy, the copies rotated past the L2 as the matmul's weights are.
/// Prints the bytes read and written per call over the device time against the read
/// bandwidth; the codes, scales and biases of `check_rows` rows of the last call are checked
/// bit for bit against MLX's definition (`--flavour`). Returns 1 if any differ, else 0.
#[allow(clippy::too_many_arguments)]
fn quantize(
    args: &BenchArgs,
    device: &Device,
    spec: QuantSpec,
    [n, k]: [usize; 2],
    bw: f64,
    iters: usize,
    rotate: usize,
    rng: &mut StdRng,
) -> anyhow::Result<usize> {
    let dtype = args.dtype;
    let flavour = args.tune.flavour;
    let wh = Buffer::from_f32(&randn(rng, n * k), dtype, &[n, k])?;
    let mut enc = device.encoder();
    let w0 = wh.to_device(device)?;
    let q0 = ops::quantize(&mut enc, &w0, spec, flavour)?;
    let (in_bytes, out_bytes) = (w0.nbytes(), q0.nbytes());
    let copies = rotate
        .div_ceil(in_bytes + out_bytes)
        .clamp(2, args.tune.max_copies.max(2));
    let mut inputs = vec![w0];
    let mut outs = vec![q0];
    for _ in 1..copies {
        let w = wh.to_device(device)?;
        outs.push(ops::quantize(&mut enc, &w, spec, flavour)?);
        inputs.push(w);
    }
    enc.commit_and_wait()?;
    let t = time_calls(device, iters, copies, true, |e, i| {
        ops::quantize_into(e, &inputs[i], spec, flavour, &mut outs[i])
    })
    .context("quantize")?;
    let kernel = enc.last_kernel().unwrap_or("?").to_string();
    let rows = spread(n, args.tune.check_rows);
    let (err, mismatches) = check::quantize(&wh, &host_weight(&outs[copies - 1])?, flavour, &rows)?;
    let ok = mismatches == 0 && err == 0.0;
    if !ok {
        eprintln!(
            "quantize {n}x{k} {}-bit: {mismatches} codes, scales or biases differ from MLX's definition",
            spec.bits()
        );
    }
    print_conversion(
        "quantize",
        [n, k],
        spec,
        (dtype, flavour),
        [in_bytes, out_bytes, copies],
        bw,
        &t,
        (rows.len(), mismatches, ok),
        &kernel,
    );
    Ok(usize::from(!ok))
}

/// `--op dequantize`: `dequantize_into` of an N×K quantized weight on the device into
/// preallocated float outputs of `--dtype`, one per weight copy, the copies rotated past the L2
/// as the matmul's weights are. Prints the quantized bytes read plus the floats written per
/// call over the device time against the read bandwidth; `check_rows` rows of the last
/// call's output are compared bit for bit with the CPU backend's dequantization of the same
/// rows. Returns 1 if any differ, else 0.
#[allow(clippy::too_many_arguments)]
fn dequantize(
    args: &BenchArgs,
    device: &Device,
    spec: QuantSpec,
    [n, k]: [usize; 2],
    bw: f64,
    iters: usize,
    rotate: usize,
    rng: &mut StdRng,
) -> anyhow::Result<usize> {
    let dtype = args.dtype;
    let flavour = args.tune.flavour;
    let opts = ops::DequantizeOptions {
        dtype: Some(dtype),
        flavour,
    };
    let wh = Buffer::from_f32(&randn(rng, n * k), dtype, &[n, k])?;
    let mut enc = device.encoder();
    let q0 = ops::quantize(&mut enc, &wh.to_device(device)?, spec, flavour)?;
    let o0 = ops::dequantize(&mut enc, &q0, opts)?;
    let (in_bytes, out_bytes) = (q0.nbytes(), o0.nbytes());
    let copies = rotate
        .div_ceil(in_bytes + out_bytes)
        .clamp(2, args.tune.max_copies.max(2));
    let mut weights = vec![q0];
    let mut outs = vec![o0];
    for _ in 1..copies {
        let q = ops::quantize(&mut enc, &wh.to_device(device)?, spec, flavour)?;
        outs.push(ops::dequantize(&mut enc, &q, opts)?);
        weights.push(q);
    }
    enc.commit_and_wait()?;
    let t = time_calls(device, iters, copies, true, |e, i| {
        ops::dequantize_into(e, &weights[i], opts, &mut outs[i])
    })
    .context("dequantize")?;
    let kernel = enc.last_kernel().unwrap_or("?").to_string();
    // The CPU backend's dequantization of the sampled rows, against the same rows of the
    // last call's output.
    let rows = spread(n, args.tune.check_rows);
    let hw = host_weight(&weights[copies - 1])?;
    let sub = super::data::select(&hw, &rows, 0..hw.groups_per_row())?;
    let want = ops::dequantize(&mut Device::cpu().encoder(), &sub, opts)?;
    let got = outs[copies - 1].to_host()?;
    let (size, row_bytes) = (dtype.size(), k * dtype.size());
    let (gb, wb) = (got.bytes(), want.bytes());
    let mut mismatches = 0;
    let mut got_rows = Vec::with_capacity(rows.len() * k);
    for (i, &r) in rows.iter().enumerate() {
        let (g, w) = (
            &gb[r * row_bytes..(r + 1) * row_bytes],
            &wb[i * row_bytes..(i + 1) * row_bytes],
        );
        mismatches += g
            .chunks_exact(size)
            .zip(w.chunks_exact(size))
            .filter(|(a, b)| a != b)
            .count();
        got_rows.extend_from_slice(g);
    }
    let to_f64 = |b: Buffer| -> anyhow::Result<Vec<f64>> {
        Ok(b.to_f32_vec()?.into_iter().map(f64::from).collect())
    };
    let err = check::error(
        &to_f64(Buffer::from_bytes(&got_rows, dtype, &[rows.len(), k])?)?,
        &to_f64(want)?,
    );
    let ok = mismatches == 0 && err == 0.0;
    if !ok {
        eprintln!(
            "dequantize {n}x{k} {}-bit {}: {mismatches} values differ from the CPU backend's",
            spec.bits(),
            spec.mode()
        );
    }
    print_conversion(
        "dequantize",
        [n, k],
        spec,
        (dtype, flavour),
        [in_bytes, out_bytes, copies],
        bw,
        &t,
        (rows.len(), mismatches, ok),
        &kernel,
    );
    Ok(usize::from(!ok))
}

/// The JSON line of a timed `quantize_into` or `dequantize_into` (`kind`): the bytes read and
/// written per call over the device time against the read bandwidth `bw`, and the check.
#[allow(clippy::too_many_arguments)]
fn print_conversion(
    kind: &str,
    [n, k]: [usize; 2],
    spec: QuantSpec,
    (dtype, flavour): (DType, mlxq::Flavour),
    [in_bytes, out_bytes, copies]: [usize; 3],
    bw: f64,
    t: &Timed,
    (rows, mismatches, ok): (usize, usize, bool),
    kernel: &str,
) {
    let bytes = (in_bytes + out_bytes) as f64;
    let best = t.stream_us.min(t.graph_us);
    println!(
        "{{\"kind\":\"{kind}\",\"n\":{n},\"k\":{k},\"bits\":{},\"group\":{},\"mode\":\"{}\",\"dtype\":\"{dtype}\",\"flavour\":\"{flavour:?}\",\"input_bytes\":{in_bytes},\"output_bytes\":{out_bytes},\"copies\":{copies},\"floor_us\":{:.2},\"stream_us\":{:.2},\"graph_us\":{:.2},\"gbps\":{:.1},\"ratio\":{:.3},\"checked_rows\":{rows},\"mismatches\":{mismatches},\"ok\":{ok},\"kernel\":\"{kernel}\"}}",
        spec.bits(),
        spec.group_size(),
        spec.mode(),
        bytes / (bw * 1e3),
        t.stream_us,
        t.graph_us,
        bytes / (best * 1e3),
        bytes / (best * 1e3) / bw,
    );
}

/// Runs the CUDA benchmark: `--op matmul` over the shapes, `--op gather` over the tokens,
/// `--op quantize` and `--op dequantize` over the shapes' distinct N×K.
pub fn run(
    args: &BenchArgs,
    device: &Device,
    shapes: &[[usize; 3]],
    specs: &[QuantSpec],
) -> anyhow::Result<()> {
    let cuda = device.cuda_state()?;
    let iters = args.tune.iters.unwrap_or(20).max(1);
    eprintln!(
        "{} (sm_{}, {} SMs, {} MiB L2): measuring read bandwidth...",
        cuda.name(),
        cuda.arch(),
        cuda.multiprocessors(),
        cuda.l2_bytes() >> 20
    );
    let bw = read_bandwidth_probe(device, 4 << 30, 10)? / 1e9;
    eprintln!("read bandwidth: {bw:.0} GB/s");
    let rotate = (args.tune.rotate_mib << 20).max(4 * cuda.l2_bytes());
    let mut rng = StdRng::seed_from_u64(args.tune.seed);
    let mut failed = 0;
    let dtype = args.dtype;
    let tol = if dtype == DType::F32 { 1e-5 } else { 1e-2 };
    println!(
        "{{\"kind\":\"roofline\",\"device\":\"{}\",\"read_gbps\":{bw:.1}}}",
        cuda.name()
    );
    let mut enc = device.encoder();
    let mut cublas: HashMap<[usize; 3], Option<f64>> = HashMap::new();
    if args.tune.chain {
        for &spec in specs {
            failed += chain(args, device, spec, bw, iters, tol, &mut rng)?;
        }
    }
    for op in &args.ops {
        for &spec in specs {
            match op {
                Op::Matmul => {
                    for &[m, n, k] in shapes {
                        for &transpose in &args.transpose {
                            let (rows, cols) = if transpose { (n, k) } else { (k, n) };
                            let wf = Buffer::from_f32(
                                &randn(&mut rng, rows * cols),
                                dtype,
                                &[rows, cols],
                            )?
                            .to_device(device)?;
                            let w0 = ops::quantize(&mut enc, &wf, spec, args.tune.flavour)?;
                            let copies = rotate
                                .div_ceil(w0.nbytes())
                                .clamp(2, args.tune.max_copies.max(2));
                            let mut ws = vec![w0];
                            for _ in 1..copies {
                                ws.push(ops::quantize(&mut enc, &wf, spec, args.tune.flavour)?);
                            }
                            drop(wf);
                            enc.commit_and_wait()?;
                            let xh = Buffer::from_f32(&randn(&mut rng, m * k), dtype, &[m, k])?;
                            let x = xh.to_device(device)?;
                            let mut out = ops::quantized_matmul(&mut enc, &x, &ws[0], transpose)?;
                            enc.commit_and_wait()?;
                            let t = time_calls(device, iters, copies, true, |e, i| {
                                ops::quantized_matmul_into(e, &x, &ws[i], transpose, &mut out)
                            })?;
                            // Check the output of the last call (copy copies-1, identical weights).
                            let (err, ok) =
                                check_output(args, &xh, &ws[copies - 1], &out, transpose, tol)?;
                            failed += usize::from(!ok);
                            let bytes = ws[0].nbytes() as f64;
                            let best = t.stream_us.min(t.graph_us);
                            // cuBLAS bf16 GEMM of the same shape (W [N, K] bf16), once per shape.
                            let blas = *cublas.entry([m, n, k]).or_insert_with(|| {
                                if args.tune.no_cublas {
                                    return None;
                                }
                                cublas_reference(args, &mut rng, device, [m, n, k], iters, rotate)
                                    .map_err(|e| eprintln!("cuBLAS column skipped: {e}"))
                                    .ok()
                            });
                            let blas = blas.map_or("null".to_string(), |u| format!("{u:.2}"));
                            println!(
                                "{{\"kind\":\"matmul\",\"m\":{m},\"n\":{n},\"k\":{k},\"bits\":{},\"group\":{},\"mode\":\"{}\",\"dtype\":\"{dtype}\",\"transpose\":{transpose},\"weight_bytes\":{bytes},\"copies\":{copies},\"floor_us\":{:.2},\"stream_us\":{:.2},\"graph_us\":{:.2},\"gbps\":{:.1},\"ratio\":{:.3},\"cublas_bf16_us\":{blas},\"cublas_data\":\"{:?}\",\"err\":{err:.2e},\"ok\":{ok},\"kernel\":\"{}\"}}",
                                spec.bits(),
                                spec.group_size(),
                                spec.mode(),
                                bytes / (bw * 1e3),
                                t.stream_us,
                                t.graph_us,
                                bytes / (best * 1e3),
                                bytes / (best * 1e3) / bw,
                                args.tune.cublas_data,
                                enc.last_kernel().unwrap_or("?"),
                            );
                        }
                    }
                }
                Op::Gather => {
                    let [e, n, k] = args.tune.moe;
                    let top = args.tune.top_k;
                    let tokens: Vec<usize> = if args.tune.tokens.is_empty() {
                        vec![1, 512]
                    } else {
                        args.tune.tokens.clone()
                    };
                    let wf = Buffer::from_f32(&randn(&mut rng, e * n * k), dtype, &[e, n, k])?
                        .to_device(device)?;
                    let w0 = ops::quantize(&mut enc, &wf, spec, args.tune.flavour)?;
                    let copies = rotate
                        .div_ceil(w0.nbytes())
                        .clamp(2, args.tune.max_copies.max(2));
                    let mut ws = vec![w0];
                    for _ in 1..copies {
                        ws.push(ops::quantize(&mut enc, &wf, spec, args.tune.flavour)?);
                    }
                    drop(wf);
                    enc.commit_and_wait()?;
                    let hw = host_weight(&ws[copies - 1])?;
                    for &t in &tokens {
                        let xh = Buffer::from_f32(&randn(&mut rng, t * k), dtype, &[t, 1, 1, k])?;
                        let x = xh.to_device(device)?;
                        // Each token picks `top` distinct random experts (as the CPU bench).
                        let idx: Vec<u32> = (0..t)
                            .flat_map(|_| sample(&mut rng, e, top).into_iter().map(|v| v as u32))
                            .collect();
                        let distinct = {
                            let mut d = idx.clone();
                            d.sort_unstable();
                            d.dedup();
                            d.len()
                        };
                        let rhs = Buffer::from_slice(&idx, &[t, top])?.to_device(device)?;
                        // Into one output, so the calls allocate nothing and can be captured
                        // into a graph (as a decode step would be).
                        let mut out =
                            ops::gather_qmm(&mut enc, &x, &ws[0], None, Some(&rhs), true, false)?;
                        enc.commit_and_wait()?;
                        let tm = time_calls(device, iters, copies, true, |en, i| {
                            let w = &ws[i];
                            ops::gather_qmm_into(en, &x, w, None, Some(&rhs), true, false, &mut out)
                        })
                        .context("gather")?;
                        // Check the output of the last call (identical weights in every copy).
                        let (err, ok) = check_gather(args, &xh, &hw, &idx, top, &out, tol)?;
                        failed += usize::from(!ok);
                        let bytes = (ws[0].nbytes() / e * distinct) as f64;
                        let best = tm.stream_us.min(tm.graph_us);
                        println!(
                            "{{\"kind\":\"gather\",\"tokens\":{t},\"experts\":{e},\"top_k\":{top},\"n\":{n},\"k\":{k},\"bits\":{},\"group\":{},\"mode\":\"{}\",\"dtype\":\"{dtype}\",\"distinct_experts\":{distinct},\"weight_bytes\":{bytes},\"floor_us\":{:.2},\"stream_us\":{:.2},\"graph_us\":{:.2},\"ratio\":{:.3},\"err\":{err:.2e},\"ok\":{ok}}}",
                            spec.bits(),
                            spec.group_size(),
                            spec.mode(),
                            bytes / (bw * 1e3),
                            tm.stream_us,
                            tm.graph_us,
                            bytes / (best * 1e3) / bw,
                        );
                    }
                }
                Op::Quantize => {
                    let mut seen = std::collections::HashSet::new();
                    for &[_, n, k] in shapes {
                        if seen.insert([n, k]) {
                            failed +=
                                quantize(args, device, spec, [n, k], bw, iters, rotate, &mut rng)?;
                        }
                    }
                }
                Op::Dequantize => {
                    let mut seen = std::collections::HashSet::new();
                    for &[_, n, k] in shapes {
                        if seen.insert([n, k]) {
                            failed += dequantize(
                                args,
                                device,
                                spec,
                                [n, k],
                                bw,
                                iters,
                                rotate,
                                &mut rng,
                            )?;
                        }
                    }
                }
            }
        }
    }
    if failed > 0 {
        anyhow::bail!("{failed} result(s) exceeded the tolerance");
    }
    Ok(())
}
