//! Reading safetensors files: the header through the `safetensors` crate, the data either
//! memory-mapped in place ([`load_mmap`]) or copied into owned buffers ([`load`]).

use super::Tensors;
use crate::buffer::Buffer;
use crate::dtype::DType;
use crate::error::{Error, Result};
use safetensors::tensor::{Dtype, Metadata};
use safetensors::{SafeTensorError, SafeTensors};
use std::path::Path;
use std::sync::Arc;

/// Loads a safetensors file by memory-mapping it: every tensor is a zero-copy [`Buffer`] view
/// of the map, in the order its data lies in the file, with the header's metadata.
///
/// MLX's writer does not pad the header, so a tensor may start at an address that is not a
/// multiple of its element size; such views read correctly through [`Buffer::bytes`] and
/// [`Buffer::to_vec`], and [`aligned`](super::aligned) copies one where a kernel needs aligned
/// data. Fails with [`Error::Io`] if the file cannot be opened or mapped and [`Error::Format`] if
/// it is not a well-formed safetensors file of supported dtypes (F32, F16, BF16, U8, U32, I32).
///
/// # Safety
///
/// The file must not be modified or truncated, by this process or any other, while any buffer
/// of the result (or a view or clone of one) is alive. The buffers hand out `&[u8]` into the
/// mapping, which Rust assumes immutable; a concurrent write changes them underneath (undefined
/// behaviour) and a truncation makes reads fault (`SIGBUS`). Replacing the file by renaming
/// another over it, as [`save`](super::save) does, is fine: the mapping keeps the old inode.
pub unsafe fn load_mmap(path: impl AsRef<Path>) -> Result<Tensors> {
    let path = path.as_ref();
    let file = std::fs::File::open(path).map_err(|e| io_error(path, e))?;
    // SAFETY: the caller promises the file stays unmodified while the map is alive (above).
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| io_error(path, e))?;
    let map = Arc::new(map);
    parse(path, &map, |offset, dtype, shape| {
        Buffer::from_mmap(Arc::clone(&map), offset, dtype, shape)
    })
}

/// Loads a safetensors file into owned host memory: like [`load_mmap`], but safe, with every
/// tensor copied (and therefore aligned). Costs the file's size in memory, twice at the peak.
pub fn load(path: impl AsRef<Path>) -> Result<Tensors> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| io_error(path, e))?;
    parse(path, &bytes, |offset, dtype, shape| {
        let len = crate::buffer::byte_size("io::load", dtype, shape)?;
        let end = offset.checked_add(len).ok_or(Error::SizeOverflow {
            op: "io::load",
            what: "tensor end",
        })?;
        let data = bytes.get(offset..end).ok_or(Error::BufferTooSmall {
            op: "io::load",
            param: "file",
            needed: len as u64,
            offset: offset as u64,
            available: bytes.len().saturating_sub(offset) as u64,
        })?;
        Buffer::from_bytes(data, dtype, shape)
    })
}

pub(super) fn io_error(path: &Path, cause: std::io::Error) -> Error {
    Error::Io {
        path: path.display().to_string(),
        cause,
    }
}

fn format_error(path: &Path, message: impl Into<String>) -> Error {
    Error::Format {
        path: path.display().to_string(),
        message: message.into(),
    }
}

/// mlxq's dtype for a safetensors dtype, if it has one.
fn dtype_of(dtype: Dtype) -> Option<DType> {
    Some(match dtype {
        Dtype::F32 => DType::F32,
        Dtype::F16 => DType::F16,
        Dtype::BF16 => DType::BF16,
        Dtype::U8 => DType::U8,
        Dtype::U32 => DType::U32,
        Dtype::I32 => DType::I32,
        _ => return None,
    })
}

