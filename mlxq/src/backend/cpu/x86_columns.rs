//! The task driver the AVX-512 decode kernels (`avx512`, `avx512bf16`, `avx512vnni`) share.
//!
//! Each kernel supplies one thing, through [`Columns`]: the dot products of one weight row
//! (one output column), over a range of its groups, with a block of up to [`MAX_ROWS`] rows
//! of x, the row count a compile-time constant so the kernel's accumulators stay in
//! registers. The driver does the rest, the same way for all of them:
//! - tasks over contiguous output columns, eight per thread, so cores finish together and
//!   each task streams one contiguous stretch of W (which the kernels prefetch ahead of);
//! - blocks of K (whole groups) small enough that the rows of x a column visits stay in L1,
//!   with per-task f32 accumulators kept in a thread-local buffer (no allocation per call
//!   once warm);
//! - blocks of rows, each weight chunk decoded once per block;
//! - the converted output, each element written once by the task owning its column.

use super::DisjointOut;
use crate::dtype::Float;
use std::cell::RefCell;

/// Most rows of x one [`Columns::columns`] call covers.
pub(crate) const MAX_ROWS: usize = 8;
/// Most output columns one [`Columns::columns`] call covers.
pub(crate) const MAX_COLS: usize = 2;

/// Bytes of W a kernel prefetches ahead of its loads: a core's hardware prefetcher alone
/// keeps too few misses in flight to reach its share of the memory bandwidth while the
/// kernel computes (measured in docs/perf.md: M = 1 4-bit from 4.9 to 8.7 GB/s on one core).
pub(crate) const PREFETCH_AHEAD: usize = 4096;

/// Where a prefetch puts its line: [`PrefetchTo::L1`] (`prefetcht0`) or [`PrefetchTo::L2`]
/// (`prefetcht1`).
///
/// On Zen 4 (docs/perf.md, session 24) a decode of one row block (M ≤ 4) reads W 10–27%
/// faster with its prefetches into L2 (on Zen 5 it does not: see [`PrefetchTo::stream`]): a `prefetcht0` holds one of the core's few L1 miss
/// buffers until its line arrives, the same buffers the kernel's own loads need, while the
/// L2 keeps many more misses in flight and the line moves from L2 to L1 on demand. Kernels
/// that compute longer per byte (several row blocks per weight chunk) were as fast or
/// faster with L1, which hides the L2 latency from their longer dependency chains.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum PrefetchTo {
    L1,
    L2,
}

/// Prefetches the byte `PREFETCH_AHEAD / share` further along the stream of W a task reads,
/// into `into`, when its kernel is at byte `off` of a column's slice of `len` bytes at `p`
/// and the next slice this kernel reads starts `stride` bytes after `p` (`share` columns
/// read side by side share the distance). A slice shorter than the distance (a K block of
/// several rows of x: 512 bytes at 4 bits and K blocks of 1024) is prefetched at the same
/// offset as many slices on as the distance spans; until session 29 such slices were
/// prefetched inside the wrong row (`stride + off + distance − len` is past the next slice),
/// and the fix made `avx512vnni` at M = 6..16 3–18% faster (docs/perf.md). Prefetches never
/// fault; `wrapping_add` keeps the address computation defined wherever it points.
#[inline(always)]
pub(crate) fn prefetch_w(
    p: *const u8,
    off: usize,
    len: usize,
    stride: usize,
    share: usize,
    into: PrefetchTo,
) {
    let ahead = PREFETCH_AHEAD / share;
    let a = if len < ahead {
        // Slices shorter than the distance (K blocks of several rows of x): the same offset
        // of the slice as many slices on as the distance spans (loop-invariant: no division
        // per prefetch).
        p.wrapping_add(off)
            .wrapping_add(ahead.div_ceil(len.max(1)).wrapping_mul(stride))
    } else if off + ahead < len {
        p.wrapping_add(off + ahead)
    } else {
        p.wrapping_add(stride + off + ahead - len)
    };
    into.prefetch(a);
}

