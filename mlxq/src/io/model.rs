//! MLX model directories: `config.json` plus one or more safetensors files, as `mlx_lm` writes
//! them (and as Hugging Face publishes float models).
//!
//! [`ModelDir::open`] maps every shard (zero-copy), checks the index against the shards and every
//! quantized module against `config.json`, and then answers per module: a [`QuantizedWeight`]
//! with its own [`QuantSpec`], or a dense tensor ([`ModuleWeight`]), plus the Linear's own
//! `.bias` (which is not the quantization's `.biases`).
//!
//! The quantization block ([`QuantConfig`]) is read from `quantization`, else
//! `quantization_config`, at the top level or under `text_config` (vision-language models). It
//! holds the default `group_size`, `bits` and `mode`, and per-module entries that override them
//! (a dict) or exclude the module (`false`), keyed by module path as in the tensor names.

use super::read::{io_error, load_mmap};
use super::{aligned, infer_spec, Tensors};
use crate::buffer::Buffer;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::quant::{QuantMode, QuantSpec};
use crate::weight::QuantizedWeight;
use serde_json::{Map, Value};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// The file mlx_lm and Hugging Face name the shard index.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

fn format_error(path: &Path, message: impl Into<String>) -> Error {
    Error::Format {
        path: path.display().to_string(),
        message: message.into(),
    }
}

/// A per-module entry of the quantization block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModuleQuant {
    /// `false`: the module stays in floating point.
    Skip,
    /// A dict (or `true`): the module is quantized with this spec.
    Quantize(QuantSpec),
}

/// `config.json`'s quantization block: defaults and per-module entries.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantConfig {
    default: QuantSpec,
    modules: BTreeMap<String, ModuleQuant>,
}

/// The spec of a dict of `group_size`, `bits`, `mode`; a missing (or null) field takes MLX's
/// default for the mode (`to_quantized`'s defaults: affine 64/4, mxfp4 32/4, nvfp4 16/4,
/// mxfp8 32/8), as mlx_lm does when it passes the dict to `to_quantized`.
fn spec_of(dict: &Map<String, Value>, what: &str) -> std::result::Result<QuantSpec, String> {
    let mode = match dict.get("mode") {
        None | Some(Value::Null) => QuantMode::Affine,
        Some(Value::String(s)) => QuantMode::parse(s).map_err(|e| format!("{what}: {e}"))?,
        Some(v) => return Err(format!("{what}: mode: expected a string, got {v}")),
    };
    let (default_bits, default_group) = QuantSpec::fp_defaults(mode);
    let int = |key: &str, default: u32| -> std::result::Result<u32, String> {
        match dict.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| format!("{what}: {key}: expected an integer, got {v}")),
        }
    };
    let bits = int("bits", default_bits)?;
    let group = int("group_size", default_group)?;
    QuantSpec::new(mode, bits, group).map_err(|e| format!("{what}: {e}"))
}

impl QuantConfig {
    /// A block with `default` for every module and no per-module entries.
    pub fn new(default: QuantSpec) -> QuantConfig {
        QuantConfig {
            default,
            modules: BTreeMap::new(),
        }
    }

