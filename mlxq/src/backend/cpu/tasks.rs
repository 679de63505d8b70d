//! Running a call's tasks on the calling thread and the pool's threads together.
//!
//! A parallel iterator started from a thread outside rayon's pool hands the whole loop to the
//! pool and puts the caller to sleep until the pool is done: two wake-ups through the kernel
//! (a sleeping worker, then the caller), ~19 µs per call on two threads of a Xeon VM and most
//! of a small decode call's time (docs/perf.md, session 43). [`for_each`] instead starts the
//! work on the calling thread at once, asks the pool for helpers that take tasks from the same
//! counter when they wake, and waits for the last running task by spinning, not sleeping. From
//! inside the pool (a nested call, as `gather_qmm`'s experts make) it is a plain parallel loop.

use rayon::prelude::*;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;

/// The counters a call's threads share, and its task function with the lifetime erased.
struct Shared {
    /// The next task to take (past `tasks`: none left).
    next: AtomicUsize,
    /// Threads between announcing a claim and finishing the task claimed (or failing to claim).
    busy: AtomicUsize,
    tasks: usize,
    /// The caller's closure. Valid while the caller is inside [`for_each`], which returns only
    /// once no task can be claimed and no thread is running one; a helper calls it only after
    /// claiming a task.
    f: *const (dyn Fn(usize) + Sync + 'static),
}

// SAFETY: `f` is a shared reference to a `Sync` closure (see its field's note for how long it
// is dereferenced); the rest are atomics and a count.
unsafe impl Send for Shared {}
// SAFETY: as above.
unsafe impl Sync for Shared {}

/// Decrements a counter when dropped (also when a task unwinds).
struct Release<'a>(&'a AtomicUsize);

impl Drop for Release<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, SeqCst);
    }
}

/// Takes tasks from `s` until none are left.
fn work(s: &Shared) {
    loop {
        // Announce before claiming: whoever sees `next ≥ tasks` and then `busy == 0` knows no
        // thread holds a task or can still claim one.
        s.busy.fetch_add(1, SeqCst);
        let _release = Release(&s.busy);
        let t = s.next.fetch_add(1, SeqCst);
        if t >= s.tasks {
            return;
        }
        // SAFETY: task `t` was claimed, so the caller is still inside `for_each` (it leaves
        // only once `busy` is 0, which this thread's claim keeps it from being until the task
        // returns): the closure is alive.
        unsafe { (*s.f)(t) };
    }
}

/// Waits, when dropped, until no thread runs a task of `s` and none can claim one.
struct Join<'a>(&'a Shared);

impl Drop for Join<'_> {
    fn drop(&mut self) {
        let s = self.0;
        // Where the caller unwinds out of a task, the tasks left are not started.
        s.next.fetch_max(s.tasks, SeqCst);
        let mut spins = 0u32;
        while s.busy.load(SeqCst) != 0 {
            // The helpers' last tasks are as long as the caller's: spin, then give way to
            // other threads where one takes long (a machine with more threads than cores).
            if spins < 1 << 16 {
                std::hint::spin_loop();
                spins += 1;
            } else {
                std::thread::yield_now();
            }
        }
    }
}