/// Prefetches the line of the scales and the line of the biases holding group `j` of the
/// weight row that [`prefetch_w`]'s prefetch of the codes has reached, for a kernel reading
/// a column's slice of `scales.len()` groups (`len` bytes of codes; rows `row_bytes` apart)
/// whose stream continues `share` rows on. The scales and biases are streams of their own,
/// 1/16 of the codes' bytes at 4 bits and group 64, which the hardware prefetcher does not
/// run far enough ahead of: the M = 1 VNNI loop waited longer on the load of the scales than
/// on the codes (docs/perf.md, session 28). One call per 16 groups or fewer covers every
/// line (a line holds 32 bf16/f16 scales).
#[inline(always)]
pub(crate) fn prefetch_groups<S>(
    scales: &[S],
    biases: &[S],
    j: usize,
    len: usize,
    row_bytes: usize,
    share: usize,
    into: PrefetchTo,
) {
    let ahead = groups_ahead(scales.len(), len, row_bytes, share);
    prefetch_groups_at(scales, biases, j.saturating_add(ahead), into);
}

/// How many groups ahead of the one being read [`prefetch_groups`] prefetches: whole rows
/// (`row_bytes` apart; the slice of `groups` groups is `len` bytes of codes), as many as the
/// codes' prefetch distance spans, `share` rows on. Loop-invariant: kernels whose inner loop
/// would pay its divisions per call compute it once per slice.
#[inline(always)]
pub(crate) fn groups_ahead(groups: usize, len: usize, row_bytes: usize, share: usize) -> usize {
    let len = len.max(1);
    // Groups per whole row: the slice's groups scaled by the row's bytes over the slice's.
    let row_groups = row_bytes.saturating_mul(groups) / len;
    let rows = (PREFETCH_AHEAD / share.max(1) / len + 1) * share;
    rows.saturating_mul(row_groups)
}

/// Prefetches the line of the scales and the line of the biases holding group `at` (indices
/// past the slices are fine: nothing is read).
#[inline(always)]
pub(crate) fn prefetch_groups_at<S>(scales: &[S], biases: &[S], at: usize, into: PrefetchTo) {
    into.prefetch(scales.as_ptr().wrapping_add(at) as *const u8);
    into.prefetch(biases.as_ptr().wrapping_add(at) as *const u8);
}

impl PrefetchTo {
    /// Where a kernel that streams W at the memory's pace (a decode call of one block of
    /// rows, `m` rows of x) prefetches on this CPU:
    /// - AMD family 19h (Zen 3, Zen 4): [`PrefetchTo::L2`], which read W 10–27% faster than
    ///   L1 there (docs/perf.md, session 24);
    /// - AMD family 1Ah (Zen 5): [`PrefetchTo::L1`], 5–10% faster at M = 1 and up to 34% at
    ///   M = 4 (session 28);
    /// - elsewhere (Intel): [`PrefetchTo::L2`] for one row of x, L1 for more. On a Xeon with
    ///   AVX-512 and AMX (session 41) L2 made M = 1 3–30% faster (most at 8 bits), and M = 4
    ///   and 8 0–6% slower; the Intel CPUs measured before session 24 ran with L1.
    pub(crate) fn stream(m: usize) -> PrefetchTo {
        if zen3_or_4() || (m == 1 && !zen5()) {
            PrefetchTo::L2
        } else {
            PrefetchTo::L1
        }
    }

    /// Prefetches the lines of `len` bytes from `a` into this cache level, one after another
    /// in address order (`asm!`, which the compiler keeps in program order: the prefetchers
    /// behind the cache follow an ascending run of requests, and an unrolled loop of
    /// `_mm_prefetch` came out of the compiler permuted).
    #[inline(always)]
    pub(crate) fn prefetch_lines(self, a: *const u8, len: usize) {
        for l in (0..len).step_by(64) {
            let p = a.wrapping_add(l);
            // SAFETY: a prefetch is a hint: it reads nothing the program sees and never
            // faults, wherever `p` points; it touches no register but its address's.
            unsafe {
                match self {
                    PrefetchTo::L1 => std::arch::asm!(
                        "prefetcht0 [{p}]",
                        p = in(reg) p,
                        options(nostack, preserves_flags, readonly)
                    ),
                    PrefetchTo::L2 => std::arch::asm!(
                        "prefetcht1 [{p}]",
                        p = in(reg) p,
                        options(nostack, preserves_flags, readonly)
                    ),
                }
            }
        }
    }

