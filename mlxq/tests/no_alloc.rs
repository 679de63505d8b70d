//! The `_into` ops allocate nothing of their own once warm: a decode loop calling
//! `quantized_matmul_into` (M = 1 to 16, 4- and 8-bit, bf16 and f32 x), `dequantize_into`,
//! `quantize_into` and `gather_qmm_into` (one and four tokens, top-2 of 8 experts) on one
//! encoder makes no heap allocation on any thread after the first calls
//! (which grow the kernels' thread-local scratch and fill the kernel cache) but rayon's own
//! (its job for each helper thread, its queues' blocks), and the encoder does not grow. A
//! counting global allocator sees every thread's allocations, so this file is its own test
//! binary with one test. Until session 59 a warm M = 1 call made 6 allocations (the kernel
//! name kept by the encoder, the output shape, a copy of the kernel's routing table, an error
//! built and dropped when x was not f32, the task counters, rayon's job) and `quantize_into`
//! 2 (the output shapes); until session 60 a warm `gather_qmm_into` made ~15 (its index
//! values, shapes, the pairs' order by expert, each expert's list of output rows).

use mlxq::{ops, Buffer, CommandEncoder, DType, Device, Flavour, QuantSpec};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};

/// The system allocator, counting allocations and reallocations (any thread).
struct Counting;

static ALLOCS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is passed to the system allocator unchanged.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, SeqCst);
        // SAFETY: the caller's contract, forwarded.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, SeqCst);
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, SeqCst);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Deterministic values in [-1, 1).
fn values(n: usize, seed: u32) -> Vec<f32> {
    (0..n as u32)
        .map(|i| {
            let h = i
                .wrapping_mul(2654435761)
                .wrapping_add(seed.wrapping_mul(40503))
                >> 8;
            h as f32 / (1u32 << 23) as f32 - 1.0
        })
        .collect()
}

/// One op of a decode or load loop, on buffers made beforehand.
type Call<'a> = Box<dyn FnMut(&mut CommandEncoder) + 'a>;

