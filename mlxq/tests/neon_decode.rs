//! The NEON decode kernel (`neon`, aarch64) on the shapes its blocking makes special: every
//! width (the 8-, 4- and 2-bit paths and the scalar unpack of the others), groups of 32, 64
//! and 128, rows of one group and of several, N of 1, 3 and 13 (no multiple of anything),
//! every row-block size M = 1..=8 (each its own instantiation), 9 and 17 (a full block plus a
//! partial one), every scales and output dtype; against the f64 reference at the conformance
//! tolerances (1e-5 for f32 output, 1e-2 for f16/bf16), into NaN-poisoned outputs.
//!
//! The error is measured against the conditioning of the sum every kernel forms,
//! `s·Σ(x·q) + b·Σx`: `max |got − want| / max_r,c Σ_i |x_ri|·(|s·q_ci| + |b|)`. With one or
//! three outputs (N = 1, M = 1) the normwise error of the conformance suite divides by a single
//! result, which cancellation can make arbitrarily small (the `generic` kernel then fails it
//! too: its error is printed beside each failure); this bound is at least every |result| and
//! equals the usual one when nothing cancels.
//!
//! On other architectures the variant does not exist here, and the test says so and returns.

use mlxq::reference::{dequantize_f64, matmul_f64, max_abs_err, max_rel_err};
use mlxq::{ops, Buffer, DType, Device, Flavour, QuantSpec};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const VARIANT: &str = "neon";

fn key(bits: u32, g: u32, x: DType, s: DType, o: DType) -> mlxq::registry::KernelKey {
    mlxq::registry::KernelKey {
        op: mlxq::registry::OpKind::QuantizedMatmul,
        mode: mlxq::QuantMode::Affine,
        bits,
        group_size: g,
        input: x,
        scales: s,
        output: o,
        flag: true,
        variant: VARIANT,
    }
}

/// `max |got − want|` over the largest conditioning bound (see the module docs); infinite
/// where [`max_abs_err`] is (an unwritten, NaN output; lengths that differ).
fn rel_err(got: &[f64], want: &[f64], bound: &[f64]) -> f64 {
    let scale = bound.iter().fold(0f64, |a, v| a.max(v.abs()));
    max_abs_err(got, want) / scale.max(f64::MIN_POSITIVE)
}

#[test]
fn neon_decode_every_width_block_and_odd_shape() {
    if !mlxq::backend::cpu::supports(VARIANT, &key(4, 64, DType::F32, DType::F32, DType::F32)) {
        eprintln!("skipped: the neon variant runs on aarch64 only");
        return;
    }
    let device = Device::cpu_with_variant(VARIANT).unwrap();
    let mut enc = device.encoder();
    let mut generic = Device::cpu_with_variant("generic").unwrap().encoder();
    let mut rng = StdRng::seed_from_u64(2222);
    let mut randn = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| (0..4).map(|_| rng.gen_range(-1.0f32..1.0)).sum::<f32>())
            .collect()
    };
    let mut cases = 0;
    let mut failures = Vec::new();
    for bits in [1u32, 2, 3, 4, 5, 6, 8] {
        for g in [32u32, 64, 128] {
            let spec = QuantSpec::affine(bits, g).unwrap();
            for (i, sdt) in [DType::F32, DType::F16, DType::BF16]
                .into_iter()
                .enumerate()
            {
                // One group per row, then three; N never a multiple of 2 past 1.
                for (groups, n) in [(1usize, [1usize, 13][i % 2]), (3, [3, 13, 1][i])] {
                    let k = groups * g as usize;
                    let w = Buffer::from_f32(&randn(n * k), sdt, &[n, k]).unwrap();
                    let w = ops::quantize(&mut enc, &w, spec, Flavour::Gpu).unwrap();
                    let wd = dequantize_f64(&w).unwrap();
                    let b: Vec<f64> = w
                        .biases()
                        .unwrap()
                        .to_f32_vec()
                        .unwrap()
                        .into_iter()
                        .map(f64::from)
                        .collect();
                    // |s·q| + |b| per weight.
                    let wabs: Vec<f64> = (0..n * k)
                        .map(|i| {
                            let bias = b[i / g as usize];
                            (wd[i] - bias).abs() + bias.abs()
                        })
                        .collect();
                    for m in [1usize, 2, 3, 4, 5, 6, 7, 8, 9, 17] {
                        // x of the scales' dtype (output the same) and of f32 (output f32).
                        for xdt in [sdt, DType::F32] {
                            let odt = xdt.promote(sdt).unwrap();
                            assert!(mlxq::backend::cpu::supports(
                                VARIANT,
                                &key(bits, g, xdt, sdt, odt)
                            ));
                            let x = Buffer::from_f32(&randn(m * k), xdt, &[m, k]).unwrap();
                            let mut y =
                                Buffer::from_f32(&vec![f32::NAN; m * n], odt, &[m, n]).unwrap();
                            ops::quantized_matmul_into(&mut enc, &x, &w, true, &mut y).unwrap();
                            let ran = enc.last_kernel().unwrap().to_owned();
                            assert!(ran.ends_with(VARIANT), "{ran} ran");
                            let xs: Vec<f64> =
                                x.to_f32_vec().unwrap().into_iter().map(f64::from).collect();
                            let want = matmul_f64(&xs, m, &wd, n, k, true);
                            let got: Vec<f64> =
                                y.to_f32_vec().unwrap().into_iter().map(f64::from).collect();
                            let tol = if odt == DType::F32 { 1e-5 } else { 1e-2 };
                            let xabs: Vec<f64> = xs.iter().map(|v| v.abs()).collect();
                            let bound = matmul_f64(&xabs, m, &wabs, n, k, true);
                            let err = rel_err(&got, &want, &bound);
                            cases += 1;
                            if got.iter().any(|v| !v.is_finite()) || err > tol {
                                let mut y2 =
                                    Buffer::from_f32(&vec![f32::NAN; m * n], odt, &[m, n]).unwrap();
                                ops::quantized_matmul_into(&mut generic, &x, &w, true, &mut y2)
                                    .unwrap();
                                let g2: Vec<f64> = y2
                                    .to_f32_vec()
                                    .unwrap()
                                    .into_iter()
                                    .map(f64::from)
                                    .collect();
                                failures.push(format!(
                                    "bits {bits} g {g} scales {sdt} x {xdt} k {k} n {n} m {m}: err {err:e} (generic {:e}; normwise {:e})",
                                    rel_err(&g2, &want, &bound),
                                    max_rel_err(&got, &want),
                                ));
                            }
                        }
                    }
                }
            }
        }
    }
    enc.commit_and_wait().unwrap();
    generic.commit_and_wait().unwrap();
    assert!(
        failures.is_empty(),
        "{} of {cases} cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert_eq!(cases, 7 * 3 * 3 * 2 * 10 * 2);
}
