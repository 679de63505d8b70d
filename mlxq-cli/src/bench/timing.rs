//! Timing: adaptive iteration counts with a median, and the machine's memory read bandwidth.

use rayon::prelude::*;
use std::hint::black_box;
use std::time::Instant;

/// Hard limit on timed calls of one case (a very fast op under a long `--min-time`).
const MAX_ITERS: usize = 100_000;

/// How many calls to time.
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    /// Untimed calls first.
    pub warmup: usize,
    /// A fixed count of timed calls, or `None` to adapt to `min_time`.
    pub iters: Option<usize>,
    /// Seconds of timed calls to gather when adapting.
    pub min_time: f64,
}

/// The outcome of timing one case.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    /// Median seconds per call.
    pub median: f64,
    /// Timed calls.
    pub iters: usize,
    /// All calls, warm-up included (call `i` of the case got index `i`).
    pub calls: usize,
}

impl Plan {
    /// Calls `f(i)` for `i = 0, 1, ...`: `warmup` untimed calls, then timed ones until the plan
    /// is met. Adaptive plans stop once `min_time` has passed and either 3 calls were timed or
    /// 3 × `min_time` has passed (so a single slow call is not repeated needlessly).
    pub fn run(&self, mut f: impl FnMut(usize) -> anyhow::Result<()>) -> anyhow::Result<Timing> {
        let mut call = 0;
        for _ in 0..self.warmup {
            f(call)?;
            call += 1;
        }
        let mut samples = Vec::new();
        let start = Instant::now();
        loop {
            let t = Instant::now();
            f(call)?;
            samples.push(t.elapsed().as_secs_f64());
            call += 1;
            let n = samples.len();
            let done = match self.iters {
                Some(iters) => n >= iters,
                None => {
                    let spent = start.elapsed().as_secs_f64();
                    n >= MAX_ITERS
                        || (spent >= self.min_time && (n >= 3 || spent >= 3.0 * self.min_time))
                }
            };
            if done {
                break;
            }
        }
        Ok(Timing {
            median: median(&mut samples),
            iters: samples.len(),
            calls: call,
        })
    }
}

/// The median (mean of the middle two for an even count); `samples` is sorted in place.
pub fn median(samples: &mut [f64]) -> f64 {
    samples.sort_by(f64::total_cmp);
    let n = samples.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => samples[n / 2],
        _ => 0.5 * (samples[n / 2 - 1] + samples[n / 2]),
    }
}

/// Words of the bandwidth probe's buffer one task streams: 256 KiB.
const CHUNK: usize = 1 << 15;

/// The memory read bandwidth probe, kept for the whole run so that it can be read again
/// between cases: on a shared machine the bandwidth moves with the neighbours (43–72 GB/s
/// within one hour on the VM of docs/perf.md, session 28), and a single reading at the start
/// can fall below what a later case then reads (ratios over 100%).
///
/// Its buffer asks Linux for transparent huge pages (`MADV_HUGEPAGE`, before any page is
/// touched; where the kernel has none the advice changes nothing): the probe is the limit
/// the kernels are held to, so it reads memory the fastest way the machine allows. On the
/// Xeon VM of session 42 a stream over 4 KiB pages read 26 GB/s and over huge pages 36, the
/// 4 KiB pages' walks and the prefetchers' stop at every page edge costing the rest; on the
/// Zen VMs of sessions 23–28 the two were level (docs/perf.md).
pub struct Roofline {
    buf: memmap2::MmapMut,
    /// The highest reading so far, GB/s (`f64` bits).
    best: std::sync::atomic::AtomicU64,
}