/// Heap allocations (any thread) during `rounds` rounds of every call in `calls`.
fn allocations(enc: &mut CommandEncoder, calls: &mut [(String, Call<'_>)], rounds: usize) -> usize {
    let before = ALLOCS.load(SeqCst);
    for _ in 0..rounds {
        for (_, call) in calls.iter_mut() {
            call(enc);
        }
    }
    ALLOCS.load(SeqCst) - before
}

#[test]
fn warm_into_ops_allocate_nothing() {
    let device = Device::cpu();
    let mut enc = device.encoder();
    let (n, k) = (512usize, 1024usize);
    let mut bufs = Vec::new();
    for dtype in [DType::BF16, DType::F32] {
        for bits in [4u32, 8] {
            let spec = QuantSpec::affine(bits, 64).unwrap();
            let w = Buffer::from_f32(&values(n * k, bits), dtype, &[n, k]).unwrap();
            let qw = ops::quantize(&mut enc, &w, spec, Flavour::Gpu).unwrap();
            // quantize_into's output: a weight of its own (a clone would share the storage).
            let into = ops::quantize(&mut enc, &w, spec, Flavour::Gpu).unwrap();
            let deq = Buffer::zeros(dtype, &[n, k]).unwrap();
            let xy: Vec<(Buffer, Buffer)> = [1usize, 2, 4, 8, 16]
                .iter()
                .map(|&m| {
                    let x = Buffer::from_f32(&values(m * k, 7 + m as u32), dtype, &[m, k]);
                    (x.unwrap(), Buffer::zeros(dtype, &[m, n]).unwrap())
                })
                .collect();
            bufs.push((dtype, bits, spec, w, qw, into, deq, xy));
        }
    }
    // A Mixture-of-Experts step: 8 experts of 256×1024 4-bit, top-2 of them for 1 and 4 tokens
    // (x [T, 1, 1, K], rhs_indices [T, 2], out [T, 2, 1, N]), bf16.
    let (experts, en, top) = (8usize, 256usize, 2usize);
    let spec = QuantSpec::affine(4, 64).unwrap();
    let ew = Buffer::from_f32(&values(experts * en * k, 3), DType::BF16, &[experts, en, k]);
    let eqw = ops::quantize(&mut enc, &ew.unwrap(), spec, Flavour::Gpu).unwrap();
    let mut moe: Vec<(Buffer, Buffer, Buffer)> = [1usize, 4]
        .iter()
        .map(|&t| {
            let x = Buffer::from_f32(&values(t * k, 11 + t as u32), DType::BF16, &[t, 1, 1, k]);
            let ids: Vec<u32> = (0..t * top)
                .map(|i| ((i * 5 + 3) % experts) as u32)
                .collect();
            let ids = Buffer::from_slice(&ids, &[t, top]).unwrap();
            let out = Buffer::zeros(DType::BF16, &[t, top, 1, en]).unwrap();
            (x.unwrap(), ids, out)
        })
        .collect();
    let mut matmuls: Vec<(String, Call<'_>)> = Vec::new();
    let mut others: Vec<(String, Call<'_>)> = Vec::new();
    for (dtype, bits, spec, w, qw, into, deq, xy) in bufs.iter_mut() {
        let (dtype, bits, spec) = (*dtype, *bits, *spec);
        let qw = &*qw;
        for (x, y) in xy.iter_mut() {
            let m = x.shape()[0];
            matmuls.push((
                format!("quantized_matmul_into {m}x{n}x{k} {bits}-bit {dtype}"),
                Box::new(move |enc: &mut CommandEncoder| {
                    ops::quantized_matmul_into(enc, x, qw, true, y).unwrap();
                    enc.commit_and_wait().unwrap();
                }),
            ));
        }
        others.push((
            format!("dequantize_into {n}x{k} {bits}-bit {dtype}"),
            Box::new(move |enc: &mut CommandEncoder| {
                ops::dequantize_into(enc, qw, Default::default(), deq).unwrap();
                enc.commit_and_wait().unwrap();
            }),
        ));
        let w = &*w;
        others.push((
            format!("quantize_into {n}x{k} {bits}-bit {dtype}"),
            Box::new(move |enc: &mut CommandEncoder| {
                ops::quantize_into(enc, w, spec, Flavour::Gpu, into).unwrap();
                enc.commit_and_wait().unwrap();
            }),
        ));
    }
    for (x, ids, out) in moe.iter_mut() {
        let (eqw, ids, t) = (&eqw, &*ids, x.shape()[0]);
        others.push((
            format!("gather_qmm_into {t} tokens, top-{top} of {experts}x{en}x{k} 4-bit"),
            Box::new(move |enc: &mut CommandEncoder| {
                ops::gather_qmm_into(enc, x, eqw, None, Some(ids), true, false, out).unwrap();
                enc.commit_and_wait().unwrap();
            }),
        ));
    }
    // Warm: every thread's scratch grows to the largest call it may serve.
    allocations(&mut enc, &mut matmuls, 8);
    allocations(&mut enc, &mut others, 8);
    // What rayon allocates is allowed, nothing else: a decode call asks the pool for its
    // helper threads with `rayon::spawn`, which boxes each job (one allocation per helper),
    // and jobs injected into the pool from outside it take a slot of a queue that grows by a
    // block every few dozen jobs (allowed: one allocation per 4 calls). An allocation of the
    // library's own in every call (a shape, a name, a scratch vector) exceeds both.
    let helpers = rayon::current_num_threads() - 1;
    let rounds = 16;
    let calls = rounds * matmuls.len();
    let made = allocations(&mut enc, &mut matmuls, rounds);
    eprintln!("quantized_matmul_into: {made} allocations in {calls} warm calls, {helpers} helpers");
    assert!(
        made <= calls * helpers + calls / 4,
        "quantized_matmul_into: {made} allocations in {calls} warm calls ({helpers} helper \
         threads): more than rayon's"
    );
    let rounds = 64;
    for one in others.chunks_mut(1) {
        let made = allocations(&mut enc, one, rounds);
        let name = &one[0].0;
        eprintln!("{name}: {made} allocations in {rounds} warm calls");
        assert!(
            made <= rounds / 4,
            "{name}: {made} allocations in {rounds} warm calls: more than rayon's"
        );
    }
    assert!(enc.kernels_run() > 0 && enc.pending() == 0);
}
