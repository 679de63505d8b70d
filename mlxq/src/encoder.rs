//! The command encoder: ops record work on it; `commit_and_wait` returns when all of it is done.
//!
//! On the CPU backend work runs while it is encoded (each op is a parallel loop over all cores),
//! so `commit_and_wait` only closes the batch; a GPU backend maps the encoder to a stream.
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
}

impl CommandEncoder {
    pub(crate) fn new(device: Device) -> CommandEncoder {
        CommandEncoder {
            device,
            kernels: Vec::new(),
            committed: 0,
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
        self.committed = self.kernels.len();
        Ok(())
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