impl Roofline {
    /// A probe of `bytes` (whole u64 words, at least one), read `runs` times at each prefetch
    /// distance now; the error is the operating system's, where it maps no such buffer.
    pub fn new(bytes: usize, runs: usize) -> anyhow::Result<Roofline> {
        let mut buf = memmap2::MmapMut::map_anon((bytes / 8).max(1) * 8)?;
        // Advice only: a kernel without transparent huge pages refuses it, and the probe then
        // reads 4 KiB pages, as every buffer there is.
        #[cfg(target_os = "linux")]
        let _ = buf.advise(memmap2::Advice::HugePage);
        // Write every page first: untouched pages of a fresh mapping all map the one zero
        // page, and reading that would measure the cache, not memory.
        bytemuck::cast_slice_mut::<u8, u64>(&mut buf)
            .par_chunks_mut(CHUNK)
            .enumerate()
            .for_each(|(i, c)| {
                for (j, v) in c.iter_mut().enumerate() {
                    *v = (i * CHUNK + j) as u64;
                }
            });
        let r = Roofline {
            buf,
            best: std::sync::atomic::AtomicU64::new(0f64.to_bits()),
        };
        r.read(runs);
        Ok(r)
    }

    /// Reads the bandwidth again (`runs` times at each prefetch distance) and returns the
    /// highest reading of the run so far: the limit every ratio is taken against, so that a
    /// quiet moment after the start is not held against the kernels.
    pub fn read(&self, runs: usize) -> f64 {
        let now = memory_bandwidth(bytemuck::cast_slice(&self.buf), runs);
        let best = f64::from_bits(self.best.load(std::sync::atomic::Ordering::Relaxed)).max(now);
        self.best
            .store(best.to_bits(), std::sync::atomic::Ordering::Relaxed);
        best
    }

    /// The highest reading so far, GB/s.
    pub fn best(&self) -> f64 {
        f64::from_bits(self.best.load(std::sync::atomic::Ordering::Relaxed))
    }
}

/// Memory read bandwidth in GB/s (10⁹ bytes/s): all threads stream `buf`, summing its u64
/// words in eight independent lanes (vectorised wide loads); the best of `runs` at each of
/// several software-prefetch distances (the hardware prefetcher alone leaves a core short of
/// the misses in flight it can sustain, and the kernels prefetch), the best of all of them.
fn memory_bandwidth(buf: &[u64], runs: usize) -> f64 {
    /// Bytes ahead of the loads that the probe prefetches (0: none).
    const AHEAD: [usize; 4] = [0, 2048, 4096, 8192];
    let mut best = f64::INFINITY;
    for ahead in AHEAD {
        for _ in 0..runs.max(1) {
            let t = Instant::now();
            let sum = buf
                .par_chunks(CHUNK)
                .map(|c| stream_sum(c, ahead))
                .reduce(|| 0, u64::wrapping_add);
            black_box(sum);
            best = best.min(t.elapsed().as_secs_f64());
        }
    }
    std::mem::size_of_val(buf) as f64 / best / 1e9
}

/// The wrapping sum of `c`, prefetching `ahead` bytes in front of the loads (x86-64 only).
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
fn stream_sum(c: &[u64], ahead: usize) -> u64 {
    let mut acc = [0u64; 8];
    for (i, w) in c.chunks_exact(8).enumerate() {
        #[cfg(target_arch = "x86_64")]
        if ahead != 0 {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            let p = c.as_ptr().wrapping_add(i * 8 + ahead / 8) as *const i8;
            // SAFETY: a prefetch never faults, whatever the address; `wrapping_add` keeps
            // computing it defined past the slice.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p) };
        }
        for (a, &v) in acc.iter_mut().zip(w) {
            *a = a.wrapping_add(v);
        }
    }
    acc.iter().fold(0u64, |s, &a| s.wrapping_add(a))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), 2.5);
    }

    #[test]
    fn fixed_plans_run_exactly_their_calls() {
        let plan = Plan {
            warmup: 2,
            iters: Some(3),
            min_time: 100.0,
        };
        let mut seen = Vec::new();
        let t = plan
            .run(|i| {
                seen.push(i);
                Ok(())
            })
            .unwrap();
        assert_eq!((t.iters, t.calls), (3, 5));
        assert_eq!(seen, [0, 1, 2, 3, 4]);
    }
}
