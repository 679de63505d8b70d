#!/bin/bash
# One device call that takes WSG_LF's decision and, if it gains, the checks its adoption needs,
# so that no second call is spent on them (sessions 66-67 could not start one). On main's build
# (.devrun) with the tree's kernels (MLXQ_CUDA_KERNELS):
#  1. the 4-bit gather, top-8 of 64 x 2048², 512 and 128 tokens, `base` and `lf` (WSG_LF=1)
#     alternated over ROUNDS rounds (2 by default), qmm_wsp_g80 (MLXQ_GATHER_TX=0), graph µs;
#  2. the four gather tests on WSG_LF=1;
#  3. if lf's mean at 512 tokens is at least 3% below base's and the tests passed: memcheck
#     and racecheck on WSG_LF=1 (256 tokens, top-8 of 64 x 256x512: 32 pairs an expert, the
#     qmm_wsp route, not the TMA one), and the gather at 256 and 1024 tokens both ways;
#  4. the dense tiles, `dbase` against `dlf` (WS_LF=1), M = 512 and 4096 at 4096², and the
#     prefill tests on WS_LF=1.
# About 7-9 minutes; what is done comes back if the call is cut short. For a call with little
# device time: ROUNDS=1 TOKENS=512 TESTS_S=80 (the 512-token decision and its tests come first).
RUN_S=${RUN_S:-70}
source "$(dirname "$0")/../s58/job.sh"
J=$OUT/s67-lf.jsonl
K=$PWD/mlxq/src/backend/cuda/kernels
G="--op gather --tokens ${TOKENS:-512,128}"
for r in $(seq ${ROUNDS:-2}); do
    run base 4 "$G" MLXQ_GATHER_TX=0 MLXQ_CUDA_KERNELS=$K
    run lf 4 "$G" MLXQ_GATHER_TX=0 MLXQ_CUDA_KERNELS=$K MLXQ_CUDA_DEFINES=WSG_LF=1
done
summary
echo "times done at $(( $(date +%s) - T0 )) s"
TESTS_S=${TESTS_S:-150} gather_tests lf MLXQ_CUDA_KERNELS=$K MLXQ_CUDA_DEFINES=WSG_LF=1
gain=$(python3 - "$J" <<'PY'
import json, sys
t = {}
for line in open(sys.argv[1]):
    try: d = json.loads(line)
    except ValueError: continue
    if d.get("kind") == "gather" and d.get("tokens") == 512 and d.get("ok"):
        t.setdefault(d["set"], []).append(d["graph_us"])
b, l = t.get("base"), t.get("lf")
print(1 if b and l and sum(l) / len(l) < 0.97 * sum(b) / len(b) else 0)
PY
)
if [ "$gain" = 1 ] && grep -q "^rc=0" $OUT/gtests-lf.log; then
    echo "lf gains and passes: its sanitizer runs and more token counts"
    ( export MLXQ_CUDA_KERNELS=$K MLXQ_CUDA_DEFINES=WSG_LF=1
      sanitize --moe 64,256,512 --top-k 8 --tokens 256 )
    G2="--op gather --tokens 256,1024"
    run base 4 "$G2" MLXQ_CUDA_KERNELS=$K
    run lf 4 "$G2" MLXQ_CUDA_KERNELS=$K MLXQ_CUDA_DEFINES=WSG_LF=1
    summary
else
    echo "lf: no gain of 3% at 512 tokens, or its tests failed: no sanitizer run"
fi
D="--shape 512,4096,4096 --shape 4096,4096,4096"
run dbase 4 "$D" MLXQ_CUDA_KERNELS=$K
run dlf 4 "$D" MLXQ_CUDA_KERNELS=$K MLXQ_CUDA_DEFINES=WS_LF=1
summary
TESTS_S=150 prefill_tests dlf MLXQ_CUDA_KERNELS=$K MLXQ_CUDA_DEFINES=WS_LF=1
echo "all done at $(( $(date +%s) - T0 )) s"
