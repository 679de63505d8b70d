//! Typed, shaped buffers: memory + dtype + shape + byte offset.
//!
//! A [`Buffer`] is a contiguous row-major view into shared storage. The storage is either owned
//! host memory (64-byte aligned: every dtype can be viewed in place, and a cache line of it is
//! one SIMD load) or a read-only memory map of a file (safetensors weights are used where they
//! lie, without a copy). Views share storage through an `Arc`, so slicing one expert out of an
//! `[E, N, K]` stack costs nothing.
//!
//! With the `cuda` feature the storage can also be device memory (a plain device allocation);
//! such a buffer has no host bytes: [`Buffer::to_host`] and [`Buffer::to_device`] copy.
//!
//! Invariant, checked by every constructor: `offset + numel·dtype.size() ≤ storage length`,
//! computed without overflow. Typed access re-checks dtype and alignment and never panics.

use crate::aligned::AlignedBytes;
use crate::device::Location;
use crate::dtype::{DType, Element};
use crate::error::{checked_product, Error, Result};
use std::sync::Arc;

/// Where the bytes of a buffer live.
enum Storage {
    /// Owned host memory, 64-byte aligned (so every dtype can be viewed in place, and SIMD
    /// loads of whole cache lines do not straddle two).
    Host(AlignedBytes),
    /// A read-only memory map (e.g. of a safetensors file).
    Mapped(Arc<memmap2::Mmap>),
    /// Device memory of a CUDA device.
    #[cfg(feature = "cuda")]
    Cuda(crate::backend::cuda::DeviceMem),
}

impl Storage {
    /// Host bytes; empty for device memory.
    fn bytes(&self) -> &[u8] {
        match self {
            Storage::Host(b) => b.bytes(),
            Storage::Mapped(m) => &m[..],
            #[cfg(feature = "cuda")]
            Storage::Cuda(_) => &[],
        }
    }

    /// Length in bytes, wherever the memory is.
    fn len(&self) -> usize {
        match self {
            #[cfg(feature = "cuda")]
            Storage::Cuda(m) => m.len(),
            s => s.bytes().len(),
        }
    }
}

/// A contiguous, row-major tensor view: storage, dtype, shape and byte offset.
#[derive(Clone)]
pub struct Buffer {
    storage: Arc<Storage>,
    dtype: DType,
    shape: Vec<usize>,
    offset: usize,
    location: Location,
}

impl std::fmt::Debug for Buffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Buffer")
            .field("dtype", &self.dtype)
            .field("shape", &self.shape)
            .field("offset", &self.offset)
            .field("location", &self.location)
            .finish()
    }
}

/// Bytes needed for `shape` elements of `dtype`, or an overflow error.
pub(crate) fn byte_size(op: &'static str, dtype: DType, shape: &[usize]) -> Result<usize> {
    checked_product(
        op,
        "buffer bytes",
        shape.iter().copied().chain([dtype.size()]),
    )
}

impl Buffer {
    /// A zero-filled host buffer.
    pub fn zeros(dtype: DType, shape: &[usize]) -> Result<Buffer> {
        let len = byte_size("Buffer::zeros", dtype, shape)?;
        Ok(Buffer {
            storage: Arc::new(Storage::Host(AlignedBytes::zeroed("Buffer::zeros", len)?)),
            dtype,
            shape: shape.to_vec(),
            offset: 0,
            location: Location::Cpu,
        })
    }

    /// A host buffer holding a copy of `data`, whose length must equal the product of `shape`.
    pub fn from_slice<T: Element>(data: &[T], shape: &[usize]) -> Result<Buffer> {
        let numel = checked_product("Buffer::from_slice", "elements", shape.iter().copied())?;
        if numel != data.len() {
            return Err(Error::shape(
                "Buffer::from_slice",
                "data",
                format!("{numel} elements for shape {shape:?}"),
                &[data.len()],
            ));
        }
        let mut b = Buffer::zeros(T::DTYPE, shape)?;
        b.as_mut_slice::<T>()?.copy_from_slice(data);
        Ok(b)
    }

