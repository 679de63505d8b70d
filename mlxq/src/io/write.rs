//! Writing safetensors files byte-identical to `mx.save_safetensors`.

use super::order::unordered_map_order;
use super::read::io_error;
use super::{Tensors, METADATA_KEY};
use crate::device::Location;
use crate::dtype::DType;
use crate::error::{Error, Result};
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Writes `tensors` to a safetensors file at `path` with the tensors' metadata, producing the
/// same bytes as MLX 0.32.4's `mx.save_safetensors(path, d, metadata)` on Linux, where `d` is a
/// dict holding the same tensors in the same order as `tensors`:
///
/// - an 8-byte little-endian header length, then the header, then the data, with **no
///   padding** (the safetensors crate pads the header to 8 bytes with spaces; MLX does not);
/// - the header is compact JSON with every object's keys sorted bytewise (nlohmann's
///   `std::map`): tensors and `__metadata__` interleaved by name, each tensor as
///   `{"data_offsets":[a,b],"dtype":"F32","shape":[..]}`; `__metadata__` is `null` when there
///   is no metadata (mlx-lm writes `{"format":"mlx"}`);
/// - tensor data follows in the iteration order of the `std::unordered_map` MLX builds from the
///   dict (see [`unordered_map_order`]), each tensor's bytes contiguous.
///
/// The file is written to a temporary file in the same directory (named `.NAME.PID.N.tmp`),
/// flushed to disk and renamed over `path`, so a failed or interrupted save never leaves a file
/// at `path` that looks complete; on failure the temporary file is removed. Errors are
/// [`Error::Io`] naming `path`.
pub fn save(path: impl AsRef<Path>, tensors: &Tensors) -> Result<()> {
    let path = path.as_ref();
    let names: Vec<&str> = tensors.names().collect();
    let order = unordered_map_order(&names).ok_or(Error::SizeOverflow {
        op: "io::save",
        what: "tensor count",
    })?;
    let mut entries = Vec::with_capacity(order.len());
    let mut offset = 0usize;
    for &i in &order {
        let (name, buffer) = &tensors.entries[i];
        if buffer.location() != Location::Cpu {
            return Err(Error::unsupported(
                "io::save",
                format!(
                    "tensor {name} is on {}; save host buffers",
                    buffer.location()
                ),
            ));
        }
        let end = offset
            .checked_add(buffer.nbytes())
            .ok_or(Error::SizeOverflow {
                op: "io::save",
                what: "data offsets",
            })?;
        entries.push((
            name.as_str(),
            tensor_json(buffer.dtype(), buffer.shape(), offset, end),
        ));
        offset = end;
    }
    let metadata = if tensors.metadata.is_empty() {
        "null".to_string()
    } else {
        let fields: Vec<String> = tensors
            .metadata
            .iter()
            .map(|(k, v)| format!("{}:{}", json_string(k), json_string(v)))
            .collect();
        format!("{{{}}}", fields.join(","))
    };
    entries.push((METADATA_KEY, metadata));
    entries.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    let fields: Vec<String> = entries
        .iter()
        .map(|(k, v)| format!("{}:{v}", json_string(k)))
        .collect();
    let header = format!("{{{}}}", fields.join(","));

    let tmp = TempFile::create(path)?;
    let result = (|| -> std::io::Result<()> {
        let mut w = BufWriter::with_capacity(1 << 20, &tmp.file);
        w.write_all(&(header.len() as u64).to_le_bytes())?;
        w.write_all(header.as_bytes())?;
        for &i in &order {
            w.write_all(tensors.entries[i].1.bytes())?;
        }
        w.flush()?;
        drop(w);
        tmp.file.sync_all()
    })();
    result.map_err(|e| io_error(path, e))?;
    tmp.persist(path)
}

/// One tensor's header entry, keys in nlohmann's (sorted) order.
fn tensor_json(dtype: DType, shape: &[usize], start: usize, end: usize) -> String {
    let dims: Vec<String> = shape.iter().map(usize::to_string).collect();
    let name = match dtype {
        DType::F32 => "F32",
        DType::F16 => "F16",
        DType::BF16 => "BF16",
        DType::U8 => "U8",
        DType::U32 => "U32",
        DType::I32 => "I32",
    };
    format!(
        "{{\"data_offsets\":[{start},{end}],\"dtype\":\"{name}\",\"shape\":[{}]}}",
        dims.join(",")
    )
}

/// A JSON string literal. serde_json escapes as nlohmann's `dump()` does: `"` `\` and the
/// control characters (`\b \f \n \r \t`, others as lowercase `\u00xx`), UTF-8 kept as is.
fn json_string(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}

/// A temporary file beside the destination, removed on drop unless persisted.
struct TempFile {
    file: File,
    path: PathBuf,
    keep: bool,
}

impl TempFile {
    fn create(dest: &Path) -> Result<TempFile> {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let name = dest.file_name().ok_or_else(|| {
            io_error(
                dest,
                std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file name"),
            )
        })?;
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(".{}.{n}.tmp", std::process::id()));
        let path = dest.with_file_name(tmp_name);
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| io_error(dest, e))?;
        Ok(TempFile {
            file,
            path,
            keep: false,
        })
    }

    fn persist(mut self, dest: &Path) -> Result<()> {
        std::fs::rename(&self.path, dest).map_err(|e| io_error(dest, e))?;
        self.keep = true;
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.keep {
            // Best effort: the file is incomplete and named as temporary either way.
            let _ = std::fs::remove_file(&self.path);
        }
    }
}
