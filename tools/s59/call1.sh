#!/bin/bash
# The next device job (session 59 left it ready, in place of session 58's call3.sh, never run;
# binaries built from main with GP34_DEFAULT off): 4-bit g64 M = 3..4 on the
# group-pure one n-tile (MLXQ_DECB_GP34=1) against the default slotted forms, M <= 2 at N = 6144 on
# qmv_decb_4_3, the decode-step chain unfused and fused, the issue's small-M rows; then the
# decode tests and compute-sanitizer (racecheck, memcheck) over the new M = 3..4 route.
# Carry .devrun (mlxq.gz, cuda_conformance.gz built from this commit); run from the repo root.
RUN_S=100
source "$(dirname "$0")/../s58/job.sh"
J=$OUT/s59-call1.jsonl
G="--shape 3,14336,4096 --shape 4,14336,4096 --shape 3,4096,4096 --shape 4,4096,4096 --shape 4,8192,4096 --shape 4,28672,8192 --shape 1,6144,4096 --shape 2,6144,4096"
run def 4 "$G" X=1
run gp34on 4 "$G" MLXQ_DECB_GP34=1
echo "A/B done at $(( $(date +%s) - T0 )) s"
run fuse 4 "--shape 1,4096,4096 --chain --fuse" X=1
T="--shape 1,14336,4096 --shape 2,14336,4096 --shape 3,14336,4096 --shape 4,14336,4096 --shape 5,14336,4096 --shape 8,14336,4096 --shape 12,14336,4096 --shape 16,14336,4096"
run table 4 "$T" X=1
echo "bench done at $(( $(date +%s) - T0 )) s"
summary
CS=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
S="bench --device cuda --iters 1 --warmup 0 --rotate-mib 1 --max-copies 1 --no-cublas --bits 4 --shape 3,9000,2048 --shape 4,8200,4096 --shape 3,5000,6144 --shape 4,4100,4096"
( export MLXQ_DECB_GP34=1; timeout 90 $CS --tool racecheck .devrun/mlxq $S > $OUT/racecheck.txt 2>&1; echo "rc=$?" >> $OUT/racecheck.txt; timeout 60 $CS --tool memcheck .devrun/mlxq $S > $OUT/memcheck.txt 2>&1; echo "rc=$?" >> $OUT/memcheck.txt ) &
TESTS_S=150 decode_tests MLXQ_DECB_GP34=1
wait
grep -hE "ERROR SUMMARY|RACECHECK SUMMARY|hazard|rc=|\"ok\":false" $OUT/racecheck.txt $OUT/memcheck.txt | sort | uniq -c | head
echo "all done at $(( $(date +%s) - T0 )) s"
