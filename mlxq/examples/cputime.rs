//! Kernel timing by CPU time, for shared machines: with `RAYON_NUM_THREADS=1` the process's
//! CPU time is what the kernel costs, however many other processes share the cores (wall time
//! is not). Weights are one copy (cache-resident), so this measures the kernel's compute
//! throughput, not memory bandwidth; `mlxq bench` measures that.
//!
//! `RAYON_NUM_THREADS=1 cargo run --release -p mlxq --example cputime -- M N K BITS [VARIANT] [ITERS]`

use mlxq::{ops, Buffer, DType, Device, Flavour, QuantSpec};

fn cpu_seconds() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

fn main() -> mlxq::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let num = |i: usize, d: usize| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    let (m, n, k, bits) = (num(0, 1), num(1, 4096), num(2, 4096), num(3, 4) as u32);
    let variant = args.get(4).map(String::as_str).unwrap_or("avx512bf16");
    let iters = num(5, 50);
    let device = Device::cpu_with_variant(variant)?;
    let mut enc = device.encoder();
    let w: Vec<f32> = (0..n * k)
        .map(|i| ((i as u64 * 2654435761) % 2001) as f32 / 1000.0 - 1.0)
        .collect();
    let w = Buffer::from_f32(&w, DType::BF16, &[n, k])?;
    let qw = ops::quantize(&mut enc, &w, QuantSpec::affine(bits, 64)?, Flavour::Gpu)?;
    let x: Vec<f32> = (0..m * k)
        .map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0)
        .collect();
    let x = Buffer::from_f32(&x, DType::BF16, &[m, k])?;
    let mut y = Buffer::zeros(DType::BF16, &[m, n])?;
    ops::quantized_matmul_into(&mut enc, &x, &qw, true, &mut y)?;
    let t0 = cpu_seconds();
    for _ in 0..iters {
        ops::quantized_matmul_into(&mut enc, &x, &qw, true, &mut y)?;
    }
    let per = (cpu_seconds() - t0) / iters as f64;
    let gw = (n * k) as f64 / per * 1e-9;
    println!(
        "{m}x{n}x{k} {bits}-bit {}: {:.3} ms CPU/call, {gw:.2} Gweights/s, {:.2} GB/s of weights, {:.1} GFLOP/s",
        enc.last_kernel().unwrap_or("?"),
        per * 1e3,
        qw.nbytes() as f64 / per * 1e-9,
        2.0 * (m * n * k) as f64 / per * 1e-9
    );
    Ok(())
}
