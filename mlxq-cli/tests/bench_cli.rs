//! `mlxq bench` end to end on tiny shapes: JSON fields, tolerances, the chart, clean errors.

use std::process::{Command, Output};

fn mlxq(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mlxq"))
        .args(args)
        .output()
        .expect("run mlxq")
}

/// Small and quick: a 16 MiB bandwidth buffer, two timed calls per case.
const QUICK: [&str; 6] = ["bench", "--iters", "2", "--bandwidth-mib", "16", "--json"];

fn json_lines(out: &Output) -> Vec<serde_json::Value> {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "mlxq bench failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l:?}: {e}")))
        .collect()
}

/// `r` is a passing, checked record of an affine group-64 case ([`check_any_record`]: any mode).
fn check_record(r: &serde_json::Value, tolerance: f64) {
    check_any_record(r, tolerance);
    assert_eq!(r["mode"], "affine");
    assert_eq!(r["group_size"], 64);
}

/// `r` is a passing, checked record with every field present.
fn check_any_record(r: &serde_json::Value, tolerance: f64) {
    for f in ["op", "device", "mode", "dtype", "kernel"] {
        assert!(r[f].is_string(), "{f} in {r}");
    }
    for f in ["n", "k", "bits", "group_size", "weight_bytes"] {
        assert!(r[f].as_u64().is_some_and(|v| v > 0), "{f} in {r}");
    }
    for f in ["seconds", "gbps", "roofline_gbps", "ratio"] {
        assert!(r[f].as_f64().is_some_and(|v| v > 0.0), "{f} in {r}");
    }
    assert_eq!(r["device"], "cpu");
    let err = r["max_rel_err"].as_f64().expect("max_rel_err");
    assert!(err <= tolerance, "error {err} over {tolerance} in {r}");
    assert_eq!(r["pass"], true);
    if r["op"] == "quantize" {
        assert!(r["m"].is_null() && r["gflops"].is_null(), "{r}");
    } else {
        assert!(r["m"].as_u64().is_some_and(|v| v > 0), "{r}");
        assert!(r["gflops"].as_f64().is_some_and(|v| v > 0.0), "{r}");
    }
}

#[test]
fn tiny_shapes_give_checked_json_for_every_op() {
    let plot = std::env::temp_dir().join(format!("mlxq-bench-{}.svg", std::process::id()));
    let mut args = QUICK.to_vec();
    args.extend([
        "--shape",
        "2,64,256",
        "--bits",
        "4",
        "--op",
        "matmul,gather,quantize",
        "--moe",
        "4,64,128",
        "--top-k",
        "2",
        "--tokens",
        "3",
        "--plot",
    ]);
    args.push(plot.to_str().expect("temp path"));
    let recs = json_lines(&mlxq(&args));
    let ops: Vec<&str> = recs.iter().filter_map(|r| r["op"].as_str()).collect();
    assert_eq!(ops, ["matmul", "gather", "quantize"]);
    for r in &recs {
        assert_eq!(r["bits"], 4);
        assert_eq!(r["dtype"], "bfloat16");
        check_record(r, if r["op"] == "quantize" { 0.0 } else { 1e-2 });
    }
    assert_eq!(
        (&recs[0]["m"], &recs[0]["n"], &recs[0]["k"]),
        (&2.into(), &64.into(), &256.into())
    );
    assert_eq!(recs[1]["experts"], 4);
    let svg = std::fs::read_to_string(&plot).expect("chart written");
    let _ = std::fs::remove_file(&plot);
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
}

#[test]
fn f32_and_untransposed_weights_meet_the_f32_tolerance() {
    let mut args = QUICK.to_vec();
    args.extend([
        "--shape",
        "3,128,64",
        "--bits",
        "3,8",
        "--dtype",
        "f32",
        "--transpose",
        "false",
    ]);
    let recs = json_lines(&mlxq(&args));
    assert_eq!(recs.len(), 2);
    for r in &recs {
        assert_eq!(r["dtype"], "float32");
        assert_eq!(r["transpose"], false);
        check_record(r, 1e-5);
    }
}

#[test]
fn fp_modes_time_matmul_gather_and_quantize_checked() {
    for (mode, bits, group) in [("mxfp4", 4, 32), ("mxfp8", 8, 32), ("nvfp4", 4, 16)] {
        let mut args = QUICK.to_vec();
        args.extend([
            "--mode",
            mode,
            "--shape",
            "2,64,96",
            "--op",
            "matmul,gather,quantize",
            "--moe",
            "3,32,64",
            "--top-k",
            "2",
            "--tokens",
            "2",
            "--transpose",
            "true,false",
        ]);
        let recs = json_lines(&mlxq(&args));
        // matmul in both layouts, gather, and quantize (bit for bit: tolerance 0).
        assert_eq!(recs.len(), 4 + 1, "{mode}");
        for r in &recs {
            assert_eq!(r["mode"], mode);
            assert_eq!(
                (r["bits"].as_u64(), r["group_size"].as_u64()),
                (Some(bits), Some(group))
            );
            check_any_record(r, if r["op"] == "quantize" { 0.0 } else { 1e-2 });
        }
        assert_eq!(recs.iter().filter(|r| r["op"] == "quantize").count(), 1);
    }
}

fn fails_cleanly(args: &[&str], needle: &str) {
    let out = mlxq(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} succeeded");
    assert!(stderr.contains(needle), "{args:?}: {stderr}");
    assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    assert!(out.stdout.is_empty(), "{args:?} printed results");
}

#[test]
fn bad_devices_and_shapes_are_clean_errors() {
    fails_cleanly(&["bench", "--device", "cuda:0"], "cuda:0");
    fails_cleanly(&["bench", "--device", "tpu"], "cpu, cuda or cuda:N");
    fails_cleanly(&["bench", "--shape", "1,2"], "--shape");
    fails_cleanly(&["bench", "--shape", "1,x,64"], "three positive integers");
    fails_cleanly(
        &["bench", "--shape", "1,64,100"],
        "multiple of --group-size 64",
    );
    fails_cleanly(&["bench", "--bits", "7"], "bits");
    fails_cleanly(
        &["bench", "--mode", "nvfp4", "--shape", "1,64,40"],
        "multiple of the nvfp4 group size 16",
    );
    fails_cleanly(&["bench", "--mode", "fp4"], "mxfp4");
    // --fuse changes what --chain runs; alone it is an error, not a no-op.
    fails_cleanly(&["bench", "--fuse"], "--chain");
}
