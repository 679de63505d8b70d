#!/bin/bash
# Session 65's device job: the persistent gather's x rows by TMA (WSG_XT=1, the new default;
# the consumers drop their per-step proxy fence) against cp.async (WSG_XT=0, main's form),
# 4-bit gather, top-8 of 64 x 2048², graph µs, 16 to 1024 tokens, two rounds alternated (the
# bench checks every result against its reference); then the gather tests on the default route, on qmm_ws_g80
# (MLXQ_GATHER_XP=0) and on wsp3; then memcheck and racecheck on the default form.
RUN_S=60
source "$(dirname "$0")/../s58/job.sh"
J=$OUT/s65-call1.jsonl
G="--op gather --tokens 16,128,512,1024"
run warm 4 "--op gather --tokens 512" X=1
for r in 1 2; do
    run xt 4 "$G" X=1
    run xt0 4 "$G" MLXQ_CUDA_DEFINES=WSG_XT=0
done
summary
echo "timing done at $(( $(date +%s) - T0 )) s"
B=$PWD/.devrun/cuda_conformance
P="persistent_gather_on_permuted_x_matches_the_f64_reference gather_qmm_with_device_indices gather_into_captured_in_a_graph_replays_with_new_indices fp_gather_qmm_with_device_indices"
for f in default xp0 wsp3; do
    case $f in default) E=X=1;; xp0) E=MLXQ_GATHER_XP=0;; wsp3) E=MLXQ_TILE_G=wsp3;; esac
    ( cd mlxq && env $E MLXQ_FIXTURES=$PWD/tests/fixtures timeout 220 $B --exact $P --test-threads=4 > $OUT/gtests-$f.log 2>&1; echo "rc=$?" >> $OUT/gtests-$f.log ) &
done
wait
for f in default xp0 wsp3; do grep -hE "^test |test result|rc=|panicked" $OUT/gtests-$f.log | sed "s/^/$f: /"; done
echo "tests done at $(( $(date +%s) - T0 )) s"
CS=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
S="bench --device cuda --op gather --iters 1 --warmup 0 --rotate-mib 1 --max-copies 1 --no-cublas --bits 4 --moe 6,200,1024 --top-k 4 --tokens 100"
timeout 60 $CS --tool memcheck .devrun/mlxq $S > $OUT/memcheck.txt 2>&1; echo "rc=$?" >> $OUT/memcheck.txt
timeout 75 $CS --tool racecheck --kernel-name kns=qmm_wsp .devrun/mlxq $S > $OUT/racecheck.txt 2>&1; echo "rc=$?" >> $OUT/racecheck.txt
grep -hE "ERROR SUMMARY|RACECHECK SUMMARY|\"ok\":false|rc=" $OUT/memcheck.txt $OUT/racecheck.txt
echo "all done at $(( $(date +%s) - T0 )) s"
