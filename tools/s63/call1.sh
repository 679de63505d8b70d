#!/bin/bash
# Session 63's first device job (branch s63-ahead: items one ahead, WSG_VN, and the
# three-warpgroup qmm_wsp3_g80): the 4-bit gather, graph µs, at 128, 256, 512 and 1024 tokens
# of top-8 of 64 x 2048², the sets alternated: p3 (MLXQ_TILE_G=wsp3), vn (the default route:
# qmm_wsp_g80 with WSG_VN), n80 (WSG_VN=0: the item-ahead build alone) and prev (main's
# binary, .devrun/mlxq-prev); the persistent form forced at 128 and 256 tokens with and
# without WSG_VN; the gather tests on wsp3 and on the default route; memcheck and racecheck
# on both permuted-x forms; a second round of the four sets if the call's time allows.
RUN_S=45
source "$(dirname "$0")/../s58/job.sh"
J=$OUT/s63-call1.jsonl
G="--op gather --tokens 128,256,512,1024"
ab() {
    run p3 4 "$G" MLXQ_TILE_G=wsp3
    run vn 4 "$G" X=1
    run n80 4 "$G" MLXQ_CUDA_DEFINES=WSG_VN=0
    BIN=.devrun/mlxq-prev run prev 4 "$G" X=1
}
ab
run vnp 4 "--op gather --tokens 128,256" MLXQ_TILE_G=wsp
run n80p 4 "--op gather --tokens 128,256" MLXQ_TILE_G=wsp MLXQ_CUDA_DEFINES=WSG_VN=0
summary
echo "round 1 done at $(( $(date +%s) - T0 )) s"
B=$PWD/.devrun/cuda_conformance
P="persistent_gather_on_permuted_x_matches_the_f64_reference gather_qmm_with_device_indices gather_into_captured_in_a_graph_replays_with_new_indices"
for f in wsp3 default; do
    ( cd mlxq && MLXQ_TILE_G=$f MLXQ_FIXTURES=$PWD/tests/fixtures timeout 90 $B --exact $P fp_gather_qmm_with_device_indices --test-threads=4 > $OUT/gtests-$f.log 2>&1; echo "rc=$?" >> $OUT/gtests-$f.log )
    grep -hE "^test |test result|rc=|panicked" $OUT/gtests-$f.log | sed "s/^/$f: /"
done
echo "tests done at $(( $(date +%s) - T0 )) s"
# The sanitizers over the new forms (the device budget may not allow a second call).
CS=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
S="bench --device cuda --op gather --iters 1 --warmup 0 --rotate-mib 1 --max-copies 1 --no-cublas --bits 4 --moe 6,200,1024 --top-k 4 --tokens 100"
for f in wsp3 wsp; do
    MLXQ_TILE_G=$f timeout 60 $CS --tool memcheck .devrun/mlxq $S > $OUT/memcheck-$f.txt 2>&1; echo "rc=$?" >> $OUT/memcheck-$f.txt
    MLXQ_TILE_G=$f timeout 75 $CS --tool racecheck --kernel-name regex:qmm_wsp .devrun/mlxq $S > $OUT/racecheck-$f.txt 2>&1; echo "rc=$?" >> $OUT/racecheck-$f.txt
    grep -hE "ERROR SUMMARY|RACECHECK SUMMARY|rc=" $OUT/memcheck-$f.txt $OUT/racecheck-$f.txt | sed "s/^/$f: /"
done
echo "sanitizers done at $(( $(date +%s) - T0 )) s"
# A second round while the job's time allows (the call's limit is 560 s).
[ $(( $(date +%s) - T0 )) -lt 200 ] && ab && summary
echo "all done at $(( $(date +%s) - T0 )) s"
