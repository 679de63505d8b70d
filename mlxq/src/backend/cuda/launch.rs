//! Launching the CUDA kernels for the ops (validation happened in `ops::*`), and the timing
//! helpers the benchmarks use.
//!
//! Nothing here synchronises with the host or allocates per call except the outputs of the
//! allocating ops: `quantized_matmul_into` enqueues one launch (a second for split-K
//! transpose = false) on the device's stream.

use super::{driver, CudaDevice};
use crate::error::{checked_product, Error, Result};
use crate::ops::DequantizeOptions;
use crate::quant::{Flavour, QuantMode, QuantSpec};
use crate::registry::{KernelKey, OpKind, AUTO};
use crate::{Buffer, CommandEncoder, DType, Device, QuantizedWeight};
use cudarc::driver::{sys, CudaEvent, DeviceRepr, LaunchConfig, PushKernelArg};
use std::sync::Arc;

/// Batch dims a kernel resolves itself (more is rejected as unsupported).
const MAX_DIMS: usize = 4;

/// Mirror of `struct Batch` in `qmv.cu`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub(super) struct Batch {
    dims: [u64; MAX_DIMS],
    lst: [u64; MAX_DIMS],
    rst: [u64; MAX_DIMS],
    lhs: u64,
    rhs: u64,
    fault: u64,
    ndim: u32,
    x_count: u32,
    w_count: u32,
    /// Bit 0: the index tensors may be read before waiting for the previous kernel (it
    /// cannot have written them).
    flags: u32,
}

// SAFETY: plain `repr(C)` data laid out as the CUDA struct (checked by the size test below).
unsafe impl DeviceRepr for Batch {}

fn cuda(enc: &CommandEncoder) -> Result<Arc<CudaDevice>> {
    enc.device().cuda_state().map(Arc::clone)
}

pub(super) fn ptr(op: &'static str, param: &'static str, b: &Buffer) -> Result<u64> {
    b.device_ptr().ok_or_else(|| Error::DeviceMismatch {
        op,
        param,
        expected: "a CUDA buffer".into(),
        actual: b.location().to_string(),
    })
}

pub(super) fn aligned(
    op: &'static str,
    param: &'static str,
    b: &Buffer,
    p: u64,
    align: u64,
) -> Result<u64> {
    if !p.is_multiple_of(align) {
        return Err(Error::Misaligned {
            op,
            param,
            dtype: b.dtype(),
            align: align as usize,
            offset: b.byte_offset() as u64,
        });
    }
    Ok(p)
}

pub(super) fn cfg(grid: (u32, u32, u32), block: u32, op: &'static str) -> Result<LaunchConfig> {
    if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
        return Err(Error::invalid(
            op,
            "grid",
            "a non-empty launch",
            format!("{grid:?}"),
        ));
    }
    Ok(LaunchConfig {
        grid_dim: grid,
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    })
}

pub(super) fn grid_x(op: &'static str, n: u64) -> Result<u32> {
    u32::try_from(n.max(1))
        .ok()
        .filter(|&g| g < (1 << 31))
        .ok_or(Error::SizeOverflow { op, what: "grid" })
}

/// Quantizes `w` into `out` (both validated by `ops::quantize_into`) on its CUDA device.
pub(crate) fn quantize(
    enc: &mut CommandEncoder,
    w: &Buffer,
    flavour: Flavour,
    out: &QuantizedWeight,
) -> Result<()> {
    const OP: &str = "quantize";
    let dev = cuda(enc)?;
    dev.swap_last_dec(None);
    let spec = out.spec();
    if spec.mode() != QuantMode::Affine {
        return super::fp::quantize(enc, &dev, w, flavour, out);
    }
    let key = KernelKey {
        op: OpKind::Quantize,
        mode: spec.mode(),
        bits: spec.bits(),
        group_size: spec.group_size(),
        input: w.dtype(),
        scales: w.dtype(),
        output: DType::U32,
        flag: flavour == Flavour::Gpu,
        variant: AUTO,
    };
    let k = dev.kernel(key)?;
    let (packed, scales) = (out.packed(), out.scales());
    let biases = out
        .biases()
        .ok_or_else(|| Error::invalid(OP, "out", "a weight with biases", "none"))?;
    let chunks = (w.numel() / 8) as u64;
    let (pw, pp, ps, pb) = (
        ptr(OP, "w", w)?,
        ptr(OP, "packed", packed)?,
        ptr(OP, "scales", scales)?,
        ptr(OP, "biases", biases)?,
    );
    let stream = dev.stream();
    // SAFETY: the pointers address buffers of the sizes the kernel indexes (chunks·8 inputs,
    // chunks·bits bytes, chunks·8/group scales and biases: `out` has `w`'s shape and `spec`),
    // kept alive by `retain` below.
    unsafe {
        stream
            .launch_builder(k.func_named(OP)?)
            .arg(&pw)
            .arg(&pp)
            .arg(&ps)
            .arg(&pb)
            .arg(&chunks)
            .launch(cfg((grid_x(OP, chunks.div_ceil(256))?, 1, 1), 256, OP)?)
    }
    .map_err(driver(OP))?;
    for b in [w, packed, scales, biases] {
        enc.retain(b);
    }
    enc.record(&k.name);
    Ok(())
}

/// Dequantizes all of `w` into the caller's `out` on its CUDA device (`ops` checked that
/// `out` has the output dtype, `w`'s shape and this device).
pub(crate) fn dequantize_into(
    enc: &mut CommandEncoder,
    w: &QuantizedWeight,
    opts: DequantizeOptions,
    out: &mut Buffer,
) -> Result<()> {
    const OP: &str = "dequantize";
    let dev = cuda(enc)?;
    dev.swap_last_dec(None);
    let out_dtype = crate::ops::dequantize_dtype(w, opts)?;
    if w.spec().mode() != QuantMode::Affine {
        return super::fp::dequantize_into(enc, &dev, w, opts.flavour, out_dtype, out);
    }
    let spec = w.spec();
    let biases = w
        .biases()
        .ok_or_else(|| Error::unsupported(OP, format!("mode {} on CUDA", spec.mode())))?;
    let k = dev.kernel(KernelKey::dequantize(w, out_dtype, opts.flavour))?;
    enc.check_location(OP, "scales", w.scales())?;
    enc.check_location(OP, "biases", biases)?;
    enc.check_location(OP, "out", out)?;
    let out: &Buffer = out;
    let ptrs = [
        ptr(OP, "packed", w.packed())?,
        ptr(OP, "scales", w.scales())?,
        ptr(OP, "biases", biases)?,
        ptr(OP, "out", out)?,
    ];
    // SAFETY: as in `quantize`: every index is below the sizes `w` was validated with, and
    // `out` holds `w.shape()` elements (`ops` checked).
    unsafe {
        enqueue_dequantize(
            &dev,
            &k,
            OP,
            false,
            ptrs,
            out.numel() as u64,
            out_dtype.size() as u64,
        )
    }?;
    for b in [w.packed(), w.scales(), biases, out] {
        enc.retain(b);
    }
    enc.record(&k.name);
    Ok(())
}

/// Enqueues a dequantize kernel `k` over `elements` weights (whole groups, from a group's
/// start), one thread per 16 bytes of output in blocks of 256: the affine `dequantize`
/// (`ptrs`: codes, scales, biases, output) or, with `fp`, the FP modes' `fp_dequantize`
/// (codes, scale codes, output; `ptrs[3]` unused). `osize` is the output's bytes per element.
///
/// # Safety
/// The codes, scales (and biases) of `elements` weights must be readable at those pointers
/// and `elements · osize` bytes writable at the output, until the kernel completes.
pub(super) unsafe fn enqueue_dequantize(
    dev: &CudaDevice,
    k: &super::CudaKernel,
    op: &'static str,
    fp: bool,
    [pp, ps, pb, po]: [u64; 4],
    elements: u64,
    osize: u64,
) -> Result<()> {
    let items = elements / (16 / osize);
    let cfg = cfg((grid_x(op, items.div_ceil(256))?, 1, 1), 256, op)?;
    // SAFETY: the caller's contract; the kernel touches items·16 bytes of output and the
    // codes, scales and biases of those elements.
    unsafe {
        if fp {
            dev.stream()
                .launch_builder(k.func_named("fp_dequantize")?)
                .arg(&pp)
                .arg(&ps)
                .arg(&pb)
                .arg(&items)
                .launch(cfg)
        } else {
            dev.stream()
                .launch_builder(k.func_named("dequantize")?)
                .arg(&pp)
                .arg(&ps)
                .arg(&pb)
                .arg(&po)
                .arg(&items)
                .launch(cfg)
        }
    }
    .map_err(driver(op))?;
    Ok(())
}

/// Row-major strides of `shape` placed into the broadcast shape `full` (0 where broadcast).
fn broadcast_strides(full: &[usize], shape: &[usize]) -> [u64; MAX_DIMS] {
    let mut st = [0u64; MAX_DIMS];
    let mut stride = 1u64;
    for d in (0..full.len()).rev() {
        let sd = d as isize - (full.len() - shape.len()) as isize;
        if sd >= 0 {
            let len = shape[sd as usize];
            if len != 1 {
                st[d] = stride;
            }
            stride *= len as u64;
        }
    }
    st
}

/// What a matmul launch needs besides x, w and out.
pub(crate) struct MatmulJob<'a> {
    /// The broadcast batch shape (empty: one matrix).
    pub batch: &'a [usize],
    /// Shape of the lhs index tensor (x's batch dims when there is none).
    pub lhs_shape: &'a [usize],
    /// Shape of the rhs index tensor (w's batch dims when there is none).
    pub rhs_shape: &'a [usize],
    /// Index tensors on the device (gather_qmm), or none (quantized_matmul).
    pub lhs: Option<&'a Buffer>,
    /// See `lhs`.
    pub rhs: Option<&'a Buffer>,
    /// Number of x matrices (bound of lhs values).
    pub x_count: usize,
    /// Rows of each x matrix (all rows when `batch` is empty).
    pub m: usize,
    /// Whether W is `[N, K]`.
    pub transpose: bool,
}

/// Whether index tensors at the byte ranges `indices` may be read before a kernel waits for
/// its predecessor: the predecessor's output range `prev` (a qmv_dec launched as its
/// programmatic dependent; `None`: no such kernel, so it has finished) meets none of them.
fn indices_ready(prev: Option<(u64, u64)>, indices: &[Option<(u64, u64)>]) -> bool {
    prev.is_none_or(|(lo, hi)| {
        indices
            .iter()
            .flatten()
            .all(|&(start, end)| end <= lo || hi <= start)
    })
}

/// The kernel-side batch of a matmul launch (its broadcast shape, the index tensors checked
/// and their device pointers, the fault word) and its number of entries.
fn batch_of(
    enc: &CommandEncoder,
    dev: &CudaDevice,
    op: &'static str,
    w: &QuantizedWeight,
    job: &MatmulJob<'_>,
    prev_dec: Option<(u64, u64)>,
) -> Result<(Batch, u64)> {
    if job.batch.len() > MAX_DIMS {
        return Err(Error::unsupported(
            op,
            format!(
                "{} batch dimensions on CUDA (at most {MAX_DIMS})",
                job.batch.len()
            ),
        ));
    }
    let mut bt = Batch {
        fault: dev.fault_ptr(),
        x_count: u32::try_from(job.x_count).map_err(|_| Error::SizeOverflow {
            op,
            what: "x batch",
        })?,
        w_count: u32::try_from(w.batch_size()).map_err(|_| Error::SizeOverflow {
            op,
            what: "w batch",
        })?,
        ..Batch::default()
    };
    if job.batch.is_empty() {
        bt.ndim = 1;
        bt.dims[0] = 1;
    } else {
        bt.ndim = job.batch.len() as u32;
        for (d, &v) in job.batch.iter().enumerate() {
            bt.dims[d] = v as u64;
        }
        bt.lst = broadcast_strides(job.batch, job.lhs_shape);
        bt.rst = broadcast_strides(job.batch, job.rhs_shape);
    }
    for (slot, param, b) in [
        (&mut bt.lhs, "lhs_indices", job.lhs),
        (&mut bt.rhs, "rhs_indices", job.rhs),
    ] {
        if let Some(b) = b {
            enc.check_location(op, param, b)?;
            if !matches!(b.dtype(), DType::U32 | DType::I32) {
                return Err(Error::dtype(op, param, "uint32 or int32", b.dtype()));
            }
            *slot = aligned(op, param, b, ptr(op, param, b)?, 4)?;
        }
    }
    // The index tensors may be read before the wait for the previous kernel unless that
    // kernel (a qmv_dec launched as its programmatic dependent) wrote bytes of them: then the
    // first W of each entry loads while it finishes, as in a dense call.
    let range = |b: &Buffer| b.device_ptr().map(|p| (p, p + b.nbytes() as u64));
    let indices = [job.lhs, job.rhs].map(|b| b.and_then(range));
    if indices_ready(prev_dec, &indices) {
        bt.flags = 1;
    }
    let entries = checked_product(op, "batch", job.batch.iter().copied())? as u64;
    Ok((bt, entries))
}

