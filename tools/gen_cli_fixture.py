#!/usr/bin/env python3
"""Fixtures for `mlxq quantize` / `mlxq dequantize` (mlxq-cli/tests/cli_files.rs), made by MLX.

    /work/venv/bin/python tools/gen_cli_fixture.py [OUT_DIR]   # default mlxq-cli/tests/fixtures

Needs `mlx[cpu]==0.32.4` and numpy. Writes, with MLX's own `mx.save_safetensors`:
- `input.safetensors`: a small model-like file (metadata {"format": "pt"}): `*.weight` tensors
  2-D and 3-D in f32/f16/bf16, 1-D norm weights, a weight whose last dimension no group size
  divides, a router whose last dimension (96) only group 32 divides, a uint8 `*.weight`, a bias,
  int32 and f32 non-weight tensors, and groups that tell the flavours apart (all-negative,
  constant, exact ties).
- `mlx_cpu_bB_gG.safetensors`: `mlx quantize` of the input on MLX's CPU (the CPU flavour) by the
  rule `mlxq quantize` follows: iterate `mx.load(input)` in its dict order; a floating-point
  `P.weight` with >= 2 dims, no zero dim and a last dim divisible by G becomes `P.weight`
  (uint32), `P.scales`, `P.biases` (inserted in that order); anything else is copied; saved with
  metadata {"format": "mlx"}.
- `mlx_cpu_MODE.safetensors` for MLX's FP modes (mxfp4, nvfp4, mxfp8: their own bits and group
  size, `P.weight` and uint8 `P.scales`, no biases), by the same rule, and
  `mlx_cpu_MODE.dequant[_DTYPE].safetensors` (MLX's default dtype for these is bfloat16).
- `mlx_cpu_bB_gG.dequant[_DTYPE].safetensors`: `mx.dequantize` (CPU) of such a file by the rule of
  `mlxq dequantize`: in `mx.load` order, each quantized `P.weight` (uint32, with a `P.scales`)
  becomes the dequantized `P.weight` (dtype: the scales', or DTYPE), its `P.scales`/`P.biases`
  are dropped, anything else is copied; the input's metadata is kept.
"""
import os
import sys

import mlx.core as mx
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "..", "mlxq-cli", "tests", "fixtures")
QUANTIZE = [(4, 64), (3, 32), (8, 128), (2, 64), (5, 32), (6, 128), (1, 32)]
DEQUANTIZE = [((4, 64), None), ((3, 32), mx.float32), ((6, 128), mx.float16)]
# MLX's FP modes (fixed bits and group size; uint8 scales, no biases), and which to dequantize
# (None: MLX's default dtype for them).
FP_MODES = {"mxfp4": (4, 32), "nvfp4": (4, 16), "mxfp8": (8, 32)}
FP_DEQUANTIZE = [("mxfp4", None), ("nvfp4", mx.float32), ("mxfp8", mx.float16)]
FLOATS = (mx.float32, mx.float16, mx.bfloat16)
DTYPE_NAMES = {mx.float32: "f32", mx.float16: "f16", mx.bfloat16: "bf16"}

mx.set_default_device(mx.cpu)


def inputs():
    rng = np.random.default_rng(7)

    def normal(shape, scale=0.05):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    tricky = normal((8, 128))
    tricky[0, :64] = -np.abs(tricky[0, :64]) - 0.25  # all negative: the flavours' max differs
    tricky[1, :] = 1.75  # constant groups
    tricky[2, :] = rng.integers(-12, 13, 128) * 0.25  # multiples of 1/4: rounding ties
    tricky[3, :] = 0.0
    t = {
        "model.embed_tokens.weight": (normal((16, 128)), mx.bfloat16),
        "model.layers.0.self_attn.q_proj.weight": (normal((8, 256)), mx.float32),
        "model.layers.0.self_attn.q_proj.bias": (normal((8,)), mx.float32),
        "model.layers.0.self_attn.k_proj.weight": (normal((8, 256)), mx.float16),
        "model.layers.0.self_attn.o_proj.weight": (normal((16, 128)), mx.bfloat16),
        "model.layers.0.mlp.switch_mlp.up_proj.weight": (normal((2, 8, 128)), mx.float16),
        "model.layers.0.mlp.switch_mlp.down_proj.weight": (normal((2, 4, 256)), mx.bfloat16),
        "model.layers.0.mlp.gate.weight": (normal((2, 96)), mx.float32),
        "model.layers.0.input_layernorm.weight": (1 + normal((256,)), mx.float32),
        "model.layers.0.conv.weight": (normal((4, 80)), mx.float32),
        "model.layers.0.mask.weight": (rng.integers(0, 2, (4, 64)).astype(np.uint8), mx.uint8),
        "model.layers.0.tricky.weight": (tricky, mx.float32),
        "model.norm.weight": (1 + normal((128,)), mx.bfloat16),
        "lm_head.weight": (normal((24, 128)), mx.float16),
        "position_ids": (np.arange(8, dtype=np.int32).reshape(1, 8), mx.int32),
        "rope.inv_freq": (normal((16,)), mx.float32),
    }
    return {k: mx.array(v).astype(dt) for k, (v, dt) in t.items()}


