//! The `mlxq` command: quantize, dequantize, inspect and benchmark MLX-format weights.

mod bench;
mod files;
mod model;

use clap::{Parser, Subcommand};

/// MLX-format quantized weights: quantize, dequantize, inspect, benchmark.
#[derive(Parser)]
#[command(name = "mlxq", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Quantize the weights of a safetensors file as MLX does.
    Quantize(files::QuantizeArgs),
    /// Convert a Hugging Face model directory into an MLX one, as `mlx_lm.convert [-q]`.
    Convert(model::ConvertArgs),
    /// Dequantize an MLX-quantized safetensors file or model directory back to floats.
    Dequantize(files::DequantizeArgs),
    /// List a safetensors file's or model directory's tensors and what is quantized how.
    Inspect(files::InspectArgs),
    /// Check a model directory; with --against, the quantization error per tensor.
    Verify(model::VerifyArgs),
    /// Time the ops against the machine's memory bandwidth, checking every result.
    Bench(bench::BenchArgs),
}

fn main() {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Quantize(a) => files::quantize(a),
        Command::Convert(a) => model::convert(a),
        Command::Dequantize(a) => files::dequantize(a),
        Command::Verify(a) => model::verify(a),
        Command::Inspect(a) => files::inspect(a),
        Command::Bench(a) => bench::run(a),
    };
    if let Err(e) = result {
        eprintln!("mlxq: error: {e:#}");
        std::process::exit(1);
    }
}
