#!/usr/bin/env python3
"""mxfp4/mxfp8/nvfp4 quantized_matmul and gather_qmm fixtures, made by MLX 0.32.4's CPU backend.

    gen_fp_matmul_fixtures.py [--out DIR] [--seed N]

The matmul sibling of gen_fp_fixtures.py. For every dtype (float32, float16, bfloat16) x mode
(mxfp4 b4 g32, mxfp8 b8 g32, nvfp4 b4 g16) writes TAG.qmm.safetensors (TAG =
DTYPE_MODE_bBITS_gGROUP, the quantize fixtures' naming) holding four cases, each as
`CASE.x` (DTYPE), `CASE.w` (uint32 packed codes), `CASE.scales` (uint8 codes) and `CASE.out`
(MLX's result, DTYPE), the gathers also `CASE.lhs` and `CASE.rhs` (uint32):
- qmm_t:    x [4, 64] . w[32, 64]^T            mx.quantized_matmul(transpose=True)
- qmm_n:    x [3, 40] . w[40, 32]              mx.quantized_matmul(transpose=False)
- gather_t: x [3, 1, 64], w [3, 16, 64], lhs/rhs [3, 2]   mx.gather_qmm(transpose=True)
- gather_n: x [2, 2, 32], w [3, 32, 32], lhs/rhs [4]      mx.gather_qmm(transpose=False)
The weights are random codes (every element code occurs but E4M3FN's NaN codes 0x7f/0xff) with
scale codes drawn from a moderate range (so that no dtype overflows, even in MLX's accumulation
in the input dtype); the first group of each weight has the E8M0 code 0 (2^-127) for the mx
modes and, for nvfp4 in float32, the E4M3 scale 0x7e (448). In float32, qmm_t's row 0 of W
holds a NaN code for mxfp8 (element 0x7f) and nvfp4 (scale 0x7f): MLX 0.32.4 reads both as NaN
(the MLX source's FromFP8 would read 480), so output column 0 is NaN.
"""
import argparse
import os
import sys

import mlx.core as mx
import numpy as np

from gen_fixtures import DTYPES, MLX_VERSION

MODES = (("mxfp4", 4, 32), ("mxfp8", 8, 32), ("nvfp4", 4, 16))
# Scale codes: E8M0 exponents + 127, or E4M3 codes (0x28 = 0.25 .. 0x40 = 2).
SCALE_RANGE = {"mxfp4": (121, 129), "mxfp8": (113, 121), "nvfp4": (0x28, 0x40)}


def weight(rng, mode, bits, gs, shape, dname, nan=False):
    """Random packed codes and scale codes for a logical weight [..., rows, cols]; with `nan`,
    row 0 of the first matrix reads a NaN code (mxfp8: element 0x7f; nvfp4: scale 0x7f)."""
    *lead, rows, cols = shape
    packed = rng.integers(0, 2**32, size=(*lead, rows, cols * bits // 32), dtype=np.uint64)
    packed = packed.astype(np.uint32)
    if bits == 8:
        # E4M3FN's NaN codes (0x7f, 0xff) -> 0x7e, 0xfe: finite results, except where `nan`.
        b = packed.view(np.uint8)
        b[(b & 0x7F) == 0x7F] -= 1
        if nan:
            b.reshape(-1)[0] = 0x7F
    lo, hi = SCALE_RANGE[mode]
    scales = rng.integers(lo, hi + 1, size=(*lead, rows, cols // gs)).astype(np.uint8)
    first = scales.reshape(-1)
    if mode != "nvfp4":
        first[0] = 0
    elif nan:
        first[0] = 0x7F
    elif dname == "float32":
        first[0] = 0x7E
    return mx.array(packed), mx.array(scales)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    here = os.path.dirname(os.path.abspath(__file__))
    default_out = os.path.join(here, "..", "mlxq", "tests", "fixtures", f"mlx-{MLX_VERSION}-cpu")
    p.add_argument("--out", default=os.path.normpath(default_out))
    p.add_argument("--seed", type=int, default=23)
    a = p.parse_args()

    if mx.__version__ != MLX_VERSION:
        sys.exit(f"need mlx=={MLX_VERSION} (the fixtures name it), found {mx.__version__}")
    mx.set_default_device(mx.cpu)
    os.makedirs(a.out, exist_ok=True)
    rng = np.random.default_rng(a.seed)
    meta = {
        "generator": "tools/gen_fp_matmul_fixtures.py",
        "mlx": mx.__version__,
        "device": "cpu",
        "seed": str(a.seed),
    }

    n = 0
    for dname, dt in DTYPES:
        for mode, bits, gs in MODES:
            kw = dict(group_size=gs, bits=bits, mode=mode)
            arrays = {}

            def x_of(shape):
                return mx.array(rng.standard_normal(shape).astype(np.float32)).astype(dt)

            for case, transpose, xs, ws in (
                ("qmm_t", True, (4, 64), (32, 64)),
                ("qmm_n", False, (3, 40), (40, 32)),
            ):
                x = x_of(xs)
                nan = case == "qmm_t" and dname == "float32" and mode != "mxfp4"
                w, s = weight(rng, mode, bits, gs, ws, dname, nan)
                out = mx.quantized_matmul(x, w, s, None, transpose=transpose, **kw)
                arrays.update({f"{case}.x": x, f"{case}.w": w, f"{case}.scales": s,
                               f"{case}.out": out})

            for case, transpose, xs, ws, ishape in (
                ("gather_t", True, (3, 1, 64), (3, 16, 64), (3, 2)),
                ("gather_n", False, (2, 2, 32), (3, 32, 32), (4,)),
            ):
                x = x_of(xs)
                w, s = weight(rng, mode, bits, gs, ws, dname)
                count = int(np.prod(ishape))
                lhs = rng.integers(0, xs[0], size=ishape).astype(np.uint32)
                if case == "gather_t":
                    lhs = np.repeat(np.arange(xs[0], dtype=np.uint32), ishape[1]).reshape(ishape)
                rhs = rng.integers(0, ws[0], size=count).astype(np.uint32).reshape(ishape)
                lhs, rhs = mx.array(lhs), mx.array(rhs)
                out = mx.gather_qmm(x, w, s, None, lhs_indices=lhs, rhs_indices=rhs,
                                    transpose=transpose, **kw)
                arrays.update({f"{case}.x": x, f"{case}.w": w, f"{case}.scales": s,
                               f"{case}.lhs": lhs, f"{case}.rhs": rhs, f"{case}.out": out})

            mx.eval(arrays)
            for k, v in arrays.items():
                finite = np.isfinite(np.array(v.astype(mx.float32)))
                if k == "qmm_t.out" and dname == "float32" and mode != "mxfp4":
                    # The NaN code of w's row 0 makes output column 0 NaN, and nothing else.
                    if finite[:, 0].any() or not finite[:, 1:].all():
                        sys.exit(f"{dname} {mode} {k}: NaN only in column 0 expected")
                elif not finite.all():
                    sys.exit(f"{dname} {mode} {k}: not finite")
            tag = f"{dname}_{mode}_b{bits}_g{gs}"
            mx.save_safetensors(os.path.join(a.out, f"{tag}.qmm.safetensors"), arrays,
                                metadata=meta)
            n += 1
    print(f"mlx {mx.__version__} {mx.default_device()}: wrote {n} configurations to {a.out}")


if __name__ == "__main__":
    main()
