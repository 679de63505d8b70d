//! `QuantizedWeight::concat_rows` and `QuantizedWeight::row_range`: fusing projections (q, k, v;
//! gate, up) into one weight and taking them back apart. A matmul against the fused weight
//! equals, bit for bit, the parts' matmuls side by side; a row range of the fused weight holds
//! exactly the bytes of its part; every bad input is a clear error naming the parameter.

mod common;

use common::{randn, says};
use mlxq::{ops, Buffer, DType, Device, Error, Flavour, QuantMode, QuantSpec, QuantizedWeight};
use rand::rngs::StdRng;
use rand::SeedableRng;

/// Rows of the three parts (q-, k- and v-like) and their common column count.
const ROWS: [usize; 3] = [96, 32, 64];
const COLS: usize = 256;

fn specs() -> [QuantSpec; 2] {
    let (bits, g) = QuantSpec::fp_defaults(QuantMode::Mxfp4);
    [
        QuantSpec::affine(4, 64).unwrap(),
        QuantSpec::new(QuantMode::Mxfp4, bits, g).unwrap(),
    ]
}

/// A `[rows, cols]` weight of `spec`, quantized on the CPU from random values of `dtype`.
fn weight(
    rng: &mut StdRng,
    rows: usize,
    cols: usize,
    spec: QuantSpec,
    dtype: DType,
) -> QuantizedWeight {
    let w = Buffer::from_f32(&randn(rng, rows * cols), dtype, &[rows, cols]).unwrap();
    ops::quantize(&mut Device::cpu().encoder(), &w, spec, Flavour::Gpu).unwrap()
}

/// The three parts of `ROWS` × `COLS`.
fn parts(spec: QuantSpec, dtype: DType, seed: u64) -> Vec<QuantizedWeight> {
    let mut rng = StdRng::seed_from_u64(seed);
    ROWS.iter()
        .map(|&r| weight(&mut rng, r, COLS, spec, dtype))
        .collect()
}

fn refs(parts: &[QuantizedWeight]) -> Vec<&QuantizedWeight> {
    parts.iter().collect()
}

/// The same bytes as a stack of two matrices of half the rows (a batched weight).
fn two_stack(w: &QuantizedWeight) -> QuantizedWeight {
    let half = |b: &Buffer| {
        let s = b.shape();
        b.reshape(&[2, s[0] / 2, s[1]]).unwrap()
    };
    QuantizedWeight::new(
        half(w.packed()),
        half(w.scales()),
        w.biases().map(half),
        w.spec(),
    )
    .unwrap()
}

/// y = x · Wᵀ of the fused weight, row by row, is the three parts' outputs one after the other,
/// bit for bit: for M = 1 (decode) and M = 3, affine 4-bit g64 and mxfp4, bf16 and f32 x.
#[test]
fn fused_matmul_equals_the_parts_side_by_side() {
    let device = Device::cpu();
    let mut seed = 0;
    for spec in specs() {
        for dtype in [DType::BF16, DType::F32] {
            seed += 1;
            let ps = parts(spec, dtype, seed);
            let fused = QuantizedWeight::concat_rows(&refs(&ps), &device).unwrap();
            let n: usize = ROWS.iter().sum();
            assert_eq!(fused.shape(), &[n, COLS]);
            assert_eq!(
                (fused.spec(), fused.scales_dtype()),
                (spec, ps[0].scales_dtype())
            );
            assert_eq!(fused.biases().is_some(), spec.has_biases());
            let part_bytes: usize = ps.iter().map(QuantizedWeight::nbytes).sum();
            assert_eq!(fused.nbytes(), part_bytes);
            let mut rng = StdRng::seed_from_u64(100 + seed);
            for m in [1usize, 3] {
                let what = format!("{spec} {dtype} M={m}");
                let x = Buffer::from_f32(&randn(&mut rng, m * COLS), dtype, &[m, COLS]).unwrap();
                let mut enc = device.encoder();
                let y = ops::quantized_matmul(&mut enc, &x, &fused, true).unwrap();
                let ys: Vec<Buffer> = ps
                    .iter()
                    .map(|p| ops::quantized_matmul(&mut enc, &x, p, true).unwrap())
                    .collect();
                enc.commit_and_wait().unwrap();
                assert_eq!(y.shape(), &[m, n], "{what}");
                let size = y.dtype().size();
                for row in 0..m {
                    let got = &y.bytes()[row * n * size..(row + 1) * n * size];
                    let want: Vec<u8> = ys
                        .iter()
                        .zip(ROWS)
                        .flat_map(|(yp, r)| {
                            yp.bytes()[row * r * size..(row + 1) * r * size].to_vec()
                        })
                        .collect();
                    assert!(got == want.as_slice(), "{what}: output row {row} differs");
                }
            }
        }
    }
}

