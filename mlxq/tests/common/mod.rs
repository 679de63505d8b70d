//! Shared helpers for integration tests: loading the MLX fixtures under `tests/fixtures/`.
//!
//! A fixture directory (`mlx-0.32.4-cpu`, `mlx-0.32.4-cuda`) holds, per configuration
//! `TAG = DTYPE_MODE_bBITS_gGROUP` (MODE affine, mxfp4, mxfp8 or nvfp4), three safetensors
//! files: `TAG.in` (the float inputs `caseI_KIND.weight`), `TAG.expected` (MLX's `mx.quantize`
//! output: `.weight` packed uint32, `.scales`, and for affine `.biases`) and `TAG.dequant`
//! (MLX's `mx.dequantize` of that output into the input's dtype, named like the input). See
//! `tools/README.md`.

#![allow(dead_code)] // Each test binary uses its own subset of these helpers.

use mlxq::{Buffer, DType, Error, Flavour, QuantSpec, QuantizedWeight};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The MLX version every fixture directory was made with.
pub const MLX_VERSION: &str = "0.32.4";

/// `mlxq/tests/fixtures`, or `$MLXQ_FIXTURES` where set (test binaries run on another machine).
pub fn fixtures_root() -> PathBuf {
    if let Some(dir) = std::env::var_os("MLXQ_FIXTURES") {
        return PathBuf::from(dir);
    }
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("fixtures")
}

/// The fixture directory made by MLX's implementation of `flavour`: its CPU backend for
/// [`Flavour::Cpu`], its CUDA kernels for [`Flavour::Gpu`].
pub fn flavour_dir(flavour: Flavour) -> PathBuf {
    let backend = match flavour {
        Flavour::Cpu => "cpu",
        Flavour::Gpu => "cuda",
    };
    fixtures_root().join(format!("mlx-{MLX_VERSION}-{backend}"))
}

/// One fixture configuration, parsed from its tag.
#[derive(Clone, Debug)]
pub struct Config {
    /// `DTYPE_MODE_bBITS_gGROUP`.
    pub tag: String,
    /// The input dtype (and that of affine scales and biases, and of the dequantized output).
    pub dtype: DType,
    /// Mode, bits and group size.
    pub spec: QuantSpec,
    /// Which MLX made it.
    pub flavour: Flavour,
    /// The directory holding its files.
    pub dir: PathBuf,
}

impl Config {
    /// Parses `DTYPE_MODE_bBITS_gGROUP`; `None` for unknown modes or malformed tags.
    pub fn parse(tag: &str, flavour: Flavour, dir: &Path) -> Option<Config> {
        let mut parts = tag.split('_');
        let dtype = DType::parse(parts.next()?)?;
        let mode = mlxq::QuantMode::parse(parts.next()?).ok()?;
        let bits = parts.next()?.strip_prefix('b')?.parse().ok()?;
        let group = parts.next()?.strip_prefix('g')?.parse().ok()?;
        if parts.next().is_some() {
            return None;
        }
        Some(Config {
            tag: tag.to_string(),
            dtype,
            spec: QuantSpec::new(mode, bits, group).ok()?,
            flavour,
            dir: dir.to_path_buf(),
        })
    }

    /// Tensors of `TAG.SUFFIX.safetensors` (`in`, `expected` or `dequant`).
    pub fn load(&self, suffix: &str) -> BTreeMap<String, Buffer> {
        load_safetensors(&self.dir.join(format!("{}.{suffix}.safetensors", self.tag)))
    }

    /// Every case of this configuration, sorted by name.
    pub fn cases(&self) -> Vec<Case> {
        let inputs = self.load("in");
        let mut expected = self.load("expected");
        let mut dequant = self.load("dequant");
        let take = |map: &mut BTreeMap<String, Buffer>, key: &str| {
            map.remove(key)
                .unwrap_or_else(|| panic!("{}: no tensor {key}", self.tag))
        };
        let cases: Vec<Case> = inputs
            .into_iter()
            .map(|(key, input)| {
                let name = key
                    .strip_suffix(".weight")
                    .unwrap_or_else(|| panic!("{}: unexpected input {key}", self.tag))
                    .to_string();
                Case {
                    packed: take(&mut expected, &key),
                    scales: take(&mut expected, &format!("{name}.scales")),
                    biases: self
                        .spec
                        .has_biases()
                        .then(|| take(&mut expected, &format!("{name}.biases"))),
                    dequant: take(&mut dequant, &key),
                    input,
                    name,
                }
            })
            .collect();
        assert!(
            expected.is_empty() && dequant.is_empty(),
            "{}: tensors without an input: {:?} {:?}",
            self.tag,
            expected.keys().collect::<Vec<_>>(),
            dequant.keys().collect::<Vec<_>>()
        );
        cases
    }
}

