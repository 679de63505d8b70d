//! Model directories: `mlxq convert`, `mlxq verify`, and the directory forms of `mlxq inspect`
//! and `mlxq dequantize` (config.json + safetensors shards, as mlx_lm writes them).

use crate::files::{one_line, size, FlavourArg};
use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use mlxq::io::{self, ModelDir, ModuleQuant, ModuleWeight, Progress};
use mlxq::ops::{self, DequantizeOptions};
use mlxq::{Buffer, DType, Device, Flavour, QuantMode, QuantSpec};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Arguments of `mlxq convert`.
///
/// Converts a Hugging Face model directory (config.json, safetensors: single or sharded,
/// float32/float16/bfloat16) into an MLX one, as `mlx_lm.convert [-q]` does: the
/// architecture's renames and expert stacking (llama, mistral, qwen2, qwen3, mixtral,
/// qwen3_moe), the cast to `--dtype` or config.json's `torch_dtype`, and with `-q` the
/// quantization of every Linear, Embedding and expert stack whose input size is a multiple of
/// the group size (Qwen3-MoE routers at 8 bits, as mlx_lm). Shards of at most 5 GiB with an
/// index, config.json with the quantization block, tokenizer and other files copied. The output
/// appears only when complete.
#[derive(clap::Args)]
pub struct ConvertArgs {
    /// Hugging Face model directory.
    pub hf_dir: PathBuf,
    /// Output directory (must not exist).
    pub out_dir: PathBuf,
    /// Quantize (as `mlx_lm.convert -q`).
    #[arg(short = 'q', long)]
    pub quantize: bool,
    /// Bits per weight (default: the mode's: affine 4, mxfp4 4, nvfp4 4, mxfp8 8).
    #[arg(long, visible_alias = "q-bits")]
    pub bits: Option<u32>,
    /// Weights per group (default: the mode's: affine 64, mxfp4 32, nvfp4 16, mxfp8 32).
    #[arg(long, visible_alias = "q-group-size")]
    pub group_size: Option<u32>,
    /// Quantization mode: affine, mxfp4, nvfp4 or mxfp8 (as `mlx_lm.convert --q-mode`). The FP
    /// modes have fixed bits and group sizes and no biases; mixed recipes take affine only.
    #[arg(long, visible_alias = "q-mode", default_value = "affine")]
    pub mode: String,
    /// Whose arithmetic to reproduce: gpu (default; Metal/CUDA, mlx_lm on a Mac) or cpu
    /// (mlx_lm on Linux, `mx.quantize` on MLX's CPU).
    #[arg(long, value_enum, default_value_t = FlavourArg::Gpu)]
    pub flavour: FlavourArg,
    /// Cast float tensors to float16, bfloat16 or float32 (default: config.json's torch_dtype).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Mixed-bit recipe of mlx_lm: mixed_2_6, mixed_3_4, mixed_3_6 or mixed_4_6.
    #[arg(long)]
    pub quant_predicate: Option<String>,
    /// Per-module override `PATTERN=SPEC` (repeatable): modules whose path is PATTERN or ends
    /// with `.PATTERN` get SPEC: `false` (keep in float), `BITS`, `BITS,GROUP` or
    /// `BITS,GROUP,MODE`. The first matching override wins over the recipe and the architecture.
    #[arg(long = "override", value_name = "PATTERN=SPEC")]
    pub overrides: Vec<String>,
    /// Largest shard in bytes (default 5 GiB, as mlx_lm).
    #[arg(long, hide = true)]
    pub max_shard_bytes: Option<usize>,
}

/// Arguments of `mlxq verify`.
///
/// Opens a model directory (checking config.json against every shard and quantized module),
/// dequantizes every quantized module and checks that it is finite; with `--against`, prints
/// the quantization error of every quantized tensor against the original float model.
#[derive(clap::Args)]
pub struct VerifyArgs {
    /// MLX model directory.
    pub dir: PathBuf,
    /// The Hugging Face directory it was converted from.
    #[arg(long)]
    pub against: Option<PathBuf>,
    /// Rounding of the dequantization: gpu (default) or cpu.
    #[arg(long, value_enum, default_value_t = FlavourArg::Gpu)]
    pub flavour: FlavourArg,
}

