//! Hugging Face float model → MLX model directory: what `mlx_lm.convert [-q]` does, streamed.
//!
//! The steps, each as mlx_lm 0.32.2 takes it (`mlx_lm/convert.py`, `utils.py`, the model's
//! `sanitize` and `quant_predicate`):
//!
//! 1. `config.json` is read as `load_config` reads it (`eos_token_id` from
//!    `generation_config.json` when that has a non-empty one).
//! 2. The tensors are renamed and stacked as the architecture's `sanitize` does: rotary
//!    `inv_freq` buffers are dropped, `lm_head.weight` too when embeddings are tied, and MoE
//!    experts `…experts.E.{w1,w2,w3}` (Mixtral) or `…experts.E.{gate,up,down}_proj` (Qwen3-MoE)
//!    become one `[E, N, K]` stack under `…switch_mlp.{gate,up,down}_proj`.
//! 3. Float tensors are cast to `--dtype`, else to `config.json`'s `torch_dtype` (else
//!    `text_config.dtype`) when that is float16, bfloat16 or float32; else they keep theirs.
//! 4. With quantization, every Linear, Embedding and expert stack (a float `.weight` of 2 or 3
//!    dimensions, in the architectures supported) whose last dimension is a multiple of the
//!    group size is quantized: with the defaults, with what the architecture's predicate says
//!    (Qwen3-MoE keeps its routers `mlp.gate` at 8 bits, groups of 64), with a mixed recipe's
//!    choice (`mixed_2_6`, `mixed_3_4`, `mixed_3_6`, `mixed_4_6`), or with a per-module
//!    override. Modules whose spec is not the default are listed in the config's block. The
//!    default mode is affine or one of MLX's FP modes (`--q-mode mxfp4|nvfp4|mxfp8`: fixed bits
//!    and group size, uint8 scales, no biases); the Qwen3-MoE routers stay affine 8-bit there
//!    too, and the mixed recipes take affine only, as in mlx_lm.
//! 5. Tensors are written in shards of at most 5 GiB (mlx_lm's `MAX_FILE_SIZE_GB << 30`), a
//!    module's tensors together, with metadata `{"format": "mlx"}`, the index
//!    `model.safetensors.index.json`, `config.json` (top-level keys sorted, `quantization` and
//!    `quantization_config` holding the block, `_name_or_path` and `vision_config` dropped) and
//!    every other file of the source (tokenizer, generation config, code, licence) copied.
//!
//! Quantized tensors equal mlx_lm's bit for bit when the flavour is the one of the MLX that ran
//! mlx_lm (the CPU flavour on Linux, the GPU flavour on a Mac); the files differ from mlx_lm's
//! only in the order of tensor data inside a shard, which follows the model class's attribute
//! order in mlx_lm and module names here.
//!
//! Memory stays at about one module's tensors (an expert stack at most) whatever the model's
//! size: each is read from its file into owned memory (not through the map, whose pages would
//! otherwise accumulate in the resident set), cast, quantized on all cores and appended to its
//! shard. Everything is written into a temporary directory beside the destination that is
//! renamed into place at the end; a failed run removes it.

use super::model::{read_config, shard_files, ModuleQuant, QuantConfig, INDEX_FILE};
use super::read::{io_error, load_mmap};
use super::write::{SafetensorsWriter, TensorInfo};
use super::Tensors;
use crate::buffer::Buffer;
use crate::dtype::{DType, Float};
use crate::error::{Error, Result};
use crate::quant::{Flavour, QuantMode, QuantSpec};
use rayon::prelude::*;
use serde_json::{Map, Value};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

const OP: &str = "convert";

/// The largest shard mlx_lm writes: `MAX_FILE_SIZE_GB << 30` bytes (5 GiB).
pub const MAX_SHARD_BYTES: usize = 5 << 30;

/// One of mlx_lm's mixed-precision recipes (`--quant-predicate`): `low` bits for most layers,
/// `high` for `v_proj` and `down_proj` of the first and last eighth of the layers and every third
/// layer between, and for `lm_head`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Recipe {
    /// Bits of most layers.
    pub low: u32,
    /// Bits of the sensitive layers.
    pub high: u32,
}

impl Recipe {
    /// Parses `mixed_2_6`, `mixed_3_4`, `mixed_3_6` or `mixed_4_6`.
    pub fn parse(s: &str) -> Result<Recipe> {
        let (low, high) = match s {
            "mixed_2_6" => (2, 6),
            "mixed_3_4" => (3, 4),
            "mixed_3_6" => (3, 6),
            "mixed_4_6" => (4, 6),
            _ => {
                return Err(Error::invalid(
                    "Recipe::parse",
                    "recipe",
                    "mixed_2_6, mixed_3_4, mixed_3_6 or mixed_4_6",
                    s,
                ))
            }
        };
        Ok(Recipe { low, high })
    }
}