    /// A host buffer holding a copy of raw little-endian `bytes` of `dtype` elements.
    pub fn from_bytes(bytes: &[u8], dtype: DType, shape: &[usize]) -> Result<Buffer> {
        let len = byte_size("Buffer::from_bytes", dtype, shape)?;
        if len != bytes.len() {
            return Err(Error::BufferTooSmall {
                op: "Buffer::from_bytes",
                param: "bytes",
                needed: len as u64,
                offset: 0,
                available: bytes.len() as u64,
            });
        }
        let mut b = Buffer::zeros(dtype, shape)?;
        b.bytes_mut()?.copy_from_slice(bytes);
        Ok(b)
    }

    /// A zero-copy buffer over `byte_offset..` of a memory-mapped file.
    ///
    /// Mapping a file is `unsafe` in `memmap2` (the file must not change while mapped); that
    /// promise is made where the `Mmap` is created. Here the range is checked against the map.
    pub fn from_mmap(
        map: Arc<memmap2::Mmap>,
        byte_offset: usize,
        dtype: DType,
        shape: &[usize],
    ) -> Result<Buffer> {
        let b = Buffer {
            storage: Arc::new(Storage::Mapped(map)),
            dtype,
            shape: shape.to_vec(),
            offset: byte_offset,
            location: Location::Cpu,
        };
        b.check_fits("Buffer::from_mmap")?;
        Ok(b)
    }

    fn check_fits(&self, op: &'static str) -> Result<()> {
        let needed = byte_size(op, self.dtype, &self.shape)?;
        let total = self.storage.len();
        let available = total.saturating_sub(self.offset);
        if self.offset > total || needed > available {
            return Err(Error::BufferTooSmall {
                op,
                param: "buffer",
                needed: needed as u64,
                offset: self.offset as u64,
                available: available as u64,
            });
        }
        Ok(())
    }

    /// A zero-copy view of `shape` elements of `dtype` starting `byte_offset` bytes into this
    /// buffer's view. Fails if the view would extend past the storage.
    pub fn view(&self, byte_offset: usize, dtype: DType, shape: &[usize]) -> Result<Buffer> {
        let offset = self
            .offset
            .checked_add(byte_offset)
            .ok_or(Error::SizeOverflow {
                op: "Buffer::view",
                what: "byte offset",
            })?;
        let end = byte_offset
            .checked_add(byte_size("Buffer::view", dtype, shape)?)
            .ok_or(Error::SizeOverflow {
                op: "Buffer::view",
                what: "view end",
            })?;
        if end > self.nbytes() {
            return Err(Error::BufferTooSmall {
                op: "Buffer::view",
                param: "buffer",
                needed: end as u64,
                offset: self.offset as u64,
                available: self.nbytes() as u64,
            });
        }
        let b = Buffer {
            storage: Arc::clone(&self.storage),
            dtype,
            shape: shape.to_vec(),
            offset,
            location: self.location,
        };
        b.check_fits("Buffer::view")?;
        Ok(b)
    }

    /// The same bytes with another shape of equal element count.
    pub fn reshape(&self, shape: &[usize]) -> Result<Buffer> {
        let numel = checked_product("Buffer::reshape", "elements", shape.iter().copied())?;
        if numel != self.numel() {
            return Err(Error::shape(
                "Buffer::reshape",
                "shape",
                format!("{} elements", self.numel()),
                shape,
            ));
        }
        let mut b = self.clone();
        b.shape = shape.to_vec();
        Ok(b)
    }