    /// Reads the block of a parsed `config.json` (see the module docs for where it is looked
    /// for); `Ok(None)` when there is none. `path` names the file in errors.
    pub fn from_config(config: &Value, path: &Path) -> Result<Option<QuantConfig>> {
        let text = config.get("text_config");
        let found = ["quantization", "quantization_config"]
            .iter()
            .find_map(|k| config.get(*k).map(|v| (*k, v)))
            .or_else(|| {
                ["quantization", "quantization_config"]
                    .iter()
                    .find_map(|k| text?.get(*k).map(|v| (*k, v)))
            });
        let Some((key, block)) = found else {
            return Ok(None);
        };
        let err = |m: String| format_error(path, m);
        let Value::Object(block) = block else {
            return Err(err(format!("{key}: expected an object, got {block}")));
        };
        if !block.contains_key("bits") && !block.contains_key("group_size") {
            // Hugging Face's own formats: only the MX ones map onto MLX's.
            return match block.get("quant_method").and_then(Value::as_str) {
                Some(m @ ("mxfp4" | "mxfp8")) => {
                    let mode = QuantMode::parse(m)?;
                    let (b, g) = QuantSpec::fp_defaults(mode);
                    Ok(Some(QuantConfig::new(QuantSpec::new(mode, b, g)?)))
                }
                other => Err(Error::unsupported(
                    "ModelDir::open",
                    format!(
                        "{}: {key} with quant_method {} (not MLX's format: convert the float model instead)",
                        path.display(),
                        other.unwrap_or("(none)")
                    ),
                )),
            };
        }
        let default = spec_of(block, key).map_err(err)?;
        let mut modules = BTreeMap::new();
        for (name, v) in block {
            let entry = match v {
                Value::Bool(false) => ModuleQuant::Skip,
                Value::Bool(true) => ModuleQuant::Quantize(default),
                Value::Object(d) => {
                    ModuleQuant::Quantize(spec_of(d, &format!("{key}.{name}")).map_err(err)?)
                }
                _ => continue, // group_size, bits, mode, quant_method and other scalars
            };
            modules.insert(name.clone(), entry);
        }
        Ok(Some(QuantConfig { default, modules }))
    }

    /// The default spec (`group_size`, `bits`, `mode` of the block).
    pub fn default_spec(&self) -> QuantSpec {
        self.default
    }

    /// The per-module entries, by module path.
    pub fn modules(&self) -> &BTreeMap<String, ModuleQuant> {
        &self.modules
    }

    /// Adds or replaces module `name`'s entry.
    pub fn set_module(&mut self, name: impl Into<String>, entry: ModuleQuant) {
        self.modules.insert(name.into(), entry);
    }

    /// What the block says of module `name`: its entry, or the default.
    pub fn module(&self, name: &str) -> ModuleQuant {
        self.modules
            .get(name)
            .copied()
            .unwrap_or(ModuleQuant::Quantize(self.default))
    }

    /// The block as mlx_lm writes it: `group_size`, `bits`, `mode`, then each module's entry
    /// (`false`, or its `group_size`, `bits`, `mode`).
    pub fn to_json(&self) -> Value {
        let dict = |s: QuantSpec| {
            let mut m = Map::new();
            m.insert("group_size".into(), s.group_size().into());
            m.insert("bits".into(), s.bits().into());
            m.insert("mode".into(), s.mode().name().into());
            m
        };
        let mut out = dict(self.default);
        for (name, entry) in &self.modules {
            let v = match *entry {
                ModuleQuant::Skip => Value::Bool(false),
                ModuleQuant::Quantize(s) => Value::Object(dict(s)),
            };
            out.insert(name.clone(), v);
        }
        Value::Object(out)
    }
}

/// What a module's `weight` is.
#[derive(Clone, Debug)]
pub enum ModuleWeight {
    /// Quantized: packed codes, scales and (affine) biases with the module's own spec.
    Quantized(QuantizedWeight),
    /// A dense float tensor (norms, unquantized layers, float models).
    Dense(Buffer),
}

/// An opened model directory: `config.json`, its quantization block and the mapped shards.
#[derive(Debug)]
pub struct ModelDir {
    path: PathBuf,
    config: Value,
    quant: Option<QuantConfig>,
    shards: Vec<(PathBuf, Tensors)>,
    location: HashMap<String, usize>,
    specs: BTreeMap<String, QuantSpec>,
}

/// An index's tensor → shard file map.
pub type WeightMap = BTreeMap<String, String>;