/// `out = x · W(ᵀ)` over the job's batch on the CUDA device.
pub(crate) fn qmm(
    enc: &mut CommandEncoder,
    op: &'static str,
    x: &Buffer,
    w: &QuantizedWeight,
    out: &Buffer,
    job: &MatmulJob<'_>,
) -> Result<()> {
    let dev = cuda(enc)?;
    // Cleared here, set again below only by a qmv_dec launch.
    let prev_dec = dev.swap_last_dec(None);
    let after_dec = prev_dec.is_some();
    let spec = w.spec();
    // MLX's FP modes take the wgmma tiles below (prefill, and the sorted gather) and the
    // bulk-copy decode (M <= 16) from their own module where those serve the call (sm_90a,
    // f16/bf16 x and output, W [N, K]), and fp.cu's CUDA-core kernels otherwise.
    // MLXQ_FP_TILES=off keeps them on fp.cu.
    let fp = spec.mode() != QuantMode::Affine;
    let (bt, entries) = batch_of(enc, &dev, op, w, job, prev_dec)?;
    let w_count = w.batch_size() as u64;
    // The shapes of the sorted gather and of the prefill tiles (as below).
    let gather_shape = job.transpose
        && job.rhs.is_some()
        && job.m == 1
        && entries >= 2 * w_count.max(32)
        && w_count <= 1024;
    // MLXQ_TILE_MIN_M (experiments): the first M of the prefill tiles (17 by default; below
    // it, the decode kernels).
    let tile_min_m = knob("MLXQ_TILE_MIN_M")
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(17)
        .max(1);
    let prefill_shape = job.transpose
        && job.m >= tile_min_m
        && entries == 1
        && job.lhs.is_none()
        && job.rhs.is_none();
    let decode_shape = job.transpose && job.m < tile_min_m;
    // M = 4..16 that no decode kernel below takes (8-bit from M = 9, or where x outgrows the
    // bulk-copy kernel's shared memory; 4-bit where `decb_pick` declines) also try the
    // 64-token wgmma tiles, K split, before `qmv_tc` (session 47, H100, graph µs, qmv_tc
    // against qmm_ws_64: 8-bit 16 x 14336x4096 84.9 -> 49.1, 16 x 4096x4096 21.7 -> 18.6,
    // 4 x 4096x14336 54.8 -> 46.9, 9 x 28672x8192 239.6 -> 185.7; 4-bit 9..16 x 4096x14336
    // 43.3..49.4 -> 36.4..36.7, 16 x 28672x8192 208.8 -> 145.3; 4-bit 9..16 x 4096x4096
    // 15.8..16.4 either way). MLXQ_TILE_SMALL=0 keeps qmv_tc (experiments).
    let small_tile = !fp
        && job.transpose
        && job.m >= 4
        && entries == 1
        && job.lhs.is_none()
        && job.rhs.is_none()
        && knob("MLXQ_TILE_SMALL") != Some("0");
    let key = KernelKey {
        op: OpKind::QuantizedMatmul,
        mode: spec.mode(),
        bits: spec.bits(),
        group_size: spec.group_size(),
        input: x.dtype(),
        scales: w.scales_dtype(),
        output: out.dtype(),
        flag: job.transpose,
        variant: AUTO,
    };
    // Large M (`dq_gemm`): W dequantized by slabs into the scratch, each slab one cuBLAS
    // GEMM, for every affine width and the FP modes (before any matmul module is compiled:
    // the route needs only a dequantize kernel). Forced tiles (MLXQ_TILE) keep the tiles.
    if prefill_shape
        && knob("MLXQ_TILE").is_none()
        && super::dq_gemm::min_m(&key, dev.arch(), tile_min_m as u64)
            .is_some_and(|f| job.m as u64 >= f)
        && super::dq_gemm::try_run(enc, &dev, op, x, w, out, job.m as u64)?
    {
        return Ok(());
    }
    // (`ops` made the output x's dtype; the tensor-core keys are W [N, K], f16/bf16 x.)
    if fp
        && !((gather_shape || prefill_shape || decode_shape)
            && super::nvrtc::wgmma(dev.arch())
            && super::tensor_core_path(&key, dev.arch())
            && knob("MLXQ_FP_TILES") != Some("off"))
    {
        return super::fp::qmm(enc, &dev, op, x, w, out, job, bt, entries);
    }
    // FP weights have no biases: their tiles are given the scales in that place, unread.
    let biases = match w.biases() {
        Some(b) => b,
        None if fp => w.scales(),
        None => {
            return Err(Error::unsupported(
                op,
                format!("mode {} on CUDA", spec.mode()),
            ))
        }
    };
    for (param, b) in [("scales", w.scales()), ("biases", biases)] {
        enc.check_location(op, param, b)?;
    }
    let (rows, cols) = (w.rows() as u64, w.cols() as u64);
    let (kdim, ndim) = if job.transpose {
        (cols, rows)
    } else {
        (rows, cols)
    };
    let m = job.m as u64;
    let k = if fp {
        dev.kernel_variant(key, "fp_tiles")?
    } else {
        dev.kernel(key)?
    };
    let gy = entries.clamp(1, 65535) as u32;
    let xsize = x.dtype().size() as u64;
    let osize = out.dtype().size() as u64;
    let px = aligned(op, "x", x, ptr(op, "x", x)?, 16)?;
    let pw = aligned(op, "w", w.packed(), ptr(op, "w", w.packed())?, 16)?;
    let (ps, pb, po) = (
        ptr(op, "scales", w.scales())?,
        ptr(op, "biases", biases)?,
        ptr(op, "out", out)?,
    );
    let out_range = (po, po + out.nbytes() as u64);
    let x_stride = m * kdim;
    let out_stride = m * ndim;
    let s_stride = rows * (cols / spec.group_size() as u64);
    let words_per_matrix = rows * cols * spec.bits() as u64 / 32;
    let stream = Arc::clone(dev.stream());
    let tile_gather = gather_shape
        && super::tensor_core_path(&key, dev.arch())
        && knob("MLXQ_GATHER_SORT_OFF").is_none();
    // gather_qmm over many (token, expert) pairs: sort the pairs by expert on the device
    // (gather_count, gather_place), then one grouped tensor-core GEMM over tiles of pairs
    // of one expert (64, or the GEMM's token width), each expert's W read once per tile
    // instead of once per pair.
    // On Hopper the wgmma tile (qmm_wg_g64), elsewhere (or K not a multiple of 128) the
    // 4-stage mma.sync tile (run 5, 512 tokens of 64 x 2048x2048 4-bit, sort included:
    // 332 µs against 406 for qmm_tc_g8 in run 4). MLXQ_TILE_G=g|g6 forces the mma.sync tile
    // (4 or 6 stages), =wg the wgmma tile, =off restores qmm_tc_g8, =wg128 and =wg80 the
    // wgmma tiles of 128 and 80 pairs, =ws the 80-pair tile's persistent warp-specialised form,
    // =wsp that form on permuted x, =wspt the latter taking x by TMA for items of few pairs
    // and =wsp3 it with three consumer warpgroups.
    // By default `gather_tile` picks the width from the pairs per expert (session 18, 512
    // tokens of top-8 of 64: the 80-pair tile, 4-bit 204 -> 149 µs, 8-bit 261 -> 219 µs:
    // docs/perf-cuda.md run 18), and `gather_ws` its persistent form where that fits
    // (session 61; MLXQ_GATHER_WS=0 keeps the wgmma tile; MLXQ_GATHER_TX=0 keeps the
    // permuted form's cp.async of x at few pairs per expert).
    let fits = |t: &&Tile| tile_fits(&dev, t, kdim, spec, w.scales_dtype(), [ps, pb, po]);
    let tile = match knob("MLXQ_TILE_G") {
        _ if !tile_gather => None,
        Some("off") => None,
        Some("g6") => Some(&TILES[5]),
        Some("g") => Some(&TILES[2]),
        Some("wg") => Some(&TILES[9]),
        Some("ws") => Some(&TILES[14]),
        Some("wsp") => Some(&TILES[20]),
        Some("wsp3") => Some(&TILES[21]),
        Some("wspt") => Some(&TILES[22]),
        Some("wg128") => Some(&TILES[15]),
        Some("wg80") => Some(&TILES[16]),
        _ => {
            let i = gather_tile(entries, w_count, spec.bits());
            let xp = knob("MLXQ_GATHER_XP") != Some("0");
            let tx = (knob("MLXQ_GATHER_TX") != Some("0")).then_some(entries);
            gather_ws(spec.bits(), !fp, xp, tx, w_count)
                .filter(|_| knob("MLXQ_GATHER_WS") != Some("0"))
                .map(|j| &TILES[j])
                .filter(fits)
                .or(Some(&TILES[i]).filter(fits))
                .or(Some(&TILES[2]))
        }
    }
    .filter(fits)
    .filter(|t| !fp || t.wg)
    // The permuted copy of x is made of whole 128-byte chunks (64 values of 16 bits).
    .map(|t| {
        let affine4 = spec.bits() == 4 && !fp;
        if t.xperm && (!affine4 || !x.nbytes().is_multiple_of(128) || x.dtype().size() != 2) {
            &TILES[14]
        } else {
            t
        }
    });
    if tile_gather && (!fp || tile.is_some()) {
        // Tiles of the GEMM's token width: its pairs share each dequantised weight.
        let tm = tile.map_or(64, |t| t.bm);
        // The worst-case tile count over any index values; the sort's blocks: up to 32 of
        // 1024 threads, each over `per` consecutive pairs.
        let tiles = entries.div_ceil(tm) + w_count;
        let blocks = entries.div_ceil(1024).clamp(1, 32);
        let per = entries.div_ceil(blocks);
        let table = 16 + 16 * tiles + 16 * entries; // what the GEMM reads (see gather_count)
        let sort_bytes = table + 16 * entries + 4 * blocks * w_count;
        // `qmm_wsp_g80`'s permuted x after the sort's records, in XPB chunks of 128 bytes
        // per extra block of gather_count.
        let xchunks = if tile.is_some_and(|t| t.xperm) {
            x.nbytes() as u64 / 128
        } else {
            0
        };
        let xoff = sort_bytes.next_multiple_of(128);
        let bytes = xoff + 128 * xchunks;
        let count_blocks = u32::try_from(blocks + xchunks.div_ceil(XPB))
            .map_err(|_| Error::SizeOverflow { op, what: "grid" })?;
        let (t32, tm32, e32, b32) = (
            u32::try_from(tiles).map_err(|_| Error::SizeOverflow { op, what: "grid" })?,
            tm as u32,
            w_count as u32, // <= 1024 (checked above)
            blocks as u32,
        );
        if tiles > 65535 {
            return Err(Error::SizeOverflow { op, what: "grid" });
        }
        let s = dev.scratch(bytes as usize)?;
        let pg = ptr(op, "scratch", &s)?;
        let (prec, phist) = (pg + table, pg + table + 16 * entries);
        let pxp = if xchunks > 0 { pg + xoff } else { 0 };
        // SAFETY: block b < blocks of gather_count reads the index tensors at positions [b per,
        // (b + 1) per) < entries (checked bounds) and writes their records (16 bytes each,
        // inside `bytes` of scratch), its histogram row (w_count u32) and, for an out-of-range
        // index, that pair's output row; a block from `blocks` on reads 128-byte chunks c <
        // xchunks of x (inside it: xchunks = x.nbytes() / 128) and writes them at c in the
        // scratch's last 128 xchunks bytes; gather_place reads the records and all rows and
        // writes the tile table (at most `tiles` entries) and the pairs' offsets, all inside
        // the scratch.
        unsafe {
            stream
                .launch_builder(k.func_named("gather_count")?)
                .arg(&bt)
                .arg(&entries)
                .arg(&per)
                .arg(&e32)
                .arg(&prec)
                .arg(&phist)
                .arg(&po)
                .arg(&ndim)
                .arg(&out_stride)
                .arg(&b32)
                .arg(&px)
                .arg(&pxp)
                .arg(&xchunks)
                .launch(cfg((count_blocks, 1, 1), 1024, op)?)
        }
        .map_err(driver(op))?;
        // gather_place as gather_count's programmatic dependent (run 19): it launches while
        // gather_count runs and waits for it (griddepcontrol.wait) before reading.
        let (mut a_entries, mut a_per, mut a_e, mut a_t, mut a_tm) = (entries, per, e32, t32, tm32);
        let (mut a_rec, mut a_hist, mut a_grp, mut a_xs, mut a_os) =
            (prec, phist, pg, x_stride, out_stride);
        let place: [*mut std::ffi::c_void; 10] = [
            (&raw mut a_entries).cast(),
            (&raw mut a_per).cast(),
            (&raw mut a_e).cast(),
            (&raw mut a_t).cast(),
            (&raw mut a_tm).cast(),
            (&raw mut a_rec).cast(),
            (&raw mut a_hist).cast(),
            (&raw mut a_grp).cast(),
            (&raw mut a_xs).cast(),
            (&raw mut a_os).cast(),
        ];
        let f = k.func_named("gather_place")?;
        // SAFETY: see gather_count above (the same blocks, after it on the stream); the list
        // matches gather_place's parameters in order and type and outlives the call.
        unsafe { launch_ex(&dev, f, cfg((b32, 1, 1), 1024, op)?, 0, &place, true) }
            .map_err(driver(op))?;
        let w_stride = words_per_matrix;
        if let Some(t) = tile {
            // The tiled GEMM over the same tiles of `tm` pairs (its BM).
            let f = k.func_named(t.entry)?;
            // The persistent form's x map spans x's rows (the permuted copy has x's rows), as
            // TMA's signed 32-bit coordinates; the other grouped tiles read no M.
            let x_rows = x.nbytes() as u64 / (xsize * kdim);
            let m = match i32::try_from(x_rows) {
                _ if !t.pers => 0,
                Ok(r) => r as u32,
                Err(_) => return Err(Error::SizeOverflow { op, what: "x rows" }),
            };
            let args = TileArgs {
                ptrs: [if t.xperm { pxp } else { px }, pw, ps, pb, po],
                m,
                n: u32_of(op, ndim)?,
                k: u32_of(op, kdim)?,
                w_stride,
                s_stride,
                grp: pg,
                w_count,
                partial: 0,
                kseg: 0,
            };
            // The persistent form: at most one block per SM, each looping over the (tile, 128
            // rows) items of the tiles gather_place made (no more than the worst case).
            let nbx = ndim.div_ceil(t.bn);
            let grid = if t.pers {
                let blocks = (nbx * tiles).min(u64::from(dev.multiprocessors()).max(1));
                (grid_x(op, blocks)?, 1, 1)
            } else {
                (grid_x(op, nbx)?, t32, 1)
            };
            // SAFETY: each block (each item of a persistent block) reads its tile's pairs (x
            // rows inside x, expert < w_count: the sort left out-of-range pairs out) and rows
            // < N (clamped) of that expert's W, scales and biases, and writes its pairs'
            // output rows; blocks (items) beyond the tile count exit.
            // The wgmma tiles (sm_90) wait for gather_place with griddepcontrol.wait: launched
            // as its programmatic dependent; the others plainly.
            unsafe {
                launch_tile(
                    &dev,
                    f,
                    t,
                    grid,
                    spec,
                    w.scales_dtype(),
                    &args,
                    x.dtype(),
                    t.wg,
                    op,
                )?
            };
            enc.retain(&s);
            // Recorded by entry name: the tests check which GEMM ran.
            finish(enc, [x, w.packed(), w.scales(), biases, out], job, t.entry);
            return Ok(());
        }
        let (one, seg1, partial) = (1u32, 1u32, 0u64);
        // SAFETY: each block reads its tile's pairs (x rows inside x, expert < w_count) and
        // writes their output rows; blocks beyond the tile count exit.
        unsafe {
            stream
                .launch_builder(k.func_named("qmm_tc_g8")?)
                .arg(&px)
                .arg(&pw)
                .arg(&ps)
                .arg(&pb)
                .arg(&po)
                .arg(&partial)
                .arg(&one)
                .arg(&ndim)
                .arg(&kdim)
                .arg(&seg1)
                .arg(&x_stride)
                .arg(&w_stride)
                .arg(&s_stride)
                .arg(&out_stride)
                .arg(&bt)
                .arg(&pg)
                .launch(cfg((grid_x(op, ndim.div_ceil(128))?, t32, 1), 128, op)?)
        }
        .map_err(driver(op))?;
        enc.retain(&s);
        finish(enc, [x, w.packed(), w.scales(), biases, out], job, &k.name);
        return Ok(());
    }
    if (!fp || decode_shape)
        && job.transpose
        && super::tensor_core_path(&key, dev.arch())
        && knob("MLXQ_DEC_OFF").is_none()
    {
        let bits = u64::from(spec.bits());
        let group = u64::from(spec.group_size());
        let ck = 128 / bits; // codes per 16-byte chunk
        let qc = 4 * ck; // codes per step
        let slots = if group < qc { qc / group } else { 1 };
        let batch_codes = super::dec_steps() * qc;
        let ssize = w.scales_dtype().size() as u64;
        let gather = job.lhs.is_some() || job.rhs.is_some();
        // Shared memory: 64 zero bytes, x as 64 bytes per chunk and token, the group sums of
        // x, 16 rows x 8 tokens of f32 sums per warp (x is read into registers and rearranged
        // from there: no copy of x as loaded).
        // `qmv_decr`: W, scales and biases through a per-warp cp.async ring of 4 batches
        // (16 lanes copy 128 contiguous bytes of one row, stored unpadded and swizzled: 2.5 KB
        // per batch), where the batch's scales are 4, 8 or
        // 16 bytes; by default where N or K >= 8192 (faster there on the H200, slower at
        // 4096x4096: run 4d). MLXQ_DEC_RING=1 forces it, =0 turns it off.
        // The arguments of every decode kernel (`kc`: qmv_decm's x chunk).
        let dec_args = |kc: Option<u32>| -> Result<DecArgs> {
            Ok(DecArgs {
                ptrs: [px, pw, ps, pb, po],
                m: u32::try_from(m).map_err(|_| Error::SizeOverflow { op, what: "rows" })?,
                n: ndim,
                k: kdim,
                kc,
                strides: [x_stride, words_per_matrix, s_stride, out_stride],
                bt,
            })
        };
        let dsb = super::dec_steps() * qc / group * ssize;
        let ring = match knob("MLXQ_DEC_RING") {
            Some("1") => true,
            Some("0") => false,
            _ => ndim.max(kdim) >= 8192,
        } && matches!(dsb, 4 | 8 | 16);
        if let Some(DecbPick {
            entry,
            fallback,
            nc,
            smem: smem_b,
        }) = decb_pick(
            DevCaps::of(&dev),
            m,
            ndim,
            kdim,
            bits,
            group,
            ssize,
            gather,
            fp,
            small_tile && super::nvrtc::wgmma(dev.arch()),
            [pw, ps, pb],
            [words_per_matrix * 4, s_stride * ssize],
        ) {
            let threads = ((nc + 1) * 32) as u32;
            let occupancy = |f: &cudarc::driver::CudaFunction| {
                f.occupancy_max_active_blocks_per_multiprocessor(threads, smem_b as usize, None)
                    .map_err(driver(op))
            };
            let mut f = k.func_named(entry)?;
            let mut per_sm = occupancy(f)?;
            if let Some((other, need)) = fallback {
                if per_sm < need {
                    f = k.func_named(other)?;
                    per_sm = occupancy(f)?;
                }
            }
            let slots = (u64::from(per_sm) * u64::from(dev.multiprocessors())).max(1);
            // Persistent over row tiles: one wave of resident blocks, each with the same
            // number of tiles.
            let row_blocks = ndim.div_ceil(16);
            let per_block = row_blocks.div_ceil((slots / u64::from(gy)).max(1));
            let grid = cfg(
                (grid_x(op, row_blocks.div_ceil(per_block))?, gy, 1),
                threads,
                op,
            )?;
            let args = dec_args(None)?;
            // SAFETY: the parameters match `qmv_decb`'s signature in order and type. It reads
            // rows < M of each x matrix (x_count of them, lhs values checked), rows < N
            // (clamped) of W matrix wi < w_count with their scales and biases (bulk copies of
            // whole 16-byte pieces inside each row: decb_pick checked the alignments), and
            // writes rows < M of each of `entries` output matrices: all inside buffers kept
            // alive by `retain`. As a programmatic dependent it reads only W, scales and
            // biases before waiting for the previous kernel (a qmv_dec, which writes none).
            unsafe { launch_dec(&dev, f, grid, smem_b as u32, args, after_dec) }
                .map_err(driver(op))?;
            dev.swap_last_dec(Some(out_range));
            finish(enc, [x, w.packed(), w.scales(), biases, out], job, &k.name);
            return Ok(());
        }
        if fp {
            // The FP module has no other decode kernel.
            return super::fp::qmm(enc, &dev, op, x, w, out, job, bt, entries);
        }
        if let Some((fi, nw, kc, smem_m)) = decm_pick(
            &dev,
            m,
            ndim,
            kdim,
            u64::from(gy),
            bits,
            group,
            ssize,
            gather,
        ) {
            let f = k.func_named(fi)?;
            let args = dec_args(Some(u32_of(op, kc)?))?;
            let grid = cfg(
                (grid_x(op, ndim.div_ceil(16 * nw))?, gy, 1),
                (nw * 32) as u32,
                op,
            )?;
            // SAFETY: the parameters match `qmv_decm`'s signature in order and type. It reads
            // rows < M of each x matrix (x_count of them, lhs values checked), rows < N
            // (clamped) of W matrix wi < w_count with their scales and biases, and writes rows
            // < M of each of `entries` output matrices: all inside buffers kept alive by
            // `retain`. As a programmatic dependent it reads only W, scales and biases before
            // waiting for the previous kernel (a qmv_dec, which writes none of them).
            unsafe { launch_dec(&dev, f, grid, smem_m as u32, args, after_dec) }
                .map_err(driver(op))?;
            dev.swap_last_dec(Some(out_range));
            finish(enc, [x, w.packed(), w.scales(), biases, out], job, &k.name);
            return Ok(());
        }
        // Ring depth: 6 batches where rows are long (K >= 8192), else 3 (run 10, H200:
        // 4096x14336 15.5 µs against 18.8 with 4; 28672x8192 46.6 against 47.3; 14336x4096
        // 14.9 against 15.6).
        let deep = kdim >= 8192;
        let ring_bytes = if ring {
            dec_ring_bytes(super::dec_steps(), if deep { 6 } else { 3 })
        } else {
            0
        };
        let smem = |wk: u64| {
            64 + m * (kdim / ck) * 64
                + (m * (kdim / group) * 4).div_ceil(16) * 16
                + wk * 512
                + wk * ring_bytes
        };
        // 4-bit only: at 8 bits v1 (M <= 2) and qmv_tc are faster on the H200 (run 4b,
        // docs/perf-cuda.md).
        // 8-bit on the ring kernel only with MLXQ_DEC8=1: slower than v1 on the H200 (run 5d,
        // docs/perf-cuda.md: 30.0 vs 26.2 µs at 14336x4096, 140 vs 85 µs at 28672x8192).
        let dec8 = bits == 8 && ring && group <= qc && knob("MLXQ_DEC8") == Some("1");
        if (bits == 4 || dec8)
            && m * slots <= 8
            && batch_codes.is_multiple_of(group)
            && kdim.is_multiple_of(batch_codes)
            && ps.is_multiple_of(16)
            && pb.is_multiple_of(16)
            && (s_stride * ssize).is_multiple_of(16.min(batch_codes / group * ssize))
            && smem(if ring { 2 } else { 8 }) <= super::DEC_SMEM_MAX as u64
        {
            let row_blocks = ndim.div_ceil(16);
            let blocks = row_blocks * u64::from(gy);
            // Warps per block (K split inside the block): 8 where the grid fits two waves of
            // 8-warp blocks, else 4 (measured best on the H200, run 4b), else the most that
            // fit; MLXQ_DEC_WK forces one (experiments).
            let forced = knob("MLXQ_DEC_WK")
                .and_then(|v| v.parse::<u64>().ok())
                .filter(|v| matches!(v, 1 | 2 | 4 | 8));
            let (mut pick, mut many_waves) = (None, None);
            let table: &[(&str, u64)] = if ring && deep {
                &[("qmv_decr6_4", 4), ("qmv_decr6_2", 2)]
            } else if ring {
                &[("qmv_decr_4", 4), ("qmv_decr_2", 2)]
            } else {
                &[
                    ("qmv_dec_8", 8),
                    ("qmv_dec_4", 4),
                    ("qmv_dec_2", 2),
                    ("qmv_dec_1", 1),
                ]
            };
            for &(i, wk) in table {
                if forced.is_some_and(|f| f != wk) {
                    continue;
                }
                if smem(wk) > super::DEC_SMEM_MAX as u64 {
                    continue;
                }
                let f = k.func_named(i)?;
                let per_sm = f
                    .occupancy_max_active_blocks_per_multiprocessor(
                        (wk * 32) as u32,
                        smem(wk) as usize,
                        None,
                    )
                    .map_err(driver(op))?;
                let waves = match wk {
                    8 => 2,
                    4 => u64::MAX,
                    _ => 1,
                };
                let slots = u64::from(per_sm) * u64::from(dev.multiprocessors());
                let fits = slots.saturating_mul(waves) >= blocks;
                if per_sm > 0 && (fits || forced.is_some()) {
                    pick = Some((f, wk, slots));
                    break;
                }
                if per_sm > 0 && wk == 2 {
                    many_waves = Some((f, wk, slots));
                }
            }
            let pick = pick.or(many_waves);
            if let Some((f, wk, slots)) = pick {
                let args = dec_args(None)?;
                // The ring kernel is persistent over row tiles: one wave of resident blocks,
                // each taking the same number of tiles (MLXQ_DEC_PERSIST=0: a block per tile).
                let blocks_x = if ring && knob("MLXQ_DEC_PERSIST") != Some("0") {
                    let per_block = row_blocks.div_ceil((slots / u64::from(gy)).max(1));
                    row_blocks.div_ceil(per_block)
                } else {
                    row_blocks
                };
                let grid = cfg((grid_x(op, blocks_x)?, gy, 1), (wk * 32) as u32, op)?;
                // SAFETY: the parameters match the kernel's signature in order and type. The
                // kernel reads rows < M of each x matrix (x_count of them, lhs values checked),
                // rows < N (clamped) of W matrix wi < w_count with their scales and biases
                // (K / group per row), and writes rows < M of each of `entries` output
                // matrices: all inside buffers kept alive by `retain`. As a programmatic
                // dependent (only after another qmv_dec) it reads W, scales and biases before
                // waiting for that kernel, which writes none of them.
                unsafe { launch_dec(&dev, f, grid, smem(wk) as u32, args, after_dec) }
                    .map_err(driver(op))?;
                dev.swap_last_dec(Some(out_range));
                finish(enc, [x, w.packed(), w.scales(), biases, out], job, &k.name);
                return Ok(());
            }
        }
    }
    // Prefill: a block-tiled GEMM where its grid covers at least 3/4 of the SMs (one block
    // per SM; up to M = 64, the wgmma tiles' blocks counted with their K segments, session
    // 40). On Hopper, from M = 17: the wgmma kernel whose token tile (256, 128 or 64 tokens x
    // 128 rows) is the narrowest holding M, or a narrower one where that leaves too few blocks
    // (run 8, 4-bit: 4096^3 317 µs against 553 for qmm_tile_l; 14336x4096 at M = 256: 81 µs
    // on 256-token tiles, 109 on 128; at M = 64: 44 on 64-token tiles, 171 on 256, 61 for
    // qmm_tc_8), in its warp-specialised form (`qmm_ws_*`, run 13: 4096^3 225 µs against 316,
    // 8-bit 263 against 393), or the `qmm_wg_*` form where that does not fit. Elsewhere
    // `qmm_tile_l` (256 tokens x 128 rows) from M = 256 (M = 64: 209 µs against 61 for
    // qmm_tc_8; M = 256: 141 against 203). Otherwise the split-K qmm_tc_8.
    // MLXQ_TILE=off|l|m|l5|m6|wg256|wg128|wg64|ws256|ws256s5|ws128|ws64 overrides and
    // MLXQ_WS=0 routes to the `qmm_wg_*` tiles, MLXQ_KSPLIT / MLXQ_KSPLIT_STEPS set their K
    // segments (tile_split) and MLXQ_TILE_MIN_M the first M of this route (experiments).
    // Launches a dense (one W matrix, no gather) tiled GEMM `t` over M x N on the stream;
    // only for a tile that tile_fits (W [N, K]) or wgn_fits (W [K, N]) accepted for this shape.
    // The affine wgmma tiles split K over blockIdx.z where the grid leaves SMs idle
    // (tile_split), into f32 partial sums in the scratch that qmv_n_reduce adds.
    // Returns the name it records: the entry, with "/k" and the segments where K is split.
    let dense_tile = |enc: &mut CommandEncoder, t: &Tile| -> Result<String> {
        let f = k.func_named(t.entry)?;
        let sdt = w.scales_dtype();
        let (gx, gy) = (ndim.div_ceil(t.bn), m.div_ceil(t.bm));
        let (kseg, segments) = if t.wg && !fp {
            tile_split(kdim, gx * gy, u64::from(dev.multiprocessors()), m * ndim)
        } else {
            (0, 1)
        };
        let (partial, scratch) = partial_scratch(&dev, op, segments, m * ndim)?;
        let args = TileArgs {
            ptrs: [px, pw, ps, pb, po],
            m: u32_of(op, m)?,
            n: u32_of(op, ndim)?,
            k: u32_of(op, kdim)?,
            w_stride: words_per_matrix,
            s_stride,
            grp: 0,
            w_count,
            partial,
            kseg,
        };
        let grid = (grid_x(op, gx)?, u32_of(op, gy)?, segments);
        // SAFETY: both callers pass a tile checked for this shape (see them for what it reads
        // and writes); with K split, each block writes its tokens < M and rows < N of its
        // segment's M x N partial sums, inside the segments·M·N floats of scratch. The buffers
        // stay alive through `finish`'s `retain` (the scratch through its own).
        unsafe { launch_tile(&dev, f, t, grid, spec, sdt, &args, x.dtype(), false, op) }?;
        if let Some(s) = scratch {
            let m32 = u32_of(op, m)?;
            reduce_partials(
                enc,
                &stream,
                &k,
                op,
                &s,
                po,
                m,
                ndim,
                segments,
                m * ndim,
                m32,
            )?;
            return Ok(format!("{}/k{segments}", t.entry));
        }
        Ok(t.entry.to_string())
    };
    if (prefill_shape || small_tile) && super::tensor_core_path(&key, dev.arch()) {
        let sms = u64::from(dev.multiprocessors());
        let blocks = |t: &Tile| m.div_ceil(t.bm) * ndim.div_ceil(t.bn);
        let fits = |t: &&Tile| {
            tile_fits(&dev, t, kdim, spec, w.scales_dtype(), [ps, pb, po])
                && m.div_ceil(t.bm) <= 65535
        };
        // Up to M = 64, an affine wgmma tile counts its blocks times its K segments
        // (tile_split), so that a small grid takes the tile in segments rather than qmm_tc_8:
        // session 40, H200, 4-bit, 17 / 32 / 64 x 4096 x 4096 16.7 / 17.6 / 21.2 µs on
        // qmm_tc_8, 14.6 / 14.5 / 15.3 on qmm_ws_64 in 4 segments; 32 x 4096 x 14336 43.2
        // against 35.6; 8-bit, 32 x 4096 x 4096 22.5 against 18.4, 32 x 4096 x 14336 60.2
        // against 46.7. Larger M: not measured.
        let segs = |t: &Tile| {
            if t.wg && !fp && m <= 64 {
                u64::from(tile_split(kdim, blocks(t), sms, m * ndim).1)
            } else {
                1
            }
        };
        let full = |t: &&Tile| 4 * blocks(t) * segs(t) >= 3 * sms;
        let pick = match knob("MLXQ_TILE") {
            Some("off") => None,
            Some("l") => Some(&TILES[0]),
            Some("m") => Some(&TILES[1]),
            Some("l5") => Some(&TILES[3]),
            Some("m6") => Some(&TILES[4]),
            Some("wg256") => Some(&TILES[6]),
            Some("wg128") => Some(&TILES[7]),
            Some("wg64") => Some(&TILES[8]),
            Some("ws256") => Some(&TILES[10]),
            Some("ws256s5") => Some(&TILES[11]),
            Some("ws128") => Some(&TILES[12]),
            Some("ws64") => Some(&TILES[13]),
            _ => {
                // The first wgmma tile to try: 64 tokens for M <= 64, 128 up to 128, else 256;
                // warp-specialised first (unless MLXQ_WS=0), then the plain wgmma tiles.
                // From M = 17 where the tiles fill the SMs (session 39, H200: 17 and 32 x
                // 14336x4096 4-bit 44.9 / 48.7 µs on qmm_tc_8, 36.0 / 33.3 on qmm_ws_64; 8-bit
                // 66.4 / 70.6 against 49.1 / 49.0; 24x28672x8192 163 -> 134 and 251 -> 189;
                // at 4096x4096, 32 blocks, qmm_tc_8 stays: 16.6 against 30.6). Below M = 17
                // only where no decode kernel took the call (`small_tile`).
                let first = match m {
                    0..=64 => Some(2),
                    65..=128 => Some(1),
                    _ => Some(0),
                };
                let ws: &[usize] = if knob("MLXQ_WS") == Some("0") {
                    &[]
                } else {
                    &WS_TILES
                };
                first
                    .and_then(|i| {
                        [ws, &WG_TILES]
                            .into_iter()
                            .filter_map(|set| set.get(i..))
                            .flatten()
                            .map(|&j| &TILES[j])
                            .find(|t| fits(t) && full(t))
                    })
                    .or(Some(&TILES[0]).filter(|t| m >= 256 && full(t)))
            }
        }
        .filter(fits)
        .filter(|t| !fp || t.wg);
        if let Some(t) = pick {
            // The kernel reads rows < M (clamped, or zero-filled by the tensor map) of x, rows
            // < N (clamped) of W with their scales and biases (K / group per row), and writes
            // the M x N output: all inside buffers kept alive by `retain`.
            let ran = dense_tile(enc, t)?;
            let name = format!("{} {ran}", k.name);
            finish(enc, [x, w.packed(), w.scales(), biases, out], job, &name);
            return Ok(());
        }
    }
    // transpose = false (W [K, N]) from wgn_min_m rows of x: the wgmma tile of W [K, N]
    // (`qmm_wgn_*`), of the narrowest token width that holds M, or a narrower one where that
    // leaves under 3/4 of the SMs a block, else the 64-token tile even so (qmv_n re-reads W
    // for every 16 rows of x), with K split where its grid leaves SMs idle (tile_split;
    // session 40, 8 x 4096 x 4096 4-bit 39.3 -> 14.2 µs). MLXQ_TILE=off keeps qmv_n.
    if !fp
        && !job.transpose
        && m >= wgn_min_m(ndim)
        && entries == 1
        && job.lhs.is_none()
        && job.rhs.is_none()
        && super::wgmma_n_path(&key, dev.arch())
        && knob("MLXQ_TILE") != Some("off")
    {
        let sms = u64::from(dev.multiprocessors());
        let fits = |t: &&Tile| {
            wgn_fits(&dev, t, [kdim, ndim], spec, w.scales_dtype(), [ps, pb, po])
                && m.div_ceil(t.bm) <= 65535
        };
        let full = |t: &&Tile| 4 * m.div_ceil(t.bm) * ndim.div_ceil(t.bn) >= 3 * sms;
        let first = match m {
            0..=64 => 2,
            65..=128 => 1,
            _ => 0,
        };
        let narrowest = &TILES[WGN_TILES[2]];
        let pick = WGN_TILES[first..]
            .iter()
            .map(|&j| &TILES[j])
            .find(|t| fits(t) && full(t))
            .or(Some(narrowest).filter(fits));
        if let Some(t) = pick {
            // The kernel reads rows < M (clamped) of x, the K rows of W [K, N] at the block's
            // 128 columns (N % 128 == 0: all inside each row) with the scale and bias units
            // that hold their groups (whole units inside each row: wgn_fits), and writes the
            // M x N output: all inside buffers kept alive by `retain`.
            let ran = dense_tile(enc, t)?;
            // Recorded by entry name: the tests check which path ran.
            finish(enc, [x, w.packed(), w.scales(), biases, out], job, &ran);
            return Ok(());
        }
    }
    if fp {
        // No wgmma tile fits this call (its shared memory, or too few blocks to fill the SMs).
        return super::fp::qmm(enc, &dev, op, x, w, out, job, bt, entries);
    }
    // M = 1, 2 stay on the CUDA-core kernel: measured faster there on the H200 (docs/perf-cuda.md).
    if m >= 3 && super::tensor_core_path(&key, dev.arch()) {
        // M <= 16: qmv_tc (exact codes, scales on the accumulators), 1 or 2 n-tiles of 8
        // tokens; larger M: qmm_tc_8, tiles of 64 tokens. Both: 4 warps of 32 rows per block,
        // and K split over blockIdx.z segments (f32 partial sums in the preallocated scratch,
        // then qmv_n_reduce) until there are enough blocks for the machine.
        let (f, mtiles, decode) = match m {
            0..=8 => (k.func_named("qmv_tc_1")?, 1, true),
            9..=16 => (k.func_named("qmv_tc_2")?, 1, true),
            _ => (k.func_named("qmm_tc_8")?, m.div_ceil(64), false),
        };
        let bits = u64::from(spec.bits());
        let ck = 128 / bits; // codes per 16-byte chunk
        let chunks = kdim / ck;
        // Segments are a multiple of this many chunks (whole groups, whole 4-chunk steps).
        let align = (u64::from(spec.group_size()) / ck).max(4);
        // Dynamic shared memory of qmv_tc: the x rows of one segment, padded (as the kernel).
        let smem = |segs: u64| -> u64 {
            let per = chunks.div_ceil(align * segs) * align;
            if decode {
                m * (per * ck + ck) * xsize
            } else {
                0
            }
        };
        let row_blocks = ndim.div_ceil(128);
        let blocks = row_blocks * u64::from(gy) * mtiles;
        let fit = (super::SCRATCH_BYTES as u64 / (entries * m * ndim * 4).max(1)).max(1);
        let max_segments = (chunks / (2 * align)).clamp(1, 64).min(fit);
        // Fewest segments whose x fits, then as many as fill one wave of resident blocks.
        let mut segments = 1u64;
        while smem(segments) > TC_SMEM_MAX && segments < max_segments {
            segments += 1;
        }
        if smem(segments) > TC_SMEM_MAX {
            return Err(Error::unsupported(
                op,
                format!("K = {kdim} with M = {m} rows of x on the tensor-core path"),
            ));
        }
        let per_sm = f
            .occupancy_max_active_blocks_per_multiprocessor(128, smem(segments) as usize, None)
            .map_err(driver(op))?
            .max(1);
        let slots = u64::from(dev.multiprocessors()) * u64::from(per_sm);
        segments = segments.max((slots / blocks).min(max_segments));
        // The kernels round a segment up to whole alignment units, so the last segments can
        // be empty, and an empty segment writes NaN partial sums (8-bit K = 14336 with 64
        // segments of 16 chunks: 56 cover K). Keep the segments that hold chunks.
        let unit = if decode { align } else { 4 };
        segments = chunks.div_ceil(chunks.div_ceil(unit * segments) * unit);
        let shared = smem(segments) as u32;
        let segments = segments as u32;
        let gz = u64::from(segments) * mtiles;
        if gz > 65535 {
            return Err(Error::SizeOverflow { op, what: "grid" });
        }
        let (partial, scratch) = partial_scratch(&dev, op, segments, entries * m * ndim)?;
        let m32 = u32::try_from(m).map_err(|_| Error::SizeOverflow { op, what: "rows" })?;
        let w_stride = words_per_matrix;
        // SAFETY: the kernel reads rows < M of each x matrix (x_count of them, lhs values
        // checked), rows < N and chunks < K·bits/128 of W matrix wi < w_count with their
        // scales and biases, and writes rows < M of each of `entries` output matrices (or
        // segments·entries·M·N floats of scratch): all inside buffers kept alive by `retain`.
        unsafe {
            stream
                .launch_builder(f)
                .arg(&px)
                .arg(&pw)
                .arg(&ps)
                .arg(&pb)
                .arg(&po)
                .arg(&partial)
                .arg(&m32)
                .arg(&ndim)
                .arg(&kdim)
                .arg(&segments)
                .arg(&x_stride)
                .arg(&w_stride)
                .arg(&s_stride)
                .arg(&out_stride)
                .arg(&bt)
                .arg(&0u64) // no pair grouping
                .launch(LaunchConfig {
                    shared_mem_bytes: shared,
                    ..cfg((grid_x(op, row_blocks)?, gy, gz as u32), 128, op)?
                })
        }
        .map_err(driver(op))?;
        if let Some(s) = scratch {
            let rows = entries * m;
            reduce_partials(
                enc, &stream, &k, op, &s, po, rows, ndim, segments, out_stride, m32,
            )?;
        }
        finish(enc, [x, w.packed(), w.scales(), biases, out], job, &k.name);
        return Ok(());
    }
    for m0 in (0..m).step_by(16) {
        let mt = (m - m0).min(16) as u32;
        let tile = mt.next_power_of_two().trailing_zeros() as usize; // 0..=4
        let xt = px + m0 * kdim * xsize;
        let ot = po + m0 * ndim * osize;
        if job.transpose {
            let f = k.func_named(["qmv_t_1", "qmv_t_2", "qmv_t_4", "qmv_t_8", "qmv_t_16"][tile])?;
            let w_stride = words_per_matrix;
            let gx = grid_x(op, ndim.div_ceil(8))?;
            // SAFETY: the kernel reads x rows m0..m0+mt of each x matrix (x_count of them,
            // checked bounds on lhs values), W rows < N of matrix wi < w_count, and writes
            // rows m0..m0+mt of each of `entries` output matrices: all inside the buffers,
            // which `retain` keeps alive.
            unsafe {
                stream
                    .launch_builder(f)
                    .arg(&xt)
                    .arg(&pw)
                    .arg(&ps)
                    .arg(&pb)
                    .arg(&ot)
                    .arg(&mt)
                    .arg(&ndim)
                    .arg(&kdim)
                    .arg(&x_stride)
                    .arg(&w_stride)
                    .arg(&s_stride)
                    .arg(&out_stride)
                    .arg(&bt)
                    .launch(cfg((gx, gy, 1), 128, op)?)
            }
            .map_err(driver(op))?;
        } else {
            let f = k.func_named(["qmv_n_1", "qmv_n_2", "qmv_n_4", "qmv_n_8", "qmv_n_16"][tile])?;
            let w_stride = words_per_matrix * 4; // bytes
            let (cpt, uk) = qmvn_shape(mt.next_power_of_two(), u64::from(spec.bits()));
            let gx = grid_x(op, ndim.div_ceil(32 * cpt))?;
            let blocks = u64::from(gx) * u64::from(gy);
            // K is split over blockIdx.z segments until the blocks fill the machine's resident
            // slots (as many blocks per multiprocessor as the registers allow, at most
            // QMVN_BLOCKS_PER_SM or MLXQ_QMVN_PER_SM); a segment is whole passes of the block's
            // 8 warps over their UK rows each.
            let pass = 8 * uk;
            let cap = knob("MLXQ_QMVN_PER_SM")
                .and_then(|v| v.parse::<u64>().ok())
                .filter(|v| (1..=8).contains(v))
                .unwrap_or(QMVN_BLOCKS_PER_SM);
            let per_sm = f
                .occupancy_max_active_blocks_per_multiprocessor(256, 0, None)
                .map_err(driver(op))?;
            let per_sm = u64::from(per_sm).clamp(1, cap);
            let want = (per_sm * u64::from(dev.multiprocessors())).div_ceil(blocks);
            let fit =
                (super::SCRATCH_BYTES as u64 / (entries * u64::from(mt) * ndim * 4).max(1)).max(1);
            let segments = want.clamp(1, kdim.div_ceil(pass).max(1)).min(64).min(fit);
            let k_per_segment = kdim.div_ceil(segments).div_ceil(pass) * pass;
            let segments = kdim.div_ceil(k_per_segment) as u32;
            let rows_total = entries * u64::from(mt);
            let (partial, scratch) = partial_scratch(&dev, op, segments, rows_total * ndim)?;
            // SAFETY: as above; partial sums go to scratch of segments·entries·mt·N floats.
            unsafe {
                stream
                    .launch_builder(f)
                    .arg(&xt)
                    .arg(&pw)
                    .arg(&ps)
                    .arg(&pb)
                    .arg(&ot)
                    .arg(&partial)
                    .arg(&mt)
                    .arg(&ndim)
                    .arg(&kdim)
                    .arg(&k_per_segment)
                    .arg(&x_stride)
                    .arg(&w_stride)
                    .arg(&s_stride)
                    .arg(&out_stride)
                    .arg(&bt)
                    .launch(cfg((gx, gy, segments), 256, op)?)
            }
            .map_err(driver(op))?;
            if let Some(s) = scratch {
                reduce_partials(
                    enc, &stream, &k, op, &s, ot, rows_total, ndim, segments, out_stride, mt,
                )?;
            }
        }
    }
    finish(enc, [x, w.packed(), w.scales(), biases, out], job, &k.name);
    Ok(())
}

