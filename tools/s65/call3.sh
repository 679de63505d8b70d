#!/bin/bash
# Session 65's third job (after call2.sh, on the warm machine): the gather tests on the tree's
# kernel with WSG_XT = 4 (through MLXQ_CUDA_KERNELS), then memcheck and racecheck where items hold
# ~2 pairs (16 tokens of top-8 of 64: the TMA items) and ~67 (cp.async items).
source "$(dirname "$0")/../s58/job.sh"
export MLXQ_CUDA_KERNELS=$PWD/mlxq/src/backend/cuda/kernels MLXQ_CUDA_DEFINES=WSG_XT=4
gather_tests xt4 X=1
echo "tests done at $(( $(date +%s) - T0 )) s"
sanitize --moe 64,200,512 --top-k 8 --tokens 16
sanitize --moe 6,200,1024 --top-k 4 --tokens 100
echo "all done at $(( $(date +%s) - T0 )) s"
