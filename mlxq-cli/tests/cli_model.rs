//! `mlxq convert / inspect / verify / dequantize` on model directories, against mlx_lm itself.
//!
//! Tiny Hugging Face models (Llama, Mixtral, Qwen3-MoE; random weights, a word-level tokenizer)
//! are made by `tools/mlx_lm_oracle.py`, converted by both `mlx_lm.convert` (mlx-lm 0.32.2 on
//! mlx[cpu] 0.32.4) and `mlxq convert --flavour cpu`, and compared: every tensor bit for bit,
//! the quantization block equivalent, the rest of config.json equal. mlx_lm then generates from
//! both directories, and MLX's matmuls on mlx_lm's directory are checked against mlxq's.
//!
//! Python is found through `MLXQ_PYTHON` (set by `.ci/run`). Unset, the tests print why and
//! pass without running, except under CI (`CI=true`), where that is a failure.

use mlxq::io::{ModelDir, ModuleWeight, QuantConfig};
use mlxq::{ops, Buffer, DType, Device};
use std::path::{Path, PathBuf};
use std::process::Command;

fn python() -> Option<PathBuf> {
    match std::env::var_os("MLXQ_PYTHON") {
        Some(p) if !p.is_empty() => Some(PathBuf::from(p)),
        _ => {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("MLXQ_PYTHON is not set under CI: .ci/run must install mlx-lm and set it");
            }
            eprintln!(
                "skipped: MLXQ_PYTHON is not set (a Python with mlx[cpu]==0.32.4 and mlx-lm==0.32.2)"
            );
            None
        }
    }
}

fn oracle() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tools/mlx_lm_oracle.py")
}

fn scratch(test: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("cli_model-{test}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn py(python: &Path, args: &[&str]) -> String {
    run(Command::new(python).arg(oracle()).args(args))
}

fn mlxq(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_mlxq"))
        .args(args)
        .output()
        .expect("run mlxq")
}

fn mlxq_ok(args: &[&str]) -> String {
    run(Command::new(env!("CARGO_BIN_EXE_mlxq")).args(args))
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn open(dir: &Path) -> ModelDir {
    // SAFETY: the test's files are not modified while mapped.
    unsafe { ModelDir::open(dir) }.unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

fn config(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap()
}

/// Both directories hold the same tensors, bit for bit, and equivalent configs.
fn assert_same_model(theirs: &Path, ours: &Path) {
    let (a, b) = (open(theirs), open(ours));
    assert_eq!(a.tensor_names(), b.tensor_names(), "tensor names");
    for n in a.tensor_names() {
        let (x, y) = (a.tensor(n).unwrap(), b.tensor(n).unwrap());
        assert_eq!(
            (x.dtype(), x.shape()),
            (y.dtype(), y.shape()),
            "{n}: dtype and shape"
        );
        assert!(x.bytes() == y.bytes(), "{n}: bytes differ");
    }
    for (_, t) in b.shards() {
        assert_eq!(t.metadata().get("format").map(String::as_str), Some("mlx"));
    }
    let (ca, cb) = (config(theirs), config(ours));
    let qa = QuantConfig::from_config(&ca, Path::new("mlx_lm")).unwrap();
    let qb = QuantConfig::from_config(&cb, Path::new("mlxq")).unwrap();
    assert_eq!(qa, qb, "quantization blocks");
    let strip = |mut c: serde_json::Value| {
        let o = c.as_object_mut().unwrap();
        o.remove("quantization");
        o.remove("quantization_config");
        c
    };
    assert_eq!(
        strip(ca),
        strip(cb),
        "config.json outside the quantization block"
    );
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        assert!(ours.join(f).is_file(), "{f} not copied");
    }
    assert!(ours.join("model.safetensors.index.json").is_file());
}

struct Case {
    tag: &'static str,
    make: &'static [&'static str],
    mlx_lm: &'static [&'static str],
    mlxq: &'static [&'static str],
}

