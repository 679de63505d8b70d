//! `mlxq quantize`, `dequantize` and `inspect`: whole safetensors files in MLX's format.
//!
//! Outputs are byte-identical to what MLX writes when a Python script iterates
//! `mx.load(IN).items()` by the same rules and calls `mx.save_safetensors` (see
//! `tools/gen_cli_fixture.py`): tensors are visited in MLX's dict order
//! ([`Tensors::mlx_dict_order`]) and [`io::save`] lays the file out as MLX does.

use anyhow::{bail, Context};
use clap::ValueEnum;
use mlxq::io::{self, Tensors};
use mlxq::ops::{self, DequantizeOptions};
use mlxq::{Buffer, DType, Device, Flavour, QuantMode, QuantSpec};
use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// Which MLX implementation to reproduce bit for bit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum FlavourArg {
    /// MLX's Metal and CUDA kernels (`mlx_lm.convert` on a Mac or NVIDIA GPU), which made most
    /// published checkpoints: round half away from zero, group max taken as at least 0.
    Gpu,
    /// `mx.quantize` / `mx.dequantize` on MLX's CPU: round half to even, the true group max.
    Cpu,
}

impl From<FlavourArg> for Flavour {
    fn from(f: FlavourArg) -> Flavour {
        match f {
            FlavourArg::Gpu => Flavour::Gpu,
            FlavourArg::Cpu => Flavour::Cpu,
        }
    }
}

/// Output element type of `mlxq dequantize`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum FloatArg {
    /// float32.
    F32,
    /// float16.
    F16,
    /// bfloat16.
    Bf16,
}

impl From<FloatArg> for DType {
    fn from(d: FloatArg) -> DType {
        match d {
            FloatArg::F32 => DType::F32,
            FloatArg::F16 => DType::F16,
            FloatArg::Bf16 => DType::BF16,
        }
    }
}

/// Arguments of `mlxq quantize`.
///
/// Every floating-point tensor named `P.weight` with at least 2 dimensions and a last dimension
/// divisible by the group size becomes MLX's `P.weight` (uint32, packed), `P.scales` and
/// `P.biases` (in the weight's dtype; the FP modes write uint8 `P.scales` and no biases),
/// quantized along its last axis; every other tensor (norms, biases, embeddings of odd width,
/// integer tensors) is copied unchanged. The output's metadata is `{"format": "mlx"}`, as mlx-lm
/// writes.
#[derive(clap::Args)]
pub struct QuantizeArgs {
    /// Input safetensors file (float weights).
    pub input: PathBuf,
    /// Output safetensors file (replaced atomically when complete).
    pub output: PathBuf,
    /// Bits per weight: affine 1, 2, 3, 4, 5, 6 or 8 (default 4); the FP modes' own (mxfp4 and
    /// nvfp4 4, mxfp8 8) by default.
    #[arg(long)]
    pub bits: Option<u32>,
    /// Weights per group (one scale, and for affine one bias, each): affine 32, 64 or 128
    /// (default 64); the FP modes' own (mxfp4 and mxfp8 32, nvfp4 16) by default.
    #[arg(long)]
    pub group_size: Option<u32>,
    /// Quantization mode: affine (codes, scales and biases in the weight's dtype), or one of
    /// MLX's FP modes mxfp4, nvfp4, mxfp8 (FP codes and uint8 power-of-two or E4M3 scales).
    #[arg(long, default_value = "affine")]
    pub mode: String,
    /// Whose arithmetic to reproduce. gpu (default) matches MLX's Metal/CUDA kernels, which
    /// made most published checkpoints; cpu matches `mx.quantize` on MLX's CPU. The two differ
    /// on rounding ties and on groups without a positive value.
    #[arg(long, value_enum, default_value_t = FlavourArg::Gpu)]
    pub flavour: FlavourArg,
}

