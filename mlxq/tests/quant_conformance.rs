//! quantize, dequantize and embedding against real MLX 0.32.4, bit for bit, in both flavours.
//!
//! Fixtures (`tests/fixtures/`, see `tools/README.md`): `mlx-0.32.4-cpu/` made by MLX's CPU
//! backend (`tools/gen_fixtures.py`), `mlx-0.32.4-cuda/` by its CUDA kernels (the GPU flavour;
//! no 1-bit there, as MLX's CUDA build lacks it: the GPU 1-bit rule is checked on hand-computed
//! cases instead). Each fixture test walks every CPU kernel variant
//! ([`mlxq::backend::cpu::VARIANTS`]), configuration and case, collects every mismatch, and
//! fails once with a report of all of them; it also checks that each variant's own kernel ran
//! wherever this machine supports it. `avx512_matches_generic_bit_for_bit` and `avx2_…` compare the fast
//! variants with each other on random and adversarial groups (ties, constants, huge, tiny,
//! non-finite), for every width, group size, dtype and flavour.

mod common;

use common::{Case, Config};
use mlxq::backend::cpu::{self as cpu_backend, VARIANTS};
use mlxq::quant::pack::read_code;
use mlxq::registry::{KernelKey, OpKind};
use mlxq::{ops, Buffer, CommandEncoder, DType, Device, Flavour, QuantSpec, QuantizedWeight};
use ops::DequantizeOptions;
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn enc() -> CommandEncoder {
    Device::cpu().encoder()
}

/// An encoder on a CPU device that prefers kernel `variant`.
fn variant_enc(variant: &str) -> CommandEncoder {
    Device::cpu_with_variant(variant)
        .expect("a listed variant")
        .encoder()
}

/// The kernel key `ops::quantize` (or `ops::dequantize`, with `output`) builds.
fn key(op: OpKind, spec: QuantSpec, dtype: DType, output: DType, flavour: Flavour) -> KernelKey {
    KernelKey {
        op,
        mode: spec.mode(),
        bits: spec.bits(),
        group_size: spec.group_size(),
        input: if op == OpKind::Quantize {
            dtype
        } else {
            DType::U32
        },
        scales: if spec.has_biases() { dtype } else { DType::U8 },
        output,
        flag: flavour == Flavour::Gpu,
        variant: mlxq::registry::AUTO,
    }
}

/// `None` if `enc` last ran `variant`'s kernel (or, where this machine's `variant` does not
/// support `key`, the generic one); else what ran instead.
fn wrong_kernel(enc: &CommandEncoder, variant: &str, key: &KernelKey) -> Option<String> {
    let want = if cpu_backend::supports(variant, key) {
        variant
    } else {
        "generic"
    };
    let ran = enc.last_kernel().unwrap_or("nothing");
    (!ran.ends_with(&format!("_{want}"))).then(|| format!("ran {ran}, want the {want} kernel"))
}

/// Fails with every collected mismatch (the first few in full) if there are any.
fn assert_none(what: &str, checked: usize, failures: Vec<String>) {
    assert!(checked > 0, "{what}: nothing was checked");
    const SHOWN: usize = 12;
    assert!(
        failures.is_empty(),
        "{what}: {} of {checked} cases differ from MLX{}:\n{}",
        failures.len(),
        if failures.len() > SHOWN {
            format!(" (first {SHOWN} shown)")
        } else {
            String::new()
        },
        failures[..failures.len().min(SHOWN)].join("\n")
    );
}

/// The input values of group `group` (a flat group index), for mismatch reports.
fn group_inputs(input: &[f32], g: usize, group: usize) -> String {
    format!("{:?}", &input[group * g..(group + 1) * g])
}

/// `ops::quantize` of one MLX case with the fixture's flavour on kernel `variant`; a report
/// of each tensor (scales, biases, packed) that is not byte-identical to MLX's, or of the
/// wrong kernel running, or `None`.
fn check_quantize(variant: &str, cfg: &Config, case: &Case) -> Option<String> {
    let ctx = format!(
        "{variant}: {} {} ({:?})",
        cfg.tag,
        case.name,
        case.input.shape()
    );
    let mut enc = variant_enc(variant);
    let qw = match ops::quantize(&mut enc, &case.input, cfg.spec, cfg.flavour) {
        Ok(qw) => qw,
        Err(e) => return Some(format!("{ctx}: quantize failed: {e}")),
    };
    let k = key(
        OpKind::Quantize,
        cfg.spec,
        case.input.dtype(),
        DType::U32,
        cfg.flavour,
    );
    if let Some(e) = wrong_kernel(&enc, variant, &k) {
        return Some(format!("{ctx}: {e}"));
    }
    let input = case.input.to_f32_vec().expect("float input");
    let (bits, g) = (cfg.spec.bits(), cfg.spec.group_size() as usize);
    let mut report = Vec::new();
    let mut tensors = vec![("scales", &case.scales, qw.scales())];
    match (&case.biases, qw.biases()) {
        (Some(want), Some(got)) => tensors.push(("biases", want, got)),
        (None, None) => {}
        (want, got) => report.push(format!(
            "  biases: want {}, got {}",
            if want.is_some() { "some" } else { "none" },
            if got.is_some() { "some" } else { "none" }
        )),
    }
    for (what, want, got) in tensors {
        if let Some(i) = common::first_difference(want, got) {
            report.push(format!(
                "  {what}: {} differ; first at group {i}: want {} got {}; group input {}",
                common::count_differences(want, got),
                common::show(want, i),
                common::show(got, i),
                group_inputs(&input, g, i)
            ));
        }
    }
    if let Some(j) = common::first_difference(&case.packed, qw.packed()) {
        // Rows hold whole words, so the tensor is one bit stream: element e at bits [e·b, (e+1)·b).
        let (want, got) = (case.packed.bytes(), qw.packed().bytes());
        let e = (0..input.len())
            .find(|&e| read_code(bits, want, e) != read_code(bits, got, e))
            .unwrap_or(0);
        report.push(format!(
            "  packed: {} words differ; first word {j}: want {} got {}; first code at element {e} \
             (group {}): want {:?} got {:?}, input {:e}; MLX scale {} bias {}; group input {}",
            common::count_differences(&case.packed, qw.packed()),
            common::show(&case.packed, j),
            common::show(qw.packed(), j),
            e / g,
            read_code(bits, want, e),
            read_code(bits, got, e),
            input[e],
            common::show(&case.scales, e / g),
            show_bias(case, e / g),
            group_inputs(&input, g, e / g)
        ));
    }
    (!report.is_empty()).then(|| format!("{ctx}:\n{}", report.join("\n")))
}

/// `ops::dequantize` of MLX's quantized tensors with the fixture's flavour on kernel
/// `variant` against MLX's own dequantization.
fn check_dequantize(variant: &str, cfg: &Config, case: &Case) -> Option<String> {
    let ctx = format!(
        "{variant}: {} {} ({:?})",
        cfg.tag,
        case.name,
        case.input.shape()
    );
    // Affine: the default dtype (the scales'); the FP fixtures asked MLX for the input's.
    let opts = DequantizeOptions {
        dtype: (!cfg.spec.has_biases()).then_some(cfg.dtype),
        flavour: cfg.flavour,
    };
    let mut enc = variant_enc(variant);
    let got = match ops::dequantize(&mut enc, &case.weight(cfg.spec), opts) {
        Ok(b) => b,
        Err(e) => return Some(format!("{ctx}: dequantize failed: {e}")),
    };
    let dtype = case.input.dtype();
    let k = key(OpKind::Dequantize, cfg.spec, dtype, dtype, cfg.flavour);
    if let Some(e) = wrong_kernel(&enc, variant, &k) {
        return Some(format!("{ctx}: {e}"));
    }
    if (got.dtype(), got.shape()) != (case.dequant.dtype(), case.dequant.shape()) {
        return Some(format!(
            "{ctx}: got {} {:?}, want {} {:?}",
            got.dtype(),
            got.shape(),
            case.dequant.dtype(),
            case.dequant.shape()
        ));
    }
    let i = common::first_difference(&case.dequant, &got)?;
    let g = cfg.spec.group_size() as usize;
    Some(format!(
        "{ctx}: {} elements differ; first at {i}: want {} got {}; code {:?} scale {} bias {}",
        common::count_differences(&case.dequant, &got),
        common::show(&case.dequant, i),
        common::show(&got, i),
        read_code(cfg.spec.bits(), case.packed.bytes(), i),
        common::show(&case.scales, i / g),
        show_bias(case, i / g),
    ))
}