const CASES: &[Case] = &[
    Case {
        tag: "llama-q4",
        make: &["--arch", "llama"],
        mlx_lm: &["-q"],
        mlxq: &["-q"],
    },
    Case {
        tag: "llama-f32-sharded-q3g32",
        make: &[
            "--arch", "llama", "--dtype", "float32", "--shards", "3", "--seed", "1",
        ],
        mlx_lm: &["-q", "--q-bits", "3", "--q-group-size", "32"],
        mlxq: &["-q", "--bits", "3", "--group-size", "32"],
    },
    Case {
        tag: "llama-mixed_3_6-f16",
        make: &["--arch", "llama", "--seed", "2"],
        mlx_lm: &[
            "-q",
            "--quant-predicate",
            "mixed_3_6",
            "--q-group-size",
            "64",
            "--dtype",
            "float16",
        ],
        mlxq: &["-q", "--quant-predicate", "mixed_3_6", "--dtype", "float16"],
    },
    Case {
        tag: "mixtral-q4-sharded",
        make: &[
            "--arch", "mixtral", "--dtype", "float16", "--shards", "2", "--seed", "3",
        ],
        mlx_lm: &["-q"],
        mlxq: &["-q"],
    },
    Case {
        tag: "qwen3_moe-q6g128",
        make: &["--arch", "qwen3_moe", "--seed", "4"],
        mlx_lm: &["-q", "--q-bits", "6", "--q-group-size", "128"],
        mlxq: &["-q", "--bits", "6", "--group-size", "128"],
    },
    Case {
        tag: "mixtral-float",
        make: &["--arch", "mixtral", "--dtype", "float32", "--seed", "5"],
        mlx_lm: &["--dtype", "bfloat16"],
        mlxq: &["--dtype", "bfloat16"],
    },
    // MLX's FP modes (`--q-mode`): codes and uint8 scales, no biases; the Qwen3-MoE routers
    // stay affine 8-bit as mlx_lm keeps them.
    Case {
        tag: "llama-mxfp4",
        make: &["--arch", "llama", "--seed", "6"],
        mlx_lm: &["-q", "--q-mode", "mxfp4"],
        mlxq: &["-q", "--q-mode", "mxfp4"],
    },
    Case {
        tag: "qwen3_moe-nvfp4-f32",
        make: &["--arch", "qwen3_moe", "--dtype", "float32", "--seed", "7"],
        mlx_lm: &["-q", "--q-mode", "nvfp4"],
        mlxq: &["-q", "--mode", "nvfp4"],
    },
    Case {
        tag: "mixtral-mxfp8-f16",
        make: &["--arch", "mixtral", "--dtype", "float16", "--seed", "8"],
        mlx_lm: &["-q", "--q-mode", "mxfp8"],
        mlxq: &["-q", "--q-mode", "mxfp8"],
    },
];

/// The cases quantized to MLX's FP modes.
const FP_CASES: std::ops::Range<usize> = 6..9;

fn convert_both(python: &Path, root: &Path, c: &Case) -> (PathBuf, PathBuf, PathBuf) {
    let hf = root.join(format!("{}-hf", c.tag));
    let theirs = root.join(format!("{}-mlx_lm", c.tag));
    let ours = root.join(format!("{}-mlxq", c.tag));
    let mut make = vec!["make", s(&hf)];
    make.extend_from_slice(c.make);
    py(python, &make);
    let mut conv = vec!["convert", s(&hf), s(&theirs)];
    conv.extend_from_slice(c.mlx_lm);
    py(python, &conv);
    let mut ours_args = vec!["convert", s(&hf), s(&ours), "--flavour", "cpu"];
    ours_args.extend_from_slice(c.mlxq);
    mlxq_ok(&ours_args);
    (hf, theirs, ours)
}

#[test]
fn convert_matches_mlx_lm_bit_for_bit() {
    let Some(python) = python() else { return };
    let root = scratch("convert");
    for c in CASES {
        let (hf, theirs, ours) = convert_both(&python, &root, c);
        assert_same_model(&theirs, &ours);
        // A small shard limit splits the output; the tensors stay the same.
        let split = root.join(format!("{}-split", c.tag));
        let mut args = vec![
            "convert",
            s(&hf),
            s(&split),
            "--flavour",
            "cpu",
            "--max-shard-bytes",
            "300000",
        ];
        args.extend_from_slice(c.mlxq);
        mlxq_ok(&args);
        assert!(open(&split).shards().count() > 1, "{}: not split", c.tag);
        assert_same_model(&theirs, &split);
        if c.mlxq.contains(&"-q") {
            // verify against the original: consistent, and the error table lists every module.
            let out = mlxq_ok(&["verify", s(&ours), "--against", s(&hf), "--flavour", "cpu"]);
            let modules = open(&ours).quantized_modules().len();
            assert!(
                out.contains(&format!("{modules} quantized modules consistent")),
                "{out}"
            );
            assert!(out.contains("mean relative rms error"), "{out}");
        }
    }
    // The FP modes: inspect names the mode; mlx_lm's recipes are affine only, and so are ours.
    for c in &CASES[FP_CASES] {
        let ours = root.join(format!("{}-mlxq", c.tag));
        let spec = open(&ours).quantization().unwrap().default_spec();
        assert_ne!(spec.mode(), mlxq::QuantMode::Affine, "{}", c.tag);
        let out = mlxq_ok(&["inspect", s(&ours)]);
        assert!(out.contains(&format!("quantization: {spec}")), "{out}");
    }
    let hf = root.join(format!("{}-hf", CASES[FP_CASES.start].tag));
    let out = root.join("fp-recipe");
    let r = mlxq(&[
        "convert",
        s(&hf),
        s(&out),
        "-q",
        "--q-mode",
        "mxfp4",
        "--quant-predicate",
        "mixed_3_6",
    ]);
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        !r.status.success() && err.contains("mode") && err.contains("affine"),
        "{err}"
    );
    assert!(!out.exists());
}

