//! Every bad input gets its own clear error, naming the op, the parameter, what was expected
//! and what came; nothing panics.

mod common;

use common::says;
use mlxq::ops::{self, DequantizeOptions};
use mlxq::{
    Buffer, CommandEncoder, DType, Device, Error, Flavour, QuantMode, QuantSpec, QuantizedWeight,
};

fn enc() -> CommandEncoder {
    Device::cpu().encoder()
}

/// A valid 4-bit, group-32 weight of `[..batch, rows, 64]` with bf16 scales.
fn weight(shape: &[usize]) -> QuantizedWeight {
    let n: usize = shape.iter().product();
    let w: Vec<f32> = (0..n).map(|i| (i % 17) as f32 - 8.0).collect();
    let w = Buffer::from_f32(&w, DType::BF16, shape).unwrap();
    ops::quantize(
        &mut enc(),
        &w,
        QuantSpec::affine(4, 32).unwrap(),
        Flavour::Gpu,
    )
    .unwrap()
}

#[test]
fn bits_0_7_9() {
    for bits in [0, 7, 9] {
        says(
            QuantSpec::affine(bits, 64).unwrap_err(),
            &[
                "QuantSpec",
                "bits",
                "1, 2, 3, 4, 5, 6, 8",
                &bits.to_string(),
            ],
        );
    }
}

#[test]
fn group_0_16_256() {
    for g in [0, 16, 256] {
        says(
            QuantSpec::affine(4, g).unwrap_err(),
            &["group_size", "32, 64, 128", &g.to_string()],
        );
    }
    says(
        QuantSpec::new(QuantMode::Mxfp8, 8, 64).unwrap_err(),
        &["group_size", "32 for mxfp8", "64"],
    );
}

#[test]
fn k_not_a_multiple_of_the_group() {
    let w = Buffer::zeros(DType::F32, &[4, 100]).unwrap();
    let e = ops::quantize(
        &mut enc(),
        &w,
        QuantSpec::affine(4, 64).unwrap(),
        Flavour::Cpu,
    )
    .unwrap_err();
    assert!(matches!(
        e,
        Error::ShapeMismatch {
            op: "quantize",
            param: "w",
            ..
        }
    ));
    says(e, &["multiple of the group size 64", "[4, 100]"]);
}

#[test]
fn quantize_needs_a_float_matrix() {
    let spec = QuantSpec::affine(4, 32).unwrap();
    let v = Buffer::zeros(DType::F32, &[64]).unwrap();
    says(
        ops::quantize(&mut enc(), &v, spec, Flavour::Gpu).unwrap_err(),
        &["quantize", "w", "at least 2 dimensions"],
    );
    let u = Buffer::zeros(DType::U32, &[2, 64]).unwrap();
    says(
        ops::quantize(&mut enc(), &u, spec, Flavour::Gpu).unwrap_err(),
        &["quantize", "w", "uint32"],
    );
}

#[test]
fn zero_m_n_k() {
    let spec = QuantSpec::affine(4, 32).unwrap();
    for shape in [[0, 64], [4, 0]] {
        let w = Buffer::zeros(DType::F32, &shape).unwrap();
        assert!(
            ops::quantize(&mut enc(), &w, spec, Flavour::Gpu).is_err(),
            "{shape:?}"
        );
    }
    let w = weight(&[8, 64]);
    let x = Buffer::zeros(DType::F32, &[0, 64]).unwrap();
    says(
        ops::quantized_matmul(&mut enc(), &x, &w, true).unwrap_err(),
        &["quantized_matmul", "x", "no zero dimension"],
    );
    // N = 0: a weight with no rows cannot be built.
    let e = QuantizedWeight::new(
        Buffer::zeros(DType::U32, &[0, 8]).unwrap(),
        Buffer::zeros(DType::BF16, &[0, 2]).unwrap(),
        Some(Buffer::zeros(DType::BF16, &[0, 2]).unwrap()),
        spec,
    )
    .unwrap_err();
    says(e, &["QuantizedWeight", "packed", "no zero dimension"]);
    // K = 0.
    let e = QuantizedWeight::new(
        Buffer::zeros(DType::U32, &[2, 0]).unwrap(),
        Buffer::zeros(DType::BF16, &[2, 0]).unwrap(),
        Some(Buffer::zeros(DType::BF16, &[2, 0]).unwrap()),
        spec,
    )
    .unwrap_err();
    says(e, &["QuantizedWeight", "packed"]);
}

