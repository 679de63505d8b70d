//! The CUDA backend against MLX's fixtures, the CPU backend and the f64 oracle.
//!
//! Run with `cargo test -p mlxq --features cuda --test cuda_conformance`. Where mlxq is built
//! without the `cuda` feature, or the machine has no NVIDIA driver or GPU, every test prints
//! why it is skipped and passes; any other failure to open the device fails.
//!
//! - quantize and dequantize: bit for bit against MLX 0.32.4 (its CUDA kernels for the GPU
//!   flavour, its CPU for the CPU flavour), and against the CPU backend on random data for
//!   every width (1-bit too), group size, dtype, flavour and output dtype; `dequantize_into`
//!   a poisoned device buffer against the CPU backend.
//! - quantized_matmul (both transposes, M from 1 to 37, odd N), batched W, gather_qmm with
//!   indices on the device: against the f64 reference, outputs poisoned with NaN first
//!   (tolerance: 1e-5 normwise for f32 outputs, 1e-2 for f16/bf16).
//! - graph capture and replay with new inputs; errors (bad device, host buffers, out-of-range
//!   device indices, NVRTC compile errors with the log).

mod common;

use mlxq::reference::{dequantize_f64, matmul_f64, max_rel_err};
use mlxq::{
    ops, Buffer, CommandEncoder, DType, Device, Error, Flavour, QuantMode, QuantSpec,
    QuantizedWeight,
};
use ops::DequantizeOptions;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

const BITS: [u32; 7] = [1, 2, 3, 4, 5, 6, 8];
const GROUPS: [u32; 3] = [32, 64, 128];
const FLOATS: [DType; 3] = [DType::F32, DType::F16, DType::BF16];
const FLAVOURS: [Flavour; 2] = [Flavour::Gpu, Flavour::Cpu];

/// CUDA device 0, or `None` after printing why the tests cannot run here.
fn gpu() -> Option<Device> {
    match Device::cuda(0) {
        Ok(d) => Some(d),
        Err(e @ Error::BackendUnavailable { .. }) => {
            eprintln!("skipped: {e}");
            None
        }
        Err(e) => panic!("opening cuda:0 failed: {e}"),
    }
}

fn randn(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| (0..4).map(|_| rng.gen_range(-1.0f32..1.0)).sum::<f32>())
        .collect()
}

fn up(b: &Buffer, d: &Device) -> Buffer {
    b.to_device(d).unwrap()
}

fn down(b: &Buffer) -> Buffer {
    b.to_host().unwrap()
}

fn weight_to(w: &QuantizedWeight, d: &Device) -> QuantizedWeight {
    QuantizedWeight::new(
        up(w.packed(), d),
        up(w.scales(), d),
        w.biases().map(|b| up(b, d)),
        w.spec(),
    )
    .unwrap()
}

fn weight_down(w: &QuantizedWeight) -> QuantizedWeight {
    QuantizedWeight::new(
        down(w.packed()),
        down(w.scales()),
        w.biases().map(down),
        w.spec(),
    )
    .unwrap()
}

fn assert_none(what: &str, checked: usize, failures: Vec<String>) {
    assert!(checked > 0, "{what}: nothing was checked");
    assert!(
        failures.is_empty(),
        "{what}: {} of {checked} cases failed:\n{}",
        failures.len(),
        failures[..failures.len().min(12)].join("\n")
    );
}

fn same_bytes(what: &str, want: &Buffer, got: &Buffer) -> Option<String> {
    if (want.dtype(), want.shape()) != (got.dtype(), got.shape()) {
        return Some(format!(
            "{what}: got {} {:?}, want {} {:?}",
            got.dtype(),
            got.shape(),
            want.dtype(),
            want.shape()
        ));
    }
    let i = common::first_difference(want, got)?;
    Some(format!(
        "{what}: {} elements differ; first at {i}: want {} got {}",
        common::count_differences(want, got),
        common::show(want, i),
        common::show(got, i)
    ))
}

/// Quantize and dequantize of every fixture of MLX 0.32.4 bit for bit, both flavours: the
/// affine modes (quant.cu) and the FP modes mxfp4, mxfp8 and nvfp4 (fp.cu; no biases, and the
/// fixtures' dequantize asked for the input's dtype), every float dtype and case kind.
#[test]
fn quantize_and_dequantize_match_mlx_fixtures_bit_for_bit() {
    let Some(dev) = gpu() else { return };
    let mut enc = dev.encoder();
    let (mut checked, mut failures) = (0, Vec::new());
    for flavour in FLAVOURS {
        for cfg in common::configs(flavour)
            .into_iter()
            .chain(common::fp_configs(flavour))
        {
            for case in cfg.cases() {
                let ctx = format!("{:?} {} {}", flavour, cfg.tag, case.name);
                checked += 1;
                let qw = ops::quantize(&mut enc, &up(&case.input, &dev), cfg.spec, flavour)
                    .and_then(|q| enc.commit_and_wait().map(|()| q));
                match qw {
                    Err(e) => failures.push(format!("{ctx}: quantize: {e}")),
                    Ok(qw) => {
                        let qw = weight_down(&qw);
                        let mut tensors = vec![
                            ("packed", &case.packed, qw.packed()),
                            ("scales", &case.scales, qw.scales()),
                        ];
                        match (case.biases.as_ref(), qw.biases()) {
                            (Some(want), Some(got)) => tensors.push(("biases", want, got)),
                            (None, None) => {}
                            _ => failures.push(format!("{ctx}: quantize: biases where none")),
                        }
                        for (what, want, got) in tensors {
                            if let Some(f) = same_bytes(what, want, got) {
                                failures.push(format!("{ctx}: quantize {f}"));
                            }
                        }
                    }
                }
                let opts = DequantizeOptions {
                    dtype: (!cfg.spec.has_biases()).then_some(cfg.dtype),
                    flavour,
                };
                match ops::dequantize(&mut enc, &weight_to(&case.weight(cfg.spec), &dev), opts) {
                    Err(e) => failures.push(format!("{ctx}: dequantize: {e}")),
                    Ok(d) => {
                        if let Some(f) = same_bytes("dequantize", &case.dequant, &down(&d)) {
                            failures.push(format!("{ctx}: {f}"));
                        }
                    }
                }
            }
        }
    }
    assert_none("MLX fixtures on CUDA", checked, failures);
}

#[test]
fn quantize_and_dequantize_match_the_cpu_backend_everywhere() {
    let Some(dev) = gpu() else { return };
    let cpu = Device::cpu();
    let (mut genc, mut cenc) = (dev.encoder(), cpu.encoder());
    let mut rng = StdRng::seed_from_u64(5);
    let (mut checked, mut failures) = (0, Vec::new());
    for bits in BITS {
        for g in GROUPS {
            let spec = QuantSpec::affine(bits, g).unwrap();
            for dtype in FLOATS {
                // An odd 3-D stack; rows with ties (multiples of 1/4), constants and tiny values.
                let shape = [3, 7, g as usize * 3];
                let n: usize = shape.iter().product();
                let mut v = randn(&mut rng, n);
                for (i, x) in v.iter_mut().enumerate() {
                    match (i / g as usize) % 5 {
                        1 => *x = (*x * 4.0).round() / 4.0,
                        2 => *x = 0.75,
                        3 => *x *= 1e-6,
                        _ => {}
                    }
                }
                let w = Buffer::from_f32(&v, dtype, &shape).unwrap();
                for flavour in FLAVOURS {
                    checked += 1;
                    let ctx = format!("b{bits} g{g} {dtype} {flavour:?}");
                    let want = ops::quantize(&mut cenc, &w, spec, flavour).unwrap();
                    let got = ops::quantize(&mut genc, &up(&w, &dev), spec, flavour)
                        .map(|q| weight_down(&q));
                    let got = match got {
                        Ok(g) => g,
                        Err(e) => {
                            failures.push(format!("{ctx}: quantize: {e}"));
                            continue;
                        }
                    };
                    for (what, a, b) in [
                        ("packed", want.packed(), got.packed()),
                        ("scales", want.scales(), got.scales()),
                        ("biases", want.biases().unwrap(), got.biases().unwrap()),
                    ] {
                        if let Some(f) = same_bytes(what, a, b) {
                            failures.push(format!("{ctx}: quantize {f}"));
                        }
                    }
                    let wd = weight_to(&want, &dev);
                    for out in FLOATS {
                        let opts = DequantizeOptions {
                            dtype: Some(out),
                            flavour,
                        };
                        let a = ops::dequantize(&mut cenc, &want, opts).unwrap();
                        match ops::dequantize(&mut genc, &wd, opts) {
                            Ok(b) => {
                                if let Some(f) = same_bytes("dequantize", &a, &down(&b)) {
                                    failures.push(format!("{ctx} -> {out}: {f}"));
                                }
                            }
                            Err(e) => failures.push(format!("{ctx} -> {out}: dequantize: {e}")),
                        }
                    }
                }
            }
        }
    }
    genc.commit_and_wait().unwrap();
    assert_none("CUDA vs CPU quantize/dequantize", checked, failures);
}

/// `dequantize_into` a device buffer poisoned with NaN gives the CPU backend's bytes (affine
/// 2-, 3-, 4- and 8-bit, every FP mode; f32, f16 and bf16 outputs), also into a view one
/// element into a larger poisoned buffer (not 16-byte aligned: the kernels' element-by-element
/// stores), whose bytes outside the view stay poisoned; an `out` in host memory is an error
/// naming `out`.
#[test]
fn dequantize_into_a_poisoned_device_buffer_matches_the_cpu_backend() {
    let Some(dev) = gpu() else { return };
    let (mut genc, mut cenc) = (dev.encoder(), Device::cpu().encoder());
    let mut rng = StdRng::seed_from_u64(11);
    let shape = [2, 9, 256];
    let n: usize = shape.iter().product();
    let w = Buffer::from_f32(&randn(&mut rng, n), DType::BF16, &shape).unwrap();
    let specs = [
        QuantSpec::affine(2, 32).unwrap(),
        QuantSpec::affine(3, 64).unwrap(),
        QuantSpec::affine(4, 64).unwrap(),
        QuantSpec::affine(8, 128).unwrap(),
        QuantSpec::new(QuantMode::Mxfp4, 4, 32).unwrap(),
        QuantSpec::new(QuantMode::Mxfp8, 8, 32).unwrap(),
        QuantSpec::new(QuantMode::Nvfp4, 4, 16).unwrap(),
    ];
    let (mut checked, mut failures) = (0, Vec::new());
    for spec in specs {
        for flavour in FLAVOURS {
            let qw = ops::quantize(&mut cenc, &w, spec, flavour).unwrap();
            let wd = weight_to(&qw, &dev);
            for out_dtype in FLOATS {
                for misaligned in [false, true] {
                    checked += 1;
                    let ctx = format!("{spec} {flavour:?} -> {out_dtype} misaligned {misaligned}");
                    let opts = DequantizeOptions {
                        dtype: Some(out_dtype),
                        flavour,
                    };
                    let want = ops::dequantize(&mut cenc, &qw, opts).unwrap();
                    // The view starts one element into its storage (and ends 7 before its end).
                    let pad = if misaligned { 8 } else { 0 };
                    let whole = up(&common::poisoned(out_dtype, &[n + pad]), &dev);
                    let at = if misaligned { out_dtype.size() } else { 0 };
                    let mut out = whole.view(at, out_dtype, &shape).unwrap();
                    if let Err(e) = ops::dequantize_into(&mut genc, &wd, opts, &mut out) {
                        failures.push(format!("{ctx}: dequantize_into: {e}"));
                        continue;
                    }
                    genc.commit_and_wait().unwrap();
                    if let Some(f) = same_bytes("dequantize_into", &want, &down(&out)) {
                        failures.push(format!("{ctx}: {f}"));
                    }
                    let (got, poison) = (down(&whole), common::poisoned(out_dtype, &[n + pad]));
                    let end = at + n * out_dtype.size();
                    let (g, p) = (got.bytes(), poison.bytes());
                    if g[..at] != p[..at] || g[end..] != p[end..] {
                        failures.push(format!("{ctx}: bytes outside the view were written"));
                    }
                }
            }
        }
        let wd = weight_to(
            &ops::quantize(&mut cenc, &w, spec, Flavour::Gpu).unwrap(),
            &dev,
        );
        let mut host = common::poisoned(DType::BF16, &shape);
        let opts = DequantizeOptions {
            dtype: Some(DType::BF16),
            flavour: Flavour::Gpu,
        };
        let e = ops::dequantize_into(&mut genc, &wd, opts, &mut host).unwrap_err();
        assert!(e.to_string().contains("out"), "{spec}: {e}");
    }
    assert_none("CUDA dequantize_into vs CPU", checked, failures);
}