/// What `convert` should do.
#[derive(Clone, Debug)]
pub struct ConvertOptions {
    /// Quantize (`-q`); without it the model is only renamed, stacked and cast.
    pub quantize: bool,
    /// Bits; `None`: the mode's default (4 for affine).
    pub bits: Option<u32>,
    /// Group size; `None`: the mode's default (64 for affine).
    pub group_size: Option<u32>,
    /// Quantization mode (`--q-mode`): affine, or one of MLX's FP modes (mxfp4, mxfp8, nvfp4),
    /// whose bits and group size are fixed. Mixed recipes take affine only, as in mlx_lm.
    pub mode: QuantMode,
    /// Whose arithmetic to reproduce.
    pub flavour: Flavour,
    /// Cast float tensors to this dtype (else the config's `torch_dtype`, see the module docs).
    pub dtype: Option<DType>,
    /// A mixed recipe, replacing the architecture's own predicate.
    pub recipe: Option<Recipe>,
    /// Per-module overrides `(pattern, entry)`: a module matches when its path is the pattern or
    /// ends with `.pattern`; the first match wins over the recipe and the architecture.
    pub overrides: Vec<(String, ModuleQuant)>,
    /// Largest shard in bytes (a tensor larger than this gets a shard of its own).
    pub max_shard_bytes: usize,
}

impl Default for ConvertOptions {
    fn default() -> ConvertOptions {
        ConvertOptions {
            quantize: false,
            bits: None,
            group_size: None,
            mode: QuantMode::Affine,
            flavour: Flavour::default(),
            dtype: None,
            recipe: None,
            overrides: Vec::new(),
            max_shard_bytes: MAX_SHARD_BYTES,
        }
    }
}

/// Where a conversion is, for a progress display.
#[derive(Clone, Debug)]
pub struct Progress {
    /// Source bytes processed so far.
    pub done_bytes: u64,
    /// Source bytes to process in all.
    pub total_bytes: u64,
    /// The module (or tensor) just finished.
    pub current: String,
}

/// What a finished conversion did.
#[derive(Clone, Debug)]
pub struct ConvertSummary {
    /// Tensors read.
    pub tensors_in: usize,
    /// Tensors written.
    pub tensors_out: usize,
    /// Bytes of source tensors read.
    pub bytes_in: u64,
    /// Bytes of tensors written.
    pub bytes_out: u64,
    /// Shards written.
    pub shards: usize,
    /// Modules quantized.
    pub quantized: usize,
    /// The quantization block written, if any.
    pub quantization: Option<QuantConfig>,
}

/// The architectures whose renames and predicates are reproduced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    /// llama (and mistral, which mlx_lm maps to it), qwen2, qwen3: no renames.
    Dense,
    /// mixtral: experts `w1/w2/w3` stacked into `switch_mlp.{gate,down,up}_proj`.
    Mixtral,
    /// qwen3_moe: experts stacked into `switch_mlp`, routers at 8 bits.
    Qwen3Moe,
}

/// The family of `model_type` and its `tie_word_embeddings` default (`None`: required).
fn family(model_type: &str) -> Option<(Family, Option<bool>)> {
    Some(match model_type {
        "llama" | "mistral" | "qwen2" => (Family::Dense, Some(true)),
        "qwen3" => (Family::Dense, None),
        "mixtral" => (Family::Mixtral, Some(false)),
        "qwen3_moe" => (Family::Qwen3Moe, None),
        _ => return None,
    })
}

/// The architecture family of a `config.json` and whether its embeddings are tied.
fn family_of(config: &Value, dir: &Path) -> Result<(Family, bool)> {
    let config_path = dir.join("config.json");
    let model_type = config
        .get("model_type")
        .and_then(Value::as_str)
        .unwrap_or("");
    let Some((family, tie_default)) = family(model_type) else {
        return Err(Error::unsupported(
            OP,
            format!(
                "model_type {model_type:?} (supported: llama, mistral, qwen2, qwen3, mixtral, qwen3_moe)"
            ),
        ));
    };
    let tie = match config.get("tie_word_embeddings").and_then(Value::as_bool) {
        Some(t) => t,
        None => tie_default.ok_or_else(|| {
            format_error(
                &config_path,
                format!("tie_word_embeddings is required for {model_type}"),
            )
        })?,
    };
    Ok((family, tie))
}

/// Where an output tensor's data comes from.
#[derive(Clone, Debug)]
enum Source {
    /// One source tensor.
    One(String),
    /// Source tensors stacked along a new first axis (experts).
    Stack(Vec<String>),
}

/// One unit of work: an output module's tensors, made together.
#[derive(Clone, Debug)]
struct Job {
    /// Output name (of the tensor, or `module.weight` when quantized).
    name: String,
    source: Source,
    /// Source dtype and the shape after stacking.
    dtype: DType,
    shape: Vec<usize>,
    /// The dtype written (after the cast).
    out_dtype: DType,
    /// The spec when the tensor is quantized.
    spec: Option<QuantSpec>,
}

