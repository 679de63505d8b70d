//! `ops::dequantize_into` writes exactly what `ops::dequantize` returns, into a caller-owned
//! buffer poisoned beforehand (all-ones bytes, NaN in every float dtype): affine 3- and 4-bit
//! and the FP modes, every output dtype, both flavours, the default kernels and the generic
//! ones; and a wrong `out` (dtype, shape, shared storage) is an error naming `out` that
//! writes nothing.

use mlxq::ops::{self, DequantizeOptions};
use mlxq::{Buffer, DType, Device, Error, Flavour, QuantMode, QuantSpec, QuantizedWeight};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];
const FLAVOURS: [Flavour; 2] = [Flavour::Gpu, Flavour::Cpu];

/// A buffer of `dtype` and `shape` whose every byte is 0xFF (NaN in f32, f16 and bf16).
fn poisoned(dtype: DType, shape: &[usize]) -> Buffer {
    let n: usize = shape.iter().product::<usize>() * dtype.size();
    Buffer::from_bytes(&vec![0xFF; n], dtype, shape).unwrap()
}

/// `w` of `shape` (random values of several magnitudes) in `dtype`, quantized as `spec`.
fn weight(shape: &[usize], dtype: DType, spec: QuantSpec, seed: u64) -> QuantizedWeight {
    let n: usize = shape.iter().product();
    let mut rng = StdRng::seed_from_u64(seed);
    let v: Vec<f32> = (0..n)
        .map(|i| (rng.gen::<f32>() - 0.5) * 10f32.powi((i / 64 % 5) as i32 - 2))
        .collect();
    let w = Buffer::from_f32(&v, dtype, shape).unwrap();
    ops::quantize(&mut Device::cpu().encoder(), &w, spec, Flavour::Gpu).unwrap()
}

fn specs() -> Vec<QuantSpec> {
    let mut v = vec![
        QuantSpec::affine(4, 64).unwrap(),
        QuantSpec::affine(3, 64).unwrap(),
    ];
    for mode in [QuantMode::Mxfp4, QuantMode::Mxfp8, QuantMode::Nvfp4] {
        let (bits, g) = QuantSpec::fp_defaults(mode);
        v.push(QuantSpec::new(mode, bits, g).unwrap());
    }
    v
}

/// `[2, 37, 256]`: a batch of two, and a row count that is not a multiple of 8.
#[test]
fn dequantize_into_equals_dequantize() {
    let shape = [2usize, 37, 256];
    let devices = [Device::cpu(), Device::cpu_with_variant("generic").unwrap()];
    let mut checked = 0;
    for (seed, spec) in specs().into_iter().enumerate() {
        for wdtype in [DType::BF16, DType::F32] {
            let w = weight(&shape, wdtype, spec, seed as u64);
            for out_dtype in DTYPES.map(Some).into_iter().chain([None]) {
                for flavour in FLAVOURS {
                    let opts = DequantizeOptions {
                        dtype: out_dtype,
                        flavour,
                    };
                    for device in &devices {
                        let mut enc = device.encoder();
                        let want = ops::dequantize(&mut enc, &w, opts).unwrap();
                        let mut out = poisoned(want.dtype(), &shape);
                        ops::dequantize_into(&mut enc, &w, opts, &mut out).unwrap();
                        enc.commit_and_wait().unwrap();
                        let what = format!(
                            "{spec} scales of {wdtype} -> {out_dtype:?} {flavour:?} {}",
                            enc.last_kernel().unwrap_or("?")
                        );
                        assert_eq!(out.dtype(), want.dtype(), "{what}");
                        assert_eq!(out.shape(), want.shape(), "{what}");
                        assert!(out.bytes() == want.bytes(), "{what}: bytes differ");
                        checked += 1;
                    }
                }
            }
        }
    }
    assert_eq!(checked, 5 * 2 * 4 * 2 * 2);
}

