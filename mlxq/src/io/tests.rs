//! Round trips, MLX's exact bytes, malformed files, and quantized-module assembly.

use super::*;
use crate::{ops, DType, Device, Flavour, QuantSpec};
use half::bf16;
use std::path::PathBuf;

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("mlxq-io-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    fn file(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
    fn entries(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&self.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The tensors of `golden()`, in the Python dict's order.
fn sample() -> Tensors {
    let mut t = Tensors::new();
    let ones = vec![bf16::ONE; 15];
    t.insert("z.weight", Buffer::from_slice(&ones, &[3, 5]).unwrap())
        .unwrap();
    t.insert(
        "A.bias",
        Buffer::from_slice(&[0f32, 1.0, 2.0], &[3]).unwrap(),
    )
    .unwrap();
    t.insert("m.scales", Buffer::from_slice(&[1u8, 2], &[2]).unwrap())
        .unwrap();
    t.insert(
        "b.q",
        Buffer::from_slice(&[1u32, 2, 3, 4, 5, 6], &[2, 3]).unwrap(),
    )
    .unwrap();
    t.insert("0.i", Buffer::from_slice(&[-1i32], &[1]).unwrap())
        .unwrap();
    t.metadata_mut().insert("format".into(), "mlx".into());
    t.metadata_mut().insert("a\"b".into(), "c\nd".into());
    t
}

/// What `mx.save_safetensors("g.safetensors", sample, metadata=...)` wrote (MLX 0.32.4, Linux).
fn golden() -> Vec<u8> {
    let header = r#"{"0.i":{"data_offsets":[0,4],"dtype":"I32","shape":[1]},"A.bias":{"data_offsets":[30,42],"dtype":"F32","shape":[3]},"__metadata__":{"a\"b":"c\nd","format":"mlx"},"b.q":{"data_offsets":[4,28],"dtype":"U32","shape":[2,3]},"m.scales":{"data_offsets":[28,30],"dtype":"U8","shape":[2]},"z.weight":{"data_offsets":[42,72],"dtype":"BF16","shape":[3,5]}}"#;
    let data = "ffffffff0100000002000000030000000400000005000000060000000102000000000000803f00000040803f803f803f803f803f803f803f803f803f803f803f803f803f803f803f";
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend(
        (0..data.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&data[i..i + 2], 16).unwrap()),
    );
    out
}

#[test]
fn save_writes_mlx_bytes() {
    let dir = TempDir::new("golden");
    let path = dir.file("g.safetensors");
    save(&path, &sample()).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), golden());
    // Nothing but the file is left behind.
    assert_eq!(dir.entries(), vec!["g.safetensors".to_string()]);
}

#[test]
fn no_metadata_is_null() {
    let dir = TempDir::new("null");
    let path = dir.file("e.safetensors");
    save(&path, &Tensors::new()).unwrap();
    // mx.save_safetensors("e.safetensors", {}).
    assert_eq!(
        std::fs::read(&path).unwrap(),
        b"\x15\0\0\0\0\0\0\0{\"__metadata__\":null}".to_vec()
    );
}

#[test]
fn loads_round_trip_in_file_order() {
    let dir = TempDir::new("roundtrip");
    let path = dir.file("g.safetensors");
    std::fs::write(&path, golden()).unwrap();
    // SAFETY: the test owns the file and does not modify it while mapped.
    let mapped = unsafe { load_mmap(&path) }.unwrap();
    let owned = load(&path).unwrap();
    let expect = sample();
    for t in [&mapped, &owned] {
        let names: Vec<&str> = t.names().collect();
        assert_eq!(names, ["0.i", "b.q", "m.scales", "A.bias", "z.weight"]);
        assert_eq!(t.metadata(), expect.metadata());
        for (name, b) in expect.iter() {
            let got = t.get(name).unwrap();
            assert_eq!(
                (got.dtype(), got.shape(), got.bytes()),
                (b.dtype(), b.shape(), b.bytes())
            );
        }
    }
    assert!(mapped.iter().all(|(_, b)| b.is_mapped()));
    assert!(!owned.iter().any(|(_, b)| b.is_mapped()));
    // Data starts at 8 + 346 = 354: b.q (u32) at 358 is misaligned; aligned() copies it.
    let q = mapped.get("b.q").unwrap();
    assert!(q.as_slice::<u32>().is_err());
    assert_eq!(
        aligned(q).unwrap().as_slice::<u32>().unwrap(),
        &[1, 2, 3, 4, 5, 6]
    );
    // Saving the mapped tensors in the original dict order gives the file back.
    let mut again = Tensors::new();
    for name in expect.names() {
        again
            .insert(name, mapped.get(name).unwrap().clone())
            .unwrap();
    }
    *again.metadata_mut() = mapped.metadata().clone();
    let path2 = dir.file("again.safetensors");
    save(&path2, &again).unwrap();
    assert_eq!(std::fs::read(&path2).unwrap(), golden());
}