/// Bias `i` of a case, or `-` for the FP modes (no biases).
fn show_bias(case: &Case, i: usize) -> String {
    case.biases
        .as_ref()
        .map_or_else(|| "-".to_string(), |b| common::show(b, i))
}

/// Runs `check` with every kernel variant on every case of every configuration of
/// `flavour`'s fixtures.
fn check_fixtures(flavour: Flavour, what: &str, check: fn(&str, &Config, &Case) -> Option<String>) {
    check_configs(common::configs(flavour), flavour, what, check);
}

/// [`check_fixtures`] over the FP-mode (mxfp4, mxfp8, nvfp4) configurations.
fn check_fp_fixtures(
    flavour: Flavour,
    what: &str,
    check: fn(&str, &Config, &Case) -> Option<String>,
) {
    check_configs(common::fp_configs(flavour), flavour, what, check);
}

fn check_configs(
    configs: Vec<Config>,
    flavour: Flavour,
    what: &str,
    check: fn(&str, &Config, &Case) -> Option<String>,
) {
    let (mut checked, mut failures) = (0, Vec::new());
    for cfg in configs {
        for case in cfg.cases() {
            for variant in VARIANTS {
                checked += 1;
                failures.extend(check(variant, &cfg, &case));
            }
        }
    }
    assert_none(&format!("{what} ({flavour} flavour)"), checked, failures);
}

#[test]
fn quantize_matches_mlx_cpu() {
    check_fixtures(Flavour::Cpu, "quantize", check_quantize);
}

#[test]
fn quantize_matches_mlx_cuda() {
    check_fixtures(Flavour::Gpu, "quantize", check_quantize);
}

#[test]
fn dequantize_matches_mlx_cpu() {
    check_fixtures(Flavour::Cpu, "dequantize", check_dequantize);
}

#[test]
fn dequantize_matches_mlx_cuda() {
    check_fixtures(Flavour::Gpu, "dequantize", check_dequantize);
}

#[test]
fn fp_quantize_matches_mlx_cpu() {
    check_fp_fixtures(Flavour::Cpu, "FP quantize", check_quantize);
}

#[test]
fn fp_quantize_matches_mlx_cuda() {
    check_fp_fixtures(Flavour::Gpu, "FP quantize", check_quantize);
}

#[test]
fn fp_dequantize_matches_mlx_cpu() {
    check_fp_fixtures(Flavour::Cpu, "FP dequantize", check_dequantize);
}

#[test]
fn fp_dequantize_matches_mlx_cuda() {
    check_fp_fixtures(Flavour::Gpu, "FP dequantize", check_dequantize);
}

/// The FP fixture loops cannot pass vacuously: both sets hold every dtype × mode, each with
/// every case kind, and MLX's tensors have the FP layout (uint8 scales, no biases).
#[test]
fn fp_fixtures_cover_every_configuration() {
    for flavour in [Flavour::Cpu, Flavour::Gpu] {
        let cfgs = common::fp_configs(flavour);
        let tags: Vec<&str> = cfgs.iter().map(|c| c.tag.as_str()).collect();
        let mut want = Vec::new();
        for dtype in ["bfloat16", "float16", "float32"] {
            for mode in ["mxfp4_b4_g32", "mxfp8_b8_g32", "nvfp4_b4_g16"] {
                want.push(format!("{dtype}_{mode}"));
            }
        }
        assert_eq!(tags, want, "{flavour} FP fixture configurations");
        for cfg in &cfgs {
            let cases = cfg.cases();
            assert_eq!(cases.len(), 11, "{}", cfg.tag);
            for c in &cases {
                assert!(c.biases.is_none() && c.scales.dtype() == DType::U8);
                assert_eq!(c.dequant.dtype(), cfg.dtype, "{} {}", cfg.tag, c.name);
            }
        }
    }
}

/// The fixture loops above cannot pass vacuously: every configuration is there, with all its
/// case kinds, the 3-D one included.
#[test]
fn fixtures_cover_every_configuration() {
    const KINDS: [&str; 11] = [
        "constant",
        "experts3d",
        "halves",
        "integers",
        "negative",
        "normal",
        "outliers",
        "positive",
        "tiny",
        "uniform_wide",
        "zeros",
    ];
    for (flavour, bits) in [
        (Flavour::Cpu, &[1, 2, 3, 4, 5, 6, 8][..]),
        (Flavour::Gpu, &[2, 3, 4, 5, 6, 8][..]),
    ] {
        let tags: Vec<String> = common::configs(flavour)
            .into_iter()
            .map(|c| c.tag)
            .collect();
        let mut want = Vec::new();
        for dtype in ["bfloat16", "float16", "float32"] {
            for b in bits {
                for g in [128, 32, 64] {
                    want.push(format!("{dtype}_affine_b{b}_g{g}"));
                }
            }
        }
        assert_eq!(tags, want, "{flavour} fixture configurations");
        let cfg = common::config(flavour, "bfloat16_affine_b4_g64");
        let cases = cfg.cases();
        let kinds: Vec<&str> = cases
            .iter()
            .map(|c| c.name.split_once('_').map_or("", |(_, k)| k))
            .collect();
        let mut sorted = kinds.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, KINDS, "{flavour} case kinds");
        let e3 = cases
            .iter()
            .find(|c| c.name.ends_with("experts3d"))
            .unwrap();
        assert_eq!(e3.input.ndim(), 3);
        assert_eq!(e3.input.dtype(), DType::BF16);
    }
}

/// One row per hand-computed 1-bit case, repeating a 4-element pattern: with every group a
/// whole number of patterns, each group has the same min, max and codes at every group size.
const PATTERNS: [[f32; 4]; 4] = [
    [-4.0, -2.0, -1.0, -3.0], // all negative
    [0.0, 2.0, 1.0, 0.5],     // a tie: (1 − 0) / 2 = 0.5
    [1.75; 4],                // constant
    [0.0; 4],                 // zeros
];

fn pattern_rows(rows: &[[f32; 4]], cols: usize) -> Vec<f32> {
    rows.iter()
        .flat_map(|p| (0..cols).map(move |i| p[i % 4]))
        .collect()
}

/// What a 1-bit row must give at every group size: (every packed word, every scale, every
/// bias, the dequantized pattern).
type Expected1Bit = (u32, f32, f32, [f32; 4]);

