//! quantized_matmul and gather_qmm with MLX's FP modes (mxfp4, mxfp8, nvfp4) on the CPU:
//! against the f64 oracle of the dequantized weights (`reference::dequantize_f64`) and against
//! MLX 0.32.4's CPU results (`tests/fixtures/mlx-0.32.4-cpu/TAG.qmm.safetensors`, made by
//! `tools/gen_fp_matmul_fixtures.py`).
//!
//! Tolerances (normwise relative error, `reference::max_rel_err`), as `matmul_conformance`:
//! 1e-5 when the output is f32, 1e-2 when it is f16/bf16 (an FP matmul outputs x's dtype).
//! Outputs are poisoned with NaN first, so an element a kernel forgets to write fails.

mod common;

use common::{got_f64, poisoned, randn, tolerance, x_f64};

use mlxq::reference::{dequantize_f64, matmul_f64, max_rel_err};
use mlxq::registry::{KernelKey, OpKind};
use mlxq::{ops, Buffer, CommandEncoder, DType, Device, Flavour, QuantMode, QuantSpec};
use mlxq::{Flavour as F, QuantizedWeight};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const FLOATS: [DType; 3] = [DType::F32, DType::F16, DType::BF16];
const MODES: [QuantMode; 3] = [QuantMode::Mxfp4, QuantMode::Mxfp8, QuantMode::Nvfp4];

fn spec(mode: QuantMode) -> QuantSpec {
    let (bits, g) = QuantSpec::fp_defaults(mode);
    QuantSpec::new(mode, bits, g).unwrap()
}

/// A weight `[..batch, rows, cols]` of `mode`: quantized from random values (of `dtype`, in
/// `flavour`), or (`flavour` None) random codes with moderate scale codes, every element code
/// but E4M3FN's NaN (0x7f, 0xff) occurring.
fn fp_weight(
    enc: &mut CommandEncoder,
    rng: &mut StdRng,
    shape: &[usize],
    mode: QuantMode,
    dtype: DType,
    flavour: Option<Flavour>,
) -> QuantizedWeight {
    let spec = spec(mode);
    if let Some(flavour) = flavour {
        let n = shape.iter().product();
        let w = Buffer::from_f32(&randn(rng, n), dtype, shape).unwrap();
        return ops::quantize(enc, &w, spec, flavour).unwrap();
    }
    let (lead, cols) = shape.split_at(shape.len() - 1);
    let (bits, g) = (spec.bits() as usize, spec.group_size() as usize);
    let with = |d: usize| lead.iter().copied().chain([d]).collect::<Vec<_>>();
    let rows: usize = lead.iter().product();
    let mut bytes: Vec<u8> = (0..rows * cols[0] * bits / 8).map(|_| rng.gen()).collect();
    if bits == 8 {
        for b in &mut bytes {
            if *b & 0x7f == 0x7f {
                *b -= 1;
            }
        }
    }
    let words: Vec<u32> = bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let (lo, hi) = match mode {
        QuantMode::Mxfp4 => (121u8, 129u8),
        QuantMode::Mxfp8 => (113, 121),
        _ => (0x28, 0x40),
    };
    let scales: Vec<u8> = (0..rows * cols[0] / g)
        .map(|_| rng.gen_range(lo..=hi))
        .collect();
    QuantizedWeight::new(
        Buffer::from_slice(&words, &with(cols[0] * bits / 32)).unwrap(),
        Buffer::from_slice(&scales, &with(cols[0] / g)).unwrap(),
        None,
        spec,
    )
    .unwrap()
}

fn fp_key(mode: QuantMode, x: DType, transpose: bool, variant: &'static str) -> KernelKey {
    let spec = spec(mode);
    KernelKey {
        op: OpKind::QuantizedMatmul,
        mode,
        bits: spec.bits(),
        group_size: spec.group_size(),
        input: x,
        scales: DType::U8,
        output: x,
        flag: transpose,
        variant,
    }
}

