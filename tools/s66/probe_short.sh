#!/bin/bash
# The probe's decision alone, for a call with little device time left: the 512-token gather on
# the tree's kernels (`base`) and with WSG_LF=1 (`lf`), then its gather tests if time remains.
RUN_S=${RUN_S:-70}
source "$(dirname "$0")/../s58/job.sh"
J=$OUT/s67-short.jsonl
K=$PWD/mlxq/src/backend/cuda/kernels
G="--op gather --tokens ${TOKENS:-512}"
run base 4 "$G" MLXQ_GATHER_TX=0 MLXQ_CUDA_KERNELS=$K
run lf 4 "$G" MLXQ_GATHER_TX=0 MLXQ_CUDA_KERNELS=$K MLXQ_CUDA_DEFINES=WSG_LF=1
summary
echo "times done at $(( $(date +%s) - T0 )) s"
TESTS_S=${TESTS_S:-80} gather_tests lf MLXQ_CUDA_KERNELS=$K MLXQ_CUDA_DEFINES=WSG_LF=1
echo "all done at $(( $(date +%s) - T0 )) s"