def quantizable(v, group):
    return v.dtype in FLOATS and v.ndim >= 2 and v.size > 0 and v.shape[-1] % group == 0


def quantize(src, bits, group, mode="affine"):
    weights = mx.load(src)
    out = {}
    for k, v in weights.items():
        if k.endswith(".weight") and quantizable(v, group):
            q, s, *b = mx.quantize(v, group_size=group, bits=bits, mode=mode)
            p = k[: -len(".weight")]
            out[k] = q
            out[p + ".scales"] = s
            if b:
                out[p + ".biases"] = b[0]
        else:
            out[k] = v
    return out


def dequantize(src, bits, group, dtype, mode="affine"):
    weights, metadata = mx.load(src, return_metadata=True)
    modules = {
        k[: -len(".weight")]
        for k, v in weights.items()
        if k.endswith(".weight") and v.dtype == mx.uint32 and k[: -len(".weight")] + ".scales" in weights
    }
    out = {}
    for k, v in weights.items():
        p, _, suffix = k.rpartition(".")
        if p in modules and suffix == "weight":
            s, b = weights[p + ".scales"], weights.get(p + ".biases")
            out[k] = mx.dequantize(v, s, b, group_size=group, bits=bits, dtype=dtype, mode=mode)
        elif p in modules and suffix in ("scales", "biases"):
            continue
        else:
            out[k] = v
    return out, metadata


def main():
    os.makedirs(OUT, exist_ok=True)
    src = os.path.join(OUT, "input.safetensors")
    mx.save_safetensors(src, inputs(), metadata={"format": "pt"})
    for bits, group in QUANTIZE:
        path = os.path.join(OUT, f"mlx_cpu_b{bits}_g{group}.safetensors")
        mx.save_safetensors(path, quantize(src, bits, group), metadata={"format": "mlx"})
    for (bits, group), dtype in DEQUANTIZE:
        qpath = os.path.join(OUT, f"mlx_cpu_b{bits}_g{group}.safetensors")
        out, metadata = dequantize(qpath, bits, group, dtype)
        suffix = "" if dtype is None else "_" + DTYPE_NAMES[dtype]
        path = os.path.join(OUT, f"mlx_cpu_b{bits}_g{group}.dequant{suffix}.safetensors")
        mx.save_safetensors(path, out, metadata=metadata)
    for mode, (bits, group) in FP_MODES.items():
        path = os.path.join(OUT, f"mlx_cpu_{mode}.safetensors")
        mx.save_safetensors(path, quantize(src, bits, group, mode), metadata={"format": "mlx"})
    for mode, dtype in FP_DEQUANTIZE:
        bits, group = FP_MODES[mode]
        out, metadata = dequantize(os.path.join(OUT, f"mlx_cpu_{mode}.safetensors"), bits, group, dtype, mode)
        suffix = "" if dtype is None else "_" + DTYPE_NAMES[dtype]
        path = os.path.join(OUT, f"mlx_cpu_{mode}.dequant{suffix}.safetensors")
        mx.save_safetensors(path, out, metadata=metadata)
    print(f"mlx {mx.__version__} {mx.default_device()}: wrote fixtures to {os.path.normpath(OUT)}")


if __name__ == "__main__":
    main()
