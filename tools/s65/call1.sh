#!/bin/bash
# Session 65's device job: the persistent gather's x rows by TMA (WSG_XT=1, the new default;
# the consumers drop their per-step proxy fence) against cp.async (WSG_XT=0, main's form),
# 4-bit gather, top-8 of 64 x 2048², graph µs, 16 to 1024 tokens, two rounds alternated (the
# bench checks every result against its reference); then the gather tests on the default route, on qmm_ws_g80
# (MLXQ_GATHER_XP=0) and on wsp3; then memcheck and racecheck on the default form.
RUN_S=60
source "$(dirname "$0")/../s58/job.sh"
J=$OUT/s65-call1.jsonl
G="--op gather --tokens 16,128,512,1024"
run warm 4 "--op gather --tokens 512" X=1
for r in 1 2; do
    run xt 4 "$G" X=1
    run xt0 4 "$G" MLXQ_CUDA_DEFINES=WSG_XT=0
done
summary
echo "timing done at $(( $(date +%s) - T0 )) s"
TESTS_S=220
gather_tests default X=1 &
gather_tests xp0 MLXQ_GATHER_XP=0 &
gather_tests wsp3 MLXQ_TILE_G=wsp3 &
wait
echo "tests done at $(( $(date +%s) - T0 )) s"
sanitize --moe 6,200,1024 --top-k 4 --tokens 100
echo "all done at $(( $(date +%s) - T0 )) s"