/// Quantizes `rows` (128 columns of `dtype`) to 1 bit at every group size and checks every
/// word, scale, bias and dequantized value against `want` (one entry per row).
fn check_1bit(rows: &[[f32; 4]], dtype: DType, flavour: Flavour, want: &[Expected1Bit]) {
    let cols = 128;
    let w = Buffer::from_f32(&pattern_rows(rows, cols), dtype, &[rows.len(), cols]).unwrap();
    for g in [32, 64, 128] {
        let mut enc = enc();
        let qw = ops::quantize(&mut enc, &w, QuantSpec::affine(1, g).unwrap(), flavour).unwrap();
        let opts = DequantizeOptions {
            dtype: None,
            flavour,
        };
        let deq = ops::dequantize(&mut enc, &qw, opts)
            .unwrap()
            .to_f32_vec()
            .unwrap();
        let words = qw.packed().to_vec::<u32>().unwrap();
        let scales = qw.scales().to_f32_vec().unwrap();
        let biases = qw.biases().unwrap().to_f32_vec().unwrap();
        let (groups, row_words) = (cols / g as usize, cols / 32);
        for (r, &(word, scale, bias, dequant)) in want.iter().enumerate() {
            let ctx = format!("{flavour} 1-bit g{g} {dtype} row {r} {:?}", rows[r]);
            let words = &words[r * row_words..(r + 1) * row_words];
            assert!(
                words.iter().all(|&x| x == word),
                "{ctx}: words {words:08x?}, want 0x{word:08x}"
            );
            let (s, b) = (
                &scales[r * groups..(r + 1) * groups],
                &biases[r * groups..(r + 1) * groups],
            );
            assert!(
                s.iter().all(|&x| x == scale) && b.iter().all(|&x| x == bias),
                "{ctx}: scales {s:?} biases {b:?}, want {scale} {bias}"
            );
            assert_eq!(
                deq[r * cols..(r + 1) * cols],
                pattern_rows(&[dequant], cols),
                "{ctx}: dequantized"
            );
        }
    }
}

/// MLX's GPU 1-bit rule (its Metal kernel; CUDA lacks 1-bit): max taken as at least 0,
/// `scale = max(max − min, 1e-7)`, `bias = min`, ties away from zero; dequantize `fma(q, s, b)`.
#[test]
fn gpu_1bit_hand_computed() {
    let want = [
        // max(0, −1) = 0: scale 4, bias −4; codes round([0, .5, .75, .25]) = [0, 1, 1, 0].
        (0x6666_6666, 4.0, -4.0, [-4.0, 0.0, 0.0, -4.0]),
        // scale 2, bias 0; codes round([0, 1, .5, .25]): the tie goes away from zero, to 1.
        (0x6666_6666, 2.0, 0.0, [0.0, 2.0, 2.0, 0.0]),
        (0, 1e-7, 1.75, [1.75; 4]),
        (0, 1e-7, 0.0, [0.0; 4]),
    ];
    check_1bit(&PATTERNS, DType::F32, Flavour::Gpu, &want);
}

/// The same rows in the CPU flavour (true max, ties to even), as `mx.quantize` on CPU gives:
/// the all-negative row gets scale 3, the tie goes to 0.
#[test]
fn cpu_1bit_hand_computed() {
    let want = [
        (0x6666_6666, 3.0, -4.0, [-4.0, -1.0, -1.0, -4.0]),
        (0x2222_2222, 2.0, 0.0, [0.0, 2.0, 0.0, 0.0]),
        (0, 1e-7, 1.75, [1.75; 4]),
        (0, 1e-7, 0.0, [0.0; 4]),
    ];
    check_1bit(&PATTERNS, DType::F32, Flavour::Cpu, &want);
}

/// Codes are chosen with the unrounded f32 scale: in bf16, max − min = 1 + 2⁻⁸ is stored as
/// 1.0, yet −0.5 → (−0.5 + 1) / 1.0039 = 0.498 → code 0 (with the stored 1.0 it would be a
/// tie, and the GPU flavour would pick 1). Same in both flavours (the max is positive).
#[test]
fn one_bit_codes_use_the_unrounded_scale() {
    let row = [[-1.0, 2f32.powi(-8), -0.5, -0.5]];
    let want = [(0x2222_2222, 1.0, -1.0, [-1.0, 0.0, -1.0, -1.0])];
    for flavour in [Flavour::Gpu, Flavour::Cpu] {
        check_1bit(&row, DType::BF16, flavour, &want);
    }
}

/// A random quantized `[vocab, dim]` table of `dtype`.
fn random_table(
    rng: &mut StdRng,
    spec: QuantSpec,
    dtype: DType,
    flavour: Flavour,
) -> QuantizedWeight {
    let (vocab, dim) = (37, 256);
    let v: Vec<f32> = (0..vocab * dim).map(|_| rng.gen_range(-2.0..2.0)).collect();
    let w = Buffer::from_f32(&v, dtype, &[vocab, dim]).unwrap();
    ops::quantize(&mut enc(), &w, spec, flavour).unwrap()
}

/// `embedding(ids)` is byte-identical to the rows `ids` of `dequantize`, shape `ids + [dim]`.
fn check_embedding(rng: &mut StdRng, table: &QuantizedWeight, opts: DequantizeOptions, ctx: &str) {
    let mut enc = enc();
    let full = ops::dequantize(&mut enc, table, opts).unwrap();
    let (vocab, dim) = (table.rows(), table.cols());
    let row_bytes = dim * full.dtype().size();
    let u: Vec<u32> = (0..15).map(|_| rng.gen_range(0..vocab as u32)).collect();
    let mut i: Vec<i32> = (0..7).map(|_| rng.gen_range(0..vocab as i32)).collect();
    i[0] = vocab as i32 - 1; // the last row, and a repeat of the first
    i[1] = i[2];
    let ids = [
        (
            Buffer::from_slice(&u, &[3, 5]).unwrap(),
            u.iter().map(|&x| x as usize).collect::<Vec<_>>(),
        ),
        (
            Buffer::from_slice(&i, &[7]).unwrap(),
            i.iter().map(|&x| x as usize).collect(),
        ),
    ];
    for (ids, rows) in ids {
        let out = ops::embedding(&mut enc, table, &ids, opts).unwrap();
        let shape: Vec<usize> = ids.shape().iter().copied().chain([dim]).collect();
        assert_eq!(
            out.shape(),
            &shape[..],
            "{ctx}: shape for ids {:?}",
            ids.dtype()
        );
        assert_eq!(out.dtype(), full.dtype(), "{ctx}: dtype");
        for (k, &r) in rows.iter().enumerate() {
            assert!(
                out.bytes()[k * row_bytes..(k + 1) * row_bytes]
                    == full.bytes()[r * row_bytes..(r + 1) * row_bytes],
                "{ctx}: ids {} position {k} (row {r}) differs from dequantize",
                ids.dtype()
            );
        }
    }
}

#[test]
fn embedding_is_dequantize_of_the_rows() {
    let mut rng = StdRng::seed_from_u64(11);
    let configs = [
        (DType::BF16, 4, 64),
        (DType::F16, 3, 32),
        (DType::F32, 8, 128),
        (DType::BF16, 1, 32),
        (DType::F16, 6, 128),
    ];
    for flavour in [Flavour::Cpu, Flavour::Gpu] {
        for (dtype, bits, g) in configs {
            let spec = QuantSpec::affine(bits, g).unwrap();
            let table = random_table(&mut rng, spec, dtype, flavour);
            for out in [None, Some(DType::F32)] {
                let opts = DequantizeOptions {
                    dtype: out,
                    flavour,
                };
                let ctx = format!("{flavour} {dtype} {spec} -> {out:?}");
                check_embedding(&mut rng, &table, opts, &ctx);
            }
        }
        // MLX's own table too (8 rows of a fixture case).
        let cfg = common::config(flavour, "bfloat16_affine_b5_g32");
        let case = cfg
            .cases()
            .into_iter()
            .find(|c| c.name.ends_with("_normal"))
            .unwrap();
        let opts = DequantizeOptions {
            dtype: None,
            flavour,
        };
        check_embedding(
            &mut rng,
            &case.weight(cfg.spec),
            opts,
            &format!("{} {}", cfg.tag, case.name),
        );
    }
}

