//! Results: one [`Record`] per timed case, printed as it completes, as a table row or as one
//! JSON object per line.

use mlxq::{DType, QuantMode};
use std::io::Write;

/// One timed and checked case.
#[derive(Clone, Debug)]
pub struct Record {
    pub op: &'static str,
    pub device: String,
    /// Rows of x (tokens for `gather`); `None` for `quantize` and `dequantize`.
    pub m: Option<usize>,
    pub n: usize,
    pub k: usize,
    pub bits: u32,
    pub group_size: u32,
    /// The quantization mode (the FP modes have their own width and group size).
    pub mode: QuantMode,
    pub dtype: DType,
    pub transpose: bool,
    /// Experts and experts per token (`gather` only).
    pub moe: Option<(usize, usize)>,
    pub seconds: f64,
    /// Bytes a call must move: quantized weights read (for `quantize`, floats read plus
    /// quantized bytes written; for `dequantize`, quantized bytes read plus floats written).
    pub weight_bytes: usize,
    /// Floating-point operations per call (`None` for `quantize` and `dequantize`).
    pub flops: Option<f64>,
    pub roofline_gbps: f64,
    pub max_rel_err: f64,
    pub tolerance: f64,
    pub pass: bool,
    pub kernel: String,
    /// Weight copies the case touched.
    pub copies: usize,
    pub iters: usize,
    /// Sampled (rows, of rows, columns, of columns) checked against the oracle.
    pub checked: [usize; 4],
}

impl Record {
    pub fn gbps(&self) -> f64 {
        self.weight_bytes as f64 / self.seconds / 1e9
    }
    pub fn ratio(&self) -> f64 {
        self.gbps() / self.roofline_gbps
    }
    pub fn gflops(&self) -> Option<f64> {
        self.flops.map(|f| f / self.seconds / 1e9)
    }

    /// `M×N×K` (matmul), `tokens×top-k/experts N×K` (gather) or `N×K` (quantize, dequantize).
    pub fn shape_label(&self) -> String {
        let layout = if self.transpose { "" } else { " x·W" };
        match (self.op, self.m, self.moe) {
            ("gather", Some(t), Some((e, top))) => {
                format!("{t}tok top{top}/{e} {}×{}{layout}", self.n, self.k)
            }
            (_, Some(m), _) => format!("{m}×{}×{}{layout}", self.n, self.k),
            _ => format!("{}×{}", self.n, self.k),
        }
    }

    /// What the check covered, in words.
    pub fn checked_words(&self) -> String {
        let [r, rn, c, cn] = self.checked;
        let what = match self.op {
            "quantize" => "weight rows (bit-exact codes, scales, biases)",
            "dequantize" => "weight rows (bit-exact floats)",
            "gather" => "(token, expert) rows",
            _ => "rows",
        };
        if matches!(self.op, "quantize" | "dequantize") {
            format!("{r} of {rn} {what}")
        } else {
            format!("{r} of {rn} {what} x {c} of {cn} columns")
        }
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "op": self.op,
            "device": self.device,
            "m": self.m,
            "n": self.n,
            "k": self.k,
            "bits": self.bits,
            "group_size": self.group_size,
            "mode": self.mode.to_string(),
            "dtype": self.dtype.name(),
            "seconds": self.seconds,
            "weight_bytes": self.weight_bytes,
            "gbps": self.gbps(),
            "roofline_gbps": self.roofline_gbps,
            "ratio": self.ratio(),
            "gflops": self.gflops(),
            "max_rel_err": self.max_rel_err,
            "kernel": self.kernel,
            "transpose": self.transpose,
            "experts": self.moe.map(|m| m.0),
            "top_k": self.moe.map(|m| m.1),
            "tolerance": self.tolerance,
            "pass": self.pass,
            "copies": self.copies,
            "iters": self.iters,
            "checked": self.checked_words(),
        })
    }
}

/// Prints records as they come and keeps them.
pub struct Reporter {
    json: bool,
    records: Vec<Record>,
}

const HEADER: [&str; 12] = [
    "op",
    "shape",
    "bits",
    "dtype",
    "median",
    "GB/s",
    "roof%",
    "GFLOP/s",
    "max_rel_err",
    "checked",
    "copies",
    "kernel",
];
const WIDTHS: [usize; 11] = [8, 28, 5, 8, 10, 8, 6, 9, 11, 8, 6];

fn row(cells: &[String]) -> String {
    let mut s = String::new();
    for (i, c) in cells.iter().enumerate() {
        match WIDTHS.get(i) {
            // Text left-aligned, numbers right-aligned.
            Some(&w) if i < 2 || i == 3 => s += &format!("{c:<w$}  "),
            Some(&w) => s += &format!("{c:>w$}  "),
            None => s += c,
        }
    }
    s.trim_end().to_owned()
}

/// Seconds with a readable unit.
pub fn human_time(s: f64) -> String {
    if s < 1e-3 {
        format!("{:.1} µs", s * 1e6)
    } else if s < 1.0 {
        format!("{:.2} ms", s * 1e3)
    } else {
        format!("{s:.3} s")
    }
}

impl Reporter {
    pub fn new(json: bool) -> Reporter {
        Reporter {
            json,
            records: Vec::new(),
        }
    }

    /// Prints `r` (the table header before the first row) and keeps it.
    pub fn push(&mut self, r: Record) {
        let mut out = std::io::stdout().lock();
        if self.json {
            let _ = writeln!(out, "{}", r.json());
        } else {
            if self.records.is_empty() {
                let _ = writeln!(out, "{}", row(&HEADER.map(String::from)));
            }
            let [cr, _, cc, _] = r.checked;
            let cells = [
                r.op.to_owned(),
                r.shape_label(),
                if r.mode == QuantMode::Affine {
                    r.bits.to_string()
                } else {
                    r.mode.to_string()
                },
                r.dtype.name().to_owned(),
                human_time(r.seconds),
                format!("{:.2}", r.gbps()),
                format!("{:.1}", 100.0 * r.ratio()),
                r.gflops().map_or("-".into(), |g| format!("{g:.2}")),
                format!("{:.2e}{}", r.max_rel_err, if r.pass { "" } else { "!" }),
                if matches!(r.op, "quantize" | "dequantize") {
                    format!("{cr}")
                } else {
                    format!("{cr}×{cc}")
                },
                r.copies.to_string(),
                r.kernel.clone(),
            ];
            let _ = writeln!(out, "{}", row(&cells));
        }
        let _ = out.flush();
        self.records.push(r);
    }

    /// Prints the table's footnote and returns the records.
    pub fn finish(self) -> Vec<Record> {
        if !self.json {
            if let Some(r) = self.records.last() {
                println!(
                    "\nroofline: {:.1} GB/s measured memory read bandwidth (the highest reading of the \
                     run; the probe runs at the start and after every case, and each roof% is to the \
                     highest reading up to its case). GB/s = bytes of quantized \
                     weights read per call / median time (quantize: floats read + quantized written; \
                     dequantize: quantized read + floats written); \
                     roof% = that / roofline.\nchecked = sampled rows × output columns computed in f64 \
                     from the dequantized weights ((de)quantize: weight rows compared bit for bit); \
                     '!' marks a result over tolerance. copies = weight copies rotated through.",
                    r.roofline_gbps
                );
            }
        }
        self.records
    }
}