#[test]
fn packed_scales_biases_that_disagree() {
    let spec = QuantSpec::affine(4, 32).unwrap();
    let ok = weight(&[8, 64]);
    let (p, s, b) = (
        ok.packed().clone(),
        ok.scales().clone(),
        ok.biases().unwrap().clone(),
    );
    let new = |p: &Buffer, s: &Buffer, b: Option<&Buffer>| {
        QuantizedWeight::new(p.clone(), s.clone(), b.cloned(), spec)
    };

    let p_f32 = Buffer::zeros(DType::F32, &[8, 8]).unwrap();
    says(
        new(&p_f32, &s, Some(&b)).unwrap_err(),
        &["packed", "uint32", "float32"],
    );
    let s_u32 = Buffer::zeros(DType::U32, &[8, 2]).unwrap();
    says(
        new(&p, &s_u32, Some(&b)).unwrap_err(),
        &["scales", "uint32"],
    );
    let b_f16 = Buffer::zeros(DType::F16, &[8, 2]).unwrap();
    says(
        new(&p, &s, Some(&b_f16)).unwrap_err(),
        &["biases", "bfloat16", "float16"],
    );
    let b_short = Buffer::zeros(DType::BF16, &[8, 1]).unwrap();
    says(
        new(&p, &s, Some(&b_short)).unwrap_err(),
        &["biases", "[8, 1]"],
    );
    says(new(&p, &s, None).unwrap_err(), &["biases", "affine"]);
    let s_rows = Buffer::zeros(DType::BF16, &[7, 2]).unwrap();
    says(
        new(&p, &s_rows, Some(&b)).unwrap_err(),
        &["scales", "[7, 2]"],
    );
    // packed says 64 columns (8 words × 32 / 4 bits) but scales say 3 groups × 32 = 96.
    let s3 = Buffer::zeros(DType::BF16, &[8, 3]).unwrap();
    says(
        new(&p, &s3, Some(&s3)).unwrap_err(),
        &["packed", "last dimension 12", "[8, 8]"],
    );
    let p1 = Buffer::zeros(DType::U32, &[8]).unwrap();
    says(
        new(&p1, &s, Some(&b)).unwrap_err(),
        &["packed", "at least 2 dimensions"],
    );
    // Batch dims of packed and scales must agree.
    let p3 = Buffer::zeros(DType::U32, &[2, 8, 8]).unwrap();
    let s3d = Buffer::zeros(DType::BF16, &[3, 8, 2]).unwrap();
    says(
        new(&p3, &s3d, Some(&s3d)).unwrap_err(),
        &["scales", "[3, 8, 2]"],
    );
    // FP modes take uint8 scales and no biases.
    let fp = QuantSpec::new(QuantMode::Mxfp4, 4, 32).unwrap();
    says(
        QuantizedWeight::new(p.clone(), s.clone(), None, fp).unwrap_err(),
        &["scales", "uint8"],
    );
}

#[test]
fn x_whose_k_does_not_match() {
    let w = weight(&[8, 64]);
    let x = Buffer::zeros(DType::F32, &[2, 63]).unwrap();
    let e = ops::quantized_matmul(&mut enc(), &x, &w, true).unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch { param: "x", .. }));
    says(
        e,
        &["quantized_matmul", "x", "last dimension 64", "[2, 63]"],
    );
    // transpose = false: x's K is W's rows (8).
    let e = ops::quantized_matmul(&mut enc(), &x, &w, false).unwrap_err();
    says(e, &["x", "last dimension 8"]);
    let xi = Buffer::zeros(DType::I32, &[2, 64]).unwrap();
    says(
        ops::quantized_matmul(&mut enc(), &xi, &w, true).unwrap_err(),
        &["x", "int32"],
    );
}

#[test]
fn two_d_x_against_three_d_w() {
    let w = weight(&[3, 8, 64]);
    let x = Buffer::zeros(DType::F32, &[2, 64]).unwrap();
    let e = ops::quantized_matmul(&mut enc(), &x, &w, true).unwrap_err();
    says(
        e,
        &["quantized_matmul", "x", "at least 3 dimensions", "[2, 64]"],
    );
    // Batch dims that do not broadcast.
    let x = Buffer::zeros(DType::F32, &[2, 1, 64]).unwrap();
    says(
        ops::quantized_matmul(&mut enc(), &x, &w, true).unwrap_err(),
        &["x", "broadcasts"],
    );
}

