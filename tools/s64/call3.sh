#!/bin/bash
# Session 64's third device job (WSG_PF: the producer fences x's cp.async writes and arrives
# on `full` WSG_PF steps later; the consumers' per-step proxy fence gone): the 4-bit gather,
# graph µs, top-8 of 64 x 2048² at 128, 512 and 1024 tokens, the sets alternated: pf (the
# build's default, WSG_PF=4), pf0 (WSG_PF=0: the consumers' fence, as before) and pf2; then
# the gather tests on the default route and on wsp3 (concurrently), memcheck and racecheck on
# the default form, and a second round while the call's time allows.
RUN_S=45
source "$(dirname "$0")/../s58/job.sh"
J=$OUT/s64-call4.jsonl
G="--op gather --tokens 128,512,1024"
ab() {
    run pf 4 "$G" X=1
    run pf0 4 "$G" MLXQ_CUDA_DEFINES=WSG_PF=0
    run pf2 4 "$G" MLXQ_CUDA_DEFINES=WSG_PF=2
}
ab
summary
echo "round 1 done at $(( $(date +%s) - T0 )) s"
B=$PWD/.devrun/cuda_conformance
P="persistent_gather_on_permuted_x_matches_the_f64_reference gather_qmm_with_device_indices gather_into_captured_in_a_graph_replays_with_new_indices fp_gather_qmm_with_device_indices"
for f in default wsp3; do
    ( cd mlxq && MLXQ_TILE_G=$f MLXQ_FIXTURES=$PWD/tests/fixtures timeout 180 $B --exact $P --test-threads=4 > $OUT/gtests-$f.log 2>&1; echo "rc=$?" >> $OUT/gtests-$f.log ) &
done
wait
for f in default wsp3; do grep -hE "^test |test result|rc=|panicked" $OUT/gtests-$f.log | sed "s/^/$f: /"; done
echo "tests done at $(( $(date +%s) - T0 )) s"
CS=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
S="bench --device cuda --op gather --iters 1 --warmup 0 --rotate-mib 1 --max-copies 1 --no-cublas --bits 4 --moe 6,200,1024 --top-k 4 --tokens 100"
timeout 60 $CS --tool memcheck .devrun/mlxq $S > $OUT/memcheck.txt 2>&1; echo "rc=$?" >> $OUT/memcheck.txt
timeout 75 $CS --tool racecheck --kernel-name kns=qmm_wsp .devrun/mlxq $S > $OUT/racecheck.txt 2>&1; echo "rc=$?" >> $OUT/racecheck.txt
grep -hE "ERROR SUMMARY|RACECHECK SUMMARY|\"ok\":false|rc=" $OUT/memcheck.txt $OUT/racecheck.txt
echo "sanitizers done at $(( $(date +%s) - T0 )) s"
[ $(( $(date +%s) - T0 )) -lt 260 ] && ab && summary
echo "all done at $(( $(date +%s) - T0 )) s"