impl Job {
    fn outputs(&self) -> Result<Vec<TensorInfo>> {
        let info =
            |name: String, dtype: DType, shape: Vec<usize>| TensorInfo { name, dtype, shape };
        let Some(spec) = self.spec else {
            return Ok(vec![info(
                self.name.clone(),
                self.out_dtype,
                self.shape.clone(),
            )]);
        };
        let module = self.name.strip_suffix(".weight").unwrap_or(&self.name);
        let (lead, cols) = self.shape.split_at(self.shape.len() - 1);
        let cols = cols[0];
        let words = spec
            .packed_words(cols)
            .ok_or_else(|| Error::shape(OP, "weight", "whole groups", &self.shape))?;
        let with = |d: usize| lead.iter().copied().chain([d]).collect::<Vec<_>>();
        let g = spec.group_size() as usize;
        let mut v = vec![
            info(self.name.clone(), DType::U32, with(words)),
            info(
                format!("{module}.scales"),
                spec.scales_dtype(self.out_dtype),
                with(cols / g),
            ),
        ];
        if spec.has_biases() {
            v.push(info(
                format!("{module}.biases"),
                self.out_dtype,
                with(cols / g),
            ));
        }
        Ok(v)
    }

    fn source_bytes(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.size()
    }

    /// Parameters as mlx_lm's `get_total_parameters` counts them (unpacked for quantized).
    fn parameters(&self) -> usize {
        self.shape.iter().product()
    }
}

fn format_error(path: &Path, message: impl Into<String>) -> Error {
    Error::Format {
        path: path.display().to_string(),
        message: message.into(),
    }
}

/// Compares names as paths with numbers compared numerically (`layers.2` before `layers.10`).
fn natural_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    let key = |s: &str| -> Vec<(u64, String)> {
        s.split('.')
            .map(|p| match p.parse::<u64>() {
                Ok(n) => (n, String::new()),
                Err(_) => (u64::MAX, p.to_string()),
            })
            .collect()
    };
    key(a).cmp(&key(b))
}

/// A float dtype named as mlx_lm's `MODEL_CONVERSION_DTYPES`.
fn conversion_dtype(v: Option<&Value>) -> Option<DType> {
    match v?.as_str()? {
        "float16" => Some(DType::F16),
        "bfloat16" => Some(DType::BF16),
        "float32" => Some(DType::F32),
        _ => None,
    }
}

/// The source: config, shards (mapped only to read their headers) and open files.
struct SourceModel {
    dir: PathBuf,
    config: Value,
    shards: Vec<(PathBuf, Tensors, File)>,
    location: HashMap<String, usize>,
}

impl SourceModel {
    fn open(dir: &Path) -> Result<SourceModel> {
        let mut config = read_config(dir)?;
        // load_config: a non-empty eos_token_id of generation_config.json wins.
        let gen = dir.join("generation_config.json");
        if let Ok(text) = std::fs::read_to_string(&gen) {
            if let Ok(g) = serde_json::from_str::<Value>(&text) {
                let eos = g.get("eos_token_id").cloned().unwrap_or(Value::Null);
                let truthy = match &eos {
                    Value::Null | Value::Bool(false) => false,
                    Value::Number(n) => n.as_f64() != Some(0.0),
                    Value::Array(a) => !a.is_empty(),
                    Value::String(s) => !s.is_empty(),
                    _ => true,
                };
                if truthy {
                    config
                        .as_object_mut()
                        .map(|c| c.insert("eos_token_id".into(), eos));
                }
            }
        }
        let (files, _) = shard_files(dir)?;
        let mut shards = Vec::new();
        let mut location = HashMap::new();
        for (i, f) in files.iter().enumerate() {
            // SAFETY: the map is only used for its header and the tensors' offsets; the data
            // is read through the file. The source must not change during the conversion.
            let t = unsafe { load_mmap(f) }?;
            for name in t.names() {
                if location.insert(name.to_string(), i).is_some() {
                    return Err(format_error(f, format!("tensor {name} is in two shards")));
                }
            }
            let file = File::open(f).map_err(|e| io_error(f, e))?;
            shards.push((f.clone(), t, file));
        }
        Ok(SourceModel {
            dir: dir.to_path_buf(),
            config,
            shards,
            location,
        })
    }

    fn get(&self, name: &str) -> Option<&Buffer> {
        self.shards[*self.location.get(name)?].1.get(name)
    }

    /// Reads tensor `name` into `out` (exactly its bytes).
    fn read_into(&self, name: &str, out: &mut [u8]) -> Result<()> {
        let missing = || format_error(&self.dir, format!("tensor {name} is in no shard"));
        let &i = self.location.get(name).ok_or_else(missing)?;
        let (path, t, file) = &self.shards[i];
        let view = t.get(name).ok_or_else(missing)?;
        if view.nbytes() != out.len() {
            return Err(Error::BufferTooSmall {
                op: OP,
                param: "tensor",
                needed: out.len() as u64,
                offset: view.byte_offset() as u64,
                available: view.nbytes() as u64,
            });
        }
        let mut f = file;
        f.seek(SeekFrom::Start(view.byte_offset() as u64))
            .and_then(|_| f.read_exact(out))
            .map_err(|e| io_error(path, e))
    }