/// The grouped wgmma tile (an index into [`TILES`]) for `pairs` (token, expert) pairs over
/// `experts` W matrices. Each tile of BT pairs of one expert dequantises that expert's rows
/// once (cost D) and runs BT wgmma columns (BT / 64 units), so an expert of c pairs costs
/// ceil(c / BT) * (D + BT / 64). Run 16's A/B of the 64- and 128-pair tiles at 512 tokens
/// (top-8 of 64) gives D = 0.75 at 4 bits and 1.7 at 8 (twice the code bytes, and bf16
/// cannot hold an 8-bit code plus the magic, so those go through f32). With the pairs spread
/// evenly, c is about mu = pairs / experts with a spread of sqrt(mu): the width is chosen for
/// c = mu + sqrt(mu), so that most experts fit in one tile when they can.
fn gather_tile(pairs: u64, experts: u64, bits: u32) -> usize {
    let mu = pairs as f64 / experts.max(1) as f64;
    let c = mu + mu.sqrt();
    let d = if bits == 8 { 1.7 } else { 0.75 };
    let cost = |i: usize| {
        let bt = TILES[i].bm as f64;
        (c / bt).ceil().max(1.0) * (d + bt / 64.0)
    };
    // The 64-, 80- and 128-pair tiles; the narrowest of equal cost.
    [9, 16, 15]
        .into_iter()
        .min_by(|&a, &b| cost(a).total_cmp(&cost(b)))
        .unwrap_or(9)
}