/// `quantize_into` on CUDA writes every byte of a caller-owned, poisoned output, equal to the
/// CPU backend's `quantize`, also when the same output is written twice; an output on another
/// device is refused by name.
#[test]
fn quantize_into_fills_caller_owned_outputs() {
    let Some(dev) = gpu() else { return };
    let cpu = Device::cpu();
    let (mut genc, mut cenc) = (dev.encoder(), cpu.encoder());
    let mut rng = StdRng::seed_from_u64(17);
    let (mut checked, mut failures) = (0, Vec::new());
    // 37 rows (not a multiple of any block), K three groups of 128.
    let shape = [2usize, 37, 384];
    let n: usize = shape.iter().product();
    for bits in BITS {
        for g in GROUPS {
            let spec = QuantSpec::affine(bits, g).unwrap();
            for dtype in FLOATS {
                for flavour in FLAVOURS {
                    let mut out = weight_to(&common::poisoned_weight(&shape, dtype, spec), &dev);
                    // Twice into the same output, from different inputs.
                    for round in 0..2 {
                        checked += 1;
                        let ctx = format!("b{bits} g{g} {dtype} {flavour:?} round {round}");
                        let w = Buffer::from_f32(&randn(&mut rng, n), dtype, &shape).unwrap();
                        let want = ops::quantize(&mut cenc, &w, spec, flavour).unwrap();
                        let wd = up(&w, &dev);
                        if let Err(e) = ops::quantize_into(&mut genc, &wd, spec, flavour, &mut out)
                        {
                            failures.push(format!("{ctx}: {e}"));
                            continue;
                        }
                        genc.commit_and_wait().unwrap();
                        let got = weight_down(&out);
                        for (what, a, b) in [
                            ("packed", want.packed(), got.packed()),
                            ("scales", want.scales(), got.scales()),
                            ("biases", want.biases().unwrap(), got.biases().unwrap()),
                        ] {
                            if let Some(f) = same_bytes(what, a, b) {
                                failures.push(format!("{ctx}: {f}"));
                            }
                        }
                    }
                }
            }
        }
    }
    assert_none("CUDA quantize_into vs CPU quantize", checked, failures);
    // An output in host memory, with a CUDA encoder and input.
    let spec = QuantSpec::affine(4, 64).unwrap();
    let w = up(
        &Buffer::from_f32(&randn(&mut rng, 64 * 128), DType::BF16, &[64, 128]).unwrap(),
        &dev,
    );
    let mut host_out = common::poisoned_weight(&[64, 128], DType::BF16, spec);
    let err = ops::quantize_into(&mut genc, &w, spec, Flavour::Gpu, &mut host_out)
        .expect_err("an output on the host must be refused");
    assert!(
        err.to_string().contains("out"),
        "error should name `out`: {err}"
    );
}

fn tolerance(out: DType) -> f64 {
    if out == DType::F32 {
        1e-5
    } else {
        1e-2
    }
}

fn poisoned_on(dev: &Device, dtype: DType, shape: &[usize]) -> Buffer {
    let n: usize = shape.iter().product();
    up(
        &Buffer::from_f32(&vec![f32::NAN; n], dtype, shape).unwrap(),
        dev,
    )
}

/// Error of `got` (a device buffer) against `want`, or a report of NaN (unwritten) elements.
fn error_of(got: &Buffer, want: &[f64]) -> Result<f64, String> {
    let v: Vec<f64> = down(got)
        .to_f32_vec()
        .unwrap()
        .into_iter()
        .map(f64::from)
        .collect();
    if let Some(i) = v.iter().position(|x| !x.is_finite()) {
        return Err(format!("element {i} of {} not written (NaN)", v.len()));
    }
    Ok(max_rel_err(&v, want))
}

/// One quantized_matmul on CUDA against the f64 oracle; `None` when within tolerance.
#[allow(clippy::too_many_arguments)]
fn check_matmul(
    dev: &Device,
    enc: &mut CommandEncoder,
    rng: &mut StdRng,
    spec: QuantSpec,
    xdt: DType,
    sdt: DType,
    m: usize,
    rows: usize,
    cols: usize,
    transpose: bool,
) -> Option<String> {
    check_matmul_x(
        dev,
        enc,
        rng,
        spec,
        (xdt, 0.0),
        sdt,
        m,
        rows,
        cols,
        transpose,
    )
}

/// [`check_matmul`] with x of normal elements plus `x.1` (an offset makes the two parts of MLX's
/// form `Σ(x·s)·q + Σx·b` large and of opposite signs).
#[allow(clippy::too_many_arguments)]
fn check_matmul_x(
    dev: &Device,
    enc: &mut CommandEncoder,
    rng: &mut StdRng,
    spec: QuantSpec,
    (xdt, offset): (DType, f32),
    sdt: DType,
    m: usize,
    rows: usize,
    cols: usize,
    transpose: bool,
) -> Option<String> {
    let ctx = format!(
        "b{} g{} x {xdt} (+{offset}) scales {sdt} M={m} W {rows}x{cols} transpose={transpose}",
        spec.bits(),
        spec.group_size()
    );
    let mut cenc = Device::cpu().encoder();
    let w = Buffer::from_f32(&randn(rng, rows * cols), sdt, &[rows, cols]).unwrap();
    let qw = ops::quantize(&mut cenc, &w, spec, Flavour::Gpu).unwrap();
    let k = if transpose { cols } else { rows };
    let n = if transpose { rows } else { cols };
    let xv: Vec<f32> = randn(rng, m * k).into_iter().map(|v| v + offset).collect();
    let x = Buffer::from_f32(&xv, xdt, &[m, k]).unwrap();
    let xf: Vec<f64> = x.to_f32_vec().unwrap().into_iter().map(f64::from).collect();
    let want = matmul_f64(&xf, m, &dequantize_f64(&qw).unwrap(), rows, cols, transpose);
    let out_dtype = if xdt == DType::F32 || sdt == DType::F32 {
        DType::F32
    } else {
        xdt
    };
    let mut out = poisoned_on(dev, out_dtype, &[m, n]);
    let r =
        ops::quantized_matmul_into(enc, &up(&x, dev), &weight_to(&qw, dev), transpose, &mut out)
            .and_then(|()| enc.commit_and_wait());
    if let Err(e) = r {
        return Some(format!("{ctx}: {e}"));
    }
    verdict(&ctx, &out, &want, n, out_dtype)
}

/// `None` where `out` ([rows, n] of `dtype`, on the device) is within tolerance of `want`,
/// else what is wrong and where, after `ctx`.
fn verdict(ctx: &str, out: &Buffer, want: &[f64], n: usize, dtype: DType) -> Option<String> {
    match error_of(out, want) {
        Err(e) => Some(format!("{ctx}: {e}")),
        Ok(err) if err > tolerance(dtype) => Some(format!(
            "{ctx}: error {err:.3e}; {}",
            where_wrong(out, want, n, tolerance(dtype))
        )),
        Ok(_) => None,
    }
}

/// Where `got` ([rows, n]) is off `want` by more than `tol` times want's largest magnitude: how
/// many elements, and the first few as (row, column).
fn where_wrong(got: &Buffer, want: &[f64], n: usize, tol: f64) -> String {
    let v = down(got).to_f32_vec().unwrap();
    let scale = want.iter().fold(0f64, |a, w| a.max(w.abs()));
    let bad: Vec<usize> = v
        .iter()
        .zip(want)
        .enumerate()
        // A NaN (an unwritten element) is wrong too: its error is infinite.
        .filter(|(_, (g, w))| mlxq::reference::abs_err(f64::from(**g), **w) > tol * scale)
        .map(|(i, _)| i)
        .collect();
    let first: Vec<String> = bad
        .iter()
        .take(6)
        .map(|i| format!("({}, {})", i / n, i % n))
        .collect();
    format!(
        "{} of {} elements wrong, first {}",
        bad.len(),
        v.len(),
        first.join(" ")
    )
}

#[test]
fn quantized_matmul_matches_the_f64_reference() {
    let Some(dev) = gpu() else { return };
    let mut enc = dev.encoder();
    let mut rng = StdRng::seed_from_u64(17);
    let (mut checked, mut failures) = (0, Vec::new());
    for bits in BITS {
        for g in GROUPS {
            let spec = QuantSpec::affine(bits, g).unwrap();
            let g = g as usize;
            // bf16 everywhere; f32 and f16 (and mixed x/scales) on a subset of widths.
            let mut dts = vec![(DType::BF16, DType::BF16)];
            if g == 64 && matches!(bits, 2 | 3 | 4 | 8) {
                dts.extend([
                    (DType::F32, DType::F32),
                    (DType::F16, DType::F16),
                    (DType::BF16, DType::F32),
                ]);
            }
            for (xdt, sdt) in dts {
                for m in [1, 2, 5, 16, 37] {
                    for transpose in [true, false] {
                        // Odd sizes: W rows not a multiple of the 8 rows a block owns, K not a
                        // multiple of the 1024 codes a warp covers per step.
                        let (rows, cols) = if transpose { (75, g * 5) } else { (77, g * 3) };
                        checked += 1;
                        if let Some(f) = check_matmul(
                            &dev, &mut enc, &mut rng, spec, xdt, sdt, m, rows, cols, transpose,
                        ) {
                            failures.push(f);
                        }
                    }
                }
            }
        }
    }
    assert_none("quantized_matmul on CUDA", checked, failures);
}

/// `transpose = false` (W `[K, N]` quantized along N, `qmv_n`): every width, row tiles of 1, 2,
/// 4 and 16 rows of x, K split over several blocks (a partial last segment and pass), N past
/// one block's 256 columns with a partial last block, and f32 x offset from zero (MLX's form
/// `Σ(x·s)·q + Σx·b`, whose parts then nearly cancel) at f32's 1e-5.
#[test]
fn transpose_false_decode_matches_the_f64_reference() {
    let Some(dev) = gpu() else { return };
    let mut enc = dev.encoder();
    let mut rng = StdRng::seed_from_u64(31);
    let (mut checked, mut failures) = (0, Vec::new());
    for (bits, g) in BITS.map(|b| (b, 64)).into_iter().chain([(4, 32), (4, 128)]) {
        let spec = QuantSpec::affine(bits, g).unwrap();
        let g = g as usize;
        for (xdt, offset) in [(DType::BF16, 0.0), (DType::F32, 3.0)] {
            for m in [1, 3, 16] {
                for k in [70, 1000] {
                    for n in [3 * g, 2048 + g] {
                        checked += 1;
                        if let Some(f) = check_matmul_x(
                            &dev,
                            &mut enc,
                            &mut rng,
                            spec,
                            (xdt, offset),
                            xdt,
                            m,
                            k,
                            n,
                            false,
                        ) {
                            failures.push(f);
                        }
                    }
                }
            }
        }
    }
    assert_none("transpose = false on CUDA", checked, failures);
}