/// Each part comes back from the fused weight as a zero-copy row range holding exactly its
/// packed codes, scales and biases.
#[test]
fn row_range_gives_back_each_part() {
    let device = Device::cpu();
    for (seed, spec) in specs().into_iter().enumerate() {
        let ps = parts(spec, DType::BF16, seed as u64);
        let fused = QuantizedWeight::concat_rows(&refs(&ps), &device).unwrap();
        let mut start = 0;
        for (i, p) in ps.iter().enumerate() {
            let what = format!("{spec} part {i}");
            let v = fused.row_range(start, p.rows()).unwrap();
            assert_eq!(v.shape(), p.shape(), "{what}");
            assert_eq!(v.spec(), p.spec(), "{what}");
            assert_eq!(v.packed().bytes(), p.packed().bytes(), "{what}: packed");
            assert_eq!(v.scales().bytes(), p.scales().bytes(), "{what}: scales");
            assert_eq!(
                v.biases().map(Buffer::bytes),
                p.biases().map(Buffer::bytes),
                "{what}: biases"
            );
            assert!(v.packed().shares_storage(fused.packed()), "{what}: a copy");
            assert!(v.scales().shares_storage(fused.scales()), "{what}: a copy");
            start += p.rows();
        }
        // The whole weight as one range, and one part alone stacked: the same bytes.
        let all = fused.row_range(0, fused.rows()).unwrap();
        assert_eq!(all.packed().bytes(), fused.packed().bytes());
        let one = QuantizedWeight::concat_rows(&[&ps[1]], &device).unwrap();
        assert_eq!(one.packed().bytes(), ps[1].packed().bytes());
        assert_eq!(one.scales().bytes(), ps[1].scales().bytes());
    }
}

#[test]
fn concat_rows_rejects_what_cannot_be_stacked() {
    let device = Device::cpu();
    let spec = QuantSpec::affine(4, 64).unwrap();
    let mut rng = StdRng::seed_from_u64(7);
    let a = weight(&mut rng, 32, 256, spec, DType::BF16);
    let op = "QuantizedWeight::concat_rows";

    says(
        QuantizedWeight::concat_rows(&[], &device).unwrap_err(),
        &[op, "parts", "at least one", "empty"],
    );

    let narrow = weight(&mut rng, 32, 128, spec, DType::BF16);
    let e = QuantizedWeight::concat_rows(&[&a, &a, &narrow], &device).unwrap_err();
    assert!(
        matches!(e, Error::ShapeMismatch { param: "parts", .. }),
        "{e}"
    );
    says(e, &[op, "parts", "part 2", "256", "[32, 128]"]);

    let eight = weight(
        &mut rng,
        32,
        256,
        QuantSpec::affine(8, 64).unwrap(),
        DType::BF16,
    );
    let e = QuantizedWeight::concat_rows(&[&a, &eight], &device).unwrap_err();
    assert!(
        matches!(e, Error::InvalidParameter { param: "parts", .. }),
        "{e}"
    );
    says(e, &[op, "parts", "part 1", "4-bit", "8-bit"]);

    let (bits, g) = QuantSpec::fp_defaults(QuantMode::Mxfp4);
    let fp = weight(
        &mut rng,
        32,
        256,
        QuantSpec::new(QuantMode::Mxfp4, bits, g).unwrap(),
        DType::BF16,
    );
    says(
        QuantizedWeight::concat_rows(&[&a, &fp], &device).unwrap_err(),
        &[op, "parts", "part 1", "affine", "mxfp4"],
    );

    let f16 = weight(&mut rng, 32, 256, spec, DType::F16);
    let e = QuantizedWeight::concat_rows(&[&a, &f16], &device).unwrap_err();
    assert!(
        matches!(e, Error::DTypeMismatch { param: "parts", .. }),
        "{e}"
    );
    says(e, &[op, "parts", "part 1", "bfloat16", "float16"]);

    let stack = two_stack(&weight(&mut rng, 64, 256, spec, DType::BF16));
    let e = QuantizedWeight::concat_rows(&[&a, &stack], &device).unwrap_err();
    assert!(
        matches!(e, Error::ShapeMismatch { param: "parts", .. }),
        "{e}"
    );
    says(e, &[op, "parts", "part 1", "2-D", "[2, 32, 256]"]);
    // A 2-D matrix of that stack stacks fine.
    let m1 = stack.expert(1).unwrap();
    assert_eq!(
        QuantizedWeight::concat_rows(&[&a, &m1], &device)
            .unwrap()
            .shape(),
        &[64, 256]
    );
}

#[test]
fn row_range_rejects_bad_ranges() {
    let spec = QuantSpec::affine(4, 64).unwrap();
    let mut rng = StdRng::seed_from_u64(8);
    let w = weight(&mut rng, 32, 256, spec, DType::BF16);
    let op = "QuantizedWeight::row_range";
    says(
        w.row_range(0, 0).unwrap_err(),
        &[op, "count", "at least 1", "0"],
    );
    says(
        w.row_range(30, 3).unwrap_err(),
        &[op, "start + count", "at most 32", "30 + 3"],
    );
    says(
        w.row_range(32, 1).unwrap_err(),
        &[op, "start + count", "at most 32"],
    );
    says(
        w.row_range(usize::MAX, 2).unwrap_err(),
        &[op, "start + count", "at most 32"],
    );
    assert_eq!(w.row_range(31, 1).unwrap().shape(), &[1, 256]);

    let stack = two_stack(&w);
    let e = stack.row_range(0, 1).unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{e}");
    says(e, &[op, "2-D", "[2, 16, 256]"]);
}