/// Asserts the message names `out` and every fragment, and that `out` kept its poison.
fn rejects(e: Error, out: &Buffer, fragments: &[&str]) {
    let msg = e.to_string();
    for f in ["dequantize", "out"].iter().chain(fragments) {
        assert!(msg.contains(f), "error {msg:?} does not mention {f:?}");
    }
    assert!(out.bytes().iter().all(|&b| b == 0xFF), "{msg}: out written");
}

#[test]
fn dequantize_into_wrong_out_dtype() {
    let shape = [8usize, 128];
    let mut enc = Device::cpu().encoder();
    // Affine: the default is the scales' dtype.
    let w = weight(&shape, DType::BF16, QuantSpec::affine(4, 64).unwrap(), 1);
    let mut out = poisoned(DType::F32, &shape);
    let e = ops::dequantize_into(&mut enc, &w, DequantizeOptions::default(), &mut out);
    rejects(e.unwrap_err(), &out, &["bfloat16", "float32"]);
    // An explicit dtype.
    let opts = DequantizeOptions {
        dtype: Some(DType::F16),
        ..Default::default()
    };
    let mut out = poisoned(DType::BF16, &shape);
    let e = ops::dequantize_into(&mut enc, &w, opts, &mut out);
    rejects(e.unwrap_err(), &out, &["float16", "bfloat16"]);
    // FP modes: bfloat16 by default, whatever the input was.
    let w = weight(
        &shape,
        DType::F32,
        QuantSpec::new(QuantMode::Mxfp4, 4, 32).unwrap(),
        2,
    );
    let mut out = poisoned(DType::F32, &shape);
    let e = ops::dequantize_into(&mut enc, &w, DequantizeOptions::default(), &mut out);
    rejects(e.unwrap_err(), &out, &["bfloat16", "float32"]);
    // Not a float at all.
    let mut out = Buffer::from_bytes(&[0xFF; 8 * 128 * 4], DType::U32, &shape).unwrap();
    let e = ops::dequantize_into(&mut enc, &w, DequantizeOptions::default(), &mut out);
    rejects(e.unwrap_err(), &out, &["bfloat16", "uint32"]);
}

#[test]
fn dequantize_into_wrong_out_shape() {
    let shape = [2usize, 8, 128];
    let mut enc = Device::cpu().encoder();
    let w = weight(&shape, DType::BF16, QuantSpec::affine(3, 64).unwrap(), 3);
    for bad in [
        &[8usize, 128][..],
        &[2, 8, 64],
        &[2, 128, 8],
        &[16, 128],
        &[1, 2, 8, 128],
    ] {
        let mut out = poisoned(DType::BF16, bad);
        let e = ops::dequantize_into(&mut enc, &w, DequantizeOptions::default(), &mut out);
        rejects(e.unwrap_err(), &out, &["[2, 8, 128]", &format!("{bad:?}")]);
    }
}

/// An output whose storage is shared with another view (a clone) cannot be written.
#[test]
fn dequantize_into_shared_out() {
    let shape = [8usize, 128];
    let mut enc = Device::cpu().encoder();
    let w = weight(&shape, DType::BF16, QuantSpec::affine(4, 64).unwrap(), 4);
    let mut out = poisoned(DType::BF16, &shape);
    let keep = out.clone();
    let e = ops::dequantize_into(&mut enc, &w, DequantizeOptions::default(), &mut out);
    rejects(e.unwrap_err(), &keep, &["shared"]);
}

/// The same output dequantized into twice, from different weights: the second call leaves
/// nothing of the first.
#[test]
fn dequantize_into_reused_output() {
    let shape = [64usize, 256];
    let spec = QuantSpec::affine(4, 64).unwrap();
    let mut enc = Device::cpu().encoder();
    let mut out = poisoned(DType::BF16, &shape);
    for seed in [7, 8] {
        let w = weight(&shape, DType::BF16, spec, seed);
        let want = ops::dequantize(&mut enc, &w, DequantizeOptions::default()).unwrap();
        ops::dequantize_into(&mut enc, &w, DequantizeOptions::default(), &mut out).unwrap();
        assert!(out.bytes() == want.bytes(), "seed {seed}");
    }
}