#[test]
fn expert_index_out_of_range() {
    let w = weight(&[3, 8, 64]);
    let x = Buffer::zeros(DType::F32, &[2, 1, 64]).unwrap();
    let rhs = Buffer::from_slice(&[0u32, 3], &[2]).unwrap();
    let e = ops::gather_qmm(&mut enc(), &x, &w, None, Some(&rhs), true, false).unwrap_err();
    assert!(matches!(
        e,
        Error::IndexOutOfRange {
            position: 1,
            index: 3,
            bound: 3,
            ..
        }
    ));
    says(e, &["gather_qmm", "rhs_indices[1] = 3", "0..3"]);
    let neg = Buffer::from_slice(&[-1i32, 0], &[2]).unwrap();
    says(
        ops::gather_qmm(&mut enc(), &x, &w, None, Some(&neg), true, false).unwrap_err(),
        &["rhs_indices[0] = -1"],
    );
    let lhs = Buffer::from_slice(&[2u32, 0], &[2]).unwrap();
    says(
        ops::gather_qmm(&mut enc(), &x, &w, Some(&lhs), None, true, false).unwrap_err(),
        &["lhs_indices[0] = 2", "0..2"],
    );
    let f = Buffer::zeros(DType::F32, &[2]).unwrap();
    says(
        ops::gather_qmm(&mut enc(), &x, &w, None, Some(&f), true, false).unwrap_err(),
        &["rhs_indices", "uint32 or int32"],
    );
    // Index shapes that do not broadcast.
    let l3 = Buffer::from_slice(&[0u32, 1, 0], &[3]).unwrap();
    let r2 = Buffer::from_slice(&[0u32, 1], &[2]).unwrap();
    says(
        ops::gather_qmm(&mut enc(), &x, &w, Some(&l3), Some(&r2), true, false).unwrap_err(),
        &["broadcasts"],
    );
    assert!(matches!(
        w.expert(3),
        Err(Error::IndexOutOfRange {
            index: 3,
            bound: 3,
            ..
        })
    ));
}

#[test]
fn embedding_ids_out_of_range() {
    let w = weight(&[8, 64]);
    let ids = Buffer::from_slice(&[1u32, 8], &[2]).unwrap();
    let e = ops::embedding(&mut enc(), &w, &ids, DequantizeOptions::default()).unwrap_err();
    says(e, &["embedding", "ids[1] = 8", "0..8"]);
    let ids = Buffer::from_slice(&[1.0f32], &[1]).unwrap();
    says(
        ops::embedding(&mut enc(), &w, &ids, DequantizeOptions::default()).unwrap_err(),
        &["ids", "float32"],
    );
    let w3 = weight(&[2, 8, 64]);
    let ids = Buffer::from_slice(&[0u32], &[1]).unwrap();
    says(
        ops::embedding(&mut enc(), &w3, &ids, DequantizeOptions::default()).unwrap_err(),
        &["embedding", "w", "2-D"],
    );
}

#[test]
fn dequantize_to_a_non_float_dtype() {
    let w = weight(&[8, 64]);
    let opts = DequantizeOptions {
        dtype: Some(DType::U8),
        ..Default::default()
    };
    says(
        ops::dequantize(&mut enc(), &w, opts).unwrap_err(),
        &["dequantize", "dtype", "uint8"],
    );
}

#[test]
fn output_buffer_of_the_wrong_shape_or_dtype() {
    let w = weight(&[8, 64]);
    let x = Buffer::zeros(DType::BF16, &[2, 64]).unwrap();
    let mut out = Buffer::zeros(DType::BF16, &[2, 9]).unwrap();
    says(
        ops::quantized_matmul_into(&mut enc(), &x, &w, true, &mut out).unwrap_err(),
        &["out", "[2, 8]", "[2, 9]"],
    );
    let mut out = Buffer::zeros(DType::F32, &[2, 8]).unwrap();
    says(
        ops::quantized_matmul_into(&mut enc(), &x, &w, true, &mut out).unwrap_err(),
        &["out", "bfloat16", "float32"],
    );
    // A shared (read-only) output is refused rather than written behind another view's back.
    let mut out = Buffer::zeros(DType::BF16, &[2, 8]).unwrap();
    let _alias = out.clone();
    says(
        ops::quantized_matmul_into(&mut enc(), &x, &w, true, &mut out).unwrap_err(),
        &["read-only", "shared"],
    );
}