/// The tensor-core kernels (4- and 8-bit W `[N, K]`, f16/bf16 x, half outputs): on Hopper
/// `qmv_decb` (W by bulk copies) for M <= 4 at K = 4096 (8-bit; 4-bit where the row tiles do
/// not fill the SMs, as at 200 rows, or M >= 3), `qmv_dec` for the other M * slots <= 8 where
/// K is a multiple of its load batch (1536, 4096), `qmv_tc` for
/// the other M <= 16 (here the 64-token wgmma tile that would otherwise take M >= 4 leaves
/// SMs idle; one and two n-tiles of 8 tokens; M = 1, 2 at K = 5 groups go to the
/// CUDA-core kernel and are checked here too), `qmm_tc_8` for M = 17, 100, 300 (tiles of 64 tokens, a partial last one), every group size, f16 and bf16 x and scales, rows not a multiple of the 128 a block
/// owns, and long K (split over blocks into f32 partial sums, then added). bf16 x with f32
/// scales has f32 outputs, which stay on the exact CUDA-core kernels (checked at 1e-5).
#[test]
fn tensor_core_matmul_matches_the_f64_reference() {
    let Some(dev) = gpu() else { return };
    let mut enc = dev.encoder();
    let mut rng = StdRng::seed_from_u64(29);
    let (mut checked, mut failures) = (0, Vec::new());
    for bits in [4, 8] {
        for g in GROUPS {
            let spec = QuantSpec::affine(bits, g).unwrap();
            let g = g as usize;
            let dts = [
                (DType::BF16, DType::BF16),
                (DType::F16, DType::F16),
                (DType::BF16, DType::F32),
            ];
            for (i, (xdt, sdt)) in dts.into_iter().enumerate() {
                let ms: Vec<usize> = if i == 0 {
                    (1..=17).chain([100, 300]).collect()
                } else {
                    vec![1, 7, 9, 16, 17, 100]
                };
                for m in ms {
                    for (rows, cols) in [(75, g * 5), (40, 1536), (200, 4096)] {
                        checked += 1;
                        if let Some(f) = check_matmul(
                            &dev, &mut enc, &mut rng, spec, xdt, sdt, m, rows, cols, true,
                        ) {
                            failures.push(f);
                        }
                    }
                }
            }
        }
    }
    assert_none("tensor-core quantized_matmul on CUDA", checked, failures);
}

/// The tiled prefill GEMMs, chosen where their tiles cover 3/4 of the SMs: on Hopper the
/// warp-specialised wgmma kernels (`qmm_ws_256` for the cases with K a multiple of 128 and >=
/// 102 tiles of 256 tokens, `qmm_ws_128` and `qmm_ws_64` for the last five, M = 17 and 20 among
/// them, 64-token tiles with rows past M zero-filled by TMA; TMA and
/// mbarriers), elsewhere and for K = 64 or 192 `qmm_tile_l`: both bit widths, every group, f16
/// and bf16, M and N off the tile sizes (odd N takes the scalar stores), NaN-poisoned outputs.
/// Run with MLXQ_WS=0 for the plain `qmm_wg_*` tiles in their place.
#[test]
fn tiled_prefill_matches_the_f64_reference() {
    let Some(dev) = gpu() else { return };
    let mut enc = dev.encoder();
    let mut rng = StdRng::seed_from_u64(31);
    let cases = [
        (4, 64, DType::BF16, DType::BF16, 4100, 999, 64),
        (4, 32, DType::F16, DType::F16, 4100, 1000, 128),
        (8, 32, DType::F16, DType::F16, 2000, 1700, 128),
        (4, 128, DType::BF16, DType::BF16, 300, 6500, 256),
        (8, 64, DType::BF16, DType::BF16, 300, 6500, 256),
        (8, 128, DType::BF16, DType::BF16, 2000, 1700, 256),
        (4, 64, DType::F16, DType::F16, 1500, 2050, 192),
        (8, 32, DType::BF16, DType::BF16, 700, 3000, 384),
        (4, 64, DType::BF16, DType::BF16, 600, 2000, 512),
        (4, 128, DType::F16, DType::F16, 1000, 1003, 768),
        (4, 64, DType::BF16, DType::BF16, 20, 12800, 256),
        (8, 32, DType::F16, DType::F16, 17, 13000, 128),
    ];
    let mut failures = Vec::new();
    for (bits, g, xdt, sdt, m, rows, cols) in cases {
        let spec = QuantSpec::affine(bits, g).unwrap();
        if let Some(f) = check_matmul(
            &dev, &mut enc, &mut rng, spec, xdt, sdt, m, rows, cols, true,
        ) {
            failures.push(f);
        }
    }
    assert_none("tiled prefill on CUDA", cases.len(), failures);
}

/// `transpose = false` from 8 rows of x (4 where N >= 8192): on Hopper the wgmma tiles of W `[K, N]`
/// (`qmm_wgn_64`, `_128`, `_256`: 64 rows of W per step, movmatrix into the A fragments), for
/// both widths, every group, f16 and bf16, M off the token tiles, and grids of a few blocks
/// to a full machine; and the shapes they leave to `qmv_n`, checked here too: N not a
/// multiple of 128, K not a multiple of 128, and group 128 with an odd count of 128-column
/// blocks (its 4-byte scale unit would cross the row's end). On sm_90 each case must also
/// have run the kernel named.
#[test]
fn transpose_false_prefill_matches_the_f64_reference() {
    let Some(dev) = gpu() else { return };
    let wg = has_wgmma(&dev);
    let mut enc = dev.encoder();
    let mut rng = StdRng::seed_from_u64(37);
    let (bf, f16) = (DType::BF16, DType::F16);
    // "": not a qmm_wgn tile (qmv_n).
    let (t64, t128, t256, qmvn) = ("qmm_wgn_64", "qmm_wgn_128", "qmm_wgn_256", "");
    // (bits, group, x and scales dtype, M, K, N, the kernel on sm_90)
    let cases = [
        (4, 64, bf, 8, 256, 384, t64),
        (4, 64, bf, 4, 256, 8192, t64),
        (4, 64, bf, 4, 256, 4096, qmvn),
        (4, 64, bf, 16, 512, 256, t64),
        (4, 64, bf, 300, 1024, 640, t64),
        (4, 64, bf, 600, 2048, 2048, t64),
        (4, 64, bf, 1024, 256, 4096, t256),
        (8, 64, f16, 128, 128, 12800, t128),
        (8, 64, bf, 100, 512, 1024, t64),
        (8, 64, f16, 1000, 1024, 1024, t64),
        (4, 32, f16, 65, 768, 256, t64),
        (8, 32, f16, 17, 384, 512, t64),
        (8, 32, bf, 129, 256, 128, t64),
        (4, 128, bf, 200, 640, 512, t64),
        (8, 128, f16, 33, 256, 768, t64),
        (4, 128, bf, 40, 256, 640, qmvn),
        (4, 64, bf, 64, 256, 192, qmvn),
        (8, 64, bf, 64, 192, 256, qmvn),
    ];
    let mut failures = Vec::new();
    for (bits, g, dt, m, k, n, kernel) in cases {
        let spec = QuantSpec::affine(bits, g).unwrap();
        if let Some(f) = check_matmul(&dev, &mut enc, &mut rng, spec, dt, dt, m, k, n, false) {
            failures.push(f);
        }
        // The entry, then "/k" and the segments where K was split (split_k_tiles_...).
        let ran = enc.last_kernel().unwrap_or("");
        let right = if kernel.is_empty() {
            !ran.starts_with("qmm_wgn")
        } else {
            ran.split('/').next() == Some(kernel)
        };
        if wg && !right {
            failures.push(format!(
                "b{bits} g{g} M={m} K={k} N={n}: ran {ran}, not {kernel:?}"
            ));
        }
    }
    assert_none("transpose = false prefill on CUDA", cases.len(), failures);
}

/// The wgmma tiles with K split over blocks (f32 partial sums in the scratch, then
/// `qmv_n_reduce`), where their grid leaves SMs idle: W `[K, N]` from M = 8 at 4096 x 4096
/// (32 blocks), a few blocks over K = 1152 (18 steps: segments of 10 and 8) with group 128
/// and f16 scales, group 32, M off the token tile and over two token tiles; W `[N, K]` on the
/// warp-specialised 64-token tile at both widths, K = 4352 in uneven segments, and at
/// M = 4..16 where no decode kernel takes the call. Against the
/// f64 reference, outputs poisoned. On sm_90 each case must also have run the tile it names
/// with K split ("/k" and the segments in the recorded name).
#[test]
fn split_k_tiles_match_the_f64_reference() {
    let Some(dev) = gpu() else { return };
    let wg = has_wgmma(&dev);
    let mut enc = dev.encoder();
    let mut rng = StdRng::seed_from_u64(41);
    let (bf, f16) = (DType::BF16, DType::F16);
    // (bits, group, x and scales dtype, M, K, N, the tile on sm_90)
    let cases = [
        (4, 64, bf, 8, 4096, 4096, "qmm_wgn_64"),
        (8, 64, bf, 16, 4096, 4096, "qmm_wgn_64"),
        (8, 128, f16, 20, 1152, 768, "qmm_wgn_64"),
        (4, 128, f16, 37, 1152, 1024, "qmm_wgn_64"),
        (4, 32, bf, 64, 2048, 1024, "qmm_wgn_64"),
        (8, 32, f16, 100, 2048, 512, "qmm_wgn_64"),
        // transpose = true, M <= 64 where the 64-token tile's blocks fill the SMs only with K
        // split: 32, 16 (6 segments of 10 steps and one of 8), 32 and 32 blocks.
        (4, 64, bf, 32, 4096, 4096, "qmm_ws_64"),
        (4, 128, f16, 40, 4352, 2048, "qmm_ws_64"),
        (4, 32, f16, 64, 2048, 4096, "qmm_ws_64"),
        (8, 64, f16, 24, 4096, 4096, "qmm_ws_64"),
        // M = 4..16 that no decode kernel takes (8-bit from M = 9, or x past the bulk-copy
        // kernel's shared memory; 4-bit where `qmv_decb`'s four n-tiles need N >= 8192): the
        // same tile before `qmv_tc`, 16 blocks in 8 segments.
        (8, 64, bf, 9, 4096, 2048, "qmm_ws_64"),
        (4, 64, bf, 12, 4096, 2048, "qmm_ws_64"),
        (8, 32, f16, 4, 14336, 2048, "qmm_ws_64"),
        (4, 128, bf, 16, 4096, 2048, "qmm_ws_64"),
    ];
    let mut failures = Vec::new();
    for (bits, g, dt, m, k, n, tile) in cases {
        let spec = QuantSpec::affine(bits, g).unwrap();
        // W [K, N] for the qmm_wgn tiles, else W [N, K].
        let t = !tile.starts_with("qmm_wgn");
        let (rows, cols) = if t { (n, k) } else { (k, n) };
        if let Some(f) = check_matmul(&dev, &mut enc, &mut rng, spec, dt, dt, m, rows, cols, t) {
            failures.push(f);
        }
        // transpose = true records the module's name, then the tile.
        let ran = enc.last_kernel().unwrap_or("");
        let ran = ran.rsplit(' ').next().unwrap_or("");
        let split = ran
            .strip_prefix(tile)
            .and_then(|r| r.strip_prefix("/k"))
            .and_then(|r| r.parse::<u32>().ok())
            .is_some_and(|s| s > 1);
        if wg && !split {
            failures.push(format!(
                "b{bits} g{g} M={m} K={k} N={n}: ran {ran}, not {tile} with K split"
            ));
        }
    }
    assert_none("split-K wgmma tiles on CUDA", cases.len(), failures);
}

