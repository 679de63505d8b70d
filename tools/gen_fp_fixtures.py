#!/usr/bin/env python3
"""CPU-flavour mxfp4/mxfp8/nvfp4 quantize/dequantize fixtures, made by MLX 0.32.4's CPU backend.

    gen_fp_fixtures.py [--out DIR] [--seed N] [--rows R] [--cols C]

The FP-mode sibling of gen_fixtures.py (same case kinds, drawn by its `tensors`, same file
layout and seed). For every dtype (float32, float16, bfloat16) x mode (mxfp4 b4 g32, mxfp8 b8
g32, nvfp4 b4 g16) writes, under TAG = DTYPE_MODE_bBITS_gGROUP (the shared CUDA set's naming):
- TAG.in.safetensors: float tensors `caseI_KIND.weight`;
- TAG.expected.safetensors: `mx.quantize` output: `caseI_KIND.weight` (uint32 packed) and
  `caseI_KIND.scales` (uint8 codes; the FP modes have no biases);
- TAG.dequant.safetensors: `mx.dequantize(..., mode=MODE, dtype=DTYPE)` of that output.
"""
import argparse
import os
import sys

import mlx.core as mx

from gen_fixtures import DTYPES, MLX_VERSION, tensors

MODES = (("mxfp4", 4, 32), ("mxfp8", 8, 32), ("nvfp4", 4, 16))


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
    if a.cols % 32 != 0:
        sys.exit("--cols must be a multiple of 32")
    mx.set_default_device(mx.cpu)
    os.makedirs(a.out, exist_ok=True)
    mx.random.seed(a.seed)
    meta = {
        "generator": "tools/gen_fp_fixtures.py",
        "mlx": mx.__version__,
        "device": "cpu",
        "seed": str(a.seed),
    }

    n = 0
    for dname, dt in DTYPES:
        for mode, bits, gs in MODES:
            inp, exp, deq = {}, {}, {}
            for i, (kind, w) in enumerate(sorted(tensors(a.rows, a.cols, dt).items())):
                base = f"case{i}_{kind}"
                q, s = mx.quantize(w, group_size=gs, bits=bits, mode=mode)
                inp[base + ".weight"] = w
                exp[base + ".weight"] = q
                exp[base + ".scales"] = s
                deq[base + ".weight"] = mx.dequantize(
                    q, s, group_size=gs, bits=bits, mode=mode, dtype=dt
                )
            tag = f"{dname}_{mode}_b{bits}_g{gs}"
            for suffix, arrays in (("in", inp), ("expected", exp), ("dequant", deq)):
                path = os.path.join(a.out, f"{tag}.{suffix}.safetensors")
                mx.save_safetensors(path, arrays, metadata=meta)
            n += 1
    print(f"mlx {mx.__version__} {mx.default_device()}: wrote {n} configurations to {a.out}")


if __name__ == "__main__":
    main()