#[test]
fn gather_qmm_into_checks_its_output() {
    let w = weight(&[3, 8, 64]);
    let x = Buffer::zeros(DType::F32, &[2, 1, 64]).unwrap();
    let rhs = Buffer::from_slice(&[0u32, 2], &[2]).unwrap();
    let run = |out: &mut Buffer| {
        ops::gather_qmm_into(&mut enc(), &x, &w, None, Some(&rhs), true, false, out).unwrap_err()
    };
    says(
        run(&mut Buffer::zeros(DType::F32, &[2, 1, 9]).unwrap()),
        &["gather_qmm", "out", "[2, 1, 8]", "[2, 1, 9]"],
    );
    says(
        run(&mut Buffer::zeros(DType::BF16, &[2, 1, 8]).unwrap()),
        &["gather_qmm", "out", "float32", "bfloat16"],
    );
    let mut out = Buffer::zeros(DType::F32, &[2, 1, 8]).unwrap();
    let _alias = out.clone();
    says(run(&mut out), &["read-only", "shared"]);
}

#[test]
fn buffer_too_small_for_its_shape() {
    let e = Buffer::from_bytes(&[0u8; 12], DType::F32, &[2, 2]).unwrap_err();
    assert!(matches!(
        e,
        Error::BufferTooSmall {
            needed: 16,
            available: 12,
            ..
        }
    ));
    says(e, &["need 16 bytes", "have 12"]);
    let b = Buffer::zeros(DType::U32, &[4]).unwrap();
    says(
        b.view(8, DType::U32, &[3]).unwrap_err(),
        &["Buffer::view", "need 20 bytes"],
    );
    says(
        Buffer::from_slice(&[1f32, 2.0, 3.0], &[2, 2]).unwrap_err(),
        &["4 elements", "[3]"],
    );
    says(
        b.reshape(&[3]).unwrap_err(),
        &["reshape", "4 elements", "[3]"],
    );
}

#[test]
fn sizes_past_4_gib_are_not_truncated() {
    // A view 5 GiB into a 16-byte buffer: the offset is reported whole, not modulo 2^32.
    let b = Buffer::zeros(DType::U8, &[16]).unwrap();
    let e = b.view(5 << 30, DType::U8, &[1]).unwrap_err();
    says(e, &["need 5368709121 bytes"]);
    // Shapes whose byte size overflows usize are an error, not a wrap-around.
    says(
        Buffer::zeros(DType::F32, &[1 << 40, 1 << 30]).unwrap_err(),
        &["overflows"],
    );
    // Packed sizes for rows longer than 2^32 elements are exact.
    let spec = QuantSpec::affine(3, 128).unwrap();
    assert_eq!(spec.packed_words(5 << 30), Some((5usize << 30) / 32 * 3));
}

#[test]
fn unknown_devices() {
    says(Device::cuda(0).unwrap_err(), &["cuda:0", "unavailable"]);
    says(
        Device::parse("tpu").unwrap_err(),
        &["device", "cpu, cuda or cuda:N", "tpu"],
    );
}

#[test]
fn fp_matmuls_are_no_longer_refused() {
    // FP-mode weights had no matmul kernel before session 23; now the CPU runs them (zero
    // codes and scales: zero results) whichever variant a device prefers: `avx512` where the
    // CPU has it (session 31), `generic` otherwise.
    let spec = QuantSpec::new(QuantMode::Mxfp4, 4, 32).unwrap();
    let w = QuantizedWeight::new(
        Buffer::zeros(DType::U32, &[4, 8]).unwrap(),
        Buffer::zeros(DType::U8, &[4, 2]).unwrap(),
        None,
        spec,
    )
    .unwrap();
    let x = Buffer::zeros(DType::BF16, &[1, 64]).unwrap();
    for variant in ["generic", "avx512", "avx2", "neon"] {
        let mut e = Device::cpu_with_variant(variant).unwrap().encoder();
        let y = ops::quantized_matmul(&mut e, &x, &w, true).unwrap();
        assert_eq!((y.dtype(), y.shape()), (DType::BF16, &[1usize, 4][..]));
        assert_eq!(y.to_f32_vec().unwrap(), vec![0.0; 4]);
        let ran = e.last_kernel().unwrap();
        let here = mlxq::backend::cpu::VARIANTS
            .iter()
            .any(|v| *v == variant && ran.ends_with(&format!("_{v}")));
        assert!(
            here || ran.ends_with("_generic"),
            "{ran} preferring {variant}"
        );
    }
}