/// The safetensors files of directory `dir` and, when the directory has an index, its
/// tensor → file map. Without an index: every `model*.safetensors` (as mlx_lm globs), or else
/// every `*.safetensors`, sorted.
pub fn shard_files(dir: &Path) -> Result<(Vec<PathBuf>, Option<WeightMap>)> {
    let index_path = dir.join(INDEX_FILE);
    if index_path.exists() {
        let text = std::fs::read_to_string(&index_path).map_err(|e| io_error(&index_path, e))?;
        let index: Value = serde_json::from_str(&text)
            .map_err(|e| format_error(&index_path, format!("not valid JSON: {e}")))?;
        let Some(Value::Object(map)) = index.get("weight_map") else {
            return Err(format_error(&index_path, "no weight_map object"));
        };
        let mut weight_map = BTreeMap::new();
        let mut files: Vec<String> = Vec::new();
        for (name, file) in map {
            let Some(file) = file.as_str() else {
                return Err(format_error(
                    &index_path,
                    format!("weight_map[{name:?}]: expected a file name, got {file}"),
                ));
            };
            if file.contains('/') || file.contains('\\') || file == ".." {
                return Err(format_error(
                    &index_path,
                    format!("weight_map[{name:?}]: {file:?} is not a file of the directory"),
                ));
            }
            if !files.iter().any(|f| f == file) {
                files.push(file.to_string());
            }
            weight_map.insert(name.clone(), file.to_string());
        }
        files.sort();
        for f in &files {
            if !dir.join(f).is_file() {
                return Err(format_error(
                    &index_path,
                    format!("shard {f} is missing from the directory"),
                ));
            }
        }
        return Ok((
            files.into_iter().map(|f| dir.join(f)).collect(),
            Some(weight_map),
        ));
    }
    let entries = std::fs::read_dir(dir).map_err(|e| io_error(dir, e))?;
    let mut all = Vec::new();
    for e in entries {
        let e = e.map_err(|e| io_error(dir, e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(".safetensors") && !name.starts_with('.') {
            all.push(name);
        }
    }
    all.sort();
    let model: Vec<&String> = all.iter().filter(|n| n.starts_with("model")).collect();
    let chosen: Vec<PathBuf> = if model.is_empty() {
        all.iter().map(|n| dir.join(n)).collect()
    } else {
        model.iter().map(|n| dir.join(n)).collect()
    };
    if chosen.is_empty() {
        return Err(format_error(dir, "no safetensors files in the directory"));
    }
    Ok((chosen, None))
}

/// Reads and parses `DIR/config.json`.
pub fn read_config(dir: &Path) -> Result<Value> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| io_error(&path, e))?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| format_error(&path, format!("not valid JSON: {e}")))?;
    if !v.is_object() {
        return Err(format_error(&path, "expected a JSON object"));
    }
    Ok(v)
}

impl ModelDir {
    /// Opens the model directory `dir`: reads `config.json`, maps every shard (see
    /// [`shard_files`]), and checks that
    ///
    /// - every shard the index names exists and holds the tensors the index says it does, and no
    ///   tensor is in two shards;
    /// - every module with a `.scales` tensor has a uint32 `.weight`, the config has a
    ///   quantization block that does not exclude it, and the spec its shapes give with the
    ///   config's group size is the config's (bits inferred from shapes, checked against the
    ///   config), with scales and biases of the mode's dtypes and shapes;
    /// - every module the config quantizes explicitly (a dict entry) has its `.scales`.
    ///
    /// Errors are [`Error::Format`] naming the file at fault (or [`Error::Io`]).
    ///
    /// # Safety
    ///
    /// The shards are memory-mapped: as for [`load_mmap`], they must not be modified or
    /// truncated while the result or any buffer taken from it is alive.
    pub unsafe fn open(dir: impl AsRef<Path>) -> Result<ModelDir> {
        let dir = dir.as_ref();
        let config = read_config(dir)?;
        let config_path = dir.join("config.json");
        let quant = QuantConfig::from_config(&config, &config_path)?;
        let (files, index) = shard_files(dir)?;
        let mut shards = Vec::with_capacity(files.len());
        let mut location = HashMap::new();
        for (i, f) in files.iter().enumerate() {
            // SAFETY: forwarded to the caller.
            let t = unsafe { load_mmap(f) }?;
            for name in t.names() {
                if let Some(&j) = location.get(name) {
                    let other: &PathBuf = &files[j];
                    return Err(format_error(
                        f,
                        format!("tensor {name} is also in {}", other.display()),
                    ));
                }
                location.insert(name.to_string(), i);
            }
            shards.push((f.clone(), t));
        }
        if let Some(index) = &index {
            let index_path = dir.join(INDEX_FILE);
            for (name, file) in index {
                let holder = location.get(name).map(|&i| &files[i]);
                if holder.and_then(|p| p.file_name()) != Some(std::ffi::OsStr::new(file)) {
                    return Err(format_error(
                        &index_path,
                        match holder {
                            Some(p) => format!(
                                "tensor {name} is in {}, not in {file} as the index says",
                                p.display()
                            ),
                            None => {
                                format!("tensor {name} is in no shard (the index names {file})")
                            }
                        },
                    ));
                }
            }
        }
        let mut m = ModelDir {
            path: dir.to_path_buf(),
            config,
            quant,
            shards,
            location,
            specs: BTreeMap::new(),
        };
        m.check_modules()?;
        Ok(m)
    }