/// Arguments of `mlxq dequantize`.
///
/// A model directory (config.json + safetensors) is dequantized into a float model directory,
/// as `mlx_lm.convert -d`: bits and group sizes come from config.json (`--group-size` is not
/// used), the quantization block is removed from the config, other files are copied.
///
/// Every quantized module (a uint32 `P.weight` with `P.scales` and `P.biases`) becomes a float
/// `P.weight`; its scales and biases are dropped; every other tensor and the metadata are copied.
/// Bits are inferred from the shapes, which needs the group size the file was made with.
#[derive(clap::Args)]
pub struct DequantizeArgs {
    /// Input safetensors file or model directory (MLX-quantized).
    pub input: PathBuf,
    /// Output safetensors file (replaced atomically when complete), or output directory (must
    /// not exist; appears when complete).
    pub output: PathBuf,
    /// Output dtype; default: each module's scales dtype (as mx.dequantize). With the cpu
    /// flavour values are computed in the scales dtype and then converted, as MLX's CPU does.
    #[arg(long, value_enum)]
    pub dtype: Option<FloatArg>,
    /// Group size the file was quantized with (mlx-lm records it in config.json); bits are
    /// inferred as packed_cols·32 / (groups·group_size).
    #[arg(long, default_value_t = 64)]
    pub group_size: u32,
    /// Whose rounding to reproduce: gpu (default) one f32 FMA rounded once, as MLX's GPU
    /// kernels; cpu rounds after the multiply and again after the add, as MLX's CPU.
    #[arg(long, value_enum, default_value_t = FlavourArg::Gpu)]
    pub flavour: FlavourArg,
}

/// Arguments of `mlxq inspect`.
///
/// Prints every tensor (name, dtype, shape, bytes), then each quantized module's mode, bits,
/// group size and stored bits per weight (scales and biases included), then totals.
#[derive(clap::Args)]
pub struct InspectArgs {
    /// Safetensors file or model directory (config.json + safetensors) to describe. For a
    /// directory: its shards, the quantization block, every module (mode, bits, group, dtype,
    /// shape, bytes, bits per weight) and totals by spec.
    pub file: PathBuf,
    /// Group size the file was quantized with, to infer bits from shapes (see dequantize).
    #[arg(long, default_value_t = 64)]
    pub group_size: u32,
}

/// The error's chain as one line, skipping a cause whose text the message already ends with.
pub(crate) fn one_line(e: anyhow::Error) -> anyhow::Error {
    let mut msg = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !msg.ends_with(&text) {
            if !msg.is_empty() {
                msg.push_str(": ");
            }
            msg.push_str(&text);
        }
    }
    anyhow::Error::msg(msg.replace('\n', " "))
}

/// Maps `path` read-only.
fn open(path: &Path) -> anyhow::Result<Tensors> {
    // SAFETY: `load_mmap` requires that the file not be modified while mapped. mlxq never writes
    // to an input: outputs go to a temporary file renamed into place (even when OUT is IN, the
    // map keeps the old file). A different process writing IN meanwhile would break that
    // promise, as it would for any tool that maps its input; we accept that, as they do.
    Ok(unsafe { io::load_mmap(path) }?)
}

/// Whether `b` is a weight `mlxq quantize` quantizes with group size `g`.
fn quantizable(b: &Buffer, g: usize) -> bool {
    let shape = b.shape();
    b.dtype().is_float()
        && shape.len() >= 2
        && !shape.contains(&0)
        && shape.last().is_some_and(|&k| k % g == 0)
}

/// Human-readable bytes (decimal units).
pub(crate) fn size(bytes: usize) -> String {
    let mut v = bytes as f64;
    let mut unit = "B";
    for u in ["kB", "MB", "GB", "TB"] {
        if v < 1000.0 {
            break;
        }
        v /= 1000.0;
        unit = u;
    }
    if unit == "B" {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {unit}")
    }
}

/// Runs `mlxq quantize`.
pub fn quantize(a: &QuantizeArgs) -> anyhow::Result<()> {
    run_quantize(a).map_err(one_line)
}