fn parse_override(s: &str) -> anyhow::Result<(String, ModuleQuant)> {
    let (pattern, spec) = s
        .split_once('=')
        .with_context(|| format!("--override {s:?}: expected PATTERN=SPEC"))?;
    if spec == "false" {
        return Ok((pattern.to_string(), ModuleQuant::Skip));
    }
    let parts: Vec<&str> = spec.split(',').collect();
    let num = |i: usize, what: &str| -> anyhow::Result<Option<u32>> {
        parts
            .get(i)
            .map(|p| {
                p.parse::<u32>()
                    .with_context(|| format!("--override {s:?}: {what} {p:?} is not a number"))
            })
            .transpose()
    };
    let mode = match parts.get(2) {
        Some(m) => QuantMode::parse(m)?,
        None => QuantMode::Affine,
    };
    let (db, dg) = QuantSpec::fp_defaults(mode);
    if parts.len() > 3 {
        bail!("--override {s:?}: expected false, BITS, BITS,GROUP or BITS,GROUP,MODE");
    }
    let spec = QuantSpec::new(
        mode,
        num(0, "bits")?.unwrap_or(db),
        num(1, "group")?.unwrap_or(dg),
    )
    .with_context(|| format!("--override {s:?}"))?;
    Ok((pattern.to_string(), ModuleQuant::Quantize(spec)))
}

