#!/bin/bash
# The short form of call2.sh (for a small remaining budget): WSG_XT = 0 and 4 and WSG_FW = 1 at
# 16, 64 and 512 tokens, and session 62's binary as the 512-token control, one round.
RUN_S=45
source "$(dirname "$0")/../s58/job.sh"
export MLXQ_CUDA_KERNELS=$PWD/mlxq/src/backend/cuda/kernels
J=$OUT/s65-call2min.jsonl
G="--op gather --tokens 16,64,512"
run fw 4 "$G" MLXQ_CUDA_DEFINES=WSG_FW=1
run xt0 4 "$G" MLXQ_CUDA_DEFINES=WSG_XT=0
BIN=.devrun/mlxq-prev run prev 4 "$G" X=1
run xt4 4 "$G" MLXQ_CUDA_DEFINES=WSG_XT=4
summary
echo "all done at $(( $(date +%s) - T0 )) s"
