#!/bin/bash
# Session 66's probe of the 512-token gather's limits. `lf`: the tree's kernels with WSG_LF=1
# (the consumers' proxy fence after the dequantisation of the next step instead of before it:
# a real candidate, correct, so the gather tests run on it after the times; WS_LF=1, the same
# for the dense tiles, with the prefill tests that run them). The others are
# timing only (their results are wrong, and the bench's check says so): copies of the tree's
# kernels, edited here, compiled through MLXQ_CUDA_KERNELS on main's build: `nf` the
# persistent consumers without their per-step proxy fence (what a fence-free x path, e.g. one
# 2-D TMA box of a gathered copy of x, could gain at most); `bf` the permuted-x dequantisation at one bf16x2 FMA per pair of codes
# instead of two (the instruction stream of the biases folded into the GEMM, without its extra
# k step); `nfbf` both. 4-bit top-8 of 64 x 2048², `qmm_wsp_g80` (MLXQ_GATHER_TX=0), graph µs,
# ROUNDS rounds (1 by default: a short device budget).
RUN_S=60
source "$(dirname "$0")/../s58/job.sh"
J=$OUT/s66-probe.jsonl
K=$PWD/mlxq/src/backend/cuda/kernels
python3 - "$K" <<'PY'
import os, shutil, sys
src = sys.argv[1]
NF = ("if (!xt) fence_async_smem();", "if (false) fence_async_smem();", 3)
BF = ("    const u32 q = fma2(lop_or(v, 0x000F000Fu, MAGIC2), ONE2, MAGIC2 ^ 0x80008000u);\n"
      "    return fma2(q, s2, b2);",
      "    return fma2(lop_or(v, 0x000F000Fu, MAGIC2), s2, b2);", 1)
for name, edits in {"nf": [NF], "bf": [BF], "nfbf": [NF, BF]}.items():
    d = f"/tmp/pk_{name}"
    shutil.rmtree(d, ignore_errors=True)
    shutil.copytree(src, d)
    p = os.path.join(d, "qmm_wg.cu")
    s = open(p).read()
    for old, new, n in edits:
        assert s.count(old) == n, (name, old, s.count(old))
        s = s.replace(old, new)
    open(p, "w").write(s)
print("probe kernels written")
PY
G="--op gather --tokens ${TOKENS:-512,128}"
for r in $(seq ${ROUNDS:-1}); do
    run base 4 "$G" MLXQ_GATHER_TX=0 MLXQ_CUDA_KERNELS=$K
    run lf 4 "$G" MLXQ_GATHER_TX=0 MLXQ_CUDA_KERNELS=$K MLXQ_CUDA_DEFINES=WSG_LF=1
    summary
    echo "round $r done at $(( $(date +%s) - T0 )) s"
done
TESTS_S=150 gather_tests lf MLXQ_CUDA_KERNELS=$K MLXQ_CUDA_DEFINES=WSG_LF=1
# The dense warp-specialised tiles with the same order (WS_LF=1: `dlf`) against the tree's
# kernels (`dbase`): 4-bit, M = 512 and 4096 at 4096², where the default route runs them.
D="--shape 512,4096,4096 --shape 4096,4096,4096"
run dbase 4 "$D" MLXQ_CUDA_KERNELS=$K
run dlf 4 "$D" MLXQ_CUDA_KERNELS=$K MLXQ_CUDA_DEFINES=WS_LF=1
summary
# The dense prefill tests that run the warp-specialised tiles, with WS_LF=1.
TESTS_S=150 prefill_tests dlf MLXQ_CUDA_KERNELS=$K MLXQ_CUDA_DEFINES=WS_LF=1
# The bounds (timing only; wrong results), last: a short call still brings the decisions.
for p in nf bf nfbf; do run $p 4 "$G" MLXQ_GATHER_TX=0 MLXQ_CUDA_KERNELS=/tmp/pk_$p; done
summary
echo "all done at $(( $(date +%s) - T0 )) s"
