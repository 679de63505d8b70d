#!/bin/bash
# Session 58's second device job, on the route fix (decb_pick: the N = 4096 rule of the
# n-tiles no longer takes M <= 2, which call 1 found on the 8 x 2 ring, 1.3x slower):
# M = 1..2 at N = 4096..8191 on the fixed default against qmv_decb_4_3 (two rounds), the
# decode-step chain unfused and fused at 4 and 8 bits, M = 1..16 rows of the issue's table,
# then the decode tests (default route) and the route's own unit test.
# Carry .devrun (mlxq.gz, cuda_conformance.gz built from this commit); run from the repo root.
RUN_S=100
source "$(dirname "$0")/job.sh"
J=$OUT/s58-call2.jsonl
M1="--shape 1,4096,4096 --shape 2,4096,4096 --shape 1,4096,14336 --shape 1,6144,4096 --shape 2,6144,4096 --shape 1,2048,4096"
run m1-def 4 "$M1" X=1
run m1-b43 4 "$M1" MLXQ_DECB=1 MLXQ_DECB_NC=4 MLXQ_DECB_NS=3
run m1-def 4 "$M1" X=1
run m1-b43 4 "$M1" MLXQ_DECB=1 MLXQ_DECB_NC=4 MLXQ_DECB_NS=3
echo "m1 done at $(( $(date +%s) - T0 )) s"
run chain 4 "--shape 1,4096,4096 --chain" X=1
run fuse 4 "--shape 1,4096,4096 --chain --fuse" X=1
run chain 8 "--shape 1,4096,4096 --chain" X=1
run fuse 8 "--shape 1,4096,4096 --chain --fuse" X=1
echo "chains done at $(( $(date +%s) - T0 )) s"
T="--shape 1,4096,4096 --shape 1,14336,4096 --shape 1,28672,8192 --shape 1,4096,14336 --shape 2,14336,4096 --shape 4,14336,4096 --shape 8,14336,4096 --shape 16,14336,4096"
run table 4,8 "$T" X=1
echo "bench done at $(( $(date +%s) - T0 )) s"
summary
decode_tests
echo "all done at $(( $(date +%s) - T0 )) s"
