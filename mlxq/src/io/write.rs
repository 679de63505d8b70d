//! Writing safetensors files byte-identical to `mx.save_safetensors`.

use super::order::unordered_map_order;
use super::read::io_error;
use super::{Tensors, METADATA_KEY};
use crate::buffer::Buffer;
use crate::device::Location;
use crate::dtype::DType;
use crate::error::{Error, Result};
use std::collections::BTreeMap;
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
        entries.push(TensorInfo::of(name, buffer));
    }
    let mut w = SafetensorsWriter::create(path, entries, &tensors.metadata)?;
    for &i in &order {
        w.write(&tensors.entries[i].1)?;
    }
    w.finish()
}

/// Name, dtype and shape of a tensor to be written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    /// The tensor's name.
    pub name: String,
    /// Its element type.
    pub dtype: DType,
    /// Its shape.
    pub shape: Vec<usize>,
}

impl TensorInfo {
    /// The name, dtype and shape of `buffer`.
    pub fn of(name: &str, buffer: &Buffer) -> TensorInfo {
        TensorInfo {
            name: name.to_string(),
            dtype: buffer.dtype(),
            shape: buffer.shape().to_vec(),
        }
    }

    /// Bytes of the tensor's data.
    pub fn nbytes(&self) -> Result<usize> {
        crate::buffer::byte_size("io::TensorInfo", self.dtype, &self.shape)
    }
}

/// A safetensors file written one tensor at a time, so that only the tensor being written need
/// be in memory: the header (MLX's layout, see [`save`]) is written first from the tensors'
/// names, dtypes and shapes, then their data in the order given to [`create`](Self::create).
///
/// The file is a temporary file beside `path` until [`finish`](Self::finish) renames it into
/// place; dropped unfinished (an error, a panic), it is removed.
pub struct SafetensorsWriter {
    path: PathBuf,
    tmp: TempFile,
    out: BufWriter<File>,
    entries: Vec<TensorInfo>,
    next: usize,
}

impl SafetensorsWriter {
    /// Starts `path` for `entries`, whose data will come in this order, with string `metadata`
    /// (`null` in the header when empty). Names must be unique and not `__metadata__`.
    pub fn create(
        path: impl AsRef<Path>,
        entries: Vec<TensorInfo>,
        metadata: &BTreeMap<String, String>,
    ) -> Result<SafetensorsWriter> {
        let path = path.as_ref();
        let mut fields = Vec::with_capacity(entries.len() + 1);
        let mut offset = 0usize;
        let mut seen = std::collections::HashSet::with_capacity(entries.len());
        for e in &entries {
            if e.name == METADATA_KEY || !seen.insert(e.name.as_str()) {
                return Err(Error::Format {
                    path: path.display().to_string(),
                    message: format!("tensor name {:?} is reserved or used twice", e.name),
                });
            }
            let end = offset.checked_add(e.nbytes()?).ok_or(Error::SizeOverflow {
                op: "io::save",
                what: "data offsets",
            })?;
            fields.push((e.name.as_str(), tensor_json(e.dtype, &e.shape, offset, end)));
            offset = end;
        }
        let metadata = if metadata.is_empty() {
            "null".to_string()
        } else {
            let fields: Vec<String> = metadata
                .iter()
                .map(|(k, v)| format!("{}:{}", json_string(k), json_string(v)))
                .collect();
            format!("{{{}}}", fields.join(","))
        };
        fields.push((METADATA_KEY, metadata));
        fields.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
        let fields: Vec<String> = fields
            .iter()
            .map(|(k, v)| format!("{}:{v}", json_string(k)))
            .collect();
        let header = format!("{{{}}}", fields.join(","));

        let tmp = TempFile::create(path)?;
        let file = tmp.file.try_clone().map_err(|e| io_error(path, e))?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        (|| -> std::io::Result<()> {
            out.write_all(&(header.len() as u64).to_le_bytes())?;
            out.write_all(header.as_bytes())
        })()
        .map_err(|e| io_error(path, e))?;
        Ok(SafetensorsWriter {
            path: path.to_path_buf(),
            tmp,
            out,
            entries,
            next: 0,
        })
    }

    /// The tensor [`write`](Self::write) expects next, or `None` when all are written.
    pub fn expected(&self) -> Option<&TensorInfo> {
        self.entries.get(self.next)
    }

    /// Appends the data of the next tensor, which must have its dtype and shape.
    pub fn write(&mut self, buffer: &Buffer) -> Result<()> {
        let op = "SafetensorsWriter::write";
        let Some(e) = self.entries.get(self.next) else {
            return Err(Error::invalid(op, "buffer", "no more tensors", "one more"));
        };
        if buffer.location() != Location::Cpu {
            return Err(Error::unsupported(
                op,
                format!("tensor {} is on {}", e.name, buffer.location()),
            ));
        }
        if buffer.dtype() != e.dtype {
            return Err(Error::dtype(op, "buffer", e.dtype.name(), buffer.dtype()));
        }
        if buffer.shape() != e.shape.as_slice() {
            return Err(Error::shape(
                op,
                "buffer",
                format!("{:?} for {}", e.shape, e.name),
                buffer.shape(),
            ));
        }
        self.out
            .write_all(buffer.bytes())
            .map_err(|err| io_error(&self.path, err))?;
        self.next += 1;
        Ok(())
    }

    /// Flushes the file to disk and renames it to its path; fails if a tensor is missing.
    pub fn finish(mut self) -> Result<()> {
        if let Some(e) = self.entries.get(self.next) {
            return Err(Error::Format {
                path: self.path.display().to_string(),
                message: format!("tensor {} was never written", e.name),
            });
        }
        self.out.flush().map_err(|e| io_error(&self.path, e))?;
        self.tmp
            .file
            .sync_all()
            .map_err(|e| io_error(&self.path, e))?;
        let path = self.path.clone();
        self.tmp.persist(&path)
    }
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

    fn persist(&mut self, dest: &Path) -> Result<()> {
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
