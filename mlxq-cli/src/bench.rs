//! `mlxq bench`: times `quantized_matmul`, `gather_qmm`, `quantize` and `dequantize` on random
//! weights, checks every result against the f64 oracle, and sets the times against the
//! machine's memory bandwidth, measured in the same run.
//!
//! What is measured, and how:
//! - Each case quantizes random weights once (scales in x's dtype), then replicates them into
//!   enough byte-identical copies that cycling through them streams more than `--rotate-mib`
//!   (default 576 MiB, over twice a 260 MiB L3) between two uses of one copy; timed calls
//!   rotate through the copies, so no weight byte is served from cache. The `copies` column
//!   counts the copies a case actually touched (few at large M, where a case runs few calls).
//! - Iteration counts adapt to `--min-time` per case (or are fixed by `--iters`); the reported
//!   time is the median of the timed calls after `--warmup` calls.
//! - GB/s counts the bytes of quantized weights a call must read ([`QuantizedWeight::nbytes`],
//!   for `gather` only the experts it selected; for `quantize` the floats read plus the
//!   quantized bytes written; for `dequantize` the quantized bytes read plus the floats
//!   written). The roofline is a multi-threaded streaming read of a
//!   `--bandwidth-mib` buffer, best of a few runs, read at the start and again after every
//!   case; each result's ratio is to the highest reading up to and including its own (the
//!   bandwidth of a shared machine moves with its neighbours, and a low first reading would
//!   otherwise flatter every later case).
//! - Checking computes only a sample of outputs in f64 (`--check-rows` rows of x ×
//!   `--check-cols` output columns, from the dequantized rows of W that feed them), so it costs
//!   a small fraction of the run; each result says what it checked. `quantize` is checked bit
//!   for bit against [`mlxq::quant::affine::quantize_group`] on sampled rows, `dequantize`
//!   bit for bit against [`mlxq::quant::affine::dequantize_value`] (the FP modes'
//!   [`mlxq::quant::fp::dequantize_value`]) on sampled rows.
//!
//! Progress goes to stderr, the table (or `--json` lines) to stdout. Exits non-zero when any
//! result exceeds its tolerance (normwise relative: 1e-5 for f32 x, 1e-2 for bf16/f16;
//! 3/L for the opt-in int8 variants, L the levels of their x grid,
//! [`mlxq::backend::cpu::int8_levels`]; 0, i.e. bit-exact, for `quantize` and `dequantize`).
//!
//! [`QuantizedWeight::nbytes`]: mlxq::QuantizedWeight::nbytes

mod cases;
mod check;
#[cfg(feature = "cuda")]
mod cuda;
mod data;
mod plot;
mod report;
mod timing;

use anyhow::{bail, Context};
use mlxq::{DType, Device, Flavour, QuantMode, QuantSpec};
use std::path::PathBuf;

/// Which operation a case times.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Op {
    /// `quantized_matmul`: y = x · Wᵀ (or x · W with `--transpose false`).
    Matmul,
    /// `gather_qmm`: a Mixture-of-Experts layer, each token against its top-k experts.
    Gather,
    /// `quantize`: float weights of shape N×K → packed codes, scales and biases.
    Quantize,
    /// `dequantize`: packed codes, scales and biases of shape N×K → floats of `--dtype`.
    Dequantize,
}

/// The values of the cuBLAS reference's inputs (`--cublas-data`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum CublasData {
    /// Random x and W, drawn as the quantized cases' are.
    Random,
    /// Every element 0x3c3c (≈ 0.0115), the reference before session 48.
    Const,
}