    /// Element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    /// Shape (row-major, contiguous).
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    /// Number of dimensions.
    pub fn ndim(&self) -> usize {
        self.shape.len()
    }
    /// Number of elements. Cannot overflow: checked when the buffer was made.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// Bytes of this view.
    pub fn nbytes(&self) -> usize {
        self.numel() * self.dtype.size()
    }
    /// Byte offset of this view into its storage.
    pub fn byte_offset(&self) -> usize {
        self.offset
    }
    /// Where the memory lives.
    pub fn location(&self) -> Location {
        self.location
    }
    /// Whether this view's storage is a memory-mapped file.
    pub fn is_mapped(&self) -> bool {
        matches!(*self.storage, Storage::Mapped(_))
    }
    /// Whether two buffers share storage (e.g. an expert view and its stack).
    pub fn shares_storage(&self, other: &Buffer) -> bool {
        Arc::ptr_eq(&self.storage, &other.storage)
    }

    /// The raw little-endian bytes of this view; empty for a buffer in device memory (copy it
    /// with [`Buffer::to_host`] first).
    pub fn bytes(&self) -> &[u8] {
        // In range by the constructor invariant (device storage has no host bytes).
        self.storage
            .bytes()
            .get(self.offset..self.offset + self.nbytes())
            .unwrap_or(&[])
    }

    /// Fails with [`Error::DeviceMismatch`] unless this buffer is in host memory.
    pub(crate) fn require_host(&self, op: &'static str) -> Result<()> {
        if self.location != Location::Cpu {
            return Err(Error::DeviceMismatch {
                op,
                param: "buffer",
                expected: "cpu (copy it with Buffer::to_host)".into(),
                actual: self.location.to_string(),
            });
        }
        Ok(())
    }

    /// A copy of this buffer on `device` (the same buffer if it is already there). Copies
    /// between host and a CUDA device run on the device's stream, after all work recorded on
    /// it, and return when done.
    pub fn to_device(&self, device: &crate::Device) -> Result<Buffer> {
        if device.location() == self.location {
            return Ok(self.clone());
        }
        let host = self.to_host()?;
        match device.location() {
            Location::Cpu => Ok(host),
            #[cfg(feature = "cuda")]
            Location::Cuda(_) => {
                let mem = device.cuda_state()?.alloc(self.nbytes())?;
                mem.upload(0, host.bytes())?;
                Ok(Buffer {
                    storage: Arc::new(Storage::Cuda(mem)),
                    dtype: self.dtype,
                    shape: self.shape.clone(),
                    offset: 0,
                    location: device.location(),
                })
            }
            #[cfg(not(feature = "cuda"))]
            Location::Cuda(_) => Err(Error::BackendUnavailable {
                device: device.location().to_string(),
                reason: "mlxq was built without the `cuda` feature".into(),
            }),
        }
    }

    /// Overwrites this buffer's elements (on the host or a device) with those of `src`, a
    /// buffer of the same dtype and shape anywhere: how a decode loop feeds new inputs to a
    /// captured graph. Device copies run in stream order and return when done.
    pub fn copy_from(&mut self, src: &Buffer) -> Result<()> {
        if (src.dtype, src.shape()) != (self.dtype, self.shape()) {
            return Err(Error::shape(
                "Buffer::copy_from",
                "src",
                format!("{} {:?}", self.dtype, self.shape),
                src.shape(),
            ));
        }
        let host = src.to_host()?;
        match &*self.storage {
            #[cfg(feature = "cuda")]
            Storage::Cuda(mem) => mem.upload(self.offset, host.bytes()),
            _ => {
                self.bytes_mut()?.copy_from_slice(host.bytes());
                Ok(())
            }
        }
    }

    /// A host copy of this buffer (the same buffer if it is already on the host).
    pub fn to_host(&self) -> Result<Buffer> {
        match &*self.storage {
            #[cfg(feature = "cuda")]
            Storage::Cuda(mem) => {
                let mut b = Buffer::zeros(self.dtype, &self.shape)?;
                mem.download(self.offset, b.bytes_mut()?)?;
                Ok(b)
            }
            _ => Ok(self.clone()),
        }
    }

