//! The `mlxq` command: quantize, dequantize, inspect and benchmark MLX-format weights.

mod bench;
mod files;

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
    /// Dequantize an MLX-quantized safetensors file back to floats.
    Dequantize(files::DequantizeArgs),
    /// List a safetensors file's tensors and what is quantized how.
    Inspect(files::InspectArgs),
    /// Time the ops against the machine's memory bandwidth, checking every result.
    Bench(bench::BenchArgs),
}

fn main() {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Quantize(a) => files::quantize(a),
        Command::Dequantize(a) => files::dequantize(a),
        Command::Inspect(a) => files::inspect(a),
        Command::Bench(a) => bench::run(a),
    };
    if let Err(e) = result {
        eprintln!("mlxq: error: {e:#}");
        std::process::exit(1);
    }
}