    /// The architecture family and whether embeddings are tied.
    fn family(&self) -> Result<(Family, bool)> {
        family_of(&self.config, &self.dir)
    }

    fn config_u64(&self, key: &str) -> Option<u64> {
        self.config.get(key).and_then(Value::as_u64)
    }
}

/// Casts `b` to `dtype` (round to nearest even, as MLX's `astype`), on all cores.
fn cast(b: Buffer, dtype: DType) -> Result<Buffer> {
    if b.dtype() == dtype || !b.dtype().is_float() {
        return Ok(b);
    }
    let mut out = Buffer::zeros(dtype, b.shape())?;
    crate::with_float_type!(b.dtype(), S => {
        let src = b.as_slice::<S>()?;
        crate::with_float_type!(dtype, D => {
            out.as_mut_slice::<D>()?
                .par_chunks_mut(1 << 16)
                .zip(src.par_chunks(1 << 16))
                .for_each(|(o, s)| {
                    for (o, s) in o.iter_mut().zip(s) {
                        *o = D::from_f32(Float::to_f32(*s));
                    }
                });
        }, _ => return Err(Error::dtype("convert", "dtype", "float32, float16 or bfloat16", dtype)))
    }, _ => return Err(Error::dtype("convert", "tensor", "a float dtype", b.dtype())));
    Ok(out)
}

/// A Hugging Face float model seen through the architecture's renames and expert stacking
/// (step 2 of the module docs): what `mlx_lm` would hand to the quantizer, before any cast.
pub struct SanitizedModel {
    source: SourceModel,
    jobs: BTreeMap<String, Job>,
}

impl SanitizedModel {
    /// Opens the Hugging Face directory `dir` (config.json and safetensors).
    pub fn open(dir: &Path) -> Result<SanitizedModel> {
        let source = SourceModel::open(dir)?;
        let (family, tie) = source.family()?;
        let jobs = sanitize(&source, family, tie)?
            .into_iter()
            .map(|j| (j.name.clone(), j))
            .collect();
        Ok(SanitizedModel { source, jobs })
    }

    /// The tensor names after renaming, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.jobs.keys().map(String::as_str)
    }

    /// Reads tensor `name` (stacked when it is an expert stack) into owned memory, in its
    /// source dtype; `Ok(None)` if the model has no such tensor.
    pub fn read(&self, name: &str) -> Result<Option<Buffer>> {
        self.jobs
            .get(name)
            .map(|j| read_job(&self.source, j))
            .transpose()
    }
}

/// Reads a job's source data (one tensor, or the stack of experts) into owned memory.
fn read_job(source: &SourceModel, j: &Job) -> Result<Buffer> {
    let mut b = Buffer::zeros(j.dtype, &j.shape)?;
    match &j.source {
        Source::One(n) => source.read_into(n, b.bytes_mut()?)?,
        Source::Stack(names) => {
            let bytes = b.bytes_mut()?;
            let each = bytes.len() / names.len().max(1);
            for (n, chunk) in names.iter().zip(bytes.chunks_mut(each.max(1))) {
                source.read_into(n, chunk)?;
            }
        }
    }
    Ok(b)
}