    /// A new buffer on `device` whose contents are unspecified (zero on the host): op outputs.
    pub(crate) fn uninit_on(
        device: &crate::Device,
        dtype: DType,
        shape: &[usize],
    ) -> Result<Buffer> {
        match device.location() {
            #[cfg(feature = "cuda")]
            Location::Cuda(_) => {
                let len = byte_size("Buffer::uninit_on", dtype, shape)?;
                let mem = device.cuda_state()?.alloc(len)?;
                Ok(Buffer {
                    storage: Arc::new(Storage::Cuda(mem)),
                    dtype,
                    shape: shape.to_vec(),
                    offset: 0,
                    location: device.location(),
                })
            }
            _ => Buffer::zeros(dtype, shape),
        }
    }

    /// A byte buffer over a whole device allocation of CUDA device `ordinal`.
    #[cfg(feature = "cuda")]
    pub(crate) fn from_device_mem(
        mem: crate::backend::cuda::DeviceMem,
        ordinal: usize,
        shape: &[usize],
    ) -> Result<Buffer> {
        let b = Buffer {
            storage: Arc::new(Storage::Cuda(mem)),
            dtype: DType::U8,
            shape: shape.to_vec(),
            offset: 0,
            location: Location::Cuda(ordinal),
        };
        b.check_fits("Buffer::from_device_mem")?;
        Ok(b)
    }

    /// The device address of this view's first byte (`None` for host buffers).
    #[cfg(feature = "cuda")]
    pub(crate) fn device_ptr(&self) -> Option<u64> {
        match &*self.storage {
            Storage::Cuda(mem) => Some(mem.ptr() + self.offset as u64),
            _ => None,
        }
    }

    /// Mutable raw bytes; fails unless this buffer solely owns host storage.
    pub fn bytes_mut(&mut self) -> Result<&mut [u8]> {
        self.require_host("Buffer::bytes_mut")?;
        let (start, len) = (self.offset, self.nbytes());
        let storage = Arc::get_mut(&mut self.storage).ok_or(Error::ReadOnly {
            op: "Buffer::bytes_mut",
            param: "buffer",
            reason: "its storage is shared with another view",
        })?;
        match storage {
            Storage::Host(b) => Ok(&mut b.bytes_mut()[start..start + len]),
            Storage::Mapped(_) => Err(Error::ReadOnly {
                op: "Buffer::bytes_mut",
                param: "buffer",
                reason: "it is a memory-mapped file",
            }),
            #[cfg(feature = "cuda")]
            Storage::Cuda(_) => Err(Error::ReadOnly {
                op: "Buffer::bytes_mut",
                param: "buffer",
                reason: "it is in device memory",
            }),
        }
    }

    fn check_type<T: Element>(&self, op: &'static str) -> Result<()> {
        self.require_host(op)?;
        if T::DTYPE != self.dtype {
            return Err(Error::dtype(op, "buffer", T::DTYPE.name(), self.dtype));
        }
        let align = std::mem::align_of::<T>();
        let addr = self.storage.bytes().as_ptr() as usize + self.offset;
        if !addr.is_multiple_of(align) {
            return Err(Error::Misaligned {
                op,
                param: "buffer",
                dtype: self.dtype,
                align,
                offset: self.offset as u64,
            });
        }
        Ok(())
    }

    /// The elements as a typed slice; checks dtype and alignment.
    pub fn as_slice<T: Element>(&self) -> Result<&[T]> {
        self.check_type::<T>("Buffer::as_slice")?;
        bytemuck::try_cast_slice(self.bytes()).map_err(|_| Error::Misaligned {
            op: "Buffer::as_slice",
            param: "buffer",
            dtype: self.dtype,
            align: std::mem::align_of::<T>(),
            offset: self.offset as u64,
        })
    }

