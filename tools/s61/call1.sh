#!/bin/bash
# The next device job (session 60 left it ready; not run): the issue-4 table on main's
# defaults (GP34 on since session 60), 4-bit M = 3..4 at N = 6144 (the fused q/k/v shape,
# not timed on the group-pure form) against the slotted form, the fused decode-step chains,
# the gathers, and the decode tests. Build first (README: the CUDA build), then
#   mkdir -p .devrun; strip -o .devrun/mlxq target/release/mlxq; strip -o
#   .devrun/cuda_conformance <the cuda_conformance test binary>; gzip -f .devrun/*
# and carry .devrun; run from the repo root (about 6 minutes with a cold kernel cache).
RUN_S=120
source "$(dirname "$0")/../s58/job.sh"
J=$OUT/s61-call1.jsonl
G="--shape 3,6144,4096 --shape 4,6144,4096"
for r in 1 2; do
    RUN_S=60 run gp34on 4 "$G" X=1
    RUN_S=60 run gp34off 4 "$G" MLXQ_DECB_GP34=0
done
echo "gp34 done at $(( $(date +%s) - T0 )) s"
T="--shape 1,4096,4096 --shape 1,14336,4096 --shape 1,28672,8192 --shape 1,4096,14336 --shape 2,14336,4096 --shape 4,14336,4096 --shape 8,14336,4096 --shape 16,14336,4096 --shape 4096,4096,4096"
run table 4,8 "$T" X=1
run gather 4,8 "--op gather --shape 1,2048,2048 --shape 512,2048,2048" X=1
run fuse 4 "--shape 1,4096,4096 --chain --fuse" X=1
run fuse 8 "--shape 1,4096,4096 --chain --fuse" X=1
echo "bench done at $(( $(date +%s) - T0 )) s"
summary
TESTS_S=150 decode_tests
echo "all done at $(( $(date +%s) - T0 )) s"
