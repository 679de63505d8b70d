//! `io::ModelDir`: reading MLX model directories (config.json + single or sharded safetensors),
//! and the errors for directories that are broken in the ways real ones are.
//!
//! The directories are made here with mlxq's own quantize and writer (whose bytes match MLX's,
//! see the io tests); `mlxq-cli/tests/cli_model.rs` reads directories made by mlx_lm itself.

use mlxq::io::{self, ModelDir, ModuleQuant, ModuleWeight, QuantConfig, Tensors};
use mlxq::{ops, Buffer, DType, Device, Flavour, QuantSpec};
use serde_json::json;
use std::path::{Path, PathBuf};

struct Dir(PathBuf);

impl Dir {
    fn new(tag: &str) -> Dir {
        let p = std::env::temp_dir().join(format!("mlxq-model-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Dir(p)
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn weight(rows: usize, cols: usize, seed: usize) -> Buffer {
    let v: Vec<f32> = (0..rows * cols)
        .map(|i| (((i + seed) * 7919) % 1013) as f32 / 506.0 - 1.0)
        .collect();
    Buffer::from_f32(&v, DType::BF16, &[rows, cols]).unwrap()
}

fn quantize(t: &mut Tensors, module: &str, w: &Buffer, spec: QuantSpec) {
    let device = Device::cpu();
    let mut enc = device.encoder();
    let qw = ops::quantize(&mut enc, w, spec, Flavour::Cpu).unwrap();
    t.insert(format!("{module}.weight"), qw.packed().clone())
        .unwrap();
    t.insert(format!("{module}.scales"), qw.scales().clone())
        .unwrap();
    t.insert(format!("{module}.biases"), qw.biases().unwrap().clone())
        .unwrap();
}

/// A small quantized model: a 4-bit q_proj with a Linear bias, an 8-bit router (per-module
/// entry), a 4-expert stack, a quantized embedding (tied head) and a float norm.
fn model() -> (Tensors, serde_json::Value) {
    let s4 = QuantSpec::affine(4, 64).unwrap();
    let s8 = QuantSpec::affine(8, 64).unwrap();
    let mut t = Tensors::new();
    quantize(&mut t, "model.embed_tokens", &weight(32, 128, 1), s4);
    quantize(
        &mut t,
        "model.layers.0.self_attn.q_proj",
        &weight(64, 128, 2),
        s4,
    );
    t.insert(
        "model.layers.0.self_attn.q_proj.bias",
        Buffer::from_f32(&[0.5; 64], DType::BF16, &[64]).unwrap(),
    )
    .unwrap();
    quantize(&mut t, "model.layers.0.mlp.gate", &weight(4, 128, 3), s8);
    let experts = weight(4 * 64, 128, 4).reshape(&[4, 64, 128]).unwrap();
    quantize(
        &mut t,
        "model.layers.0.mlp.switch_mlp.up_proj",
        &experts,
        s4,
    );
    t.insert(
        "model.norm.weight",
        Buffer::from_f32(&[1.0; 128], DType::BF16, &[128]).unwrap(),
    )
    .unwrap();
    t.metadata_mut().insert("format".into(), "mlx".into());
    let config = json!({
        "model_type": "mixtral",
        "tie_word_embeddings": true,
        "quantization": {
            "group_size": 64, "bits": 4, "mode": "affine",
            "model.layers.0.mlp.gate": {"group_size": 64, "bits": 8, "mode": "affine"}
        },
    });
    (t, config)
}

fn write_config(dir: &Path, config: &serde_json::Value) {
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
}

/// Writes `t` as `shards` files with an index (or one `model.safetensors` without).
fn write_model(dir: &Path, t: &Tensors, config: &serde_json::Value, shards: usize) {
    write_config(dir, config);
    if shards == 1 {
        io::save(dir.join("model.safetensors"), t).unwrap();
        return;
    }
    let names: Vec<&str> = t.names().collect();
    let mut map = serde_json::Map::new();
    for s in 0..shards {
        let file = format!("model-{:05}-of-{shards:05}.safetensors", s + 1);
        let mut part = Tensors::new();
        for n in names.iter().skip(s).step_by(shards) {
            part.insert(*n, t.get(n).unwrap().clone()).unwrap();
            map.insert(n.to_string(), file.clone().into());
        }
        io::save(dir.join(&file), &part).unwrap();
    }
    let index = json!({"metadata": {"total_size": t.nbytes()}, "weight_map": map});
    std::fs::write(dir.join(io::INDEX_FILE), index.to_string()).unwrap();
}

fn open(dir: &Path) -> mlxq::Result<ModelDir> {
    // SAFETY: the test owns the files and does not modify them while mapped.
    unsafe { ModelDir::open(dir) }
}

fn open_err(dir: &Path) -> String {
    let e = open(dir).unwrap_err();
    e.to_string()
}

#[test]
fn reads_single_and_sharded_directories() {
    let (t, config) = model();
    for shards in [1, 3] {
        let d = Dir::new(&format!("ok{shards}"));
        write_model(d.path(), &t, &config, shards);
        let m = open(d.path()).unwrap();
        assert_eq!(m.shards().count(), shards);
        assert_eq!(m.tensor_names().len(), t.len());
        let specs: Vec<(String, QuantSpec)> = m
            .quantized_modules()
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        let s4 = QuantSpec::affine(4, 64).unwrap();
        assert_eq!(
            specs,
            vec![
                ("model.embed_tokens".to_string(), s4),
                (
                    "model.layers.0.mlp.gate".to_string(),
                    QuantSpec::affine(8, 64).unwrap()
                ),
                ("model.layers.0.mlp.switch_mlp.up_proj".to_string(), s4),
                ("model.layers.0.self_attn.q_proj".to_string(), s4),
            ]
        );
        // Zero-copy: every tensor is a view of a shard's map.
        assert!(m
            .tensor_names()
            .iter()
            .all(|n| m.tensor(n).unwrap().is_mapped()));
        // The expert stack keeps its [E, N, K] shape; bits come from shapes with config's group.
        let ModuleWeight::Quantized(up) =
            m.weight("model.layers.0.mlp.switch_mlp.up_proj").unwrap()
        else {
            panic!("not quantized")
        };
        assert_eq!(up.shape(), &[4, 64, 128]);
        // The Linear's bias is its own tensor, apart from the quantization biases.
        let q = "model.layers.0.self_attn.q_proj";
        assert_eq!(m.bias(q).unwrap().shape(), &[64]);
        let ModuleWeight::Quantized(qw) = m.weight(q).unwrap() else {
            panic!("not quantized")
        };
        assert_eq!(qw.biases().unwrap().shape(), &[64, 2]);
        // Same bytes as written.
        assert_eq!(
            qw.packed().bytes(),
            t.get(&format!("{q}.weight")).unwrap().bytes()
        );
        let ModuleWeight::Dense(norm) = m.weight("model.norm").unwrap() else {
            panic!("norm quantized")
        };
        assert_eq!(norm.dtype(), DType::BF16);
        assert!(m.bias("model.norm").is_none());
        // Tied head: the quantized embedding.
        assert_eq!(m.output_head(), Some("model.embed_tokens"));
    }
}

#[test]
fn quantization_block_is_found_where_mlx_lm_looks() {
    let (t, config) = model();
    let block = config["quantization"].clone();
    for (tag, cfg) in [
        (
            "qc",
            json!({"model_type": "x", "quantization_config": block}),
        ),
        (
            "text",
            json!({"model_type": "x", "text_config": {"quantization": block}}),
        ),
    ] {
        let d = Dir::new(tag);
        write_model(d.path(), &t, &cfg, 1);
        let m = open(d.path()).unwrap();
        let q = m.quantization().unwrap();
        assert_eq!(q.default_spec(), QuantSpec::affine(4, 64).unwrap());
        assert_eq!(q.modules().len(), 1);
        assert_eq!(m.quantized_modules().len(), 4);
    }
    // Missing fields take the mode's defaults, as mlx_lm's to_quantized does.
    let q = QuantConfig::from_config(
        &json!({"quantization": {"group_size": 32, "bits": 3, "a": {"bits": 8}, "b": false}}),
        Path::new("config.json"),
    )
    .unwrap()
    .unwrap();
    assert_eq!(q.default_spec(), QuantSpec::affine(3, 32).unwrap());
    assert_eq!(
        q.module("a"),
        ModuleQuant::Quantize(QuantSpec::affine(8, 64).unwrap())
    );
    assert_eq!(q.module("b"), ModuleQuant::Skip);
    assert_eq!(
        q.module("c"),
        ModuleQuant::Quantize(QuantSpec::affine(3, 32).unwrap())
    );
    // Round trip through the JSON mlxq writes.
    let again = QuantConfig::from_config(&json!({"quantization": q.to_json()}), Path::new("c"))
        .unwrap()
        .unwrap();
    assert_eq!(again, q);
}

/// A directory made by `f` from the good model fails to open with a message containing every
/// one of `want`.
fn broken(
    tag: &str,
    shards: usize,
    f: impl FnOnce(&Path, &mut Tensors, &mut serde_json::Value),
    want: &[&str],
) {
    let d = Dir::new(tag);
    let (mut t, mut config) = model();
    write_model(d.path(), &t, &config, shards);
    f(d.path(), &mut t, &mut config);
    let e = open_err(d.path());
    for w in want {
        assert!(e.contains(w), "{tag}: {e:?} lacks {w:?}");
    }
}

fn rewrite(dir: &Path, t: &Tensors) {
    io::save(dir.join("model.safetensors"), t).unwrap();
}

fn without(t: &Tensors, name: &str) -> Tensors {
    let mut out = Tensors::new();
    for (n, b) in t.iter() {
        if n != name {
            out.insert(n, b.clone()).unwrap();
        }
    }
    out
}

#[test]
fn missing_shard() {
    broken(
        "missing",
        3,
        |d, _, _| std::fs::remove_file(d.join("model-00002-of-00003.safetensors")).unwrap(),
        &[
            "model.safetensors.index.json",
            "shard model-00002-of-00003.safetensors is missing",
        ],
    );
}

#[test]
fn index_names_a_tensor_no_shard_has() {
    broken(
        "ghost",
        3,
        |d, _, _| {
            let p = d.join(io::INDEX_FILE);
            let mut v: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
            v["weight_map"]["model.layers.9.ghost.weight"] = "model-00001-of-00003.safetensors".into();
            std::fs::write(&p, v.to_string()).unwrap();
        },
        &["tensor model.layers.9.ghost.weight is in no shard (the index names model-00001-of-00003.safetensors)"],
    );
    broken(
        "moved",
        3,
        |d, _, _| {
            let p = d.join(io::INDEX_FILE);
            let mut v: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
            v["weight_map"]["model.norm.weight"] = "model-00003-of-00003.safetensors".into();
            std::fs::write(&p, v.to_string()).unwrap();
        },
        &[
            "tensor model.norm.weight is in",
            "not in model-00003-of-00003.safetensors as the index says",
        ],
    );
}

#[test]
fn truncated_file() {
    broken(
        "truncated",
        1,
        |d, _, _| {
            let p = d.join("model.safetensors");
            let bytes = std::fs::read(&p).unwrap();
            std::fs::write(&p, &bytes[..bytes.len() - 10]).unwrap();
        },
        &["model.safetensors", "truncated: the header describes"],
    );
}

#[test]
fn header_longer_than_file() {
    broken(
        "header",
        1,
        |d, _, _| {
            let p = d.join("model.safetensors");
            let bytes = std::fs::read(&p).unwrap();
            std::fs::write(&p, &bytes[..100]).unwrap();
        },
        &["model.safetensors", "exceeds the 92 bytes after it"],
    );
}

#[test]
fn bits_from_shapes_contradict_the_config() {
    // The router is 8-bit; without its per-module entry the config says 4.
    broken(
        "bits",
        1,
        |d, _, c| {
            c["quantization"]
                .as_object_mut()
                .unwrap()
                .remove("model.layers.0.mlp.gate");
            write_config(d, c);
        },
        &[
            "model.layers.0.mlp.gate",
            "give affine 8-bit group 64, but config.json says affine 4-bit group 64",
        ],
    );
    // Another group size: the shapes then give other bits than the config's.
    broken(
        "group",
        1,
        |d, _, c| {
            c["quantization"]["group_size"] = 128.into();
            c["quantization"]["model.layers.0.mlp.gate"]["group_size"] = 128.into();
            write_config(d, c);
        },
        &["give affine 2-bit group 128, but config.json says affine 4-bit group 128"],
    );
}

#[test]
fn dtypes_contradict_the_config() {
    // Affine config, but the module's scales are uint8 without biases (an FP-mode tensor).
    broken(
        "dtype",
        1,
        |d, t, _| {
            let q = "model.layers.0.self_attn.q_proj";
            let mut t2 = without(&without(t, &format!("{q}.scales")), &format!("{q}.biases"));
            t2.insert(
                format!("{q}.scales"),
                Buffer::zeros(DType::U8, &[64, 4]).unwrap(),
            )
            .unwrap();
            rewrite(d, &t2);
        },
        &[
            "model.layers.0.self_attn.q_proj",
            "uint8",
            "config.json says affine 4-bit group 64",
        ],
    );
    // Biases of another dtype than the scales.
    broken(
        "biases",
        1,
        |d, t, _| {
            let q = "model.layers.0.self_attn.q_proj";
            let mut t2 = without(t, &format!("{q}.biases"));
            t2.insert(
                format!("{q}.biases"),
                Buffer::zeros(DType::F32, &[64, 2]).unwrap(),
            )
            .unwrap();
            rewrite(d, &t2);
        },
        &["model.layers.0.self_attn.q_proj", "biases", "float32"],
    );
    // Packed weight without scales.
    broken(
        "noscales",
        1,
        |d, t, _| rewrite(d, &without(t, "model.embed_tokens.scales")),
        &["model.embed_tokens.weight is uint32 (packed) but model.embed_tokens.scales is in no shard"],
    );
}

#[test]
fn config_contradicts_the_tensors() {
    broken(
        "noblock",
        1,
        |d, _, c| {
            c.as_object_mut().unwrap().remove("quantization");
            write_config(d, c);
        },
        &["config.json", "no quantization block, but"],
    );
    broken(
        "false",
        1,
        |d, _, c| {
            c["quantization"]["model.layers.0.mlp.gate"] = false.into();
            write_config(d, c);
        },
        &["quantization.model.layers.0.mlp.gate is false, but model.layers.0.mlp.gate is quantized"],
    );
    broken(
        "unquantized",
        1,
        |d, _, c| {
            c["quantization"]["model.norm"] = json!({"bits": 4, "group_size": 64});
            write_config(d, c);
        },
        &["quantization.model.norm quantizes model.norm, but model.norm.scales is in no shard"],
    );
    broken(
        "badjson",
        1,
        |d, _, _| std::fs::write(d.join("config.json"), "{oops").unwrap(),
        &["config.json", "not valid JSON"],
    );
    broken(
        "noconfig",
        1,
        |d, _, _| std::fs::remove_file(d.join("config.json")).unwrap(),
        &["config.json"],
    );
    broken(
        "nofiles",
        1,
        |d, _, _| std::fs::remove_file(d.join("model.safetensors")).unwrap(),
        &["no safetensors files"],
    );
}
