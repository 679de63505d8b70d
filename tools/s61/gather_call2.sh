#!/bin/bash
# Session 61's second device job: the wide persistent gather (qmm_ws_g80w, 256 rows an item,
# the default) against the narrow one (MLXQ_TILE_G=ws, 128 rows) and the wgmma tile
# (MLXQ_GATHER_WS=0), each with and without the items' L2 prefetches (WSG_PF); then the gather
# tests on the default route (and the narrow one forced), and compute-sanitizer. Build and
# carry .devrun as tools/s61/gather_call.sh says.
RUN_S=60
source "$(dirname "$0")/../s58/job.sh"
J=$OUT/s61-gather2.jsonl
G="--op gather --tokens 512,1024"
RUN_S=60 run smoke 4 "--op gather --tokens 512" X=1
if ! grep -q '"kind":"gather"' $J; then echo "smoke failed"; tail -5 $OUT/err.txt; exit 1; fi
echo "smoke done at $(( $(date +%s) - T0 )) s"
B=$PWD/.devrun/cuda_conformance
T="gather_qmm_with_device_indices fp_gather_qmm_with_device_indices fp_tiled_prefill_and_gather_match_the_f64_reference gather_into_captured_in_a_graph_replays_with_new_indices"
( cd mlxq && MLXQ_FIXTURES=$PWD/tests/fixtures timeout 200 $B --exact $T --test-threads=4 > $OUT/gtests.log 2>&1; echo "rc=$?" >> $OUT/gtests.log )
grep -hE "^test |test result|rc=|panicked" $OUT/gtests.log | head -12
echo "tests done at $(( $(date +%s) - T0 )) s"
for r in 1 2; do
    run wide 4,8 "$G" X=1
    run wide_nopf 4,8 "$G" MLXQ_CUDA_DEFINES=WSG_PF=0
    run narrow 4,8 "$G" MLXQ_TILE_G=ws
    run narrow_nopf 4,8 "$G" MLXQ_TILE_G=ws MLXQ_CUDA_DEFINES=WSG_PF=0
    run wg 4,8 "$G" MLXQ_GATHER_WS=0
    echo "round $r done at $(( $(date +%s) - T0 )) s"
done
summary
CS=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
S="bench --device cuda --op gather --iters 1 --warmup 0 --rotate-mib 1 --max-copies 1 --no-cublas --bits 4,8 --moe 6,200,1024 --top-k 4 --tokens 100,160"
timeout 90 $CS --tool racecheck --kernel-name kns=qmm_ws_g .devrun/mlxq $S > $OUT/racecheck.txt 2>&1; echo "rc=$?" >> $OUT/racecheck.txt
timeout 90 $CS --tool memcheck .devrun/mlxq $S > $OUT/memcheck.txt 2>&1; echo "rc=$?" >> $OUT/memcheck.txt
grep -hE "ERROR SUMMARY|RACECHECK SUMMARY|hazard|rc=|\"ok\":false" $OUT/racecheck.txt $OUT/memcheck.txt | sort | uniq -c | head
echo "sanitizers done at $(( $(date +%s) - T0 )) s"
( cd mlxq && MLXQ_TILE_G=ws MLXQ_FIXTURES=$PWD/tests/fixtures timeout 60 $B --exact gather_qmm_with_device_indices > $OUT/narrow.log 2>&1; echo "rc=$?" >> $OUT/narrow.log )
grep -hE "test result|rc=|panicked" $OUT/narrow.log
echo "all done at $(( $(date +%s) - T0 )) s"
