#!/bin/bash
# Session 64's device job (branch s63-ahead with qmm_wsp3_g80 in the entry lists and the
# persistent form routed at every grouped tile of an affine 4-bit gather): the 4-bit gather,
# graph µs, top-8 of 64 x 2048², 16 to 1024 tokens, the sets alternated over two rounds:
# ws (the default route: qmm_wsp_g80), ws3 (MLXQ_GATHER_WS=3: qmm_wsp3_g80) and tile
# (MLXQ_GATHER_WS=0: the grouped wgmma tile gather_tile picks, main's route below 512
# tokens); then the gather tests on wsp3 and on the default route (concurrently), then
# memcheck and racecheck on both permuted-x forms.
RUN_S=60
source "$(dirname "$0")/../s58/job.sh"
J=$OUT/s64-call1.jsonl
G="--op gather --tokens 16,32,64,128,256,512,1024"
ab() {
    run ws 4 "$G" X=1
    run ws3 4 "$G" MLXQ_GATHER_WS=3
    run tile 4 "$G" MLXQ_GATHER_WS=0
}
ab
summary
echo "round 1 done at $(( $(date +%s) - T0 )) s"
B=$PWD/.devrun/cuda_conformance
P="persistent_gather_on_permuted_x_matches_the_f64_reference gather_qmm_with_device_indices gather_into_captured_in_a_graph_replays_with_new_indices fp_gather_qmm_with_device_indices"
for f in wsp3 default; do
    ( cd mlxq && MLXQ_TILE_G=$f MLXQ_FIXTURES=$PWD/tests/fixtures timeout 200 $B --exact $P --test-threads=4 > $OUT/gtests-$f.log 2>&1; echo "rc=$?" >> $OUT/gtests-$f.log ) &
done
wait
for f in wsp3 default; do grep -hE "^test |test result|rc=|panicked" $OUT/gtests-$f.log | sed "s/^/$f: /"; done
echo "tests done at $(( $(date +%s) - T0 )) s"
CS=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
S="bench --device cuda --op gather --iters 1 --warmup 0 --rotate-mib 1 --max-copies 1 --no-cublas --bits 4 --moe 6,200,1024 --top-k 4 --tokens 100"
for f in wsp3 wsp; do
    MLXQ_TILE_G=$f timeout 60 $CS --tool memcheck .devrun/mlxq $S > $OUT/memcheck-$f.txt 2>&1; echo "rc=$?" >> $OUT/memcheck-$f.txt
    MLXQ_TILE_G=$f timeout 75 $CS --tool racecheck --kernel-name kns=qmm_wsp .devrun/mlxq $S > $OUT/racecheck-$f.txt 2>&1; echo "rc=$?" >> $OUT/racecheck-$f.txt
    grep -hE "ERROR SUMMARY|RACECHECK SUMMARY|\"ok\":false|rc=" $OUT/memcheck-$f.txt $OUT/racecheck-$f.txt | sed "s/^/$f: /"
done
echo "sanitizers done at $(( $(date +%s) - T0 )) s"
[ $(( $(date +%s) - T0 )) -lt 330 ] && ab && summary
echo "all done at $(( $(date +%s) - T0 )) s"
