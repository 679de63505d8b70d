//! The x86 kernels for `quantized_matmul` without transpose (`y = x·W`, W `[K, N]`
//! quantized along N; `avx512` and `avx2`, which share a driver) on realistic shapes:
//! thousands of rows of W, hundreds to a thousand columns, against the f64 reference of the
//! dequantized weights.
//!
//! Tolerances (normwise relative, `reference::max_rel_err`): 1e-5 for f32 output, 1e-2 for
//! f16/bf16. Outputs are poisoned with NaN first, so an element the kernel forgets to write
//! fails. Each variant is skipped, with a message, where the CPU lacks its features.

use mlxq::reference::{dequantize_f64, matmul_f64, max_rel_err};
use mlxq::registry::{KernelKey, OpKind};
use mlxq::{ops, Buffer, CommandEncoder, DType, Device, Flavour, QuantMode, QuantSpec};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The variants under test: AVX-512 (F/BW/VL/VBMI) and AVX2 (with FMA and F16C).
const VARIANTS: [&str; 2] = ["avx512", "avx2"];

/// Whether this CPU runs `variant`'s kernel (says so when not).
fn available(variant: &'static str) -> bool {
    let key = KernelKey {
        op: OpKind::QuantizedMatmul,
        mode: QuantMode::Affine,
        bits: 4,
        group_size: 64,
        input: DType::F32,
        scales: DType::F32,
        output: DType::F32,
        flag: false,
        variant,
    };
    let ok = mlxq::backend::cpu::supports(variant, &key);
    if !ok {
        eprintln!("skipped: this CPU cannot run the {variant} kernel");
    }
    ok
}

fn randn(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| (0..4).map(|_| rng.gen_range(-1.0f32..1.0)).sum::<f32>())
        .collect()
}

/// One problem: W `[k, n]` (`bits`, group `g`, scales `sdt`), x `[m, k]` of `xdt` for each
/// `m` of `ms`.
struct Case {
    bits: u32,
    g: u32,
    k: usize,
    n: usize,
    ms: Vec<usize>,
    sdt: DType,
    xdt: DType,
    /// Added to every element of x (activations after SiLU or GELU lean positive, which
    /// makes `Σ x·s·q` and `Σ x·b` large and of opposite sign).
    x_offset: f32,
}

/// Runs `c` on `variant`'s kernel into poisoned outputs; one line per result over tolerance.
fn run(variant: &str, enc: &mut CommandEncoder, rng: &mut StdRng, c: &Case) -> Vec<String> {
    let spec = QuantSpec::affine(c.bits, c.g).unwrap();
    let wf = Buffer::from_f32(&randn(rng, c.k * c.n), c.sdt, &[c.k, c.n]).unwrap();
    let w = ops::quantize(enc, &wf, spec, Flavour::Gpu).unwrap();
    let wd = dequantize_f64(&w).unwrap();
    let out_dt = c.xdt.promote(c.sdt).unwrap();
    let mut failures = Vec::new();
    for &m in &c.ms {
        let xs: Vec<f32> = randn(rng, m * c.k).iter().map(|v| v + c.x_offset).collect();
        let x = Buffer::from_f32(&xs, c.xdt, &[m, c.k]).unwrap();
        let mut y = Buffer::from_f32(&vec![f32::NAN; m * c.n], out_dt, &[m, c.n]).unwrap();
        ops::quantized_matmul_into(enc, &x, &w, false, &mut y).unwrap();
        let ran = enc.last_kernel().unwrap().to_owned();
        assert!(ran.ends_with(variant), "{ran} ran, expected {variant}");
        let xd: Vec<f64> = x.to_f32_vec().unwrap().into_iter().map(f64::from).collect();
        let want = matmul_f64(&xd, m, &wd, c.k, c.n, false);
        let got: Vec<f64> = y.to_f32_vec().unwrap().into_iter().map(f64::from).collect();
        assert!(
            got.iter().all(|v| v.is_finite()),
            "{ran}: unwritten (NaN) outputs"
        );
        let err = max_rel_err(&got, &want);
        if err > tolerance(out_dt) {
            failures.push(format!(
                "bits {} g {} K {} N {} M {m} scales {} x {}: {err:e}",
                c.bits, c.g, c.k, c.n, c.sdt, c.xdt
            ));
        }
    }
    failures
}

fn tolerance(out: DType) -> f64 {
    if out == DType::F32 {
        1e-5
    } else {
        1e-2
    }
}