/// Renames and stacks as the family's `sanitize`: the jobs before quantization decisions.
fn sanitize(src: &SourceModel, family: Family, tie: bool) -> Result<Vec<Job>> {
    let mut names: Vec<&str> = src.location.keys().map(String::as_str).collect();
    names.sort_unstable();
    let mut taken: std::collections::HashSet<String> = std::collections::HashSet::new();
    let mut jobs = Vec::new();
    let job = |name: String, source: Source, b: &Buffer, stacked: usize| -> Job {
        let mut shape = b.shape().to_vec();
        if stacked > 0 {
            shape.insert(0, stacked);
        }
        Job {
            name,
            source,
            dtype: b.dtype(),
            shape,
            out_dtype: b.dtype(),
            spec: None,
        }
    };
    let stack = |prefix: &str, expert: &str, count: usize| -> Result<(Vec<String>, Buffer)> {
        let names: Vec<String> = (0..count)
            .map(|e| format!("{prefix}.experts.{e}.{expert}"))
            .collect();
        let first = src
            .get(&names[0])
            .ok_or_else(|| format_error(&src.dir, format!("{} is in no shard", names[0])))?;
        for n in &names {
            let b = src.get(n).ok_or_else(|| {
                format_error(
                    &src.dir,
                    format!("{n} is in no shard ({count} experts expected)"),
                )
            })?;
            if b.dtype() != first.dtype() || b.shape() != first.shape() {
                return Err(format_error(
                    &src.dir,
                    format!(
                        "{n} is {} {:?}, but {} is {} {:?}: experts cannot be stacked",
                        b.dtype(),
                        b.shape(),
                        names[0],
                        first.dtype(),
                        first.shape()
                    ),
                ));
            }
        }
        Ok((names, first.clone()))
    };
    let experts = |key: &str| -> Result<usize> {
        src.config_u64(key)
            .map(|n| n as usize)
            .ok_or_else(|| format_error(&src.dir.join("config.json"), format!("no {key}")))
    };
    match family {
        Family::Dense => {}
        Family::Mixtral => {
            if src
                .location
                .contains_key("model.layers.0.block_sparse_moe.experts.0.w1.weight")
            {
                let count = src.config_u64("num_local_experts").unwrap_or(8) as usize;
                let layers = experts("num_hidden_layers")?;
                for l in 0..layers {
                    let prefix = format!("model.layers.{l}.block_sparse_moe");
                    for (n, m) in [("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj")] {
                        for k in ["weight", "scales", "biases"] {
                            let key = format!("{prefix}.experts.0.{n}.{k}");
                            if !src.location.contains_key(&key) {
                                continue;
                            }
                            let (members, first) = stack(&prefix, &format!("{n}.{k}"), count)?;
                            let out = format!("{prefix}.switch_mlp.{m}.{k}");
                            jobs.push(job(out, Source::Stack(members.clone()), &first, count));
                            taken.extend(members);
                        }
                    }
                }
            }
        }
        Family::Qwen3Moe => {
            let count = experts("num_experts")?;
            let layers: Vec<&str> = names
                .iter()
                .filter(|k| {
                    k.starts_with("model.layers.") && k.ends_with(".mlp.experts.0.up_proj.weight")
                })
                .map(|k| k.strip_suffix(".experts.0.up_proj.weight").unwrap_or(k))
                .collect();
            for prefix in layers {
                for n in ["up_proj", "down_proj", "gate_proj"] {
                    let (members, first) = stack(prefix, &format!("{n}.weight"), count)?;
                    let out = format!("{prefix}.switch_mlp.{n}.weight");
                    jobs.push(job(out, Source::Stack(members.clone()), &first, count));
                    taken.extend(members);
                }
            }
        }
    }
    for name in names {
        if taken.contains(name)
            || name.contains("self_attn.rotary_emb.inv_freq")
            || (tie && name == "lm_head.weight")
        {
            continue;
        }
        let b = src.get(name).ok_or_else(|| format_error(&src.dir, name))?;
        jobs.push(job(name.to_string(), Source::One(name.to_string()), b, 0));
    }
    Ok(jobs)
}

/// The spec the recipe gives `path` (mlx_lm's `mixed_quant_predicate`).
fn recipe_spec(
    r: Recipe,
    path: &str,
    layer_location: usize,
    num_layers: i64,
    group: u32,
) -> Result<QuantSpec> {
    let parts: Vec<&str> = path.split('.').collect();
    let index: i64 = match parts.get(layer_location) {
        Some(p) => p.parse().map_err(|_| {
            Error::invalid(OP, "recipe", "a layer index in every module path", path)
        })?,
        None => 0,
    };
    let more = index < num_layers / 8
        || index >= 7 * num_layers / 8
        || (index - num_layers / 8).rem_euclid(3) == 2;
    let sensitive = path.contains("v_proj")
        || path.contains("v_a_proj")
        || path.contains("v_b_proj")
        || path.contains("down_proj");
    let high = (sensitive && more) || path.contains("lm_head");
    QuantSpec::affine(if high { r.high } else { r.low }, group)
}