/// (unit roundoff, half the smallest subnormal) of a float dtype: rounding `x` to it errs by
/// at most `u·|x| + tiny`. (f32's and bf16's subnormals are far below these tests' values.)
fn rounding(dtype: DType) -> (f64, f64) {
    match dtype {
        DType::F32 => (2f64.powi(-24), 0.0),
        DType::F16 => (2f64.powi(-11), 2f64.powi(-25)),
        _ => (2f64.powi(-8), 0.0),
    }
}

/// The error bound of MLX's affine quantization, per element, with `s`, `b` the stored scale
/// and bias and `n = 2^bits − 1`. The grid is `b + s·{0..n}`; MLX anchors it so that 0 is a
/// grid point, so it can stop short of the group's far extreme, by at most one step. Hence:
/// `d = dist(w, grid span) ≤ |s|` and `|ŵ − w| ≤ |s|/2 + d`, plus slack for rounding the scale
/// to the dtype after the codes were chosen (≤ n steps of it), for rounding ŵ, and for f32
/// arithmetic. (`|ŵ − w| ≤ |s|/2` alone is false: see `grid_may_stop_short_of_the_max`.)
fn check_error_bound(w: &Buffer, qw: &QuantizedWeight, deq: &Buffer) -> Result<(), String> {
    let spec = qw.spec();
    let (bits, g) = (spec.bits(), spec.group_size() as usize);
    let n = f64::from(spec.max_code());
    let (u, tiny) = rounding(w.dtype());
    let wv = w.to_f32_vec().unwrap();
    let dv = deq.to_f32_vec().unwrap();
    let sv = qw.scales().to_f32_vec().unwrap();
    let bv = qw.biases().unwrap().to_f32_vec().unwrap();
    for (i, (&x, &xh)) in wv.iter().zip(&dv).enumerate() {
        let (x, xh) = (f64::from(x), f64::from(xh));
        let (s, b) = (f64::from(sv[i / g]), f64::from(bv[i / g]));
        let q = f64::from(read_code(bits, qw.packed().bytes(), i).unwrap());
        let (lo, hi) = (b.min(b + n * s), b.max(b + n * s));
        let d = (lo - x).max(x - hi).max(0.0);
        let ds = u * s.abs() + tiny;
        let slack = (2.0 * n + 1.0) * ds
            + u * ((q * s).abs() + xh.abs())
            + 2.0 * tiny
            + 2f64.powi(-20) * (x.abs() + n * s.abs());
        let err = (xh - x).abs();
        if d > s.abs() + slack || err > s.abs() / 2.0 + d + slack {
            return Err(format!(
                "element {i}: w {x:e} ŵ {xh:e} err {err:e}; code {q} scale {s:e} bias {b:e}; \
                 outside the grid by {d:e}; slack {slack:e}; group {:?}",
                &wv[i / g * g..(i / g + 1) * g]
            ));
        }
    }
    Ok(())
}

/// `[−1, 0.9, 0, …]` at 2 bits (MLX CPU: scale 0.5, bias −1): the grid −1, −0.5, 0, 0.5 keeps
/// 0 exact and stops short of 0.9, which dequantizes to 0.5: an error of 0.4 > scale/2.
#[test]
fn grid_may_stop_short_of_the_max() {
    let mut v = vec![0f32; 32];
    (v[0], v[1]) = (-1.0, 0.9);
    let w = Buffer::from_f32(&v, DType::F32, &[1, 32]).unwrap();
    let mut enc = enc();
    for flavour in [Flavour::Cpu, Flavour::Gpu] {
        let qw = ops::quantize(&mut enc, &w, QuantSpec::affine(2, 32).unwrap(), flavour).unwrap();
        let opts = DequantizeOptions {
            dtype: None,
            flavour,
        };
        let deq = ops::dequantize(&mut enc, &qw, opts).unwrap();
        assert_eq!(qw.scales().to_f32_vec().unwrap(), [0.5], "{flavour}");
        assert_eq!(
            qw.biases().unwrap().to_f32_vec().unwrap(),
            [-1.0],
            "{flavour}"
        );
        assert_eq!(
            deq.to_f32_vec().unwrap()[..3],
            [-1.0, 0.5, 0.0],
            "{flavour}"
        );
        check_error_bound(&w, &qw, &deq).unwrap();
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn quantize_dequantize_error_is_bounded(
        bits in prop::sample::select(vec![1u32, 2, 3, 4, 5, 6, 8]),
        g in prop::sample::select(vec![32u32, 64, 128]),
        dtype in prop::sample::select(vec![DType::F32, DType::F16, DType::BF16]),
        flavour in prop::sample::select(vec![Flavour::Cpu, Flavour::Gpu]),
        magnitude in prop::sample::select(vec![1e-6f32, 1e-2, 1.0, 300.0]),
        offset in prop::sample::select(vec![-2.0f32, 0.0, 0.5, 2.0]),
        rows in 1usize..4,
        groups in 1usize..4,
        seed in any::<u64>(),
    ) {
        let mut rng = StdRng::seed_from_u64(seed);
        let cols = groups * g as usize;
        let v: Vec<f32> = (0..rows * cols)
            .map(|_| (offset + rng.gen_range(-1.0f32..1.0)) * magnitude)
            .collect();
        let w = Buffer::from_f32(&v, dtype, &[rows, cols]).unwrap();
        let mut enc = enc();
        let qw = ops::quantize(&mut enc, &w, QuantSpec::affine(bits, g).unwrap(), flavour).unwrap();
        let deq = ops::dequantize(&mut enc, &qw, DequantizeOptions { dtype: None, flavour }).unwrap();
        prop_assert_eq!(deq.dtype(), dtype);
        let checked = check_error_bound(&w, &qw, &deq);
        prop_assert!(checked.is_ok(), "{} {} {} bits g{}: {}", flavour, dtype, bits, g, checked.unwrap_err());
    }
}

/// Kinds of groups [`adversarial_group`] makes.
const GROUP_KINDS: usize = 15;

/// Fills `out` (one group) with values of `kind`, chosen to stress `bits`-wide codes: exact
/// ties of `(w − b)/s` (multiples of `s/2` on a grid whose step is the scale), values one ulp
/// off such ties, rounded grids (ties missed by rounding errors), grids far from 0 (large
/// `|b/s|`), coarse grids (bf16-like), constants, signed zeros, one-signed groups, huge and
/// tiny magnitudes, outliers, and non-finite values.
fn adversarial_group(rng: &mut StdRng, kind: usize, bits: u32, out: &mut [f32]) {
    let n = (1u32 << bits) - 1;
    let normal = |rng: &mut StdRng| (0..4).map(|_| rng.gen_range(-1.0f32..1.0)).sum::<f32>();
    let magnitude = 10f32.powi(rng.gen_range(-3..=3));
    // A grid of step `c` from 0 to n·c: s = c exactly, and odd multiples of c/2 are ties.
    // Kind 13 takes a step that is not a power of 2: the grid then rounds, and
    // (w − b)/s lands within a few ulps of the half-integers instead of on them.
    let c = 2f32.powi(rng.gen_range(-8..=8))
        * if kind == 13 {
            rng.gen_range(1.0f32..2.0)
        } else {
            1.0
        };
    // Mostly near 0; sometimes far from it, so that |b/s| (a term of the fast path's error)
    // is large too.
    let far = [1, 1, 1, 37, 1000][rng.gen_range(0..5)] * n as i32;
    let shift = c * rng.gen_range(-far..=far) as f32;
    let ties = |rng: &mut StdRng, out: &mut [f32]| {
        for v in out.iter_mut() {
            *v = c * rng.gen_range(0..=2 * n) as f32 / 2.0 + shift;
        }
        out[0] = shift;
        out[1] = c * n as f32 + shift;
    };
    match kind {
        0 => out.iter_mut().for_each(|v| *v = normal(rng) * magnitude),
        1 => ties(rng, out),
        2 => {
            // Ties, then every value nudged one ulp (or not).
            ties(rng, out);
            for v in out.iter_mut().skip(2) {
                *v = match rng.gen_range(0..3) {
                    0 => f32::from_bits(v.to_bits().wrapping_add(1)),
                    1 => f32::from_bits(v.to_bits().wrapping_sub(1)),
                    _ => *v,
                };
            }
        }
        3 => {
            let e = 2f32.powi(rng.gen_range(-12..=4));
            out.iter_mut()
                .for_each(|v| *v = rng.gen_range(-64i32..=64) as f32 * e);
        }
        4 => out.fill(normal(rng) * magnitude),
        5 => out
            .iter_mut()
            .for_each(|v| *v = if rng.gen_bool(0.5) { -0.0 } else { 0.0 }),
        6 => out
            .iter_mut()
            .for_each(|v| *v = -(normal(rng).abs() + 0.25) * magnitude),
        7 => out
            .iter_mut()
            .for_each(|v| *v = (normal(rng).abs() + 0.25) * magnitude),
        8 => {
            let big = [1e30f32, 1e37, 3e38][rng.gen_range(0..3)];
            out.iter_mut().for_each(|v| *v = normal(rng) * big / 4.0);
        }
        9 => {
            let tiny = [1e-6f32, 1e-30, 1e-38, 1e-42][rng.gen_range(0..4)];
            out.iter_mut().for_each(|v| *v = normal(rng) * tiny);
        }
        10 => {
            out.iter_mut().for_each(|v| *v = normal(rng) * 1e-3);
            let i = rng.gen_range(0..out.len());
            out[i] = normal(rng) * 1e3;
        }
        11 => non_finite(rng, out, normal),
        13 => ties(rng, out),
        12 => {
            let (lo, hi) = (normal(rng) * magnitude, normal(rng) * magnitude);
            out.iter_mut()
                .for_each(|v| *v = if rng.gen_bool(0.5) { lo } else { hi });
        }
        _ => {
            // NaN elements in an otherwise ordinary group (the group's scale stays finite).
            out.iter_mut().for_each(|v| *v = normal(rng) * magnitude);
            for _ in 0..rng.gen_range(1..4) {
                let i = rng.gen_range(0..out.len());
                out[i] = f32::NAN;
            }
        }
    }
}

/// A group of `normal` values with one to three of NaN, +∞ and −∞ among them, or (one time
/// in five) all NaN.
fn non_finite(rng: &mut StdRng, out: &mut [f32], normal: impl Fn(&mut StdRng) -> f32) {
    out.iter_mut().for_each(|v| *v = normal(rng));
    let special = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY];
    for _ in 0..rng.gen_range(1..4) {
        let i = rng.gen_range(0..out.len());
        out[i] = special[rng.gen_range(0..3)];
    }
    if rng.gen_bool(0.2) {
        out.fill(f32::NAN);
    }
}

