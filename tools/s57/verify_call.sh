#!/bin/bash
# Session 57's check of the merged route (x in pieces, 4 stages for the group-pure one n-tile
# at N >= 8192): the decode tests on the default route, a small-M sweep (4-bit, graph µs), and
# the decode-step chain unfused and fused (--chain --fuse). Carry .devrun (mlxq.gz,
# cuda_conformance.gz built from this commit) and run from the repository root.
cd "$(dirname "$0")/../.."
gunzip -f .devrun/*.gz 2>/dev/null; chmod +x .devrun/mlxq .devrun/cuda_conformance
export MLXQ_CUDA_CACHE=/tmp/mlxq-cache; mkdir -p $MLXQ_CUDA_CACHE
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
T0=$(date +%s)
B=$PWD/.devrun/cuda_conformance
D="many_token_decode_matches_the_f64_reference repeated_decode_matches_the_f64_reference_every_time long_rows_and_many_rows"
( cd mlxq && MLXQ_FIXTURES=$PWD/tests/fixtures timeout 70 $B --exact $D > $OUT/tests.log 2>&1; echo "rc=$?" >> $OUT/tests.log ) &
wait
grep -hE "test result|rc=|FAIL|panick" $OUT/tests.log
S="--shape 1,14336,4096 --shape 5,14336,4096 --shape 8,14336,4096 --shape 12,14336,4096 --shape 16,14336,4096 --shape 8,4096,4096 --shape 16,4096,4096 --shape 8,28672,8192"
timeout 70 .devrun/mlxq bench --device cuda --json --iters 20 --bits 4 $S --no-cublas --chain 2>>$OUT/err.txt > $OUT/sweep.jsonl
timeout 45 .devrun/mlxq bench --device cuda --json --iters 20 --bits 4 --shape 1,4096,4096 --no-cublas --chain --fuse 2>>$OUT/err.txt > $OUT/chain-fuse.jsonl
python3 tools/ab_table.py $OUT/sweep.jsonl $OUT/chain-fuse.jsonl
grep -h '"kind":"chain"' $OUT/sweep.jsonl $OUT/chain-fuse.jsonl | cut -c1-400
grep -h "read bandwidth" $OUT/err.txt | head -2
echo "all done at $(( $(date +%s) - T0 )) s"
