#!/usr/bin/env python3
"""CPU-flavour affine quantize/dequantize fixtures, made by MLX 0.32.4's CPU backend.

    gen_fixtures.py [--out DIR] [--seed N] [--rows R] [--cols C]

For every dtype (float32, float16, bfloat16) x bits (1, 2, 3, 4, 5, 6, 8) x group (32, 64, 128)
writes, under TAG = DTYPE_affine_bBITS_gGROUP (the naming of the shared CUDA set):
- TAG.in.safetensors: float tensors `caseI_KIND.weight`, I the index of KIND in sorted order;
- TAG.expected.safetensors: what `mx.quantize` returned: `caseI_KIND.weight` (uint32 packed),
  `caseI_KIND.scales`, `caseI_KIND.biases`;
- TAG.dequant.safetensors: `mx.dequantize` of that output (CPU: `T(T(q*s) + b)`), named like
  the input.

Kinds: normal, uniform_wide (+-1e4), tiny (1e-6 scale), positive, negative, constant, zeros,
integers (0..15), halves (multiples of 0.25: rounding ties), outliers (1% x100), experts3d
(a 3-D [3, max(2, rows // 3), cols] stack). Deterministic for a given seed: MLX's counter-based
generator is seeded once and drawn from in a fixed order.
"""
import argparse
import os
import sys

import mlx.core as mx

MLX_VERSION = "0.32.4"
DTYPES = (("float32", mx.float32), ("float16", mx.float16), ("bfloat16", mx.bfloat16))
BITS = (1, 2, 3, 4, 5, 6, 8)
GROUPS = (32, 64, 128)


def tensors(rows, cols, dtype):
    """One set of case tensors, drawn in a fixed order, cast to `dtype`."""
    shape = (rows, cols)
    t = {}
    t["normal"] = mx.random.normal(shape)
    t["uniform_wide"] = mx.random.uniform(-1e4, 1e4, shape)
    t["tiny"] = mx.random.normal(shape) * 1e-6
    t["positive"] = mx.abs(mx.random.normal(shape)) + 0.5
    t["negative"] = -mx.abs(mx.random.normal(shape)) - 0.25
    t["constant"] = mx.full(shape, 1.75)
    t["zeros"] = mx.zeros(shape)
    t["integers"] = mx.random.randint(0, 16, shape).astype(mx.float32)
    t["halves"] = mx.random.randint(-12, 13, shape).astype(mx.float32) * 0.25
    o = mx.random.normal(shape)
    t["outliers"] = mx.where(mx.random.uniform(shape=shape) < 0.01, o * 100, o)
    t["experts3d"] = mx.random.normal((3, max(2, rows // 3), cols))
    return {k: v.astype(dtype) for k, v in t.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    here = os.path.dirname(os.path.abspath(__file__))
    default_out = os.path.join(here, "..", "mlxq", "tests", "fixtures", f"mlx-{MLX_VERSION}-cpu")
    p.add_argument("--out", default=os.path.normpath(default_out))
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--cols", type=int, default=256)
    a = p.parse_args()

    if mx.__version__ != MLX_VERSION:
        sys.exit(f"need mlx=={MLX_VERSION} (the fixtures name it), found {mx.__version__}")
    if a.cols % max(GROUPS) != 0:
        sys.exit(f"--cols must be a multiple of {max(GROUPS)}")
    mx.set_default_device(mx.cpu)
    os.makedirs(a.out, exist_ok=True)
    mx.random.seed(a.seed)
    meta = {
        "generator": "tools/gen_fixtures.py",
        "mlx": mx.__version__,
        "device": "cpu",
        "seed": str(a.seed),
    }

    n = 0
    for dname, dt in DTYPES:
        for bits in BITS:
            for gs in GROUPS:
                inp, exp, deq = {}, {}, {}
                for i, (kind, w) in enumerate(sorted(tensors(a.rows, a.cols, dt).items())):
                    base = f"case{i}_{kind}"
                    q, s, b = mx.quantize(w, group_size=gs, bits=bits, mode="affine")
                    inp[base + ".weight"] = w
                    exp[base + ".weight"] = q
                    exp[base + ".scales"] = s
                    exp[base + ".biases"] = b
                    deq[base + ".weight"] = mx.dequantize(q, s, b, group_size=gs, bits=bits)
                tag = f"{dname}_affine_b{bits}_g{gs}"
                for suffix, arrays in (("in", inp), ("expected", exp), ("dequant", deq)):
                    path = os.path.join(a.out, f"{tag}.{suffix}.safetensors")
                    mx.save_safetensors(path, arrays, metadata=meta)
                n += 1
    print(f"mlx {mx.__version__} {mx.default_device()}: wrote {n} configurations to {a.out}")


if __name__ == "__main__":
    main()