/// One shape of the tiled prefill GEMM (`QMM_TILE` entries in `qmm_tile.cu`, `QMM_WG` entries
/// in `qmm_wg.cu`).
struct Tile {
    /// Entry point name (`qmm_tile_*` in `qmm_tile.cu`, `qmm_wg_*` in `qmm_wg.cu`).
    entry: &'static str,
    /// Tokens per block.
    bm: u64,
    /// Rows of W per block.
    bn: u64,
    threads: u32,
    stages: u64,
    /// A wgmma kernel (`qmm_wg.cu`): sm_90a only, K a multiple of 128, W dequantised in
    /// registers (no shared W tiles).
    wg: bool,
    /// A warp-specialised wgmma kernel (`qmm_ws_*`): a producer warpgroup, mbarriers after the
    /// rings, and TMA tensor maps of x (dense) and of the codes as the last two parameters.
    ws: bool,
    /// The gather's persistent grouped form (`qmm_ws_g*`, `qmm_wsg_impl`): at most one block
    /// per SM, each looping over (pair tile, 128 rows) items, its output tile beside the ring.
    pers: bool,
    /// Reads x with each step's 64 values of K permuted (`qmm_wsp_g80`, affine 4-bit): the
    /// sort's `gather_count` writes that copy of x into the scratch.
    xperm: bool,
}

/// qmm_tile_l, _m, _g, _l5, _m6, _g6, as in `qmm_tile.cu`; then qmm_wg_256, _128, _64 and the
/// grouped _g64 as in `qmm_wg.cu` (BT tokens x 128 rows per block, 256 threads); then the
/// warp-specialised qmm_ws_256, _256s5, _128, _64 and the persistent grouped _g80 (384
/// threads); then the grouped wgmma tiles of 128 and 80 pairs (`gather_tile` picks among _g64,
/// _g80 and _g128), the transposed `qmm_wgn_*`, and the persistent grouped qmm_wsp_g80 on x
/// permuted by the sort (affine 4-bit), and its form with three consumer warpgroups (192 rows
/// an item, 512 threads: `qmm_wsp3_g80`), and `qmm_wsp_g80`'s form that takes x by TMA for
/// items of at most 4 pairs (`qmm_wspt_g80`).
const TILES: [Tile; 23] = [
    tile("qmm_tile_l", 256, 128, 256, 4),
    tile("qmm_tile_m", 128, 128, 512, 4),
    tile("qmm_tile_g", 64, 128, 256, 4),
    tile("qmm_tile_l5", 256, 128, 256, 5),
    tile("qmm_tile_m6", 128, 128, 512, 6),
    tile("qmm_tile_g6", 64, 128, 256, 6),
    wg_tile("qmm_wg_256", 256, 4),
    wg_tile("qmm_wg_128", 128, 6),
    wg_tile("qmm_wg_64", 64, 6),
    wg_tile("qmm_wg_g64", 64, 6),
    ws_tile("qmm_ws_256", 256, 4),
    ws_tile("qmm_ws_256s5", 256, 5),
    ws_tile("qmm_ws_128", 128, 6),
    ws_tile("qmm_ws_64", 64, 6),
    wsg_tile("qmm_ws_g80", 80, 10),
    wg_tile("qmm_wg_g128", 128, 6),
    wg_tile("qmm_wg_g80", 80, 4),
    wg_tile("qmm_wgn_256", 256, 4),
    wg_tile("qmm_wgn_128", 128, 6),
    wg_tile("qmm_wgn_64", 64, 6),
    Tile {
        xperm: true,
        ..wsg_tile("qmm_wsp_g80", 80, 10)
    },
    Tile {
        xperm: true,
        bn: 192,
        threads: 512,
        ..wsg_tile("qmm_wsp3_g80", 80, 10)
    },
    Tile {
        xperm: true,
        ..wsg_tile("qmm_wspt_g80", 80, 10)
    },
];