    fn file_of(&self, tensor: &str) -> &Path {
        self.location
            .get(tensor)
            .map_or(&self.path, |&i| &self.shards[i].0)
    }

    fn check_modules(&mut self) -> Result<()> {
        let config_path = self.path.join("config.json");
        let mut specs = BTreeMap::new();
        // Sorted, so that the first error reported does not depend on hashing.
        let mut with_scales: Vec<String> = self
            .location
            .keys()
            .filter_map(|n| n.strip_suffix(".scales").map(str::to_string))
            .collect();
        with_scales.sort_unstable();
        for p in with_scales {
            let scales_name = format!("{p}.scales");
            let file = self.file_of(&scales_name).to_path_buf();
            let err = |m: String| format_error(&file, format!("{p}: {m}"));
            let Some(packed) = self.tensor(&format!("{p}.weight")) else {
                return Err(err("has scales but no weight".into()));
            };
            if packed.dtype() != DType::U32 {
                return Err(err(format!(
                    "has scales but its weight is {}, not uint32",
                    packed.dtype()
                )));
            }
            let scales = self
                .tensor(&scales_name)
                .ok_or_else(|| err("scales".into()))?;
            let biases = self.tensor(&format!("{p}.biases"));
            let expected = match self.quant.as_ref().map(|q| q.module(&p)) {
                None => {
                    return Err(format_error(
                        &config_path,
                        format!("no quantization block, but {p} is quantized"),
                    ))
                }
                Some(ModuleQuant::Skip) => {
                    return Err(format_error(
                        &config_path,
                        format!("quantization.{p} is false, but {p} is quantized"),
                    ))
                }
                Some(ModuleQuant::Quantize(s)) => s,
            };
            let inferred = infer_spec(packed, scales, biases.is_some(), expected.group_size())
                .map_err(|e| {
                    err(format!(
                        "weight {:?} {}, scales {:?} {} do not fit the config's {expected}: {e}",
                        packed.shape(),
                        packed.dtype(),
                        scales.shape(),
                        scales.dtype()
                    ))
                })?;
            if inferred != expected {
                return Err(err(format!(
                    "weight {:?} and scales {:?} {} give {inferred}, but config.json says {expected}",
                    packed.shape(),
                    scales.shape(),
                    scales.dtype()
                )));
            }
            // Validates dtypes and shapes of scales and biases against each other (no copy).
            QuantizedWeight::new(packed.clone(), scales.clone(), biases.cloned(), expected)
                .map_err(|e| err(e.to_string()))?;
            specs.insert(p, expected);
        }
        if let Some(q) = &self.quant {
            for (name, entry) in q.modules() {
                if matches!(entry, ModuleQuant::Quantize(_)) && !specs.contains_key(name) {
                    return Err(format_error(
                        &config_path,
                        format!("quantization.{name} quantizes {name}, but {name}.scales is in no shard"),
                    ));
                }
            }
        }
        let mut names: Vec<(&String, &usize)> = self.location.iter().collect();
        names.sort_unstable();
        for (name, &i) in names {
            if let Some(p) = name.strip_suffix(".weight") {
                let b = self.shards[i].1.get(name);
                if b.is_some_and(|b| b.dtype() == DType::U32) && !specs.contains_key(p) {
                    return Err(format_error(
                        &self.shards[i].0,
                        format!("{name} is uint32 (packed) but {p}.scales is in no shard"),
                    ));
                }
            }
        }
        self.specs = specs;
        Ok(())
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The parsed `config.json`.
    pub fn config(&self) -> &Value {
        &self.config
    }

    /// The quantization block, if the model is quantized.
    pub fn quantization(&self) -> Option<&QuantConfig> {
        self.quant.as_ref()
    }

    /// The shard files, sorted, with their tensors.
    pub fn shards(&self) -> impl Iterator<Item = (&Path, &Tensors)> {
        self.shards.iter().map(|(p, t)| (p.as_path(), t))
    }

    /// The tensor `name`, from whichever shard holds it (a zero-copy view of the map).
    pub fn tensor(&self, name: &str) -> Option<&Buffer> {
        let &i = self.location.get(name)?;
        self.shards[i].1.get(name)
    }

    /// All tensor names, sorted.
    pub fn tensor_names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.location.keys().map(String::as_str).collect();
        v.sort_unstable();
        v
    }