fn load_err(bytes: &[u8]) -> String {
    let dir = TempDir::new("bad");
    let path = dir.file("bad.safetensors");
    std::fs::write(&path, bytes).unwrap();
    let owned = load(&path).unwrap_err();
    // SAFETY: as above.
    let mapped = unsafe { load_mmap(&path) }.unwrap_err();
    assert_eq!(owned.to_string(), mapped.to_string());
    assert!(matches!(owned, Error::Format { .. }), "{owned:?}");
    owned.to_string()
}

fn with_header(header: &str, data: usize) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.resize(out.len() + data, 0);
    out
}

#[test]
fn malformed_files_are_format_errors() {
    let g = golden();
    let e = load_err(&g[..5]);
    assert!(
        e.contains("5 bytes") && e.contains("fewer than the 8-byte"),
        "{e}"
    );
    let e = load_err(&g[..100]);
    assert!(e.contains("header length 346 exceeds the 92 bytes"), "{e}");
    let e = load_err(&g[..g.len() - 3]);
    assert!(
        e.contains("truncated: the header describes 426 bytes, the file has 423"),
        "{e}"
    );
    let e = load_err(&with_header(
        r#"{"x":{"dtype":"F64","shape":[1],"data_offsets":[0,8]}}"#,
        8,
    ));
    assert!(e.contains("tensor x: dtype F64 is not supported"), "{e}");
    let e = load_err(&with_header(
        r#"{"x":{"dtype":"F4","shape":[1],"data_offsets":[0,8]}}"#,
        8,
    ));
    assert!(e.contains("unknown dtype"), "{e}");
    let e = load_err(&with_header("{not json", 0));
    assert!(e.contains("not valid JSON"), "{e}");
    let e = load_err(&with_header(
        r#"{"x":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#,
        8,
    ));
    assert!(e.contains("do not match its shape"), "{e}");
    let missing = load("/nonexistent/dir/x.safetensors").unwrap_err();
    assert!(matches!(missing, Error::Io { .. }), "{missing:?}");
}

#[test]
fn failed_save_leaves_nothing() {
    let dir = TempDir::new("failed");
    let e = save(dir.file("no/such/dir/x.safetensors"), &sample()).unwrap_err();
    assert!(matches!(e, Error::Io { .. }), "{e:?}");
    assert!(dir.entries().is_empty());
    let mut t = sample();
    assert!(t
        .insert("b.q", Buffer::zeros(DType::U8, &[1]).unwrap())
        .is_err());
    assert!(t
        .insert("__metadata__", Buffer::zeros(DType::U8, &[1]).unwrap())
        .is_err());
}

#[test]
fn quantized_modules_are_assembled_with_inferred_bits() {
    let device = Device::cpu();
    let mut enc = device.encoder();
    let w: Vec<f32> = (0..4 * 256)
        .map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0)
        .collect();
    let w = Buffer::from_f32(&w, DType::BF16, &[4, 256]).unwrap();
    for bits in [1, 2, 3, 4, 5, 6, 8] {
        for group in [32, 64, 128] {
            let spec = QuantSpec::affine(bits, group).unwrap();
            let qw = ops::quantize(&mut enc, &w, spec, Flavour::Gpu).unwrap();
            let mut t = Tensors::new();
            t.insert("m.weight", qw.packed().clone()).unwrap();
            t.insert("m.scales", qw.scales().clone()).unwrap();
            t.insert("m.biases", qw.biases().unwrap().clone()).unwrap();
            t.insert("norm.weight", Buffer::zeros(DType::F32, &[4]).unwrap())
                .unwrap();
            assert_eq!(t.quantized_modules(), ["m"]);
            let back = t.quantized_weight("m", group).unwrap();
            assert_eq!((back.spec(), back.shape()), (spec, &[4, 256][..]));
        }
    }
    let qw = ops::quantize(
        &mut enc,
        &w,
        QuantSpec::affine(4, 64).unwrap(),
        Flavour::Gpu,
    )
    .unwrap();
    let mut t = Tensors::new();
    t.insert("m.weight", qw.packed().clone()).unwrap();
    t.insert("m.scales", qw.scales().clone()).unwrap();
    // 4-bit g64 read as g128 would be 2-bit... with half the groups it should have: rejected.
    let e = t.quantized_weight("m", 64).unwrap_err().to_string();
    assert!(e.contains("m: ") && e.contains("biases"), "{e}");
    t.insert("m.biases", qw.biases().unwrap().clone()).unwrap();
    // 32 words · 32 / (4 groups · 48) is not whole; 7-bit is not a spec.
    let e = t.quantized_weight("m", 48).unwrap_err().to_string();
    assert!(e.contains("group_size") && e.contains("48"), "{e}");
    let e = t.quantized_weight("x", 64).unwrap_err().to_string();
    assert!(e.contains("x.weight: missing"), "{e}");
    // Shapes cannot tell 4-bit g64 from 8-bit g32: the group size is the caller's to know.
    assert_eq!(t.quantized_weight("m", 32).unwrap().spec().bits(), 8);
}