/// Converts the Hugging Face directory `src` into an MLX directory `dst`, which must not exist.
/// See the module docs. `progress` is called after every module.
pub fn convert(
    src: &Path,
    dst: &Path,
    opts: &ConvertOptions,
    progress: &mut dyn FnMut(&Progress),
) -> Result<ConvertSummary> {
    if dst.exists() {
        return Err(io_error(
            dst,
            std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "already exists; remove it or choose another output directory",
            ),
        ));
    }
    // Fail fast on an architecture whose renames are not reproduced.
    family_of(&read_config(src)?, src)?;
    let source = SourceModel::open(src)?;
    let config_path = src.join("config.json");
    if source.config.get("quantization").is_some() {
        return Err(format_error(
            &config_path,
            "the model is quantized already (config.json has a quantization block)",
        ));
    }
    let (family, tie) = source.family()?;
    let mut jobs = sanitize(&source, family, tie)?;

    // Cast.
    let target = opts
        .dtype
        .or_else(|| match source.config.get("torch_dtype") {
            Some(v) if !v.is_null() => conversion_dtype(Some(v)),
            _ => conversion_dtype(
                source
                    .config
                    .get("text_config")
                    .and_then(|t| t.get("dtype")),
            ),
        });
    for j in &mut jobs {
        if let Some(t) = target {
            if j.dtype.is_float() {
                j.out_dtype = t;
            }
        }
    }

    // Quantization decisions.
    let mut block = None;
    if opts.quantize {
        if opts.recipe.is_some() && opts.mode != QuantMode::Affine {
            // mlx_lm: "Quant predicates only support 'affine' quantization."
            return Err(Error::invalid(
                OP,
                "mode",
                "affine with a mixed recipe (mlx_lm's recipes are affine only)",
                opts.mode,
            ));
        }
        let (db, dg) = QuantSpec::fp_defaults(opts.mode);
        let default = QuantSpec::new(
            opts.mode,
            opts.bits.unwrap_or(db),
            opts.group_size.unwrap_or(dg),
        )?;
        let g = default.group_size() as usize;
        let mut q = QuantConfig::new(default);
        let modules: Vec<String> = jobs
            .iter()
            .filter_map(|j| j.name.strip_suffix(".weight").map(str::to_string))
            .collect();
        let layer_location = modules
            .iter()
            .find(|m| m.contains("down_proj"))
            .and_then(|m| m.split('.').position(|p| p.parse::<u64>().is_ok()));
        let num_layers = source.config_u64("num_hidden_layers").unwrap_or(0) as i64;
        if opts.recipe.is_some() && layer_location.is_none() {
            return Err(Error::invalid(
                OP,
                "recipe",
                "a model with down_proj layers",
                "none",
            ));
        }
        for j in &mut jobs {
            let Some(module) = j.name.strip_suffix(".weight") else {
                continue;
            };
            if !j.dtype.is_float() || !(2..=3).contains(&j.shape.len()) {
                continue;
            }
            let cols = j.shape[j.shape.len() - 1];
            let matches = |p: &str| module == p || module.ends_with(&format!(".{p}"));
            let over = opts
                .overrides
                .iter()
                .find(|(p, _)| matches(p))
                .map(|(_, e)| *e);
            let (spec, listed) = match over {
                Some(ModuleQuant::Skip) => {
                    q.set_module(module, ModuleQuant::Skip);
                    continue;
                }
                Some(ModuleQuant::Quantize(s)) => {
                    if cols % s.group_size() as usize != 0 {
                        return Err(Error::invalid(
                            OP,
                            "override",
                            format!("a group size dividing {module}'s {cols} columns"),
                            s.group_size(),
                        ));
                    }
                    (s, true)
                }
                None => {
                    if cols % g != 0 {
                        continue;
                    }
                    match (opts.recipe, family) {
                        (Some(r), _) => (
                            recipe_spec(
                                r,
                                module,
                                layer_location.unwrap_or(0),
                                num_layers,
                                default.group_size(),
                            )?,
                            true,
                        ),
                        (None, Family::Qwen3Moe) if module.ends_with("mlp.gate") => {
                            (QuantSpec::affine(8, 64)?, true)
                        }
                        _ => (default, false),
                    }
                }
            };
            if listed {
                q.set_module(module, ModuleQuant::Quantize(spec));
            }
            j.spec = Some(spec);
        }
        block = Some(q);
    }

    // Write whole jobs, in natural name order, into shards of a temporary directory.
    jobs.sort_by(|a, b| natural_cmp(&a.name, &b.name));
    let groups = jobs.iter().map(Job::outputs).collect::<Result<Vec<_>>>()?;
    let total_parameters: usize = jobs.iter().map(Job::parameters).sum();
    let total_bytes: u64 = jobs.iter().map(|j| j.source_bytes() as u64).sum();
    let out = OutDir::create(dst)?;
    let mut done_bytes = 0u64;
    let device = crate::Device::cpu();
    let mut enc = device.encoder();
    let written = write_shards(
        out.path(),
        groups,
        opts.max_shard_bytes,
        total_parameters,
        |i| {
            let j = &jobs[i];
            let b = cast(read_job(&source, j)?, j.out_dtype)?;
            let bufs = match j.spec {
                None => vec![b],
                Some(spec) => {
                    let qw = crate::ops::quantize(&mut enc, &b, spec, opts.flavour)
                        .map_err(|e| format_error(src, format!("{}: {e}", j.name)))?;
                    enc.commit_and_wait()?;
                    let mut v = vec![qw.packed().clone(), qw.scales().clone()];
                    v.extend(qw.biases().cloned());
                    v
                }
            };
            done_bytes += j.source_bytes() as u64;
            progress(&Progress {
                done_bytes,
                total_bytes,
                current: j.name.clone(),
            });
            Ok(bufs)
        },
    )?;

    let mut config = source.config.clone();
    if let Some(c) = config.as_object_mut() {
        c.remove("_name_or_path");
        c.remove("vision_config");
        if let Some(q) = &block {
            c.insert("quantization".into(), q.to_json());
            c.insert("quantization_config".into(), q.to_json());
        }
    }
    write_json(&out.path().join("config.json"), &config)?;
    copy_other_files(src, out.path())?;
    out.finish()?;
    Ok(ConvertSummary {
        tensors_in: source.location.len(),
        tensors_out: written.tensors,
        bytes_in: total_bytes,
        bytes_out: written.bytes as u64,
        shards: written.shards,
        quantized: jobs.iter().filter(|j| j.spec.is_some()).count(),
        quantization: block,
    })
}

/// What [`write_shards`] wrote.
struct Written {
    tensors: usize,
    bytes: usize,
    shards: usize,
}