/// Whether `avx512` runs transposed FP keys on this CPU (where it runs its affine ones).
fn avx512_here() -> bool {
    let mut key = fp_key(QuantMode::Mxfp4, DType::F32, true, "avx512");
    (key.mode, key.bits, key.group_size, key.scales) = (QuantMode::Affine, 4, 64, DType::F32);
    mlxq::backend::cpu::supports("avx512", &key)
}

/// Whether `avx2` runs on this CPU (its affine keys; it takes every FP key there).
fn avx2_here() -> bool {
    let mut key = fp_key(QuantMode::Mxfp4, DType::F32, true, "avx2");
    (key.mode, key.bits, key.group_size, key.scales) = (QuantMode::Affine, 4, 64, DType::F32);
    mlxq::backend::cpu::supports("avx2", &key)
}

/// Whether `avx512vnni` runs on this CPU (its affine keys; it takes transposed mxfp4 keys with
/// bf16 or f16 x).
fn vnni_here() -> bool {
    let mut key = fp_key(QuantMode::Mxfp4, DType::BF16, true, "avx512vnni");
    (key.mode, key.bits, key.group_size, key.scales) = (QuantMode::Affine, 4, 64, DType::BF16);
    mlxq::backend::cpu::supports("avx512vnni", &key)
}

/// The variant that runs an FP key when the device prefers `variant`: `avx512vnni` for
/// transposed mxfp4 with bf16 or f16 x where it runs, `avx512` for transposed keys where it
/// runs, `avx2` for every key where it runs, `generic` otherwise.
fn fp_runner(variant: &str, mode: QuantMode, x: DType, transpose: bool) -> &'static str {
    if variant == "avx512vnni"
        && mode == QuantMode::Mxfp4
        && x != DType::F32
        && transpose
        && vnni_here()
    {
        "avx512vnni"
    } else if variant == "avx512" && transpose && avx512_here() {
        "avx512"
    } else if variant == "avx2" && avx2_here() {
        "avx2"
    } else {
        "generic"
    }
}

