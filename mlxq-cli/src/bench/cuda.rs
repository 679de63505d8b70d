//! `mlxq bench --device cuda`: device time of `quantized_matmul` and `gather_qmm` on a CUDA
//! GPU, set against the GPU's read bandwidth measured in the same run.
//!
//! - Weights are quantized on the device from random floats, in enough identical copies that
//!   cycling through them streams at least four times the L2 (and `--rotate-mib`) between two
//!   uses of one copy, so every call reads its weights from HBM.
//! - Times are CUDA-event device time: a batch of calls (one per copy, back to back on the
//!   stream) between two events, per call, median of `--iters` batches (default 20); and the
//!   same batch captured once as a CUDA graph and replayed (`graph_us`).
//! - The roofline is a read-only kernel streaming 4 GiB with 16-byte loads (median of 10).
//! - Each result is checked on sampled outputs against the f64 oracle (transpose = true and
//!   false), normwise: 1e-5 for f32 x, 1e-2 for bf16/f16. Non-zero exit if any fails.

use super::{check, BenchArgs, Op};
use anyhow::Context;
use mlxq::backend::cuda::{read_bandwidth_probe, EventTimer};
use mlxq::{ops, Buffer, DType, Device, QuantSpec, QuantizedWeight};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

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

/// Runs the CUDA benchmark: `--op matmul` over the shapes, `--op gather` over the tokens.
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
                            let hw = host_weight(&ws[copies - 1])?;
                            let got = out.to_host()?.to_f32_vec()?;
                            let cols_s: Vec<usize> = (0..args.tune.check_cols.min(n))
                                .map(|i| i * n / args.tune.check_cols.min(n))
                                .collect();
                            let rows_s: Vec<usize> = (0..m.min(args.tune.check_rows)).collect();
                            let xf: Vec<f64> =
                                xh.to_f32_vec()?.into_iter().map(f64::from).collect();
                            let wc = check::weight_columns(&hw, transpose, &cols_s)?;
                            let (g, want) =
                                check::sample_matmul(&xf, k, &rows_s, &wc, &cols_s, &got, n);
                            let err = check::error(&g, &want);
                            let ok = err <= tol && g.iter().all(|v| v.is_finite());
                            failed += usize::from(!ok);
                            let bytes = ws[0].nbytes() as f64;
                            let best = t.stream_us.min(t.graph_us);
                            println!(
                                "{{\"kind\":\"matmul\",\"m\":{m},\"n\":{n},\"k\":{k},\"bits\":{},\"group\":{},\"dtype\":\"{dtype}\",\"transpose\":{transpose},\"weight_bytes\":{bytes},\"copies\":{copies},\"floor_us\":{:.2},\"stream_us\":{:.2},\"graph_us\":{:.2},\"gbps\":{:.1},\"ratio\":{:.3},\"err\":{err:.2e},\"ok\":{ok},\"kernel\":\"{}\"}}",
                                spec.bits(),
                                spec.group_size(),
                                bytes / (bw * 1e3),
                                t.stream_us,
                                t.graph_us,
                                bytes / (best * 1e3),
                                bytes / (best * 1e3) / bw,
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
                    for &t in &tokens {
                        let x = Buffer::from_f32(&randn(&mut rng, t * k), dtype, &[t, 1, 1, k])?
                            .to_device(device)?;
                        let idx: Vec<u32> = (0..t * top)
                            .map(|i| ((i % top) * e / top + rng.gen_range(0..e / top)) as u32)
                            .collect();
                        let distinct = {
                            let mut d = idx.clone();
                            d.sort_unstable();
                            d.dedup();
                            d.len()
                        };
                        let rhs = Buffer::from_slice(&idx, &[t, top])?.to_device(device)?;
                        let tm = time_calls(device, iters, copies, false, |en, i| {
                            ops::gather_qmm(en, &x, &ws[i], None, Some(&rhs), true, false).map(drop)
                        })
                        .context("gather")?;
                        let bytes = (ws[0].nbytes() / e * distinct) as f64;
                        let best = tm.stream_us.min(tm.graph_us);
                        println!(
                            "{{\"kind\":\"gather\",\"tokens\":{t},\"experts\":{e},\"top_k\":{top},\"n\":{n},\"k\":{k},\"bits\":{},\"group\":{},\"dtype\":\"{dtype}\",\"distinct_experts\":{distinct},\"weight_bytes\":{bytes},\"floor_us\":{:.2},\"stream_us\":{:.2},\"ratio\":{:.3}}}",
                            spec.bits(),
                            spec.group_size(),
                            bytes / (bw * 1e3),
                            tm.stream_us,
                            bytes / (best * 1e3) / bw,
                        );
                    }
                }
                Op::Quantize => eprintln!("--op quantize is not timed on CUDA yet"),
            }
        }
    }
    if failed > 0 {
        anyhow::bail!("{failed} result(s) exceeded the tolerance");
    }
    Ok(())
}
