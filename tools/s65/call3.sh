#!/bin/bash
# Session 65's third job (after call2.sh, on the warm machine): the gather tests on the tree's
# kernel with WSG_XT = 4 (through MLXQ_CUDA_KERNELS), then memcheck and racecheck where items hold
# ~2 pairs (16 tokens of top-8 of 64: the TMA items) and ~67 (cp.async items).
source "$(dirname "$0")/../s58/job.sh"
export MLXQ_CUDA_KERNELS=$PWD/mlxq/src/backend/cuda/kernels MLXQ_CUDA_DEFINES=WSG_XT=4
# The gather tests, then memcheck and racecheck where items
# hold ~2 pairs (16 tokens of top-8 of 64: the TMA items) and ~67 (cp.async items).
B=$PWD/.devrun/cuda_conformance
P="persistent_gather_on_permuted_x_matches_the_f64_reference gather_qmm_with_device_indices gather_into_captured_in_a_graph_replays_with_new_indices fp_gather_qmm_with_device_indices"
( cd mlxq && MLXQ_FIXTURES=$PWD/tests/fixtures timeout 200 $B --exact $P --test-threads=4 > $OUT/gtests.log 2>&1; echo "rc=$?" >> $OUT/gtests.log )
grep -hE "^test |test result|rc=|panicked" $OUT/gtests.log
echo "tests done at $(( $(date +%s) - T0 )) s"
CS=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
S="bench --device cuda --op gather --iters 1 --warmup 0 --rotate-mib 1 --max-copies 1 --no-cublas --bits 4"
for c in "--moe 64,200,512 --top-k 8 --tokens 16" "--moe 6,200,1024 --top-k 4 --tokens 100"; do
    timeout 50 $CS --tool memcheck .devrun/mlxq $S $c > $OUT/memcheck.txt 2>&1; echo "rc=$?" >> $OUT/memcheck.txt
    timeout 60 $CS --tool racecheck --kernel-name kns=qmm_wsp .devrun/mlxq $S $c > $OUT/racecheck.txt 2>&1; echo "rc=$?" >> $OUT/racecheck.txt
    grep -hE "ERROR SUMMARY|RACECHECK SUMMARY|\"ok\":false|rc=" $OUT/memcheck.txt $OUT/racecheck.txt | sed "s/^/$c: /"
done
echo "all done at $(( $(date +%s) - T0 )) s"