/// The persistent grouped form ([`Tile::pers`]) that serves a sorted gather of `bits`-wide
/// affine codes in place of `gather_tile`'s grouped wgmma tile: at 4 bits `qmm_wsp_g80` on x
/// permuted by the sort, or `qmm_ws_g80` where `xperm` is false, whatever that tile's width
/// (their items run wgmmas as wide as their pairs, so the 80-pair tiles serve every count). Measured at 4
/// bits (H100, top-8 of 64 × 2048², graph µs): 512 / 1024 tokens 134.9 → 125.3, 248.4 →
/// 235.8 over `qmm_wg_g80` (session 61), and 128 / 256 tokens 130.7 → 108.5, 131.6 → 111.4
/// over `qmm_wg_g64` (session 64). 8-bit gathers lose on it (189.7 → 193.4, 353.7 → 371.6;
/// likely because the wgmma tile runs 16 warps per SM in two blocks against this form's 8
/// consumer warps, not measured), and the FP modes do not gain (512 tokens: mxfp4 146.3 →
/// 159.6, nvfp4 176.3 → 173.6).
///
/// With `tx` = Some(pairs) over `experts`, at most [`TX_PAIRS`] pairs per expert on average
/// take `qmm_wspt_g80`, which copies x by TMA for items of at most 4 pairs and skips the
/// consumers' proxy fence there. Session 66 (same shapes, graph µs, against `qmm_wsp_g80`): 16
/// tokens (2 pairs per expert) 95.0 → 84.7, 32 106.1 → 97.4, 64 104.9 → 102.1, 128 (16 per
/// expert) 107.5 → 105.8, but 512 (64 per expert) 113.8 → 116.1, where almost no item is that
/// small and the second path costs.
fn gather_ws(bits: u32, affine: bool, xperm: bool, tx: Option<u64>, experts: u64) -> Option<usize> {
    let few = tx.is_some_and(|pairs| pairs <= TX_PAIRS.saturating_mul(experts));
    (bits == 4 && affine).then_some(match (xperm, few) {
        (false, _) => 14,
        (true, false) => 20,
        (true, true) => 22,
    })
}

/// The most pairs per expert on average for which [`gather_ws`] takes `qmm_wspt_g80`
/// (session 66, top-8 of 64 × 2048²: it gains at 2 to 16, and at 32 (256 tokens) is level or
/// slower, 110.7–111.3 µs against 110.2–110.5).
const TX_PAIRS: u64 = 16;

/// 128-byte chunks of x that each extra block of `gather_count` permutes for `qmm_wsp_g80`
/// (`XPB` in qmm_tc.cu): 64 of its 1024 threads, so that 2 MB of x (512 tokens, K = 2048)
/// spread over 256 blocks, two per SM.
const XPB: u64 = 64;

/// The wgmma tiles of [`TILES`] for W `[K, N]` (transpose = false, `qmm_wgn_*`), widest first.
const WGN_TILES: [usize; 3] = [17, 18, 19];

/// Fewest rows of x for which transpose = false takes the wgmma tiles (`qmm_wgn_*`) rather
/// than `qmv_n`: 8, or 4 where N >= 8192 (`MLXQ_WGN_MIN_M` sets one for every N:
/// experiments). Session 39 on the H200, 4-bit: the 64-token tile takes ~40 µs at K = 4096
/// for any N up to one wave of blocks; `qmv_n` 84 µs at 4×14336×4096 and 252 at 8×, but 51 at
/// 8×4096×4096 (docs/perf-cuda.md session 39).
fn wgn_min_m(ndim: u64) -> u64 {
    knob("MLXQ_WGN_MIN_M")
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(if ndim >= 8192 { 4 } else { 8 })
}

/// How a dense wgmma tile of `blocks` blocks over K = `kdim` splits K: (steps of 64 per
/// segment, segments), (0, 1) for no split. Where the grid leaves over half of the `sms`
/// multiprocessors idle, K is split into as many segments as give each SM one block, each an
/// even count of steps (at least MLXQ_KSPLIT_STEPS, 8 by default), as far as the segments'
/// `out` = M·N f32 partial sums fit the scratch. Session 40 (H200, 4-bit, 32 blocks): 4
/// segments (128 blocks) 14.2 µs, 8 (256 blocks, two per SM) 14.5, 3 17.7, 2 23.1, none 39.3;
/// 112 blocks: none 39.6, 2 or 3 segments 40.6-42.0. MLXQ_KSPLIT sets the number of segments
/// (experiments; 1: no split).
fn tile_split(kdim: u64, blocks: u64, sms: u64, out: u64) -> (u32, u32) {
    let steps = kdim / 64;
    let min_steps = knob("MLXQ_KSPLIT_STEPS")
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(8)
        .max(2);
    let fit = super::SCRATCH_BYTES as u64 / (out * 4).max(1);
    let most = (steps / min_steps).min(fit).clamp(1, 64);
    let want = match knob("MLXQ_KSPLIT").and_then(|v| v.parse::<u64>().ok()) {
        Some(v) => v,
        None => sms / blocks.max(1),
    };
    let segs = want.clamp(1, most);
    if segs <= 1 {
        return (0, 1);
    }
    let kseg = steps.div_ceil(segs).next_multiple_of(2);
    let segments = steps.div_ceil(kseg);
    if segments <= 1 {
        return (0, 1);
    }
    // Both fit u32: kseg <= steps <= K / 64, segments <= 64.
    (kseg as u32, segments as u32)
}

/// The wgmma tiles of [`TILES`] for one W matrix, widest token tile first.
const WG_TILES: [usize; 3] = [6, 7, 8];
/// The warp-specialised wgmma tiles of [`TILES`] for one W matrix, widest first: the default
/// on sm_90a (docs/perf-cuda.md run 13), [`WG_TILES`] with `MLXQ_WS=0`; the 5-stage
/// 256-token tile only with `MLXQ_TILE=ws256s5` (run 13: no faster than 4 stages).
const WS_TILES: [usize; 3] = [10, 12, 13];

const fn ws_tile(entry: &'static str, bm: u64, stages: u64) -> Tile {
    Tile {
        ws: true,
        threads: 384,
        ..wg_tile(entry, bm, stages)
    }
}

const fn wsg_tile(entry: &'static str, bm: u64, stages: u64) -> Tile {
    Tile {
        pers: true,
        ..ws_tile(entry, bm, stages)
    }
}

const fn wg_tile(entry: &'static str, bm: u64, stages: u64) -> Tile {
    Tile {
        wg: true,
        ..tile(entry, bm, 128, 256, stages)
    }
}

const fn tile(entry: &'static str, bm: u64, bn: u64, threads: u32, stages: u64) -> Tile {
    Tile {
        entry,
        bm,
        bn,
        threads,
        stages,
        wg: false,
        ws: false,
        pers: false,
        xperm: false,
    }
}

impl Tile {
    /// Bytes of one step's scale (or bias) unit per row: the step's groups, at least 4.
    fn unit(spec: QuantSpec, sdt: DType) -> u64 {
        let need = (64 / u64::from(spec.group_size())).max(1);
        (need * sdt.size() as u64).max(4)
    }
    /// Dynamic shared memory: the x, code and scale rings, and two dequantised W tiles
    /// (`qmm_tile`) or 1 KiB to align the x ring to the 128-byte swizzle's period (`qmm_wg`),
    /// plus two mbarriers per stage (`qmm_ws`) and the output tile (BT rows of 128 16-bit
    /// outputs, padded by 16 bytes) where persistent.
    fn smem(&self, _k: u64, spec: QuantSpec, sdt: DType) -> u64 {
        let cb = 64 * u64::from(spec.bits()) / 8;
        // Scale and bias units per row (affine), scale codes only (FP: `WG_NU` in qmm_wg.cu).
        let units = if spec.mode() == QuantMode::Affine {
            2
        } else {
            1
        };
        let rings =
            self.stages * (self.bm * 128 + self.bn * cb + self.bn * Tile::unit(spec, sdt) * units);
        let bars = if self.ws { 16 * self.stages } else { 0 };
        // The persistent form's output tile and its zero word (`zs` in `qmm_wsg_impl`).
        let out_tile = if self.pers {
            self.bm * (self.bn * 2 + 16) + 16
        } else {
            0
        };
        // wgmma tiles: 1 KiB to align the x ring, then the output offsets of BM pairs.
        rings
            + bars
            + out_tile
            + if self.wg {
                1024 + 8 * self.bm
            } else {
                2 * self.bn * 128
            }
    }
}

/// Whether the tiled GEMM serves this shape: K in whole steps of 64 (pairs of steps for the
/// wgmma tiles, which run only where the module was compiled for sm_90a), each row's scales
/// a whole number of copy units, pointers aligned for the copies and the paired output
/// stores, and the rings within the device's shared memory.
fn tile_fits(
    dev: &CudaDevice,
    t: &Tile,
    kdim: u64,
    spec: QuantSpec,
    sdt: DType,
    [ps, pb, po]: [u64; 3],
) -> bool {
    let unit = Tile::unit(spec, sdt);
    let g = kdim / u64::from(spec.group_size());
    kdim.is_multiple_of(64)
        && (g * sdt.size() as u64).is_multiple_of(unit)
        && ps.is_multiple_of(unit)
        && pb.is_multiple_of(unit)
        && po.is_multiple_of(4)
        && t.smem(kdim, spec, sdt) <= dev.smem_optin as u64
        && (!t.wg || (super::nvrtc::wgmma(dev.arch()) && kdim.is_multiple_of(128)))
}

/// Whether a `qmm_wgn_*` tile serves W `[K, N]` (transpose = false): whole 128-column blocks,
/// K in pairs of steps, each of W's rows holding whole scale units of the block's groups
/// (`WGN_U` in qmm_wg.cu: 128 / group scales, at least 4 bytes) with the scale and bias
/// pointers aligned to them, and the rings within the device's shared memory (no more than
/// the `[N, K]` tile's: [`Tile::smem`]).
fn wgn_fits(
    dev: &CudaDevice,
    t: &Tile,
    [kdim, ndim]: [u64; 2],
    spec: QuantSpec,
    sdt: DType,
    [ps, pb, po]: [u64; 3],
) -> bool {
    let g = u64::from(spec.group_size());
    let unit = (128 / g * sdt.size() as u64).max(4);
    t.wg && ndim.is_multiple_of(128)
        && kdim.is_multiple_of(128)
        && (ndim / g * sdt.size() as u64).is_multiple_of(unit)
        && ps.is_multiple_of(unit)
        && pb.is_multiple_of(unit)
        && po.is_multiple_of(4)
        && t.smem(kdim, spec, sdt) <= dev.smem_optin as u64
        && super::nvrtc::wgmma(dev.arch())
}

/// The parameters of a tiled prefill GEMM (`qmm_tile_*`, `qmm_wg_*`, `qmm_ws_*`), in the
/// kernels' order: x, W, scales, biases and output pointers, M, N, K, the W and scale strides
/// of one matrix, the gather's tile list (0 when dense).
struct TileArgs {
    ptrs: [u64; 5],
    m: u32,
    n: u32,
    k: u32,
    w_stride: u64,
    s_stride: u64,
    grp: u64,
    /// W matrices in the W buffer (the tensor map of the codes spans them all).
    w_count: u64,
    /// The wgmma tiles' split K: f32 partial sums (segments·M·N, segment blockIdx.z), used
    /// where `kseg` (steps of 64 per segment) is not 0.
    partial: u64,
    kseg: u32,
}

/// A TMA tensor map (`CUtensorMap`), passed by value as the `qmm_ws` kernels' last parameter.
#[repr(C, align(64))]
struct TensorMap(sys::CUtensorMap);

// SAFETY: 128 plain bytes, 64-byte aligned: the layout of the kernels' `TensorMap` parameter.
unsafe impl DeviceRepr for TensorMap {}

