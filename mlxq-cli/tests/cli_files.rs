//! `mlxq quantize`, `dequantize` and `inspect`, run as the built binary, against files MLX wrote.
//!
//! `tests/fixtures/` comes from `tools/gen_cli_fixture.py` (mlx 0.32.4, CPU): the CPU flavour must
//! match MLX byte for byte, whole files included. MLX's CUDA fixtures in
//! `mlxq/tests/fixtures/mlx-0.32.4-cuda/` check the GPU flavour.

use mlxq::io::{self, Tensors};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const CONFIGS: [(u32, u32); 7] = [
    (4, 64),
    (3, 32),
    (8, 128),
    (2, 64),
    (5, 32),
    (6, 128),
    (1, 32),
];

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// A fresh scratch directory for one test.
fn scratch(test: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("cli_files-{test}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

fn mlxq(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mlxq"))
        .args(args)
        .output()
        .expect("run mlxq")
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Runs mlxq and requires success.
fn ok(args: &[&str]) -> String {
    let out = mlxq(args);
    assert!(
        out.status.success(),
        "mlxq {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs mlxq, requires failure with one line on stderr, and returns that line.
fn fails(args: &[&str]) -> String {
    let out = mlxq(args);
    assert!(!out.status.success(), "mlxq {args:?} succeeded");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
    assert!(err.starts_with("mlxq: error: "), "{err}");
    err
}

fn bytes(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn quantize_cpu_is_mlx_byte_for_byte() {
    let dir = scratch("quantize_cpu");
    let input = fixture("input.safetensors");
    for (bits, group) in CONFIGS {
        let out = dir.join(format!("b{bits}_g{group}.safetensors"));
        let (b, g) = (bits.to_string(), group.to_string());
        ok(&[
            "quantize",
            s(&input),
            s(&out),
            "--bits",
            &b,
            "--group-size",
            &g,
            "--flavour",
            "cpu",
        ]);
        let expected = fixture(&format!("mlx_cpu_b{bits}_g{group}.safetensors"));
        assert!(
            bytes(&out) == bytes(&expected),
            "b{bits} g{group}: differs from MLX's file"
        );
    }
}

#[test]
fn dequantize_cpu_is_mlx_byte_for_byte() {
    let dir = scratch("dequantize_cpu");
    for ((bits, group), dtype) in [
        ((4, 64), None),
        ((3, 32), Some("f32")),
        ((6, 128), Some("f16")),
    ] {
        let input = fixture(&format!("mlx_cpu_b{bits}_g{group}.safetensors"));
        let out = dir.join(format!("b{bits}_g{group}.safetensors"));
        let g = group.to_string();
        let mut args = vec![
            "dequantize",
            s(&input),
            s(&out),
            "--group-size",
            &g,
            "--flavour",
            "cpu",
        ];
        if let Some(d) = dtype {
            args.extend(["--dtype", d]);
        }
        ok(&args);
        let suffix = dtype.map_or(String::new(), |d| format!("_{d}"));
        let expected = fixture(&format!(
            "mlx_cpu_b{bits}_g{group}.dequant{suffix}.safetensors"
        ));
        assert!(
            bytes(&out) == bytes(&expected),
            "b{bits} g{group} {dtype:?}: differs from MLX's file"
        );
    }
}

#[test]
fn fp_modes_are_mlx_cpu_byte_for_byte() {
    // Quantize with the mode's own bits and group size (no --bits or --group-size needed), then
    // dequantize MLX's file; both must equal MLX's files (tools/gen_cli_fixture.py).
    let dir = scratch("fp_modes");
    let input = fixture("input.safetensors");
    for (mode, dtype) in [
        ("mxfp4", None),
        ("nvfp4", Some("f32")),
        ("mxfp8", Some("f16")),
    ] {
        let out = dir.join(format!("{mode}.safetensors"));
        ok(&[
            "quantize",
            s(&input),
            s(&out),
            "--mode",
            mode,
            "--flavour",
            "cpu",
        ]);
        let expected = fixture(&format!("mlx_cpu_{mode}.safetensors"));
        assert!(
            bytes(&out) == bytes(&expected),
            "{mode}: differs from MLX's file"
        );
        let deq = dir.join(format!("{mode}.dequant.safetensors"));
        let mut args = vec!["dequantize", s(&expected), s(&deq), "--flavour", "cpu"];
        if let Some(d) = dtype {
            args.extend(["--dtype", d]);
        }
        ok(&args);
        let suffix = dtype.map_or(String::new(), |d| format!("_{d}"));
        let expected = fixture(&format!("mlx_cpu_{mode}.dequant{suffix}.safetensors"));
        assert!(
            bytes(&deq) == bytes(&expected),
            "{mode} {dtype:?}: dequantized differs from MLX's file"
        );
    }
}

#[test]
fn gpu_round_trip_keeps_names_dtypes_and_shapes() {
    let dir = scratch("roundtrip");
    let (q, d) = (dir.join("q.safetensors"), dir.join("d.safetensors"));
    let input = fixture("input.safetensors");
    let out = ok(&["quantize", s(&input), s(&q)]);
    assert!(out.contains("quantized 8 of 16 tensors"), "{out}");
    ok(&["dequantize", s(&q), s(&d)]);
    let (a, b) = (io::load(&input).unwrap(), io::load(&d).unwrap());
    assert_eq!(b.metadata().get("format").map(String::as_str), Some("mlx"));
    let mut names: Vec<&str> = a.names().collect();
    names.sort_unstable();
    let mut back: Vec<&str> = b.names().collect();
    back.sort_unstable();
    assert_eq!(names, back);
    for (name, t) in a.iter() {
        let u = b.get(name).unwrap();
        assert_eq!((t.dtype(), t.shape()), (u.dtype(), u.shape()), "{name}");
        if t.dtype().is_float() {
            // 4-bit: no element moves by more than one step of the tensor's whole range.
            let (x, y) = (t.to_f32_vec().unwrap(), u.to_f32_vec().unwrap());
            let err = x
                .iter()
                .zip(&y)
                .map(|(p, q)| (p - q).abs())
                .fold(0f32, f32::max);
            let (lo, hi) = x
                .iter()
                .fold((0f32, 0f32), |(l, h), &v| (l.min(v), h.max(v)));
            assert!(err <= (hi - lo) / 15.0, "{name}: max error {err}");
        } else {
            assert_eq!(t.bytes(), u.bytes(), "{name}");
        }
    }
}

#[test]
fn inspect_lists_tensors_and_modules() {
    let file = fixture("mlx_cpu_b3_g32.safetensors");
    let out = ok(&["inspect", s(&file), "--group-size", "32"]);
    for want in [
        "model.layers.0.mlp.switch_mlp.up_proj.scales",
        "float16",
        "[2, 8, 4]",
        "model.layers.0.conv.weight",
        "metadata: format=mlx",
        "34 tensors",
        "9 quantized modules",
    ] {
        assert!(out.contains(want), "missing {want:?} in\n{out}");
    }
    let row = out
        .lines()
        .find(|l| l.starts_with("model.layers.0.self_attn.q_proj "))
        .unwrap_or_default();
    let cols: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(
        cols,
        [
            "model.layers.0.self_attn.q_proj",
            "affine",
            "3",
            "32",
            "float32",
            "[8,",
            "256]",
            "5.000"
        ]
    );
    // With the wrong group size, modules are flagged with the group sizes that would fit.
    let out = ok(&["inspect", s(&file)]);
    assert!(out.contains("try --group-size 32 (3 bits)"), "{out}");
}

#[test]
fn help_explains_every_command() {
    let out = ok(&["quantize", "--help"]);
    for want in [
        "--bits",
        "--group-size",
        "--mode",
        "--flavour",
        "Metal/CUDA",
        "mx.quantize",
    ] {
        assert!(out.contains(want), "quantize --help lacks {want:?}");
    }
    for cmd in ["dequantize", "inspect"] {
        assert!(
            ok(&[cmd, "--help"]).contains("--group-size"),
            "{cmd} --help"
        );
    }
}

#[test]
fn bad_input_fails_with_one_clear_line() {
    let dir = scratch("bad");
    let input = fixture("input.safetensors");
    let out = dir.join("out.safetensors");
    let q = |extra: &[&str]| {
        let mut args = vec!["quantize", s(&input), s(&out)];
        args.extend(extra);
        fails(&args)
    };
    let e = q(&["--bits", "7"]);
    assert!(e.contains("bits") && e.contains("got 7"), "{e}");
    let e = q(&["--group-size", "16"]);
    assert!(e.contains("group_size") && e.contains("got 16"), "{e}");
    let e = q(&["--mode", "mxfp4", "--group-size", "64"]);
    assert!(
        e.contains("group_size") && e.contains("32 for mxfp4") && e.contains("got 64"),
        "{e}"
    );
    let e = q(&["--mode", "nvfp4", "--bits", "8"]);
    assert!(e.contains("bits") && e.contains("4 for nvfp4"), "{e}");
    let e = q(&["--mode", "fp4"]);
    assert!(e.contains("--mode") && e.contains("fp4"), "{e}");

    let missing = dir.join("missing.safetensors");
    let e = fails(&["quantize", s(&missing), s(&out)]);
    assert!(
        e.contains("missing.safetensors") && e.contains("No such file"),
        "{e}"
    );
    assert_eq!(e.matches("No such file").count(), 1, "{e}");

    let truncated = dir.join("truncated.safetensors");
    let full = bytes(&input);
    std::fs::write(&truncated, &full[..full.len() - 100]).unwrap();
    for cmd in ["quantize", "dequantize"] {
        let e = fails(&[cmd, s(&truncated), s(&out)]);
        assert!(e.contains("truncated.safetensors: truncated"), "{e}");
    }
    let e = fails(&["inspect", s(&truncated)]);
    assert!(e.contains("truncated"), "{e}");
    std::fs::write(&truncated, &full[..20]).unwrap();
    let e = fails(&["inspect", s(&truncated)]);
    assert!(e.contains("header length") && e.contains("exceeds"), "{e}");

    let e = fails(&[
        "dequantize",
        s(&fixture("mlx_cpu_b3_g32.safetensors")),
        s(&out),
    ]);
    assert!(e.contains("group_size") && e.contains("got 64"), "{e}");

    let nowhere = dir.join("no/such/dir/out.safetensors");
    let e = fails(&["quantize", s(&input), s(&nowhere)]);
    assert!(e.contains("no/such/dir/out.safetensors"), "{e}");

    // No failure left an output, or a temporary file, behind.
    let mut left: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["truncated.safetensors"]);
}

/// MLX's CUDA fixtures (the affine set committed with the library's tests).
fn cuda_fixtures() -> Option<PathBuf> {
    let dir = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../mlxq/tests/fixtures/mlx-0.32.4-cuda"
    ));
    assert!(dir.is_dir(), "{} is missing", dir.display());
    Some(dir)
}

const CUDA_TAGS: [(&str, u32, u32); 4] = [
    ("float32_affine_b4_g64", 4, 64),
    ("bfloat16_affine_b3_g32", 3, 32),
    ("float16_affine_b8_g128", 8, 128),
    ("bfloat16_affine_b5_g64", 5, 64),
];

fn assert_same_tensors(a: &Tensors, b: &Tensors, what: &str) {
    let mut names: Vec<&str> = a.names().collect();
    names.sort_unstable();
    let mut other: Vec<&str> = b.names().collect();
    other.sort_unstable();
    assert_eq!(names, other, "{what}: names");
    for (name, t) in a.iter() {
        let u = b.get(name).unwrap();
        assert!(
            (t.dtype(), t.shape(), t.bytes()) == (u.dtype(), u.shape(), u.bytes()),
            "{what}: {name} differs"
        );
    }
}

#[test]
fn quantize_gpu_matches_mlx_cuda_tensors() {
    let Some(cuda) = cuda_fixtures() else { return };
    let dir = scratch("quantize_gpu");
    for (tag, bits, group) in CUDA_TAGS {
        let input = cuda.join(format!("{tag}.in.safetensors"));
        let (q, d) = (dir.join(format!("{tag}.q")), dir.join(format!("{tag}.d")));
        let (b, g) = (bits.to_string(), group.to_string());
        // The default flavour is gpu.
        ok(&[
            "quantize",
            s(&input),
            s(&q),
            "--bits",
            &b,
            "--group-size",
            &g,
        ]);
        let expected = io::load(cuda.join(format!("{tag}.expected.safetensors"))).unwrap();
        assert_same_tensors(&io::load(&q).unwrap(), &expected, tag);
        ok(&[
            "dequantize",
            s(&cuda.join(format!("{tag}.expected.safetensors"))),
            s(&d),
            "--group-size",
            &g,
        ]);
        let dequant = io::load(cuda.join(format!("{tag}.dequant.safetensors"))).unwrap();
        assert_same_tensors(&io::load(&d).unwrap(), &dequant, tag);
    }
}

/// MLX's CUDA build writes files with the same writer: saving the tensors of each of its files
/// in the generator's dict order (case0, case1, ... each weight, scales, biases) reproduces the
/// file byte for byte.
#[test]
fn save_reproduces_mlx_cuda_files() {
    let Some(cuda) = cuda_fixtures() else { return };
    let dir = scratch("save_cuda");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&cuda)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    assert!(files.len() >= 9, "{} files", files.len());
    let case = |n: &str| -> usize {
        n.trim_start_matches("case")
            .split('_')
            .next()
            .and_then(|i| i.parse().ok())
            .unwrap_or(usize::MAX)
    };
    let part = |n: &str| {
        ["weight", "scales", "biases"]
            .iter()
            .position(|p| n.ends_with(p))
    };
    for path in files {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let t = io::load(&path).unwrap();
        let mut names: Vec<&str> = t.names().collect();
        names.sort_by_key(|n| (case(n), part(n)));
        let mut again = Tensors::new();
        for n in names {
            again.insert(n, t.get(n).unwrap().clone()).unwrap();
        }
        *again.metadata_mut() = t.metadata().clone();
        let out = dir.join(&name);
        io::save(&out, &again).unwrap();
        assert!(
            bytes(&out) == bytes(&path),
            "{name}: differs from MLX's file"
        );
    }
}