fn run_quantize(a: &QuantizeArgs) -> anyhow::Result<()> {
    let mode = QuantMode::parse(&a.mode).context("--mode")?;
    let (bits, group) = QuantSpec::fp_defaults(mode);
    let spec = QuantSpec::new(mode, a.bits.unwrap_or(bits), a.group_size.unwrap_or(group))?;
    let flavour = Flavour::from(a.flavour);
    let input = open(&a.input)?;
    let g = spec.group_size() as usize;
    let device = Device::cpu();
    let mut enc = device.encoder();
    let mut out = Tensors::new();
    out.metadata_mut().insert("format".into(), "mlx".into());
    let mut quantized = 0;
    for name in input.mlx_dict_order() {
        let Some(b) = input.get(name) else { continue };
        match name.strip_suffix(".weight") {
            Some(p) if quantizable(b, g) => {
                for extra in ["scales", "biases"] {
                    if input.contains(&format!("{p}.{extra}")) {
                        bail!(
                            "{name}: the input already has {p}.{extra}: is it quantized already?"
                        );
                    }
                }
                let qw = ops::quantize(&mut enc, &io::aligned(b)?, spec, flavour)
                    .with_context(|| name.to_string())?;
                out.insert(name, qw.packed().clone())?;
                out.insert(format!("{p}.scales"), qw.scales().clone())?;
                if let Some(biases) = qw.biases() {
                    out.insert(format!("{p}.biases"), biases.clone())?;
                }
                quantized += 1;
            }
            _ => out.insert(name, b.clone())?,
        }
    }
    enc.commit_and_wait()?;
    io::save(&a.output, &out)?;
    println!(
        "quantized {quantized} of {} tensors ({spec}, {flavour} flavour): {} -> {}, wrote {}",
        input.len(),
        size(input.nbytes()),
        size(out.nbytes()),
        a.output.display()
    );
    Ok(())
}

/// Runs `mlxq dequantize`.
pub fn dequantize(a: &DequantizeArgs) -> anyhow::Result<()> {
    run_dequantize(a).map_err(one_line)
}

fn run_dequantize(a: &DequantizeArgs) -> anyhow::Result<()> {
    if a.input.is_dir() {
        return crate::model::dequantize(
            &a.input,
            &a.output,
            a.dtype.map(DType::from),
            a.flavour.into(),
        );
    }
    let input = open(&a.input)?;
    let modules: HashSet<&str> = input.quantized_modules().into_iter().collect();
    let opts = DequantizeOptions {
        dtype: a.dtype.map(DType::from),
        flavour: a.flavour.into(),
    };
    let device = Device::cpu();
    let mut enc = device.encoder();
    let mut out = Tensors::new();
    *out.metadata_mut() = input.metadata().clone();
    for name in input.mlx_dict_order() {
        let Some(b) = input.get(name) else { continue };
        let (prefix, suffix) = name.rsplit_once('.').unwrap_or((name, ""));
        match (modules.contains(prefix), suffix) {
            (true, "weight") => {
                let qw = input.quantized_weight(prefix, a.group_size)?;
                let w = ops::dequantize(&mut enc, &qw, opts).with_context(|| name.to_string())?;
                out.insert(name, w)?;
            }
            (true, "scales" | "biases") => {}
            _ => out.insert(name, b.clone())?,
        }
    }
    enc.commit_and_wait()?;
    io::save(&a.output, &out)?;
    println!(
        "dequantized {} modules of {}: {} -> {}, wrote {}",
        modules.len(),
        a.input.display(),
        size(input.nbytes()),
        size(out.nbytes()),
        a.output.display()
    );
    Ok(())
}