/// A progress bar over source bytes, with throughput.
fn bar(total: u64) -> ProgressBar {
    let pb = ProgressBar::new(total);
    pb.set_style(
        ProgressStyle::with_template(
            "{elapsed_precise} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    pb
}

fn on_progress(pb: &ProgressBar) -> impl FnMut(&Progress) + '_ {
    move |p: &Progress| {
        if pb.length() != Some(p.total_bytes) {
            pb.set_length(p.total_bytes);
        }
        pb.set_position(p.done_bytes);
        pb.set_message(p.current.clone());
    }
}

/// Runs `mlxq convert`.
pub fn convert(a: &ConvertArgs) -> anyhow::Result<()> {
    run_convert(a).map_err(one_line)
}

fn run_convert(a: &ConvertArgs) -> anyhow::Result<()> {
    let mode = QuantMode::parse(&a.mode).context("--mode")?;
    let dtype = a
        .dtype
        .as_deref()
        .map(|d| match DType::parse(d) {
            Some(t) if t.is_float() => Ok(t),
            _ => Err(anyhow::anyhow!(
                "--dtype {d:?}: expected float16, bfloat16 or float32"
            )),
        })
        .transpose()?;
    let recipe = a
        .quant_predicate
        .as_deref()
        .map(io::Recipe::parse)
        .transpose()?;
    let overrides = a
        .overrides
        .iter()
        .map(|s| parse_override(s))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if !a.quantize
        && (a.bits.is_some()
            || a.group_size.is_some()
            || mode != QuantMode::Affine
            || recipe.is_some()
            || !overrides.is_empty())
    {
        bail!("--bits, --group-size, --mode, --quant-predicate and --override need -q");
    }
    let opts = io::ConvertOptions {
        quantize: a.quantize,
        bits: a.bits,
        group_size: a.group_size,
        mode,
        flavour: a.flavour.into(),
        dtype,
        recipe,
        overrides,
        max_shard_bytes: a.max_shard_bytes.unwrap_or(io::MAX_SHARD_BYTES),
    };
    let start = Instant::now();
    let pb = bar(0);
    let summary = io::convert(&a.hf_dir, &a.out_dir, &opts, &mut on_progress(&pb));
    pb.finish_and_clear();
    let s = summary?;
    let secs = start.elapsed().as_secs_f64();
    let what = match &s.quantization {
        Some(q) => format!(
            "quantized {} modules ({}, {} flavour, {} per-module entries)",
            s.quantized,
            q.default_spec(),
            Flavour::from(a.flavour),
            q.modules().len()
        ),
        None => "not quantized".to_string(),
    };
    println!(
        "{} -> {}: {what}; {} tensors in, {} out in {} shard(s); {} -> {} in {secs:.1} s ({:.2} GB/s)",
        a.hf_dir.display(),
        a.out_dir.display(),
        s.tensors_in,
        s.tensors_out,
        s.shards,
        size(s.bytes_in as usize),
        size(s.bytes_out as usize),
        s.bytes_in as f64 / secs.max(1e-9) / 1e9
    );
    Ok(())
}

/// Opens a model directory read-only.
pub fn open(dir: &Path) -> anyhow::Result<ModelDir> {
    // SAFETY: as `files::open`: mlxq never writes into an input; another process modifying the
    // shards while mapped would break the promise, as for any tool that maps its input.
    Ok(unsafe { ModelDir::open(dir) }?)
}

fn shape_of(s: &[usize]) -> String {
    let dims: Vec<String> = s.iter().map(usize::to_string).collect();
    format!("[{}]", dims.join(", "))
}

/// `mlxq inspect DIR`.
pub fn inspect(dir: &Path) -> anyhow::Result<()> {
    let m = open(dir)?;
    println!("{}", dir.display());
    if let Some(t) = m.config().get("model_type").and_then(|v| v.as_str()) {
        println!("model_type: {t}");
    }
    for (p, t) in m.shards() {
        println!(
            "shard {}: {} tensors, {}",
            p.file_name().map_or(p.display().to_string(), |n| n
                .to_string_lossy()
                .into_owned()),
            t.len(),
            size(t.nbytes())
        );
    }
    match m.quantization() {
        Some(q) => println!(
            "quantization: {} ({} per-module entries)",
            q.default_spec(),
            q.modules().len()
        ),
        None => println!("quantization: none"),
    }
    let modules = m.modules();
    let width = modules.iter().map(|n| n.len()).max().unwrap_or(0).max(6);
    println!();
    println!(
        "{:<width$}  {:<6}  {:>4}  {:>5}  {:<8}  {:<20}  {:>12}  {:>11}",
        "module", "mode", "bits", "group", "dtype", "shape", "bytes", "bits/weight"
    );
    let (mut q_weights, mut q_bytes, mut d_weights, mut d_bytes) = (0usize, 0usize, 0usize, 0usize);
    let mut by_spec: std::collections::BTreeMap<String, (usize, usize)> = Default::default();
    for p in &modules {
        match m.weight(p)? {
            ModuleWeight::Quantized(qw) => {
                let spec = qw.spec();
                let n: usize = qw.shape().iter().product();
                q_weights += n;
                q_bytes += qw.nbytes();
                let e = by_spec.entry(spec.to_string()).or_default();
                e.0 += 1;
                e.1 += n;
                println!(
                    "{p:<width$}  {:<6}  {:>4}  {:>5}  {:<8}  {:<20}  {:>12}  {:>11.3}",
                    spec.mode().name(),
                    spec.bits(),
                    spec.group_size(),
                    qw.scales_dtype().name(),
                    shape_of(qw.shape()),
                    qw.nbytes(),
                    qw.bits_per_weight()
                );
            }
            ModuleWeight::Dense(b) => {
                d_weights += b.numel();
                d_bytes += b.nbytes();
                println!(
                    "{p:<width$}  {:<6}  {:>4}  {:>5}  {:<8}  {:<20}  {:>12}  {:>11.3}",
                    "-",
                    "-",
                    "-",
                    b.dtype().name(),
                    shape_of(b.shape()),
                    b.nbytes(),
                    b.dtype().size() as f64 * 8.0
                );
            }
        }
        if let Some(b) = m.bias(p) {
            d_weights += b.numel();
            d_bytes += b.nbytes();
        }
    }
    println!();
    let total = q_weights + d_weights;
    println!(
        "{} tensors, {} modules, {} ({} bytes)",
        m.tensor_names().len(),
        modules.len(),
        size(m.nbytes()),
        m.nbytes()
    );
    if q_weights > 0 {
        println!(
            "{} quantized modules: {} weights in {}, {:.3} bits per weight",
            m.quantized_modules().len(),
            q_weights,
            size(q_bytes),
            q_bytes as f64 * 8.0 / q_weights as f64
        );
        for (spec, (count, n)) in &by_spec {
            println!("  {spec}: {count} modules, {n} weights");
        }
    }
    println!(
        "{} float weights in {}; overall {:.3} bits per weight",
        d_weights,
        size(d_bytes),
        (q_bytes + d_bytes) as f64 * 8.0 / total.max(1) as f64
    );
    Ok(())
}

/// `mlxq dequantize DIR OUT_DIR`.
pub fn dequantize(
    dir: &Path,
    out: &Path,
    dtype: Option<DType>,
    flavour: Flavour,
) -> anyhow::Result<()> {
    let m = open(dir)?;
    let start = Instant::now();
    let pb = bar(m.nbytes() as u64);
    let opts = io::DequantizeDirOptions {
        dtype,
        flavour,
        max_shard_bytes: 0,
    };
    let r = io::dequantize_dir(&m, out, opts, &mut on_progress(&pb));
    pb.finish_and_clear();
    let s = r?;
    println!(
        "dequantized {} modules of {}: {} -> {} in {} shard(s), wrote {} in {:.1} s",
        s.quantized,
        dir.display(),
        size(s.bytes_in as usize),
        size(s.bytes_out as usize),
        s.shards,
        out.display(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Runs `mlxq verify`.
pub fn verify(a: &VerifyArgs) -> anyhow::Result<()> {
    run_verify(a).map_err(one_line)
}

/// Error statistics of one tensor: max |e|, rms(e), rms(original).
fn errors(orig: &[f32], deq: &[f32]) -> (f64, f64, f64) {
    let (mut max, mut se, mut so) = (0f64, 0f64, 0f64);
    for (&o, &d) in orig.iter().zip(deq) {
        let e = (o as f64 - d as f64).abs();
        max = max.max(e);
        se += e * e;
        so += (o as f64) * (o as f64);
    }
    let n = orig.len().max(1) as f64;
    (max, (se / n).sqrt(), (so / n).sqrt())
}

fn run_verify(a: &VerifyArgs) -> anyhow::Result<()> {
    let m = open(&a.dir)?;
    let against = a
        .against
        .as_deref()
        .map(io::SanitizedModel::open)
        .transpose()?;
    let device = Device::cpu();
    let mut enc = device.encoder();
    let opts = DequantizeOptions {
        dtype: Some(DType::F32),
        flavour: a.flavour.into(),
    };
    let specs = m.quantized_modules();
    let width = specs.keys().map(|n| n.len()).max().unwrap_or(0).max(6);
    if against.is_some() {
        println!(
            "{:<width$}  {:<22}  {:>11}  {:>11}  {:>9}",
            "module", "spec", "max |err|", "rms err", "rel rms"
        );
    }
    let mut bad = Vec::new();
    let (mut worst, mut sum_rel, mut compared) = (0f64, 0f64, 0usize);
    for (p, spec) in specs {
        let ModuleWeight::Quantized(qw) = m.weight(p)? else {
            bail!("{p}: expected a quantized weight");
        };
        let w = ops::dequantize(&mut enc, &qw, opts).with_context(|| p.clone())?;
        enc.commit_and_wait()?;
        let deq = w.to_vec::<f32>()?;
        let scales_finite = qw.scales().dtype() == DType::U8
            || qw.scales().to_f32_vec()?.iter().all(|v| v.is_finite());
        if !scales_finite || !deq.iter().all(|v| v.is_finite()) {
            bad.push(format!("{p}: non-finite scales or values"));
            continue;
        }
        let Some(hf) = &against else { continue };
        let name = format!("{p}.weight");
        let Some(orig) = hf.read(&name)? else {
            bad.push(format!(
                "{p}: not in {}",
                a.against.as_deref().unwrap_or(Path::new("")).display()
            ));
            continue;
        };
        if orig.shape() != qw.shape() {
            bad.push(format!(
                "{p}: shape {:?} here, {:?} in the original",
                qw.shape(),
                orig.shape()
            ));
            continue;
        }
        let (max, rms, rms_o) = errors(&orig.to_f32_vec()?, &deq);
        let rel = rms / rms_o.max(f64::MIN_POSITIVE);
        worst = worst.max(rel);
        sum_rel += rel;
        compared += 1;
        println!(
            "{p:<width$}  {:<22}  {max:>11.4e}  {rms:>11.4e}  {rel:>9.4}",
            spec.to_string()
        );
    }
    if let Some(hf) = &against {
        // Dense tensors must be the original's, up to the cast.
        for p in m.tensor_names() {
            let module = p.rsplit_once('.').map_or(p, |x| x.0);
            if specs.contains_key(module) {
                continue;
            }
            let Some(b) = m.tensor(p) else { continue };
            if !b.dtype().is_float() {
                continue;
            }
            if let Some(o) = hf.read(p)? {
                let cast = Buffer::from_f32(&o.to_f32_vec()?, b.dtype(), o.shape())?;
                if cast.bytes() != b.bytes() {
                    bad.push(format!(
                        "{p}: differs from the original (after the cast to {})",
                        b.dtype()
                    ));
                }
            }
        }
    }
    println!();
    println!(
        "{}: {} quantized modules consistent{}",
        a.dir.display(),
        specs.len() - bad.len().min(specs.len()),
        if compared > 0 {
            format!(
                "; against the original: mean relative rms error {:.4}, worst {:.4}",
                sum_rel / compared as f64,
                worst
            )
        } else {
            String::new()
        }
    );
    if !bad.is_empty() {
        for b in &bad {
            println!("problem: {b}");
        }
        bail!("{} problem(s) found", bad.len());
    }
    Ok(())
}