#[test]
fn mlx_lm_generates_the_same_tokens_from_mlxq_output() {
    let Some(python) = python() else { return };
    let root = scratch("generate");
    for c in [&CASES[0], &CASES[3], &CASES[4], &CASES[6], &CASES[8]] {
        let (_, theirs, ours) = convert_both(&python, &root, c);
        let a = py(&python, &["generate", s(&theirs), "--tokens", "10"]);
        let b = py(&python, &["generate", s(&ours), "--tokens", "10"]);
        let tokens: Vec<u32> = serde_json::from_str(a.trim()).unwrap();
        assert_eq!(tokens.len(), 10, "{a}");
        assert_eq!(a, b, "{}: tokens differ", c.tag);
    }
}

/// max |got − want| / max |want| ([`mlxq::reference::max_rel_err`]: infinite where an output
/// is NaN against a number).
fn relative_error(got: &Buffer, want: &Buffer) -> f64 {
    let f64s =
        |b: &Buffer| -> Vec<f64> { b.to_f32_vec().unwrap().into_iter().map(f64::from).collect() };
    mlxq::reference::max_rel_err(&f64s(got), &f64s(want))
}

#[test]
fn mlxq_matmuls_on_mlx_lm_output_agree_with_mlx() {
    let Some(python) = python() else { return };
    let root = scratch("matmul");
    for c in [&CASES[2], &CASES[3], &CASES[4]]
        .into_iter()
        .chain(&CASES[FP_CASES])
    {
        let (_, theirs, _) = convert_both(&python, &root, c);
        let fx = root.join(format!("{}-matmul.safetensors", c.tag));
        py(&python, &["matmul", s(&theirs), s(&fx)]);
        let want = mlxq::io::load(&fx).unwrap();
        let m = open(&theirs);
        let device = Device::cpu();
        let mut enc = device.encoder();
        let mut checked = 0;
        for module in m.quantized_modules().keys() {
            let (Some(x), Some(y)) = (
                want.get(&format!("{module}.x")),
                want.get(&format!("{module}.y")),
            ) else {
                panic!("{module}: MLX computed nothing")
            };
            let ModuleWeight::Quantized(w) = m.weight(module).unwrap() else {
                panic!("{module}: not quantized")
            };
            let got = match want.get(&format!("{module}.indices")) {
                Some(idx) => {
                    ops::gather_qmm(&mut enc, x, &w, None, Some(idx), true, false).unwrap()
                }
                None => ops::quantized_matmul(&mut enc, x, &w, true).unwrap(),
            };
            enc.commit_and_wait().unwrap();
            assert_eq!(got.shape(), y.shape(), "{module}");
            let tol = if y.dtype() == DType::F32 { 1e-5 } else { 1e-2 };
            let e = relative_error(&got, y);
            assert!(e <= tol, "{}: {module}: relative error {e} > {tol}", c.tag);
            checked += 1;
        }
        assert_eq!(checked, m.quantized_modules().len());
    }
}

#[test]
fn inspect_and_dequantize_directories() {
    let Some(python) = python() else { return };
    let root = scratch("inspect");
    let (hf, theirs, _) = convert_both(&python, &root, &CASES[4]);
    let out = mlxq_ok(&["inspect", s(&theirs)]);
    assert!(
        out.contains("quantization: affine 6-bit group 128"),
        "{out}"
    );
    assert!(out.contains("affine 8-bit group 64: 4 modules"), "{out}");
    assert!(
        out.contains("model.layers.0.mlp.switch_mlp.up_proj"),
        "{out}"
    );
    // mlxq dequantize DIR = mlx_lm.convert -d, bit for bit (both on MLX's CPU).
    let ours = root.join("deq-mlxq");
    let theirs_deq = root.join("deq-mlx_lm");
    mlxq_ok(&["dequantize", s(&theirs), s(&ours), "--flavour", "cpu"]);
    py(&python, &["convert", s(&theirs), s(&theirs_deq), "-d"]);
    assert_same_model(&theirs_deq, &ours);
    assert!(open(&ours).quantization().is_none());
    // Float in, the same names as the original after mlx_lm's renames.
    let _ = hf;
}

#[test]
fn failed_convert_leaves_no_directory() {
    let root = scratch("failed");
    let hf = root.join("hf");
    std::fs::create_dir_all(&hf).unwrap();
    std::fs::write(
        hf.join("config.json"),
        r#"{"model_type": "llama", "tie_word_embeddings": false}"#,
    )
    .unwrap();
    // A header that claims more data than the file has.
    let header = br#"{"model.norm.weight":{"dtype":"F32","shape":[1024],"data_offsets":[0,4096]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    bytes.extend_from_slice(&[0u8; 100]);
    std::fs::write(hf.join("model.safetensors"), bytes).unwrap();
    let out = root.join("out");
    let r = mlxq(&["convert", s(&hf), s(&out), "-q"]);
    assert!(!r.status.success());
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(err.contains("truncated"), "{err}");
    let left: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        left,
        vec![std::ffi::OsString::from("hf")],
        "left behind: {left:?}"
    );
    // An unsupported architecture fails before writing anything, naming what is supported.
    std::fs::write(hf.join("config.json"), r#"{"model_type": "gpt2"}"#).unwrap();
    let r = mlxq(&["convert", s(&hf), s(&out), "-q"]);
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        err.contains("gpt2") && err.contains("supported: llama"),
        "{err}"
    );
    assert!(!out.exists());
}