    /// Total bytes of all tensors.
    pub fn nbytes(&self) -> usize {
        self.shards.iter().map(|(_, t)| t.nbytes()).sum()
    }

    /// Modules with a `.weight`, sorted: quantized ones and dense ones (norms included).
    pub fn modules(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self
            .location
            .keys()
            .filter_map(|n| n.strip_suffix(".weight"))
            .collect();
        v.sort_unstable();
        v
    }

    /// The quantized modules and their specs, sorted by name.
    pub fn quantized_modules(&self) -> &BTreeMap<String, QuantSpec> {
        &self.specs
    }

    /// Module `name`'s spec, if it is quantized.
    pub fn spec(&self, module: &str) -> Option<QuantSpec> {
        self.specs.get(module).copied()
    }

    /// Module `name`'s weight: a validated [`QuantizedWeight`] (`[..experts, N, K]`) when it is
    /// quantized, else its dense `.weight`. Tensors stay zero-copy views of the maps unless
    /// misaligned for their dtype (MLX does not pad), which kernels need: those are copied
    /// (see [`aligned`]).
    pub fn weight(&self, module: &str) -> Result<ModuleWeight> {
        let name = format!("{module}.weight");
        let Some(w) = self.tensor(&name) else {
            return Err(format_error(&self.path, format!("no tensor {name}")));
        };
        let Some(&spec) = self.specs.get(module) else {
            return Ok(ModuleWeight::Dense(aligned(w)?));
        };
        let get = |s: &str| self.tensor(&format!("{module}.{s}"));
        let scales = get("scales").ok_or_else(|| format_error(&self.path, "scales"))?;
        let biases = get("biases").map(aligned).transpose()?;
        let qw = QuantizedWeight::new(aligned(w)?, aligned(scales)?, biases, spec)
            .map_err(|e| format_error(self.file_of(&name), format!("{module}: {e}")))?;
        Ok(ModuleWeight::Quantized(qw))
    }

    /// Module `name`'s own `.bias` (a Linear's additive bias), never the quantization's
    /// `.biases`.
    pub fn bias(&self, module: &str) -> Option<&Buffer> {
        self.tensor(&format!("{module}.bias"))
    }

    /// The module that computes the logits: `lm_head` (or one ending in `.lm_head`) when the
    /// directory has it, else, with tied embeddings, the token embedding (`…embed_tokens`),
    /// whose (possibly quantized) weight serves as the output projection.
    pub fn output_head(&self) -> Option<&str> {
        let modules = self.modules();
        if let Some(h) = modules
            .iter()
            .find(|m| **m == "lm_head" || m.ends_with(".lm_head"))
        {
            return Some(*h);
        }
        modules.into_iter().find(|m| m.ends_with("embed_tokens"))
    }
}