    /// The elements as a mutable typed slice; checks dtype, alignment and sole ownership.
    pub fn as_mut_slice<T: Element>(&mut self) -> Result<&mut [T]> {
        self.check_type::<T>("Buffer::as_mut_slice")?;
        let dtype = self.dtype;
        let offset = self.offset as u64;
        bytemuck::try_cast_slice_mut(self.bytes_mut()?).map_err(|_| Error::Misaligned {
            op: "Buffer::as_mut_slice",
            param: "buffer",
            dtype,
            align: std::mem::align_of::<T>(),
            offset,
        })
    }

    /// A copy of the elements.
    pub fn to_vec<T: Element>(&self) -> Result<Vec<T>> {
        self.require_host("Buffer::to_vec")?;
        if T::DTYPE != self.dtype {
            return Err(Error::dtype(
                "Buffer::to_vec",
                "buffer",
                T::DTYPE.name(),
                self.dtype,
            ));
        }
        // Copy through bytes so a misaligned mapped view still reads correctly.
        Ok(bytemuck::pod_collect_to_vec(self.bytes()))
    }

    /// The elements widened to f32 (float dtypes only).
    pub fn to_f32_vec(&self) -> Result<Vec<f32>> {
        use crate::dtype::Float;
        crate::with_float_type!(self.dtype, T => {
            Ok(self.to_vec::<T>()?.into_iter().map(Float::to_f32).collect())
        }, _ => Err(Error::dtype("Buffer::to_f32_vec", "buffer", "a float dtype", self.dtype)))
    }

    /// A host buffer of float `dtype` holding `values` rounded to nearest even.
    pub fn from_f32(values: &[f32], dtype: DType, shape: &[usize]) -> Result<Buffer> {
        use crate::dtype::Float;
        crate::with_float_type!(dtype, T => {
            let v: Vec<T> = values.iter().map(|&x| T::from_f32(x)).collect();
            Buffer::from_slice(&v, shape)
        }, _ => Err(Error::dtype("Buffer::from_f32", "dtype", "a float dtype", dtype)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn views_share_storage_and_check_bounds() {
        let b = Buffer::from_slice(&[1u32, 2, 3, 4, 5, 6], &[2, 3]).unwrap();
        let row = b.view(12, DType::U32, &[3]).unwrap();
        assert_eq!(row.as_slice::<u32>().unwrap(), &[4, 5, 6]);
        assert!(row.shares_storage(&b));
        assert!(matches!(
            b.view(16, DType::U32, &[3]),
            Err(Error::BufferTooSmall { .. })
        ));
        assert!(matches!(
            b.view(usize::MAX, DType::U32, &[1]),
            Err(Error::SizeOverflow { .. })
        ));
    }

    #[test]
    fn typed_access_is_checked() {
        let mut b = Buffer::zeros(DType::F32, &[4]).unwrap();
        assert!(matches!(
            b.as_slice::<u32>(),
            Err(Error::DTypeMismatch { .. })
        ));
        let odd = Buffer::zeros(DType::U8, &[9])
            .unwrap()
            .view(1, DType::F32, &[2])
            .unwrap();
        assert!(matches!(
            odd.as_slice::<f32>(),
            Err(Error::Misaligned { .. })
        ));
        assert_eq!(odd.to_vec::<f32>().unwrap(), vec![0.0, 0.0]);
        let shared = b.clone();
        assert!(matches!(
            b.as_mut_slice::<f32>(),
            Err(Error::ReadOnly { .. })
        ));
        drop(shared);
        b.as_mut_slice::<f32>().unwrap()[0] = 1.0;
    }

    #[test]
    fn sizes_past_4gib_do_not_truncate() {
        // 2^31 × 2^2 × 4 bytes = 32 GiB: computed exactly, no allocation attempted here.
        assert_eq!(
            byte_size("t", DType::F32, &[1 << 31, 4]).unwrap(),
            1usize << 35
        );
        assert!(matches!(
            byte_size("t", DType::F32, &[usize::MAX / 2, 3]),
            Err(Error::SizeOverflow { .. })
        ));
    }
}