/// One case of a configuration: an input tensor and what MLX made of it.
#[derive(Clone, Debug)]
pub struct Case {
    /// `caseI_KIND`.
    pub name: String,
    /// The float input, `[..., rows, cols]`.
    pub input: Buffer,
    /// MLX's packed codes, uint32 `[..., rows, cols·bits/32]`.
    pub packed: Buffer,
    /// MLX's scales, `[..., rows, cols/group]`, input dtype (affine) or uint8 codes.
    pub scales: Buffer,
    /// MLX's biases, like the scales (affine only).
    pub biases: Option<Buffer>,
    /// MLX's dequantization of (packed, scales, biases), the input's shape and dtype.
    pub dequant: Buffer,
}

impl Case {
    /// MLX's quantized tensors as a validated weight.
    pub fn weight(&self, spec: QuantSpec) -> QuantizedWeight {
        QuantizedWeight::new(
            self.packed.clone(),
            self.scales.clone(),
            self.biases.clone(),
            spec,
        )
        .unwrap_or_else(|e| panic!("{}: MLX's tensors rejected: {e}", self.name))
    }
}

/// The affine configurations in `flavour`'s fixture directory, sorted by tag. Panics if there
/// are none, so a missing directory fails loudly rather than testing nothing.
pub fn configs(flavour: Flavour) -> Vec<Config> {
    mode_configs(flavour, true)
}

/// The FP-mode (mxfp4, mxfp8, nvfp4) configurations in `flavour`'s fixture directory, sorted
/// by tag; panics if there are none.
pub fn fp_configs(flavour: Flavour) -> Vec<Config> {
    mode_configs(flavour, false)
}

fn mode_configs(flavour: Flavour, affine: bool) -> Vec<Config> {
    let dir = flavour_dir(flavour);
    let entries = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("fixture directory {}: {e}", dir.display()));
    let mut out: Vec<Config> = entries
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            let tag = name.strip_suffix(".in.safetensors")?;
            Config::parse(tag, flavour, &dir).filter(|c| c.spec.has_biases() == affine)
        })
        .collect();
    out.sort_by(|a, b| a.tag.cmp(&b.tag));
    assert!(!out.is_empty(), "no fixtures in {}", dir.display());
    out
}

/// The configuration `tag` of `flavour`'s fixtures.
pub fn config(flavour: Flavour, tag: &str) -> Config {
    let dir = flavour_dir(flavour);
    let c = Config::parse(tag, flavour, &dir).unwrap_or_else(|| panic!("bad fixture tag {tag}"));
    assert!(
        dir.join(format!("{tag}.in.safetensors")).exists(),
        "no fixture {tag} in {}",
        dir.display()
    );
    c
}

/// Every tensor of a safetensors file, as host buffers (copies), by name.
pub fn load_safetensors(path: &Path) -> BTreeMap<String, Buffer> {
    use safetensors::{Dtype, SafeTensors};
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = SafeTensors::deserialize(&bytes)
        .unwrap_or_else(|e| panic!("{}: not safetensors: {e}", path.display()));
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            let dtype = match view.dtype() {
                Dtype::F32 => DType::F32,
                Dtype::F16 => DType::F16,
                Dtype::BF16 => DType::BF16,
                Dtype::U32 => DType::U32,
                Dtype::I32 => DType::I32,
                Dtype::U8 => DType::U8,
                d => panic!("{}: {name} has unsupported dtype {d:?}", path.display()),
            };
            let b = Buffer::from_bytes(view.data(), dtype, view.shape())
                .unwrap_or_else(|e| panic!("{}: {name}: {e}", path.display()));
            (name, b)
        })
        .collect()
}

