//! Timing probe for `quantize` (ignored by default; run with
//! `cargo test --release -p mlxq --test quantize_speed -- --ignored --nocapture`).
//!
//! Quantizes a 4096×14336 weight (a Llama-3-8B down projection) to 4 bits, group 64, with each
//! CPU variant, rotating through copies of the weight (≥ 600 MB in all, so the last-level
//! cache cannot hold them), and prints the best-of-N time as GB/s of input read, beside the
//! best-of-N read bandwidth of a plain multi-threaded sum over the same copies, measured
//! between the timed calls (the machine may be shared: both see the same load), and the cost
//! of allocating the outputs alone (`Buffer::zeros`, which `ops::quantize` pays per call).
//!
//! Environment: `MLXQ_PROBE_SHAPE=ROWSxCOLS`, `MLXQ_PROBE_ITERS` (N, default 7),
//! `MLXQ_PROBE_VARIANTS=avx512,generic`, `MLXQ_PROBE_DTYPES=f32,bf16`,
//! `MLXQ_PROBE_FLAVOURS=gpu,cpu`, `MLXQ_PROBE_BITS=4`, `MLXQ_PROBE_GROUP=64`,
//! `MLXQ_PROBE_COPIES` (1 with a small shape times the kernel on cached data).

use mlxq::{ops, Buffer, DType, Device, Flavour, QuantSpec};
use rayon::prelude::*;
use std::hint::black_box;
use std::time::Instant;

fn env_or(var: &str, default: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| default.to_string())
}

/// Seconds of one multi-threaded pass summing `bytes` as u64 words.
fn read_pass(bytes: &[u8]) -> f64 {
    let t = Instant::now();
    let sum = bytes
        .par_chunks(1 << 18)
        .map(|c| {
            let mut acc = [0u64; 8];
            for w in c.chunks_exact(64) {
                for (a, v) in acc.iter_mut().zip(w.chunks_exact(8)) {
                    *a = a.wrapping_add(u64::from_le_bytes(v.try_into().unwrap_or([0; 8])));
                }
            }
            acc.iter().fold(0u64, |s, &a| s.wrapping_add(a))
        })
        .reduce(|| 0, u64::wrapping_add);
    black_box(sum);
    t.elapsed().as_secs_f64()
}

#[test]
#[ignore = "timing probe, not a test"]
fn quantize_speed() {
    let (rows, cols) = env_or("MLXQ_PROBE_SHAPE", "4096x14336")
        .split_once('x')
        .map(|(r, c)| (r.parse().unwrap(), c.parse().unwrap()))
        .unwrap();
    let iters: usize = env_or("MLXQ_PROBE_ITERS", "7").parse().unwrap();
    let spec = QuantSpec::affine(
        env_or("MLXQ_PROBE_BITS", "4").parse().unwrap(),
        env_or("MLXQ_PROBE_GROUP", "64").parse().unwrap(),
    )
    .unwrap();
    let v: Vec<f32> = (0..rows * cols)
        .map(|i| {
            // Roughly normal weights (sum of 4 uniforms), σ ≈ 0.02.
            let h = |k: u32| (i as u32).wrapping_mul(2654435761).wrapping_add(k * 40503) >> 8;
            let u: f32 = (0..4)
                .map(|k| h(k) as f32 / (1u32 << 24) as f32 - 0.5)
                .sum();
            u * 0.035
        })
        .collect();
    println!(
        "{rows}x{cols} {spec}, {} threads, best of {iters}",
        rayon::current_num_threads()
    );
    for dtype in env_or("MLXQ_PROBE_DTYPES", "f32,bf16").split(',') {
        let dtype = DType::parse(dtype).unwrap();
        let bytes = rows * cols * dtype.size();
        let copies = std::env::var("MLXQ_PROBE_COPIES")
            .ok()
            .and_then(|c| c.parse().ok())
            .unwrap_or((600usize << 20).div_ceil(bytes));
        let copies: Vec<Buffer> = (0..copies)
            .map(|_| Buffer::from_f32(&v, dtype, &[rows, cols]).unwrap())
            .collect();
        let mut read = f64::INFINITY;
        let mut alloc = f64::INFINITY;
        for (i, _) in (0..iters).enumerate() {
            read = read.min(read_pass(copies[i % copies.len()].bytes()));
            let t = Instant::now();
            let words = cols * spec.bits() as usize / 32;
            let g = spec.group_size() as usize;
            let outs = (
                Buffer::zeros(DType::U32, &[rows, words]).unwrap(),
                Buffer::zeros(dtype, &[rows, cols / g]).unwrap(),
                Buffer::zeros(dtype, &[rows, cols / g]).unwrap(),
            );
            alloc = alloc.min(t.elapsed().as_secs_f64());
            drop(black_box(outs));
        }
        let gbs = |s: f64| bytes as f64 / s / 1e9;
        println!(
            "{dtype:>8}: read bandwidth {:6.2} GB/s (best {:.2} ms a copy, {} copies); \
             output allocation alone {:.2} ms",
            gbs(read),
            read * 1e3,
            copies.len(),
            alloc * 1e3
        );
        for flavour in env_or("MLXQ_PROBE_FLAVOURS", "gpu,cpu").split(',') {
            let flavour = Flavour::parse(flavour).unwrap();
            for variant in env_or("MLXQ_PROBE_VARIANTS", "avx512,generic").split(',') {
                let mut enc = Device::cpu_with_variant(variant).unwrap().encoder();
                let n = if variant == "generic" { 2 } else { iters };
                let mut best = f64::INFINITY;
                for i in 0..n {
                    let w = &copies[i % copies.len()];
                    let t = Instant::now();
                    let qw = ops::quantize(&mut enc, w, spec, flavour).unwrap();
                    best = best.min(t.elapsed().as_secs_f64());
                    drop(black_box(qw));
                }
                println!(
                    "{dtype:>8} {flavour} {:<8} best {:8.2} ms {:6.2} GB/s of input = {:5.1}% of read ({})",
                    variant,
                    best * 1e3,
                    gbs(best),
                    100.0 * read / best,
                    enc.last_kernel().unwrap_or("?"),
                );
            }
        }
    }
}
