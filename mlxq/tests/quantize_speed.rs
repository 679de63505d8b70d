//! Timing probe for `quantize` (ignored by default; run with
//! `cargo test --release -p mlxq --test quantize_speed -- --ignored --nocapture`).
//!
//! Quantizes a 4096×14336 weight (a Llama-3-8B down projection) in f32 and bf16 with every
//! CPU variant and prints the best-of-N GB/s of input read. Set `MLXQ_PROBE_SHAPE=ROWSxCOLS`
//! for another shape, `MLXQ_PROBE_ITERS` for N, `MLXQ_PROBE_VARIANTS=avx512,generic` to pick
//! variants, `MLXQ_PROBE_DTYPES=f32,bf16` dtypes, `MLXQ_PROBE_FLAVOURS=gpu,cpu` flavours.

use mlxq::{ops, Buffer, DType, Device, Flavour, QuantSpec};
use std::time::Instant;

#[test]
#[ignore = "timing probe, not a test"]
fn quantize_speed() {
    let (rows, cols) = std::env::var("MLXQ_PROBE_SHAPE")
        .ok()
        .and_then(|s| {
            let (r, c) = s.split_once('x')?;
            Some((r.parse().ok()?, c.parse().ok()?))
        })
        .unwrap_or((4096usize, 14336usize));
    let iters: usize = std::env::var("MLXQ_PROBE_ITERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(7);
    let v: Vec<f32> = (0..rows * cols)
        .map(|i| {
            let x = (i as u32).wrapping_mul(2654435761) >> 8;
            (x as f32 / (1u32 << 24) as f32 - 0.5) * 0.1
        })
        .collect();
    let variants = std::env::var("MLXQ_PROBE_VARIANTS").unwrap_or("avx512,generic".into());
    let spec = QuantSpec::affine(4, 64).unwrap();
    let list = |var: &str, default: &str| std::env::var(var).unwrap_or(default.into());
    let dtypes = list("MLXQ_PROBE_DTYPES", "f32,bf16");
    let flavours = list("MLXQ_PROBE_FLAVOURS", "gpu,cpu");
    for dtype in dtypes.split(',').map(|d| DType::parse(d).unwrap()) {
        let w = Buffer::from_f32(&v, dtype, &[rows, cols]).unwrap();
        let bytes = (rows * cols * dtype.size()) as f64;
        for flavour in flavours.split(',').map(|f| Flavour::parse(f).unwrap()) {
            for variant in variants.split(',') {
                let mut enc = Device::cpu_with_variant(variant).unwrap().encoder();
                let mut best = f64::INFINITY;
                for _ in 0..iters {
                    let t = Instant::now();
                    let qw = ops::quantize(&mut enc, &w, spec, flavour).unwrap();
                    best = best.min(t.elapsed().as_secs_f64());
                    drop(qw);
                }
                println!(
                    "{dtype:>8} {flavour} {rows}x{cols} {:<60} best {:8.2} ms  {:6.2} GB/s of input",
                    enc.last_kernel().unwrap_or("?"),
                    best * 1e3,
                    bytes / best / 1e9
                );
            }
        }
    }
}
