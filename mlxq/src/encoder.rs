//! The command encoder: ops record work on it; `commit_and_wait` returns when all of it is done.
//!
//! On the CPU backend work runs while it is encoded (each op is a parallel loop over all cores),
//! so `commit_and_wait` only closes the batch. On CUDA the encoder is the device's stream: ops
//! enqueue kernels and return at once, the encoder keeps the buffers they use alive, and
//! `commit_and_wait` synchronises the stream (and reports an out-of-range index a kernel saw).
//! A sequence of ops can also be captured into a CUDA graph and replayed
//! (`CommandEncoder::capture`, with the `cuda` feature).
//! The encoder also keeps the name of every kernel it ran, which benchmarks and tests use to
//! report (and check) which variant the dispatcher chose.

use crate::device::Device;
use crate::error::{Error, Result};

/// Records work on one device.
#[derive(Debug)]
pub struct CommandEncoder {
    device: Device,
    kernels: Vec<String>,
    committed: usize,
    /// Buffers used by work that may still be running on the device.
    retained: Vec<crate::Buffer>,
}

impl CommandEncoder {
    pub(crate) fn new(device: Device) -> CommandEncoder {
        CommandEncoder {
            device,
            kernels: Vec::new(),
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
        self.kernels.push(kernel.to_owned());
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
            self.committed = self.kernels.len();
            synced?;
            return cuda.take_fault();
        }
        self.retained.clear();
        self.committed = self.kernels.len();
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
        self.committed = self.kernels.len();
        graph
    }

    /// Names of the kernels run through this encoder, oldest first.
    pub fn kernels_run(&self) -> &[String] {
        &self.kernels
    }

    /// Name of the most recent kernel run, if any.
    pub fn last_kernel(&self) -> Option<&str> {
        self.kernels.last().map(String::as_str)
    }

    /// Number of kernels encoded since the last `commit_and_wait`.
    pub fn pending(&self) -> usize {
        self.kernels.len() - self.committed
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
