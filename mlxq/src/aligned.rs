//! Byte storage aligned to a cache line.
//!
//! The SIMD kernels load 64 bytes at a time; a 64-byte load that straddles two cache lines
//! costs two. `Vec<u8>` (and `Vec<u64>`) from the system allocator is 16-byte aligned, and
//! large allocations (served by `mmap`) start 16 bytes into a page: every 64-byte load of
//! such a buffer splits. On Zen 4 that made the decode kernel's core loop ~1.5× slower
//! (docs/perf.md, session 24). Host buffers and the kernels' scratch use this instead.

// The scratch helpers serve the x86 kernels; other targets use the host storage alone.
#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]

use crate::error::{Error, Result};
use bytemuck::{Pod, Zeroable};

/// One cache line of bytes; its alignment is the point. Kernels whose scratch is made of
/// whole lines (GEMM panels, tiles) keep `Vec<Line>`s.
#[derive(Clone, Copy, Pod, Zeroable)]
#[repr(C, align(64))]
pub(crate) struct Line(pub [u8; 64]);

impl Line {
    /// A line of zeros.
    pub const ZERO: Line = Line([0; 64]);
}

/// Growable, zero-initialised bytes whose start is 64-byte aligned.
#[derive(Default)]
pub(crate) struct AlignedBytes {
    lines: Vec<Line>,
    len: usize,
}

impl AlignedBytes {
    /// No bytes (no allocation).
    pub const fn new() -> AlignedBytes {
        AlignedBytes {
            lines: Vec::new(),
            len: 0,
        }
    }

    /// `len` zero bytes, or `SizeOverflow` (naming `op`) where no allocation can be that
    /// large. Large buffers come from the allocator's zeroed pages (`calloc`-like), so
    /// untouched pages cost nothing until written, as with `vec![0u8; len]`; running out of
    /// memory aborts, as a `Vec` does.
    pub fn zeroed(op: &'static str, len: usize) -> Result<AlignedBytes> {
        let n = len.div_ceil(64);
        let layout = std::alloc::Layout::array::<Line>(n).map_err(|_| Error::SizeOverflow {
            op,
            what: "host buffer bytes",
        })?;
        let lines = bytemuck::allocation::try_zeroed_vec(n)
            .unwrap_or_else(|()| std::alloc::handle_alloc_error(layout));
        Ok(AlignedBytes { lines, len })
    }

    /// Makes this `len` zero bytes, reusing the allocation where it is large enough.
    pub fn clear_to_zeroed(&mut self, len: usize) {
        let n = len.div_ceil(64);
        self.lines.clear();
        self.lines.resize(n, Line::ZERO);
        self.len = len;
    }

    /// Makes this `n` zero `T`s (reusing the allocation) and returns them.
    pub fn clear_to_zeroed_elems<T: Pod>(&mut self, n: usize) -> &mut [T] {
        self.clear_to_zeroed(n.saturating_mul(std::mem::size_of::<T>()));
        bytemuck::try_cast_slice_mut(self.bytes_mut()).unwrap_or_default()
    }

    /// The bytes as `T`s (as many whole ones as there are; none if misaligned for `T`, which
    /// a 64-byte aligned start never is).
    pub fn elems<T: Pod>(&self) -> &[T] {
        let b = self.bytes();
        bytemuck::try_cast_slice(&b[..b.len() - b.len() % std::mem::size_of::<T>().max(1)])
            .unwrap_or_default()
    }

    /// The bytes.
    pub fn bytes(&self) -> &[u8] {
        &bytemuck::cast_slice(&self.lines)[..self.len]
    }

    /// The bytes, mutably.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut bytemuck::cast_slice_mut(&mut self.lines)[..self.len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn impossible_size_is_an_error() {
        let e = AlignedBytes::zeroed("Buffer::zeros", usize::MAX - 10)
            .err()
            .unwrap();
        assert!(e.to_string().contains("Buffer::zeros"), "{e}");
    }

    #[test]
    fn aligned_zeroed_and_reused() {
        for len in [0usize, 1, 63, 64, 65, 4096 + 16, 3 << 20] {
            let mut b = AlignedBytes::zeroed("test", len).unwrap();
            assert_eq!(b.bytes().len(), len);
            assert!(b.bytes().iter().all(|&v| v == 0));
            assert_eq!(b.bytes().as_ptr() as usize % 64, 0);
            b.bytes_mut().iter_mut().for_each(|v| *v = 7);
            b.clear_to_zeroed(len / 2 + 1);
            assert_eq!(b.bytes().len(), len / 2 + 1);
            assert!(b.bytes().iter().all(|&v| v == 0));
            assert_eq!(b.bytes_mut().as_ptr() as usize % 64, 0);
            let f = b.clear_to_zeroed_elems::<f32>(len + 3);
            assert_eq!(f.len(), len + 3);
            f.iter_mut().for_each(|v| *v = 1.5);
            assert_eq!(b.elems::<f32>().len(), len + 3);
            assert!(b.elems::<f32>().iter().all(|&v| v == 1.5));
        }
    }
}