/// `groups` groups of `g` values made by `group(rng, kind, out)` for kinds `0..kinds`: pairs
/// of batches of 16 groups, one batch all of one kind and one of random kinds, then a partial
/// batch.
fn batches_of_kinds(
    rng: &mut StdRng,
    groups: usize,
    g: usize,
    kinds: usize,
    mut group: impl FnMut(&mut StdRng, usize, &mut [f32]),
) -> Vec<f32> {
    let mut v = vec![0f32; groups * g];
    for (i, out) in v.chunks_exact_mut(g).enumerate() {
        let batch = i / 16;
        let kind = if batch % 2 == 0 {
            batch / 2 % kinds
        } else {
            rng.gen_range(0..kinds)
        };
        group(rng, kind, out);
    }
    v
}

/// `groups` adversarial affine groups ([`adversarial_group`]) of `g` values, in
/// [`batches_of_kinds`].
fn adversarial_values(rng: &mut StdRng, groups: usize, g: usize, bits: u32) -> Vec<f32> {
    batches_of_kinds(rng, groups, g, GROUP_KINDS, |rng, kind, out| {
        adversarial_group(rng, kind, bits, out)
    })
}

/// The first group whose bytes differ between two buffers of `per_group` bytes per group.
fn first_group_differing(a: &Buffer, b: &Buffer, per_group: usize) -> Option<usize> {
    let (a, b) = (a.bytes(), b.bytes());
    if a.len() != b.len() {
        return Some(0);
    }
    (0..a.len() / per_group)
        .find(|&i| a[i * per_group..(i + 1) * per_group] != b[i * per_group..(i + 1) * per_group])
}

/// The fast kernels give the generic kernels' bytes exactly: quantize (packed, scales,
/// biases) for every width, group size, input dtype and flavour on adversarial groups, and
/// dequantize of the result to every output dtype. Also checks that `variant`'s kernel ran
/// wherever this machine supports it (else this compares generic with itself and says so).
fn matches_generic_bit_for_bit(variant: &str, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut failures = Vec::new();
    let mut checked = 0;
    let mut ran_variant = 0;
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        for bits in [1u32, 2, 3, 4, 5, 6, 8] {
            for g in [32usize, 64, 128] {
                let spec = QuantSpec::affine(bits, g as u32).unwrap();
                // g = 32 spans several parallel tasks (1024 groups each) too.
                let groups = if g == 32 { 3 * 695 } else { 3 * 151 };
                let v = adversarial_values(&mut rng, groups, g, bits);
                let w = Buffer::from_f32(&v, dtype, &[groups / 3, 3 * g]).unwrap();
                for flavour in [Flavour::Cpu, Flavour::Gpu] {
                    let ctx = format!("{dtype} {spec} {flavour}");
                    checked += 1;
                    let mut fast = variant_enc(variant);
                    let got = ops::quantize(&mut fast, &w, spec, flavour).unwrap();
                    let k = key(OpKind::Quantize, spec, dtype, DType::U32, flavour);
                    if let Some(e) = wrong_kernel(&fast, variant, &k) {
                        failures.push(format!("{ctx}: quantize {e}"));
                    }
                    let suffix = format!("_{variant}");
                    ran_variant +=
                        usize::from(fast.last_kernel().is_some_and(|n| n.ends_with(&suffix)));
                    let want =
                        ops::quantize(&mut variant_enc("generic"), &w, spec, flavour).unwrap();
                    let scale_bytes = dtype.size();
                    for (what, a, b, per_group) in [
                        ("packed", want.packed(), got.packed(), g / 8 * bits as usize),
                        ("scales", want.scales(), got.scales(), scale_bytes),
                        (
                            "biases",
                            want.biases().unwrap(),
                            got.biases().unwrap(),
                            scale_bytes,
                        ),
                    ] {
                        if let Some(i) = first_group_differing(a, b, per_group) {
                            failures.push(format!(
                                "{ctx}: quantize {what} differ first at group {i}: want {:?} \
                                 got {:?}, scale {} / {}, bias {} / {}; group {:?}",
                                &a.bytes()[i * per_group..(i + 1) * per_group],
                                &b.bytes()[i * per_group..(i + 1) * per_group],
                                common::show(want.scales(), i),
                                common::show(got.scales(), i),
                                common::show(want.biases().unwrap(), i),
                                common::show(got.biases().unwrap(), i),
                                &w.to_f32_vec().unwrap()[i * g..(i + 1) * g],
                            ));
                        }
                    }
                    for out in [None, Some(DType::F32), Some(DType::F16), Some(DType::BF16)] {
                        checked += 1;
                        let opts = DequantizeOptions {
                            dtype: out,
                            flavour,
                        };
                        let mut fast = variant_enc(variant);
                        let got = ops::dequantize(&mut fast, &want, opts).unwrap();
                        let k = key(
                            OpKind::Dequantize,
                            spec,
                            dtype,
                            out.unwrap_or(dtype),
                            flavour,
                        );
                        if let Some(e) = wrong_kernel(&fast, variant, &k) {
                            failures.push(format!("{ctx} -> {out:?}: dequantize {e}"));
                        }
                        let expect =
                            ops::dequantize(&mut variant_enc("generic"), &want, opts).unwrap();
                        if let Some(i) = common::first_difference(&expect, &got) {
                            failures.push(format!(
                                "{ctx} -> {out:?}: dequantize differs first at {i}: want {} got {}",
                                common::show(&expect, i),
                                common::show(&got, i),
                            ));
                        }
                    }
                }
            }
        }
    }
    if ran_variant == 0 {
        eprintln!("{variant} kernels not supported here: compared generic with itself");
    }
    assert_none(&format!("{variant} vs generic"), checked, failures);
}