/// Writes groups of tensors (a module's tensors stay together) into shards of at most
/// `max_shard_bytes` in `dir`, as mlx_lm names them (`model.safetensors`, or
/// `model-0000i-of-0000n.safetensors`), with metadata `{"format": "mlx"}`, then the index.
/// `produce(i)` makes group `i`'s buffers, in the group's order, when its shard is written.
fn write_shards(
    dir: &Path,
    groups: Vec<Vec<TensorInfo>>,
    max_shard_bytes: usize,
    total_parameters: usize,
    mut produce: impl FnMut(usize) -> Result<Vec<Buffer>>,
) -> Result<Written> {
    let mut shards: Vec<Vec<usize>> = Vec::new();
    let mut shard_bytes = 0usize;
    let mut total_size = 0usize;
    for (i, g) in groups.iter().enumerate() {
        let bytes = g.iter().map(TensorInfo::nbytes).sum::<Result<usize>>()?;
        total_size += bytes;
        if shards.is_empty() || shard_bytes + bytes > max_shard_bytes {
            shards.push(Vec::new());
            shard_bytes = 0;
        }
        if let Some(s) = shards.last_mut() {
            s.push(i);
        }
        shard_bytes += bytes;
    }
    let count = shards.len();
    let mut metadata = BTreeMap::new();
    metadata.insert("format".to_string(), "mlx".to_string());
    let mut weight_map = Map::new();
    let mut tensors = 0;
    for (s, members) in shards.iter().enumerate() {
        let file_name = if count > 1 {
            format!("model-{:05}-of-{count:05}.safetensors", s + 1)
        } else {
            "model.safetensors".to_string()
        };
        let entries: Vec<TensorInfo> = members.iter().flat_map(|&i| groups[i].clone()).collect();
        for e in &entries {
            weight_map.insert(e.name.clone(), Value::from(file_name.clone()));
        }
        tensors += entries.len();
        let mut writer = SafetensorsWriter::create(dir.join(&file_name), entries, &metadata)?;
        for &i in members {
            let bufs = produce(i)?;
            if bufs.len() != groups[i].len() {
                return Err(Error::invalid(
                    OP,
                    "tensors",
                    format!("{} for {}", groups[i].len(), groups[i][0].name),
                    bufs.len(),
                ));
            }
            for b in &bufs {
                writer.write(b)?;
            }
        }
        writer.finish()?;
    }
    let mut meta = Map::new();
    meta.insert("total_size".into(), total_size.into());
    meta.insert("total_parameters".into(), total_parameters.into());
    let mut index = Map::new();
    index.insert("metadata".into(), Value::Object(meta));
    // serde_json's map is sorted by key, as mlx_lm sorts the weight map.
    index.insert("weight_map".into(), Value::Object(weight_map));
    write_json(&dir.join(INDEX_FILE), &Value::Object(index))?;
    Ok(Written {
        tensors,
        bytes: total_size,
        shards: count,
    })
}

/// Options of [`dequantize_dir`].
#[derive(Clone, Copy, Debug, Default)]
pub struct DequantizeDirOptions {
    /// Output dtype of dequantized weights; `None`: each module's scales dtype.
    pub dtype: Option<DType>,
    /// Whose rounding to reproduce.
    pub flavour: Flavour,
    /// Largest shard in bytes; 0 means [`MAX_SHARD_BYTES`].
    pub max_shard_bytes: usize,
}

