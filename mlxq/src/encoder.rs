//! The command encoder: ops record work on it; `commit_and_wait` returns when all of it is done.
//!
//! On the CPU backend work runs while it is encoded (each op is a parallel loop over all cores),
//! so `commit_and_wait` only closes the batch. On CUDA the encoder is the device's stream: ops
//! enqueue kernels and return at once, the encoder keeps the buffers they use alive, and
//! `commit_and_wait` synchronises the stream (and reports an out-of-range index a kernel saw).
//! A sequence of ops can also be captured into a CUDA graph and replayed
//! (`CommandEncoder::capture`, with the `cuda` feature).
//! The encoder also keeps the name of the last kernel it ran, which benchmarks and tests use to
//! report (and check) which variant the dispatcher chose, and how many it ran: in a buffer it
//! reuses, so that a decode loop on one encoder neither allocates per op nor grows (until
//! session 59 it kept every name as a new `String`, one allocation per op and ~100 bytes per
//! op for as long as the encoder lived).

use crate::device::Device;
use crate::error::{Error, Result};

/// Records work on one device.
#[derive(Debug)]
pub struct CommandEncoder {
    device: Device,
    /// The last kernel's name (its capacity reused from op to op).
    last: String,
    /// Kernels run through this encoder, and how many of them before the last commit.
    count: usize,
    committed: usize,
    /// Buffers used by work that may still be running on the device.
    retained: Vec<crate::Buffer>,
}

impl CommandEncoder {
    pub(crate) fn new(device: Device) -> CommandEncoder {
        CommandEncoder {
            device,
            last: String::new(),
            count: 0,
            committed: 0,
            retained: Vec::new(),
        }
    }

    /// The device work is recorded on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Notes that `kernel` ran as part of the current batch.
    pub(crate) fn record(&mut self, kernel: &str) {
        self.last.clear();
        self.last.push_str(kernel);
        self.count += 1;
    }

    /// Keeps `buffer`'s memory alive until the work recorded so far has completed.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn retain(&mut self, buffer: &crate::Buffer) {
        self.retained.push(buffer.clone());
    }

    /// Checks that `buffer` lives on this encoder's device.
    pub(crate) fn check_location(
        &self,
        op: &'static str,
        param: &'static str,
        buffer: &crate::Buffer,
    ) -> Result<()> {
        if buffer.location() != self.device.location() {
            return Err(Error::DeviceMismatch {
                op,
                param,
                expected: self.device.location().to_string(),
                actual: buffer.location().to_string(),
            });
        }
        Ok(())
    }

    /// Submits the recorded work and waits until it has completed.
    pub fn commit_and_wait(&mut self) -> Result<()> {
        #[cfg(feature = "cuda")]
        if let Ok(cuda) = self.device.cuda_state() {
            let synced = cuda.synchronize();
            if synced.is_ok() {
                self.retained.clear();
            }
            self.committed = self.count;
            synced?;
            return cuda.take_fault();
        }
        self.retained.clear();
        self.committed = self.count;
        Ok(())
    }

    /// Records the ops that `record` encodes into a CUDA graph instead of running them; the
    /// graph can then be replayed any number of times (each replay reads the buffers the ops
    /// were given, as they are at replay time). Pending work is completed first.
    #[cfg(feature = "cuda")]
    pub fn capture(
        &mut self,
        record: impl FnOnce(&mut CommandEncoder) -> Result<()>,
    ) -> Result<crate::backend::cuda::Graph> {
        self.commit_and_wait()?;
        let cuda = std::sync::Arc::clone(self.device.cuda_state()?);
        cuda.begin_capture()?;
        let recorded = record(self);
        let graph = cuda.end_capture(std::mem::take(&mut self.retained));
        recorded?;
        self.committed = self.count;
        graph
    }

    /// Number of kernels run through this encoder.
    pub fn kernels_run(&self) -> usize {
        self.count
    }

    /// Name of the most recent kernel run, if any.
    pub fn last_kernel(&self) -> Option<&str> {
        (self.count > 0).then_some(self.last.as_str())
    }

    /// Number of kernels encoded since the last `commit_and_wait`.
    pub fn pending(&self) -> usize {
        self.count - self.committed
    }
}

impl Drop for CommandEncoder {
    fn drop(&mut self) {
        // Work still queued may use the retained buffers: let it finish before they are freed.
        #[cfg(feature = "cuda")]
        if !self.retained.is_empty() {
            if let Ok(cuda) = self.device.cuda_state() {
                let _ = cuda.synchronize();
            }
        }
    }
}
