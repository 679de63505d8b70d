#!/bin/bash
# Ran once (05:41 UTC, an H100; docs/perf-cuda.md session 60, JSON docs/perf/cuda-h100-s60-call1.jsonl).
# DEC_L2PF lost on every shape and was removed from the kernels afterwards (4c44386 had it):
# rerunning this job needs that commit's build.
# Session 60's device job: (1) the L2 prefetch trial (DEC_L2PF, common.cuh: the decode
# kernels prefetch up to this many bytes of each row of their first tile into L2 before
# pdl_wait, so that W streams while the previous kernel drains), the same binary with the
# define through MLXQ_CUDA_DEFINES against the default (0: compiled out), alternated; (2)
# session 58's GP34 A/B (4-bit g64 M = 3..4 on the group-pure one n-tile, MLXQ_DECB_GP34=1,
# against the slotted default); (3) the fused decode-step chain both ways. Every result is
# checked against the f64 reference by the bench itself. Carry .devrun (mlxq.gz, cuda_conformance.gz); run from the repo root.
source "$(dirname "$0")/../s58/job.sh"
J=$OUT/s60-call1.jsonl
S="--shape 1,4096,4096 --shape 1,6144,4096 --shape 1,4096,14336 --shape 1,14336,4096 --shape 1,28672,4096 --shape 16,14336,4096"
G="--shape 3,14336,4096 --shape 4,14336,4096 --shape 3,4096,4096 --shape 4,4096,4096"
RUN_S=120 run pf0 4 "$S" X=1
RUN_S=120 run pf64k 4 "$S" MLXQ_CUDA_DEFINES=DEC_L2PF=65536
echo "round 1 at $(( $(date +%s) - T0 )) s"
RUN_S=60 run pf0 4 "--shape 1,4096,4096 --chain --fuse" X=1
RUN_S=60 run pf64k 4 "--shape 1,4096,4096 --chain --fuse" MLXQ_CUDA_DEFINES=DEC_L2PF=65536
echo "chains at $(( $(date +%s) - T0 )) s"
if [ $(( $(date +%s) - T0 )) -lt 300 ]; then  # where the time allows
    RUN_S=60 run gp34off 4 "$G" X=1
    RUN_S=60 run gp34on 4 "$G" MLXQ_DECB_GP34=1
fi
echo "gp34 at $(( $(date +%s) - T0 )) s"
if [ $(( $(date +%s) - T0 )) -lt 330 ]; then  # a second round where the time allows
    RUN_S=60 run pf0 4 "$S" X=1
    RUN_S=60 run pf64k 4 "$S" MLXQ_CUDA_DEFINES=DEC_L2PF=65536
fi
echo "round 2 at $(( $(date +%s) - T0 )) s"
summary
echo "all done at $(( $(date +%s) - T0 )) s"