#[test]
fn avx512_matches_generic_bit_for_bit() {
    matches_generic_bit_for_bit("avx512", 0x5eed_a512);
}

#[test]
fn avx2_matches_generic_bit_for_bit() {
    matches_generic_bit_for_bit("avx2", 0x5eed_a200);
}

/// The FP modes' specs (mxfp4, mxfp8, nvfp4), each with its own bits and group size.
fn fp_specs() -> [QuantSpec; 3] {
    [
        mlxq::QuantMode::Mxfp4,
        mlxq::QuantMode::Mxfp8,
        mlxq::QuantMode::Nvfp4,
    ]
    .map(|mode| {
        let (bits, g) = QuantSpec::fp_defaults(mode);
        QuantSpec::new(mode, bits, g).unwrap()
    })
}

/// Kinds of [`fp_adversarial_group`].
const FP_GROUP_KINDS: usize = 14;

/// One adversarial group of an FP mode whose elements have `max` as their largest value (6
/// for E2M1, 448 for E4M3): ties and near-ties of both element formats at exact scales,
/// scales at and just above powers of two, E4M3 scale subnormals, zeros, tiny and huge
/// values, NaN and ±∞, exponents over f32's whole range, subnormals (of f32, bf16 and f16).
fn fp_adversarial_group(rng: &mut StdRng, kind: usize, max: f32, out: &mut [f32]) {
    let normal = |rng: &mut StdRng| (0..4).map(|_| rng.gen_range(-1.0f32..1.0)).sum::<f32>();
    let magnitude = 10f32.powi(rng.gen_range(-3..=3));
    let sign = |rng: &mut StdRng| if rng.gen_bool(0.5) { -1.0f32 } else { 1.0 };
    // Multiples of a quarter up to 6 (E2M1's midpoints and values), and of 1/16 up to 448.
    let tie = |rng: &mut StdRng| {
        if max == 6.0 {
            rng.gen_range(0..=24) as f32 / 4.0
        } else {
            let e = rng.gen_range(-9..=8);
            rng.gen_range(16..32) as f32 / 16.0 * 2f32.powi(e)
        }
    };
    let unit = 2f32.powi(rng.gen_range(-20..=20));
    match kind {
        0 => out.iter_mut().for_each(|v| *v = normal(rng) * magnitude),
        1 | 2 => {
            // amax = max·2^k: the scale is 2^k exactly; every element a tie or a value.
            for v in out.iter_mut() {
                *v = sign(rng) * tie(rng).min(max) * unit;
            }
            out[rng.gen_range(0..out.len())] = sign(rng) * max * unit;
            if kind == 2 {
                for v in out.iter_mut() {
                    *v = match rng.gen_range(0..3) {
                        0 => f32::from_bits(v.to_bits().wrapping_add(1)),
                        1 => f32::from_bits(v.to_bits().wrapping_sub(1)),
                        _ => *v,
                    };
                }
            }
        }
        3 => {
            // amax just above max·2^k: an f32 scale a few ulps (or 2^-13) above a power of 2.
            out.iter_mut().for_each(|v| *v = normal(rng) * unit);
            let up = [1u32, 2, 100, 1 << 12, 1 << 13, 1 << 14][rng.gen_range(0..6)];
            let top = f32::from_bits((max * unit).to_bits() + up);
            out[rng.gen_range(0..out.len())] = sign(rng) * top;
        }
        4 => {
            // nvfp4's scale near and below E4M3's subnormals: amax/6 around 2^-12 … 2^-5.
            let s = 2f32.powi(rng.gen_range(-12..=-5)) * rng.gen_range(0.9f32..1.6);
            out.iter_mut()
                .for_each(|v| *v = rng.gen_range(-1.0f32..1.0) * s * max);
            out[0] = s * max;
        }
        5 => out
            .iter_mut()
            .for_each(|v| *v = if rng.gen_bool(0.5) { -0.0 } else { 0.0 }),
        6 => {
            let tiny = [1e-6f32, 1e-20, 1e-30, 1e-38, 1e-42][rng.gen_range(0..5)];
            out.iter_mut().for_each(|v| *v = normal(rng) * tiny);
        }
        7 => {
            let big = [6e4f32, 1e20, 1e37, 3e38][rng.gen_range(0..4)];
            out.iter_mut().for_each(|v| *v = normal(rng) * big / 4.0);
        }
        8 => non_finite(rng, out, normal),
        9 => {
            // NaN elements in an otherwise ordinary group.
            out.iter_mut().for_each(|v| *v = normal(rng) * magnitude);
            for _ in 0..rng.gen_range(1..4) {
                let i = rng.gen_range(0..out.len());
                out[i] = f32::NAN;
            }
        }
        10 => {
            // One large value among tiny ones (codes 0 and signed zeros beside the top).
            out.iter_mut()
                .for_each(|v| *v = normal(rng) * 1e-6 * magnitude);
            out[rng.gen_range(0..out.len())] = normal(rng) * magnitude;
        }
        12 => {
            // Every element its own exponent, over f32's range (amax anywhere from 2^-140
            // to 2^127, the rest far below it or not).
            let top = rng.gen_range(-140..=127);
            let spread = [4, 30, 300][rng.gen_range(0..3)];
            out.iter_mut().for_each(|v| {
                let e = (top - rng.gen_range(0..=spread)).max(-149);
                *v = sign(rng) * rng.gen_range(1.0f32..2.0) * 2f32.powi(e)
            });
        }
        13 => {
            // Subnormals: f32's (and bf16's: the same range) or f16's, with signed zeros.
            let unit = [1e-45f32, 1e-40, 6e-8, 1e-5][rng.gen_range(0..4)];
            out.iter_mut().for_each(|v| {
                *v = match rng.gen_range(0..8) {
                    0 => sign(rng) * 0.0,
                    _ => sign(rng) * rng.gen_range(0..=64) as f32 * unit,
                }
            });
        }
        _ => {
            // Random scale, elements on a fine grid of it (near-ties of the rounded scale).
            let s = rng.gen_range(0.5f32..2.0) * unit;
            out.iter_mut()
                .for_each(|v| *v = sign(rng) * rng.gen_range(0..=96) as f32 / 16.0 * s);
        }
    }
}

