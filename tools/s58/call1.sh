#!/bin/bash
# Session 58's first device job: session 57's merged route checked (the decode tests on the
# default route), the small-M sweep (4-bit, graph µs), the decode-step chain unfused and fused
# (`--chain --fuse`, first timing), and M = 1 at N = 4096..28672 on qmv_decb's forms against
# the default route (data for the N = 4096 shapes, 54% and 63% of the bandwidth).
# Carry .devrun (mlxq.gz, cuda_conformance.gz built from this commit); run from the repo root.
RUN_S=80
source "$(dirname "$0")/job.sh"
J=$OUT/s58-call1.jsonl
B=$PWD/.devrun/cuda_conformance
D="many_token_decode_matches_the_f64_reference repeated_decode_matches_the_f64_reference_every_time long_rows_and_many_rows"
( cd mlxq && MLXQ_FIXTURES=$PWD/tests/fixtures timeout 90 $B --exact $D > $OUT/tests.log 2>&1; echo "rc=$?" >> $OUT/tests.log )
grep -hE "test result|rc=|FAIL|panick" $OUT/tests.log
echo "tests done at $(( $(date +%s) - T0 )) s"
S="--shape 1,14336,4096 --shape 5,14336,4096 --shape 8,14336,4096 --shape 12,14336,4096 --shape 16,14336,4096 --shape 8,4096,4096 --shape 16,4096,4096 --shape 8,28672,8192"
run sweep 4 "$S --chain" X=1
run fuse 4 "--shape 1,4096,4096 --chain --fuse" X=1
run fuse 8 "--shape 1,4096,4096 --chain --fuse" X=1
run chain 8 "--shape 1,4096,4096 --chain" X=1
echo "chains done at $(( $(date +%s) - T0 )) s"
M1="--shape 1,4096,4096 --shape 1,4096,14336 --shape 1,6144,4096 --shape 1,28672,4096"
run m1-def 4 "$M1" X=1
run m1-b82 4 "$M1" MLXQ_DECB=1
run m1-b43 4 "$M1" MLXQ_DECB=1 MLXQ_DECB_NC=4 MLXQ_DECB_NS=3
run m1-b84 4 "$M1" MLXQ_DECB=1 MLXQ_DECB_NS=4
run m1-def 4 "$M1" X=1
echo "bench done at $(( $(date +%s) - T0 )) s"
python3 tools/ab_table.py $J
grep -h '"kind":"chain"' $J | cut -c1-420
grep -h "read bandwidth" $OUT/err.txt | head -2
grep -hiE "error|panic" $OUT/err.txt | head -5
echo "all done at $(( $(date +%s) - T0 )) s"