    /// Prefetches the line holding `a` into this cache level. A prefetch is a hint: it reads
    /// nothing the program sees and never faults, wherever `a` points.
    #[inline(always)]
    pub(crate) fn prefetch(self, a: *const u8) {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0, _MM_HINT_T1};
        // SAFETY: see above.
        unsafe {
            match self {
                PrefetchTo::L1 => _mm_prefetch::<_MM_HINT_T0>(a as *const i8),
                PrefetchTo::L2 => _mm_prefetch::<_MM_HINT_T1>(a as *const i8),
            }
        }
    }
}

thread_local! {
    /// Per-task f32 accumulators, reused across calls.
    static ACC: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// A decode kernel's body.
pub(crate) trait Columns: Sync {
    /// Rows of x one call covers at most (≤ [`MAX_ROWS`]).
    const ROWS: usize;
    /// Output columns one call covers at most (≤ [`MAX_COLS`]).
    const COLS: usize;

    /// Output columns the driver passes per call for this call's shape (1..=[`Self::COLS`]).
    fn cols(&self) -> usize {
        Self::COLS
    }

    /// Sets `acc[c][r]`, for `c < count` and `r < R`, to the dot product of row `row0 + r`
    /// of x with groups `g0..g1` of weight row `col + c`. A kernel checks every slice it
    /// reads and leaves `acc` untouched if the arguments are out of range (the driver never
    /// passes such).
    ///
    /// # Safety
    /// The CPU supports the kernel's target features.
    unsafe fn columns<const R: usize>(
        &self,
        col: usize,
        count: usize,
        g0: usize,
        g1: usize,
        row0: usize,
        acc: &mut [[f32; MAX_ROWS]; MAX_COLS],
    );

    /// Adds to `acc[i]`, for every column `cols.start + i` of `cols`, the dot product of row
    /// `row0` of x with groups `g0..g1` of that weight row: one row of x over a task's
    /// columns. The default is [`columns_one_row`]; a kernel whose per-call setup is a large
    /// part of a column's work (the M = 1 decode) overrides it with one call for all of them.
    ///
    /// # Safety
    /// As for [`Columns::columns`]; `acc` holds `cols.len()` sums.
    unsafe fn row_run(
        &self,
        cols: std::ops::Range<usize>,
        g0: usize,
        g1: usize,
        row0: usize,
        acc: &mut [f32],
    ) {
        // SAFETY: the caller's contract.
        unsafe { columns_one_row(self, cols, g0, g1, row0, acc) }
    }
}

/// [`Columns::row_run`] through [`Columns::columns`], [`Columns::cols`] columns a call.
///
/// # Safety
/// As for [`Columns::row_run`].
pub(crate) unsafe fn columns_one_row<C: Columns + ?Sized>(
    kernel: &C,
    cols: std::ops::Range<usize>,
    g0: usize,
    g1: usize,
    row0: usize,
    acc: &mut [f32],
) {
    let per_call = kernel.cols().clamp(1, C::COLS);
    for c0 in cols.clone().step_by(per_call) {
        let count = per_call.min(cols.end - c0);
        let mut part = [[0f32; MAX_ROWS]; MAX_COLS];
        // SAFETY: the caller's contract.
        unsafe { kernel.columns::<1>(c0, count, g0, g1, row0, &mut part) };
        let ci = c0 - cols.start;
        for (c, part) in part.iter().enumerate().take(count) {
            if let Some(a) = acc.get_mut(ci + c) {
                *a += part[0];
            }
        }
    }
}

/// The sizes the driver walks: `m` rows of x, `n` output columns of `groups` groups each,
/// K blocks of `block_groups` groups.
#[derive(Clone, Copy)]
pub(crate) struct Walk {
    pub m: usize,
    pub n: usize,
    pub groups: usize,
    pub block_groups: usize,
}

impl Walk {
    /// The walk whose K blocks keep `x_block_bytes` of x (at `x_bytes` bytes per element of
    /// a row, rows of a block together) in L1: `k` elements in groups of `g`.
    pub fn new(
        m: usize,
        n: usize,
        k: usize,
        g: usize,
        rows: usize,
        x_bytes: usize,
        x_block_bytes: usize,
    ) -> Walk {
        let per_elem = (x_bytes * m.min(rows)).max(1);
        let block = (x_block_bytes / per_elem).max(g).min(k) / g;
        Walk {
            m,
            n,
            groups: k / g,
            block_groups: block.max(1),
        }
    }
}

impl Walk {
    /// The same walk with K blocks of whole superblocks of `sb` groups (at least one), for the
    /// kernels that decode `sb` groups at a time.
    pub fn in_superblocks(self, sb: usize) -> Walk {
        Walk {
            block_groups: (self.block_groups / sb).max(1) * sb,
            ..self
        }
    }
}

/// Runs `kernel` over every output element of `out` (`m × n`, row-major).
///
/// # Safety
/// The CPU supports the kernel's target features; `out` holds `m·n` elements (a shorter
/// `out` is never written past: [`DisjointOut`] checks).
pub(crate) unsafe fn run<C: Columns, O: Float>(kernel: &C, walk: Walk, out: &mut [O]) {
    let Walk {
        m,
        n,
        groups,
        block_groups,
    } = walk;
    let writer = DisjointOut::new(out);
    let per_call = kernel.cols().clamp(1, C::COLS);
    let tasks = (rayon::current_num_threads() * 8).max(1);
    let per_task = n.div_ceil(tasks).max(8);
    super::tasks::for_each(n.div_ceil(per_task), |t| {
        let cols = t * per_task..((t + 1) * per_task).min(n);
        let width = cols.len();
        ACC.with(|acc| {
            // A nested call on this thread (never made from inside a column) would find the
            // buffer borrowed: give it its own.
            let mut own = Vec::new();
            let mut borrowed = acc.try_borrow_mut();
            let acc = match borrowed.as_mut() {
                Ok(a) => &mut **a,
                Err(_) => &mut own,
            };
            acc.clear();
            acc.resize(m * width, 0.0);
            for g0 in (0..groups).step_by(block_groups) {
                let g1 = (g0 + block_groups).min(groups);
                for r0 in (0..m).step_by(C::ROWS) {
                    let rows = C::ROWS.min(m - r0);
                    if rows == 1 {
                        let row = &mut acc[r0 * width..(r0 + 1) * width];
                        // SAFETY: as below.
                        unsafe { kernel.row_run(cols.clone(), g0, g1, r0, row) };
                        continue;
                    }
                    for c0 in cols.clone().step_by(per_call) {
                        let count = per_call.min(cols.end - c0);
                        let mut part = [[0f32; MAX_ROWS]; MAX_COLS];
                        // SAFETY: the caller guarantees the CPU features; the kernel checks
                        // its slices.
                        unsafe {
                            match rows {
                                1 => kernel.columns::<1>(c0, count, g0, g1, r0, &mut part),
                                2 => kernel.columns::<2>(c0, count, g0, g1, r0, &mut part),
                                3 => kernel.columns::<3>(c0, count, g0, g1, r0, &mut part),
                                4 => kernel.columns::<4>(c0, count, g0, g1, r0, &mut part),
                                5 => kernel.columns::<5>(c0, count, g0, g1, r0, &mut part),
                                6 => kernel.columns::<6>(c0, count, g0, g1, r0, &mut part),
                                7 => kernel.columns::<7>(c0, count, g0, g1, r0, &mut part),
                                _ => kernel.columns::<8>(c0, count, g0, g1, r0, &mut part),
                            }
                        }
                        let ci = c0 - cols.start;
                        for (c, part) in part.iter().enumerate().take(count) {
                            for (r, &v) in part.iter().enumerate().take(rows) {
                                acc[(r0 + r) * width + ci + c] += v;
                            }
                        }
                    }
                }
            }
            for r in 0..m {
                for (ci, col) in cols.clone().enumerate() {
                    // SAFETY: task `t` alone owns columns `cols` of every row.
                    unsafe { writer.write(r * n + col, O::from_f32(acc[r * width + ci])) };
                }
            }
        });
    });
}

/// Whether this is an AMD CPU of family 19h (Zen 3, Zen 4): the decode kernels' tuning was
/// measured there first (sessions 23–27), and where Zen 5 (family 1Ah, session 28) measured
/// otherwise the choice depends on this.
pub(crate) fn zen3_or_4() -> bool {
    static ZEN34: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ZEN34.get_or_init(|| amd_family() == Some(0x19))
}

/// Whether this is an AMD CPU of family 1Ah (Zen 5).
fn zen5() -> bool {
    static ZEN5: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ZEN5.get_or_init(|| amd_family() == Some(0x1a))
}

/// The size of a core's L1 data cache in bytes, from CPUID: AMD's leaf 8000_0005h, else the
/// level-1 data cache among leaf 4's caches (Intel); 32 KiB where neither says.
pub(crate) fn l1d_bytes() -> usize {
    static L1D: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *L1D.get_or_init(|| {
        use std::arch::x86_64::{__cpuid, __cpuid_count};
        let fallback = 32 << 10;
        if is_amd() {
            // Leaf 8000_0005h exists where the highest extended leaf (8000_0000h) reaches it;
            // ECX bits 31..24: L1 data cache size in KiB.
            if __cpuid(0x8000_0000).eax >= 0x8000_0005 {
                let kib = (__cpuid(0x8000_0005).ecx >> 24) as usize;
                if kib > 0 {
                    return kib << 10;
                }
            }
            return fallback;
        }
        if __cpuid(0).eax < 4 {
            return fallback;
        }
        // Leaf 4: one subleaf per cache until type 0; type 1 is data, level in EAX 7..5.
        for sub in 0..16 {
            let r = __cpuid_count(4, sub);
            let kind = r.eax & 0x1f;
            if kind == 0 {
                break;
            }
            if kind == 1 && (r.eax >> 5) & 0x7 == 1 {
                let ways = ((r.ebx >> 22) & 0x3ff) as usize + 1;
                let parts = ((r.ebx >> 12) & 0x3ff) as usize + 1;
                let line = (r.ebx & 0xfff) as usize + 1;
                let sets = r.ecx as usize + 1;
                return ways * parts * line * sets;
            }
        }
        fallback
    })
}

/// Whether the CPU's vendor string is AMD's.
fn is_amd() -> bool {
    use std::arch::x86_64::__cpuid;
    // Leaf 0 (vendor) exists on every x86-64 CPU.
    let vendor = __cpuid(0);
    let name: Vec<u8> = [vendor.ebx, vendor.edx, vendor.ecx]
        .iter()
        .flat_map(|r| r.to_le_bytes())
        .collect();
    name == b"AuthenticAMD"
}

/// The CPU's family (base plus extended, as AMD numbers them) if it is an AMD CPU.
pub(crate) fn amd_family() -> Option<u32> {
    use std::arch::x86_64::__cpuid;
    // Leaf 1 (signature) exists on every x86-64 CPU.
    let sig = __cpuid(1);
    is_amd().then(|| {
        let base = (sig.eax >> 8) & 0xf;
        let ext = (sig.eax >> 20) & 0xff;
        if base == 0xf {
            base + ext
        } else {
            base
        }
    })
}

/// `$body` with `$g` a `const usize` of the weight's group size (32, 64 or 128): the
/// dispatch of the decode kernels whose superblock layout is generic over the group size.
/// Another size is the `quantized_matmul` error naming `group_size`.
macro_rules! with_group {
    ($group:expr, $g:ident => $body:expr) => {
        match $group {
            32 => {
                const $g: usize = 32;
                $body
            }
            64 => {
                const $g: usize = 64;
                $body
            }
            128 => {
                const $g: usize = 128;
                $body
            }
            g => Err($crate::error::Error::invalid(
                "quantized_matmul",
                "group_size",
                "32, 64 or 128",
                g,
            )),
        }
    };
}
pub(crate) use with_group;

#[cfg(test)]
mod tests {
    /// CPUID's L1 data cache size parses to a size some x86-64 CPU has (a whole number of
    /// KiB between 16 and 192), not the fallback's accident or a field misread.
    #[test]
    fn l1d_size_is_plausible() {
        let b = super::l1d_bytes();
        println!("L1 data cache: {} KiB", b >> 10);
        assert!((16 << 10..=192 << 10).contains(&b), "{b} bytes");
        assert_eq!(b % 1024, 0, "{b} bytes");
    }
}