/// An FP-mode weight of `spec` for a `[rows, cols]` input, every byte 0xFF (codes all ones,
/// scale codes 255), so that any byte a kernel leaves unwritten shows.
fn poisoned_fp_weight(rows: usize, cols: usize, spec: QuantSpec) -> QuantizedWeight {
    let (words, groups) = (
        spec.packed_words(cols).unwrap(),
        cols / spec.group_size() as usize,
    );
    QuantizedWeight::new(
        Buffer::from_bytes(&vec![0xFF; rows * words * 4], DType::U32, &[rows, words]).unwrap(),
        Buffer::from_bytes(&vec![0xFF; rows * groups], DType::U8, &[rows, groups]).unwrap(),
        None,
        spec,
    )
    .unwrap()
}

/// `variant`'s FP-mode quantize, into outputs poisoned beforehand, gives the generic kernel's
/// bytes exactly (packed and scales), for every mode, input dtype and flavour, on adversarial
/// groups ([`fp_adversarial_group`]) in `rows` rows of `row_groups` groups: batches of 16 of
/// one kind and of mixed kinds, several parallel tasks, and a partial last batch. Says so
/// where this machine cannot run `variant`'s kernel (generic is then compared with itself).
fn fp_quantize_matches_generic(variant: &str, seed: u64, rows: usize, row_groups: usize) {
    let mut rng = StdRng::seed_from_u64(seed);
    let (mut checked, mut failures, mut ran) = (0, Vec::new(), 0);
    let suffix = format!("_{variant}");
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        for spec in fp_specs() {
            let g = spec.group_size() as usize;
            let max = if spec.bits() == 8 { 448.0 } else { 6.0 };
            let (groups, cols) = (rows * row_groups, row_groups * g);
            let v = batches_of_kinds(&mut rng, groups, g, FP_GROUP_KINDS, |rng, kind, out| {
                fp_adversarial_group(rng, kind, max, out)
            });
            let w = Buffer::from_f32(&v, dtype, &[rows, cols]).unwrap();
            let wv = w.to_f32_vec().unwrap();
            for flavour in [Flavour::Cpu, Flavour::Gpu] {
                checked += 1;
                let ctx = format!("{dtype} {spec} {flavour}");
                let mut fast = variant_enc(variant);
                let mut got = poisoned_fp_weight(rows, cols, spec);
                ops::quantize_into(&mut fast, &w, spec, flavour, &mut got).unwrap();
                let k = key(OpKind::Quantize, spec, dtype, DType::U32, flavour);
                if let Some(e) = wrong_kernel(&fast, variant, &k) {
                    failures.push(format!("{ctx}: {e}"));
                }
                ran += usize::from(fast.last_kernel().is_some_and(|n| n.ends_with(&suffix)));
                let want = ops::quantize(&mut variant_enc("generic"), &w, spec, flavour).unwrap();
                let gb = g * spec.bits() as usize / 8;
                for (what, a, b, per_group) in [
                    ("packed", want.packed(), got.packed(), gb),
                    ("scales", want.scales(), got.scales(), 1),
                ] {
                    if let Some(i) = first_group_differing(a, b, per_group) {
                        failures.push(format!(
                            "{ctx}: {what} differ first at group {i}: want {:?} got {:?}, \
                             scale {} / {}; group {:?}",
                            &a.bytes()[i * per_group..(i + 1) * per_group],
                            &b.bytes()[i * per_group..(i + 1) * per_group],
                            want.scales().bytes()[i],
                            got.scales().bytes()[i],
                            &wv[i * g..(i + 1) * g],
                        ));
                    }
                }
            }
        }
    }
    if ran == 0 {
        eprintln!("{variant} kernels not supported here: compared generic with itself");
    }
    assert_none(
        &format!("{variant} vs generic FP quantize"),
        checked,
        failures,
    );
}

/// The avx512 FP-mode quantize gives the generic kernel's bytes ([`fp_quantize_matches_generic`]):
/// 3·1375 groups, more than 4 tasks of 1024, and 1375 = 85·16 + 15.
#[test]
fn avx512_fp_quantize_matches_generic_bit_for_bit() {
    fp_quantize_matches_generic("avx512", 0xf4_a512, 3, 1375);
}

/// Whether this machine runs the `avx2` FP quantize and dequantize kernels; if not, prints
/// why the test calling it is skipped.
fn avx2_fp_kernels_here(test: &str) -> bool {
    let spec = fp_specs()[0];
    let k = key(OpKind::Quantize, spec, DType::F32, DType::U32, Flavour::Gpu);
    let here = cpu_backend::supports("avx2", &k);
    if !here {
        eprintln!("{test}: skipped: this CPU lacks AVX2, FMA or F16C (no avx2 kernels)");
    }
    here
}

/// The avx2 FP-mode quantize gives the generic kernel's bytes ([`fp_quantize_matches_generic`]):
/// 7 rows (odd) of 603 groups, 4221 in all: more than 4 tasks of 1024, and a last batch of
/// 5 groups (4221 = 527·8 + 5).
#[test]
fn avx2_fp_quantize_matches_generic_bit_for_bit() {
    if avx2_fp_kernels_here("avx2_fp_quantize_matches_generic_bit_for_bit") {
        fp_quantize_matches_generic("avx2", 0xf4_a200, 7, 603);
    }
}

/// The first element where `got` differs from `want`, counting any NaN equal to any NaN.
///
/// Which NaN an operation on a NaN operand returns is left open by IEEE 754 and by Rust
/// (LLVM may swap the operands of `a + b`): the generic kernel's own NaN bits are a choice of
/// the compiler, not a contract.
fn first_difference_nan_eq(want: &Buffer, got: &Buffer) -> Option<usize> {
    let (w, g) = (want.to_f32_vec().unwrap(), got.to_f32_vec().unwrap());
    assert_eq!(w.len(), g.len());
    (0..w.len()).find(|&i| w[i].to_bits() != g[i].to_bits() && !(w[i].is_nan() && g[i].is_nan()))
}

/// Dequantizes `qw` with `variant`'s and the generic kernels in both flavours to every float
/// dtype (`scales`: the key's scales dtype); records each case whose values differ (any NaN
/// equal to any NaN, see [`first_difference_nan_eq`]) or whose kernel was not `variant`'s
/// (where this machine runs it), `inputs(i)` describing element `i`'s scale parameters.
/// Returns the cases checked.
fn dequantize_vs_generic(
    variant: &str,
    qw: &QuantizedWeight,
    what: &str,
    scales: DType,
    inputs: impl Fn(usize) -> String,
    failures: &mut Vec<String>,
) -> usize {
    let spec = qw.spec();
    let mut checked = 0;
    for flavour in [Flavour::Cpu, Flavour::Gpu] {
        for out in [DType::F32, DType::F16, DType::BF16] {
            checked += 1;
            let ctx = format!("{what} {flavour} -> {out}");
            let opts = DequantizeOptions {
                dtype: Some(out),
                flavour,
            };
            let mut fast = variant_enc(variant);
            let got = ops::dequantize(&mut fast, qw, opts).unwrap();
            let k = key(OpKind::Dequantize, spec, scales, out, flavour);
            if let Some(e) = wrong_kernel(&fast, variant, &k) {
                failures.push(format!("{ctx}: {e}"));
            }
            let want = ops::dequantize(&mut variant_enc("generic"), qw, opts).unwrap();
            if let Some(i) = first_difference_nan_eq(&want, &got) {
                failures.push(format!(
                    "{ctx}: first difference at {i}: want {} got {}; {}",
                    common::show(&want, i),
                    common::show(&got, i),
                    inputs(i),
                ));
            }
        }
    }
    checked
}