/// Arguments of `mlxq bench`.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Problem shape M,N,K: y[M,N] = x[M,K] · W[N,K]ᵀ (repeatable). Default: Llama-3-8B-like
    /// layers N×K = 4096×4096, 14336×4096, 4096×14336 at M = 1, 8, 128. `quantize` and `dequantize` use N×K.
    #[arg(long = "shape", value_name = "M,N,K", value_parser = parse_shape)]
    pub shapes: Vec<[usize; 3]>,
    /// Operations to time (repeatable or comma-separated).
    #[arg(long = "op", value_enum, value_delimiter = ',', default_values_t = [Op::Matmul])]
    pub ops: Vec<Op>,
    /// Bits per weight (repeatable or comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = [4, 8])]
    pub bits: Vec<u32>,
    /// Elements per quantization group.
    #[arg(long, default_value_t = 64)]
    pub group_size: u32,
    /// Quantization mode: affine (with `--bits` and `--group-size`), or one of MLX's FP modes
    /// mxfp4, mxfp8, nvfp4, which have their own element width and group size (`--bits` and
    /// `--group-size` are then not used). The FP modes time every op.
    #[arg(long, default_value = "affine", value_parser = parse_mode)]
    pub mode: QuantMode,
    /// dtype of x (and of the weights' scales and biases): bf16, f16 or f32.
    #[arg(long, default_value = "bf16", value_parser = parse_dtype)]
    pub dtype: DType,
    /// Device to run on: cpu (or cuda:N, where built with a CUDA backend).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Weight layout: true times x · Wᵀ with W [N, K], false x · W with W [K, N]
    /// (repeatable or comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = [true], value_name = "true|false")]
    pub transpose: Vec<bool>,
    /// Print one JSON object per result instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Write a roofline chart (SVG) to this file.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
    /// Knobs that defaults serve well (boxed: they would make `BenchArgs` the one large
    /// variant of the CLI's command enum).
    #[command(flatten)]
    pub tune: Box<Tuning>,
}