/// Runs `cases` on every variant this CPU has; fails listing every result over tolerance.
fn check(cases: &[Case], seed: u64) {
    let mut failures = Vec::new();
    for variant in VARIANTS {
        if !available(variant) {
            continue;
        }
        let device = Device::cpu_with_variant(variant).unwrap();
        let mut enc = device.encoder();
        let mut rng = StdRng::seed_from_u64(seed);
        for c in cases {
            failures.extend(
                run(variant, &mut enc, &mut rng, c)
                    .into_iter()
                    .map(|f| format!("{variant}: {f}")),
            );
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

const FLOATS: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

/// Every width and group size, K = 4100 (64 blocks of 64 rows and a 4-row tail), all nine
/// (scales, x) dtype pairs in turn, decode row counts.
#[test]
fn every_width_group_and_dtype_at_k_4100() {
    let mut cases = Vec::new();
    let mut i = 0;
    for bits in [1, 2, 3, 4, 5, 6, 8] {
        for g in [32u32, 64, 128] {
            let (sdt, xdt) = (FLOATS[i % 3], FLOATS[(i / 3) % 3]);
            let ms = vec![[1, 2, 5, 8, 16][i % 5]];
            let n = [256, 384, 512][i % 3].max(2 * g as usize);
            cases.push(Case {
                bits,
                g,
                k: 4100,
                n,
                ms,
                sdt,
                xdt,
                x_offset: 0.0,
            });
            i += 1;
        }
    }
    check(&cases, 1);
}

/// The common widths at N = 1024 for every row count a register tile specialises (1..8 on
/// AVX-512, 1..3 on AVX2), several tiles (9..16) and more, f32 and bf16 outputs; K = 1024 is
/// 16 k-blocks.
#[test]
fn four_and_eight_bit_every_row_count_n_1024() {
    let mut cases = Vec::new();
    for bits in [4, 8] {
        for (sdt, xdt) in [(DType::F32, DType::F32), (DType::BF16, DType::BF16)] {
            cases.push(Case {
                bits,
                g: 64,
                k: 1024,
                n: 1024,
                ms: vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 13, 16, 33],
                sdt,
                xdt,
                x_offset: 0.0,
            });
        }
    }
    check(&cases, 2);
}

/// Column counts that split unevenly across tasks and column blocks (N = 1088 = 17 × 64,
/// 1152 = 9 × 128, 96 = 3 × 32), and many rows of x (narrower column blocks).
#[test]
fn uneven_columns_and_many_rows() {
    let mut cases = Vec::new();
    for (bits, g, n) in [(4, 64, 1088), (3, 128, 1152), (6, 32, 96), (2, 64, 1088)] {
        for (k, ms) in [(2048, vec![1, 7]), (384, vec![300])] {
            cases.push(Case {
                bits,
                g,
                k,
                n,
                ms,
                sdt: DType::F32,
                xdt: DType::F32,
                x_offset: 0.0,
            });
        }
    }
    check(&cases, 3);
}

/// Long reductions stay within the f32 tolerance (sums are formed per block of rows).
#[test]
fn long_k_f32() {
    let cases: Vec<Case> = [4, 8]
        .into_iter()
        .map(|bits| Case {
            bits,
            g: 64,
            k: 14336,
            n: 256,
            ms: vec![2],
            sdt: DType::F32,
            xdt: DType::F32,
            x_offset: 0.0,
        })
        .collect();
    check(&cases, 4);
}

/// x of mean well away from 0 (the `Σ x·b` part and the codes' part then nearly cancel), f32
/// throughout, every width at K = 4096.
#[test]
fn offset_x_f32() {
    let cases: Vec<Case> = [1, 2, 3, 4, 5, 6, 8]
        .into_iter()
        .map(|bits| Case {
            bits,
            g: 64,
            k: 4096,
            n: 256,
            ms: vec![1, 3],
            sdt: DType::F32,
            xdt: DType::F32,
            x_offset: 3.0,
        })
        .collect();
    check(&cases, 5);
}

/// Up to 8 rows of x, K is split between the threads (each walks bands of rows of W across
/// every column into its own partial sums of y, added at the end); from 9 rows, or on one
/// thread, the columns are. Every thread count from 1 to 5 (uneven splits of the bands, more
/// threads than some K has bands), K neither a multiple of a band nor of 64, partial sums
/// reused across calls of different sizes, every width.
#[test]
fn k_split_across_thread_counts() {
    let mut cases = Vec::new();
    for (i, bits) in [1u32, 2, 3, 4, 5, 6, 8].into_iter().enumerate() {
        let (g, n) = ([32u32, 64, 128][i % 3], [384, 1088, 256][i % 3]);
        for k in [1000, 70, 24] {
            cases.push(Case {
                bits,
                g,
                k,
                n,
                ms: vec![1, 3, 8, 9],
                sdt: FLOATS[i % 3],
                xdt: FLOATS[(i + 1) % 3],
                x_offset: 0.5,
            });
        }
    }
    for threads in 1..=5 {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| check(&cases, 6 + threads as u64));
    }
}
