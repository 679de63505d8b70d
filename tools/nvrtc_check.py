#!/usr/bin/env python3
"""Compiles mlxq's CUDA matmul module (kernels/common.cuh + the QMM concatenation of
backend/cuda/mod.rs), or with --module its quantize or dequantize kernels (quant.cu) or the
FP modes' kernels (fp.cu: --module fp-quantize, fp-dequantize or fp-matmul, --mode), with
NVRTC for sm_90a on a machine without a GPU, and prints NVRTC's log with ptxas's per-kernel
register, spill and shared-memory report (`--ptxas-options=-v`); exits 1 if it fails.

NVRTC comes from PyPI: `pip download nvidia-cuda-nvrtc==13.0.88 --no-deps -d D` and unzip the
wheel; pass its lib folder as --lib. Usage:
  tools/nvrtc_check.py --lib D/x/nvidia/cu13/lib [--bits 4] [--group 64] [--dtype bf16]
                       [-D NAME=VALUE]... [--grep qmm_wg_g80] [--cubin F]
cuobjdump (pip: nvidia-cuda-cuobjdump) prints a kernel's SASS from F: cuobjdump -sass -fun NAME F
"""
import argparse, ctypes, os, re, sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "mlxq", "src", "backend", "cuda", "kernels")
QMM = ["batch.cuh", "smem.cuh", "qmv.cu", "qmm_tc.cu", "qmv_dec.cu", "qmv_decb.cu", "qmm_tile.cu", "qmm_wg.cu"]
# The FP modes' tensor-core module (backend/cuda/mod.rs FP_TILES).
FP_TILES = ["batch.cuh", "smem.cuh", "qmm_tc.cu", "qmv_dec.cu", "qmv_decb.cu", "qmm_tile.cu", "qmm_wg.cu"]
CTYPE = {"f32": "float", "f16": "f16_t", "bf16": "bf16_t"}
TC_X = {"bf16": 2, "f16": 1, "f32": 0}
# MODE define, element bits, group size (backend/cuda/mod.rs fp_defines).
FP_MODES = {"mxfp4": (1, 4, 32), "mxfp8": (2, 8, 32), "nvfp4": (3, 4, 16)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lib", required=True)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--dtype", default="bf16", choices=CTYPE)
    ap.add_argument("-D", action="append", default=[])
    ap.add_argument("--grep", default=None, help="only report kernels whose name contains this")
    ap.add_argument("--cubin", default=None,
                    help="write the compiled cubin here (then: cuobjdump -sass -fun NAME FILE)")
    ap.add_argument("--ptx", default=None, help="write the PTX here too (ptxas's input)")
    ap.add_argument("--module", default="qmm",
                    choices=["qmm", "quantize", "dequantize", "fp-quantize", "fp-dequantize", "fp-matmul",
                             "fp-tiles"],
                    help="the matmul module, quant.cu as the quantize or dequantize variant, or fp.cu")
    ap.add_argument("--mode", default="mxfp4", choices=list(FP_MODES),
                    help="the FP mode of an fp-* module (its bits and group size follow)")
    a = ap.parse_args()
    read = lambda f: open(os.path.join(ROOT, f)).read()
    t = CTYPE[a.dtype]
    opts = ["--gpu-architecture=sm_90a", "-std=c++17", f"-DBITS={a.bits}", f"-DGROUP={a.group}",
            "--ptxas-options=-v"] + [f"-D{d}" for d in a.D]
    if a.module == "qmm":
        src = read("common.cuh") + "\n" + "\n".join(read(f) for f in QMM)
        opts += [f"-DXT={t}", f"-DST={t}", f"-DOT={t}", f"-DTC_X={TC_X[a.dtype]}", "-DDEC_SU=2"]
    elif a.module.startswith("fp-"):
        mode, bits, group = FP_MODES[a.mode]
        opts = ["--gpu-architecture=sm_90a", "-std=c++17", f"-DMODE={mode}", f"-DBITS={bits}",
                f"-DGROUP={group}", "--ptxas-options=-v"] + [f"-D{d}" for d in a.D]
        src = read("common.cuh") + "\n" + read("batch.cuh") + "\n" + read("fp.cu")
        if a.module == "fp-tiles":
            # As backend/cuda/mod.rs: the tensor-core tiles with FP dequantisation.
            src = read("common.cuh") + "\n" + "\n".join(read(f) for f in FP_TILES)
            opts = [o.replace("-DMODE=", "-DFPM=") for o in opts]
            opts += [f"-DXT={t}", "-DST=u8", f"-DOT={t}", f"-DTC_X={TC_X[a.dtype]}", "-DDEC_SU=2"]
        elif a.module == "fp-matmul":
            opts += [f"-DXT={t}"]
        else:
            # As backend/cuda/mod.rs: without contraction, MLX's GPU rounding flavour.
            opts += ["--fmad=false", "-DGPU_FLAVOUR=1"]
            opts += [f"-DWT={t}"] if a.module == "fp-quantize" else [f"-DOT={t}"]
    else:
        # As backend/cuda/mod.rs: quant.cu without contraction, MLX's GPU rounding flavour.
        src = read("common.cuh") + "\n" + read("quant.cu")
        opts += ["--fmad=false", "-DGPU_FLAVOUR=1"]
        opts += [f"-DWT={t}"] if a.module == "quantize" else [f"-DST={t}", f"-DOT={t}"]
    lib = ctypes.CDLL(os.path.join(a.lib, "libnvrtc.so.13"))
    prog = ctypes.c_void_p()
    r = lib.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), b"qmm.cu", 0, None, None)
    assert r == 0, r
    arr = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
    rc = lib.nvrtcCompileProgram(prog, len(opts), arr)
    n = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
    buf = ctypes.create_string_buffer(n.value)
    lib.nvrtcGetProgramLog(prog, buf)
    log = buf.value.decode(errors="replace")
    if a.grep:
        # ptxas -v reports each function in a block starting "Compiling entry function 'NAME'".
        keep, out = False, []
        for line in log.splitlines():
            m = re.search(r"Compiling entry function '([^']+)'", line)
            if m:
                keep = a.grep in m.group(1)
            if keep or "error" in line or "warning" in line:
                out.append(line)
        log = "\n".join(out)
    if rc == 0 and a.cubin:
        lib.nvrtcGetCUBINSize(prog, ctypes.byref(n))
        cub = ctypes.create_string_buffer(n.value)
        lib.nvrtcGetCUBIN(prog, cub)
        open(a.cubin, "wb").write(cub.raw)
    if rc == 0 and a.ptx:
        lib.nvrtcGetPTXSize(prog, ctypes.byref(n))
        ptx = ctypes.create_string_buffer(n.value)
        lib.nvrtcGetPTX(prog, ptx)
        open(a.ptx, "wb").write(ptx.value)
    print(log)
    print("compile:", "ok" if rc == 0 else f"FAILED ({rc})")
    sys.exit(0 if rc == 0 else 1)


if __name__ == "__main__":
    main()