/// The finer knobs of `mlxq bench`.
#[derive(clap::Args, Debug)]
#[command(next_help_heading = "MoE, timing and checking")]
pub struct Tuning {
    /// MoE weights of `--op gather`: experts,N,K.
    #[arg(long, value_name = "E,N,K", default_value = "64,2048,2048", value_parser = parse_shape)]
    pub moe: [usize; 3],
    /// Experts per token of `--op gather`.
    #[arg(long, default_value_t = 8)]
    pub top_k: usize,
    /// Token counts of `--op gather` (default: the M values of the shapes).
    #[arg(long, value_delimiter = ',')]
    pub tokens: Vec<usize>,
    /// Rounding flavour of the quantizer (gpu: MLX's Metal/CUDA kernels; cpu: `mx.quantize` on CPU).
    #[arg(long, default_value = "gpu", value_parser = parse_flavour)]
    pub flavour: Flavour,
    /// Prefer this CPU kernel variant where it applies (others fall back to `generic`); the
    /// kernel column says which ran. Default: the best the CPU supports.
    #[arg(long, value_parser = mlxq::backend::cpu::VARIANTS.to_vec())]
    pub variant: Option<String>,
    /// Timed calls per case; fixes the count instead of adapting it to `--min-time`.
    #[arg(long)]
    pub iters: Option<usize>,
    /// Untimed calls before timing each case.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Seconds of timed calls per case, when `--iters` is not given (and at least 3 calls,
    /// unless those already took 3× this).
    #[arg(long, default_value_t = 0.5)]
    pub min_time: f64,
    /// Rotate weight copies until they total at least this many MiB (defeats the caches).
    #[arg(long, default_value_t = 576)]
    pub rotate_mib: usize,
    /// Upper limit on copies of one weight.
    #[arg(long, default_value_t = 256)]
    pub max_copies: usize,
    /// Size of the buffer the bandwidth measurement streams, MiB.
    #[arg(long, default_value_t = 1024)]
    pub bandwidth_mib: usize,
    /// Output columns checked against the f64 reference per result.
    #[arg(long, default_value_t = 32)]
    pub check_cols: usize,
    /// Rows of x (tokens × experts for gather, weight rows for (de)quantize) checked per result.
    #[arg(long, default_value_t = 128)]
    pub check_rows: usize,
    /// A compute ceiling, GFLOP/s, to draw on the chart (not measured).
    #[arg(long)]
    pub peak_gflops: Option<f64>,
    /// CUDA: also time one CUDA graph replaying the matmuls of a whole Llama-3-8B decode step
    /// (32 layers × q, k, v, o, gate, up, down at M = 1, each layer its own weights).
    #[arg(long)]
    pub chain: bool,
    /// CUDA, with `--chain`: run the decode step with each layer's q, k, v fused into one
    /// 6144×4096 weight and gate, up into one 28672×4096 weight (stacked with
    /// `QuantizedWeight::concat_rows` from separately quantized parts: the same bytes), 4
    /// matmuls a layer (qkv, o, gate_up, down) instead of 7.
    #[arg(long, requires = "chain")]
    pub fuse: bool,
    /// CUDA: leave out the cuBLAS bf16 column (e.g. under compute-sanitizer, whose racecheck
    /// reports hazards inside cuBLAS's own kernels).
    #[arg(long)]
    pub no_cublas: bool,
    /// CUDA: the values of the cuBLAS reference's x and W: `random` (as the quantized
    /// cases'), or `const` (every element ≈ 0.0115: fewer bits toggle, the tensor cores draw
    /// less power and clock higher, a flattering reference kept for comparison).
    #[arg(long, value_enum, default_value_t = CublasData::Random)]
    pub cublas_data: CublasData,
    /// Seed of the random weights and inputs.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// Default problem: Llama-3-8B-like projections (N×K) at decode (1), small batch (8) and
/// prefill (128) row counts.
const DEFAULT_SHAPES: [[usize; 3]; 9] = [
    [1, 4096, 4096],
    [8, 4096, 4096],
    [128, 4096, 4096],
    [1, 14336, 4096],
    [8, 14336, 4096],
    [128, 14336, 4096],
    [1, 4096, 14336],
    [8, 4096, 14336],
    [128, 4096, 14336],
];

fn parse_shape(s: &str) -> Result<[usize; 3], String> {
    let err = || {
        format!("expected three positive integers separated by commas, e.g. 1,4096,4096; got '{s}'")
    };
    let parts: Vec<usize> = s
        .split(',')
        .map(|p| p.trim().parse::<usize>().map_err(|_| err()))
        .collect::<Result<_, _>>()?;
    match parts[..] {
        [a, b, c] if a > 0 && b > 0 && c > 0 => Ok([a, b, c]),
        _ => Err(err()),
    }
}

fn parse_dtype(s: &str) -> Result<DType, String> {
    DType::parse(s)
        .filter(|d| d.is_float())
        .ok_or_else(|| format!("expected bf16, f16 or f32; got '{s}'"))
}

fn parse_mode(s: &str) -> Result<QuantMode, String> {
    QuantMode::parse(s).map_err(|_| format!("expected affine, mxfp4, mxfp8 or nvfp4; got '{s}'"))
}

fn parse_flavour(s: &str) -> Result<Flavour, String> {
    Flavour::parse(s).map_err(|e| e.to_string())
}

/// Everything a case needs besides its own shape, validated once.
pub(crate) struct Setup {
    pub device: Device,
    pub dtype: DType,
    pub flavour: Flavour,
    pub timing: timing::Plan,
    pub rotate_bytes: usize,
    pub max_copies: usize,
    pub check_rows: usize,
    pub check_cols: usize,
    /// The bandwidth probe, read again after every case.
    pub roofline: timing::Roofline,
    pub seed: u64,
}

/// Runs the benchmark.
pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let device = match &args.tune.variant {
        Some(v) if args.device == "cpu" => {
            Device::cpu_with_variant(v).with_context(|| format!("--variant {v}"))?
        }
        Some(_) => anyhow::bail!("--variant applies to --device cpu only"),
        None => Device::parse(&args.device).with_context(|| format!("--device {}", args.device))?,
    };
    let shapes: Vec<[usize; 3]> = if args.shapes.is_empty() {
        DEFAULT_SHAPES.to_vec()
    } else {
        args.shapes.clone()
    };
    let specs = if args.mode == QuantMode::Affine {
        args.bits
            .iter()
            .map(|&b| QuantSpec::affine(b, args.group_size))
            .collect::<mlxq::Result<Vec<_>>>()
            .context("--bits / --group-size")?
    } else {
        let (bits, g) = QuantSpec::fp_defaults(args.mode);
        vec![QuantSpec::new(args.mode, bits, g).context("--mode")?]
    };
    let group = specs.first().map_or(args.group_size, QuantSpec::group_size);
    validate(args, &shapes, group as usize)?;
    #[cfg(feature = "cuda")]
    if device.location() != mlxq::Location::Cpu {
        return cuda::run(args, &device, &shapes, &specs);
    }
    let tokens: Vec<usize> = if args.tune.tokens.is_empty() {
        dedup(shapes.iter().map(|s| s[0]))
    } else {
        args.tune.tokens.clone()
    };

    eprintln!(
        "measuring memory read bandwidth ({} MiB, {} threads)...",
        args.tune.bandwidth_mib,
        rayon::current_num_threads()
    );
    let roofline = timing::Roofline::new(args.tune.bandwidth_mib << 20, 5)?;
    eprintln!("memory read bandwidth: {:.1} GB/s", roofline.best());

