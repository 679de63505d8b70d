//! The CPU decode kernels (M < 17) on the superblock paths of 1- to 4-bit codes: full superblocks (four
//! groups of a weight row decoded together), a partial last one (1 or 3 groups), rows of one
//! group, rows long enough to be cut into K blocks at 5 or more rows (29 groups), odd N (the
//! one-column path beside the two-column one) and M = 1..17: blocks of 1 to 4 rows (the
//! split dot-product chains of 1 and 2 rows, the joined ones of 3 and 4), several blocks
//! with a partial last one, and both sides of the GEMMs' hand-overs (`avx512gemm`, 17 rows;
//! `avx2gemm`, 17 rows where `avx2i16` applies).
//!
//! The data are integers, so the check is exact equality with an oracle computed from the raw
//! codes alone (no dequantization): random codes, scales 1, biases −1, sparse x in {−2..2},
//! f16 x, scales and output. Every product and sum the kernels form is then an exact integer
//! below 2048, which f16 holds exactly, so a code decoded into the wrong place or a group
//! left out shows as a wrong answer, not as an error under a tolerance. Outputs are poisoned
//! with NaN first, so an element a kernel forgets to write fails too.

use mlxq::quant::pack::pack_row;
use mlxq::{ops, Buffer, DType, Device, QuantSpec, QuantizedWeight};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Rows of x: every count up to 9 (blocks of 4 rows, whole and partial), then counts past
/// two blocks, and both sides of the GEMMs' hand-overs (`avx512gemm`: 17 rows; `avx2gemm`: 17
/// where `avx2i16` applies).
const MS: [usize; 14] = [1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 16, 17];

#[test]
fn decode_kernels_exact_on_integer_data_every_width_and_superblock_path() {
    let mut rng = StdRng::seed_from_u64(7);
    for variant in [
        "amx",
        "amx-dec",
        "avx512vnni",
        "avx512gemm",
        "avx512bf16",
        "avx512",
        "avx2gemm",
        "avx2i16",
        "avx2",
        "neon",
        "generic",
    ] {
        let device = Device::cpu_with_variant(variant).unwrap();
        let mut enc = device.encoder();
        let (mut cases, mut skipped) = (0, 0);
        // (Wider codes would need x so sparse to stay within f16's integers that the test
        // would say little; the conformance suite covers them.)
        for bits in [1u32, 2, 3, 4] {
            for g in [32usize, 64, 128] {
                let spec = QuantSpec::affine(bits, g as u32).unwrap();
                // Where the variant does not apply on this CPU it runs `generic`, which
                // has its own pass: nothing new to check (the matmul sweep checks the
                // fall-back itself).
                if !mlxq::backend::cpu::supports(variant, &key(bits, g as u32, variant)) {
                    skipped += 1;
                    continue;
                }
                // Groups per row: two full superblocks, plus a partial one of 1 or 3 groups;
                // a partial one alone; one group; seven and a partial one, which the walk
                // cuts into K blocks from 5 rows on (of 24 groups, for groups of 128).
                for groups in [8usize, 9, 11, 3, 1, 29] {
                    let k = groups * g;
                    for n in [1usize, 7, 34] {
                        let (codes, w) = integer_weight(&mut rng, spec, n, k);
                        for m in MS {
                            // Sparse, so that every output stays well inside f16's integers.
                            let x = sparse_x(&mut rng, m * k, 8);
                            let ctx = format!("bits {bits} g {g} k {k} n {n} m {m}");
                            assert_exact(&mut enc, &w, &codes, &x, m, &ctx);
                            cases += 1;
                        }
                    }
                }
            }
        }
        enc.commit_and_wait().unwrap();
        if skipped > 0 {
            println!("{variant}: {skipped} of 12 widths and groups skipped (generic here)");
        }
        assert_eq!(cases, (12 - skipped) * 6 * 3 * MS.len(), "{variant}");
    }
}

/// The registry key of the f16 decode matmuls above.
fn key(bits: u32, g: u32, variant: &'static str) -> mlxq::registry::KernelKey {
    mlxq::registry::KernelKey {
        op: mlxq::registry::OpKind::QuantizedMatmul,
        mode: mlxq::QuantMode::Affine,
        bits,
        group_size: g,
        input: DType::F16,
        scales: DType::F16,
        output: DType::F16,
        flag: true,
        variant,
    }
}