/// Large-M prefill by cuBLAS (`dq_gemm`: W dequantized into slabs, one GEMM each): every
/// affine width, group and half dtype and MLX's three FP modes from the route's first M, N off the 128-row slab
/// alignment; then the same route captured in a graph and replayed with new x. Where cuBLAS
/// loads, each call must have taken the route; run again with `MLXQ_DQ_SLAB_MB=1`
/// (`tools/cuda_batch.sh`) W is cut into several slabs with a shorter last one.
#[test]
#[cfg(feature = "cuda")]
fn dequant_cublas_prefill_matches_the_f64_reference() {
    let Some(dev) = gpu() else { return };
    let cublas = mlxq::backend::cuda::cublas_available(&dev);
    if !cublas {
        eprintln!("cuBLAS not found: checking the tile route these shapes fall back to");
    }
    let mut enc = dev.encoder();
    let mut rng = StdRng::seed_from_u64(48);
    let (bf, f16) = (DType::BF16, DType::F16);
    // (bits, group, x and scales dtype, M, N, K): 4- and 8-bit from the route's first M on
    // Hopper (3072 / 2048), the other widths from the prefill's first (17).
    let cases = [
        (4, 64, bf, 4100, 1000, 256),
        (4, 32, f16, 3072, 1500, 512),
        (8, 128, bf, 2050, 999, 640),
        (8, 64, f16, 4097, 384, 1024),
        (1, 64, bf, 600, 256, 512),
        (2, 64, bf, 520, 700, 512),
        (3, 32, f16, 530, 300, 768),
        (5, 64, bf, 1024, 520, 512),
        (6, 128, f16, 17, 260, 1024),
    ];
    let mut failures = Vec::new();
    let check_route = |failures: &mut Vec<String>, enc: &CommandEncoder, ctx: &str| {
        let ran = enc.last_kernel().unwrap_or("");
        if cublas && !ran.contains("dq_cublas") {
            failures.push(format!("{ctx}: ran {ran}, not dq_cublas"));
        }
    };
    for (bits, g, dt, m, n, k) in cases {
        let spec = QuantSpec::affine(bits, g).unwrap();
        if let Some(f) = check_matmul(&dev, &mut enc, &mut rng, spec, dt, dt, m, n, k, true) {
            failures.push(f);
        }
        check_route(
            &mut failures,
            &enc,
            &format!("b{bits} g{g} M={m} N={n} K={k}"),
        );
    }
    // MLX's FP modes, from their width's first M.
    let mut cenc = Device::cpu().encoder();
    let fp_cases = [
        (QuantMode::Mxfp4, bf, 3072, 600, 512),
        (QuantMode::Nvfp4, f16, 3100, 300, 256),
        (QuantMode::Mxfp8, bf, 2048, 500, 256),
    ];
    for (mode, dt, m, n, k) in fp_cases {
        let ctx = format!("{mode} x {dt} M={m} N={n} K={k}");
        let w = Buffer::from_f32(&randn(&mut rng, n * k), dt, &[n, k]).unwrap();
        let qw = ops::quantize(&mut cenc, &w, fp_spec(mode), Flavour::Gpu).unwrap();
        if let Some(f) = check_fp_tiled(&dev, &mut enc, &mut rng, &ctx, &qw, dt, m, false) {
            failures.push(f);
        }
        check_route(&mut failures, &enc, &ctx);
    }
    // Captured: two prefill matmuls in one graph, replayed with new x.
    let (m, n, k) = (600, 1100, 1024);
    let spec = QuantSpec::affine(3, 64).unwrap();
    let w = Buffer::from_f32(&randn(&mut rng, n * k), bf, &[n, k]).unwrap();
    let qw = ops::quantize(&mut cenc, &w, spec, Flavour::Gpu).unwrap();
    let wd = dequantize_f64(&qw).unwrap();
    let qg = weight_to(&qw, &dev);
    let new_x = |rng: &mut StdRng| Buffer::from_f32(&randn(rng, m * k), bf, &[m, k]).unwrap();
    let mut x = up(&new_x(&mut rng), &dev);
    let mut y = poisoned_on(&dev, bf, &[m, n]);
    let mut y2 = poisoned_on(&dev, bf, &[m, n]);
    let graph = {
        let (xr, yr, y2r) = (&x, &mut y, &mut y2);
        enc.capture(|e| {
            ops::quantized_matmul_into(e, xr, &qg, true, yr)?;
            ops::quantized_matmul_into(e, xr, &qg, true, y2r)
        })
        .unwrap()
    };
    check_route(&mut failures, &enc, "captured");
    for step in 0..2 {
        let xh = new_x(&mut rng);
        x.copy_from(&xh).unwrap();
        graph.replay().unwrap();
        enc.commit_and_wait().unwrap();
        let xf: Vec<f64> = xh
            .to_f32_vec()
            .unwrap()
            .into_iter()
            .map(f64::from)
            .collect();
        let want = matmul_f64(&xf, m, &wd, n, k, true);
        for out in [&y, &y2] {
            if let Some(f) = verdict(&format!("replay {step}"), out, &want, n, bf) {
                failures.push(f);
            }
        }
    }
    assert_none(
        "dequantized cuBLAS prefill",
        cases.len() + fp_cases.len() + 4,
        failures,
    );
}

#[test]
fn long_rows_and_many_rows() {
    let Some(dev) = gpu() else { return };
    let mut enc = dev.encoder();
    let mut rng = StdRng::seed_from_u64(23);
    let mut failures = Vec::new();
    let cases = [
        (4, 64, 1, 1000, 4096, true),
        (4, 64, 3, 4096, 960, true),
        (8, 128, 16, 256, 8192, true),
        (4, 64, 1, 4096, 512, false),
        (4, 64, 8, 8192, 256, false),
        (6, 32, 4, 300, 2048, true),
        // qmv_dec with the whole row of x in shared memory (8-bit: 57 KB).
        (4, 64, 1, 1000, 14336, true),
        (8, 64, 1, 300, 14336, true),
        (4, 32, 2, 520, 14336, true),
        // The persistent ring decode: several row tiles per block, N not a multiple of 16.
        (4, 64, 2, 20007, 4096, true),
        (4, 128, 1, 9000, 8192, true),
        // The ring: N or K >= 8192 with tile counts that do not divide the resident blocks,
        // odd N, M up to the most one tile serves, every group size, the same shape twice.
        (4, 64, 1, 4099, 8192, true),
        (4, 64, 1, 4099, 8192, true),
        (4, 64, 3, 8200, 4096, true),
        (4, 32, 2, 8195, 2048, true),
        (4, 128, 4, 1003, 16384, true),
        // `qmv_decb`'s step columns (M x groups per batch <= 8): 4-bit group 32 at M = 1 (the
        // 8 columns of one token summed across four lanes), 4-bit group 64 at M = 1 with K
        // = 4096 (five blocks per SM fit), 8-bit group 32 at M = 2.
        (4, 32, 1, 8195, 2048, true),
        (4, 64, 1, 9000, 4096, true),
        (8, 32, 2, 4100, 4096, true),
    ];
    for (bits, g, m, rows, cols, t) in cases {
        let spec = QuantSpec::affine(bits, g).unwrap();
        if let Some(f) = check_matmul(
            &dev,
            &mut enc,
            &mut rng,
            spec,
            DType::BF16,
            DType::BF16,
            m,
            rows,
            cols,
            t,
        ) {
            failures.push(f);
        }
    }
    assert_none("long rows on CUDA", cases.len(), failures);
}

/// Decode for M = 3..16 tokens in the default routing (`qmv_dec` for 4-bit M * slots <= 8,
/// `qmv_tc` with K split over segments for the rest) and, run with MLXQ_DECM=1, on `qmv_decm`
/// (x shared by the row tiles of a block and streamed through shared memory in chunks): 4- and
/// 8-bit, every group size, row counts not a multiple of a block's rows nor of 16, fewer rows
/// than one block, K split into several x chunks or segments (14336 at 8 bits once left the
/// last split-K segments empty, whose NaN partial sums reached the output) and K of one batch;
/// gathered with 3 tokens per expert, and an out-of-range expert whose rows come back NaN
/// while the others are finite.
#[test]
fn many_token_decode_matches_the_f64_reference() {
    let Some(dev) = gpu() else { return };
    let mut enc = dev.encoder();
    let mut rng = StdRng::seed_from_u64(41);
    let (mut checked, mut failures) = (0, Vec::new());
    for (bits, g) in [(4, 64), (4, 32), (4, 128), (8, 64), (8, 32)] {
        let spec = QuantSpec::affine(bits, g).unwrap();
        for m in [3, 4, 6, 8, 11, 16] {
            for (rows, cols) in [
                (1000, 4096),
                (24, 256),
                (136, 14336),
                (77, 512),
                (8500, 512),
                // N >= 8192 and K a multiple of 8 consumers' batches: `qmv_decb`'s 4-consumer
                // tiles at 4-bit M <= 4 and its 8-consumer two and four n-tiles at M = 5..13
                // (M = 16: the 64-token wgmma tile on Hopper),
                // with a partial last row tile.
                (8200, 2048),
            ] {
                checked += 1;
                if let Some(f) = check_matmul(
                    &dev,
                    &mut enc,
                    &mut rng,
                    spec,
                    DType::BF16,
                    DType::BF16,
                    m,
                    rows,
                    cols,
                    true,
                ) {
                    failures.push(f);
                }
            }
        }
    }
    assert_none("many-token decode on CUDA", checked, failures);

    // Gathered: 2 tokens x top-2 of 5 experts, 4 rows of x each; expert index 9 at position 2.
    let mut cenc = Device::cpu().encoder();
    let (experts, n, k, m) = (5, 200, 1024, 4);
    let spec = QuantSpec::affine(4, 64).unwrap();
    let w = Buffer::from_f32(
        &randn(&mut rng, experts * n * k),
        DType::BF16,
        &[experts, n, k],
    )
    .unwrap();
    let qw = ops::quantize(&mut cenc, &w, spec, Flavour::Gpu).unwrap();
    let x = Buffer::from_f32(&randn(&mut rng, 2 * m * k), DType::BF16, &[2, 1, m, k]).unwrap();
    let idx = [3u32, 0, 9, 4];
    let rhs = Buffer::from_slice(&idx, &[2, 2]).unwrap();
    let got = ops::gather_qmm(
        &mut enc,
        &up(&x, &dev),
        &weight_to(&qw, &dev),
        None,
        Some(&up(&rhs, &dev)),
        true,
        false,
    )
    .unwrap();
    match enc.commit_and_wait() {
        Err(Error::IndexOutOfRange { position, .. }) => assert_eq!(position, 2),
        r => panic!("expected IndexOutOfRange, got {r:?}"),
    }
    let v = down(&got).to_f32_vec().unwrap();
    let xf: Vec<f64> = x.to_f32_vec().unwrap().into_iter().map(f64::from).collect();
    let wd = dequantize_f64(&qw).unwrap();
    for (p, &e) in idx.iter().enumerate() {
        let part = &v[p * m * n..(p + 1) * m * n];
        if p == 2 {
            assert!(
                part.iter().all(|y| y.is_nan()),
                "the bad pair's rows are NaN"
            );
            continue;
        }
        let t = p / 2;
        let e = e as usize;
        let want = matmul_f64(
            &xf[t * m * k..(t + 1) * m * k],
            m,
            &wd[e * n * k..(e + 1) * n * k],
            n,
            k,
            true,
        );
        let got: Vec<f64> = part.iter().map(|&y| f64::from(y)).collect();
        assert!(got.iter().all(|y| y.is_finite()), "pair {p} written");
        let err = max_rel_err(&got, &want);
        assert!(err <= tolerance(DType::BF16), "pair {p}: error {err:e}");
    }
}

