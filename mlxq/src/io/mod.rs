//! Safetensors files: named [`Buffer`]s in, named buffers out, in MLX's layout.
//!
//! - [`load_mmap`] maps a file and views each tensor where it lies (no copy); [`load`] reads it
//!   into owned, aligned memory instead. Both keep the file's metadata and tensor order.
//! - [`save`] writes exactly the bytes `mx.save_safetensors` writes for the same dict (see
//!   [`save`] for the layout), through a temporary file renamed into place.
//! - [`ModelDir`] opens an MLX (or Hugging Face) model directory: `config.json` and its
//!   quantization block, single or sharded safetensors, module by module.
//! - [`Tensors::quantized_weight`] assembles a [`QuantizedWeight`](crate::QuantizedWeight) from
//!   MLX's `P.weight` / `P.scales` / `P.biases`, inferring the bits from the shapes.
//!
//! Parsing and validation of headers is the `safetensors` crate's; this module maps its dtypes
//! and errors onto mlxq's. Writing is done here because the crate's writer pads the header and
//! orders tensors differently from MLX.

mod convert;
mod model;
mod order;
mod quantized;
mod read;
mod write;

pub use convert::{
    convert, dequantize_dir, ConvertOptions, ConvertSummary, DequantizeDirOptions, Progress,
    Recipe, SanitizedModel, MAX_SHARD_BYTES,
};
pub use model::{
    read_config, shard_files, ModelDir, ModuleQuant, ModuleWeight, QuantConfig, WeightMap,
    INDEX_FILE,
};
pub use order::unordered_map_order;
pub use quantized::{aligned, infer_spec};
pub use read::{load, load_mmap};
pub use write::{save, SafetensorsWriter, TensorInfo};

use crate::buffer::Buffer;
use crate::error::{Error, Result};
use std::collections::{BTreeMap, HashMap};

/// The key of the metadata object in a safetensors header, which no tensor may use.
const METADATA_KEY: &str = "__metadata__";

/// An ordered collection of named tensors with a file's string metadata.
///
/// Names are unique. The order is the order of insertion; [`load`] and [`load_mmap`] insert in
/// the order the tensors' data lies in the file.
#[derive(Clone, Debug)]
pub struct Tensors {
    entries: Vec<(String, Buffer)>,
    index: HashMap<String, usize>,
    metadata: BTreeMap<String, String>,
    source: String,
}

impl Default for Tensors {
    fn default() -> Tensors {
        Tensors::new()
    }
}

impl Tensors {
    /// An empty collection without metadata.
    pub fn new() -> Tensors {
        Tensors::with_source("tensors".to_string())
    }

    pub(super) fn with_source(source: String) -> Tensors {
        Tensors {
            entries: Vec::new(),
            index: HashMap::new(),
            metadata: BTreeMap::new(),
            source,
        }
    }

    /// Adds `buffer` under `name`; fails if the name is taken or is `__metadata__`.
    pub fn insert(&mut self, name: impl Into<String>, buffer: Buffer) -> Result<()> {
        let name = name.into();
        if name == METADATA_KEY || self.index.contains_key(&name) {
            return Err(Error::Format {
                path: self.source.clone(),
                message: format!("tensor name {name:?} is reserved or used twice"),
            });
        }
        self.index.insert(name.clone(), self.entries.len());
        self.entries.push((name, buffer));
        Ok(())
    }

    /// The tensor named `name`.
    pub fn get(&self, name: &str) -> Option<&Buffer> {
        self.index.get(name).map(|&i| &self.entries[i].1)
    }

    /// Whether a tensor named `name` exists.
    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// Names and tensors, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Buffer)> {
        self.entries.iter().map(|(n, b)| (n.as_str(), b))
    }

    /// Names, in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|(n, _)| n.as_str())
    }

    /// Names in the order `mx.load` hands them to Python: MLX inserts the header's (sorted)
    /// names into a `std::unordered_map` and iterates it (see [`unordered_map_order`]).
    ///
    /// A program that builds its output dict by iterating `mx.load(path).items()` inserts in this
    /// order; following it lets [`save`] reproduce that program's file byte for byte.
    pub fn mlx_dict_order(&self) -> Vec<&str> {
        let mut sorted: Vec<&str> = self.names().collect();
        sorted.sort_unstable_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        // More names than a 64-bit hash table holds cannot exist in memory.
        let order = unordered_map_order(&sorted).unwrap_or_default();
        order.into_iter().map(|i| sorted[i]).collect()
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are no tensors.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Total bytes of all tensors.
    pub fn nbytes(&self) -> usize {
        self.entries.iter().map(|(_, b)| b.nbytes()).sum()
    }

    /// The header's `__metadata__` strings (empty when the file has none or `null`).
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// Mutable metadata, e.g. to set `format` to `mlx` before saving.
    pub fn metadata_mut(&mut self) -> &mut BTreeMap<String, String> {
        &mut self.metadata
    }

    /// Where the tensors came from (a file path, or `tensors`): the path errors name.
    pub fn source(&self) -> &str {
        &self.source
    }

    fn format_error(&self, message: impl Into<String>) -> Error {
        Error::Format {
            path: self.source.clone(),
            message: message.into(),
        }
    }
}

#[cfg(test)]
mod tests;
