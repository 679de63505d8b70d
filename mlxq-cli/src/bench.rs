//! `mlxq bench` (being written).

/// Arguments of `mlxq bench`.
#[derive(clap::Args)]
pub struct BenchArgs {}

/// Runs the benchmark.
pub fn run(_args: &BenchArgs) -> anyhow::Result<()> {
    anyhow::bail!("bench is not written yet")
}