/// Runs `f(t)` for every `t` in `0..tasks`, each once, on the calling thread and on as many of
/// rayon's threads as are free to help (at most one thread per task), returning when all have
/// run. Tasks are taken in ascending order, one at a time, by whichever thread is free.
///
/// Outside the pool the calling thread takes tasks from the start; each call asks the pool for
/// `threads − 1` helpers (one small allocation each, rayon's job, and one for the counters).
/// A panic in a task on a helper thread is rayon's to handle (it aborts by default); the
/// library's kernels do not panic.
pub(crate) fn for_each<F: Fn(usize) + Sync>(tasks: usize, f: F) {
    let threads = rayon::current_num_threads();
    if tasks <= 1 || threads <= 1 {
        (0..tasks).for_each(f);
        return;
    }
    if rayon::current_thread_index().is_some() {
        (0..tasks).into_par_iter().for_each(&f);
        return;
    }
    let f: &(dyn Fn(usize) + Sync) = &f;
    // SAFETY: only the lifetime changes (the same fat pointer); `Shared::f`'s note says why
    // no thread calls it once this call has returned.
    let f: *const (dyn Fn(usize) + Sync + 'static) = unsafe {
        std::mem::transmute::<*const (dyn Fn(usize) + Sync + '_), *const (dyn Fn(usize) + Sync)>(f)
    };
    let shared = shared_for(tasks, f);
    let _join = Join(&shared);
    for _ in 1..threads.min(tasks) {
        let s = Arc::clone(&shared);
        rayon::spawn(move || work(&s));
    }
    work(&shared);
}

thread_local! {
    /// The calling thread's counters from its last call, reused where no helper of that call
    /// still holds them (a decode loop then allocates nothing here; rayon's job for each
    /// helper is the one allocation per call left).
    static LAST: std::cell::RefCell<Option<Arc<Shared>>> = const { std::cell::RefCell::new(None) };
}

/// Counters for a call of `tasks` tasks running `f`: the thread's last ones, reset, where
/// nothing else holds them, else new ones.
fn shared_for(tasks: usize, f: *const (dyn Fn(usize) + Sync + 'static)) -> Arc<Shared> {
    let fresh = || Shared {
        next: AtomicUsize::new(0),
        busy: AtomicUsize::new(0),
        tasks,
        f,
    };
    LAST.with(|last| {
        let mut last = last.borrow_mut();
        let shared = last.get_or_insert_with(|| Arc::new(fresh()));
        match Arc::get_mut(shared) {
            Some(s) => *s = fresh(),
            None => *shared = Arc::new(fresh()),
        }
        Arc::clone(shared)
    })
}

/// [`for_each`] over the chunks of `data` of `len` elements (the last may be shorter):
/// `f(t, chunk t)`, each chunk handed to exactly one task.
pub(crate) fn for_each_chunk_mut<T: Send, F: Fn(usize, &mut [T]) + Sync>(
    data: &mut [T],
    len: usize,
    f: F,
) {
    let (total, len) = (data.len(), len.max(1));
    let base = Base(data.as_mut_ptr());
    for_each(total.div_ceil(len), |t| {
        let start = t * len;
        let n = len.min(total - start);
        // SAFETY: chunk t is `start..start + n` of `data`, in range (`t` < the chunk count)
        // and disjoint from every other task's; `for_each` runs each `t` once, while `data`
        // stays mutably borrowed by this call.
        let chunk = unsafe { std::slice::from_raw_parts_mut(base.at(start), n) };
        f(t, chunk)
    });
}

/// The start of the slice [`for_each_chunk_mut`] divides, shared with its tasks.
struct Base<T>(*mut T);

impl<T> Base<T> {
    /// The pointer `i` elements on (a method, so that closures capture the `Sync` wrapper,
    /// not its field).
    fn at(&self, i: usize) -> *mut T {
        self.0.wrapping_add(i)
    }
}

// SAFETY: the tasks of `for_each_chunk_mut` reach disjoint chunks through it (see there), and
// `T: Send` lets each chunk be used from another thread.
unsafe impl<T: Send> Sync for Base<T> {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    /// Every task runs exactly once, from outside the pool, inside it, and for the edge counts.
    #[test]
    fn every_task_runs_once() {
        for tasks in [0usize, 1, 2, 3, 7, 16, 100, 1000] {
            let hits: Vec<AtomicU64> = (0..tasks).map(|_| AtomicU64::new(0)).collect();
            for_each(tasks, |t| {
                hits[t].fetch_add(1, SeqCst);
            });
            assert!(hits.iter().all(|h| h.load(SeqCst) == 1), "{tasks} tasks");
            // Nested, as gather_qmm's experts call the kernels.
            let nested: Vec<AtomicU64> = (0..tasks * 4).map(|_| AtomicU64::new(0)).collect();
            rayon::scope(|_| {
                (0..4usize).into_par_iter().for_each(|o| {
                    for_each(tasks, |t| {
                        nested[o * tasks + t].fetch_add(1, SeqCst);
                    })
                })
            });
            assert!(nested.iter().all(|h| h.load(SeqCst) == 1), "{tasks} nested");
        }
    }

    /// The call returns only after every task has finished, however long the helpers' are.
    #[test]
    fn returns_after_the_last_task() {
        for _ in 0..50 {
            let done = AtomicU64::new(0);
            for_each(8, |t| {
                if t % 2 == 1 {
                    std::thread::sleep(std::time::Duration::from_micros(200));
                }
                done.fetch_add(1, SeqCst);
            });
            assert_eq!(done.load(SeqCst), 8);
        }
    }

    /// Each chunk goes to one task, the last one short, and nothing outside them is touched.
    #[test]
    fn chunks_are_disjoint_and_cover_the_slice() {
        for (total, len) in [
            (0usize, 4usize),
            (1, 4),
            (10, 3),
            (12, 3),
            (1000, 7),
            (5, 0),
        ] {
            let mut data = vec![0u32; total];
            for_each_chunk_mut(&mut data, len, |t, chunk| {
                for (i, v) in chunk.iter_mut().enumerate() {
                    *v += (t * len.max(1) + i) as u32 + 1;
                }
            });
            let want: Vec<u32> = (1..=total as u32).collect();
            assert_eq!(data, want, "{total} in chunks of {len}");
        }
    }

    /// Calls from several outside threads at once share the pool without losing a task.
    #[test]
    fn concurrent_callers() {
        let total = AtomicU64::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..100 {
                        for_each(10, |t| {
                            total.fetch_add(t as u64 + 1, SeqCst);
                        });
                    }
                });
            }
        });
        assert_eq!(total.load(SeqCst), 4 * 100 * 55);
    }
}