/// Dequantize with adversarial scales and biases (signed zeros, subnormals, huge, ±∞, NaN)
/// and random codes: the avx512 kernel gives the generic kernel's bytes for every output
/// dtype, width, group size and flavour, except that a NaN may be another NaN (see
/// [`first_difference_nan_eq`]).
#[test]
fn avx512_dequantize_matches_generic_on_special_scales() {
    let mut rng = StdRng::seed_from_u64(0xdec0de);
    let specials = [
        0.0f32,
        -0.0,
        1e-40,
        -3e-39,
        6e-8,
        1e-5,
        65504.0,
        3e38,
        -3e38,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
    ];
    let pick = |rng: &mut StdRng| {
        if rng.gen_bool(0.3) {
            specials[rng.gen_range(0..specials.len())]
        } else {
            rng.gen_range(-2.0f32..2.0) * 10f32.powi(rng.gen_range(-4..=4))
        }
    };
    let (mut checked, mut failures) = (0, Vec::new());
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        for bits in [1u32, 2, 3, 4, 5, 6, 8] {
            for g in [32usize, 64, 128] {
                let spec = QuantSpec::affine(bits, g as u32).unwrap();
                let (rows, cols) = (37, 2 * g);
                let groups = rows * cols / g;
                let words: Vec<u32> = (0..rows * cols * bits as usize / 32)
                    .map(|_| rng.gen())
                    .collect();
                let s: Vec<f32> = (0..groups).map(|_| pick(&mut rng)).collect();
                let b: Vec<f32> = (0..groups).map(|_| pick(&mut rng)).collect();
                let qw = QuantizedWeight::new(
                    Buffer::from_slice(&words, &[rows, cols * bits as usize / 32]).unwrap(),
                    Buffer::from_f32(&s, dtype, &[rows, cols / g]).unwrap(),
                    Some(Buffer::from_f32(&b, dtype, &[rows, cols / g]).unwrap()),
                    spec,
                )
                .unwrap();
                checked += dequantize_vs_generic(
                    "avx512",
                    &qw,
                    &format!("{dtype} {spec}"),
                    dtype,
                    |i| format!("scale {} bias {}", s[i / g], b[i / g]),
                    &mut failures,
                );
            }
        }
    }
    assert_none("avx512 vs generic dequantize", checked, failures);
}

/// `variant`'s FP-mode dequantize gives the generic kernel's values for every element code
/// and every scale code (0, 255 and E4M3's NaN codes included), in every mode, output dtype
/// and flavour, on `rows` rows of 5 groups; a NaN may be another NaN (see
/// [`first_difference_nan_eq`]).
fn fp_dequantize_matches_generic_on_every_code(variant: &str, seed: u64, rows: usize) {
    let mut rng = StdRng::seed_from_u64(seed);
    let (mut checked, mut failures) = (0, Vec::new());
    for spec in fp_specs() {
        let (bits, g) = (spec.bits() as usize, spec.group_size() as usize);
        let cols = 5 * g;
        let groups = rows * cols / g;
        let words: Vec<u32> = (0..rows * cols * bits / 32).map(|_| rng.gen()).collect();
        let s: Vec<u8> = (0..groups)
            .map(|i| (i % 256) as u8 ^ rng.gen::<u8>() & 1)
            .collect();
        let qw = QuantizedWeight::new(
            Buffer::from_slice(&words, &[rows, cols * bits / 32]).unwrap(),
            Buffer::from_slice(&s, &[rows, cols / g]).unwrap(),
            None,
            spec,
        )
        .unwrap();
        checked += dequantize_vs_generic(
            variant,
            &qw,
            &spec.to_string(),
            DType::U8,
            |i| format!("scale code {}", s[i / g]),
            &mut failures,
        );
    }
    assert_none(
        &format!("{variant} vs generic FP dequantize"),
        checked,
        failures,
    );
}

/// [`fp_dequantize_matches_generic_on_every_code`] on avx512: 312 rows of 5 groups, 3·520
/// groups, several tasks, every scale code about 6 times.
#[test]
fn avx512_fp_dequantize_matches_generic_on_every_code() {
    fp_dequantize_matches_generic_on_every_code("avx512", 0xdef4, 312);
}

/// [`fp_dequantize_matches_generic_on_every_code`] on avx2: 313 rows (odd) of 5 groups.
#[test]
fn avx2_fp_dequantize_matches_generic_on_every_code() {
    if avx2_fp_kernels_here("avx2_fp_dequantize_matches_generic_on_every_code") {
        fp_dequantize_matches_generic_on_every_code("avx2", 0xdef2, 313);
    }
}

/// nvfp4 rows of an odd number of 16-element groups (48 codes of 4 bits: 6 words) pack into
/// whole words and lose nothing: each group quantizes, packs and dequantizes as in a longer
/// row that starts with the same groups (groups are independent), in both flavours.
#[test]
fn nvfp4_rows_of_odd_group_counts_keep_every_code() {
    let device = Device::cpu();
    let mut enc = device.encoder();
    let spec = QuantSpec::new(mlxq::QuantMode::Nvfp4, 4, 16).unwrap();
    let mut rng = StdRng::seed_from_u64(48);
    let (rows, short, long) = (3usize, 48usize, 64usize);
    let wide: Vec<f32> = (0..rows * long)
        .map(|_| rng.gen_range(-8.0f32..8.0))
        .collect();
    let narrow: Vec<f32> = wide
        .chunks(long)
        .flat_map(|r| r[..short].iter().copied())
        .collect();
    for flavour in [Flavour::Cpu, Flavour::Gpu] {
        let qs = ops::quantize(
            &mut enc,
            &Buffer::from_f32(&narrow, DType::F32, &[rows, short]).unwrap(),
            spec,
            flavour,
        )
        .unwrap();
        let ql = ops::quantize(
            &mut enc,
            &Buffer::from_f32(&wide, DType::F32, &[rows, long]).unwrap(),
            spec,
            flavour,
        )
        .unwrap();
        assert_eq!(qs.packed().shape(), &[rows, 6]);
        assert_eq!(qs.scales().shape(), &[rows, 3]);
        let (ps, pl) = (
            qs.packed().to_vec::<u32>().unwrap(),
            ql.packed().to_vec::<u32>().unwrap(),
        );
        let (ss, sl) = (
            qs.scales().to_vec::<u8>().unwrap(),
            ql.scales().to_vec::<u8>().unwrap(),
        );
        for r in 0..rows {
            assert_eq!(
                ps[r * 6..r * 6 + 6],
                pl[r * 8..r * 8 + 6],
                "{flavour:?} row {r}"
            );
            assert_eq!(
                ss[r * 3..r * 3 + 3],
                sl[r * 4..r * 4 + 3],
                "{flavour:?} row {r}"
            );
        }
        let opts = DequantizeOptions {
            dtype: Some(DType::F32),
            flavour,
        };
        let ds = ops::dequantize(&mut enc, &qs, opts)
            .unwrap()
            .to_vec::<f32>()
            .unwrap();
        let dl = ops::dequantize(&mut enc, &ql, opts)
            .unwrap()
            .to_vec::<f32>()
            .unwrap();
        for r in 0..rows {
            let (a, b) = (
                &ds[r * short..(r + 1) * short],
                &dl[r * long..r * long + short],
            );
            assert!(
                a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()),
                "{flavour:?} row {r}"
            );
        }
    }
    enc.commit_and_wait().unwrap();
}
