#!/bin/bash
# Session 63's first device job (branch s63-ahead: items one ahead, WSG_VN, and the
# three-warpgroup qmm_wsp3_g80): the 4-bit gather, graph µs, two rounds alternating, at 128,
# 256, 512 and 1024 tokens of top-8 of 64 x 2048²: p3 (MLXQ_TILE_G=wsp3), vn (the default
# route: qmm_wsp_g80 with WSG_VN), n80 (WSG_VN=0: the item-ahead build alone) and prev (main's
# binary, .devrun/mlxq-prev); the persistent form forced at 128 and 256 tokens with and
# without WSG_VN; then the gather tests on the default route, on wsp3 and on the plain form.
RUN_S=100
source "$(dirname "$0")/../s58/job.sh"
J=$OUT/s63-call1.jsonl
G="--op gather --tokens 128,256,512,1024"
for r in 1 2; do
    run p3 4 "$G" MLXQ_TILE_G=wsp3
    run vn 4 "$G" X=1
    run n80 4 "$G" MLXQ_CUDA_DEFINES=WSG_VN=0
    BIN=.devrun/mlxq-prev run prev 4 "$G" X=1
done
run vnp 4 "--op gather --tokens 128,256" MLXQ_TILE_G=wsp
run n80p 4 "--op gather --tokens 128,256" MLXQ_TILE_G=wsp MLXQ_CUDA_DEFINES=WSG_VN=0
summary
echo "ab done at $(( $(date +%s) - T0 )) s"
B=$PWD/.devrun/cuda_conformance
T="persistent_gather_on_permuted_x_matches_the_f64_reference gather_into_captured_in_a_graph_replays_with_new_indices gather_qmm_with_device_indices fp_gather_qmm_with_device_indices"
( cd mlxq && MLXQ_FIXTURES=$PWD/tests/fixtures timeout 120 $B --exact $T --test-threads=4 > $OUT/gtests.log 2>&1; echo "rc=$?" >> $OUT/gtests.log )
grep -hE "^test |test result|rc=|panicked" $OUT/gtests.log
P="persistent_gather_on_permuted_x_matches_the_f64_reference gather_qmm_with_device_indices gather_into_captured_in_a_graph_replays_with_new_indices"
for f in wsp3 ws; do
    ( cd mlxq && MLXQ_TILE_G=$f MLXQ_FIXTURES=$PWD/tests/fixtures timeout 100 $B --exact $P > $OUT/gtests-$f.log 2>&1; echo "rc=$?" >> $OUT/gtests-$f.log )
    grep -hE "^test |test result|rc=|panicked" $OUT/gtests-$f.log | sed "s/^/$f: /"
done
echo "tests done at $(( $(date +%s) - T0 )) s"