/// Parses `bytes` (the whole file) and makes each tensor with `make(file offset, dtype, shape)`.
fn parse(
    path: &Path,
    bytes: &[u8],
    mut make: impl FnMut(usize, DType, &[usize]) -> Result<Buffer>,
) -> Result<Tensors> {
    // The crate checks all of this too; checking the lengths first gives messages with numbers.
    let len = bytes.len();
    let Some(prefix) = bytes.first_chunk::<8>() else {
        return Err(format_error(
            path,
            format!("not a safetensors file: {len} bytes, fewer than the 8-byte header length"),
        ));
    };
    let header_len = u64::from_le_bytes(*prefix);
    if header_len > (len - 8) as u64 {
        return Err(format_error(
            path,
            format!(
                "header length {header_len} exceeds the {} bytes after it: truncated, or not a safetensors file",
                len - 8
            ),
        ));
    }
    let (header_len, metadata) =
        SafeTensors::read_metadata(bytes).map_err(|e| describe(path, bytes, e))?;
    let data_start = 8 + header_len;

    let mut infos: Vec<_> = metadata.tensors().into_iter().collect();
    infos.sort_by(|(na, a), (nb, b)| (a.data_offsets, na).cmp(&(b.data_offsets, nb)));
    let mut tensors = Tensors::with_source(path.display().to_string());
    if let Some(m) = metadata.metadata() {
        tensors.metadata = m.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    }
    for (name, info) in infos {
        let dtype = dtype_of(info.dtype).ok_or_else(|| {
            format_error(
                path,
                format!(
                    "tensor {name}: dtype {:?} is not supported (mlxq reads F32, F16, BF16, U8, U32, I32)",
                    info.dtype
                ),
            )
        })?;
        // `read_metadata` checked that the offsets tile the data exactly, so this cannot overflow.
        let offset = data_start + info.data_offsets.0;
        let buffer = make(offset, dtype, &info.shape)?;
        tensors.insert(name, buffer)?;
    }
    Ok(tensors)
}

/// One line for a `safetensors` crate error.
fn describe(path: &Path, bytes: &[u8], e: SafeTensorError) -> Error {
    let message = match e {
        SafeTensorError::HeaderTooLarge => "header is larger than the 100 MB limit".to_string(),
        SafeTensorError::HeaderTooSmall | SafeTensorError::InvalidHeaderLength => {
            "header length exceeds the file: truncated, or not a safetensors file".to_string()
        }
        SafeTensorError::InvalidHeader => "header is not valid UTF-8".to_string(),
        SafeTensorError::InvalidHeaderStart | SafeTensorError::InvalidHeaderDeserialization => {
            let json_ok =
                header(bytes).is_some_and(|h| serde_json::from_str::<serde_json::Value>(h).is_ok());
            if json_ok {
                "header is JSON but not a safetensors header (an unknown dtype, or a malformed entry)"
                    .to_string()
            } else {
                "header is not valid JSON: not a safetensors file".to_string()
            }
        }
        SafeTensorError::InvalidOffset(name) => {
            format!("tensor {name}: data offsets do not follow the previous tensor's")
        }
        SafeTensorError::TensorInvalidInfo => {
            "a tensor's data offsets do not match its shape and dtype".to_string()
        }
        SafeTensorError::ValidationOverflow => "a tensor's size overflows".to_string(),
        SafeTensorError::MetadataIncompleteBuffer => {
            let have = bytes.len();
            let want = header(bytes)
                .and_then(|h| serde_json::from_str::<Metadata>(h).ok())
                .and_then(|m| {
                    let end = m.tensors().values().map(|i| i.data_offsets.1).max();
                    Some(end.unwrap_or(0) + 8 + h_len(bytes)?)
                });
            match want {
                Some(want) if want > have => {
                    format!("truncated: the header describes {want} bytes, the file has {have}")
                }
                Some(want) => {
                    format!("the header describes {want} bytes, but the file has {have}")
                }
                None => format!("tensor data does not fill the file's {have} bytes"),
            }
        }
        other => format!("malformed safetensors file: {other}"),
    };
    format_error(path, message)
}

fn h_len(bytes: &[u8]) -> Option<usize> {
    usize::try_from(u64::from_le_bytes(*bytes.first_chunk::<8>()?)).ok()
}

/// The header text, if the length prefix is in range and the text is UTF-8.
fn header(bytes: &[u8]) -> Option<&str> {
    let n = h_len(bytes)?;
    std::str::from_utf8(bytes.get(8..8usize.checked_add(n)?)?).ok()
}