/// Rows long enough that the integer-grid decode kernels cut K into blocks at 4 rows and
/// more (`avx2i16` keeps 256 KiB of x per block: K past 32768 at four rows), exact as above:
/// a block's partial sums, the later blocks' offsets into x, and a last block shorter than
/// the others, at 1, 4, 5 (a block of four rows and one of one) and 8 rows.
#[test]
fn decode_kernels_exact_on_rows_cut_into_k_blocks() {
    let mut rng = StdRng::seed_from_u64(11);
    for variant in ["avx2i16", "avx512vnni"] {
        let device = Device::cpu_with_variant(variant).unwrap();
        let mut enc = device.encoder();
        for bits in [2u32, 4] {
            if !mlxq::backend::cpu::supports(variant, &key(bits, 64, variant)) {
                println!("{variant}: {bits} bits skipped (generic here)");
                continue;
            }
            let spec = QuantSpec::affine(bits, 64).unwrap();
            let (n, k) = (3usize, 34 * 1024);
            let (codes, w) = integer_weight(&mut rng, spec, n, k);
            for m in [1usize, 4, 5, 8] {
                // Sparser than above: the rows are ~100× longer.
                let x = sparse_x(&mut rng, m * k, 64);
                assert_exact(
                    &mut enc,
                    &w,
                    &codes,
                    &x,
                    m,
                    &format!("bits {bits} k {k} m {m}"),
                );
            }
        }
        enc.commit_and_wait().unwrap();
    }
}

/// Random codes for an `n × k` weight of `spec` (affine), and the weight: every scale 1,
/// every bias −1 (f16).
fn integer_weight(
    rng: &mut StdRng,
    spec: QuantSpec,
    n: usize,
    k: usize,
) -> (Vec<u8>, QuantizedWeight) {
    let (bits, g) = (spec.bits(), spec.group_size() as usize);
    let groups = k / g;
    let codes: Vec<u8> = (0..n * k)
        .map(|_| rng.gen_range(0..1u32 << bits) as u8)
        .collect();
    let row_bytes = k / 8 * bits as usize;
    let mut bytes = vec![0u8; n * row_bytes];
    for (c, b) in codes.chunks(k).zip(bytes.chunks_mut(row_bytes)) {
        assert!(pack_row(bits, c, b));
    }
    let packed = Buffer::from_bytes(&bytes, DType::U32, &[n, row_bytes / 4]).unwrap();
    let factors =
        |v: f32| Buffer::from_f32(&vec![v; n * groups], DType::F16, &[n, groups]).unwrap();
    let w = QuantizedWeight::new(packed, factors(1.0), Some(factors(-1.0)), spec).unwrap();
    (codes, w)
}

/// `len` values of x, one in `one_in` a random integer in −2..=2, the rest 0.
fn sparse_x(rng: &mut StdRng, len: usize, one_in: u32) -> Vec<f32> {
    (0..len)
        .map(|_| {
            if rng.gen_range(0..one_in) == 0 {
                rng.gen_range(-2i32..=2) as f32
            } else {
                0.0
            }
        })
        .collect()
}

/// `x` (`m` rows, f16) times the weight of [`integer_weight`] on `enc`'s device, into an
/// output poisoned with NaN, against the exact integer sums `Σ x·(code − 1)`.
fn assert_exact(
    enc: &mut mlxq::CommandEncoder,
    w: &QuantizedWeight,
    codes: &[u8],
    x: &[f32],
    m: usize,
    ctx: &str,
) {
    let k = x.len() / m;
    let n = codes.len() / k;
    let xb = Buffer::from_f32(x, DType::F16, &[m, k]).unwrap();
    let mut y = Buffer::from_f32(&vec![f32::NAN; m * n], DType::F16, &[m, n]).unwrap();
    ops::quantized_matmul_into(enc, &xb, w, true, &mut y).unwrap();
    let got = y.to_f32_vec().unwrap();
    for r in 0..m {
        for c in 0..n {
            let want: i64 = (0..k)
                .map(|i| x[r * k + i] as i64 * (codes[c * k + i] as i64 - 1))
                .sum();
            assert!(want.abs() < 2048, "test data too large: {want}");
            assert_eq!(
                got[r * n + c],
                want as f32,
                "{} {ctx}: row {r} column {c}",
                enc.last_kernel().unwrap_or("?")
            );
        }
    }
}
