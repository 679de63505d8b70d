//! quantized_matmul and gather_qmm against the f64 reference of the dequantized weights.
//!
//! Tolerances (normwise relative error, `reference::max_rel_err`): 1e-5 when the output is
//! f32 (x is widened exactly, so only f32 accumulation errs), 1e-2 when the output is f16/bf16.
//! Outputs are poisoned with NaN first, so an element a kernel forgets to write fails the test.

mod common;

use common::{got_f64, poisoned, randn, tolerance, x_f64};
use mlxq::quant::pack::pack_row;
use mlxq::reference::{dequantize_f64, matmul_f64, max_rel_err};
use mlxq::{ops, Buffer, CommandEncoder, DType, Device, Flavour, QuantSpec, QuantizedWeight};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const BITS: [u32; 7] = [1, 2, 3, 4, 5, 6, 8];
const GROUPS: [u32; 3] = [32, 64, 128];
const FLOATS: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

/// A random quantized weight `[..batch, rows, cols]` with scales of `dtype`.
fn random_weight(
    enc: &mut CommandEncoder,
    rng: &mut StdRng,
    shape: &[usize],
    spec: QuantSpec,
    dtype: DType,
) -> QuantizedWeight {
    let n = shape.iter().product();
    let w = Buffer::from_f32(&randn(rng, n), dtype, shape).unwrap();
    ops::quantize(enc, &w, spec, Flavour::Gpu).unwrap()
}

/// The registry key of an affine quantized matmul: `dts` are x, scales and output.
fn qmm_key(
    bits: u32,
    g: u32,
    dts: (DType, DType, DType),
    transpose: bool,
    variant: &'static str,
) -> mlxq::registry::KernelKey {
    mlxq::registry::KernelKey {
        op: mlxq::registry::OpKind::QuantizedMatmul,
        mode: mlxq::QuantMode::Affine,
        bits,
        group_size: g,
        input: dts.0,
        scales: dts.1,
        output: dts.2,
        flag: transpose,
        variant,
    }
}

/// The variants held to the conformance tolerances (all but the opt-in approximate ones).
fn exact_variants() -> impl Iterator<Item = &'static &'static str> {
    mlxq::backend::cpu::VARIANTS
        .iter()
        .filter(|v| !mlxq::backend::cpu::APPROXIMATE.contains(v))
}

#[test]
fn matmul_sweep_bits_groups_dtypes_transposes_and_odd_shapes() {
    for variant in exact_variants() {
        // The blocked GEMMs take over from 8 rows (17 where `avx512vnni` applies, except for
        // `avx512bf16gemm`, which takes bf16 x from 8 rows; on AVX2, 17
        // where `avx2i16` applies, else 6; `amx` from 16 or 32, below which `avx512gemm`
        // runs): rows around their 8- (6-) row tiles, around the hand-over and past whole
        // tiles; fewer rows run the kernels handed to, under their name.
        let ms: &[usize] = if *variant == "avx512gemm" || *variant == "amx" {
            &[1, 2, 8, 9, 16, 17, 33, 128, 130]
        } else if *variant == "avx512bf16gemm" {
            &[1, 7, 8, 9, 17, 33, 130]
        } else if *variant == "avx2gemm" {
            &[1, 5, 6, 7, 16, 17, 33, 130]
        } else {
            &[1, 2, 7, 16, 33]
        };
        sweep(variant, ms);
    }
}

