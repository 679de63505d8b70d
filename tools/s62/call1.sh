#!/bin/bash
# Session 62's first device job: the 4-bit gather's persistent GEMM on x permuted by the sort
# (qmm_wsp_g80, the new default) against the same binary's qmm_ws_g80 (MLXQ_GATHER_XP=0: the
# consumers' loop without its per-step divisions and descriptor arithmetic, one proxy fence a
# step) and wgmma tile (MLXQ_GATHER_WS=0), and session 61's binary (.devrun/mlxq-base); the
# gather tests on the default route and with the permuted form forced. Build and carry .devrun
# as tools/s61/gather_call.sh says, plus session 61's binary as .devrun/mlxq-base.gz.
RUN_S=90
source "$(dirname "$0")/../s58/job.sh"
J=$OUT/s62-call1.jsonl
G="--op gather --tokens 512"
RUN_S=60 run smoke 4 "$G" X=1
if ! grep -q '"kind":"gather"' $J; then echo "smoke failed"; tail -5 $OUT/err.txt; exit 1; fi
echo "smoke done at $(( $(date +%s) - T0 )) s"
B=$PWD/.devrun/cuda_conformance
T="persistent_gather_on_permuted_x_matches_the_f64_reference gather_qmm_with_device_indices gather_into_captured_in_a_graph_replays_with_new_indices fp_gather_qmm_with_device_indices"
( cd mlxq && MLXQ_FIXTURES=$PWD/tests/fixtures timeout 150 $B --exact $T --test-threads=4 > $OUT/gtests.log 2>&1; echo "rc=$?" >> $OUT/gtests.log )
grep -hE "^test |test result|rc=|panicked" $OUT/gtests.log | head -12
( cd mlxq && MLXQ_TILE_G=wsp MLXQ_FIXTURES=$PWD/tests/fixtures timeout 150 $B --exact $T --test-threads=4 > $OUT/gtests-wsp.log 2>&1; echo "rc=$?" >> $OUT/gtests-wsp.log )
grep -hE "^test |test result|rc=|panicked" $OUT/gtests-wsp.log | head -12
echo "tests done at $(( $(date +%s) - T0 )) s"
for r in 1 2; do
    run wsp 4,8 "$G --tokens 512,1024" X=1
    BIN=.devrun/mlxq-base run base 4,8 "$G --tokens 512,1024" X=1
    run ws 4 "$G --tokens 512,1024" MLXQ_GATHER_XP=0
    run wg 4 "$G --tokens 512" MLXQ_GATHER_WS=0
done
run wsp1 4,8 "$G --tokens 1" X=1
echo "bench done at $(( $(date +%s) - T0 )) s"
summary
echo "all done at $(( $(date +%s) - T0 )) s"