    let setup = Setup {
        device,
        dtype: args.dtype,
        flavour: args.tune.flavour,
        timing: timing::Plan {
            warmup: args.tune.warmup,
            iters: args.tune.iters,
            min_time: args.tune.min_time,
        },
        rotate_bytes: args.tune.rotate_mib << 20,
        max_copies: args.tune.max_copies.max(1),
        check_rows: args.tune.check_rows.max(1),
        check_cols: args.tune.check_cols.max(1),
        roofline,
        seed: args.tune.seed,
    };
    let mut out = report::Reporter::new(args.json);
    for op in dedup(args.ops.iter().copied()) {
        match op {
            Op::Matmul => cases::matmul(&setup, &shapes, &specs, &args.transpose, &mut out)?,
            Op::Gather => {
                let moe = cases::Moe {
                    experts: args.tune.moe[0],
                    n: args.tune.moe[1],
                    k: args.tune.moe[2],
                    top_k: args.tune.top_k,
                };
                cases::gather(&setup, moe, &tokens, &specs, &args.transpose, &mut out)?
            }
            Op::Quantize => cases::quantize(&setup, &shapes, &specs, &mut out)?,
            Op::Dequantize => cases::dequantize(&setup, &shapes, &specs, &mut out)?,
        }
    }
    let records = out.finish();
    if let Some(path) = &args.plot {
        let svg = plot::roofline_svg(&records, setup.roofline.best(), args.tune.peak_gflops);
        std::fs::write(path, svg).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote roofline chart to {}", path.display());
    }
    let failed: Vec<_> = records.iter().filter(|r| !r.pass).collect();
    if !failed.is_empty() {
        for r in &failed {
            eprintln!(
                "FAILED: {} {} {}-bit {}: max relative error {:.3e} exceeds {:.0e} (checked {})",
                r.op,
                r.shape_label(),
                r.bits,
                r.dtype,
                r.max_rel_err,
                r.tolerance,
                r.checked_words()
            );
        }
        bail!(
            "{} of {} results exceed tolerance",
            failed.len(),
            records.len()
        );
    }
    Ok(())
}

/// Rejects arguments no case could run with, before spending minutes on the others.
fn validate(args: &BenchArgs, shapes: &[[usize; 3]], g: usize) -> anyhow::Result<()> {
    let runs = |op| args.ops.contains(&op);
    // The group size as the user set it: --group-size, or the FP mode's own.
    let group = if args.mode == QuantMode::Affine {
        format!("--group-size {g}")
    } else {
        format!("the {} group size {g}", args.mode)
    };
    if let Some(0) = args.tune.iters {
        bail!("--iters must be at least 1");
    }
    if !(args.tune.min_time.is_finite() && args.tune.min_time >= 0.0) {
        bail!(
            "--min-time must be a non-negative number of seconds, got {}",
            args.tune.min_time
        );
    }
    if args.tune.bandwidth_mib < 16 {
        bail!(
            "--bandwidth-mib must be at least 16, got {}",
            args.tune.bandwidth_mib
        );
    }
    // Groups run along K for (de)quantize and x · Wᵀ (W [N, K]), along N for x · W (W [K, N]).
    let along_k = runs(Op::Quantize)
        || runs(Op::Dequantize)
        || (runs(Op::Matmul) && args.transpose.contains(&true));
    let along_n = runs(Op::Matmul) && args.transpose.contains(&false);
    for &[m, n, k] in shapes {
        if along_k && k % g != 0 {
            bail!("--shape {m},{n},{k}: K must be a multiple of {group}");
        }
        if along_n && n % g != 0 {
            bail!("--shape {m},{n},{k}: N must be a multiple of {group} for --transpose false");
        }
    }
    if runs(Op::Gather) {
        let [e, n, k] = args.tune.moe;
        if args.tune.top_k == 0 || args.tune.top_k > e {
            bail!(
                "--top-k must be between 1 and the expert count {e}, got {}",
                args.tune.top_k
            );
        }
        let quantized = |t: bool| if t { ("K", k) } else { ("N", n) };
        for (axis, d) in args.transpose.iter().map(|&t| quantized(t)) {
            if d % g != 0 {
                bail!("--moe {e},{n},{k}: {axis} must be a multiple of {group}");
            }
        }
        if args.tune.tokens.contains(&0) {
            bail!("--tokens must be positive");
        }
    }
    Ok(())
}

/// `items` without repeats, in first-seen order.
fn dedup<T: PartialEq>(items: impl IntoIterator<Item = T>) -> Vec<T> {
    let mut out = Vec::new();
    for i in items {
        if !out.contains(&i) {
            out.push(i);
        }
    }
    out
}
