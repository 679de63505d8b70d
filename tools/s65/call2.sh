#!/bin/bash
# Session 65's second job: the persistent gather taking x by TMA only for items of at most
# WSG_XT pairs (this tree's qmm_wg.cu, compiled from the tree through MLXQ_CUDA_KERNELS: the
# binary embeds call 1's kernel): WSG_XT = 0 (cp.async always, the default), 2, 4 and 8, and
# WSG_FW = 1 (a producer lane fences each stage's cp.async copies, the consumers none), at 16
# to 512 tokens, 4-bit top-8 of 64 x 2048², graph µs, two rounds; `prev` (session 62's main
# binary) as a control for the 512-token time (call 1: 127 µs with cp.async against session
# 64's 114). Then the gather tests with WSG_XT = 4 (TMA items and cp.async items).
RUN_S=60
source "$(dirname "$0")/../s58/job.sh"
export MLXQ_CUDA_KERNELS=$PWD/mlxq/src/backend/cuda/kernels
J=$OUT/s65-call2.jsonl
G="--op gather --tokens 16,32,64,128,512"
run warm 4 "--op gather --tokens 512" X=1
for r in 1 2; do
    for n in 0 2 4 8; do run xt$n 4 "$G" MLXQ_CUDA_DEFINES=WSG_XT=$n; done
    run fw 4 "$G" MLXQ_CUDA_DEFINES=WSG_FW=1
    [ $r = 1 ] && BIN=.devrun/mlxq-prev run prev 4 "$G" X=1
    summary
    echo "round $r done at $(( $(date +%s) - T0 )) s"
done
gather_tests xt4 MLXQ_CUDA_DEFINES=WSG_XT=4
echo "all done at $(( $(date +%s) - T0 )) s"
