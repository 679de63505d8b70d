//! `ops::quantize_into` writes exactly what `ops::quantize` returns, into a caller-owned
//! weight, overwriting every byte: every affine width, groups of 32/64/128, f32/f16/bf16
//! inputs, both flavours, the default kernels and the generic ones, on random inputs with a
//! few special values, into outputs poisoned with NaN (all-ones bytes) beforehand.

mod common;

use common::poisoned_weight;
use mlxq::{ops, Buffer, DType, Device, Flavour, QuantSpec, QuantizedWeight};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const BITS: [u32; 7] = [1, 2, 3, 4, 5, 6, 8];
const GROUPS: [u32; 3] = [32, 64, 128];
const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];
const FLAVOURS: [Flavour; 2] = [Flavour::Gpu, Flavour::Cpu];

/// Random weights of `shape`: groups of different magnitudes and offsets, and in a few groups
/// the values the kernels treat specially (NaN, ±∞, zeros, constants).
fn random_weights(shape: &[usize], g: usize, seed: u64) -> Vec<f32> {
    let n: usize = shape.iter().product();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut v = Vec::with_capacity(n);
    for group in 0..n / g {
        let scale = 10f32.powf(rng.gen_range(-4.0..2.0));
        let offset = if rng.gen_bool(0.3) {
            rng.gen_range(-1.0..1.0) * scale
        } else {
            0.0
        };
        for i in 0..g {
            let x = match group % 97 {
                13 if i == 5 => f32::NAN,
                29 if i == 7 => f32::INFINITY,
                41 if i == 1 => f32::NEG_INFINITY,
                53 => 0.0,
                67 => 0.25,
                _ => offset + scale * (rng.gen::<f32>() - 0.5),
            };
            v.push(x);
        }
    }
    v
}

fn same_bytes(a: &QuantizedWeight, b: &QuantizedWeight, what: &str) {
    assert_eq!(a.packed().bytes(), b.packed().bytes(), "{what}: packed");
    assert_eq!(a.scales().bytes(), b.scales().bytes(), "{what}: scales");
    assert_eq!(
        a.biases().unwrap().bytes(),
        b.biases().unwrap().bytes(),
        "{what}: biases"
    );
}

/// `[3, 37, 384]`: 1332 to 333 groups, more than one parallel task's worth for g = 32, and
/// batch counts that are not multiples of 16.
#[test]
fn quantize_into_equals_quantize() {
    let shape = [3usize, 37, 384];
    let devices = [Device::cpu(), Device::cpu_with_variant("generic").unwrap()];
    let mut seed = 0;
    for dtype in DTYPES {
        for g in GROUPS {
            seed += 1;
            let v = random_weights(&shape, g as usize, seed);
            let w = Buffer::from_f32(&v, dtype, &shape).unwrap();
            for bits in BITS {
                let spec = QuantSpec::affine(bits, g).unwrap();
                for flavour in FLAVOURS {
                    for device in &devices {
                        let mut enc = device.encoder();
                        let want = ops::quantize(&mut enc, &w, spec, flavour).unwrap();
                        let mut out = poisoned_weight(&shape, dtype, spec);
                        ops::quantize_into(&mut enc, &w, spec, flavour, &mut out).unwrap();
                        enc.commit_and_wait().unwrap();
                        let what = format!(
                            "{dtype} {spec} {flavour} {}",
                            enc.last_kernel().unwrap_or("?")
                        );
                        same_bytes(&out, &want, &what);
                    }
                }
            }
        }
    }
}

/// The same output quantized into twice, from different inputs: the second call leaves
/// nothing of the first.
#[test]
fn quantize_into_reused_output() {
    let shape = [64usize, 256];
    let spec = QuantSpec::affine(4, 64).unwrap();
    let mut enc = Device::cpu().encoder();
    let mut out = poisoned_weight(&shape, DType::BF16, spec);
    for seed in [7, 8] {
        let v = random_weights(&shape, 64, seed);
        let w = Buffer::from_f32(&v, DType::BF16, &shape).unwrap();
        let want = ops::quantize(&mut enc, &w, spec, Flavour::Gpu).unwrap();
        ops::quantize_into(&mut enc, &w, spec, Flavour::Gpu, &mut out).unwrap();
        same_bytes(&out, &want, &format!("seed {seed}"));
    }
}