/// A tensor map over the `R`-dimensional array at `ptr` (16-byte aligned; `dims` innermost
/// first, `strides` in bytes for every dimension but the innermost) read in boxes of `boxes`
/// elements, 128-byte swizzled or packed; elements past the array read as zeros.
fn tensor_map<const R: usize>(
    op: &'static str,
    ptr: u64,
    ty: sys::CUtensorMapDataType,
    dims: [u64; R],
    strides: &[u64],
    boxes: [u32; R],
    swizzle: bool,
) -> Result<TensorMap> {
    use sys::{
        CUtensorMapFloatOOBfill as O, CUtensorMapInterleave as I, CUtensorMapL2promotion as L,
        CUtensorMapSwizzle as Z,
    };
    if strides.len() + 1 != R {
        let expected = format!("{} strides (one per outer dimension)", R.saturating_sub(1));
        return Err(Error::invalid(op, "tensor map", expected, strides.len()));
    }
    let unit = [1u32; R];
    let sw = if swizzle {
        Z::CU_TENSOR_MAP_SWIZZLE_128B
    } else {
        Z::CU_TENSOR_MAP_SWIZZLE_NONE
    };
    // SAFETY: a plain-old-data struct that cuTensorMapEncodeTiled fills in.
    let mut map = TensorMap(unsafe { std::mem::zeroed() });
    // SAFETY: dims, boxes and unit have R entries, strides R - 1; the function only encodes
    // the description (it does not touch the memory at ptr).
    unsafe {
        sys::cuTensorMapEncodeTiled(
            &mut map.0,
            ty,
            R as u32,
            ptr as *mut std::ffi::c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxes.as_ptr(),
            unit.as_ptr(),
            I::CU_TENSOR_MAP_INTERLEAVE_NONE,
            sw,
            L::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            O::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    }
    .result()
    .map_err(driver(op))?;
    Ok(map)
}

/// Launches tile `t` with `args` over `grid` on the device's stream (as the previous
/// kernel's programmatic dependent where `pdl`: only for entries that wait for it with
/// griddepcontrol.wait before reading, the grouped wgmma tiles). A warp-specialised tile also
/// gets two tensor maps: x's, of x [M, K] in `x_dtype` in boxes of 64 columns x BT rows (the
/// persistent gather's: 1 row, a pair's, M being x's rows) in the 128-byte swizzle that its
/// wgmma descriptors expect; and the codes', bytes x rows x matrices in boxes of one step's
/// bytes (64 codes) x 128 rows.
///
/// # Safety
/// The pointers and sizes of `args` must describe live device buffers that the kernel may
/// read and write as its signature says (`qmm_tile.cu`, `qmm_wg.cu`).
#[allow(clippy::too_many_arguments)]
unsafe fn launch_tile(
    dev: &CudaDevice,
    f: &cudarc::driver::CudaFunction,
    t: &Tile,
    grid: (u32, u32, u32),
    spec: QuantSpec,
    sdt: DType,
    args: &TileArgs,
    x_dtype: DType,
    pdl: bool,
    op: &'static str,
) -> Result<()> {
    use sys::CUtensorMapDataType as D;
    let [px, pw, ps, pb, po] = &args.ptrs;
    let (m, k) = (u64::from(args.m), u64::from(args.k));
    let mut x_map = if t.ws {
        let ty = match x_dtype {
            DType::BF16 => D::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
            DType::F16 => D::CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
            other => return Err(Error::dtype(op, "x", "float16 or bfloat16", other)),
        };
        let rows = if t.pers { 1 } else { t.bm as u32 };
        Some(tensor_map(op, *px, ty, [k, m], &[k * 2], [64, rows], true)?)
    } else {
        None
    };
    let mut w_map = if t.ws {
        let row = k * u64::from(spec.bits()) / 8;
        let dims = [row, u64::from(args.n), args.w_count.max(1)];
        let boxes = [64 * spec.bits() / 8, t.bn as u32, 1];
        let ty = D::CU_TENSOR_MAP_DATA_TYPE_UINT8;
        Some(tensor_map(
            op,
            *pw,
            ty,
            dims,
            &[row, args.w_stride * 4],
            boxes,
            false,
        )?)
    } else {
        None
    };
    let [mut px, mut pw, mut ps, mut pb, mut po] = [*px, *pw, *ps, *pb, *po];
    let (mut m, mut n, mut k) = (args.m, args.n, args.k);
    let (mut ws, mut ss, mut grp) = (args.w_stride, args.s_stride, args.grp);
    let (mut partial, mut kseg) = (args.partial, args.kseg);
    // The parameters' addresses (no allocation per launch): 11 scalars, the wgmma tiles' split
    // K (2), then the `qmm_ws` entries' two maps.
    let mut list: [*mut std::ffi::c_void; 15] = [
        (&raw mut px).cast(),
        (&raw mut pw).cast(),
        (&raw mut ps).cast(),
        (&raw mut pb).cast(),
        (&raw mut po).cast(),
        (&raw mut m).cast(),
        (&raw mut n).cast(),
        (&raw mut k).cast(),
        (&raw mut ws).cast(),
        (&raw mut ss).cast(),
        (&raw mut grp).cast(),
        (&raw mut partial).cast(),
        (&raw mut kseg).cast(),
        std::ptr::null_mut(),
        std::ptr::null_mut(),
    ];
    let mut len = if t.wg { 13 } else { 11 };
    if let (Some(xm), Some(wm)) = (&mut x_map, &mut w_map) {
        list[13] = (xm as *mut TensorMap).cast();
        list[14] = (wm as *mut TensorMap).cast();
        len = 15;
    }
    let smem = t.smem(u64::from(args.k), spec, sdt) as u32;
    // SAFETY: the caller's contract; the list matches the entry's signature in order and type
    // (the tensor maps only for the `qmm_ws` entries, passed by value) and outlives the call.
    unsafe { launch_ex(dev, f, cfg(grid, t.threads, op)?, smem, &list[..len], pdl) }
        .map_err(driver(op))?;
    Ok(())
}

fn u32_of(op: &'static str, v: u64) -> Result<u32> {
    u32::try_from(v).map_err(|_| Error::SizeOverflow {
        op,
        what: "matrix size",
    })
}

/// Ends a matmul launch: keeps every buffer it reads or writes (the index tensors of a
/// gather included) alive until the encoder's work completes, and records the kernel.
pub(super) fn finish<const B: usize>(
    enc: &mut CommandEncoder,
    bufs: [&Buffer; B],
    job: &MatmulJob<'_>,
    name: &str,
) {
    for b in bufs
        .into_iter()
        .chain([job.lhs, job.rhs].into_iter().flatten())
    {
        enc.retain(b);
    }
    enc.record(name);
}

/// The arguments of `qmv_dec*` / `qmv_decr*` and `qmv_decm*`, in their signature's order: the
/// pointers x, W, scales, biases, out; M, N, K; the x chunk (`qmv_decm` only); the strides of
/// x, W, scales and out; the batch.
struct DecArgs {
    ptrs: [u64; 5],
    m: u32,
    n: u64,
    k: u64,
    kc: Option<u32>,
    strides: [u64; 4],
    bt: Batch,
}

/// [`launch_ex`] of a decode kernel with `a` as its arguments.
///
/// # Safety
/// `f` takes exactly the parameters [`DecArgs`] lists (with `kc` where `a.kc` is set), and
/// the memory behind the pointers holds what the kernel reads and writes for these sizes
/// until it completes.
unsafe fn launch_dec(
    dev: &CudaDevice,
    f: &cudarc::driver::CudaFunction,
    cfg: LaunchConfig,
    shared: u32,
    mut a: DecArgs,
    pdl: bool,
) -> std::result::Result<(), cudarc::driver::DriverError> {
    let [px, pw, ps, pb, po] = &mut a.ptrs;
    let [xs, ws, ss, os] = &mut a.strides;
    let mut kc = a.kc.unwrap_or(0);
    let head: [*mut std::ffi::c_void; 8] = [
        (px as *mut u64).cast(),
        (pw as *mut u64).cast(),
        (ps as *mut u64).cast(),
        (pb as *mut u64).cast(),
        (po as *mut u64).cast(),
        (&raw mut a.m).cast(),
        (&raw mut a.n).cast(),
        (&raw mut a.k).cast(),
    ];
    let tail: [*mut std::ffi::c_void; 5] = [
        (xs as *mut u64).cast(),
        (ws as *mut u64).cast(),
        (ss as *mut u64).cast(),
        (os as *mut u64).cast(),
        (&raw mut a.bt).cast(),
    ];
    let mut list = [std::ptr::null_mut(); 14];
    list[..8].copy_from_slice(&head);
    let mut len = 8;
    if a.kc.is_some() {
        list[8] = (&raw mut kc).cast();
        len = 9;
    }
    list[len..len + 5].copy_from_slice(&tail);
    len += 5;
    // SAFETY: the caller's contract; every pointer in `list` points into `a` or `kc`, which
    // outlive the launch call (the driver copies the values).
    unsafe { launch_ex(dev, f, cfg, shared, &list[..len], pdl) }
}

/// Shared memory of one warp's cp.async ring in the decode kernels (`RS` x `RSTAGE` in
/// `qmv_dec.cu`): `rs` batches, each 16 rows x `su` steps x 64 bytes of codes (unpadded) and
/// 16 bytes of scales and 16 of biases per row.
fn dec_ring_bytes(su: u64, rs: u64) -> u64 {
    rs * (16 * su * 64 + 2 * 16 * 16)
}

/// `qmv_decb` (W by bulk copies into a block-wide ring, sm_90) for this decode matmul (M
/// tokens, W `[N, K]`), or None where it cannot serve it or is not chosen: the entry point,
/// consumer warps per block and dynamic shared memory. `ptrs` are W, scales and biases;
/// `strides` the bytes between matrices of W and of scales.
///
/// The measured rule (H200, `docs/perf-cuda.md` runs 11, 14, 17, 20, 21), dense calls:
/// - 8-bit, every M it serves in one n-tile (M * slots <= 8: up to 8 tokens at groups of 64;
///   8x14336x4096 36 µs against 56 on qmv_tc);
/// - 4-bit M <= 4 where N >= 8192 (M <= 2: N >= 6144), with 4 consumer warps and 3 stages
///   (14336x4096: 12.8 µs against 14.9 on qmv_decr; H100, session 58: 6144x4096 7.4 against
///   9.7 on qmv_dec), and where the row tiles do not fill the SMs or M >= 3
///   (4x4096x4096: 8.3 µs against 22.4 on qmv_decm);
/// - 4-bit group 64 at M = 5..8 on one group-pure n-tile (`_g1`; the slotted form's two
///   n-tiles before session 56), and at M = 9..16 where N >= 4096 on two (`_g2`; H100, graph
///   µs, session 56: 8x14336x4096 20.4 against 26.9 on two slotted n-tiles, 16x14336x4096
///   26.0 against 46.4 on four and 39.0 on the 64-token wgmma tile, 16x4096x4096 14.6
///   against the tile's 15.6, where four slotted n-tiles lost, 18.4 against 16.0). x's
///   M x K x 2 bytes of shared memory bound K: 16x4096x14336 and 16x28672x8192 stay on the
///   tile. With MLXQ_DECB_GP=0 (the slotted n-tiles), M >= 14 goes to the wgmma tile where
///   the device has wgmma (session 47), and M = 9..13 takes four n-tiles only where N >= 8192.
///   M = 3..4 takes the group-pure one n-tile too ([`GP34_DEFAULT`]; MLXQ_DECB_GP34=0 keeps
///   the slotted one: session 60, H100, 4x14336x4096 18.75 against 17.42 µs).
///
/// Every route but the 4-consumer one takes 8 consumer warps and a 2-stage ring (run 21: 2
/// stages beat 3 and 4 at each shape measured, 8-bit 4096x14336 24.0 µs against 31.8), but
/// the group-pure one n-tile (4-bit M = 5..8), which takes 4 stages at N >= 8192 where they
/// fit (session 57, H100: 8x14336x4096 18.9 µs against 20.1 on 2 stages).
/// MLXQ_DECB_T2=0 / MLXQ_DECB_T4=0 leave the n-tiles to the older kernels.
/// Elsewhere (4-bit, 2048 < N < 6144, M <= 2) qmv_dec / qmv_decr stay faster (4096x14336: 15.5 µs
/// against 17.8). MLXQ_DECB=1 takes it wherever it can serve (gathers and M up to 8 / slots
/// included), =0 never; MLXQ_DECB_NC=4|8 and MLXQ_DECB_NS set its consumer warps and ring
/// stages (experiments).
///
/// `tile_after`: the call would next try qmm's 64-token wgmma tile (its `small_tile` route on
/// a device with wgmma), which takes 4-bit M >= 14 from the slotted four n-tiles.
///
/// FP weights (`fp`: the FP module's `qmv_decb`, one token per mma column) take it for every
/// M and gather it can serve: 4 consumers x 3 stages at 4 bits where M <= 4 and N >= 8192 or
/// M = 1 and K < 8192, and where 8 consumers do not divide K; 8 x 2 otherwise (session 35,
/// mxfp4 M = 1: 4096x4096 7.4 µs against 7.8 on 8 x 2, 14336x4096 16.3 against 19.1,
/// 4096x14336 22.0 against 18.6).
#[allow(clippy::too_many_arguments)]
fn decb_pick(
    dev: DevCaps,
    m: u64,
    ndim: u64,
    kdim: u64,
    bits: u64,
    group: u64,
    ssize: u64,
    gather: bool,
    fp: bool,
    tile_after: bool,
    ptrs: [u64; 3],
    strides: [u64; 2],
) -> Option<DecbPick> {
    let everywhere = match knob("MLXQ_DECB") {
        Some("0") => return None,
        Some("1") => true,
        _ => false,
    };
    let ck = 128 / bits;
    let qc = 4 * ck;
    // FP weights: every mma column a token (the scale is in the A fragment).
    let slots = if group < qc && !fp { qc / group } else { 1 };
    let batch_codes = super::dec_steps() * qc;
    let dsb = batch_codes / group.max(1) * ssize;
    let few_tiles = ndim.div_ceil(16) <= u64::from(dev.sms);
    // n-tiles of 8 columns (token, slot): two serve 4-bit M = 5..8 at group 64, four M =
    // 9..16 (and, forced by MLXQ_DECB=1, up to 32 columns of any width and group), each
    // decoded weight fragment feeding all of them.
    let nt = match (m * slots).div_ceil(8) {
        3 => 4,
        nt => nt,
    };
    if (nt == 2 && knob("MLXQ_DECB_T2") == Some("0"))
        || (nt == 4 && knob("MLXQ_DECB_T4") == Some("0"))
    {
        return None;
    }
    // 8 consumers take a 2-stage ring, 4 consumers 3 stages (run 21, with the proxy fence that
    // ended run 20's wrong results on 2 stages: 2 beat 3 and 4 at every shape measured).
    // FP weights have no other decode kernel here: every M and gather, 4 consumers where 8
    // do not divide K.
    // The group-pure form (below) where its shape allows and it is not switched off.
    let gp_wanted = group == 64 && ssize == 2 && knob("MLXQ_DECB_GP") != Some("0");
    // ... and for M = 3..4 on one n-tile where GP34_DEFAULT or MLXQ_DECB_GP34=1 says so (=0:
    // the slotted forms, 4 consumers x 3 stages at N >= 6144, 8 x 2 below).
    let gp34 = match knob("MLXQ_DECB_GP34") {
        Some("1") => true,
        Some("0") => false,
        _ => GP34_DEFAULT,
    };
    let gp_small = gp34 && gp_wanted && !fp && !gather && bits == 4 && (3..=4).contains(&m);
    let (nc, ns) = match bits {
        _ if everywhere => (8, 2),
        4 if fp && nt == 1 && ((m <= 4 && ndim >= 8192) || (m == 1 && kdim < 8192)) => (4, 3),
        _ if fp && !kdim.is_multiple_of(8 * batch_codes) => (4, 3),
        _ if fp => (8, 2),
        _ if nt > 1 && slots != 2 => return None,
        8 if !gather && nt == 1 => (8, 2),
        4 if gp_small => (8, 2),
        // One slotted n-tile on 4 consumers from N = 8192, and at M <= 2 from N = 6144
        // (session 58, H100, graph µs: 1x6144x4096 7.36 against 9.71 on qmv_dec, 2x 8.48
        // against 10.57; at N = 4096 qmv_dec stays ahead, 5.50 against 6.3).
        4 if !gather && ((m <= 4 && ndim >= 8192) || (m <= 2 && ndim >= 6144)) => (4, 3),
        4 if !gather && m <= 4 && (few_tiles || m >= 3) => (8, 2),
        // From M = 14 the 64-token wgmma tile (`small_tile` in qmm) beats the slotted four
        // n-tiles (session 47, H100, graph µs: 16 x 14336x4096 46.3 -> 38.7, 16 x 8192x4096
        // 29.4 -> 25.5, 14 x 8192x4096 27.2 -> 26.6), but not the group-pure form (session 56,
        // H100: 16 x 14336x4096 26.0, 16 x 8192x4096 19.0).
        4 if !gather && nt == 4 && m >= 14 && tile_after && !gp_wanted => return None,
        // The group-pure n-tiles also at N = 4096 (session 56, H100, graph µs, forced against
        // the default wgmma tile: 12 x 4096x4096 12.4 against 15.8, 16 x 4096x4096 14.6
        // against 15.6); the slotted four n-tiles lost there (18.4 against 16.0).
        // (n-tiles only: one n-tile at 2048 < N < 6144 and M <= 2 keeps qmv_dec / qmv_decr,
        // below; session 58, H100: 1x4096x4096 7.31 µs here against 5.50 there.)
        4 if !gather && (nt == 2 || ndim >= 8192 || (gp_wanted && nt > 1 && ndim >= 4096)) => {
            (8, 2)
        }
        _ => return None,
    };
    let nc = match knob("MLXQ_DECB_NC").and_then(|v| v.parse::<u64>().ok()) {
        Some(v @ (4 | 8)) => v,
        _ => nc,
    };
    if dev.arch < 90
        || !matches!(bits, 4 | 8)
        || !matches!(nt, 1 | 2 | 4)
        || group > batch_codes
        || !batch_codes.is_multiple_of(group)
        || !matches!(dsb, 4 | 8 | 16)
        || !(nc * dsb).is_multiple_of(16)
        || !kdim.is_multiple_of(nc * batch_codes)
        || !(kdim / group * ssize).is_multiple_of(16)
        || !ptrs.iter().chain(&strides).all(|v| v.is_multiple_of(16))
    {
        return None;
    }
    let ns = knob("MLXQ_DECB_NS")
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(ns);
    // The step-column form (qmv_dec.cu `dec_lane_sc`): one n-tile whose columns are the
    // batch's groups of each token (M x groups per batch <= 8), so each batch's scales are
    // applied once, not once per step. MLXQ_DECB_SC: 0 the plain form; s, s5 (five blocks per
    // SM) the step columns; auto (the default where DECB_SC_DEFAULT) s5 where five blocks fit
    // an SM, else s; 5 the plain form at five blocks per SM (4 consumers, 3 stages).
    let dnsb = batch_codes / group.max(1);
    let sc_fits =
        !fp && nt == 1 && ssize == 2 && group <= qc && (2..=8).contains(&dnsb) && m * dnsb <= 8;
    let form = match knob("MLXQ_DECB_SC") {
        Some(f @ ("s" | "s5" | "auto")) if sc_fits => f,
        Some("5") if !fp => "5",
        None if DECB_SC_DEFAULT && sc_fits => "auto",
        _ => "",
    };
    // The group-pure form (qmv_decb.cu `GP`): 4-bit group 64 where the slotted form would take
    // two or four n-tiles (M = 5..16), every mma column a token: one n-tile up to M = 8, two
    // up to 16. MLXQ_DECB_GP=0 keeps the slotted n-tiles. One n-tile takes a 4-stage ring
    // at N >= 8192 where it fits (session 57, H100, graph µs, x in pieces: 5x14336x4096 17.8
    // against 19.1 on 2 stages, 8x 18.9 against 20.1, 8x28672x8192 65.6 against 67.2; not
    // measured at N = 4096); two n-tiles keep 2 (4 stages: 16x8192x4096 18.2 against 18.0,
    // 16x4096x4096 13.7 against 13.4, no gain at 12-16x14336x4096). MLXQ_DECB_NS=2|4 forces.
    let gp = gp_wanted && !fp && bits == 4 && (nt > 1 || gp_small) && nc == 8 && form.is_empty();
    let (nt, form) = if gp { (m.div_ceil(8), "g") } else { (nt, form) };
    // Shared memory at ns stages: the mbarriers (the ring's and x's, 128 bytes), NS stages of
    // 16 rows of codes (+ 64 bytes of padding each) and their scales and biases, 64 zero
    // bytes, x (64 bytes per chunk and token), its group sums, the consumers' partial sums
    // (each n-tile its own). GP: rows of a stage 32 bytes apart past their codes (not 64), 192
    // zero bytes, 16 bytes after each token's row of x.
    let stage = 16 * (nc * super::dec_steps() * 64 + if gp { 32 } else { 64 }) + 32 * nc * dsb;
    let smem_at = |ns: u64| {
        128 + ns * stage
            + if gp { 192 } else { 64 }
            + m * (kdim / ck * 64 + if gp { 16 } else { 0 })
            + (m * (kdim / group) * 4).div_ceil(16) * 16
            + nt * nc * 512
    };
    let ns = match knob("MLXQ_DECB_NS") {
        None if gp && nt == 1 && ndim >= 8192 && smem_at(4) <= dev.smem_optin => 4,
        _ => ns,
    };
    let entry = match (nc, ns, nt, form) {
        (8, 2, 1, "g") => "qmv_decb_8_2_g1",
        (8, 4, 1, "g") => "qmv_decb_8_4_g1",
        (8, 2, 2, "g") => "qmv_decb_8_2_g2",
        (4, 3, 1, "s") => "qmv_decb_4_3_s",
        (4, 3, 1, "s5" | "auto") => "qmv_decb_4_3_s5",
        (4, 3, 1, "5") => "qmv_decb_4_3_5",
        (8, 2, 1, "s" | "s5" | "auto") => "qmv_decb_8_2_s",
        (4, 3, 1, _) => "qmv_decb_4_3",
        (8, 2, 1, _) => "qmv_decb_8_2",
        (8, 3, 1, _) => "qmv_decb_8_3",
        (8, 4, 1, _) => "qmv_decb_8_4",
        (8, 2, 2, _) => "qmv_decb_8_2_t2",
        (8, 2, 4, _) => "qmv_decb_8_2_t4",
        _ => return None,
    };
    let smem = smem_at(ns);
    // auto: the five-block entry only where five blocks fit an SM (its 72 registers spill a
    // little); its four-block twin otherwise.
    let fallback = (form == "auto" && entry == "qmv_decb_4_3_s5").then_some(("qmv_decb_4_3_s", 5));
    (smem <= dev.smem_optin).then_some(DecbPick {
        entry,
        fallback,
        nc,
        smem,
    })
}

/// `qmv_decb`'s step-column form by default (MLXQ_DECB_SC unset: `auto`). Off: on an H100
/// (docs/perf-cuda.md, session 52) the step columns measured within 1% of the plain form and
/// five blocks per SM 4–27% slower; the H200 has not run them.
const DECB_SC_DEFAULT: bool = false;

/// Whether 4-bit group-64 M = 3..4 takes `qmv_decb`'s group-pure one n-tile by default (as M =
/// 5..8 does) instead of the slotted one n-tile. On since session 60 (H100, graph µs, slotted
/// against group-pure: 4x14336x4096 18.75 / 17.42, 4x4096x4096 8.31 / 7.74, 3x4096x4096 7.90 /
/// 7.50, 3x14336x4096 17.19 / 17.31; docs/perf-cuda.md, session 60).
const GP34_DEFAULT: bool = true;

/// What [`decb_pick`] needs of the device: compute capability (`major * 10 + minor`),
/// multiprocessors and the most dynamic shared memory a block may opt in to (bytes).
#[derive(Clone, Copy)]
struct DevCaps {
    arch: u32,
    sms: u32,
    smem_optin: u64,
}

impl DevCaps {
    fn of(dev: &CudaDevice) -> Self {
        DevCaps {
            arch: dev.arch(),
            sms: dev.multiprocessors(),
            smem_optin: dev.smem_optin as u64,
        }
    }
}

/// [`decb_pick`]'s choice: the entry, its consumer warps and shared memory per block, and
/// the entry to take instead (with the blocks per SM the first needs) where fewer fit.
struct DecbPick {
    entry: &'static str,
    fallback: Option<(&'static str, u32)>,
    nc: u64,
    smem: u64,
}

/// Blocks of `qmv_n` (transpose = false) per multiprocessor that its K split aims at.
const QMVN_BLOCKS_PER_SM: u64 = 4;

/// `qmv_n`'s columns per thread and rows per warp in flight for row tile `mt` and `bits`
/// (`QMV_N_CPT` and `QMV_N_UK` in qmv.cu).
fn qmvn_shape(mt: u32, bits: u64) -> (u64, u64) {
    match (mt, bits) {
        (1, 0..=2) => (32, 4),
        (1, _) => (32, 2),
        _ => (8, 1),
    }
}

/// The experiment switches [`knob`] reads.
const KNOBS: [&str; 33] = [
    "MLXQ_GATHER_SORT_OFF",
    "MLXQ_GATHER_WS",
    "MLXQ_GATHER_XP",
    "MLXQ_GATHER_TX",
    "MLXQ_TILE_G",
    "MLXQ_DEC_OFF",
    "MLXQ_DEC_RING",
    "MLXQ_DEC8",
    "MLXQ_DEC_WK",
    "MLXQ_DEC_PERSIST",
    "MLXQ_TILE",
    "MLXQ_DECM",
    "MLXQ_DECM_MIN",
    "MLXQ_DECM_NW",
    "MLXQ_DECB",
    "MLXQ_DECB_NC",
    "MLXQ_DECB_NS",
    "MLXQ_DECB_T2",
    "MLXQ_DECB_T4",
    "MLXQ_DECB_SC",
    "MLXQ_DECB_GP",
    "MLXQ_DECB_GP34",
    "MLXQ_WS",
    "MLXQ_FP_TILES",
    "MLXQ_QMVN_PER_SM",
    "MLXQ_WGN_MIN_M",
    "MLXQ_TILE_MIN_M",
    "MLXQ_TILE_SMALL",
    "MLXQ_KSPLIT",
    "MLXQ_KSPLIT_STEPS",
    "MLXQ_DQ",
    "MLXQ_DQ_MIN_M",
    "MLXQ_DQ_SLAB_MB",
];

/// The value of the experiment switch `name` (an `MLXQ_*` environment variable), read once per
/// process: launches consult these on every call, and reading the environment each time takes
/// its lock and allocates.
pub(super) fn knob(name: &'static str) -> Option<&'static str> {
    static VALUES: std::sync::OnceLock<Vec<Option<String>>> = std::sync::OnceLock::new();
    let values = VALUES.get_or_init(|| KNOBS.iter().map(|k| std::env::var(k).ok()).collect());
    let i = KNOBS.iter().position(|k| *k == name)?;
    values.get(i)?.as_deref()
}

/// Launches `f` with `params` (pointers to each argument, in order) on the device's stream;
/// with `pdl`, as a programmatic dependent of the kernel before it (it may start once that
/// one's blocks have all triggered, and waits for it with `griddepcontrol.wait`).
///
/// # Safety
/// As for any kernel launch: `params` must match the kernel's parameters, and the memory the
/// kernel touches must stay valid until it completes.
unsafe fn launch_ex(
    dev: &CudaDevice,
    f: &cudarc::driver::CudaFunction,
    cfg: LaunchConfig,
    shared: u32,
    params: &[*mut std::ffi::c_void],
    pdl: bool,
) -> std::result::Result<(), cudarc::driver::DriverError> {
    use cudarc::driver::sys;
    dev.ctx.bind_to_thread()?;
    // SAFETY: a plain C struct; all-zero is a valid (empty) attribute, filled in below.
    let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
    attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
    attr.value.programmaticStreamSerializationAllowed = 1;
    let config = sys::CUlaunchConfig {
        gridDimX: cfg.grid_dim.0,
        gridDimY: cfg.grid_dim.1,
        gridDimZ: cfg.grid_dim.2,
        blockDimX: cfg.block_dim.0,
        blockDimY: cfg.block_dim.1,
        blockDimZ: cfg.block_dim.2,
        sharedMemBytes: shared,
        hStream: dev.stream.cu_stream(),
        attrs: &raw mut attr,
        numAttrs: u32::from(pdl),
    };
    // SAFETY: the caller's contract; the config and attribute outlive the call.
    unsafe {
        sys::cuLaunchKernelEx(
            &config,
            f.cu_function(),
            params.as_ptr() as *mut *mut std::ffi::c_void,
            std::ptr::null_mut(),
        )
    }
    .result()
}

/// `qmv_decm` for this decode matmul (M tokens, W `[N, K]`, `gy` batch entries), or None
/// where it is not used: the entry point, warps per block, x chunk (codes) and dynamic
/// shared memory. By default with one n-tile (M <= 8 / slots tokens) for gather_qmm with
/// index tensors (4- and 8-bit; 1 token top-8 of 64 experts 2048x2048: 13.2 µs against 18.4
/// on qmv_dec, run 5d, docs/perf-cuda.md) with 4 warps (64 rows) per block, which needs
/// N / 64 x entries >= the SM count, and for dense 4-bit M >= MLXQ_DECM_MIN (default 3;
/// M = 3, 4 at 14336x4096: 24-27 µs against 33-48 on qmv_dec, runs 5d and 6).
/// MLXQ_DECM=1 takes it wherever it can serve M >= MLXQ_DECM_MIN (up to 4 n-tiles of
/// 8 / slots tokens), =0 never; MLXQ_DECM_NW=2|4|8 forces the warps per block.
#[allow(clippy::too_many_arguments)]
fn decm_pick(
    dev: &CudaDevice,
    m: u64,
    ndim: u64,
    kdim: u64,
    gy: u64,
    bits: u64,
    group: u64,
    ssize: u64,
    gather: bool,
) -> Option<(&'static str, u64, u64, u64)> {
    let mode = knob("MLXQ_DECM");
    let everywhere = match mode {
        Some("0") => return None,
        Some("1") => true,
        _ => false,
    };
    let min_m = knob("MLXQ_DECM_MIN")
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(3);
    let ck = 128 / bits;
    let qc = 4 * ck;
    let slots = if group < qc { qc / group } else { 1 };
    let su = super::dec_steps();
    let batch_codes = su * qc;
    let dsb = batch_codes / group.max(1) * ssize;
    let nt = match m.div_ceil(8 / slots) {
        1 => 1,
        2 => 2,
        3 | 4 => 4,
        _ => return None,
    };
    if (everywhere && m < min_m)
        || !matches!(bits, 4 | 8)
        || group > qc
        || !batch_codes.is_multiple_of(group)
        || !kdim.is_multiple_of(batch_codes)
        || !matches!(dsb, 4 | 8 | 16)
    {
        return None;
    }
    let nw = match knob("MLXQ_DECM_NW").and_then(|v| v.parse::<u64>().ok()) {
        Some(v @ (2 | 4 | 8)) => v,
        _ if ndim.div_ceil(64) * gy < u64::from(dev.multiprocessors()) => 2,
        _ => 4,
    };
    // The measured rule (see above): gathers on large grids, and dense 4-bit M >= 3 with one
    // n-tile (M = 3, 4 at group 64: 27 µs against 48 on qmv_dec at 14336x4096, run 6). More
    // n-tiles stay on qmv_tc (faster at 8 n-tile columns and more: run 5d), small gather grids
    // on qmv_dec.
    let dense = !gather && bits == 4 && m >= min_m;
    if !everywhere && (nt != 1 || !(dense || gather && nw == 4)) {
        return None;
    }
    // x chunk: the most batches (dividing the row) whose items (one per word of W codes, 8
    // or 4 values) fit 8 per thread.
    let nb = kdim / batch_codes;
    let cpw = 32 / bits; // codes per 32-bit word
    let mut kc = batch_codes;
    for d in (1..=nb).rev() {
        if nb.is_multiple_of(d) && m * d * batch_codes / cpw <= 8 * 32 * nw {
            kc = d * batch_codes;
            break;
        }
    }
    if m * kc / cpw > 8 * 32 * nw {
        return None;
    }
    // Dense M = 3, 4 on a 6-batch ring (run 10, H200: 4x14336x4096 20.5 µs against 27.1 with
    // 4), gathers on 4 (one token, top-8 of 64 experts 2048x2048: 12.7 against 13.7 with 6).
    let deep = !everywhere && dense && nw != 8;
    let ring = dec_ring_bytes(su, if deep { 6 } else { 4 });
    let smem = 64 + m * (kc / ck) * 64 + (m * (kc / group) * 4).div_ceil(16) * 16 + nw * ring;
    if smem > super::DEC_SMEM_MAX as u64 {
        return None;
    }
    const DECM: [[&str; 3]; 3] = [
        ["qmv_decm_2_1", "qmv_decm_2_2", "qmv_decm_2_4"],
        ["qmv_decm_4_1", "qmv_decm_4_2", "qmv_decm_4_4"],
        ["qmv_decm_8_1", "qmv_decm_8_2", "qmv_decm_8_4"],
    ];
    if deep {
        return Some((
            if nw == 2 {
                "qmv_decm6_2_1"
            } else {
                "qmv_decm6_4_1"
            },
            nw,
            kc,
            smem,
        ));
    }
    let entry = DECM[match nw {
        2 => 0,
        4 => 1,
        _ => 2,
    }][match nt {
        1 => 0,
        2 => 1,
        _ => 2,
    }];
    Some((entry, nw, kc, smem))
}

/// Most dynamic shared memory `qmv_tc` takes for x (its limit is raised to this at load).
const TC_SMEM_MAX: u64 = super::TC_SMEM_MAX as u64;

/// The scratch for `segments` segments of `floats` f32 partial sums each (split-K kernels):
/// its device address and the buffer, or (0, None) for one segment, whose kernel writes the
/// output itself.
fn partial_scratch(
    dev: &CudaDevice,
    op: &'static str,
    segments: u32,
    floats: u64,
) -> Result<(u64, Option<Buffer>)> {
    if segments <= 1 {
        return Ok((0, None));
    }
    let s = dev.scratch((u64::from(segments) * floats * 4) as usize)?;
    Ok((ptr(op, "scratch", &s)?, Some(s)))
}

/// Enqueues `qmv_n_reduce`: `out[e][m][n]` = the sum over `segments` of the f32 partial sums
/// `partial[segment][row][n]` (in `scratch`, from [`partial_scratch`]) for `rows` = entries·M
/// rows, and keeps the scratch alive until the encoder's work completes.
#[allow(clippy::too_many_arguments)]
fn reduce_partials(
    enc: &mut CommandEncoder,
    stream: &Arc<cudarc::driver::CudaStream>,
    k: &super::CudaKernel,
    op: &'static str,
    scratch: &Buffer,
    out: u64,
    rows: u64,
    ndim: u64,
    segments: u32,
    out_stride: u64,
    m: u32,
) -> Result<()> {
    let total = rows * ndim;
    let partial = ptr(op, "scratch", scratch)?;
    enc.retain(scratch);
    // SAFETY: reads the rows·N·segments partial sums just written, writes each output once
    // (entry e = row / m at out + e·out_stride, as the matmul kernels would have).
    unsafe {
        stream
            .launch_builder(k.func_named("qmv_n_reduce")?)
            .arg(&partial)
            .arg(&out)
            .arg(&rows)
            .arg(&ndim)
            .arg(&segments)
            .arg(&out_stride)
            .arg(&m)
            .launch(cfg((grid_x(op, total.div_ceil(256))?, 1, 1), 256, op)?)
    }
    .map(drop)
    .map_err(driver(op))
}

/// Times work on a CUDA device's stream with a pair of events.
pub struct EventTimer {
    start: CudaEvent,
    end: CudaEvent,
    dev: Arc<CudaDevice>,
}

impl EventTimer {
    /// A timer for `device` (a CUDA device).
    pub fn new(device: &Device) -> Result<EventTimer> {
        let dev = Arc::clone(device.cuda_state()?);
        let ev = || {
            dev.ctx
                .new_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(driver("EventTimer"))
        };
        Ok(EventTimer {
            start: ev()?,
            end: ev()?,
            dev,
        })
    }
    /// Records the start event on the stream.
    pub fn start(&self) -> Result<()> {
        self.start
            .record(&self.dev.stream)
            .map_err(driver("EventTimer"))
    }
    /// Records the end event, waits for it, and returns the milliseconds since `start`.
    pub fn stop_ms(&self) -> Result<f64> {
        self.end
            .record(&self.dev.stream)
            .map_err(driver("EventTimer"))?;
        self.end.synchronize().map_err(driver("EventTimer"))?;
        self.start
            .elapsed_ms(&self.end)
            .map(f64::from)
            .map_err(driver("EventTimer"))
    }
}

/// Measures the device's read bandwidth (bytes/s) by reading `bytes` of device memory with
/// 16-byte loads, `reps` times; returns the median.
pub fn read_bandwidth_probe(device: &Device, bytes: usize, reps: usize) -> Result<f64> {
    const OP: &str = "read_bandwidth_probe";
    let dev = Arc::clone(device.cuda_state()?);
    dev.swap_last_dec(None);
    let f = dev.probe()?;
    let buf = Buffer::uninit_on(device, DType::U8, &[bytes.max(16)])?;
    let sink = Buffer::uninit_on(device, DType::U32, &[dev.sms as usize * 8])?;
    let p = ptr(OP, "buffer", &buf)?;
    let ps = ptr(OP, "sink", &sink)?;
    // Fill with a pattern so the reads see real data.
    // SAFETY: the whole allocation.
    unsafe {
        cudarc::driver::result::memset_d8_async(p, 0x5a, buf.nbytes(), dev.stream.cu_stream())
    }
    .map_err(driver(OP))?;
    let words = (buf.nbytes() / 16) as u64;
    let timer = EventTimer::new(device)?;
    let mut times = Vec::new();
    for i in 0..reps + 2 {
        timer.start()?;
        // SAFETY: reads `words` 16-byte words of `buf`, writes at most one word per block of
        // `sink` (sms·8 blocks).
        unsafe {
            dev.stream
                .launch_builder(&f)
                .arg(&p)
                .arg(&words)
                .arg(&ps)
                .launch(cfg((dev.sms * 8, 1, 1), 512, OP)?)
        }
        .map_err(driver(OP))?;
        let ms = timer.stop_ms()?;
        if i >= 2 {
            times.push(ms);
        }
    }
    times.sort_by(f64::total_cmp);
    let ms = times.get(times.len() / 2).copied().unwrap_or(f64::NAN);
    Ok(buf.nbytes() as f64 / (ms * 1e-3))
}

/// Device time (µs, median of `iters` calls after a warm-up) of cuBLAS's bf16 GEMM
/// `y[M, N] = x[M, K] · W[N, K]ᵀ` (f32 accumulation, bf16 output) on `device` for the caller's
/// `x` and `w` (bf16, any location), cycling through enough device copies of `w` to total at
/// least `rotate` bytes (so W comes from HBM as in the quantized benchmarks). The values
/// matter: on random data the tensor cores draw more power and clock lower than on constant
/// data (docs/perf-cuda.md, session 48). cuBLAS is loaded at run time: an error says why it
/// is unavailable.
pub fn cublas_bf16_gemm_us(
    device: &Device,
    x: &Buffer,
    w: &Buffer,
    iters: usize,
    rotate: usize,
) -> Result<f64> {
    const OP: &str = "cublas_bf16_gemm";
    let (m, k, n) = match (x.dtype(), x.shape(), w.dtype(), w.shape()) {
        (DType::BF16, &[m, k], DType::BF16, &[n, kw]) if kw == k => (m, k, n),
        _ => {
            return Err(Error::invalid(
                OP,
                "x, w",
                "bf16 x [M, K] and w [N, K]",
                format!(
                    "{} x {:?}, {} w {:?}",
                    x.dtype(),
                    x.shape(),
                    w.dtype(),
                    w.shape()
                ),
            ))
        }
    };
    let dev = Arc::clone(device.cuda_state()?);
    dev.swap_last_dec(None);
    let blas = dev.blas().ok_or_else(|| Error::BackendUnavailable {
        device: "cublas".into(),
        reason: "libcublas was not found on this machine (or its handle failed)".into(),
    })?;
    let copies = rotate.div_ceil(w.nbytes().max(1)).clamp(1, 64);
    let upload = |src: &Buffer| -> Result<Buffer> {
        let mut b = Buffer::uninit_on(device, DType::BF16, src.shape())?;
        b.copy_from(src)?;
        Ok(b)
    };
    let xd = upload(x)?;
    let y = Buffer::uninit_on(device, DType::BF16, &[m, n])?;
    let ws: Vec<Buffer> = (0..copies).map(|_| upload(w)).collect::<Result<_>>()?;
    let (px, py) = (ptr(OP, "x", &xd)?, ptr(OP, "y", &y)?);
    let pws: Vec<u64> = ws.iter().map(|b| ptr(OP, "w", b)).collect::<Result<_>>()?;
    let size = [m as u64, n as u64, k as u64];
    // SAFETY: the pointers address the allocations above, of the sizes the GEMM reads and
    // writes (W N×K, x M×K, y M×N bf16), alive until the stream is synchronised below.
    let call = |pw: u64| unsafe {
        super::dq_gemm::gemm_xwt(&blas, OP, DType::BF16, size, px, pw, py, size[1])
    };
    for &pw in &pws {
        call(pw)?;
    }
    let timer = EventTimer::new(device)?;
    let mut times = Vec::new();
    for _ in 0..iters.max(1) {
        timer.start()?;
        for &pw in &pws {
            call(pw)?;
        }
        times.push(timer.stop_ms()? * 1e3 / copies as f64);
    }
    dev.synchronize()?;
    times.sort_by(f64::total_cmp);
    Ok(times.get(times.len() / 2).copied().unwrap_or(f64::NAN))
}

#[cfg(test)]
mod tests {
    use super::{gather_tile, TILES};

    #[test]
    fn gather_tiles_follow_the_pairs_per_expert() {
        let width = |tokens: u64, bits| TILES[gather_tile(tokens * 8, 64, bits)].bm;
        // Session 18's A/B (top-8 of 64 experts): 256 tokens on 64 pairs (32 per expert fit
        // one tile), 512 and 1024 on 80 (64 +- 8 pairs: one tile; 128 +- 11: two).
        for bits in [4, 8] {
            assert_eq!(width(512, bits), 80);
            assert_eq!(width(1024, bits), 80);
        }
        assert_eq!(width(256, 4), 64);
        // Every pick is a grouped tile, whatever the counts.
        for (pairs, experts) in [(0, 0), (1, 1), (10, 1000), (1 << 40, 1), (4096, 64)] {
            let t = &TILES[gather_tile(pairs, experts, 4)];
            assert!(t.entry.starts_with("qmm_wg_g"), "{}", t.entry);
        }
    }

    #[test]
    fn the_persistent_gather_tiles_have_their_wgmma_tiles_widths_and_fit() -> crate::Result<()> {
        use super::gather_ws;
        use crate::{DType, QuantSpec};
        let entry = |xp, tx, experts| gather_ws(4, true, xp, tx, experts).map(|j| TILES[j].entry);
        // Top-8 of 64 experts: x by TMA for small items up to 128 tokens (16 pairs per expert).
        for (xp, tx, want) in [
            (false, None, "qmm_ws_g80"),
            (false, Some(16), "qmm_ws_g80"),
            (true, None, "qmm_wsp_g80"),
            (true, Some(16), "qmm_wspt_g80"),
            (true, Some(1024), "qmm_wspt_g80"),
            (true, Some(1025), "qmm_wsp_g80"),
            (true, Some(4096), "qmm_wsp_g80"),
            (true, Some(u64::MAX), "qmm_wsp_g80"),
        ] {
            assert_eq!(entry(xp, tx, 64), Some(want), "xp {xp} pairs {tx:?}");
        }
        // No experts: no average, no TMA form (and no overflow).
        assert_eq!(entry(true, Some(1), 0), Some("qmm_wsp_g80"));
        assert_eq!(entry(true, Some(1), u64::MAX), Some("qmm_wspt_g80"));
        // Where measured slower (8-bit) or not measured (the FP modes).
        for xp in [false, true] {
            for tx in [None, Some(1)] {
                assert_eq!(gather_ws(8, true, xp, tx, 64), None);
                assert_eq!(gather_ws(4, false, xp, tx, 64), None);
            }
        }
        for j in [(false, None), (true, None), (true, Some(1))]
            .into_iter()
            .filter_map(|(xp, tx)| gather_ws(4, true, xp, tx, 64))
        {
            // The 80-pair wgmma tile's shape, whichever grouped tile `gather_tile` picked.
            let (wg, ws) = (&TILES[16], &TILES[j]);
            assert!(ws.pers && ws.ws && ws.wg, "{}", ws.entry);
            assert_eq!((wg.bm, wg.bn), (ws.bm, ws.bn), "{}", ws.entry);
            // Within an sm_90 block's 227 KiB at every width and group they serve.
            for bits in [4, 8] {
                for group in [32, 64, 128] {
                    let spec = QuantSpec::affine(bits, group)?;
                    let smem = ws.smem(4096, spec, DType::BF16);
                    assert!(
                        smem <= 227 << 10,
                        "{} {bits}-bit g{group}: {smem}",
                        ws.entry
                    );
                }
            }
        }
        // Only the grouped persistent entries are persistent, and only `qmm_wsp_*` reads
        // permuted x.
        for t in &TILES {
            let (ws, wsp) = (
                t.entry.starts_with("qmm_ws_g"),
                t.entry.starts_with("qmm_wsp"),
            );
            assert_eq!(t.pers, ws || wsp, "{}", t.entry);
            assert_eq!(t.xperm, wsp, "{}", t.entry);
        }
        // The three-warpgroup form (4-bit only): 64 rows and 128 threads per consumer
        // warpgroup plus the producer's, within the 227 KiB at every group.
        let t3 = &TILES[21];
        assert_eq!((t3.entry, t3.bn, t3.threads), ("qmm_wsp3_g80", 192, 512));
        for group in [32, 64, 128] {
            let spec = QuantSpec::affine(4, group)?;
            for sdt in [DType::BF16, DType::F32] {
                let smem = t3.smem(4096, spec, sdt);
                assert!(smem <= 227 << 10, "g{group} {sdt}: {smem}");
            }
        }
        Ok(())
    }

    #[test]
    fn every_tile_is_an_entry_of_the_modules_that_serve_it() {
        // A tile missing from a module's entry list fails at its first launch ("entry ... is
        // not supported"), as `qmm_wsp3_g80` did on the device in session 64.
        let listed = |name: &str| {
            super::super::TABLE
                .iter()
                .filter(|v| v.entries.contains(&name))
                .count()
        };
        for t in &TILES {
            // The wgmma tiles of qmm_wg.cu in both matmul modules (affine and FP), the others
            // (qmm_tile.cu, the transposed qmm_wgn_*) in the affine one.
            let want = if t.wg && !t.entry.starts_with("qmm_wgn") {
                2
            } else {
                1
            };
            assert!(
                listed(t.entry) >= want,
                "{} in {} modules",
                t.entry,
                listed(t.entry)
            );
        }
    }

    #[test]
    fn the_copy_of_x_takes_the_kernels_chunks_per_block() {
        let src = include_str!("kernels/qmm_tc.cu");
        let def = src
            .lines()
            .find_map(|l| l.strip_prefix("#define XPB "))
            .expect("qmm_tc.cu defines XPB");
        assert_eq!(
            def.trim().trim_end_matches('u').parse::<u64>(),
            Ok(super::XPB)
        );
    }

    #[test]
    fn every_knob_read_is_listed() {
        let src = [include_str!("launch.rs"), include_str!("dq_gemm.rs")].concat();
        let mut seen = 0;
        for part in src.split("knob(\"").skip(1) {
            let name = &part[..part.find('"').unwrap_or(0)];
            if name.starts_with("MLXQ_") {
                assert!(
                    super::KNOBS.contains(&name),
                    "{name} is read but not in KNOBS"
                );
                seen += 1;
            }
        }
        assert!(seen >= super::KNOBS.len(), "found {seen} reads");
    }

    #[test]
    fn indices_wait_only_for_a_predecessor_that_wrote_them() {
        use super::indices_ready;
        let idx = [None, Some((1000, 1064))];
        assert!(indices_ready(None, &idx), "no programmatic predecessor");
        assert!(
            indices_ready(Some((0, 1000)), &idx),
            "ends where they start"
        );
        assert!(
            indices_ready(Some((1064, 2000)), &idx),
            "starts where they end"
        );
        assert!(!indices_ready(Some((1063, 1064)), &idx), "their last byte");
        assert!(!indices_ready(Some((0, 1001)), &idx), "their first byte");
        assert!(!indices_ready(Some((0, 5000)), &idx), "around them");
        let both = [Some((0, 8)), Some((1000, 1064))];
        assert!(
            !indices_ready(Some((4, 6)), &both),
            "inside the lhs indices"
        );
        assert!(indices_ready(Some((8, 1000)), &both), "between them");
        assert!(
            indices_ready(Some((0, 1 << 40)), &[None, None]),
            "no index tensors"
        );
    }

    #[test]
    fn decode_routes_follow_the_measured_rule() {
        // An H100's limits; 4-bit (or 8-bit) group 64, bf16 scales, dense, aligned operands.
        let h100 = super::DevCaps {
            arch: 90,
            sms: 132,
            smem_optin: 227 * 1024,
        };
        let pick = |m: u64, n: u64, k: u64, bits: u64| {
            super::decb_pick(
                h100, m, n, k, bits, 64, 2, false, false, true, [0; 3], [0; 2],
            )
            .map(|p| p.entry)
        };
        // M <= 2 below N = 6144 keeps qmv_dec / qmv_decr (session 58: the N = 4096 rule of
        // the n-tiles had taken them to the 8 x 2 ring, 1.3x slower).
        for (m, n, k) in [(1, 4096, 4096), (2, 4096, 4096), (1, 4096, 14336)] {
            assert_eq!(pick(m, n, k, 4), None, "{m}x{n}x{k}");
        }
        // Row tiles that do not fill the SMs: 8 x 2 (session 47).
        assert_eq!(pick(1, 2048, 4096, 4), Some("qmv_decb_8_2"));
        assert_eq!(pick(1, 6144, 4096, 4), Some("qmv_decb_4_3"));
        assert_eq!(pick(1, 14336, 4096, 4), Some("qmv_decb_4_3"));
        assert_eq!(pick(2, 28672, 8192, 4), Some("qmv_decb_4_3"));
        // M = 3..4: the group-pure one n-tile (GP34_DEFAULT, session 60), 4 stages from N =
        // 8192, 2 below.
        assert_eq!(pick(3, 4096, 4096, 4), Some("qmv_decb_8_2_g1"));
        assert_eq!(pick(3, 6144, 4096, 4), Some("qmv_decb_8_2_g1"));
        assert_eq!(pick(4, 14336, 4096, 4), Some("qmv_decb_8_4_g1"));
        assert_eq!(pick(8, 4096, 4096, 4), Some("qmv_decb_8_2_g1"));
        assert_eq!(pick(8, 14336, 4096, 4), Some("qmv_decb_8_4_g1"));
        assert_eq!(pick(12, 4096, 4096, 4), Some("qmv_decb_8_2_g2"));
        assert_eq!(pick(16, 14336, 4096, 4), Some("qmv_decb_8_2_g2"));
        // x (M x K x 2 bytes) outgrows shared memory: the wgmma tile.
        assert_eq!(pick(16, 4096, 14336, 4), None);
        assert_eq!(pick(1, 4096, 4096, 8), Some("qmv_decb_8_2"));
        assert_eq!(pick(16, 14336, 4096, 8), None);
        // Before Hopper, or with misaligned operands: never.
        let old = super::DevCaps { arch: 80, ..h100 };
        let at = |dev, ptrs| {
            super::decb_pick(
                dev, 1, 14336, 4096, 4, 64, 2, false, false, true, ptrs, [0; 2],
            )
        };
        assert!(at(old, [0; 3]).is_none());
        assert!(at(h100, [8, 0, 0]).is_none());
    }

    #[test]
    fn batch_matches_the_cuda_layout() {
        // 12 u64 + 3 pointers + 4 u32 = 136 bytes, 8-aligned, as `struct Batch` in qmv.cu.
        assert_eq!(std::mem::size_of::<super::Batch>(), 136);
    }
}
