#!/bin/bash
# Session 63's first device job cut to the device time left (~200 s): call1.sh's four sets at
# 128 and 512 tokens, one round, then the persistent gather test on wsp3 and the default route.
RUN_S=40
source "$(dirname "$0")/../s58/job.sh"
J=$OUT/s63-call1.jsonl
G="--op gather --tokens 128,512"
run p3 4 "$G" MLXQ_TILE_G=wsp3
run vn 4 "$G" X=1
run n80 4 "$G" MLXQ_CUDA_DEFINES=WSG_VN=0
BIN=.devrun/mlxq-prev run prev 4 "$G" X=1
summary
echo "ab done at $(( $(date +%s) - T0 )) s"
B=$PWD/.devrun/cuda_conformance
for f in wsp3 default; do
    ( cd mlxq && MLXQ_TILE_G=$f MLXQ_FIXTURES=$PWD/tests/fixtures timeout 40 $B --exact persistent_gather_on_permuted_x_matches_the_f64_reference gather_qmm_with_device_indices > $OUT/gtests-$f.log 2>&1; echo "rc=$?" >> $OUT/gtests-$f.log )
    grep -hE "^test |test result|rc=|panicked" $OUT/gtests-$f.log | sed "s/^/$f: /"
done
echo "all done at $(( $(date +%s) - T0 )) s"