#[test]
fn quantize_into_an_output_of_the_wrong_spec_shape_or_dtype() {
    let spec = QuantSpec::affine(4, 32).unwrap();
    let w = Buffer::from_f32(&[0.5; 8 * 64], DType::BF16, &[8, 64]).unwrap();
    // Wrong width, then wrong group size.
    for other in [
        QuantSpec::affine(8, 32).unwrap(),
        QuantSpec::affine(4, 64).unwrap(),
    ] {
        let mut out = ops::quantize(&mut enc(), &w, other, Flavour::Gpu).unwrap();
        let e = ops::quantize_into(&mut enc(), &w, spec, Flavour::Gpu, &mut out).unwrap_err();
        assert!(matches!(
            e,
            Error::InvalidParameter {
                op: "quantize",
                param: "out",
                ..
            }
        ));
        says(e, &[&spec.to_string(), &other.to_string()]);
    }
    // Wrong shape: fewer rows, other columns, an extra batch dim.
    for shape in [[4, 64].as_slice(), &[8, 128], &[1, 8, 64]] {
        let n: usize = shape.iter().product();
        let other = Buffer::from_f32(&vec![0.5; n], DType::BF16, shape).unwrap();
        let mut out = ops::quantize(&mut enc(), &other, spec, Flavour::Gpu).unwrap();
        let e = ops::quantize_into(&mut enc(), &w, spec, Flavour::Gpu, &mut out).unwrap_err();
        assert!(matches!(
            e,
            Error::ShapeMismatch {
                op: "quantize",
                param: "out",
                ..
            }
        ));
        says(e, &["[8, 64]", &format!("{shape:?}")]);
    }
    // Wrong scales dtype.
    let wf = Buffer::from_f32(&[0.5; 8 * 64], DType::F32, &[8, 64]).unwrap();
    let mut out = ops::quantize(&mut enc(), &wf, spec, Flavour::Gpu).unwrap();
    says(
        ops::quantize_into(&mut enc(), &w, spec, Flavour::Gpu, &mut out).unwrap_err(),
        &["quantize", "out", "bfloat16", "float32"],
    );
    // A bad `w` is reported as `w` before `out` is looked at.
    let u = Buffer::zeros(DType::U32, &[8, 64]).unwrap();
    says(
        ops::quantize_into(&mut enc(), &u, spec, Flavour::Gpu, &mut out).unwrap_err(),
        &["quantize", "w", "uint32"],
    );
    let odd = Buffer::zeros(DType::BF16, &[8, 40]).unwrap();
    says(
        ops::quantize_into(&mut enc(), &odd, spec, Flavour::Gpu, &mut out).unwrap_err(),
        &["quantize", "w", "multiple of the group size 32", "[8, 40]"],
    );
}

#[test]
fn quantize_into_a_shared_output_writes_nothing() {
    let spec = QuantSpec::affine(4, 32).unwrap();
    let w = Buffer::from_f32(&[0.5; 8 * 64], DType::BF16, &[8, 64]).unwrap();
    let mut out = weight(&[8, 64]);
    let alias = out.clone();
    let before = alias.packed().bytes().to_vec();
    says(
        ops::quantize_into(&mut enc(), &w, spec, Flavour::Gpu, &mut out).unwrap_err(),
        &["quantize", "out", "read-only", "shared"],
    );
    assert_eq!(alias.packed().bytes(), &before[..]);
    // An expert view shares its stack's storage: refused the same way.
    let stack = weight(&[2, 8, 64]);
    let mut one = stack.expert(1).unwrap();
    says(
        ops::quantize_into(&mut enc(), &w, spec, Flavour::Gpu, &mut one).unwrap_err(),
        &["quantize", "out", "read-only"],
    );
}