/// Every mode × weight source × transpose × x dtype × M ∈ {1, 3, 17}, into NaN-poisoned
/// outputs, against the oracle, on `generic`, `avx512` (the transposed keys), `avx2` (every
/// key) and `avx512vnni` (transposed mxfp4, bf16 and f16 x) where the CPU has them; one
/// configuration on each other variant (which hand FP keys to `generic`).
#[test]
fn fp_matmul_sweep_against_the_oracle() {
    let mut rng = StdRng::seed_from_u64(2323);
    let (mut cases, mut failures) = (0, Vec::new());
    for variant in mlxq::backend::cpu::VARIANTS {
        let device = Device::cpu_with_variant(variant).unwrap();
        let mut enc = device.encoder();
        let full = matches!(*variant, "generic" | "avx512" | "avx2" | "avx512vnni");
        for mode in MODES {
            let sources: &[Option<Flavour>] = if full {
                &[Some(F::Gpu), Some(F::Cpu), None]
            } else {
                &[None]
            };
            for (si, &source) in sources.iter().enumerate() {
                for transpose in [true, false] {
                    // Quantized axis (cols): 96, three mx groups (six nvfp4 groups: a multiple of
                    // 32 columns, see the session 23 notes); the other axis odd.
                    let (rows, cols) = ([13, 37, 5][si], 96);
                    let sdt = FLOATS[si];
                    let w = fp_weight(&mut enc, &mut rng, &[rows, cols], mode, sdt, source);
                    let wd = dequantize_f64(&w).unwrap();
                    let (in_dim, out_dim) = if transpose {
                        (cols, rows)
                    } else {
                        (rows, cols)
                    };
                    let xdts: &[DType] = if full { &FLOATS } else { &[DType::BF16] };
                    for &xdt in xdts {
                        let ms: &[usize] = if full { &[1, 3, 17] } else { &[3] };
                        for &m in ms {
                            let x =
                                Buffer::from_f32(&randn(&mut rng, m * in_dim), xdt, &[m, in_dim])
                                    .unwrap();
                            let mut y = poisoned(xdt, &[m, out_dim]);
                            ops::quantized_matmul_into(&mut enc, &x, &w, transpose, &mut y)
                                .unwrap();
                            let ran = enc.last_kernel().unwrap().to_owned();
                            let runner = fp_runner(variant, mode, xdt, transpose);
                            assert!(ran.ends_with(&format!("_{runner}")), "{ran} for {mode}");
                            assert!(ran.contains(mode.name()), "{ran}");
                            let want = matmul_f64(&x_f64(&x), m, &wd, rows, cols, transpose);
                            let err = max_rel_err(&got_f64(&y), &want);
                            // quantized_matmul allocating its output: the same bytes.
                            let y2 = ops::quantized_matmul(&mut enc, &x, &w, transpose).unwrap();
                            assert_eq!((y2.dtype(), y2.shape()), (xdt, &[m, out_dim][..]));
                            assert_eq!(y2.bytes(), y.bytes(), "{ran}: into vs allocating");
                            cases += 1;
                            if err > tolerance(xdt) {
                                failures.push(format!(
                                    "{variant}: {mode} source {source:?} transpose {transpose} x {xdt} m {m}: err {err:e}"
                                ));
                            }
                        }
                    }
                }
            }
        }
        enc.commit_and_wait().unwrap();
    }
    assert!(
        failures.is_empty(),
        "{} of {cases} cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    let others = mlxq::backend::cpu::VARIANTS.len() - 4;
    assert_eq!(cases, 4 * (3 * 3 * 2 * 3 * 3) + others * 3 * 2);
}

/// The FP keys run on `generic` (every mode, transpose and x dtype), on `avx512` transposed,
/// on `avx2`, and (transposed mxfp4 with bf16 or f16 x) on `avx512vnni`, where the CPU has
/// them; every other variant refuses them.
#[test]
fn fp_keys_run_on_generic_avx512_avx2_and_vnni() {
    println!(
        "avx512 here: {}, avx2 here: {}, avx512vnni here: {}",
        avx512_here(),
        avx2_here(),
        vnni_here()
    );
    for mode in MODES {
        for xdt in FLOATS {
            for transpose in [true, false] {
                for variant in mlxq::backend::cpu::VARIANTS {
                    let key = fp_key(mode, xdt, transpose, variant);
                    let want = *variant == "generic"
                        || fp_runner(variant, mode, xdt, transpose) == *variant;
                    assert_eq!(
                        mlxq::backend::cpu::supports(variant, &key),
                        want,
                        "{variant} {mode} {xdt} transpose {transpose}"
                    );
                }
            }
        }
    }
}

/// `avx512`'s, `avx2`'s and `avx512vnni`'s FP kernels on the shapes their driver splits: K
/// past one block of x (8192 f32 elements for one row), rows of an odd number of nvfp4 groups
/// (a half chunk at the end; for `avx512vnni` a partial superblock), M across row blocks (8
/// and 4), N odd, E4M3 NaN codes (mxfp8 elements, nvfp4 scales), and on `avx512vnni` E8M0's
/// NaN code 0xff and its smallest, 2^-127 (mxfp4 scales), and f16 scale rounding; against the
/// oracle where finite, NaN exactly where the oracle is.
#[test]
fn fp_simd_long_rows_half_chunks_and_nan_codes() {
    for (variant, here) in [
        ("avx512", avx512_here()),
        ("avx2", avx2_here()),
        ("avx512vnni", vnni_here()),
    ] {
        if here {
            fp_simd_cases(variant);
        } else {
            println!("{variant}: skipped (this CPU lacks its instruction set)");
        }
    }
}

fn fp_simd_cases(variant: &str) {
    let device = Device::cpu_with_variant(variant).unwrap();
    let mut enc = device.encoder();
    let mut rng = StdRng::seed_from_u64(0xf9);
    let (mut cases, mut want_cases) = (0, 0);
    // avx512vnni runs mxfp4 only, and E8M0's NaN code reaches its output as NaN (see
    // `x86_vnni::e8m0_16`).
    let vnni = variant == "avx512vnni";
    for mode in MODES {
        if vnni && mode != QuantMode::Mxfp4 {
            continue;
        }
        let g = spec(mode).group_size() as usize;
        for (k, n) in [(8192 + 3 * 32, 7), (25 * g, 37), (g, 3)] {
            let mut w = fp_weight(&mut enc, &mut rng, &[n, k], mode, DType::F32, None);
            // NaN codes: E4M3 0x7f/0xff elements (mxfp8) or scales (nvfp4) in two rows; for
            // mxfp4 on avx512vnni, E8M0 0xff in row 1 and 0 (2^-127) in the last row.
            if mode != QuantMode::Mxfp4 || vnni {
                let (words, scales) = (w.packed().to_vec::<u32>().unwrap(), w.scales());
                let mut sc = scales.to_vec::<u8>().unwrap();
                let mut wb: Vec<u8> = words.iter().flat_map(|x| x.to_le_bytes()).collect();
                if mode == QuantMode::Mxfp8 {
                    wb[k + 5] = 0x7f; // row 1
                    wb[k * (n - 1) + k - 1] = 0xff; // the last row's last element
                } else if mode == QuantMode::Mxfp4 {
                    sc[k / g] = 0xff; // row 1's first group
                    sc[n * k / g - 1] = 0; // the last row's last group
                } else {
                    sc[k / g] = 0x7f; // row 1's first group
                    sc[n * k / g - 1] = 0xff; // the last row's last group
                }
                let words: Vec<u32> = wb
                    .chunks_exact(4)
                    .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                w = QuantizedWeight::new(
                    Buffer::from_slice(&words, w.packed().shape()).unwrap(),
                    Buffer::from_slice(&sc, scales.shape()).unwrap(),
                    None,
                    spec(mode),
                )
                .unwrap();
            }
            let wd = dequantize_f64(&w).unwrap();
            for xdt in FLOATS {
                if vnni && xdt == DType::F32 {
                    continue;
                }
                for m in [1, 2, 5, 8, 11] {
                    want_cases += 1;
                    let x = Buffer::from_f32(&randn(&mut rng, m * k), xdt, &[m, k]).unwrap();
                    let mut y = poisoned(xdt, &[m, n]);
                    ops::quantized_matmul_into(&mut enc, &x, &w, true, &mut y).unwrap();
                    let ran = enc.last_kernel().unwrap().to_owned();
                    assert!(ran.ends_with(&format!("_{variant}")), "{ran}");
                    let mut want = matmul_f64(&x_f64(&x), m, &wd, n, k, true);
                    if vnni {
                        // E8M0 0xff is NaN to this kernel (as to the OCP MX format and MLX's
                        // GPU flavour), 2^128 to the f64 oracle: row 1's column must be NaN.
                        for r in 0..m {
                            want[r * n + 1] = f64::NAN;
                        }
                    }
                    let got = f64s(&y);
                    let nans = want.iter().filter(|v| v.is_nan()).count();
                    let poisoned_rows = match mode {
                        QuantMode::Mxfp4 if vnni => 1,
                        QuantMode::Mxfp4 => 0,
                        _ => 2,
                    };
                    assert_eq!(nans, poisoned_rows * m);
                    let err = err_where_finite(&got, &want).unwrap_or_else(|e| {
                        panic!("{variant} {mode} k {k} n {n} {xdt} m {m}: {e}")
                    });
                    assert!(
                        err <= tolerance(xdt),
                        "{variant} {mode} k {k} n {n} {xdt} m {m}: err {err:e}"
                    );
                    cases += 1;
                }
            }
        }
    }
    assert_eq!(cases, want_cases);
    assert_eq!(want_cases, if vnni { 3 * 2 * 5 } else { 3 * 3 * 3 * 5 });
}

/// A batched (3-D) FP weight against batched x, broadcasting over a batch of 1 in x.
#[test]
fn fp_batched_matmul_broadcasts() {
    let device = Device::cpu();
    let mut enc = device.encoder();
    let mut rng = StdRng::seed_from_u64(5);
    for mode in MODES {
        let g = spec(mode).group_size() as usize;
        for transpose in [true, false] {
            let (rows, cols) = (9, 2 * g);
            let w = fp_weight(&mut enc, &mut rng, &[3, rows, cols], mode, DType::F32, None);
            let wd = dequantize_f64(&w).unwrap();
            let (in_dim, out_dim) = if transpose {
                (cols, rows)
            } else {
                (rows, cols)
            };
            let m = 2;
            let x = Buffer::from_f32(&randn(&mut rng, m * in_dim), DType::F32, &[1, m, in_dim])
                .unwrap();
            let y = ops::quantized_matmul(&mut enc, &x, &w, transpose).unwrap();
            assert_eq!(y.shape(), &[3, m, out_dim]);
            let got = got_f64(&y);
            for e in 0..3 {
                let we = &wd[e * rows * cols..(e + 1) * rows * cols];
                let want = matmul_f64(&x_f64(&x), m, we, rows, cols, transpose);
                let err = max_rel_err(&got[e * m * out_dim..(e + 1) * m * out_dim], &want);
                assert!(
                    err < 1e-5,
                    "{mode} transpose {transpose} expert {e}: {err:e}"
                );
            }
        }
    }
}

/// MoE routing with FP experts: tokens × top-k, both transposes, every dtype, sorted or not,
/// into a NaN-poisoned output; each pair against the oracle and the single matmul on the
/// expert's view.
#[test]
fn fp_gather_qmm_against_the_oracle() {
    let device = Device::cpu();
    let mut enc = device.encoder();
    let mut rng = StdRng::seed_from_u64(99);
    for mode in MODES {
        let g = spec(mode).group_size() as usize;
        for (i, xdt) in FLOATS.into_iter().enumerate() {
            for transpose in [true, false] {
                let (experts, rows, cols) = (5, 11, 2 * g);
                let source = [None, Some(F::Gpu), Some(F::Cpu)][i];
                let w = fp_weight(
                    &mut enc,
                    &mut rng,
                    &[experts, rows, cols],
                    mode,
                    xdt,
                    source,
                );
                let (in_dim, out_dim) = if transpose {
                    (cols, rows)
                } else {
                    (rows, cols)
                };
                let (tokens, k, m) = (6, 2, [1, 3][usize::from(transpose)]);
                let x = Buffer::from_f32(
                    &randn(&mut rng, tokens * m * in_dim),
                    xdt,
                    &[tokens, m, in_dim],
                )
                .unwrap();
                let lhs: Vec<u32> = (0..tokens * k).map(|i| (i / k) as u32).collect();
                let mut rhs: Vec<u32> = (0..tokens * k)
                    .map(|_| rng.gen_range(0..experts as u32))
                    .collect();
                for sorted in [false, true] {
                    if sorted {
                        rhs.sort_unstable();
                    }
                    let lb = Buffer::from_slice(&lhs, &[tokens, k]).unwrap();
                    let rb = Buffer::from_slice(&rhs, &[tokens, k]).unwrap();
                    let (l, r) = (Some(&lb), Some(&rb));
                    let mut y = poisoned(xdt, &[tokens, k, m, out_dim]);
                    ops::gather_qmm_into(&mut enc, &x, &w, l, r, transpose, sorted, &mut y)
                        .unwrap();
                    let y2 = ops::gather_qmm(&mut enc, &x, &w, l, r, transpose, sorted).unwrap();
                    assert_eq!(y2.bytes(), y.bytes(), "{mode}: into vs allocating");
                    let got = got_f64(&y);
                    let xs = x_f64(&x);
                    for p in 0..tokens * k {
                        let (t, e) = (lhs[p] as usize, rhs[p] as usize);
                        let view = w.expert(e).unwrap();
                        let wd = dequantize_f64(&view).unwrap();
                        let xt = &xs[t * m * in_dim..(t + 1) * m * in_dim];
                        let want = matmul_f64(xt, m, &wd, rows, cols, transpose);
                        let got_p = &got[p * m * out_dim..(p + 1) * m * out_dim];
                        let err = max_rel_err(got_p, &want);
                        assert!(
                            err <= tolerance(xdt),
                            "{mode} {xdt} transpose {transpose} pair {p}: {err:e}"
                        );
                        let xv = x
                            .view(t * m * in_dim * xdt.size(), xdt, &[m, in_dim])
                            .unwrap();
                        let single =
                            ops::quantized_matmul(&mut enc, &xv, &view, transpose).unwrap();
                        // Within the tolerance, not bit for bit: gather_qmm runs each
                        // expert's tokens together, and the decode kernels' summation order
                        // depends on the rows they share (`avx512` splits one row's sums two
                        // ways), as for the affine kernels.
                        let vs_single = max_rel_err(got_p, &got_f64(&single));
                        assert!(
                            vs_single <= tolerance(xdt),
                            "{mode} pair {p}: gather vs the single matmul {vs_single:e}"
                        );
                    }
                }
            }
        }
    }
}

/// `v` as f64.
fn f64s(b: &Buffer) -> Vec<f64> {
    b.to_f32_vec().unwrap().into_iter().map(f64::from).collect()
}

/// Normwise error of `got` against `want` where both are finite; they must be NaN at the same
/// positions (MLX 0.32.4 and the oracle read E4M3FN's 0x7f as NaN), and nothing infinite.
fn err_where_finite(got: &[f64], want: &[f64]) -> Result<f64, String> {
    let (mut gf, mut wf) = (Vec::new(), Vec::new());
    for (i, (&a, &b)) in got.iter().zip(want).enumerate() {
        match (a.is_nan(), b.is_nan()) {
            (false, false) if a.is_finite() && b.is_finite() => {
                gf.push(a);
                wf.push(b);
            }
            (true, true) => {}
            _ => return Err(format!("element {i}: {a} against {b}")),
        }
    }
    Ok(max_rel_err(&gf, &wf))
}

/// The oracle of one fixture case: x · W(ᵀ) per pair of (lhs, rhs) indices (one pair, 0 and 0,
/// for a plain matmul), each `m × out_dim`, concatenated.
fn fixture_oracle(
    x: &Buffer,
    w: &QuantizedWeight,
    pairs: &[(usize, usize)],
    transpose: bool,
) -> Vec<f64> {
    let (rows, cols) = (w.rows(), w.cols());
    let in_dim = if transpose { cols } else { rows };
    let xs = f64s(x);
    let m = x.shape()[x.ndim() - 2];
    let wd = dequantize_f64(w).unwrap();
    let mut out = Vec::new();
    for &(l, r) in pairs {
        let xl = &xs[l * m * in_dim..(l + 1) * m * in_dim];
        let wr = &wd[r * rows * cols..(r + 1) * rows * cols];
        out.extend(matmul_f64(xl, m, wr, rows, cols, transpose));
    }
    out
}

/// Every FP configuration of MLX's CPU matmul fixtures: quantized_matmul (both transposes) and
/// gather_qmm (both transposes) against MLX 0.32.4's results and against the oracle of MLX's
/// weights, all at the conformance tolerances; except that against MLX's bfloat16 results the
/// tolerance adds MLX's own error (its CPU matmul accumulates in x's dtype: its bfloat16
/// results are up to ~1.7e-2 from the exact product, where mlxq's, accumulated in f32, are
/// within ~3e-3; float16 keeps MLX within ~1.5e-3, float32 within ~1e-7).
#[test]
fn fp_matmuls_match_mlx_cpu_fixtures() {
    let dir = common::flavour_dir(Flavour::Cpu);
    let device = Device::cpu();
    let mut enc = device.encoder();
    let (mut checked, mut nan_cases) = (0, 0);
    let mut failures = Vec::new();
    for dtype in ["float32", "float16", "bfloat16"] {
        for mode in MODES {
            let spec = spec(mode);
            let tag = format!("{dtype}_{mode}_b{}_g{}", spec.bits(), spec.group_size());
            let t = common::load_safetensors(&dir.join(format!("{tag}.qmm.safetensors")));
            let get = |k: &str| {
                t.get(k)
                    .unwrap_or_else(|| panic!("{tag}: no tensor {k}"))
                    .clone()
            };
            for case in ["qmm_t", "qmm_n", "gather_t", "gather_n"] {
                let x = get(&format!("{case}.x"));
                let w = QuantizedWeight::new(
                    get(&format!("{case}.w")),
                    get(&format!("{case}.scales")),
                    None,
                    spec,
                )
                .unwrap_or_else(|e| panic!("{tag} {case}: MLX's tensors rejected: {e}"));
                let mlx = get(&format!("{case}.out"));
                assert_eq!(x.dtype().name(), dtype);
                let transpose = case.ends_with("_t");
                let (got, pairs) = if case.starts_with("qmm") {
                    let y = ops::quantized_matmul(&mut enc, &x, &w, transpose).unwrap();
                    (y, vec![(0, 0)])
                } else {
                    let (l, r) = (get(&format!("{case}.lhs")), get(&format!("{case}.rhs")));
                    let mut y = poisoned(x.dtype(), mlx.shape());
                    let (li, ri) = (Some(&l), Some(&r));
                    ops::gather_qmm_into(&mut enc, &x, &w, li, ri, transpose, false, &mut y)
                        .unwrap();
                    let (l, r) = (l.to_vec::<u32>().unwrap(), r.to_vec::<u32>().unwrap());
                    let pairs = l.iter().zip(&r).map(|(&a, &b)| (a as usize, b as usize));
                    (y, pairs.collect())
                };
                assert_eq!((got.dtype(), got.shape()), (mlx.dtype(), mlx.shape()));
                let (got, mlx) = (f64s(&got), f64s(&mlx));
                let exact = fixture_oracle(&x, &w, &pairs, transpose);
                if mlx.iter().any(|v| v.is_nan()) {
                    nan_cases += 1;
                }
                checked += 1;
                let tol = tolerance(x.dtype());
                let errs = (
                    err_where_finite(&got, &mlx),
                    err_where_finite(&got, &exact),
                    err_where_finite(&mlx, &exact),
                );
                match errs {
                    (Ok(vs_mlx), Ok(vs_exact), Ok(mlx_err)) => {
                        let mlx_tol = if x.dtype() == DType::BF16 {
                            tol + mlx_err
                        } else {
                            tol
                        };
                        if vs_mlx > mlx_tol || vs_exact > tol {
                            failures.push(format!(
                                "{tag} {case}: against MLX {vs_mlx:e} (MLX's own error \
                                 {mlx_err:e}), against the oracle {vs_exact:e}"
                            ));
                        }
                    }
                    e => failures.push(format!("{tag} {case}: {e:?}")),
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {checked} cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert_eq!(checked, 3 * 3 * 4);
    // float32 mxfp8 and nvfp4 qmm_t hold a NaN code (element 0x7f, scale 0x7f).
    assert_eq!(nan_cases, 2);
}
