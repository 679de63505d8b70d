//! `mlxq quantize`, `dequantize`, `inspect` (being written).

/// Arguments of `mlxq quantize`.
#[derive(clap::Args)]
pub struct QuantizeArgs {}
/// Arguments of `mlxq dequantize`.
#[derive(clap::Args)]
pub struct DequantizeArgs {}
/// Arguments of `mlxq inspect`.
#[derive(clap::Args)]
pub struct InspectArgs {}

/// Runs `mlxq quantize`.
pub fn quantize(_a: &QuantizeArgs) -> anyhow::Result<()> {
    anyhow::bail!("not written yet")
}
/// Runs `mlxq dequantize`.
pub fn dequantize(_a: &DequantizeArgs) -> anyhow::Result<()> {
    anyhow::bail!("not written yet")
}
/// Runs `mlxq inspect`.
pub fn inspect(_a: &InspectArgs) -> anyhow::Result<()> {
    anyhow::bail!("not written yet")
}