#[test]
fn fp_modes_check_their_inputs() {
    let mx4 = QuantSpec::new(QuantMode::Mxfp4, 4, 32).unwrap();
    let nv4 = QuantSpec::new(QuantMode::Nvfp4, 4, 16).unwrap();
    // Each FP mode has one bits and group size.
    says(
        QuantSpec::new(QuantMode::Mxfp4, 4, 16).unwrap_err(),
        &["group_size", "32 for mxfp4", "16"],
    );
    says(
        QuantSpec::new(QuantMode::Nvfp4, 4, 32).unwrap_err(),
        &["group_size", "16 for nvfp4", "32"],
    );
    says(
        QuantSpec::new(QuantMode::Mxfp4, 8, 32).unwrap_err(),
        &["bits", "4 for mxfp4", "8"],
    );
    // Columns a multiple of the group size; a float matrix of ≥ 2 dims.
    let w = Buffer::from_f32(&[0.5; 4 * 48], DType::BF16, &[4, 48]).unwrap();
    says(
        ops::quantize(&mut enc(), &w, mx4, Flavour::Cpu).unwrap_err(),
        &["quantize", "multiple of the group size 32", "48"],
    );
    let w = Buffer::from_f32(&[0.5; 4 * 24], DType::F32, &[4, 24]).unwrap();
    says(
        ops::quantize(&mut enc(), &w, nv4, Flavour::Gpu).unwrap_err(),
        &["quantize", "multiple of the group size 16", "24"],
    );
    let ints = Buffer::zeros(DType::I32, &[4, 32]).unwrap();
    assert!(ops::quantize(&mut enc(), &ints, mx4, Flavour::Cpu).is_err());
    // A good one: uint8 scales, no biases; into an output of another mode or dtype: refused.
    let w = Buffer::from_f32(&[0.5; 4 * 64], DType::BF16, &[4, 64]).unwrap();
    let qw = ops::quantize(&mut enc(), &w, mx4, Flavour::Cpu).unwrap();
    assert!(qw.biases().is_none());
    assert_eq!(qw.scales_dtype(), DType::U8);
    assert_eq!(qw.scales().shape(), &[4, 2]);
    let mut affine = weight(&[4, 64]);
    says(
        ops::quantize_into(&mut enc(), &w, mx4, Flavour::Cpu, &mut affine).unwrap_err(),
        &["quantize", "out", "mxfp4"],
    );
    let mut other = qw.clone();
    says(
        ops::quantize_into(&mut enc(), &w, nv4, Flavour::Cpu, &mut other).unwrap_err(),
        &["quantize", "out", "nvfp4"],
    );
    // Dequantize: float outputs only; bfloat16 by default, as MLX.
    let opts = DequantizeOptions {
        dtype: Some(DType::U32),
        flavour: Flavour::Cpu,
    };
    says(
        ops::dequantize(&mut enc(), &qw, opts).unwrap_err(),
        &["dequantize", "dtype", "float32, float16 or bfloat16"],
    );
    let d = ops::dequantize(&mut enc(), &qw, DequantizeOptions::default()).unwrap();
    assert_eq!((d.dtype(), d.shape()), (DType::BF16, &[4usize, 64][..]));
    assert_eq!(d.to_f32_vec().unwrap(), vec![0.5; 4 * 64]);
    // FP weights: uint8 scales and no biases.
    says(
        QuantizedWeight::new(
            qw.packed().clone(),
            Buffer::zeros(DType::BF16, &[4, 2]).unwrap(),
            None,
            mx4,
        )
        .unwrap_err(),
        &["scales", "uint8", "bfloat16"],
    );
    says(
        QuantizedWeight::new(
            qw.packed().clone(),
            qw.scales().clone(),
            Some(qw.scales().clone()),
            mx4,
        )
        .unwrap_err(),
        &["biases", "none for mxfp4"],
    );
    fp_matmuls_check_their_inputs();
}