/// Element `i` of a float or integer buffer, printed with its raw bits: `0.5 (0x3f000000)`.
pub fn show(b: &Buffer, i: usize) -> String {
    let size = b.dtype().size();
    let raw = &b.bytes()[i * size..(i + 1) * size];
    let mut word = [0u8; 4];
    word[..size].copy_from_slice(raw);
    let bits = u32::from_le_bytes(word);
    match b.dtype() {
        DType::F32 | DType::F16 | DType::BF16 => {
            let v = b
                .view(i * size, b.dtype(), &[1])
                .and_then(|v| v.to_f32_vec())
                .map_or(f32::NAN, |v| v[0]);
            format!("{v:e} (0x{bits:0w$x})", w = size * 2)
        }
        _ => format!("0x{bits:0w$x}", w = size * 2),
    }
}

/// Index of the first element at which two buffers' bytes differ (`None` if equal), after
/// checking that dtype and shape agree.
pub fn first_difference(want: &Buffer, got: &Buffer) -> Option<usize> {
    assert_eq!(
        (want.dtype(), want.shape()),
        (got.dtype(), got.shape()),
        "dtype and shape"
    );
    let size = want.dtype().size();
    want.bytes()
        .chunks_exact(size)
        .zip(got.bytes().chunks_exact(size))
        .position(|(a, b)| a != b)
}

/// How many elements differ (bytewise) between two buffers of one dtype and shape.
pub fn count_differences(want: &Buffer, got: &Buffer) -> usize {
    let size = want.dtype().size();
    want.bytes()
        .chunks_exact(size)
        .zip(got.bytes().chunks_exact(size))
        .filter(|(a, b)| a != b)
        .count()
}

/// A host weight of `spec` for a `shape` input of `dtype`, every byte 0xFF (NaN scales and
/// biases, all-ones codes), so any byte an op leaves unwritten shows.
pub fn poisoned_weight(shape: &[usize], dtype: DType, spec: QuantSpec) -> QuantizedWeight {
    let (lead, cols) = shape.split_at(shape.len() - 1);
    let g = spec.group_size() as usize;
    let words = spec.packed_words(cols[0]).unwrap();
    let with = |d: usize| lead.iter().copied().chain([d]).collect::<Vec<_>>();
    let fill = |dtype: DType, shape: &[usize]| {
        let n: usize = shape.iter().product::<usize>() * dtype.size();
        Buffer::from_bytes(&vec![0xFF; n], dtype, shape).unwrap()
    };
    QuantizedWeight::new(
        fill(DType::U32, &with(words)),
        fill(dtype, &with(cols[0] / g)),
        Some(fill(dtype, &with(cols[0] / g))),
        spec,
    )
    .unwrap()
}

/// Roughly normal random values (a sum of four uniforms: cheap, with the occasional larger
/// value), for matmul inputs and weights.
pub fn randn(rng: &mut rand::rngs::StdRng, n: usize) -> Vec<f32> {
    use rand::Rng;
    (0..n)
        .map(|_| (0..4).map(|_| rng.gen_range(-1.0f32..1.0)).sum::<f32>())
        .collect()
}

/// x as stored (after rounding to its dtype), widened to f64.
pub fn x_f64(x: &Buffer) -> Vec<f64> {
    x.to_f32_vec().unwrap().into_iter().map(f64::from).collect()
}

/// The matmul tolerance (normwise relative error): 1e-5 for an f32 output, 1e-2 for f16/bf16.
pub fn tolerance(out: DType) -> f64 {
    if out == DType::F32 {
        1e-5
    } else {
        1e-2
    }
}

/// An output buffer filled with NaN, so that an element a kernel forgets to write fails.
pub fn poisoned(dtype: DType, shape: &[usize]) -> Buffer {
    let n: usize = shape.iter().product();
    Buffer::from_f32(&vec![f32::NAN; n], dtype, shape).unwrap()
}

/// The output widened to f64, asserting every element was written (no NaN left from
/// [`poisoned`]) and finite.
pub fn got_f64(y: &Buffer) -> Vec<f64> {
    let v: Vec<f64> = y.to_f32_vec().unwrap().into_iter().map(f64::from).collect();
    assert!(
        v.iter().all(|x| x.is_finite()),
        "output has unwritten (NaN) or non-finite elements"
    );
    v
}

/// Asserts the error's message names every fragment (the op, the parameter, the expected and
/// the actual value).
pub fn says(e: Error, fragments: &[&str]) {
    let msg = e.to_string();
    for f in fragments {
        assert!(msg.contains(f), "error {msg:?} does not mention {f:?}");
    }
}