/// The same decode matmul, many times over one set of inputs, against one f64 reference: the
/// bulk-copy ring (`qmv_decb`) reuses each stage as soon as its consumers release it, and a
/// missing order between their reads and the next copy into the stage showed up as a few wrong
/// outputs in some runs only (8-bit M = 6 and 8 at 8200x2048 on a 2-stage ring, run 20).
/// `MLXQ_TEST_REPEATS` sets the runs per shape (default 6).
#[test]
fn repeated_decode_matches_the_f64_reference_every_time() {
    let Some(dev) = gpu() else { return };
    let repeats: usize = std::env::var("MLXQ_TEST_REPEATS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6);
    let mut enc = dev.encoder();
    let mut cenc = Device::cpu().encoder();
    let mut rng = StdRng::seed_from_u64(43);
    let (mut checked, mut failures) = (0, Vec::new());
    for (bits, m) in [(8, 8), (8, 6), (8, 1), (4, 4), (4, 8), (4, 16)] {
        let (rows, cols) = (8200, 2048);
        let spec = QuantSpec::affine(bits, 64).unwrap();
        let w =
            Buffer::from_f32(&randn(&mut rng, rows * cols), DType::BF16, &[rows, cols]).unwrap();
        let qw = ops::quantize(&mut cenc, &w, spec, Flavour::Gpu).unwrap();
        let x = Buffer::from_f32(&randn(&mut rng, m * cols), DType::BF16, &[m, cols]).unwrap();
        let xf: Vec<f64> = x.to_f32_vec().unwrap().into_iter().map(f64::from).collect();
        let want = matmul_f64(&xf, m, &dequantize_f64(&qw).unwrap(), rows, cols, true);
        let (xd, wd) = (up(&x, &dev), weight_to(&qw, &dev));
        for r in 0..repeats {
            checked += 1;
            let ctx = format!("b{bits} g64 M={m} W {rows}x{cols} run {r}");
            let mut out = poisoned_on(&dev, DType::BF16, &[m, rows]);
            let res = ops::quantized_matmul_into(&mut enc, &xd, &wd, true, &mut out)
                .and_then(|()| enc.commit_and_wait());
            let wrong = match res {
                Err(e) => Some(format!("{ctx}: {e}")),
                Ok(()) => verdict(&ctx, &out, &want, rows, DType::BF16),
            };
            failures.extend(wrong);
        }
    }
    assert_none("repeated decode on CUDA", checked, failures);
}

#[test]
fn batched_weights_broadcast_with_x() {
    let Some(dev) = gpu() else { return };
    let mut enc = dev.encoder();
    let mut cenc = Device::cpu().encoder();
    let mut rng = StdRng::seed_from_u64(29);
    let spec = QuantSpec::affine(4, 64).unwrap();
    let (e, n, k, m) = (3, 40, 256, 2);
    for transpose in [true, false] {
        let (rows, cols) = if transpose { (n, k) } else { (k, 128) };
        let w = Buffer::from_f32(
            &randn(&mut rng, e * rows * cols),
            DType::F32,
            &[e, rows, cols],
        )
        .unwrap();
        let qw = ops::quantize(&mut cenc, &w, spec, Flavour::Gpu).unwrap();
        let kk = if transpose { cols } else { rows };
        // x [2, 1, M, K] against W [3, N, K]: output [2, 3, M, N].
        let x = Buffer::from_f32(&randn(&mut rng, 2 * m * kk), DType::F32, &[2, 1, m, kk]).unwrap();
        let want_host = ops::quantized_matmul(&mut cenc, &x, &qw, transpose).unwrap();
        let got = ops::quantized_matmul(&mut enc, &up(&x, &dev), &weight_to(&qw, &dev), transpose)
            .unwrap();
        enc.commit_and_wait().unwrap();
        let got = down(&got);
        assert_eq!(got.shape(), want_host.shape());
        // The CPU backend is itself checked against the f64 oracle; here each matrix again.
        let xf: Vec<f64> = x.to_f32_vec().unwrap().into_iter().map(f64::from).collect();
        let wd = dequantize_f64(&qw).unwrap();
        let nn = if transpose { rows } else { cols };
        let mut want = Vec::new();
        for b in 0..2 {
            for ei in 0..e {
                let wm = &wd[ei * rows * cols..(ei + 1) * rows * cols];
                want.extend(matmul_f64(
                    &xf[b * m * kk..(b + 1) * m * kk],
                    m,
                    wm,
                    rows,
                    cols,
                    transpose,
                ));
            }
        }
        let g: Vec<f64> = got
            .to_f32_vec()
            .unwrap()
            .into_iter()
            .map(f64::from)
            .collect();
        assert_eq!(g.len(), 2 * e * m * nn);
        let err = max_rel_err(&g, &want);
        assert!(err <= 1e-5, "transpose={transpose}: error {err:e}");
    }
}

/// A one-row-per-pair gather_qmm's output `v` (pairs of `idx`, `top` per token, M = 1) beside
/// its f64 reference from `xf` (tokens × K) and `wd` (experts × rows × cols), leaving out the
/// pair at `bad` (an out-of-range expert), whose row must be all NaN (`Err` if not).
#[allow(clippy::too_many_arguments)]
fn pairs_and_reference(
    v: &[f32],
    xf: &[f64],
    wd: &[f64],
    idx: &[u32],
    top: usize,
    (rows, cols): (usize, usize),
    transpose: bool,
    bad: usize,
) -> Result<(Vec<f64>, Vec<f64>), String> {
    let (k, n) = if transpose {
        (cols, rows)
    } else {
        (rows, cols)
    };
    let (mut got, mut want) = (Vec::new(), Vec::new());
    for (p, &e) in idx.iter().enumerate() {
        let row = &v[p * n..(p + 1) * n];
        if p == bad {
            if !row.iter().all(|y| y.is_nan()) {
                return Err(format!("the out-of-range pair {p}'s row is not NaN"));
            }
            continue;
        }
        let t = p / top;
        got.extend(row.iter().map(|&y| f64::from(y)));
        let we = &wd[e as usize * rows * cols..(e as usize + 1) * rows * cols];
        want.extend(matmul_f64(
            &xf[t * k..(t + 1) * k],
            1,
            we,
            rows,
            cols,
            transpose,
        ));
    }
    Ok((got, want))
}

#[test]
fn gather_qmm_with_device_indices() {
    let Some(dev) = gpu() else { return };
    let mut enc = dev.encoder();
    let mut cenc = Device::cpu().encoder();
    let mut rng = StdRng::seed_from_u64(31);
    // K = 512: a multiple of the decode kernel's load batch, so `qmv_dec` serves transpose.
    let (experts, n, k) = (6, 72, 512);
    for (bits, dtype) in [(4, DType::BF16), (3, DType::F32), (8, DType::F16)] {
        let spec = QuantSpec::affine(bits, 64).unwrap();
        for transpose in [true, false] {
            let (rows, cols) = if transpose { (n, k) } else { (k, 128) };
            let w = Buffer::from_f32(
                &randn(&mut rng, experts * rows * cols),
                dtype,
                &[experts, rows, cols],
            )
            .unwrap();
            let qw = ops::quantize(&mut cenc, &w, spec, Flavour::Gpu).unwrap();
            let (kk, nn) = if transpose {
                (cols, rows)
            } else {
                (rows, cols)
            };
            // 150 x 3, 37 x 6, 420 x 2 and 4200 x 2 pairs: sorted by expert on the device and
            // run as one grouped GEMM (tensor-core keys), tiles of 64, 80 or 128 pairs with
            // partial last tiles (420 x 2 gives each expert more than 128; 4200 x 2 is more
            // pairs than the sort keeps in registers, 8192).
            for (tokens, top, m) in [
                (1, 4, 1),
                (5, 3, 1),
                (4, 2, 3),
                (150, 3, 1),
                (37, 6, 1),
                (420, 2, 1),
                (4200, 2, 1),
            ] {
                let x = Buffer::from_f32(
                    &randn(&mut rng, tokens * m * kk),
                    dtype,
                    &[tokens, 1, m, kk],
                )
                .unwrap();
                let idx: Vec<u32> = (0..tokens * top)
                    .map(|_| rng.gen_range(0..experts as u32))
                    .collect();
                let rhs = Buffer::from_slice(&idx, &[tokens, top]).unwrap();
                let got = ops::gather_qmm(
                    &mut enc,
                    &up(&x, &dev),
                    &weight_to(&qw, &dev),
                    None,
                    Some(&up(&rhs, &dev)),
                    transpose,
                    false,
                )
                .unwrap();
                enc.commit_and_wait().unwrap();
                let xf: Vec<f64> = x.to_f32_vec().unwrap().into_iter().map(f64::from).collect();
                let wd = dequantize_f64(&qw).unwrap();
                let mut want = Vec::new();
                for t in 0..tokens {
                    for j in 0..top {
                        let e = idx[t * top + j] as usize;
                        want.extend(matmul_f64(
                            &xf[t * m * kk..(t + 1) * m * kk],
                            m,
                            &wd[e * rows * cols..(e + 1) * rows * cols],
                            rows,
                            cols,
                            transpose,
                        ));
                    }
                }
                assert_eq!(got.shape(), &[tokens, top, m, nn]);
                let err = error_of(&got, &want).unwrap();
                assert!(
                    err <= tolerance(got.dtype()),
                    "b{bits} {dtype} transpose={transpose} T={tokens}: error {err:e}"
                );
            }
            // An out-of-range expert is reported by the next commit, naming its position:
            // with 2 tokens (the decode path), with 40 and with 1300 (the sorted path, where
            // the pair is left out; 2600 pairs are sorted by three blocks, the bad one in the
            // last). The bad pair's row is NaN, every other row still right.
            let bad = experts as u32 + 3;
            let spread = |pairs: usize, at: usize| {
                let mut v: Vec<u32> = (0..pairs)
                    .map(|i| ((i * 7 + i / 5) % experts) as u32)
                    .collect();
                v[at] = bad;
                v
            };
            for (tokens, idx, position) in [
                (2, vec![1u32, 0, 2, bad], 3),
                (40, spread(80, 77), 77),
                (1300, spread(2600, 2077), 2077),
            ] {
                let x = Buffer::from_f32(&randn(&mut rng, tokens * kk), dtype, &[tokens, 1, 1, kk])
                    .unwrap();
                let rhs = Buffer::from_slice(&idx, &[tokens, 2]).unwrap();
                let got = ops::gather_qmm(
                    &mut enc,
                    &up(&x, &dev),
                    &weight_to(&qw, &dev),
                    None,
                    Some(&up(&rhs, &dev)),
                    transpose,
                    false,
                )
                .unwrap();
                let result = enc.commit_and_wait();
                let v = down(&got).to_f32_vec().unwrap();
                let xf: Vec<f64> = x.to_f32_vec().unwrap().into_iter().map(f64::from).collect();
                let wd = dequantize_f64(&qw).unwrap();
                let (got_ok, want_ok) =
                    pairs_and_reference(&v, &xf, &wd, &idx, 2, (rows, cols), transpose, position)
                        .unwrap_or_else(|e| panic!("T={tokens}: {e}"));
                let err = max_rel_err(&got_ok, &want_ok);
                assert!(
                    err <= tolerance(got.dtype()),
                    "b{bits} {dtype} transpose={transpose} T={tokens} with a bad index: error {err:e}"
                );
                match result {
                    Err(Error::IndexOutOfRange {
                        position: p,
                        index,
                        bound,
                        ..
                    }) => {
                        assert_eq!((p, index, bound), (position, experts as i64 + 3, experts));
                    }
                    r => panic!("expected IndexOutOfRange, got {r:?}"),
                }
                enc.commit_and_wait()
                    .expect("the fault is cleared once reported");
            }
        }
    }
}

const FP_MODES: [QuantMode; 3] = [QuantMode::Mxfp4, QuantMode::Mxfp8, QuantMode::Nvfp4];

/// The affine 4-bit gather's persistent GEMM on permuted x (`qmm_wsp_g80` on sm_90a, or
/// `qmm_wsp3_g80` with `MLXQ_TILE_G=wsp3`: the sort's first kernel copies x with each 64 values
/// of K permuted, the GEMM dequantises codes in that order): 128 tokens x top-4 of 8 experts,
/// routed uniformly (64 pairs per expert on average, the 80-pair tile, some experts over 80)
/// or with pair counts from 5 to 185, so that the items' wgmmas take every width (16 to 80
/// tokens, `WSG_VN`); and 16 tokens x top-4 with 1 to 24 pairs per expert (8 on average:
/// `qmm_wspt_g80`, whose items of at most 4 pairs take x by TMA, the others by cp.async).
/// Every group size, bf16 and f16 x and scales, N not a multiple of the 128- or 192-row item,
/// K of 4 to 12 steps of 64 (each row's scales whole 4-byte units, as the tiles need); against
/// the f64 reference, outputs poisoned. Elsewhere the same calls run the other kernels and are
/// checked the same way.
#[test]
fn persistent_gather_on_permuted_x_matches_the_f64_reference() {
    let Some(dev) = gpu() else { return };
    let wg = has_wgmma(&dev);
    let mut enc = dev.encoder();
    let mut cenc = Device::cpu().encoder();
    let mut rng = StdRng::seed_from_u64(62);
    let (experts, top) = (8, 4);
    // `MLXQ_TILE_G=wsp3` (or `wspt`) runs that form for every routing instead.
    let forced = match std::env::var("MLXQ_TILE_G").as_deref() {
        Ok("wsp3") => Some("qmm_wsp3_g80"),
        Ok("wspt") => Some("qmm_wspt_g80"),
        _ => None,
    };
    let mut failures = Vec::new();
    let cases = [
        (64, DType::BF16, 200, 256),
        (32, DType::F16, 136, 384),
        (128, DType::BF16, 72, 768),
        (64, DType::F16, 256, 512),
    ];
    let mut checked = 0;
    for (g, dt, n, k) in cases {
        let spec = QuantSpec::affine(4, g).unwrap();
        let w = Buffer::from_f32(&randn(&mut rng, experts * n * k), dt, &[experts, n, k]).unwrap();
        let qw = ops::quantize(&mut cenc, &w, spec, Flavour::Gpu).unwrap();
        let wd = dequantize_f64(&qw).unwrap();
        let qg = weight_to(&qw, &dev);
        // Uniform routing for groups 64 (experts of 64 +- 8 pairs), or pair counts that give
        // the persistent form's items every wgmma width (16 to 80 tokens, and 185: 80 + 80 +
        // 25); then few pairs per expert, items of 1 to 4 pairs among them.
        let counts: [&[usize]; 2] = [
            &[5, 20, 40, 52, 60, 70, 80, 185],
            &[1, 2, 3, 4, 5, 9, 16, 24],
        ];
        for (few, counts) in [(false, counts[0]), (true, counts[1])] {
            let tokens = counts.iter().sum::<usize>() / top;
            let idx: Vec<u32> = if g == 64 && !few {
                (0..tokens * top)
                    .map(|_| rng.gen_range(0..experts as u32))
                    .collect()
            } else {
                let mut v: Vec<u32> = (0..experts as u32)
                    .flat_map(|e| std::iter::repeat_n(e, counts[e as usize]))
                    .collect();
                v.shuffle(&mut rng);
                v
            };
            let x = Buffer::from_f32(&randn(&mut rng, tokens * k), dt, &[tokens, 1, 1, k]).unwrap();
            let rhs = Buffer::from_slice(&idx, &[tokens, top]).unwrap();
            let mut y = poisoned_on(&dev, dt, &[tokens, top, 1, n]);
            let (xd, rd) = (up(&x, &dev), up(&rhs, &dev));
            ops::gather_qmm_into(&mut enc, &xd, &qg, None, Some(&rd), true, false, &mut y).unwrap();
            enc.commit_and_wait().unwrap();
            let ran = enc.last_kernel().unwrap_or("").to_string();
            let xf: Vec<f64> = x.to_f32_vec().unwrap().into_iter().map(f64::from).collect();
            let v = down(&y).to_f32_vec().unwrap();
            let (got, want) =
                pairs_and_reference(&v, &xf, &wd, &idx, top, (n, k), true, usize::MAX).unwrap();
            let ctx = format!("g{g} {dt} N={n} K={k} {tokens} tokens ({ran})");
            checked += 1;
            let err = max_rel_err(&got, &want);
            if got.iter().any(|y| !y.is_finite()) || err > tolerance(dt) {
                failures.push(format!("{ctx}: error {err:e}"));
            }
            let form = forced.unwrap_or(if few { "qmm_wspt_g80" } else { "qmm_wsp_g80" });
            if wg && ran != form {
                failures.push(format!("{ctx}: ran {ran}, not {form}"));
            }
        }
    }
    assert_none("the persistent gather on permuted x", checked, failures);
}

fn fp_spec(mode: QuantMode) -> QuantSpec {
    let (bits, g) = QuantSpec::fp_defaults(mode);
    QuantSpec::new(mode, bits, g).unwrap()
}

/// quantized_matmul with FP weights (fp.cu) against the f64 reference of the dequantized
/// weights: every mode and float dtype (x's, which is the output's), M = 1, 3, 9 and 33 (the
/// row tiles of 1, 4 and 8 and several tiles), both layouts, N not a multiple of the 4 rows a
/// block owns; outputs poisoned with NaN. Dequantize on the device agrees with the CPU's too.
#[test]
fn fp_quantized_matmul_matches_the_f64_reference() {
    let Some(dev) = gpu() else { return };
    let mut enc = dev.encoder();
    let mut cenc = Device::cpu().encoder();
    let mut rng = StdRng::seed_from_u64(41);
    let (mut checked, mut failures) = (0, Vec::new());
    for mode in FP_MODES {
        let spec = fp_spec(mode);
        for xdt in FLOATS {
            for transpose in [true, false] {
                // transpose: W [N, K] = 37 x 160; else W [K, N] = 70 x 96.
                let (rows, cols) = if transpose { (37, 160) } else { (70, 96) };
                let w =
                    Buffer::from_f32(&randn(&mut rng, rows * cols), xdt, &[rows, cols]).unwrap();
                let qw = ops::quantize(&mut cenc, &w, spec, Flavour::Gpu).unwrap();
                let wd = dequantize_f64(&qw).unwrap();
                let (k, n) = if transpose {
                    (cols, rows)
                } else {
                    (rows, cols)
                };
                for m in [1usize, 3, 9, 33] {
                    let ctx = format!("{mode} x {xdt} M={m} W {rows}x{cols} transpose={transpose}");
                    checked += 1;
                    let x = Buffer::from_f32(&randn(&mut rng, m * k), xdt, &[m, k]).unwrap();
                    let xf: Vec<f64> = x.to_f32_vec().unwrap().into_iter().map(f64::from).collect();
                    let want = matmul_f64(&xf, m, &wd, rows, cols, transpose);
                    let mut out = poisoned_on(&dev, xdt, &[m, n]);
                    let r = ops::quantized_matmul_into(
                        &mut enc,
                        &up(&x, &dev),
                        &weight_to(&qw, &dev),
                        transpose,
                        &mut out,
                    )
                    .and_then(|()| enc.commit_and_wait());
                    match r {
                        Err(e) => failures.push(format!("{ctx}: {e}")),
                        Ok(()) => failures.extend(verdict(&ctx, &out, &want, n, xdt)),
                    }
                }
                // Dequantize on the device, both flavours, against the CPU backend's.
                for flavour in FLAVOURS {
                    checked += 1;
                    let opts = DequantizeOptions {
                        dtype: Some(xdt),
                        flavour,
                    };
                    let want = ops::dequantize(&mut cenc, &qw, opts).unwrap();
                    let got = ops::dequantize(&mut enc, &weight_to(&qw, &dev), opts)
                        .and_then(|d| enc.commit_and_wait().map(|()| d));
                    match got {
                        Err(e) => failures.push(format!("{mode} {xdt} dequantize: {e}")),
                        Ok(d) => failures.extend(
                            same_bytes("dequantize", &want, &down(&d))
                                .map(|f| format!("{mode} {xdt} {flavour:?}: {f}")),
                        ),
                    }
                }
            }
        }
    }
    assert_none("FP quantized_matmul on CUDA", checked, failures);
}

/// The FP matmul decodes every element code as MLX does: weights of random codes (every E2M1
/// code; every E4M3 code but NaN) with random scales against the f64 reference, both layouts;
/// and an E4M3 NaN code (0x7f, 0xff) makes its outputs NaN, as MLX 0.32.4's matmul does.
#[test]
fn fp_matmul_reads_every_element_code() {
    let Some(dev) = gpu() else { return };
    let mut enc = dev.encoder();
    let mut rng = StdRng::seed_from_u64(47);
    for mode in FP_MODES {
        let spec = fp_spec(mode);
        let (bits, g) = (spec.bits() as usize, spec.group_size() as usize);
        for transpose in [true, false] {
            let (rows, cols) = if transpose { (24, 256) } else { (256, 64) };
            let mut bytes: Vec<u8> = (0..rows * cols * bits / 8).map(|_| rng.gen()).collect();
            if bits == 8 {
                for b in &mut bytes {
                    if *b & 0x7f == 0x7f {
                        *b -= 1;
                    }
                }
            }
            // E8M0 2^-4..2^3; nvfp4's E4M3 scales 0.25..1.875 (positive, not NaN).
            let scale = |r: &mut StdRng| -> u8 {
                if mode == QuantMode::Nvfp4 {
                    r.gen_range(0x28..0x3f)
                } else {
                    r.gen_range(123..131)
                }
            };
            let sc: Vec<u8> = (0..rows * cols / g).map(|_| scale(&mut rng)).collect();
            let make = |bytes: &[u8]| {
                QuantizedWeight::new(
                    Buffer::from_bytes(bytes, DType::U32, &[rows, cols * bits / 32]).unwrap(),
                    Buffer::from_bytes(&sc, DType::U8, &[rows, cols / g]).unwrap(),
                    None,
                    spec,
                )
                .unwrap()
            };
            let qw = make(&bytes);
            let wd = dequantize_f64(&qw).unwrap();
            let (k, n) = if transpose {
                (cols, rows)
            } else {
                (rows, cols)
            };
            for xdt in [DType::F32, DType::BF16] {
                let m = 3;
                let x = Buffer::from_f32(&randn(&mut rng, m * k), xdt, &[m, k]).unwrap();
                let xf: Vec<f64> = x.to_f32_vec().unwrap().into_iter().map(f64::from).collect();
                let want = matmul_f64(&xf, m, &wd, rows, cols, transpose);
                let mut out = poisoned_on(&dev, xdt, &[m, n]);
                ops::quantized_matmul_into(
                    &mut enc,
                    &up(&x, &dev),
                    &weight_to(&qw, &dev),
                    transpose,
                    &mut out,
                )
                .and_then(|()| enc.commit_and_wait())
                .unwrap();
                let ctx = format!("{mode} {xdt} transpose={transpose}");
                assert_eq!(verdict(&ctx, &out, &want, n, xdt), None);
            }
            if bits == 8 {
                // A NaN code in W row 5 at its element 20 (0x7f) and in row 9 at element 3
                // (0xff): the outputs they feed are NaN, the others finite.
                let mut nan = bytes.clone();
                nan[5 * cols + 20] = 0x7f;
                nan[9 * cols + 3] = 0xff;
                let qw = make(&nan);
                let x = Buffer::from_f32(&randn(&mut rng, 2 * k), DType::BF16, &[2, k]).unwrap();
                let out = ops::quantized_matmul(
                    &mut enc,
                    &up(&x, &dev),
                    &weight_to(&qw, &dev),
                    transpose,
                )
                .unwrap();
                enc.commit_and_wait().unwrap();
                let v = down(&out).to_f32_vec().unwrap();
                // transpose: W row r feeds output column r; else element c of a row feeds
                // output column c.
                let hit = |c: usize| {
                    if transpose {
                        c == 5 || c == 9
                    } else {
                        c == 20 || c == 3
                    }
                };
                for (i, y) in v.iter().enumerate() {
                    assert_eq!(
                        y.is_nan(),
                        hit(i % n),
                        "{mode} transpose={transpose} output {i}: {y}"
                    );
                }
            }
        }
    }
}

/// gather_qmm with FP experts and device indices: each (token, expert) pair against the f64
/// reference, both layouts; an out-of-range expert gives NaN in its row and the error at the
/// next commit.
#[test]
fn fp_gather_qmm_with_device_indices() {
    let Some(dev) = gpu() else { return };
    let mut enc = dev.encoder();
    let mut cenc = Device::cpu().encoder();
    let mut rng = StdRng::seed_from_u64(43);
    let (experts, n, k) = (5, 40, 128);
    for (mode, dtype) in [
        (QuantMode::Mxfp4, DType::BF16),
        (QuantMode::Mxfp8, DType::F16),
        (QuantMode::Nvfp4, DType::F32),
    ] {
        let spec = fp_spec(mode);
        for transpose in [true, false] {
            let (rows, cols) = if transpose { (n, k) } else { (k, 64) };
            let w = Buffer::from_f32(
                &randn(&mut rng, experts * rows * cols),
                dtype,
                &[experts, rows, cols],
            )
            .unwrap();
            let qw = ops::quantize(&mut cenc, &w, spec, Flavour::Gpu).unwrap();
            let wd = dequantize_f64(&qw).unwrap();
            let (kk, nn) = if transpose {
                (cols, rows)
            } else {
                (rows, cols)
            };
            let (tokens, top) = (7, 3);
            let x = Buffer::from_f32(&randn(&mut rng, tokens * kk), dtype, &[tokens, 1, 1, kk])
                .unwrap();
            let mut idx: Vec<u32> = (0..tokens * top)
                .map(|_| rng.gen_range(0..experts as u32))
                .collect();
            let bad_at = 11;
            idx[bad_at] = experts as u32 + 2;
            let rhs = Buffer::from_slice(&idx, &[tokens, top]).unwrap();
            let got = ops::gather_qmm(
                &mut enc,
                &up(&x, &dev),
                &weight_to(&qw, &dev),
                None,
                Some(&up(&rhs, &dev)),
                transpose,
                false,
            )
            .unwrap();
            let result = enc.commit_and_wait();
            assert_eq!(got.shape(), &[tokens, top, 1, nn]);
            let v = down(&got).to_f32_vec().unwrap();
            let xf: Vec<f64> = x.to_f32_vec().unwrap().into_iter().map(f64::from).collect();
            let (got_ok, want_ok) =
                pairs_and_reference(&v, &xf, &wd, &idx, top, (rows, cols), transpose, bad_at)
                    .unwrap_or_else(|e| panic!("{mode}: {e}"));
            let err = max_rel_err(&got_ok, &want_ok);
            assert!(
                err <= tolerance(dtype),
                "{mode} {dtype} transpose={transpose}: error {err:e}"
            );
            match result {
                Err(Error::IndexOutOfRange {
                    position, bound, ..
                }) => assert_eq!((position, bound), (bad_at, experts)),
                r => panic!("{mode}: expected IndexOutOfRange, got {r:?}"),
            }
            enc.commit_and_wait()
                .expect("the fault is cleared once reported");
        }
    }
}

/// Whether this GPU runs the wgmma tiles (sm_90a), which the FP modes' prefill and sorted
/// gather take there.
fn has_wgmma(dev: &Device) -> bool {
    #[cfg(feature = "cuda")]
    {
        dev.cuda_state().is_ok_and(|c| c.arch() == 90)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = dev;
        false
    }
}

/// One FP-mode matmul of `qw` on the device against the f64 reference (outputs poisoned);
/// where `tiles`, it must have run on the FP wgmma tiles (`fp_tiles`).
#[allow(clippy::too_many_arguments)]
fn check_fp_tiled(
    dev: &Device,
    enc: &mut CommandEncoder,
    rng: &mut StdRng,
    ctx: &str,
    qw: &QuantizedWeight,
    xdt: DType,
    m: usize,
    tiles: bool,
) -> Option<String> {
    let (n, k) = (qw.rows(), qw.cols());
    let x = Buffer::from_f32(&randn(rng, m * k), xdt, &[m, k]).unwrap();
    let xf: Vec<f64> = x.to_f32_vec().unwrap().into_iter().map(f64::from).collect();
    let want = matmul_f64(&xf, m, &dequantize_f64(qw).unwrap(), n, k, true);
    let mut out = poisoned_on(dev, xdt, &[m, n]);
    let r = ops::quantized_matmul_into(enc, &up(&x, dev), &weight_to(qw, dev), true, &mut out)
        .and_then(|()| enc.commit_and_wait());
    if let Err(e) = r {
        return Some(format!("{ctx}: {e}"));
    }
    let ran = enc.last_kernel().unwrap_or("").to_string();
    if tiles && !ran.contains("fp_tiles") {
        return Some(format!("{ctx}: ran {ran}, not the FP wgmma tiles"));
    }
    verdict(ctx, &out, &want, n, xdt)
}

/// MLX's FP modes on the tensor cores (the wgmma tiles of sm_90a, `fp_tiles`): prefill shapes
/// that reach the 64-, 128- and 256-token tiles (M = 40, 1500, 300), every mode with bf16 and
/// f16 x, weights quantized from random data and weights of random codes (every E2M1 code,
/// every E4M3 code, random scales); an E4M3 NaN code makes exactly the outputs it feeds NaN;
/// and a gather_qmm of 256 tokens x top-4 of 16 experts, sorted by expert on the device, with
/// one out-of-range expert. Against the f64 reference, outputs poisoned. Without sm_90a the
/// same calls run fp.cu's kernels and are checked the same way.
#[test]
fn fp_tiled_prefill_and_gather_match_the_f64_reference() {
    let Some(dev) = gpu() else { return };
    let tiles = has_wgmma(&dev);
    let mut enc = dev.encoder();
    let mut cenc = Device::cpu().encoder();
    let mut rng = StdRng::seed_from_u64(53);
    let (mut checked, mut failures) = (0, Vec::new());
    for mode in FP_MODES {
        let spec = fp_spec(mode);
        for xdt in [DType::BF16, DType::F16] {
            for (m, rows, cols) in [(40, 13000, 384), (300, 6500, 256), (1500, 1100, 512)] {
                let ctx = format!("{mode} x {xdt} M={m} W {rows}x{cols}");
                let w =
                    Buffer::from_f32(&randn(&mut rng, rows * cols), xdt, &[rows, cols]).unwrap();
                let qw = ops::quantize(&mut cenc, &w, spec, Flavour::Gpu).unwrap();
                checked += 1;
                failures.extend(check_fp_tiled(
                    &dev, &mut enc, &mut rng, &ctx, &qw, xdt, m, tiles,
                ));
            }
        }
        // Random codes and scales, M = 40 on the 64-token tile; mxfp8's NaN codes.
        let (m, rows, cols) = (40, 13000, 384);
        for xdt in [DType::BF16, DType::F16] {
            let ctx = format!("{mode} x {xdt} random codes M={m} W {rows}x{cols}");
            let qw = fp_random_weight(&mut rng, mode, rows, cols, false, None);
            checked += 1;
            failures.extend(check_fp_tiled(
                &dev, &mut enc, &mut rng, &ctx, &qw, xdt, m, tiles,
            ));
        }
        if mode == QuantMode::Mxfp8 {
            checked += 1;
            failures.extend(check_nan_codes(&dev, &mut enc, &mut rng, rows, cols, m));
        }
    }
    // gather_qmm: 256 tokens x top-4 of 16 experts [512, 256], one pair out of range.
    for (mode, xdt) in FP_GATHER_CASES {
        checked += 1;
        failures.extend(check_fp_gather(
            &dev,
            &mut enc,
            &mut rng,
            (mode, xdt),
            (16, 512, 256),
            (256, 4, 301),
            tiles,
        ));
    }
    assert_none("FP modes on the tensor-core tiles", checked, failures);
}

#[test]
#[cfg(feature = "cuda")]
fn graph_capture_replays_with_new_inputs() {
    let Some(dev) = gpu() else { return };
    let mut enc = dev.encoder();
    let mut cenc = Device::cpu().encoder();
    let mut rng = StdRng::seed_from_u64(37);
    let spec = QuantSpec::affine(4, 64).unwrap();
    let (n, k) = (512, 1024);
    let w = Buffer::from_f32(&randn(&mut rng, n * k), DType::BF16, &[n, k]).unwrap();
    let qw = ops::quantize(&mut cenc, &w, spec, Flavour::Gpu).unwrap();
    let wd = dequantize_f64(&qw).unwrap();
    let qg = weight_to(&qw, &dev);
    let new_x = |rng: &mut StdRng| Buffer::from_f32(&randn(rng, k), DType::BF16, &[1, k]).unwrap();
    let x0 = new_x(&mut rng);
    let mut x = up(&x0, &dev);
    let mut y = poisoned_on(&dev, DType::BF16, &[1, n]);
    let mut y2 = poisoned_on(&dev, DType::BF16, &[1, n]);
    let graph = {
        let (xr, yr, y2r) = (&x, &mut y, &mut y2);
        enc.capture(|e| {
            ops::quantized_matmul_into(e, xr, &qg, true, yr)?;
            ops::quantized_matmul_into(e, xr, &qg, true, y2r)
        })
        .unwrap()
    };
    for step in 0..3 {
        let xh = new_x(&mut rng);
        x.copy_from(&xh).unwrap();
        graph.replay().unwrap();
        enc.commit_and_wait().unwrap();
        let xf: Vec<f64> = xh
            .to_f32_vec()
            .unwrap()
            .into_iter()
            .map(f64::from)
            .collect();
        let want = matmul_f64(&xf, 1, &wd, n, k, true);
        for out in [&y, &y2] {
            let err = error_of(out, &want).unwrap();
            assert!(err <= 1e-2, "replay {step}: error {err:e}");
        }
    }
}

/// A Mixture-of-Experts step as a graph: `gather_qmm_into` (indices on the device, a
/// caller-owned output) captured once, replayed with new x and new expert indices. One token
/// (the decode kernels) and 150 (sorted by expert on the device, a grouped GEMM).
#[test]
#[cfg(feature = "cuda")]
fn gather_into_captured_in_a_graph_replays_with_new_indices() {
    let Some(dev) = gpu() else { return };
    let mut enc = dev.encoder();
    let mut cenc = Device::cpu().encoder();
    let mut rng = StdRng::seed_from_u64(41);
    let (experts, n, k, top) = (8, 256, 1024, 2);
    let spec = QuantSpec::affine(4, 64).unwrap();
    let w = Buffer::from_f32(
        &randn(&mut rng, experts * n * k),
        DType::BF16,
        &[experts, n, k],
    )
    .unwrap();
    let qw = ops::quantize(&mut cenc, &w, spec, Flavour::Gpu).unwrap();
    let wd = dequantize_f64(&qw).unwrap();
    let qg = weight_to(&qw, &dev);
    // 256 tokens x top-2 of 8: 64 pairs per expert, the affine 4-bit persistent GEMM on x
    // permuted by the sort (qmm_wsp_g80 on sm_90a), the permutation replayed with new x.
    for tokens in [1, 150, 256] {
        let new_x = |rng: &mut StdRng| {
            Buffer::from_f32(&randn(rng, tokens * k), DType::BF16, &[tokens, 1, 1, k]).unwrap()
        };
        let new_idx = |rng: &mut StdRng| -> Vec<u32> {
            (0..tokens * top)
                .map(|_| rng.gen_range(0..experts as u32))
                .collect()
        };
        let mut x = up(&new_x(&mut rng), &dev);
        let mut rhs = up(
            &Buffer::from_slice(&new_idx(&mut rng), &[tokens, top]).unwrap(),
            &dev,
        );
        let mut y = poisoned_on(&dev, DType::BF16, &[tokens, top, 1, n]);
        let graph = {
            let (xr, rr, yr) = (&x, &rhs, &mut y);
            enc.capture(|e| ops::gather_qmm_into(e, xr, &qg, None, Some(rr), true, false, yr))
                .unwrap()
        };
        for step in 0..3 {
            let (xh, idx) = (new_x(&mut rng), new_idx(&mut rng));
            x.copy_from(&xh).unwrap();
            rhs.copy_from(&Buffer::from_slice(&idx, &[tokens, top]).unwrap())
                .unwrap();
            graph.replay().unwrap();
            enc.commit_and_wait().unwrap();
            let xf: Vec<f64> = xh
                .to_f32_vec()
                .unwrap()
                .into_iter()
                .map(f64::from)
                .collect();
            let mut want = Vec::new();
            for (i, &e) in idx.iter().enumerate() {
                let t = i / top;
                let we = &wd[e as usize * n * k..(e as usize + 1) * n * k];
                want.extend(matmul_f64(&xf[t * k..(t + 1) * k], 1, we, n, k, true));
            }
            let err = error_of(&y, &want).unwrap();
            assert!(err <= 1e-2, "{tokens} tokens, replay {step}: error {err:e}");
        }
    }
}

#[test]
#[cfg(feature = "cuda")]
fn errors_are_clear() {
    let Some(dev) = gpu() else { return };
    assert!(matches!(
        Device::cuda(999),
        Err(Error::BackendUnavailable { .. })
    ));
    let host = Buffer::from_f32(&[1.0; 64], DType::F32, &[1, 64]).unwrap();
    let mut enc = dev.encoder();
    let spec = QuantSpec::affine(4, 64).unwrap();
    assert!(matches!(
        ops::quantize(&mut enc, &host, spec, Flavour::Gpu),
        Err(Error::DeviceMismatch { .. })
    ));
    let on_gpu = up(&host, &dev);
    assert!(matches!(
        on_gpu.to_vec::<f32>(),
        Err(Error::DeviceMismatch { .. })
    ));
    assert!(on_gpu.bytes().is_empty());
    assert_eq!(down(&on_gpu).to_vec::<f32>().unwrap(), vec![1.0; 64]);
    let broken = "extern \"C\" __global__ void broken() { this is not C++; }";
    match dev
        .cuda_state()
        .unwrap()
        .compile_source("broken", broken, &["broken"])
    {
        Err(Error::KernelCompile { log, .. }) => assert!(log.contains("error"), "log: {log}"),
        r => panic!("expected a compile error with NVRTC's log, got {r:?}"),
    }
}

/// Needs NVRTC only (no GPU): every kernel source compiles for Hopper.
#[test]
#[cfg(feature = "cuda")]
fn every_kernel_compiles_for_sm90() {
    match mlxq::backend::cuda::compile_all_kernels(90) {
        Ok(n) => assert!(n >= 21, "built {n} modules"),
        Err(Error::Cuda { cause, .. }) if cause.contains("libnvrtc was not found") => {
            eprintln!("skipped: {cause}")
        }
        Err(e) => panic!("{e}"),
    }
}

#[test]
#[cfg(not(feature = "cuda"))]
fn without_the_feature_cuda_is_unavailable() {
    assert!(matches!(
        Device::cuda(0),
        Err(Error::BackendUnavailable { .. })
    ));
}

/// W of random FP codes and scales (E8M0 2^-6..2^5, mxfp8 2^-10..2^1 so that its elements of
/// up to 448 keep f16 outputs finite; nvfp4's E4M3 2^-8..1.875, subnormal scales included):
/// every E2M1 and E4M3 code, mxfp8 without its NaN codes unless `nan`, which puts one in W row
/// 5 (0x7f, element 20) and one in row 9 (0xff, element 3). `codes` replaces the scale codes'
/// range.
fn fp_random_weight(
    rng: &mut StdRng,
    mode: QuantMode,
    rows: usize,
    cols: usize,
    nan: bool,
    codes: Option<std::ops::Range<u8>>,
) -> QuantizedWeight {
    let spec = fp_spec(mode);
    let (bits, g) = (spec.bits() as usize, spec.group_size() as usize);
    let mut bytes: Vec<u8> = (0..rows * cols * bits / 8).map(|_| rng.gen()).collect();
    if bits == 8 {
        for b in &mut bytes {
            if *b & 0x7f == 0x7f {
                *b -= 1;
            }
        }
        if nan {
            bytes[5 * cols + 20] = 0x7f;
            bytes[9 * cols + 3] = 0xff;
        }
    }
    let range = codes.unwrap_or(match mode {
        QuantMode::Nvfp4 => 0x02..0x3f,
        QuantMode::Mxfp8 => 117..129,
        _ => 121..133,
    });
    let sc: Vec<u8> = (0..rows * cols / g)
        .map(|_| rng.gen_range(range.clone()))
        .collect();
    QuantizedWeight::new(
        Buffer::from_bytes(&bytes, DType::U32, &[rows, cols * bits / 32]).unwrap(),
        Buffer::from_bytes(&sc, DType::U8, &[rows, cols / g]).unwrap(),
        None,
        spec,
    )
    .unwrap()
}

/// mxfp8 W with NaN codes in rows 5 and 9 (`fp_random_weight`) against M rows of bf16 x:
/// exactly output columns 5 and 9 must be NaN.
fn check_nan_codes(
    dev: &Device,
    enc: &mut CommandEncoder,
    rng: &mut StdRng,
    rows: usize,
    cols: usize,
    m: usize,
) -> Option<String> {
    let qw = fp_random_weight(rng, QuantMode::Mxfp8, rows, cols, true, None);
    let x = Buffer::from_f32(&randn(rng, m * cols), DType::BF16, &[m, cols]).unwrap();
    let out = ops::quantized_matmul(enc, &up(&x, dev), &weight_to(&qw, dev), true)
        .and_then(|o| enc.commit_and_wait().map(|()| o));
    let v = match out {
        Ok(o) => down(&o).to_f32_vec().unwrap(),
        Err(e) => return Some(format!("mxfp8 NaN codes M={m}: {e}")),
    };
    let wrong: Vec<usize> = (0..v.len())
        .filter(|&i| v[i].is_nan() != matches!(i % rows, 5 | 9))
        .collect();
    (!wrong.is_empty()).then(|| {
        format!(
            "mxfp8 NaN codes M={m} W {rows}x{cols}: {} outputs wrong, first {}",
            wrong.len(),
            wrong[0]
        )
    })
}

/// MLX's FP modes in decode (M <= 16, on sm_90a the FP module's bulk-copy decode kernel,
/// `fp_tiles`): M = 1, 3, 8, 9 and 16 over shapes that take its 4- and 8-consumer forms
/// (N >= 8192 at M <= 4; K not a multiple of 8 batches) and one and two n-tiles, N not a
/// multiple of 16; every mode with bf16 and f16 x; weights quantized from random data and of random
/// codes and scales; mxfp8's NaN codes; and a one-token gather_qmm (top-8 of 16 experts, one
/// out of range). Against the f64 reference, outputs poisoned. Without sm_90a the same calls
/// run fp.cu's kernels and are checked the same way.
#[test]
fn fp_decode_matches_the_f64_reference() {
    let Some(dev) = gpu() else { return };
    let tiles = has_wgmma(&dev);
    let mut enc = dev.encoder();
    let mut cenc = Device::cpu().encoder();
    let mut rng = StdRng::seed_from_u64(59);
    let (mut checked, mut failures) = (0, Vec::new());
    let shapes = [
        (1, 8320, 2048),
        (3, 1000, 4096),
        (8, 2050, 3072),
        (9, 700, 2048),
        (16, 4100, 2048),
    ];
    for mode in FP_MODES {
        let spec = fp_spec(mode);
        for xdt in [DType::BF16, DType::F16] {
            for (m, rows, cols) in shapes {
                let ctx = format!("{mode} x {xdt} M={m} W {rows}x{cols}");
                let w =
                    Buffer::from_f32(&randn(&mut rng, rows * cols), xdt, &[rows, cols]).unwrap();
                let qw = ops::quantize(&mut cenc, &w, spec, Flavour::Gpu).unwrap();
                checked += 1;
                failures.extend(check_fp_tiled(
                    &dev, &mut enc, &mut rng, &ctx, &qw, xdt, m, tiles,
                ));
            }
            for (m, rows, cols) in [(1, 8320, 2048), (9, 700, 2048)] {
                let ctx = format!("{mode} x {xdt} random codes M={m} W {rows}x{cols}");
                let qw = fp_random_weight(&mut rng, mode, rows, cols, false, None);
                checked += 1;
                failures.extend(check_fp_tiled(
                    &dev, &mut enc, &mut rng, &ctx, &qw, xdt, m, tiles,
                ));
            }
        }
    }
    // Scales past the decode kernel's one-multiplication bound (E2M1: 2, E4M3: 2^7), so that
    // its batches take the two-multiplication form, with bf16 x (whose range holds the outputs).
    for (mode, codes) in [
        (QuantMode::Mxfp4, 118..131),
        (QuantMode::Mxfp8, 120..140),
        (QuantMode::Nvfp4, 0x30..0x48),
    ] {
        let (m, rows, cols) = (2, 3000, 4096);
        let ctx = format!("{mode} large scales M={m} W {rows}x{cols}");
        let qw = fp_random_weight(&mut rng, mode, rows, cols, false, Some(codes));
        checked += 1;
        failures.extend(check_fp_tiled(
            &dev,
            &mut enc,
            &mut rng,
            &ctx,
            &qw,
            DType::BF16,
            m,
            tiles,
        ));
    }
    for m in [1, 3] {
        checked += 1;
        failures.extend(check_nan_codes(&dev, &mut enc, &mut rng, 1000, 2048, m));
    }
    // One token, top-8 of 16 experts [1000, 2048], one expert out of range.
    for (mode, xdt) in FP_GATHER_CASES {
        checked += 1;
        failures.extend(check_fp_gather(
            &dev,
            &mut enc,
            &mut rng,
            (mode, xdt),
            (16, 1000, 2048),
            (1, 8, 5),
            tiles,
        ));
    }
    assert_none("FP modes in decode", checked, failures);
}

/// The modes and x dtypes the FP gather checks run.
const FP_GATHER_CASES: [(QuantMode, DType); 3] = [
    (QuantMode::Mxfp4, DType::BF16),
    (QuantMode::Mxfp8, DType::F16),
    (QuantMode::Nvfp4, DType::BF16),
];

/// gather_qmm of `tokens` x top-`top` over `experts` FP experts [rows, cols] (W quantized from
/// random data), expert indices on the device with pair `bad_at` out of range, against the f64
/// reference per pair: that pair's row must be NaN and the commit report `IndexOutOfRange`;
/// where `tiles`, the FP module (`fp_tiles`) must have run it. The failures found.
fn check_fp_gather(
    dev: &Device,
    enc: &mut CommandEncoder,
    rng: &mut StdRng,
    (mode, xdt): (QuantMode, DType),
    (experts, rows, cols): (usize, usize, usize),
    (tokens, top, bad_at): (usize, usize, usize),
    tiles: bool,
) -> Vec<String> {
    let mut failures = Vec::new();
    let mut cenc = Device::cpu().encoder();
    let w = Buffer::from_f32(
        &randn(rng, experts * rows * cols),
        xdt,
        &[experts, rows, cols],
    )
    .unwrap();
    let qw = ops::quantize(&mut cenc, &w, fp_spec(mode), Flavour::Gpu).unwrap();
    let wd = dequantize_f64(&qw).unwrap();
    let x = Buffer::from_f32(&randn(rng, tokens * cols), xdt, &[tokens, 1, 1, cols]).unwrap();
    let mut idx: Vec<u32> = (0..tokens * top)
        .map(|_| rng.gen_range(0..experts as u32))
        .collect();
    idx[bad_at] = experts as u32 + 1;
    let rhs = Buffer::from_slice(&idx, &[tokens, top]).unwrap();
    let got = ops::gather_qmm(
        enc,
        &up(&x, dev),
        &weight_to(&qw, dev),
        None,
        Some(&up(&rhs, dev)),
        true,
        false,
    )
    .unwrap();
    let ran = enc.last_kernel().unwrap_or("").to_string();
    let result = enc.commit_and_wait();
    let ctx = format!("{mode} x {xdt} gather {tokens}x{top} of {experts} x {rows}x{cols}");
    if tiles && !ran.contains("fp_tiles") {
        failures.push(format!("{ctx}: ran {ran}, not the FP module's kernels"));
    }
    match result {
        Err(Error::IndexOutOfRange {
            position, bound, ..
        }) if (position, bound) == (bad_at, experts) => {}
        r => failures.push(format!(
            "{ctx}: expected IndexOutOfRange at {bad_at}, got {r:?}"
        )),
    }
    enc.commit_and_wait()
        .expect("the fault is cleared once reported");
    let v = down(&got).to_f32_vec().unwrap();
    let xf: Vec<f64> = x.to_f32_vec().unwrap().into_iter().map(f64::from).collect();
    match pairs_and_reference(&v, &xf, &wd, &idx, top, (rows, cols), true, bad_at) {
        Ok((got_ok, want_ok)) => {
            let err = max_rel_err(&got_ok, &want_ok);
            if err.is_nan() || err > tolerance(xdt) {
                failures.push(format!("{ctx}: error {err:e}"));
            }
        }
        Err(e) => failures.push(format!("{ctx}: {e}")),
    }
    failures
}