/// Writes the MLX model directory `model` back as a float directory `dst` (which must not
/// exist), as `mlx_lm.convert -d` does: every quantized module's weight dequantized (its scales
/// and biases dropped), every other tensor copied, `quantization` and `quantization_config`
/// removed from config.json, the other files copied. Streams one module at a time into a
/// temporary directory renamed into place at the end. `progress` is called after every module.
pub fn dequantize_dir(
    model: &super::ModelDir,
    dst: &Path,
    opts: DequantizeDirOptions,
    progress: &mut dyn FnMut(&Progress),
) -> Result<ConvertSummary> {
    let dequant = crate::ops::DequantizeOptions {
        dtype: opts.dtype,
        flavour: opts.flavour,
    };
    let specs = model.quantized_modules();
    let mut groups: Vec<(String, Vec<TensorInfo>)> = Vec::new();
    for name in model.tensor_names() {
        let (prefix, suffix) = name.rsplit_once('.').unwrap_or((name, ""));
        let b = model
            .tensor(name)
            .ok_or_else(|| format_error(model.path(), name))?;
        match (specs.get(prefix), suffix) {
            (Some(_), "scales" | "biases") => {}
            (Some(_), "weight") => {
                let Some(super::ModuleWeight::Quantized(qw)) = model.weight(prefix).ok() else {
                    return Err(format_error(
                        model.path(),
                        format!("{prefix}: not quantized"),
                    ));
                };
                let info = TensorInfo {
                    name: name.to_string(),
                    dtype: opts.dtype.unwrap_or(qw.scales_dtype()),
                    shape: qw.shape().to_vec(),
                };
                groups.push((name.to_string(), vec![info]));
            }
            _ => groups.push((name.to_string(), vec![TensorInfo::of(name, b)])),
        }
    }
    groups.sort_by(|a, b| natural_cmp(&a.0, &b.0));
    let total_parameters: usize = groups
        .iter()
        .map(|(_, g)| g[0].shape.iter().product::<usize>())
        .sum();
    let total_bytes = model.nbytes() as u64;
    let mut done_bytes = 0u64;
    let out = OutDir::create(dst)?;
    let device = crate::Device::cpu();
    let mut enc = device.encoder();
    let names: Vec<String> = groups.iter().map(|(n, _)| n.clone()).collect();
    let mut quantized = 0;
    let written = write_shards(
        out.path(),
        groups.into_iter().map(|(_, g)| g).collect(),
        if opts.max_shard_bytes == 0 {
            MAX_SHARD_BYTES
        } else {
            opts.max_shard_bytes
        },
        total_parameters,
        |i| {
            let name = &names[i];
            let prefix = name.strip_suffix(".weight").unwrap_or(name);
            let b = match model.weight(prefix) {
                Ok(super::ModuleWeight::Quantized(qw)) if specs.contains_key(prefix) => {
                    quantized += 1;
                    done_bytes += qw.nbytes() as u64;
                    let w = crate::ops::dequantize(&mut enc, &qw, dequant)?;
                    enc.commit_and_wait()?;
                    w
                }
                _ => {
                    let b = model
                        .tensor(name)
                        .ok_or_else(|| format_error(model.path(), name.as_str()))?;
                    done_bytes += b.nbytes() as u64;
                    b.clone()
                }
            };
            progress(&Progress {
                done_bytes,
                total_bytes,
                current: name.clone(),
            });
            Ok(vec![b])
        },
    )?;
    let mut config = model.config().clone();
    if let Some(c) = config.as_object_mut() {
        c.remove("quantization");
        c.remove("quantization_config");
        if let Some(Value::Object(t)) = c.get_mut("text_config") {
            t.remove("quantization");
            t.remove("quantization_config");
        }
    }
    write_json(&out.path().join("config.json"), &config)?;
    copy_other_files(model.path(), out.path())?;
    out.finish()?;
    Ok(ConvertSummary {
        tensors_in: model.tensor_names().len(),
        tensors_out: written.tensors,
        bytes_in: total_bytes,
        bytes_out: written.bytes as u64,
        shards: written.shards,
        quantized,
        quantization: None,
    })
}

/// An output directory under construction: a temporary sibling `.NAME.partial-PID`, renamed to
/// its name by [`finish`](Self::finish) and removed if dropped before.
struct OutDir {
    tmp: PathBuf,
    dst: PathBuf,
    done: bool,
}

impl OutDir {
    fn create(dst: &Path) -> Result<OutDir> {
        if dst.exists() {
            return Err(io_error(
                dst,
                std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "already exists; remove it or choose another output directory",
                ),
            ));
        }
        let name = dst.file_name().ok_or_else(|| {
            io_error(
                dst,
                std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a directory name"),
            )
        })?;
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(".partial-{}", std::process::id()));
        let tmp = dst.with_file_name(tmp_name);
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir(&tmp).map_err(|e| io_error(&tmp, e))?;
        Ok(OutDir {
            tmp,
            dst: dst.to_path_buf(),
            done: false,
        })
    }

    fn path(&self) -> &Path {
        &self.tmp
    }

    fn finish(mut self) -> Result<()> {
        std::fs::rename(&self.tmp, &self.dst).map_err(|e| io_error(&self.dst, e))?;
        self.done = true;
        Ok(())
    }
}

impl Drop for OutDir {
    fn drop(&mut self) {
        if !self.done {
            // Best effort: it is named as partial either way.
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

/// Writes `v` as JSON indented by 4 spaces (as mlx_lm's `json.dump(indent=4)`).
pub(super) fn write_json(path: &Path, v: &Value) -> Result<()> {
    use serde::Serialize;
    let mut out = Vec::new();
    let fmt = serde_json::ser::PrettyFormatter::with_indent(b"    ");
    let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
    v.serialize(&mut ser)
        .map_err(|e| format_error(path, e.to_string()))?;
    std::fs::write(path, out).map_err(|e| io_error(path, e))
}

/// Copies the files of `src` that are not weights, the index or config.json (tokenizer files,
/// generation config, code, licence, README) into `dst`.
pub(super) fn copy_other_files(src: &Path, dst: &Path) -> Result<()> {
    const WEIGHTS: [&str; 8] = [
        ".safetensors",
        ".bin",
        ".pt",
        ".pth",
        ".gguf",
        ".h5",
        ".msgpack",
        ".onnx",
    ];
    for e in std::fs::read_dir(src).map_err(|e| io_error(src, e))? {
        let e = e.map_err(|e| io_error(src, e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let is_file = e.file_type().map(|t| t.is_file()).unwrap_or(false);
        if !is_file
            || name.starts_with('.')
            || name == "config.json"
            || name == INDEX_FILE
            || WEIGHTS.iter().any(|w| name.ends_with(w))
        {
            continue;
        }
        std::fs::copy(e.path(), dst.join(&name)).map_err(|err| io_error(&e.path(), err))?;
    }
    Ok(())
}
