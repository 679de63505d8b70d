#!/bin/bash
# Session 62's fourth device job: the permuted form with the next item's tile and output
# offsets read one item ahead and the copy of x over 256 blocks (64 chunks each) against call
# 1's build (.devrun/mlxq-prev), one round each at 512 tokens (the device budget's end); the
# gather tests of the permuted form; memcheck over the gather (the change moves global loads
# and the copy's grid, not shared memory).
RUN_S=90
source "$(dirname "$0")/../s58/job.sh"
J=$OUT/s62-call4.jsonl
G="--op gather --tokens 512"
for r in 1; do
    run new 4 "$G" X=1
    BIN=.devrun/mlxq-prev run prev 4 "$G" X=1
done
summary
echo "ab done at $(( $(date +%s) - T0 )) s"
B=$PWD/.devrun/cuda_conformance
T="persistent_gather_on_permuted_x_matches_the_f64_reference gather_into_captured_in_a_graph_replays_with_new_indices"
( cd mlxq && MLXQ_FIXTURES=$PWD/tests/fixtures timeout 150 $B --exact $T --test-threads=4 > $OUT/gtests.log 2>&1; echo "rc=$?" >> $OUT/gtests.log )
grep -hE "test result|rc=|panicked" $OUT/gtests.log
echo "tests done at $(( $(date +%s) - T0 )) s"
CS=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
S="bench --device cuda --op gather --iters 1 --warmup 0 --rotate-mib 1 --max-copies 1 --no-cublas --bits 4 --moe 6,200,1024 --top-k 4 --tokens 100"
MLXQ_TILE_G=wsp timeout 120 $CS --tool memcheck .devrun/mlxq $S > $OUT/memcheck.txt 2>&1; echo "rc=$?" >> $OUT/memcheck.txt
grep -hE "ERROR SUMMARY|rc=" $OUT/memcheck.txt
echo "all done at $(( $(date +%s) - T0 )) s"
