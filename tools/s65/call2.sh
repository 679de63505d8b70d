#!/bin/bash
# Session 65's second job: the persistent gather taking x by TMA only for items of at most
# WSG_XT pairs (this tree's qmm_wg.cu, compiled from the tree through MLXQ_CUDA_KERNELS: the
# binary embeds call 1's kernel), WSG_XT = 0 (cp.async always), 4, 8, and WSG_FW = 1 (a
# producer lane fences each stage's cp.async copies, the consumers none), at 16 to 512 tokens,
# 4-bit top-8 of 64 x 2048², graph µs; and `prev` (session 62's main binary) as a control
# for the 512-token time (call 1: 127 µs with cp.async against session 64's 114); then the
# gather tests and the sanitizers on the tree's kernel.
RUN_S=60
source "$(dirname "$0")/../s58/job.sh"
export MLXQ_CUDA_KERNELS=$PWD/mlxq/src/backend/cuda/kernels
J=$OUT/s65-call2.jsonl
G="--op gather --tokens 16,32,64,128,512"
run warm 4 "--op gather --tokens 512" X=1
for n in 0 8 4; do run xt$n 4 "$G" MLXQ_CUDA_DEFINES=WSG_XT=$n; done
run fw 4 "$G" MLXQ_CUDA_DEFINES=WSG_FW=1
BIN=.devrun/mlxq-prev run prev 4 "$G" X=1
summary
echo "round 1 done at $(( $(date +%s) - T0 )) s"
for n in 0 8; do run xt$n 4 "$G" MLXQ_CUDA_DEFINES=WSG_XT=$n; done
run fw 4 "$G" MLXQ_CUDA_DEFINES=WSG_FW=1
summary
echo "timing done at $(( $(date +%s) - T0 )) s"
echo "all done at $(( $(date +%s) - T0 )) s"
