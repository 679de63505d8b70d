//! The one error type of the library.
//!
//! Every variant names the operation (`op`) that failed and, where one parameter is at fault,
//! that parameter, with what was expected and what came. Messages read as one line:
//! `quantized_matmul: x: expected last dimension 4096, got 4000`.

use crate::dtype::DType;

/// Result alias used by every fallible function of the crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong in mlxq.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A scalar parameter (bits, group size, a mode, a dimension) has a value the op does not accept.
    #[error("{op}: {param}: expected {expected}, got {actual}")]
    InvalidParameter {
        /// The operation that rejected the value.
        op: &'static str,
        /// The parameter at fault.
        param: &'static str,
        /// What the op accepts.
        expected: String,
        /// What it was given.
        actual: String,
    },
    /// A tensor's shape disagrees with another tensor or with the op's rules.
    #[error("{op}: {param}: expected shape {expected}, got {actual:?}")]
    ShapeMismatch {
        /// The operation that rejected the shape.
        op: &'static str,
        /// The tensor at fault.
        param: &'static str,
        /// The expected shape, or a description such as `[..., 4096]`.
        expected: String,
        /// The shape that came.
        actual: Vec<usize>,
    },
    /// A tensor has the wrong element type.
    #[error("{op}: {param}: expected dtype {expected}, got {actual}")]
    DTypeMismatch {
        /// The operation that rejected the dtype.
        op: &'static str,
        /// The tensor at fault.
        param: &'static str,
        /// The accepted dtype(s).
        expected: String,
        /// The dtype that came.
        actual: DType,
    },
    /// A buffer holds fewer bytes than its shape and dtype (or an op) require.
    #[error("{op}: {param}: buffer too small: need {needed} bytes from offset {offset}, have {available}")]
    BufferTooSmall {
        /// The operation (or constructor) that checked the size.
        op: &'static str,
        /// The buffer at fault.
        param: &'static str,
        /// Bytes required.
        needed: u64,
        /// Byte offset into the storage the view starts at.
        offset: u64,
        /// Bytes the storage holds after that offset.
        available: u64,
    },
    /// An index (expert id, token id) lies outside the dimension it indexes.
    #[error("{op}: {param}[{position}] = {index} is out of range 0..{bound}")]
    IndexOutOfRange {
        /// The operation that read the index.
        op: &'static str,
        /// The index tensor.
        param: &'static str,
        /// Flat position of the offending index.
        position: usize,
        /// Its value.
        index: i64,
        /// The exclusive upper bound.
        bound: usize,
    },
    /// A size computation (elements × bytes, offsets) does not fit in `usize`.
    #[error("{op}: {what}: size overflows usize")]
    SizeOverflow {
        /// The operation computing the size.
        op: &'static str,
        /// What was being sized.
        what: &'static str,
    },
    /// Data cannot be viewed as the requested type because its address is misaligned.
    #[error("{op}: {param}: byte offset {offset} is not aligned to {align} bytes for {dtype}")]
    Misaligned {
        /// The operation asking for the view.
        op: &'static str,
        /// The buffer at fault.
        param: &'static str,
        /// The dtype requested.
        dtype: DType,
        /// The alignment it needs.
        align: usize,
        /// The byte offset that breaks it.
        offset: u64,
    },
    /// A buffer cannot be written because it is shared, borrowed from a file or a view.
    #[error("{op}: {param}: buffer is read-only ({reason})")]
    ReadOnly {
        /// The operation that wanted to write.
        op: &'static str,
        /// The buffer at fault.
        param: &'static str,
        /// Why it cannot be written.
        reason: &'static str,
    },
    /// A valid combination that this build or backend does not implement.
    #[error("{op}: {what} is not supported{detail}")]
    Unsupported {
        /// The operation.
        op: &'static str,
        /// What is unsupported.
        what: String,
        /// Extra context, starting with a separator, or empty.
        detail: String,
    },
    /// The requested backend is not compiled in or has no device.
    #[error("device {device}: unavailable: {reason}")]
    BackendUnavailable {
        /// The device asked for, e.g. `cuda:0`.
        device: String,
        /// Why it cannot be used.
        reason: String,
    },
    /// Two tensors of one op live on different devices.
    #[error("{op}: {param}: expected a buffer on {expected}, got one on {actual}")]
    DeviceMismatch {
        /// The operation.
        op: &'static str,
        /// The tensor at fault.
        param: &'static str,
        /// The encoder's device.
        expected: String,
        /// The buffer's device.
        actual: String,
    },
    /// A CUDA driver call failed (or a kernel faulted) while running `op`.
    #[error("{op}: CUDA error: {cause}")]
    Cuda {
        /// The operation (or runtime step) that made the call.
        op: &'static str,
        /// The driver's error name and description.
        cause: String,
    },
    /// NVRTC could not compile a kernel; `log` is NVRTC's program log.
    #[error("kernel {kernel}: NVRTC compile failed: {cause}\n{log}")]
    KernelCompile {
        /// The kernel key's name.
        kernel: String,
        /// NVRTC's error code.
        cause: String,
        /// NVRTC's compile log.
        log: String,
    },
    /// A file could not be read or written.
    #[error("{path}: {cause}")]
    Io {
        /// The file.
        path: String,
        /// The operating system's error (part of the message, so deliberately not a
        /// `source()`, which would print it twice in an error chain).
        cause: std::io::Error,
    },
    /// A safetensors file is malformed or a tensor in it is inconsistent.
    #[error("{path}: {message}")]
    Format {
        /// The file.
        path: String,
        /// What is wrong with it.
        message: String,
    },
}

impl Error {
    /// Shorthand for [`Error::InvalidParameter`].
    pub fn invalid(
        op: &'static str,
        param: &'static str,
        expected: impl Into<String>,
        actual: impl ToString,
    ) -> Self {
        Error::InvalidParameter {
            op,
            param,
            expected: expected.into(),
            actual: actual.to_string(),
        }
    }

    /// Shorthand for [`Error::ShapeMismatch`].
    pub fn shape(
        op: &'static str,
        param: &'static str,
        expected: impl Into<String>,
        actual: &[usize],
    ) -> Self {
        Error::ShapeMismatch {
            op,
            param,
            expected: expected.into(),
            actual: actual.to_vec(),
        }
    }

    /// Shorthand for [`Error::DTypeMismatch`].
    pub fn dtype(
        op: &'static str,
        param: &'static str,
        expected: impl Into<String>,
        actual: DType,
    ) -> Self {
        Error::DTypeMismatch {
            op,
            param,
            expected: expected.into(),
            actual,
        }
    }

    /// Shorthand for [`Error::Unsupported`] without detail.
    pub fn unsupported(op: &'static str, what: impl Into<String>) -> Self {
        Error::Unsupported {
            op,
            what: what.into(),
            detail: String::new(),
        }
    }
}

/// Multiplies sizes with overflow reported as [`Error::SizeOverflow`].
pub(crate) fn checked_product(
    op: &'static str,
    what: &'static str,
    dims: impl IntoIterator<Item = usize>,
) -> Result<usize> {
    dims.into_iter()
        .try_fold(1usize, |acc, d| acc.checked_mul(d))
        .ok_or(Error::SizeOverflow { op, what })
}