/// Why module `p` does not read with group size `g` (error `e`), and which group sizes would.
fn group_hint(t: &Tensors, p: &str, g: u32, e: &mlxq::Error) -> String {
    let last = |suffix: &str| {
        t.get(&format!("{p}.{suffix}"))
            .and_then(|b| b.shape().last().copied())
    };
    let product = match (last("weight"), last("scales")) {
        (Some(words), Some(groups)) if groups > 0 && words * 32 % groups == 0 => {
            words * 32 / groups
        }
        _ => return e.to_string(),
    };
    let fits: Vec<usize> = [32usize, 64, 128]
        .into_iter()
        .filter(|&gs| product % gs == 0 && matches!(product / gs, 1..=6 | 8))
        .collect();
    if fits.contains(&(g as usize)) {
        return e.to_string();
    }
    let fits: Vec<String> = fits
        .iter()
        .map(|gs| format!("--group-size {gs} ({} bits)", product / gs))
        .collect();
    if fits.is_empty() {
        format!("bits × group = {product} fits no MLX spec")
    } else {
        format!(
            "bits × group = {product}: no valid bits for group {g}; try {}",
            fits.join(" or ")
        )
    }
}

/// Runs `mlxq inspect`.
pub fn inspect(a: &InspectArgs) -> anyhow::Result<()> {
    run_inspect(a).map_err(one_line)
}

fn run_inspect(a: &InspectArgs) -> anyhow::Result<()> {
    if a.file.is_dir() {
        return crate::model::inspect(&a.file);
    }
    let t = open(&a.file)?;
    let mut names: Vec<&str> = t.names().collect();
    names.sort_unstable();
    let shape_of = |s: &[usize]| {
        let dims: Vec<String> = s.iter().map(usize::to_string).collect();
        format!("[{}]", dims.join(", "))
    };
    let width = names.iter().map(|n| n.len()).max().unwrap_or(0).max(6);
    println!("{}", a.file.display());
    let meta: Vec<String> = t
        .metadata()
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    if !meta.is_empty() {
        println!("metadata: {}", meta.join(", "));
    }
    println!();
    println!(
        "{:<width$}  {:<8}  {:<18}  {:>12}",
        "tensor", "dtype", "shape", "bytes"
    );
    for name in &names {
        if let Some(b) = t.get(name) {
            println!(
                "{name:<width$}  {:<8}  {:<18}  {:>12}",
                b.dtype().name(),
                shape_of(b.shape()),
                b.nbytes()
            );
        }
    }

    let modules = t.quantized_modules();
    let (mut q_weights, mut q_bytes, mut unreadable) = (0usize, 0usize, 0usize);
    if !modules.is_empty() {
        let mut sorted = modules.clone();
        sorted.sort_unstable();
        let width = sorted.iter().map(|n| n.len()).max().unwrap_or(0).max(6);
        println!();
        println!(
            "{:<width$}  {:<6}  {:>4}  {:>5}  {:<8}  {:<18}  {:>11}",
            "module", "mode", "bits", "group", "scales", "shape", "bits/weight"
        );
        for p in sorted {
            match t.quantized_weight(p, a.group_size) {
                Ok(qw) => {
                    let spec = qw.spec();
                    q_weights += qw.shape().iter().product::<usize>();
                    q_bytes += qw.nbytes();
                    println!(
                        "{p:<width$}  {:<6}  {:>4}  {:>5}  {:<8}  {:<18}  {:>11.3}",
                        spec.mode().name(),
                        spec.bits(),
                        spec.group_size(),
                        qw.scales_dtype().name(),
                        shape_of(qw.shape()),
                        qw.bits_per_weight()
                    );
                }
                Err(e) => {
                    unreadable += 1;
                    println!(
                        "{p:<width$}  ?       {}",
                        group_hint(&t, p, a.group_size, &e)
                    );
                }
            }
        }
    }
    println!();
    println!(
        "{} tensors, {} ({} bytes)",
        t.len(),
        size(t.nbytes()),
        t.nbytes()
    );
    if modules.is_empty() {
        println!("no quantized modules");
    } else if q_weights > 0 {
        println!(
            "{} quantized modules: {} weights in {}, {:.3} bits per weight",
            modules.len() - unreadable,
            q_weights,
            size(q_bytes),
            q_bytes as f64 * 8.0 / q_weights as f64
        );
    }
    if unreadable > 0 {
        println!(
            "{unreadable} quantized modules do not fit --group-size {} (see ? above)",
            a.group_size
        );
    }
    Ok(())
}