/// quantized_matmul and gather_qmm with FP weights: the weight's own checks (packed words
/// against groups × group size × bits, batch dims), x's K against either transpose, x's dtype,
/// the output buffer (x's dtype for FP modes) and expert indices.
fn fp_matmuls_check_their_inputs() {
    let mx8 = QuantSpec::new(QuantMode::Mxfp8, 8, 32).unwrap();
    let nv4 = QuantSpec::new(QuantMode::Nvfp4, 4, 16).unwrap();
    // A group size the mode does not allow never makes a spec, so never a weight.
    says(
        QuantSpec::new(QuantMode::Mxfp8, 8, 16).unwrap_err(),
        &["group_size", "32 for mxfp8", "16"],
    );
    says(
        QuantSpec::new(QuantMode::Nvfp4, 8, 16).unwrap_err(),
        &["bits", "4 for nvfp4", "8"],
    );
    // mxfp8, 2 groups of 32 per row = 64 bytes = 16 words; 8 words do not fit.
    says(
        QuantizedWeight::new(
            Buffer::zeros(DType::U32, &[4, 8]).unwrap(),
            Buffer::zeros(DType::U8, &[4, 2]).unwrap(),
            None,
            mx8,
        )
        .unwrap_err(),
        &[
            "packed",
            "last dimension 16",
            "2 groups × 32 × 8 bits",
            "[4, 8]",
        ],
    );
    // Scales whose rows or batch dims differ from the packed codes'.
    says(
        QuantizedWeight::new(
            Buffer::zeros(DType::U32, &[4, 16]).unwrap(),
            Buffer::zeros(DType::U8, &[5, 2]).unwrap(),
            None,
            mx8,
        )
        .unwrap_err(),
        &["scales", "[4]", "[5, 2]"],
    );
    says(
        QuantizedWeight::new(
            Buffer::zeros(DType::U32, &[2, 4, 8]).unwrap(),
            Buffer::zeros(DType::U8, &[3, 4, 4]).unwrap(),
            None,
            nv4,
        )
        .unwrap_err(),
        &["scales", "[2, 4]", "[3, 4, 4]"],
    );
    // A good nvfp4 weight [4, 64] (4 groups of 16 per row): x's K is 64 (transpose) or 4.
    let w = QuantizedWeight::new(
        Buffer::zeros(DType::U32, &[4, 8]).unwrap(),
        Buffer::zeros(DType::U8, &[4, 4]).unwrap(),
        None,
        nv4,
    )
    .unwrap();
    let x = Buffer::zeros(DType::F16, &[2, 63]).unwrap();
    says(
        ops::quantized_matmul(&mut enc(), &x, &w, true).unwrap_err(),
        &["quantized_matmul", "x", "last dimension 64", "[2, 63]"],
    );
    says(
        ops::quantized_matmul(&mut enc(), &x, &w, false).unwrap_err(),
        &["quantized_matmul", "x", "last dimension 4", "[2, 63]"],
    );
    let xi = Buffer::zeros(DType::I32, &[2, 64]).unwrap();
    says(
        ops::quantized_matmul(&mut enc(), &xi, &w, true).unwrap_err(),
        &[
            "quantized_matmul",
            "x",
            "float32, float16 or bfloat16",
            "int32",
        ],
    );
    // The output of an FP matmul has x's dtype (uint8 scales do not promote).
    let x = Buffer::zeros(DType::F16, &[2, 64]).unwrap();
    let mut out = Buffer::zeros(DType::F32, &[2, 4]).unwrap();
    says(
        ops::quantized_matmul_into(&mut enc(), &x, &w, true, &mut out).unwrap_err(),
        &["quantized_matmul", "out", "float16", "float32"],
    );
    let mut out = Buffer::zeros(DType::F16, &[2, 5]).unwrap();
    says(
        ops::quantized_matmul_into(&mut enc(), &x, &w, true, &mut out).unwrap_err(),
        &["quantized_matmul", "out", "[2, 4]", "[2, 5]"],
    );
    // gather_qmm over a stack of 3 FP experts: an expert index past the stack, x's K.
    let experts = QuantizedWeight::new(
        Buffer::zeros(DType::U32, &[3, 4, 8]).unwrap(),
        Buffer::zeros(DType::U8, &[3, 4, 4]).unwrap(),
        None,
        nv4,
    )
    .unwrap();
    let x3 = Buffer::zeros(DType::BF16, &[2, 1, 64]).unwrap();
    let rhs = Buffer::from_slice(&[0u32, 3], &[2]).unwrap();
    says(
        ops::gather_qmm(&mut enc(), &x3, &experts, None, Some(&rhs), true, false).unwrap_err(),
        &["gather_qmm", "rhs_indices", "3"],
    );
    says(
        ops::gather_qmm(&mut enc(), &x3, &experts, None, None, false, false).unwrap_err(),
        &["gather_qmm", "x", "last dimension 4"],
    );
    let ok = Buffer::from_slice(&[0u32, 2], &[2]).unwrap();
    let y = ops::gather_qmm(&mut enc(), &x3, &experts, None, Some(&ok), true, false).unwrap();
    assert_eq!((y.dtype(), y.shape()), (DType::BF16, &[2usize, 1, 4][..]));
}