/// The sweep with `variant` preferred over rows of x `ms`; checks that it ran wherever it
/// applies.
fn sweep(variant: &'static str, ms: &[usize]) {
    let device = Device::cpu_with_variant(variant).unwrap();
    let mut enc = device.encoder();
    let mut rng = StdRng::seed_from_u64(11);
    let (mut cases, mut skipped) = (0, 0);
    let mut failures = Vec::new();
    for bits in BITS {
        for g in GROUPS {
            let spec = QuantSpec::affine(bits, g).unwrap();
            for (i, &sdt) in FLOATS.iter().enumerate() {
                for transpose in [true, false] {
                    // Quantized axis: two groups plus one; the other axis deliberately odd.
                    let (qdim, odd) = (3 * g as usize, [13usize, 37, 5][i]);
                    // W is [N, K] (transpose) or [K, N]: either way the odd axis is rows.
                    let (rows, cols) = (odd, qdim);
                    let w = random_weight(&mut enc, &mut rng, &[rows, cols], spec, sdt);
                    let wd = dequantize_f64(&w).unwrap();
                    let in_dim = if transpose { cols } else { rows };
                    for &xdt in &FLOATS {
                        let out_dt = xdt.promote(sdt).unwrap();
                        let key = qmm_key(bits, g, (xdt, sdt, out_dt), transpose, variant);
                        let expect = if mlxq::backend::cpu::supports(variant, &key) {
                            variant
                        } else {
                            "generic"
                        };
                        for &m in ms {
                            // Where the variant does not apply on this CPU it runs `generic`, which has
                            // its own sweep: the fall-back is checked at the first M only.
                            if expect != variant && m != ms[0] {
                                skipped += 1;
                                continue;
                            }
                            let x =
                                Buffer::from_f32(&randn(&mut rng, m * in_dim), xdt, &[m, in_dim])
                                    .unwrap();
                            let out_dim = if transpose { rows } else { cols };
                            let mut y = poisoned(out_dt, &[m, out_dim]);
                            ops::quantized_matmul_into(&mut enc, &x, &w, transpose, &mut y)
                                .unwrap();
                            let want = matmul_f64(&x_f64(&x), m, &wd, rows, cols, transpose);
                            let err = max_rel_err(&got_f64(&y), &want);
                            let ran = enc.last_kernel().unwrap().to_owned();
                            // The GEMMs hand calls of fewer than 8 (17 with VNNI; on AVX2, 17
                            // to `avx2i16`, else 6) rows to a decode kernel, and the encoder
                            // records the kernel that ran (`avx512bf16gemm`: to `avx512vnni`
                            // below 17 rows, else to `avx512bf16` below 8).
                            let handed_down = (expect == "avx512gemm"
                                && m < 17
                                && ["avx512vnni", "avx512bf16", "avx512"]
                                    .iter()
                                    .any(|v| ran.ends_with(&format!("_{v}"))))
                                || (expect == "amx"
                                    && m < 32
                                    && [
                                        "avx512vnni",
                                        "amx-dec",
                                        "avx512bf16",
                                        "avx512",
                                        "avx512gemm",
                                    ]
                                    .iter()
                                    .any(|v| ran.ends_with(&format!("_{v}"))))
                                || (expect == "avx512bf16gemm"
                                    && ((m < 17 && ran.ends_with("_avx512vnni"))
                                        || (m < 8 && ran.ends_with("_avx512bf16"))))
                                || (expect == "avx2gemm" && m < 6 && ran.ends_with("_avx2"))
                                || (expect == "avx2gemm" && m < 17 && ran.ends_with("_avx2i16"));
                            assert!(
                                ran.ends_with(expect) || handed_down,
                                "{ran} ran, expected the {expect} variant"
                            );
                            cases += 1;
                            if err > tolerance(out_dt) {
                                failures.push(format!(
                                    "{ran}: bits {bits} g {g} scales {sdt} x {xdt} transpose {transpose} m {m}: err {err:e}"
                                ));
                            }
                        }
                    }
                }
            }
        }
    }
    enc.commit_and_wait().unwrap();
    if skipped > 0 {
        println!("{variant}: {skipped} cases skipped (generic here, and swept on its own)");
    }
    assert!(
        failures.is_empty(),
        "{} of {cases} cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert_eq!(cases + skipped, 7 * 3 * 3 * 2 * 3 * ms.len());
}

/// The decode step at M = 1 on rows of many groups, every width, through the VNNI kernel's
/// one-column loop (superblocks two at a time where it pairs them, the scales and biases
/// prefetched): rows of 8, 24 and 40 groups (one, two and three blocks of up to 16 groups,
/// the last of 8: whole pairs of superblocks), 52 (a last single superblock) and 53 (then a
/// partial one of one group), which the sweep's rows of three groups never reach. Random
/// bf16 data against the f64 oracle, a poisoned output, the kernel that ran named.
#[test]
fn decode_m1_long_rows_every_width() {
    let device = Device::cpu();
    let mut enc = device.encoder();
    let mut rng = StdRng::seed_from_u64(28);
    let mut failures = Vec::new();
    for bits in BITS {
        for g in GROUPS {
            let spec = QuantSpec::affine(bits, g).unwrap();
            for groups in [8usize, 24, 40, 52, 53] {
                let (n, k) = (21, groups * g as usize);
                let w = random_weight(&mut enc, &mut rng, &[n, k], spec, DType::BF16);
                let wd = dequantize_f64(&w).unwrap();
                let x = Buffer::from_f32(&randn(&mut rng, k), DType::BF16, &[1, k]).unwrap();
                let mut y = poisoned(DType::BF16, &[1, n]);
                ops::quantized_matmul_into(&mut enc, &x, &w, true, &mut y).unwrap();
                let want = matmul_f64(&x_f64(&x), 1, &wd, n, k, true);
                let err = max_rel_err(&got_f64(&y), &want);
                let ran = enc.last_kernel().unwrap().to_owned();
                if err > tolerance(DType::BF16) {
                    failures.push(format!(
                        "{ran}: bits {bits} g {g} groups {groups}: err {err:e}"
                    ));
                }
            }
        }
    }
    enc.commit_and_wait().unwrap();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn output_dtype_and_shape_follow_mlx() {
    let device = Device::cpu();
    let mut enc = device.encoder();
    let mut rng = StdRng::seed_from_u64(3);
    let spec = QuantSpec::affine(4, 32).unwrap();
    let w = random_weight(&mut enc, &mut rng, &[9, 64], spec, DType::BF16);
    // f16 x with bf16 scales promotes to f32; leading dims of x are kept.
    let x = Buffer::from_f32(&randn(&mut rng, 2 * 3 * 64), DType::F16, &[2, 3, 64]).unwrap();
    let y = ops::quantized_matmul(&mut enc, &x, &w, true).unwrap();
    assert_eq!((y.shape(), y.dtype()), (&[2, 3, 9][..], DType::F32));
    // 1-D x gives a 1-D output.
    let x1 = Buffer::from_f32(&randn(&mut rng, 64), DType::BF16, &[64]).unwrap();
    let y1 = ops::quantized_matmul(&mut enc, &x1, &w, true).unwrap();
    assert_eq!((y1.shape(), y1.dtype()), (&[9][..], DType::BF16));
    let want = matmul_f64(&x_f64(&x1), 1, &dequantize_f64(&w).unwrap(), 9, 64, true);
    assert!(max_rel_err(&got_f64(&y1), &want) < 1e-2);
    assert!(enc.last_kernel().unwrap().contains("QuantizedMatmul"));
}

#[test]
fn batched_weights_broadcast_with_x() {
    let device = Device::cpu();
    let mut enc = device.encoder();
    let mut rng = StdRng::seed_from_u64(5);
    for transpose in [true, false] {
        let spec = QuantSpec::affine(3, 32).unwrap();
        let (rows, cols) = if transpose { (11, 64) } else { (19, 64) };
        let w = random_weight(&mut enc, &mut rng, &[3, rows, cols], spec, DType::F32);
        let in_dim = if transpose { cols } else { rows };
        let out_dim = if transpose { rows } else { cols };
        // x batch [2, 1] against W batch [3] broadcasts to [2, 3].
        let m = 4;
        let x = Buffer::from_f32(
            &randn(&mut rng, 2 * m * in_dim),
            DType::F32,
            &[2, 1, m, in_dim],
        )
        .unwrap();
        let y = ops::quantized_matmul(&mut enc, &x, &w, transpose).unwrap();
        assert_eq!(y.shape(), &[2, 3, m, out_dim]);
        let got = got_f64(&y);
        let xs = x_f64(&x);
        for b in 0..2 {
            for e in 0..3 {
                let wd = dequantize_f64(&w.expert(e).unwrap()).unwrap();
                let want = matmul_f64(
                    &xs[b * m * in_dim..(b + 1) * m * in_dim],
                    m,
                    &wd,
                    rows,
                    cols,
                    transpose,
                );
                let at = (b * 3 + e) * m * out_dim;
                let err = max_rel_err(&got[at..at + m * out_dim], &want);
                assert!(
                    err < 1e-5,
                    "transpose {transpose} batch {b} expert {e}: {err:e}"
                );
            }
        }
    }
}

#[test]
fn expert_views_are_zero_copy_and_match_the_stack() {
    let device = Device::cpu();
    let mut enc = device.encoder();
    let mut rng = StdRng::seed_from_u64(8);
    let spec = QuantSpec::affine(6, 64).unwrap();
    let w = random_weight(&mut enc, &mut rng, &[4, 10, 128], spec, DType::BF16);
    let all = dequantize_f64(&w).unwrap();
    for e in 0..4 {
        let view = w.expert(e).unwrap();
        assert!(view.packed().shares_storage(w.packed()));
        assert_eq!(view.shape(), &[10, 128]);
        assert_eq!(
            dequantize_f64(&view).unwrap(),
            all[e * 1280..(e + 1) * 1280]
        );
    }
    assert!(w.expert(4).is_err());
}

/// MoE routing: T tokens × top-k experts, lhs = token, rhs = expert.
#[test]
fn gather_qmm_matches_reference_and_a_loop_of_matmuls() {
    let device = Device::cpu();
    let mut enc = device.encoder();
    let mut rng = StdRng::seed_from_u64(21);
    for (bits, g, xdt, transpose) in [
        (4, 64, DType::BF16, true),
        (8, 32, DType::F32, true),
        (3, 128, DType::F16, true),
        (5, 32, DType::F32, false),
        (1, 64, DType::BF16, false),
    ] {
        let spec = QuantSpec::affine(bits, g).unwrap();
        let (experts, rows, cols) = (6, 23, 2 * g as usize);
        let w = random_weight(&mut enc, &mut rng, &[experts, rows, cols], spec, xdt);
        let (in_dim, out_dim) = if transpose {
            (cols, rows)
        } else {
            (rows, cols)
        };
        let (tokens, k) = (7, 3);
        let x =
            Buffer::from_f32(&randn(&mut rng, tokens * in_dim), xdt, &[tokens, 1, in_dim]).unwrap();
        let lhs: Vec<u32> = (0..tokens * k).map(|i| (i / k) as u32).collect();
        let rhs: Vec<u32> = (0..tokens * k)
            .map(|_| rng.gen_range(0..experts as u32))
            .collect();
        for sorted in [false, true] {
            let (lhs, rhs) = if sorted {
                let mut pairs: Vec<(u32, u32)> =
                    lhs.iter().copied().zip(rhs.iter().copied()).collect();
                pairs.sort_by_key(|p| p.1);
                pairs.into_iter().unzip()
            } else {
                (lhs.clone(), rhs.clone())
            };
            let lb = Buffer::from_slice(&lhs, &[tokens, k]).unwrap();
            let rb = Buffer::from_slice(&rhs, &[tokens, k]).unwrap();
            let y =
                ops::gather_qmm(&mut enc, &x, &w, Some(&lb), Some(&rb), transpose, sorted).unwrap();
            assert_eq!(y.shape(), &[tokens, k, 1, out_dim]);
            assert_eq!(y.dtype(), xdt);
            // Into a caller's NaN-poisoned output: every element written, the same bits.
            let mut into = Buffer::from_f32(&vec![f32::NAN; y.numel()], xdt, y.shape()).unwrap();
            let (l, r) = (Some(&lb), Some(&rb));
            ops::gather_qmm_into(&mut enc, &x, &w, l, r, transpose, sorted, &mut into).unwrap();
            assert_eq!(into.bytes(), y.bytes(), "bits {bits}: into");
            let got = got_f64(&y);
            let xs = x_f64(&x);
            for i in 0..tokens * k {
                let (t, e) = (lhs[i] as usize, rhs[i] as usize);
                let view = w.expert(e).unwrap();
                let wd = dequantize_f64(&view).unwrap();
                let want = matmul_f64(
                    &xs[t * in_dim..(t + 1) * in_dim],
                    1,
                    &wd,
                    rows,
                    cols,
                    transpose,
                );
                let got_i = &got[i * out_dim..(i + 1) * out_dim];
                let err = max_rel_err(got_i, &want);
                assert!(err < tolerance(xdt), "bits {bits} pair {i}: {err:e}");
                // The same product through quantized_matmul on the zero-copy expert view.
                let xt = x.view(t * in_dim * xdt.size(), xdt, &[1, in_dim]).unwrap();
                let single =
                    got_f64(&ops::quantized_matmul(&mut enc, &xt, &view, transpose).unwrap());
                assert!(
                    max_rel_err(got_i, &single) <= tolerance(xdt),
                    "pair {i} vs single matmul"
                );
            }
        }
    }
}

/// Prefill through MoE: many tokens per expert, so each expert's rows (~128) run the blocked
/// GEMMs (`amx` from 16 or 32 rows); every variant, against the oracle, into NaN-free outputs.
#[test]
fn gather_qmm_many_tokens_per_expert_every_variant() {
    let mut rng = StdRng::seed_from_u64(77);
    for variant in exact_variants() {
        let device = Device::cpu_with_variant(variant).unwrap();
        let mut enc = device.encoder();
        for (bits, g, xdt) in [
            (4, 64, DType::BF16),
            (8, 32, DType::F32),
            (3, 128, DType::F16),
        ] {
            let key = qmm_key(bits, g, (xdt, xdt, xdt), true, variant);
            // Where the variant does not apply on this CPU it runs `generic`, checked on its own (the
            // sweep above checks the fall-back).
            if *variant != "generic" && !mlxq::backend::cpu::supports(variant, &key) {
                println!("{variant} bits {bits}: skipped (generic here)");
                continue;
            }
            let spec = QuantSpec::affine(bits, g).unwrap();
            let (experts, rows, cols, tokens, k) = (4, 29, 3 * g as usize, 256, 2);
            let w = random_weight(&mut enc, &mut rng, &[experts, rows, cols], spec, xdt);
            let x =
                Buffer::from_f32(&randn(&mut rng, tokens * cols), xdt, &[tokens, 1, cols]).unwrap();
            let lhs: Vec<u32> = (0..tokens * k).map(|i| (i / k) as u32).collect();
            let rhs: Vec<u32> = (0..tokens * k)
                .map(|_| rng.gen_range(0..experts as u32))
                .collect();
            let lb = Buffer::from_slice(&lhs, &[tokens, k]).unwrap();
            let rb = Buffer::from_slice(&rhs, &[tokens, k]).unwrap();
            let y = ops::gather_qmm(&mut enc, &x, &w, Some(&lb), Some(&rb), true, false).unwrap();
            let ran = enc.last_kernel().unwrap().to_owned();
            assert!(
                ran.ends_with(variant) || ran.ends_with("generic"),
                "{ran} ran, preferring {variant}"
            );
            // The blocked GEMM must run its experts' rows wherever this CPU has it (AVX-512).
            if *variant == "avx512gemm" || *variant == "amx" {
                assert!(ran.ends_with(*variant), "{ran} ran");
            }
            let got = got_f64(&y);
            let xs = x_f64(&x);
            for i in 0..tokens * k {
                let (t, e) = (lhs[i] as usize, rhs[i] as usize);
                let wd = dequantize_f64(&w.expert(e).unwrap()).unwrap();
                let want = matmul_f64(&xs[t * cols..(t + 1) * cols], 1, &wd, rows, cols, true);
                let err = max_rel_err(&got[i * rows..(i + 1) * rows], &want);
                assert!(
                    err < tolerance(xdt),
                    "{variant} bits {bits} pair {i}: {err:e}"
                );
            }
        }
    }
}

#[test]
fn gather_qmm_default_and_broadcast_indices() {
    let device = Device::cpu();
    let mut enc = device.encoder();
    let mut rng = StdRng::seed_from_u64(4);
    let spec = QuantSpec::affine(4, 32).unwrap();
    let w = random_weight(&mut enc, &mut rng, &[3, 8, 64], spec, DType::F32);
    let x = Buffer::from_f32(&randn(&mut rng, 3 * 2 * 64), DType::F32, &[3, 2, 64]).unwrap();
    // No indices: lhs = arange(3), rhs = arange(3): x[i] · W[i]ᵀ, as a batched matmul.
    let y = ops::gather_qmm(&mut enc, &x, &w, None, None, true, false).unwrap();
    let yb = ops::quantized_matmul(&mut enc, &x, &w, true).unwrap();
    assert_eq!(y.shape(), &[3, 2, 8]);
    assert!(max_rel_err(&got_f64(&y), &got_f64(&yb)) < 1e-6);
    // lhs [2, 1] against rhs [1, 3] broadcasts to [2, 3].
    let lb = Buffer::from_slice(&[2u32, 0], &[2, 1]).unwrap();
    let rb = Buffer::from_slice(&[1i32, 2, 0], &[1, 3]).unwrap();
    let y = ops::gather_qmm(&mut enc, &x, &w, Some(&lb), Some(&rb), true, false).unwrap();
    assert_eq!(y.shape(), &[2, 3, 2, 8]);
    let got = got_f64(&y);
    let xs = x_f64(&x);
    for (a, &l) in [2usize, 0].iter().enumerate() {
        for (b, &r) in [1usize, 2, 0].iter().enumerate() {
            let wd = dequantize_f64(&w.expert(r).unwrap()).unwrap();
            let want = matmul_f64(&xs[l * 128..(l + 1) * 128], 2, &wd, 8, 64, true);
            let at = (a * 3 + b) * 16;
            assert!(max_rel_err(&got[at..at + 16], &want) < 1e-5);
        }
    }
}

/// Packs `codes` (rows × cols, cols a multiple of 8) into a uint32 buffer.
fn packed(codes: &[u8], rows: usize, cols: usize, bits: u32) -> Buffer {
    let row_bytes = cols * bits as usize / 8;
    let mut bytes = vec![0u8; rows * row_bytes];
    for (c, b) in codes.chunks(cols).zip(bytes.chunks_mut(row_bytes)) {
        assert!(pack_row(bits, c, b));
    }
    Buffer::from_bytes(&bytes, DType::U32, &[rows, row_bytes / 4]).unwrap()
}

/// The reference system's known small answers. Its examples use K = 4 with a group of 64, a
/// partial group MLX does not allow; padding the codes with zeros and x with zero inputs to a
/// whole group keeps every answer. Its scales are bf16, so answers hold to bf16 precision.
#[test]
fn reference_system_known_answers() {
    let device = Device::cpu();
    let mut enc = device.encoder();
    struct Case {
        bits: u32,
        m: usize,
        x: Vec<f32>,
        codes: Vec<Vec<u8>>,
        scales: Vec<f32>,
        biases: Vec<f32>,
        want: Vec<f64>,
    }
    let cases = [
        Case {
            bits: 4,
            m: 1,
            x: vec![1., 2., 3., 4.],
            codes: vec![vec![1, 2, 3, 4], vec![5, 6, 7, 8]],
            scales: vec![0.1, 0.2],
            biases: vec![0., 0.],
            want: vec![3.0, 14.0],
        },
        Case {
            bits: 6,
            m: 1,
            x: vec![1., 2., 3., 4.],
            codes: vec![vec![1, 2, 3, 4], vec![10, 20, 30, 40]],
            scales: vec![0.1, 0.05],
            biases: vec![0., 0.],
            want: vec![3.0, 15.0],
        },
        Case {
            bits: 8,
            m: 1,
            x: vec![1., 2., 3., 4.],
            codes: vec![vec![10, 20, 30, 40], vec![50, 60, 70, 80]],
            scales: vec![0.01, 0.02],
            biases: vec![0., 0.],
            want: vec![3.0, 14.0],
        },
        Case {
            bits: 4,
            m: 1,
            x: vec![1., 1., 1., 1.],
            codes: vec![vec![0, 0, 0, 0]],
            scales: vec![1.0],
            biases: vec![0.5],
            want: vec![2.0],
        },
        Case {
            bits: 8,
            m: 1,
            x: vec![1., 1., 1., 1.],
            codes: vec![vec![0, 0, 0, 0]],
            scales: vec![1.0],
            biases: vec![0.5],
            want: vec![2.0],
        },
        Case {
            bits: 4,
            m: 2,
            x: vec![1., 0., 0., 0., 0., 1., 0., 0.],
            codes: vec![vec![2, 4, 6, 8]],
            scales: vec![0.5],
            biases: vec![0.],
            want: vec![1.0, 2.0],
        },
    ];
    let k = 64;
    for c in cases {
        let n = c.codes.len();
        let mut codes = vec![0u8; n * k];
        for (r, row) in c.codes.iter().enumerate() {
            codes[r * k..r * k + 4].copy_from_slice(row);
        }
        let mut x = vec![0f32; c.m * k];
        for r in 0..c.m {
            x[r * k..r * k + 4].copy_from_slice(&c.x[r * 4..r * 4 + 4]);
        }
        // A bias only on the four real inputs: padded x entries are 0, so padding adds nothing.
        let w = QuantizedWeight::new(
            packed(&codes, n, k, c.bits),
            Buffer::from_f32(&c.scales, DType::BF16, &[n, 1]).unwrap(),
            Some(Buffer::from_f32(&c.biases, DType::BF16, &[n, 1]).unwrap()),
            QuantSpec::affine(c.bits, 64).unwrap(),
        )
        .unwrap();
        let xb = Buffer::from_slice(&x, &[c.m, k]).unwrap();
        let y = ops::quantized_matmul(&mut enc, &xb, &w, true).unwrap();
        let got = got_f64(&y);
        let exact = matmul_f64(
            &x.iter().map(|&v| f64::from(v)).collect::<Vec<_>>(),
            c.m,
            &dequantize_f64(&w).unwrap(),
            n,
            k,
            true,
        );
        let want = &c.want;
        assert!(
            max_rel_err(&got, &exact) < 1e-6,
            "bits {}: {got:?} vs exact {exact:?}",
            c.bits
        );
        // bf16 scales (0.1 → 0.10009765625) move the answers by at most 0.4%.
        assert!(
            max_rel_err(&got, want) < 4e-3,
            "bits {}: {got:?} vs known {want:?}",
            c.bits
        );
    }
    // Several groups along K: codes 1 then 2, scales 0.5 then 1.0, x = 1: 64·0.5 + 64·2 = 160.
    let mut codes = vec![1u8; 128];
    codes[64..].fill(2);
    let w = QuantizedWeight::new(
        packed(&codes, 1, 128, 4),
        Buffer::from_f32(&[0.5, 1.0], DType::BF16, &[1, 2]).unwrap(),
        Some(Buffer::from_f32(&[0.0, 0.0], DType::BF16, &[1, 2]).unwrap()),
        QuantSpec::affine(4, 64).unwrap(),
    )
    .unwrap();
    let y = ops::quantized_matmul(
        &mut enc,
        &Buffer::from_slice(&[1f32; 128], &[1, 128]).unwrap(),
        &w,
        true,
    )
    .unwrap();
    assert_eq!(y.to_vec::<f32>().unwrap(), vec![160.0]);
}

/// Accumulation is f32 even for bf16 x: at K = 4096 a bf16 accumulator (MLX CPU/CUDA qmv)
/// errs by up to ~10%; ours must stay within the bf16 output rounding.
#[test]
fn bf16_long_rows_accumulate_in_f32() {
    let device = Device::cpu();
    let mut enc = device.encoder();
    let mut rng = StdRng::seed_from_u64(99);
    let spec = QuantSpec::affine(4, 64).unwrap();
    let w = random_weight(&mut enc, &mut rng, &[64, 4096], spec, DType::BF16);
    let x = Buffer::from_f32(&randn(&mut rng, 4096), DType::BF16, &[1, 4096]).unwrap();
    let y = ops::quantized_matmul(&mut enc, &x, &w, true).unwrap();
    let want = matmul_f64(&x_f64(&x), 1, &dequantize_f64(&w).unwrap(), 64, 4096, true);
    let err = max_rel_err(&got_f64(&y), &want);
    assert!(err < 4e-3, "{err:e}");
}

/// Whether `variant` runs the bf16 transposed matmul of `bits`/`g` on this CPU (`generic`
/// always does); prints why a case is skipped where it does not.
fn runs_bf16_decode(variant: &'static str, bits: u32, g: u32) -> bool {
    let dts = (DType::BF16, DType::BF16, DType::BF16);
    let runs = variant == "generic"
        || mlxq::backend::cpu::supports(variant, &qmm_key(bits, g, dts, true, variant));
    if !runs {
        println!("{variant} bits {bits}: skipped (generic here)");
    }
    runs
}

/// `x · wᵀ` (w `[n, k]`) into a poisoned output of w's scale dtype, against the f64 oracle
/// at that dtype's tolerance; `what` names the case in a failure.
fn check_transposed(enc: &mut CommandEncoder, x: &Buffer, w: &QuantizedWeight, what: &str) {
    let (m, k, n) = (x.shape()[0], x.shape()[1], w.rows());
    let out = w.scales_dtype();
    let mut y = poisoned(out, &[m, n]);
    ops::quantized_matmul_into(enc, x, w, true, &mut y).unwrap();
    let want = matmul_f64(&x_f64(x), m, &dequantize_f64(w).unwrap(), n, k, true);
    let err = max_rel_err(&got_f64(&y), &want);
    assert!(
        err < tolerance(out),
        "{what} {out:?} out: {err:e} ({})",
        enc.last_kernel().unwrap()
    );
}

/// One row of x on both sides of the decode's switch between one weight row per step (K up to
/// 8192) and two side by side (longer K), with an odd N so the two-column walk ends on one
/// column: every variant, a few widths and groups, bf16 and f32 outputs. K = 896 (14 groups of
/// 64, 28 of 32) ends a row on an odd full superblock and then a partial one (groups of 64),
/// after the pairs of superblocks `avx512vnni` takes together at M = 1.
#[test]
fn one_row_short_and_long_k_every_variant() {
    let mut rng = StdRng::seed_from_u64(321);
    for variant in exact_variants() {
        let device = Device::cpu_with_variant(variant).unwrap();
        let mut enc = device.encoder();
        for (bits, g) in [(4, 64), (8, 128), (3, 32), (2, 64)] {
            if !runs_bf16_decode(variant, bits, g) {
                continue;
            }
            let spec = QuantSpec::affine(bits, g).unwrap();
            // 8192 is the longest one-column K; 8448 = 66 × 128 the shortest two-column one
            // that every group size divides.
            for k in [896usize, 4096, 8192, 8448] {
                let n = 37;
                let x = Buffer::from_f32(&randn(&mut rng, k), DType::BF16, &[1, k]).unwrap();
                for sdt in [DType::BF16, DType::F32] {
                    let w = random_weight(&mut enc, &mut rng, &[n, k], spec, sdt);
                    check_transposed(
                        &mut enc,
                        &x,
                        &w,
                        &format!("{variant} bits {bits} g {g} k {k}"),
                    );
                }
            }
        }
    }
}

/// Long rows with many rows of x: kernels that block K (so x stays in cache) must stitch the
/// blocks together; checked for every variant, with a tail block (K = 2688).
#[test]
fn long_rows_many_rows_every_variant() {
    let mut rng = StdRng::seed_from_u64(123);
    for variant in exact_variants() {
        let device = Device::cpu_with_variant(variant).unwrap();
        let mut enc = device.encoder();
        for (bits, g) in [(4, 64), (3, 128), (8, 32), (6, 64)] {
            if !runs_bf16_decode(variant, bits, g) {
                continue;
            }
            let spec = QuantSpec::affine(bits, g).unwrap();
            let (n, k, m) = (21, 2688, 33); // 2688 = 21 × 128: blocks of 1024 leave a tail
            let x = Buffer::from_f32(&randn(&mut rng, m * k), DType::BF16, &[m, k]).unwrap();
            // bf16 output, then f32 (f32 scales): the tight tolerance.
            for sdt in [DType::BF16, DType::F32] {
                let w = random_weight(&mut enc, &mut rng, &[n, k], spec, sdt);
                check_transposed(&mut enc, &x, &w, &format!("{variant} bits {bits} g {g}"));
            }
        }
    }
}

/// The int8-activation variants (opt-in, [`mlxq::backend::cpu::APPROXIMATE`]).
const INT8_VARIANTS: [&str; 2] = ["avx512gemm-i8", "avx2gemm-i8"];

/// The largest |x̂| of `variant` for `bits`-bit codes, as its documentation states: 127, but
/// 63 for 8-bit codes on `avx2gemm-i8` (`vpmaddubsw` would saturate at 127).
fn int8_levels(variant: &str, bits: u32) -> i32 {
    if variant == "avx2gemm-i8" && bits == 8 {
        63
    } else {
        127
    }
}

/// Whether `variant` runs on this CPU (else prints why the test skips it).
fn int8_runs(variant: &'static str) -> bool {
    let bf16 = (DType::BF16, DType::BF16, DType::BF16);
    let ok = mlxq::backend::cpu::supports(variant, &qmm_key(4, 64, bf16, true, variant));
    if !ok {
        eprintln!("skipped {variant}: this CPU lacks its instructions");
    }
    ok
}

/// The int8-activation modes (opt-in): every width, group and dtype, M from 1 to 130, odd
/// N, a K-block tail, against the f64 oracle within the bound their documentation states:
/// per output, `Σ_blocks max|x_blk|/2L · Σ_{k∈blk} |w_k − b_group|` (half an int8 step of
/// each 32-value block of x, `L` = [`int8_levels`], against the weights without their
/// bias), plus the output dtype's rounding and f32 accumulation.
#[test]
fn int8_mode_within_its_stated_bound() {
    for variant in INT8_VARIANTS {
        if int8_runs(variant) {
            int8_within_bound(variant);
        }
    }
}

fn int8_within_bound(variant: &'static str) {
    let device = Device::cpu_with_variant(variant).unwrap();
    let mut enc = device.encoder();
    let mut rng = StdRng::seed_from_u64(808);
    let mut worst = 0f64;
    let mut inexact = 0;
    for bits in BITS {
        let levels = int8_levels(variant, bits);
        assert_eq!(
            mlxq::backend::cpu::int8_levels(variant, bits),
            Some(levels as u32),
            "{variant} {bits}-bit: the levels the library reports"
        );
        let step = 2.0 * f64::from(levels);
        for g in GROUPS {
            let spec = QuantSpec::affine(bits, g).unwrap();
            for (i, &dt) in FLOATS.iter().enumerate() {
                let (n, k) = (
                    [13usize, 37, 5][i],
                    if bits == 4 { 2688 } else { 3 * g as usize },
                );
                let w = random_weight(&mut enc, &mut rng, &[n, k], spec, dt);
                let wd = dequantize_f64(&w).unwrap();
                let b: Vec<f64> = w
                    .biases()
                    .unwrap()
                    .to_f32_vec()
                    .unwrap()
                    .into_iter()
                    .map(f64::from)
                    .collect();
                let groups = k / g as usize;
                for m in [1usize, 5, 7, 8, 9, 15, 33, 130] {
                    let x = Buffer::from_f32(&randn(&mut rng, m * k), dt, &[m, k]).unwrap();
                    let mut y = poisoned(dt, &[m, n]);
                    ops::quantized_matmul_into(&mut enc, &x, &w, true, &mut y).unwrap();
                    let ran = enc.last_kernel().unwrap().to_owned();
                    assert!(ran.ends_with(variant), "{ran} ran");
                    let xs = x_f64(&x);
                    let want = matmul_f64(&xs, m, &wd, n, k, true);
                    let got = got_f64(&y);
                    let norm = want.iter().fold(0f64, |a, v| a.max(v.abs()));
                    let u_out = match dt {
                        DType::BF16 => 2f64.powi(-8),
                        DType::F16 => 2f64.powi(-11),
                        _ => 0.0,
                    };
                    for r in 0..m {
                        for c in 0..n {
                            let mut bound = 0.0;
                            for blk in 0..k / 32 {
                                let xb = &xs[r * k + blk * 32..r * k + blk * 32 + 32];
                                let amax = xb.iter().fold(0f64, |a, v| a.max(v.abs()));
                                let j = blk * 32 / g as usize;
                                let wsum: f64 = (blk * 32..blk * 32 + 32)
                                    .map(|kk| (wd[c * k + kk] - b[c * groups + j]).abs())
                                    .sum();
                                bound += amax / step * wsum;
                            }
                            let (gv, wv) = (got[r * n + c], want[r * n + c]);
                            let err = (gv - wv).abs();
                            let allowed = bound * 1.001 + wv.abs() * u_out + 1e-5 * norm;
                            assert!(
                                err <= allowed,
                                "{variant} bits {bits} g {g} {dt} m {m} [{r},{c}]: |{gv} - {wv}| = {err:e} > {allowed:e}"
                            );
                            if bound > 0.0 {
                                worst = worst.max((err - wv.abs() * u_out).max(0.0) / bound);
                            }
                        }
                    }
                    if max_rel_err(&got, &want) > 1e-5 {
                        inexact += 1;
                    }
                }
            }
        }
    }
    eprintln!("{variant}: worst error / stated bound = {worst:.3}");
    // It is the approximate path: some results are off by more than the f32 tolerance.
    assert!(inexact > 0);
}

/// The int8 modes are exact up to f32 rounding when every block of x is already on their
/// int8 grid (integers in ±L with a ±L in each block of 32), and never run unless named.
/// The x rows include whole blocks at +L and at −L against codes at their maximum in most
/// places, the largest dot products the integer path must hold without saturating.
#[test]
fn int8_mode_exact_on_its_grid_and_opt_in_only() {
    let mut rng = StdRng::seed_from_u64(809);
    let default = Device::cpu();
    let (m, n, k) = (33, 21, 1152);
    for bits in BITS {
        let spec = QuantSpec::affine(bits, 32).unwrap();
        let top = (1u32 << bits) - 1;
        // Codes: the maximum but for a random one in eight; f32 scales and biases.
        let codes: Vec<u8> = (0..n * k)
            .map(|_| {
                if rng.gen_range(0..8) == 0 {
                    rng.gen_range(0..=top) as u8
                } else {
                    top as u8
                }
            })
            .collect();
        let groups = k / 32;
        let sc: Vec<f32> = (0..n * groups)
            .map(|_| rng.gen_range(0.5f32..2.0))
            .collect();
        let bi: Vec<f32> = (0..n * groups).map(|_| rng.gen_range(-1f32..1.0)).collect();
        let w = QuantizedWeight::new(
            packed(&codes, n, k, bits),
            Buffer::from_f32(&sc, DType::F32, &[n, groups]).unwrap(),
            Some(Buffer::from_f32(&bi, DType::F32, &[n, groups]).unwrap()),
            spec,
        )
        .unwrap();
        let wd = dequantize_f64(&w).unwrap();
        for variant in INT8_VARIANTS {
            let l = int8_levels(variant, bits);
            let xv: Vec<f32> = (0..m * k)
                .map(|i| match (i / k % 3, (i % k) / 32 % 4) {
                    // Row classes 0 and 1: whole blocks at +L or −L every fourth block.
                    (0, 1) => l as f32,
                    (1, 2) => -l as f32,
                    _ if i % 32 == 5 => l as f32,
                    _ => rng.gen_range(-l..=l) as f32,
                })
                .collect();
            let x = Buffer::from_f32(&xv, DType::F32, &[m, k]).unwrap();
            let want = matmul_f64(&x_f64(&x), m, &wd, n, k, true);
            let mut enc = default.encoder();
            let y = ops::quantized_matmul(&mut enc, &x, &w, true).unwrap();
            assert!(!enc.last_kernel().unwrap().ends_with("-i8"));
            assert!(max_rel_err(&got_f64(&y), &want) < 1e-5);
            let Ok(i8dev) = Device::cpu_with_variant(variant) else {
                panic!("{variant} is a known variant")
            };
            let mut enc = i8dev.encoder();
            let y = ops::quantized_matmul(&mut enc, &x, &w, true).unwrap();
            if enc.last_kernel().unwrap().ends_with(variant) {
                let err = max_rel_err(&got_f64(&y), &want);
                assert!(err < 1e-5, "{variant} bits {bits}: {err:e}");
            } else {
                assert!(!int8_runs(variant), "{variant} did not run");
            }
        }
    }
}
